//! Several tables in one job (pipeline file `tables`): each table is a job
//! of its own (plan, ledger, resume, staging subdirectory, filter), and all
//! of them run at once with their chunks sharing the `--workers` in flight;
//! a table's finish (its index builds) overlaps the other tables' loads.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tokio::runtime::Handle;

use crate::commands::cli::RunArgs;
use crate::commands::job::{JobSetup, resolve_run_args, setup_job};
use crate::commands::migrate::run_setup;
use crate::engine::pipeline::Permits;
use crate::model::config::TableEntry;
use crate::state::progress::Report;

/// One table's part of the job's report.
#[derive(Debug, Serialize)]
pub struct TableSection {
    pub table: String,
    pub target_table: String,
    pub job: String,
    pub filter: Option<String>,
    pub report: Report,
}

/// The report of a many-table job: a section per table.
#[derive(Debug, Serialize)]
pub struct TablesReport {
    pub ok: bool,
    pub tables: Vec<TableSection>,
}

impl TablesReport {
    /// Chunks committed by this run over all tables.
    pub fn chunks_committed(&self) -> u64 {
        self.tables.iter().map(|t| t.report.chunks_committed).sum()
    }

    /// The first table's error, named.
    pub fn error(&self) -> Option<String> {
        self.tables.iter().find_map(|t| t.report.error.as_ref().map(|e| format!("table {}: {e}", t.table)))
    }
}

/// The flags of one table's job: the entry's table, target, subset and
/// mapping over the job's; its own staging subdirectory and job id.
fn table_args(base: &RunArgs, e: &TableEntry) -> RunArgs {
    let target = e.target_table.clone().unwrap_or_else(|| e.table.clone());
    let mut a = base.clone();
    a.config = None;
    a.tables = None;
    a.table = Some(e.table.clone());
    a.target_table = e.target_table.clone();
    a.subset = e.subset();
    a.milvus_fields = e.milvus_fields.clone().or_else(|| base.milvus_fields.clone());
    a.staging = base.staging.as_ref().map(|s| format!("{}/{}", s.trim_end_matches('/'), path_safe(&target)));
    a.job = base.job.as_ref().map(|j| format!("{j}.{}", path_safe(&target)));
    a.report = None;
    a.metrics = None;
    // One display for several concurrent jobs would garble: each prints
    // its lines, the sections follow at the end.
    a.quiet = true;
    a
}

fn path_safe(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).collect()
}

pub fn run_tables(command: &str, args: RunArgs, handle: &Handle, cancel: Arc<AtomicBool>) -> Result<TablesReport> {
    let a = resolve_run_args(args)?;
    let entries = a.tables.clone().unwrap_or_default();
    if entries.is_empty() {
        bail!("pipeline file: `tables` is empty");
    }
    if a.table.is_some() || a.target_table.is_some() || a.subset.filter()?.is_some() {
        bail!("a pipeline file with `tables` names each table, its target and its subset there; drop --table, --target-table and filters");
    }
    if a.online {
        bail!("several tables in one job run offline for now; run one online job per table");
    }
    let mut targets: Vec<String> = entries.iter().map(|e| e.target_table.clone().unwrap_or_else(|| e.table.clone())).collect();
    targets.sort();
    if let Some(w) = targets.windows(2).find(|w| w[0] == w[1]) {
        bail!("pipeline file: two entries of `tables` write target table {}", w[0]);
    }
    let permits = Arc::new(Permits::new(a.workers.unwrap_or(2)));
    // Every table set up before any runs: a wrong name stops the job at once.
    let mut jobs: Vec<(TableEntry, JobSetup)> = Vec::new();
    for e in &entries {
        let mut job = setup_job(command, table_args(&a, e), handle).with_context(|| format!("table {}", e.table))?;
        job.cfg.permits = Some(permits.clone());
        jobs.push((e.clone(), job));
    }
    say!(
        "vmig {command}: {} tables in one job, {} chunks in flight at most: {}",
        jobs.len(),
        a.workers.unwrap_or(2),
        jobs.iter().map(|(_, j)| format!("{} → {} (job {})", j.table, j.target_table, j.cfg.job)).collect::<Vec<_>>().join(", ")
    );
    let reports: Vec<Result<Report>> = std::thread::scope(|s| {
        let runs: Vec<_> = jobs.iter().map(|(_, j)| s.spawn(|| run_setup(command, j, handle, cancel.clone()))).collect();
        runs.into_iter().map(|r| r.join().unwrap_or_else(|_| Err(anyhow::anyhow!("the table's run panicked")))).collect()
    });
    let mut tables = Vec::new();
    for ((e, j), r) in jobs.into_iter().zip(reports) {
        let report = r.with_context(|| format!("table {}", e.table))?;
        tables.push(TableSection {
            table: j.table.clone(),
            target_table: j.target_table.clone(),
            job: j.cfg.job.clone(),
            filter: j.cfg.filter.as_ref().map(|f| f.describe()),
            report,
        });
    }
    let report = TablesReport { ok: tables.iter().all(|t| t.report.error.is_none()), tables };
    for t in &report.tables {
        let subset = t.filter.as_ref().map(|f| format!(" where {f}")).unwrap_or_default();
        say!("── table {} → {}{subset} (job {})", t.table, t.target_table, t.job);
        say!("{}", t.report.table());
        for n in &t.report.notes {
            say!("note: {n}");
        }
    }
    if let Some(path) = &a.report {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?).with_context(|| format!("writing report {}", path.display()))?;
    }
    Ok(report)
}
