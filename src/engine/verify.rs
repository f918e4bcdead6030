//! `vmig verify`: both sides read chunk by chunk, rows hashed (order-independent),
//! counts and hashes compared; differing chunks are diffed row by row.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{Result, anyhow};
use arrow::array::{Array, ArrayRef, AsArray, FixedSizeListArray, Float32Array, ListArray};
use arrow::datatypes::{DataType, Float32Type, TimeUnit, TimestampMicrosecondType};
use arrow::record_batch::RecordBatch;
use serde::Serialize;

use crate::contract::Source;
use crate::model::hash::{ChunkDigest, row_hashes};
use crate::model::plan::{ChunkRange, Key, TextRange};
use crate::model::vector::round_like_oceanbase;

#[derive(Clone, Debug, Serialize)]
pub struct ChunkDiff {
    pub chunk: u32,
    pub lo: i64,
    pub hi: i64,
    /// String keys: the chunk's bounds (`lo`/`hi` are then fingerprints).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<TextRange>,
    pub source_rows: u64,
    pub target_rows: u64,
    /// Ids in the source but not the target (first 20).
    pub missing: Vec<Key>,
    /// Ids in the target but not the source (first 20).
    pub extra: Vec<Key>,
    /// Ids on both sides whose values differ (first 20).
    pub different: Vec<Key>,
    /// Row copies the target holds beyond one per id (Milvus does not
    /// enforce unique keys: an upsert whose delete it lost leaves the old
    /// copy, which queries hide and `count(*)` counts).
    pub duplicates: u64,
    /// Ids the target holds more than one copy of, where they were looked
    /// for (a by-id check; first 20).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub duplicate_ids: Vec<Key>,
    /// Copies the source holds beyond one per id (a Milvus source that lost
    /// a delete), and which ids (first 20), where counted (`verify`). Told,
    /// not failed: the sides are compared as the source reads, one copy an
    /// id, and no recopy can remove a source's copy.
    #[serde(skip_serializing_if = "is_zero")]
    pub source_duplicates: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_duplicate_ids: Vec<Key>,
    /// Missing, extra and different ids beyond the 20 of each listed.
    #[serde(skip_serializing_if = "is_zero")]
    pub unlisted: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl ChunkDiff {
    /// "chunk 000003 [1200, 1599]: source 400 rows, target 401 rows; missing ids [..]; extra ids [..]; different ids [..]; 2 duplicate copies".
    pub fn describe(&self) -> String {
        let mut s = format!(
            "chunk {:06} {}: source {} rows, target {} rows; missing ids {}; extra ids {}; different ids {}",
            self.chunk,
            crate::model::plan::describe_bounds(self.lo, self.hi, self.text.as_ref()),
            self.source_rows,
            self.target_rows,
            key_list(&self.missing),
            key_list(&self.extra),
            key_list(&self.different)
        );
        if !self.duplicate_ids.is_empty() {
            s.push_str(&format!("; {} duplicate copies of ids {}", self.duplicates, key_list(&self.duplicate_ids)));
        } else if self.duplicates > 0 {
            s.push_str(&format!("; {} duplicate copies of ids the target holds", self.duplicates));
        }
        s
    }
}

/// "[1, 2]", "[\"a\", \"b\"]".
pub fn key_list(keys: &[Key]) -> String {
    format!("[{}]", keys.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(", "))
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
    /// Copies a Milvus source holds beyond one per id, and which ids (first 20).
    #[serde(skip_serializing_if = "is_zero")]
    pub source_duplicates: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_duplicate_ids: Vec<Key>,
    /// How vectors were compared: "bit-exact", or rounded to 6 significant
    /// digits when a side cannot give exact vectors (a staging area whose
    /// manifest says so).
    pub vector_comparison: String,
    /// "exact", or "milliseconds" when a side is Milvus (epoch-ms fields).
    pub timestamp_comparison: String,
    /// Fields a side computes (Milvus functions), which are not compared.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_compared: Vec<String>,
}

/// What verify says about fields Milvus computes: never copied (the target
/// recomputes them), so never compared.
pub fn computed_notes(from: &crate::model::schema::TableSpec, to: &crate::model::schema::TableSpec) -> Vec<String> {
    let mut notes: Vec<String> = from
        .computed
        .iter()
        .map(|c| {
            let there = if to.computed.iter().any(|t| t.computes_same_as(c)) { "the target computes it too" } else { "the target does not compute it" };
            format!("{}: computed by Milvus in the source, {there}; not copied, not compared", c.describe())
        })
        .collect();
    notes.extend(
        to.computed.iter().filter(|t| !from.computed.iter().any(|c| c.computes_same_as(t))).map(|t| format!("{}: computed by Milvus in the target; not compared", t.describe())),
    );
    notes
}

/// How values are made comparable when one side cannot hold them exactly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Normalise {
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
    /// The mode `side` is compared in with a source of these properties.
    pub fn for_side(side: &dyn Source, source_exact: bool, source_ms: bool) -> Normalise {
        Normalise { round_vectors: !source_exact || !side.vectors_exact(), timestamps_ms: source_ms || side.timestamps_ms() }
    }

    /// The name of a comparison mode (keys of an export's source digests).
    pub fn key(&self) -> &'static str {
        match (self.round_vectors, self.timestamps_ms) {
            (false, false) => "exact",
            (true, false) => "rounded",
            (false, true) => "ms",
            (true, true) => "rounded+ms",
        }
    }
    pub const ALL: [Normalise; 4] = [
        Normalise { round_vectors: false, timestamps_ms: false },
        Normalise { round_vectors: true, timestamps_ms: false },
        Normalise { round_vectors: false, timestamps_ms: true },
        Normalise { round_vectors: true, timestamps_ms: true },
    ];
}

/// id -> row hash of one side's chunk, with rows projected to `columns` order.
fn read_side(side: &dyn Source, chunk: &ChunkRange, columns: &[String], norm: Normalise) -> Result<HashMap<Key, u64>> {
    Ok(read_side_modes(side, chunk, columns, &[norm])?.pop().unwrap())
}

/// `read_side` under several comparison modes, reading the chunk once.
pub fn read_side_modes(side: &dyn Source, chunk: &ChunkRange, columns: &[String], norms: &[Normalise]) -> Result<Vec<HashMap<Key, u64>>> {
    let mut out = vec![HashMap::new(); norms.len()];
    side.read_chunk(chunk, 2048, &mut |raw: RecordBatch| {
        for (rows, norm) in out.iter_mut().zip(norms) {
            rows.extend(hash_rows(side, &raw, columns, *norm)?);
        }
        Ok(())
    })?;
    Ok(out)
}

/// (id, hash of the row's `columns` in that order) for each row of a batch
/// in `side`'s schema, values made comparable by `norm`.
fn hash_rows(side: &dyn Source, raw: &RecordBatch, columns: &[String], norm: Normalise) -> Result<Vec<(Key, u64)>> {
    let b = normalise(raw, norm)?;
    let projected: Vec<_> = columns
        .iter()
        .map(|c| b.column_by_name(c).cloned().ok_or_else(|| anyhow!("{} has no column {c}", side.describe())))
        .collect::<Result<_>>()?;
    let fields: Vec<_> =
        columns.iter().zip(&projected).map(|(n, a)| arrow::datatypes::Field::new(n, a.data_type().clone(), true)).collect();
    let pb = RecordBatch::try_new(std::sync::Arc::new(arrow::datatypes::Schema::new(fields)), projected)?;
    let pk = &side.spec().primary_key;
    let valid = b.column_by_name(pk).ok_or_else(|| anyhow!("{} has no column {pk}", side.describe()))?.clone();
    let ids = crate::contract::changes::keys_of(&b, pk)?;
    Ok(row_hashes(&pb).into_iter().zip(ids).enumerate().filter(|(i, _)| valid.is_valid(*i)).map(|(_, (h, id))| (id, h)).collect())
}

/// id -> row hash of the rows of `ids` one side holds (ids it lacks are absent).
fn read_ids_side(side: &dyn Source, ids: &[Key], columns: &[String], norm: Normalise) -> Result<HashMap<Key, u64>> {
    Ok(read_ids_side_modes(side, ids, columns, &[norm])?.pop().unwrap())
}

/// `read_ids_side` under several comparison modes, reading the rows once;
/// only the ids asked for, byte for byte (a side may also answer with rows
/// its collation calls equal).
pub fn read_ids_side_modes(side: &dyn Source, ids: &[Key], columns: &[String], norms: &[Normalise]) -> Result<Vec<HashMap<Key, u64>>> {
    let wanted: std::collections::HashSet<&Key> = ids.iter().collect();
    let mut out = vec![HashMap::new(); norms.len()];
    side.read_rows_by_id(ids, &mut |raw| {
        for (rows, norm) in out.iter_mut().zip(norms) {
            rows.extend(hash_rows(side, &raw, columns, *norm)?.into_iter().filter(|(k, _)| wanted.contains(k)));
        }
        Ok(())
    })?;
    Ok(out)
}

/// The digest of a chunk from its rows' hashes (a sum: any order, and one
/// row's hash can be taken out and put back).
pub fn digest_of(chunk: &ChunkRange, rows: &HashMap<Key, u64>) -> ChunkDigest {
    let sum = rows.values().fold(0u64, |a, h| a.wrapping_add(*h));
    chunk_digest(chunk, rows.len() as u64, format!("{sum:016x}"))
}

/// A chunk's digest record: its bounds, `rows` and the digest.
pub fn chunk_digest(chunk: &ChunkRange, rows: u64, digest: String) -> ChunkDigest {
    ChunkDigest { chunk: chunk.id, lo: chunk.lo, hi: chunk.hi, text: chunk.text.clone(), rows, digest }
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
    let norm = Normalise::for_side(side, source_exact, source_ms);
    let mut out = Vec::new();
    for chunk in plan {
        out.push(digest_of(chunk, &read_side(side, chunk, columns, norm)?));
    }
    Ok((norm.key().to_string(), out))
}

fn first(mut v: Vec<Key>) -> Vec<Key> {
    v.sort_unstable();
    v.truncate(20);
    v
}

/// How two sides' values are made comparable, and how that reads in a report.
fn comparison(from: &dyn Source, to: &dyn Source) -> (Normalise, String, String) {
    let rounded = !from.vectors_exact() || !to.vectors_exact();
    let norm = Normalise { round_vectors: rounded, timestamps_ms: from.timestamps_ms() || to.timestamps_ms() };
    let vectors = if rounded {
        "rounded to 6 significant digits (a side's vectors were read at 6 significant digits, as its manifest says; at most 5e-6 relative)"
    } else {
        "bit-exact"
    };
    let timestamps = if norm.timestamps_ms { "milliseconds (Milvus keeps epoch milliseconds)" } else { "exact" };
    (norm, vectors.into(), timestamps.into())
}

/// How two sides are compared: the source's columns, and how values are
/// made comparable (with how that reads in a report).
pub struct Comparison {
    columns: Vec<String>,
    norm: Normalise,
    pub vector_comparison: String,
    pub timestamp_comparison: String,
    /// Also count the source's copies per chunk (`verify` tells them; the
    /// repairs and the online verifier, which cannot act on them, do not).
    pub count_source_copies: bool,
}

impl Comparison {
    pub fn of(from: &dyn Source, to: &dyn Source) -> Comparison {
        let (norm, vector_comparison, timestamp_comparison) = comparison(from, to);
        Comparison {
            columns: from.spec().columns.iter().map(|c| c.name.clone()).collect(),
            norm,
            vector_comparison,
            timestamp_comparison,
            count_source_copies: false,
        }
    }

    /// One chunk read whole on both sides and compared row by row; on a
    /// side that can hold an id twice (Milvus), copies are counted and the
    /// ids held twice named.
    pub fn chunk(&self, from: &dyn Source, to: &dyn Source, chunk: &ChunkRange) -> Result<ChunkDiff> {
        let a = read_side(from, chunk, &self.columns, self.norm)?;
        let b = read_side(to, chunk, &self.columns, self.norm)?;
        let copies = to.stored_copies(chunk)?.unwrap_or(b.len() as u64);
        let mut d = diff_of(chunk, &a, &b, copies);
        if d.duplicates > 0 {
            let held: Vec<Key> = b.keys().cloned().collect();
            d.duplicate_ids = duplicated_keys(to, &sorted(held), copies)?;
        }
        if let Some(source_copies) = if self.count_source_copies { from.stored_copies(chunk)? } else { None } {
            d.source_duplicates = source_copies.saturating_sub(a.len() as u64);
            if d.source_duplicates > 0 {
                let held: Vec<Key> = a.keys().cloned().collect();
                d.source_duplicate_ids = duplicated_keys(from, &sorted(held), source_copies)?;
            }
        }
        Ok(d)
    }

    /// The rows of `keys` read by id on both sides and compared: a chunk's
    /// diff over those keys only (a key neither side holds is equal).
    pub fn keys(&self, from: &dyn Source, to: &dyn Source, chunk: &ChunkRange, keys: &[Key]) -> Result<ChunkDiff> {
        // Only the keys asked for, byte for byte (`read_ids_side`): a side may
        // also answer with rows its collation calls equal (OceanBase's PAD
        // SPACE: 'a ' = 'a').
        let a = read_ids_side(from, keys, &self.columns, self.norm)?;
        let b = read_ids_side(to, keys, &self.columns, self.norm)?;
        // Milvus: copies of these keys beyond one each, which its queries hide.
        let Some(copies) = to.stored_copies_of(keys)? else { return Ok(diff_of(chunk, &a, &b, b.len() as u64)) };
        let mut d = diff_of(chunk, &a, &b, copies);
        if d.duplicates > 0 {
            let held: Vec<Key> = keys.iter().filter(|k| b.contains_key(*k)).cloned().collect();
            d.duplicate_ids = duplicated_keys(to, &held, copies)?;
        }
        Ok(d)
    }
}

/// The keys among `held` (each held at least once) that `side` holds more
/// than once, found by halving the list while its copies exceed its keys
/// (a few counts per duplicate, not one per key); the first 20.
pub fn duplicated_keys(side: &dyn Source, held: &[Key], copies: u64) -> Result<Vec<Key>> {
    let mut found = Vec::new();
    let mut todo = vec![(held.to_vec(), copies)];
    while let Some((keys, copies)) = todo.pop() {
        if copies <= keys.len() as u64 || found.len() >= 20 {
            continue;
        }
        if keys.len() == 1 {
            found.extend(keys);
            continue;
        }
        let (lo, hi) = keys.split_at(keys.len() / 2);
        for part in [lo, hi] {
            let n = side.stored_copies_of(part)?.unwrap_or(part.len() as u64);
            todo.push((part.to_vec(), n));
        }
    }
    found.sort();
    Ok(found)
}

fn sorted(mut keys: Vec<Key>) -> Vec<Key> {
    keys.sort();
    keys
}

pub fn diff_of(chunk: &ChunkRange, a: &HashMap<Key, u64>, b: &HashMap<Key, u64>, copies: u64) -> ChunkDiff {
    let missing: Vec<Key> = a.keys().filter(|k| !b.contains_key(k)).cloned().collect();
    let extra: Vec<Key> = b.keys().filter(|k| !a.contains_key(k)).cloned().collect();
    let different: Vec<Key> = a.iter().filter(|(k, h)| b.get(k).is_some_and(|x| x != *h)).map(|(k, _)| k.clone()).collect();
    let unlisted = [&missing, &extra, &different].iter().map(|v| v.len().saturating_sub(20) as u64).sum();
    ChunkDiff {
        chunk: chunk.id,
        lo: chunk.lo,
        hi: chunk.hi,
        text: chunk.text.clone(),
        source_rows: a.len() as u64,
        target_rows: b.len() as u64,
        missing: first(missing),
        extra: first(extra),
        different: first(different),
        duplicates: copies.saturating_sub(b.len() as u64),
        duplicate_ids: Vec::new(),
        source_duplicates: 0,
        source_duplicate_ids: Vec::new(),
        unlisted,
    }
}

impl ChunkDiff {
    /// Every id that differs, where all are listed (none beyond the first
    /// 20 of a kind, no copies counted but not named).
    pub fn all_differing_ids(&self) -> Option<Vec<Key>> {
        (self.unlisted == 0 && self.duplicates == 0).then(|| [&self.missing, &self.extra, &self.different].into_iter().flatten().cloned().collect())
    }

    pub fn is_equal(&self) -> bool {
        self.rows_equal() && self.duplicates == 0
    }

    /// Every row equal and only copies too many: what a target that lost
    /// deletes it acknowledged (Milvus 2.3) shows, whatever the source did.
    pub fn only_extra_copies(&self) -> bool {
        self.rows_equal() && self.duplicates > 0
    }

    /// The same ids with the same values on both sides (copies aside).
    fn rows_equal(&self) -> bool {
        self.source_rows == self.target_rows && self.missing.is_empty() && self.extra.is_empty() && self.different.is_empty()
    }
}

/// Chunks found differing, all of them only by extra copies.
pub fn all_extra_copies(diffs: &[ChunkDiff]) -> bool {
    !diffs.is_empty() && diffs.iter().all(ChunkDiff::only_extra_copies)
}

pub fn verify(from: &dyn Source, to: &dyn Source, plan: &[ChunkRange], workers: usize) -> Result<VerifyReport> {
    let mut cmp = Comparison::of(from, to);
    cmp.count_source_copies = true;
    let work = Mutex::new(plan.iter());
    let results = Mutex::new(Vec::new());
    let error = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..workers.max(1) {
            s.spawn(|| {
                loop {
                    let Some(chunk) = work.lock().unwrap().next().cloned() else { break };
                    match cmp.chunk(from, to, &chunk) {
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
    let differing: Vec<ChunkDiff> = all.iter().filter(|d| !d.is_equal()).cloned().collect();
    Ok(VerifyReport {
        source: from.describe(),
        target: to.describe(),
        chunks: all.len() as u64,
        source_rows: all.iter().map(|d| d.source_rows).sum(),
        target_rows: all.iter().map(|d| d.target_rows).sum(),
        equal: differing.is_empty(),
        source_duplicates: all.iter().map(|d| d.source_duplicates).sum(),
        source_duplicate_ids: first(all.iter().flat_map(|d| d.source_duplicate_ids.iter().cloned()).collect()),
        differing_chunks: differing,
        vector_comparison: cmp.vector_comparison,
        timestamp_comparison: cmp.timestamp_comparison,
        not_compared: computed_notes(from.spec(), to.spec()),
    })
}

/// `verify --sample N`: N source rows chosen uniformly at random by key,
/// compared with the target's rows of the same ids (every column, verify's
/// rules), and both sides' row counts.
#[derive(Clone, Debug, Serialize)]
pub struct SampleReport {
    pub source: String,
    pub target: String,
    pub source_rows: u64,
    pub target_rows: u64,
    /// Row copies the target holds beyond one per id (Milvus `count(*)`).
    pub target_duplicates: u64,
    pub sampled: u64,
    /// Reproduces the same sample (`--seed`).
    pub seed: u64,
    /// Sampled ids the target lacks (first 20) and how many.
    pub missing: Vec<Key>,
    pub missing_count: u64,
    /// Sampled ids whose values differ (first 20) and how many.
    pub different: Vec<Key>,
    pub different_count: u64,
    /// With no differing sample: the share of differing rows is below this at 95 % confidence.
    pub differing_share_below_95: Option<f64>,
    pub equal: bool,
    pub vector_comparison: String,
    pub timestamp_comparison: String,
    /// Fields a side computes (Milvus functions), which are not compared.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_compared: Vec<String>,
}

impl SampleReport {
    /// The confidence statement a user reads.
    pub fn statement(&self) -> String {
        let bad = self.missing_count + self.different_count;
        match self.differing_share_below_95 {
            Some(p) if bad == 0 => format!(
                "no difference in {} sampled rows: with 95 % confidence fewer than {:.3} % of the source's rows differ in the target",
                self.sampled,
                p * 100.0
            ),
            _ => format!(
                "{bad} of {} sampled rows DIFFER ({} missing, {} different; about {:.3} % of the rows)",
                self.sampled,
                self.missing_count,
                self.different_count,
                bad as f64 * 100.0 / self.sampled.max(1) as f64
            ),
        }
    }
}

/// A small, seedable generator (splitmix64) for the sample; no statistics
/// beyond uniform choice are needed.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, n).
    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }
}

/// Up to `n` keys of `side` chosen uniformly at random (reservoir sampling
/// over one walk of its keys, ids only), ascending, and the number of keys.
pub fn sample_ids(side: &dyn Source, n: usize, seed: u64) -> Result<(Vec<Key>, u64)> {
    let mut rng = SplitMix(seed);
    let mut chosen: Vec<Key> = Vec::with_capacity(n);
    let mut seen = 0u64;
    side.read_ids(&ChunkRange::whole(), &mut |ids| {
        for id in ids.iter().cloned() {
            seen += 1;
            if chosen.len() < n {
                chosen.push(id);
            } else {
                let j = rng.below(seen);
                if (j as usize) < n {
                    chosen[j as usize] = id;
                }
            }
        }
        Ok(())
    })?;
    chosen.sort_unstable();
    Ok((chosen, seen))
}

pub fn verify_sample(from: &dyn Source, to: &dyn Source, n: usize, seed: u64) -> Result<SampleReport> {
    let columns: Vec<String> = from.spec().columns.iter().map(|c| c.name.clone()).collect();
    let (norm, vector_comparison, timestamp_comparison) = comparison(from, to);
    let (ids, source_rows) = sample_ids(from, n, seed)?;
    let mut target_rows = 0u64;
    to.read_ids(&ChunkRange::whole(), &mut |ids| {
        target_rows += ids.len() as u64;
        Ok(())
    })?;
    let copies = to.stored_copies(&ChunkRange::whole())?.unwrap_or(target_rows);
    let a = read_ids_side(from, &ids, &columns, norm)?;
    let b = read_ids_side(to, &ids, &columns, norm)?;
    // Rows deleted from the source between the walk and the read are not samples.
    let missing: Vec<Key> = a.keys().filter(|k| !b.contains_key(k)).cloned().collect();
    let different: Vec<Key> = a.iter().filter(|(k, h)| b.get(k).is_some_and(|x| x != *h)).map(|(k, _)| k.clone()).collect();
    let sampled = a.len() as u64;
    let clean = missing.is_empty() && different.is_empty();
    let duplicates = copies.saturating_sub(target_rows);
    Ok(SampleReport {
        source: from.describe(),
        target: to.describe(),
        source_rows,
        target_rows,
        target_duplicates: duplicates,
        sampled,
        seed,
        missing_count: missing.len() as u64,
        missing: first(missing),
        different_count: different.len() as u64,
        different: first(different),
        // No failure in n independent draws: p < 1 - 0.05^(1/n) at 95 %.
        differing_share_below_95: (clean && sampled > 0).then(|| 1.0 - 0.05f64.powf(1.0 / sampled as f64)),
        equal: clean && source_rows == target_rows && duplicates == 0,
        vector_comparison,
        timestamp_comparison,
        not_compared: computed_notes(from.spec(), to.spec()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk() -> ChunkRange {
        ChunkRange { id: 3, lo: 1, hi: 100, rows: 0, text: None }
    }

    fn side(rows: &[(i64, u64)]) -> HashMap<Key, u64> {
        rows.iter().map(|(k, h)| (Key::Int(*k), *h)).collect()
    }

    #[test]
    fn equal_sides_are_equal() {
        let a = side(&[(1, 10), (2, 20)]);
        let d = diff_of(&chunk(), &a, &a.clone(), 2);
        assert!(d.is_equal(), "{}", d.describe());
        assert_eq!(d.all_differing_ids(), Some(vec![]));
    }

    #[test]
    fn missing_extra_and_different_ids_are_named() {
        let a = side(&[(1, 10), (2, 20), (3, 30)]);
        let b = side(&[(1, 10), (2, 21), (4, 40)]);
        let d = diff_of(&chunk(), &a, &b, 3);
        assert!(!d.is_equal());
        assert_eq!((d.missing.clone(), d.extra.clone(), d.different.clone()), (vec![Key::Int(3)], vec![Key::Int(4)], vec![Key::Int(2)]));
        let said = d.describe();
        assert!(said.starts_with("chunk 000003") && said.contains("missing ids [3]") && said.contains("extra ids [4]") && said.contains("different ids [2]"), "{said}");
    }

    #[test]
    fn a_second_copy_fails_though_every_row_compares_equal() {
        let a = side(&[(1, 10), (2, 20)]);
        let d = diff_of(&chunk(), &a, &a.clone(), 3);
        assert!(!d.is_equal(), "count(*) 3 for 2 ids");
        assert_eq!(d.duplicates, 1);
        assert_eq!(d.all_differing_ids(), None, "a copy counted but not named is not a list of ids");
        assert!(d.describe().contains("1 duplicate copies"), "{}", d.describe());
    }

    #[test]
    fn beyond_twenty_ids_of_a_kind_are_counted_not_listed() {
        let a = side(&(0..30).map(|k| (k, 1)).collect::<Vec<_>>());
        let d = diff_of(&chunk(), &a, &HashMap::new(), 0);
        assert_eq!((d.missing.len(), d.unlisted), (20, 10));
        assert_eq!(d.missing, (0..20).map(Key::Int).collect::<Vec<_>>(), "the lowest ids first");
        assert_eq!(d.all_differing_ids(), None);
    }

    #[test]
    fn rounding_and_milliseconds_apply_only_where_asked() {
        use arrow::array::TimestampMicrosecondArray;
        use arrow::datatypes::{Field, Schema};
        let item = Arc::new(arrow::datatypes::Field::new("item", DataType::Float32, false));
        let v = FixedSizeListArray::try_new(item.clone(), 2, Arc::new(Float32Array::from(vec![1.0f32 / 3.0, 0.1234567])), None).unwrap();
        let t = TimestampMicrosecondArray::from(vec![1_700_000_000_123_456]);
        let schema = Schema::new(vec![Field::new("v", DataType::FixedSizeList(item, 2), false), Field::new("t", t.data_type().clone(), false)]);
        let b = RecordBatch::try_new(Arc::new(schema), vec![Arc::new(v), Arc::new(t)]).unwrap();
        let exact = normalise(&b, Normalise::default()).unwrap();
        assert_eq!(row_hashes(&exact), row_hashes(&b), "the exact mode changes nothing");
        let both = normalise(&b, Normalise { round_vectors: true, timestamps_ms: true }).unwrap();
        let floats = both.column(0).as_fixed_size_list().values().as_primitive::<Float32Type>().values().to_vec();
        assert_eq!(floats, vec![0.333333f32, 0.123457]);
        assert_eq!(both.column(1).as_primitive::<TimestampMicrosecondType>().value(0), 1_700_000_000_123_000);
        assert_ne!(row_hashes(&both), row_hashes(&b));
    }
}
