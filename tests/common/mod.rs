//! Test harness: real PostgreSQL clusters started by scripts/dbs.sh, one
//! fresh database per test on each, and the vmig binary run as a process.
#![allow(dead_code)]

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

pub fn stderr(o: &Output) -> String {
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
        let bin = std::env::var("VMIG_PG_BIN").expect("VMIG_PG_BIN (run through scripts/test.sh)");
        let dir = std::env::temp_dir().join(format!("vmig-test-{name}-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        if unsafe { libc::geteuid() } == 0 {
            Command::new("chown").args(["-R", "vmigdb", dir.to_str().unwrap()]).status().unwrap();
        }
        let data = dir.join("data");
        assert!(as_pg_user(&format!("{bin}/initdb"), &["-D", data.to_str().unwrap(), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8"]).success());
        let opts = format!("-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={}", dir.display());
        assert!(as_pg_user(&format!("{bin}/pg_ctl"), &["-D", data.to_str().unwrap(), "-o", &opts, "-l", dir.join("log").to_str().unwrap(), "-w", "start"]).success());
        let url = format!("postgresql://postgres@127.0.0.1:{port}/postgres");
        exec(&url, "CREATE EXTENSION vector");
        PrivateCluster { dir, url, bin }
    }

    pub fn stop(&self) {
        as_pg_user(&format!("{}/pg_ctl", self.bin), &["-D", self.dir.join("data").to_str().unwrap(), "-m", "fast", "-w", "stop"]);
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
