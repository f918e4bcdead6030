//! OceanBase / seekdb as an online target: one transaction per change batch
//! holds the bulk delete, the multi-row REPLACE of the final images, the
//! updates of the changed columns of partial images, and the job's position
//! row, so a kill at any moment leaves the whole batch with its position or
//! neither.

use arrow::array::ArrayRef;
use mysql_async::prelude::Queryable;

use super::sink::ObSink;
use super::sql::{encode_row, encode_value, ident};
use super::*;
use crate::contract::changes::{AppliedPosition, ChangeCounts, ChangeSet, keys_of};

/// Keys per DELETE statement.
const DELETE_KEYS: usize = 2_000;

impl ObSink {
    pub(super) async fn read_position(&self, job: &str) -> Result<Option<AppliedPosition>> {
        let mut c = self.pool.get().await?;
        let rows = match query_strings(
            &mut c,
            &format!("SELECT position, inserts, updates, deletes FROM {POSITIONS_TABLE} WHERE job = {}", str_literal(job)),
            "reading the applied position",
        )
        .await
        {
            Ok(r) => r,
            Err(e) if format!("{e:#}").contains("doesn't exist") => Vec::new(),
            Err(e) => return Err(e),
        };
        self.pool.put(c);
        let num = |v: &Option<String>| v.as_deref().unwrap_or("0").parse::<u64>().unwrap_or(0);
        Ok(rows.first().map(|r| AppliedPosition {
            position: num(&r[0]),
            counts: ChangeCounts { inserts: num(&r[1]), updates: num(&r[2]), deletes: num(&r[3]) },
        }))
    }

    pub(super) async fn apply(&self, job: &str, set: &ChangeSet) -> Result<()> {
        let spec = self.target_spec();
        let t = ident(&self.table);
        let pk = ident(&spec.primary_key);
        let tag = self.tag();
        let statement_bytes = *self.statement_bytes.lock().unwrap();
        let mut c = self.pool.get().await?;
        let ddl = format!(
            "CREATE TABLE IF NOT EXISTS {POSITIONS_TABLE} (job VARCHAR(255) PRIMARY KEY, position BIGINT UNSIGNED NOT NULL, \
             inserts BIGINT NOT NULL, updates BIGINT NOT NULL, deletes BIGINT NOT NULL, applied_at VARCHAR(40) NOT NULL)"
        );
        create_own_table(&mut c, POSITIONS_TABLE, &ddl, "creating the positions table").await?;
        c.query_drop("START TRANSACTION").await.ob("starting a change batch")?;
        // Deleted rows by id; final images by REPLACE (a row with the same id,
        // e.g. from a replayed batch, is replaced: measured faster than
        // deleting the images' ids first).
        // A key utf8mb4_bin cannot order is never written (its rows go to
        // rejects), and PAD SPACE would match another row's key ('a ' = 'a').
        let deletes: Vec<&Key> =
            set.deletes.iter().filter(|k| !matches!(k, Key::Str(s) if key_not_orderable(s).is_some())).collect();
        for part in deletes.chunks(DELETE_KEYS) {
            let list: Vec<String> = part.iter().map(|k| key_literal(k)).collect();
            c.query_drop(format!("{tag}DELETE FROM {t} WHERE {pk} IN ({})", list.join(",")))
                .await
                .ob("applying deletes")?;
        }
        let types: Vec<ColumnType> = spec.columns.iter().map(|c| c.ty.clone()).collect();
        let prefix = format!("{tag}REPLACE INTO {t} ({}) VALUES ", column_list(&spec));
        for b in &set.images {
            if KeySql::of(&spec).is_text() {
                for key in keys_of(b, &spec.primary_key)? {
                    if let Some(reason) = key_not_orderable(&key.to_string_lossless()) {
                        bail!("a change cannot be applied to {}: {reason}", self.table);
                    }
                }
            }
            let cols: Vec<ArrayRef> = b.columns().to_vec();
            let mut sql = prefix.clone().into_bytes();
            for row in 0..b.num_rows() {
                if sql.len() > prefix.len() {
                    sql.push(b',');
                }
                encode_row(&cols, &types, row, self.literal, &mut sql)?;
                if sql.len() >= statement_bytes || row + 1 == b.num_rows() {
                    c.query_drop(String::from_utf8(std::mem::replace(&mut sql, prefix.clone().into_bytes()))?)
                        .await
                        .ob("writing changed rows")?;
                }
            }
        }
        for b in &set.partial {
            // Only the columns the change carries are set.
            let keys = keys_of(b, &spec.primary_key)?;
            let fields: Vec<(usize, &ColumnType, String)> = b
                .schema_ref()
                .fields()
                .iter()
                .enumerate()
                .filter(|(_, f)| *f.name() != spec.primary_key)
                .map(|(i, f)| {
                    let ty = spec.column(f.name()).map(|c| &c.ty).ok_or_else(|| anyhow!("target has no column {}", f.name()))?;
                    Ok((i, ty, ident(f.name())))
                })
                .collect::<Result<_>>()?;
            for (row, key) in keys.iter().enumerate() {
                let mut sql = format!("{tag}UPDATE {t} SET ").into_bytes();
                for (n, (i, ty, name)) in fields.iter().enumerate() {
                    if n > 0 {
                        sql.push(b',');
                    }
                    sql.extend_from_slice(name.as_bytes());
                    sql.push(b'=');
                    encode_value(b.column(*i), ty, row, self.literal, &mut sql)?;
                }
                sql.extend_from_slice(format!(" WHERE {pk} = {}", key_literal(key)).as_bytes());
                c.query_drop(String::from_utf8(sql)?).await.ob("applying updates")?;
            }
        }
        // A repair applies rows without a stream position.
        if !job.is_empty() {
            let (i, u, d) = (set.counts.inserts, set.counts.updates, set.counts.deletes);
            c.query_drop(format!(
                "INSERT INTO {POSITIONS_TABLE} (job, position, inserts, updates, deletes, applied_at) VALUES ({}, {}, {i}, {u}, {d}, {}) \
                 ON DUPLICATE KEY UPDATE position = VALUES(position), inserts = inserts + VALUES(inserts), \
                 updates = updates + VALUES(updates), deletes = deletes + VALUES(deletes), applied_at = VALUES(applied_at)",
                str_literal(job),
                set.position,
                str_literal(&crate::model::now_rfc3339())
            ))
            .await
            .ob("recording the applied position")?;
        }
        c.query_drop("COMMIT").await.ob("committing a change batch")?;
        self.pool.put(c);
        Ok(())
    }
}
