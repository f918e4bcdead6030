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

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{FixedSizeListArray, Float32Array, Int64Array};
    use arrow::datatypes::{Field, Schema};
    use std::sync::Arc;

    /// Rows (id, text, 3-d vector) as one batch.
    fn batch(rows: &[(i64, Option<&str>, [f32; 3])]) -> RecordBatch {
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        let values = Float32Array::from(rows.iter().flat_map(|r| r.2).collect::<Vec<_>>());
        let schema = Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("text", DataType::Utf8, true),
            Field::new("vector", DataType::FixedSizeList(item.clone(), 3), false),
        ]);
        RecordBatch::try_new(
            Arc::new(schema),
            vec![
                Arc::new(Int64Array::from(rows.iter().map(|r| r.0).collect::<Vec<_>>())),
                Arc::new(StringArray::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())),
                Arc::new(FixedSizeListArray::try_new(item, 3, Arc::new(values), None).unwrap()),
            ],
        )
        .unwrap()
    }

    fn hash(rows: &[(i64, Option<&str>, [f32; 3])]) -> ContentHash {
        let mut h = ContentHash::default();
        h.add_batch(&batch(rows));
        h
    }

    const ROWS: [(i64, Option<&str>, [f32; 3]); 3] =
        [(1, Some("a"), [0.5, -0.25, 1.0]), (2, None, [0.0, 0.0, 0.0]), (3, Some(""), [1e-40, 3.5, -7.0])];

    #[test]
    fn the_same_rows_in_any_order_hash_equal() {
        let mut reversed = ROWS;
        reversed.reverse();
        assert_eq!(hash(&ROWS), hash(&reversed));
        assert_eq!(hash(&ROWS).rows, 3);
    }

    #[test]
    fn one_flipped_bit_of_one_float_changes_the_hash() {
        let mut changed = ROWS;
        changed[2].2[1] = f32::from_bits(changed[2].2[1].to_bits() ^ 1);
        assert_ne!(hash(&ROWS), hash(&changed));
        // -0.0 equals 0.0 as a number, not as stored bits.
        changed = ROWS;
        changed[1].2[0] = -0.0;
        assert_ne!(hash(&ROWS), hash(&changed));
    }

    #[test]
    fn null_and_empty_text_and_shifted_boundaries_differ() {
        let mut changed = ROWS;
        changed[1].1 = Some("");
        assert_ne!(hash(&ROWS), hash(&changed), "NULL vs ''");
        // The same bytes split differently between two columns (a 0x01 looks
        // like the tag that starts a value).
        let two = |a: &str, b: &str| {
            let schema = Schema::new(vec![Field::new("a", DataType::Utf8, true), Field::new("b", DataType::Utf8, true)]);
            RecordBatch::try_new(Arc::new(schema), vec![Arc::new(StringArray::from(vec![a])), Arc::new(StringArray::from(vec![b]))]).unwrap()
        };
        assert_ne!(row_hashes(&two("a\u{1}", "b")), row_hashes(&two("a", "\u{1}b")));
    }

    #[test]
    fn a_second_copy_or_a_missing_row_changes_the_digest_and_without_undoes_add() {
        let mut twice = ROWS.to_vec();
        twice.push(ROWS[0]);
        assert_ne!(hash(&ROWS), hash(&twice));
        assert_ne!(hash(&ROWS), hash(&ROWS[..2]));
        assert_eq!(hash(&twice).without(&hash(&ROWS[..1])), hash(&ROWS));
    }

    #[test]
    fn integer_widths_hash_alike() {
        let narrow = RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new("id", DataType::Int32, false)])),
            vec![Arc::new(arrow::array::Int32Array::from(vec![7, -3]))],
        )
        .unwrap();
        let wide = RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)])),
            vec![Arc::new(Int64Array::from(vec![7, -3]))],
        )
        .unwrap();
        assert_eq!(row_hashes(&narrow), row_hashes(&wide), "an INT copied into a BIGINT is equal");
    }
}
