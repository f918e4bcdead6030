//! Many workers, one job, no coordinator: workers agree through the job's
//! store (the staging area, or the `--state` store of a direct migrate).
//!
//! ```text
//! work/<lane>/claims/000017.json   who runs chunk 17, until when (create-only, renewed by compare-and-swap)
//! work/<lane>/claims/plan.json     the worker planning or preparing the targets (one at a time)
//! work/<lane>/claims/finish.json   the worker building indexes at the end
//! work/<lane>/finished.json        the job's finish is done
//! work/<lane>/workers/<id>.json    each worker's status, its heartbeat
//! ```
//!
//! `<lane>` separates what shares a staging area: `export`, and one lane per
//! import or migrate target. A claim whose lease ran out is taken over; a
//! chunk done twice is harmless because every target's ledger skips or
//! clears it, so claims only have to be mostly right.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, bail};
use object_store::UpdateVersion;
use serde::{Deserialize, Serialize};

use crate::model::plan::ChunkRange;
use crate::state::store::Store;
pub use crate::state::locks::host_name;

/// How this worker takes part in a shared job.
#[derive(Clone, Debug)]
pub struct Distributed {
    /// Only chunks with `id % n == i` (static partitions).
    pub shard: Option<(u32, u32)>,
    pub lease: Duration,
}

impl Distributed {
    pub fn in_shard(&self, chunk: u32) -> bool {
        self.shard.is_none_or(|(i, n)| chunk % n == i)
    }

    pub fn describe_shard(&self) -> Option<String> {
        self.shard.map(|(i, n)| format!("{i}/{n}"))
    }
}

/// Reads `--shard I/N`, or the scheduler's environment: Kubernetes Indexed
/// Jobs (`JOB_COMPLETION_INDEX` with `--shards N`), Slurm arrays
/// (`SLURM_ARRAY_TASK_ID`, `SLURM_ARRAY_TASK_COUNT`, `SLURM_ARRAY_TASK_MIN`).
pub fn shard_from(flag: Option<&str>, shards: Option<u32>) -> Result<Option<(u32, u32)>> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let parse = |what: &str, v: &str| -> Result<u32> {
        v.trim().parse().map_err(|_| anyhow::anyhow!("{what} must be a number, not {v:?}"))
    };
    let (i, n) = if let Some(s) = flag {
        let Some((i, n)) = s.split_once('/') else { bail!("--shard takes I/N (e.g. 0/3), not {s:?}") };
        (parse("--shard's index", i)?, parse("--shard's count", n)?)
    } else if let (Some(i), Some(n)) = (env("JOB_COMPLETION_INDEX"), shards) {
        (parse("JOB_COMPLETION_INDEX", &i)?, n)
    } else if let (Some(id), Some(count)) = (env("SLURM_ARRAY_TASK_ID"), env("SLURM_ARRAY_TASK_COUNT")) {
        let min = env("SLURM_ARRAY_TASK_MIN").map(|m| parse("SLURM_ARRAY_TASK_MIN", &m)).transpose()?.unwrap_or(0);
        (parse("SLURM_ARRAY_TASK_ID", &id)?.saturating_sub(min), parse("SLURM_ARRAY_TASK_COUNT", &count)?)
    } else if let Some(n) = shards {
        bail!("--shards {n} needs JOB_COMPLETION_INDEX (a Kubernetes Indexed Job) or --shard I/{n}")
    } else {
        return Ok(None);
    };
    if n == 0 || i >= n {
        bail!("shard {i}/{n}: the index must be below the count");
    }
    Ok(Some((i, n)))
}

/// This process as a worker: host and pid.
pub fn worker_id() -> String {
    format!("{}-{}", host_name(), std::process::id())
}

/// One claim object.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClaimRecord {
    pub worker: String,
    pub host: String,
    pub pid: u32,
    /// Lease expiry, milliseconds since the epoch.
    pub expires_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taken_over_from: Option<String>,
}

impl ClaimRecord {
    fn expired(&self, now_ms: i64) -> bool {
        now_ms > self.expires_ms
    }

    /// A claim left by a dead process on this very host needs no lease wait.
    fn holder_dead_here(&self, host: &str) -> bool {
        self.host == host && self.pid != std::process::id() && !crate::state::locks::process_alive(self.pid)
    }
}

pub use crate::model::now_ms;

/// A claim this worker holds.
#[derive(Debug)]
pub struct Claim {
    pub name: String,
    pub taken_over_from: Option<String>,
}

/// The claims of one lane of a job, as seen by this worker.
pub struct Coordinator {
    pub store: Store,
    pub me: String,
    host: String,
    pub cfg: Distributed,
    /// Claims held, with the version the next renewal must match.
    held: Mutex<BTreeMap<String, UpdateVersion>>,
    pub takeovers: AtomicU64,
    /// Claims another worker took over while this one still ran them.
    pub lost: AtomicU64,
}

impl Coordinator {
    /// `store`: the lane's folder (`work/<lane>` of the job's store).
    pub fn new(store: Store, cfg: Distributed) -> Arc<Coordinator> {
        Arc::new(Coordinator {
            store,
            me: worker_id(),
            host: host_name(),
            cfg,
            held: Mutex::new(BTreeMap::new()),
            takeovers: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        })
    }

    fn claim_key(name: &str) -> String {
        format!("claims/{name}.json")
    }

    fn record(&self, taken_over_from: Option<String>) -> Vec<u8> {
        serde_json::to_vec(&ClaimRecord {
            worker: self.me.clone(),
            host: self.host.clone(),
            pid: std::process::id(),
            expires_ms: now_ms() + self.cfg.lease.as_millis() as i64,
            taken_over_from,
        })
        .unwrap()
    }

    /// Claims `name` if nobody holds it, or takes it over if its holder's
    /// lease ran out; None while another live worker (or this one) holds it.
    pub fn try_claim(&self, name: &str) -> Result<Option<Claim>> {
        let key = Self::claim_key(name);
        if self.held.lock().unwrap().contains_key(&key) {
            return Ok(None);
        }
        if let Some(version) = self.store.create_versioned(&key, &self.record(None))? {
            self.held.lock().unwrap().insert(key, version);
            return Ok(Some(Claim { name: name.into(), taken_over_from: None }));
        }
        let Some(obj) = self.store.get(&key)? else {
            return Ok(None); // released meanwhile: the next round creates it
        };
        let Ok(rec) = serde_json::from_slice::<ClaimRecord>(&obj.bytes) else {
            return Ok(None);
        };
        if rec.worker == self.me || !(rec.expired(now_ms()) || rec.holder_dead_here(&self.host)) {
            return Ok(None);
        }
        let Some(version) = self.store.replace(&key, &self.record(Some(rec.worker.clone())), &obj.version)? else {
            return Ok(None); // another worker took it over first
        };
        self.held.lock().unwrap().insert(key, version);
        self.takeovers.fetch_add(1, Relaxed);
        Ok(Some(Claim { name: name.into(), taken_over_from: Some(rec.worker) }))
    }

    /// Who holds `name` (for "waiting for …" lines), if anyone live does.
    pub fn holder(&self, name: &str) -> Result<Option<ClaimRecord>> {
        Ok(self
            .store
            .get(&Self::claim_key(name))?
            .and_then(|o| serde_json::from_slice::<ClaimRecord>(&o.bytes).ok())
            .filter(|r| !r.expired(now_ms())))
    }

    /// Gives a claim up (its work is committed, or failed here).
    pub fn release(&self, claim: Claim) -> Result<()> {
        let key = Self::claim_key(&claim.name);
        if self.held.lock().unwrap().remove(&key).is_some() {
            // Only our own claim: one taken over from us is the taker's now.
            if let Some(o) = self.store.get(&key)? {
                if serde_json::from_slice::<ClaimRecord>(&o.bytes).is_ok_and(|r| r.worker == self.me) {
                    self.store.delete(&key)?;
                }
            }
        }
        Ok(())
    }

    /// Extends every held lease (compare-and-swap: a claim taken over by
    /// another worker is dropped, not overwritten).
    pub fn renew(&self) {
        let held: Vec<(String, UpdateVersion)> = self.held.lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        for (key, version) in held {
            match self.store.replace(&key, &self.record(None), &version) {
                Ok(Some(new)) => {
                    if let Some(v) = self.held.lock().unwrap().get_mut(&key) {
                        *v = new;
                    }
                }
                Ok(None) => {
                    self.held.lock().unwrap().remove(&key);
                    self.lost.fetch_add(1, Relaxed);
                }
                Err(_) => {} // the store is unreachable for a moment: try again next beat
            }
        }
    }

    /// The chunk ids this worker holds now.
    pub fn held_chunks(&self) -> Vec<u32> {
        self.held
            .lock()
            .unwrap()
            .keys()
            .filter_map(|k| k.strip_prefix("claims/")?.strip_suffix(".json")?.parse().ok())
            .collect()
    }

    pub fn chunk_name(chunk: &ChunkRange) -> String {
        format!("{:06}", chunk.id)
    }

    /// How long to wait before looking again for claimable work.
    pub fn poll_interval(&self) -> Duration {
        // Short: a worker idles while it waits, and S3 requests are cheap.
        (self.cfg.lease / 20).clamp(Duration::from_millis(50), Duration::from_millis(250))
    }

    /// Renews leases and publishes this worker's status every lease/3 until
    /// `stop`; `status` makes the status document.
    pub fn spawn_heartbeat(
        self: &Arc<Self>,
        stop: Arc<AtomicBool>,
        status: impl Fn() -> Vec<u8> + Send + 'static,
    ) -> std::thread::JoinHandle<()> {
        let me = self.clone();
        std::thread::spawn(move || {
            let beat = (me.cfg.lease / 3).max(Duration::from_millis(100));
            let key = format!("workers/{}.json", me.me);
            loop {
                me.renew();
                let _ = me.store.put(&key, &status());
                let mut slept = Duration::ZERO;
                while slept < beat {
                    if stop.load(Relaxed) {
                        let _ = me.store.put(&key, &status());
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                    slept += Duration::from_millis(100);
                }
            }
        })
    }
}

/// A worker's published status, read back by `vmig status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub worker: String,
    pub host: String,
    pub lane: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<String>,
    /// Chunks this worker holds claims on right now.
    pub claims: Vec<u32>,
    pub takeovers: u64,
    pub lost_claims: u64,
    pub heartbeat_ms: i64,
    pub lease_ms: i64,
}

impl WorkerInfo {
    pub fn heartbeat_age_seconds(&self) -> f64 {
        (now_ms() - self.heartbeat_ms).max(0) as f64 / 1000.0
    }

    /// No heartbeat within the lease: the worker's claims may be taken over.
    pub fn lease_ran_out(&self) -> bool {
        now_ms() - self.heartbeat_ms > self.lease_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_flags_parse_and_refuse_nonsense() {
        assert_eq!(shard_from(Some("2/3"), None).unwrap(), Some((2, 3)));
        assert!(shard_from(Some("3/3"), None).unwrap_err().to_string().contains("below the count"));
        assert!(shard_from(Some("1-3"), None).unwrap_err().to_string().contains("I/N"));
        assert!(shard_from(Some("a/3"), None).unwrap_err().to_string().contains("number"));
        let d = Distributed { shard: Some((1, 3)), lease: Duration::from_secs(1) };
        assert_eq!((0..9).filter(|c| d.in_shard(*c)).collect::<Vec<_>>(), vec![1, 4, 7]);
    }

    #[test]
    fn claims_are_exclusive_until_they_expire_and_then_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_str().unwrap()).unwrap();
        // A lease no test machine can outlive by accident; its running out is
        // then written into the record, as a holder that stopped renewing leaves it.
        let cfg = Distributed { shard: None, lease: Duration::from_secs(600) };
        let a = Coordinator::new(store.clone(), cfg.clone());
        let b = Coordinator::new(store.clone(), cfg);
        let claim = a.try_claim("000001").unwrap().expect("free claim");
        assert!(a.try_claim("000001").unwrap().is_none(), "held by this worker already");
        // Another worker (same process here: pretend another id).
        let b = Arc::new(Coordinator { me: "other-host-1".into(), host: "other-host".into(), ..Arc::try_unwrap(b).ok().unwrap() });
        assert!(b.try_claim("000001").unwrap().is_none(), "a live lease keeps it");
        let key = Coordinator::claim_key("000001");
        let mut held: ClaimRecord = serde_json::from_slice(&store.get(&key).unwrap().unwrap().bytes).unwrap();
        held.expires_ms = now_ms() - 1;
        store.put(&key, &serde_json::to_vec(&held).unwrap()).unwrap();
        let taken = b.try_claim("000001").unwrap().expect("expired lease taken over");
        assert_eq!(taken.taken_over_from.as_deref(), Some(a.me.as_str()));
        assert_eq!(b.takeovers.load(Relaxed), 1);
        // The first holder's release leaves the taker's claim alone.
        a.release(claim).unwrap();
        assert!(store.exists("claims/000001.json").unwrap());
        b.release(taken).unwrap();
        assert!(!store.exists("claims/000001.json").unwrap());
    }
}
