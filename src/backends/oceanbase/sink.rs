//! OceanBase / seekdb as a target: multi-row INSERTs with binary vector
//! literals, split by bytes; the chunk's rows and its ledger row in one
//! transaction after clearing the chunk's key range; rows the server refuses
//! found by bisection.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Result, anyhow};
use arrow::record_batch::RecordBatch;
use mysql_async::prelude::Queryable;
use mysql_async::Conn;
use tokio::runtime::Handle;

use super::sql::{VectorLiteral, ident};
use super::*;
use super::writer::{ObChunkWriter, unorderable_keys};
use crate::contract::{ChunkWriter, Feedback, OnExisting, RowReject, Sink, SinkOptions, check_final_count, existing_rows_action, final_count_due};
use crate::contract::commit::{CommitRecord, Ledger};
use crate::model::config::ObUrl;
use crate::model::plan::ChunkRange;
use crate::model::schema::{IndexKind, TableSpec};
use crate::state::locks::{Holder, job_locked};

pub struct ObSink {
    url: ObUrl,
    pub(super) table: String,
    handle: Handle,
    pub(super) pool: Arc<Pool>,
    target: Mutex<Option<TableSpec>>,
    upsert: Mutex<bool>,
    ledger: Mutex<bool>,
    pub(super) statement_bytes: Mutex<usize>,
    pub(super) literal: VectorLiteral,
    /// `/* vmig <job> */ `, put before every statement a job's run sends, so
    /// a later run can find what a killed one left running (processlist).
    tag: Mutex<String>,
    /// A subset job's filter (`restrict`).
    subset: std::sync::OnceLock<crate::model::filter::Filter>,
    /// The target held rows outside the subset at prepare: writes refuse their ids.
    foreign_check: Mutex<bool>,
}

/// Where a run names itself while it holds a job's lock.
const RUNS_TABLE: &str = "vmig_runs";

/// How long a run's claim on a job lasts unless renewed (every third of it).
/// seekdb keeps a GET_LOCK of a killed client's session forever (seen here:
/// still held 80 s after the kill, the session gone), so the lock is a lease.
const LEASE: std::time::Duration = std::time::Duration::from_secs(30);

const NOW_MS: &str = "CAST(UNIX_TIMESTAMP(NOW(6)) * 1000 AS SIGNED)";

/// Takes the job's lease in `vmig_runs`: free, expired, or held by a dead
/// process on this host. Otherwise one line naming the holder.
async fn take_lease(c: &mut Conn, job: &str, me: &str, target: &str, fb: &dyn Feedback) -> Result<()> {
    let j = str_literal(job);
    let lease_ms = LEASE.as_millis();
    c.query_drop("START TRANSACTION").await.ob("taking the job's lease")?;
    let row = query_strings(c, &format!("SELECT holder, expires_ms - {NOW_MS} FROM {RUNS_TABLE} WHERE job = {j} FOR UPDATE"), "taking the job's lease")
        .await?
        .into_iter()
        .next();
    let write = match &row {
        None => format!("INSERT INTO {RUNS_TABLE} (job, holder, expires_ms) VALUES ({j}, {}, {NOW_MS} + {lease_ms})", str_literal(me)),
        Some(r) => {
            let raw = r[0].clone().unwrap_or_default();
            let holder = serde_json::from_str::<Holder>(&raw).ok();
            let left_ms: i64 = r[1].as_deref().and_then(|v| v.parse().ok()).unwrap_or(0);
            let dead = holder.as_ref().is_some_and(|h| h.is_dead_here());
            if left_ms > 0 && !dead {
                c.query_drop("ROLLBACK").await.ob("taking the job's lease")?;
                let who = holder.map(|h| h.describe()).unwrap_or_else(|| raw.clone());
                return Err(job_locked(job, target, Some(format!("{who}; if that run is dead, its lease ends in {:.0} s", left_ms as f64 / 1000.0))));
            }
            if let Some(h) = &holder {
                fb.say(&format!("taking over job {job} from a run that is gone ({})", h.describe()));
            }
            format!("UPDATE {RUNS_TABLE} SET holder = {}, expires_ms = {NOW_MS} + {lease_ms} WHERE job = {j}", str_literal(me))
        }
    };
    match c.query_drop(write).await {
        Ok(()) => c.query_drop("COMMIT").await.ob("taking the job's lease"),
        // Another run inserted the row first.
        Err(mysql_async::Error::Server(e)) if e.code == 1062 => {
            let _ = c.query_drop("ROLLBACK").await;
            Err(job_locked(job, target, None))
        }
        Err(e) => Err(e).ob("taking the job's lease"),
    }
}

/// A run's lease on a job: renewed in the background, given back on drop.
struct ObLease {
    renew: tokio::task::JoinHandle<()>,
    url: ObUrl,
    handle: Handle,
    job: String,
    me: String,
}

impl ObLease {
    fn start(url: ObUrl, handle: Handle, job: String, me: String) -> ObLease {
        let sql = format!(
            "UPDATE {RUNS_TABLE} SET expires_ms = {NOW_MS} + {} WHERE job = {} AND holder = {}",
            LEASE.as_millis(),
            str_literal(&job),
            str_literal(&me)
        );
        let u = url.clone();
        let renew = handle.spawn(async move {
            let mut conn: Option<Conn> = None;
            loop {
                tokio::time::sleep(LEASE / 3).await;
                // A failed renewal (server restarting) is retried at the next tick.
                if conn.is_none() {
                    conn = connect(&u).await.ok();
                }
                if let Some(c) = conn.as_mut() {
                    if c.query_drop(sql.as_str()).await.is_err() {
                        conn = None;
                    }
                }
            }
        });
        ObLease { renew, url, handle, job, me }
    }
}

impl Drop for ObLease {
    fn drop(&mut self) {
        self.renew.abort();
        let sql = format!("DELETE FROM {RUNS_TABLE} WHERE job = {} AND holder = {}", str_literal(&self.job), str_literal(&self.me));
        let url = self.url.clone();
        let _ = self.handle.block_on(async move {
            let mut c = connect(&url).await?;
            c.query_drop(sql).await.ob("giving back the job's lease")
        });
    }
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
            tag: Mutex::new(String::new()),
            subset: Default::default(),
            foreign_check: Mutex::new(false),
        })
    }

    pub(super) fn target_spec(&self) -> TableSpec {
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

    pub(super) fn tag(&self) -> String {
        self.tag.lock().unwrap().clone()
    }

    /// Ends the sessions of a killed earlier run of the job that are still
    /// executing (found by their statement tag). Called with the lock held.
    async fn end_leftover_sessions(&self, c: &mut Conn, job: &str, fb: &dyn Feedback) -> Result<()> {
        let tag = format!("/* vmig {job} */");
        let rows = query_strings(
            c,
            &format!(
                "SELECT id, substr(info, 1, 100) FROM information_schema.processlist \
                 WHERE id <> CONNECTION_ID() AND info LIKE {}",
                str_literal(&format!("{}%", tag.replace('%', "\\%").replace('_', "\\_")))
            ),
            "looking for sessions of an earlier run",
        )
        .await?;
        for r in rows {
            let id = r[0].clone().unwrap_or_default();
            fb.say(&format!(
                "a killed earlier run of job {job} left session {id} running ({}); ending it",
                r[1].clone().unwrap_or_default()
            ));
            if let Err(e) = c.query_drop(format!("KILL {}", id.parse::<u64>().unwrap_or(0))).await {
                fb.say(&format!("warning: could not end session {id}: {}", ob_error_text(&e)));
            }
        }
        Ok(())
    }

    async fn create_indexes(&self, c: &mut Conn, spec: &TableSpec, fb: &dyn Feedback) -> Result<()> {
        let (existing, _) = table_indexes(c, &self.table).await?;
        for ix in &spec.indexes {
            if existing.iter().any(|e| e.name == ix.name) {
                continue;
            }
            // OceanBase allows one vector index per column.
            if let Some(e) = existing.iter().find(|e| matches!(e.kind, IndexKind::Hnsw { .. }) && e.columns == ix.columns)
                && matches!(ix.kind, IndexKind::Hnsw { .. })
            {
                fb.say(&format!("vector index {} not built: the column already has vector index {}", ix.name, e.name));
                continue;
            }
            let started = Instant::now();
            let sql = format!("{}{}", self.tag(), create_index_sql(&self.table, ix));
            let build = c.query_drop(sql);
            tokio::pin!(build);
            // Send the statement before announcing the phase (see PgSink).
            fb.index_started(&self.table, &ix.name);
            let polled = std::future::poll_fn(|cx| std::task::Poll::Ready(build.as_mut().poll(cx))).await;
            let res = match polled {
                std::task::Poll::Ready(r) => r,
                std::task::Poll::Pending => {
                    fb.phase(&format!("building index {}", ix.name));
                    build.await
                }
            };
            fb.index_finished(&self.table, &ix.name, res.is_ok());
            res.ob(&format!("building index {}", ix.name))?;
            fb.say(&format!("index {} built in {:.1}s", ix.name, started.elapsed().as_secs_f64()));
        }
        Ok(())
    }
}

impl Sink for ObSink {
    fn describe(&self) -> String {
        format!("{} table {}", self.url.redacted(), self.table)
    }

    fn lock_job(&self, job: &str, fb: &dyn Feedback) -> Result<Box<dyn std::any::Any + Send>> {
        *self.tag.lock().unwrap() = format!("/* vmig {} */ ", job.replace("*/", "* /"));
        let me = serde_json::to_string(&Holder::me())?;
        self.handle.block_on(async {
            let mut c = connect(&self.url).await?;
            let ddl = format!(
                "CREATE TABLE IF NOT EXISTS {RUNS_TABLE} (job VARCHAR(255) NOT NULL PRIMARY KEY, holder VARCHAR(1024) NOT NULL, \
                 expires_ms BIGINT NOT NULL)"
            );
            create_own_table(&mut c, RUNS_TABLE, &ddl, "creating the runs table").await?;
            take_lease(&mut c, job, &me, &self.describe(), fb).await?;
            self.end_leftover_sessions(&mut c, job, fb).await?;
            Ok::<_, anyhow::Error>(())
        })?;
        Ok(Box::new(ObLease::start(self.url.clone(), self.handle.clone(), job.to_string(), me)))
    }

    fn prepare(&self, source: &TableSpec, _plan: &[ChunkRange], opts: &SinkOptions) -> Result<TableSpec> {
        *self.upsert.lock().unwrap() = opts.on_existing == OnExisting::Upsert;
        *self.ledger.lock().unwrap() = !opts.job.is_empty();
        let t = ident(&self.table);
        let spec = self.handle.block_on(async {
            let mut c = self.pool.get().await?;
            self.fit_packet_size(&mut c, &|m| say!("{m}")).await?;
            let spec = match discover(&mut c, &self.table).await? {
                Some(d) => {
                    d.spec.same_columns_as(source)?;
                    for (col, p) in &d.coarse_timestamps {
                        say!(
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
                let ddl = format!(
                    "CREATE TABLE IF NOT EXISTS {LEDGER_TABLE} (job VARCHAR(255) NOT NULL, chunk INT NOT NULL, lo BIGINT NOT NULL, \
                     hi BIGINT NOT NULL, `rows` BIGINT NOT NULL, rejected BIGINT NOT NULL, content_hash VARCHAR(64) NOT NULL, \
                     bytes BIGINT NOT NULL, committed_at VARCHAR(40) NOT NULL, PRIMARY KEY (job, chunk))"
                );
                create_own_table(&mut c, LEDGER_TABLE, &ddl, "creating ledger table").await?;
                let ledger_rows = query_i64(
                    &mut c,
                    &format!("SELECT count(*) FROM {LEDGER_TABLE} WHERE job = {}", str_literal(&opts.job)),
                    "reading ledger",
                )
                .await?
                .unwrap_or(0);
                let target = format!("table {} in {}", self.table, self.url.redacted());
                match self.subset.get() {
                    None => {
                        let non_empty = !query_strings(&mut c, &format!("SELECT 1 FROM {t} LIMIT 1"), "checking target").await?.is_empty();
                        if existing_rows_action(non_empty, ledger_rows > 0, opts, &target)? {
                            c.query_drop(format!("TRUNCATE TABLE {t}")).await.ob("truncating target")?;
                        }
                    }
                    // A subset job owns the rows inside its filter only.
                    Some(f) => {
                        f.check_columns(&spec, &target)?;
                        let cond = filter_sql(f, None);
                        let inside = !query_strings(&mut c, &format!("SELECT 1 FROM {t} WHERE {cond} LIMIT 1"), "checking target").await?.is_empty();
                        let target = format!("{target} (rows where {})", f.describe());
                        if existing_rows_action(inside, ledger_rows > 0, opts, &target)? {
                            c.query_drop(format!("DELETE FROM {t} WHERE {cond}")).await.ob("emptying the subset in the target")?;
                        }
                        let outside = !query_strings(&mut c, &format!("SELECT 1 FROM {t} WHERE NOT coalesce(({cond}), false) LIMIT 1"), "checking target")
                            .await?
                            .is_empty();
                        *self.foreign_check.lock().unwrap() = outside;
                    }
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
                            file: None,
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
        let tag = self.tag();
        let subset = self.subset.get().map(|f| format!(" AND ({})", filter_sql(f, None))).unwrap_or_default();
        let conn = self.handle.block_on(async {
            let mut c = self.pool.get().await?;
            c.query_drop("START TRANSACTION").await.ob("begin")?;
            if record_ledger && !upsert {
                // A retried chunk replaces whatever an earlier attempt left
                // (of a subset job: inside the subset only).
                c.query_drop(format!("{tag}DELETE FROM {t} WHERE {}{subset}", KeySql::of(&spec).range(chunk)))
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
            chunk: chunk.clone(),
            prefix: format!("{tag}{verb} INTO {t} ({}) VALUES ", column_list(&spec)),
            types: spec.columns.iter().map(|c| c.ty.clone()).collect(),
            literal: self.literal,
            statement_bytes: *self.statement_bytes.lock().unwrap(),
            record_ledger,
            bytes: 0,
            string_key: KeySql::of(&spec).is_text().then(|| spec.primary_key.clone()),
            foreign_check: self
                .subset
                .get()
                .filter(|_| *self.foreign_check.lock().unwrap())
                .map(|f| {
                    (
                        format!("SELECT {pk} FROM {t} WHERE NOT coalesce(({}), false) AND {pk} IN ", filter_sql(f, None)),
                        f.clone(),
                        spec.primary_key.clone(),
                        KeySql::of(&spec),
                    )
                }),
        }))
    }

    fn finish(&self, source: &TableSpec, _plan: &[ChunkRange], opts: &SinkOptions, fb: &dyn Feedback) -> Result<()> {
        // The source's indexes, also when the table existed at prepare (a
        // resumed run finds the table a killed run created, without indexes).
        // OceanBase index names are per table: kept as they are.
        let mut spec = self.target_spec();
        spec.indexes = source.indexes.clone();
        let t = ident(&self.table);
        let pk = ident(&spec.primary_key);
        self.handle.block_on(async {
            let mut c = self.pool.get().await?;
            if opts.create_indexes {
                self.create_indexes(&mut c, &spec, fb).await?;
            }
            // FastGPT numbers new rows from AUTO_INCREMENT: move it past max(id).
            let auto = spec.column(&spec.primary_key).is_some_and(|c| c.auto_increment);
            if auto {
                fb.phase("fixing AUTO_INCREMENT");
                if let Some(max) = query_i64(&mut c, &format!("SELECT max({pk}) FROM {t}"), "reading max id").await? {
                    c.query_drop(format!("ALTER TABLE {t} AUTO_INCREMENT = {}", max.saturating_add(1)))
                        .await
                        .ob("setting AUTO_INCREMENT")?;
                }
            }
            if final_count_due(opts) {
                let inside = self.subset.get().map(|f| format!(" WHERE {}", filter_sql(f, None))).unwrap_or_default();
                let target_rows =
                    query_i64(&mut c, &format!("SELECT count(*) FROM {t}{inside}"), "counting target").await?.unwrap_or(0);
                let ledger_rows = query_i64(
                    &mut c,
                    &format!("SELECT coalesce(sum(`rows`), 0) FROM {LEDGER_TABLE} WHERE job = {}", str_literal(&opts.job)),
                    "reading ledger",
                )
                .await?
                .unwrap_or(0);
                check_final_count(target_rows as u64, ledger_rows as u64, opts, &format!("table {}", self.table), fb)?;
            }
            self.pool.put(c);
            Ok(())
        })
    }

    fn restrict(&self, filter: &crate::model::filter::Filter) -> Result<()> {
        self.subset.set(filter.clone()).map_err(|_| anyhow!("{} is already restricted to a subset", self.describe()))
    }

    fn drop_table(&self) -> Result<()> {
        self.handle.block_on(async {
            let mut c = self.pool.get().await?;
            c.query_drop(format!("DROP TABLE IF EXISTS {}", ident(&self.table))).await.ob("dropping table")?;
            self.pool.put(c);
            Ok(())
        })
    }

    fn applied_position(&self, job: &str) -> Result<Option<crate::contract::changes::AppliedPosition>> {
        self.handle.block_on(self.read_position(job))
    }

    fn apply_changes(&self, job: &str, set: &crate::contract::changes::ChangeSet) -> Result<()> {
        self.handle.block_on(self.apply(job, set))
    }

    fn refused_changes(&self, images: &RecordBatch) -> Result<Vec<RowReject>> {
        let spec = self.target_spec();
        unorderable_keys(images, KeySql::of(&spec).is_text().then_some(spec.primary_key.as_str()), &[])
    }

    fn forget_job(&self, job: &str) -> Result<u64> {
        self.handle.block_on(async {
            let mut c = self.pool.get().await?;
            if let Err(e) = c.query_drop(format!("DELETE FROM {POSITIONS_TABLE} WHERE job = {}", str_literal(job))).await {
                if !matches!(&e, mysql_async::Error::Server(s) if s.code == 1146) {
                    return Err(e).ob("deleting the job's position");
                }
            }
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
