//! PostgreSQL binary COPY format <-> Arrow. The fastest exact path in both
//! directions: pgvector's binary form is `u16 dim, u16 unused, dim × f32 BE`
//! (halfvec: f16 BE), so vectors round-trip bit for bit.

use anyhow::{Result, bail};
use arrow::array::{Array, ArrayRef, AsArray, StringArray, TimestampMicrosecondArray};
use arrow::datatypes::{DataType, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type};
use arrow::record_batch::RecordBatch;
use arrow::datatypes::SchemaRef;
use bytes::{BufMut, BytesMut};
use half::f16;

use crate::contract::columns::{BatchBuilder, ColBuilder};
use crate::model::schema::ColumnType;
use crate::model::vector::vector_values;

pub const COPY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
/// Microseconds between 1970-01-01 and PostgreSQL's epoch 2000-01-01.
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

pub fn pg_to_unix_us(v: i64) -> i64 {
    if v == i64::MAX || v == i64::MIN { v } else { v + PG_EPOCH_OFFSET_US }
}

pub fn unix_to_pg_us(v: i64) -> i64 {
    if v == i64::MAX || v == i64::MIN { v } else { v - PG_EPOCH_OFFSET_US }
}

pub fn copy_header() -> BytesMut {
    let mut b = BytesMut::with_capacity(19);
    b.put_slice(COPY_SIGNATURE);
    b.put_i32(0);
    b.put_i32(0);
    b
}

pub fn copy_trailer() -> BytesMut {
    let mut b = BytesMut::with_capacity(2);
    b.put_i16(-1);
    b
}

/// Incremental decoder of a binary COPY OUT stream into record batches.
pub struct CopyDecoder {
    out: BatchBuilder,
    buf: BytesMut,
    header_done: bool,
    pub finished: bool,
}

impl CopyDecoder {
    /// `fixed_dims[i]` tells whether vector column i has a declared dimension.
    pub fn new(schema: SchemaRef, types: Vec<ColumnType>, fixed_dims: Vec<bool>) -> Self {
        CopyDecoder { out: BatchBuilder::new(schema, types, fixed_dims), buf: BytesMut::new(), header_done: false, finished: false }
    }

    pub fn rows(&self) -> usize {
        self.out.rows
    }

    /// Makes room for batches of `rows` rows.
    pub fn expect_rows(&mut self, rows: usize) {
        self.out.expect_rows(rows);
    }

    /// Appends one row of values in the send format of the builder's
    /// columns (None: NULL), as a COPY row's fields would be.
    pub fn append_row<'a>(&mut self, fields: impl Iterator<Item = Option<&'a [u8]>>) -> Result<()> {
        let mut n = 0;
        for (col, field) in self.out.cols.iter_mut().zip(fields) {
            append_field(col, field)?;
            n += 1;
        }
        if n != self.out.cols.len() {
            bail!("row has {n} fields, expected {}", self.out.cols.len());
        }
        self.out.rows += 1;
        Ok(())
    }

    /// Feeds bytes; decodes every complete row, calling `emit` whenever
    /// `batch_rows` rows are ready.
    pub fn feed(
        &mut self,
        data: &[u8],
        batch_rows: usize,
        emit: &mut dyn FnMut(RecordBatch) -> Result<()>,
    ) -> Result<()> {
        self.buf.extend_from_slice(data);
        let mut pos = 0usize;
        let buf = std::mem::take(&mut self.buf);
        if !self.header_done {
            if buf.len() < 19 {
                self.buf = buf;
                return Ok(());
            }
            if &buf[..11] != COPY_SIGNATURE {
                bail!("not a binary COPY stream");
            }
            let ext = i32::from_be_bytes(buf[15..19].try_into().unwrap()) as usize;
            if buf.len() < 19 + ext {
                self.buf = buf;
                return Ok(());
            }
            pos = 19 + ext;
            self.header_done = true;
        }
        while let Some(used) = self.decode_row(&buf[pos..])? {
            pos += used;
            if self.finished {
                break;
            }
            if self.out.rows >= batch_rows {
                let b = self.take_batch()?;
                emit(b)?;
            }
        }
        self.buf = BytesMut::from(&buf[pos..]);
        Ok(())
    }

    /// Decodes one row if complete; returns bytes consumed.
    fn decode_row(&mut self, b: &[u8]) -> Result<Option<usize>> {
        if b.len() < 2 {
            return Ok(None);
        }
        let n = i16::from_be_bytes([b[0], b[1]]);
        if n == -1 {
            self.finished = true;
            return Ok(Some(2));
        }
        if n as usize != self.out.cols.len() {
            bail!("COPY row has {n} fields, expected {}", self.out.cols.len());
        }
        // Check completeness first so builders never hold half a row.
        let mut p = 2usize;
        for _ in 0..n {
            if b.len() < p + 4 {
                return Ok(None);
            }
            let len = i32::from_be_bytes(b[p..p + 4].try_into().unwrap());
            p += 4 + len.max(0) as usize;
            if b.len() < p {
                return Ok(None);
            }
        }
        let mut p = 2usize;
        for col in self.out.cols.iter_mut() {
            let len = i32::from_be_bytes(b[p..p + 4].try_into().unwrap());
            p += 4;
            let field = if len < 0 { None } else { Some(&b[p..p + len as usize]) };
            p += len.max(0) as usize;
            append_field(col, field)?;
        }
        self.out.rows += 1;
        Ok(Some(p))
    }

    /// Builds a batch from the rows decoded so far (possibly empty).
    pub fn take_batch(&mut self) -> Result<RecordBatch> {
        self.out.take_batch()
    }
}

fn be_f32(b: &[u8]) -> f32 {
    f32::from_be_bytes(b.try_into().unwrap())
}

fn append_field(col: &mut ColBuilder, field: Option<&[u8]>) -> Result<()> {
    match col {
        ColBuilder::I16(x) => x.append_option(field.map(|f| i16::from_be_bytes(f.try_into().unwrap()))),
        ColBuilder::I32(x) => x.append_option(field.map(|f| i32::from_be_bytes(f.try_into().unwrap()))),
        ColBuilder::I64(x) => x.append_option(field.map(|f| i64::from_be_bytes(f.try_into().unwrap()))),
        ColBuilder::F32(x) => x.append_option(field.map(be_f32)),
        ColBuilder::F64(x) => x.append_option(field.map(|f| f64::from_be_bytes(f.try_into().unwrap()))),
        ColBuilder::Bool(x) => x.append_option(field.map(|f| f[0] != 0)),
        ColBuilder::Text { b, jsonb } => match field {
            None => b.append_null(),
            Some(f) => {
                let f = if *jsonb { &f[1..] } else { f };
                b.append_value(std::str::from_utf8(f).map_err(|_| anyhow::anyhow!("text value is not UTF-8"))?)
            }
        },
        ColBuilder::Uuid(b) => match field {
            None => b.append_null(),
            Some(f) => b.append_value(crate::contract::columns::format_uuid(
                f.try_into().map_err(|_| anyhow::anyhow!("a uuid value of {} bytes", f.len()))?,
            )),
        },
        ColBuilder::Ts(v, valid) => {
            v.push(field.map(|f| pg_to_unix_us(i64::from_be_bytes(f.try_into().unwrap()))).unwrap_or(0));
            valid.push(field.is_some());
        }
        ColBuilder::Vector { dim, fixed, half, .. } => {
            let (dim, fixed, half) = (*dim, *fixed, *half);
            match field {
                None => col.push_null_vector(),
                Some(f) => {
                    let n = u16::from_be_bytes([f[0], f[1]]) as usize;
                    if fixed && n != dim {
                        bail!("vector has {n} dimensions, column declares {dim}");
                    }
                    let body = &f[4..];
                    if half {
                        col.push_vector(body.chunks_exact(2).map(|c| f16::from_be_bytes([c[0], c[1]]).to_f32()));
                    } else {
                        col.push_vector(body.chunks_exact(4).map(be_f32));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Appends `batch`'s rows to `out` in binary COPY row format, writing each
/// column as the target type `types[i]` (e.g. float32 -> halfvec).
pub fn encode_rows(batch: &RecordBatch, types: &[ColumnType], out: &mut BytesMut) -> Result<()> {
    let ncols = batch.num_columns();
    out.reserve(batch.get_array_memory_size() + batch.num_rows() * ncols * 4);
    for row in 0..batch.num_rows() {
        out.put_i16(ncols as i16);
        for (col, ty) in batch.columns().iter().zip(types) {
            encode_field(col, ty, row, out)?;
        }
    }
    Ok(())
}

fn put_len_prefixed(out: &mut BytesMut, len: usize, f: impl FnOnce(&mut BytesMut)) {
    out.put_i32(len as i32);
    f(out);
}

fn encode_field(col: &ArrayRef, ty: &ColumnType, row: usize, out: &mut BytesMut) -> Result<()> {
    if col.is_null(row) {
        out.put_i32(-1);
        return Ok(());
    }
    // Integers are widened or narrowed to the target width (validated upstream).
    let as_i64 = || -> i64 {
        match col.data_type() {
            DataType::Int16 => col.as_primitive::<Int16Type>().value(row) as i64,
            DataType::Int32 => col.as_primitive::<Int32Type>().value(row) as i64,
            _ => col.as_primitive::<Int64Type>().value(row),
        }
    };
    match ty {
        ColumnType::Int16 => put_len_prefixed(out, 2, |o| o.put_i16(as_i64() as i16)),
        ColumnType::Int32 => put_len_prefixed(out, 4, |o| o.put_i32(as_i64() as i32)),
        ColumnType::Int64 => put_len_prefixed(out, 8, |o| o.put_i64(as_i64())),
        ColumnType::Float32 => put_len_prefixed(out, 4, |o| o.put_f32(col.as_primitive::<Float32Type>().value(row))),
        ColumnType::Float64 => put_len_prefixed(out, 8, |o| o.put_f64(col.as_primitive::<Float64Type>().value(row))),
        ColumnType::Bool => put_len_prefixed(out, 1, |o| o.put_u8(col.as_boolean().value(row) as u8)),
        ColumnType::Text { .. } | ColumnType::Json { binary: false } => {
            let s = col.as_any().downcast_ref::<StringArray>().unwrap().value(row);
            put_len_prefixed(out, s.len(), |o| o.put_slice(s.as_bytes()));
        }
        ColumnType::Uuid => {
            let s = col.as_any().downcast_ref::<StringArray>().unwrap().value(row);
            let b = crate::contract::columns::parse_uuid(s).ok_or_else(|| anyhow::anyhow!("{s:?} is not a UUID in canonical form"))?;
            put_len_prefixed(out, 16, |o| o.put_slice(&b));
        }
        ColumnType::Json { binary: true } => {
            let s = col.as_any().downcast_ref::<StringArray>().unwrap().value(row);
            put_len_prefixed(out, s.len() + 1, |o| {
                o.put_u8(1);
                o.put_slice(s.as_bytes())
            });
        }
        ColumnType::Timestamp { .. } => {
            let v = col.as_any().downcast_ref::<TimestampMicrosecondArray>().unwrap().value(row);
            put_len_prefixed(out, 8, |o| o.put_i64(unix_to_pg_us(v)));
        }
        ColumnType::Vector { .. } | ColumnType::HalfVec { .. } => {
            let values = vector_values(col, row);
            let half = matches!(ty, ColumnType::HalfVec { .. });
            let n = values.len();
            let len = 4 + n * if half { 2 } else { 4 };
            out.put_i32(len as i32);
            out.put_u16(n as u16);
            out.put_u16(0);
            let start = out.len();
            out.resize(start + len - 4, 0);
            let dst = &mut out[start..];
            if half {
                for (d, &x) in dst.chunks_exact_mut(2).zip(values) {
                    d.copy_from_slice(&f16::from_f32(x).to_be_bytes());
                }
            } else {
                for (d, &x) in dst.chunks_exact_mut(4).zip(values) {
                    d.copy_from_slice(&x.to_be_bytes());
                }
            }
        }
    }
    Ok(())
}
