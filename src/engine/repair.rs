//! `vmig repair`: makes a target equal to a source that kept changing (or a
//! partial run left behind) without a full recopy. Verify's per-chunk
//! comparison finds the differing chunks; each is recopied as one change
//! batch — the target's ids the source no longer has are deleted, the
//! source's rows of the chunk replace the target's — and then the whole
//! table is verified again.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use arrow::record_batch::RecordBatch;

use crate::contract::{OnExisting, Sink, SinkOptions, Source};
use crate::contract::changes::{ChangeCounts, ChangeSet};
use crate::contract::reconcile::diff_ids;
use crate::engine::transform::Transformer;
use crate::engine::verify::{VerifyReport, verify};
use crate::model::plan::ChunkRange;

/// What a repair did.
#[derive(Debug, Default, serde::Serialize)]
pub struct RepairReport {
    pub chunks: u64,
    pub differing_before: u64,
    /// The verify before the repair.
    pub before: Option<VerifyReport>,
    pub rows_written: u64,
    pub rows_deleted: u64,
    /// The verify after the repair.
    pub equal: bool,
    pub after: Option<VerifyReport>,
}

/// How long recopied chunks must stay equal before they count as mended:
/// Milvus 2.3 can resurface deletes it lost (milvus#32915) after a recopy
/// first compares equal.
pub const RECOPY_SETTLE: Duration = Duration::from_secs(5);

/// Rows per change batch written to the target.
const BATCH_ROWS: usize = 2_000;

/// `open_target`: the target as verify reads it, opened fresh for each
/// comparison (a PostgreSQL side keeps one snapshot per opening).
/// `whole_target`: of a subset repair, the target with every row, to make
/// sure no row the subset lacks belongs to a row outside it.
pub fn repair(
    source: &dyn Source,
    open_target: &dyn Fn() -> Result<Arc<dyn Source>>,
    whole_target: Option<&dyn Source>,
    sink: &dyn Sink,
    chunk_rows: u64,
    workers: usize,
    settle: Duration,
    say: &dyn Fn(&str),
) -> Result<RepairReport> {
    let plan = source.plan(chunk_rows)?;
    let before = verify(source, open_target()?.as_ref(), &plan, workers)?;
    let mut report = RepairReport { chunks: plan.len() as u64, differing_before: before.differing_chunks.len() as u64, ..Default::default() };
    if before.equal {
        say(&format!("the target already equals the source ({} rows in {} chunks); nothing to repair", before.source_rows, plan.len()));
        report.equal = true;
        report.after = Some(before);
        return Ok(report);
    }
    let differing: Vec<ChunkRange> =
        before.differing_chunks.iter().filter_map(|d| plan.iter().find(|c| c.id == d.chunk).cloned()).collect();
    let (written, deleted) = recopy_chunks(source, open_target()?.as_ref(), whole_target, sink, &plan, &differing, say)?;
    report.rows_written += written;
    report.rows_deleted += deleted;
    let mut after = verify(source, open_target()?.as_ref(), &plan, workers)?;
    if after.equal && !settle.is_zero() {
        std::thread::sleep(settle);
        let again = verify(source, open_target()?.as_ref(), &differing, workers)?;
        if !again.equal {
            say(&format!("{} recopied chunks differ again {} s after they compared equal", again.differing_chunks.len(), settle.as_secs()));
            after = again;
        }
    }
    report.before = Some(before);
    report.equal = after.equal;
    report.after = Some(after);
    Ok(report)
}

/// Makes each of `chunks` on the target equal to the source's: the target's
/// ids the source lacks are deleted and the source's rows replace the
/// target's (upserts, which also remove any extra copies Milvus holds);
/// then the target compacts what it stores (`Sink::compact`).
/// `plan`: the plan the chunks belong to (the sink prepares for it).
/// Returns the rows written and deleted.
pub fn recopy_chunks(
    source: &dyn Source,
    target: &dyn Source,
    whole_target: Option<&dyn Source>,
    sink: &dyn Sink,
    plan: &[ChunkRange],
    chunks: &[ChunkRange],
    say: &dyn Fn(&str),
) -> Result<(u64, u64)> {
    let opts = SinkOptions { job: String::new(), on_existing: OnExisting::Upsert, create_indexes: false, online: true, shared: false, index_memory: None, vector_storage: None };
    let target_spec = sink.prepare(source.spec(), plan, &opts)?;
    let transformer = Transformer::new(&target_spec);
    let (mut written, mut deleted) = (0, 0);
    for chunk in chunks {
        // Ids only the target has (verify lists at most 20 of them).
        let ids = diff_ids(source, target, chunk)?;
        if let Some(whole) = whole_target.filter(|_| !ids.missing.is_empty()) {
            let mut taken = Vec::new();
            whole.read_rows_by_id(&ids.missing, &mut |b| {
                taken.extend(crate::contract::changes::keys_of(&b, &whole.spec().primary_key)?);
                Ok(())
            })?;
            if !taken.is_empty() {
                taken.truncate(20);
                bail!(
                    "chunk {}: the target gives ids {taken:?} to rows outside the subset; repair does not overwrite them \
                     (the rows of the subset with these ids cannot be copied under the same ids)",
                    chunk.id
                );
            }
        }
        let extra = ids.extra;
        let mut set = ChangeSet {
            deletes: extra.clone(),
            counts: ChangeCounts { deletes: extra.len() as u64, ..Default::default() },
            ..Default::default()
        };
        let mut rows = 0u64;
        // The source reads on its own thread (its driver's runtime), the
        // target writes here, a few batches apart.
        std::thread::scope(|s| -> Result<()> {
            let (tx, rx) = crossbeam_channel::bounded::<RecordBatch>(2);
            let reader = s.spawn(move || source.read_chunk(chunk, BATCH_ROWS, &mut |b| tx.send(b).map_err(|_| anyhow!("stopped"))));
            for b in rx.iter() {
                let t = transformer.apply(0, &b)?;
                let refused: usize = t.rejects.iter().map(|r| r.num_rows()).sum();
                if refused > 0 {
                    bail!(
                        "chunk {}: the target refuses {refused} of its rows (a migrate of the same tables lists them in rejects/); \
                         repair cannot make the target equal",
                        chunk.id
                    );
                }
                rows += t.valid.num_rows() as u64;
                set.images.push(t.valid);
                sink.apply_changes("", &set)?;
                set = ChangeSet::default();
            }
            reader.join().map_err(|_| anyhow!("reading chunk {} panicked", chunk.id))??;
            if set.has_rows() {
                sink.apply_changes("", &set)?;
            }
            Ok(())
        })?;
        written += rows;
        deleted += extra.len() as u64;
        say(&format!(
            "chunk {:06} {}: rewrote {rows} rows, deleted {} the source no longer has",
            chunk.id,
            chunk.describe_bounds(),
            extra.len()
        ));
    }
    let started = std::time::Instant::now();
    if !chunks.is_empty() && sink.compact()? {
        say(&format!("compacted the target in {:.1} s, so what it keeps is compared", started.elapsed().as_secs_f64()));
    }
    Ok((written, deleted))
}
