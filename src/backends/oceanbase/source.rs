//! OceanBase as a source: keyset pages of each chunk's key range, read as
//! prepared statements. Vectors are read exactly and as bits: seekdb prints
//! a VECTOR (or an array) as text only, its floats with 6 significant
//! digits, but a scalar FLOAT in the binary protocol is its 4 bytes. So
//! each vector is selected as `element_at` of each dimension: 5× less
//! server time than printing it exactly as an array of doubles, a quarter
//! of the bytes, and NaN or infinity (which seekdb stores silently) arrive
//! as they are, for the transform to refuse, instead of printed as 0.

use super::*;

pub struct ObSource {
    url: ObUrl,
    table: String,
    handle: Handle,
    discovered: Discovered,
    pool: Pool,
    /// A subset job's condition (`restrict`), as SQL.
    subset: std::sync::OnceLock<String>,
}

impl ObSource {
    pub fn open(url: ObUrl, table: &str, handle: Handle) -> Result<Self> {
        let (discovered, conn) = handle.block_on(async {
            let mut c = connect(&url).await?;
            let d = discover(&mut c, table)
                .await?
                .ok_or_else(|| anyhow!("table {table} does not exist in {}", url.redacted()))?;
            Ok::<_, anyhow::Error>((d, c))
        })?;
        let pool = Pool { url: url.clone(), idle: Mutex::new(vec![conn]) };
        Ok(ObSource { url, table: table.to_string(), handle, discovered, pool, subset: Default::default() })
    }

    /// " AND (subset condition)", or nothing for a whole-table job.
    fn and_subset(&self) -> String {
        self.subset.get().map(|c| format!(" AND ({c})")).unwrap_or_default()
    }

    fn where_subset(&self) -> String {
        self.subset.get().map(|c| format!(" WHERE {c}")).unwrap_or_default()
    }

}

impl Source for ObSource {
    fn indexes_not_carried(&self) -> Vec<String> {
        self.discovered.skipped_indexes.clone()
    }
    fn describe(&self) -> String {
        format!("{} table {}", self.url.redacted(), self.table)
    }

    fn spec(&self) -> &TableSpec {
        &self.discovered.spec
    }

    fn plan(&self, chunk_rows: u64) -> Result<Vec<ChunkRange>> {
        let key = KeySql::of(self.spec());
        let pk = key.column();
        let t = format!("{}{}", ident(&self.table), self.where_subset());
        self.handle.block_on(async {
            let mut c = self.pool.get().await?;
            let total = query_i64(&mut c, &format!("SELECT count(*) FROM {t}"), "counting rows").await?.unwrap_or(0);
            let bounds: Vec<Key> = query_strings(
                &mut c,
                &format!(
                    "SELECT k FROM (SELECT {pk} AS k, row_number() OVER (ORDER BY {pk}) AS rn FROM {t}) s \
                     WHERE rn % {chunk_rows} = 0 ORDER BY rn"
                ),
                "planning chunks",
            )
            .await?
            .into_iter()
            .filter_map(|r| r.into_iter().next().flatten())
            .map(|v| key.parse(&v))
            .collect::<Result<_>>()?;
            check_ascending(&bounds, "planning chunks")?;
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
        let spec = self.spec();
        let key = KeySql::of(spec);
        let pk = key.column();
        let range = key.range(chunk);
        let row_bytes = crate::model::schema::estimate_row_bytes(spec);
        let page = (PAGE_BYTES / row_bytes.max(1)).clamp(500, 20_000);
        let mut decoder = self.decoder();
        self.handle.block_on(async {
            let mut c = self.pool.get().await?;
            let mut last: Option<Key> = None;
            loop {
                // Two statements per chunk (the first page, the pages after a key),
                // each prepared once: the connection caches them by their text.
                let past = if last.is_some() { format!(" AND {pk} > ?") } else { String::new() };
                let sql = format!("{} WHERE {range}{past}{} ORDER BY {pk} LIMIT {page}", self.select(), self.and_subset());
                let what = format!("reading chunk {}", chunk.id);
                let params: Vec<Value> = last.iter().map(key_value).collect();
                let (n, l) = self.decode_query(&mut c, &sql, params, &what, &mut decoder, batch_rows, out).await?;
                last = l.or(last);
                if n < page {
                    break;
                }
            }
            if decoder.rows() > 0 {
                out(decoder.take_batch()?)?;
            }
            self.pool.put(c);
            Ok(())
        })
    }

    fn read_ids(&self, span: &ChunkRange, out: &mut dyn FnMut(&[Key]) -> Result<()>) -> Result<()> {
        let key = KeySql::of(self.spec());
        let (pk, range) = (key.column(), key.range(span));
        let t = ident(&self.table);
        self.handle.block_on(async {
            let mut c = self.pool.get().await?;
            let mut after: Option<Key> = None;
            loop {
                let past = after.as_ref().map(|a| format!(" AND {pk} > {}", key_literal(a))).unwrap_or_default();
                let sql = format!("SELECT {pk} FROM {t} WHERE {range}{past}{} ORDER BY {pk} LIMIT {ID_PAGE}", self.and_subset());
                let ids = c.query::<String, _>(sql).await.ob("reading ids")?.iter().map(|k| key.parse(k)).collect::<Result<Vec<Key>>>()?;
                check_ascending(&ids, "reading ids")?;
                if let Some((a, f)) = after.as_ref().zip(ids.first()).filter(|(a, f)| f <= a) {
                    return Err(not_byte_order(a, f).context("reading ids"));
                }
                if let Some(l) = ids.last() {
                    after = Some(l.clone());
                    out(&ids)?;
                }
                if ids.len() < ID_PAGE {
                    break;
                }
            }
            self.pool.put(c);
            Ok(())
        })
    }

    fn search(&self, query: &[f32], k: usize, metric: Metric, ef: u32) -> Result<(Vec<Key>, String)> {
        let key = KeySql::of(self.spec());
        let spec = self.spec();
        let col = spec.columns.iter().find(|c| c.ty.is_vector()).ok_or_else(|| anyhow!("{} has no vector column", spec.name))?;
        // The distance functions an OceanBase vector index answers with APPROXIMATE.
        let f = match metric {
            Metric::InnerProduct => "negative_inner_product",
            Metric::Cosine => "cosine_distance",
            Metric::L2 => "l2_distance",
        };
        let literal = format!("[{}]", query.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(","));
        let sql = format!(
            "SELECT {} FROM {}{} ORDER BY {f}({}, '{literal}') APPROXIMATE LIMIT {k}",
            ident(&spec.primary_key),
            ident(&self.table),
            self.where_subset(),
            ident(&col.name)
        );
        let ids = self.handle.block_on(async {
            let mut c = self.pool.get().await?;
            c.query_drop(format!("SET ob_hnsw_ef_search = {ef}")).await.ob("setting ob_hnsw_ef_search")?;
            let ids = c.query::<String, _>(sql).await.ob("searching")?.iter().map(|k| key.parse(k)).collect::<Result<Vec<Key>>>()?;
            self.pool.put(c);
            Ok::<_, anyhow::Error>(ids)
        })?;
        Ok((ids, format!("ORDER BY {f}({}, q) APPROXIMATE LIMIT {k}, ob_hnsw_ef_search = {ef}", col.name)))
    }

    fn default_ef(&self) -> Result<Option<u32>> {
        self.handle.block_on(async {
            let mut c = self.pool.get().await?;
            let v: Option<u32> = c.query_first("SELECT @@ob_hnsw_ef_search").await.ok().flatten();
            self.pool.put(c);
            Ok(v)
        })
    }

    fn restrict(&self, filter: &crate::model::filter::Filter) -> Result<()> {
        filter.check_columns(self.spec(), &self.describe())?;
        self.subset.set(filter_sql(filter, None)).map_err(|_| anyhow!("{} is already restricted to a subset", self.describe()))
    }

    fn read_rows_by_id(&self, ids: &[Key], out: &mut dyn FnMut(RecordBatch) -> Result<()>) -> Result<()> {
        let pk = ident(&self.spec().primary_key);
        let parts: Vec<&[Key]> = ids.chunks(BY_ID_PART).collect();
        // Sessions read alternate parts at once (the server's time per row is
        // the cost, and an online catch-up waits for it); the rows go out in
        // the order of the ids.
        let lanes = BY_ID_LANES.min(parts.len()).max(1);
        let read_lane = async |lane: usize| -> Result<Vec<(usize, Vec<RecordBatch>)>> {
            let mut c = self.pool.get().await?;
            let mut got = Vec::new();
            for (i, part) in parts.iter().enumerate().skip(lane).step_by(lanes) {
                let marks = vec!["?"; part.len()].join(",");
                let sql = format!("{} WHERE {pk} IN ({marks}){} ORDER BY {pk}", self.select(), self.and_subset());
                let params: Vec<Value> = part.iter().map(key_value).collect();
                let mut decoder = self.decoder();
                let mut batches = Vec::new();
                self.decode_query(&mut c, &sql, params, "reading changed rows", &mut decoder, usize::MAX, &mut |b| {
                    batches.push(b);
                    Ok(())
                })
                .await?;
                if decoder.rows() > 0 {
                    batches.push(decoder.take_batch()?);
                }
                got.push((i, batches));
            }
            self.pool.put(c);
            Ok(got)
        };
        let lanes_read = self.handle.block_on(futures_util::future::try_join_all((0..lanes).map(read_lane)))?;
        let mut parts_read: Vec<(usize, Vec<RecordBatch>)> = lanes_read.into_iter().flatten().collect();
        parts_read.sort_by_key(|(i, _)| *i);
        for b in parts_read.into_iter().flat_map(|(_, batches)| batches) {
            out(b)?;
        }
        Ok(())
    }
}

/// Ids per statement of a read by id.
const BY_ID_PART: usize = 1_000;
/// Sessions a read by id uses at once.
const BY_ID_LANES: usize = 2;

/// Keys the server returned must ascend in byte order, as the plan does.
fn check_ascending(keys: &[Key], what: &str) -> Result<()> {
    match keys.windows(2).find(|w| w[0] >= w[1]) {
        Some(w) => Err(not_byte_order(&w[0], &w[1]).context(what.to_string())),
        None => Ok(()),
    }
}

/// `later` came after `earlier` in the table's key order, but not in byte
/// order: chunk ranges would overlap or leave gaps, so the read stops.
fn not_byte_order(earlier: &Key, later: &Key) -> anyhow::Error {
    let why = [later, earlier].into_iter().find_map(|k| match k {
        Key::Str(s) => key_not_orderable(s),
        Key::Int(_) => None,
    });
    anyhow!(
        "key {later} came after {earlier} in the table's key order, which is not byte order ({}); \
         vmig reads string keys in byte order only",
        why.unwrap_or_else(|| "string keys need a binary collation, utf8mb4_bin".into())
    )
}

/// Ids per page of an ids-only walk.
const ID_PAGE: usize = 50_000;

impl ObSource {
    fn select(&self) -> String {
        let mut n = 0;
        let columns: Vec<String> = self.spec().columns.iter().map(|c| vector_select(&c.name, &c.ty, &mut n)).collect();
        format!("SELECT {} FROM {}", columns.join(", "), ident(&self.table))
    }

    fn decoder(&self) -> RowDecoder {
        let spec = self.spec();
        RowDecoder::new(spec.arrow_schema(), spec.columns.iter().map(|c| c.ty.clone()).collect())
    }

    /// Runs the statement `sql` with `params` (rows in the spec's column
    /// order, vectors by element), decoding into `decoder` and handing out
    /// batches of `batch_rows`; returns the rows read and the last primary key.
    #[allow(clippy::too_many_arguments)]
    async fn decode_query(
        &self,
        c: &mut Conn,
        sql: &str,
        params: Vec<Value>,
        what: &str,
        decoder: &mut RowDecoder,
        batch_rows: usize,
        out: &mut dyn FnMut(RecordBatch) -> Result<()>,
    ) -> Result<(usize, Option<Key>)> {
        let spec = self.spec();
        let key_sql = KeySql::of(spec);
        // The key's place among the values: after the columns before it, vectors by element.
        let pk_at: usize = spec.columns[..spec.pk_index()].iter().map(|c| value_width(&c.ty)).sum();
        let params = if params.is_empty() { Params::Empty } else { Params::Positional(params) };
        let mut result = c.exec_iter(sql, params).await.ob(what)?;
        let mut n = 0usize;
        let mut last = None;
        let mut err: Option<anyhow::Error> = None;
        result
            .for_each(|row| {
                if err.is_some() {
                    return;
                }
                let values = row.unwrap();
                // The keyset cursor: an unreadable key would repeat the page forever.
                let key = match key_sql.parse_value(&values[pk_at]) {
                    Ok(k) => k,
                    Err(e) => {
                        err = Some(e);
                        return;
                    }
                };
                // A collation that is not byte order would make chunks
                // overlap or leave gaps: refuse rather than copy wrongly.
                if let Some(l) = last.as_ref().filter(|l| key <= **l) {
                    err = Some(not_byte_order(l, &key));
                    return;
                }
                if let Err(e) = decoder.push_row(&values) {
                    err = Some(anyhow!("row with {} = {key}: {e}", spec.primary_key));
                    return;
                }
                last = Some(key);
                n += 1;
                if decoder.rows() >= batch_rows {
                    if let Err(e) = decoder.take_batch().and_then(|b| out(b)) {
                        err = Some(e);
                    }
                }
            })
            .await
            .ob(what)?;
        if let Some(e) = err {
            return Err(e.context(what.to_string()));
        }
        Ok((n, last))
    }
}

