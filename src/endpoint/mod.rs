//! Endpoints: every backend is one module with a `Source` and a `Sink`.
//! Backends know nothing about each other or about threads; the pipeline
//! drives them from its own worker threads (blocking calls; database
//! backends run their async I/O on the shared tokio runtime).

pub mod pgcopy;
pub mod postgres;
pub mod staging;

use anyhow::Result;
use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};

use crate::ledger::{CommitRecord, Ledger};
use crate::plan::ChunkRange;
use crate::schema::TableSpec;

/// What to do with a target that already holds rows but has no ledger for this job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnExisting {
    /// Refuse to start (default).
    #[default]
    Fail,
    /// Keep existing rows; rows with the same primary key are replaced.
    Upsert,
    /// Empty the target table first.
    Truncate,
}

pub trait Source: Send + Sync {
    /// Human description without secrets.
    fn describe(&self) -> String;
    fn spec(&self) -> &TableSpec;
    /// Splits the primary-key space into chunks of about `chunk_rows` rows.
    fn plan(&self, chunk_rows: u64) -> Result<Vec<ChunkRange>>;
    /// Streams the rows of one chunk as batches of at most `batch_rows` rows,
    /// in the source's Arrow schema (`spec().arrow_schema()`).
    fn read_chunk(
        &self,
        chunk: &ChunkRange,
        batch_rows: usize,
        out: &mut dyn FnMut(RecordBatch) -> Result<()>,
    ) -> Result<()>;
}

/// Settings a sink needs at start.
#[derive(Clone, Debug)]
pub struct SinkOptions {
    pub job: String,
    pub on_existing: OnExisting,
    pub create_indexes: bool,
}

pub trait Sink: Send + Sync {
    fn describe(&self) -> String;
    /// Creates the target (table, ledger) if missing, checks guards, and
    /// returns the target table's spec (what rows must satisfy).
    fn prepare(&self, source: &TableSpec, plan: &[ChunkRange], opts: &SinkOptions) -> Result<TableSpec>;
    /// Chunks already committed for this job.
    fn committed(&self, job: &str) -> Result<Ledger>;
    /// Starts writing one chunk; nothing is visible until `commit`.
    fn begin_chunk(&self, job: &str, chunk: &ChunkRange) -> Result<Box<dyn ChunkWriter>>;
    /// After all chunks: indexes, sequences, final guards.
    fn finish(&self, source: &TableSpec, plan: &[ChunkRange], opts: &SinkOptions, progress: &dyn Fn(&str)) -> Result<()>;
}

pub trait ChunkWriter: Send {
    fn write(&mut self, batch: &RecordBatch) -> Result<()>;
    /// Makes the chunk durable together with its ledger record; returns the
    /// record as stored (a sink may add bytes and checksums).
    fn commit(self: Box<Self>, record: CommitRecord) -> Result<CommitRecord>;
}
