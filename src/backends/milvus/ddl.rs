//! The collection vmig creates in a Milvus target: fields from columns,
//! computed (function output) fields, partitions, indexes, and the waits
//! Milvus needs before a collection can be counted or searched.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use milvus::proto::common::{CompactionState, ConsistencyLevel, IndexState, KeyValuePair, LoadState, MsgType, SegmentState};
use milvus::proto::milvus::{
    CreateCollectionRequest, CreateIndexRequest, DropCollectionRequest, FlushRequest, GetCollectionStatisticsRequest,
    GetCompactionStateRequest, GetFlushStateRequest, GetLoadStateRequest, GetPersistentSegmentInfoRequest, GetQuerySegmentInfoRequest, LoadCollectionRequest,
    ManualCompactionRequest,
};
use milvus::proto::schema::{CollectionSchema, DataType, FieldSchema, FunctionSchema, FunctionType};
use prost::Message;

use crate::backends::milvus::{Milvus, base};
use crate::backends::milvus::mapping::{Collection, PARTITION_COLUMN, field_of};
use crate::contract::Feedback;
use crate::model::config::FieldMap;
use crate::model::schema::{ColumnType, IndexKind, TableSpec};

/// The Milvus field a column becomes when vmig creates the collection.
pub(super) fn field_schema(spec: &TableSpec, col: &crate::model::schema::ColumnSpec, map: &[FieldMap]) -> Result<FieldSchema> {
    let name = field_of(map, &col.name).to_string();
    let is_pk = col.name == spec.primary_key;
    let kv = |k: &str, v: String| KeyValuePair { key: k.into(), value: v };
    let (dt, params) = match &col.ty {
        _ if is_pk && !matches!(col.ty, ColumnType::Text { .. } | ColumnType::Uuid) => (DataType::Int64, vec![]),
        ColumnType::Int64 => (DataType::Int64, vec![]),
        ColumnType::Int32 => (DataType::Int32, vec![]),
        ColumnType::Int16 => (DataType::Int16, vec![]),
        ColumnType::Float32 => (DataType::Float, vec![]),
        ColumnType::Float64 => (DataType::Double, vec![]),
        ColumnType::Bool => (DataType::Bool, vec![]),
        // Milvus counts bytes, SQL counts characters (up to 4 bytes each in UTF-8).
        ColumnType::Text { max_chars } => {
            (DataType::VarChar, vec![kv("max_length", max_chars.map_or(65_535, |n| (n.saturating_mul(4)).min(65_535)).to_string())])
        }
        ColumnType::Uuid => (DataType::VarChar, vec![kv("max_length", "36".into())]),
        ColumnType::Json { .. } => (DataType::Json, vec![]),
        ColumnType::Vector { dim } | ColumnType::HalfVec { dim } => (DataType::FloatVector, vec![kv("dim", dim.to_string())]),
        ColumnType::Timestamp { .. } => {
            if !map.iter().any(|m| m.column == col.name && m.epoch_ms) {
                bail!(
                    "column {} is a timestamp; Milvus has no timestamp type: map it to an Int64 field of epoch \
                     milliseconds in the pipeline file (\"milvus_fields\": [{{\"column\": \"{}\", \"field\": \"…\", \"epoch_ms\": true}}])",
                    col.name,
                    col.name
                );
            }
            (DataType::Int64, vec![])
        }
    };
    // A server before 2.5 drops `nullable`; `prepare` reads back what it kept.
    let nullable = col.nullable && !is_pk && dt != DataType::FloatVector;
    Ok(FieldSchema {
        name,
        is_primary_key: is_pk,
        data_type: dt as i32,
        type_params: params,
        auto_id: false,
        nullable,
        is_partition_key: spec.partition_key.as_ref().is_some_and(|k| k.column == col.name),
        ..Default::default()
    })
}

/// The fields and functions of a created collection: the source's computed
/// fields are declared as function outputs, their inputs get the analyzer
/// parameters the function needs.
pub(super) fn with_computed_fields(mut fields: Vec<FieldSchema>, source: &TableSpec, map: &[FieldMap]) -> Result<(Vec<FieldSchema>, Vec<FunctionSchema>)> {
    let kvs = |pairs: &[(String, String)]| pairs.iter().map(|(k, v)| KeyValuePair { key: k.clone(), value: v.clone() }).collect::<Vec<_>>();
    let mut functions = Vec::new();
    for c in &source.computed {
        let mut input_fields = Vec::new();
        for input in &c.inputs {
            let name = field_of(map, &input.column);
            let f = fields.iter_mut().find(|f| f.name == name).ok_or_else(|| anyhow!("{} reads column {}, which is not copied", c.describe(), input.column))?;
            f.type_params.extend(kvs(&input.params));
            input_fields.push(name.to_string());
        }
        let data_type = DataType::from_str_name(&c.data_type).ok_or_else(|| anyhow!("{}: unknown Milvus type {}", c.describe(), c.data_type))?;
        let function_type = FunctionType::from_str_name(&c.function_type).ok_or_else(|| anyhow!("{}: unknown function type {}", c.describe(), c.function_type))?;
        fields.push(FieldSchema { name: c.field.clone(), data_type: data_type as i32, is_function_output: true, ..Default::default() });
        functions.push(FunctionSchema {
            name: c.function.clone(),
            r#type: function_type as i32,
            input_field_names: input_fields,
            output_field_names: vec![c.field.clone()],
            params: kvs(&c.function_params),
            ..Default::default()
        });
    }
    Ok((fields, functions))
}

/// Rows carry their partition into this collection (created as they name
/// them) when the source's rows carry theirs; otherwise they land in
/// `_default`, or where the target's partition key puts them.
pub(super) fn align_partitions(coll: &mut Collection, source: &TableSpec) {
    let carry = source.column(PARTITION_COLUMN).is_some() && coll.spec.partition_key.is_none();
    if carry != coll.partitioned() {
        coll.carry_partitions(carry);
    }
}

/// `partitions`: with a partition key, how many (0: the server's default).
pub(super) fn create_collection(conn: &Milvus, name: &str, schema: CollectionSchema, partitions: i64) -> Result<()> {
    let req = CreateCollectionRequest {
        base: base(MsgType::CreateCollection),
        db_name: conn.url.database.clone(),
        collection_name: name.into(),
        num_partitions: if schema.fields.iter().any(|f| f.is_partition_key) { partitions } else { 0 },
        schema: schema.encode_to_vec(),
        shards_num: 1,
        // FastGPT's (and the Node SDK's) default.
        consistency_level: ConsistencyLevel::Bounded as i32,
        ..Default::default()
    };
    conn.call(&format!("creating collection {name}"), |mut c| async move { c.create_collection(req).await })?;
    Ok(())
}

pub(super) fn drop_collection(conn: &Milvus, name: &str) -> Result<()> {
    let req = DropCollectionRequest {
        base: base(MsgType::DropCollection),
        db_name: conn.url.database.clone(),
        collection_name: name.into(),
    };
    conn.call(&format!("dropping collection {name}"), |mut c| async move { c.drop_collection(req).await })?;
    Ok(())
}

pub(super) fn create_index(conn: &Milvus, collection: &str, field: &str, index_name: &str, params: Vec<KeyValuePair>) -> Result<()> {
    let req = CreateIndexRequest {
        base: base(MsgType::CreateIndex),
        db_name: conn.url.database.clone(),
        collection_name: collection.into(),
        field_name: field.into(),
        extra_params: params,
        index_name: index_name.into(),
    };
    conn.call(&format!("creating index {index_name} on {collection}.{field}"), |mut c| async move { c.create_index(req).await })?;
    Ok(())
}

/// Empties a collection: drop and create it again with the same schema and indexes.
pub(super) fn recreate_empty(conn: &Milvus, name: &str) -> Result<()> {
    let (mut schema, partitions) = conn.describe(name)?;
    let indexes = conn.indexes(name)?;
    schema.fields.retain(|f| !f.is_dynamic);
    for f in &mut schema.fields {
        f.field_id = 0;
    }
    for f in &mut schema.functions {
        f.id = 0;
        f.input_field_ids.clear();
        f.output_field_ids.clear();
    }
    drop_collection(conn, name)?;
    create_collection(conn, name, schema, partitions)?;
    for ix in indexes {
        create_index(conn, name, &ix.field_name, &ix.index_name, ix.params)?;
    }
    Ok(())
}

/// Deletes the rows matching `expr` (a subset job's `--on-existing truncate`).
pub(super) fn delete_where(conn: &Milvus, name: &str, expr: &str) -> Result<()> {
    let req = milvus::proto::milvus::DeleteRequest {
        base: base(MsgType::Delete),
        db_name: conn.url.database.clone(),
        collection_name: name.into(),
        expr: expr.into(),
        ..Default::default()
    };
    conn.call(&format!("deleting the rows matching `{expr}` from {name}"), |mut c| async move { c.delete(req).await })?;
    let ticket = request_flush(conn, name)?;
    wait_flushed(conn, name, ticket)
}

/// Rows in a collection that may not be loaded (loading needs an index).
pub(super) fn row_count(conn: &Milvus, coll: &Collection) -> Result<u64> {
    if coll.spec.indexes.iter().any(|i| matches!(i.kind, IndexKind::Hnsw { .. })) {
        conn.load(&coll.spec.name)?;
        return conn.count(&coll.spec.name);
    }
    // Without an index: the statistics' row count (flushed rows, deletes included).
    let req = GetCollectionStatisticsRequest {
        base: base(MsgType::GetCollectionStatistics),
        db_name: conn.url.database.clone(),
        collection_name: coll.spec.name.clone(),
        ..Default::default()
    };
    let r = conn.call("reading collection statistics", |mut c| async move { c.get_collection_statistics(req).await })?;
    Ok(r.stats.iter().find(|kv| kv.key == "row_count").and_then(|kv| kv.value.parse().ok()).unwrap_or(0))
}

/// A flush Milvus has accepted: what to ask about until it is done.
pub(super) struct FlushTicket {
    segments: Vec<i64>,
    flush_ts: u64,
}

/// Asks Milvus to flush the collection (seals its growing segments); returns
/// before the data is persisted.
pub(super) fn request_flush(conn: &Milvus, name: &str) -> Result<FlushTicket> {
    let req = FlushRequest { base: base(MsgType::Flush), db_name: conn.url.database.clone(), collection_names: vec![name.into()] };
    let r = conn.call(&format!("flushing {name}"), |mut c| async move { c.flush(req).await })?;
    Ok(FlushTicket {
        segments: r.coll_seg_i_ds.get(name).map(|l| l.data.clone()).unwrap_or_default(),
        flush_ts: r.coll_flush_ts.get(name).copied().unwrap_or(0),
    })
}

/// Polls the flush state until Milvus says the flushed data is persisted.
/// A ticket can go stale (a Milvus restart renumbers what was growing): a
/// flush not confirmed within a minute is requested again.
pub(super) fn wait_flushed(conn: &Milvus, name: &str, ticket: FlushTicket) -> Result<()> {
    let started = Instant::now();
    let mut ticket = ticket;
    let mut asked = Instant::now();
    loop {
        let req = GetFlushStateRequest {
            segment_i_ds: ticket.segments.clone(),
            flush_ts: ticket.flush_ts,
            db_name: conn.url.database.clone(),
            collection_name: name.into(),
        };
        let s = conn.call("waiting for the flush", |mut c| async move { c.get_flush_state(req).await })?;
        if s.flushed {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("Milvus did not finish flushing {name} within 10 minutes");
        }
        if asked.elapsed() > Duration::from_secs(60) {
            ticket = request_flush(conn, name)?;
            asked = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Rewrites the collection's flushed segments with their deletes applied
/// (a manual compaction) and waits until queries are served from what the
/// compaction wrote. Milvus 2.3 can lose an acknowledged delete from what
/// it persists while queries still honour it from memory (milvus#32915);
/// the old copy then comes back when the segment is next loaded or
/// compacted, long after a comparison found it gone. After this, a
/// comparison sees what Milvus will keep. False from a server without
/// compactions (milvus-lite keeps one copy per id).
pub(super) fn compact_and_serve(conn: &Milvus, name: &str) -> Result<bool> {
    const LIMIT: Duration = Duration::from_secs(1800);
    let started = Instant::now();
    let collection_id = conn.collection_id(name)?;
    let req = ManualCompactionRequest { collection_id, collection_name: name.into(), db_name: conn.url.database.clone(), ..Default::default() };
    let Some(compaction) = conn.call_if_served(&format!("compacting {name}"), |mut c| async move { c.manual_compaction(req).await })? else {
        return Ok(false);
    };
    let compaction_id = compaction.compaction_id;
    loop {
        let req = GetCompactionStateRequest { compaction_id };
        let r = conn.call("waiting for the compaction", |mut c| async move { c.get_compaction_state(req).await })?;
        if r.failed_plan_no + r.timeout_plan_no > 0 {
            bail!("Milvus failed {} of its plans compacting {name}", r.failed_plan_no + r.timeout_plan_no);
        }
        if r.state == CompactionState::Completed as i32 && r.executing_plan_no == 0 {
            break;
        }
        if started.elapsed() > LIMIT {
            bail!("Milvus did not finish compacting {name} within {} minutes", LIMIT.as_secs() / 60);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_served(conn, name)?;
    Ok(true)
}

/// Waits until queries are served from the collection's flushed segments
/// and nothing else: Milvus 2.3 can drop deletes while it hands a segment
/// over to its query node (milvus#32915), so the copies a check counts
/// before then are not what queries show after. True when the server
/// lists its segments (milvus-lite does not: nothing to wait for).
pub(super) fn wait_served(conn: &Milvus, name: &str) -> Result<bool> {
    const LIMIT: Duration = Duration::from_secs(1800);
    let started = Instant::now();
    if !is_loaded(conn, name)? {
        return Ok(false);
    }
    // The query coordinator takes up newly flushed segments on its own
    // schedule; a refreshing load asks it now and returns once it has
    // (servers without refresh loads are waited for below).
    let req = LoadCollectionRequest { db_name: conn.url.database.clone(), collection_name: name.into(), refresh: true, ..Default::default() };
    let _ = conn.call_if_served("refreshing the load", |mut c| async move { c.load_collection(req).await });
    loop {
        let Some(unserved) = unserved_segments(conn, name)? else { return Ok(false) };
        if unserved == 0 {
            return Ok(true);
        }
        if started.elapsed() > LIMIT {
            bail!("Milvus did not serve {name}'s flushed segments within {} minutes", LIMIT.as_secs() / 60);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Nothing is served from a collection not loaded (--no-indexes).
pub(super) fn is_loaded(conn: &Milvus, name: &str) -> Result<bool> {
    let req = GetLoadStateRequest { db_name: conn.url.database.clone(), collection_name: name.into(), ..Default::default() };
    let state = conn.call_if_served("reading the load state", |mut c| async move { c.get_load_state(req).await })?;
    Ok(state.is_some_and(|r| r.state == LoadState::Loaded as i32))
}

/// Segments with rows that Milvus keeps flushed but its query node does
/// not serve yet, or serves but no longer keeps (a handover under way);
/// None from a server that lists no segments (milvus-lite).
pub(super) fn unserved_segments(conn: &Milvus, name: &str) -> Result<Option<u64>> {
    let Some(kept) = persisted_segments(conn, name)? else {
        return Ok(None);
    };
    let kept: HashSet<i64> = kept.infos.iter().filter(|s| s.state == SegmentState::Flushed as i32 && s.num_rows > 0).map(|s| s.segment_id).collect();
    let req = GetQuerySegmentInfoRequest { db_name: conn.url.database.clone(), collection_name: name.into(), ..Default::default() };
    let Some(served) = conn.call_if_served("listing served segments", |mut c| async move { c.get_query_segment_info(req).await })? else {
        return Ok(None);
    };
    let served: HashSet<i64> = served.infos.iter().filter(|s| s.num_rows > 0).map(|s| s.segment_id).collect();
    Ok(Some(kept.symmetric_difference(&served).count() as u64))
}

/// The collection's persisted segments. Milvus lists their ids, then reads
/// each one's info: a compaction that drops a segment in between fails the
/// listing with "segment not found", and the next listing no longer names
/// it, so the listing is asked again (for a few seconds at most).
fn persisted_segments(conn: &Milvus, name: &str) -> Result<Option<milvus::proto::milvus::GetPersistentSegmentInfoResponse>> {
    let mut tries = 0;
    loop {
        let req = GetPersistentSegmentInfoRequest { db_name: conn.url.database.clone(), collection_name: name.into(), ..Default::default() };
        match conn.call_if_served("listing persisted segments", |mut c| async move { c.get_persistent_segment_info(req).await }) {
            Err(e) if tries < 20 && format!("{e:#}").contains("segment not found") => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(250));
            }
            listed => return listed,
        }
    }
}

/// Waits until every index of the collection is built, showing indexed
/// rows of the total as the phase.
pub(super) fn wait_for_indexes(conn: &Milvus, name: &str, fb: &dyn Feedback) -> Result<()> {
    let started = Instant::now();
    fb.phase(&format!("building indexes of {name}"));
    let mut ended = std::collections::BTreeSet::new();
    loop {
        let ixs = conn.indexes(name)?;
        // Each index's build is timed on its own: it ends when Milvus says so.
        for i in &ixs {
            let finished = i.state == IndexState::Finished as i32;
            if (finished || i.state == IndexState::Failed as i32) && ended.insert(i.index_name.clone()) {
                fb.index_finished(name, &i.index_name, finished);
            }
        }
        if let Some(f) = ixs.iter().find(|i| i.state == IndexState::Failed as i32) {
            bail!("Milvus failed to build index {} on {name}: {}", f.index_name, f.index_state_fail_reason);
        }
        if ixs.iter().all(|i| i.state == IndexState::Finished as i32) {
            return Ok(());
        }
        let (done, total) = ixs.iter().fold((0i64, 0i64), |(d, t), i| (d + i.indexed_rows, t + i.total_rows));
        fb.phase(&format!("building indexes of {name} ({done}/{total} rows indexed)"));
        if started.elapsed() > Duration::from_secs(6 * 3600) {
            bail!("indexes of {name} not built after 6 hours");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
