//! Several tables in one job, against real servers: a pipeline file lists
//! two PostgreSQL tables (one of them as a subset, the other renamed) for
//! one OceanBase target; the run is killed -9 mid-load and resumed, and
//! both tables arrive exactly, with one report section per table.
mod common;

use common::faults::{Moment, start, wait_for};
use common::*;

#[test]
fn two_tables_in_one_job_survive_a_kill_and_report_a_section_each() {
    let src = fresh_db(&source_base(), "tables_src", true);
    ok(&["generate", "--to", &src, "--rows", "300", "--dim", "16"]);
    ok(&["generate", "--to", &src, "--table", "notes", "--rows", "200", "--dim", "8"]);
    let dst = fresh_ob_db("tables_dst");
    let state = tempdir();
    let root = state.path().to_str().unwrap();
    let file = state.path().join("two-tables.json");
    let report = state.path().join("report.json");
    std::fs::write(
        &file,
        serde_json::json!({
            "from": src, "to": dst, "job": "two", "chunk_rows": 40, "workers": 2, "report": report,
            "tables": [
                { "table": "modeldata", "team": "team-2-团队" },
                { "table": "notes", "target_table": "notes_copy" }
            ]
        })
        .to_string(),
    )
    .unwrap();
    let args: Vec<String> = ["migrate", "--config", file.to_str().unwrap(), "--state-root", root].iter().map(|s| s.to_string()).collect();

    // Killed once the second table has committed chunks (both run at once).
    let mut killed = args.clone();
    killed.extend(["--rate-limit".into(), "100".into()]);
    let moment = Moment::Committed(2);
    let mut child = start(&killed, &moment);
    wait_for(&mut child, &state.path().join("two.notes_copy"), "migrate", &moment, "two tables");
    child.kill().unwrap();
    child.wait().unwrap();

    let plain: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let out = ok(&plain);
    let err = stderr(&out);
    assert!(err.contains("2 tables in one job"), "{err}");
    assert!(err.contains("── table modeldata → modeldata where team_id = 'team-2-团队' (job two.modeldata)"), "{err}");
    assert!(err.contains("── table notes → notes_copy (job two.notes_copy)"), "{err}");

    let want: Vec<Row> = rows(&src, "modeldata").into_iter().filter(|r| r.team_id == "team-2-团队").collect();
    assert_rows_equal(&want, &ob_rows(&dst, "modeldata"));
    assert_rows_equal(&rows(&src, "notes"), &ob_rows(&dst, "notes_copy"));

    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["ok"], true);
    let sections = r["tables"].as_array().unwrap();
    assert_eq!(sections.len(), 2);
    assert_eq!(sections[0]["filter"], "team_id = 'team-2-团队'");
    assert_eq!(sections[1]["target_table"], "notes_copy");
    // The resumed run skipped what the killed one committed, in the table it was killed in.
    assert!(sections[1]["report"]["chunks_skipped"].as_u64().unwrap() >= 2, "{}", sections[1]);

    // verify each table as its own pair.
    ok(&["verify", "--from", &src, "--to", &dst, "--team", "team-2-团队"]);
    ok(&["verify", "--from", &src, "--to", &dst, "--table", "notes", "--target-table", "notes_copy"]);
}
