//! PostgreSQL as an online target: one transaction per change batch holds
//! the bulk delete, the binary COPY of the final images, the column-wise
//! updates of partial images, and the job's position row, so a kill at any
//! moment leaves either the whole batch with its position or neither.
//! Batches with disjoint keys may be written at once on two sessions; each
//! records its position and commits only after the one before it.

use super::copy::{copy_header, copy_trailer, encode_rows};
use super::*;
use crate::contract::changes::{AppliedPosition, ChangeCounts, ChangeSet, keys_of};

impl PgSink {
    pub(super) async fn read_position(&self, job: &str) -> Result<Option<AppliedPosition>> {
        let c = self.pool.get().await?;
        let exists: bool =
            c.query_one("SELECT to_regclass($1) IS NOT NULL", &[&POSITIONS_TABLE]).await.pg("reading ledger")?.get(0);
        let mut out = None;
        if exists {
            if let Some(r) = c
                .query_opt(&format!("SELECT position, inserts, updates, deletes FROM {POSITIONS_TABLE} WHERE job = $1"), &[&job])
                .await
                .pg("reading the applied position")?
            {
                out = Some(AppliedPosition {
                    position: r.get::<_, i64>(0) as u64,
                    counts: ChangeCounts {
                        inserts: r.get::<_, i64>(1) as u64,
                        updates: r.get::<_, i64>(2) as u64,
                        deletes: r.get::<_, i64>(3) as u64,
                    },
                });
            }
        }
        self.pool.put(c);
        Ok(out)
    }

    /// Whether two change batches may be written at once: with a unique
    /// index besides the primary key, the later batch could wait on a row
    /// the earlier one holds while the earlier one waits (outside the
    /// server's deadlock detection) for nothing the later releases; then
    /// one batch at a time.
    pub(super) async fn may_overlap(&self) -> bool {
        let found = async {
            let c = self.pool.get().await?;
            let only_pk: bool = c
                .query_one(
                    "SELECT NOT EXISTS (SELECT 1 FROM pg_index WHERE indrelid = to_regclass($1) AND indisunique AND NOT indisprimary)",
                    &[&self.table.sql()],
                )
                .await
                .pg("reading the target's unique indexes")?
                .get(0);
            self.pool.put(c);
            Ok::<_, anyhow::Error>(only_pk)
        }
        .await;
        // Not knowing is no reason to fail a job: it applies one batch at a time.
        found.unwrap_or(false)
    }

    /// Applies a batch in one transaction; with `before_commit`, its position
    /// is recorded and committed only once that returns Ok, and rolled back
    /// if it fails.
    pub(super) async fn apply(&self, job: &str, set: &ChangeSet, before_commit: Option<&dyn Fn() -> Result<()>>) -> Result<()> {
        let spec = self.target_spec();
        let t = self.table.sql();
        let pk = ident(&spec.primary_key);
        let c = self.pool.get().await?;
        // Once per sink: two sessions creating it at once collide in the catalog.
        self.positions_table
            .get_or_try_init(|| async {
                c.batch_execute(&format!(
                    "CREATE TABLE IF NOT EXISTS {POSITIONS_TABLE} (job TEXT PRIMARY KEY, position BIGINT NOT NULL, \
                     inserts BIGINT NOT NULL, updates BIGINT NOT NULL, deletes BIGINT NOT NULL, \
                     source_commit_time TIMESTAMPTZ, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
                ))
                .await
                .pg("creating the positions table")
            })
            .await?;
        c.batch_execute("BEGIN").await.pg("starting a change batch")?;
        // Replaced rows go first, then the final images are written as new rows.
        let mut ids = set.deletes.clone();
        for b in &set.images {
            ids.extend(keys_of(b, &spec.primary_key)?);
        }
        if !ids.is_empty() {
            let key = KeySql::of(&spec);
            let ids = key.param(&ids);
            c.execute(&format!("DELETE FROM {t} WHERE {}", key.any(1)), &[ids.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync)])
                .await
                .pg("applying deletes")?;
        }
        let types: Vec<ColumnType> = spec.columns.iter().map(|c| c.ty.clone()).collect();
        let rows: Vec<&RecordBatch> = set.images.iter().filter(|b| b.num_rows() > 0).collect();
        if !rows.is_empty() {
            copy_in(&c, &format!("COPY {t} ({}) FROM STDIN (FORMAT binary)", column_list(&spec)), &rows, &types).await?;
        }
        for b in set.partial.iter().filter(|b| b.num_rows() > 0) {
            // Only the columns the change carries are set: an unchanged
            // (TOASTed) vector is never overwritten.
            let names: Vec<String> = b.schema_ref().fields().iter().map(|f| f.name().clone()).collect();
            let cols: Vec<String> = names.iter().map(|n| ident(n)).collect();
            let types: Vec<ColumnType> = names
                .iter()
                .map(|n| spec.column(n).map(|c| c.ty.clone()).ok_or_else(|| anyhow!("target has no column {n}")))
                .collect::<Result<_>>()?;
            c.batch_execute(&format!(
                "CREATE TEMP TABLE vmig_partial ON COMMIT DROP AS SELECT {} FROM {t} WITH NO DATA",
                cols.join(", ")
            ))
            .await
            .pg("applying updates")?;
            copy_in(&c, &format!("COPY vmig_partial ({}) FROM STDIN (FORMAT binary)", cols.join(", ")), &[b], &types).await?;
            let sets: Vec<String> =
                cols.iter().filter(|c| **c != pk).map(|c| format!("{c} = p.{c}")).collect();
            if !sets.is_empty() {
                c.batch_execute(&format!("UPDATE {t} SET {} FROM vmig_partial p WHERE {t}.{pk} = p.{pk}", sets.join(", ")))
                    .await
                    .pg("applying updates")?;
            }
            c.batch_execute("DROP TABLE vmig_partial").await.pg("applying updates")?;
        }
        if let Some(wait) = before_commit {
            // Blocks this thread only: the session's I/O runs on the runtime's workers.
            if let Err(e) = wait() {
                c.batch_execute("ROLLBACK").await.pg("rolling back a change batch")?;
                self.pool.put(c);
                return Err(e);
            }
        }
        // A repair applies rows without a stream position.
        if !job.is_empty() {
            let commit_time = set.commit_time_us.map(|us| us as f64 / 1e6);
            c.execute(
                &format!(
                    "INSERT INTO {POSITIONS_TABLE} (job, position, inserts, updates, deletes, source_commit_time) \
                     VALUES ($1, $2, $3, $4, $5, to_timestamp($6)) ON CONFLICT (job) DO UPDATE SET \
                     position = EXCLUDED.position, inserts = {POSITIONS_TABLE}.inserts + EXCLUDED.inserts, \
                     updates = {POSITIONS_TABLE}.updates + EXCLUDED.updates, deletes = {POSITIONS_TABLE}.deletes + EXCLUDED.deletes, \
                     source_commit_time = EXCLUDED.source_commit_time, applied_at = now()"
                ),
                &[
                    &job,
                    &(set.position as i64),
                    &(set.counts.inserts as i64),
                    &(set.counts.updates as i64),
                    &(set.counts.deletes as i64),
                    &commit_time,
                ],
            )
            .await
            .pg("recording the applied position")?;
        }
        c.batch_execute("COMMIT").await.pg("committing a change batch")?;
        self.pool.put(c);
        Ok(())
    }
}

async fn copy_in(c: &Client, sql: &str, batches: &[&RecordBatch], types: &[ColumnType]) -> Result<()> {
    let sink: CopyInSink<Bytes> = c.copy_in(sql).await.pg("writing changed rows")?;
    let mut sink = std::pin::pin!(sink);
    let mut buf = copy_header();
    for b in batches {
        encode_rows(b, types, &mut buf)?;
        sink.send(buf.split().freeze()).await.pg("writing changed rows")?;
    }
    buf.extend_from_slice(&copy_trailer());
    sink.send(buf.freeze()).await.pg("writing changed rows")?;
    sink.as_mut().finish().await.pg("writing changed rows")?;
    Ok(())
}
