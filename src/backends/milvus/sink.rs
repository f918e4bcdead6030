//! Milvus as a target: creates the collection (autoID off, FastGPT's index
//! after the load), writes each chunk by `upsert` in requests sized by bytes
//! (columns encoded in `encode.rs`), flushes and waits for the flush, then
//! records the chunk in a local ledger file (Milvus has no transactions;
//! replaying an unrecorded chunk is harmless because upsert by id is
//! idempotent).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use arrow::record_batch::RecordBatch;
use milvus::proto::common::{KeyValuePair, MsgType};
use milvus::proto::milvus::CreateDatabaseRequest;
use milvus::proto::schema::CollectionSchema;
use tokio::runtime::Handle;

use crate::backends::milvus::{Milvus, base};
use crate::backends::milvus::ddl::{align_partitions, compact_and_serve, create_collection, create_index, delete_where, drop_collection, field_schema, recreate_empty, request_flush, row_count, wait_flushed, wait_for_indexes, wait_served, is_loaded, unserved_segments, with_computed_fields};
use crate::backends::milvus::encode::{UPSERTS_IN_FLIGHT, refused_rows, start_upsert};
use crate::backends::milvus::mapping::{Collection, FieldKind, PARTITION_COLUMN, discover, metric_to_milvus};
use crate::contract::{ChunkWriter, Feedback, RowReject, Sink, SinkOptions, check_final_count, existing_rows_action, refuse_foreign_ids, without_rows};
use crate::contract::commit::{CommitRecord, Ledger};
use crate::model::config::{FieldMap, MilvusUrl};
use crate::model::plan::ChunkRange;
use crate::model::schema::{IndexKind, Metric, TableSpec};
use crate::state::ledger::{FileLock, LedgerFile};

/// Bytes of rows per upsert request: well under the 64 MiB gRPC limit.
/// Measured (200k × 1536-d): 8 and 16 MiB ingest alike, 32 MiB is slower.
const DEFAULT_REQUEST_BYTES: usize = 8 << 20;
const MAX_REQUEST_BYTES: usize = 60 << 20;
/// The job's ledger for Milvus targets, in its state directory.
pub const LEDGER_FILE: &str = "milvus-ledger.jsonl";

pub struct MilvusSink {
    pub(super) conn: Milvus,
    pub(super) name: String,
    fields: Vec<FieldMap>,
    pub(super) ledger: Option<Arc<LedgerFile>>,
    target: Mutex<Option<Collection>>,
    pub(super) request_bytes: usize,
    flushes: Arc<Flushes>,
    /// Online change batches: the flush in flight and what it will record.
    pub(super) online_flush: Mutex<OnlineFlush>,
    /// A subset job's filter (`restrict`).
    subset: std::sync::OnceLock<crate::model::filter::Filter>,
    /// The filter as a Milvus expression, once the collection's fields are
    /// known, when the target held rows outside it: writes then refuse ids
    /// those rows hold.
    foreign_check: Mutex<Option<String>>,
}

/// Flush waits run beside the next chunks' upserts (a 20k-row chunk of
/// 1536-d takes Milvus 2–4 s to persist; waiting inline halved throughput).
/// A chunk enters the ledger only once its flush is done; at most
/// `MAX_PENDING_FLUSHES` are outstanding, and `finish` waits for all.
#[derive(Default)]
struct Flushes {
    pending: Mutex<Vec<std::thread::JoinHandle<Result<()>>>>,
    /// A flush that failed for good: its chunk is not in the ledger, so the
    /// run must not end as if it were.
    failed: Mutex<Option<String>>,
}

const MAX_PENDING_FLUSHES: usize = 2;
/// How long a flush wait keeps trying while Milvus is unreachable.
const FLUSH_RETRY_FOR: Duration = Duration::from_secs(180);

/// An online job's flushes (apply.rs): one in flight at a time, recording
/// the position of the last batch applied before it was requested.
#[derive(Default)]
pub(super) struct OnlineFlush {
    pub(super) in_flight: Option<std::thread::JoinHandle<Result<()>>>,
    /// The last batch applied: its position, and the job's counts with it.
    pub(super) applied: Option<crate::contract::changes::AppliedPosition>,
    /// Batches were applied since the last flush request.
    pub(super) unrequested: bool,
    pub(super) job: String,
}

/// Waits until the data a flush `ticket` covers is persisted. A Milvus
/// restart interrupts the wait: the writes were acknowledged (they are in
/// Milvus' log), so the flush is requested again until it holds.
pub(super) fn persist(conn: &Milvus, name: &str, ticket: super::ddl::FlushTicket, what: &str) -> Result<()> {
    let mut ticket = Some(ticket);
    crate::model::retry::with_retries(what, FLUSH_RETRY_FOR, 0, &std::sync::atomic::AtomicBool::new(false), &|m| say!("{m}"), || {
        let t = match ticket.take() {
            Some(t) => t,
            None => request_flush(conn, name)?,
        };
        wait_flushed(conn, name, t)
    })
}

impl Flushes {
    fn add(&self, wait: impl FnOnce() -> Result<()> + Send + 'static) -> Result<()> {
        let oldest = {
            let mut p = self.pending.lock().unwrap();
            p.push(std::thread::spawn(wait));
            (p.len() > MAX_PENDING_FLUSHES).then(|| p.remove(0))
        };
        match oldest {
            Some(h) => self.note(h.join().map_err(|_| anyhow!("a Milvus flush waiter panicked")).and_then(|r| r)),
            None => Ok(()),
        }
    }

    fn note(&self, r: Result<()>) -> Result<()> {
        if let Err(e) = &r {
            self.failed.lock().unwrap().get_or_insert_with(|| format!("{e:#}"));
        }
        r
    }

    /// Waits for every outstanding flush; the first error wins.
    fn drain(&self) -> Result<()> {
        let all: Vec<_> = std::mem::take(&mut *self.pending.lock().unwrap());
        let mut first = Ok(());
        for h in all {
            let r = self.note(h.join().map_err(|_| anyhow!("a Milvus flush waiter panicked")).and_then(|r| r));
            if first.is_ok() {
                first = r;
            }
        }
        first?;
        match self.failed.lock().unwrap().as_ref() {
            Some(e) => bail!("a chunk's flush failed earlier ({e}); run the same command again to redo it"),
            None => Ok(()),
        }
    }
}

impl Drop for MilvusSink {
    // A cancelled run still records the chunks whose flush completes.
    fn drop(&mut self) {
        let _ = self.flushes.drain();
        let _ = self.settle_online();
    }
}

const AUTO_ID_REFUSAL: &str = "has autoID=true, so Milvus would give every row a new id; FastGPT's MongoDB refers to \
vectors by id, so renumbered rows would be orphaned. Create the collection with autoID=false (or let vmig create it: \
drop it or name another collection with --target-table)";

impl MilvusSink {
    /// `state` (the job's state store) holds the ledger; without one the
    /// sink keeps no ledger (`generate`).
    pub fn open(url: MilvusUrl, collection: &str, handle: Handle, state: Option<&crate::state::store::Store>) -> Result<Self> {
        let conn = Milvus::connect(&url, &handle)?;
        let target = format!("{}:{}/{}/{}", url.host, url.port, url.database, collection);
        let request_bytes = std::env::var("VMIG_MILVUS_REQUEST_BYTES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_REQUEST_BYTES)
            .clamp(1 << 16, MAX_REQUEST_BYTES);
        Ok(MilvusSink {
            ledger: state.map(|st| Arc::new(LedgerFile::in_store(st, LEDGER_FILE, target))),
            fields: url.fields.clone(),
            conn,
            name: collection.to_string(),
            target: Mutex::new(None),
            request_bytes,
            flushes: Arc::new(Flushes::default()),
            online_flush: Default::default(),
            subset: Default::default(),
            foreign_check: Mutex::new(None),
        })
    }

    fn ledger_rows(&self, job: &str) -> Result<u64> {
        match (&self.ledger, job.is_empty()) {
            (Some(l), false) => Ok(l.records(job)?.values().map(|r| r.rows).sum()),
            _ => Ok(0),
        }
    }

    /// The subset filter as an expression over this collection's fields.
    fn subset_expr(&self, coll: &Collection) -> Result<Option<String>> {
        self.subset
            .get()
            .map(|f| f.milvus_expr(&|c| coll.fields.iter().find(|i| i.column == c).map(|i| i.field.clone())))
            .transpose()
    }

    /// Rows inside and outside the subset, for the guards of a subset job
    /// (queries need the collection loaded, and loading needs an index).
    fn subset_counts(&self, coll: &Collection, expr: &str) -> Result<(u64, u64)> {
        let total = row_count(&self.conn, coll)?;
        if total == 0 {
            return Ok((0, 0));
        }
        if !coll.spec.indexes.iter().any(|i| matches!(i.kind, IndexKind::Hnsw { .. })) {
            bail!(
                "collection {} holds {total} rows but no vector index, so Milvus cannot query it; a subset job must                  tell its own rows from the others' (create the index, or move everything without --filter)",
                self.name
            );
        }
        let inside = self.conn.count_where(&self.name, expr, None)?;
        Ok((inside, total.saturating_sub(inside)))
    }

    pub(super) fn collection(&self) -> Result<Collection> {
        self.target.lock().unwrap().clone().ok_or_else(|| anyhow!("Milvus sink used before prepare"))
    }
}

impl Sink for MilvusSink {
    fn describe(&self) -> String {
        format!("{} collection {}", self.conn.url.redacted(), self.name)
    }

    /// The ledger lives in the job's state directory, so its lock does too.
    fn lock_job(&self, job: &str, _fb: &dyn Feedback) -> Result<Box<dyn std::any::Any + Send>> {
        match &self.ledger {
            Some(l) => match l.lock_path() {
                Some(p) => Ok(Box::new(FileLock::acquire(&p, job, &self.describe())?)),
                None => Ok(Box::new(())),
            },
            None => Ok(Box::new(())),
        }
    }

    fn prepare(&self, source: &TableSpec, _plan: &[ChunkRange], opts: &SinkOptions) -> Result<TableSpec> {
        if !opts.job.is_empty() && self.ledger.is_none() {
            bail!("a Milvus target keeps its ledger in the job's state directory, and none was given");
        }
        let database_exists = self.conn.database_exists()?;
        let existed = database_exists && self.conn.has_collection(&self.name)?;
        let ledger_rows = self.ledger_rows(&opts.job)?;
        let began = match (&self.ledger, opts.job.is_empty()) {
            (Some(l), false) => l.began(&opts.job)?,
            _ => false,
        };
        if !existed {
            if ledger_rows > 0 {
                bail!(
                    "the ledger says {ledger_rows} rows of job {} are in collection {}, but it does not exist; \
                     run `vmig reset` to start over",
                    opts.job,
                    self.name
                );
            }
            // Mapping errors surface before anything is created.
            let fields = source
                .columns
                .iter()
                .filter(|c| c.name != PARTITION_COLUMN)
                .map(|c| field_schema(source, c, &self.fields))
                .collect::<Result<Vec<_>>>()?;
            if !database_exists {
                let req = CreateDatabaseRequest {
                    base: base(MsgType::CreateDatabase),
                    db_name: self.conn.url.database.clone(),
                    ..Default::default()
                };
                let what = format!("creating Milvus database {}", self.conn.url.database);
                self.conn.call(&what, |mut c| async move { c.create_database(req).await })?;
            }
            let (fields, functions) = with_computed_fields(fields, source, &self.fields)?;
            let schema = CollectionSchema {
                name: self.name.clone(),
                description: "copied by vmig".into(),
                fields,
                functions,
                // As FastGPT creates it.
                enable_dynamic_field: true,
                ..Default::default()
            };
            create_collection(&self.conn, &self.name, schema, source.partition_key.as_ref().map_or(0, |k| k.partitions as i64))?;
        }
        let mut coll = discover(&self.conn, &self.name, &self.fields)?;
        align_partitions(&mut coll, source);
        if coll.auto_id {
            bail!("target collection {} {AUTO_ID_REFUSAL}", self.name);
        }
        coll.spec.same_columns_as(source)?;
        for c in &source.computed {
            if !coll.spec.computed.iter().any(|t| t.computes_same_as(c)) {
                bail!(
                    "the source computes {} with function {}, and target collection {} does not: its rows would have no {}; \
                     create the collection with the same function, or let vmig create it",
                    c.describe(),
                    c.function,
                    self.name,
                    c.field
                );
            }
        }
        if let Some(f) = self.subset.get() {
            f.check_columns(&coll.spec, &self.describe())?;
        }
        match (existed, self.subset_expr(&coll)?) {
            (false, _) => {}
            (true, None) => {
                let non_empty = row_count(&self.conn, &coll)? > 0;
                if existing_rows_action(non_empty, began, opts, &self.describe())? {
                    recreate_empty(&self.conn, &self.name)?;
                    coll = discover(&self.conn, &self.name, &self.fields)?;
                    align_partitions(&mut coll, source);
                }
            }
            // A subset job owns the rows inside its filter only.
            (true, Some(expr)) => {
                let (inside, outside) = self.subset_counts(&coll, &expr)?;
                let said = self.subset.get().map(|f| f.describe()).unwrap_or_default();
                if existing_rows_action(inside > 0, began, opts, &format!("{} (rows where {said})", self.describe()))? {
                    delete_where(&self.conn, &self.name, &expr)?;
                }
                if outside > 0 {
                    *self.foreign_check.lock().unwrap() = Some(expr);
                }
            }
        }
        // Before the first upsert: a rerun after a kill then knows the rows
        // of chunks that never reached the ledger are its own.
        if let (Some(l), false, false) = (&self.ledger, opts.job.is_empty(), began) {
            l.mark_began(&opts.job)?;
        }
        let spec = coll.spec.clone();
        *self.target.lock().unwrap() = Some(coll);
        Ok(spec)
    }

    fn settle(&self) -> Result<()> {
        self.flushes.drain()
    }

    fn compact(&self) -> Result<bool> {
        compact_and_serve(&self.conn, &self.name)
    }

    fn serve_persisted(&self) -> Result<bool> {
        wait_served(&self.conn, &self.name)
    }

    fn unserved(&self) -> Result<Option<u64>> {
        if !is_loaded(&self.conn, &self.name)? {
            return Ok(None);
        }
        unserved_segments(&self.conn, &self.name)
    }

    fn committed(&self, job: &str) -> Result<Ledger> {
        match (&self.ledger, job.is_empty()) {
            (Some(l), false) => l.records(job),
            _ => Ok(Ledger::new()),
        }
    }

    fn begin_chunk(&self, job: &str, _chunk: &ChunkRange) -> Result<Box<dyn ChunkWriter>> {
        let coll = self.collection()?;
        Ok(Box::new(MilvusChunkWriter {
            conn: self.conn.clone(),
            row_bytes: crate::model::schema::estimate_row_bytes(&coll.spec),
            coll,
            job: job.to_string(),
            ledger: self.ledger.clone().filter(|_| !job.is_empty()),
            pending: Vec::new(),
            pending_bytes: 0,
            request_bytes: self.request_bytes,
            bytes: 0,
            flushes: self.flushes.clone(),
            in_flight: Default::default(),
            foreign_check: self.foreign_check.lock().unwrap().clone().zip(self.subset.get().cloned()),
        }))
    }

    fn finish(&self, source: &TableSpec, _plan: &[ChunkRange], opts: &SinkOptions, fb: &dyn Feedback) -> Result<()> {
        self.flushes.drain()?;
        self.settle_online()?;
        let coll = discover(&self.conn, &self.name, &self.fields)?;
        let mut has_vector_index = coll.spec.indexes.iter().any(|i| matches!(i.kind, IndexKind::Hnsw { .. }));
        if opts.create_indexes {
            let vector = coll.fields.iter().find(|f| matches!(f.kind, FieldKind::FloatVector { .. })).unwrap();
            // Scalar indexes on the columns the source indexes (FastGPT filters on them).
            let indexed: Vec<&str> = coll.spec.indexes.iter().flat_map(|i| i.columns.iter().map(|c| c.as_str())).collect();
            let mut wanted: Vec<&str> = Vec::new();
            let btree_columns = source
                .indexes
                .iter()
                .filter(|i| matches!(i.kind, IndexKind::Btree { .. }))
                .flat_map(|i| i.columns.iter().map(|c| c.as_str()));
            for c in btree_columns {
                // A column may sit in several source indexes; one Milvus index each.
                if c != source.primary_key && !indexed.contains(&c) && !wanted.contains(&c) && coll.fields.iter().any(|f| f.column == c) {
                    wanted.push(c);
                }
            }
            // Indexes on computed fields (BM25's sparse vectors), as the source has them.
            let computed_indexes: Vec<(&str, &str, &[(String, String)])> = source
                .computed
                .iter()
                .filter(|c| coll.spec.computed.iter().any(|t| t.field == c.field && t.index.is_none()))
                .filter_map(|c| c.index.as_ref().map(|(name, params)| (c.field.as_str(), name.as_str(), params.as_slice())))
                .collect();
            if !has_vector_index || !wanted.is_empty() || !computed_indexes.is_empty() {
                // A run killed between two index creations left the collection
                // loaded (the guard's count loads it), and Milvus will not load
                // it again with an index added meanwhile.
                self.conn.release(&self.name)?;
            }
            let mut created: Vec<String> = Vec::new();
            if !has_vector_index {
                let (metric, m, ef) = source
                    .indexes
                    .iter()
                    .find_map(|i| match &i.kind {
                        IndexKind::Hnsw { metric, m, ef_construction, .. } => Some((*metric, *m, *ef_construction)),
                        _ => None,
                    })
                    .unwrap_or((Metric::InnerProduct, 32, 128));
                let kv = |k: &str, v: String| KeyValuePair { key: k.into(), value: v };
                fb.say(&format!("building HNSW index on {}.{} (metric {}, M={m}, efConstruction={ef})", self.name, vector.field, metric_to_milvus(metric)));
                fb.phase("creating index vector_index");
                create_index(
                    &self.conn,
                    &self.name,
                    &vector.field,
                    "vector_index",
                    vec![
                        kv("index_type", "HNSW".into()),
                        kv("metric_type", metric_to_milvus(metric).into()),
                        kv("params", serde_json::json!({"M": m, "efConstruction": ef}).to_string()),
                    ],
                )?;
                fb.index_started(&self.name, "vector_index");
                created.push("vector_index".to_string());
                has_vector_index = true;
            }
            for (field, name, params) in computed_indexes {
                fb.phase(&format!("creating index {name}"));
                let params = params.iter().map(|(k, v)| KeyValuePair { key: k.clone(), value: v.clone() }).collect();
                create_index(&self.conn, &self.name, field, name, params)?;
                fb.index_started(&self.name, name);
                created.push(name.to_string());
            }
            for column in wanted {
                let Some(info) = coll.fields.iter().find(|f| f.column == column) else { continue };
                fb.phase(&format!("creating index {}_index", info.field));
                match create_index(&self.conn, &self.name, &info.field, &format!("{}_index", info.field), vec![]) {
                    Ok(()) => {
                        fb.index_started(&self.name, &format!("{}_index", info.field));
                        created.push(format!("{}_index", info.field));
                    }
                    Err(e) => fb.say(&format!("warning: no scalar index on {}: {e:#}", info.field)),
                }
            }
            wait_for_indexes(&self.conn, &self.name, fb)?;
            // Every index is built now, also those a server names otherwise
            // in its index list (milvus-lite): their builds end here.
            for ix in &created {
                fb.index_finished(&self.name, ix, true);
            }
        }
        // Milvus loads only an indexed collection.
        if has_vector_index {
            fb.phase(&format!("loading collection {}", self.name));
            self.conn.load(&self.name)?;
            let rows = match self.subset_expr(&coll)? {
                Some(expr) => self.conn.count_where(&self.name, &expr, None)?,
                None => self.conn.count(&self.name)?,
            };
            check_final_count(rows, self.ledger_rows(&opts.job)?, opts, &self.describe(), fb)?;
        } else {
            fb.say(&format!("collection {} has no vector index (--no-indexes), so it was not loaded", self.name));
        }
        Ok(())
    }

    fn drop_table(&self) -> Result<()> {
        if self.conn.database_exists()? && self.conn.has_collection(&self.name)? {
            drop_collection(&self.conn, &self.name)?;
        }
        Ok(())
    }

    /// Batches do not wait for their flush (see `apply`), but each still
    /// costs Milvus its own rounds of upserts and deletes: a backlog moves
    /// in fewer, larger batches than into a transactional target.
    fn change_batch_rows(&self) -> usize {
        20_000
    }

    /// Upserts reach Milvus before their chunk's record (after the flush):
    /// the ledger's mark of the job's first write says whether it began.
    fn job_began(&self, job: &str) -> Result<bool> {
        match &self.ledger {
            Some(l) => l.began(job),
            None => Ok(false),
        }
    }

    fn applied_position(&self, job: &str) -> Result<Option<crate::contract::changes::AppliedPosition>> {
        match &self.ledger {
            Some(l) => l.position(job),
            None => Ok(None),
        }
    }

    fn apply_changes(&self, job: &str, set: &crate::contract::changes::ChangeSet) -> Result<()> {
        self.apply(job, set)
    }

    fn refused_changes(&self, images: &RecordBatch) -> Result<Vec<RowReject>> {
        refused_rows(&self.collection()?, images)
    }

    fn forget_job(&self, job: &str) -> Result<u64> {
        match &self.ledger {
            Some(l) => l.forget(job),
            None => Ok(0),
        }
    }

    fn restrict(&self, filter: &crate::model::filter::Filter) -> Result<()> {
        self.subset.set(filter.clone()).map_err(|_| anyhow!("{} is already restricted to a subset", self.describe()))
    }
}

struct MilvusChunkWriter {
    conn: Milvus,
    coll: Collection,
    job: String,
    ledger: Option<Arc<LedgerFile>>,
    pending: Vec<RecordBatch>,
    pending_bytes: usize,
    request_bytes: usize,
    /// Estimated bytes per row (sizes the upsert requests).
    row_bytes: usize,
    bytes: u64,
    flushes: Arc<Flushes>,
    /// Upserts sent and not yet answered, oldest first (at most UPSERTS_IN_FLIGHT).
    in_flight: std::collections::VecDeque<tokio::task::JoinHandle<Result<()>>>,
    /// A subset job whose target holds other rows: the filter's expression, and the filter.
    foreign_check: Option<(String, crate::model::filter::Filter)>,
}

impl MilvusChunkWriter {
    /// Sends the pending rows as one upsert, with up to UPSERTS_IN_FLIGHT
    /// unanswered (waiting for each in turn cost ~7%: the server sat idle
    /// while the next 8 MiB arrived).
    fn send(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let batch = arrow::compute::concat_batches(&self.pending[0].schema(), &self.pending)?;
        self.pending.clear();
        self.bytes += self.pending_bytes as u64;
        self.pending_bytes = 0;
        if self.in_flight.len() >= UPSERTS_IN_FLIGHT {
            self.wait_oldest()?;
        }
        self.in_flight.push_back(start_upsert(&self.conn, &self.coll, &batch)?);
        Ok(())
    }

    fn wait_oldest(&mut self) -> Result<()> {
        match self.in_flight.pop_front() {
            Some(h) => self.conn.block_on(h).map_err(|e| anyhow!("upsert task ended abnormally: {e}"))?,
            None => Ok(()),
        }
    }

    fn wait_in_flight(&mut self) -> Result<()> {
        while !self.in_flight.is_empty() {
            self.wait_oldest()?;
        }
        Ok(())
    }
}

impl ChunkWriter for MilvusChunkWriter {
    fn write(&mut self, batch: &RecordBatch) -> Result<Vec<RowReject>> {
        let mut refused = refused_rows(&self.coll, batch)?;
        if let Some((expr, f)) = &self.foreign_check {
            let (conn, coll) = (&self.conn, &self.coll);
            let more = refuse_foreign_ids(batch, &coll.spec.primary_key, f, &mut |ids| {
                let held_elsewhere = format!("{} and not ({expr})", super::in_expr(&coll.pk_field, ids));
                let data = conn.query(&coll.spec.name, &held_elsewhere, &[coll.pk_field.clone()], ids.len(), None)?;
                let held = super::source::decode_keys(coll, data)?;
                Ok(held)
            })?;
            let seen: std::collections::HashSet<usize> = refused.iter().map(|r| r.row).collect();
            refused.extend(more.into_iter().filter(|r| !seen.contains(&r.row)));
        }
        let keep = without_rows(batch, &refused)?;
        if keep.num_rows() > 0 {
            self.pending_bytes += keep.num_rows() * self.row_bytes;
            self.pending.push(keep);
        }
        if self.pending_bytes >= self.request_bytes {
            self.send()?;
        }
        Ok(refused)
    }

    /// Sends the last rows and requests the flush; the wait for it and the
    /// ledger record follow in the background (see `Flushes`).
    fn commit(mut self: Box<Self>, mut record: CommitRecord) -> Result<CommitRecord> {
        self.send()?;
        self.wait_in_flight()?;
        record.bytes = self.bytes;
        let ticket = request_flush(&self.conn, &self.coll.spec.name)?;
        let (conn, name, ledger, job, rec) = (self.conn.clone(), self.coll.spec.name.clone(), self.ledger.clone(), self.job.clone(), record.clone());
        self.flushes.add(move || {
            persist(&conn, &name, ticket, &format!("flushing chunk {}", rec.chunk))?;
            match &ledger {
                Some(l) => l.append(&job, &rec),
                None => Ok(()),
            }
        })?;
        Ok(record)
    }
}
