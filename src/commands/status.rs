//! `vmig status`: a job's plan, runs, workers and online state.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::Result;

use crate::commands::cli::StatusArgs;
use crate::commands::job::job_store_of;
use crate::state::job_status::JobStatus;
use crate::state::ledger::JobDir;
use crate::state::progress::chunk_state;

pub fn status(a: StatusArgs) -> Result<()> {
    let store = job_store_of(&a.staging, &a.job, &a.state_root)?;
    if a.json {
        let v = JobStatus::read(&store, None)?.document();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let Some(every) = a.watch else {
        return print_text(&JobStatus::read(&store, None)?);
    };
    let terminal = std::io::stdout().is_terminal();
    loop {
        let st = JobStatus::read(&store, None)?;
        if terminal {
            // Clear the screen and home the cursor: the view is redrawn in place.
            print!("\x1b[2J\x1b[H");
        }
        println!("{}  (every {every} s; Ctrl-C to stop)", crate::model::now_rfc3339());
        print_text(&st)?;
        std::io::stdout().flush()?;
        std::thread::sleep(Duration::from_secs_f64(every.max(0.5)));
    }
}

fn print_text(st: &JobStatus) -> Result<()> {
    let manifest = &st.manifest;
    println!("job {}  (planned {})", manifest.job, manifest.created_at);
    println!("source: {}", manifest.source);
    println!(
        "plan: {} chunks, {} rows",
        manifest.plan.len(),
        manifest.plan.iter().map(|c| c.rows).sum::<u64>()
    );
    if !st.staged.is_empty() {
        println!(
            "staged: {}/{} chunks, {} rows, {:.1} MB",
            st.staged.len(),
            manifest.plan.len(),
            st.staged.values().map(|r| r.rows).sum::<u64>(),
            st.staged.values().map(|r| r.bytes).sum::<u64>() as f64 / 1e6
        );
    }
    for s in &st.runs {
        let phase = if s.phase.is_empty() || s.state != "running" { String::new() } else { format!(" ({})", s.phase) };
        let rate = match (s.state.as_str(), s.eta_seconds) {
            ("running", Some(eta)) => format!(" · {:.0} rows/s · eta {}", s.rows_per_second, human_seconds(eta)),
            _ => String::new(),
        };
        println!(
            "{}: {}{phase} · {} chunks committed, {} skipped (already committed) of {} · {} rows written · {} rejected · {:.1} MB{rate} · updated {}",
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
        for b in &s.index_builds {
            let took = if b.ended_at.is_some() { "in" } else { "for" };
            println!("  index {} on {}: {} {took} {:.1} s (started {})", b.index, b.on, b.state, b.seconds, b.started_at);
        }
    }
    let (states, _) = st.chunk_map();
    if states.chars().any(|c| c != chunk_state::PENDING) {
        let count = |c: char| states.chars().filter(|s| *s == c).count();
        println!(
            "chunks: {} committed ({} with rejects), {} committed earlier, {} running, {} failed, {} pending",
            count(chunk_state::COMMITTED) + count(chunk_state::COMMITTED_WITH_REJECTS),
            count(chunk_state::COMMITTED_WITH_REJECTS),
            count(chunk_state::SKIPPED),
            count(chunk_state::RUNNING),
            count(chunk_state::FAILED),
            count(chunk_state::PENDING) + count(chunk_state::ELSEWHERE),
        );
    }
    let dir = st.job_dir.clone().unwrap_or_default();
    for line in crate::commands::online::status_lines(&dir, &st.runs)? {
        println!("{line}");
    }
    for line in crate::engine::pipeline::shared::status_lines(&st.workers) {
        println!("{line}");
    }
    if st.reject_files > 0 {
        println!("rejects: {} files in {}", st.reject_files, JobDir::new(&dir).rejects().display());
    }
    Ok(())
}

/// 95 → "1m35s".
fn human_seconds(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match s {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}
