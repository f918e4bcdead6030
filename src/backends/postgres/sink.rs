//! PostgreSQL as a target: the job's advisory lock and what a killed run left
//! (sessions, INVALID indexes), pgvector, the table, chunks written by binary
//! COPY IN with their ledger row in one transaction, indexes and the sequence.

use super::copy::{copy_header, copy_trailer, encode_rows};
use super::*;

pub struct PgSink {
    pub(super) url: PgUrl,
    pub(super) table: TableName,
    pub(super) handle: Handle,
    pub(super) pool: Arc<Pool>,
    target: Mutex<Option<TableSpec>>,
    upsert: Mutex<bool>,
    ledger: Mutex<bool>,
    /// A subset job's filter (`restrict`).
    subset: std::sync::OnceLock<crate::model::filter::Filter>,
    /// The target held rows outside the subset at prepare: writes refuse their ids.
    foreign_check: Mutex<bool>,
    /// What prepare chose or found about the vector columns' storage.
    notes: Mutex<Vec<String>>,
    /// `vmig_positions` exists (made by the first change batch).
    pub(super) positions_table: tokio::sync::OnceCell<()>,
}

fn vector_columns(spec: &TableSpec) -> impl Iterator<Item = &str> {
    spec.columns.iter().filter(|c| c.ty.is_vector()).map(|c| c.name.as_str())
}

async fn block_size(c: &Client) -> Result<u64> {
    let text: String = c.query_one("SHOW block_size", &[]).await.pg("reading block_size")?.get(0);
    Ok(text.parse().unwrap_or(8192))
}

impl PgSink {
    /// Sets the storage of every vector column; returns their names for a
    /// note, or None when the table has no vector column.
    /// PLAIN also raises the table's toast_tuple_target to a whole tuple:
    /// below it, a row over 2 kB would still have its short text values
    /// (over 24 bytes) moved out to TOAST one by one to shrink it.
    async fn set_vector_storage(&self, c: &Client, spec: &TableSpec, storage: VectorStorage, block_size: u64) -> Result<Option<String>> {
        let cols: Vec<&str> = vector_columns(spec).collect();
        if cols.is_empty() {
            return Ok(None);
        }
        let mut alters: Vec<String> = cols.iter().map(|n| format!("ALTER COLUMN {} SET STORAGE {}", ident(n), storage.sql())).collect();
        if storage == VectorStorage::Plain {
            alters.push(format!("SET (toast_tuple_target = {})", max_tuple_bytes(block_size)));
        }
        c.batch_execute(&format!("ALTER TABLE {} {}", self.table.sql(), alters.join(", "))).await.pg("setting the vector columns' storage")?;
        Ok(Some(cols.join(", ")))
    }

    /// An existing table keeps its vector storage unless `--vector-storage`
    /// is given; a slow kind (a compression attempt on every vector) is named.
    async fn existing_vector_storage(&self, c: &Client, spec: &TableSpec, asked: Option<VectorStorage>) -> Result<Vec<String>> {
        if let Some(s) = asked {
            let Some(cols) = self.set_vector_storage(c, spec, s, block_size(c).await?).await? else { return Ok(Vec::new()) };
            return Ok(vec![format!(
                "vector storage: {cols} {} on the existing table {} (as --vector-storage asks; rows already there stay as they are stored)",
                s.sql(),
                self.table.name
            )]);
        }
        let names: Vec<&str> = vector_columns(spec).collect();
        let rows = c
            .query(
                "SELECT attname::text, attstorage::text FROM pg_attribute WHERE attrelid = to_regclass($1) AND attname = ANY($2) ORDER BY attnum",
                &[&self.table.sql(), &names],
            )
            .await
            .pg("reading the vector columns' storage")?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                let (col, storage): (String, String) = (row.get(0), row.get(1));
                let s @ (VectorStorage::Extended | VectorStorage::Main) = VectorStorage::from_attstorage(&storage)? else { return None };
                Some(format!(
                    "note: the existing table {} stores {col} {}: each vector goes through a compression attempt that random floats never pass \
                     (and, for EXTENDED, the TOAST table); vmig leaves it so. `--vector-storage plain` (or external) changes it for the rows written now",
                    self.table.name,
                    s.sql()
                ))
            })
            .collect())
    }

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
            subset: Default::default(),
            foreign_check: Mutex::new(false),
            notes: Mutex::new(Vec::new()),
            positions_table: Default::default(),
        })
    }

    pub(super) fn target_spec(&self) -> TableSpec {
        self.target.lock().unwrap().clone().expect("prepare() before writing")
    }

    /// FastGPT runs `CREATE EXTENSION IF NOT EXISTS vector` at start; so do we.
    /// When that is not possible, the error says why: not installed on the
    /// server, or not permitted to this role.
    async fn create_pgvector(&self, c: &Client) -> Result<()> {
        let db = self.url.redacted();
        match c.batch_execute("CREATE EXTENSION IF NOT EXISTS vector").await {
            Ok(()) => {
                say!("created extension vector (pgvector) in {db}: the target database did not have it");
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
pub(super) fn session_name(job: &str) -> String {
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
                            say!("warning: after a server restart, another run took this job's lock; stop one of them");
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

    fn restrict(&self, filter: &crate::model::filter::Filter) -> Result<()> {
        self.subset.set(filter.clone()).map_err(|_| anyhow!("{} is already restricted to a subset", self.describe()))
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
            if c.query_one("SELECT to_regclass($1) IS NOT NULL", &[&POSITIONS_TABLE]).await.pg("reading ledger")?.get::<_, bool>(0) {
                n += c.execute(&format!("DELETE FROM {POSITIONS_TABLE} WHERE job = $1"), &[&job]).await.pg("deleting ledger rows")?;
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
                    let notes = self.existing_vector_storage(&c, &d.spec, opts.vector_storage).await?;
                    *self.notes.lock().unwrap() = notes;
                    d.spec
                }
                None => {
                    let mut spec = source.clone();
                    spec.name = self.table.name.clone();
                    c.batch_execute(&create_table_sql(&self.table, &spec)).await.pg("creating target table")?;
                    let block_size = block_size(&c).await?;
                    let (storage, why) = match opts.vector_storage {
                        Some(s) => (s, "as --vector-storage asks".to_string()),
                        None => choose_vector_storage(&spec, block_size),
                    };
                    if let Some(cols) = self.set_vector_storage(&c, &spec, storage, block_size).await? {
                        *self.notes.lock().unwrap() = vec![format!("vector storage: {cols} {} ({why})", storage.sql())];
                    }
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
                let t = self.table.sql();
                let (c_ref, t_ref) = (&c, &t);
                let exists = move |cond: String| async move {
                    c_ref.query_one(&format!("SELECT EXISTS (SELECT 1 FROM {t_ref} WHERE {cond})"), &[]).await.pg("checking target").map(|r| r.get::<_, bool>(0))
                };
                let target = format!("table {} in {}", self.table.name, self.url.redacted());
                match self.subset.get() {
                    None => {
                        if existing_rows_action(exists("true".into()).await?, ledger_rows > 0, opts, &target)? {
                            c.batch_execute(&format!("TRUNCATE {t}")).await.pg("truncating target")?
                        }
                    }
                    // A subset job owns the rows inside its filter only.
                    Some(f) => {
                        f.check_columns(&spec, &target)?;
                        let cond = filter_sql(f, None);
                        let target = format!("{target} (rows where {})", f.describe());
                        if existing_rows_action(exists(cond.clone()).await?, ledger_rows > 0, opts, &target)? {
                            c.batch_execute(&format!("DELETE FROM {t} WHERE {cond}")).await.pg("emptying the subset in the target")?
                        }
                        *self.foreign_check.lock().unwrap() = exists(format!("NOT coalesce(({cond}), false)")).await?;
                    }
                }
            }
            self.pool.put(c);
            Ok::<_, anyhow::Error>(spec)
        })?;
        *self.target.lock().unwrap() = Some(spec.clone());
        Ok(spec)
    }

    fn prepare_notes(&self) -> Vec<String> {
        self.notes.lock().unwrap().clone()
    }

    fn applied_position(&self, job: &str) -> Result<Option<crate::contract::changes::AppliedPosition>> {
        self.handle.block_on(self.read_position(job))
    }

    fn apply_changes(&self, job: &str, set: &crate::contract::changes::ChangeSet) -> Result<()> {
        self.handle.block_on(self.apply(job, set, None))
    }

    fn overlaps_changes(&self) -> bool {
        self.handle.block_on(self.may_overlap())
    }

    fn apply_changes_in_order(
        &self,
        job: &str,
        set: &crate::contract::changes::ChangeSet,
        before_commit: &dyn Fn() -> Result<()>,
    ) -> Result<()> {
        self.handle.block_on(self.apply(job, set, Some(before_commit)))
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
                            file: None,
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
        let subset = self.subset.get();
        let and_subset = |q: Option<&str>| subset.map(|f| format!(" AND ({})", filter_sql(f, q))).unwrap_or_default();
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
                // A retried chunk replaces whatever an earlier attempt left
                // (of a subset job: inside the subset only).
                c.batch_execute(&format!("DELETE FROM {t} WHERE {}{}", KeySql::of(&spec).range(chunk), and_subset(None)))
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
                    "DELETE FROM {t} USING vmig_chunk s WHERE {t}.{pk} = s.{pk}{}; INSERT INTO {t} ({cols}) SELECT {cols} FROM vmig_chunk",
                    and_subset(Some(&t))
                )
            }),
            foreign_check: subset.filter(|_| *self.foreign_check.lock().unwrap()).map(|f| {
                (
                    format!(
                        "SELECT {} FROM {t} WHERE {} AND NOT coalesce(({}), false)",
                        KeySql::of(&spec).select(),
                        KeySql::of(&spec).any(1),
                        filter_sql(f, None)
                    ),
                    f.clone(),
                    spec.primary_key.clone(),
                    KeySql::of(&spec),
                )
            }),
            record_ledger,
            chunk: chunk.clone(),
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
                self.create_indexes(&c, &spec, opts.index_memory, fb).await?;
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
            // An online job resumed after its snapshot finds the table
            // analyzed (autovacuum keeps it so as changes arrive): a large
            // table's ANALYZE would only compete with the catch-up.
            let analyzed: bool = opts.online
                && c.query_opt(
                    "SELECT last_analyze IS NOT NULL OR last_autoanalyze IS NOT NULL FROM pg_stat_user_tables WHERE relid = $1::text::regclass",
                    &[&t],
                )
                .await
                .pg("reading the table's statistics")?
                .is_some_and(|r| r.get(0));
            if !analyzed {
                let analyze = format!("ANALYZE {t}");
                if opts.online {
                    // A following job applies changes by key (the primary
                    // key's index serves them without statistics), and
                    // PostgreSQL's own initial sync does not wait for an
                    // ANALYZE either: the new table is analyzed beside the
                    // catch-up, on a session of its own. A run that ends
                    // first leaves it to the next run or to autovacuum.
                    let pool = self.pool.clone();
                    tokio::spawn(async move {
                        if let Ok(c) = pool.get().await
                            && c.batch_execute(&analyze).await.is_ok()
                        {
                            pool.put(c);
                        }
                    });
                } else {
                    fb.phase("analyzing");
                    c.batch_execute(&analyze).await.pg("analyze")?;
                }
            }
            if final_count_due(opts) {
                let inside = self.subset.get().map(|f| format!(" WHERE {}", filter_sql(f, None))).unwrap_or_default();
                let target_rows: i64 =
                    c.query_one(&format!("SELECT count(*) FROM {t}{inside}"), &[]).await.pg("counting target")?.get(0);
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
    /// A subset job whose target holds other rows: the query for the ids
    /// they hold, the filter, the key column.
    foreign_check: Option<(String, crate::model::filter::Filter, String, KeySql)>,
}

impl ChunkWriter for PgChunkWriter {
    fn write(&mut self, batch: &RecordBatch) -> Result<Vec<RowReject>> {
        let refused = match &self.foreign_check {
            // On a connection of its own: this one is busy with the COPY.
            Some((query, f, pk, key)) => refuse_foreign_ids(batch, pk, f, &mut |ids| {
                self.handle.block_on(async {
                    let c = self.pool.get().await?;
                    let ids = key.param(ids);
                    let held = c
                        .query(query.as_str(), &[ids.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync)])
                        .await
                        .pg("checking ids outside the subset")?
                        .iter()
                        .map(|r| key.get(r, 0))
                        .collect();
                    self.pool.put(c);
                    Ok(held)
                })
            })?,
            None => Vec::new(),
        };
        let batch = &without_rows(batch, &refused)?;
        self.buf.clear();
        encode_rows(batch, &self.types, &mut self.buf)?;
        self.bytes += self.buf.len() as u64;
        let data = self.buf.split().freeze();
        let sink = self.sink.as_mut().unwrap();
        let id = self.chunk.id;
        self.handle.block_on(async { sink.send(data).await.pg(&format!("writing chunk {id}")) })?;
        Ok(refused)
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
