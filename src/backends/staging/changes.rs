//! Change files of an online job in the staging area, so the online path
//! also crosses hosts and air gaps:
//!
//! ```text
//! DIR/changes/0000000001.parquet      one applied batch: op, unchanged, then the table's columns
//! DIR/changes/0000000001.commit.json  positions it covers, counts, bytes, sha256: the file exists only with it
//! DIR/changes/end.json                written by the export's cutover: last file, source digests
//! ```
//!
//! `op` is `upsert` (a final image with every column), `update` (only some
//! columns changed: `unchanged` lists the others, comma-separated, which are
//! NULL here and must be left as they are) or `delete` (only the key). Rows
//! of one file are already collapsed per key; files apply in number order.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use arrow::array::{ArrayRef, AsArray, BooleanArray, StringArray, new_null_array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};

use crate::backends::staging::check_file;
use crate::contract::changes::{ChangeCounts, ChangeSet, ChangeStream, StreamBatch, StreamStats, keys_of};
use crate::model::now_rfc3339;
use crate::model::hash::ChunkDigest;
use crate::model::plan::ChunkRange;
use crate::model::schema::TableSpec;
use crate::state::files::write_atomic;
use crate::state::parquet::{ParquetFileWriter, writer_properties_for};

/// One committed change file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChangeMarker {
    pub file: u64,
    /// Source positions covered: after `from_position`, up to `position`.
    pub from_position: u64,
    pub position: u64,
    pub rows: u64,
    /// Changes in this file, as the source made them (before collapsing).
    pub counts: ChangeCounts,
    /// Changes in this file and all before it.
    pub total: ChangeCounts,
    #[serde(default)]
    pub commit_time_us: Option<i64>,
    pub bytes: u64,
    pub sha256: String,
    pub committed_at: String,
}

/// Written by the export's cutover: the stream ends with `last_file`; the
/// source's per-chunk digests let the import's cutover verify its target.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EndMarker {
    pub last_file: u64,
    pub source_rows: u64,
    pub plan: Vec<ChunkRange>,
    /// Digests by comparison mode (see `verify::Normalise::key`).
    pub digests: BTreeMap<String, Vec<ChunkDigest>>,
    pub written_at: String,
}

pub fn changes_dir(dir: &Path) -> PathBuf {
    dir.join("changes")
}

fn file_path(dir: &Path, n: u64) -> PathBuf {
    changes_dir(dir).join(format!("{n:010}.parquet"))
}

fn marker_path(dir: &Path, n: u64) -> PathBuf {
    changes_dir(dir).join(format!("{n:010}.commit.json"))
}

pub fn end_path(dir: &Path) -> PathBuf {
    changes_dir(dir).join("end.json")
}

pub fn read_end(dir: &Path) -> Result<Option<EndMarker>> {
    match fs::read(end_path(dir)) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b).context("changes/end.json is damaged")?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub fn write_end(dir: &Path, end: &EndMarker) -> Result<()> {
    fs::create_dir_all(changes_dir(dir))?;
    write_atomic(&end_path(dir), &serde_json::to_vec_pretty(end)?)
}

/// Every committed change file's marker, by number.
pub fn read_change_markers(dir: &Path) -> Result<BTreeMap<u64, ChangeMarker>> {
    let mut out = BTreeMap::new();
    let d = changes_dir(dir);
    if !d.exists() {
        return Ok(out);
    }
    for entry in fs::read_dir(&d)? {
        let path = entry?.path();
        if path.to_string_lossy().ends_with(".commit.json") {
            let m: ChangeMarker = serde_json::from_slice(&fs::read(&path)?)
                .with_context(|| format!("change marker {} is damaged", path.display()))?;
            out.insert(m.file, m);
        }
    }
    Ok(out)
}

/// The change file schema: `op`, `unchanged`, then the table's columns, all nullable.
fn change_schema(spec: &TableSpec) -> SchemaRef {
    let mut fields = vec![Field::new("op", DataType::Utf8, false), Field::new("unchanged", DataType::Utf8, true)];
    fields.extend(spec.arrow_schema().fields().iter().map(|f| f.as_ref().clone().with_nullable(true)));
    Arc::new(Schema::new(fields))
}

/// `batch` (some of the table's columns) as rows of the change schema.
fn as_change_rows(spec: &TableSpec, schema: &SchemaRef, op: &str, batch: &RecordBatch) -> Result<RecordBatch> {
    let n = batch.num_rows();
    let missing: Vec<&str> =
        spec.columns.iter().filter(|c| batch.column_by_name(&c.name).is_none()).map(|c| c.name.as_str()).collect();
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec![op; n])),
        Arc::new(StringArray::from(vec![(!missing.is_empty()).then(|| missing.join(",")); n])),
    ];
    for f in schema.fields().iter().skip(2) {
        cols.push(match batch.column_by_name(f.name()) {
            Some(c) => c.clone(),
            None => new_null_array(f.data_type(), n),
        });
    }
    Ok(RecordBatch::try_new(schema.clone(), cols)?)
}

/// Writes a change set as the next change file, then its marker.
pub fn write_change_file(dir: &Path, spec: &TableSpec, set: &ChangeSet) -> Result<()> {
    let markers = read_change_markers(dir)?;
    let last = markers.values().next_back();
    let n = last.map(|m| m.file + 1).unwrap_or(1);
    let schema = change_schema(spec);
    fs::create_dir_all(changes_dir(dir))?;
    let mut w = ParquetFileWriter::create(file_path(dir, n), schema.clone(), writer_properties_for(spec, &schema)?)?;
    let mut rows = 0u64;
    if !set.deletes.is_empty() {
        let pk_ty = spec.arrow_schema().field_with_name(&spec.primary_key)?.data_type().clone();
        let keys = crate::contract::changes::keys_array(&set.deletes, &pk_ty)?;
        let b = RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new(&spec.primary_key, pk_ty, false)])),
            vec![keys],
        )?;
        w.write(&as_change_rows(spec, &schema, "delete", &b)?)?;
        rows += b.num_rows() as u64;
    }
    for (op, batches) in [("upsert", &set.images), ("update", &set.partial)] {
        for b in batches.iter().filter(|b| b.num_rows() > 0) {
            w.write(&as_change_rows(spec, &schema, op, b)?)?;
            rows += b.num_rows() as u64;
        }
    }
    let (bytes, sha256) = w.finish()?;
    let mut total = last.map(|m| m.total).unwrap_or_default();
    total.add(&set.counts);
    let marker = ChangeMarker {
        file: n,
        from_position: last.map(|m| m.position).unwrap_or(0),
        position: set.position,
        rows,
        counts: set.counts,
        total,
        commit_time_us: set.commit_time_us,
        bytes,
        sha256,
        committed_at: now_rfc3339(),
    };
    write_atomic(&marker_path(dir, n), &serde_json::to_vec_pretty(&marker)?)
}

/// Reads a committed change file (checked against its marker) as a change set.
pub fn read_change_file(dir: &Path, spec: &TableSpec, m: &ChangeMarker) -> Result<ChangeSet> {
    let name = format!("change file {:010}", m.file);
    let path = file_path(dir, m.file);
    let file = check_file(&path, &name, m.bytes, Some(&m.sha256))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{name}: not a readable Parquet file"))?
        .build()?;
    let mut set = ChangeSet { position: m.position, commit_time_us: m.commit_time_us, counts: m.counts, ..Default::default() };
    let table = spec.arrow_schema();
    for batch in reader {
        let batch = batch.with_context(|| format!("{name}: decoding"))?;
        let op = batch.column_by_name("op").ok_or_else(|| anyhow!("{name} has no op column"))?.as_string::<i32>().clone();
        let unchanged = batch.column_by_name("unchanged").ok_or_else(|| anyhow!("{name} has no unchanged column"))?.as_string::<i32>().clone();
        let rows_where = |want: &dyn Fn(usize) -> bool| -> Result<RecordBatch> {
            let mask = BooleanArray::from((0..batch.num_rows()).map(want).collect::<Vec<_>>());
            Ok(arrow::compute::filter_record_batch(&batch, &mask)?)
        };
        let deletes = rows_where(&|i| op.value(i) == "delete")?;
        set.deletes.extend(keys_of(&deletes, &spec.primary_key)?);
        let upserts = rows_where(&|i| op.value(i) == "upsert")?;
        if upserts.num_rows() > 0 {
            let cols = table.fields().iter().map(|f| upserts.column_by_name(f.name()).unwrap().clone()).collect();
            set.images.push(RecordBatch::try_new(table.clone(), cols).with_context(|| format!("{name}: an upsert lacks a value"))?);
        }
        let mut shapes: Vec<&str> = (0..batch.num_rows()).filter(|&i| op.value(i) == "update").map(|i| unchanged.value(i)).collect();
        shapes.sort_unstable();
        shapes.dedup();
        for shape in shapes {
            let left: Vec<&str> = shape.split(',').collect();
            let rows = rows_where(&|i| op.value(i) == "update" && unchanged.value(i) == shape)?;
            let fields: Vec<_> = table.fields().iter().filter(|f| !left.contains(&f.name().as_str())).cloned().collect();
            let cols = fields.iter().map(|f| rows.column_by_name(f.name()).unwrap().clone()).collect();
            set.partial.push(RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)?);
        }
    }
    Ok(set)
}

/// The change stream of an `import --online`: the export's change files, in
/// order; positions are file numbers.
pub struct StagingChangeStream {
    dir: PathBuf,
    spec: TableSpec,
    confirmed: u64,
    markers: BTreeMap<u64, ChangeMarker>,
}

impl StagingChangeStream {
    pub fn open(dir: PathBuf, spec: TableSpec) -> Self {
        StagingChangeStream { dir, spec, confirmed: 0, markers: BTreeMap::new() }
    }

    fn refresh(&mut self) -> Result<()> {
        self.markers = read_change_markers(&self.dir)?;
        Ok(())
    }
}

impl ChangeStream for StagingChangeStream {
    fn artifacts(&self) -> String {
        format!("change files in {}", changes_dir(&self.dir).display())
    }

    fn format_position(&self, p: u64) -> String {
        format!("change file {p}")
    }

    fn current_position(&mut self) -> Result<u64> {
        self.refresh()?;
        Ok(self.markers.keys().next_back().copied().unwrap_or(0).max(self.confirmed))
    }

    fn ends_at(&mut self) -> Result<Option<u64>> {
        Ok(read_end(&self.dir)?.map(|e| e.last_file))
    }

    fn skip_to(&mut self, position: u64) -> Result<()> {
        self.confirmed = self.confirmed.max(position);
        Ok(())
    }

    fn next_batch(&mut self, _max_changes: usize, upto: u64) -> Result<StreamBatch> {
        let next = self.confirmed + 1;
        if next > upto {
            return Ok(StreamBatch { set: ChangeSet { position: self.confirmed, ..Default::default() }, drained_to: Some(self.confirmed) });
        }
        if !self.markers.contains_key(&next) {
            self.refresh()?;
        }
        let m = self
            .markers
            .get(&next)
            .ok_or_else(|| anyhow!("change file {next:010} is missing from {} (files must be copied in order)", self.dir.display()))?
            .clone();
        let mut set = read_change_file(&self.dir, &self.spec, &m)?;
        set.position = m.file;
        Ok(StreamBatch { set, drained_to: Some(next) })
    }

    fn confirm(&mut self, position: u64) -> Result<()> {
        self.confirmed = self.confirmed.max(position);
        Ok(())
    }

    fn stats(&mut self) -> Result<StreamStats> {
        let last = self.current_position()?;
        let retained = self.markers.range(self.confirmed + 1..).map(|(_, m)| m.bytes).sum();
        Ok(StreamStats { source_position: last, confirmed: self.confirmed, retained_bytes: retained, ..Default::default() })
    }

    fn drop_artifacts(&mut self) -> Result<()> {
        Ok(()) // the files stay: the staging area is the user's
    }

    fn removes_artifacts(&self) -> bool {
        false
    }
}

/// Per chunk (rows, digest) of the export's source against the import's
/// target: the chunks that differ.
pub fn compare_digests<'w>(want: &'w [ChunkDigest], got: &[ChunkDigest]) -> Vec<(&'w ChunkDigest, String)> {
    let got: HashMap<u32, &ChunkDigest> = got.iter().map(|d| (d.chunk, d)).collect();
    want.iter()
        .filter_map(|w| match got.get(&w.chunk) {
            Some(g) if g.rows == w.rows && g.digest == w.digest => None,
            Some(g) => Some((w, format!("chunk {} {}: source {} rows, target {} rows{}", w.chunk, crate::model::plan::describe_bounds(w.lo, w.hi, w.text.as_ref()), w.rows, g.rows,
                if g.rows == w.rows { ", values differ" } else { "" }))),
            None => Some((w, format!("chunk {}: not read on the target", w.chunk))),
        })
        .collect()
}

