//! One run of a job at a time on every target kind, and runs that live
//! through a restart of the database they read or write.
mod common;
use common::faults::*;
use common::milvus_db::*;
use common::*;

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[test]
fn a_second_run_of_a_job_is_refused_while_the_first_lives_on_every_target() {
    let src = fresh_db(&source_base(), "lock_src", true);
    ok(&["generate", "--to", &src, "--rows", "1600", "--dim", "32"]);
    let dir = tempdir();
    let st = dir.path().join("st");
    let st_s = st.to_str().unwrap();
    // Staging: the export holds the staging area (an import reading it is welcome).
    second_run_is_refused_while_the_first_lives(&s(&["export", "--from", &src, "--staging", st_s, "--chunk-rows", "200"]), &st, "export");
    let dst = fresh_db(&target_base(), "lock_dst", true);
    second_run_is_refused_while_the_first_lives(&s(&["import", "--staging", st_s, "--to", &dst]), &st, "import into PostgreSQL");
    assert_eq!(assert_same_rows(&src, "modeldata", &dst, "modeldata"), 1600);
    let ob = fresh_ob_db("lock_ob");
    second_run_is_refused_while_the_first_lives(&s(&["import", "--staging", st_s, "--to", &ob]), &st, "import into OceanBase");
    assert_rows_equal(&rows(&src, "modeldata"), &ob_rows(&ob, "modeldata"));
    let m = fresh_milvus_db("lock_mv");
    second_run_is_refused_while_the_first_lives(&s(&["import", "--staging", st_s, "--to", &m]), &st, "import into Milvus");
    assert_eq!(milvus_rows(&m, "modeldata"), as_mrows(&rows(&src, "modeldata")));
}

/// A 1600-row FastGPT table exported in 8 chunks: (source URL, staging area).
fn staged_source(name: &str, dir: &std::path::Path) -> (String, std::path::PathBuf) {
    let src = fresh_db(&source_base(), name, true);
    ok(&["generate", "--to", &src, "--rows", "1600", "--dim", "32"]);
    let st = dir.join("st");
    ok(&["export", "--from", &src, "--staging", st.to_str().unwrap(), "--chunk-rows", "200", "--quiet"]);
    (src, st)
}

/// The run must have felt the restart (it said it retried), and then either
/// completed, or failed with one clear line and completes when run again
/// (the two allowed outcomes; Milvus 2.3 sometimes answers for
/// minutes after a restart with errors of its own).
fn assert_survived(res: (bool, String), what: &str, args: &[String]) {
    let (success, text) = res;
    assert!(text.contains("retrying in"), "{what}: the restart went unnoticed, so nothing was tested:\n{text}");
    if !success {
        assert!(text.lines().any(|l| l.starts_with("error: ")), "{what}: failed without an error line:\n{text}");
        let plain: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
        ok(&plain);
    }
}

#[test]
fn postgres_target_and_source_restarts_mid_load_are_ridden_out() {
    let dir = tempdir();
    let (src, st) = staged_source("restart_src", dir.path());
    let st_s = st.to_str().unwrap();

    let target = PrivateCluster::start("restart-dst", 55493);
    let args = s(&["import", "--staging", st_s, "--to", &target.url]);
    let res = run_across_a_restart(&args, &st, 2, 600, &|| target.restart(), "PostgreSQL target restart");
    assert_survived(res, "PostgreSQL target", &args);
    assert_eq!(assert_same_rows(&src, "modeldata", &target.url, "modeldata"), 1600);
    assert_eq!(query_i64(&target.url, "SELECT count(*) FROM pg_index WHERE indrelid = 'modeldata'::regclass AND indisvalid"), 4);

    let source = PrivateCluster::start("restart-src", 55494);
    ok(&["generate", "--to", &source.url, "--rows", "1600", "--dim", "32"]);
    let dst = fresh_db(&target_base(), "restart_dst", true);
    let state = dir.path().join("state");
    let args = s(&["migrate", "--from", &source.url, "--to", &dst, "--chunk-rows", "200", "--job", "restart", "--state-root", state.to_str().unwrap()]);
    let res = run_across_a_restart(&args, &state.join("restart"), 2, 600, &|| source.restart(), "PostgreSQL source restart");
    assert_survived(res, "PostgreSQL source", &args);
    assert_eq!(assert_same_rows(&source.url, "modeldata", &dst, "modeldata"), 1600);
}

#[test]
fn oceanbase_target_restart_mid_load_is_ridden_out() {
    let dir = tempdir();
    let (src, st) = staged_source("restart_ob_src", dir.path());
    let st_s = st.to_str().unwrap();
    let ob = PrivateSeekdb::start("restart", 52993);
    let args = s(&["import", "--staging", st_s, "--to", &ob.url, "--retry-for", "300"]);
    let res = run_across_a_restart(&args, &st, 2, 600, &|| ob.restart(), "seekdb restart");
    assert_survived(res, "seekdb", &args);
    assert_rows_equal(&rows(&src, "modeldata"), &ob_rows(&ob.url, "modeldata"));
}

#[test]
fn milvus_target_restart_mid_load_is_ridden_out() {
    let dir = tempdir();
    let (src, st) = staged_source("restart_mv_src", dir.path());
    let st_s = st.to_str().unwrap();
    let server = PrivateMilvus::start("restart", 19633, false);
    let args = s(&["import", "--staging", st_s, "--to", &server.base, "--retry-for", "300"]);
    let res = run_across_a_restart(&args, &st, 2, 400, &|| server.restart(), "Milvus restart");
    assert_survived(res, "Milvus", &args);
    assert_eq!(milvus_count(&server.base, "modeldata"), 1600);
    assert_eq!(milvus_rows(&server.base, "modeldata"), as_mrows(&rows(&src, "modeldata")));
}
