//! Online tests: a writer imitating FastGPT traffic on the source, and
//! waits on an online job's observed state (status phase, applied changes).
use std::path::Path;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::faults::{Moment, start, status_of, wait_for};
use super::{client, ok, rt, tempdir};

/// Writes to a FastGPT `modeldata` table until stopped: inserts of new rows
/// with 1536-d vectors, deletes of whole collections, updates of `team_id`
/// only (the vector stays out of line, unchanged: pgoutput sends it as
/// "unchanged TOAST"), and updates of vectors.
pub struct Writer {
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

const NEW_VECTOR: &str = "(SELECT array_agg(random()::real) FROM generate_series(1, 1536))::vector";

impl Writer {
    /// Runs `step(i)` for i = 0, 1, … on its own thread until stopped, paced
    /// like an application (not a bulk load).
    pub fn spawn<F, Fut>(make: impl FnOnce() -> Fut + Send + 'static, step: F) -> Writer
    where
        Fut: std::future::Future,
        Fut::Output: Send,
        F: for<'a> Fn(&'a mut Fut::Output, u64) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'a>> + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let (s, o) = (stop.clone(), ops.clone());
        let thread = std::thread::spawn(move || {
            rt().block_on(async {
                let mut conn = make().await;
                let mut i = 0u64;
                while !s.load(Relaxed) {
                    step(&mut conn, i).await;
                    o.fetch_add(1, Relaxed);
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(15)).await;
                }
            })
        });
        Writer { stop, ops, thread: Some(thread) }
    }

    /// FastGPT traffic on a PostgreSQL source.
    pub fn start(url: &str) -> Writer {
        let url = url.to_string();
        Writer::spawn(
            move || async move { client(&url).await },
            |c, i| {
                Box::pin(async move {
                    let sql = match i % 6 {
                        0 | 3 => format!(
                            "INSERT INTO modeldata (vector, team_id, dataset_id, collection_id) \
                             SELECT {NEW_VECTOR}, 'team_w', 'ds_w', 'col_w{}' FROM generate_series(1, 4)",
                            i % 5
                        ),
                        1 => "UPDATE modeldata SET team_id = 'team_moved' WHERE id IN \
                              (SELECT id FROM modeldata ORDER BY random() LIMIT 3)"
                            .to_string(),
                        2 => format!(
                            "UPDATE modeldata SET vector = {NEW_VECTOR} WHERE id = (SELECT id FROM modeldata ORDER BY random() LIMIT 1)"
                        ),
                        // A FastGPT collection deleted as a whole.
                        4 => format!("DELETE FROM modeldata WHERE collection_id = 'col_w{}'", (i / 6) % 5),
                        _ if i % 12 == 5 => "DELETE FROM modeldata WHERE id = \
                              (SELECT id FROM modeldata ORDER BY random() LIMIT 1)"
                            .to_string(),
                        _ => "UPDATE modeldata SET team_id = team_id || '+' WHERE id = \
                              (SELECT id FROM modeldata ORDER BY random() LIMIT 1)"
                            .to_string(),
                    };
                    c.batch_execute(&sql).await.unwrap_or_else(|e| panic!("writer: {sql}: {e}"));
                })
            },
        )
    }

    /// The same traffic on an OceanBase / seekdb source (MySQL dialect,
    /// vectors as text literals), including an update that changes a key.
    pub fn start_ob(url: &str) -> Writer {
        use mysql_async::prelude::Queryable;
        let url = url.to_string();
        Writer::spawn(
            move || async move { super::ob_conn(&url).await },
            |c, i| {
                Box::pin(async move {
                    let vector = || {
                        let v: Vec<String> = (0..1536u64).map(|d| format!("{:.6}", (((i * 7919 + d * 104729) % 1000) as f32) / 1000.0)).collect();
                        format!("'[{}]'", v.join(","))
                    };
                    let random_ids = async |c: &mut mysql_async::Conn, n: u32| -> String {
                        let ids: Vec<i64> = c.query(format!("SELECT id FROM modeldata ORDER BY rand() LIMIT {n}")).await.unwrap();
                        ids.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")
                    };
                    let sql = match i % 6 {
                        0 | 3 => {
                            let rows: Vec<String> =
                                (0..4).map(|_| format!("({}, 'team_w', 'ds_w', 'col_w{}')", vector(), i % 5)).collect();
                            format!("INSERT INTO modeldata (vector, team_id, dataset_id, collection_id) VALUES {}", rows.join(","))
                        }
                        1 => format!("UPDATE modeldata SET team_id = 'team_moved' WHERE id IN ({})", random_ids(c, 3).await),
                        2 => format!("UPDATE modeldata SET vector = {} WHERE id IN ({})", vector(), random_ids(c, 1).await),
                        4 => format!("DELETE FROM modeldata WHERE collection_id = 'col_w{}'", (i / 6) % 5),
                        _ if i % 12 == 5 => format!("DELETE FROM modeldata WHERE id IN ({})", random_ids(c, 1).await),
                        // A key moved: the old id is gone, the new one appears.
                        _ if i % 24 == 11 => format!("UPDATE modeldata SET id = id + 1000000 WHERE id IN ({})", random_ids(c, 1).await),
                        _ => format!("UPDATE modeldata SET team_id = concat(team_id, '+') WHERE id IN ({})", random_ids(c, 1).await),
                    };
                    if sql.ends_with("IN ()") {
                        return;
                    }
                    c.query_drop(&sql).await.unwrap_or_else(|e| panic!("writer: {}: {e}", &sql[..sql.len().min(200)]));
                })
            },
        )
    }

    pub fn ops(&self) -> u64 {
        self.ops.load(Relaxed)
    }

    /// Waits until the writer has made `n` more changes (so a phase saw traffic).
    pub fn wait_for_more(&self, n: u64) {
        let start = self.ops();
        let t = Instant::now();
        while self.ops() < start + n {
            assert!(t.elapsed() < Duration::from_secs(60), "writer stalled");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.ops()
    }
}

/// A test that fails mid-way stops its writer too (its changes would flood
/// the WAL every other test's slot decodes).
impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
    }
}

/// Changes the online job has applied (all kinds), from its status file.
pub fn applied(job_dir: &Path, command: &str) -> u64 {
    status_of(job_dir, command)
        .and_then(|s| {
            let a = &s["online"]["applied"];
            Some(a["inserts"].as_u64()? + a["updates"].as_u64()? + a["deletes"].as_u64()?)
        })
        .unwrap_or(0)
}

/// Waits until the online job follows the source (phase) having applied more
/// than `than` changes.
pub fn wait_following(child: &mut Child, job_dir: &Path, command: &str, than: u64, what: &str) {
    let t = Instant::now();
    loop {
        let st = status_of(job_dir, command);
        let phase = st.as_ref().and_then(|s| s["phase"].as_str().map(str::to_string)).unwrap_or_default();
        if (phase == "following" || phase == "catching up") && applied(job_dir, command) > than {
            return;
        }
        if let Some(code) = child.try_wait().unwrap() {
            let err = child.stderr.take().map(|e| std::io::read_to_string(e).unwrap_or_default()).unwrap_or_default();
            panic!("{what}: the online job ended ({code}) before following; status {st:?}\n{err}");
        }
        assert!(t.elapsed() < Duration::from_secs(180), "{what}: not following after 180 s; status {st:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Replication slots and publications named `name` on the source.
pub fn source_artifacts(url: &str, name: &str) -> (i64, i64) {
    rt().block_on(async {
        let c = client(url).await;
        let slots: i64 = c.query_one("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1", &[&name]).await.unwrap().get(0);
        let pubs: i64 = c.query_one("SELECT count(*) FROM pg_publication WHERE pubname = $1", &[&name]).await.unwrap().get(0);
        (slots, pubs)
    })
}

/// Triggers and changelog tables vmig left in an OceanBase database.
pub fn ob_leftovers(url: &str) -> String {
    let db = url.rsplit('/').next().unwrap();
    let triggers = super::ob_query_i64(url, &format!("SELECT count(*) FROM information_schema.triggers WHERE trigger_schema = '{db}'"));
    let tables = super::ob_query_i64(
        url,
        &format!("SELECT count(*) FROM information_schema.tables WHERE table_schema = '{db}' AND table_name LIKE 'vmig_changes%'"),
    );
    if triggers + tables == 0 { String::new() } else { format!("{triggers} triggers, {tables} changelog tables") }
}

/// An online test's source: its URL, a writer imitating FastGPT on it, and
/// what vmig left on it (empty: nothing).
pub struct OnlineSource {
    pub url: String,
    /// Flags the job needs for this source.
    pub extra_args: Vec<String>,
    pub writer: Box<dyn Fn() -> Writer>,
    pub leftovers: Box<dyn Fn() -> String>,
}

pub fn online_args(src: &str, dst: &str, state: &Path, job: &str) -> Vec<String> {
    [
        "migrate", "--online", "--from", src, "--to", dst, "--job", job, "--state-root", state.to_str().unwrap(),
        "--chunk-rows", "400", "--workers", "1", "--quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Kills a job left running when a test fails (a failed cutover keeps following).
pub struct Reaper(pub Vec<u32>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in &self.0 {
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
    }
}

pub fn kill(mut child: Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Kills the job during the snapshot and again while following, resumes
/// it, stops the writer, cuts over; returns when the target is checked.
pub fn online_scenario(name: &str, source: &OnlineSource, dst: &str, check: &dyn Fn(&str)) {
    online_scenario_cut(name, source, dst, &[], check);
}

/// `online_scenario` with flags for the cutover alone; returns what it said.
pub fn online_scenario_cut(name: &str, source: &OnlineSource, dst: &str, cutover_flags: &[&str], check: &dyn Fn(&str)) -> String {
    let src = source.url.clone();
    let state = tempdir();
    let mut args = online_args(&src, dst, state.path(), name);
    args.extend(source.extra_args.iter().cloned());
    let job_dir = state.path().join(name);
    let writer = (source.writer)();

    // 1. Killed during the snapshot copy (throttled so the moment can be hit).
    let mut a = args.clone();
    a.extend(["--rate-limit".into(), "400".into()]);
    let mut first = start(&a, &Moment::Committed(1));
    wait_for(&mut first, &job_dir, "migrate", &Moment::Committed(1), name);
    assert_eq!(status_of(&job_dir, "migrate").unwrap()["phase"], "snapshot", "{name}: killed outside the snapshot");
    kill(first);
    writer.wait_for_more(20);

    // 2. Resumed; killed while following the writer's changes.
    let mut second = start(&args, &Moment::Committed(0));
    wait_following(&mut second, &job_dir, "migrate", 0, name);
    writer.wait_for_more(30);
    wait_following(&mut second, &job_dir, "migrate", applied(&job_dir, "migrate"), name);
    kill(second);
    let before = applied(&job_dir, "migrate");
    writer.wait_for_more(30);

    // 3. Resumed again; it picks up from its last applied position.
    let mut third = start(&args, &Moment::Committed(0));
    let _reap = Reaper(vec![third.id()]);
    wait_following(&mut third, &job_dir, "migrate", before, name);
    let ops = writer.stop();

    let mut cut = args.clone();
    cut[0] = "cutover".into();
    cut.extend(cutover_flags.iter().map(|f| f.to_string()));
    let cut: Vec<&str> = cut.iter().map(|s| s.as_str()).collect();
    let out = ok(&cut);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.contains("safe to switch"), "{name}: {said}");
    let status = third.wait().unwrap();
    assert!(status.success(), "{name}: the online job did not exit 0 after cutover ({status})");
    eprintln!("{name}: writer made {ops} changes; {} applied in the last run's count", applied(&job_dir, "migrate"));
    check(&src);
    let left = (source.leftovers)();
    assert!(left.is_empty(), "{name}: left on the source after cutover: {left}");
    said
}


/// Online across hosts: export and import as separate processes joined only
/// by a staging directory (snapshot chunks, then change files). The export
/// is killed during its snapshot; both are killed while following and
/// resumed; the export is cut over, then the import (which cuts over by
/// itself after the export's last file). Returns the directory holding `st/`.
pub fn staging_scenario(name: &str, source: &OnlineSource, dst: &str) -> tempfile::TempDir {
    let src = source.url.clone();
    let writer = (source.writer)();
    let dir = tempdir();
    let st = dir.path().join("st");
    let st_s = st.to_str().unwrap().to_string();
    let export: Vec<String> = ["export", "--online", "--from", &src, "--staging", &st_s, "--job", name, "--chunk-rows", "400", "--workers", "1", "--quiet"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let import: Vec<String> = ["import", "--online", "--staging", &st_s, "--to", &dst, "--quiet"].iter().map(|s| s.to_string()).collect();

    // The export killed during its snapshot, then resumed.
    let mut a = export.clone();
    a.extend(["--rate-limit".into(), "400".into()]);
    let mut exp = start(&a, &Moment::Committed(1));
    wait_for(&mut exp, &st, "export", &Moment::Committed(1), name);
    kill(exp);
    let mut exp = start(&export, &Moment::Committed(0));
    wait_following(&mut exp, &st, "export", 0, name);

    // The import follows the change files; killed, the export killed too, both resumed.
    let mut imp = start(&import, &Moment::Committed(0));
    wait_following(&mut imp, &st, "import", 0, name);
    writer.wait_for_more(30);
    kill(imp);
    kill(exp);
    let exported = applied(&st, "export");
    writer.wait_for_more(30);
    let mut exp = start(&export, &Moment::Committed(0));
    wait_following(&mut exp, &st, "export", exported, name);
    let mut imp = start(&import, &Moment::Committed(0));
    let _reap = Reaper(vec![exp.id(), imp.id()]);
    wait_following(&mut imp, &st, "import", 0, name);
    // Each side digests its chunks while following (the export the source,
    // the import the target), so that neither cutover reads a whole table.
    for command in ["export", "import"] {
        wait_for_a_digested_pass(&st, command);
    }
    writer.stop();

    let mut cut = export.clone();
    cut[0] = "cutover".into();
    let said = String::from_utf8_lossy(&ok(&cut.iter().map(|s| s.as_str()).collect::<Vec<_>>()).stdout).into_owned();
    assert!(said.contains("the export is complete"), "export cutover: {said}");
    // The bound for what a cutover may read: the table's rows, as the export counted them.
    let rows: u64 = said.split("the export is complete (").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok()).expect(&said);
    assert_read_changed_keys_only(&said, rows);
    assert!(exp.wait().unwrap().success(), "the export did not exit 0 after cutover");
    // The import cuts over by itself once it has applied the export's last file.
    let mut cut = import.clone();
    cut[0] = "cutover".into();
    let said = String::from_utf8_lossy(&ok(&cut.iter().map(|s| s.as_str()).collect::<Vec<_>>()).stdout).into_owned();
    assert!(said.contains("safe to switch"), "import cutover: {said}");
    assert_read_changed_keys_only(&said, rows);
    assert!(imp.wait().unwrap().success(), "the import did not exit 0 after cutover");
    let left = (source.leftovers)();
    assert!(left.is_empty(), "{name}: left on the source after cutover: {left}");
    dir
}

/// Waits until an export or import through staging at `st` has digested
/// every chunk of its side once.
pub fn wait_for_a_digested_pass(st: &Path, command: &str) {
    let full_pass = || {
        let v = status_of(st, command).map(|s| s["online"]["verification"].clone()).unwrap_or_default();
        v["chunks"].as_u64().is_some_and(|n| n > 0 && v["chunks_verified"].as_u64() == Some(n))
    };
    let t = Instant::now();
    while !full_pass() {
        assert!(t.elapsed() < Duration::from_secs(180), "the {command} in {} digested no full pass in 180 s", st.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A cutover through staging read only keys changed since each chunk was
/// digested (no chunk whole): fewer rows than the table holds.
pub fn assert_read_changed_keys_only(said: &str, table_rows: u64) {
    let window = said.split("digested: read ").nth(1).unwrap_or_else(|| panic!("no digest line: {said}"));
    let number_before = |word: &str| -> u64 { window.split(word).next().unwrap().rsplit(' ').next().and_then(|n| n.parse().ok()).expect(said) };
    assert!(window.starts_with(|c: char| c.is_ascii_digit()), "{said}");
    assert_eq!(number_before(" chunks never digested"), 0, "every chunk was digested while following: {said}");
    let read: u64 = window.split('(').nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok()).expect(said);
    assert!(read < table_rows, "the cutover read {read} rows of {table_rows}: {said}");
}
