//! `vmig repair`: compares every chunk and recopies those that differ.

use anyhow::{Result, bail};
use tokio::runtime::Handle;

use crate::backends::{open_sink, open_source, open_subset, parse_side};
use crate::commands::cli::RepairArgs;
use crate::engine::repair::repair;
use crate::model::config::Endpoint;

/// Mends the target until it equals the source; exit 1 while chunks still differ.
pub fn run(a: RepairArgs, handle: &Handle) -> Result<u8> {
    let (from, to) = (parse_side(&a.from)?, Endpoint::parse(&a.to)?);
    if matches!(to, Endpoint::Staging(_)) {
        bail!("repair writes a database target; --to cannot be a staging directory");
    }
    let table = a.table.clone().unwrap_or_else(|| crate::commands::job::DEFAULT_TABLE.into());
    let filter = a.subset.filter()?;
    let source = open_subset(&from, &table, handle, filter.as_ref())?;
    let target_table = a.target_table.clone().unwrap_or_else(|| source.spec().name.clone());
    let sink = open_sink(&to, &target_table, handle, None)?;
    if let Some(f) = &filter {
        sink.restrict(f)?;
    }
    let open_target = || open_subset(&to, &target_table, handle, filter.as_ref());
    let whole_target = match &filter {
        Some(_) => Some(open_source(&to, &target_table, handle)?),
        None => None,
    };
    let r = repair(
        source.as_ref(),
        &open_target,
        whole_target.as_deref(),
        sink.as_ref(),
        a.chunk_rows.unwrap_or(20_000),
        a.workers.unwrap_or(2),
        if matches!(to, Endpoint::Milvus(_)) { crate::engine::repair::RECOPY_SETTLE } else { std::time::Duration::ZERO },
        &|m| say!("{m}"),
    )?;
    let after = r.after.as_ref().unwrap();
    if r.equal {
        println!(
            "repair: recopied {} of {} chunks ({} rows written, {} deleted); the target equals the source ({} rows, ids and every column; vectors {})",
            r.differing_before, r.chunks, r.rows_written, r.rows_deleted, after.target_rows, after.vector_comparison
        );
    } else {
        for d in &after.differing_chunks {
            println!("still different: {}", d.describe());
        }
        println!("repair: recopied {} chunks, but {} chunks still differ (is the source still being written?)", r.differing_before, after.differing_chunks.len());
    }
    if let Some(p) = &a.report {
        std::fs::write(p, serde_json::to_vec_pretty(&r)?)?;
    }
    Ok(if r.equal { 0 } else { 1 })
}
