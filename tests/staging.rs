//! PG → staging → PG across processes: source stopped, kill -9 and resume,
//! tampered files, and other tools reading the chunk files.
mod common;
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn export_then_import_with_source_stopped() {
    let source = PrivateCluster::start("stopped-src", 55491);
    let dst = fresh_db(&target_base(), "stopped_dst", true);
    ok(&["generate", "--to", &source.url, "--rows", "1200", "--dim", "1536"]);
    let before = rows(&source.url, "modeldata");
    let dir = tempdir();
    let st = dir.path().join("st");
    let st = st.to_str().unwrap();
    ok(&["export", "--from", &source.url, "--staging", st, "--chunk-rows", "300"]);
    source.stop();
    ok(&["import", "--staging", st, "--to", &dst]);
    assert_eq!(rows(&dst, "modeldata"), before, "imported rows differ from the source's");
    ok(&["verify", "--from", st, "--to", &dst]);
    let out = ok(&["status", "--staging", st]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("import: done") && text.contains("export: done"), "{text}");
    ok(&["inspect", st, "--deep"]);

    // Any Parquet reader understands the chunks.
    if let Ok(py) = std::env::var("VMIG_TEST_PYTHON") {
        let script = format!(
            "import pyarrow.parquet as pq, pyarrow as pa, duckdb, glob\n\
             t = pa.concat_tables([pq.read_table(f) for f in sorted(glob.glob('{st}/chunks/*.parquet'))])\n\
             assert t.num_rows == 1200, t.num_rows\n\
             assert str(t.schema.field('vector').type) == 'fixed_size_list<item: float not null>[1536]', t.schema\n\
             n, d = duckdb.sql(\"select count(*), min(len(vector)) from '{st}/chunks/*.parquet'\").fetchall()[0]\n\
             assert (n, d) == (1200, 1536), (n, d)\n\
             print('ids', t.column('id')[0])\n"
        );
        let out = Command::new(py).args(["-c", &script]).output().unwrap();
        assert!(out.status.success(), "pyarrow/duckdb: {}", String::from_utf8_lossy(&out.stderr));
        let first = String::from_utf8_lossy(&out.stdout);
        assert!(first.contains(&format!("ids {}", before[0].id)), "{first}");
    } else {
        panic!("VMIG_TEST_PYTHON not set: run the suite through scripts/test.sh");
    }
}

fn ledger_chunks(url: &str) -> i64 {
    let rt = rt();
    rt.block_on(async {
        let c = client(url).await;
        match c.query_one("SELECT count(*) FROM vmig_ledger", &[]).await {
            Ok(r) => r.get(0),
            Err(_) => 0,
        }
    })
}

#[test]
fn import_killed_at_several_points_resumes_exactly() {
    let (src, dst) = dbs("kill9");
    ok(&["generate", "--to", &src, "--rows", "4000", "--dim", "64"]);
    let dir = tempdir();
    let st = dir.path().join("st");
    let st = st.to_str().unwrap();
    ok(&["export", "--from", &src, "--staging", st, "--chunk-rows", "200"]);
    // Throttled so the kill lands mid-run: 20 chunks at ~1500 rows/s.
    let mut committed_before = -1;
    for kill_after_chunks in [0i64, 4, 11] {
        let mut child = Command::new(VMIG)
            .args(["import", "--staging", st, "--to", &dst, "--rate-limit", "1500", "--quiet"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let st_dir = std::path::Path::new(st);
        loop {
            let n = ledger_chunks(&dst);
            // The first kill lands as the load starts (status says so), the others after chunks.
            let loading = common::faults::status_of(st_dir, "import")
                .is_some_and(|s| s["phase"] == "loading" && s["pid"].as_u64() == Some(child.id() as u64));
            if n >= kill_after_chunks && (kill_after_chunks > 0 || loading) {
                break;
            }
            assert!(Instant::now() < deadline, "import did not progress");
            std::thread::sleep(Duration::from_millis(20));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let n = ledger_chunks(&dst);
        assert!(n < 20, "killed too late to test anything ({n} chunks)");
        assert!(n >= committed_before, "committed chunks went backwards");
        committed_before = n;
        // Nothing half-written: the target holds exactly the committed chunks' rows.
        let ledger_rows = query_i64(&dst, "SELECT coalesce(sum(rows), 0)::int8 FROM vmig_ledger");
        assert_eq!(query_i64(&dst, "SELECT count(*) FROM modeldata"), ledger_rows);
    }
    let out = ok(&["import", "--staging", st, "--to", &dst]);
    assert!(committed_before == 0 || stderr(&out).contains("already committed"));
    assert_eq!(assert_same_rows(&src, "modeldata", &dst, "modeldata"), 4000);
    ok(&["verify", "--from", &src, "--to", &dst]);
}

#[test]
fn export_killed_resumes_and_tampered_chunks_are_refused() {
    let (src, dst) = dbs("tamper");
    ok(&["generate", "--to", &src, "--rows", "1500", "--dim", "32"]);
    let dir = tempdir();
    let st = dir.path().join("st");
    let st_s = st.to_str().unwrap();
    let args: Vec<String> = ["export", "--from", &src, "--staging", st_s, "--chunk-rows", "100", "--rate-limit", "1000", "--quiet"]
        .iter()
        .map(|a| a.to_string())
        .collect();
    let moment = common::faults::Moment::Committed(5);
    let mut child = common::faults::start(&args, &moment);
    common::faults::wait_for(&mut child, &st, "export", &moment, "export");
    child.kill().unwrap();
    child.wait().unwrap();
    ok(&["export", "--from", &src, "--staging", st_s, "--chunk-rows", "100"]);
    assert_eq!(staged_rows(&st), rows(&src, "modeldata"), "the staged rows (pyarrow) equal the source's (SQL)");
    ok(&["verify", "--from", &src, "--to", st_s]);
    ok(&["inspect", st_s]);

    // Flip one byte inside chunk 3; truncate chunk 5.
    let c3 = st.join("chunks/000003.parquet");
    let mut bytes = std::fs::read(&c3).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&c3, bytes).unwrap();
    let c5 = st.join("chunks/000005.parquet");
    let len = std::fs::metadata(&c5).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&c5).unwrap().set_len(len - 100).unwrap();

    let out = vmig(&["inspect", st_s]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("chunk 000003") && text.contains("chunk 000005"), "{text}");
    let out = vmig(&["import", "--staging", st_s, "--to", &dst]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("chunk 000003") || err.contains("chunk 000005"), "{err}");
    assert!(err.lines().filter(|l| l.starts_with("error:")).count() >= 1);
}

#[test]
fn ctrl_c_stops_cleanly_and_the_job_resumes() {
    let (src, dst) = dbs("ctrlc");
    ok(&["generate", "--to", &src, "--rows", "3000", "--dim", "16"]);
    let state = tempdir();
    let sr = state.path().to_str().unwrap();
    let child = Command::new(VMIG)
        .args(["migrate", "--from", &src, "--to", &dst, "--chunk-rows", "200", "--rate-limit", "1500", "--state-root", sr])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while ledger_chunks(&dst) < 2 {
        assert!(Instant::now() < deadline, "migrate did not progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    let committed = ledger_chunks(&dst);
    assert!(committed < 15, "stopped too late ({committed} chunks)");
    let ledger_rows = query_i64(&dst, "SELECT coalesce(sum(rows), 0)::int8 FROM vmig_ledger");
    assert_eq!(query_i64(&dst, "SELECT count(*) FROM modeldata"), ledger_rows, "in-flight chunks were not rolled back");
    let out = ok(&["status", "--job", &std::fs::read_dir(state.path()).unwrap().next().unwrap().unwrap().file_name().to_string_lossy(), "--state-root", sr]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("migrate: cancelled"));
    ok(&["migrate", "--from", &src, "--to", &dst, "--chunk-rows", "200", "--state-root", sr]);
    assert_eq!(assert_same_rows(&src, "modeldata", &dst, "modeldata"), 3000);
}
