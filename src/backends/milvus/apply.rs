//! Milvus as an online target. Milvus has no transactions and (in 2.3) no
//! partial update, so a change batch is: final images upserted (a partial
//! image completed from the row the target holds, so an unchanged vector is
//! kept as it is), deleted ids deleted, a flush waited for, and only then the
//! position appended to the job's ledger file. Replaying a batch after a
//! kill converges: upsert and delete by id are idempotent.

use anyhow::{Result, anyhow};
use arrow::array::{ArrayRef, UInt32Array};
use arrow::record_batch::RecordBatch;
use milvus::proto::common::MsgType;
use milvus::proto::milvus::DeleteRequest;

use crate::backends::milvus::{base, in_expr};
use crate::backends::milvus::ddl::{request_flush, wait_flushed};
use crate::backends::milvus::encode::start_upsert;
use crate::backends::milvus::mapping::Collection;
use crate::backends::milvus::sink::MilvusSink;
use crate::backends::milvus::source::query_rows;
use crate::contract::changes::{AppliedPosition, ChangeSet, keys_of};
use crate::model::plan::Key;

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
        // Requests of about request_bytes, one in flight while the next is encoded.
        let per_request = (self.request_bytes / crate::model::schema::estimate_row_bytes(&coll.spec).max(1)).max(1);
        let mut in_flight = None;
        for b in &images {
            let mut start = 0;
            while start < b.num_rows() {
                let n = per_request.min(b.num_rows() - start);
                let h = start_upsert(&self.conn, &coll, &b.slice(start, n))?;
                if let Some(prev) = in_flight.replace(h) {
                    self.conn.block_on(prev).map_err(|e| anyhow!("upsert task ended abnormally: {e}"))??;
                }
                start += n;
            }
        }
        if let Some(last) = in_flight {
            self.conn.block_on(last).map_err(|e| anyhow!("upsert task ended abnormally: {e}"))??;
        }
        self.delete_keys(&coll, &set.deletes)?;
        let ticket = request_flush(&self.conn, &self.name)?;
        wait_flushed(&self.conn, &self.name, ticket)?;
        // A repair applies rows without a stream position.
        if let Some(l) = self.ledger.as_ref().filter(|_| !job.is_empty()) {
            let mut counts = l.position(job)?.map(|p| p.counts).unwrap_or_default();
            counts.add(&set.counts);
            l.record_position(job, &AppliedPosition { position: set.position, counts })?;
        }
        Ok(())
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

