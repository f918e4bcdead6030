//! Order-independent content hash of rows: the wrapping sum of a 64-bit hash of
//! each row (every column, in spec order). Source and target can then be
//! compared whatever order they return rows in.

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, FixedSizeListArray, ListArray, StringArray,
};
use arrow::datatypes::{
    DataType, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, TimestampMicrosecondType,
};
use arrow::record_batch::RecordBatch;
use xxhash_rust::xxh3::xxh3_64;

/// Running hash of a set of rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ContentHash {
    pub rows: u64,
    pub sum: u64,
}

impl ContentHash {
    pub fn add_row(&mut self, row_hash: u64) {
        self.rows += 1;
        self.sum = self.sum.wrapping_add(row_hash);
    }

    /// The hash of `self` without the rows of `other` (a subset of them).
    pub fn without(&self, other: &ContentHash) -> ContentHash {
        ContentHash { rows: self.rows - other.rows, sum: self.sum.wrapping_sub(other.sum) }
    }

    pub fn add_batch(&mut self, batch: &RecordBatch) {
        for h in row_hashes(batch) {
            self.add_row(h);
        }
    }

    pub fn hex(&self) -> String {
        format!("{:016x}", self.sum)
    }
}

/// One hash per row of `batch`.
pub fn row_hashes(batch: &RecordBatch) -> Vec<u64> {
    let mut buf = Vec::with_capacity(8192);
    (0..batch.num_rows())
        .map(|row| {
            buf.clear();
            for col in batch.columns() {
                encode_value(col, row, &mut buf);
            }
            xxh3_64(&buf)
        })
        .collect()
}

/// Canonical bytes of one value: a tag, then little-endian fixed-width values or
/// length-prefixed bytes. Vectors hash their float32 bytes, so a bit-exact
/// copy is required for equal hashes.
fn encode_value(col: &ArrayRef, row: usize, buf: &mut Vec<u8>) {
    if col.is_null(row) {
        buf.push(0);
        return;
    }
    buf.push(1);
    match col.data_type() {
        DataType::Int16 => buf.extend_from_slice(&(col.as_primitive::<Int16Type>().value(row) as i64).to_le_bytes()),
        DataType::Int32 => buf.extend_from_slice(&(col.as_primitive::<Int32Type>().value(row) as i64).to_le_bytes()),
        DataType::Int64 => buf.extend_from_slice(&col.as_primitive::<Int64Type>().value(row).to_le_bytes()),
        DataType::Float32 => buf.extend_from_slice(&col.as_primitive::<Float32Type>().value(row).to_le_bytes()),
        DataType::Float64 => buf.extend_from_slice(&col.as_primitive::<Float64Type>().value(row).to_le_bytes()),
        DataType::Boolean => buf.push(col.as_any().downcast_ref::<BooleanArray>().unwrap().value(row) as u8),
        DataType::Utf8 => {
            let s = col.as_any().downcast_ref::<StringArray>().unwrap().value(row);
            buf.extend_from_slice(&(s.len() as u32).to_le_bytes());
            buf.extend_from_slice(s.as_bytes());
        }
        DataType::Timestamp(_, _) => {
            buf.extend_from_slice(&col.as_primitive::<TimestampMicrosecondType>().value(row).to_le_bytes())
        }
        DataType::FixedSizeList(_, _) => {
            let list = col.as_any().downcast_ref::<FixedSizeListArray>().unwrap();
            push_floats(&list.value(row), buf);
        }
        DataType::List(_) => {
            let list = col.as_any().downcast_ref::<ListArray>().unwrap();
            push_floats(&list.value(row), buf);
        }
        other => panic!("content hash: unsupported arrow type {other}"),
    }
}

fn push_floats(values: &ArrayRef, buf: &mut Vec<u8>) {
    let v = values.as_primitive::<Float32Type>().values();
    buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
    let start = buf.len();
    buf.resize(start + v.len() * 4, 0);
    for (dst, x) in buf[start..].chunks_exact_mut(4).zip(v.iter()) {
        dst.copy_from_slice(&x.to_le_bytes());
    }
}

/// One chunk of a side in a few numbers: rows and an order-independent
/// digest of their values (for sides that cannot be read together: the
/// export's source and the import's target).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ChunkDigest {
    pub chunk: u32,
    pub lo: i64,
    pub hi: i64,
    /// String keys: the chunk's bounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<crate::model::plan::TextRange>,
    pub rows: u64,
    pub digest: String,
}
