//! What verification costs, against the real local databases:
//!
//!     BENCH_ROWS=200000 cargo bench --bench verify     (BENCH_DIM, BENCH_TARGETS=pg,ob,milvus)
//!
//! Generates a FastGPT table with its HNSW index in PostgreSQL, migrates it
//! into each target (indexes built), then times on each, in the same run:
//! the full `verify` (every row of both sides), `verify --sample 1000`, and
//! `verify --recall 10 --queries 200` with the recall of both sides' indexes.

use std::process::Command;
use std::time::Instant;

#[allow(dead_code)]
#[path = "support/oceanbase.rs"]
mod oceanbase;
#[allow(dead_code)]
#[path = "support/postgres.rs"]
mod postgres;
#[allow(dead_code)]
#[path = "support/milvus.rs"]
mod milvus_bench;
use postgres::env_or;

const VMIG: &str = env!("CARGO_BIN_EXE_vmig");

/// Runs vmig; (seconds, exit success).
fn timed(args: &[&str]) -> (f64, bool) {
    let started = Instant::now();
    let out = Command::new(VMIG).args(args).output().expect("spawn vmig");
    if !out.status.success() {
        eprintln!("vmig {:?}: {}", &args[..2], String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or(""));
    }
    (started.elapsed().as_secs_f64(), out.status.success())
}

fn main() {
    let rows: u64 = env_or("BENCH_ROWS", "200000").parse().unwrap();
    let dim: u32 = env_or("BENCH_DIM", "1536").parse().unwrap();
    let targets = env_or("BENCH_TARGETS", "pg,ob,milvus");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let src_base = env_or("VMIG_TEST_PG_SOURCE", "postgresql://postgres:postgres@127.0.0.1:55432/postgres");
    let src = rt.block_on(postgres::fresh_db(&src_base, "bench_verify_src"));
    eprintln!("generating {rows} rows of {dim}-d with the source's HNSW index …");
    let (gen_secs, ok) = timed(&["generate", "--to", &src, "--rows", &rows.to_string(), "--dim", &dim.to_string()]);
    assert!(ok, "generate failed");
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().to_str().unwrap().to_string();

    let mut lines = Vec::new();
    for t in targets.split(',') {
        let dst = match t {
            "pg" => rt.block_on(postgres::fresh_db(&env_or("VMIG_TEST_PG_TARGET", "postgresql://postgres:postgres@127.0.0.1:55433/postgres"), "bench_verify_dst")),
            "ob" => rt.block_on(oceanbase::fresh_db(&env_or("VMIG_TEST_SEEKDB", "mysql://root@127.0.0.1:52881/test"), "bench_verify_dst")),
            "milvus" => rt.block_on(milvus_bench::fresh_db(&env_or("VMIG_TEST_MILVUS", "http://127.0.0.1:19530"), "bench_verify_dst")),
            other => panic!("BENCH_TARGETS: unknown target {other}"),
        };
        eprintln!("{t}: migrating (indexes built) …");
        let (migrate_secs, ok) = timed(&["migrate", "--from", &src, "--to", &dst, "--state-root", &state, "--quiet"]);
        assert!(ok, "{t}: migrate failed");
        eprintln!("{t}: full verify …");
        let (full_secs, full_ok) = timed(&["verify", "--from", &src, "--to", &dst]);
        eprintln!("{t}: verify --sample 1000 …");
        let (sample_secs, sample_ok) = timed(&["verify", "--from", &src, "--to", &dst, "--sample", "1000", "--seed", "7"]);
        eprintln!("{t}: verify --recall 10 --queries 200 …");
        let report = tmp.path().join(format!("recall-{t}.json"));
        let (recall_secs, recall_ok) = timed(&[
            "verify", "--from", &src, "--to", &dst, "--sample", "1", "--seed", "7", "--recall", "10", "--queries", "200",
            "--report", report.to_str().unwrap(),
        ]);
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap_or_default()).unwrap_or_default();
        let recall = |side: &str| r["recall"][side]["recall"].as_f64().unwrap_or(f64::NAN);
        let p50 = |side: &str| r["recall"][side]["latency_p50_ms"].as_f64().unwrap_or(f64::NAN);
        lines.push(format!(
            "{t:<7} {migrate_secs:>9.1} {full_secs:>9.1}{} {sample_secs:>9.1}{} {recall_secs:>9.1}{} {:>8.4} {:>8.4} {:>7.1} {:>7.1}",
            if full_ok { " " } else { "!" },
            if sample_ok { " " } else { "!" },
            if recall_ok { " " } else { "!" },
            recall("source"),
            recall("target"),
            p50("source"),
            p50("target"),
        ));
    }
    println!("\nvmig verify benchmark: {rows} rows × {dim}-d from PostgreSQL (generated with its HNSW index in {gen_secs:.0} s)");
    println!("seconds per command; recall@10 over 200 queries; search p50 in ms; ! = the command exited non-zero");
    println!("{:<7} {:>9} {:>10} {:>10} {:>10} {:>8} {:>8} {:>7} {:>7}", "target", "migrate", "verify", "--sample", "--recall", "src r@10", "dst r@10", "src p50", "dst p50");
    for l in lines {
        println!("{l}");
    }
}
