//! Parquet staging area: a directory any Parquet reader understands.
//!
//! ```text
//! DIR/manifest.json              format version, job, table spec, plan (no secrets)
//! DIR/chunks/000017.parquet      zstd; vector column FixedSizeList<Float32>, BYTE_STREAM_SPLIT
//! DIR/chunks/000017.commit.json  rows, bytes, sha256, content hash: the chunk exists only with it
//! DIR/rejects/                   rows that failed validation, with the reason
//! ```

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{ChunkWriter, Feedback, RowReject, Sink, SinkOptions, Source};
pub mod changes;

use crate::ledger::{CommitRecord, FileLock, JobDir, Ledger, now_rfc3339, sync_dir, write_atomic};
use crate::plan::ChunkRange;
use crate::schema::TableSpec;

pub const FORMAT_VERSION: u32 = 1;
const ROW_GROUP_ROWS: usize = 4096;

/// The job's description, written once when the job is planned.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub job: String,
    pub created_at: String,
    /// Where the rows came from (no credentials).
    pub source: String,
    pub table: TableSpec,
    pub chunk_rows: u64,
    pub plan: Vec<ChunkRange>,
    /// How vectors are stored in chunk files.
    pub vector_encoding: String,
    /// True when vectors are bit-exact copies of the source's storage.
    pub vectors_exact: bool,
}

impl Manifest {
    pub fn load(dir: &Path) -> Result<Option<Manifest>> {
        let path = JobDir::new(dir).manifest();
        if !path.exists() {
            return Ok(None);
        }
        let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let m: Manifest = serde_json::from_str(&text).with_context(|| format!("{} is not a vmig manifest", path.display()))?;
        if m.format_version > FORMAT_VERSION {
            bail!("{}: format version {} is newer than this vmig understands ({FORMAT_VERSION})", path.display(), m.format_version);
        }
        Ok(Some(m))
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        write_atomic(&JobDir::new(dir).manifest(), &serde_json::to_vec_pretty(self)?)
    }
}

fn chunk_path(dir: &Path, id: u32) -> PathBuf {
    JobDir::new(dir).chunks().join(format!("{id:06}.parquet"))
}

fn marker_path(dir: &Path, id: u32) -> PathBuf {
    JobDir::new(dir).chunks().join(format!("{id:06}.commit.json"))
}

/// Reads every commit marker in `dir`.
pub fn read_markers(dir: &Path) -> Result<Ledger> {
    let mut ledger = Ledger::new();
    let chunks = JobDir::new(dir).chunks();
    if !chunks.exists() {
        return Ok(ledger);
    }
    for entry in fs::read_dir(&chunks)? {
        let path = entry?.path();
        if path.to_string_lossy().ends_with(".commit.json") {
            let rec: CommitRecord = serde_json::from_slice(&fs::read(&path)?)
                .with_context(|| format!("commit marker {} is damaged", path.display()))?;
            ledger.insert(rec.chunk, rec);
        }
    }
    Ok(ledger)
}

/// Checks a chunk file against its commit marker (size and sha256).
pub fn check_chunk_file(dir: &Path, rec: &CommitRecord) -> Result<()> {
    check_file(&chunk_path(dir, rec.chunk), &format!("chunk {:06}", rec.chunk), rec.bytes, rec.sha256.as_deref())
}

/// Checks a staged file against the size and sha256 its marker records.
pub fn check_file(path: &Path, name: &str, bytes: u64, sha256: Option<&str>) -> Result<()> {
    let mut f = fs::File::open(path).map_err(|e| anyhow!("{name}: cannot open {}: {e}", path.display()))?;
    let len = f.metadata()?.len();
    if len != bytes {
        bail!("{name}: file is {len} bytes, its commit marker says {bytes} (truncated or altered); refusing it");
    }
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let got = hex::encode(h.finalize());
    if Some(got.as_str()) != sha256 {
        bail!("{name}: sha256 of the file does not match its commit marker (file altered or damaged); refusing it");
    }
    Ok(())
}

/// Writer properties: zstd, vector leaf BYTE_STREAM_SPLIT without dictionary.
pub fn writer_properties(spec: &TableSpec) -> Result<WriterProperties> {
    writer_properties_for(spec, &spec.arrow_schema())
}

/// Writer properties for a file of `schema` whose columns include `spec`'s.
pub fn writer_properties_for(spec: &TableSpec, schema: &arrow::datatypes::Schema) -> Result<WriterProperties> {
    let mut b = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3)?))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS));
    let parquet_schema = parquet::arrow::ArrowSchemaConverter::new().convert(schema)?;
    for col in parquet_schema.columns() {
        let path = col.path();
        if spec.column(&path.parts()[0]).is_some_and(|c| c.ty.is_vector()) {
            b = b
                .set_column_dictionary_enabled(ColumnPath::new(path.parts().to_vec()), false)
                .set_column_encoding(ColumnPath::new(path.parts().to_vec()), Encoding::BYTE_STREAM_SPLIT);
        }
    }
    Ok(b.build())
}

/// Counts and hashes what passes through to the file.
struct HashingWriter {
    file: fs::File,
    sha: Sha256,
    bytes: u64,
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.sha.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Writes Parquet files of `spec`'s schema (chunks and rejects).
pub struct ParquetFileWriter {
    tmp: PathBuf,
    dest: PathBuf,
    writer: ArrowWriter<HashingWriter>,
}

impl ParquetFileWriter {
    pub fn create(dest: PathBuf, schema: arrow::datatypes::SchemaRef, props: WriterProperties) -> Result<Self> {
        let tmp = dest.with_extension("parquet.tmp");
        let file = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let writer = ArrowWriter::try_new(HashingWriter { file, sha: Sha256::new(), bytes: 0 }, schema, Some(props))?;
        Ok(ParquetFileWriter { tmp, dest, writer })
    }

    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        self.writer.write(batch).with_context(|| format!("writing {}", self.tmp.display()))
    }

    /// Finishes the file durably under its final name; returns (bytes, sha256).
    pub fn finish(self) -> Result<(u64, String)> {
        let mut inner = self.writer.into_inner()?;
        inner.flush()?;
        inner.file.sync_all()?;
        fs::rename(&self.tmp, &self.dest)?;
        sync_dir(self.dest.parent().unwrap())?;
        Ok((inner.bytes, hex::encode(inner.sha.finalize())))
    }
}

// ---------------------------------------------------------------- sink

pub struct StagingSink {
    pub(super) dir: PathBuf,
    spec: std::sync::Mutex<Option<TableSpec>>,
}

impl StagingSink {
    pub fn new(dir: PathBuf) -> Self {
        StagingSink { dir, spec: std::sync::Mutex::new(None) }
    }
}

impl Sink for StagingSink {
    fn describe(&self) -> String {
        format!("staging {}", self.dir.display())
    }

    /// One writer of a staging area at a time (`export`, `migrate --staging`);
    /// an `import` reading it meanwhile is welcome.
    fn lock_job(&self, job: &str, _fb: &dyn Feedback) -> Result<Box<dyn std::any::Any + Send>> {
        fs::create_dir_all(&self.dir).with_context(|| format!("creating {}", self.dir.display()))?;
        Ok(Box::new(FileLock::acquire(&self.dir.join("export.lock"), job, &self.describe())?))
    }

    fn prepare(&self, source: &TableSpec, _plan: &[ChunkRange], _opts: &SinkOptions) -> Result<TableSpec> {
        fs::create_dir_all(JobDir::new(&self.dir).chunks())
            .with_context(|| format!("creating {}", self.dir.display()))?;
        *self.spec.lock().unwrap() = Some(source.clone());
        Ok(source.clone())
    }

    fn committed(&self, _job: &str) -> Result<Ledger> {
        read_markers(&self.dir)
    }

    fn begin_chunk(&self, _job: &str, chunk: &ChunkRange) -> Result<Box<dyn ChunkWriter>> {
        let spec = self.spec.lock().unwrap().clone().expect("prepare() before writing");
        let file = ParquetFileWriter::create(chunk_path(&self.dir, chunk.id), spec.arrow_schema(), writer_properties(&spec)?)?;
        Ok(Box::new(StagingChunkWriter { dir: self.dir.clone(), file }))
    }

    fn finish(&self, _: &TableSpec, _: &[ChunkRange], _: &SinkOptions, _: &dyn Feedback) -> Result<()> {
        Ok(())
    }

    fn applied_position(&self, _job: &str) -> Result<Option<crate::online::AppliedPosition>> {
        Ok(changes::read_change_markers(&self.dir)?.values().next_back().map(|m| crate::online::AppliedPosition {
            position: m.position,
            counts: m.total,
        }))
    }

    /// Writes the batch as the next change file (data, then its marker).
    fn apply_changes(&self, _job: &str, set: &crate::online::ChangeSet) -> Result<()> {
        let spec = self.spec.lock().unwrap().clone().expect("prepare() before writing");
        changes::write_change_file(&self.dir, &spec, set)
    }
}

struct StagingChunkWriter {
    dir: PathBuf,
    file: ParquetFileWriter,
}

impl ChunkWriter for StagingChunkWriter {
    fn write(&mut self, batch: &RecordBatch) -> Result<Vec<RowReject>> {
        self.file.write(batch)?;
        Ok(Vec::new())
    }

    fn commit(self: Box<Self>, mut record: CommitRecord) -> Result<CommitRecord> {
        let (bytes, sha) = self.file.finish()?;
        record.bytes = bytes;
        record.sha256 = Some(sha);
        record.committed_at = now_rfc3339();
        write_atomic(&marker_path(&self.dir, record.chunk), &serde_json::to_vec_pretty(&record)?)?;
        Ok(record)
    }
}

// ---------------------------------------------------------------- source

pub struct StagingSource {
    dir: PathBuf,
    manifest: Manifest,
}

impl StagingSource {
    pub fn open(dir: PathBuf) -> Result<Self> {
        let manifest = Manifest::load(&dir)?
            .ok_or_else(|| anyhow!("{} is not a staging directory (no manifest.json)", dir.display()))?;
        Ok(StagingSource { dir, manifest })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Chunks whose commit marker exists (export may still be running).
    pub fn ready_chunks(&self) -> Result<BTreeSet<u32>> {
        Ok(read_markers(&self.dir)?.into_keys().collect())
    }
}

impl Source for StagingSource {
    fn describe(&self) -> String {
        format!("staging {} (exported from {})", self.dir.display(), self.manifest.source)
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
        let marker = marker_path(&self.dir, chunk.id);
        let rec: CommitRecord = match fs::read(&marker) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("chunk {:06}: commit marker is damaged", chunk.id))?,
            Err(_) => bail!("chunk {:06} has not been exported (no commit marker)", chunk.id),
        };
        check_chunk_file(&self.dir, &rec)?;
        let file = fs::File::open(chunk_path(&self.dir, chunk.id))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .with_context(|| format!("chunk {:06}: not a readable Parquet file", chunk.id))?
            .with_batch_size(batch_rows)
            .build()?;
        for batch in reader {
            out(batch.with_context(|| format!("chunk {:06}: decoding", chunk.id))?)?;
        }
        Ok(())
    }
}
