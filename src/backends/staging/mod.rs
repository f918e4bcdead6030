//! Parquet staging area: a directory (or object-store prefix) any Parquet
//! reader understands.
//!
//! ```text
//! DIR/manifest.json              format version, job, table spec, plan (no secrets)
//! DIR/chunks/000017.parquet      zstd; vector column FixedSizeList<Float32>, BYTE_STREAM_SPLIT
//!                                (000017-<host>-<pid>.parquet when several workers share the job)
//! DIR/chunks/000017.commit.json  rows, bytes, sha256, content hash, file: the chunk exists only with it
//! DIR/work/                      claims and worker status of shared jobs (see claims.rs)
//! DIR/rejects/                   rows that failed validation, with the reason
//! ```

pub mod changes;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::contract::{ChunkWriter, Feedback, RowReject, Sink, SinkOptions, Source};
use crate::contract::commit::{CommitRecord, Ledger};
use crate::model::now_rfc3339;
use crate::model::plan::{ChunkRange, Key};
use crate::model::schema::TableSpec;
use crate::state::ledger::{FileLock, JobDir};
use crate::state::manifest::{Manifest, marker_key, read_markers, read_markers_into};
use crate::state::parquet::{ParquetFileWriter, writer_properties};
use crate::state::store::Store;

/// The chunk file's key: `chunks/000017.parquet`, or with a worker's name
/// when several workers may write the same chunk (the marker says which).
fn chunk_key(id: u32, writer: Option<&str>) -> String {
    match writer {
        Some(w) => format!("chunks/{id:06}-{w}.parquet"),
        None => format!("chunks/{id:06}.parquet"),
    }
}

/// The file a commit marker vouches for.
fn file_of(rec: &CommitRecord) -> String {
    match &rec.file {
        Some(f) => format!("chunks/{f}"),
        None => chunk_key(rec.chunk, None),
    }
}

/// Checks a chunk file against its commit marker (size and sha256) and
/// opens it.
pub fn check_chunk_file(store: &Store, rec: &CommitRecord) -> Result<fs::File> {
    store.open_verified(&file_of(rec), &format!("chunk {:06}", rec.chunk), rec.bytes, rec.sha256.as_deref())
}

/// Checks a local staged file against the size and sha256 its marker records.
pub fn check_file(path: &Path, name: &str, bytes: u64, sha256: Option<&str>) -> Result<fs::File> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file = path.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default();
    Store::open(&dir.to_string_lossy())?.open_verified(&file, name, bytes, sha256)
}

// ---------------------------------------------------------------- sink

pub struct StagingSink {
    pub(super) store: Store,
    spec: std::sync::Mutex<Option<TableSpec>>,
    /// Markers read so far (they never change once written).
    markers: std::sync::Mutex<Ledger>,
    /// Several workers may write this staging area: chunk files carry the
    /// writer's name and the first commit marker wins.
    shared: std::sync::atomic::AtomicBool,
}

impl StagingSink {
    pub fn new(store: Store) -> Self {
        StagingSink {
            store,
            spec: std::sync::Mutex::new(None),
            markers: std::sync::Mutex::new(Ledger::new()),
            shared: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The local directory (online change files need one).
    pub fn local_dir(&self) -> Result<&Path> {
        self.store
            .local_dir()
            .ok_or_else(|| anyhow!("online jobs stage change files in a local directory, not {}", self.store.describe()))
    }
}

impl Sink for StagingSink {
    fn describe(&self) -> String {
        format!("staging {}", self.store.describe())
    }

    /// The chunk files hold what the source gives; the manifest records the filter.
    fn restrict(&self, _filter: &crate::model::filter::Filter) -> Result<()> {
        Ok(())
    }

    /// One writer of a staging area at a time (`export`, `migrate --staging`);
    /// an `import` reading it meanwhile is welcome. Shared jobs take claims
    /// instead of this lock.
    fn lock_job(&self, job: &str, _fb: &dyn Feedback) -> Result<Box<dyn std::any::Any + Send>> {
        let dir = self.local_dir()?;
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Box::new(FileLock::acquire(&dir.join("export.lock"), job, &self.describe())?))
    }

    fn prepare(&self, source: &TableSpec, _plan: &[ChunkRange], opts: &SinkOptions) -> Result<TableSpec> {
        self.store.check_reachable()?;
        if let Some(dir) = self.store.local_dir() {
            fs::create_dir_all(JobDir::new(dir).chunks()).with_context(|| format!("creating {}", dir.display()))?;
        }
        self.shared.store(opts.shared, std::sync::atomic::Ordering::Relaxed);
        *self.spec.lock().unwrap() = Some(source.clone());
        Ok(source.clone())
    }

    fn committed(&self, _job: &str) -> Result<Ledger> {
        let mut known = self.markers.lock().unwrap();
        read_markers_into(&self.store, &mut known)?;
        Ok(known.clone())
    }

    fn begin_chunk(&self, _job: &str, chunk: &ChunkRange) -> Result<Box<dyn ChunkWriter>> {
        let spec = self.spec.lock().unwrap().clone().expect("prepare() before writing");
        let me = self.shared.load(std::sync::atomic::Ordering::Relaxed).then(crate::state::claims::worker_id);
        let key = chunk_key(chunk.id, me.as_deref());
        let file = ParquetFileWriter::create_in(&self.store, &key, spec.arrow_schema(), writer_properties(&spec)?)?;
        Ok(Box::new(StagingChunkWriter {
            store: self.store.clone(),
            file,
            key: me.map(|_| key.trim_start_matches("chunks/").to_string()),
        }))
    }

    fn finish(&self, _: &TableSpec, _: &[ChunkRange], _: &SinkOptions, _: &dyn Feedback) -> Result<()> {
        Ok(())
    }

    fn applied_position(&self, _job: &str) -> Result<Option<crate::contract::changes::AppliedPosition>> {
        Ok(changes::read_change_markers(self.local_dir()?)?.values().next_back().map(|m| crate::contract::changes::AppliedPosition {
            position: m.position,
            counts: m.total,
        }))
    }

    /// Writes the batch as the next change file (data, then its marker).
    fn apply_changes(&self, _job: &str, set: &crate::contract::changes::ChangeSet) -> Result<()> {
        let spec = self.spec.lock().unwrap().clone().expect("prepare() before writing");
        changes::write_change_file(self.local_dir()?, &spec, set)
    }
}

struct StagingChunkWriter {
    store: Store,
    file: ParquetFileWriter,
    /// The file's name when it carries its writer's (shared jobs).
    key: Option<String>,
}

impl ChunkWriter for StagingChunkWriter {
    fn write(&mut self, batch: &RecordBatch) -> Result<Vec<RowReject>> {
        self.file.write(batch)?;
        Ok(Vec::new())
    }

    /// The marker is written only if none exists: when two workers made the
    /// same chunk (a lease ran out), the first marker stands and the other
    /// file is removed.
    fn commit(self: Box<Self>, mut record: CommitRecord) -> Result<CommitRecord> {
        let (bytes, sha) = self.file.finish()?;
        record.bytes = bytes;
        record.sha256 = Some(sha);
        record.file = self.key.clone();
        record.committed_at = now_rfc3339();
        let marker = marker_key(record.chunk);
        if self.store.create(&marker, &serde_json::to_vec_pretty(&record)?)? {
            return Ok(record);
        }
        let theirs = self.store.get(&marker)?.ok_or_else(|| anyhow!("chunk {:06}: its commit marker vanished", record.chunk))?;
        let theirs: CommitRecord = serde_json::from_slice(&theirs.bytes)?;
        if file_of(&theirs) != file_of(&record) {
            self.store.delete(&file_of(&record))?;
        }
        Ok(theirs)
    }
}

// ---------------------------------------------------------------- source

pub struct StagingSource {
    store: Store,
    manifest: Manifest,
}

impl StagingSource {
    pub fn open(store: Store) -> Result<Self> {
        let manifest = Manifest::load(&store)?
            .ok_or_else(|| anyhow!("{} is not a staging area (no manifest.json)", store.describe()))?;
        Ok(StagingSource { store, manifest })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Chunks whose commit marker exists (export may still be running).
    pub fn ready_chunks(&self) -> Result<BTreeSet<u32>> {
        Ok(read_markers(&self.store)?.into_keys().collect())
    }
}

impl Source for StagingSource {
    fn describe(&self) -> String {
        format!("staging {} (exported from {})", self.store.describe(), self.manifest.source)
    }

    /// A staging area holds what its export read: it is this subset only
    /// when it was exported with the same filter.
    fn restrict(&self, filter: &crate::model::filter::Filter) -> Result<()> {
        let want = filter.describe();
        match &self.manifest.filter {
            Some(have) if *have == want => Ok(()),
            Some(have) => bail!("{} holds the subset {have}, not {want}", self.describe()),
            None => bail!("{} holds a whole table, not the subset {want}; export it with --filter", self.describe()),
        }
    }

    fn spec(&self) -> &TableSpec {
        &self.manifest.table
    }

    fn vectors_exact(&self) -> bool {
        self.manifest.vectors_exact
    }

    fn plan(&self, _chunk_rows: u64) -> Result<Vec<ChunkRange>> {
        Ok(self.manifest.plan.clone())
    }

    fn read_chunk(
        &self,
        chunk: &ChunkRange,
        batch_rows: usize,
        out: &mut dyn FnMut(RecordBatch) -> Result<()>,
    ) -> Result<()> {
        let rec: CommitRecord = match self.store.get(&marker_key(chunk.id))? {
            Some(obj) => serde_json::from_slice(&obj.bytes)
                .with_context(|| format!("chunk {:06}: commit marker is damaged", chunk.id))?,
            None => bail!("chunk {:06} has not been exported (no commit marker)", chunk.id),
        };
        let file = check_chunk_file(&self.store, &rec)?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .with_context(|| format!("chunk {:06}: not a readable Parquet file", chunk.id))?
            .with_batch_size(batch_rows)
            .build()?;
        for batch in reader {
            out(batch.with_context(|| format!("chunk {:06}: decoding", chunk.id))?)?;
        }
        Ok(())
    }

    /// The keys in `span` (one of the plan's chunks, or any range: then
    /// every chunk file is read and its keys filtered), ascending.
    fn read_ids(&self, span: &ChunkRange, out: &mut dyn FnMut(&[Key]) -> Result<()>) -> Result<()> {
        let pk = self.manifest.table.primary_key.clone();
        let own = self.manifest.plan.iter().find(|c| c.lo == span.lo && c.hi == span.hi && c.text == span.text);
        let chunks: Vec<&ChunkRange> = match own {
            Some(c) => vec![c],
            None => self.manifest.plan.iter().collect(),
        };
        // Chunks follow each other in key order: one chunk's keys sorted at a
        // time are the whole walk in order, in one chunk's memory.
        for c in chunks {
            let mut keys = Vec::new();
            self.read_chunk(c, 8_192, &mut |b| {
                keys.extend(crate::contract::changes::keys_of(&b, &pk)?.into_iter().filter(|k| span.contains(k)));
                Ok(())
            })?;
            keys.sort_unstable();
            if !keys.is_empty() {
                out(&keys)?;
            }
        }
        Ok(())
    }

    /// The rows with these keys, found by reading every chunk file.
    fn read_rows_by_id(&self, ids: &[Key], out: &mut dyn FnMut(RecordBatch) -> Result<()>) -> Result<()> {
        let pk = self.manifest.table.primary_key.clone();
        let wanted: std::collections::HashSet<&Key> = ids.iter().collect();
        for c in &self.manifest.plan {
            self.read_chunk(c, 8_192, &mut |b| {
                let keep: arrow::array::BooleanArray = crate::contract::changes::keys_of(&b, &pk)?.iter().map(|k| Some(wanted.contains(k))).collect();
                let rows = arrow::compute::filter_record_batch(&b, &keep)?;
                if rows.num_rows() > 0 {
                    out(rows)?;
                }
                Ok(())
            })?;
        }
        Ok(())
    }
}
