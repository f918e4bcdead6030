//! Moving the chunks: export → transform → import per chunk, with bounded
//! crossbeam channels between the stages (a slow sink slows the source),
//! `workers` chunks in flight, retries, and the report of what moved.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use arrow::record_batch::RecordBatch;
use crossbeam_channel::bounded;

use crate::contract::Source;
use crate::contract::commit::CommitRecord;
use crate::engine::transform::{reject_batch, write_rejects};
use crate::model::hash::{ContentHash, row_hashes};
use crate::model::plan::ChunkRange;
use crate::model::retry::{Cancelled, with_retries};
use crate::state::claims::{Claim, Coordinator};
use crate::state::ledger::JobDir;
use crate::state::progress::{ChunkFailure, Progress, Report, StageReport, chunk_state, peak_rss_mb};

use super::job::{JobConfig, PreparedJob, Target, indexes_not_carried};

/// Retries of a chunk that failed for another reason than an unreachable server.
const QUICK_RETRIES: u32 = 2;

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
            progress.chunk_state(c.id, chunk_state::SKIPPED);
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
                    progress.chunk_state(chunk.id, chunk_state::RUNNING);
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
                        Ok(()) => progress.chunk_state(chunk.id, chunk_outcome(job, chunk.id)),
                        Err(e) if e.is::<Cancelled>() || cancel.load(Relaxed) => {
                            progress.chunk_state(chunk.id, chunk_state::PENDING);
                            break;
                        }
                        Err(e) => {
                            progress.chunk_state(chunk.id, chunk_state::FAILED);
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

/// How a chunk copied without error shows on the chunk map: with rejects
/// when its commit record holds rejected rows.
fn chunk_outcome(job: &PreparedJob, id: u32) -> char {
    let rejected = job.targets.iter().filter_map(|t| t.committed.lock().unwrap().get(&id).map(|r| r.rejected)).max();
    if rejected.unwrap_or(0) > 0 { chunk_state::COMMITTED_WITH_REJECTS } else { chunk_state::COMMITTED }
}

/// Final state, status file and report. `error`: why the job did not
/// complete (None: it did).
pub fn report(cfg: &JobConfig, job: &PreparedJob, loaded: &Loaded, mut error: Option<String>, progress: &Arc<Progress>) -> Report {
    let targets = &job.targets;
    let mut notes = indexes_not_carried(job.source.as_ref());
    notes.extend(targets.iter().flat_map(|t| t.sink.prepare_notes()));
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
        index_builds: progress.index_builds(),
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
