//! Milvus as a source: loads the collection, plans chunks by walking its ids,
//! reads each chunk in keyset pages (`id > last`, sorted by id) that all see
//! the writes acknowledged before the source was opened, and decodes Milvus
//! columns straight into Arrow arrays.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use anyhow::{Context, Result, anyhow, bail};
use arrow::array::{
    ArrayRef, BooleanArray, FixedSizeListArray, Float32Array, Float64Array, Int16Array, Int32Array, Int64Array,
    StringArray, TimestampMicrosecondArray, UInt32Array,
};
use arrow::record_batch::RecordBatch;
use milvus::proto::schema::{FieldData, field_data, scalar_field, vector_field};
use tokio::runtime::Handle;

use crate::backends::milvus::{Milvus, in_expr, key_literal, scalar};
use crate::backends::milvus::mapping::{Collection, FieldInfo, FieldKind, discover};
use crate::contract::Source;
use crate::contract::changes::keys_of;
use crate::model::config::MilvusUrl;
use crate::model::plan::{Bounds, ChunkRange, Key, ranges_from_keys};
use crate::model::schema::{IndexKind, TableSpec, vector_item_field};

/// Bytes of rows per read page (~1,300 rows of 1536-d).
const PAGE_BYTES: usize = 8 << 20;
/// Milvus refuses `limit` (plus offset) above this.
pub const MAX_QUERY_LIMIT: usize = 16_384;
/// The field Milvus keeps dynamic (schema-less) values in.
pub const DYNAMIC_FIELD: &str = "$meta";

/// A key range as the pager walks it: from `from` (inclusive) or above
/// `after`, up to `upto` (inclusive); None is an open end. Integer bounds at
/// the ends of i64 are left out (Milvus cannot parse -9223372036854775808).
#[derive(Clone, Debug, Default)]
pub struct Span {
    from: Option<Key>,
    after: Option<Key>,
    upto: Option<Key>,
}

impl Span {
    pub fn of(chunk: &ChunkRange) -> Span {
        match chunk.bounds() {
            Bounds::All => Span::default(),
            Bounds::Int { lo, hi } => Span {
                from: (lo != i64::MIN).then_some(Key::Int(lo)),
                after: None,
                upto: (hi != i64::MAX).then_some(Key::Int(hi)),
            },
            Bounds::Text { after, upto } => Span {
                from: None,
                after: after.map(|a| Key::Str(a.to_string())),
                upto: upto.map(|u| Key::Str(u.to_string())),
            },
        }
    }

    /// The rest of the span, above `key`.
    fn past(&self, key: Key) -> Span {
        Span { from: None, after: Some(key), upto: self.upto.clone() }
    }

    /// The span's start, up to `key`.
    fn ending_at(&self, key: Key) -> Span {
        Span { upto: Some(key), ..self.clone() }
    }

    /// The span as a Milvus expression ("" for every key).
    pub fn expr(&self, pk: &str) -> String {
        let mut parts = Vec::new();
        if let Some(k) = &self.from {
            parts.push(format!("{pk} >= {}", key_literal(k)));
        }
        if let Some(k) = &self.after {
            parts.push(format!("{pk} > {}", key_literal(k)));
        }
        if let Some(k) = &self.upto {
            parts.push(format!("{pk} <= {}", key_literal(k)));
        }
        parts.join(" and ")
    }
}

// ---------------------------------------------------------------- decoding

/// One field of a query result as the Arrow column of `info`, taking its
/// values. Rows flagged invalid (`valid_data`, Milvus 2.5+) become NULLs,
/// whether the server sent a placeholder for them or left them out.
pub fn decode_field(info: &FieldInfo, mut fd: FieldData) -> Result<ArrayRef> {
    let mut valid = std::mem::take(&mut fd.valid_data);
    if let Some(field_data::Field::Scalars(s)) = &mut fd.field {
        if valid.is_empty() {
            valid = std::mem::take(&mut s.valid_data);
        }
    }
    let values = decode_values(info, fd)?;
    if valid.is_empty() || valid.iter().all(|v| *v) {
        return Ok(values);
    }
    let present = valid.iter().filter(|v| **v).count();
    let placeholders = values.len() == valid.len();
    if !placeholders && values.len() != present {
        bail!("Milvus returned {} values and {} validity flags ({present} valid) for field {}", values.len(), valid.len(), info.field);
    }
    let mut next = 0u32;
    let indices: UInt32Array = valid
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.then(|| {
                let at = if placeholders { i as u32 } else { next };
                next += 1;
                at
            })
        })
        .collect();
    Ok(arrow::compute::take(values.as_ref(), &indices, None)?)
}

fn decode_values(info: &FieldInfo, fd: FieldData) -> Result<ArrayRef> {
    use scalar_field::Data as D;
    let bad = || anyhow!("Milvus returned field {} in an unexpected form", info.field);
    let (scalars, vectors) = match fd.field {
        Some(field_data::Field::Scalars(s)) => (s.data, None),
        Some(field_data::Field::Vectors(v)) => (None, v.data),
        _ => (None, None),
    };
    Ok(match (&info.kind, scalars, vectors) {
        (FieldKind::Int64, Some(D::LongData(l)), _) => Arc::new(Int64Array::from(l.data)),
        (FieldKind::EpochMs, Some(D::LongData(l)), _) => {
            let us = l
                .data
                .iter()
                .map(|ms| ms.checked_mul(1000).ok_or_else(|| anyhow!("{}: {ms} ms is out of range", info.field)))
                .collect::<Result<Vec<i64>>>()?;
            Arc::new(TimestampMicrosecondArray::from(us))
        }
        (FieldKind::Int32, Some(D::IntData(l)), _) => Arc::new(Int32Array::from(l.data)),
        (FieldKind::Int16 | FieldKind::Int8, Some(D::IntData(l)), _) => Arc::new(l.data.iter().map(|v| *v as i16).collect::<Int16Array>()),
        (FieldKind::Bool, Some(D::BoolData(l)), _) => Arc::new(BooleanArray::from(l.data)),
        (FieldKind::Float, Some(D::FloatData(l)), _) => Arc::new(Float32Array::from(l.data)),
        (FieldKind::Double, Some(D::DoubleData(l)), _) => Arc::new(Float64Array::from(l.data)),
        (FieldKind::VarChar { .. }, Some(D::StringData(l)), _) => Arc::new(StringArray::from(l.data)),
        (FieldKind::Json, Some(D::JsonData(l)), _) => Arc::new(StringArray::from(
            l.data
                .into_iter()
                .map(|b| String::from_utf8(b).map_err(|_| anyhow!("{}: JSON value is not UTF-8", info.field)))
                .collect::<Result<Vec<String>>>()?,
        )),
        (FieldKind::FloatVector { dim }, _, Some(vector_field::Data::FloatVector(f))) => {
            Arc::new(FixedSizeListArray::try_new(vector_item_field(), *dim as i32, Arc::new(Float32Array::from(f.data)), None)?)
        }
        _ => return Err(bad()),
    })
}

/// Dynamic values would be lost on the way: refuse them, naming a row.
fn check_no_dynamic_values(fd: &FieldData, ids: &[Key], collection: &str) -> Result<()> {
    if let Some(scalar_field::Data::JsonData(l)) = scalar(fd) {
        for (i, v) in l.data.iter().enumerate() {
            let s = String::from_utf8_lossy(v);
            let t = s.trim();
            if !t.is_empty() && t != "{}" && t != "null" {
                bail!(
                    "collection {collection}: row id {} has dynamic fields {t}; vmig copies declared fields only, \
                     declare them in the collection schema first",
                    ids[i]
                );
            }
        }
    }
    Ok(())
}

/// A query result as a batch in the order of `coll.spec`, sorted by id;
/// `partition`: the partition queried, which a partitioned collection's rows
/// carry in `PARTITION_COLUMN`.
pub fn decode_result(coll: &Collection, mut data: Vec<FieldData>, partition: Option<&str>) -> Result<RecordBatch> {
    let mut take = |name: &str| data.iter().position(|f| f.field_name == name).map(|i| data.swap_remove(i));
    let cols = coll
        .fields
        .iter()
        .map(|info| {
            let fd = take(&info.field).ok_or_else(|| anyhow!("Milvus left field {} out of the result", info.field))?;
            decode_field(info, fd)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut cols = cols;
    if coll.partitioned() {
        let p = partition.ok_or_else(|| anyhow!("collection {}: rows read without naming their partition", coll.spec.name))?;
        let n = cols.first().map_or(0, |c| c.len());
        cols.push(Arc::new(StringArray::from(vec![p; n])));
    }
    let dynamic = take(DYNAMIC_FIELD);
    let batch = RecordBatch::try_new(coll.spec.arrow_schema(), cols).context("assembling a Milvus page")?;
    let pk = batch.column(coll.spec.pk_index()).clone();
    let keys = keys_of(&batch, &coll.spec.primary_key)?;
    if let Some(fd) = dynamic {
        check_no_dynamic_values(&fd, &keys, &coll.spec.name)?;
    }
    if keys.windows(2).all(|w| w[0] < w[1]) {
        return Ok(batch);
    }
    // Arrow sorts strings by their bytes, as Key does.
    let order: UInt32Array = arrow::compute::sort_to_indices(&pk, None, None)?;
    Ok(arrow::compute::take_record_batch(&batch, &order)?)
}

// ---------------------------------------------------------------- source

/// Which fields a page of a keyed read asks for.
#[derive(Clone, Copy)]
enum Shape<'a> {
    /// Every field of the table, from one partition where rows carry theirs.
    Rows(Option<&'a str>),
    /// The key alone.
    Ids,
    /// The key and one raw Int64 field.
    IdsWith(&'a str),
}

pub struct MilvusSource {
    conn: Milvus,
    coll: Collection,
    /// Fields a chunk read asks for.
    output: Vec<String>,
    page_rows: usize,
    /// Ids per page while planning (8 bytes each: the most Milvus allows).
    plan_page_rows: usize,
    /// Reads see every write acknowledged before this timestamp (0: Strong
    /// reads, on servers without AllocTimestamp): when the source was
    /// opened, or the last `read_now`.
    read_ts: AtomicU64,
    /// A subset job's filter as an expression (`restrict`).
    subset: std::sync::OnceLock<String>,
    /// A limited query returns the lowest keys of its range (real Milvus
    /// merges segments by key, so keyset pages are exact). Every full page is
    /// checked against `count(*)`; where the server answers segment by
    /// segment (milvus-lite 3.2) this turns false and pages come from key
    /// ranges small enough to read whole instead.
    key_ordered: AtomicBool,
}

/// The primary keys in a query's reply.
pub fn decode_keys(coll: &Collection, data: Vec<FieldData>) -> Result<Vec<Key>> {
    match data.iter().find(|d| d.field_name == coll.pk_field).and_then(scalar) {
        Some(scalar_field::Data::LongData(l)) => Ok(l.data.iter().map(|v| Key::Int(*v)).collect()),
        Some(scalar_field::Data::StringData(l)) => Ok(l.data.iter().map(|v| Key::Str(v.clone())).collect()),
        None => Ok(Vec::new()),
        Some(_) => bail!("collection {} has ids that are neither integers nor strings", coll.spec.name),
    }
}

impl Shape<'_> {
    fn partition(&self) -> Option<&str> {
        match self {
            Shape::Rows(p) => *p,
            Shape::Ids | Shape::IdsWith(_) => None,
        }
    }
}

/// The partitions a row read walks one by one, as the server lists them now
/// (an online source or target may gain partitions): every partition of a
/// collection whose rows carry theirs, else one read of all (None).
pub fn partitions_to_read(conn: &Milvus, coll: &Collection) -> Result<Vec<Option<String>>> {
    if !coll.partitioned() {
        return Ok(vec![None]);
    }
    Ok(conn.partitions(&coll.spec.name)?.into_iter().map(Some).collect())
}

/// Queries by id in flight at once (`read_rows_by_id`).
const READS_IN_FLIGHT: usize = 2;

/// The rows matching `expr` (at most `limit` per partition), one batch per
/// partition that has any: a partitioned collection is asked partition by
/// partition, so each row comes with its partition.
pub fn query_rows(conn: &Milvus, coll: &Collection, expr: &str, output: &[String], limit: usize, ts: Option<u64>) -> Result<Vec<RecordBatch>> {
    let mut out = Vec::new();
    for p in partitions_to_read(conn, coll)? {
        let p = p.as_deref();
        let batch = decode_result(coll, conn.query_in(&coll.spec.name, p, expr, output, limit, ts)?, p)?;
        if batch.num_rows() > 0 {
            out.push(batch);
        }
    }
    Ok(out)
}

impl MilvusSource {
    pub fn open(url: MilvusUrl, collection: &str, handle: Handle) -> Result<Self> {
        let conn = Milvus::connect(&url, &handle)?;
        if !conn.database_exists()? {
            bail!("Milvus database {} does not exist on {}", url.database, url.redacted());
        }
        let coll = discover(&conn, collection, &url.fields)?;
        if !coll.spec.indexes.iter().any(|i| matches!(i.kind, IndexKind::Hnsw { .. })) {
            bail!("collection {collection} has no vector index, so Milvus cannot load it for reading; create one first");
        }
        conn.load(collection)?;
        // Servers without AllocTimestamp get Strong reads (slower, as exact).
        let read_ts = AtomicU64::new(conn.alloc_timestamp().unwrap_or(0));
        let mut output: Vec<String> = coll.fields.iter().map(|f| f.field.clone()).collect();
        if coll.dynamic {
            output.push(DYNAMIC_FIELD.into());
        }
        let row_bytes = crate::model::schema::estimate_row_bytes(&coll.spec).max(1);
        // Tests set small pages so that planning and reading take many.
        let forced: Option<usize> = std::env::var("VMIG_MILVUS_PAGE_ROWS").ok().and_then(|v| v.parse().ok());
        let page_rows = forced.unwrap_or(PAGE_BYTES / row_bytes).clamp(1, MAX_QUERY_LIMIT);
        let plan_page_rows = forced.map_or(MAX_QUERY_LIMIT, |_| page_rows);
        Ok(MilvusSource { conn, coll, output, page_rows, plan_page_rows, read_ts, subset: Default::default(), key_ordered: AtomicBool::new(true) })
    }

    /// `expr` AND the subset's condition.
    fn and_subset(&self, expr: &str) -> String {
        match (self.subset.get(), expr.is_empty()) {
            (None, _) => expr.to_string(),
            (Some(s), true) => s.clone(),
            (Some(s), false) => format!("({expr}) and ({s})"),
        }
    }

    fn read_ts(&self) -> Option<u64> {
        Some(self.read_ts.load(Relaxed)).filter(|t| *t > 0)
    }

    /// Later reads see every write acknowledged before now (online polls).
    pub fn read_now(&self) -> Result<()> {
        if self.read_ts.load(Relaxed) > 0 {
            self.read_ts.store(self.conn.alloc_timestamp()?, Relaxed);
        }
        Ok(())
    }

    pub fn collection(&self) -> &Collection {
        &self.coll
    }

    /// Rows matching a filter expression, all of them (keyset pages by id), in
    /// batches sorted by id.
    pub fn read_where(&self, filter: &str, out: &mut dyn FnMut(RecordBatch) -> Result<()>) -> Result<()> {
        for p in partitions_to_read(&self.conn, &self.coll)? {
            self.pages_where(&Span::default(), filter, Shape::Rows(p.as_deref()), out)?;
        }
        Ok(())
    }

    /// (id, value of the Int64 field `field`) of every row matching `filter`,
    /// in pages by id (checked like every other read, see `pages_where`).
    pub fn ids_with(&self, field: &str, filter: &str) -> Result<Vec<(Key, i64)>> {
        let mut out = Vec::new();
        self.pages_where(&Span::default(), filter, Shape::IdsWith(field), &mut |b| {
            let values = b.column(1).as_any().downcast_ref::<Int64Array>().unwrap().values().to_vec();
            out.extend(keys_of(&b, &self.coll.spec.primary_key)?.into_iter().zip(values));
            Ok(())
        })?;
        Ok(out)
    }

    fn pages(&self, span: &Span, shape: Shape, f: &mut dyn FnMut(RecordBatch) -> Result<()>) -> Result<()> {
        self.pages_where(span, "", shape, f)
    }

    /// What a page asks for, and how many rows.
    fn page_shape(&self, shape: Shape) -> (Vec<String>, usize) {
        let pk = &self.coll.pk_field;
        match shape {
            Shape::Rows(_) => (self.output.clone(), self.page_rows),
            Shape::Ids => (vec![pk.clone()], self.plan_page_rows),
            Shape::IdsWith(field) => (vec![pk.clone(), field.to_string()], self.plan_page_rows),
        }
    }

    fn range_where(&self, span: &Span, filter: &str) -> String {
        let range = span.expr(&self.coll.pk_field);
        let e = match (range.is_empty(), filter.is_empty()) {
            (true, _) => filter.to_string(),
            (false, true) => range,
            (false, false) => format!("({range}) and ({filter})"),
        };
        self.and_subset(&e)
    }

    /// A query's reply as a batch sorted by key, in the page's shape (`Ids`:
    /// the key alone; `IdsWith`: the key and the raw Int64 field).
    fn sorted_page(&self, data: Vec<FieldData>, shape: Shape) -> Result<RecordBatch> {
        let pk = &self.coll.pk_field;
        let key = self.coll.spec.primary_key.as_str();
        let batch = match shape {
            Shape::Rows(partition) => decode_result(&self.coll, data, partition)?,
            Shape::Ids => {
                let info = self.coll.fields.iter().find(|f| &f.field == pk).unwrap();
                let fd = data.into_iter().find(|d| &d.field_name == pk).ok_or_else(|| anyhow!("query returned no ids"))?;
                RecordBatch::try_from_iter([(key, decode_field(info, fd)?)])?
            }
            Shape::IdsWith(field) => {
                let info = self.coll.fields.iter().find(|f| &f.field == pk).unwrap();
                let values: ArrayRef = match data.iter().find(|d| d.field_name == field).and_then(scalar) {
                    Some(scalar_field::Data::LongData(l)) => Arc::new(Int64Array::from(l.data.clone())),
                    _ => bail!("Milvus returned no Int64 values for {field}"),
                };
                let fd = data.into_iter().find(|d| &d.field_name == pk).ok_or_else(|| anyhow!("query returned no ids"))?;
                RecordBatch::try_from_iter([(key, decode_field(info, fd)?), (field, values)])?
            }
        };
        let order = arrow::compute::sort_to_indices(batch.column_by_name(key).unwrap(), None, None)?;
        Ok(arrow::compute::take_record_batch(&batch, &order)?)
    }

    /// Rows with ids in `span`, page by page (`pk > last`, sorted by id);
    /// `shape` says which fields a page holds.
    fn pages_where(&self, span: &Span, filter: &str, shape: Shape, f: &mut dyn FnMut(RecordBatch) -> Result<()>) -> Result<()> {
        if !self.key_ordered.load(Relaxed) {
            return self.pages_by_count(span, filter, shape, f);
        }
        let name = &self.coll.spec.name;
        let part = shape.partition();
        let (output, limit) = self.page_shape(shape);
        let mut span = span.clone();
        loop {
            let data = self.conn.query_in(name, part, &self.range_where(&span, filter), &output, limit, self.read_ts())?;
            let batch = self.sorted_page(data, shape)?;
            let n = batch.num_rows();
            if n == 0 {
                return Ok(());
            }
            let keys = keys_of(&batch, &self.coll.spec.primary_key)?;
            let last = keys[n - 1].clone();
            if span.after.as_ref().is_some_and(|a| keys[0] <= *a) {
                bail!("Milvus returned ids out of order while paging {name}");
            }
            // A full page must hold the lowest keys of the span: count the
            // rows up to its last key. More than the page (a server that
            // answers segment by segment, or Milvus' hidden copies): the rest
            // of the span is read by ranges that need no order.
            let upto_last = self.range_where(&span.ending_at(last.clone()), filter);
            if n == limit && self.conn.count_where_in(name, part, &upto_last, self.read_ts())? > n as u64 {
                self.key_ordered.store(false, Relaxed);
                return self.pages_by_count(&span, filter, shape, f);
            }
            f(batch)?;
            if n < limit {
                return Ok(());
            }
            span = span.past(last);
        }
    }
}

impl MilvusSource {
    /// `pages_where` for servers whose limited queries are not in key order:
    /// a span holding at most a page of rows (by `count(*)`) is read whole, a
    /// larger one is split at the median of a page of its keys (any page:
    /// both halves then hold fewer rows); spans go out in ascending order,
    /// each sorted.
    fn pages_by_count(&self, span: &Span, filter: &str, shape: Shape, f: &mut dyn FnMut(RecordBatch) -> Result<()>) -> Result<()> {
        let name = &self.coll.spec.name;
        let part = shape.partition();
        let (output, limit) = self.page_shape(shape);
        let mut spans = vec![span.clone()];
        while let Some(s) = spans.pop() {
            let expr = self.range_where(&s, filter);
            let n = self.conn.count_where_in(name, part, &expr, self.read_ts())? as usize;
            if n == 0 {
                continue;
            }
            if n > limit {
                if let Some(mid) = self.median_key(part, &expr)? {
                    spans.push(s.past(mid.clone()));
                    spans.push(s.ending_at(mid));
                    continue;
                }
            }
            let data = self.conn.query_in(name, part, &expr, &output, n.min(MAX_QUERY_LIMIT), self.read_ts())?;
            let sorted = self.sorted_page(data, shape)?;
            if sorted.num_rows() > 0 {
                f(sorted)?;
            }
        }
        Ok(())
    }

    /// The lower median of the distinct keys in one page of `expr`'s rows
    /// (whichever the server returns), below their largest; None when the
    /// page holds a single key (copies of one row).
    fn median_key(&self, partition: Option<&str>, expr: &str) -> Result<Option<Key>> {
        let (output, limit) = self.page_shape(Shape::Ids);
        let data = self.conn.query_in(&self.coll.spec.name, partition, expr, &output, limit.max(2), self.read_ts())?;
        let mut keys = decode_keys(&self.coll, data)?;
        keys.sort_unstable();
        keys.dedup();
        Ok((keys.len() >= 2).then(|| keys[(keys.len() - 1) / 2].clone()))
    }
}

impl Source for MilvusSource {
    fn describe(&self) -> String {
        format!("{} collection {}", self.conn.url.redacted(), self.coll.spec.name)
    }

    fn spec(&self) -> &TableSpec {
        &self.coll.spec
    }

    fn timestamps_ms(&self) -> bool {
        true
    }

    fn plan(&self, chunk_rows: u64) -> Result<Vec<ChunkRange>> {
        // Walk the ids (8 bytes each) and note every chunk_rows-th.
        let mut bounds = Vec::new();
        let mut total = 0u64;
        let pk = &self.coll.spec.primary_key;
        self.pages(&Span::default(), Shape::Ids, &mut |b| {
            for key in keys_of(&b, pk)? {
                total += 1;
                if total % chunk_rows == 0 {
                    bounds.push(key);
                }
            }
            Ok(())
        })?;
        Ok(ranges_from_keys(&bounds, total, chunk_rows))
    }

    fn read_ids(&self, span: &ChunkRange, out: &mut dyn FnMut(&[Key]) -> Result<()>) -> Result<()> {
        let pk = &self.coll.spec.primary_key;
        self.pages(&Span::of(span), Shape::Ids, &mut |b| out(&keys_of(&b, pk)?))
    }

    fn search(&self, query: &[f32], k: usize, metric: crate::model::schema::Metric, ef: u32) -> Result<(Vec<Key>, String)> {
        use milvus::proto::common::{DslType, KeyValuePair, MsgType, PlaceholderGroup, PlaceholderType, PlaceholderValue};
        use milvus::proto::milvus::{SearchRequest, search_request::SearchInput};
        use milvus::proto::schema::i_ds::IdField;
        let field = self
            .coll
            .fields
            .iter()
            .find(|f| matches!(f.kind, FieldKind::FloatVector { .. }))
            .map(|f| f.field.clone())
            .ok_or_else(|| anyhow!("collection {} has no float vector field", self.coll.spec.name))?;
        let group = PlaceholderGroup {
            placeholders: vec![PlaceholderValue {
                tag: "$0".into(),
                r#type: PlaceholderType::FloatVector as i32,
                values: vec![query.iter().flat_map(|x| x.to_le_bytes()).collect()],
                ..Default::default()
            }],
        };
        let kv = |k: &str, v: String| KeyValuePair { key: k.into(), value: v };
        let metric_name = crate::backends::milvus::mapping::metric_to_milvus(metric);
        let guarantee = self.read_ts();
        let req = SearchRequest {
            base: super::base(MsgType::Search),
            db_name: self.conn.url.database.clone(),
            collection_name: self.coll.spec.name.clone(),
            dsl_type: DslType::BoolExprV1 as i32,
            dsl: self.and_subset(""),
            nq: 1,
            search_input: Some(SearchInput::PlaceholderGroup(prost::Message::encode_to_vec(&group))),
            search_params: vec![
                kv("anns_field", field.clone()),
                kv("topk", k.to_string()),
                kv("metric_type", metric_name.into()),
                kv("params", serde_json::json!({ "ef": ef }).to_string()),
                kv("round_decimal", "-1".into()),
            ],
            guarantee_timestamp: guarantee.unwrap_or(0),
            consistency_level: if guarantee.is_some() {
                milvus::proto::common::ConsistencyLevel::Customized
            } else {
                milvus::proto::common::ConsistencyLevel::Strong
            } as i32,
            use_default_consistency: false,
            ..Default::default()
        };
        let r = self.conn.call(&format!("searching {}", self.coll.spec.name), |mut c| async move { c.search(req).await })?;
        let ids = match r.results.and_then(|d| d.ids).and_then(|i| i.id_field) {
            Some(IdField::IntId(l)) => l.data.into_iter().map(Key::Int).collect(),
            Some(IdField::StrId(l)) => l.data.into_iter().map(Key::Str).collect(),
            Some(_) => bail!("collection {} has ids that are neither integers nor strings", self.coll.spec.name),
            None => Vec::new(),
        };
        Ok((ids, format!("search on {field}, metric {metric_name}, ef {ef}, limit {k}")))
    }

    fn stored_copies(&self, span: &ChunkRange) -> Result<Option<u64>> {
        let expr = self.and_subset(&Span::of(span).expr(&self.coll.pk_field));
        Ok(Some(self.conn.count_where(&self.coll.spec.name, &expr, self.read_ts())?))
    }

    fn stored_copies_of(&self, ids: &[Key]) -> Result<Option<u64>> {
        let mut copies = 0;
        for part in ids.chunks(self.page_rows.max(1)) {
            let expr = self.and_subset(&in_expr(&self.coll.pk_field, part));
            copies += self.conn.count_where(&self.coll.spec.name, &expr, self.read_ts())?;
        }
        Ok(Some(copies))
    }

    fn read_rows_by_id(&self, ids: &[Key], out: &mut dyn FnMut(RecordBatch) -> Result<()>) -> Result<()> {
        let read = |part: &[Key]| {
            let expr = self.and_subset(&in_expr(&self.coll.pk_field, part));
            query_rows(&self.conn, &self.coll, &expr, &self.output, part.len(), self.read_ts())
        };
        let pages: Vec<&[Key]> = ids.chunks(self.page_rows.max(1)).collect();
        // Most of a page's time is the server's: with a second query in
        // flight (one thread each) the pages arrive nearly twice as fast.
        for group in pages.chunks(READS_IN_FLIGHT) {
            let results: Vec<Result<Vec<RecordBatch>>> = match group {
                [one] => vec![read(one)],
                _ => std::thread::scope(|s| {
                    let running: Vec<_> = group.iter().map(|part| s.spawn(move || read(part))).collect();
                    running.into_iter().map(|r| r.join().unwrap_or_else(|_| Err(anyhow!("reading rows by id panicked")))).collect()
                }),
            };
            for batches in results {
                for batch in batches? {
                    out(batch)?;
                }
            }
        }
        Ok(())
    }

    fn restrict(&self, filter: &crate::model::filter::Filter) -> Result<()> {
        filter.check_columns(&self.coll.spec, &self.describe())?;
        let expr = filter.milvus_expr(&|c| self.coll.fields.iter().find(|f| f.column == c).map(|f| f.field.clone()))?;
        self.subset.set(expr).map_err(|_| anyhow!("{} is already restricted to a subset", self.describe()))
    }

    fn read_chunk(&self, chunk: &ChunkRange, batch_rows: usize, out: &mut dyn FnMut(RecordBatch) -> Result<()>) -> Result<()> {
        for p in partitions_to_read(&self.conn, &self.coll)? {
            self.pages(&Span::of(chunk), Shape::Rows(p.as_deref()), &mut |b| {
                let mut off = 0;
                while off < b.num_rows() {
                    let n = batch_rows.min(b.num_rows() - off);
                    out(b.slice(off, n))?;
                    off += n;
                }
                Ok(())
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_expressions_leave_out_the_ends_of_i64_and_quote_strings() {
        let int = |lo, hi| ChunkRange { id: 0, lo, hi, rows: 0, text: None };
        assert_eq!(Span::of(&int(i64::MIN, i64::MAX)).expr("id"), "");
        assert_eq!(Span::of(&int(10, i64::MAX)).expr("id"), "id >= 10");
        assert_eq!(Span::of(&int(i64::MIN, 20)).past(Key::Int(5)).expr("id"), "id > 5 and id <= 20");
        let text = crate::model::plan::ranges_from_text_bounds(&["a\"q\\".to_string(), "m".to_string()], 30, 10);
        assert_eq!(Span::of(&text[0]).expr("pk"), r#"pk <= "a\"q\\""#);
        assert_eq!(Span::of(&text[1]).expr("pk"), r#"pk > "a\"q\\" and pk <= "m""#);
        assert_eq!(Span::of(&text[2]).ending_at(Key::Str("x".into())).expr("pk"), r#"pk > "m" and pk <= "x""#);
    }
}
