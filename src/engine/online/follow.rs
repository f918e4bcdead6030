//! The online job: change capture set up before the snapshot is read, the
//! snapshot copied by the offline pipeline, then the source's changes
//! applied batch by batch (position in each target's ledger with the batch,
//! confirmed to the source only after every target has it), until a cutover
//! drains, finishes, verifies and removes the source's artefacts.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use arrow::record_batch::RecordBatch;

use crate::contract::{Sink, Source, without_rows};
use crate::contract::changes::{AppliedPosition, ChangeSet, ChangeStream, PositionUnit};
use crate::engine::online::CutoverCheck;
use crate::engine::pipeline::{JobConfig, PreparedJob, Target, finish_targets, load, lock_targets, plan_and_prepare, report, with_progress};
use crate::engine::transform::{Transformer, reject_batch, write_rejects};
use crate::model::{human_bytes, now_rfc3339};
use crate::model::retry::with_retries;
use crate::model::schema::TableSpec;
use crate::state::ledger::JobDir;
use crate::state::online::{CutoverRequest, OnlineState};
use crate::state::progress::{OnlineStatus, Progress, RETAINED_WARN_BYTES, Report};

/// Wait between two polls of a source with nothing new.
const IDLE_POLL: Duration = Duration::from_millis(200);

/// Sets up (or, on resume, reopens) a source's change capture; `committed`:
/// a target already holds part of this job, so a lost capture cannot be
/// silently recreated.
pub(crate) type OpenStream<'a> = Box<dyn FnOnce(&Progress, bool) -> Result<Box<dyn ChangeStream>> + 'a>;

/// Runs an online job until cutover (exit 0) or cancellation.
pub fn run_online(
    cfg: &JobConfig,
    source: Arc<dyn Source>,
    sinks: Vec<(String, Arc<dyn Sink>)>,
    open_stream: OpenStream<'_>,
    check: &dyn Fn() -> Result<CutoverCheck>,
    cancel: Arc<AtomicBool>,
) -> Result<Report> {
    let describe = (source.describe(), sinks.iter().map(|(_, s)| s.describe()).collect());
    with_progress(cfg, describe, |progress| {
        let locks = lock_targets(cfg, &sinks, progress)?;
        progress.set_phase("setting up change capture");
        let mut committed = false;
        for (_, s) in &sinks {
            committed |= s.job_began(&cfg.job)?;
        }
        let mut stream = open_stream(progress, committed)?;
        progress.println(&format!("change capture: {}", stream.artifacts()));
        let job = plan_and_prepare(cfg, source, sinks, progress)?;
        let mut loaded = load(cfg, &job, None, &cancel, progress, None);
        let mut error = loaded.error();
        if error.is_none() {
            progress.set_phase("finishing snapshot");
            error = finish_targets(cfg, &job, &cancel, progress);
        }
        if error.is_none() {
            match follow(cfg, &job, stream.as_mut(), &cancel, progress, check) {
                Ok(true) => {}
                Ok(false) => {
                    loaded.cancelled = true;
                    error = Some("stopped; the change stream resumes from its last applied position when the same command runs again".into());
                }
                Err(e) => error = Some(format!("{e:#}")),
            }
        }
        let mut r = report(cfg, &job, &loaded, error, progress);
        if let Some(o) = &progress.status.lock().unwrap().online {
            let c = &progress.counters;
            r.notes.push(format!(
                "changes applied: {} inserts, {} updates, {} deletes (this run: {:.1} s reading them from the source, {:.1} s applying)",
                o.applied.inserts,
                o.applied.updates,
                o.applied.deletes,
                c.change_read_ns.load(Relaxed) as f64 / 1e9,
                c.change_apply_ns.load(Relaxed) as f64 / 1e9
            ));
        }
        drop(locks);
        Ok(r)
    })
}

/// Follows the stream until a cutover completes (true) or the run is
/// cancelled (false).
fn follow(
    cfg: &JobConfig,
    job: &PreparedJob,
    stream: &mut dyn ChangeStream,
    cancel: &Arc<AtomicBool>,
    progress: &Arc<Progress>,
    check: &dyn Fn() -> Result<CutoverCheck>,
) -> Result<bool> {
    let dir = cfg.job_dir.clone();
    let mut applied: Vec<AppliedPosition> = Vec::new();
    for t in &job.targets {
        applied.push(t.sink.applied_position(&cfg.job)?.unwrap_or_default());
    }
    let start = applied.iter().map(|a| a.position).min().unwrap_or(0);
    stream.skip_to(start)?;
    let mut totals = applied.iter().map(|a| a.counts).max_by_key(|c| c.total()).unwrap_or_default();
    let mut rate = RateWindow::new(totals.total());
    // Commit-to-apply delay of the last applied transaction.
    let mut lag_seconds = 0.0;
    let mut behind_since: Option<Instant> = None;
    let mut last_stats: Option<Instant> = None;
    let mut drain_to: Option<u64> = None;
    let mut applied_position = start;
    let retry = |what: &str, f: &mut dyn FnMut() -> Result<()>| {
        with_retries(what, cfg.retry_for, 2, cancel, &|m| progress.println(m), f)
    };
    // Changes per batch (whole transactions: a large one exceeds it).
    let batch_changes = job.targets.iter().map(|t| t.sink.change_batch_rows()).max().unwrap_or(5_000);
    progress.set_phase("catching up");
    loop {
        if cancel.load(Relaxed) {
            return Ok(false);
        }
        if drain_to.is_none() {
            if let Some(end) = stream.ends_at()? {
                progress.println(&format!("the stream ends at {}: applying it, then cutting over", stream.format_position(end)));
                progress.set_phase("cutting over");
                drain_to = Some(end);
            } else if let Some(mut req) = CutoverRequest::load(&dir, &cfg.command)?.filter(|r| r.state == "requested") {
                let p = stream.current_position()?;
                req.position = Some(stream.format_position(p));
                req.save(&dir, &cfg.command)?;
                progress.println(&format!("cutover requested: draining to {}", stream.format_position(p)));
                progress.set_phase("cutting over");
                drain_to = Some(p);
            }
        }
        let upto = match drain_to {
            Some(p) => p,
            None => stream.current_position()?,
        };
        let mut batch = None;
        let read_started = Instant::now();
        retry("reading changes", &mut || {
            batch = Some(stream.next_batch(batch_changes, upto)?);
            Ok(())
        })?;
        let batch = batch.unwrap();
        let set = &batch.set;
        if set.has_rows() || set.counts.total() > 0 {
            progress.counters.change_read_ns.fetch_add(read_started.elapsed().as_nanos() as u64, Relaxed);
            let apply_started = Instant::now();
            for (i, t) in job.targets.iter().enumerate() {
                if applied[i].position >= set.position && !stream.idempotent() {
                    continue; // this target has it (a resume after a crash between targets)
                }
                retry(&format!("applying changes to {}", t.name), &mut || apply_to_target(cfg, t, set, progress))?;
                applied[i].position = set.position;
            }
            stream.confirm(set.position)?;
            progress.counters.change_apply_ns.fetch_add(apply_started.elapsed().as_nanos() as u64, Relaxed);
            applied_position = set.position;
            totals.add(&set.counts);
            if let Some(ts) = set.commit_time_us {
                lag_seconds = (chrono::Utc::now().timestamp_micros() - ts).max(0) as f64 / 1e6;
            }
        }
        let complete = batch.drained_to.is_some_and(|p| p >= upto);
        if let Some(p) = batch.drained_to {
            stream.confirm(p)?;
        }
        // Behind the source with nothing arriving: the delay grows from the
        // first empty read.
        if complete || set.has_rows() {
            behind_since = None;
        } else {
            let since = *behind_since.get_or_insert_with(Instant::now);
            lag_seconds = lag_seconds.max(since.elapsed().as_secs_f64());
        }
        let phase = if drain_to.is_some() {
            "cutting over"
        } else if set.counts.total() >= batch_changes as u64 || (!complete && lag_seconds > 5.0) {
            "catching up"
        } else {
            "following"
        };
        if progress.status.lock().unwrap().phase != phase {
            progress.set_phase(phase);
        }
        if last_stats.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) || complete && drain_to.is_some() {
            let stats = stream.stats()?;
            let mut st = progress.status.lock().unwrap();
            let warning = (stats.unit == PositionUnit::Bytes && stats.retained_bytes > RETAINED_WARN_BYTES).then(|| {
                format!(
                    "the source keeps {} of change log for this job ({}); it is freed as changes are applied, by cutover or by reset",
                    human_bytes(stats.retained_bytes),
                    stream.artifacts()
                )
            });
            st.online = Some(OnlineStatus {
                artifacts: stream.artifacts(),
                applied: totals,
                changes_per_second: rate.per_second(totals.total()),
                lag_bytes: stats.source_position.saturating_sub(stats.confirmed),
                lag_seconds,
                retained_bytes: stats.retained_bytes,
                applied_position: stream.format_position(applied_position.max(stats.confirmed)),
                source_position: stream.format_position(stats.source_position),
                unit: stats.unit,
                note: stats.note.clone(),
                warning,
            });
            drop(st);
            progress.write_status(None);
            last_stats = Some(Instant::now());
        }
        // What the position cannot see (Milvus deletes): every so often, and
        // once drained before the cutover verifies.
        let cutting = complete && drain_to.is_some();
        if let Some(set) = stream.reconcile(cutting)? {
            if set.has_rows() {
                for (i, t) in job.targets.iter().enumerate() {
                    let mut at_position = set.clone();
                    at_position.position = applied[i].position.max(applied_position);
                    retry(&format!("applying reconciled rows to {}", t.name), &mut || {
                        apply_to_target(cfg, t, &at_position, progress)
                    })?;
                }
                totals.add(&set.counts);
            }
        }
        if cutting {
            match cutover(cfg, job, stream, cancel, progress, check) {
                Ok(()) => return Ok(true),
                // Run by `vmig cutover` itself: nothing left to follow for.
                Err(e) if standalone_cutover(&dir, &cfg.command) => return Err(e),
                Err(e) => {
                    progress.println(&format!("error: {e:#}"));
                    drain_to = None;
                }
            }
        }
        if complete && !set.has_rows() {
            std::thread::sleep(IDLE_POLL);
        }
    }
}

fn standalone_cutover(dir: &std::path::Path, command: &str) -> bool {
    CutoverRequest::load(dir, command).ok().flatten().is_some_and(|r| r.standalone)
}

/// Drained: finish every target, verify, remove the source's artefacts.
fn cutover(
    cfg: &JobConfig,
    job: &PreparedJob,
    stream: &mut dyn ChangeStream,
    cancel: &Arc<AtomicBool>,
    progress: &Arc<Progress>,
    check: &dyn Fn() -> Result<CutoverCheck>,
) -> Result<()> {
    let dir = cfg.job_dir.clone();
    let fail = |msg: String| -> Result<()> {
        if let Some(mut req) = CutoverRequest::load(&dir, &cfg.command)? {
            req.state = "failed".into();
            req.message = Some(msg.clone());
            req.finished_at = Some(now_rfc3339());
            req.save(&dir, &cfg.command)?;
        }
        bail!("{msg}")
    };
    if let Some(e) = finish_targets(cfg, job, cancel, progress) {
        return fail(format!("cutover: finishing the target failed: {e}"));
    }
    progress.set_phase("verifying");
    let r = match check() {
        Ok(r) => r,
        Err(e) => return fail(format!("cutover: verify failed to run: {e:#}")),
    };
    if !r.equal {
        return fail(format!(
            "cutover: the target differs from the source after draining ({}); were writes to the source stopped? \
             The job keeps following; stop the writes and request the cutover again",
            r.differences
        ));
    }
    let artifacts = stream.artifacts();
    stream.drop_artifacts()?;
    let _ = std::fs::remove_file(OnlineState::path(&dir));
    let removed = if stream.removes_artifacts() { format!("; {artifacts} removed") } else { String::new() };
    let msg = format!("safe to switch: {}{removed}", r.summary);
    if let Some(mut req) = CutoverRequest::load(&dir, &cfg.command)? {
        req.state = "done".into();
        req.message = Some(msg.clone());
        req.finished_at = Some(now_rfc3339());
        req.save(&dir, &cfg.command)?;
    }
    progress.println(&msg);
    Ok(())
}

/// Transforms a change set for one target (bad rows, and rows the target
/// would refuse, to rejects) and applies it.
fn apply_to_target(cfg: &JobConfig, t: &Target, set: &ChangeSet, progress: &Progress) -> Result<()> {
    let mut rejects: Vec<RecordBatch> = Vec::new();
    // In the target's columns, as a chunk's "-refused" rejects are.
    let mut refused_rows: Vec<RecordBatch> = Vec::new();
    let mut out = ChangeSet { images: Vec::new(), partial: Vec::new(), ..set.clone() };
    for b in &set.images {
        let tr = t.transformer.apply(0, b)?;
        rejects.extend(tr.rejects);
        let refused = t.sink.refused_changes(&tr.valid)?;
        if refused.is_empty() {
            out.images.push(tr.valid);
        } else {
            let rows: Vec<u32> = refused.iter().map(|r| r.row as u32).collect();
            refused_rows.push(reject_batch(0, &tr.valid, &rows, refused.iter().map(|r| r.reason.clone()).collect())?);
            out.images.push(without_rows(&tr.valid, &refused)?);
        }
    }
    for b in &set.partial {
        let tr = Transformer::new(&columns_of(&t.spec, b)).apply(0, b)?;
        rejects.extend(tr.rejects);
        out.partial.push(tr.valid);
    }
    let n: u64 = rejects.iter().chain(&refused_rows).map(|b| b.num_rows() as u64).sum();
    if n > 0 {
        progress.counters.change_rows_rejected.fetch_add(n, Relaxed);
        let dir = JobDir::new(&cfg.job_dir).rejects();
        for (kind, batches) in [("changes", &rejects), ("refused-changes", &refused_rows)] {
            if !batches.is_empty() {
                write_rejects(&dir, &format!("{}-{}-{kind}-{:016X}", cfg.command, t.name, set.position), 0, batches)?;
            }
        }
        progress.println(&format!(
            "{n} changed rows refused by {} (in rejects/; the target keeps their previous version)",
            t.name
        ));
    }
    t.sink.apply_changes(&cfg.job, &out)
}

/// The target spec narrowed to the columns a partial batch carries.
fn columns_of(spec: &TableSpec, batch: &RecordBatch) -> TableSpec {
    let names: Vec<&str> = batch.schema_ref().fields().iter().map(|f| f.name().as_str()).collect();
    TableSpec {
        name: spec.name.clone(),
        columns: spec.columns.iter().filter(|c| names.contains(&c.name.as_str())).cloned().collect(),
        primary_key: spec.primary_key.clone(),
        indexes: Vec::new(),
        computed: Vec::new(), partition_key: None,
    }
}

/// Changes per second over the last ~10 seconds.
struct RateWindow {
    samples: Mutex<Vec<(Instant, u64)>>,
}

impl RateWindow {
    fn new(total: u64) -> Self {
        RateWindow { samples: Mutex::new(vec![(Instant::now(), total)]) }
    }
    fn per_second(&mut self, total: u64) -> f64 {
        let s = self.samples.get_mut().unwrap();
        let now = Instant::now();
        s.push((now, total));
        while s.len() > 2 && now.duration_since(s[0].0) > Duration::from_secs(10) {
            s.remove(0);
        }
        let (t0, n0) = s[0];
        let secs = now.duration_since(t0).as_secs_f64();
        if secs < 1e-3 { 0.0 } else { (total - n0) as f64 / secs }
    }
}
