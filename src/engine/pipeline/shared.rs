//! A job shared by many workers (processes on any hosts): who plans, which
//! chunk each worker runs next, and who runs the finish. The store holds the
//! claims (claims.rs); every target's ledger stays the truth of what is done.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use anyhow::{Result, bail};

use crate::contract::{Sink, Source};
use super::job::{JobConfig, PreparedJob, finish_targets, plan_and_prepare};
use crate::model::now_rfc3339;
use crate::model::plan::ChunkRange;
use crate::model::retry::Cancelled;
use crate::state::claims::{Claim, Coordinator};
use crate::state::progress::Progress;

const FINISHED: &str = "finished.json";

fn marker(what: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "by": crate::state::claims::worker_id(), "at": now_rfc3339(), "what": what })).unwrap()
}

fn by_whom(coord: &Coordinator, claim: &str) -> String {
    match coord.holder(claim) {
        Ok(Some(h)) => format!("worker {}", h.worker),
        _ => "another worker".into(),
    }
}

/// Workers plan and prepare one at a time, under the `plan` claim: the
/// first plans (create-only manifest) and prepares the targets (tables,
/// collection, ledger); each later one loads the plan and prepares its side
/// on targets that exist by then (the resume path), so no two workers race
/// to create a table.
pub fn plan_and_prepare_shared(
    cfg: &JobConfig,
    coord: &Coordinator,
    source: Arc<dyn Source>,
    sinks: Vec<(String, Arc<dyn Sink>)>,
    progress: &Arc<Progress>,
    cancel: &AtomicBool,
) -> Result<PreparedJob> {
    progress.set_phase("planning");
    let mut said = false;
    loop {
        if cancel.load(Relaxed) {
            return Err(Cancelled.into());
        }
        if let Some(claim) = coord.try_claim("plan")? {
            let job = plan_and_prepare(cfg, source, sinks, progress);
            // Targets with nothing of this job (new, or recreated since a
            // finished run): an old run's finish marker must not stand for them.
            if let Ok(j) = &job {
                if j.targets.iter().all(|t| t.committed.lock().unwrap().is_empty()) {
                    coord.store.delete(FINISHED)?;
                }
            }
            coord.release(claim)?;
            return job;
        }
        if !said {
            progress.println(&format!("waiting for {} to plan the job or prepare its targets", by_whom(coord, "plan")));
            said = true;
        }
        // Preparing takes a moment; every worker is waiting on it.
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Adds what other workers committed to each target's view of its ledger;
/// returns the chunks every target's ledger holds (durably committed).
fn refresh_committed(cfg: &JobConfig, job: &PreparedJob) -> Result<BTreeSet<u32>> {
    let mut durable: Option<BTreeSet<u32>> = None;
    for t in &job.targets {
        let ledger = t.sink.committed(&cfg.job)?;
        let ids: BTreeSet<u32> = ledger.keys().copied().collect();
        durable = Some(match durable {
            None => ids,
            Some(d) => d.intersection(&ids).copied().collect(),
        });
        let mut known = t.committed.lock().unwrap();
        for (id, rec) in ledger {
            known.entry(id).or_insert(rec);
        }
    }
    Ok(durable.unwrap_or_default())
}

/// Claims of chunks this worker committed, kept (and renewed) until every
/// target's ledger shows the chunk: Milvus records a chunk only after its
/// flush, and a claim freed earlier would let another worker redo it.
#[derive(Default)]
pub struct Settling(Mutex<Vec<(u32, Claim)>>);

impl Settling {
    pub fn hold(&self, chunk: u32, claim: Claim) {
        self.0.lock().unwrap().push((chunk, claim));
    }

    /// Frees the claims of chunks now in every ledger (all with `everything`).
    fn release(&self, coord: &Coordinator, durable: &BTreeSet<u32>, everything: bool) -> Result<()> {
        let ready: Vec<(u32, Claim)> = {
            let mut held = self.0.lock().unwrap();
            let (ready, keep) = std::mem::take(&mut *held).into_iter().partition(|(c, _)| everything || durable.contains(c));
            *held = keep;
            ready
        };
        for (_, claim) in ready {
            coord.release(claim)?;
        }
        Ok(())
    }
}

/// The end of this worker's load: background commits settle, then every
/// claim it still holds is freed.
pub fn settle_and_release(cfg: &JobConfig, job: &PreparedJob, coord: &Coordinator, settling: &Settling) -> Result<()> {
    for t in &job.targets {
        t.sink.settle()?;
    }
    let durable = refresh_committed(cfg, job)?;
    settling.release(coord, &durable, true)
}

fn done_everywhere(job: &PreparedJob, id: u32) -> bool {
    job.targets.iter().all(|t| t.committed.lock().unwrap().contains_key(&id))
}

/// True if every target has the chunk, after reading their ledgers again.
pub fn committed_everywhere(cfg: &JobConfig, job: &PreparedJob, chunk: &ChunkRange) -> Result<bool> {
    refresh_committed(cfg, job)?;
    Ok(done_everywhere(job, chunk.id))
}

/// Claims the next open chunk of `todo` (this worker's shard); waits while
/// every open chunk is claimed by a live worker, taking over any whose lease
/// runs out. None when all are committed (or the run stops).
pub fn next_claimed(
    cfg: &JobConfig,
    job: &PreparedJob,
    coord: &Coordinator,
    todo: &[ChunkRange],
    settling: &Settling,
    exported: &Exported,
    cancel: &AtomicBool,
    failed: &AtomicBool,
    progress: &Progress,
) -> Option<(ChunkRange, Claim)> {
    let mut said = false;
    // Workers start at different places in the plan, so they rarely race for one claim.
    let offset = xxhash_rust::xxh3::xxh3_64(coord.me.as_bytes()) as usize;
    loop {
        if cancel.load(Relaxed) || failed.load(Relaxed) {
            return None;
        }
        match refresh_committed(cfg, job) {
            Ok(durable) => {
                if let Err(e) = settling.release(coord, &durable, false) {
                    progress.println(&format!("warning: releasing claims: {e:#}"));
                }
            }
            Err(e) => progress.println(&format!("warning: reading the targets' ledgers: {e:#}")),
        }
        let all_open: Vec<&ChunkRange> = todo.iter().filter(|c| !done_everywhere(job, c.id)).collect();
        if all_open.is_empty() {
            return None;
        }
        let open = match exported.ready(cfg, &all_open) {
            Ok(open) => open,
            Err(e) => {
                progress.println(&format!("warning: reading the staging area's commit markers: {e:#}"));
                Vec::new()
            }
        };
        if open.is_empty() {
            // Only chunks the export has not written yet: wait while it runs.
            if !export_alive(&cfg.store) {
                exported.missing.store(all_open.len() as u64, Relaxed);
                return None;
            }
            if !said {
                progress.println(&format!("{} chunks are not exported yet; waiting for the export's workers", all_open.len()));
                said = true;
            }
            std::thread::sleep(coord.poll_interval());
            continue;
        }
        let start = offset % open.len();
        for c in open.iter().cycle().skip(start).take(open.len()) {
            match coord.try_claim(&Coordinator::chunk_name(c)) {
                Ok(Some(claim)) => {
                    if let Some(from) = &claim.taken_over_from {
                        progress.println(&format!("chunk {}: taken over from {from} (its lease ran out)", c.id));
                    }
                    // Committed by its last holder just before the claim was freed?
                    if committed_everywhere(cfg, job, c).unwrap_or(false) {
                        let _ = coord.release(claim);
                        continue;
                    }
                    return Some(((*c).clone(), claim));
                }
                Ok(None) => {}
                Err(e) => {
                    progress.println(&format!("warning: claiming chunk {}: {e:#}", c.id));
                    break;
                }
            }
        }
        if !said {
            progress.println(&format!(
                "{} open chunks are claimed by other workers; waiting, and taking over any whose lease runs out",
                open.len()
            ));
            said = true;
        }
        std::thread::sleep(coord.poll_interval());
    }
}

/// For an import: which chunks the staging area holds (re-read while
/// some are missing).
pub struct Exported {
    ready: Mutex<Option<BTreeSet<u32>>>,
    /// Chunks still not exported when this worker gave up waiting.
    pub missing: std::sync::atomic::AtomicU64,
}

impl Exported {
    /// `ready`: the chunks exported at start (None: not an import).
    pub fn new(ready: Option<BTreeSet<u32>>) -> Exported {
        Exported { ready: Mutex::new(ready), missing: Default::default() }
    }

    fn ready<'a>(&self, cfg: &JobConfig, open: &[&'a ChunkRange]) -> Result<Vec<&'a ChunkRange>> {
        let mut ready = self.ready.lock().unwrap();
        let Some(set) = ready.as_mut() else { return Ok(open.to_vec()) };
        if open.iter().any(|c| !set.contains(&c.id)) {
            *set = crate::state::manifest::read_markers(&cfg.store)?.into_keys().collect();
        }
        Ok(open.iter().filter(|c| set.contains(&c.id)).copied().collect())
    }
}

/// True while a worker of a shared export of this staging area is alive
/// (running, heartbeat within its lease).
fn export_alive(store: &crate::state::store::Store) -> bool {
    crate::state::progress::worker_statuses(store).unwrap_or_default().iter().any(|s| {
        s.worker_alive() && s.worker.as_ref().is_some_and(|w| w.lane == "export")
    })
}

/// Runs the job's finish (indexes, sequences, final guards) exactly once
/// over all workers, when every chunk is committed. Ok(false): this worker's
/// shard is done, other shards' chunks are not yet.
pub fn finish_shared(
    cfg: &JobConfig,
    coord: &Coordinator,
    job: &PreparedJob,
    cancel: &Arc<AtomicBool>,
    progress: &Arc<Progress>,
) -> Result<bool> {
    let mut said = false;
    loop {
        if cancel.load(Relaxed) {
            return Err(Cancelled.into());
        }
        refresh_committed(cfg, job)?;
        let open = job.plan.iter().filter(|c| !done_everywhere(job, c.id)).count();
        if open > 0 {
            if cfg.distributed.as_ref().is_some_and(|d| d.shard.is_some()) {
                return Ok(false);
            }
            bail!("{open} chunks are not committed yet (a worker failed?); run a worker again to finish them");
        }
        if coord.store.exists(FINISHED)? {
            if said {
                progress.println("the job's finish is done");
            }
            return Ok(true);
        }
        if let Some(claim) = coord.try_claim("finish")? {
            if coord.store.exists(FINISHED)? {
                coord.release(claim)?;
                return Ok(true);
            }
            progress.set_phase("finishing");
            let error = finish_targets(cfg, job, cancel, progress);
            if error.is_none() {
                coord.store.put(FINISHED, &marker("indexes built, final checks passed"))?;
            }
            coord.release(claim)?;
            return match error {
                Some(e) => bail!("{e}"),
                None => Ok(true),
            };
        }
        if !said {
            progress.set_phase("waiting for the finish");
            progress.println(&format!("all chunks are committed; {} runs the finish (index builds)", by_whom(coord, "finish")));
            said = true;
        }
        std::thread::sleep(coord.poll_interval());
    }
}

/// `vmig status` lines for a shared job: one per worker, then totals.
pub fn status_lines(workers: &[crate::state::progress::Status]) -> Vec<String> {
    let mut out = Vec::new();
    let mut lanes: std::collections::BTreeMap<&str, Vec<&crate::state::progress::Status>> = Default::default();
    for s in workers {
        if let Some(w) = &s.worker {
            lanes.entry(w.lane.as_str()).or_default().push(s);
        }
    }
    for (lane, ws) in lanes {
        out.push(format!("workers of {lane}:"));
        let (mut chunks, mut rows, mut takeovers, mut failures) = (0u64, 0u64, 0u64, 0usize);
        for s in &ws {
            let w = s.worker.as_ref().unwrap();
            let age_s = w.heartbeat_age_seconds();
            let state = if s.worker_gone() { "silent (lease ran out)".to_string() } else { s.state.clone() };
            let secs = chrono::DateTime::parse_from_rfc3339(&s.updated_at)
                .ok()
                .zip(chrono::DateTime::parse_from_rfc3339(&s.started_at).ok())
                .map(|(u, st)| (u - st).num_milliseconds() as f64 / 1000.0)
                .unwrap_or(0.0);
            out.push(format!(
                "  {} ({}{}) · {state}{} · {} chunks done · {} rows · {:.0} rows/s · heartbeat {:.0} s ago · claims {}{}",
                w.worker,
                w.host,
                w.shard.as_ref().map(|s| format!(", shard {s}")).unwrap_or_default(),
                if s.phase.is_empty() || s.state != "running" { String::new() } else { format!(" ({})", s.phase) },
                s.chunks_committed,
                s.rows_written,
                s.rows_written as f64 / secs.max(1e-3),
                age_s,
                if w.claims.is_empty() { "none".into() } else { w.claims.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(",") },
                if w.takeovers > 0 { format!(" · took over {} expired claims", w.takeovers) } else { String::new() },
            ));
            for f in &s.failures {
                out.push(format!("    failed chunk {}: {}", f.chunk, f.error));
            }
            chunks += s.chunks_committed;
            rows += s.rows_written;
            takeovers += w.takeovers;
            failures += s.failures.len();
        }
        out.push(format!(
            "  total: {} workers · {chunks} chunks · {rows} rows · {takeovers} claims taken over · {failures} failures",
            ws.len()
        ));
    }
    out
}
