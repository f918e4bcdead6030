//! Online migration: the snapshot copy (the offline pipeline), then the
//! source's changes applied continuously, then cutover. A source gives a
//! [`ChangeStream`]; every target applies [`ChangeSet`]s with the position
//! they cover in its ledger, in the same transaction where it has one.

pub mod collapse;
pub mod commands;
mod follow;
pub mod reconcile;

pub use follow::run_online;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};

use crate::ledger::write_atomic;

/// Changes applied, by kind (as the source made them, before collapsing).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeCounts {
    pub inserts: u64,
    pub updates: u64,
    pub deletes: u64,
}

impl ChangeCounts {
    pub fn total(&self) -> u64 {
        self.inserts + self.updates + self.deletes
    }
    pub fn add(&mut self, o: &ChangeCounts) {
        self.inserts += o.inserts;
        self.updates += o.updates;
        self.deletes += o.deletes;
    }
}

/// Whole transactions of changes, collapsed per primary key, as Arrow.
#[derive(Debug, Default, Clone)]
pub struct ChangeSet {
    /// The source position once this batch is applied.
    pub position: u64,
    /// Commit time of the batch's last transaction (Unix µs).
    pub commit_time_us: Option<i64>,
    /// Keys whose rows are gone.
    pub deletes: Vec<crate::plan::Key>,
    /// Final images with every column (inserted or updated rows).
    pub images: Vec<RecordBatch>,
    /// Updates of some columns only: each batch holds the primary key and
    /// the changed columns; the other columns keep their value.
    pub partial: Vec<RecordBatch>,
    pub counts: ChangeCounts,
}

impl ChangeSet {
    pub fn has_rows(&self) -> bool {
        !self.deletes.is_empty()
            || self.images.iter().any(|b| b.num_rows() > 0)
            || self.partial.iter().any(|b| b.num_rows() > 0)
    }
}

/// What a target's ledger says the job applied.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedPosition {
    pub position: u64,
    /// Changes applied so far, over every run.
    pub counts: ChangeCounts,
}

/// The next batch a stream returns.
pub struct StreamBatch {
    pub set: ChangeSet,
    /// Once `set` is applied, every change committed before this position is
    /// (nothing else is pending): the position to confirm, and how far a
    /// cutover has drained.
    pub drained_to: Option<u64>,
}

/// What a stream's positions count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PositionUnit {
    /// PostgreSQL: WAL bytes.
    #[default]
    Bytes,
    /// OceanBase: changelog rows.
    Changes,
    /// Milvus: a createTime watermark (ms); the source keeps nothing for the job.
    Watermark,
}

/// Where the source is and how much it keeps for the job.
#[derive(Clone, Debug, Default)]
pub struct StreamStats {
    pub source_position: u64,
    pub confirmed: u64,
    /// Change log the source keeps for the job, in `unit` (PostgreSQL: WAL
    /// the slot retains; OceanBase: changelog rows).
    pub retained_bytes: u64,
    pub unit: PositionUnit,
    /// A line about how the stream follows its source, for `status`.
    pub note: Option<String>,
}

/// A source's change capture, positioned after the last confirmed change.
pub trait ChangeStream: Send {
    /// The source-side artefacts, named for the user ("slot … and publication … in …").
    fn artifacts(&self) -> String;
    fn format_position(&self, p: u64) -> String;
    /// The source's current position: a cutover drains up to it.
    fn current_position(&mut self) -> Result<u64>;
    /// Where the stream ends, once its source has said so (an import's export
    /// cut over): the job then cuts over when it has applied that far.
    fn ends_at(&mut self) -> Result<Option<u64>> {
        Ok(None)
    }
    /// Moves the stream past what every target has applied (a resume after a
    /// crash between a target's commit and the confirmation).
    fn skip_to(&mut self, position: u64) -> Result<()>;
    /// Whole transactions committed before `upto`, in commit order, about
    /// `max_changes` changes at most (one large transaction may exceed it).
    fn next_batch(&mut self, max_changes: usize, upto: u64) -> Result<StreamBatch>;
    /// Lets the source discard changes up to `position` (applied everywhere).
    fn confirm(&mut self, position: u64) -> Result<()>;
    fn stats(&mut self) -> Result<StreamStats>;
    /// Removes the source-side artefacts (finished cutover).
    fn drop_artifacts(&mut self) -> Result<()>;
    /// The artefacts are the source's and go at cutover (false: files kept).
    fn removes_artifacts(&self) -> bool {
        true
    }
    /// Batches carry the source's current rows, so applying one again
    /// converges: every target applies every batch, even one whose position
    /// it already has (a replay after a kill may hold changes committed late
    /// with lower positions).
    fn idempotent(&self) -> bool {
        false
    }
    /// Changes the position cannot see (Milvus deletes), found by comparing
    /// the ids of source and target: due every so often, and always before a
    /// cutover (`now`). None when not due.
    fn reconcile(&mut self, _now: bool) -> Result<Option<ChangeSet>> {
        Ok(None)
    }
}

/// `online.json` in the job's directory: which source artefacts the job
/// owns (so `reset` and `status` can name them even when no run is alive).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OnlineState {
    /// Source kind: postgres, oceanbase, milvus.
    pub kind: String,
    /// The source, without secrets.
    pub source: String,
    /// PostgreSQL: the replication slot and publication.
    #[serde(default)]
    pub slot: String,
    #[serde(default)]
    pub publication: String,
    /// OceanBase: the changelog table and its triggers.
    #[serde(default)]
    pub changelog: String,
    #[serde(default)]
    pub triggers: Vec<String>,
    pub created_at: String,
    /// Where the snapshot ends and the stream begins.
    pub consistent_point: String,
}

impl OnlineState {
    pub fn path(job_dir: &Path) -> PathBuf {
        job_dir.join("online.json")
    }
    pub fn load(job_dir: &Path) -> Result<Option<OnlineState>> {
        load_json(&Self::path(job_dir))
    }
    pub fn save(&self, job_dir: &Path) -> Result<()> {
        write_atomic(&Self::path(job_dir), &serde_json::to_vec_pretty(self)?)
    }
    /// What the job keeps on its source, for the user.
    pub fn describe(&self) -> String {
        match self.kind.as_str() {
            "postgres" => format!("replication slot {} and publication {} on {}", self.slot, self.publication, self.source),
            "oceanbase" => format!("changelog table {} and triggers {} on {}", self.changelog, self.triggers.join(", "), self.source),
            _ => format!("nothing on {} (vmig polls it)", self.source),
        }
    }
    /// The source holds something a reset must drop.
    pub fn has_artifacts(&self) -> bool {
        matches!(self.kind.as_str(), "postgres" | "oceanbase")
    }
}

/// `cutover-<command>.json` in the job's directory: written by `vmig
/// cutover` (requested), answered by the online job (done or failed). Per
/// command: an export and its import share a staging directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CutoverRequest {
    pub requested_at: String,
    /// requested, done, failed
    pub state: String,
    /// The source position to drain to (set by the job when it takes the request).
    #[serde(default)]
    pub position: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub finished_at: Option<String>,
    /// Made by a `vmig cutover` that runs the job itself (no online run was
    /// alive): a failed cutover ends the run instead of following on.
    #[serde(default)]
    pub standalone: bool,
}

impl CutoverRequest {
    pub fn path(job_dir: &Path, command: &str) -> PathBuf {
        job_dir.join(format!("cutover-{command}.json"))
    }
    pub fn load(job_dir: &Path, command: &str) -> Result<Option<CutoverRequest>> {
        load_json(&Self::path(job_dir, command))
    }
    pub fn save(&self, job_dir: &Path, command: &str) -> Result<()> {
        write_atomic(&Self::path(job_dir, command), &serde_json::to_vec_pretty(self)?)
    }
}

fn load_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| format!("{} is damaged", path.display()))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// What `vmig status` shows of an online job.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct OnlineStatus {
    pub artifacts: String,
    pub applied: ChangeCounts,
    pub changes_per_second: f64,
    pub lag_bytes: u64,
    pub lag_seconds: f64,
    pub retained_bytes: u64,
    pub applied_position: String,
    pub source_position: String,
    #[serde(default)]
    pub unit: PositionUnit,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

impl OnlineStatus {
    /// One line: applied changes, rate, lag, retained log.
    pub fn summary(&self) -> String {
        let behind = match self.unit {
            PositionUnit::Bytes => format!(
                ", {} · source keeps {} for the job",
                human_bytes(self.lag_bytes),
                human_bytes(self.retained_bytes)
            ),
            PositionUnit::Changes => format!(" · {} changes waiting in the source's changelog", self.retained_bytes),
            PositionUnit::Watermark => String::new(),
        };
        format!(
            "applied {} inserts, {} updates, {} deletes · {:.0} changes/s · lag {:.1} s{behind}",
            self.applied.inserts, self.applied.updates, self.applied.deletes, self.changes_per_second, self.lag_seconds,
        )
    }
}

pub fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

/// What a cutover's check found (verify, or digests across a staging area).
pub struct CutoverCheck {
    pub equal: bool,
    /// Completes "safe to switch: …" when equal.
    pub summary: String,
    /// What differs, when not equal.
    pub differences: String,
}

impl From<crate::verify::VerifyReport> for CutoverCheck {
    fn from(r: crate::verify::VerifyReport) -> Self {
        let diffs: Vec<String> = r
            .differing_chunks
            .iter()
            .take(3)
            .map(|d| d.describe())
            .collect();
        CutoverCheck {
            equal: r.equal,
            summary: format!(
                "the target equals the source ({} rows, ids and every column; vectors {})",
                r.target_rows, r.vector_comparison
            ),
            differences: format!("source {} rows, target {} rows; {}", r.source_rows, r.target_rows, diffs.join("; ")),
        }
    }
}

/// Retained change log above which `status` warns (the source's disk fills).
pub const RETAINED_WARN_BYTES: u64 = 1 << 30;

/// Keys as an Arrow column of `ty` (the key column's type).
pub fn keys_array(keys: &[crate::plan::Key], ty: &arrow::datatypes::DataType) -> Result<arrow::array::ArrayRef> {
    use crate::plan::Key;
    use arrow::array::{Int64Array, StringArray};
    if *ty == arrow::datatypes::DataType::Utf8 {
        return Ok(std::sync::Arc::new(keys.iter().map(|k| Some(k.to_string_lossless())).collect::<StringArray>()));
    }
    let ints: Int64Array = keys
        .iter()
        .map(|k| match k {
            Key::Int(v) => Ok(Some(*v)),
            Key::Str(s) => Err(anyhow::anyhow!("key {s:?} in a table with integer keys")),
        })
        .collect::<Result<_>>()?;
    Ok(arrow::compute::cast(&ints, ty)?)
}

/// The primary-key values of a batch (integer or string keys).
pub fn keys_of(batch: &RecordBatch, pk: &str) -> Result<Vec<crate::plan::Key>> {
    use crate::plan::Key;
    use arrow::array::AsArray;
    use arrow::datatypes::{DataType, Int16Type, Int32Type, Int64Type};
    let col = batch.column_by_name(pk).ok_or_else(|| anyhow::anyhow!("batch lacks primary key {pk}"))?;
    Ok(match col.data_type() {
        DataType::Int64 => col.as_primitive::<Int64Type>().values().iter().map(|v| Key::Int(*v)).collect(),
        DataType::Int32 => col.as_primitive::<Int32Type>().values().iter().map(|v| Key::Int(*v as i64)).collect(),
        DataType::Int16 => col.as_primitive::<Int16Type>().values().iter().map(|v| Key::Int(*v as i64)).collect(),
        DataType::Utf8 => col.as_string::<i32>().iter().map(|v| Key::Str(v.unwrap_or_default().to_string())).collect(),
        other => anyhow::bail!("primary key {pk} has type {other}; keys are integers or strings"),
    })
}
