//! A job before and after its chunks move: its settings, the plan (made once
//! and saved), the targets locked and prepared, and the finish (indexes,
//! sequences, final guards) once every chunk is committed.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::contract::{OnExisting, Sink, SinkOptions, Source};
use crate::contract::commit::{Ledger, check_ledger_matches_plan};
use crate::engine::transform::Transformer;
use crate::model::now_rfc3339;
use crate::model::plan::ChunkRange;
use crate::model::retry::with_retries;
use crate::model::schema::{TableSpec, estimate_row_bytes};
use crate::state::claims::Distributed;
use crate::state::manifest::Manifest;
use crate::state::progress::Progress;
use crate::state::store::Store;

#[derive(Clone, Debug)]
pub struct JobConfig {
    /// migrate, export or import
    pub command: String,
    pub job: String,
    pub job_dir: PathBuf,
    pub workers: usize,
    pub chunk_rows: u64,
    pub batch_rows: usize,
    /// Batches buffered between two stages, per worker.
    pub channel_batches: usize,
    pub on_existing: OnExisting,
    pub max_rejects: u64,
    /// Rows per second over all workers (protects a production source).
    pub rate_limit: Option<u64>,
    pub create_indexes: bool,
    /// `--index-memory`: most memory an index build may use.
    pub index_memory: Option<u64>,
    /// PostgreSQL targets' vector storage (`--vector-storage`).
    pub vector_storage: Option<crate::contract::VectorStorage>,
    /// How long a chunk or the finish keeps retrying while the servers are
    /// unreachable (a restart), with backoff.
    pub retry_for: Duration,
    pub quiet: bool,
    /// Vectors are bit-exact copies of the source's storage.
    pub vectors_exact: bool,
    /// Snapshot, then follow the source's changes until cutover.
    pub online: bool,
    /// Serve Prometheus metrics on this address while the job runs.
    pub metrics: Option<String>,
    /// Where the job's manifest lives (the staging area, the `--state`
    /// store, or the local job directory), and with it a shared job's claims.
    pub store: Store,
    /// Set when several workers share the job (see claims.rs).
    pub distributed: Option<Distributed>,
    /// The shared job's lane in the store (`work/<lane>`): export, or one per target.
    pub lane: String,
    /// A subset job's filter (source and targets are restricted to it).
    pub filter: Option<crate::model::filter::Filter>,
    /// Chunks in flight across the tables of a many-table job (each chunk
    /// holds one); None: this job's own workers only.
    pub permits: Option<Arc<Permits>>,
}

/// Counting semaphore: the workers several jobs share.
#[derive(Debug)]
pub struct Permits {
    free: Mutex<usize>,
    freed: std::sync::Condvar,
}

impl Permits {
    pub fn new(n: usize) -> Permits {
        Permits { free: Mutex::new(n.max(1)), freed: std::sync::Condvar::new() }
    }

    /// Waits for a free worker; it is given back when the guard drops.
    pub fn acquire(&self) -> PermitGuard<'_> {
        let mut free = self.free.lock().unwrap();
        while *free == 0 {
            free = self.freed.wait(free).unwrap();
        }
        *free -= 1;
        PermitGuard(self)
    }
}

pub struct PermitGuard<'a>(&'a Permits);

impl Drop for PermitGuard<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap() += 1;
        self.0.freed.notify_one();
    }
}

/// A sink plus what the pipeline learned about it at start.
pub struct Target {
    pub sink: Arc<dyn Sink>,
    pub name: String,
    /// The target table's spec (what rows must satisfy).
    pub spec: TableSpec,
    pub transformer: Transformer,
    pub committed: Mutex<Ledger>,
}

/// Loads the job's manifest (resume) or plans the job and saves it.
pub fn load_or_plan(cfg: &JobConfig, source: &dyn Source) -> Result<Manifest> {
    if let Some(m) = Manifest::load(&cfg.store)? {
        if m.job != cfg.job {
            bail!(
                "{} belongs to job {}, not {}; choose another directory or `vmig reset` it",
                cfg.store.describe(),
                m.job,
                cfg.job
            );
        }
        let filter = cfg.filter.as_ref().map(|f| f.describe());
        if m.filter != filter {
            let said = |f: &Option<String>| f.as_ref().map_or("the whole table".to_string(), |f| format!("the subset {f}"));
            bail!(
                "job {} was planned for {}, and this run asks for {}; run it with the same filter, or choose another --job",
                cfg.job,
                said(&m.filter),
                said(&filter)
            );
        }
        if m.table.columns != source.spec().columns || m.table.primary_key != source.spec().primary_key {
            bail!(
                "the source table's columns changed since job {} was planned; run `vmig reset` to start over",
                cfg.job
            );
        }
        return Ok(m);
    }
    let plan = source.plan(cfg.chunk_rows)?;
    let m = Manifest {
        format_version: crate::state::manifest::FORMAT_VERSION,
        job: cfg.job.clone(),
        created_at: now_rfc3339(),
        source: source.describe(),
        table: source.spec().clone(),
        chunk_rows: cfg.chunk_rows,
        plan,
        vector_encoding: "FixedSizeList<Float32> little-endian (halfvec widened exactly)".into(),
        vectors_exact: cfg.vectors_exact,
        filter: cfg.filter.as_ref().map(|f| f.describe()),
    };
    // Create-only: of workers planning at once, the first plan stands.
    if !m.create(&cfg.store)? {
        return load_or_plan(cfg, source);
    }
    Ok(m)
}

/// Takes the job's lock in every target (held while the guards live): one
/// run of a job per target at a time. From then on this run owns the status.
pub fn lock_targets(
    cfg: &JobConfig,
    sinks: &[(String, Arc<dyn Sink>)],
    progress: &Arc<Progress>,
) -> Result<Vec<Box<dyn std::any::Any + Send>>> {
    let mut locks = Vec::new();
    for (_, sink) in sinks {
        locks.push(sink.lock_job(&cfg.job, progress.as_ref())?);
    }
    progress.own_status();
    Ok(locks)
}

/// A job whose plan is made and whose targets are prepared.
pub struct PreparedJob {
    pub manifest: Manifest,
    pub plan: Vec<ChunkRange>,
    pub spec: TableSpec,
    pub opts: SinkOptions,
    pub source: Arc<dyn Source>,
    pub targets: Vec<Arc<Target>>,
}

/// Plans the job (or loads its plan) and prepares every target.
pub fn plan_and_prepare(
    cfg: &JobConfig,
    source: Arc<dyn Source>,
    sinks: Vec<(String, Arc<dyn Sink>)>,
    progress: &Arc<Progress>,
) -> Result<PreparedJob> {
    progress.set_phase("planning");
    let manifest = load_or_plan(cfg, source.as_ref())?;
    let plan = manifest.plan.clone();
    let spec = source.spec().clone();
    let opts = SinkOptions {
        job: cfg.job.clone(),
        on_existing: cfg.on_existing,
        create_indexes: cfg.create_indexes,
        online: cfg.online,
        shared: cfg.distributed.is_some(),
        index_memory: cfg.index_memory,
        vector_storage: cfg.vector_storage,
    };
    progress.set_plan(plan.len() as u64, plan.iter().map(|c| c.rows).sum());
    let ids: Vec<u32> = plan.iter().map(|c| c.id).collect();
    progress.set_chunks(&ids, |id| cfg.distributed.as_ref().is_none_or(|d| d.in_shard(id)));

    progress.set_phase("preparing target");
    let mut targets = Vec::new();
    for (name, sink) in sinks {
        let target_spec = sink.prepare(&spec, &plan, &opts)?;
        let committed = sink.committed(&cfg.job)?;
        check_ledger_matches_plan(&committed, &plan, &sink.describe())?;
        targets.push(Arc::new(Target {
            transformer: Transformer::new(&target_spec),
            spec: target_spec,
            sink,
            name,
            committed: Mutex::new(committed),
        }));
    }

    let row_bytes = estimate_row_bytes(&spec);
    let bound = cfg.workers * 2 * cfg.channel_batches * cfg.batch_rows * row_bytes;
    progress.println(&format!(
        "vmig {}: job {} · {} → {} · {} chunks of ≤{} rows · {} workers · memory bound ≈ {} MB in channels \
         ({} workers × 2 channels × {} batches × {} rows × {:.1} KB)",
        cfg.command,
        cfg.job,
        source.describe(),
        targets.iter().map(|t| t.sink.describe()).collect::<Vec<_>>().join(" + "),
        plan.len(),
        manifest.chunk_rows,
        cfg.workers,
        bound / 1_000_000,
        cfg.workers,
        cfg.channel_batches,
        cfg.batch_rows,
        row_bytes as f64 / 1000.0
    ));
    for note in indexes_not_carried(source.as_ref()) {
        progress.println(&format!("note: {note}"));
    }
    for note in targets.iter().flat_map(|t| t.sink.prepare_notes()) {
        progress.println(&note);
    }
    Ok(PreparedJob { manifest, plan, spec, opts, source, targets })
}

/// One note per source index no target gets, said before the load and kept in the report.
pub fn indexes_not_carried(source: &dyn Source) -> Vec<String> {
    source
        .indexes_not_carried()
        .into_iter()
        .map(|def| format!("source index not carried to the target (vmig recreates plain btree and vector indexes only): {def}"))
        .collect()
}

/// Indexes, sequences and final guards in every target; the error, if any.
pub fn finish_targets(cfg: &JobConfig, job: &PreparedJob, cancel: &Arc<AtomicBool>, progress: &Arc<Progress>) -> Option<String> {
    let started = Instant::now();
    let mut error = None;
    progress.begin_finish_timing();
    for t in &job.targets {
        let res = with_retries(
            &format!("finishing {}", t.sink.describe()),
            cfg.retry_for,
            0,
            cancel,
            &|m| progress.println(m),
            || t.sink.finish(&job.spec, &job.plan, &job.opts, progress.as_ref()),
        );
        if let Err(e) = res {
            error = Some(format!("{}: {e:#}", t.sink.describe()));
            break;
        }
    }
    progress.end_finish_timing();
    progress.counters.finish_ns.fetch_add(started.elapsed().as_nanos() as u64, Relaxed);
    error
}
