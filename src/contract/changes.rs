//! Changes as every source produces and every target applies them: counts,
//! collapsed change sets with the position they reach, the change-stream
//! trait, and the keys of a batch.

use anyhow::Result;
use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};

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
    pub deletes: Vec<crate::model::plan::Key>,
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

/// Keys as an Arrow column of `ty` (the key column's type).
pub fn keys_array(keys: &[crate::model::plan::Key], ty: &arrow::datatypes::DataType) -> Result<arrow::array::ArrayRef> {
    use crate::model::plan::Key;
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
pub fn keys_of(batch: &RecordBatch, pk: &str) -> Result<Vec<crate::model::plan::Key>> {
    use crate::model::plan::Key;
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
