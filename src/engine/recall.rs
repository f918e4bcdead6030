//! `vmig verify --recall K`: does the target answer searches like the
//! source? Query vectors are sampled from the source (optionally with
//! noise); the exact top-K of each is computed by vmig in one pass over the
//! source's vectors (no database's brute force: one read for all queries,
//! the same for every backend); then each side's own vector index answers
//! the queries as an application's search would, and recall@K of both
//! indexes is compared.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::time::Instant;

use anyhow::{Result, anyhow, bail};
use arrow::array::{Array, AsArray, FixedSizeListArray};
use arrow::datatypes::Float32Type;
use arrow::record_batch::RecordBatch;
use serde::Serialize;

use crate::contract::Source;
use crate::engine::verify::sample_ids;
use crate::model::plan::Key;
use crate::model::schema::{IndexKind, Metric, TableSpec};

pub struct RecallOptions {
    pub k: usize,
    pub queries: usize,
    /// Uniform noise added to each query coordinate, as a share of the
    /// vector's root-mean-square value (0: the rows' own vectors).
    pub noise: f32,
    pub seed: u64,
    pub min_ratio: f64,
    pub chunk_rows: u64,
}

/// One side's index, measured.
#[derive(Clone, Debug, Serialize)]
pub struct SideRecall {
    pub side: String,
    /// Mean recall@K over the queries.
    pub recall: f64,
    /// (k, mean recall@k) for k up to K, from the same searches' first k results.
    pub curve: Vec<(usize, f64)>,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    /// The search as it ran (operator, breadth).
    pub search: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct RecallReport {
    pub k: usize,
    pub queries: usize,
    pub metric: String,
    pub noise: f32,
    pub seed: u64,
    /// Where the search breadth came from.
    pub ef: u32,
    pub ef_from: String,
    pub exact: String,
    pub source: SideRecall,
    pub target: SideRecall,
    /// target recall / source recall.
    pub ratio: f64,
    pub min_ratio: f64,
    pub passed: bool,
}

impl RecallReport {
    pub fn statement(&self) -> String {
        format!(
            "recall@{}: target {:.4} vs source {:.4} (ratio {:.3}, minimum {:.2}) over {} queries · search p50/p99: target {:.1}/{:.1} ms, source {:.1}/{:.1} ms · {}",
            self.k,
            self.target.recall,
            self.source.recall,
            self.ratio,
            self.min_ratio,
            self.queries,
            self.target.latency_p50_ms,
            self.target.latency_p99_ms,
            self.source.latency_p50_ms,
            self.source.latency_p99_ms,
            if self.passed { "ok" } else { "TARGET RECALL TOO LOW" }
        )
    }
}

pub fn metric_of(spec: &TableSpec) -> Option<Metric> {
    spec.indexes.iter().find_map(|i| match &i.kind {
        IndexKind::Hnsw { metric, .. } => Some(*metric),
        _ => None,
    })
}

/// The name of a spec's (first) vector column.
pub fn vector_column(spec: &TableSpec) -> Result<&str> {
    spec.columns
        .iter()
        .find(|c| c.ty.is_vector())
        .map(|c| c.name.as_str())
        .ok_or_else(|| anyhow!("table {} has no vector column", spec.name))
}

/// Similarity under `metric`: larger is nearer.
fn similarity(metric: Metric, a: &[f32], b: &[f32]) -> f64 {
    match metric {
        Metric::InnerProduct => a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum(),
        Metric::Cosine => {
            let (mut d, mut na, mut nb) = (0f64, 0f64, 0f64);
            for (x, y) in a.iter().zip(b) {
                let (x, y) = (*x as f64, *y as f64);
                d += x * y;
                na += x * x;
                nb += y * y;
            }
            if na == 0.0 || nb == 0.0 { f64::NEG_INFINITY } else { d / (na.sqrt() * nb.sqrt()) }
        }
        Metric::L2 => -a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum::<f64>(),
    }
}

/// (id, vector) of each row of a batch.
fn vectors_of<'a>(b: &'a RecordBatch, pk: &str, column: &str) -> Result<(Vec<Key>, &'a FixedSizeListArray)> {
    let ids = crate::contract::changes::keys_of(b, pk)?;
    let v = b
        .column_by_name(column)
        .and_then(|c| c.as_any().downcast_ref::<FixedSizeListArray>())
        .ok_or_else(|| anyhow!("column {column} is not a vector column"))?;
    Ok((ids, v))
}

fn row_vector(v: &FixedSizeListArray, i: usize) -> Vec<f32> {
    v.value(i).as_primitive::<Float32Type>().values().to_vec()
}

/// Totally ordered f64 for the heaps.
#[derive(PartialEq, PartialOrd, Clone, Copy)]
struct Score(f64);
impl Eq for Score {}
impl Ord for Score {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0)
    }
}

/// The exact top-`k` ids of each query, nearest first, over every row of `side`.
fn exact_top_k(side: &dyn Source, metric: Metric, queries: &[Vec<f32>], k: usize, chunk_rows: u64) -> Result<Vec<Vec<Key>>> {
    let spec = side.spec();
    let column = vector_column(spec)?.to_string();
    let mut heaps: Vec<BinaryHeap<Reverse<(Score, Key)>>> = vec![BinaryHeap::new(); queries.len()];
    for chunk in side.plan(chunk_rows)? {
        side.read_chunk(&chunk, 4096, &mut |b| {
            let (ids, v) = vectors_of(&b, &spec.primary_key, &column)?;
            for (i, id) in ids.iter().enumerate() {
                if v.is_null(i) {
                    continue;
                }
                let row = v.value(i);
                let row = row.as_primitive::<Float32Type>().values();
                for (q, heap) in queries.iter().zip(heaps.iter_mut()) {
                    let s = Score(similarity(metric, q, row));
                    if heap.len() < k {
                        heap.push(Reverse((s, id.clone())));
                    } else if heap.peek().is_some_and(|Reverse((worst, _))| s > *worst) {
                        heap.pop();
                        heap.push(Reverse((s, id.clone())));
                    }
                }
            }
            Ok(())
        })?;
    }
    Ok(heaps
        .into_iter()
        .map(|h| {
            let mut v: Vec<(Score, Key)> = h.into_iter().map(|Reverse(x)| x).collect();
            v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            v.into_iter().map(|(_, id)| id).collect()
        })
        .collect())
}

/// Query vectors: `n` rows sampled from the source, noise added.
fn query_vectors(side: &dyn Source, n: usize, noise: f32, seed: u64) -> Result<Vec<Vec<f32>>> {
    let (ids, _) = sample_ids(side, n, seed)?;
    let spec = side.spec();
    let column = vector_column(spec)?.to_string();
    let mut out = Vec::new();
    side.read_rows_by_id(&ids, &mut |b| {
        let (_, v) = vectors_of(&b, &spec.primary_key, &column)?;
        for i in 0..v.len() {
            if !v.is_null(i) {
                out.push(row_vector(v, i));
            }
        }
        Ok(())
    })?;
    if noise > 0.0 {
        let mut state = seed ^ 0x5DEE_CE66_D;
        let mut uniform = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) as f64 / (1u64 << 31) as f64) * 2.0 - 1.0
        };
        for q in &mut out {
            let rms = (q.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / q.len().max(1) as f64).sqrt();
            for x in q.iter_mut() {
                *x += (uniform() * noise as f64 * rms) as f32;
            }
        }
    }
    Ok(out)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Every query through one side's index, scored against the exact answers.
fn measure(side: &dyn Source, queries: &[Vec<f32>], exact: &[Vec<Key>], k: usize, metric: Metric, ef: u32) -> Result<SideRecall> {
    let mut latencies = Vec::with_capacity(queries.len());
    let ks: Vec<usize> = [1, 5, 10, 20, 50, 100].into_iter().filter(|x| *x < k).chain([k]).collect();
    let mut sums = vec![0f64; ks.len()];
    let mut search = String::new();
    for (q, truth) in queries.iter().zip(exact) {
        let t = Instant::now();
        let (got, how) = side.search(q, k, metric, ef)?;
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        search = how;
        for (s, kk) in sums.iter_mut().zip(&ks) {
            let want: HashSet<&Key> = truth.iter().take(*kk).collect();
            let denom = want.len().max(1);
            *s += got.iter().take(*kk).filter(|id| want.contains(id)).count() as f64 / denom as f64;
        }
    }
    latencies.sort_by(|a, b| a.total_cmp(b));
    let n = queries.len().max(1) as f64;
    let curve: Vec<(usize, f64)> = ks.iter().zip(&sums).map(|(k, s)| (*k, s / n)).collect();
    Ok(SideRecall {
        side: side.describe(),
        recall: curve.last().map(|c| c.1).unwrap_or(0.0),
        curve,
        latency_p50_ms: percentile(&latencies, 0.5),
        latency_p99_ms: percentile(&latencies, 0.99),
        search,
    })
}

pub fn recall(from: &dyn Source, to: &dyn Source, opts: &RecallOptions) -> Result<RecallReport> {
    if opts.k == 0 || opts.queries == 0 {
        bail!("--recall and --queries must be at least 1");
    }
    let (metric, metric_from) = match (metric_of(from.spec()), metric_of(to.spec())) {
        (Some(m), _) => (m, "the source's index"),
        (None, Some(m)) => (m, "the target's index"),
        (None, None) => bail!("neither side has a vector index to search"),
    };
    let (ef, ef_from) = match (from.default_ef()?, to.default_ef()?) {
        (Some(e), _) => (e, "the source's setting".to_string()),
        (None, Some(e)) => (e, "the target's setting".to_string()),
        (None, None) => (DEFAULT_EF, format!("neither side has a discoverable default; vmig's default {DEFAULT_EF}")),
    };
    // An HNSW search returns at most ef results.
    let (ef, ef_from) = if (ef as usize) < opts.k { (opts.k as u32, format!("{ef_from}, raised to K")) } else { (ef, ef_from) };
    let queries = query_vectors(from, opts.queries, opts.noise, opts.seed)?;
    if queries.is_empty() {
        bail!("the source has no rows with a vector to query with");
    }
    let exact = exact_top_k(from, metric, &queries, opts.k, opts.chunk_rows)?;
    let source = measure(from, &queries, &exact, opts.k, metric, ef)?;
    let target = measure(to, &queries, &exact, opts.k, metric, ef)?;
    let ratio = if source.recall > 0.0 { target.recall / source.recall } else if target.recall > 0.0 { f64::INFINITY } else { 1.0 };
    Ok(RecallReport {
        k: opts.k,
        queries: queries.len(),
        metric: format!("{metric:?} (from {metric_from})"),
        noise: opts.noise,
        seed: opts.seed,
        ef,
        ef_from,
        exact: "computed by vmig over every source row (one pass, all queries)".into(),
        passed: target.recall >= opts.min_ratio * source.recall,
        source,
        target,
        ratio,
        min_ratio: opts.min_ratio,
    })
}

/// The search breadth used when no side says what its applications get.
pub const DEFAULT_EF: u32 = 64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn similarities_order_as_each_metric_does() {
        let q = [1.0f32, 0.0];
        assert!(similarity(Metric::InnerProduct, &q, &[2.0, 0.0]) > similarity(Metric::InnerProduct, &q, &[1.0, 1.0]));
        assert!(similarity(Metric::Cosine, &q, &[1.0, 0.1]) > similarity(Metric::Cosine, &q, &[5.0, 5.0]));
        assert!(similarity(Metric::L2, &q, &[1.0, 0.1]) > similarity(Metric::L2, &q, &[2.0, 0.0]));
    }
}
