//! Time to a usable target: the whole command, index builds included, against
//! the real local databases (scripts/dbs.sh start):
//!
//!     BENCH_ROWS=200000 cargo bench --bench index   (BENCH_DIM; BENCH_CASES=pg,ob,milvus,manual)
//!
//! The source is FastGPT's modeldata (HNSW m=32, ef_construction=128, inner
//! product, plus its two btree indexes). Measured in the same run, one case
//! after the other:
//! - `pg`: `vmig migrate` PostgreSQL → PostgreSQL, whole command, with the
//!   phases of its report (load, each index build, the rest of the finish);
//! - `manual`: what a DBA types: psql's binary `\copy` out piped into psql's
//!   binary `\copy` in, then `CREATE INDEX … USING hnsw` and the two btree
//!   indexes, one after the other; as pgvector's documentation advises, the
//!   session first raises `maintenance_work_mem` to fit the graph, to the
//!   same value vmig chooses (1.25 × the graph's estimate, at least 1 GB), so
//!   both build with the same memory;
//! - `ob`, `milvus`: `vmig migrate` PostgreSQL → OceanBase/seekdb and
//!   PostgreSQL → Milvus, whole command, with their phases.
//!
//! A FastGPT source holds a built HNSW index, but a copy needs only its
//! definition: the source's vector index is created and interrupted (left
//! INVALID, as an interrupted `CREATE INDEX CONCURRENTLY` leaves it), which
//! saves building the same graph once more on the source. With
//! BENCH_REUSE_SOURCE=1 a source from an earlier run with the same row count is kept.

use std::process::{Command, Stdio};
use std::time::Instant;

#[allow(dead_code)]
#[path = "support/milvus.rs"]
mod milvus_bench;
#[allow(dead_code)]
#[path = "support/oceanbase.rs"]
mod oceanbase;
#[allow(dead_code)]
#[path = "support/postgres.rs"]
mod postgres;
use postgres::{client, env_or, fresh_db, with_db};

const VMIG: &str = env!("CARGO_BIN_EXE_vmig");
const VECTOR_INDEX: &str = "CREATE INDEX modeldata_vector_index ON modeldata USING hnsw (vector vector_ip_ops) WITH (m = 32, ef_construction = 128)";
const BTREE_INDEXES: [&str; 2] = [
    "CREATE INDEX modeldata_team_dataset_collection_index ON modeldata USING btree (team_id, dataset_id, collection_id)",
    "CREATE INDEX modeldata_create_time_index ON modeldata USING btree (createtime)",
];

/// One case's outcome: whole seconds and the named parts of it.
struct Timing {
    case: String,
    whole: f64,
    parts: Vec<(String, f64)>,
    notes: Vec<String>,
}

fn main() {
    let rows: u64 = env_or("BENCH_ROWS", "200000").parse().unwrap();
    let dim: u32 = env_or("BENCH_DIM", "1536").parse().unwrap();
    let cases = env_or("BENCH_CASES", "pg,ob,milvus,manual");
    let src_base = env_or("VMIG_TEST_PG_SOURCE", "postgresql://postgres:postgres@127.0.0.1:55432/postgres");
    let dst_base = env_or("VMIG_TEST_PG_TARGET", "postgresql://postgres:postgres@127.0.0.1:55433/postgres");
    let psql = format!("{}/psql", std::env::var("VMIG_PG_BIN").expect("VMIG_PG_BIN (eval \"$(scripts/dbs.sh env)\")"));
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let src = rt.block_on(source(&src_base, rows, dim));
    let tmp = tempfile::tempdir().unwrap();
    let mut results: Vec<Timing> = Vec::new();
    for case in cases.split(',').map(str::trim) {
        eprintln!("[{}] case {case} …", clock());
        let t = match case {
            "pg" => {
                let dst = rt.block_on(fresh_db(&dst_base, "bench_ix_vmig"));
                let t = migrate("vmig migrate PG → PG", &src, &dst, tmp.path());
                if !t.case.ends_with("FAILED") {
                    rt.block_on(expect_valid_vector_index(&dst));
                }
                t
            }
            "manual" => {
                let dst = rt.block_on(fresh_db(&dst_base, "bench_ix_manual"));
                manual(&psql, &src, &dst, rows, dim)
            }
            "ob" => {
                let ob_base = env_or("VMIG_TEST_SEEKDB", "mysql://root@127.0.0.1:52881/test");
                let dst = rt.block_on(oceanbase::fresh_db(&ob_base, "bench_ix_ob"));
                migrate("vmig migrate PG → OB", &src, &dst, tmp.path())
            }
            "milvus" => {
                let base = env_or("VMIG_TEST_MILVUS", "http://127.0.0.1:19530");
                let dst = rt.block_on(milvus_bench::fresh_db(&base, "bench_ix_milvus"));
                migrate("vmig migrate PG → Milvus", &src, &dst, tmp.path())
            }
            other => panic!("BENCH_CASES: unknown case {other} (pg, ob, milvus, manual)"),
        };
        print_timing(&t);
        results.push(t);
    }
    if let (Some(v), Some(m)) = (results.iter().find(|t| t.case.ends_with("PG → PG")), results.iter().find(|t| t.case.starts_with("manual"))) {
        println!("\nvmig migrate PG → PG took {:.2}× the manual sequence's time ({:.0}s vs {:.0}s)", v.whole / m.whole, v.whole, m.whole);
    }
    println!("\n{rows} rows × {dim}-d; every case's target answers searches when its time ends (index built; Milvus collection loaded)");
}

fn clock() -> String {
    let out = Command::new("date").arg("+%H:%M:%S").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The PostgreSQL source: FastGPT's modeldata with `rows` rows, its btree
/// indexes built and its HNSW index defined (see the module comment).
async fn source(base: &str, rows: u64, dim: u32) -> String {
    let url = with_db(base, "bench_ix_src");
    if env_or("BENCH_REUSE_SOURCE", "0") == "1" {
        let c = tokio_postgres::connect(&url, tokio_postgres::NoTls).await;
        if let Ok((c, conn)) = c {
            tokio::spawn(conn);
            let n: Option<i64> = c.query_one("SELECT count(*) FROM modeldata", &[]).await.ok().map(|r| r.get(0));
            if n == Some(rows as i64) {
                eprintln!("reusing the source of an earlier run ({rows} rows)");
                return url;
            }
        }
    }
    let url = fresh_db(base, "bench_ix_src").await;
    eprintln!("[{}] generating {rows} rows of {dim}-d …", clock());
    let status = Command::new(VMIG)
        .args(["generate", "--to", &url, "--rows", &rows.to_string(), "--dim", &dim.to_string(), "--no-vector-index"])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "vmig generate failed");
    let c = client(&url).await;
    c.batch_execute("SET statement_timeout = '2s'").await.unwrap();
    let interrupted = c.batch_execute(&VECTOR_INDEX.replace("CREATE INDEX", "CREATE INDEX CONCURRENTLY")).await;
    assert!(interrupted.is_err(), "the source's vector index was meant to be interrupted, not built");
    let valid: Option<bool> =
        c.query_opt("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass('modeldata_vector_index')", &[]).await.unwrap().map(|r| r.get(0));
    assert_eq!(valid, Some(false), "the source should carry the HNSW definition, unbuilt");
    url
}

/// `vmig migrate` from → to, whole command, with the phases from its report.
fn migrate(case: &str, from: &str, to: &str, tmp: &std::path::Path) -> Timing {
    let slug: String = case.chars().filter(char::is_ascii_alphanumeric).collect();
    let report = tmp.join(format!("{slug}.json"));
    let log = tmp.join(format!("{slug}.log"));
    let state = tmp.join("state");
    let started = Instant::now();
    let status = Command::new(VMIG)
        .args(["migrate", "--from", from, "--to", to, "--state-root", state.to_str().unwrap(), "--report", report.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .status()
        .unwrap();
    let whole = started.elapsed().as_secs_f64();
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    if !status.success() {
        // Reported, not fatal: the other cases still run.
        let tail: Vec<String> = said.lines().rev().take(5).map(str::to_string).collect();
        return Timing { case: format!("{case} FAILED"), whole, parts: Vec::new(), notes: tail.into_iter().rev().collect() };
    }
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let mut parts = vec![("load".to_string(), r["load_seconds"].as_f64().unwrap())];
    let phases = r["finish_phases"].as_array().cloned().unwrap_or_default();
    let mut named = 0.0;
    for p in &phases {
        let s = p["seconds"].as_f64().unwrap();
        named += s;
        parts.push((p["phase"].as_str().unwrap().to_string(), s));
    }
    parts.push(("rest of the finish".into(), r["finish_seconds"].as_f64().unwrap() - named));
    // What vmig chose for the build and why (the sizing line and any warning).
    let notes = said
        .lines()
        .filter(|l| l.contains("HNSW graph") || l.starts_with("warning") || l.contains(" built in "))
        .map(str::to_string)
        .collect();
    Timing { case: case.into(), whole, parts, notes }
}

/// What a DBA types, each step timed, with the server's settings.
fn manual(psql: &str, src: &str, dst: &str, rows: u64, dim: u32) -> Timing {
    let run = |args: &[&str], stdin: Stdio| -> std::process::Child {
        Command::new(psql).args(["-X", "-q", "-v", "ON_ERROR_STOP=1"]).args(args).stdin(stdin).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    };
    let finish = |child: std::process::Child, what: &str| -> String {
        let out = child.wait_with_output().unwrap();
        let said = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{what} failed: {said}");
        said
    };
    let whole = Instant::now();
    let mut parts = Vec::new();
    let mut notes = Vec::new();
    let t = Instant::now();
    finish(
        run(&[dst, "-c", &format!(
            "CREATE TABLE modeldata (id BIGSERIAL PRIMARY KEY, vector VECTOR({dim}) NOT NULL, team_id VARCHAR(50) NOT NULL, \
             dataset_id VARCHAR(50) NOT NULL, collection_id VARCHAR(50) NOT NULL, createtime TIMESTAMP DEFAULT CURRENT_TIMESTAMP)"
        )], Stdio::null()),
        "CREATE TABLE",
    );
    let mut out = run(&[src, "-c", "\\copy (SELECT id, vector, team_id, dataset_id, collection_id, createtime FROM modeldata) TO STDOUT (FORMAT binary)"], Stdio::null());
    let pipe = out.stdout.take().unwrap();
    let copy_in = run(&[dst, "-c", "\\copy modeldata FROM STDIN (FORMAT binary)"], Stdio::from(pipe));
    finish(out, "\\copy out");
    finish(copy_in, "\\copy in");
    parts.push(("\\copy | \\copy (with CREATE TABLE)".to_string(), t.elapsed().as_secs_f64()));
    let t = Instant::now();
    let graph = vmig::backends::postgres::hnsw_graph_bytes(rows, dim, 4, 32);
    let memory_kb = (graph + graph / 4).max(1 << 30) >> 10;
    let said = finish(
        run(&[dst, "-c", &format!("SET maintenance_work_mem = '{memory_kb}kB'"), "-c", VECTOR_INDEX], Stdio::null()),
        "CREATE INDEX … USING hnsw",
    );
    notes.push(format!("CREATE INDEX … USING hnsw with maintenance_work_mem {} MiB (the graph ≈ {} MiB)", memory_kb >> 10, graph >> 20));
    parts.push(("CREATE INDEX … USING hnsw".to_string(), t.elapsed().as_secs_f64()));
    notes.extend(said.lines().filter(|l| !l.trim().is_empty()).map(str::to_string));
    for ix in BTREE_INDEXES {
        let t = Instant::now();
        finish(run(&[dst, "-c", ix], Stdio::null()), ix);
        parts.push((ix.split(" ON ").next().unwrap().to_string(), t.elapsed().as_secs_f64()));
    }
    let settings = Command::new(psql)
        .args(["-X", "-At", dst, "-c", "SELECT current_setting('maintenance_work_mem') || ' maintenance_work_mem, ' || current_setting('max_parallel_maintenance_workers') || ' parallel maintenance workers'"])
        .output()
        .unwrap();
    notes.push(format!("server settings (the btree builds): {}", String::from_utf8_lossy(&settings.stdout).trim()));
    let n = Command::new(psql).args(["-X", "-At", dst, "-c", "SELECT count(*) FROM modeldata"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&n.stdout).trim(), rows.to_string(), "the manual copy lost rows");
    Timing { case: "manual: psql \\copy, then CREATE INDEX".into(), whole: whole.elapsed().as_secs_f64(), parts, notes }
}

/// vmig's PostgreSQL target must end with a valid HNSW index, the same one FastGPT declares.
async fn expect_valid_vector_index(dst: &str) {
    let c = client(dst).await;
    let row = c
        .query_one(
            "SELECT i.indisvalid, pg_get_indexdef(i.indexrelid) FROM pg_index i WHERE i.indexrelid = to_regclass('modeldata_vector_index')",
            &[],
        )
        .await
        .expect("vmig's target has no modeldata_vector_index");
    let (valid, def): (bool, String) = (row.get(0), row.get(1));
    assert!(valid && def.contains("hnsw") && def.contains("m='32'") && def.contains("ef_construction='128'"), "unexpected index: {def} (valid: {valid})");
}

fn print_timing(t: &Timing) {
    println!("\n{}: {:.1}s whole command", t.case, t.whole);
    for (name, secs) in &t.parts {
        println!("  {name:<60} {secs:>8.1}s");
    }
    for n in &t.notes {
        println!("  | {n}");
    }
}
