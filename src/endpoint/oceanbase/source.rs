//! OceanBase as a source: keyset pages of each chunk's key range, vectors
//! parsed from OceanBase's text (6 significant digits).

use super::*;

pub struct ObSource {
    url: ObUrl,
    table: String,
    handle: Handle,
    discovered: Discovered,
    pool: Pool,
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
        Ok(ObSource { url, table: table.to_string(), handle, discovered, pool })
    }

    pub fn skipped_indexes(&self) -> &[String] {
        &self.discovered.skipped_indexes
    }
}

impl Source for ObSource {
    fn describe(&self) -> String {
        format!("{} table {}", self.url.redacted(), self.table)
    }

    fn spec(&self) -> &TableSpec {
        &self.discovered.spec
    }

    fn vectors_exact(&self) -> bool {
        false
    }

    fn plan(&self, chunk_rows: u64) -> Result<Vec<ChunkRange>> {
        let pk = ident(&self.spec().primary_key);
        let t = ident(&self.table);
        self.handle.block_on(async {
            let mut c = self.pool.get().await?;
            let total = query_i64(&mut c, &format!("SELECT count(*) FROM {t}"), "counting rows").await?.unwrap_or(0);
            let bounds: Vec<i64> = query_strings(
                &mut c,
                &format!(
                    "SELECT k FROM (SELECT {pk} AS k, row_number() OVER (ORDER BY {pk}) AS rn FROM {t}) s \
                     WHERE rn % {chunk_rows} = 0 ORDER BY k"
                ),
                "planning chunks",
            )
            .await?
            .into_iter()
            .filter_map(|r| r.into_iter().next().flatten().and_then(|v| v.parse().ok()))
            .collect();
            self.pool.put(c);
            Ok(ranges_from_bounds(&bounds, total as u64, chunk_rows))
        })
    }

    fn read_chunk(
        &self,
        chunk: &ChunkRange,
        batch_rows: usize,
        out: &mut dyn FnMut(RecordBatch) -> Result<()>,
    ) -> Result<()> {
        let spec = self.spec();
        let pk = ident(&spec.primary_key);
        let pk_idx = spec.pk_index();
        let select = format!("SELECT {} FROM {}", column_list(spec), ident(&self.table));
        // Vectors come back as text, ~10 bytes per dimension.
        let row_text = crate::pipeline::estimate_row_bytes(spec) * 5 / 2;
        let page = (PAGE_BYTES / row_text.max(1)).clamp(100, 20_000);
        let mut decoder = TextRowDecoder::new(spec.arrow_schema(), spec.columns.iter().map(|c| c.ty.clone()).collect());
        self.handle.block_on(async {
            let mut c = self.pool.get().await?;
            let mut last: Option<i64> = None;
            loop {
                let lower = match last {
                    None => format!("{pk} >= {}", chunk.lo),
                    Some(l) => format!("{pk} > {l}"),
                };
                let sql = format!("{select} WHERE {lower} AND {pk} <= {} ORDER BY {pk} LIMIT {page}", chunk.hi);
                let mut result = c.query_iter(sql).await.ob(&format!("reading chunk {}", chunk.id))?;
                let mut n = 0usize;
                let mut err: Option<anyhow::Error> = None;
                result
                    .for_each(|row| {
                        if err.is_some() {
                            return;
                        }
                        let values = row.unwrap();
                        let fields: Vec<Option<&[u8]>> = values
                            .iter()
                            .map(|v| match v {
                                Value::Bytes(b) => Some(b.as_slice()),
                                _ => None,
                            })
                            .collect();
                        let id = fields[pk_idx].map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
                        // The keyset cursor: an unreadable key would repeat the page forever.
                        let Ok(key) = id.parse::<i64>() else {
                            err = Some(anyhow!("primary key value {id:?} is not an integer"));
                            return;
                        };
                        if let Err(e) = decoder.push_row(&fields) {
                            err = Some(anyhow!("row with {} = {id}: {e}", spec.primary_key));
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
                    .ob(&format!("reading chunk {}", chunk.id))?;
                if let Some(e) = err {
                    return Err(e.context(format!("chunk {}", chunk.id)));
                }
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
}

