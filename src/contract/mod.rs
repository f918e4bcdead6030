//! Floor 2, the contract: what every backend offers and the engine drives.
//! The `Source` / `Sink` / `ChunkWriter` traits, the change types and the
//! change-stream trait (`changes`), collapsing changes per key, the commit
//! record, row-batch columns, and the guards every sink applies the same way.
//! Backends know nothing about each other or about threads; the engine
//! drives them from its own worker threads (blocking calls; database
//! backends run their async I/O on the shared tokio runtime).

pub mod changes;
pub mod collapse;
pub mod columns;
pub mod commit;
pub mod reconcile;

use anyhow::{Result, bail};
use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};

use crate::contract::commit::{CommitRecord, Ledger};
use crate::model::plan::{ChunkRange, Key};
use crate::model::schema::TableSpec;

/// What to do with a target that already holds rows but has no ledger for this job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnExisting {
    /// Refuse to start (default).
    #[default]
    Fail,
    /// Keep existing rows; rows with the same primary key are replaced.
    Upsert,
    /// Empty the target table first.
    Truncate,
}

/// How a PostgreSQL target stores its vector columns (`--vector-storage`):
/// PostgreSQL's column STORAGE modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum VectorStorage {
    /// Inline in the row: no compression attempt, no TOAST table.
    Plain,
    /// Out of line in the TOAST table, without a compression attempt.
    External,
    /// PostgreSQL's default for vector: a compression attempt, then TOAST.
    Extended,
    /// A compression attempt, inline where it fits.
    Main,
}

impl VectorStorage {
    pub fn sql(self) -> &'static str {
        match self {
            VectorStorage::Plain => "PLAIN",
            VectorStorage::External => "EXTERNAL",
            VectorStorage::Extended => "EXTENDED",
            VectorStorage::Main => "MAIN",
        }
    }

    /// From `pg_attribute.attstorage`.
    pub fn from_attstorage(c: &str) -> Option<VectorStorage> {
        match c {
            "p" => Some(VectorStorage::Plain),
            "e" => Some(VectorStorage::External),
            "x" => Some(VectorStorage::Extended),
            "m" => Some(VectorStorage::Main),
            _ => None,
        }
    }
}

pub trait Source: Send + Sync {
    /// Human description without secrets.
    fn describe(&self) -> String;
    fn spec(&self) -> &TableSpec;
    /// The source's indexes no target gets because vmig cannot describe them
    /// (expression, partial, other methods), as the source defines them.
    fn indexes_not_carried(&self) -> Vec<String> {
        Vec::new()
    }
    /// Splits the primary-key space into chunks of about `chunk_rows` rows.
    fn plan(&self, chunk_rows: u64) -> Result<Vec<ChunkRange>>;
    /// False when the source cannot hand out its vectors bit for bit: a
    /// staging area whose manifest says so (written from OceanBase by an
    /// earlier vmig, which read vectors at 6 significant digits).
    fn vectors_exact(&self) -> bool {
        true
    }
    /// True when the source keeps timestamps in milliseconds (Milvus' epoch-ms
    /// fields): comparisons with it truncate the other side to milliseconds.
    fn timestamps_ms(&self) -> bool {
        false
    }
    /// Streams the rows of one chunk as batches of at most `batch_rows` rows,
    /// in the source's Arrow schema (`spec().arrow_schema()`).
    fn read_chunk(
        &self,
        chunk: &ChunkRange,
        batch_rows: usize,
        out: &mut dyn FnMut(RecordBatch) -> Result<()>,
    ) -> Result<()>;
    /// The primary keys in `span` (a chunk's range, or `ChunkRange::whole()`),
    /// ascending, in pages (an id-set reconcile reads nothing else). Backends
    /// override this to leave the other columns unread.
    fn read_ids(&self, span: &ChunkRange, out: &mut dyn FnMut(&[Key]) -> Result<()>) -> Result<()> {
        let pk = self.spec().primary_key.clone();
        self.read_chunk(span, 8_192, &mut |b| out(&crate::contract::changes::keys_of(&b, &pk)?))
    }
    /// How many row copies the store holds with keys in `span`, where it
    /// can hold several per key (Milvus' `count(*)`); None where keys are
    /// unique by construction.
    fn stored_copies(&self, _span: &ChunkRange) -> Result<Option<u64>> {
        Ok(None)
    }
    /// How many row copies the store holds with these keys (Milvus'
    /// `count(*)` over an id list); None where keys are unique by construction.
    fn stored_copies_of(&self, _ids: &[Key]) -> Result<Option<u64>> {
        Ok(None)
    }
    /// The top-`k` keys for `query` through this side's own vector index, as
    /// an application's search gets them (`metric`, search breadth `ef`),
    /// nearest first; and the search as it ran, in words.
    fn search(&self, _query: &[f32], _k: usize, _metric: crate::model::schema::Metric, _ef: u32) -> Result<(Vec<Key>, String)> {
        bail!("{} cannot run vector searches", self.describe())
    }
    /// The search breadth its applications get by default (pgvector's
    /// `hnsw.ef_search`, OceanBase's `ob_hnsw_ef_search`), where discoverable.
    fn default_ef(&self) -> Result<Option<u32>> {
        Ok(None)
    }
    /// The current rows with these keys (missing keys are left out), in the
    /// source's Arrow schema.
    fn read_rows_by_id(&self, _ids: &[Key], _out: &mut dyn FnMut(RecordBatch) -> Result<()>) -> Result<()> {
        bail!("{} cannot read rows by id", self.describe())
    }
    /// From now on this side is only the rows matching `filter` (a subset
    /// job): planning, reads, ids, counts and searches all see the subset.
    /// Called once, before anything is read.
    fn restrict(&self, _filter: &crate::model::filter::Filter) -> Result<()> {
        bail!("{} cannot read a subset (--filter)", self.describe())
    }
}

/// What a sink tells the user while it works: messages, and the phase it is
/// in (`vmig status` shows the phase; off a terminal it is printed at most
/// once every 5 s).
pub trait Feedback: Sync {
    fn say(&self, msg: &str);
    /// E.g. "building index vector_index", "building index vector_index (42%)",
    /// "fixing sequence". The text before " (" names the phase.
    fn phase(&self, phase: &str);
    /// An index build on `on` (a table or collection) began: from here on it
    /// runs in the server. Builds may overlap; each is timed on its own.
    fn index_started(&self, _on: &str, _index: &str) {}
    /// That build ended (`ok`: it succeeded).
    fn index_finished(&self, _on: &str, _index: &str, _ok: bool) {}
}

/// Feedback on stderr for commands without a live display (`generate`).
pub struct PrintFeedback;

impl Feedback for PrintFeedback {
    fn say(&self, msg: &str) {
        say!("{msg}");
    }
    fn phase(&self, phase: &str) {
        if !phase.contains(" (") {
            say!("{phase} …");
        }
    }
}

/// Settings a sink needs at start.
#[derive(Clone, Debug)]
pub struct SinkOptions {
    pub job: String,
    pub on_existing: OnExisting,
    pub create_indexes: bool,
    /// Online: the source changes while the job runs, so row counts are not
    /// guarded against the ledger's (deletes and inserts move them).
    pub online: bool,
    /// Several workers share the job (claims instead of the job's lock).
    pub shared: bool,
    /// Cap on an index build's memory (`--index-memory`); None: the backend's default.
    pub index_memory: Option<u64>,
    /// PostgreSQL targets: the vector columns' storage (`--vector-storage`);
    /// None: the fastest that fits a new table's rows.
    pub vector_storage: Option<VectorStorage>,
}

pub trait Sink: Send + Sync {
    fn describe(&self) -> String;
    /// Takes the job's lock in the target (one run of a job at a time) and
    /// clears what a killed earlier run left behind; held until the guard
    /// is dropped. A lock whose holder died is taken over.
    fn lock_job(&self, _job: &str, _fb: &dyn Feedback) -> Result<Box<dyn std::any::Any + Send>> {
        Ok(Box::new(()))
    }
    /// Creates the target (table, ledger) if missing, checks guards, and
    /// returns the target table's spec (what rows must satisfy).
    fn prepare(&self, source: &TableSpec, plan: &[ChunkRange], opts: &SinkOptions) -> Result<TableSpec>;
    /// What `prepare` chose or found that the user should know (said with
    /// the plan and kept in the report).
    fn prepare_notes(&self) -> Vec<String> {
        Vec::new()
    }
    /// Chunks already committed for this job.
    /// Waits until every chunk whose commit returned is in the ledger
    /// (Milvus records a chunk after its flush, in the background).
    fn settle(&self) -> Result<()> {
        Ok(())
    }
    /// Rewrites what the target stores so that reads from now on see what
    /// it keeps (Milvus: a compaction, see `ddl::compact_and_serve`); a
    /// recopy does this before its chunks are compared again. Whether
    /// there was anything to do.
    fn compact(&self) -> Result<bool> {
        Ok(false)
    }
    /// Waits until reads are served from what the target persisted and
    /// nothing else (Milvus: every flushed segment handed over to the query
    /// node, see `ddl::wait_served`), so that a check then sees what later
    /// reads will. Whether there was anything to wait for.
    fn serve_persisted(&self) -> Result<bool> {
        Ok(false)
    }
    /// How many stored parts the target has not yet handed over to what
    /// serves its reads (Milvus: flushed segments), i.e. what
    /// `serve_persisted` would wait for now; None where nothing is handed over.
    fn unserved(&self) -> Result<Option<u64>> {
        Ok(None)
    }
    fn committed(&self, job: &str) -> Result<Ledger>;
    /// Starts writing one chunk; nothing is visible until `commit`.
    fn begin_chunk(&self, job: &str, chunk: &ChunkRange) -> Result<Box<dyn ChunkWriter>>;
    /// After all chunks: indexes, sequences, final guards.
    /// Idempotent: a rerun after a kill at any point completes what is missing.
    fn finish(&self, source: &TableSpec, plan: &[ChunkRange], opts: &SinkOptions, fb: &dyn Feedback) -> Result<()>;
    /// Drops the target table (`generate --replace`).
    fn drop_table(&self) -> Result<()> {
        bail!("{} cannot drop tables", self.describe())
    }
    /// Changes per online batch this target works best with (each batch has a
    /// fixed cost: a transaction, or Milvus' flush).
    fn change_batch_rows(&self) -> usize {
        5_000
    }
    /// The target may hold rows this job wrote (committed or not): an online
    /// job's change capture must then resume, never start over.
    fn job_began(&self, job: &str) -> Result<bool> {
        Ok(!self.committed(job)?.is_empty() || self.applied_position(job)?.is_some())
    }
    /// The change-stream position this job applied last (online), with the
    /// changes applied so far; None before the first change.
    fn applied_position(&self, _job: &str) -> Result<Option<crate::contract::changes::AppliedPosition>> {
        Ok(None)
    }
    /// Applies a batch of changes (already in the target's schema) and records
    /// its position and counts in the ledger, atomically where the target has
    /// transactions. Idempotent: applying a batch again converges.
    fn apply_changes(&self, _job: &str, _set: &crate::contract::changes::ChangeSet) -> Result<()> {
        bail!("{} cannot apply online changes yet", self.describe())
    }
    /// Whether a batch may be applied while the batch before it is still
    /// being applied, on a session of its own (their keys are disjoint):
    /// `apply_changes_in_order` then writes it at once and holds its
    /// position and commit until `before_commit` says the one before is in.
    fn overlaps_changes(&self) -> bool {
        false
    }
    /// `apply_changes`, with the position recorded and the batch committed
    /// only once `before_commit` returns Ok; its error rolls the batch back.
    /// Without overlap, it waits first, then applies.
    fn apply_changes_in_order(
        &self,
        job: &str,
        set: &crate::contract::changes::ChangeSet,
        before_commit: &dyn Fn() -> Result<()>,
    ) -> Result<()> {
        before_commit()?;
        self.apply_changes(job, set)
    }
    /// Rows of a batch of changed rows (full images, in the target's schema)
    /// this target would refuse, with why: the checks its chunk writer makes,
    /// so that a changed row goes to rejects as a snapshot row does instead
    /// of stopping the apply.
    fn refused_changes(&self, _images: &RecordBatch) -> Result<Vec<RowReject>> {
        Ok(Vec::new())
    }
    /// Removes the job's ledger records (`reset`); returns how many.
    fn forget_job(&self, _job: &str) -> Result<u64> {
        Ok(0)
    }
    /// A subset job: the job owns only the target's rows matching `filter`.
    /// Clearing a chunk deletes its key range AND the filter, the guards
    /// count inside it, and a row whose id belongs to a row outside the
    /// subset is rejected, never overwritten. Called once, before `prepare`.
    fn restrict(&self, _filter: &crate::model::filter::Filter) -> Result<()> {
        bail!("{} cannot write a subset (--filter)", self.describe())
    }
}

/// An error and its sources on one line ("a: b: c"), as drivers nest them.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// A TLS failure anywhere in `e`'s chain, in the words a user acts on
/// (every backend's drivers use rustls). `host`: what was connected to;
/// `trusted`: where the trusted CAs came from, named as the URL names it.
pub fn tls_failure_text(e: &(dyn std::error::Error + 'static), host: &str, trusted: &str) -> Option<String> {
    use rustls::CertificateError as C;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        // io::Error hides the error it wraps from source(); look inside.
        let inner = err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()).map(|i| i as &(dyn std::error::Error + 'static));
        for candidate in [Some(err), inner].into_iter().flatten() {
            let Some(r) = candidate.downcast_ref::<rustls::Error>() else { continue };
            return Some(match r {
                rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
                    format!("the server's certificate is not signed by {trusted}")
                }
                rustls::Error::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
                    format!("the server's certificate does not name the host {host} (connect by a name the certificate holds)")
                }
                rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => "the server's certificate has expired".into(),
                rustls::Error::InvalidCertificate(other) => format!("the server's certificate was refused: {other:?}"),
                rustls::Error::AlertReceived(alert) => {
                    format!("the server ended the TLS handshake ({alert:?}); if it requires a client certificate, give one")
                }
                other => format!("TLS failed: {other}"),
            });
        }
        cur = err.source();
    }
    None
}

/// A row the target refused (found by bisecting a failed batch).
#[derive(Clone, Debug)]
pub struct RowReject {
    /// Row index within the batch given to `write`.
    pub row: usize,
    pub reason: String,
}

pub trait ChunkWriter: Send {
    /// Writes rows; returns those the target refused (they are not written).
    fn write(&mut self, batch: &RecordBatch) -> Result<Vec<RowReject>>;
    /// Makes the chunk durable together with its ledger record; returns the
    /// record as stored (a sink may add bytes and checksums).
    fn commit(self: Box<Self>, record: CommitRecord) -> Result<CommitRecord>;
}

/// Guard for a target that already holds rows but has no ledger for this job.
/// `job_wrote`: the target's ledger says this job has written to it, so its
/// rows are the job's own. Returns true when the target must be emptied first.
pub fn existing_rows_action(non_empty: bool, job_wrote: bool, opts: &SinkOptions, target: &str) -> Result<bool> {
    if job_wrote || !non_empty {
        return Ok(false);
    }
    match opts.on_existing {
        OnExisting::Fail => bail!(
            "target {target} already has rows and no vmig ledger for job {}; \
             choose --on-existing upsert (keep them, replace equal ids) or truncate (empty it first)",
            opts.job
        ),
        OnExisting::Truncate => Ok(true),
        OnExisting::Upsert => Ok(false),
    }
}

/// Whether `check_final_count` has anything to judge: a job's offline load
/// (an online target also holds the changes applied since, so its count says
/// nothing, and counting a large table would delay every resume).
pub fn final_count_due(opts: &SinkOptions) -> bool {
    !opts.job.is_empty() && !opts.online
}

/// Guard after the load: the target must not hold rows the job did not write.
pub fn check_final_count(target_rows: u64, ledger_rows: u64, opts: &SinkOptions, target: &str, fb: &dyn Feedback) -> Result<()> {
    if !final_count_due(opts) || target_rows <= ledger_rows {
        return Ok(());
    }
    let msg = format!(
        "target {target} has {target_rows} rows but this job wrote {ledger_rows}: {} rows did not come from the source",
        target_rows - ledger_rows
    );
    if opts.on_existing == OnExisting::Upsert {
        fb.say(&format!("warning: {msg} (kept, --on-existing upsert)"));
        Ok(())
    } else {
        bail!("{msg}")
    }
}

/// A subset job's rows whose id the target already gives to a row outside
/// the subset (another team's): refused, never overwritten. `foreign`
/// answers which of the given ids the target holds outside the filter.
pub fn refuse_foreign_ids(
    batch: &RecordBatch,
    pk: &str,
    filter: &crate::model::filter::Filter,
    foreign: &mut dyn FnMut(&[Key]) -> Result<Vec<Key>>,
) -> Result<Vec<RowReject>> {
    let keys = crate::contract::changes::keys_of(batch, pk)?;
    let taken: std::collections::HashSet<Key> = foreign(&keys)?.into_iter().collect();
    if taken.is_empty() {
        return Ok(Vec::new());
    }
    Ok(keys
        .iter()
        .enumerate()
        .filter(|(_, k)| taken.contains(k))
        .map(|(row, k)| RowReject {
            row,
            reason: format!("{pk} {k} already belongs to a target row outside the subset ({}); not overwritten", filter.describe()),
        })
        .collect())
}

/// `batch` without the refused rows.
pub fn without_rows(batch: &RecordBatch, refused: &[RowReject]) -> Result<RecordBatch> {
    if refused.is_empty() {
        return Ok(batch.clone());
    }
    let mut keep = vec![true; batch.num_rows()];
    for r in refused {
        keep[r.row] = false;
    }
    Ok(arrow::compute::filter_record_batch(batch, &arrow::array::BooleanArray::from(keep))?)
}
