//! OceanBase (MySQL mode) and seekdb endpoint over mysql_async. Reads each
//! chunk by keyset pages of its primary-key range; writes multi-row INSERTs
//! with binary vector literals, split by bytes, the chunk's rows and its
//! ledger row in one transaction after clearing the chunk's key range.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use arrow::array::ArrayRef;
use arrow::record_batch::RecordBatch;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder, Row, SslOpts, Value};
use tokio::runtime::Handle;

use super::obsql::{TextRowDecoder, VectorLiteral, encode_row, ident, push_str_literal};
use super::{ChunkWriter, OnExisting, RowReject, Sink, SinkOptions, Source, check_final_count, existing_rows_action};
use crate::config::{ObUrl, TlsMode};
use crate::ledger::{CommitRecord, Ledger, now_rfc3339};
use crate::plan::{ChunkRange, ranges_from_bounds};
use crate::schema::{ColumnSpec, ColumnType, IndexKind, IndexSpec, Metric, TableSpec};

pub const LEDGER_TABLE: &str = "vmig_ledger";
/// Statement size we aim for. Measured on seekdb (1536-d rows): 2–8 MiB
/// statements ingest at the same rate; smaller ones pay per-statement costs.
const DEFAULT_STATEMENT_BYTES: usize = 4 << 20;
/// max_allowed_packet we ask for when the server's is smaller than a statement.
const WANTED_PACKET_BYTES: usize = 64 << 20;
/// Keyset page size when reading (bytes of text per page, roughly).
const PAGE_BYTES: usize = 8 << 20;

// ---------------------------------------------------------------- connection

fn opts(url: &ObUrl) -> mysql_async::Opts {
    let mut b = OptsBuilder::default()
        .ip_or_hostname(url.host.clone())
        .tcp_port(url.port)
        .user(Some(url.user.clone()))
        .pass(Some(url.password().to_string()))
        .db_name(Some(url.database.clone()))
        .prefer_socket(false)
        // Timestamps travel as UTC wall time; strict mode makes the server
        // refuse (not truncate) values that do not fit.
        .init(vec!["SET time_zone = '+00:00', sql_mode = 'STRICT_ALL_TABLES'"]);
    b = match url.tls {
        TlsMode::Disabled => b,
        TlsMode::Required => b.ssl_opts(Some(
            SslOpts::default().with_danger_accept_invalid_certs(true).with_danger_skip_domain_validation(true),
        )),
        TlsMode::VerifyIdentity => b.ssl_opts(Some(SslOpts::default())),
    };
    b.into()
}

/// The server's message and code, or the driver's error; never the password.
pub fn ob_error_text(e: &mysql_async::Error) -> String {
    match e {
        mysql_async::Error::Server(s) => format!("{} (error {})", s.message, s.code),
        other => other.to_string(),
    }
}

trait ObContext<T> {
    fn ob(self, what: &str) -> Result<T>;
}

impl<T> ObContext<T> for std::result::Result<T, mysql_async::Error> {
    fn ob(self, what: &str) -> Result<T> {
        self.map_err(|e| anyhow!("{what}: {}", ob_error_text(&e)))
    }
}

pub async fn connect(url: &ObUrl) -> Result<Conn> {
    let mut c = Conn::new(opts(url))
        .await
        .map_err(|e| anyhow!("cannot connect to {}: {}", url.redacted(), ob_error_text(&e)))?;
    // Big chunks and index builds outlast OceanBase's 10 s default query timeout.
    for set in ["SET ob_query_timeout = 86400000000", "SET ob_trx_timeout = 86400000000"] {
        if let Err(e) = c.query_drop(set).await {
            if !matches!(&e, mysql_async::Error::Server(s) if s.code == 1193) {
                return Err(e).ob("setting session timeouts");
            }
        }
    }
    Ok(c)
}

/// A few connections kept open and reused by the worker threads.
struct Pool {
    url: ObUrl,
    idle: Mutex<Vec<Conn>>,
}

impl Pool {
    async fn get(&self) -> Result<Conn> {
        let idle = self.idle.lock().unwrap().pop();
        match idle {
            Some(c) => Ok(c),
            None => connect(&self.url).await,
        }
    }
    fn put(&self, c: Conn) {
        self.idle.lock().unwrap().push(c);
    }
}

fn text(row: &Row, i: usize) -> Option<String> {
    match row.as_ref(i)? {
        Value::NULL => None,
        Value::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
        other => Some(other.as_sql(true).trim_matches('\'').to_string()),
    }
}

async fn query_strings(c: &mut Conn, sql: &str, what: &str) -> Result<Vec<Vec<Option<String>>>> {
    let rows: Vec<Row> = c.query(sql).await.ob(what)?;
    Ok(rows.iter().map(|r| (0..r.len()).map(|i| text(r, i)).collect()).collect())
}

async fn query_i64(c: &mut Conn, sql: &str, what: &str) -> Result<Option<i64>> {
    let rows = query_strings(c, sql, what).await?;
    match rows.first().and_then(|r| r.first().cloned().flatten()) {
        None => Ok(None),
        Some(s) => Ok(Some(s.parse().with_context(|| format!("{what}: {s:?} is not an integer"))?)),
    }
}

fn str_literal(s: &str) -> String {
    let mut out = Vec::new();
    push_str_literal(s, &mut out);
    String::from_utf8(out).unwrap()
}

// ---------------------------------------------------------------- catalog

pub struct Discovered {
    pub spec: TableSpec,
    pub skipped_indexes: Vec<String>,
    /// Timestamp columns keeping fewer than 6 fractional digits (FastGPT's
    /// own DDL says TIMESTAMP, i.e. whole seconds), with their precision.
    pub coarse_timestamps: Vec<(String, u32)>,
}

fn column_type(name: &str, data_type: &str, column_type: &str, max_chars: Option<u32>) -> Result<ColumnType> {
    let dt = data_type.to_ascii_lowercase();
    Ok(match dt.as_str() {
        "bigint" => ColumnType::Int64,
        "int" | "integer" | "mediumint" => ColumnType::Int32,
        "smallint" => ColumnType::Int16,
        "tinyint" if column_type.to_ascii_lowercase().starts_with("tinyint(1)") => ColumnType::Bool,
        "tinyint" => ColumnType::Int16,
        "float" => ColumnType::Float32,
        "double" | "real" => ColumnType::Float64,
        "varchar" | "char" => ColumnType::Text { max_chars },
        "text" | "tinytext" | "mediumtext" | "longtext" => ColumnType::Text { max_chars: None },
        "json" => ColumnType::Json { binary: true },
        "timestamp" | "datetime" => ColumnType::Timestamp { utc: false },
        v if v.starts_with("vector(") => {
            let dim = v["vector(".len()..].trim_end_matches(')').parse().map_err(|_| anyhow!("column {name}: bad type {data_type}"))?;
            ColumnType::Vector { dim }
        }
        _ => bail!("column {name} has type {column_type}, which vmig cannot copy yet"),
    })
}

/// Indexes from `SHOW CREATE TABLE` (the only place OceanBase shows vector
/// index parameters). Returns translated indexes and the lines it skipped.
pub fn parse_show_create_indexes(ddl: &str) -> (Vec<IndexSpec>, Vec<String>) {
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for line in ddl.lines().map(str::trim) {
        let (kind, rest) = if let Some(r) = line.strip_prefix("VECTOR KEY ") {
            ("vector", r)
        } else if let Some(r) = line.strip_prefix("UNIQUE KEY ") {
            ("unique", r)
        } else if let Some(r) = line.strip_prefix("KEY ") {
            ("btree", r)
        } else {
            if line.contains(" KEY ") && !line.starts_with("PRIMARY KEY") {
                skipped.push(line.trim_end_matches(',').to_string());
            }
            continue;
        };
        let Some(name) = rest.strip_prefix('`').and_then(|r| r.split('`').next()) else { continue };
        let (Some(open), Some(close)) = (rest.find('('), rest.find(')')) else { continue };
        let columns: Vec<String> =
            rest[open + 1..close].split(',').map(|c| c.trim().trim_matches('`').to_string()).collect();
        let kind = match kind {
            "btree" => IndexKind::Btree { unique: false },
            "unique" => IndexKind::Btree { unique: true },
            _ => {
                let params: Vec<(String, String)> = rest
                    .split_once("WITH (")
                    .and_then(|(_, r)| r.split(')').next())
                    .unwrap_or("")
                    .split(',')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase()))
                    .collect();
                let get = |k: &str| params.iter().find(|(pk, _)| pk == k).map(|(_, v)| v.as_str());
                let metric = match get("distance") {
                    Some("inner_product") => Metric::InnerProduct,
                    Some("cosine") => Metric::Cosine,
                    Some("l2") => Metric::L2,
                    _ => {
                        skipped.push(line.trim_end_matches(',').to_string());
                        continue;
                    }
                };
                let quantization = match get("type") {
                    Some("hnsw") | None => None,
                    Some(t) if t.starts_with("hnsw_") => Some(t["hnsw_".len()..].to_string()),
                    Some(_) => {
                        skipped.push(line.trim_end_matches(',').to_string());
                        continue;
                    }
                };
                IndexKind::Hnsw {
                    metric,
                    m: get("m").and_then(|v| v.parse().ok()).unwrap_or(16),
                    ef_construction: get("ef_construction").and_then(|v| v.parse().ok()).unwrap_or(200),
                    quantization,
                }
            }
        };
        out.push(IndexSpec { name: name.to_string(), columns, kind });
    }
    (out, skipped)
}

/// The table's indexes as `parse_show_create_indexes` reads them.
async fn table_indexes(c: &mut Conn, table: &str) -> Result<(Vec<IndexSpec>, Vec<String>)> {
    let ddl = query_strings(c, &format!("SHOW CREATE TABLE {}", ident(table)), "reading table definition").await?;
    let ddl = ddl.first().and_then(|r| r.get(1).cloned().flatten()).unwrap_or_default();
    Ok(parse_show_create_indexes(&ddl))
}

pub async fn discover(c: &mut Conn, table: &str) -> Result<Option<Discovered>> {
    let t = str_literal(table);
    let cols = query_strings(
        c,
        &format!(
            "SELECT column_name, data_type, column_type, is_nullable, column_default, extra, character_maximum_length, \
             datetime_precision \
             FROM information_schema.columns WHERE table_schema = DATABASE() AND table_name = {t} ORDER BY ordinal_position"
        ),
        "reading table columns",
    )
    .await?;
    if cols.is_empty() {
        return Ok(None);
    }
    let mut columns = Vec::new();
    let mut coarse_timestamps = Vec::new();
    for r in &cols {
        let get = |i: usize| r[i].clone().unwrap_or_default();
        let name = get(0);
        let max_chars = r[6].as_deref().and_then(|v| v.parse().ok());
        let ty = column_type(&name, &get(1), &get(2), max_chars)?;
        let precision: u32 = r[7].as_deref().and_then(|v| v.parse().ok()).unwrap_or(6);
        if matches!(ty, ColumnType::Timestamp { .. }) && precision < 6 {
            coarse_timestamps.push((name.clone(), precision));
        }
        columns.push(ColumnSpec {
            ty,
            nullable: get(3) == "YES",
            auto_increment: get(5).to_ascii_lowercase().contains("auto_increment"),
            default_now: get(4).to_ascii_uppercase().starts_with("CURRENT_TIMESTAMP"),
            name,
        });
    }
    let pk: Vec<String> = query_strings(
        c,
        &format!(
            "SELECT column_name FROM information_schema.statistics WHERE table_schema = DATABASE() \
             AND table_name = {t} AND index_name = 'PRIMARY' ORDER BY seq_in_index"
        ),
        "reading primary key",
    )
    .await?
    .into_iter()
    .filter_map(|r| r.into_iter().next().flatten())
    .collect();
    if pk.len() != 1 {
        bail!("table {table} must have a single-column primary key (found {})", if pk.is_empty() { "none".into() } else { pk.join(", ") });
    }
    let (indexes, skipped_indexes) = table_indexes(c, table).await?;
    let spec = TableSpec { name: table.to_string(), columns, primary_key: pk[0].clone(), indexes };
    spec.validate()?;
    Ok(Some(Discovered { spec, skipped_indexes, coarse_timestamps }))
}

fn column_sql_type(c: &ColumnSpec) -> String {
    match &c.ty {
        ColumnType::Int16 => "SMALLINT".into(),
        ColumnType::Int32 => "INT".into(),
        ColumnType::Int64 => "BIGINT".into(),
        ColumnType::Float32 => "FLOAT".into(),
        ColumnType::Float64 => "DOUBLE".into(),
        ColumnType::Bool => "BOOLEAN".into(),
        // utf8mb4 VARCHAR holds at most 16383 characters.
        ColumnType::Text { max_chars: Some(n) } if *n <= 16383 => format!("VARCHAR({n})"),
        ColumnType::Text { .. } => "LONGTEXT".into(),
        ColumnType::Json { .. } => "JSON".into(),
        // Microseconds, so PostgreSQL's timestamps arrive whole.
        ColumnType::Timestamp { .. } => "TIMESTAMP(6)".into(),
        ColumnType::Vector { dim } | ColumnType::HalfVec { dim } => format!("VECTOR({dim})"),
    }
}

pub fn create_table_sql(table: &str, spec: &TableSpec) -> String {
    let cols: Vec<String> = spec
        .columns
        .iter()
        .map(|c| {
            let mut s = format!("{} {}", ident(&c.name), column_sql_type(c));
            s.push_str(if c.nullable { " NULL" } else { " NOT NULL" });
            if c.auto_increment && c.name == spec.primary_key {
                s.push_str(" AUTO_INCREMENT");
            }
            if c.default_now && matches!(c.ty, ColumnType::Timestamp { .. }) {
                s.push_str(" DEFAULT CURRENT_TIMESTAMP(6)");
            }
            s
        })
        .collect();
    format!("CREATE TABLE {} ({}, PRIMARY KEY ({}))", ident(table), cols.join(", "), ident(&spec.primary_key))
}

pub fn create_index_sql(table: &str, ix: &IndexSpec) -> String {
    let cols = ix.columns.iter().map(|c| ident(c)).collect::<Vec<_>>().join(", ");
    match &ix.kind {
        IndexKind::Btree { unique } => {
            format!("CREATE {}INDEX {} ON {} ({cols})", if *unique { "UNIQUE " } else { "" }, ident(&ix.name), ident(table))
        }
        IndexKind::Hnsw { metric, m, ef_construction, quantization } => {
            let distance = match metric {
                Metric::InnerProduct => "inner_product",
                Metric::Cosine => "cosine",
                Metric::L2 => "l2",
            };
            let ty = match quantization {
                Some(q) => format!("hnsw_{q}"),
                None => "hnsw".into(),
            };
            format!(
                "CREATE VECTOR INDEX {} ON {} ({cols}) WITH (distance={distance}, type={ty}, m={m}, ef_construction={ef_construction})",
                ident(&ix.name),
                ident(table)
            )
        }
    }
}

fn column_list(spec: &TableSpec) -> String {
    spec.columns.iter().map(|c| ident(&c.name)).collect::<Vec<_>>().join(", ")
}

// ---------------------------------------------------------------- source

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

// ---------------------------------------------------------------- sink

pub struct ObSink {
    url: ObUrl,
    table: String,
    handle: Handle,
    pool: Arc<Pool>,
    target: Mutex<Option<TableSpec>>,
    upsert: Mutex<bool>,
    ledger: Mutex<bool>,
    statement_bytes: Mutex<usize>,
    literal: VectorLiteral,
}

impl ObSink {
    pub fn open(url: ObUrl, table: &str, handle: Handle) -> Result<Self> {
        let conn = handle.block_on(connect(&url))?;
        let pool = Arc::new(Pool { url: url.clone(), idle: Mutex::new(vec![conn]) });
        // VMIG_OB_VECTOR_LITERAL=text writes '[…]' text (slower; for servers
        // that refuse binary literals, and to measure the difference).
        let literal = match std::env::var("VMIG_OB_VECTOR_LITERAL").as_deref() {
            Ok("text") => VectorLiteral::Text,
            _ => VectorLiteral::Binary,
        };
        let statement_bytes = std::env::var("VMIG_OB_STATEMENT_BYTES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_STATEMENT_BYTES)
            .max(64 << 10);
        Ok(ObSink {
            url,
            table: table.to_string(),
            handle,
            pool,
            target: Mutex::new(None),
            upsert: Mutex::new(false),
            ledger: Mutex::new(true),
            statement_bytes: Mutex::new(statement_bytes),
            literal,
        })
    }

    fn target_spec(&self) -> TableSpec {
        self.target.lock().unwrap().clone().expect("prepare() before writing")
    }

    /// Makes sure a statement of `statement_bytes` fits the server's
    /// max_allowed_packet: raises it (SET GLOBAL, seen by new sessions) or,
    /// without the privilege, shrinks our statements.
    async fn fit_packet_size(&self, c: &mut Conn, progress: &dyn Fn(&str)) -> Result<()> {
        let want = *self.statement_bytes.lock().unwrap() + (1 << 20);
        let have = query_i64(c, "SELECT @@global.max_allowed_packet", "reading max_allowed_packet").await?.unwrap_or(0) as usize;
        if have >= want {
            return Ok(());
        }
        match c.query_drop(format!("SET GLOBAL max_allowed_packet = {}", WANTED_PACKET_BYTES.max(want))).await {
            Ok(()) => {
                // Pooled sessions keep the old limit: start new ones.
                self.pool.idle.lock().unwrap().clear();
                progress(&format!("raised max_allowed_packet from {have} to {} bytes", WANTED_PACKET_BYTES.max(want)));
            }
            Err(e) => {
                let fit = have.saturating_sub(64 << 10).max(64 << 10);
                *self.statement_bytes.lock().unwrap() = fit;
                progress(&format!(
                    "max_allowed_packet is {have} bytes and cannot be raised ({}); writing statements of {fit} bytes",
                    ob_error_text(&e)
                ));
            }
        }
        Ok(())
    }

    async fn create_indexes(&self, c: &mut Conn, spec: &TableSpec, progress: &dyn Fn(&str)) -> Result<()> {
        let (existing, _) = table_indexes(c, &self.table).await?;
        for ix in &spec.indexes {
            if existing.iter().any(|e| e.name == ix.name) {
                continue;
            }
            // OceanBase allows one vector index per column.
            if let Some(e) = existing.iter().find(|e| matches!(e.kind, IndexKind::Hnsw { .. }) && e.columns == ix.columns)
                && matches!(ix.kind, IndexKind::Hnsw { .. })
            {
                progress(&format!("vector index {} not built: the column already has vector index {}", ix.name, e.name));
                continue;
            }
            progress(&format!("building index {} …", ix.name));
            let started = Instant::now();
            c.query_drop(create_index_sql(&self.table, ix)).await.ob(&format!("building index {}", ix.name))?;
            progress(&format!("index {} built in {:.1}s", ix.name, started.elapsed().as_secs_f64()));
        }
        Ok(())
    }
}

impl Sink for ObSink {
    fn describe(&self) -> String {
        format!("{} table {}", self.url.redacted(), self.table)
    }

    fn prepare(&self, source: &TableSpec, _plan: &[ChunkRange], opts: &SinkOptions) -> Result<TableSpec> {
        *self.upsert.lock().unwrap() = opts.on_existing == OnExisting::Upsert;
        *self.ledger.lock().unwrap() = !opts.job.is_empty();
        let t = ident(&self.table);
        let spec = self.handle.block_on(async {
            let mut c = self.pool.get().await?;
            self.fit_packet_size(&mut c, &|m| eprintln!("{m}")).await?;
            let spec = match discover(&mut c, &self.table).await? {
                Some(d) => {
                    d.spec.same_columns_as(source)?;
                    for (col, p) in &d.coarse_timestamps {
                        eprintln!(
                            "warning: target column {col} keeps {p} fractional digits of seconds; \
                             finer source timestamps are rounded by OceanBase (verify will show them)"
                        );
                    }
                    d.spec
                }
                None => {
                    let mut spec = source.clone();
                    spec.name = self.table.clone();
                    c.query_drop(create_table_sql(&self.table, &spec)).await.ob("creating target table")?;
                    spec.indexes = source.indexes.clone();
                    spec
                }
            };
            if !opts.job.is_empty() {
                c.query_drop(format!(
                    "CREATE TABLE IF NOT EXISTS {LEDGER_TABLE} (job VARCHAR(255) NOT NULL, chunk INT NOT NULL, lo BIGINT NOT NULL, \
                     hi BIGINT NOT NULL, `rows` BIGINT NOT NULL, rejected BIGINT NOT NULL, content_hash VARCHAR(64) NOT NULL, \
                     bytes BIGINT NOT NULL, committed_at VARCHAR(40) NOT NULL, PRIMARY KEY (job, chunk))"
                ))
                .await
                .ob("creating ledger table")?;
                let ledger_rows = query_i64(
                    &mut c,
                    &format!("SELECT count(*) FROM {LEDGER_TABLE} WHERE job = {}", str_literal(&opts.job)),
                    "reading ledger",
                )
                .await?
                .unwrap_or(0);
                let non_empty = !query_strings(&mut c, &format!("SELECT 1 FROM {t} LIMIT 1"), "checking target").await?.is_empty();
                let target = format!("table {} in {}", self.table, self.url.redacted());
                if existing_rows_action(non_empty, ledger_rows as u64, opts, &target)? {
                    c.query_drop(format!("TRUNCATE TABLE {t}")).await.ob("truncating target")?;
                }
            }
            self.pool.put(c);
            Ok::<_, anyhow::Error>(spec)
        })?;
        *self.target.lock().unwrap() = Some(spec.clone());
        Ok(spec)
    }

    fn committed(&self, job: &str) -> Result<Ledger> {
        self.handle.block_on(async {
            let mut c = self.pool.get().await?;
            let exists = query_i64(
                &mut c,
                &format!(
                    "SELECT count(*) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = '{LEDGER_TABLE}'"
                ),
                "reading ledger",
            )
            .await?
            .unwrap_or(0)
                > 0;
            let mut ledger = Ledger::new();
            if exists {
                let rows = query_strings(
                    &mut c,
                    &format!(
                        "SELECT chunk, lo, hi, `rows`, rejected, content_hash, bytes, committed_at FROM {LEDGER_TABLE} WHERE job = {}",
                        str_literal(job)
                    ),
                    "reading ledger",
                )
                .await?;
                for r in rows {
                    let num = |i: usize| -> Result<i64> {
                        r[i].as_deref().unwrap_or("").parse().map_err(|_| anyhow!("ledger row has a bad value"))
                    };
                    let chunk = num(0)? as u32;
                    ledger.insert(
                        chunk,
                        CommitRecord {
                            chunk,
                            lo: num(1)?,
                            hi: num(2)?,
                            rows: num(3)? as u64,
                            rejected: num(4)? as u64,
                            content_hash: r[5].clone().unwrap_or_default(),
                            bytes: num(6)? as u64,
                            sha256: None,
                            committed_at: r[7].clone().unwrap_or_default(),
                        },
                    );
                }
            }
            self.pool.put(c);
            Ok(ledger)
        })
    }

    fn begin_chunk(&self, job: &str, chunk: &ChunkRange) -> Result<Box<dyn ChunkWriter>> {
        let spec = self.target_spec();
        let upsert = *self.upsert.lock().unwrap();
        let record_ledger = *self.ledger.lock().unwrap();
        let t = ident(&self.table);
        let pk = ident(&spec.primary_key);
        let conn = self.handle.block_on(async {
            let mut c = self.pool.get().await?;
            c.query_drop("START TRANSACTION").await.ob("begin")?;
            if record_ledger && !upsert {
                // A retried chunk replaces whatever an earlier attempt left.
                c.query_drop(format!("DELETE FROM {t} WHERE {pk} BETWEEN {} AND {}", chunk.lo, chunk.hi))
                    .await
                    .ob(&format!("clearing chunk {}", chunk.id))?;
            }
            Ok::<_, anyhow::Error>(c)
        })?;
        let verb = if upsert { "REPLACE" } else { "INSERT" };
        Ok(Box::new(ObChunkWriter {
            handle: self.handle.clone(),
            pool: self.pool.clone(),
            conn: Some(conn),
            job: job.to_string(),
            chunk: *chunk,
            prefix: format!("{verb} INTO {t} ({}) VALUES ", column_list(&spec)),
            types: spec.columns.iter().map(|c| c.ty.clone()).collect(),
            literal: self.literal,
            statement_bytes: *self.statement_bytes.lock().unwrap(),
            record_ledger,
            bytes: 0,
        }))
    }

    fn finish(&self, _source: &TableSpec, _plan: &[ChunkRange], opts: &SinkOptions, progress: &dyn Fn(&str)) -> Result<()> {
        let spec = self.target_spec();
        let t = ident(&self.table);
        let pk = ident(&spec.primary_key);
        self.handle.block_on(async {
            let mut c = self.pool.get().await?;
            if opts.create_indexes {
                self.create_indexes(&mut c, &spec, progress).await?;
            }
            // FastGPT numbers new rows from AUTO_INCREMENT: move it past max(id).
            let auto = spec.column(&spec.primary_key).is_some_and(|c| c.auto_increment);
            if auto {
                if let Some(max) = query_i64(&mut c, &format!("SELECT max({pk}) FROM {t}"), "reading max id").await? {
                    c.query_drop(format!("ALTER TABLE {t} AUTO_INCREMENT = {}", max.saturating_add(1)))
                        .await
                        .ob("setting AUTO_INCREMENT")?;
                }
            }
            if !opts.job.is_empty() {
                let target_rows =
                    query_i64(&mut c, &format!("SELECT count(*) FROM {t}"), "counting target").await?.unwrap_or(0);
                let ledger_rows = query_i64(
                    &mut c,
                    &format!("SELECT coalesce(sum(`rows`), 0) FROM {LEDGER_TABLE} WHERE job = {}", str_literal(&opts.job)),
                    "reading ledger",
                )
                .await?
                .unwrap_or(0);
                check_final_count(target_rows as u64, ledger_rows as u64, opts, &format!("table {}", self.table), progress)?;
            }
            self.pool.put(c);
            Ok(())
        })
    }

    fn drop_table(&self) -> Result<()> {
        self.handle.block_on(async {
            let mut c = self.pool.get().await?;
            c.query_drop(format!("DROP TABLE IF EXISTS {}", ident(&self.table))).await.ob("dropping table")?;
            self.pool.put(c);
            Ok(())
        })
    }

    fn forget_job(&self, job: &str) -> Result<u64> {
        self.handle.block_on(async {
            let mut c = self.pool.get().await?;
            let r = c.query_drop(format!("DELETE FROM {LEDGER_TABLE} WHERE job = {}", str_literal(job))).await;
            let n = match r {
                Ok(()) => c.affected_rows(),
                Err(mysql_async::Error::Server(s)) if s.code == 1146 => 0, // no ledger table
                Err(e) => return Err(e).ob("deleting ledger rows"),
            };
            self.pool.put(c);
            Ok(n)
        })
    }
}

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

struct ObChunkWriter {
    handle: Handle,
    pool: Arc<Pool>,
    conn: Option<Conn>,
    job: String,
    chunk: ChunkRange,
    prefix: String,
    types: Vec<ColumnType>,
    literal: VectorLiteral,
    statement_bytes: usize,
    record_ledger: bool,
    bytes: u64,
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

impl ChunkWriter for ObChunkWriter {
    fn write(&mut self, batch: &RecordBatch) -> Result<Vec<RowReject>> {
        let cols: Vec<ArrayRef> = batch.columns().to_vec();
        let mut enc = Vec::with_capacity(batch.get_array_memory_size() * 2 + 64);
        let mut ends = Vec::with_capacity(batch.num_rows());
        let mut batch_rows = Vec::with_capacity(batch.num_rows());
        let mut rejects = Vec::new();
        for row in 0..batch.num_rows() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fastgpt_index_definitions() {
        let ddl = "CREATE TABLE `modeldata` (\n  `id` bigint(20) NOT NULL AUTO_INCREMENT,\n  PRIMARY KEY (`id`),\n  \
                   VECTOR KEY `vector_index` (`vector`) WITH (DISTANCE=INNER_PRODUCT, TYPE=HNSW_SQ, M=32, EF_CONSTRUCTION=128, LIB=VSAG) BLOCK_SIZE 16384,\n  \
                   KEY `team_dataset_collection_index` (`team_id`, `dataset_id`, `collection_id`) BLOCK_SIZE 16384 LOCAL,\n  \
                   UNIQUE KEY `u` (`createtime`) BLOCK_SIZE 16384 LOCAL,\n  FULLTEXT KEY `ft` (`team_id`)\n)";
        let (ix, skipped) = parse_show_create_indexes(ddl);
        assert_eq!(ix.len(), 3);
        assert_eq!(
            ix[0].kind,
            IndexKind::Hnsw { metric: Metric::InnerProduct, m: 32, ef_construction: 128, quantization: Some("sq".into()) }
        );
        assert_eq!(ix[1].columns, vec!["team_id", "dataset_id", "collection_id"]);
        assert_eq!(ix[2].kind, IndexKind::Btree { unique: true });
        assert_eq!(skipped.len(), 1);
        assert_eq!(
            create_index_sql("modeldata", &ix[0]),
            "CREATE VECTOR INDEX `vector_index` ON `modeldata` (`vector`) WITH (distance=inner_product, type=hnsw_sq, m=32, ef_construction=128)"
        );
    }
}
