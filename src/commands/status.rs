//! `vmig status`: a job's plan, runs, workers and online state.

use std::path::Path;

use anyhow::{Context, Result, anyhow};

use crate::commands::cli::StatusArgs;
use crate::commands::job::job_store_of;
use crate::state::ledger::JobDir;
use crate::state::locks::process_alive;
use crate::state::manifest::{Manifest, read_markers};
use crate::state::progress::{Status, worker_statuses};

pub fn status(a: StatusArgs) -> Result<()> {
    let store = job_store_of(&a.staging, &a.job, &a.state_root)?;
    let manifest = Manifest::load(&store)?
        .ok_or_else(|| anyhow!("no job state in {} (nothing planned yet)", store.describe()))?;
    let markers = read_markers(&store)?;
    let workers = worker_statuses(&store)?;
    let dir = store.local_dir().map(Path::to_path_buf).unwrap_or_default();
    let mut runs: Vec<Status> = Vec::new();
    for cmd in ["export", "migrate", "import"] {
        let p = JobDir::new(&dir).status(cmd);
        if store.is_remote() {
            break;
        }
        if let Ok(bytes) = std::fs::read(&p) {
            let mut s: Status = serde_json::from_slice(&bytes).with_context(|| format!("{} is damaged", p.display()))?;
            if s.state == "running" && !process_alive(s.pid) {
                s.state = "interrupted (process gone)".into();
            }
            runs.push(s);
        }
    }
    let rejects = std::fs::read_dir(JobDir::new(&dir).rejects()).map(|d| d.count()).unwrap_or(0);
    if a.json {
        let v = serde_json::json!({
            "job": manifest.job, "source": manifest.source, "created_at": manifest.created_at,
            "chunks_planned": manifest.plan.len(), "rows_planned": manifest.plan.iter().map(|c| c.rows).sum::<u64>(),
            "staged_chunks": markers.len(), "staged_rows": markers.values().map(|r| r.rows).sum::<u64>(),
            "staged_bytes": markers.values().map(|r| r.bytes).sum::<u64>(), "reject_files": rejects, "runs": runs,
            "workers": workers,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("job {}  (planned {})", manifest.job, manifest.created_at);
    println!("source: {}", manifest.source);
    println!(
        "plan: {} chunks, {} rows",
        manifest.plan.len(),
        manifest.plan.iter().map(|c| c.rows).sum::<u64>()
    );
    if !markers.is_empty() {
        println!(
            "staged: {}/{} chunks, {} rows, {:.1} MB",
            markers.len(),
            manifest.plan.len(),
            markers.values().map(|r| r.rows).sum::<u64>(),
            markers.values().map(|r| r.bytes).sum::<u64>() as f64 / 1e6
        );
    }
    for s in &runs {
        let phase = if s.phase.is_empty() || s.state != "running" { String::new() } else { format!(" ({})", s.phase) };
        println!(
            "{}: {}{phase} · {} chunks committed, {} skipped (already committed) of {} · {} rows written · {} rejected · {:.1} MB · updated {}",
            s.command,
            s.state,
            s.chunks_committed,
            s.chunks_skipped,
            s.chunks_total,
            s.rows_written,
            s.rows_rejected,
            s.bytes_written as f64 / 1e6,
            s.updated_at
        );
        for f in &s.failures {
            println!("  failed chunk {}: {}", f.chunk, f.error);
        }
        if let Some(e) = &s.last_error {
            println!("  last error: {e}");
        }
    }
    for line in crate::commands::online::status_lines(&dir, &runs)? {
        println!("{line}");
    }
    for line in crate::engine::pipeline::shared::status_lines(&workers) {
        println!("{line}");
    }
    if rejects > 0 {
        println!("rejects: {rejects} files in {}", JobDir::new(&dir).rejects().display());
    }
    Ok(())
}
