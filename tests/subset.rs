//! Subset jobs against real servers: one FastGPT team moves from PostgreSQL
//! into PostgreSQL, OceanBase and Milvus targets that already hold another
//! team's rows (and one row of a third team whose id collides), killed -9
//! mid-load and resumed. Both teams' rows are right afterwards, the
//! colliding row is rejected rather than overwritten, and the guards,
//! verify and a changed filter on resume behave.
mod common;

use common::faults::{Moment, start, wait_for};
use common::milvus_db::{MRow, as_mrows, fresh_milvus_db, milvus_rows, milvus_upsert};
use common::*;

const MOVED: &str = "team-0-团队";
const THERE: &str = "team-1-团队";
const OTHER: &str = "another-deployment's team";

#[derive(Clone, Copy, Debug)]
enum Kind {
    Pg,
    Ob,
    Milvus,
}

/// The target's rows in the `rows()` form (Milvus' converted back).
fn target_rows(kind: Kind, url: &str) -> Vec<Row> {
    match kind {
        Kind::Pg => rows(url, "modeldata"),
        Kind::Ob => ob_rows(url, "modeldata"),
        Kind::Milvus => unreachable!("compared as MRow"),
    }
}

fn team(all: &[Row], team: &str, but: i64) -> Vec<Row> {
    all.iter()
        .filter(|r| r.team_id == team && r.id != but)
        .map(|r| Row {
            id: r.id,
            vector_bits: r.vector_bits.clone(),
            team_id: r.team_id.clone(),
            dataset_id: r.dataset_id.clone(),
            collection_id: r.collection_id.clone(),
            createtime: r.createtime.clone(),
        })
        .collect()
}

/// A row of a team the job does not move, under an id the moved team uses.
fn plant_collision(kind: Kind, url: &str, id: i64) {
    let vector = format!("[{}]", vec!["0.5"; 16].join(","));
    match kind {
        Kind::Pg => exec(
            url,
            &format!("INSERT INTO modeldata (id, vector, team_id, dataset_id, collection_id) VALUES ({id}, '{vector}', $${OTHER}$$, 'd', 'c')"),
        ),
        Kind::Ob => ob_exec(
            url,
            &format!("INSERT INTO modeldata (id, vector, team_id, dataset_id, collection_id) VALUES ({id}, '{vector}', \"{OTHER}\", 'd', 'c')"),
        ),
        Kind::Milvus => milvus_upsert(
            url,
            "modeldata",
            &MRow {
                id,
                vector_bits: vec![0.5f32.to_bits(); 16],
                team_id: OTHER.into(),
                dataset_id: "d".into(),
                collection_id: "c".into(),
                create_time_ms: 1_700_000_000_000,
            },
        ),
    }
}

fn check(kind: Kind, url: &str, all: &[Row], victim: i64) {
    let moved = team(all, MOVED, victim);
    let there = team(all, THERE, i64::MIN);
    let what = format!("{kind:?}");
    match kind {
        Kind::Milvus => {
            let got = milvus_rows(url, "modeldata");
            let of = |t: &str| got.iter().filter(|r| r.team_id == t).cloned().collect::<Vec<_>>();
            assert_eq!(of(MOVED), as_mrows(&moved), "{what}: the moved team");
            assert_eq!(of(THERE), as_mrows(&there), "{what}: the team already there");
            let other = of(OTHER);
            assert_eq!(other.len(), 1, "{what}: the colliding row");
            assert_eq!(other[0].id, victim, "{what}: the colliding row kept its id");
            assert_eq!(got.len(), moved.len() + there.len() + 1, "{what}: nothing else");
        }
        _ => {
            let got = target_rows(kind, url);
            let of = |t: &str| team(&got, t, i64::MIN);
            let exact = |a: &[Row], b: &[Row], w: &str| match kind {
                Kind::Pg => assert_eq!(a, b, "{what}: {w}"),
                _ => assert_rows_equal(a, b),
            };
            exact(&of(MOVED), &moved, "the moved team");
            exact(&of(THERE), &there, "the team already there");
            let other = of(OTHER);
            assert_eq!(other.iter().map(|r| r.id).collect::<Vec<_>>(), vec![victim], "{what}: the colliding row kept");
            assert_eq!(got.len(), moved.len() + there.len() + 1, "{what}: nothing else");
        }
    }
}

#[test]
fn one_team_moves_into_targets_holding_another_teams_rows_across_a_kill() {
    let src = fresh_db(&source_base(), "subset_src", true);
    ok(&["generate", "--to", &src, "--rows", "600", "--dim", "16"]);
    let all = rows(&src, "modeldata");
    // Teams interleave in the key space: every chunk's key range holds rows
    // of all three, so clearing a range without the filter would lose some.
    let victim = all.iter().filter(|r| r.team_id == MOVED).nth(17).unwrap().id;
    let targets = [
        (Kind::Pg, fresh_db(&target_base(), "subset_pg", true)),
        (Kind::Ob, fresh_ob_db("subset_ob")),
        (Kind::Milvus, fresh_milvus_db("subset_mv")),
    ];
    let state = tempdir();
    let root = state.path().to_str().unwrap();
    for (kind, dst) in &targets {
        let what = format!("{kind:?}");
        // Another team's rows first (a job of its own), and the colliding row.
        ok(&["migrate", "--from", &src, "--to", dst, "--team", THERE, "--chunk-rows", "50", "--quiet", "--state-root", root]);
        plant_collision(*kind, dst, victim);

        let job = format!("subset-{what}");
        let job_dir = state.path().join(&job);
        let args: Vec<String> = [
            "migrate", "--from", &src, "--to", dst, "--filter", &format!("team_id = '{MOVED}'"), "--chunk-rows", "50",
            "--job", &job, "--state-root", root, "--max-rejects", "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Killed -9 with chunks committed and one in flight, then resumed.
        let mut killed = args.clone();
        killed.extend(["--rate-limit".into(), "150".into(), "--quiet".into()]);
        let moment = Moment::Committed(2);
        let mut child = start(&killed, &moment);
        wait_for(&mut child, &job_dir, "migrate", &moment, &what);
        child.kill().unwrap();
        child.wait().unwrap();
        let plain: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let out = ok(&plain);
        let err = stderr(&out);
        assert!(err.contains("1 rows were rejected"), "{what}: {err}");
        let refused = rejects(&job_dir);
        assert_eq!(refused.len(), 1, "{what}: {refused:?}");
        assert_eq!(refused[0].0, victim, "{what}");
        assert!(refused[0].1.contains("outside the subset") && refused[0].1.contains(MOVED), "{what}: {}", refused[0].1);
        check(*kind, dst, &all, victim);

        // verify compares inside the filter: the team already there is equal,
        // the moved team lacks the one row it could not have.
        ok(&["verify", "--from", &src, "--to", dst, "--team", THERE, "--chunk-rows", "50"]);
        let v = vmig(&["verify", "--from", &src, "--to", dst, "--team", MOVED, "--chunk-rows", "50"]);
        assert!(!v.status.success(), "{what}: verify of the moved team must show the missing row");
        let said = format!("{}{}", String::from_utf8_lossy(&v.stdout), stderr(&v));
        assert!(said.contains(&format!("missing ids [{victim}]")), "{what}: {said}");

        // The same job with another filter is refused, naming both.
        let mut other = plain.clone();
        let pos = other.iter().position(|a| *a == "--filter").unwrap();
        let t2 = format!("team_id = '{THERE}'");
        other[pos + 1] = &t2;
        let o = vmig(&other);
        assert!(!o.status.success(), "{what}: a changed filter was accepted");
        assert!(stderr(&o).contains("planned for the subset team_id = 'team-0-团队'"), "{what}: {}", stderr(&o));

        // A new job for a team the target already holds is refused by the
        // guard (inside the filter), not by the other teams' rows.
        let g = vmig(&["migrate", "--from", &src, "--to", dst, "--team", MOVED, "--job", "fresh", "--state-root", root, "--quiet"]);
        assert!(!g.status.success(), "{what}: the guard let a second job in");
        assert!(stderr(&g).contains("already has rows") && stderr(&g).contains("team_id = 'team-0-团队'"), "{what}: {}", stderr(&g));
        check(*kind, dst, &all, victim);
        // With --on-existing truncate it empties the subset only, then copies it again.
        ok(&[
            "migrate", "--from", &src, "--to", dst, "--team", MOVED, "--job", "fresh", "--state-root", root, "--quiet",
            "--on-existing", "truncate", "--max-rejects", "1",
        ]);
        check(*kind, dst, &all, victim);
    }
}

/// A subset exported to staging carries its filter: the import writes it
/// inside the filter only, verify against the staging area adopts it, an
/// import asking for another subset is refused, and recall is measured
/// inside the subset on both sides.
#[test]
fn a_subset_goes_through_staging_and_is_verified_and_searched_inside_it() {
    let src = fresh_db(&source_base(), "subset_st_src", true);
    ok(&["generate", "--to", &src, "--rows", "400", "--dim", "16"]);
    let all = rows(&src, "modeldata");
    let dst = fresh_db(&target_base(), "subset_st_dst", true);
    let state = tempdir();
    let root = state.path().to_str().unwrap();
    ok(&["migrate", "--from", &src, "--to", &dst, "--team", THERE, "--chunk-rows", "50", "--quiet", "--state-root", root]);

    let st = tempdir();
    let dir = st.path().to_str().unwrap();
    ok(&["export", "--from", &src, "--staging", dir, "--team", MOVED, "--chunk-rows", "50", "--quiet"]);
    let manifest = std::fs::read_to_string(st.path().join("manifest.json")).unwrap();
    assert!(manifest.contains(r#""filter": "team_id = 'team-0-团队'""#), "{manifest}");

    let wrong = vmig(&["import", "--staging", dir, "--to", &dst, "--team", THERE, "--quiet"]);
    assert!(!wrong.status.success());
    assert!(stderr(&wrong).contains("holds the subset team_id = 'team-0-团队', not team_id = 'team-1-团队'"), "{}", stderr(&wrong));

    ok(&["import", "--staging", dir, "--to", &dst, "--quiet"]);
    let got = rows(&dst, "modeldata");
    assert_eq!(team(&got, MOVED, i64::MIN), team(&all, MOVED, i64::MIN));
    assert_eq!(team(&got, THERE, i64::MIN), team(&all, THERE, i64::MIN));
    assert_eq!(got.len(), team(&all, MOVED, i64::MIN).len() + team(&all, THERE, i64::MIN).len());

    // No filter given: verify takes the staging area's and says so.
    let v = ok(&["verify", "--from", &src, "--staging", dir]);
    assert!(stderr(&v).contains("the subset team_id = 'team-0-团队'"), "{}", stderr(&v));
    // The whole tables differ (the target lacks team 2); the subset does not.
    assert!(!vmig(&["verify", "--from", &src, "--to", &dst]).status.success());
    let out = ok(&["verify", "--from", &src, "--to", &dst, "--team", MOVED, "--recall", "5", "--queries", "20"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("recall@5"), "{said}");
}
