//! Chunk planning: the primary-key space split into ranges with stable ids.
//! The plan is made once per job and saved, so every worker, every later run
//! and `verify` agree on what chunk 17 is.

use serde::{Deserialize, Serialize};

/// Inclusive primary-key range `[lo, hi]`. The first chunk starts at i64::MIN
/// and the last ends at i64::MAX, so together they cover every possible key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRange {
    pub id: u32,
    pub lo: i64,
    pub hi: i64,
    /// Rows counted in the source when planned.
    pub rows: u64,
}

impl ChunkRange {
    pub fn file_stem(&self) -> String {
        format!("{:06}", self.id)
    }
}

/// Builds ranges from the sorted upper bounds of each chunk (the id of every
/// `chunk_rows`-th row) and the total row count.
pub fn ranges_from_bounds(bounds: &[i64], total_rows: u64, chunk_rows: u64) -> Vec<ChunkRange> {
    let mut chunks = Vec::with_capacity(bounds.len() + 1);
    let mut lo = i64::MIN;
    let mut planned = 0u64;
    for &b in bounds {
        if b == i64::MAX {
            break;
        }
        chunks.push(ChunkRange { id: chunks.len() as u32, lo, hi: b, rows: chunk_rows });
        planned += chunk_rows;
        lo = b + 1;
    }
    let rest = total_rows.saturating_sub(planned);
    if rest > 0 || chunks.is_empty() {
        chunks.push(ChunkRange { id: chunks.len() as u32, lo, hi: i64::MAX, rows: rest });
    } else if let Some(last) = chunks.last_mut() {
        last.hi = i64::MAX;
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_key_space_without_gaps() {
        let c = ranges_from_bounds(&[10, 20, 30], 35, 10);
        assert_eq!(c.len(), 4);
        assert_eq!(c[0].lo, i64::MIN);
        assert_eq!(c[3].hi, i64::MAX);
        for w in c.windows(2) {
            assert_eq!(w[0].hi + 1, w[1].lo);
        }
        assert_eq!(c.iter().map(|c| c.rows).sum::<u64>(), 35);
    }

    #[test]
    fn exact_multiple_extends_last_chunk() {
        let c = ranges_from_bounds(&[10, 20], 20, 10);
        assert_eq!(c.len(), 2);
        assert_eq!(c[1].hi, i64::MAX);
        let e = ranges_from_bounds(&[], 0, 10);
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].lo, e[0].hi), (i64::MIN, i64::MAX));
    }
}
