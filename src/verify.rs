//! `vmig verify`: both sides read chunk by chunk, rows hashed (order-independent),
//! counts and hashes compared; differing chunks are diffed row by row.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{Result, anyhow};
use arrow::array::{Array, ArrayRef, AsArray, FixedSizeListArray, Float32Array, ListArray};
use arrow::datatypes::{DataType, Float32Type, Int64Type, TimeUnit, TimestampMicrosecondType};
use arrow::record_batch::RecordBatch;
use serde::Serialize;

use crate::endpoint::Source;
use crate::endpoint::oceanbase::sql::round_like_oceanbase;
use crate::hash::row_hashes;
use crate::plan::ChunkRange;

#[derive(Clone, Debug, Serialize)]
pub struct ChunkDiff {
    pub chunk: u32,
    pub lo: i64,
    pub hi: i64,
    pub source_rows: u64,
    pub target_rows: u64,
    /// Ids in the source but not the target (first 20).
    pub missing: Vec<i64>,
    /// Ids in the target but not the source (first 20).
    pub extra: Vec<i64>,
    /// Ids on both sides whose values differ (first 20).
    pub different: Vec<i64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    pub source: String,
    pub target: String,
    pub chunks: u64,
    pub source_rows: u64,
    pub target_rows: u64,
    pub differing_chunks: Vec<ChunkDiff>,
    pub equal: bool,
    /// How vectors were compared: "bit-exact", or rounded to 6 significant
    /// digits when a side cannot give exact vectors (OceanBase).
    pub vector_comparison: String,
    /// "exact", or "milliseconds" when a side is Milvus (epoch-ms fields).
    pub timestamp_comparison: String,
}

/// How values are made comparable when one side cannot hold them exactly.
#[derive(Clone, Copy, Debug, Default)]
struct Normalise {
    /// Vectors as OceanBase prints them (see `round_like_oceanbase`).
    round_vectors: bool,
    /// Timestamps floored to milliseconds (Milvus keeps epoch milliseconds).
    timestamps_ms: bool,
}

fn normalise(b: &RecordBatch, n: Normalise) -> Result<RecordBatch> {
    let cols = b
        .columns()
        .iter()
        .map(|c| -> Result<ArrayRef> {
            match c.data_type() {
                DataType::Timestamp(TimeUnit::Microsecond, _) if n.timestamps_ms => {
                    let t = c.as_primitive::<TimestampMicrosecondType>();
                    let ms: arrow::array::TimestampMicrosecondArray = t.unary(|us| us.div_euclid(1000) * 1000);
                    Ok(Arc::new(ms.with_data_type(c.data_type().clone())))
                }
                DataType::FixedSizeList(f, dim) if n.round_vectors => {
                    let l = c.as_fixed_size_list();
                    let v: Float32Array = l.values().as_primitive::<Float32Type>().unary(round_like_oceanbase);
                    Ok(Arc::new(FixedSizeListArray::try_new(f.clone(), *dim, Arc::new(v), l.nulls().cloned())?))
                }
                DataType::List(f) if n.round_vectors => {
                    let l = c.as_list::<i32>();
                    let v: Float32Array = l.values().as_primitive::<Float32Type>().unary(round_like_oceanbase);
                    Ok(Arc::new(ListArray::try_new(f.clone(), l.offsets().clone(), Arc::new(v), l.nulls().cloned())?))
                }
                _ => Ok(c.clone()),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(RecordBatch::try_new(b.schema(), cols)?)
}

impl Normalise {
    /// The name of a comparison mode (keys of an export's source digests).
    pub fn key(&self) -> &'static str {
        match (self.round_vectors, self.timestamps_ms) {
            (false, false) => "exact",
            (true, false) => "rounded",
            (false, true) => "ms",
            (true, true) => "rounded+ms",
        }
    }
    const ALL: [Normalise; 4] = [
        Normalise { round_vectors: false, timestamps_ms: false },
        Normalise { round_vectors: true, timestamps_ms: false },
        Normalise { round_vectors: false, timestamps_ms: true },
        Normalise { round_vectors: true, timestamps_ms: true },
    ];
}

/// id -> row hash of one side's chunk, with rows projected to `columns` order.
fn read_side(side: &dyn Source, chunk: &ChunkRange, columns: &[String], norm: Normalise) -> Result<HashMap<i64, u64>> {
    Ok(read_side_modes(side, chunk, columns, &[norm])?.pop().unwrap())
}

/// `read_side` under several comparison modes, reading the chunk once.
fn read_side_modes(side: &dyn Source, chunk: &ChunkRange, columns: &[String], norms: &[Normalise]) -> Result<Vec<HashMap<i64, u64>>> {
    let pk = &side.spec().primary_key;
    let mut out = vec![HashMap::new(); norms.len()];
    side.read_chunk(chunk, 2048, &mut |raw: RecordBatch| {
        for (rows, norm) in out.iter_mut().zip(norms) {
            let b = normalise(&raw, *norm)?;
            let projected: Vec<_> = columns
                .iter()
                .map(|c| b.column_by_name(c).cloned().ok_or_else(|| anyhow!("{} has no column {c}", side.describe())))
                .collect::<Result<_>>()?;
            let fields: Vec<_> = columns
                .iter()
                .zip(&projected)
                .map(|(n, a)| arrow::datatypes::Field::new(n, a.data_type().clone(), true))
                .collect();
            let pb = RecordBatch::try_new(std::sync::Arc::new(arrow::datatypes::Schema::new(fields)), projected)?;
            let ids = arrow::compute::cast(b.column_by_name(pk).unwrap(), &arrow::datatypes::DataType::Int64)?;
            let ids = ids.as_primitive::<Int64Type>();
            for (i, h) in row_hashes(&pb).into_iter().enumerate() {
                if ids.is_valid(i) {
                    rows.insert(ids.value(i), h);
                }
            }
        }
        Ok(())
    })?;
    Ok(out)
}

/// One chunk of a side in a few numbers: rows and an order-independent
/// digest of their values (for sides that cannot be read together: the
/// export's source and the import's target).
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ChunkDigest {
    pub chunk: u32,
    pub lo: i64,
    pub hi: i64,
    pub rows: u64,
    pub digest: String,
}

fn digest_of(chunk: &ChunkRange, rows: &HashMap<i64, u64>) -> ChunkDigest {
    let sum = rows.values().fold(0u64, |a, h| a.wrapping_add(*h));
    ChunkDigest { chunk: chunk.id, lo: chunk.lo, hi: chunk.hi, rows: rows.len() as u64, digest: format!("{sum:016x}") }
}

/// Digests of every chunk of `side` under every comparison mode, by mode.
pub fn digests_all_modes(side: &dyn Source, plan: &[ChunkRange]) -> Result<std::collections::BTreeMap<String, Vec<ChunkDigest>>> {
    let columns: Vec<String> = side.spec().columns.iter().map(|c| c.name.clone()).collect();
    let mut out: std::collections::BTreeMap<String, Vec<ChunkDigest>> = Default::default();
    for chunk in plan {
        let modes = read_side_modes(side, chunk, &columns, &Normalise::ALL)?;
        for (norm, rows) in Normalise::ALL.iter().zip(&modes) {
            out.entry(norm.key().to_string()).or_default().push(digest_of(chunk, rows));
        }
    }
    Ok(out)
}

/// Digests of `side` in the mode a comparison with a source of these
/// properties needs; returns (mode, digests). `columns`: the source's.
pub fn digests_for(side: &dyn Source, plan: &[ChunkRange], columns: &[String], source_exact: bool, source_ms: bool) -> Result<(String, Vec<ChunkDigest>)> {
    let norm = Normalise { round_vectors: !source_exact || !side.vectors_exact(), timestamps_ms: source_ms || side.timestamps_ms() };
    let mut out = Vec::new();
    for chunk in plan {
        out.push(digest_of(chunk, &read_side(side, chunk, columns, norm)?));
    }
    Ok((norm.key().to_string(), out))
}

fn first(mut v: Vec<i64>) -> Vec<i64> {
    v.sort_unstable();
    v.truncate(20);
    v
}

pub fn verify(from: &dyn Source, to: &dyn Source, plan: &[ChunkRange], workers: usize) -> Result<VerifyReport> {
    let columns: Vec<String> = from.spec().columns.iter().map(|c| c.name.clone()).collect();
    let rounded = !from.vectors_exact() || !to.vectors_exact();
    let norm = Normalise { round_vectors: rounded, timestamps_ms: from.timestamps_ms() || to.timestamps_ms() };
    let work = Mutex::new(plan.iter());
    let results = Mutex::new(Vec::new());
    let error = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..workers.max(1) {
            s.spawn(|| {
                loop {
                    let Some(chunk) = work.lock().unwrap().next().copied() else { break };
                    let res = (|| -> Result<ChunkDiff> {
                        let a = read_side(from, &chunk, &columns, norm)?;
                        let b = read_side(to, &chunk, &columns, norm)?;
                        let missing = a.keys().filter(|k| !b.contains_key(k)).copied().collect();
                        let extra = b.keys().filter(|k| !a.contains_key(k)).copied().collect();
                        let different = a.iter().filter(|(k, h)| b.get(k).is_some_and(|x| x != *h)).map(|(k, _)| *k).collect();
                        Ok(ChunkDiff {
                            chunk: chunk.id,
                            lo: chunk.lo,
                            hi: chunk.hi,
                            source_rows: a.len() as u64,
                            target_rows: b.len() as u64,
                            missing: first(missing),
                            extra: first(extra),
                            different: first(different),
                        })
                    })();
                    match res {
                        Ok(d) => results.lock().unwrap().push(d),
                        Err(e) => {
                            *error.lock().unwrap() = Some(anyhow!("chunk {}: {e:#}", chunk.id));
                            break;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = error.into_inner().unwrap() {
        return Err(e);
    }
    let mut all = results.into_inner().unwrap();
    all.sort_by_key(|d| d.chunk);
    let differing: Vec<ChunkDiff> = all
        .iter()
        .filter(|d| d.source_rows != d.target_rows || !d.missing.is_empty() || !d.extra.is_empty() || !d.different.is_empty())
        .cloned()
        .collect();
    Ok(VerifyReport {
        source: from.describe(),
        target: to.describe(),
        chunks: all.len() as u64,
        source_rows: all.iter().map(|d| d.source_rows).sum(),
        target_rows: all.iter().map(|d| d.target_rows).sum(),
        equal: differing.is_empty(),
        differing_chunks: differing,
        vector_comparison: if rounded {
            "rounded to 6 significant digits (OceanBase returns vectors as text with 6 significant digits; \
             at most 5e-6 relative)"
                .into()
        } else {
            "bit-exact".into()
        },
        timestamp_comparison: if norm.timestamps_ms { "milliseconds (Milvus keeps epoch milliseconds)".into() } else { "exact".into() },
    })
}
