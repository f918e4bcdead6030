//! Online tests: a writer imitating FastGPT traffic on the source, and
//! waits on an online job's observed state (status phase, applied changes).
use std::path::Path;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::faults::status_of;
use super::{client, rt};

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
    pub fn start(url: &str) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let (s, o, url) = (stop.clone(), ops.clone(), url.to_string());
        let thread = std::thread::spawn(move || {
            rt().block_on(async {
                let c = client(&url).await;
                let mut i = 0u64;
                while !s.load(Relaxed) {
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
                    o.fetch_add(1, Relaxed);
                    i += 1;
                    // Paced like an application, not a bulk load.
                    tokio::time::sleep(Duration::from_millis(15)).await;
                }
            })
        });
        Writer { stop, ops, thread: Some(thread) }
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
