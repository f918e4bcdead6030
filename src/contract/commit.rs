//! What a sink records when it commits a chunk: the ledger's record type,
//! shared by every target's ledger (SQL table, Milvus ledger, staging marker).

use std::collections::BTreeMap;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::model::plan::ChunkRange;

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
    /// The chunk file's name when it is not `<chunk>.parquet` (staging
    /// written by several workers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
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
