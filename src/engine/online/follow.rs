//! The online job: change capture set up before the snapshot is read, the
//! snapshot copied by the offline pipeline, then the source's changes
//! applied batch by batch (position in each target's ledger with the batch,
//! confirmed to the source only after every target has it), until a cutover
//! drains, finishes, verifies and removes the source's artefacts.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::thread::{Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::contract::{Sink, Source};
use crate::contract::changes::{AppliedPosition, ChangeCounts, ChangeSet, ChangeStream, PositionUnit, StreamBatch};
use crate::contract::changes::keys_of;
use crate::engine::online::CutoverCheck;
use crate::engine::online::watch::{self, WatchSides, Watching};
use crate::engine::online::apply::{Gate, apply_to_target};
use crate::engine::online::cutover::{cutover, standalone_cutover};
use crate::engine::pipeline::{JobConfig, PreparedJob, finish_targets, load, lock_targets, plan_and_prepare, report, with_progress};
use crate::model::human_bytes;
use crate::model::plan::Key;
use crate::model::retry::with_retries;
use crate::state::online::CutoverRequest;
use crate::state::progress::{OnlineStatus, Progress, RETAINED_WARN_BYTES, Report};

/// Wait between two polls of a source with nothing new.
const IDLE_POLL: Duration = Duration::from_millis(200);
/// How often the status counts the targets' segments not yet served.
const UNSERVED_EVERY: Duration = Duration::from_secs(10);

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
    watch_sides: Option<WatchSides<'_>>,
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
        if !committed {
            // A job starting over: no check of an earlier copy counts.
            watch::discard(&watch::watch_dir(&cfg.job_dir, &cfg.command))?;
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
        // Verification while following starts once the snapshot is loaded.
        let mut watching = None;
        if error.is_none() {
            if let Some(w) = watch_sides {
                match Watching::open(&watch::watch_dir(&cfg.job_dir, &cfg.command), w, &job.plan) {
                    Ok(w) => watching = Some(w),
                    Err(e) => error = Some(format!("setting up verification while following: {e:#}")),
                }
            }
        }
        if error.is_none() {
            match follow(cfg, &job, stream.as_mut(), &cancel, progress, check, watching.as_ref()) {
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
                "changes applied: {} inserts, {} updates, {} deletes (this run: {:.1} s reading them from the source, {:.1} s applying; \
                 {} of {} batches written while the one before was going in)",
                o.applied.inserts,
                o.applied.updates,
                o.applied.deletes,
                c.change_read_ns.load(Relaxed) as f64 / 1e9,
                c.change_apply_ns.load(Relaxed) as f64 / 1e9,
                c.change_batches_overlapped.load(Relaxed),
                c.change_batches.load(Relaxed),
            ));
        }
        drop(locks);
        Ok(r)
    })
}

/// Follows the stream until a cutover completes (true) or the run is
/// cancelled (false): each round takes a cutover request, reads and applies
/// a batch, publishes the status, applies what a reconcile found, and cuts
/// over once drained.
fn follow(
    cfg: &JobConfig,
    job: &PreparedJob,
    stream: &mut dyn ChangeStream,
    cancel: &Arc<AtomicBool>,
    progress: &Arc<Progress>,
    check: &dyn Fn() -> Result<CutoverCheck>,
    watching: Option<&Watching<'_>>,
) -> Result<bool> {
    let stop = AtomicBool::new(false);
    let unserved = Mutex::new(None);
    std::thread::scope(|s| {
        if let Some(w) = watching {
            s.spawn(|| w.run_verifier(&stop, &|m| progress.println(m)));
        }
        s.spawn(|| count_unserved(job, &stop, &unserved));
        let followed = follow_batches(cfg, job, stream, cancel, progress, check, watching, &unserved, s);
        stop.store(true, Relaxed);
        followed
    })
}

/// Counts the targets' segments not yet served every `UNSERVED_EVERY`,
/// beside the apply loop: listing a busy Milvus collection's segments can
/// take seconds, which the lag would otherwise show. A count that fails
/// keeps the last one (the status is not worth a retry).
fn count_unserved(job: &PreparedJob, stop: &AtomicBool, into: &Mutex<Option<u64>>) {
    let mut counted: Option<Instant> = None;
    while !stop.load(Relaxed) {
        if counted.is_none_or(|t| t.elapsed() >= UNSERVED_EVERY) {
            counted = Some(Instant::now());
            let counts: Vec<Option<u64>> = job.targets.iter().filter_map(|t| t.sink.unserved().ok()).collect();
            if counts.len() == job.targets.len() {
                *into.lock().unwrap() = counts.into_iter().flatten().reduce(|a, b| a + b);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[allow(clippy::too_many_arguments)]
fn follow_batches<'a, 's>(
    cfg: &'a JobConfig,
    job: &'a PreparedJob,
    stream: &mut dyn ChangeStream,
    cancel: &'a Arc<AtomicBool>,
    progress: &'a Arc<Progress>,
    check: &dyn Fn() -> Result<CutoverCheck>,
    watching: Option<&'a Watching<'a>>,
    unserved: &'a Mutex<Option<u64>>,
    scope: &'s Scope<'s, 'a>,
) -> Result<bool> {
    let mut f = Follower::new(cfg, job, stream, cancel, progress, watching, unserved, scope)?;
    progress.set_phase("catching up");
    loop {
        if cancel.load(Relaxed) {
            return Ok(false);
        }
        f.take_cutover_request(stream)?;
        let upto = match f.drain_to {
            Some(p) => p,
            None => stream.current_position()?,
        };
        let batch = f.read_and_apply(stream, upto)?;
        let complete = batch.drained_to.is_some_and(|p| p >= upto);
        if let Some(w) = watching {
            // The verifier rests while a backlog is applied (its reads would
            // compete with the catch-up for both servers, and chunks read then
            // differ by changes in flight): while batches come full, and from
            // a job's start until a batch says otherwise. Empty reads short of
            // the source's position change nothing (a source still decoding
            // its backlog). Not on lag: an import's lag includes the export's
            // file period, and its verifier must still walk at a steady trickle.
            if complete {
                w.set_behind(false);
            } else if batch.set.has_rows() {
                w.set_behind(batch.drained_to.is_none() || f.full(&batch.set));
            }
        }
        if let Some(p) = batch.drained_to {
            stream.confirm(p)?;
        }
        if complete {
            // Caught up with the source: a quiet source is not a stuck job.
            progress.touch();
        }
        f.publish_status(stream, &batch.set, complete)?;
        // What the position cannot see (Milvus deletes): every so often, and
        // once drained before the cutover verifies.
        let cutting = complete && f.drain_to.is_some();
        f.apply_reconciled(stream, cutting)?;
        if cutting {
            let drain_started = f.drain_started.unwrap_or_else(Instant::now);
            match cutover(cfg, job, stream, cancel, progress, check, watching, drain_started) {
                Ok(()) => return Ok(true),
                // Run by `vmig cutover` itself: nothing left to follow for.
                Err(e) if standalone_cutover(&cfg.job_dir, &cfg.command) => return Err(e),
                Err(e) => {
                    progress.println(&format!("error: {e:#}"));
                    f.drain_to = None;
                    f.drain_started = None;
                    if let Some(w) = watching {
                        w.resume();
                    }
                }
            }
        }
        if complete && !batch.set.has_rows() {
            std::thread::sleep(IDLE_POLL);
        }
    }
}

/// A batch being applied on a thread of its own: it returns the batch with
/// the targets that got it, and opens `gate` when done.
struct InFlight<'s> {
    applying: ScopedJoinHandle<'s, (StreamBatch, Result<Vec<usize>>)>,
    gate: Arc<Gate>,
    /// The watch mark of its keys (`Follower::mark`).
    mark: u64,
    /// Its keys, when the batch after it may overlap it.
    keys: Option<HashSet<Key>>,
    /// More was waiting when it was read.
    backlog: bool,
    started: Instant,
}

/// What the follow loop carries from one batch to the next.
struct Follower<'a, 's> {
    cfg: &'a JobConfig,
    job: &'a PreparedJob,
    cancel: &'a Arc<AtomicBool>,
    progress: &'a Arc<Progress>,
    /// Per target: the position it has applied.
    applied: Vec<AppliedPosition>,
    /// The last position applied to every target in this run.
    applied_position: u64,
    /// Changes applied so far, over every run.
    totals: ChangeCounts,
    rate: RateWindow,
    /// Commit-to-apply delay of the last applied transaction.
    lag_seconds: f64,
    /// Behind the source with nothing arriving since then.
    behind_since: Option<Instant>,
    last_stats: Option<Instant>,
    /// The last batch reached the source's position of its read.
    was_complete: bool,
    /// Where a requested cutover drains to, and since when (the writes are stopped).
    drain_to: Option<u64>,
    drain_started: Option<Instant>,
    /// Verification while following: every change is marked before it is applied.
    watching: Option<&'a Watching<'a>>,
    /// Changes per batch (whole transactions: a large one exceeds it).
    batch_changes: usize,
    /// The next batch, read while the one before it was applied.
    read_ahead: Option<StreamBatch>,
    /// Or the next batch already being applied, its commit after this one's.
    in_flight: Option<InFlight<'s>>,
    /// That batch, finished early (before a reconcile applies its rows):
    /// what the next read returns.
    finished: Option<StreamBatch>,
    /// Every target can apply two batches at once (`Sink::overlaps_changes`).
    overlap: bool,
    /// When the last applied batch was in (apply time is not counted twice
    /// for batches that overlap).
    applied_until: Option<Instant>,
    scope: &'s Scope<'s, 'a>,
    /// The targets' segments not yet served, as last counted (`count_unserved`).
    unserved: &'a Mutex<Option<u64>>,
}

impl<'a, 's> Follower<'a, 's> {
    /// Positions the stream after what every target has applied.
    #[allow(clippy::too_many_arguments)]
    fn new(
        cfg: &'a JobConfig,
        job: &'a PreparedJob,
        stream: &mut dyn ChangeStream,
        cancel: &'a Arc<AtomicBool>,
        progress: &'a Arc<Progress>,
        watching: Option<&'a Watching<'a>>,
        unserved: &'a Mutex<Option<u64>>,
        scope: &'s Scope<'s, 'a>,
    ) -> Result<Self> {
        let mut applied: Vec<AppliedPosition> = Vec::new();
        for t in &job.targets {
            applied.push(t.sink.applied_position(&cfg.job)?.unwrap_or_default());
        }
        let start = applied.iter().map(|a| a.position).min().unwrap_or(0);
        stream.skip_to(start)?;
        let totals = applied.iter().map(|a| a.counts).max_by_key(|c| c.total()).unwrap_or_default();
        Ok(Follower {
            cfg,
            job,
            cancel,
            progress,
            applied,
            applied_position: start,
            totals,
            rate: RateWindow::new(totals.total()),
            lag_seconds: 0.0,
            behind_since: None,
            last_stats: None,
            was_complete: false,
            drain_to: None,
            drain_started: None,
            watching,
            batch_changes: job.targets.iter().map(|t| t.sink.change_batch_rows()).max().unwrap_or(5_000),
            read_ahead: None,
            in_flight: None,
            finished: None,
            overlap: job.targets.iter().all(|t| t.sink.overlaps_changes()),
            applied_until: None,
            scope,
            unserved,
        })
    }

    fn retry(&self, what: &str, f: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        with_retries(what, self.cfg.retry_for, 2, self.cancel, &|m| self.progress.println(m), f)
    }

    /// Starts draining when the stream has an end (an import whose export
    /// cut over) or `vmig cutover` asked for it.
    fn take_cutover_request(&mut self, stream: &mut dyn ChangeStream) -> Result<()> {
        if self.drain_to.is_some() {
            return Ok(());
        }
        let (dir, command) = (&self.cfg.job_dir, &self.cfg.command);
        if let Some(end) = stream.ends_at()? {
            self.progress.println(&format!("the stream ends at {}: applying it, then cutting over", stream.format_position(end)));
            self.progress.set_phase("cutting over");
            self.drain_to = Some(end);
            self.drain_started = Some(Instant::now());
        } else if let Some(mut req) = CutoverRequest::load(dir, command)?.filter(|r| r.state == "requested") {
            let p = stream.current_position()?;
            req.position = Some(stream.format_position(p));
            req.save(dir, command)?;
            self.progress.println(&format!("cutover requested: draining to {}", stream.format_position(p)));
            self.progress.set_phase("cutting over");
            self.drain_to = Some(p);
            self.drain_started = Some(Instant::now());
        }
        Ok(())
    }

    /// Reads the changes committed before `upto` (one batch) and applies them
    /// to every target that lacks them, then confirms them to the source.
    /// While a backlog waits (the batch was full), the next batch is read
    /// while this one is applied, so the source's decoding and the targets'
    /// writes overlap; and where every target can and no key is in both,
    /// the next batch is applied at once too, committing after this one
    /// (the target's work overlaps itself). It is finished by the next call.
    fn read_and_apply(&mut self, stream: &mut dyn ChangeStream, upto: u64) -> Result<StreamBatch> {
        if let Some(b) = self.finished.take() {
            return Ok(b);
        }
        let idempotent = stream.idempotent();
        let current = match self.in_flight.take() {
            Some(f) => f,
            None => {
                let batch = match self.read_ahead.take() {
                    Some(b) => b,
                    None => self.read(stream, upto)?,
                };
                if !applies(&batch) {
                    return Ok(batch);
                }
                self.start(batch, idempotent, None)?
            }
        };
        let mut next = None;
        if current.backlog && self.read_ahead.is_none() {
            next = Some(self.read(stream, upto).and_then(|b| match &current.keys {
                Some(keys) if applies(&b) && disjoint(keys, &self.keys(&b.set)?) => {
                    self.in_flight = Some(self.start(b, idempotent, Some(current.gate.clone()))?);
                    Ok(None)
                }
                _ => Ok(Some(b)),
            }));
        }
        let batch = self.finish(stream, current)?;
        if let Some(next) = next {
            self.read_ahead = next?;
        }
        Ok(batch)
    }

    /// Waits for a batch being applied, then records it: the position each
    /// target has, the watch mark, the source's confirmation, the counts.
    fn finish(&mut self, stream: &mut dyn ChangeStream, f: InFlight<'s>) -> Result<StreamBatch> {
        let (batch, applied) = f.applying.join().map_err(|_| anyhow::anyhow!("applying changes panicked"))?;
        let set = &batch.set;
        for i in applied? {
            self.applied[i].position = set.position;
        }
        self.applied(f.mark);
        stream.confirm(set.position)?;
        self.progress.counters.change_batches.fetch_add(1, Relaxed);
        let now = Instant::now();
        let from = self.applied_until.map_or(f.started, |t| t.max(f.started));
        self.progress.counters.change_apply_ns.fetch_add(now.saturating_duration_since(from).as_nanos() as u64, Relaxed);
        self.applied_until = Some(now);
        self.applied_position = set.position;
        self.totals.add(&set.counts);
        if let Some(ts) = set.commit_time_us {
            self.lag_seconds = (chrono::Utc::now().timestamp_micros() - ts).max(0) as f64 / 1e6;
        }
        Ok(batch)
    }

    /// Marks the batch's keys and starts applying it on a thread of its own;
    /// with `after`, it commits only once that batch is in.
    fn start(&self, batch: StreamBatch, idempotent: bool, after: Option<Arc<Gate>>) -> Result<InFlight<'s>> {
        let backlog = batch.drained_to.is_none();
        let overlappable = self.overlap && backlog;
        let keys = if self.watching.is_some() || overlappable { self.keys(&batch.set)? } else { Vec::new() };
        let mark = match self.watching {
            Some(w) => w.watch.mark(keys.clone())?,
            None => 0,
        };
        let gate = Arc::new(Gate::default());
        let opens = gate.clone();
        let (cfg, job, cancel, progress) = (self.cfg, self.job, self.cancel, self.progress);
        let had: Vec<u64> = self.applied.iter().map(|a| a.position).collect();
        if after.is_some() {
            progress.counters.change_batches_overlapped.fetch_add(1, Relaxed);
        }
        let applying = self.scope.spawn(move || {
            let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                apply_set(cfg, job, cancel, progress, &had, &batch.set, idempotent, after.as_deref())
            }))
            .unwrap_or_else(|_| Err(anyhow::anyhow!("applying changes panicked")));
            opens.open(applied.is_ok());
            (batch, applied)
        });
        Ok(InFlight {
            applying,
            gate,
            mark,
            keys: overlappable.then(|| keys.into_iter().collect()),
            backlog,
            started: Instant::now(),
        })
    }

    /// One batch of the changes committed before `upto`.
    fn read(&self, stream: &mut dyn ChangeStream, upto: u64) -> Result<StreamBatch> {
        let mut batch = None;
        let read_started = Instant::now();
        self.retry("reading changes", &mut || {
            batch = Some(stream.next_batch(self.batch_changes, upto)?);
            Ok(())
        })?;
        let batch = batch.unwrap();
        if applies(&batch) {
            self.progress.counters.change_read_ns.fetch_add(read_started.elapsed().as_nanos() as u64, Relaxed);
        }
        Ok(batch)
    }

    /// Lag, phase, and (every second, and when drained for a cutover) the
    /// online status `vmig status` and the metrics show.
    fn publish_status(&mut self, stream: &mut dyn ChangeStream, set: &ChangeSet, complete: bool) -> Result<()> {
        // Behind the source with nothing arriving: the delay grows from the
        // first empty read.
        if complete || set.has_rows() {
            self.behind_since = None;
            // Caught up with nothing new: no delay, whatever the last change
            // applied had (a job idle after a backlog would otherwise show
            // the backlog's lag until the next change).
            if !set.has_rows() {
                self.lag_seconds = 0.0;
            }
        } else {
            let since = *self.behind_since.get_or_insert_with(Instant::now);
            self.lag_seconds = self.lag_seconds.max(since.elapsed().as_secs_f64());
        }
        let phase = if self.drain_to.is_some() {
            "cutting over"
        } else if self.catching_up(set, complete) {
            "catching up"
        } else {
            "following"
        };
        if self.progress.status.lock().unwrap().phase != phase {
            self.progress.set_phase(phase);
        }
        // Caught up: said at once (a cutover waits for it, and so may a user).
        let caught_up = complete && (self.drain_to.is_some() || !self.was_complete);
        self.was_complete = complete;
        if self.last_stats.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) && !caught_up {
            return Ok(());
        }
        let stats = stream.stats()?;
        let warning = (stats.unit == PositionUnit::Bytes && stats.retained_bytes > RETAINED_WARN_BYTES).then(|| {
            format!(
                "the source keeps {} of change log for this job ({}); it is freed as changes are applied, by cutover or by reset",
                human_bytes(stats.retained_bytes),
                stream.artifacts()
            )
        });
        let online = OnlineStatus {
            artifacts: stream.artifacts(),
            applied: self.totals,
            changes_per_second: self.rate.per_second(self.totals.total()),
            lag_bytes: stats.source_position.saturating_sub(stats.confirmed),
            lag_seconds: self.lag_seconds,
            retained_bytes: stats.retained_bytes,
            applied_position: stream.format_position(self.applied_position.max(stats.confirmed)),
            source_position: stream.format_position(stats.source_position),
            unit: stats.unit,
            note: stats.note.clone(),
            warning,
            verification: self.watching.map(|w| w.watch.progress()),
            unserved_segments: *self.unserved.lock().unwrap(),
        };
        self.progress.status.lock().unwrap().online = Some(online);
        self.progress.write_status(None);
        self.last_stats = Some(Instant::now());
        Ok(())
    }

    /// A full batch, or changes committed long ago and more to come: a
    /// backlog, not a steady trickle.
    fn catching_up(&self, set: &ChangeSet, complete: bool) -> bool {
        self.full(set) || (!complete && self.lag_seconds > 5.0)
    }

    /// A batch as large as asked for: more was waiting.
    fn full(&self, set: &ChangeSet) -> bool {
        set.counts.total() >= self.batch_changes as u64
    }

    /// Every key a change set touches (in the source's names).
    fn keys(&self, set: &ChangeSet) -> Result<Vec<Key>> {
        let pk = &self.job.source.spec().primary_key;
        let mut keys = set.deletes.clone();
        for b in set.images.iter().chain(&set.partial) {
            keys.extend(keys_of(b, pk)?);
        }
        Ok(keys)
    }

    /// Marks every key a change set touches as changed, before any target
    /// applies it.
    fn mark(&self, set: &ChangeSet) -> Result<u64> {
        let Some(w) = self.watching else { return Ok(0) };
        w.watch.mark(self.keys(set)?)
    }

    /// Every target has the changes marked up to `mark`.
    fn applied(&self, mark: u64) {
        if let Some(w) = self.watching {
            w.watch.applied(mark);
        }
    }

    /// Applies what a reconcile found (changes the position cannot see) to
    /// every target, at the position each already has.
    fn apply_reconciled(&mut self, stream: &mut dyn ChangeStream, now: bool) -> Result<()> {
        let Some(set) = stream.reconcile(now)? else { return Ok(()) };
        if !set.has_rows() {
            return Ok(());
        }
        // Its rows may be the batch's being applied: that one goes in first.
        if let Some(f) = self.in_flight.take() {
            self.finished = Some(self.finish(stream, f)?);
        }
        let mark = self.mark(&set)?;
        for (i, t) in self.job.targets.iter().enumerate() {
            let mut at_position = set.clone();
            at_position.position = self.applied[i].position.max(self.applied_position);
            self.retry(&format!("applying reconciled rows to {}", t.name), &mut || {
                apply_to_target(self.cfg, t, &at_position, self.progress, &|| Ok(()))
            })?;
        }
        self.applied(mark);
        self.totals.add(&set.counts);
        Ok(())
    }
}

/// A batch with something to apply (rows, or counts a target records).
fn applies(batch: &StreamBatch) -> bool {
    batch.set.has_rows() || batch.set.counts.total() > 0
}

fn disjoint(keys: &HashSet<Key>, other: &[Key]) -> bool {
    !other.iter().any(|k| keys.contains(k))
}

/// Applies `set` to every target that lacks it (`had`: the position each
/// has); returns which got it. With `after`, each commit waits for it.
#[allow(clippy::too_many_arguments)]
fn apply_set(
    cfg: &JobConfig,
    job: &PreparedJob,
    cancel: &AtomicBool,
    progress: &Progress,
    had: &[u64],
    set: &ChangeSet,
    idempotent: bool,
    after: Option<&Gate>,
) -> Result<Vec<usize>> {
    let before_commit = || after.map_or(Ok(()), Gate::wait);
    let mut got = Vec::new();
    for (i, t) in job.targets.iter().enumerate() {
        if had[i] >= set.position && !idempotent {
            continue; // this target has it (a resume after a crash between targets)
        }
        with_retries(&format!("applying changes to {}", t.name), cfg.retry_for, 2, cancel, &|m| progress.println(m), || {
            apply_to_target(cfg, t, set, progress, &before_commit)
        })?;
        got.push(i);
    }
    Ok(got)
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
