//! The online side of the commands: `migrate --online`, `cutover`, and what
//! `reset` and `status` do about a job's source artefacts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use tokio::runtime::Handle;

use super::{CutoverRequest, OnlineState, run_online};
use crate::cli::RunArgs;
use crate::commands::{EXIT_CANCELLED, JobSetup, open_source, run_job, setup_job};
use crate::config::Endpoint;
use crate::endpoint::postgres::PgSource;
use crate::endpoint::postgres::changes::{PgChangeStream, drop_artifacts};
use crate::endpoint::{Feedback, Source};
use crate::ledger::{JobDir, now_rfc3339};
use crate::progress::{Report, Status};

/// `migrate --online`.
pub fn run_online_job(job: &JobSetup, handle: &Handle, cancel: Arc<AtomicBool>) -> Result<Report> {
    let cfg = &job.cfg;
    if cfg.command != "migrate" {
        bail!(
            "{} --online (online through staging files) is not available yet; use migrate --online between two databases",
            cfg.command
        );
    }
    if job.args.staging.is_some() {
        bail!("migrate --online with --staging is not available yet; use migrate --online without --staging");
    }
    let Endpoint::Postgres(url) = &job.source_ep else {
        bail!(
            "online migration from {} is not available yet; online sources today: PostgreSQL (wal_level = logical)",
            job.source_ep.describe()
        );
    };
    let target_ep = job.target_ep.clone().ok_or_else(|| anyhow!("migrate needs --to"))?;
    let pg = Arc::new(PgSource::open(url.clone(), &job.table, handle.clone())?);
    let source: Arc<dyn Source> = pg.clone();
    let job_dir = cfg.job_dir.clone();
    let open_stream: super::follow::OpenStream<'_> = Box::new(|fb: &crate::progress::Progress, committed: bool| {
        let s = PgChangeStream::open(
            url.clone(),
            &job.table,
            handle.clone(),
            &cfg.job,
            &job_dir,
            &pg,
            committed,
            fb as &dyn Feedback,
        )?;
        Ok(Box::new(s) as Box<dyn super::ChangeStream>)
    });
    let verify = || {
        // The source as it is now (not the snapshot the copy read).
        let now = PgSource::open(url.clone(), &job.table, handle.clone())?;
        let target = open_source(&target_ep, &job.target_table, handle)?;
        let plan = now.plan(cfg.chunk_rows)?;
        crate::verify::verify(&now, target.as_ref(), &plan, cfg.workers)
    };
    run_online(cfg, source, job.sinks.clone(), open_stream, &verify, cancel)
}

/// `vmig cutover`: asks the running online job to cut over and waits for
/// it, or cuts over itself when no run is alive. Returns the exit code.
pub fn cutover(mut args: RunArgs, handle: &Handle, cancel: Arc<AtomicBool>) -> Result<u8> {
    args.online = true;
    let job = setup_job("migrate", args.clone(), handle)?;
    let dir = job.cfg.job_dir.clone();
    drop(job);
    if OnlineState::load(&dir)?.is_none() {
        if let Some(r) = CutoverRequest::load(&dir)?.filter(|r| r.state == "done") {
            println!("{}", r.message.unwrap_or_default());
            eprintln!("job in {} was already cut over at {}", dir.display(), r.finished_at.unwrap_or_default());
            return Ok(0);
        }
        bail!("no online job in {} (start one with migrate --online, with the same flags)", dir.display());
    }
    let running = read_status(&dir).filter(|s| s.state == "running" && process_alive(s.pid));
    CutoverRequest {
        requested_at: now_rfc3339(),
        state: "requested".into(),
        position: None,
        message: None,
        finished_at: None,
        standalone: running.is_none(),
    }
    .save(&dir)?;
    let Some(run) = running else {
        eprintln!("no online run of this job is alive; cutting over here");
        let report = run_job("migrate", args, handle, cancel.clone())?;
        if cancel.load(Relaxed) {
            return Ok(EXIT_CANCELLED as u8);
        }
        if let Some(e) = report.error {
            bail!("{e}");
        }
        let r = CutoverRequest::load(&dir)?.ok_or_else(|| anyhow!("cutover left no result"))?;
        println!("{}", r.message.unwrap_or_default());
        return Ok(0);
    };
    eprintln!("cutover requested from the online job (pid {}); waiting for it to drain, finish and verify", run.pid);
    let mut last_phase = String::new();
    loop {
        if cancel.load(Relaxed) {
            eprintln!("stopped waiting; the online job goes on with the cutover (see vmig status)");
            return Ok(EXIT_CANCELLED as u8);
        }
        if let Some(r) = CutoverRequest::load(&dir)? {
            match r.state.as_str() {
                "done" => {
                    println!("{}", r.message.unwrap_or_default());
                    return Ok(0);
                }
                "failed" => bail!("{}", r.message.unwrap_or_else(|| "cutover failed".into())),
                _ => {}
            }
        }
        match read_status(&dir) {
            Some(s) if s.state == "running" && process_alive(s.pid) => {
                if s.phase != last_phase {
                    eprintln!("online job: {}", s.phase);
                    last_phase = s.phase;
                }
            }
            _ => bail!("the online job ended before the cutover finished; run `vmig cutover` again to finish it here"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn read_status(dir: &std::path::Path) -> Option<Status> {
    let bytes = std::fs::read(JobDir::new(dir).status("migrate")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn process_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// `reset` of an online job: drops its slot and publication (needs the
/// source), or refuses before anything is forgotten.
pub fn reset_artifacts(dir: &std::path::Path, from: Option<&str>, handle: &Handle) -> Result<()> {
    let Some(state) = OnlineState::load(dir)? else { return Ok(()) };
    let Some(from) = from else {
        bail!(
            "job in {} owns replication slot {} and publication {} on {}; give --from URL so reset drops them \
             (a forgotten slot keeps WAL and fills the source's disk)",
            dir.display(),
            state.slot,
            state.publication,
            state.source
        );
    };
    let Endpoint::Postgres(url) = Endpoint::parse(from)? else { bail!("--from must be the job's PostgreSQL source") };
    let dropped = handle.block_on(drop_artifacts(&url, &state.slot))?;
    if dropped.is_empty() {
        eprintln!("no replication slot or publication named {} was left on {}", state.slot, url.redacted());
    } else {
        eprintln!("dropped {} on {}", dropped.join(" and "), url.redacted());
    }
    std::fs::remove_file(OnlineState::path(dir))?;
    let _ = std::fs::remove_file(CutoverRequest::path(dir));
    Ok(())
}

/// Lines `vmig status` prints about an online job.
pub fn status_lines(dir: &std::path::Path, runs: &[Status]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for s in runs {
        if let Some(o) = &s.online {
            out.push(format!(
                "online ({}): {} · applied position {} · source at {}",
                if s.state == "running" { s.phase.as_str() } else { s.state.as_str() },
                o.summary(),
                o.applied_position,
                o.source_position
            ));
            if let Some(w) = &o.warning {
                out.push(format!("warning: {w}"));
            }
        }
    }
    if let Some(st) = OnlineState::load(dir)? {
        out.push(format!(
            "source artefacts: replication slot {} and publication {} on {} (kept until cutover or `vmig reset --from`)",
            st.slot, st.publication, st.source
        ));
    }
    if let Some(r) = CutoverRequest::load(dir)? {
        out.push(format!("cutover: {}{}", r.state, r.message.map(|m| format!(" · {m}")).unwrap_or_default()));
    }
    Ok(out)
}
