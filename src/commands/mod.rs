//! Floor 6, the commands: the command line (`cli`) and one module per
//! subcommand: resolve settings, open endpoints, call the engine.

pub mod cli;
pub mod cutover;
pub mod generate;
pub mod inspect;
pub mod job;
pub mod migrate;
pub mod online;
pub mod repair;
pub mod reset;
pub mod status;
pub mod tables;
pub mod verify;
pub mod verify_html;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Result, bail};
use cli::{Cli, Command, RunArgs};
use tokio::runtime::Handle;

/// Runs one command line to its exit code.
pub fn dispatch(cli: Cli, handle: &tokio::runtime::Handle, cancel: Arc<AtomicBool>) -> Result<u8> {
    match cli.command {
        Command::Migrate(a) => job_command("migrate", a, handle, cancel),
        Command::Export(a) => job_command("export", a, handle, cancel),
        Command::Import(a) => job_command("import", a, handle, cancel),
        Command::Cutover(a) => cutover::cutover(a, handle, cancel),
        Command::Status(a) => status::status(a).map(|_| 0),
        Command::Inspect(a) => inspect::inspect(a).map(|ok| if ok { 0 } else { 1 }),
        Command::Reset(a) => reset::reset(a, handle).map(|_| 0),
        Command::Repair(a) => repair::run(a, handle),
        Command::Verify(a) => verify::run(&a, handle),
        Command::Generate(a) => generate::run(a, handle),
    }
}

/// Runs a job command (`migrate`, `export`, `import`) to its exit code.
fn job_command(command: &str, a: RunArgs, handle: &Handle, cancel: Arc<AtomicBool>) -> Result<u8> {
    if job::resolve_run_args(a.clone())?.tables.is_some() {
        let report = tables::run_tables(command, a, handle, cancel.clone())?;
        if cancel.load(Ordering::SeqCst) {
            say!("cancelled: {} chunks committed in this run; run the same command again to resume", report.chunks_committed());
            return Ok(job::EXIT_CANCELLED as u8);
        }
        return match report.error() {
            None => Ok(0),
            Some(e) => bail!("{e}"),
        };
    }
    let report = migrate::run_job(command, a, handle, cancel.clone())?;
    if cancel.load(Ordering::SeqCst) {
        say!("cancelled: {} chunks committed in this run; run the same command again to resume", report.chunks_committed);
        return Ok(job::EXIT_CANCELLED as u8);
    }
    match &report.error {
        None => Ok(0),
        Some(e) => bail!("{e}"),
    }
}
