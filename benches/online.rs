//! Online benchmark against the real local databases (scripts/dbs.sh start):
//!
//!     cargo bench --bench online        (BENCH_CHANGES, BENCH_RATE, BENCH_STEADY_SECS, BENCH_SOURCE_ROWS,
//!                                        BENCH_CASES=pg>pg,pg>ob,pg>milvus,ob>pg,milvus>pg,pg>staging>pg)
//!
//! For each source > target case, in the same run:
//! - the raw bulk-write ceiling of BENCH_CHANGES rows (binary COPY; multi-row
//!   INSERT with `X'…'` literals; SDK upserts), as in the e2e benchmark;
//! - catch-up: once the job follows, it is stopped, BENCH_CHANGES inserts
//!   (1,000 per transaction) pile up on the source, the job is restarted,
//!   and the time until all are applied gives changes/s, beside the raw
//!   ceiling;
//! - the verifier's full pass after the catch-up (verification while
//!   following) and, into Milvus, the wait until the status shows every
//!   flushed segment served (when users are told to cut over);
//! - steady lag: the job then follows a FastGPT-like insert load of
//!   BENCH_RATE rows/s (10 rows per transaction) for BENCH_STEADY_SECS; the
//!   job's reported commit-to-apply lag is sampled every 100 ms (p50/p99);
//! - the writes stop and the cutover runs: its duration and the window it
//!   reports (drain, finish, segments served, check of the changed keys),
//!   and a full `vmig verify` of the same tables beside it (what a cutover
//!   without verification while following would read);
//! - pg>pg: PostgreSQL's own logical replication (publication, subscription
//!   with `binary = true`) on a second copy of the source, into another
//!   database of the target server: its initial sync and its catch-up of the
//!   same backlog, beside vmig's snapshot and catch-up;
//! - OceanBase sources: the source's single-row insert rate without and with
//!   vmig's triggers (the capture's cost to the application);
//! - Milvus sources: the id-set reconcile the cutover runs, per million ids;
//! - pg>staging>pg (not in the default cases): export and import joined by
//!   a staging directory follow a steady load and cut over; each window
//!   beside a full verify.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};


// Shared with the e2e benchmark, which uses all of them.
#[allow(dead_code)]
#[path = "support/oceanbase.rs"]
mod oceanbase;
#[allow(dead_code)]
#[path = "support/postgres.rs"]
mod postgres;
use postgres::{client, env_or, fresh_db as fresh_pg};
#[allow(dead_code)]
#[path = "support/milvus.rs"]
mod milvus_bench;
#[path = "support/load.rs"]
mod load;
use load::Load;

const VMIG: &str = env!("CARGO_BIN_EXE_vmig");

fn vmig(args: &[&str]) {
    let s = Command::new(VMIG).args(args).stdout(Stdio::null()).status().unwrap();
    assert!(s.success(), "vmig {args:?} failed");
}

fn status(dir: &std::path::Path) -> serde_json::Value {
    std::fs::read(dir.join("status-migrate.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

fn applied(dir: &std::path::Path) -> u64 {
    let a = &status(dir)["online"]["applied"];
    a["inserts"].as_u64().unwrap_or(0) + a["updates"].as_u64().unwrap_or(0) + a["deletes"].as_u64().unwrap_or(0)
}

fn wait(what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < Duration::from_secs(1800), "{what}: not reached in 30 min");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

struct Figures {
    case: String,
    raw: f64,
    lag_p50: f64,
    lag_p99: f64,
    steady_rate: f64,
    catch_up: f64,
    /// OceanBase source: rows/s of a raw exact keyset read of the source table.
    source_read: Option<f64>,
    cutover: f64,
    /// OceanBase source: single-row inserts/s without and with the triggers.
    trigger_rates: Option<(f64, f64)>,
    /// Milvus source: the cutover's reconcile line.
    reconcile: Option<String>,
    /// Start to following (snapshot loaded, indexes built), seconds.
    snapshot: f64,
    /// From the catch-up's end to the verifier's next full pass, seconds.
    verify_pass: Option<f64>,
    /// Milvus target: from that pass until every flushed segment is served, seconds.
    served_wait: Option<f64>,
    /// The cutover's own "cutover window …" line.
    window: String,
    /// A full `vmig verify` of the same tables after the cutover, seconds.
    full_verify: f64,
}

fn bench_case(rt: &tokio::runtime::Runtime, case: &str, source_kind: &str, src: &str, dst: &str, raw: f64) -> Figures {
    let name = case.replace('>', "_");
    let name = name.as_str();
    let changes: u64 = env_or("BENCH_CHANGES", "100000").parse().unwrap();
    let rate: u64 = env_or("BENCH_RATE", "200").parse().unwrap();
    let steady: u64 = env_or("BENCH_STEADY_SECS", "30").parse().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let job = format!("bench_online_{name}");
    let mut args: Vec<String> = ["migrate", "--online", "--from", src, "--to", dst, "--job", &job, "--state-root", tmp.path().to_str().unwrap(), "--quiet"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    // Like the raw ceiling, into a table without a vector index (BENCH_INDEXES=1
    // keeps them). Milvus reads (verify, partial updates) need its index: kept.
    if env_or("BENCH_INDEXES", "0") == "0" && !case.ends_with(">milvus") {
        args.push("--no-indexes".into());
    }
    let dir = tmp.path().join(&job);
    let log = tmp.path().join("log");
    let start = || -> Child {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        Command::new(VMIG).args(&args).stdout(Stdio::null()).stderr(f).spawn().unwrap()
    };
    let mut trigger_rates = None;
    let without = (source_kind == "ob").then(|| rt.block_on(async { Load::connect(source_kind, src, 1536).await.single_row_rate(300).await }));
    let t = Instant::now();
    let mut run = start();
    wait("following", || status(&dir)["phase"] == "following");
    let snapshot = t.elapsed().as_secs_f64();
    if let Some(without) = without {
        let with = rt.block_on(async { Load::connect(source_kind, src, 1536).await.single_row_rate(300).await });
        trigger_rates = Some((without, with));
        wait("single-row inserts applied", || applied(&dir) >= 300);
    }

    // Catch-up of a backlog.
    unsafe { libc::kill(run.id() as i32, libc::SIGTERM) };
    run.wait().unwrap();
    eprintln!("{name}: backlog of {changes} inserts …");
    // A Milvus backlog's ids, for the source's read ceiling over the same rows.
    let backlog_ids = rt.block_on(async {
        let mut load = Load::connect(source_kind, src, 1536).await;
        let first = load.next_milvus_id();
        let mut left = changes;
        while left > 0 {
            let n = left.min(1000);
            load.insert(n, "backlog").await;
            left -= n;
        }
        first.zip(load.next_milvus_id())
    });
    let before = applied(&dir);
    let t = Instant::now();
    let mut run = start();
    // The restarted job's phases as its status shows them (the killed run's
    // status stays until the new one writes its own).
    let pid = run.id() as u64;
    let mut phases: Vec<(f64, String)> = Vec::new();
    wait("backlog applied", || {
        let st = status(&dir);
        if st["pid"].as_u64() == Some(pid) {
            let phase = st["phase"].as_str().unwrap_or_default().to_string();
            if phases.last().is_none_or(|(_, p)| *p != phase) {
                phases.push((t.elapsed().as_secs_f64(), phase));
            }
        }
        applied(&dir) >= before + changes
    });
    let catch_up = changes as f64 / t.elapsed().as_secs_f64();
    eprintln!(
        "{name}: restart to caught up {:.1} s; phases: {}",
        t.elapsed().as_secs_f64(),
        phases.iter().map(|(at, p)| format!("{at:.1} s {p}")).collect::<Vec<_>>().join(", ")
    );
    // What the job said so far (retries, a restarted stream): a catch-up
    // far off its usual rate is read with it.
    let said: Vec<String> = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("warning: a password is on the command line"))
        .map(str::to_string)
        .collect();
    for l in said.iter().rev().take(10).rev() {
        eprintln!("{name}: the job said: {l}");
    }

    // A job that follows for hours has verified every chunk by the time it
    // is cut over: wait for the verifier's pass over what the backlog changed.
    let t = Instant::now();
    let verification = |f: &str| status(&dir)["online"]["verification"][f].as_u64();
    let verify_pass = verification("chunks").map(|_| {
        wait("a full verification pass", || {
            verification("chunks_verified") == verification("chunks") && verification("changed_keys") == Some(0)
        });
        t.elapsed().as_secs_f64()
    });

    // And, into Milvus, until the status says every flushed segment is
    // served, which is when the docs tell users to cut over.
    let t = Instant::now();
    let unserved = || status(&dir)["online"]["unserved_segments"].as_u64();
    let served_wait = unserved().map(|_| {
        wait("every flushed segment served", || unserved() == Some(0));
        t.elapsed().as_secs_f64()
    });

    // Then the application writes at a FastGPT-like pace until the moment of
    // switching, when its writes stop; the lag is sampled meanwhile.
    eprintln!("{name}: steady load of {rate} rows/s for {steady} s …");
    let mut lags = Vec::new();
    let before = applied(&dir);
    let t = Instant::now();
    let mut last_sample = Instant::now();
    let steady_rows = rt.block_on(async {
        let mut load = Load::connect(source_kind, src, 1536).await;
        load.steady(rate, steady, || {
            if last_sample.elapsed() >= Duration::from_millis(100) {
                if let Some(l) = status(&dir)["online"]["lag_seconds"].as_f64() {
                    lags.push(l);
                }
                last_sample = Instant::now();
            }
        })
        .await
    });
    // The rate the load reached (the source may not keep up with the one asked).
    let steady_rate = steady_rows as f64 / t.elapsed().as_secs_f64();
    wait("steady load applied", || applied(&dir) >= before + steady_rows);
    let (lag_p50, lag_p99) = (percentile(&mut lags, 0.5), percentile(&mut lags, 0.99));

    let t = Instant::now();
    let mut cut = args.clone();
    cut[0] = "cutover".into();
    let out = Command::new(VMIG).args(&cut).output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "cutover failed: {said}{}", String::from_utf8_lossy(&out.stderr));
    let cutover = t.elapsed().as_secs_f64();
    let window = said.lines().find_map(|l| l.split_once("cutover window").map(|(_, w)| format!("window{}", w.trim_end_matches(')')))).unwrap_or_default();
    assert!(run.wait().unwrap().success());
    let t = Instant::now();
    vmig(&["verify", "--from", src, "--to", dst]);
    let full_verify = t.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&log).unwrap();
    if let Some(l) = text.lines().filter(|l| l.contains("changes applied")).last() {
        eprintln!("{name}: {l}");
    }
    // The source's own read ceiling over the same server: the catch-up
    // re-reads each changed row from an OceanBase source, and reads the
    // backlog's rows (the ids the load gave them, every field) from a Milvus one.
    let source_read = match (source_kind, backlog_ids) {
        ("ob", _) => {
            let page = ((8usize << 20) / (1536 * 4 + 256)).clamp(500, 20_000);
            Some(rt.block_on(oceanbase::raw_keyset_read(src, page, 1536, oceanbase::ReadForm::Elements)))
        }
        ("milvus", Some((from, to))) => {
            let (n, rate) = rt.block_on(milvus_bench::raw_keyset_read_ids(src, from, to, milvus_bench::read_page(1536)));
            assert_eq!(n, changes, "the Milvus source holds every backlog row");
            Some(rate)
        }
        _ => None,
    };
    let reconcile = text.lines().filter(|l| l.starts_with("reconcile at")).last().map(|l| l.split_once(": ").map_or(l, |x| x.1).to_string());
    Figures { case: case.into(), raw, source_read, lag_p50, lag_p99, steady_rate, catch_up, cutover, trigger_rates, reconcile, snapshot, verify_pass, served_wait, window, full_verify }
}

/// Online through staging (export and import as separate processes joined
/// by a directory): both follow a FastGPT-like insert load, digest their
/// side while following, and cut over. Returns a note with each cutover's
/// window beside a full `vmig verify` of the same tables.
fn bench_staging(rt: &tokio::runtime::Runtime, dst_base: &str) -> String {
    let case = "pg>staging>pg";
    let src = prepare_source(rt, "pg", case);
    let dst = rt.block_on(fresh_pg(dst_base, "bench_online_dst_staging"));
    let dir = std::env::temp_dir().join("vmig-bench-online-staging");
    let _ = std::fs::remove_dir_all(&dir);
    let st = dir.to_str().unwrap().to_string();
    let export = ["export", "--online", "--from", &src, "--staging", &st, "--job", "bench_staging", "--quiet"];
    let import = ["import", "--online", "--staging", &st, "--to", &dst, "--quiet"];
    let logs = std::env::temp_dir().join("vmig-bench-online-staging-logs");
    std::fs::create_dir_all(&logs).unwrap();
    let spawn = |args: &[&str]| {
        let log = std::fs::File::create(logs.join(format!("{}.log", args[0]))).unwrap();
        Command::new(VMIG).args(args).stdout(Stdio::null()).stderr(log).spawn().unwrap()
    };
    let side = |command: &str| -> serde_json::Value {
        std::fs::read(dir.join(format!("status-{command}.json"))).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    };
    let following = |command: &str| side(command)["phase"].as_str() == Some("following");
    let t = Instant::now();
    let mut exp = spawn(&export);
    wait("export following", || following("export"));
    // The import reads the manifest the export has written.
    let mut imp = spawn(&import);
    wait("import following", || following("import"));
    let snapshot = t.elapsed().as_secs_f64();
    // As a job that has followed for a while: each side has digested every chunk once.
    let t = Instant::now();
    for command in ["export", "import"] {
        wait("a digested pass", || {
            let v = &side(command)["online"]["verification"];
            v["chunks"].as_u64().is_some_and(|n| n > 0 && v["chunks_verified"].as_u64() == Some(n))
        });
    }
    let passes = t.elapsed().as_secs_f64();
    // Then the application writes until the moment of switching.
    let steady: u64 = env_or("BENCH_STEADY_SECS", "30").parse().unwrap();
    let rate: u64 = env_or("BENCH_RATE", "200").parse().unwrap();
    eprintln!("{case}: steady load of {rate} rows/s for {steady} s …");
    rt.block_on(async { Load::connect("pg", &src, 1536).await.steady(rate, steady, || {}).await });

    let cut = |args: &[&str]| -> String {
        let mut a = args.to_vec();
        a[0] = "cutover";
        let out = Command::new(VMIG).args(&a).output().unwrap();
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "cutover failed: {said}{}", String::from_utf8_lossy(&out.stderr));
        said.lines().find_map(|l| l.split_once("cutover window").map(|(_, w)| format!("window{}", w.trim_end_matches(')')))).unwrap_or_default()
    };
    let export_window = cut(&export);
    assert!(exp.wait().unwrap().success());
    let import_window = cut(&import);
    assert!(imp.wait().unwrap().success());
    let t = Instant::now();
    vmig(&["verify", "--from", &src, "--to", &dst]);
    let full_verify = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&dir);
    let rows = env_or("BENCH_SOURCE_ROWS", "2000");
    format!(
        "{case}: {rows} rows, export and import to following {snapshot:.1} s; both sides' first digested pass {passes:.1} s later; then {steady} s of {rate} rows/s and, with the writes stopped, \
         export cutover {export_window}; import cutover {import_window}; full vmig verify of the same tables {full_verify:.1} s"
    )
}

/// PostgreSQL's own logical replication as the peer of a pg>pg case, on a
/// second copy of the source: the initial sync (CREATE SUBSCRIPTION with
/// `binary = true` until every table is ready), then the catch-up of a
/// backlog of `changes` inserts made while the subscription was disabled.
/// Returns (initial sync seconds, catch-up changes/s).
fn native_replication(rt: &tokio::runtime::Runtime, dst_base: &str, changes: u64) -> (f64, f64) {
    let src = prepare_source(rt, "pg", "pg>pg_native");
    rt.block_on(async {
        let dst = fresh_pg(dst_base, "bench_online_native").await;
        let (s, d) = (client(&src).await, client(&dst).await);
        d.batch_execute(
            "CREATE TABLE modeldata (id BIGSERIAL PRIMARY KEY, vector VECTOR(1536) NOT NULL, team_id VARCHAR(50) NOT NULL, \
             dataset_id VARCHAR(50) NOT NULL, collection_id VARCHAR(50) NOT NULL, createtime TIMESTAMP DEFAULT CURRENT_TIMESTAMP)",
        )
        .await
        .unwrap();
        // The same secondary indexes as the source (and so vmig's target):
        // the peer maintains what vmig maintains.
        for r in s.query("SELECT indexdef FROM pg_indexes WHERE tablename = 'modeldata' AND indexname <> 'modeldata_pkey'", &[]).await.unwrap() {
            d.batch_execute(r.get::<_, &str>(0)).await.unwrap();
        }
        s.batch_execute("CREATE PUBLICATION bench_native FOR TABLE modeldata").await.unwrap();
        let count = async |c: &tokio_postgres::Client| -> i64 { c.query_one("SELECT count(*) FROM modeldata", &[]).await.unwrap().get(0) };
        let t = Instant::now();
        d.batch_execute(&format!("CREATE SUBSCRIPTION bench_native CONNECTION '{src}' PUBLICATION bench_native WITH (binary = true)")).await.unwrap();
        loop {
            let pending: i64 = d.query_one("SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'", &[]).await.unwrap().get(0);
            if pending == 0 {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(3600), "native initial sync not done in an hour");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let initial = t.elapsed().as_secs_f64();
        assert_eq!(count(&d).await, count(&s).await, "native initial sync copied every row");
        d.batch_execute("ALTER SUBSCRIPTION bench_native DISABLE").await.unwrap();
        loop {
            let running: i64 = d.query_one("SELECT count(pid) FROM pg_stat_subscription WHERE subname = 'bench_native'", &[]).await.unwrap().get(0);
            if running == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut load = Load::connect("pg", &src, 1536).await;
        let mut left = changes;
        while left > 0 {
            let n = left.min(1000);
            load.insert(n, "backlog").await;
            left -= n;
        }
        let want = count(&s).await;
        let t = Instant::now();
        d.batch_execute("ALTER SUBSCRIPTION bench_native ENABLE").await.unwrap();
        while count(&d).await < want {
            assert!(t.elapsed() < Duration::from_secs(3600), "native catch-up not done in an hour");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let catch_up = changes as f64 / t.elapsed().as_secs_f64();
        d.batch_execute("DROP SUBSCRIPTION bench_native").await.unwrap();
        s.batch_execute("DROP PUBLICATION bench_native").await.unwrap();
        (initial, catch_up)
    })
}

/// A source of BENCH_SOURCE_ROWS FastGPT rows (default 2,000; and, for SQL
/// sources, a seed pool of 2,000 rows the loads copy vectors from); returns its URL.
fn prepare_source(rt: &tokio::runtime::Runtime, kind: &str, case: &str) -> String {
    let db = format!("bench_online_src_{}", case.replace('>', "_"));
    let url = match kind {
        "pg" => rt.block_on(fresh_pg(&env_or("VMIG_TEST_PG_SOURCE", PG_SOURCE), &db)),
        "ob" => rt.block_on(oceanbase::fresh_db(&env_or("VMIG_TEST_SEEKDB", SEEKDB), &db)),
        "milvus" => rt.block_on(milvus_bench::fresh_db(&env_or("VMIG_TEST_MILVUS", MILVUS), &db)),
        other => panic!("BENCH_CASES: unknown source {other}"),
    };
    // Milvus reads only indexed collections; the SQL sources need no vector index.
    let index = if kind == "milvus" { vec![] } else { vec!["--no-vector-index"] };
    let rows = env_or("BENCH_SOURCE_ROWS", "2000");
    let mut args = vec!["generate", "--to", &url, "--rows", &rows, "--dim", "1536"];
    args.extend(index);
    vmig(&args);
    match kind {
        "pg" => rt.block_on(async { client(&url).await.batch_execute("CREATE TABLE modeldata_seed AS SELECT * FROM modeldata LIMIT 2000").await.unwrap() }),
        "ob" => rt.block_on(async {
            use mysql_async::prelude::Queryable;
            let mut c = oceanbase::conn(&url).await;
            c.query_drop("CREATE TABLE modeldata_seed LIKE modeldata").await.unwrap();
            c.query_drop("INSERT INTO modeldata_seed SELECT * FROM modeldata LIMIT 2000").await.unwrap();
        }),
        _ => {}
    }
    url
}

const PG_SOURCE: &str = "postgresql://postgres:postgres@127.0.0.1:55432/postgres";
const SEEKDB: &str = "mysql://root@127.0.0.1:52881/test";
const MILVUS: &str = "http://127.0.0.1:19530";

fn main() {
    let changes: u64 = env_or("BENCH_CHANGES", "100000").parse().unwrap();
    let dim = 1536u32;
    let src_base = env_or("VMIG_TEST_PG_SOURCE", PG_SOURCE);
    let dst_base = env_or("VMIG_TEST_PG_TARGET", "postgresql://postgres:postgres@127.0.0.1:55433/postgres");
    let ob_base = env_or("VMIG_TEST_SEEKDB", SEEKDB);
    let milvus_base = env_or("VMIG_TEST_MILVUS", MILVUS);
    let cases = env_or("BENCH_CASES", "pg>pg,pg>ob,pg>milvus,ob>pg,milvus>pg");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let header = format!(
        "{:<10} {:>14} {:>14} {:>9} {:>11} {:>11} {:>13} {:>11}",
        "case", "raw rows/s", "catch-up ch/s", "vs raw", "steady r/s", "lag p50 s", "lag p99 s", "cutover s"
    );
    let mut lines = Vec::new();
    let mut notes = Vec::new();
    // The target's raw ingest ceiling, measured once per target kind in this run.
    let mut raw_of: std::collections::HashMap<String, f64> = Default::default();
    for case in cases.split(',') {
        if case == "pg>staging>pg" {
            let note = bench_staging(&rt, &dst_base);
            eprintln!("{note}");
            notes.push(note);
            continue;
        }
        let (source_kind, t) = case.split_once('>').unwrap_or_else(|| panic!("BENCH_CASES: {case} is not source>target"));
        let src = prepare_source(&rt, source_kind, case);
        let rows = changes.to_string();
        let dst_db = format!("bench_online_dst_{}", case.replace('>', "_"));
        let dst = match t {
            "pg" => rt.block_on(fresh_pg(&dst_base, &dst_db)),
            "ob" => rt.block_on(oceanbase::fresh_db(&ob_base, &dst_db)),
            "milvus" => rt.block_on(milvus_bench::fresh_db(&milvus_base, &dst_db)),
            other => panic!("BENCH_CASES: unknown target {other}"),
        };
        let raw = *raw_of.entry(t.to_string()).or_insert_with(|| match t {
            "pg" => {
                let raw_src = rt.block_on(fresh_pg(&src_base, "bench_online_raw_src"));
                vmig(&["generate", "--to", &raw_src, "--rows", &rows, "--dim", "1536", "--no-vector-index"]);
                let raw_dst = rt.block_on(fresh_pg(&dst_base, "bench_online_raw"));
                changes as f64 / rt.block_on(postgres::raw_copy(&raw_src, &raw_dst, dim, changes))
            }
            "ob" => {
                let raw_db = rt.block_on(oceanbase::fresh_db(&ob_base, "bench_online_ob_raw"));
                rt.block_on(oceanbase::raw_insert(&raw_db, changes, dim, false))
            }
            _ => {
                let raw_db = rt.block_on(milvus_bench::fresh_db(&milvus_base, "bench_online_mv_raw"));
                rt.block_on(milvus_bench::raw_upsert(&raw_db, changes, dim))
            }
        });
        let f = bench_case(&rt, case, source_kind, &src, &dst, raw);
        let source_rows: f64 = env_or("BENCH_SOURCE_ROWS", "2000").parse().unwrap();
        if t == "milvus" {
            // The same loop into what the job catches up into: the source's
            // rows held, FastGPT's HNSW index built and the collection loaded.
            let raw_db = rt.block_on(milvus_bench::fresh_db(&milvus_base, "bench_online_mv_raw_loaded"));
            let loaded = rt.block_on(milvus_bench::raw_upsert_loaded(&raw_db, source_rows as u64, changes, dim));
            rt.block_on(milvus_bench::drop_db(&milvus_base, "bench_online_mv_raw_loaded"));
            notes.push(format!(
                "{case}: upsert ceiling into a loaded collection with FastGPT's HNSW index holding the {source_rows} source rows: {loaded:.0} rows/s \
                 (into a fresh unindexed one: {raw:.0}); vmig's catch-up {:.0} changes/s = {:.2}× the loaded ceiling",
                f.catch_up,
                f.catch_up / loaded
            ));
        }
        notes.push(format!(
            "{case}: snapshot of {source_rows} rows to following {:.1} s; verifier's pass after the catch-up {}{}; then the steady load, stopped, and \
             cutover {:.1} s, {}; full vmig verify of the same tables {:.1} s",
            f.snapshot,
            f.verify_pass.map_or("none (no verification while following)".into(), |s| format!("{s:.1} s")),
            f.served_wait.map_or(String::new(), |s| format!(", every flushed segment served {s:.1} s later")),
            f.cutover,
            f.window,
            f.full_verify
        ));
        if case == "pg>pg" {
            let (initial, native_catch_up) = native_replication(&rt, &dst_base, changes);
            notes.push(format!(
                "{case}: PostgreSQL logical replication (binary): initial sync {initial:.1} s (vmig's snapshot to following {:.1} s, {:.2}×); \
                 catch-up {native_catch_up:.0} changes/s (vmig {:.0}, {:.2}×)",
                f.snapshot,
                initial / f.snapshot,
                f.catch_up,
                f.catch_up / native_catch_up
            ));
        }
        let line = format!(
            "{:<10} {:>14.0} {:>14.0} {:>8.2}× {:>11.0} {:>11.2} {:>13.2} {:>11.1}",
            f.case,
            f.raw,
            f.catch_up,
            f.catch_up / f.raw,
            f.steady_rate,
            f.lag_p50,
            f.lag_p99,
            f.cutover
        );
        eprintln!("{header}\n{line}");
        lines.push(line);
        if let Some((without, with)) = f.trigger_rates {
            notes.push(format!(
                "{case}: source single-row inserts/s without triggers {without:.0}, with vmig's triggers {with:.0} ({:.2}×)",
                with / without
            ));
        }
        if let Some(read) = f.source_read {
            let how = if source_kind == "ob" {
                "exact read (element_at, binary protocol, 2 connections) of the whole table"
            } else {
                "keyset read (id ranges, every field, 2 connections) of the backlog's rows"
            };
            notes.push(format!(
                "{case}: source's raw {how} {read:.0} rows/s; \
                 catch-up {:.0} = {:.2}× of it and {:.2}× the target's bulk ceiling {:.0}, {:.2}× the slower of the two",
                f.catch_up,
                f.catch_up / read,
                f.catch_up / f.raw,
                f.raw,
                f.catch_up / read.min(f.raw)
            ));
        }
        if let Some(r) = f.reconcile {
            notes.push(format!("{case}: cutover reconcile {r}"));
        }
        for n in notes.iter().filter(|n| n.starts_with(case)) {
            eprintln!("{n}");
        }
        // Milvus keeps every database on disk, and a large one slows the
        // next run's index builds: the case's own go once it is measured.
        let src_db = format!("bench_online_src_{}", case.replace('>', "_"));
        for (kind, db) in [(t, dst_db.as_str()), (t, "bench_online_mv_raw"), (source_kind, src_db.as_str())] {
            if kind == "milvus" {
                rt.block_on(milvus_bench::drop_db(&milvus_base, db));
            }
        }
    }
    println!("\nvmig online benchmark: 1536-d rows, backlog of {changes} inserts; raw = the target's bulk-write ceiling");
    println!("{header}");
    for l in lines.iter().chain(&notes) {
        println!("{l}");
    }
}
