//! What is committed. Each sink keeps its own durable ledger (a table in a SQL
//! target, commit markers in staging); this module holds the shared record
//! type and the job's local state directory (plan, status, rejects).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::plan::ChunkRange;

/// One committed chunk, as recorded by a sink.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRecord {
    pub chunk: u32,
    pub lo: i64,
    pub hi: i64,
    /// Rows written (valid rows).
    pub rows: u64,
    /// Rows of this chunk sent to rejects/.
    #[serde(default)]
    pub rejected: u64,
    /// Order-independent content hash of the rows written (see hash.rs).
    pub content_hash: String,
    /// Bytes written (file size for staging, payload bytes for databases).
    #[serde(default)]
    pub bytes: u64,
    /// sha256 of the chunk file (staging only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    pub committed_at: String,
}

impl CommitRecord {
    pub fn matches(&self, chunk: &ChunkRange) -> bool {
        self.chunk == chunk.id && self.lo == chunk.lo && self.hi == chunk.hi
    }
}

pub type Ledger = BTreeMap<u32, CommitRecord>;

/// Checks that a sink's ledger was made with the same plan; a mismatch means
/// the source was re-planned and resuming would mix two plans.
pub fn check_ledger_matches_plan(ledger: &Ledger, plan: &[ChunkRange], what: &str) -> Result<()> {
    for rec in ledger.values() {
        match plan.iter().find(|c| c.id == rec.chunk) {
            Some(c) if rec.matches(c) => {}
            _ => anyhow::bail!(
                "{what}: committed chunk {} [{}, {}] is not in this job's plan; the job was planned differently \
                 (run `vmig reset` to start over)",
                rec.chunk,
                rec.lo,
                rec.hi
            ),
        }
    }
    Ok(())
}

pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Writes `bytes` to `path` atomically: temp file, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    {
        let mut f = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync of directory {}", dir.display()))
}

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
