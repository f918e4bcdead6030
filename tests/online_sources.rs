//! Online migration from sources without a change stream a client can
//! follow: OceanBase / seekdb (triggers append to a changelog table) and
//! Milvus (a createTime watermark, and an id-set reconcile for deletes).
//! A writer imitates FastGPT on the source through the snapshot and while
//! following; the job is killed (SIGKILL) in both phases, resumed and cut
//! over; the target must then equal the source, and nothing vmig installed
//! may remain on it.
mod common;

use common::faults::{Moment, start, wait_for};
use common::milvus_db::{as_mrows, fastgpt_rows, fresh_milvus_db, milvus_count_settled, milvus_rows, milvus_writer, seed_fastgpt, NewIds};
use common::online::{OnlineSource, Reaper, Writer, ob_leftovers, online_args, online_scenario, online_scenario_cut, staging_scenario, wait_following};
use common::*;

/// A seekdb source of 1,600 FastGPT rows and its writer.
fn ob_source(name: &str) -> OnlineSource {
    let src = fresh_ob_db(&format!("{name}_src"));
    ok(&["generate", "--to", &src, "--rows", "1600", "--dim", "1536"]);
    let (w, l) = (src.clone(), src.clone());
    OnlineSource { url: src, extra_args: Vec::new(), writer: Box::new(move || Writer::start_ob(&w)), leftovers: Box::new(move || ob_leftovers(&l)) }
}

#[test]
fn online_from_seekdb_into_postgres_survives_kills_and_cuts_over_exactly() {
    let dst = fresh_db(&target_base(), "online_obpg_dst", true);
    online_scenario("online_obpg", &ob_source("online_obpg"), &dst, &|src| {
        let want = ob_rows(src, "modeldata");
        assert_rows_equal(&want, &rows(&dst, "modeldata"));
        assert!(want.iter().any(|r| r.id > 1_000_000), "no key was moved by the writer");
        assert!(query_i64(&dst, "SELECT nextval('modeldata_id_seq')") > query_i64(&dst, "SELECT max(id) FROM modeldata"));
    });
}

#[test]
fn online_from_seekdb_into_milvus_survives_kills_and_cuts_over_exactly() {
    let m = fresh_milvus_db("online_obmv");
    let said = online_scenario_cut("online_obmv", &ob_source("online_obmv"), &m, &[], &|src| {
        // Milvus gets the floats seekdb stores, bit for bit.
        let want = as_mrows(&ob_rows(src, "modeldata"));
        assert_eq!(milvus_count_settled(&m, "modeldata", want.len() as i64), want.len() as i64, "count(*) equals the source: no duplicates");
        assert_eq!(milvus_rows(&m, "modeldata"), want);
    });
    // Checked once every flushed segment is served (Milvus 2.3 can drop
    // deletes while it hands a segment over): milvus-lite lists none.
    let lite = std::env::var("VMIG_TEST_MILVUS").ok() == std::env::var("VMIG_TEST_MILVUS_LITE").ok();
    assert!(lite || said.contains(", segments served "), "the cutover waited for the flushed segments to be served: {said}");
}

/// seekdb → staging → PostgreSQL, export and import as separate processes.
#[test]
fn online_from_seekdb_through_staging_with_separate_processes() {
    let name = "online_obst";
    let source = ob_source(name);
    let src = source.url.clone();
    let dst = fresh_db(&target_base(), &format!("{name}_dst"), true);
    staging_scenario(name, &source, &dst);
    assert_rows_equal(&ob_rows(&src, "modeldata"), &rows(&dst, "modeldata"));
}

/// No TRIGGER privilege: one line before anything is copied; `reset`
/// removes the triggers and changelog of a job that stopped.
#[test]
fn seekdb_capture_needs_the_trigger_privilege_and_reset_removes_it() {
    let src = fresh_ob_db("online_obpriv");
    ok(&["generate", "--to", &src, "--rows", "50", "--dim", "8"]);
    let dst = fresh_db(&target_base(), "online_obpriv_dst", true);
    ob_exec(&src, "DROP USER IF EXISTS vmig_notrig");
    ob_exec(&src, "CREATE USER vmig_notrig IDENTIFIED BY 'pw'");
    ob_exec(&src, "GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, DROP, INDEX, ALTER ON online_obpriv.* TO vmig_notrig");
    let as_user = src.replacen("mysql://root%40sys@", "mysql://vmig_notrig:pw@", 1);
    let state = tempdir();
    let args = online_args(&as_user, &dst, state.path(), "obpriv");
    let out = vmig(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(!out.status.success());
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("TRIGGER privilege") && lines[0].contains("GRANT TRIGGER ON online_obpriv.*"), "{err}");
    assert!(!err.contains("pw@"), "the password leaked: {err}");
    assert_eq!(query_i64(&dst, "SELECT count(*) FROM pg_tables WHERE tablename = 'modeldata'"), 0, "copied");
    assert_eq!(ob_leftovers(&src), "", "a refused start must leave nothing");

    // As root: runs, stops (SIGTERM), then reset drops its triggers and changelog.
    let args = online_args(&src, &dst, state.path(), "obpriv2");
    let job_dir = state.path().join("obpriv2");
    let mut run = start(&args, &Moment::Committed(0));
    let _reap = Reaper(vec![run.id()]);
    wait_for(&mut run, &job_dir, "migrate", &Moment::Phase("following".into()), "obpriv2");
    ob_exec(&src, "DELETE FROM modeldata ORDER BY id LIMIT 5");
    wait_following(&mut run, &job_dir, "migrate", 0, "obpriv2");
    let st = state.path().to_str().unwrap();
    let status = String::from_utf8_lossy(&ok(&["status", "--job", "obpriv2", "--state-root", st]).stdout).into_owned();
    assert!(status.contains("applied 0 inserts, 0 updates, 5 deletes"), "{status}");
    assert!(status.contains("changelog table vmig_changes_modeldata"), "{status}");
    assert_eq!(query_i64(&dst, "SELECT count(*) FROM modeldata"), 45);
    unsafe { libc::kill(run.id() as i32, libc::SIGTERM) };
    assert_eq!(run.wait().unwrap().code(), Some(130));
    assert_ne!(ob_leftovers(&src), "", "the capture stays for a resume");
    let refused = vmig(&["reset", "--job", "obpriv2", "--state-root", st, "--to", &dst, "--yes"]);
    assert!(stderr(&refused).contains("give --from"), "{}", stderr(&refused));
    ok(&["reset", "--job", "obpriv2", "--state-root", st, "--to", &dst, "--from", &src, "--yes"]);
    assert_eq!(ob_leftovers(&src), "");
}

/// A Milvus source of 1,600 FastGPT rows (some stamped in the future, as a
/// client with a fast clock would) and a writer inserting new rows and
/// deleting whole collections by filter. Reconciles every 2 s, so deletes
/// also arrive while following, not only at cutover.
fn milvus_source(name: &str) -> OnlineSource {
    let src = fresh_milvus_db(&format!("{name}_src"));
    seed_fastgpt(&src, "modeldata", &fastgpt_rows(1600, 1536, 11), 1536, 2, false);
    let w = src.clone();
    OnlineSource {
        url: src,
        extra_args: ["--reconcile-every", "2", "--watermark-margin", "3"].iter().map(|s| s.to_string()).collect(),
        writer: Box::new(move || milvus_writer(&w, "modeldata", 1536, NewIds::CountingFrom(9_000_000_000_000_000))),
        leftovers: Box::new(String::new),
    }
}

#[test]
fn online_from_milvus_into_postgres_survives_kills_and_cuts_over_exactly() {
    let dst = fresh_db(&target_base(), "online_mvpg_dst", true);
    let said = online_scenario_cut("online_mvpg", &milvus_source("online_mvpg"), &dst, &[], &|src| {
        let want = milvus_rows(src, "modeldata");
        assert_eq!(as_mrows(&rows(&dst, "modeldata")), want);
        assert!(want.iter().any(|r| r.team_id == "team_w"), "the writer's rows are there");
    });
    assert!(said.contains("changed keys and") && !said.contains("verified both whole tables"), "checked what changed: {said}");
}

#[test]
fn online_from_milvus_into_another_milvus_database_survives_kills_and_cuts_over_exactly() {
    let dst = fresh_milvus_db("online_mvmv_dst");
    // `--full-verify`: the whole-table repair at cutover, recopying whatever differs.
    let said = online_scenario_cut("online_mvmv", &milvus_source("online_mvmv"), &dst, &["--full-verify"], &|src| {
        let want = milvus_rows(src, "modeldata");
        assert_eq!(milvus_count_settled(&dst, "modeldata", want.len() as i64), want.len() as i64, "count(*) equals the source: no duplicates");
        assert_eq!(milvus_rows(&dst, "modeldata"), want);
    });
    assert!(said.contains("verified both whole tables"), "{said}");
}
