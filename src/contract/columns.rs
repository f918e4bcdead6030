//! Column builders shared by the decoders that turn a database's rows into
//! Arrow batches (PostgreSQL binary COPY, OceanBase text rows).

use std::sync::Arc;

use anyhow::Result;
use arrow::array::{
    ArrayRef, BooleanBuilder, FixedSizeListArray, Float32Array, Float32Builder, Float64Builder, Int16Builder,
    Int32Builder, Int64Builder, ListArray, StringBuilder, TimestampMicrosecondArray,
};
use arrow::buffer::{NullBuffer, OffsetBuffer};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;

use crate::model::schema::{ColumnType, vector_item_field};

/// A UUID's 16 bytes in canonical form: lowercase, hyphenated (36 characters).
pub fn format_uuid(b: &[u8; 16]) -> String {
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

/// The 16 bytes of a UUID in canonical form (lowercase, hyphenated); None
/// for anything else, so that every UUID has one spelling on every side.
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
        return None;
    }
    let digits: Vec<u8> = b.iter().enumerate().filter(|(i, _)| ![8, 13, 18, 23].contains(i)).map(|(_, c)| *c).collect();
    let mut out = [0u8; 16];
    for (i, pair) in digits.chunks(2).enumerate() {
        let nibble = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

pub enum ColBuilder {
    I16(Int16Builder),
    I32(Int32Builder),
    I64(Int64Builder),
    F32(Float32Builder),
    F64(Float64Builder),
    Bool(BooleanBuilder),
    /// `jsonb`: PostgreSQL's binary jsonb carries a version byte first.
    Text { b: StringBuilder, jsonb: bool },
    /// UUIDs: 16 bytes from PostgreSQL's binary form, text from OceanBase.
    Uuid(StringBuilder),
    Ts(Vec<i64>, Vec<bool>),
    /// Vector column; `fixed` = the catalog declares the dimension, so every
    /// row has it and the column is a FixedSizeList, else a List.
    Vector { dim: usize, fixed: bool, half: bool, values: Vec<f32>, offsets: Vec<i32>, valid: Vec<bool> },
}

impl ColBuilder {
    /// Appends one vector; the caller checks the dimension. Generic, so
    /// that the copy of a row's floats compiles to one loop per source form
    /// (a dynamic iterator cost a call per float).
    pub fn push_vector(&mut self, v: impl IntoIterator<Item = f32>) {
        let ColBuilder::Vector { values, offsets, valid, .. } = self else {
            unreachable!("push_vector on a non-vector column")
        };
        values.extend(v);
        valid.push(true);
        offsets.push(values.len() as i32);
    }

    /// Appends a NULL vector (zeros where the column has a fixed dimension).
    pub fn push_null_vector(&mut self) {
        let ColBuilder::Vector { dim, fixed, values, offsets, valid, .. } = self else {
            unreachable!("push_null_vector on a non-vector column")
        };
        if *fixed {
            values.extend(std::iter::repeat_n(0.0, *dim));
        }
        valid.push(false);
        offsets.push(values.len() as i32);
    }
}

/// Rows a batch builder makes room for at most in advance.
const MAX_EXPECTED_ROWS: usize = 10_000;

/// Rows being collected into one record batch of the spec's schema.
pub struct BatchBuilder {
    schema: SchemaRef,
    types: Vec<ColumnType>,
    fixed_dims: Vec<bool>,
    pub cols: Vec<ColBuilder>,
    pub rows: usize,
    /// Rows a batch is expected to reach: its vectors' room is taken at
    /// once, not grown by doubling (every regrowth faulted in fresh zeroed
    /// pages and copied what it had, a large share of a change batch's cost).
    expected_rows: usize,
}

impl BatchBuilder {
    /// `fixed_dims[i]` tells whether vector column i has a declared dimension.
    pub fn new(schema: SchemaRef, types: Vec<ColumnType>, fixed_dims: Vec<bool>) -> Self {
        let mut b = BatchBuilder { schema, types, fixed_dims, cols: Vec::new(), rows: 0, expected_rows: 0 };
        b.reset();
        b
    }

    /// Makes room for `rows` rows in this batch and every later one (at
    /// most `MAX_EXPECTED_ROWS`: a reader that names no batch size).
    pub fn expect_rows(&mut self, rows: usize) {
        self.expected_rows = rows.min(MAX_EXPECTED_ROWS);
        self.reserve_vectors(self.expected_rows.saturating_sub(self.rows));
    }

    /// Room for `rows` more rows in the vector columns.
    fn reserve_vectors(&mut self, rows: usize) {
        for c in &mut self.cols {
            if let ColBuilder::Vector { dim, values, offsets, valid, .. } = c {
                values.reserve(rows * *dim);
                offsets.reserve(rows);
                valid.reserve(rows);
            }
        }
    }

    fn reset(&mut self) {
        self.rows = 0;
        self.cols = self
            .types
            .iter()
            .zip(&self.fixed_dims)
            .map(|(t, &fixed)| match t {
                ColumnType::Int16 => ColBuilder::I16(Int16Builder::new()),
                ColumnType::Int32 => ColBuilder::I32(Int32Builder::new()),
                ColumnType::Int64 => ColBuilder::I64(Int64Builder::new()),
                ColumnType::Float32 => ColBuilder::F32(Float32Builder::new()),
                ColumnType::Float64 => ColBuilder::F64(Float64Builder::new()),
                ColumnType::Bool => ColBuilder::Bool(BooleanBuilder::new()),
                ColumnType::Text { .. } => ColBuilder::Text { b: StringBuilder::new(), jsonb: false },
                ColumnType::Uuid => ColBuilder::Uuid(StringBuilder::new()),
                ColumnType::Json { binary } => ColBuilder::Text { b: StringBuilder::new(), jsonb: *binary },
                ColumnType::Timestamp { .. } => ColBuilder::Ts(Vec::new(), Vec::new()),
                ColumnType::Vector { dim } | ColumnType::HalfVec { dim } => ColBuilder::Vector {
                    dim: *dim as usize,
                    fixed,
                    half: matches!(t, ColumnType::HalfVec { .. }),
                    values: Vec::new(),
                    offsets: vec![0],
                    valid: Vec::new(),
                },
            })
            .collect();
        self.reserve_vectors(self.expected_rows);
    }

    /// Builds a batch from the rows collected so far (possibly none) and starts anew.
    pub fn take_batch(&mut self) -> Result<RecordBatch> {
        let cols = std::mem::take(&mut self.cols);
        let arrays: Vec<ArrayRef> = cols.into_iter().zip(&self.types).map(|(c, t)| finish_builder(c, t)).collect();
        self.reset();
        let fields: Vec<_> = self
            .schema
            .fields()
            .iter()
            .zip(&arrays)
            .map(|(f, a)| f.as_ref().clone().with_data_type(a.data_type().clone()))
            .collect();
        Ok(RecordBatch::try_new(Arc::new(arrow::datatypes::Schema::new(fields)), arrays)?)
    }
}

fn nulls(valid: Vec<bool>) -> Option<NullBuffer> {
    if valid.iter().all(|v| *v) { None } else { Some(NullBuffer::from(valid)) }
}

fn finish_builder(c: ColBuilder, t: &ColumnType) -> ArrayRef {
    match c {
        ColBuilder::I16(mut x) => Arc::new(x.finish()),
        ColBuilder::I32(mut x) => Arc::new(x.finish()),
        ColBuilder::I64(mut x) => Arc::new(x.finish()),
        ColBuilder::F32(mut x) => Arc::new(x.finish()),
        ColBuilder::F64(mut x) => Arc::new(x.finish()),
        ColBuilder::Bool(mut x) => Arc::new(x.finish()),
        ColBuilder::Text { mut b, .. } | ColBuilder::Uuid(mut b) => Arc::new(b.finish()),
        ColBuilder::Ts(v, valid) => {
            let a = TimestampMicrosecondArray::new(v.into(), nulls(valid));
            match t {
                ColumnType::Timestamp { utc: true } => Arc::new(a.with_timezone("UTC")),
                _ => Arc::new(a),
            }
        }
        ColBuilder::Vector { dim, fixed, values, offsets, valid, .. } => {
            let values = Arc::new(Float32Array::from(values));
            if fixed {
                Arc::new(FixedSizeListArray::new(vector_item_field(), dim as i32, values, nulls(valid)))
            } else {
                Arc::new(ListArray::new(vector_item_field(), OffsetBuffer::new(offsets.into()), values, nulls(valid)))
            }
        }
    }
}
