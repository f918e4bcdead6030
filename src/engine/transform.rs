//! Transform stage: checks every row against the target's rules, casts it to
//! the target's Arrow schema, and routes bad rows to rejects with a reason.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Result, anyhow};
use arrow::array::{
    Array, ArrayRef, AsArray, FixedSizeListArray, Float32Array, Int64Array, ListArray, StringArray, UInt32Array,
};
use arrow::buffer::OffsetBuffer;
use arrow::compute::take;
use arrow::datatypes::{DataType, Field, Int16Type, Int32Type, Int64Type, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;

use crate::model::schema::{ColumnType, TableSpec, vector_item_field};
use crate::model::vector::vector_values;
use crate::state::parquet::ParquetFileWriter;

/// Largest finite halfvec value.
const F16_MAX: f32 = 65504.0;

/// Splits batches into rows the target accepts and rejected rows.
pub struct Transformer {
    target: TableSpec,
    target_schema: SchemaRef,
}

pub struct Transformed {
    pub valid: RecordBatch,
    /// Rejected rows (rejects schema: chunk, reason, then the source columns).
    pub rejects: Option<RecordBatch>,
}

impl Transformer {
    pub fn new(target: &TableSpec) -> Self {
        Transformer { target: target.clone(), target_schema: target.arrow_schema() }
    }

    /// Checks one row; `None` when it is fine, else the reason.
    fn check_row(&self, batch: &RecordBatch, row: usize) -> Option<String> {
        for col in &self.target.columns {
            let arr = batch.column_by_name(&col.name)?;
            if arr.is_null(row) {
                if col.ty.is_vector() {
                    return Some(format!("vector column {} is NULL", col.name));
                }
                if !col.nullable {
                    return Some(format!("column {} is NULL but the target requires a value", col.name));
                }
                continue;
            }
            match &col.ty {
                ColumnType::Vector { dim } | ColumnType::HalfVec { dim } => {
                    let v = vector_values(arr, row);
                    if v.len() != *dim as usize {
                        return Some(format!(
                            "vector column {} has {} dimensions, the target expects {dim}",
                            col.name,
                            v.len()
                        ));
                    }
                    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                        return Some(format!("vector column {} has {} at position {i}", col.name, v[i]));
                    }
                    if matches!(col.ty, ColumnType::HalfVec { .. }) {
                        if let Some(i) = v.iter().position(|x| x.abs() > F16_MAX) {
                            return Some(format!(
                                "vector column {}: {} at position {i} is outside halfvec's range",
                                col.name, v[i]
                            ));
                        }
                    }
                }
                ColumnType::Uuid => {
                    let s = arr.as_string::<i32>().value(row);
                    if crate::contract::columns::parse_uuid(s).is_none() {
                        return Some(format!("column {} is {s:?}, not a UUID in canonical form (lowercase, hyphenated)", col.name));
                    }
                }
                ColumnType::Text { max_chars: Some(max) } => {
                    let s = arr.as_string::<i32>().value(row);
                    let n = s.chars().count();
                    if n > *max as usize {
                        return Some(format!("column {} has {n} characters, the target allows {max}", col.name));
                    }
                }
                ColumnType::Int16 | ColumnType::Int32 => {
                    let v = match arr.data_type() {
                        DataType::Int64 => arr.as_primitive::<Int64Type>().value(row),
                        DataType::Int32 => arr.as_primitive::<Int32Type>().value(row) as i64,
                        _ => arr.as_primitive::<Int16Type>().value(row) as i64,
                    };
                    let fits = if col.ty == ColumnType::Int16 { i16::try_from(v).is_ok() } else { i32::try_from(v).is_ok() };
                    if !fits {
                        return Some(format!("column {} value {v} does not fit the target's {:?}", col.name, col.ty));
                    }
                }
                _ => {}
            }
        }
        None
    }

    pub fn apply(&self, chunk: u32, batch: &RecordBatch) -> Result<Transformed> {
        let mut keep = Vec::with_capacity(batch.num_rows());
        let mut bad = Vec::new();
        let mut reasons = Vec::new();
        for row in 0..batch.num_rows() {
            match self.check_row(batch, row) {
                None => keep.push(row as u32),
                Some(r) => {
                    bad.push(row as u32);
                    reasons.push(r);
                }
            }
        }
        let valid = if bad.is_empty() {
            self.cast(batch)?
        } else {
            self.cast(&take_rows(batch, &keep)?)?
        };
        let rejects = if bad.is_empty() { None } else { Some(reject_batch(chunk, batch, &bad, reasons)?) };
        Ok(Transformed { valid, rejects })
    }

    /// Reorders, renames and retypes columns into the target's Arrow schema.
    fn cast(&self, batch: &RecordBatch) -> Result<RecordBatch> {
        let mut cols = Vec::with_capacity(self.target.columns.len());
        for (col, field) in self.target.columns.iter().zip(self.target_schema.fields()) {
            let arr = batch
                .column_by_name(&col.name)
                .ok_or_else(|| anyhow!("source rows have no column {}", col.name))?;
            let arr = if arr.data_type() == field.data_type() {
                arr.clone()
            } else {
                match (&col.ty, arr.data_type()) {
                    (t, DataType::List(_)) if t.is_vector() => Arc::new(list_to_fixed(arr, t.vector_dim().unwrap())),
                    _ => arrow::compute::cast(arr, field.data_type())?,
                }
            };
            cols.push(arr);
        }
        Ok(RecordBatch::try_new(self.target_schema.clone(), cols)?)
    }
}

fn take_rows(batch: &RecordBatch, rows: &[u32]) -> Result<RecordBatch> {
    let idx = UInt32Array::from(rows.to_vec());
    let cols = batch.columns().iter().map(|c| take(c, &idx, None)).collect::<Result<Vec<_>, _>>()?;
    Ok(RecordBatch::try_new(batch.schema(), cols)?)
}

/// List<Float32> whose rows all have `dim` values (checked) -> FixedSizeList.
fn list_to_fixed(arr: &ArrayRef, dim: u32) -> FixedSizeListArray {
    let mut values = Vec::with_capacity(arr.len() * dim as usize);
    for row in 0..arr.len() {
        values.extend_from_slice(vector_values(arr, row));
    }
    FixedSizeListArray::new(vector_item_field(), dim as i32, Arc::new(Float32Array::from(values)), None)
}

/// Vector column as a List (any length, nulls allowed), for reject files.
fn vector_as_list(arr: &ArrayRef) -> ArrayRef {
    if matches!(arr.data_type(), DataType::List(_)) {
        return arr.clone();
    }
    let mut values = Vec::new();
    let mut offsets = vec![0i32];
    for row in 0..arr.len() {
        if arr.is_valid(row) {
            values.extend_from_slice(vector_values(arr, row));
        }
        offsets.push(values.len() as i32);
    }
    Arc::new(ListArray::new(
        vector_item_field(),
        OffsetBuffer::new(offsets.into()),
        Arc::new(Float32Array::from(values)),
        arr.nulls().cloned(),
    ))
}

/// Rejected rows with their chunk and reason, vectors as List<Float32>.
pub fn reject_batch(chunk: u32, batch: &RecordBatch, rows: &[u32], reasons: Vec<String>) -> Result<RecordBatch> {
    let picked = take_rows(batch, rows)?;
    let mut fields = vec![Field::new("vmig_chunk", DataType::Int64, false), Field::new("vmig_reason", DataType::Utf8, false)];
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(vec![chunk as i64; rows.len()])),
        Arc::new(StringArray::from(reasons)),
    ];
    for (f, c) in picked.schema().fields().iter().zip(picked.columns()) {
        let c = match c.data_type() {
            DataType::FixedSizeList(_, _) | DataType::List(_) => vector_as_list(c),
            _ => c.clone(),
        };
        fields.push(Field::new(f.name(), c.data_type().clone(), true));
        cols.push(c);
    }
    Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)?)
}

/// Writes one chunk's rejected rows to `rejects/<stage>-<chunk>.parquet`.
pub fn write_rejects(dir: &Path, stage: &str, chunk: u32, batches: &[RecordBatch]) -> Result<()> {
    let Some(first) = batches.first() else { return Ok(()) };
    std::fs::create_dir_all(dir)?;
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
        .build();
    let mut w = ParquetFileWriter::create(dir.join(format!("{stage}-{chunk:06}.parquet")), first.schema(), props)?;
    for b in batches {
        w.write(b)?;
    }
    w.finish()?;
    Ok(())
}
