//! `vmig cutover`: asks a following job to drain, check and finish, or runs
//! the job itself to that end when none is alive.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use tokio::runtime::Handle;

use crate::backends::staging::changes::read_end;
use crate::commands::cli::RunArgs;
use crate::commands::job::{EXIT_CANCELLED, setup_job};
use crate::commands::migrate::run_job;
use crate::state::ledger::JobDir;
use crate::state::locks::process_alive;
use crate::state::online::{CutoverRequest, OnlineState};
use crate::state::progress::Status;

/// `vmig cutover`: asks the running online job to cut over and waits for
/// it, or cuts over itself when no run is alive. Returns the exit code.
pub fn cutover(mut args: RunArgs, handle: &Handle, cancel: Arc<AtomicBool>) -> Result<u8> {
    args.online = true;
    let resolved = crate::commands::job::resolve_run_args(args.clone())?;
    // The flags say which job: import (staging → database), export
    // (database → staging) or migrate.
    let command = match (&resolved.from, &resolved.to, &resolved.staging) {
        (None, Some(_), Some(_)) => "import",
        (Some(_), None, Some(_)) => "export",
        _ => "migrate",
    };
    let job = setup_job(command, args.clone(), handle)?;
    let dir = job.cfg.job_dir.clone();
    drop(job);
    if let Some(r) = CutoverRequest::load(&dir, command)?.filter(|r| r.state == "done") {
        println!("{}", r.message.unwrap_or_default());
        say!("the {command} job in {} was already cut over at {}", dir.display(), r.finished_at.unwrap_or_default());
        return Ok(0);
    }
    if command == "import" {
        if read_end(&dir)?.is_none() {
            bail!(
                "the export into {} has not cut over yet: run `vmig cutover` with the export's flags on the source's side \
                 first, then bring the staging area here",
                dir.display()
            );
        }
    } else if OnlineState::load(&dir)?.is_none() {
        bail!("no online job in {} (start one with {command} --online, with the same flags)", dir.display());
    }
    let running = read_status(&dir, command).filter(|s| s.state == "running" && process_alive(s.pid));
    CutoverRequest { standalone: running.is_none(), full_verify: args.full_verify, ..CutoverRequest::new("requested") }.save(&dir, command)?;
    let Some(run) = running else {
        say!("no online run of this job is alive; cutting over here");
        let report = run_job(command, args, handle, cancel.clone())?;
        if cancel.load(Relaxed) {
            return Ok(EXIT_CANCELLED as u8);
        }
        if let Some(e) = report.error {
            bail!("{e}");
        }
        let r = CutoverRequest::load(&dir, command)?.ok_or_else(|| anyhow!("cutover left no result"))?;
        println!("{}", r.message.unwrap_or_default());
        return Ok(0);
    };
    say!("cutover requested from the online job (pid {}); waiting for it to drain, finish and verify", run.pid);
    let mut last_phase = String::new();
    loop {
        if cancel.load(Relaxed) {
            say!("stopped waiting; the online job goes on with the cutover (see vmig status)");
            return Ok(EXIT_CANCELLED as u8);
        }
        if let Some(code) = answered(&dir, command)? {
            return Ok(code);
        }
        match read_status(&dir, command) {
            Some(s) if s.state == "running" && process_alive(s.pid) => {
                if s.phase != last_phase {
                    say!("online job: {}", s.phase);
                    last_phase = s.phase;
                }
            }
            // Unreadable for a moment while the job is alive: look again.
            None if process_alive(run.pid) => {}
            // The job answers, then ends: its answer may have come since the look above.
            _ => match answered(&dir, command)? {
                Some(code) => return Ok(code),
                None => bail!("the online job ended before the cutover finished; run `vmig cutover` again to finish it here"),
            },
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The online job's answer to the cutover request, said: exit code 0 when
/// done, an error when it failed, None while it works on it.
fn answered(dir: &std::path::Path, command: &str) -> Result<Option<u8>> {
    let Some(r) = CutoverRequest::load(dir, command)? else { return Ok(None) };
    match r.state.as_str() {
        "done" => {
            println!("{}", r.message.unwrap_or_default());
            Ok(Some(0))
        }
        "failed" => bail!("{}", r.message.unwrap_or_else(|| "cutover failed".into())),
        _ => Ok(None),
    }
}

fn read_status(dir: &std::path::Path, command: &str) -> Option<Status> {
    let bytes = std::fs::read(JobDir::new(dir).status(command)).ok()?;
    serde_json::from_slice(&bytes).ok()
}
