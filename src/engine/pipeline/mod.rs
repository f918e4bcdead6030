//! The dataflow: export → transform → import per chunk, with bounded
//! crossbeam channels between the stages (a slow sink slows the source),
//! `workers` chunks in flight, cancellation, retries and the final report.

pub mod shared;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use arrow::record_batch::RecordBatch;
use crossbeam_channel::bounded;

use crate::contract::{OnExisting, Sink, SinkOptions, Source};
use crate::contract::commit::{CommitRecord, Ledger, check_ledger_matches_plan};
use crate::engine::transform::{Transformer, reject_batch, write_rejects};
use crate::model::now_rfc3339;
use crate::model::hash::{ContentHash, row_hashes};
use crate::model::plan::ChunkRange;
use crate::model::retry::{Cancelled, with_retries};
use crate::model::schema::{TableSpec, estimate_row_bytes};
use crate::state::claims::{Claim, Coordinator, Distributed, WorkerInfo};
use crate::state::ledger::JobDir;
use crate::state::manifest::Manifest;
use crate::state::progress::{ChunkFailure, Progress, Report, StageReport, Status, peak_rss_mb};
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

/// Retries of a chunk that failed for another reason than an unreachable server.
const QUICK_RETRIES: u32 = 2;

/// A sink plus what the pipeline learned about it at start.
pub struct Target {
    pub sink: Arc<dyn Sink>,
    pub name: String,
    /// The target table's spec (what rows must satisfy).
    pub spec: TableSpec,
    pub transformer: Transformer,
    pub committed: Mutex<Ledger>,
}

/// Rows-per-second limiter shared by all readers.
struct RateLimit {
    rows_per_sec: u64,
    state: Mutex<(Instant, u64)>,
}

impl RateLimit {
    fn wait(&self, rows: u64) {
        let due = {
            let mut s = self.state.lock().unwrap();
            s.1 += rows;
            s.0 + Duration::from_secs_f64(s.1 as f64 / self.rows_per_sec as f64)
        };
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
    }
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

/// Runs a job to completion (or cancellation); returns a report unless it
/// could not start (plan, lock or target preparation failed).
pub fn run(
    cfg: &JobConfig,
    source: Arc<dyn Source>,
    sinks: Vec<(String, Arc<dyn Sink>)>,
    ready: Option<BTreeSet<u32>>,
    cancel: Arc<AtomicBool>,
) -> Result<Report> {
    let describe = (source.describe(), sinks.iter().map(|(_, s)| s.describe()).collect());
    with_progress(cfg, describe, |progress| {
        let Some(dist) = &cfg.distributed else {
            let locks = lock_targets(cfg, &sinks, progress)?;
            let job = plan_and_prepare(cfg, source, sinks, progress)?;
            let loaded = load(cfg, &job, ready.as_ref(), &cancel, progress, None);
            let mut error = loaded.error();
            if error.is_none() {
                progress.set_phase("finishing");
                error = finish_targets(cfg, &job, &cancel, progress);
            }
            let report = report(cfg, &job, &loaded, error, progress);
            drop(locks);
            return Ok(report);
        };
        // A shared job: no job locks (other workers are welcome); claims in the store.
        let coord = Coordinator::new(cfg.store.sub(&format!("work/{}", cfg.lane)), dist.clone());
        progress.own_status();
        let stop = Arc::new(AtomicBool::new(false));
        let beat = {
            let (c, p, lane, shard) = (coord.clone(), progress.clone(), cfg.lane.clone(), dist.describe_shard());
            coord.spawn_heartbeat(stop.clone(), move || {
                let info = WorkerInfo {
                    worker: c.me.clone(),
                    host: crate::state::claims::host_name(),
                    lane: lane.clone(),
                    shard: shard.clone(),
                    claims: c.held_chunks(),
                    takeovers: c.takeovers.load(Relaxed),
                    lost_claims: c.lost.load(Relaxed),
                    heartbeat_ms: crate::state::claims::now_ms(),
                    lease_ms: c.cfg.lease.as_millis() as i64,
                };
                p.status_json(Some(info))
            })
        };
        let result = (|| {
            let job = crate::engine::pipeline::shared::plan_and_prepare_shared(cfg, &coord, source, sinks, progress, &cancel)?;
            let loaded = load(cfg, &job, ready.as_ref(), &cancel, progress, Some(&coord));
            let mut error = loaded.error();
            let mut finished = true;
            if error.is_none() {
                match crate::engine::pipeline::shared::finish_shared(cfg, &coord, &job, &cancel, progress) {
                    Ok(done) => finished = done,
                    Err(e) => error = Some(format!("{e:#}")),
                }
            }
            let mut r = report(cfg, &job, &loaded, error, progress);
            if !finished {
                r.notes.push(format!(
                    "shard {} is done; chunks of other shards remain, and the worker that commits the last one runs the finish",
                    dist.describe_shard().unwrap_or_default()
                ));
            }
            Ok(r)
        })();
        stop.store(true, Relaxed);
        let _ = beat.join();
        result
    })
}

/// Runs `body` with the live display, the status file and its ticker; a
/// run that could not start leaves its error in the status file.
/// `describe`: the source's and the targets' descriptions.
pub fn with_progress(
    cfg: &JobConfig,
    describe: (String, Vec<String>),
    body: impl FnOnce(&Arc<Progress>) -> Result<Report>,
) -> Result<Report> {
    JobDir::new(&cfg.job_dir).create()?;
    let status = Status {
        job: cfg.job.clone(),
        command: cfg.command.clone(),
        state: "running".into(),
        pid: std::process::id(),
        source: describe.0,
        targets: describe.1,
        started_at: now_rfc3339(),
        ..Default::default()
    };
    let progress = Arc::new(Progress::new(status, JobDir::new(&cfg.job_dir).status(&cfg.command), cfg.quiet));
    // The ticker keeps the status file and the display fresh through every
    // phase, index builds included.
    let ticker = {
        let p = progress.clone();
        std::thread::spawn(move || p.run_ticker())
    };
    let metrics = match &cfg.metrics {
        Some(addr) => Some(crate::state::metrics::serve(addr, &cfg.job, progress.clone())?),
        None => None,
    };
    let result = body(&progress);
    if let Some(stop) = metrics {
        stop.store(true, Relaxed);
    }
    if let Err(e) = &result {
        progress.status.lock().unwrap().last_error = Some(format!("{e:#}"));
        progress.write_status(Some("failed"));
    }
    progress.stop();
    let _ = ticker.join();
    result
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
    };
    progress.set_plan(plan.len() as u64, plan.iter().map(|c| c.rows).sum());

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
    Ok(PreparedJob { manifest, plan, spec, opts, source, targets })
}

/// One note per source index no target gets, said before the load and kept in the report.
fn indexes_not_carried(source: &dyn Source) -> Vec<String> {
    source
        .indexes_not_carried()
        .into_iter()
        .map(|def| format!("source index not carried to the target (vmig recreates plain btree and vector indexes only): {def}"))
        .collect()
}

/// How the load of the plan's chunks ended.
pub struct Loaded {
    pub cancelled: bool,
    pub failed: bool,
    /// Chunks not exported yet (an import running beside its export).
    pub pending: u64,
    pub seconds: f64,
    pub last_error: Option<String>,
}

impl Loaded {
    /// Why the job cannot go on to its finish, if it cannot.
    pub fn error(&self) -> Option<String> {
        if self.cancelled {
            Some("cancelled; committed chunks are kept, run the same command again to resume".into())
        } else if self.failed {
            self.last_error.clone()
        } else if self.pending > 0 {
            Some(format!("{} chunks are not exported yet; run import again when export has finished", self.pending))
        } else {
            None
        }
    }
}

/// Copies every chunk not yet committed in every target (`ready`: only
/// these chunks exist yet), `workers` chunks at a time.
pub fn load(
    cfg: &JobConfig,
    job: &PreparedJob,
    ready: Option<&BTreeSet<u32>>,
    cancel: &Arc<AtomicBool>,
    progress: &Arc<Progress>,
    coord: Option<&Coordinator>,
) -> Loaded {
    let targets = &job.targets;
    let source = &job.source;
    // What is left to do; chunks committed in every target are skipped.
    let mut todo = Vec::new();
    let mut pending = 0u64;
    for c in job.plan.iter().filter(|c| cfg.distributed.as_ref().is_none_or(|d| d.in_shard(c.id))) {
        let done_everywhere = targets.iter().all(|t| t.committed.lock().unwrap().contains_key(&c.id));
        if done_everywhere {
            progress.counters.chunks_skipped.fetch_add(1, Relaxed);
            let rows = targets[0].committed.lock().unwrap()[&c.id].rows;
            progress.counters.rows_skipped.fetch_add(rows, Relaxed);
        } else if ready.is_some_and(|r| !r.contains(&c.id)) && coord.is_none() {
            pending += 1;
        } else {
            todo.push(c.clone());
        }
    }
    if progress.counters.chunks_skipped.load(Relaxed) > 0 {
        progress.println(&format!(
            "{}: {} chunks ({} rows) already committed, skipped",
            if coord.is_some() { "shared job" } else { "resuming" },
            progress.counters.chunks_skipped.load(Relaxed),
            progress.counters.rows_skipped.load(Relaxed)
        ));
    }

    progress.set_phase(if cfg.online { "snapshot" } else { "loading" });
    let rate = cfg.rate_limit.map(|r| RateLimit { rows_per_sec: r.max(1), state: Mutex::new((Instant::now(), 0)) });
    let (work_tx, work_rx) = crossbeam_channel::unbounded::<ChunkRange>();
    if coord.is_none() {
        for c in &todo {
            work_tx.send(c.clone()).unwrap();
        }
    }
    drop(work_tx);
    let failed = AtomicBool::new(false);
    let settling = crate::engine::pipeline::shared::Settling::default();
    // A shared import waits for chunks its export is still writing.
    let exported = crate::engine::pipeline::shared::Exported::new(ready.cloned());
    // The next chunk of this lane: from the queue, or claimed in the store.
    let next = || -> Option<(ChunkRange, Option<Claim>)> {
        match coord {
            None => work_rx.recv().ok().map(|c| (c, None)),
            Some(co) => crate::engine::pipeline::shared::next_claimed(cfg, job, co, &todo, &settling, &exported, cancel, &failed, progress)
                .map(|(c, cl)| (c, Some(cl))),
        }
    };
    let load_started = Instant::now();
    std::thread::scope(|s| {
        let mut lanes = Vec::new();
        for _ in 0..cfg.workers.max(1) {
            lanes.push(s.spawn(|| {
                while let Some((chunk, claim)) = next() {
                    let _worker = cfg.permits.as_ref().map(|p| p.acquire());
                    if cancel.load(Relaxed) || failed.load(Relaxed) {
                        break;
                    }
                    let res = with_retries(
                        &format!("chunk {}", chunk.id),
                        cfg.retry_for,
                        QUICK_RETRIES,
                        cancel,
                        &|m| progress.println(m),
                        || {
                            // Another worker may have committed it meanwhile (a lease ran out).
                            if coord.is_some() && crate::engine::pipeline::shared::committed_everywhere(cfg, job, &chunk)? {
                                return Ok(());
                            }
                            run_chunk(cfg, source.as_ref(), targets, &chunk, progress, cancel, rate.as_ref())
                        },
                    );
                    if let (Some(co), Some(cl)) = (coord, claim) {
                        if res.is_ok() {
                            settling.hold(chunk.id, cl);
                        } else if let Err(e) = co.release(cl) {
                            progress.println(&format!("warning: chunk {}: releasing its claim: {e:#}", chunk.id));
                        }
                    }
                    match res {
                        Ok(()) => {}
                        Err(e) if e.is::<Cancelled>() || cancel.load(Relaxed) => break,
                        Err(e) => {
                            let msg = format!("chunk {}: {e:#}", chunk.id);
                            progress.println(&format!("error: {msg}"));
                            let mut st = progress.status.lock().unwrap();
                            st.failures.push(ChunkFailure { chunk: chunk.id, error: format!("{e:#}") });
                            st.last_error = Some(msg);
                            failed.store(true, Relaxed);
                            break;
                        }
                    }
                }
            }));
        }
        for l in lanes {
            let _ = l.join();
        }
    });
    if let Some(co) = coord {
        if let Err(e) = crate::engine::pipeline::shared::settle_and_release(cfg, job, co, &settling) {
            let msg = format!("settling committed chunks: {e:#}");
            progress.println(&format!("error: {msg}"));
            progress.status.lock().unwrap().last_error = Some(msg);
            failed.store(true, Relaxed);
        }
    }
    Loaded {
        cancelled: cancel.load(Relaxed),
        failed: failed.load(Relaxed),
        pending: pending + exported.missing.load(Relaxed),
        seconds: load_started.elapsed().as_secs_f64(),
        last_error: progress.status.lock().unwrap().last_error.clone(),
    }
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

/// Final state, status file and report. `error`: why the job did not
/// complete (None: it did).
pub fn report(cfg: &JobConfig, job: &PreparedJob, loaded: &Loaded, mut error: Option<String>, progress: &Arc<Progress>) -> Report {
    let targets = &job.targets;
    let mut notes = indexes_not_carried(job.source.as_ref());
    // Totals over the whole job (this run and earlier ones), from the ledgers.
    let rejected_total: u64 = targets
        .iter()
        .map(|t| t.committed.lock().unwrap().values().map(|r| r.rejected).sum::<u64>())
        .max()
        .unwrap_or(0)
        + progress.counters.change_rows_rejected.load(Relaxed);
    if rejected_total > 0 {
        notes.push(format!(
            "{rejected_total} rows were rejected; they are in {}",
            JobDir::new(&cfg.job_dir).rejects().display()
        ));
    }
    if !cfg.vectors_exact {
        notes.push("vectors are not bit-exact copies of the source (see verify's tolerance)".into());
    }
    if error.is_none() && rejected_total > cfg.max_rejects {
        error = Some(format!("{rejected_total} rows rejected, more than --max-rejects {}", cfg.max_rejects));
    }
    let state = if loaded.cancelled {
        "cancelled"
    } else if error.is_some() {
        "failed"
    } else {
        "done"
    };
    if let Some(e) = &error {
        progress.status.lock().unwrap().last_error = Some(e.clone());
    }
    progress.write_status(Some(state));
    if state == "done" {
        progress.set_phase("done");
    }

    let c = &progress.counters;
    let written = c.rows_written.load(Relaxed);
    let stages = vec![
        StageReport {
            stage: "export".into(),
            rows: c.rows_read.load(Relaxed),
            bytes: c.bytes_read.load(Relaxed),
            seconds: c.read_ns.load(Relaxed) as f64 / 1e9,
            ..Default::default()
        },
        StageReport {
            stage: "transform".into(),
            rows: c.rows_transformed.load(Relaxed),
            rejected: c.rows_rejected.load(Relaxed),
            ..Default::default()
        },
        StageReport {
            stage: "import".into(),
            rows: written,
            skipped_committed: c.rows_skipped.load(Relaxed),
            bytes: c.bytes_written.load(Relaxed),
            seconds: c.write_ns.load(Relaxed) as f64 / 1e9,
            ..Default::default()
        },
    ];
    Report {
        job: cfg.job.clone(),
        command: cfg.command.clone(),
        ok: error.is_none(),
        source: job.source.describe(),
        targets: targets.iter().map(|t| format!("{}: {}", t.name, t.sink.describe())).collect(),
        stages,
        chunks_total: job.plan.len() as u64,
        chunks_committed: c.chunks_committed.load(Relaxed),
        chunks_skipped: c.chunks_skipped.load(Relaxed),
        chunks_pending: loaded.pending,
        rows_rejected_total: rejected_total,
        load_seconds: loaded.seconds,
        finish_seconds: c.finish_ns.load(Relaxed) as f64 / 1e9,
        finish_phases: progress.finish_phases(),
        total_seconds: progress.elapsed(),
        rows_per_second: written as f64 / loaded.seconds.max(1e-9),
        peak_rss_mb: peak_rss_mb(),
        vectors_exact: cfg.vectors_exact,
        notes,
        error,
    }
}

/// Bytes of a batch's values (a slice counts only its part of shared buffers).
fn batch_bytes(batch: &RecordBatch) -> u64 {
    batch
        .columns()
        .iter()
        .map(|c| c.to_data().get_slice_memory_size().unwrap_or_else(|_| c.get_array_memory_size()) as u64)
        .sum()
}

/// One chunk through the three stages; commits it in every target that lacks it.
fn run_chunk(
    cfg: &JobConfig,
    source: &dyn Source,
    targets: &[Arc<Target>],
    chunk: &ChunkRange,
    progress: &Progress,
    cancel: &AtomicBool,
    rate: Option<&RateLimit>,
) -> Result<()> {
    let needed: Vec<&Arc<Target>> =
        targets.iter().filter(|t| !t.committed.lock().unwrap().contains_key(&chunk.id)).collect();
    let mut writers = needed
        .iter()
        .map(|t| t.sink.begin_chunk(&cfg.job, chunk))
        .collect::<Result<Vec<_>>>()?;
    let (raw_tx, raw_rx) = bounded::<RecordBatch>(cfg.channel_batches);
    let (out_tx, out_rx) = bounded::<Vec<RecordBatch>>(cfg.channel_batches);
    let counters = &progress.counters;
    let mut refused_hash = vec![ContentHash::default(); writers.len()];
    let mut refused_rows: Vec<Vec<RecordBatch>> = vec![Vec::new(); writers.len()];

    let (read_res, transform_res, write_res) = std::thread::scope(|s| {
        let reader = s.spawn(move || {
            let started = Instant::now();
            let r = source.read_chunk(chunk, cfg.batch_rows, &mut |batch| {
                if cancel.load(Relaxed) {
                    return Err(Cancelled.into());
                }
                if let Some(r) = rate {
                    r.wait(batch.num_rows() as u64);
                }
                counters.rows_read.fetch_add(batch.num_rows() as u64, Relaxed);
                counters.bytes_read.fetch_add(batch_bytes(&batch), Relaxed);
                raw_tx.send(batch).map_err(|_| anyhow!("writer stopped"))
            });
            counters.read_ns.fetch_add(started.elapsed().as_nanos() as u64, Relaxed);
            r
        });
        let transformer = s.spawn(move || -> Result<(Vec<ContentHash>, Vec<Vec<RecordBatch>>)> {
            let mut hashes = vec![ContentHash::default(); needed.len()];
            let mut rejects: Vec<Vec<RecordBatch>> = vec![Vec::new(); needed.len()];
            for batch in raw_rx {
                let mut outs = Vec::with_capacity(needed.len());
                for (i, t) in needed.iter().enumerate() {
                    let tr = t.transformer.apply(chunk.id, &batch)?;
                    hashes[i].add_batch(&tr.valid);
                    if let Some(r) = tr.rejects {
                        if i == 0 {
                            counters.rows_rejected.fetch_add(r.num_rows() as u64, Relaxed);
                        }
                        rejects[i].push(r);
                    }
                    outs.push(tr.valid);
                }
                counters.rows_transformed.fetch_add(batch.num_rows() as u64, Relaxed);
                if out_tx.send(outs).is_err() {
                    bail!("writer stopped");
                }
            }
            Ok((hashes, rejects))
        });
        let started = Instant::now();
        let mut write_res = Ok(());
        'batches: for outs in out_rx.iter() {
            for (i, (w, b)) in writers.iter_mut().zip(&outs).enumerate() {
                match w.write(b) {
                    Ok(refused) if refused.is_empty() => {}
                    // Rows the target refused: out of the chunk's hash, into its rejects.
                    Ok(refused) => {
                        let hashes = row_hashes(b);
                        for r in &refused {
                            refused_hash[i].add_row(hashes[r.row]);
                        }
                        if i == 0 {
                            counters.rows_rejected.fetch_add(refused.len() as u64, Relaxed);
                        }
                        let rows: Vec<u32> = refused.iter().map(|r| r.row as u32).collect();
                        let reasons = refused.into_iter().map(|r| r.reason).collect();
                        match reject_batch(chunk.id, b, &rows, reasons) {
                            Ok(rb) => refused_rows[i].push(rb),
                            Err(e) => {
                                write_res = Err(e);
                                break 'batches;
                            }
                        }
                    }
                    Err(e) => {
                        write_res = Err(e);
                        break 'batches; // dropping out_rx stops the transform and then the reader
                    }
                }
            }
        }
        drop(out_rx);
        counters.write_ns.fetch_add(started.elapsed().as_nanos() as u64, Relaxed);
        (reader.join().unwrap(), transformer.join().unwrap(), write_res)
    });
    // The first real cause wins over the "stopped" errors it provoked downstream.
    write_res?;
    let (hashes, rejects) = transform_res?;
    read_res?;
    if cancel.load(Relaxed) {
        return Err(Cancelled.into());
    }

    let needed: Vec<&Arc<Target>> =
        targets.iter().filter(|t| !t.committed.lock().unwrap().contains_key(&chunk.id)).collect();
    for (i, (((t, w), h), rj)) in needed.iter().zip(writers).zip(hashes).zip(rejects).enumerate() {
        let h = h.without(&refused_hash[i]);
        let rejected: u64 = rj.iter().map(|b| b.num_rows() as u64).sum::<u64>() + refused_hash[i].rows;
        let rejects_dir = JobDir::new(&cfg.job_dir).rejects();
        write_rejects(&rejects_dir, &format!("{}-{}", cfg.command, t.name), chunk.id, &rj)?;
        write_rejects(&rejects_dir, &format!("{}-{}-refused", cfg.command, t.name), chunk.id, &refused_rows[i])?;
        let rec = w.commit(CommitRecord {
            chunk: chunk.id,
            lo: chunk.lo,
            hi: chunk.hi,
            rows: h.rows,
            rejected,
            content_hash: h.hex(),
            bytes: 0,
            sha256: None,
            file: None,
            committed_at: String::new(),
        })?;
        counters.bytes_written.fetch_add(rec.bytes, Relaxed);
        if Arc::ptr_eq(t, needed.last().unwrap()) {
            counters.rows_written.fetch_add(rec.rows, Relaxed);
        }
        t.committed.lock().unwrap().insert(chunk.id, rec);
    }
    counters.chunks_committed.fetch_add(1, Relaxed);
    Ok(())
}
