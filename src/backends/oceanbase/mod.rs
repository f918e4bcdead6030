//! OceanBase (MySQL mode) and seekdb endpoint over mysql_async: connection,
//! catalog discovery and DDL here; the source (each chunk read by keyset pages
//! of its primary-key range) in `source.rs`, the sink (binary-literal INSERTs,
//! ledger in the chunk's transaction, job lease) in `sink.rs`, SQL literals
//! and the text decoder in `sql.rs`.

mod apply;
pub mod changes;
mod sink;
mod source;
pub mod sql;
mod writer;

pub use sink::ObSink;
pub use source::ObSource;

use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use arrow::record_batch::RecordBatch;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder, Params, Row, SslOpts, Value};
use tokio::runtime::Handle;

use sql::{RowDecoder, ident, push_str_literal, value_width, vector_select};
use crate::contract::Source;
use crate::model::config::{ObUrl, TlsMode};
use crate::model::plan::{ChunkRange, Key, ranges_from_keys};
use crate::model::schema::{ColumnSpec, ColumnType, IndexKind, IndexSpec, Metric, TableSpec};

pub const LEDGER_TABLE: &str = "vmig_ledger";
/// Online jobs: the change-stream position applied, per job.
pub const POSITIONS_TABLE: &str = "vmig_positions";
/// Statement size we aim for. Measured on seekdb (1536-d rows): 2–8 MiB
/// statements ingest at the same rate; smaller ones pay per-statement costs.
pub(super) const DEFAULT_STATEMENT_BYTES: usize = 4 << 20;
/// max_allowed_packet we ask for when the server's is smaller than a statement.
pub(super) const WANTED_PACKET_BYTES: usize = 64 << 20;
/// Keyset page size when reading (bytes of text per page, roughly).
const PAGE_BYTES: usize = 8 << 20;

// ---------------------------------------------------------------- connection

/// `tls`: whether this attempt asks for TLS (`PREFERRED` tries it first).
fn opts(url: &ObUrl, tls: bool) -> mysql_async::Opts {
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
    if tls {
        b = b.ssl_opts(Some(ssl_opts(url)));
    }
    b.into()
}

fn ssl_opts(url: &ObUrl) -> SslOpts {
    let mut o = SslOpts::default();
    if let Some(ca) = &url.ssl_ca {
        o = o.with_root_certs(vec![ca.clone().into()]).with_disable_built_in_roots(true);
    }
    if let (Some(cert), Some(key)) = (&url.ssl_cert, &url.ssl_key) {
        o = o.with_client_identity(Some(mysql_async::ClientIdentity::new(cert.clone().into(), key.clone().into())));
    }
    // The MySQL client's meanings. VERIFY_CA is refused before connecting
    // (see `connect`): the driver's "skip the host name only" option no longer
    // recognises rustls' host-name error, so it would fail every connection.
    let check = matches!(url.tls, TlsMode::VerifyIdentity | TlsMode::VerifyCa);
    o.with_danger_accept_invalid_certs(!check).with_danger_skip_domain_validation(!check)
}

/// Why a session could not be opened, in one line: TLS in words, else the server's message.
fn connect_error_text(e: &mysql_async::Error, url: &ObUrl) -> String {
    if matches!(e, mysql_async::Error::Driver(mysql_async::DriverError::NoClientSslFlagFromServer)) {
        return format!("the server offers no TLS, and ssl-mode={} does not allow plain text", url.tls.name());
    }
    let trusted = match &url.ssl_ca {
        Some(ca) => format!("the CA in ssl-ca ({})", ca.display()),
        None => "a public CA (give ssl-ca=FILE for a private one)".into(),
    };
    match crate::contract::tls_failure_text(e, &url.host, &trusted) {
        Some(t) => format!("{t} (ssl-mode={})", url.tls.name()),
        None => ob_error_text(e),
    }
}

/// The server's message and code, or the driver's error; never the password.
pub fn ob_error_text(e: &mysql_async::Error) -> String {
    match e {
        mysql_async::Error::Server(s) => format!("{} (error {})", s.message, s.code),
        other => other.to_string(),
    }
}

pub(super) trait ObContext<T> {
    fn ob(self, what: &str) -> Result<T>;
}

impl<T> ObContext<T> for std::result::Result<T, mysql_async::Error> {
    fn ob(self, what: &str) -> Result<T> {
        self.map_err(|e| anyhow!("{what}: {}", ob_error_text(&e)))
    }
}

pub async fn connect(url: &ObUrl) -> Result<Conn> {
    if url.tls == TlsMode::VerifyCa {
        bail!(
            "cannot connect to {}: ssl-mode=verify_ca is not available for OceanBase (the MySQL driver checks the chain only together with the host name); use ssl-mode=verify_identity with a host name the certificate holds",
            url.redacted()
        );
    }
    let first = Conn::new(opts(url, url.tls != TlsMode::Disabled)).await;
    let mut c = match first {
        Err(mysql_async::Error::Driver(mysql_async::DriverError::NoClientSslFlagFromServer)) if url.tls == TlsMode::Preferred => {
            Conn::new(opts(url, false)).await
        }
        other => other,
    }
    .map_err(|e| anyhow!("cannot connect to {}: {}", url.redacted(), connect_error_text(&e, url)))?;
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
pub(super) struct Pool {
    pub(super) url: ObUrl,
    pub(super) idle: Mutex<Vec<Conn>>,
}

impl Pool {
    pub(super) async fn get(&self) -> Result<Conn> {
        // An idle session may have died with a server restart.
        loop {
            let idle = self.idle.lock().unwrap().pop();
            let Some(mut c) = idle else { break };
            if c.ping().await.is_ok() {
                return Ok(c);
            }
        }
        connect(&self.url).await
    }
    pub(super) fn put(&self, c: Conn) {
        self.idle.lock().unwrap().push(c);
    }
}

pub(super) fn text(row: &Row, i: usize) -> Option<String> {
    match row.as_ref(i)? {
        Value::NULL => None,
        Value::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
        other => Some(other.as_sql(true).trim_matches('\'').to_string()),
    }
}

pub(super) async fn query_strings(c: &mut Conn, sql: &str, what: &str) -> Result<Vec<Vec<Option<String>>>> {
    let rows: Vec<Row> = c.query(sql).await.ob(what)?;
    Ok(rows.iter().map(|r| (0..r.len()).map(|i| text(r, i)).collect()).collect())
}

pub(super) async fn query_i64(c: &mut Conn, sql: &str, what: &str) -> Result<Option<i64>> {
    let rows = query_strings(c, sql, what).await?;
    match rows.first().and_then(|r| r.first().cloned().flatten()) {
        None => Ok(None),
        Some(s) => Ok(Some(s.parse().with_context(|| format!("{what}: {s:?} is not an integer"))?)),
    }
}

pub(super) fn str_literal(s: &str) -> String {
    let mut out = Vec::new();
    push_str_literal(s, &mut out);
    String::from_utf8(out).unwrap()
}

/// `CREATE TABLE IF NOT EXISTS` for vmig's own tables, then waits until this
/// session sees the table: when another job creates it at the same moment,
/// OceanBase answers "exists" before the new table reaches this session's
/// schema, and the next statement fails with 1146 (seen with two tables of
/// one job starting together).
pub(super) async fn create_own_table(c: &mut Conn, name: &str, ddl: &str, what: &str) -> Result<()> {
    c.query_drop(ddl).await.ob(what)?;
    let started = std::time::Instant::now();
    loop {
        match c.query_drop(format!("SELECT 1 FROM {name} LIMIT 0")).await {
            Ok(()) => return Ok(()),
            Err(mysql_async::Error::Server(e)) if e.code == 1146 && started.elapsed() < Duration::from_secs(60) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => return Err(e).ob(what),
        }
    }
}

/// How a table's primary key reads and compares: string keys in the
/// column's own collation, which must be binary (`utf8mb4_bin`, checked at
/// discovery) so that it orders as the plan does, by bytes.
pub struct KeySql {
    pk: String,
    text: bool,
}

impl KeySql {
    pub fn of(spec: &TableSpec) -> KeySql {
        let text = spec.column(&spec.primary_key).is_some_and(|c| matches!(c.ty, ColumnType::Text { .. } | ColumnType::Uuid));
        KeySql { pk: ident(&spec.primary_key), text }
    }

    pub fn column(&self) -> &str {
        &self.pk
    }

    pub fn is_text(&self) -> bool {
        self.text
    }

    /// A key as the text protocol returns it.
    pub fn parse(&self, text: &str) -> Result<Key> {
        if self.text {
            return Ok(Key::Str(text.to_string()));
        }
        text.parse().map(Key::Int).map_err(|_| anyhow!("primary key value {text:?} is not an integer"))
    }

    /// A key as the binary protocol returns it.
    pub fn parse_value(&self, v: &Value) -> Result<Key> {
        match v {
            Value::Int(i) if !self.text => Ok(Key::Int(*i)),
            Value::UInt(u) if !self.text => i64::try_from(*u).map(Key::Int).map_err(|_| anyhow!("primary key value {u} does not fit a 64-bit integer")),
            Value::Bytes(b) => self.parse(std::str::from_utf8(b).map_err(|_| anyhow!("primary key value {:?} is not UTF-8", String::from_utf8_lossy(b)))?),
            other => bail!("primary key value {other:?} is neither an integer nor text"),
        }
    }

    /// A chunk's range as a condition (TRUE for every key).
    pub fn range(&self, chunk: &ChunkRange) -> String {
        chunk.condition(&self.pk, &key_literal).unwrap_or_else(|| "TRUE".into())
    }
}

/// A key as a statement's parameter.
pub fn key_value(k: &Key) -> Value {
    match k {
        Key::Int(i) => Value::Int(*i),
        Key::Str(s) => Value::Bytes(s.as_bytes().to_vec()),
    }
}

/// A key as an SQL literal.
pub fn key_literal(k: &Key) -> String {
    k.sql_literal(&str_literal)
}

/// Why OceanBase cannot hold this string key where vmig's byte order puts
/// it: `utf8mb4_bin` pads with spaces when it compares, so 'a' and 'a ' are
/// one key, and a character below U+0020 sorts before the end of a string
/// ('a\t' < 'a'). None for keys it orders by their bytes.
pub fn key_not_orderable(key: &str) -> Option<String> {
    if key.ends_with(' ') {
        return Some(format!("key {key:?} ends with a space, which OceanBase's utf8mb4_bin ignores ('a ' = 'a')"));
    }
    key.chars().find(|c| (*c as u32) < 0x20).map(|c| {
        format!("key {key:?} holds {:?}, which OceanBase's utf8mb4_bin sorts before the end of a string (not byte order)", c)
    })
}

/// A subset filter as a SQL condition (`qualifier.` before each column when given).
pub fn filter_sql(f: &crate::model::filter::Filter, qualifier: Option<&str>) -> String {
    f.sql_literals(qualifier, &ident, &str_literal)
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
pub(super) async fn table_indexes(c: &mut Conn, table: &str) -> Result<(Vec<IndexSpec>, Vec<String>)> {
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
             datetime_precision, collation_name \
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
    // String keys are planned and paged in byte order; a case- or
    // accent-insensitive collation orders (and equates) them otherwise.
    if let Some(r) = cols.iter().find(|r| r[0].as_deref() == Some(pk[0].as_str())) {
        let collation = r[8].clone().unwrap_or_default();
        if !collation.is_empty() && !collation.ends_with("_bin") {
            bail!(
                "table {table}: primary key {} has collation {collation}, which does not order keys by their bytes; \
                 vmig reads string keys with a binary collation only (ALTER TABLE … MODIFY {} … COLLATE utf8mb4_bin)",
                pk[0],
                pk[0]
            );
        }
    }
    let (indexes, skipped_indexes) = table_indexes(c, table).await?;
    let spec = TableSpec { name: table.to_string(), columns, primary_key: pk[0].clone(), indexes, computed: Vec::new(), partition_key: None };
    spec.validate()?;
    Ok(Some(Discovered { spec, skipped_indexes, coarse_timestamps }))
}

/// Characters of a string primary key vmig declares (4 bytes each in
/// utf8mb4: half of OceanBase's 16 KiB row-key limit).
const MAX_KEY_CHARS: u32 = 2048;

/// The SQL type of a primary-key column (and of an online changelog's key).
/// A string key gets a binary collation (byte order, as chunk ranges
/// compare; 'a' and 'A' are two keys) and a length that fits OceanBase's
/// 16 KiB row key.
pub fn key_sql_type(c: &ColumnSpec) -> String {
    match &c.ty {
        ColumnType::Text { max_chars } => {
            format!("VARCHAR({}) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin", max_chars.unwrap_or(MAX_KEY_CHARS).min(MAX_KEY_CHARS))
        }
        ColumnType::Uuid => "VARCHAR(36) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin".into(),
        _ => column_sql_type(c),
    }
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
        ColumnType::Uuid => "VARCHAR(36)".into(),
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
            let ty = if c.name == spec.primary_key { key_sql_type(c) } else { column_sql_type(c) };
            let mut s = format!("{} {ty}", ident(&c.name));
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

/// Threads a vector index build may use (OceanBase's parallel DDL).
const VECTOR_BUILD_DOP: u32 = 4;

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
            // Parallel DDL builds the same index (SHOW CREATE TABLE is
            // identical) on several threads: measured on seekdb 1.4 (8k ×
            // 1536-d, 2 busy cores), median 9.7 s serial, 8.2–8.6 s with
            // PARALLEL(2) or (4). A server that does not know the hint ignores it.
            format!(
                "CREATE /*+ PARALLEL({VECTOR_BUILD_DOP}) */ VECTOR INDEX {} ON {} ({cols}) \
                 WITH (distance={distance}, type={ty}, m={m}, ef_construction={ef_construction})",
                ident(&ix.name),
                ident(table)
            )
        }
    }
}

pub(super) fn column_list(spec: &TableSpec) -> String {
    spec.columns.iter().map(|c| ident(&c.name)).collect::<Vec<_>>().join(", ")
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
            "CREATE /*+ PARALLEL(4) */ VECTOR INDEX `vector_index` ON `modeldata` (`vector`) WITH (distance=inner_product, type=hnsw_sq, m=32, ef_construction=128)"
        );
    }
}
