//! One job across many workers: staging on a real S3-compatible server
//! (moto, started by scripts/dbs.sh), chunks claimed by separate processes
//! with separate state roots, one worker killed -9 mid-chunk each time, its
//! chunks taken over after the lease; static shards; tampering and refused
//! credentials.
mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::milvus_db::{as_mrows, fresh_milvus_db, milvus_count_settled, milvus_rows};
use common::online::Reaper;
use common::*;

fn s3_endpoint() -> String {
    std::env::var("VMIG_TEST_S3_ENDPOINT").unwrap_or("http://127.0.0.1:25900".into())
}

fn python() -> String {
    std::env::var("VMIG_TEST_PYTHON").expect("VMIG_TEST_PYTHON (scripts/test.sh sets it)")
}

const SECRET: &str = "vmig-test-secret-do-not-print";

/// vmig with the S3 environment of the local server.
fn vmig_s3(args: &[&str], endpoint: &str) -> Command {
    let mut c = Command::new(VMIG);
    c.args(args)
        .env_remove("VMIG_STATE_ROOT")
        .env("AWS_ACCESS_KEY_ID", "vmigtest")
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL", endpoint);
    c
}

fn run_s3(args: &[&str]) -> std::process::Output {
    let out = vmig_s3(args, &s3_endpoint()).output().unwrap();
    eprintln!("$ vmig {}\n{}{}", args.join(" "), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}

/// Objects whose key starts with `prefix` in bucket vmig-test: (key, body
/// as text for .json objects). In-process through vmig's own store, so a
/// poll takes milliseconds even on a loaded box.
fn s3_objects(prefix: &str) -> Vec<(String, String)> {
    static ENV: std::sync::Once = std::sync::Once::new();
    ENV.call_once(|| unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "vmigtest");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET);
        std::env::set_var("AWS_REGION", "us-east-1");
        std::env::set_var("AWS_ENDPOINT_URL", s3_endpoint());
    });
    let store = vmig::state::store::Store::open("s3://vmig-test").unwrap();
    let folder = prefix.rsplit_once('/').map(|(f, _)| f).unwrap_or("");
    let mut out = Vec::new();
    for (key, _) in store.list(folder).unwrap() {
        let full = if folder.is_empty() { key } else { format!("{folder}/{key}") };
        if !full.starts_with(prefix) {
            continue;
        }
        let body = if full.ends_with(".json") {
            match store.get(&full).unwrap() {
                Some(o) => String::from_utf8_lossy(&o.bytes).into_owned(),
                None => continue, // removed since the listing (a released claim)
            }
        } else {
            String::new()
        };
        out.push((full, body));
    }
    out
}

fn s3_put(key: &str, body: &[u8]) {
    let script = format!(
        "import boto3,sys\n\
         s3=boto3.client('s3',endpoint_url='{}',region_name='us-east-1',aws_access_key_id='a',aws_secret_access_key='b')\n\
         s3.put_object(Bucket='vmig-test',Key='{key}',Body=sys.stdin.buffer.read())\n",
        s3_endpoint()
    );
    let mut child = Command::new(python()).arg("-c").arg(script).stdin(Stdio::piped()).spawn().unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(body).unwrap();
    assert!(child.wait().unwrap().success());
}

/// A fresh prefix per run (moto keeps objects until it restarts).
fn prefix(name: &str) -> String {
    format!("{name}-{}-{}", std::process::id(), chrono_ms())
}

fn chrono_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
}

struct Worker {
    child: Child,
    log: std::path::PathBuf,
    _state: tempfile::TempDir,
}

impl Worker {
    fn start(args: &[&str], logs: &Path, n: usize) -> Worker {
        let state = tempdir(); // each worker its own state root: no shared local disk
        let log = logs.join(format!("worker{n}.log"));
        let mut all: Vec<&str> = args.to_vec();
        let root = state.path().to_str().unwrap().to_string();
        all.extend(["--state-root", &root, "--quiet"]);
        let f = std::fs::File::create(&log).unwrap();
        let child = vmig_s3(&all, &s3_endpoint()).stdout(f.try_clone().unwrap()).stderr(f).spawn().unwrap();
        Worker { child, log, _state: state }
    }

    fn worker_id(&self) -> String {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
        format!("{host}-{}", self.child.id())
    }

    fn finish(mut self) -> String {
        let status = self.child.wait().unwrap();
        let log = std::fs::read_to_string(&self.log).unwrap();
        eprintln!("--- {} ---\n{log}", self.log.display());
        assert!(status.success(), "worker failed: {log}");
        log
    }
}

/// Chunk claims (`claims/000017.json`) a worker holds in a lane.
fn claims_of(pfx: &str, lane_prefix: &str, worker: &str) -> Vec<String> {
    s3_objects(&format!("{pfx}/work/{lane_prefix}"))
        .into_iter()
        .filter(|(k, body)| {
            let name = k.rsplit('/').next().unwrap();
            k.contains("/claims/") && name.len() == 11 && body.contains(&format!("\"worker\":\"{worker}\""))
        })
        .map(|(k, _)| k)
        .collect()
}

/// Starts 3 workers of `args`, kills the first with SIGKILL while it holds
/// a chunk claim, waits for the other two; returns their logs and the
/// claims the dead worker left (which the others must have taken over).
fn three_workers_one_killed(
    args: &[&str],
    pfx: &str,
    lane_prefix: &str,
    committed: &dyn Fn() -> std::collections::BTreeSet<u32>,
) -> Vec<String> {
    let chunk_of = |claim: &String| -> u32 { claim.rsplit('/').next().unwrap()[..6].parse().unwrap() };
    // Claims on chunks not yet in the ledger (a committed chunk's claim is
    // kept until its ledger record is durable).
    let running = |id: &str| -> Vec<u32> {
        let done = committed();
        claims_of(pfx, lane_prefix, id).iter().map(chunk_of).filter(|c| !done.contains(c)).collect()
    };
    let logs = tempdir();
    let mut reaper = Reaper(Vec::new());
    let victim = Worker::start(args, logs.path(), 0);
    reaper.0.push(victim.child.id());
    let id = victim.worker_id();
    let deadline = Instant::now() + Duration::from_secs(120);
    // Wait on observed state: the victim holds a chunk claim in the store.
    loop {
        if !running(&id).is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "worker 0 never claimed a chunk");
        std::thread::sleep(Duration::from_millis(100));
    }
    let others: Vec<Worker> = (1..3).map(|n| Worker::start(args, logs.path(), n)).collect();
    reaper.0.extend(others.iter().map(|w| w.child.id()));
    // Kill it while it runs a chunk: stopped (SIGSTOP) it can neither
    // commit nor release, so a claim seen then is one it dies holding.
    let pid = victim.child.id() as i32;
    loop {
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        if !running(&id).is_empty() {
            break;
        }
        unsafe { libc::kill(pid, libc::SIGCONT) };
        assert!(Instant::now() < deadline, "worker 0 stopped claiming chunks before it could be killed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut victim = victim;
    victim.child.kill().unwrap();
    victim.child.wait().unwrap();
    let left = running(&id);
    assert!(!left.is_empty(), "the killed worker held no claim: nothing to take over");
    let logs: Vec<String> = others.into_iter().map(Worker::finish).collect();
    for chunk in left {
        assert!(
            logs.iter().any(|l| l.contains(&format!("chunk {chunk}: taken over from {id}"))),
            "the killed worker's chunk {chunk} was not taken over"
        );
    }
    logs
}

fn ids_of(v: &[i64]) -> std::collections::BTreeSet<u32> {
    v.iter().map(|&c| c as u32).collect()
}

/// A column of int8 values; empty while the table does not exist yet.
fn rows_i64(url: &str, sql: &str) -> Vec<i64> {
    rt().block_on(async {
        match client(url).await.query(sql, &[]).await {
            Ok(rows) => rows.iter().map(|r| r.get::<_, i64>(0)).collect(),
            Err(_) => Vec::new(),
        }
    })
}

fn ob_ids(url: &str, sql: &str) -> Vec<i64> {
    use mysql_async::prelude::Queryable;
    rt().block_on(async {
        let mut c = ob_conn(url).await;
        c.query::<i64, _>(sql).await.unwrap_or_default()
    })
}

fn plan_chunks(pfx: &str) -> usize {
    let m = s3_objects(&format!("{pfx}/manifest.json"));
    let v: serde_json::Value = serde_json::from_str(&m[0].1).unwrap();
    v["plan"].as_array().unwrap().len()
}

#[test]
fn s3_staging_with_three_workers_per_side_survives_a_killed_worker() {
    let src = fresh_db(&source_base(), "dist_src", true);
    ok(&["generate", "--to", &src, "--rows", "3000", "--dim", "32", "--no-vector-index"]);
    let pfx = prefix("dist");
    let staging = format!("s3://vmig-test/{pfx}");
    // Rate-limited so the chunks spread over the workers and one can die mid-chunk.
    let common = ["--chunk-rows", "150", "--workers", "1", "--lease", "3", "--rate-limit", "200"];

    let mut export: Vec<&str> = vec!["export", "--from", &src, "--staging", &staging];
    export.extend(common);
    let markers = || -> std::collections::BTreeSet<u32> {
        s3_objects(&format!("{pfx}/chunks/"))
            .iter()
            .filter_map(|(k, _)| k.rsplit('/').next()?.strip_suffix(".commit.json")?.parse().ok())
            .collect()
    };
    three_workers_one_killed(&export, &pfx, "export", &markers);
    let chunks = plan_chunks(&pfx);
    let objects = s3_objects(&format!("{pfx}/chunks/"));
    let markers = objects.iter().filter(|(k, _)| k.ends_with(".commit.json")).count();
    let files = objects.iter().filter(|(k, _)| k.ends_with(".parquet")).count();
    assert_eq!(markers, chunks, "every planned chunk committed once");
    assert_eq!(files, chunks, "one chunk file per marker: no orphan from the killed worker or a lost race");
    let inspect = run_s3(&["inspect", &staging]);
    assert!(inspect.status.success(), "staging on S3 intact");

    // Import into each kind of target, 3 workers each, one killed.
    let pg = fresh_db(&target_base(), "dist_dst", true);
    let ob = fresh_ob_db("dist_ob");
    let mv = fresh_milvus_db("dist_mv");
    for (dst, kind) in [(&pg, "pg"), (&ob, "ob"), (&mv, "milvus")] {
        let mut import: Vec<&str> = vec!["import", "--to", dst, "--staging", &staging];
        import.extend(common);
        let ledger = || -> std::collections::BTreeSet<u32> {
            match kind {
                "pg" => ids_of(&rows_i64(dst, "SELECT chunk::int8 FROM vmig_ledger")),
                "ob" => ids_of(&ob_ids(dst, "SELECT chunk FROM vmig_ledger")),
                _ => s3_objects(&format!("{pfx}/ledger/"))
                    .iter()
                    .filter_map(|(_, b)| serde_json::from_str::<serde_json::Value>(b).ok()?["record"]["chunk"].as_u64())
                    .map(|c| c as u32)
                    .collect(),
            }
        };
        three_workers_one_killed(&import, &pfx, "import-", &ledger);
        match kind {
            "pg" => {
                assert_same_rows(&src, "modeldata", dst, "modeldata");
                let (n, distinct) = (
                    query_i64(dst, "SELECT count(*) FROM vmig_ledger"),
                    query_i64(dst, "SELECT count(DISTINCT chunk) FROM vmig_ledger"),
                );
                assert_eq!((n, distinct), (chunks as i64, chunks as i64), "each chunk once in PostgreSQL's ledger");
            }
            "ob" => {
                let want = rows(&src, "modeldata");
                assert_rows_equal(&want, &ob_rows(dst, "modeldata"));
                assert_eq!(ob_query_i64(dst, "SELECT count(*) FROM vmig_ledger"), chunks as i64, "each chunk once in OceanBase's ledger");
            }
            _ => {
                let want = as_mrows(&rows(&src, "modeldata"));
                assert_eq!(milvus_count_settled(dst, "modeldata", want.len() as i64), want.len() as i64, "no duplicate ids in Milvus");
                assert_eq!(milvus_rows(dst, "modeldata"), want);
                // The Milvus ledger lives in the shared store, one object per line.
                let lines = s3_objects(&format!("{pfx}/ledger/"));
                let records: Vec<serde_json::Value> = lines
                    .iter()
                    .map(|(_, b)| serde_json::from_str::<serde_json::Value>(b).unwrap())
                    .filter(|l| l.get("record").is_some())
                    .collect();
                let distinct: std::collections::BTreeSet<i64> = records.iter().map(|l| l["record"]["chunk"].as_i64().unwrap()).collect();
                assert_eq!((records.len(), distinct.len()), (chunks, chunks), "each chunk once in the Milvus ledger");
            }
        }
    }
    // One status over all workers of every lane.
    let st = run_s3(&["status", "--staging", &staging]);
    let text = String::from_utf8_lossy(&st.stdout);
    assert!(text.contains("workers of export:") && text.contains("total: 3 workers"), "{text}");
    assert!(!text.contains(SECRET) && !String::from_utf8_lossy(&st.stderr).contains(SECRET));
}

/// Static partitions: shards 0..3 (flag, Kubernetes index, Slurm array)
/// cover the plan exactly once; a killed shard resumes where it stopped.
#[test]
fn shards_cover_the_plan_once_and_a_restarted_shard_resumes() {
    let src = fresh_db(&source_base(), "shard_src", true);
    ok(&["generate", "--to", &src, "--rows", "1800", "--dim", "16", "--no-vector-index"]);
    let dir = tempdir();
    let st = dir.path().join("st");
    let st_s = st.to_str().unwrap();
    let base = ["export", "--from", &src, "--staging", st_s, "--chunk-rows", "100", "--workers", "1", "--lease", "3", "--quiet"];
    let shard_run = |extra: &[&str], env: &[(&str, &str)], rate: Option<&str>| -> Child {
        let mut args: Vec<&str> = base.to_vec();
        args.extend(extra);
        if let Some(r) = rate {
            args.extend(["--rate-limit", r]);
        }
        let mut c = Command::new(VMIG);
        c.args(&args).env_remove("VMIG_STATE_ROOT").env_remove("SLURM_ARRAY_TASK_ID").env_remove("JOB_COMPLETION_INDEX");
        for (k, v) in env {
            c.env(k, v);
        }
        c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
    };
    let markers = || -> Vec<u32> {
        std::fs::read_dir(st.join("chunks"))
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".commit.json")?.parse().ok()).collect()
            })
            .unwrap_or_default()
    };
    // Shard 0, killed once it has committed a chunk, then run again.
    let mut first = shard_run(&["--shard", "0/3"], &[], Some("300"));
    let mut reaper = Reaper(vec![first.id()]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while markers().is_empty() {
        assert!(Instant::now() < deadline, "shard 0 committed nothing");
        std::thread::sleep(Duration::from_millis(20));
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let before = markers();
    assert!(before.iter().all(|c| c % 3 == 0), "shard 0 only took its chunks: {before:?}");
    // Which shard each writer process ran (chunk files name their writer's pid).
    let mut shard_of_pid = std::collections::HashMap::from([(first.id(), 0u32)]);
    let again = shard_run(&["--shard", "0/3"], &[], None);
    shard_of_pid.insert(again.id(), 0);
    let out = again.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    eprintln!("{log}");
    assert!(out.status.success(), "{log}");
    assert!(log.contains(&format!("{} chunks", before.len())) && log.contains("already committed, skipped"), "resumed: {log}");
    assert!(log.contains("shard 0/3 is done"), "{log}");
    // Shard 1 from a Kubernetes Indexed Job's index, shard 2 from a Slurm array.
    for (extra, env) in [
        (vec!["--shards", "3"], vec![("JOB_COMPLETION_INDEX", "1")]),
        (vec![], vec![("SLURM_ARRAY_TASK_ID", "2"), ("SLURM_ARRAY_TASK_COUNT", "3")]),
    ] {
        let run = shard_run(&extra, &env, None);
        shard_of_pid.insert(run.id(), if env[0].1 == "1" { 1 } else { 2 });
        let out = run.wait_with_output().unwrap();
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success());
    }
    reaper.0.clear();
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(st.join("manifest.json")).unwrap()).unwrap();
    let plan = manifest["plan"].as_array().unwrap().len();
    let mut got = markers();
    got.sort();
    assert_eq!(got, (0..plan as u32).collect::<Vec<_>>(), "the shards cover the plan exactly once");
    assert!(st.join("work/export/finished.json").exists(), "the last shard ran the finish");
    // Each chunk file carries its writer; every writer stayed in its shard.
    for e in std::fs::read_dir(st.join("chunks")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().to_string();
        if let Some(stem) = name.strip_suffix(".parquet") {
            let chunk: u32 = stem[..6].parse().unwrap();
            let pid: u32 = stem.rsplit('-').next().unwrap().parse().unwrap_or_else(|_| panic!("a shared job's chunk file names its writer: {name}"));
            let shard = shard_of_pid.get(&pid).unwrap_or_else(|| panic!("{name}: written by pid {pid}, no shard's process"));
            assert_eq!(chunk % 3, *shard, "{name}: chunk {chunk} written by shard {shard}'s process");
        }
    }
    let dst = fresh_db(&target_base(), "shard_dst", true);
    ok(&["import", "--to", &dst, "--staging", st_s, "--state-root", dir.path().to_str().unwrap()]);
    assert_same_rows(&src, "modeldata", &dst, "modeldata");
}

/// A chunk object altered in the bucket is refused like a local file, and
/// refused credentials or a missing bucket are one line with no secret.
#[test]
fn tampered_objects_and_refused_credentials_are_one_clear_line() {
    let src = fresh_db(&source_base(), "s3bad_src", true);
    ok(&["generate", "--to", &src, "--rows", "400", "--dim", "16", "--no-vector-index"]);
    let pfx = prefix("bad");
    let staging = format!("s3://vmig-test/{pfx}");
    let state = tempdir();
    let root = state.path().to_str().unwrap();
    let out = run_s3(&["export", "--from", &src, "--staging", &staging, "--chunk-rows", "100", "--state-root", root, "--quiet"]);
    assert!(out.status.success());
    let chunk0 = s3_objects(&format!("{pfx}/chunks/000000")).into_iter().find(|(k, _)| k.ends_with(".parquet")).unwrap().0;
    s3_put(&chunk0, b"PAR1 not the chunk that was exported PAR1");
    let inspect = run_s3(&["inspect", &staging]);
    assert!(!inspect.status.success());
    assert!(String::from_utf8_lossy(&inspect.stdout).contains("BAD: chunk 000000"));
    let dst = fresh_db(&target_base(), "s3bad_dst", true);
    let import = run_s3(&["import", "--to", &dst, "--staging", &staging, "--state-root", root, "--quiet"]);
    assert!(!import.status.success());
    assert!(stderr(&import).contains("refusing it"), "{}", stderr(&import));

    // A bucket that does not exist.
    let out = run_s3(&["export", "--from", &src, "--staging", "s3://no-such-bucket/x", "--state-root", root, "--quiet"]);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("the bucket does not exist"), "{err}");
    assert!(!err.contains("<Error>") && !err.contains(SECRET));

    // A server that checks credentials (moto with auth on), and a key it does not know.
    // A port the system just handed out, so nothing else holds it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let moto_log = state.path().join("moto.log");
    let mut server = Command::new(std::path::Path::new(&python()).with_file_name("moto_server"))
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .env("INITIAL_NO_AUTH_ACTION_COUNT", "0")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&moto_log).unwrap())
        .spawn()
        .unwrap();
    let _reaper = Reaper(vec![server.id()]);
    let endpoint = format!("http://127.0.0.1:{port}");
    // moto imports a lot: under a loaded 2-core box its start takes a while.
    let deadline = Instant::now() + Duration::from_secs(180);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = server.try_wait() {
            panic!("private moto exited ({status}): {}", std::fs::read_to_string(&moto_log).unwrap_or_default());
        }
        assert!(Instant::now() < deadline, "private moto did not start: {}", std::fs::read_to_string(&moto_log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = vmig_s3(&["export", "--from", &src, "--staging", "s3://locked/x", "--state-root", root, "--quiet"], &endpoint)
        .output()
        .unwrap();
    let err = stderr(&out);
    eprintln!("{err}");
    assert!(!out.status.success());
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "one line: {err}");
    assert!(errors[0].contains("refused"), "{err}");
    assert!(!err.contains(SECRET) && !String::from_utf8_lossy(&out.stdout).contains(SECRET));
    server.kill().unwrap();
    let _ = server.wait();
}

/// Kubernetes runs the export and import Jobs side by side: a shared import
/// waits for chunks the export's live workers have not written yet.
#[test]
fn a_shared_import_beside_its_export_waits_for_the_missing_chunks() {
    let src = fresh_db(&source_base(), "beside_src", true);
    ok(&["generate", "--to", &src, "--rows", "1200", "--dim", "16", "--no-vector-index"]);
    let dst = fresh_db(&target_base(), "beside_dst", true);
    let dir = tempdir();
    let st = dir.path().join("st");
    let st_s = st.to_str().unwrap();
    let roots = [dir.path().join("e"), dir.path().join("i")];
    // Leases long enough that an export held still (below) stays alive.
    let mut export = Command::new(VMIG)
        .args(["export", "--from", &src, "--staging", st_s, "--shared", "--chunk-rows", "100", "--workers", "1"])
        .args(["--rate-limit", "200", "--lease", "60", "--quiet", "--state-root", roots[0].to_str().unwrap()])
        .env_remove("VMIG_STATE_ROOT")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _reaper = Reaper(vec![export.id()]);
    let deadline = Instant::now() + Duration::from_secs(60);
    // Its first chunk, whichever it is: a shared job's workers start at a
    // place in the plan chosen by their name, not at chunk 0.
    let committed = || {
        std::fs::read_dir(st.join("chunks"))
            .map(|d| d.filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().ends_with(".commit.json")).count())
            .unwrap_or(0)
    };
    while committed() == 0 {
        assert!(Instant::now() < deadline, "the export wrote no chunk");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Held still after its first chunk (SIGSTOP) until the import says it
    // waits: on a loaded machine the export used to finish before the import
    // had looked (CI saw it at 400, 150 and 50 rows/s).
    let pid = export.id() as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let log_path = dir.path().join("import.log");
    let mut import = Command::new(VMIG)
        .args(["import", "--to", &dst, "--staging", st_s, "--shared", "--workers", "1", "--lease", "60", "--quiet"])
        .args(["--state-root", roots[1].to_str().unwrap()])
        .env_remove("VMIG_STATE_ROOT")
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let _import_reaper = Reaper(vec![import.id()]);
    let waiting = "not exported yet; waiting for the export's workers";
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(&log_path).unwrap_or_default().contains(waiting) {
        if let Some(code) = import.try_wait().unwrap() {
            unsafe { libc::kill(pid, libc::SIGCONT) };
            panic!("the import ended ({code}) without waiting: {}", std::fs::read_to_string(&log_path).unwrap_or_default());
        }
        assert!(Instant::now() < deadline, "the import never waited: {}", std::fs::read_to_string(&log_path).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(export.wait().unwrap().success());
    let status = import.wait().unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    eprintln!("{log}");
    assert!(status.success(), "{log}");
    assert_same_rows(&src, "modeldata", &dst, "modeldata");
}
