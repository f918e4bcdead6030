//! Milvus as an online target. Milvus has no transactions and (in 2.3) no
//! partial update, so a change batch is: final images upserted (a partial
//! image completed from the row the target holds, so an unchanged vector is
//! kept as it is) and deleted ids deleted. The batch does not wait for a
//! flush (a flush takes Milvus seconds, which would be the lag): one flush
//! is in flight at a time, requested after a batch when none is, and once
//! persisted it appends to the job's ledger file the position of the last
//! batch applied before it was asked for. Replaying batches after a kill
//! converges: upsert and delete by id are idempotent.

use anyhow::{Result, anyhow};
use arrow::array::{ArrayRef, UInt32Array};
use arrow::record_batch::RecordBatch;
use milvus::proto::common::MsgType;
use milvus::proto::milvus::DeleteRequest;

use crate::backends::milvus::{base, in_expr};
use crate::backends::milvus::ddl::{request_flush, wait_flushed};
use crate::backends::milvus::encode::{UPSERTS_IN_FLIGHT, start_upsert};
use crate::backends::milvus::mapping::Collection;
use crate::backends::milvus::sink::{MilvusSink, OnlineFlush, persist};
use crate::backends::milvus::source::query_rows;
use crate::contract::changes::{AppliedPosition, ChangeSet, keys_of};
use crate::model::plan::Key;
use crate::state::ledger::LedgerFile;
use std::sync::Arc;

/// Ids per delete or lookup expression.
const IDS_PER_EXPR: usize = 4_000;

impl MilvusSink {
    pub(super) fn apply(&self, job: &str, set: &ChangeSet) -> Result<()> {
        let coll = self.collection()?;
        let mut images: Vec<RecordBatch> = set.images.iter().filter(|b| b.num_rows() > 0).cloned().collect();
        for b in set.partial.iter().filter(|b| b.num_rows() > 0) {
            images.extend(self.complete_partial(&coll, b)?);
        }
        // Milvus scopes an upsert's delete to the partition it names: a row
        // that moved partition would keep its old copy. So rows that carry
        // their partition are first deleted from every partition.
        if coll.partitioned() {
            for b in &images {
                self.delete_keys(&coll, &keys_of(b, &coll.spec.primary_key)?)?;
            }
        }
        // Requests of about request_bytes, UPSERTS_IN_FLIGHT at once. A change
        // set holds each key once, so its requests touch disjoint rows and
        // may land in any order; the next set starts after they all have.
        let per_request = (self.request_bytes / crate::model::schema::estimate_row_bytes(&coll.spec).max(1)).max(1);
        let mut in_flight = std::collections::VecDeque::new();
        let wait = |h: tokio::task::JoinHandle<Result<()>>| -> Result<()> {
            self.conn.block_on(h).map_err(|e| anyhow!("upsert task ended abnormally: {e}"))?
        };
        for b in &images {
            let mut start = 0;
            while start < b.num_rows() {
                let n = per_request.min(b.num_rows() - start);
                if in_flight.len() == UPSERTS_IN_FLIGHT {
                    wait(in_flight.pop_front().expect("a request in flight"))?;
                }
                in_flight.push_back(start_upsert(&self.conn, &coll, &b.slice(start, n))?);
                start += n;
            }
        }
        for h in in_flight {
            wait(h)?;
        }
        self.delete_keys(&coll, &set.deletes)?;
        // A repair applies rows without a stream position, flushed before it verifies.
        let Some(ledger) = self.ledger.clone().filter(|_| !job.is_empty()) else {
            let ticket = request_flush(&self.conn, &self.name)?;
            return wait_flushed(&self.conn, &self.name, ticket);
        };
        let mut f = self.online_flush.lock().unwrap();
        let mut counts = match &f.applied {
            Some(a) => a.counts,
            None => ledger.position(job)?.map(|p| p.counts).unwrap_or_default(),
        };
        counts.add(&set.counts);
        f.applied = Some(AppliedPosition { position: set.position, counts });
        f.unrequested = true;
        f.job = job.to_string();
        self.flush_online(&mut f, ledger, false)
    }

    /// Reaps the flush in flight if it is done (or, `wait`, once it is) and
    /// requests the next one when batches were applied since the last
    /// request; `wait`: until everything applied is persisted and recorded.
    fn flush_online(&self, f: &mut OnlineFlush, ledger: Arc<LedgerFile>, wait: bool) -> Result<()> {
        if let Some(h) = f.in_flight.take_if(|h| wait || h.is_finished()) {
            h.join().map_err(|_| anyhow!("a Milvus flush waiter panicked"))??;
        }
        if f.in_flight.is_some() || !f.unrequested {
            return Ok(());
        }
        let Some(at) = f.applied.clone() else { return Ok(()) };
        f.unrequested = false;
        let ticket = request_flush(&self.conn, &self.name)?;
        let (conn, name, job) = (self.conn.clone(), self.name.clone(), f.job.clone());
        let h = std::thread::spawn(move || {
            persist(&conn, &name, ticket, &format!("flushing the changes up to position {}", at.position))?;
            ledger.record_position(&job, &at)
        });
        if wait {
            h.join().map_err(|_| anyhow!("a Milvus flush waiter panicked"))??;
        } else {
            f.in_flight = Some(h);
        }
        Ok(())
    }

    /// Everything applied online persisted and its position recorded
    /// (before a cutover finishes the target, and when the job stops).
    pub(super) fn settle_online(&self) -> Result<()> {
        let Some(ledger) = self.ledger.clone() else { return Ok(()) };
        let mut f = self.online_flush.lock().unwrap();
        self.flush_online(&mut f, ledger, true)
    }

    /// Deletes the rows with these keys from every partition.
    fn delete_keys(&self, coll: &Collection, keys: &[Key]) -> Result<()> {
        for part in keys.chunks(IDS_PER_EXPR) {
            let req = DeleteRequest {
                base: base(MsgType::Delete),
                db_name: self.conn.url.database.clone(),
                collection_name: self.name.clone(),
                expr: in_expr(&coll.pk_field, part),
                ..Default::default()
            };
            self.conn.call(&format!("deleting {} rows from {}", part.len(), self.name), |mut c| async move { c.delete(req).await })?;
        }
        Ok(())
    }

    /// Full images for rows of which only some columns changed: the other
    /// columns from the row the target holds now (rows it does not hold are
    /// skipped: a later change in the stream deletes or rewrites them).
    fn complete_partial(&self, coll: &Collection, partial: &RecordBatch) -> Result<Option<RecordBatch>> {
        let keys = keys_of(partial, &coll.spec.primary_key)?;
        let output: Vec<String> = coll.fields.iter().map(|f| f.field.clone()).collect();
        let mut current = Vec::new();
        for part in keys.chunks(IDS_PER_EXPR) {
            current.extend(query_rows(&self.conn, coll, &in_expr(&coll.pk_field, part), &output, part.len(), None)?);
        }
        let current = arrow::compute::concat_batches(&coll.spec.arrow_schema(), &current)?;
        let have = keys_of(&current, &coll.spec.primary_key)?;
        let at: std::collections::HashMap<&Key, u32> = have.iter().enumerate().map(|(i, k)| (k, i as u32)).collect();
        let (mut from_current, mut from_partial) = (Vec::new(), Vec::new());
        for (i, k) in keys.iter().enumerate() {
            if let Some(&j) = at.get(k) {
                from_current.push(j);
                from_partial.push(i as u32);
            }
        }
        if from_current.is_empty() {
            return Ok(None);
        }
        let (from_current, from_partial) = (UInt32Array::from(from_current), UInt32Array::from(from_partial));
        let columns = coll
            .spec
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| match partial.column_by_name(&c.name) {
                Some(changed) => arrow::compute::take(changed, &from_partial, None),
                None => arrow::compute::take(current.column(i), &from_current, None),
            })
            .collect::<Result<Vec<ArrayRef>, _>>()?;
        Ok(Some(RecordBatch::try_new(coll.spec.arrow_schema(), columns)?))
    }
}

