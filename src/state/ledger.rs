//! What is committed. Each sink keeps its own durable ledger (a table in a SQL
//! target, commit markers in staging, a ledger file for Milvus); this module
//! holds the shared record type, the ledger file and the job's local state
//! directory (plan, status, rejects).

use std::collections::BTreeMap;
use std::fs;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::contract::commit::{CommitRecord, Ledger};
use crate::model::now_rfc3339;
use crate::state::files::write_atomic;

/// One line of a ledger file: a committed chunk, the mark that the job
/// began writing to the target (made before its first write), or an
/// applied change-stream position.
#[derive(Serialize, Deserialize, Default)]
struct LedgerLine {
    job: String,
    target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    record: Option<CommitRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    began_at: Option<String>,
    /// Online: the change-stream position applied (and changes so far).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    position: Option<crate::contract::changes::AppliedPosition>,
}

/// A ledger for targets without transactions (Milvus): JSON lines, one per
/// committed chunk and target, durable before the chunk counts as
/// committed. In a local state directory it is one append-only file; in an
/// object store (a shared job, workers on many hosts) every line is an
/// object of its own under `ledger/milvus-<target>/`, so appends from many
/// workers never collide.
pub struct LedgerFile {
    at: LedgerAt,
    target: String,
    lock: Mutex<()>,
    /// Remote lines read so far (they never change once written).
    seen: Mutex<BTreeMap<String, Vec<u8>>>,
}

enum LedgerAt {
    File(PathBuf),
    Store(crate::state::store::Store),
}

impl LedgerFile {
    pub fn new(path: PathBuf, target: String) -> Self {
        LedgerFile { at: LedgerAt::File(path), target, lock: Mutex::new(()), seen: Mutex::new(BTreeMap::new()) }
    }

    /// The job's ledger for `target` in its state store: `file` in a local
    /// directory, one object per line elsewhere.
    pub fn in_store(store: &crate::state::store::Store, file: &str, target: String) -> Self {
        match store.local_dir() {
            Some(d) => LedgerFile::new(d.join(file), target),
            None => {
                let key = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(target.as_bytes()));
                let stem = file.split('.').next().unwrap_or(file);
                LedgerFile {
                    at: LedgerAt::Store(store.sub(&format!("ledger/{stem}-{key}"))),
                    target,
                    lock: Mutex::new(()),
                    seen: Mutex::new(BTreeMap::new()),
                }
            }
        }
    }

    /// Where the ledger is, for messages.
    pub fn describe(&self) -> String {
        match &self.at {
            LedgerAt::File(p) => p.display().to_string(),
            LedgerAt::Store(s) => s.describe().to_string(),
        }
    }

    /// The lock file of a local ledger (a shared one has claims instead).
    pub fn lock_path(&self) -> Option<PathBuf> {
        match &self.at {
            LedgerAt::File(p) => Some(p.with_extension("lock")),
            LedgerAt::Store(_) => None,
        }
    }

    fn lines(&self) -> Result<Vec<LedgerLine>> {
        let path = match &self.at {
            LedgerAt::File(p) => p,
            LedgerAt::Store(store) => {
                let mut seen = self.seen.lock().unwrap();
                let keys = store.list("")?;
                for (k, _) in &keys {
                    if !seen.contains_key(k) {
                        if let Some(o) = store.get(k)? {
                            seen.insert(k.clone(), o.bytes.to_vec());
                        }
                    }
                }
                let present: std::collections::BTreeSet<&String> = keys.iter().map(|(k, _)| k).collect();
                seen.retain(|k, _| present.contains(k));
                // Keys begin with the time of writing: key order is line order.
                return seen
                    .iter()
                    .map(|(k, v)| serde_json::from_slice(v).with_context(|| format!("{}/{k} is damaged", store.describe())))
                    .collect();
            }
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mut out = Vec::new();
        let n = text.lines().count();
        for (i, line) in text.lines().enumerate() {
            match serde_json::from_str::<LedgerLine>(line) {
                Ok(l) => out.push(l),
                // A torn last line is a commit that did not finish.
                Err(_) if i + 1 == n && !text.ends_with('\n') => {}
                Err(e) => bail!("{} line {} is damaged: {e}", path.display(), i + 1),
            }
        }
        Ok(out)
    }

    pub fn records(&self, job: &str) -> Result<Ledger> {
        Ok(self
            .lines()?
            .into_iter()
            .filter(|l| l.job == job && l.target == self.target)
            .filter_map(|l| l.record)
            .map(|r| (r.chunk, r))
            .collect())
    }

    /// True once the job has begun writing to the target: rows there that no
    /// chunk record covers are the job's own (a chunk killed before its commit).
    pub fn began(&self, job: &str) -> Result<bool> {
        Ok(self.lines()?.iter().any(|l| l.job == job && l.target == self.target))
    }

    /// Records, durably, that the job is about to write to the target.
    pub fn mark_began(&self, job: &str) -> Result<()> {
        self.write_line(&LedgerLine { job: job.into(), target: self.target.clone(), began_at: Some(now_rfc3339()), ..Default::default() })
    }

    pub fn append(&self, job: &str, record: &CommitRecord) -> Result<()> {
        self.write_line(&LedgerLine { job: job.into(), target: self.target.clone(), record: Some(record.clone()), ..Default::default() })
    }

    /// The last change-stream position recorded for the job.
    pub fn position(&self, job: &str) -> Result<Option<crate::contract::changes::AppliedPosition>> {
        Ok(self.lines()?.into_iter().filter(|l| l.job == job && l.target == self.target).filter_map(|l| l.position).last())
    }

    /// Records, durably, that the job applied changes up to `position`.
    pub fn record_position(&self, job: &str, position: &crate::contract::changes::AppliedPosition) -> Result<()> {
        self.write_line(&LedgerLine { job: job.into(), target: self.target.clone(), position: Some(position.clone()), ..Default::default() })
    }

    fn write_line(&self, l: &LedgerLine) -> Result<()> {
        let _g = self.lock.lock().unwrap();
        let mut line = serde_json::to_vec(l)?;
        match &self.at {
            LedgerAt::File(path) => {
                line.push(b'\n');
                let mut f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening {}", path.display()))?;
                f.write_all(&line)?;
                f.sync_data().with_context(|| format!("fsync of {}", path.display()))
            }
            LedgerAt::Store(store) => {
                let key = format!(
                    "{:020}-{}-{:06}.json",
                    chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default(),
                    crate::state::claims::worker_id(),
                    LINE_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                );
                store.put(&key, &line)
            }
        }
    }

    pub fn forget(&self, job: &str) -> Result<u64> {
        let _g = self.lock.lock().unwrap();
        let path = match &self.at {
            LedgerAt::File(p) => p.clone(),
            LedgerAt::Store(store) => {
                let mut gone = 0;
                for (k, _) in store.list("")? {
                    if let Some(o) = store.get(&k)? {
                        if let Ok(l) = serde_json::from_slice::<LedgerLine>(&o.bytes) {
                            if l.job == job {
                                store.delete(&k)?;
                                gone += (l.record.is_some() || l.position.is_some()) as u64;
                            }
                        }
                    }
                }
                return Ok(gone);
            }
        };
        let lines = self.lines()?;
        // Every target of the job: the file lives in the job's own directory.
        let (gone, kept): (Vec<_>, Vec<_>) = lines.into_iter().partition(|l| l.job == job);
        if !gone.is_empty() && kept.is_empty() {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        } else if !gone.is_empty() {
            let mut text = Vec::new();
            for l in &kept {
                text.extend(serde_json::to_vec(l)?);
                text.push(b'\n');
            }
            write_atomic(&path, &text)?;
        }
        Ok(gone.iter().filter(|l| l.record.is_some() || l.position.is_some()).count() as u64)
    }
}

/// Orders ledger objects written by one process within the same nanosecond.
static LINE_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Local state directory of a job: `manifest.json` (spec and plan),
/// `status.json` (live progress), `rejects/`, and with staging `chunks/`.
#[derive(Clone, Debug)]
pub struct JobDir {
    pub path: PathBuf,
}

impl JobDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        JobDir { path: path.into() }
    }
    pub fn manifest(&self) -> PathBuf {
        self.path.join("manifest.json")
    }
    /// Live status of one command (`export`, `import`, `migrate`) on this job.
    pub fn status(&self, command: &str) -> PathBuf {
        self.path.join(format!("status-{command}.json"))
    }
    pub fn chunks(&self) -> PathBuf {
        self.path.join("chunks")
    }
    pub fn rejects(&self) -> PathBuf {
        self.path.join("rejects")
    }
    pub fn create(&self) -> Result<()> {
        fs::create_dir_all(self.rejects()).with_context(|| format!("creating {}", self.path.display()))?;
        Ok(())
    }
}

/// An exclusive lock on a file (flock), held while the value lives; the
/// kernel releases it when the process dies, so a killed run's lock is taken
/// over by the next. The file holds the holder (host, pid, since) for the
/// message a second run gets.
pub struct FileLock {
    _file: fs::File,
}

impl FileLock {
    /// Takes the lock or fails with one line naming the holder.
    pub fn acquire(path: &Path, job: &str, target: &str) -> Result<FileLock> {
        use crate::state::locks::{Holder, job_locked};
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("opening lock file {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let holder = fs::read(path)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Holder>(&b).ok())
                    .map(|h| h.describe());
                return Err(job_locked(job, target, holder));
            }
            Err(fs::TryLockError::Error(e)) => return Err(e).with_context(|| format!("locking {}", path.display())),
        }
        file.set_len(0)?;
        file.write_all(&serde_json::to_vec(&Holder::me())?)?;
        file.sync_data()?;
        Ok(FileLock { _file: file })
    }
}
