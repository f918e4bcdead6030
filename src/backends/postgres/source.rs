//! PostgreSQL as a source: plans by key, reads each chunk by binary COPY OUT
//! inside one snapshot exported for the whole run.

use super::copy::CopyDecoder;
use super::*;

pub struct PgSource {
    url: PgUrl,
    table: TableName,
    handle: Handle,
    discovered: Discovered,
    pool: Pool,
    /// A transaction held open for the whole run whose snapshot every chunk
    /// reader imports, so all chunks see the same consistent state.
    snapshot: Mutex<Option<(Client, String)>>,
    /// A subset job's condition (`restrict`), as SQL.
    subset: std::sync::OnceLock<String>,
}

impl PgSource {
    pub fn open(url: PgUrl, table: &str, handle: Handle) -> Result<Self> {
        let table = TableName::parse(table);
        let (discovered, client) = handle.block_on(async {
            let client = connect(&url).await?;
            let enc: String = client.query_one("SHOW server_encoding", &[]).await.pg("server encoding")?.get(0);
            if enc != "UTF8" {
                bail!("{}: server encoding is {enc}; vmig reads UTF8 databases only", url.redacted());
            }
            let d = discover(&client, &table, &url)
                .await?
                .ok_or_else(|| anyhow!("table {} does not exist in {}", table.name, url.redacted()))?;
            Ok::<_, anyhow::Error>((d, client))
        })?;
        let pool = Pool::new(&url, client);
        Ok(PgSource { url, table, handle, discovered, pool, snapshot: Mutex::new(None), subset: Default::default() })
    }

    /// Per column: the vector dimension is declared (typmod).
    pub fn fixed_dims(&self) -> &[bool] {
        &self.discovered.fixed_dims
    }

    /// Reads every chunk in the snapshot another session exported (the
    /// replication slot's), re-exported from a transaction of our own that
    /// stays open for the run.
    pub async fn adopt_snapshot(&self, exported: &str) -> Result<()> {
        let c = connect(&self.url).await?;
        c.batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
            exported.replace('\'', "")
        ))
        .await
        .pg("importing the replication slot's snapshot")?;
        let id: String = c.query_one("SELECT pg_export_snapshot()", &[]).await.pg("exporting snapshot")?.get(0);
        *self.snapshot.lock().unwrap() = Some((c, id));
        Ok(())
    }

    /// The rows matching `condition` (built from keys and quoted
    /// literals) and the subset, in key order, by binary COPY OUT in the run's snapshot.
    fn copy_rows(&self, condition: &str, what: &str, batch_rows: usize, out: &mut dyn FnMut(RecordBatch) -> Result<()>) -> Result<()> {
        let spec = self.spec();
        let pk = KeySql::of(spec).ordered();
        let sql = format!(
            "COPY (SELECT {} FROM {} WHERE {condition}{} ORDER BY {pk}) TO STDOUT (FORMAT binary)",
            column_list(spec),
            self.table.sql(),
            self.and_subset(),
        );
        let mut decoder = CopyDecoder::new(
            spec.arrow_schema(),
            spec.columns.iter().map(|c| c.ty.clone()).collect(),
            self.discovered.fixed_dims.clone(),
        );
        decoder.expect_rows(batch_rows);
        self.handle.block_on(async {
            let c = self.pool.get().await?;
            self.begin_in_snapshot(&c).await?;
            let stream = c.copy_out(&sql).await.pg(&format!("reading {what}"))?;
            let mut stream = std::pin::pin!(stream);
            while let Some(data) = stream.next().await {
                let data = data.pg(&format!("reading {what}"))?;
                decoder.feed(&data, batch_rows, out).with_context(|| format!("decoding {what}"))?;
            }
            if decoder.rows() > 0 {
                out(decoder.take_batch()?)?;
            }
            c.batch_execute("COMMIT").await.pg("ending read")?;
            self.pool.put(c);
            Ok(())
        })
    }

    /// " AND (subset condition)", or nothing for a whole-table job.
    fn and_subset(&self) -> String {
        self.subset.get().map(|c| format!(" AND ({c})")).unwrap_or_default()
    }

    async fn snapshot_id(&self) -> Result<String> {
        {
            let mut g = self.snapshot.lock().unwrap();
            match g.as_ref() {
                Some((c, id)) if !c.is_closed() => return Ok(id.clone()),
                // The source restarted: later chunks read a new snapshot.
                Some(_) => {
                    say!(
                        "note: the source's snapshot was lost (its server restarted); chunks read from now on see a newer \
                         snapshot, so rows written to the source meanwhile may show up (offline mode expects no writes)"
                    );
                    *g = None
                }
                None => {}
            }
        }
        let c = connect(&self.url).await?;
        c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await.pg("starting snapshot")?;
        let id: String = c.query_one("SELECT pg_export_snapshot()", &[]).await.pg("exporting snapshot")?.get(0);
        let mut g = self.snapshot.lock().unwrap();
        if g.is_none() {
            *g = Some((c, id));
        }
        Ok(g.as_ref().unwrap().1.clone())
    }

    async fn begin_in_snapshot(&self, client: &Client) -> Result<()> {
        let snap = self.snapshot_id().await?;
        client
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{snap}'"
            ))
            .await
            .pg("joining snapshot")
    }
}

impl Source for PgSource {
    fn indexes_not_carried(&self) -> Vec<String> {
        self.discovered.skipped_indexes.clone()
    }
    fn describe(&self) -> String {
        format!("{} table {}", self.url.redacted(), self.table.name)
    }

    fn spec(&self) -> &TableSpec {
        &self.discovered.spec
    }

    fn plan(&self, chunk_rows: u64) -> Result<Vec<ChunkRange>> {
        let key = KeySql::of(self.spec());
        let (pk, select) = (key.ordered(), key.select());
        let t = self.table.sql();
        let subset = self.subset.get().map(|c| format!(" WHERE {c}")).unwrap_or_default();
        self.handle.block_on(async {
            let c = self.pool.get().await?;
            self.begin_in_snapshot(&c).await?;
            let total: i64 = c.query_one(&format!("SELECT count(*) FROM {t}{subset}"), &[]).await.pg("counting rows")?.get(0);
            let bounds: Vec<Key> = c
                .query(
                    &format!(
                        "SELECT k FROM (SELECT {select} AS k, row_number() OVER (ORDER BY {pk}) AS rn FROM {t}{subset}) s \
                         WHERE rn % $1 = 0 ORDER BY rn"
                    ),
                    &[&(chunk_rows as i64)],
                )
                .await
                .pg("planning chunks")?
                .iter()
                .map(|r| key.get(r, 0))
                .collect();
            c.batch_execute("COMMIT").await.pg("planning")?;
            self.pool.put(c);
            Ok(ranges_from_keys(&bounds, total as u64, chunk_rows))
        })
    }

    fn read_chunk(
        &self,
        chunk: &ChunkRange,
        batch_rows: usize,
        out: &mut dyn FnMut(RecordBatch) -> Result<()>,
    ) -> Result<()> {
        self.copy_rows(&KeySql::of(self.spec()).range(chunk), &format!("chunk {}", chunk.id), batch_rows, out)
    }

    fn read_rows_by_id(&self, ids: &[Key], out: &mut dyn FnMut(RecordBatch) -> Result<()>) -> Result<()> {
        let pk = ident(&self.spec().primary_key);
        for part in ids.chunks(10_000) {
            let list: Vec<String> = part.iter().map(key_literal).collect();
            self.copy_rows(&format!("{pk} IN ({})", list.join(",")), &format!("{} rows by id", part.len()), 2048, out)?;
        }
        Ok(())
    }

    fn search(&self, query: &[f32], k: usize, metric: Metric, ef: u32) -> Result<(Vec<Key>, String)> {
        let spec = self.spec();
        let key = KeySql::of(spec);
        let col = spec.columns.iter().find(|c| c.ty.is_vector()).ok_or_else(|| anyhow!("{} has no vector column", spec.name))?;
        let cast = if matches!(col.ty, ColumnType::HalfVec { .. }) { "halfvec" } else { "vector" };
        // The operator of the opclass the index was built with (pgvector
        // uses an index only for its own operator).
        let op = match metric {
            Metric::InnerProduct => "<#>",
            Metric::Cosine => "<=>",
            Metric::L2 => "<->",
        };
        let sql = format!(
            "SELECT {} FROM {}{} ORDER BY {} {op} $1::text::{cast} LIMIT {k}",
            key.select(),
            self.table.sql(),
            self.subset.get().map(|c| format!(" WHERE {c}")).unwrap_or_default(),
            ident(&col.name)
        );
        let literal = format!("[{}]", query.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(","));
        let ids = self.handle.block_on(async {
            let c = self.pool.get().await?;
            // Seq scans off: measure the index, which a large table's plan uses.
            // A subset's search filters the index's candidates: pgvector ≥ 0.8
            // then scans on until it has k that match.
            let iterative = if self.subset.get().is_some() { "; SET LOCAL hnsw.iterative_scan = strict_order" } else { "" };
            c.batch_execute(&format!("BEGIN; SET LOCAL hnsw.ef_search = {ef}; SET LOCAL enable_seqscan = off{iterative}"))
                .await
                .pg("setting up the search")?;
            let rows = c.query(&sql, &[&literal]).await.pg("searching")?;
            c.batch_execute("COMMIT").await.pg("searching")?;
            self.pool.put(c);
            Ok::<_, anyhow::Error>(rows.iter().map(|r| key.get(r, 0)).collect::<Vec<Key>>())
        })?;
        Ok((ids, format!("ORDER BY {} {op} q LIMIT {k}, hnsw.ef_search = {ef}, enable_seqscan = off", col.name)))
    }

    fn restrict(&self, filter: &crate::model::filter::Filter) -> Result<()> {
        filter.check_columns(self.spec(), &self.describe())?;
        self.subset.set(filter_sql(filter, None)).map_err(|_| anyhow!("{} is already restricted to a subset", self.describe()))
    }

    fn default_ef(&self) -> Result<Option<u32>> {
        self.handle.block_on(async {
            let c = self.pool.get().await?;
            // pgvector defines its settings once its library is loaded in the session.
            c.batch_execute("SELECT NULL::vector").await.pg("loading pgvector")?;
            let v: Option<String> = c.query_one("SELECT current_setting('hnsw.ef_search', true)", &[]).await.pg("reading hnsw.ef_search")?.get(0);
            self.pool.put(c);
            Ok(v.and_then(|v| v.parse().ok()))
        })
    }

    fn read_ids(&self, span: &ChunkRange, out: &mut dyn FnMut(&[Key]) -> Result<()>) -> Result<()> {
        const PAGE: usize = 50_000;
        let key = KeySql::of(self.spec());
        let (pk, select) = (key.ordered(), key.select());
        let t = self.table.sql();
        let range = key.range(span);
        self.handle.block_on(async {
            let c = self.pool.get().await?;
            let mut after: Option<Key> = None;
            loop {
                // Keyset paging: past the last key of the page before.
                let past = after.as_ref().map(|k| format!(" AND {pk} > {}", key_literal(k))).unwrap_or_default();
                let sql = format!("SELECT {select} FROM {t} WHERE {range}{past}{} ORDER BY {pk} LIMIT {PAGE}", self.and_subset());
                let rows = c.query(&sql, &[]).await.pg("reading ids")?;
                let ids: Vec<Key> = rows.iter().map(|r| key.get(r, 0)).collect();
                if let Some(l) = ids.last() {
                    after = Some(l.clone());
                    out(&ids)?;
                }
                if ids.len() < PAGE {
                    break;
                }
            }
            self.pool.put(c);
            Ok(())
        })
    }
}

