//! PostgreSQL + pgvector endpoint: connection, catalog discovery and DDL here;
//! the source (binary COPY OUT of each chunk's key range inside one exported
//! snapshot) in `source.rs`, the sink (binary COPY IN, the chunk's rows and
//! its ledger row in one transaction; job lock; leftovers) in `sink.rs`, the
//! binary COPY codec in `copy.rs`.

mod apply;
mod connect;
mod indexes;
pub use indexes::hnsw_graph_bytes;
pub mod changes;
pub mod copy;
pub mod pgoutput;
pub mod replication;
mod sink;
mod stream;
mod source;

pub use connect::connect_as;
pub use sink::PgSink;
pub use source::PgSource;

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use arrow::record_batch::RecordBatch;
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::runtime::Handle;
use tokio_postgres::{Client, CopyInSink};

use crate::contract::{ChunkWriter, Feedback, OnExisting, RowReject, Sink, SinkOptions, Source, VectorStorage, check_final_count, final_count_due, existing_rows_action, refuse_foreign_ids, without_rows};
use crate::contract::commit::{CommitRecord, Ledger};
use crate::model::now_rfc3339;
use crate::model::config::PgUrl;
use crate::model::plan::{ChunkRange, Key, ranges_from_keys};
use crate::model::schema::{ColumnSpec, ColumnType, IndexKind, IndexSpec, Metric, TableSpec};
use crate::state::locks::{Holder, job_locked};

pub const LEDGER_TABLE: &str = "vmig_ledger";
/// Online jobs: the change-stream position applied, per job (the ledger's position row).
pub const POSITIONS_TABLE: &str = "vmig_positions";

/// Quotes an identifier for SQL.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A string literal that means the same whatever standard_conforming_strings
/// says (E'' syntax, backslashes and quotes doubled).
pub fn literal(s: &str) -> String {
    format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// How a table's primary key is read and compared in SQL. String keys
/// compare by their bytes (`COLLATE "C"`), the order every backend and the
/// plan agree on; UUIDs by their bytes, which is the order of their
/// lowercase text; integer keys as numbers.
pub struct KeySql {
    pk: String,
    kind: KeyKind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Int,
    Text,
    Uuid,
}

impl KeySql {
    pub fn of(spec: &TableSpec) -> KeySql {
        let kind = match spec.column(&spec.primary_key).map(|c| &c.ty) {
            Some(ColumnType::Text { .. }) => KeyKind::Text,
            Some(ColumnType::Uuid) => KeyKind::Uuid,
            _ => KeyKind::Int,
        };
        KeySql { pk: ident(&spec.primary_key), kind }
    }

    /// The key column as ranges and ORDER BY compare it.
    pub fn ordered(&self) -> String {
        match self.kind {
            KeyKind::Text => format!("{} COLLATE \"C\"", self.pk),
            KeyKind::Int | KeyKind::Uuid => self.pk.clone(),
        }
    }

    /// The key column, selected so that `get` reads it.
    pub fn select(&self) -> String {
        match self.kind {
            KeyKind::Int => format!("{}::int8", self.pk),
            KeyKind::Text | KeyKind::Uuid => format!("{}::text", self.pk),
        }
    }

    pub fn get(&self, row: &tokio_postgres::Row, idx: usize) -> Key {
        match self.kind {
            KeyKind::Int => Key::Int(row.get(idx)),
            KeyKind::Text | KeyKind::Uuid => Key::Str(row.get(idx)),
        }
    }

    /// `pk = ANY($n)` with the keys bound by `param`.
    pub fn any(&self, n: usize) -> String {
        match self.kind {
            KeyKind::Int => format!("{} = ANY(${n}::int8[])", self.pk),
            KeyKind::Text => format!("{} = ANY(${n}::text[])", self.pk),
            KeyKind::Uuid => format!("{} = ANY(${n}::text[]::uuid[])", self.pk),
        }
    }

    /// The keys as the parameter `any` expects.
    pub fn param(&self, keys: &[Key]) -> Box<dyn tokio_postgres::types::ToSql + Sync + Send> {
        if self.kind != KeyKind::Int {
            Box::new(keys.iter().map(|k| k.to_string_lossless()).collect::<Vec<String>>())
        } else {
            Box::new(keys.iter().filter_map(|k| if let Key::Int(v) = k { Some(*v) } else { None }).collect::<Vec<i64>>())
        }
    }

    /// A chunk's range as a condition (TRUE for every key).
    pub fn range(&self, chunk: &ChunkRange) -> String {
        // A uuid column cannot be compared with a bound that is no UUID (a
        // text-keyed source's, whose odd rows go to rejects); its canonical
        // text orders as the uuid does, so compare that instead.
        let odd_bound = |t: &crate::model::plan::TextRange| {
            [&t.after, &t.upto].into_iter().flatten().any(|b| crate::contract::columns::parse_uuid(b).is_none())
        };
        let column = match (&chunk.text, self.kind) {
            (Some(t), KeyKind::Uuid) if odd_bound(t) => format!("{}::text COLLATE \"C\"", self.pk),
            _ => self.ordered(),
        };
        chunk.condition(&column, &key_literal).unwrap_or_else(|| "TRUE".into())
    }
}

/// A key as an SQL literal.
pub fn key_literal(k: &Key) -> String {
    k.sql_literal(&literal)
}

/// A subset filter as a SQL condition (`qualifier.` before each column when given).
pub fn filter_sql(f: &crate::model::filter::Filter, qualifier: Option<&str>) -> String {
    f.sql_literals(qualifier, &ident, &literal)
}

/// `schema.table` or `table` (in the connection's current schema).
#[derive(Clone, Debug)]
pub struct TableName {
    pub schema: Option<String>,
    pub name: String,
}

impl TableName {
    pub fn parse(s: &str) -> Self {
        match s.split_once('.') {
            Some((a, b)) => TableName { schema: Some(a.into()), name: b.into() },
            None => TableName { schema: None, name: s.into() },
        }
    }
    pub fn sql(&self) -> String {
        match &self.schema {
            Some(s) => format!("{}.{}", ident(s), ident(&self.name)),
            None => ident(&self.name),
        }
    }
    /// schema.name as the user wrote it (for messages and reports).
    pub fn plain(&self) -> String {
        match &self.schema {
            Some(s) => format!("{s}.{}", self.name),
            None => self.name.clone(),
        }
    }
}

pub async fn connect(url: &PgUrl) -> Result<Client> {
    connect_as(url, None).await
}

/// The most useful one-line text of a driver error (the server's message if any).
pub fn pg_error_text(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db.message().to_string();
    }
    crate::contract::error_chain(e)
}

trait PgContext<T> {
    fn pg(self, what: &str) -> Result<T>;
}

impl<T> PgContext<T> for std::result::Result<T, tokio_postgres::Error> {
    fn pg(self, what: &str) -> Result<T> {
        self.map_err(|e| anyhow!("{what}: {}", pg_error_text(&e)))
    }
}

/// A few connections kept open and reused by the worker threads.
struct Pool {
    url: PgUrl,
    idle: Mutex<Vec<Client>>,
    /// application_name of new sessions (a sink's sessions carry the job).
    name: Mutex<Option<String>>,
}

impl Pool {
    fn new(url: &PgUrl, first: Client) -> Pool {
        Pool { url: url.clone(), idle: Mutex::new(vec![first]), name: Mutex::new(None) }
    }
    async fn get(&self) -> Result<Client> {
        let idle = self.idle.lock().unwrap().pop();
        match idle {
            Some(c) if !c.is_closed() => Ok(c),
            _ => {
                let name = self.name.lock().unwrap().clone();
                connect_as(&self.url, name.as_deref()).await
            }
        }
    }
    fn put(&self, c: Client) {
        self.idle.lock().unwrap().push(c);
    }
}

/// What the catalog says about a table.
pub struct Discovered {
    pub spec: TableSpec,
    /// Per column: the vector dimension is declared (typmod) and so enforced.
    pub fixed_dims: Vec<bool>,
    /// Indexes we could not translate (kept for the report).
    pub skipped_indexes: Vec<String>,
}

pub async fn discover(client: &Client, table: &TableName, url: &PgUrl) -> Result<Option<Discovered>> {
    let qualified = match &table.schema {
        Some(s) => format!("{}.{}", ident(s), ident(&table.name)),
        None => ident(&table.name),
    };
    let oid: Option<u32> = client
        .query_one("SELECT to_regclass($1)::oid", &[&qualified])
        .await
        .pg("catalog lookup")?
        .get(0);
    let Some(oid) = oid else { return Ok(None) };
    let rows = client
        .query(
            "SELECT a.attname::text, t.typname::text, a.atttypmod, a.attnotnull, \
                    coalesce(pg_get_expr(d.adbin, d.adrelid), ''), a.attidentity::text \
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
             LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .pg("reading columns")?;
    let mut columns = Vec::new();
    let mut fixed_dims = Vec::new();
    for r in &rows {
        let name: String = r.get(0);
        let typ: String = r.get(1);
        let typmod: i32 = r.get(2);
        let not_null: bool = r.get(3);
        let default: String = r.get(4);
        let identity: String = r.get(5);
        let mut fixed = true;
        let ty = match typ.as_str() {
            "int2" => ColumnType::Int16,
            "int4" => ColumnType::Int32,
            "int8" => ColumnType::Int64,
            "float4" => ColumnType::Float32,
            "float8" => ColumnType::Float64,
            "bool" => ColumnType::Bool,
            "text" => ColumnType::Text { max_chars: None },
            "uuid" => ColumnType::Uuid,
            "varchar" | "bpchar" => ColumnType::Text { max_chars: (typmod > 4).then(|| (typmod - 4) as u32) },
            "json" => ColumnType::Json { binary: false },
            "jsonb" => ColumnType::Json { binary: true },
            "timestamp" => ColumnType::Timestamp { utc: false },
            "timestamptz" => ColumnType::Timestamp { utc: true },
            "vector" | "halfvec" => {
                let dim = if typmod > 0 {
                    typmod as u32
                } else {
                    fixed = false;
                    infer_dim(client, &qualified, &name).await?
                };
                if typ == "vector" { ColumnType::Vector { dim } } else { ColumnType::HalfVec { dim } }
            }
            other => bail!(
                "table {} column {name}: type {other} is not supported (supported: integers, floats, bool, text, \
                 varchar, json, jsonb, timestamp, timestamptz, vector, halfvec)",
                table.name
            ),
        };
        columns.push(ColumnSpec {
            name,
            ty,
            nullable: !not_null,
            auto_increment: default.starts_with("nextval(") || identity == "a" || identity == "d",
            default_now: matches!(default.to_lowercase().as_str(), "current_timestamp" | "now()"),
        });
        fixed_dims.push(fixed);
    }
    let pk_rows = client
        .query(
            "SELECT a.attname::text FROM pg_index i JOIN pg_attribute a \
               ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = $1 AND i.indisprimary",
            &[&oid],
        )
        .await
        .pg("reading primary key")?;
    if pk_rows.len() != 1 {
        bail!(
            "table {} in {} must have a single-column primary key (found {} columns)",
            table.name,
            url.redacted(),
            pk_rows.len()
        );
    }
    let pk_name: String = pk_rows[0].get(0);
    let pk_type = rows.iter().find(|r| r.get::<_, String>(0) == pk_name).map(|r| r.get::<_, String>(1)).unwrap_or_default();
    // char(n) pads its values: COPY sends 'ab   ', a key read as text is 'ab',
    // and one key would have two spellings across chunks.
    if pk_type == "bpchar" {
        bail!("table {}: primary key {pk_name} is char(n), whose padding vmig cannot key chunks by; use varchar or text", table.name);
    }
    if pk_type == "text" || pk_type == "varchar" {
        let collation: String = client
            .query_one(
                "SELECT coalesce(c.collname::text, '') FROM pg_attribute a LEFT JOIN pg_collation c ON c.oid = a.attcollation \
                 WHERE a.attrelid = $1 AND a.attname = $2",
                &[&oid, &pk_name],
            )
            .await
            .pg("reading the key's collation")?
            .get(0);
        let default: String = client.query_one("SELECT coalesce(datcollate, '') FROM pg_database WHERE datname = current_database()", &[]).await.pg("reading the database's collation")?.get(0);
        let effective = if collation == "default" { default } else { collation };
        if !matches!(effective.as_str(), "C" | "POSIX" | "ucs_basic" | "C.UTF-8" | "C.utf8" | "pg_c_utf8") {
            say!(
                "note: table {} orders its key {pk_name} by collation {effective}; vmig reads string keys in byte order \
                 (COLLATE \"C\"), which the primary key's index cannot serve, so each chunk read scans the table. \
                 An index on ({pk_name} COLLATE \"C\") lets chunk reads use it",
                table.name
            );
        }
    }
    let idx_rows = client
        .query(
            "SELECT c.relname::text, pg_get_indexdef(i.indexrelid), i.indisunique FROM pg_index i \
             JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = $1 AND NOT i.indisprimary ORDER BY c.relname",
            &[&oid],
        )
        .await
        .pg("reading indexes")?;
    let mut indexes = Vec::new();
    let mut skipped_indexes = Vec::new();
    for r in &idx_rows {
        let name: String = r.get(0);
        let def: String = r.get(1);
        match parse_index_def(&name, &def, r.get(2)) {
            Some(ix) => indexes.push(ix),
            None => skipped_indexes.push(def),
        }
    }
    let spec = TableSpec { name: table.name.clone(), columns, primary_key: pk_rows[0].get(0), indexes, computed: Vec::new(), partition_key: None };
    spec.validate()?;
    Ok(Some(Discovered { spec, fixed_dims, skipped_indexes }))
}

async fn infer_dim(client: &Client, table: &str, col: &str) -> Result<u32> {
    let row = client
        .query_opt(&format!("SELECT vector_dims({}) FROM {table} WHERE {} IS NOT NULL LIMIT 1", ident(col), ident(col)), &[])
        .await
        .pg("inferring vector dimension")?;
    match row {
        Some(r) => Ok(r.get::<_, i32>(0) as u32),
        None => bail!("column {col} declares no dimension and holds no vectors; cannot tell its dimension"),
    }
}

/// Parses `CREATE [UNIQUE] INDEX name ON tbl USING method (cols) [WITH (...)]`.
pub fn parse_index_def(name: &str, def: &str, unique: bool) -> Option<IndexSpec> {
    let after_using = def.split(" USING ").nth(1)?;
    let (method, rest) = after_using.split_once(' ')?;
    let open = rest.find('(')?;
    let close = rest.find(')')?;
    let cols_text = &rest[open + 1..close];
    if cols_text.contains('(') {
        return None; // expression index
    }
    // A partial index carried whole would differ, and a partial UNIQUE one
    // would refuse rows the source holds.
    if rest[close + 1..].contains(" WHERE ") {
        return None;
    }
    let mut columns = Vec::new();
    let mut opclass = None;
    for part in cols_text.split(',') {
        let mut words = part.split_whitespace();
        columns.push(words.next()?.trim_matches('"').to_string());
        opclass = words.next().map(str::to_string).or(opclass);
    }
    let with = rest[close + 1..].split("WITH (").nth(1).unwrap_or("");
    let param = |key: &str| -> Option<u32> {
        with.split([',', ')'])
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| k.trim() == key)
            .and_then(|(_, v)| v.trim().trim_matches('\'').parse().ok())
    };
    let kind = match method {
        "btree" => IndexKind::Btree { unique },
        "hnsw" => {
            let op = opclass.unwrap_or_default();
            let metric = if op.ends_with("_ip_ops") {
                Metric::InnerProduct
            } else if op.ends_with("_cosine_ops") {
                Metric::Cosine
            } else if op.ends_with("_l2_ops") {
                Metric::L2
            } else {
                return None;
            };
            IndexKind::Hnsw { metric, m: param("m").unwrap_or(16), ef_construction: param("ef_construction").unwrap_or(64), quantization: None }
        }
        _ => return None,
    };
    Some(IndexSpec { name: name.to_string(), columns, kind })
}

fn column_sql_type(c: &ColumnSpec) -> String {
    match &c.ty {
        ColumnType::Int16 => "SMALLINT".into(),
        ColumnType::Int32 if c.auto_increment => "SERIAL".into(),
        ColumnType::Int32 => "INTEGER".into(),
        ColumnType::Int64 if c.auto_increment => "BIGSERIAL".into(),
        ColumnType::Int64 => "BIGINT".into(),
        ColumnType::Float32 => "REAL".into(),
        ColumnType::Float64 => "DOUBLE PRECISION".into(),
        ColumnType::Bool => "BOOLEAN".into(),
        ColumnType::Text { max_chars: Some(n) } => format!("VARCHAR({n})"),
        ColumnType::Text { max_chars: None } => "TEXT".into(),
        ColumnType::Uuid => "UUID".into(),
        ColumnType::Json { binary: true } => "JSONB".into(),
        ColumnType::Json { binary: false } => "JSON".into(),
        ColumnType::Timestamp { utc: false } => "TIMESTAMP".into(),
        ColumnType::Timestamp { utc: true } => "TIMESTAMPTZ".into(),
        ColumnType::Vector { dim } => format!("VECTOR({dim})"),
        ColumnType::HalfVec { dim } => format!("HALFVEC({dim})"),
    }
}

pub fn create_table_sql(table: &TableName, spec: &TableSpec) -> String {
    let cols: Vec<String> = spec
        .columns
        .iter()
        .map(|c| {
            let mut s = format!("{} {}", ident(&c.name), column_sql_type(c));
            if c.name == spec.primary_key {
                // String keys in byte order, as chunk ranges compare them,
                // so that the primary key's index serves those ranges.
                if matches!(c.ty, ColumnType::Text { .. }) {
                    s.push_str(" COLLATE \"C\"");
                }
                s.push_str(" PRIMARY KEY");
            } else if !c.nullable {
                s.push_str(" NOT NULL");
            }
            if c.default_now {
                s.push_str(" DEFAULT CURRENT_TIMESTAMP");
            }
            s
        })
        .collect();
    format!("CREATE TABLE {} ({})", table.sql(), cols.join(", "))
}

/// The widest a column can be inline in a heap row: a text or JSON value
/// can always be moved out to its 18-byte TOAST pointer, a vector cannot
/// once it is PLAIN (varlena header and dims: 8 bytes, then the elements).
fn inline_width(ty: &ColumnType) -> u64 {
    match ty {
        ColumnType::Vector { dim } => 8 + 4 * *dim as u64,
        ColumnType::HalfVec { dim } => 8 + 2 * *dim as u64,
        ColumnType::Int16 => 2,
        ColumnType::Int32 | ColumnType::Float32 => 4,
        ColumnType::Int64 | ColumnType::Float64 | ColumnType::Timestamp { .. } => 8,
        ColumnType::Bool => 1,
        ColumnType::Uuid => 16,
        ColumnType::Text { .. } | ColumnType::Json { .. } => 18,
    }
}

/// MaxHeapTupleSize: the page less its header and one line pointer.
pub fn max_tuple_bytes(block_size: u64) -> u64 {
    block_size - 32
}

/// The storage a new table's vector columns load fastest with, and why.
/// A 1536-d vector (6 kB) is over PostgreSQL's 2 kB TOAST threshold, so by
/// default each one goes through a compression attempt random floats never
/// pass, then out to the TOAST table. PLAIN keeps it inline (no attempt, no
/// TOAST, also read without detoasting) when the widest row still fits a
/// heap tuple; otherwise EXTERNAL skips the attempt.
pub fn choose_vector_storage(spec: &TableSpec, block_size: u64) -> (VectorStorage, String) {
    // Tuple header and null bitmap, then each column 8-byte aligned at its widest.
    let widest = 24 + (spec.columns.len() as u64).div_ceil(8) + spec.columns.iter().map(|c| inline_width(&c.ty).next_multiple_of(8)).sum::<u64>();
    let fits = max_tuple_bytes(block_size);
    if widest <= fits {
        (VectorStorage::Plain, format!("inline: a row takes at most {widest} bytes of the {fits} a {} kB page holds, so no compression attempt and no TOAST; toast_tuple_target {fits} keeps its short text inline too", block_size / 1024))
    } else {
        (
            VectorStorage::External,
            format!("out of line without a compression attempt: a row with its vectors inline would take up to {widest} bytes, more than the {fits} a {} kB page holds", block_size / 1024),
        )
    }
}

pub fn create_index_sql(table: &TableName, spec: &TableSpec, ix: &IndexSpec) -> String {
    let cols: Vec<String> = ix.columns.iter().map(|c| ident(c)).collect();
    match &ix.kind {
        IndexKind::Btree { unique } => format!(
            "CREATE {}INDEX {} ON {} USING btree ({})",
            if *unique { "UNIQUE " } else { "" },
            ident(&ix.name),
            table.sql(),
            cols.join(", ")
        ),
        IndexKind::Hnsw { metric, m, ef_construction, .. } => {
            let half = matches!(spec.column(&ix.columns[0]).map(|c| &c.ty), Some(ColumnType::HalfVec { .. }));
            let op = match metric {
                Metric::InnerProduct => "ip",
                Metric::Cosine => "cosine",
                Metric::L2 => "l2",
            };
            format!(
                "CREATE INDEX {} ON {} USING hnsw ({} {}_{op}_ops) WITH (m = {m}, ef_construction = {ef_construction})",
                ident(&ix.name),
                table.sql(),
                cols[0],
                if half { "halfvec" } else { "vector" }
            )
        }
    }
}

fn column_list(spec: &TableSpec) -> String {
    spec.columns.iter().map(|c| ident(&c.name)).collect::<Vec<_>>().join(", ")
}
