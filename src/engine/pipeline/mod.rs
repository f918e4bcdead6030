//! The dataflow: export → transform → import per chunk, with bounded
//! crossbeam channels between the stages (a slow sink slows the source),
//! `workers` chunks in flight, cancellation, retries and the final report.

pub mod job;
pub mod load;
pub mod shared;

pub use job::{JobConfig, Permits, PreparedJob, Target, finish_targets, load_or_plan, lock_targets, plan_and_prepare};
pub use load::{Loaded, load, report};

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use anyhow::Result;

use crate::contract::{Sink, Source};
use crate::model::now_rfc3339;
use crate::state::claims::{Coordinator, WorkerInfo};
use crate::state::ledger::JobDir;
use crate::state::progress::{Progress, Report, Status};

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
        Some(addr) => Some(crate::state::http::serve(addr, &cfg.job, progress.clone(), cfg.store.clone())?),
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
