//! Test harness: real PostgreSQL clusters started by scripts/dbs.sh, one
//! fresh database per test on each, and the vmig binary run as a process.
#![allow(dead_code)]

pub mod faults;
pub mod online;
pub mod milvus_db;

use std::process::{Command, Output};

use tokio_postgres::{Client, NoTls};

pub const VMIG: &str = env!("CARGO_BIN_EXE_vmig");

pub fn source_base() -> String {
    std::env::var("VMIG_TEST_PG_SOURCE").unwrap_or("postgresql://postgres:postgres@127.0.0.1:55432/postgres".into())
}
pub fn target_base() -> String {
    std::env::var("VMIG_TEST_PG_TARGET").unwrap_or("postgresql://postgres:postgres@127.0.0.1:55433/postgres".into())
}

pub fn with_db(base: &str, db: &str) -> String {
    let (head, _) = base.rsplit_once('/').unwrap();
    format!("{head}/{db}")
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

pub async fn client(url: &str) -> Client {
    let (c, conn) = tokio_postgres::connect(url, NoTls).await.unwrap_or_else(|e| panic!("connect: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    c
}

/// Creates (or recreates) database `db` on the cluster of `base`; `vector` says
/// whether to install pgvector in it. Returns the database's URL.
pub fn fresh_db(base: &str, db: &str, vector: bool) -> String {
    rt().block_on(async {
        let c = client(base).await;
        // Slots an earlier (failed) test left in the database keep it from being dropped.
        c.batch_execute(&format!(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = '{db}' AND active_pid IS NOT NULL"
        ))
        .await
        .unwrap();
        for _ in 0..100 {
            let left: i64 = c
                .query_one(&format!("SELECT count(*) FROM pg_replication_slots WHERE database = '{db}' AND active"), &[])
                .await
                .unwrap()
                .get(0);
            if left == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        c.batch_execute(&format!("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '{db}'"))
            .await
            .unwrap();
        c.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await.unwrap();
        c.batch_execute(&format!("CREATE DATABASE {db}")).await.unwrap();
        let url = with_db(base, db);
        if vector {
            client(&url).await.batch_execute("CREATE EXTENSION vector").await.unwrap();
        }
        url
    })
}

/// A source and a target database named after the test.
pub fn dbs(name: &str) -> (String, String) {
    (fresh_db(&source_base(), &format!("{name}_src"), true), fresh_db(&target_base(), &format!("{name}_dst"), true))
}

pub fn vmig(args: &[&str]) -> Output {
    let out = Command::new(VMIG).args(args).env_remove("VMIG_STATE_ROOT").output().expect("run vmig");
    eprintln!(
        "$ vmig {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn ok(args: &[&str]) -> Output {
    let out = vmig(args);
    assert!(out.status.success(), "vmig {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// What vmig printed to stderr, without its warning about a password on
/// the command line: the suite gives passwords in URLs on purpose, and
/// tests/tls.rs checks that warning itself (`raw_stderr`).
pub fn stderr(o: &Output) -> String {
    raw_stderr(o).lines().filter(|l| !l.starts_with(PASSWORD_WARNING)).map(|l| format!("{l}\n")).collect()
}

pub const PASSWORD_WARNING: &str = "warning: a password is on the command line";

pub fn raw_stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn exec(url: &str, sql: &str) {
    rt().block_on(async { client(url).await.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}")) })
}

pub fn query_i64(url: &str, sql: &str) -> i64 {
    rt().block_on(async { client(url).await.query_one(sql, &[]).await.unwrap().get(0) })
}

/// Every row of a FastGPT-shaped table, ordered by id; vectors as their f32 bit
/// patterns so equality means bit-exact.
#[derive(Debug, PartialEq)]
pub struct Row {
    pub id: i64,
    pub vector_bits: Vec<u32>,
    pub team_id: String,
    pub dataset_id: String,
    pub collection_id: String,
    pub createtime: Option<String>,
}

pub fn rows(url: &str, table: &str) -> Vec<Row> {
    rt().block_on(async {
        let c = client(url).await;
        c.query(
            &format!(
                "SELECT id, vector::real[], team_id, dataset_id, collection_id, createtime::text FROM {table} ORDER BY id"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| Row {
            id: r.get(0),
            vector_bits: r.get::<_, Vec<f32>>(1).iter().map(|x| x.to_bits()).collect(),
            team_id: r.get(2),
            dataset_id: r.get(3),
            collection_id: r.get(4),
            createtime: r.get(5),
        })
        .collect()
    })
}

pub fn assert_same_rows(a_url: &str, a_table: &str, b_url: &str, b_table: &str) -> usize {
    let a = rows(a_url, a_table);
    let b = rows(b_url, b_table);
    assert!(!a.is_empty(), "source is empty");
    assert_eq!(a.len(), b.len(), "row counts differ");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x, y, "row {} differs", x.id);
    }
    a.len()
}

/// Every row of a staging area's committed chunks, read by pyarrow
/// (`fixtures/staged_rows.py`, which also checks each file against its
/// marker), in the form of `rows()`: the judge of staging tests that shares
/// no code with vmig.
pub fn staged_rows(staging: &std::path::Path) -> Vec<Row> {
    let python = std::env::var("VMIG_TEST_PYTHON").expect("VMIG_TEST_PYTHON (scripts/test.sh) names the python with pyarrow");
    let out_dir = tempdir();
    let out = out_dir.path().join("rows.json");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/staged_rows.py");
    let run = Command::new(python).args([script, staging.to_str().unwrap(), out.to_str().unwrap()]).output().unwrap();
    assert!(run.status.success(), "staged_rows.py: {}", String::from_utf8_lossy(&run.stderr));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| Row {
            id: r["id"].as_i64().unwrap(),
            vector_bits: r["vector_bits"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u32).collect(),
            team_id: r["team_id"].as_str().unwrap().into(),
            dataset_id: r["dataset_id"].as_str().unwrap().into(),
            collection_id: r["collection_id"].as_str().unwrap().into(),
            createtime: r["createtime"].as_str().map(str::to_string),
        })
        .collect()
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// A throwaway PostgreSQL cluster of the test's own, so a test can stop it.
pub struct PrivateCluster {
    pub dir: std::path::PathBuf,
    pub url: String,
    bin: String,
}

fn as_pg_user(cmd: &str, args: &[&str]) -> std::process::ExitStatus {
    let root = unsafe { libc::geteuid() } == 0;
    let mut c = if root {
        let mut c = Command::new("runuser");
        c.args(["-u", &std::env::var("VMIG_PG_OS_USER").unwrap_or("vmigdb".into()), "--", cmd]);
        c
    } else {
        Command::new(cmd)
    };
    c.args(args).stdout(std::process::Stdio::null()).status().unwrap()
}

impl PrivateCluster {
    pub fn start(name: &str, port: u16) -> Self {
        Self::start_with(name, port, "")
    }

    /// `settings`: more server options, e.g. "-c wal_level=logical".
    pub fn start_with(name: &str, port: u16, settings: &str) -> Self {
        let bin = std::env::var("VMIG_PG_BIN").expect("VMIG_PG_BIN (run through scripts/test.sh)");
        let dir = std::env::temp_dir().join(format!("vmig-test-{name}-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        if unsafe { libc::geteuid() } == 0 {
            Command::new("chown").args(["-R", "vmigdb", dir.to_str().unwrap()]).status().unwrap();
        }
        let data = dir.join("data");
        assert!(as_pg_user(&format!("{bin}/initdb"), &["-D", data.to_str().unwrap(), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"]).success());
        let opts = format!("-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} {settings}", dir.display());
        assert!(as_pg_user(&format!("{bin}/pg_ctl"), &["-D", data.to_str().unwrap(), "-o", &opts, "-l", dir.join("log").to_str().unwrap(), "-w", "start"]).success());
        let url = format!("postgresql://postgres@127.0.0.1:{port}/postgres");
        exec(&url, "CREATE EXTENSION vector");
        PrivateCluster { dir, url, bin }
    }

    pub fn stop(&self) {
        as_pg_user(&format!("{}/pg_ctl", self.bin), &["-D", self.dir.join("data").to_str().unwrap(), "-m", "fast", "-w", "stop"]);
    }

    /// Stops the server (fast: sessions are ended) and starts it again.
    pub fn restart(&self) {
        let data = self.dir.join("data");
        assert!(as_pg_user(&format!("{}/pg_ctl", self.bin), &["-D", data.to_str().unwrap(), "-m", "fast", "-w", "restart"]).success());
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------- OceanBase / seekdb

/// The shared seekdb started by scripts/dbs.sh (user root, no password).
pub fn seekdb_base() -> String {
    std::env::var("VMIG_TEST_SEEKDB").unwrap_or("mysql://root@127.0.0.1:52881/test".into())
}

/// FastGPT's OCEANBASE_URL form: the user carries a tenant (`root@sys`), percent-encoded.
pub fn tenant_form(url: &str) -> String {
    url.replacen("mysql://root@", "mysql://root%40sys@", 1)
}

pub async fn ob_conn(url: &str) -> mysql_async::Conn {
    // The test client speaks plain `root`; vmig is given the tenant form.
    let plain = url.replacen("mysql://root%40sys@", "mysql://root@", 1);
    let opts = mysql_async::OptsBuilder::from_opts(mysql_async::Opts::from_url(&plain).unwrap())
        .prefer_socket(false)
        .init(vec!["SET time_zone = '+00:00'"]);
    mysql_async::Conn::new(opts).await.unwrap_or_else(|e| panic!("connect {plain}: {e}"))
}

pub fn ob_exec(url: &str, sql: &str) {
    use mysql_async::prelude::Queryable;
    rt().block_on(async { ob_conn(url).await.query_drop(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}")) })
}

pub fn ob_query_i64(url: &str, sql: &str) -> i64 {
    ob_try_query_i64(url, sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Like `ob_query_i64`, the server's error returned instead of a panic.
pub fn ob_try_query_i64(url: &str, sql: &str) -> Result<i64, mysql_async::Error> {
    use mysql_async::prelude::Queryable;
    rt().block_on(async {
        let v: Option<i64> = ob_conn(url).await.query_first(sql).await?;
        Ok(v.unwrap_or(0))
    })
}

pub fn ob_query_string(url: &str, sql: &str) -> String {
    use mysql_async::prelude::Queryable;
    rt().block_on(async {
        let r: Option<mysql_async::Row> = ob_conn(url).await.query_first(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        let r = r.expect("a row");
        (0..r.len()).map(|i| r.get::<Option<String>, _>(i).flatten().unwrap_or_default()).collect::<Vec<_>>().join("\t")
    })
}

/// A fresh database on the shared seekdb; returns its URL in the tenant form.
pub fn fresh_ob_db(name: &str) -> String {
    let base = seekdb_base();
    ob_exec(&base, &format!("DROP DATABASE IF EXISTS {name}"));
    ob_exec(&base, &format!("CREATE DATABASE {name}"));
    tenant_form(&with_db(&base, name))
}

/// Rows of a FastGPT-shaped OceanBase table, in the same form as `rows()`:
/// vectors as the float32 seekdb stores, bit for bit (it prints a VECTOR at
/// 6 significant digits, but an array of doubles in full, so the SQL widens
/// each element to a double), timestamps as PostgreSQL prints them.
pub fn ob_rows(url: &str, table: &str) -> Vec<Row> {
    use mysql_async::prelude::Queryable;
    rt().block_on(async {
        let mut c = ob_conn(url).await;
        let rows: Vec<(i64, String, String, String, String, Option<String>)> = c
            .query(format!(
                "SELECT id, array_map(x -> cast(x as double), vector), team_id, dataset_id, collection_id, CAST(createtime AS CHAR) \
                 FROM {table} ORDER BY id"
            ))
            .await
            .unwrap();
        rows.into_iter()
            .map(|(id, v, team_id, dataset_id, collection_id, t)| Row {
                id,
                vector_bits: v
                    .trim_matches(|c| c == '[' || c == ']')
                    .split(',')
                    .map(|x| (x.parse::<f64>().unwrap() as f32).to_bits())
                    .collect(),
                team_id,
                dataset_id,
                collection_id,
                createtime: t.map(|t| if t.contains('.') { t.trim_end_matches('0').trim_end_matches('.').to_string() } else { t }),
            })
            .collect()
    })
}

/// Rows equal in everything, vectors bit for bit, with the first row that
/// differs named.
pub fn assert_rows_equal(a: &[Row], b: &[Row]) {
    assert!(!a.is_empty(), "no rows");
    assert_eq!(a.len(), b.len(), "row counts differ");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x, y, "row {} differs", x.id);
    }
}

/// A seekdb server of the test's own (so the test can stop it).
pub struct PrivateSeekdb {
    pub dir: std::path::PathBuf,
    pub url: String,
    pub port: u16,
}

pub(crate) fn dbs_script(args: &[&str]) -> bool {
    Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/dbs.sh"))
        .args(args)
        .env("VMIG_SEEKDB_MEMORY", "2G")
        .status()
        .unwrap()
        .success()
}

impl PrivateSeekdb {
    pub fn start(name: &str, port: u16) -> Self {
        Self::start_with(name, port, |_| {}, &[])
    }

    /// `prepare` fills the server's directory before its first start (a
    /// TLS wallet); `options` go to the seekdb binary.
    pub fn start_with(name: &str, port: u16, prepare: impl FnOnce(&std::path::Path), options: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("vmig-test-seekdb-{name}-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        prepare(&dir);
        let port_s = port.to_string();
        let mut args = vec!["seekdb-start", dir.to_str().unwrap(), &port_s];
        args.extend_from_slice(options);
        assert!(dbs_script(&args), "seekdb did not start");
        let base = format!("mysql://root@127.0.0.1:{port}/test");
        ob_exec(&base, "CREATE DATABASE IF NOT EXISTS vmig");
        PrivateSeekdb { dir, url: tenant_form(&with_db(&base, "vmig")), port }
    }

    pub fn stop(&self) {
        dbs_script(&["seekdb-stop", self.dir.to_str().unwrap()]);
    }

    /// Stops the server and starts it again on the same data.
    pub fn restart(&self) {
        self.stop();
        assert!(dbs_script(&["seekdb-start", self.dir.to_str().unwrap(), &self.port.to_string()]), "seekdb did not start again");
    }
}

impl Drop for PrivateSeekdb {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// (id, reason) of every rejected row under `dir` (integer keys).
pub fn rejects(dir: &std::path::Path) -> Vec<(i64, String)> {
    let mut out: Vec<(i64, String)> = rejected_keys(dir, "id").into_iter().map(|(k, r)| (k.parse().expect("an integer key"), r)).collect();
    out.sort();
    out
}

/// (key as text, reason) of every rejected row under `dir`, integer or
/// string keys in column `key`.
pub fn rejected_keys(dir: &std::path::Path, key: &str) -> Vec<(String, String)> {
    use arrow::array::AsArray;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir.join("rejects")).unwrap() {
        let f = std::fs::File::open(e.unwrap().path()).unwrap();
        for b in ParquetRecordBatchReaderBuilder::try_new(f).unwrap().build().unwrap() {
            let b = b.unwrap();
            let ids = arrow::compute::cast(b.column_by_name(key).unwrap(), &arrow::datatypes::DataType::Utf8).unwrap();
            let ids = ids.as_string::<i32>();
            let reasons = b.column_by_name("vmig_reason").unwrap().as_string::<i32>().clone();
            for i in 0..b.num_rows() {
                out.push((ids.value(i).to_string(), reasons.value(i).to_string()));
            }
        }
    }
    out.sort();
    out
}

/// Exports `src` (8-d, ≥10 rows) to `st`, then rewrites the chunk as another
/// tool might have: row 5 gets a NaN, row 9 an infinity. Returns their ids.
pub fn stage_with_nan_and_inf(src: &str, st: &std::path::Path) -> (i64, i64) {
    use arrow::array::{AsArray, Float32Array};
    use arrow::datatypes::Int64Type;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    ok(&["export", "--from", src, "--staging", st.to_str().unwrap(), "--chunk-rows", "1000"]);
    let path = st.join("chunks/000000.parquet");
    let batch = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&path).unwrap()).unwrap().build().unwrap()
        .next().unwrap().unwrap();
    let vec_col = batch.column_by_name("vector").unwrap().as_fixed_size_list().clone();
    let mut values: Vec<f32> = vec_col.values().as_primitive::<arrow::datatypes::Float32Type>().values().to_vec();
    values[5 * 8 + 2] = f32::NAN;
    values[9 * 8] = f32::INFINITY;
    let new_vec = arrow::array::FixedSizeListArray::new(vmig::model::schema::vector_item_field(), 8, std::sync::Arc::new(Float32Array::from(values)), None);
    let mut cols = batch.columns().to_vec();
    cols[1] = std::sync::Arc::new(new_vec);
    let bad = arrow::record_batch::RecordBatch::try_new(batch.schema(), cols).unwrap();
    let manifest = vmig::state::manifest::Manifest::load_dir(st).unwrap().unwrap();
    let props = vmig::state::parquet::writer_properties(&manifest.table).unwrap();
    let mut w = vmig::state::parquet::ParquetFileWriter::create(path.clone(), batch.schema(), props).unwrap();
    w.write(&bad).unwrap();
    let (bytes, sha) = w.finish().unwrap();
    let marker = st.join("chunks/000000.commit.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&marker).unwrap()).unwrap();
    m["bytes"] = bytes.into();
    m["sha256"] = sha.into();
    std::fs::write(&marker, m.to_string()).unwrap();
    let ids = batch.column_by_name("id").unwrap().as_primitive::<Int64Type>().clone();
    (ids.value(5), ids.value(9))
}

/// The report of a run names each of `indexes` as built on its own: start,
/// end and seconds that agree with each other.
pub fn assert_index_builds(report: &std::path::Path, indexes: &[&str]) {
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(report).unwrap()).unwrap();
    let builds = r["index_builds"].as_array().unwrap_or_else(|| panic!("no index_builds in the report: {r}"));
    let ms = |v: &serde_json::Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap().timestamp_millis();
    for ix in indexes {
        let b = builds.iter().find(|b| b["index"] == *ix).unwrap_or_else(|| panic!("index {ix} not in the report: {builds:?}"));
        assert_eq!(b["state"], "built", "{b}");
        let (start, end) = (ms(&b["started_at"]), ms(&b["ended_at"]));
        let secs = b["seconds"].as_f64().unwrap();
        assert!(end >= start && ((end - start) as f64 / 1000.0 - secs).abs() < 0.5, "start, end and seconds disagree: {b}");
    }
}
