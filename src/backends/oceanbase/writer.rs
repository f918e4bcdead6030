//! Writing one chunk into OceanBase / seekdb: multi-row INSERTs split by
//! bytes, the chunk's rows and its ledger row in one transaction, rows the
//! server refuses found by bisection.

use std::sync::Arc;

use anyhow::Result;
use arrow::array::ArrayRef;
use arrow::record_batch::RecordBatch;
use mysql_async::prelude::Queryable;
use mysql_async::Conn;
use tokio::runtime::Handle;

use super::sql::{VectorLiteral, encode_row};
use super::*;
use crate::contract::{ChunkWriter, RowReject, refuse_foreign_ids};
use crate::contract::commit::CommitRecord;
use crate::model::now_rfc3339;
use crate::model::plan::ChunkRange;
use crate::model::schema::ColumnType;

/// Server errors caused by a row's values (so bisecting finds the row), as
/// opposed to errors of the connection, the statement or the server.
fn is_row_error(e: &mysql_async::Error) -> bool {
    match e {
        mysql_async::Error::Server(s) => {
            s.state.starts_with("22")
                || s.state.starts_with("23")
                || matches!(s.code, 1048 | 1210 | 1264 | 1265 | 1292 | 1366 | 1406 | 3140)
        }
        _ => false,
    }
}

pub(super) struct ObChunkWriter {
    pub(super) handle: Handle,
    pub(super) pool: Arc<Pool>,
    pub(super) conn: Option<Conn>,
    pub(super) job: String,
    pub(super) chunk: ChunkRange,
    pub(super) prefix: String,
    pub(super) types: Vec<ColumnType>,
    pub(super) literal: VectorLiteral,
    pub(super) statement_bytes: usize,
    pub(super) record_ledger: bool,
    pub(super) bytes: u64,
    /// A subset job whose target holds other rows: the query for the ids
    /// they hold (a list follows), the filter, the key column.
    pub(super) foreign_check: Option<(String, crate::model::filter::Filter, String, KeySql)>,
    /// A string key's column: keys OceanBase cannot order by their bytes are refused.
    pub(super) string_key: Option<String>,
}

impl ObChunkWriter {
    /// Inserts rows `rows` (encoded in `enc`, row i = `enc[ends[i-1]..ends[i]]`);
    /// on a row error, bisects to find and reject the offending rows.
    /// `batch_rows[i]` is encoded row i's index in the batch.
    async fn insert(
        &mut self,
        enc: &[u8],
        ends: &[usize],
        batch_rows: &[usize],
        rows: std::ops::Range<usize>,
        rejects: &mut Vec<RowReject>,
    ) -> Result<()> {
        let mut stack = vec![rows];
        while let Some(r) = stack.pop() {
            if r.is_empty() {
                continue;
            }
            let mut sql = Vec::with_capacity(self.prefix.len() + ends[r.end - 1] - if r.start == 0 { 0 } else { ends[r.start - 1] } + r.len());
            sql.extend_from_slice(self.prefix.as_bytes());
            for i in r.clone() {
                if i > r.start {
                    sql.push(b',');
                }
                let start = if i == 0 { 0 } else { ends[i - 1] };
                sql.extend_from_slice(&enc[start..ends[i]]);
            }
            let sql = String::from_utf8(sql).expect("statement is UTF-8");
            match self.conn.as_mut().unwrap().query_drop(sql).await {
                Ok(()) => {}
                Err(e) if is_row_error(&e) => {
                    if r.len() == 1 {
                        rejects.push(RowReject {
                            row: batch_rows[r.start],
                            reason: format!("OceanBase refused the row: {}", ob_error_text(&e)),
                        });
                    } else {
                        let mid = r.start + r.len() / 2;
                        stack.push(mid..r.end);
                        stack.push(r.start..mid);
                    }
                }
                Err(e) => return Err(e).ob(&format!("writing chunk {}", self.chunk.id)),
            }
        }
        Ok(())
    }
}

/// Rows (other than those already refused) whose string key utf8mb4_bin cannot order.
pub(super) fn unorderable_keys(batch: &RecordBatch, string_key: Option<&str>, refused: &[RowReject]) -> Result<Vec<RowReject>> {
    let Some(pk) = string_key else { return Ok(Vec::new()) };
    let taken: std::collections::HashSet<usize> = refused.iter().map(|r| r.row).collect();
    let mut out = Vec::new();
    for (row, key) in crate::contract::changes::keys_of(batch, pk)?.iter().enumerate().filter(|(r, _)| !taken.contains(r)) {
        if let Some(reason) = key_not_orderable(&key.to_string_lossless()) {
            out.push(RowReject { row, reason });
        }
    }
    Ok(out)
}

impl ChunkWriter for ObChunkWriter {
    fn write(&mut self, batch: &RecordBatch) -> Result<Vec<RowReject>> {
        let cols: Vec<ArrayRef> = batch.columns().to_vec();
        let mut enc = Vec::with_capacity(batch.get_array_memory_size() * 2 + 64);
        let mut ends = Vec::with_capacity(batch.num_rows());
        let mut batch_rows = Vec::with_capacity(batch.num_rows());
        let mut rejects = match &self.foreign_check {
            Some((query, f, pk, key)) => {
                let (conn, handle) = (self.conn.as_mut().unwrap(), &self.handle);
                refuse_foreign_ids(batch, pk, f, &mut |ids| {
                    let list = ids.iter().map(key_literal).collect::<Vec<_>>().join(",");
                    let held = handle.block_on(async { conn.query::<String, _>(format!("{query}({list})")).await.ob("checking ids outside the subset") })?;
                    held.iter().map(|k| key.parse(k)).collect()
                })?
            }
            None => Vec::new(),
        };
        let more = unorderable_keys(batch, self.string_key.as_deref(), &rejects)?;
        rejects.extend(more);
        let foreign: std::collections::HashSet<usize> = rejects.iter().map(|r| r.row).collect();
        for row in (0..batch.num_rows()).filter(|r| !foreign.contains(r)) {
            let start = enc.len();
            match encode_row(&cols, &self.types, row, self.literal, &mut enc) {
                Ok(()) => {
                    ends.push(enc.len());
                    batch_rows.push(row);
                }
                // A value OceanBase cannot represent (e.g. an infinite timestamp).
                Err(e) => {
                    enc.truncate(start);
                    rejects.push(RowReject { row, reason: format!("cannot be written to OceanBase: {e}") });
                }
            }
        }
        self.bytes += enc.len() as u64;
        let handle = self.handle.clone();
        handle.block_on(async {
            // Statements of about statement_bytes each.
            let mut start = 0;
            while start < ends.len() {
                let base = if start == 0 { 0 } else { ends[start - 1] };
                let mut end = start + 1;
                while end < ends.len() && ends[end] - base <= self.statement_bytes {
                    end += 1;
                }
                self.insert(&enc, &ends, &batch_rows, start..end, &mut rejects).await?;
                start = end;
            }
            Ok::<_, anyhow::Error>(())
        })?;
        rejects.sort_by_key(|r| r.row);
        Ok(rejects)
    }

    fn commit(mut self: Box<Self>, mut record: CommitRecord) -> Result<CommitRecord> {
        record.bytes = self.bytes;
        record.committed_at = now_rfc3339();
        let mut c = self.conn.take().unwrap();
        let id = self.chunk.id;
        let rec = record.clone();
        self.handle.block_on(async {
            if self.record_ledger {
                c.query_drop(format!(
                    "INSERT INTO {LEDGER_TABLE} (job, chunk, lo, hi, `rows`, rejected, content_hash, bytes, committed_at) \
                     VALUES ({}, {}, {}, {}, {}, {}, {}, {}, {})",
                    str_literal(&self.job),
                    rec.chunk,
                    rec.lo,
                    rec.hi,
                    rec.rows,
                    rec.rejected,
                    str_literal(&rec.content_hash),
                    rec.bytes,
                    str_literal(&rec.committed_at)
                ))
                .await
                .ob(&format!("recording chunk {id}"))?;
            }
            c.query_drop("COMMIT").await.ob(&format!("committing chunk {id}"))?;
            Ok::<_, anyhow::Error>(())
        })?;
        self.pool.put(c);
        Ok(record)
    }
}

impl Drop for ObChunkWriter {
    fn drop(&mut self) {
        // An uncommitted chunk: dropping the session rolls it back. Inside
        // the runtime so the driver can close the connection cleanly.
        if let Some(c) = self.conn.take() {
            let _g = self.handle.enter();
            drop(c);
        }
    }
}
