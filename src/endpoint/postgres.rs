//! PostgreSQL + pgvector endpoint. Reads by binary COPY OUT of each chunk's key
//! range (inside one exported snapshot per run); writes by binary COPY IN, the
//! chunk's rows and its ledger row in one transaction.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use arrow::record_batch::RecordBatch;
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::runtime::Handle;
use tokio_postgres::{Client, CopyInSink, NoTls};

use super::pgcopy::{CopyDecoder, copy_header, copy_trailer, encode_rows};
use super::{
    ChunkWriter, Feedback, Holder, OnExisting, RowReject, Sink, SinkOptions, Source, check_final_count, existing_rows_action,
    job_locked,
};
use crate::config::PgUrl;
use crate::ledger::{CommitRecord, Ledger, now_rfc3339};
use crate::plan::{ChunkRange, ranges_from_bounds};
use crate::schema::{ColumnSpec, ColumnType, IndexKind, IndexSpec, Metric, TableSpec};

pub const LEDGER_TABLE: &str = "vmig_ledger";

/// Quotes an identifier for SQL.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
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
}

pub async fn connect(url: &PgUrl) -> Result<Client> {
    connect_as(url, None).await
}

/// Connects with `application_name` set, so the server (and a later run)
/// can tell which job a session belongs to.
pub async fn connect_as(url: &PgUrl, application_name: Option<&str>) -> Result<Client> {
    let mut config: tokio_postgres::Config =
        url.connection_string().parse().map_err(|e| anyhow!("invalid PostgreSQL URL {}: {e}", url.redacted()))?;
    if let Some(name) = application_name {
        config.application_name(name);
    }
    let (client, conn) = config
        .connect(NoTls)
        .await
        .map_err(|e| anyhow!("cannot connect to {}: {}", url.redacted(), pg_error_text(&e)))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// The most useful one-line text of a driver error (the server's message if any).
pub fn pg_error_text(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db.message().to_string();
    }
    super::error_chain(e)
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
    let spec = TableSpec { name: table.name.clone(), columns, primary_key: pk_rows[0].get(0), indexes };
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

// ---------------------------------------------------------------- source

pub struct PgSource {
    url: PgUrl,
    table: TableName,
    handle: Handle,
    discovered: Discovered,
    pool: Pool,
    /// A transaction held open for the whole run whose snapshot every chunk
    /// reader imports, so all chunks see the same consistent state.
    snapshot: Mutex<Option<(Client, String)>>,
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
        Ok(PgSource { url, table, handle, discovered, pool, snapshot: Mutex::new(None) })
    }

    pub fn skipped_indexes(&self) -> &[String] {
        &self.discovered.skipped_indexes
    }

    async fn snapshot_id(&self) -> Result<String> {
        {
            let mut g = self.snapshot.lock().unwrap();
            match g.as_ref() {
                Some((c, id)) if !c.is_closed() => return Ok(id.clone()),
                // The source restarted: later chunks read a new snapshot.
                Some(_) => {
                    eprintln!(
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
    fn describe(&self) -> String {
        format!("{} table {}", self.url.redacted(), self.table.name)
    }

    fn spec(&self) -> &TableSpec {
        &self.discovered.spec
    }

    fn plan(&self, chunk_rows: u64) -> Result<Vec<ChunkRange>> {
        let pk = ident(&self.spec().primary_key);
        let t = self.table.sql();
        self.handle.block_on(async {
            let c = self.pool.get().await?;
            self.begin_in_snapshot(&c).await?;
            let total: i64 = c.query_one(&format!("SELECT count(*) FROM {t}"), &[]).await.pg("counting rows")?.get(0);
            let bounds: Vec<i64> = c
                .query(
                    &format!(
                        "SELECT k FROM (SELECT {pk}::int8 AS k, row_number() OVER (ORDER BY {pk}) AS rn FROM {t}) s \
                         WHERE rn % $1 = 0 ORDER BY k"
                    ),
                    &[&(chunk_rows as i64)],
                )
                .await
                .pg("planning chunks")?
                .iter()
                .map(|r| r.get(0))
                .collect();
            c.batch_execute("COMMIT").await.pg("planning")?;
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
        let sql = format!(
            "COPY (SELECT {} FROM {} WHERE {pk} BETWEEN {} AND {} ORDER BY {pk}) TO STDOUT (FORMAT binary)",
            column_list(spec),
            self.table.sql(),
            chunk.lo,
            chunk.hi
        );
        let mut decoder = CopyDecoder::new(
            spec.arrow_schema(),
            spec.columns.iter().map(|c| c.ty.clone()).collect(),
            self.discovered.fixed_dims.clone(),
        );
        self.handle.block_on(async {
            let c = self.pool.get().await?;
            self.begin_in_snapshot(&c).await?;
            let stream = c.copy_out(&sql).await.pg(&format!("reading chunk {}", chunk.id))?;
            let mut stream = std::pin::pin!(stream);
            while let Some(data) = stream.next().await {
                let data = data.pg(&format!("reading chunk {}", chunk.id))?;
                decoder
                    .feed(&data, batch_rows, out)
                    .with_context(|| format!("decoding chunk {}", chunk.id))?;
            }
            if decoder.rows() > 0 {
                out(decoder.take_batch()?)?;
            }
            c.batch_execute("COMMIT").await.pg("ending read")?;
            self.pool.put(c);
            Ok(())
        })
    }
}

// ---------------------------------------------------------------- sink

pub struct PgSink {
    url: PgUrl,
    table: TableName,
    handle: Handle,
    pool: Arc<Pool>,
    target: Mutex<Option<TableSpec>>,
    upsert: Mutex<bool>,
    ledger: Mutex<bool>,
}

impl PgSink {
    pub fn open(url: PgUrl, table: &str, handle: Handle) -> Result<Self> {
        let client = handle.block_on(connect(&url))?;
        let pool = Arc::new(Pool::new(&url, client));
        Ok(PgSink {
            url,
            table: TableName::parse(table),
            handle,
            pool,
            target: Mutex::new(None),
            upsert: Mutex::new(false),
            ledger: Mutex::new(true),
        })
    }

    fn target_spec(&self) -> TableSpec {
        self.target.lock().unwrap().clone().expect("prepare() before writing")
    }

    async fn create_indexes(&self, c: &Client, spec: &TableSpec, fb: &dyn Feedback) -> Result<()> {
        let existing: Vec<(String, bool)> = c
            .query(
                "SELECT c.relname::text, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
                 WHERE i.indrelid = to_regclass($1)",
                &[&self.table.sql()],
            )
            .await
            .pg("listing target indexes")?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        c.batch_execute("SET maintenance_work_mem = '1GB'").await.pg("setting maintenance_work_mem")?;
        for ix in &spec.indexes {
            // Indexes this table already has are kept. No IF NOT EXISTS: a name
            // taken by another table's index must fail, not silently skip the index.
            match existing.iter().find(|(n, _)| n == &ix.name) {
                Some((_, true)) => continue,
                Some((_, false)) => {
                    // Left INVALID by a build that did not finish: unusable, so rebuilt.
                    fb.say(&format!("index {} is INVALID (a build that did not finish); dropping and rebuilding it", ix.name));
                    let drop = format!("DROP INDEX IF EXISTS {}", self.index_sql_name(&ix.name));
                    c.batch_execute(&drop).await.pg(&format!("dropping invalid index {}", ix.name))?;
                }
                None => {}
            }
            let sql = create_index_sql(&self.table, spec, ix);
            let started = std::time::Instant::now();
            let build = c.batch_execute(&sql);
            tokio::pin!(build);
            // Send the statement before announcing the phase: from here on the
            // build runs in the server even if this process dies.
            let first = std::future::poll_fn(|cx| std::task::Poll::Ready(build.as_mut().poll(cx))).await;
            let res = match first {
                std::task::Poll::Ready(r) => r,
                std::task::Poll::Pending => {
                    fb.phase(&format!("building index {}", ix.name));
                    let watcher = self.watch_index_build(ix.name.clone(), fb);
                    tokio::pin!(watcher);
                    tokio::select! {
                        r = &mut build => r,
                        _ = &mut watcher => unreachable!(),
                    }
                }
            };
            res.pg(&format!("building index {}", ix.name))?;
            fb.say(&format!("index {} built in {:.1}s", ix.name, started.elapsed().as_secs_f64()));
        }
        Ok(())
    }

    /// FastGPT runs `CREATE EXTENSION IF NOT EXISTS vector` at start; so do we.
    /// When that is not possible, the error says why: not installed on the
    /// server, or not permitted to this role.
    async fn create_pgvector(&self, c: &Client) -> Result<()> {
        let db = self.url.redacted();
        match c.batch_execute("CREATE EXTENSION IF NOT EXISTS vector").await {
            Ok(()) => {
                eprintln!("created extension vector (pgvector) in {db}: the target database did not have it");
                Ok(())
            }
            Err(e) => {
                let available: bool = c
                    .query_one("SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vector')", &[])
                    .await
                    .pg("checking pgvector")?
                    .get(0);
                if !available {
                    bail!(
                        "target database {db} has no pgvector extension, and the server does not have pgvector installed \
                         (pg_available_extensions has no 'vector'); install pgvector on the server, then run again"
                    );
                }
                bail!(
                    "target database {db} has no pgvector extension, and role {} may not create it ({}); \
                     ask a superuser to run `CREATE EXTENSION vector` in that database",
                    self.url.user,
                    pg_error_text(&e)
                )
            }
        }
    }

    fn index_sql_name(&self, name: &str) -> String {
        match &self.table.schema {
            Some(s) => format!("{}.{}", ident(s), ident(name)),
            None => ident(name),
        }
    }

    /// Reports CREATE INDEX progress from pg_stat_progress_create_index until dropped.
    async fn watch_index_build(&self, name: String, fb: &dyn Feedback) {
        let Ok(c) = connect(&self.url).await else { return std::future::pending().await };
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if let Ok(Some(r)) = c
                .query_opt(
                    "SELECT phase, tuples_done, tuples_total, blocks_done, blocks_total FROM pg_stat_progress_create_index \
                     WHERE relid = to_regclass($1)",
                    &[&self.table.sql()],
                )
                .await
            {
                let phase: String = r.get(0);
                let (td, tt, bd, bt): (i64, i64, i64, i64) = (r.get(1), r.get(2), r.get(3), r.get(4));
                let pct = if tt > 0 { 100.0 * td as f64 / tt as f64 } else if bt > 0 { 100.0 * bd as f64 / bt as f64 } else { 0.0 };
                fb.phase(&format!("building index {name} ({phase}, {pct:.0}%)"));
            }
        }
    }

    /// Ends the sessions a killed earlier run of `job` left in this database
    /// (an index build goes on in the server until it next writes to its dead
    /// client). Called with the job's lock held, so none of them is alive.
    async fn end_leftover_sessions(&self, c: &Client, job: &str, mine: &str, fb: &dyn Feedback) -> Result<()> {
        let prefix = format!("vmig {job} ");
        let rows = c
            .query(
                "SELECT pid, coalesce(state, ''), left(coalesce(query, ''), 80) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid() \
                   AND starts_with(application_name, $1) AND application_name <> $2",
                &[&prefix, &mine],
            )
            .await
            .pg("looking for sessions of an earlier run")?;
        if rows.is_empty() {
            return Ok(());
        }
        let pids: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
        for r in &rows {
            let (pid, state, query): (i32, String, String) = (r.get(0), r.get(1), r.get(2));
            fb.say(&format!(
                "a killed earlier run of job {job} left session {pid} ({state}: {}); ending it",
                query.split_whitespace().collect::<Vec<_>>().join(" ")
            ));
        }
        c.execute("SELECT pg_terminate_backend(pid) FROM unnest($1::int4[]) AS pid", &[&pids]).await.pg("ending sessions of an earlier run")?;
        let started = std::time::Instant::now();
        loop {
            let left: i64 = c
                .query_one("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)", &[&pids])
                .await
                .pg("waiting for sessions to end")?
                .get(0);
            if left == 0 {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("sessions {pids:?} of an earlier run of job {job} did not end within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// application_name of a job's sessions: `vmig <job> <pid>@<host>`
/// (PostgreSQL keeps 63 bytes).
fn session_name(job: &str) -> String {
    let me = Holder::me();
    let mut name = format!("vmig {job} {}@{}", me.pid, me.host);
    while name.len() > 63 {
        name.pop();
    }
    name
}

/// The advisory-lock key of a job (positive, so pg_locks shows it plainly).
fn lock_key(job: &str) -> i64 {
    (xxhash_rust::xxh3::xxh3_64(format!("vmig job {job}").as_bytes()) >> 1) as i64
}

/// A job's advisory lock: released when its session ends (also when the
/// process dies: the server sees the connection close). A keeper task takes
/// it again if a server restart ends the session mid-run.
struct PgJobLock {
    keeper: tokio::task::JoinHandle<()>,
}

impl PgJobLock {
    fn keep(client: Client, url: PgUrl, name: String, key: i64, handle: &Handle) -> PgJobLock {
        let keeper = handle.spawn(async move {
            let mut client = client;
            loop {
                while !client.is_closed() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                // The server went away with the lock; take it again once it is back.
                client = loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let Ok(c) = connect_as(&url, Some(&name)).await else { continue };
                    match c.query_one("SELECT pg_try_advisory_lock($1)", &[&key]).await {
                        Ok(r) if r.get::<_, bool>(0) => break c,
                        Ok(_) => {
                            eprintln!("warning: after a server restart, another run took this job's lock; stop one of them");
                            return;
                        }
                        Err(_) => continue,
                    }
                };
            }
        });
        PgJobLock { keeper }
    }
}

impl Drop for PgJobLock {
    fn drop(&mut self) {
        // Dropping the task's client ends the session, which frees the lock.
        self.keeper.abort();
    }
}

impl Sink for PgSink {
    fn describe(&self) -> String {
        format!("{} table {}", self.url.redacted(), self.table.name)
    }

    fn drop_table(&self) -> Result<()> {
        let sql = format!("DROP TABLE IF EXISTS {}", self.table.sql());
        self.handle.block_on(async {
            let c = self.pool.get().await?;
            c.batch_execute(&sql).await.pg("dropping table")?;
            self.pool.put(c);
            Ok(())
        })
    }

    fn forget_job(&self, job: &str) -> Result<u64> {
        self.handle.block_on(async {
            let c = self.pool.get().await?;
            let mut n = 0;
            if c.query_one("SELECT to_regclass($1) IS NOT NULL", &[&LEDGER_TABLE]).await.pg("reading ledger")?.get::<_, bool>(0) {
                n = c.execute(&format!("DELETE FROM {LEDGER_TABLE} WHERE job = $1"), &[&job]).await.pg("deleting ledger rows")?;
            }
            self.pool.put(c);
            Ok(n)
        })
    }

    fn lock_job(&self, job: &str, fb: &dyn Feedback) -> Result<Box<dyn std::any::Any + Send>> {
        let name = session_name(job);
        *self.pool.name.lock().unwrap() = Some(name.clone());
        self.pool.idle.lock().unwrap().clear();
        let key = lock_key(job);
        self.handle.block_on(async {
            let c = connect_as(&self.url, Some(&name)).await?;
            let got: bool = c.query_one("SELECT pg_try_advisory_lock($1)", &[&key]).await.pg("taking the job's lock")?.get(0);
            if !got {
                let holder = c
                    .query_opt(
                        "SELECT a.application_name, a.backend_start::text FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
                           AND (l.classid::int8 << 32) | l.objid::int8 = $1 LIMIT 1",
                        &[&key],
                    )
                    .await
                    .pg("finding the job's lock holder")?
                    .map(|r| {
                        let app: String = r.get(0);
                        let since: String = r.get(1);
                        let who = app.strip_prefix(&format!("vmig {job} ")).unwrap_or(&app).to_string();
                        match who.split_once('@') {
                            Some((pid, host)) => format!("host {host}, pid {pid}, since {since}"),
                            None => format!("session {app}, since {since}"),
                        }
                    });
                return Err(job_locked(job, &self.describe(), holder));
            }
            self.end_leftover_sessions(&c, job, &name, fb).await?;
            Ok(Box::new(PgJobLock::keep(c, self.url.clone(), name.clone(), key, &self.handle)) as Box<dyn std::any::Any + Send>)
        })
    }

    fn prepare(&self, source: &TableSpec, _plan: &[ChunkRange], opts: &SinkOptions) -> Result<TableSpec> {
        *self.upsert.lock().unwrap() = opts.on_existing == OnExisting::Upsert;
        *self.ledger.lock().unwrap() = !opts.job.is_empty();
        let spec = self.handle.block_on(async {
            let c = self.pool.get().await?;
            let has_vector: bool = c
                .query_one("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'vector')", &[])
                .await
                .pg("checking pgvector")?
                .get(0);
            if !has_vector {
                self.create_pgvector(&c).await?;
            }
            let spec = match discover(&c, &self.table, &self.url).await? {
                Some(d) => {
                    d.spec.same_columns_as(source)?;
                    d.spec
                }
                None => {
                    let mut spec = source.clone();
                    spec.name = self.table.name.clone();
                    c.batch_execute(&create_table_sql(&self.table, &spec)).await.pg("creating target table")?;
                    spec.indexes = source.indexes.clone();
                    spec
                }
            };
            if !opts.job.is_empty() {
                c.batch_execute(&format!(
                    "CREATE TABLE IF NOT EXISTS {LEDGER_TABLE} (job TEXT NOT NULL, chunk INT NOT NULL, lo BIGINT NOT NULL, \
                     hi BIGINT NOT NULL, rows BIGINT NOT NULL, rejected BIGINT NOT NULL, content_hash TEXT NOT NULL, \
                     bytes BIGINT NOT NULL, committed_at TIMESTAMPTZ NOT NULL DEFAULT now(), PRIMARY KEY (job, chunk))"
                ))
                .await
                .pg("creating ledger table")?;
                let ledger_rows: i64 = c
                    .query_one(&format!("SELECT count(*) FROM {LEDGER_TABLE} WHERE job = $1"), &[&opts.job])
                    .await
                    .pg("reading ledger")?
                    .get(0);
                let non_empty: bool = c
                    .query_one(&format!("SELECT EXISTS (SELECT 1 FROM {})", self.table.sql()), &[])
                    .await
                    .pg("checking target")?
                    .get(0);
                let target = format!("table {} in {}", self.table.name, self.url.redacted());
                if existing_rows_action(non_empty, ledger_rows > 0, opts, &target)? {
                    c.batch_execute(&format!("TRUNCATE {}", self.table.sql())).await.pg("truncating target")?
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
            let c = self.pool.get().await?;
            let exists: bool = c
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&LEDGER_TABLE])
                .await
                .pg("reading ledger")?
                .get(0);
            let mut ledger = Ledger::new();
            if exists {
                for r in c
                    .query(
                        &format!(
                            "SELECT chunk, lo, hi, rows, rejected, content_hash, bytes, committed_at::text \
                             FROM {LEDGER_TABLE} WHERE job = $1"
                        ),
                        &[&job],
                    )
                    .await
                    .pg("reading ledger")?
                {
                    let chunk = r.get::<_, i32>(0) as u32;
                    ledger.insert(
                        chunk,
                        CommitRecord {
                            chunk,
                            lo: r.get(1),
                            hi: r.get(2),
                            rows: r.get::<_, i64>(3) as u64,
                            rejected: r.get::<_, i64>(4) as u64,
                            content_hash: r.get(5),
                            bytes: r.get::<_, i64>(6) as u64,
                            sha256: None,
                            committed_at: r.get(7),
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
        let t = self.table.sql();
        let cols = column_list(&spec);
        let pk = ident(&spec.primary_key);
        let handle = self.handle.clone();
        let (client, sink) = self.handle.block_on(async {
            let c = self.pool.get().await?;
            c.batch_execute("BEGIN").await.pg("begin")?;
            let copy_target = if upsert {
                c.batch_execute(&format!(
                    "CREATE TEMP TABLE vmig_chunk ON COMMIT DROP AS SELECT {cols} FROM {t} WITH NO DATA"
                ))
                .await
                .pg("creating chunk table")?;
                "vmig_chunk".to_string()
            } else if record_ledger {
                // A retried chunk replaces whatever an earlier attempt left.
                c.batch_execute(&format!("DELETE FROM {t} WHERE {pk} BETWEEN {} AND {}", chunk.lo, chunk.hi))
                    .await
                    .pg(&format!("clearing chunk {}", chunk.id))?;
                t.clone()
            } else {
                t.clone()
            };
            let sink: CopyInSink<Bytes> = c
                .copy_in(&format!("COPY {copy_target} ({cols}) FROM STDIN (FORMAT binary)"))
                .await
                .pg(&format!("writing chunk {}", chunk.id))?;
            let mut sink = Box::pin(sink);
            sink.send(copy_header().freeze()).await.pg("writing")?;
            Ok::<_, anyhow::Error>((c, sink))
        })?;
        Ok(Box::new(PgChunkWriter {
            handle,
            pool: self.pool.clone(),
            job: job.to_string(),
            client: Some(client),
            sink: Some(sink),
            types: spec.columns.iter().map(|c| c.ty.clone()).collect(),
            merge_sql: upsert.then(|| {
                format!(
                    "DELETE FROM {t} USING vmig_chunk s WHERE {t}.{pk} = s.{pk}; INSERT INTO {t} ({cols}) SELECT {cols} FROM vmig_chunk"
                )
            }),
            record_ledger,
            chunk: *chunk,
            bytes: 0,
            buf: BytesMut::new(),
        }))
    }

    fn finish(&self, source: &TableSpec, _plan: &[ChunkRange], opts: &SinkOptions, fb: &dyn Feedback) -> Result<()> {
        let mut spec = self.target_spec();
        // Index names are unique per schema: a renamed table gets renamed indexes.
        spec.indexes = source
            .indexes
            .iter()
            .map(|ix| {
                let mut ix = ix.clone();
                if source.name != self.table.name {
                    let base = ix.name.strip_prefix(&format!("{}_", source.name)).unwrap_or(&ix.name).to_string();
                    ix.name = format!("{}_{base}", self.table.name);
                }
                ix
            })
            .collect();
        let t = self.table.sql();
        self.handle.block_on(async {
            let c = self.pool.get().await?;
            if opts.create_indexes {
                self.create_indexes(&c, &spec, fb).await?;
            }
            // Move the id sequence past max(id) so the application's next insert does not collide.
            let pk = &spec.primary_key;
            let seq: Option<String> = c
                .query_one("SELECT pg_get_serial_sequence($1, $2)", &[&t, pk])
                .await
                .pg("finding id sequence")?
                .get(0);
            if let Some(seq) = seq {
                fb.phase("fixing sequence");
                c.query_one(
                    &format!("SELECT setval($1::text::regclass, GREATEST((SELECT max({}) FROM {t}), 1))", ident(pk)),
                    &[&seq],
                )
                .await
                .pg("setting id sequence")?;
            }
            fb.phase("analyzing");
            c.batch_execute(&format!("ANALYZE {t}")).await.pg("analyze")?;
            if !opts.job.is_empty() {
                let target_rows: i64 =
                    c.query_one(&format!("SELECT count(*) FROM {t}"), &[]).await.pg("counting target")?.get(0);
                let ledger_rows: i64 = c
                    .query_one(
                        &format!("SELECT coalesce(sum(rows), 0)::int8 FROM {LEDGER_TABLE} WHERE job = $1"),
                        &[&opts.job],
                    )
                    .await
                    .pg("reading ledger")?
                    .get(0);
                check_final_count(target_rows as u64, ledger_rows as u64, opts, &format!("table {}", self.table.name), fb)?;
            }
            self.pool.put(c);
            Ok(())
        })
    }
}

struct PgChunkWriter {
    handle: Handle,
    pool: Arc<Pool>,
    job: String,
    client: Option<Client>,
    sink: Option<Pin<Box<CopyInSink<Bytes>>>>,
    types: Vec<ColumnType>,
    merge_sql: Option<String>,
    record_ledger: bool,
    chunk: ChunkRange,
    bytes: u64,
    buf: BytesMut,
}

impl ChunkWriter for PgChunkWriter {
    fn write(&mut self, batch: &RecordBatch) -> Result<Vec<RowReject>> {
        self.buf.clear();
        encode_rows(batch, &self.types, &mut self.buf)?;
        self.bytes += self.buf.len() as u64;
        let data = self.buf.split().freeze();
        let sink = self.sink.as_mut().unwrap();
        let id = self.chunk.id;
        self.handle.block_on(async { sink.send(data).await.pg(&format!("writing chunk {id}")) })?;
        Ok(Vec::new())
    }

    fn commit(mut self: Box<Self>, mut record: CommitRecord) -> Result<CommitRecord> {
        record.bytes = self.bytes;
        record.committed_at = now_rfc3339();
        let mut sink = self.sink.take().unwrap();
        let client = self.client.take().unwrap();
        let id = self.chunk.id;
        let job_and_ledger = self.record_ledger;
        let merge = self.merge_sql.take();
        let rec = record.clone();
        let job = std::mem::take(&mut self.job);
        self.handle.block_on(async {
            sink.send(copy_trailer().freeze()).await.pg(&format!("writing chunk {id}"))?;
            sink.as_mut().finish().await.pg(&format!("writing chunk {id}"))?;
            if let Some(m) = merge {
                client.batch_execute(&m).await.pg(&format!("merging chunk {id}"))?;
            }
            if job_and_ledger {
                client
                    .execute(
                        &format!(
                            "INSERT INTO {LEDGER_TABLE} (job, chunk, lo, hi, rows, rejected, content_hash, bytes) \
                             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                        ),
                        &[
                            &job,
                            &(rec.chunk as i32),
                            &rec.lo,
                            &rec.hi,
                            &(rec.rows as i64),
                            &(rec.rejected as i64),
                            &rec.content_hash,
                            &(rec.bytes as i64),
                        ],
                    )
                    .await
                    .pg(&format!("recording chunk {id}"))?;
            }
            client.batch_execute("COMMIT").await.pg(&format!("committing chunk {id}"))?;
            Ok::<_, anyhow::Error>(())
        })?;
        self.pool.put(client);
        Ok(record)
    }
}
