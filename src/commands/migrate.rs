//! `vmig migrate`, `export` and `import`: one job, offline or online.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};
use tokio::runtime::Handle;

use crate::backends::staging::StagingSource;
use crate::commands::cli::RunArgs;
use crate::commands::job::{JobSetup, setup_job};
use crate::engine::pipeline::run;
use crate::state::progress::Report;

/// `migrate`, `export` and `import`.
pub fn run_job(command: &str, args: RunArgs, handle: &Handle, cancel: Arc<AtomicBool>) -> Result<Report> {
    let job = setup_job(command, args, handle)?;
    let report = run_setup(command, &job, handle, cancel)?;
    say!("{}", report.table());
    for n in &report.notes {
        say!("note: {n}");
    }
    if let Some(path) = &job.args.report {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing report {}", path.display()))?;
    }
    Ok(report)
}

/// Runs a job that is set up: offline or online, an import only over the
/// chunks its staging area holds.
pub fn run_setup(command: &str, job: &JobSetup, handle: &Handle, cancel: Arc<AtomicBool>) -> Result<Report> {
    Ok(if job.cfg.online {
        crate::commands::online::run_online_job(&job, handle, cancel)?
    } else {
        let ready = match command {
            "import" => Some(StagingSource::open(job.cfg.store.clone())?.ready_chunks()?),
            _ => None,
        };
        run(&job.cfg, job.source.clone(), job.sinks.clone(), ready, cancel)?
    })
}
