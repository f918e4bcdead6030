//! Applying a change set to one target: changed rows checked and converted
//! as snapshot rows are, those a target would refuse sent to rejects; and
//! the gate that keeps overlapping batches committing in order.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Condvar, Mutex};

use anyhow::Result;
use arrow::record_batch::RecordBatch;

use crate::contract::changes::ChangeSet;
use crate::contract::without_rows;
use crate::engine::pipeline::{JobConfig, Target};
use crate::engine::transform::{Transformer, reject_batch, write_rejects};
use crate::model::schema::TableSpec;
use crate::state::ledger::JobDir;
use crate::state::progress::Progress;

/// Transforms a change set for one target (bad rows, and rows the target
/// would refuse, to rejects) and applies it, committing once `before_commit`
/// allows (see `Sink::apply_changes_in_order`).
pub(super) fn apply_to_target(
    cfg: &JobConfig,
    t: &Target,
    set: &ChangeSet,
    progress: &Progress,
    before_commit: &dyn Fn() -> Result<()>,
) -> Result<()> {
    let mut rejects: Vec<RecordBatch> = Vec::new();
    // In the target's columns, as a chunk's "-refused" rejects are.
    let mut refused_rows: Vec<RecordBatch> = Vec::new();
    let mut out = ChangeSet { images: Vec::new(), partial: Vec::new(), ..set.clone() };
    for b in &set.images {
        let tr = t.transformer.apply(0, b)?;
        rejects.extend(tr.rejects);
        let refused = t.sink.refused_changes(&tr.valid)?;
        if refused.is_empty() {
            out.images.push(tr.valid);
        } else {
            let rows: Vec<u32> = refused.iter().map(|r| r.row as u32).collect();
            refused_rows.push(reject_batch(0, &tr.valid, &rows, refused.iter().map(|r| r.reason.clone()).collect())?);
            out.images.push(without_rows(&tr.valid, &refused)?);
        }
    }
    for b in &set.partial {
        let tr = Transformer::new(&columns_of(&t.spec, b)).apply(0, b)?;
        rejects.extend(tr.rejects);
        out.partial.push(tr.valid);
    }
    let n: u64 = rejects.iter().chain(&refused_rows).map(|b| b.num_rows() as u64).sum();
    if n > 0 {
        progress.counters.change_rows_rejected.fetch_add(n, Relaxed);
        let dir = JobDir::new(&cfg.job_dir).rejects();
        for (kind, batches) in [("changes", &rejects), ("refused-changes", &refused_rows)] {
            if !batches.is_empty() {
                write_rejects(&dir, &format!("{}-{}-{kind}-{:016X}", cfg.command, t.name, set.position), 0, batches)?;
            }
        }
        progress.println(&format!(
            "{n} changed rows refused by {} (in rejects/; the target keeps their previous version)",
            t.name
        ));
    }
    t.sink.apply_changes_in_order(&cfg.job, &out, before_commit)
}

/// Opens once a batch is applied to every target, or has failed: the batch
/// after it, applied at the same time, commits only through an open gate,
/// and rolls back if the batch before it failed.
#[derive(Default)]
pub(super) struct Gate {
    done: Mutex<Option<bool>>,
    opened: Condvar,
}

impl Gate {
    pub(super) fn open(&self, applied: bool) {
        *self.done.lock().unwrap() = Some(applied);
        self.opened.notify_all();
    }

    /// Waits for the batch before; Err if it was not applied.
    pub(super) fn wait(&self) -> Result<()> {
        let mut done = self.done.lock().unwrap();
        loop {
            match *done {
                Some(true) => return Ok(()),
                // Not an error of its own (the batch before reports why): no retry.
                Some(false) => return Err(crate::model::retry::Cancelled.into()),
                None => done = self.opened.wait(done).unwrap(),
            }
        }
    }
}

/// The target spec narrowed to the columns a partial batch carries.
fn columns_of(spec: &TableSpec, batch: &RecordBatch) -> TableSpec {
    let names: Vec<&str> = batch.schema_ref().fields().iter().map(|f| f.name().as_str()).collect();
    TableSpec {
        name: spec.name.clone(),
        columns: spec.columns.iter().filter(|c| names.contains(&c.name.as_str())).cloned().collect(),
        primary_key: spec.primary_key.clone(),
        indexes: Vec::new(),
        computed: Vec::new(), partition_key: None,
    }
}
