//! PostgreSQL helpers shared by the benchmarks: settings, fresh databases,
//! and the raw ceiling (binary COPY OUT piped into binary COPY IN).

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_postgres::NoTls;

pub fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

pub fn with_db(base: &str, db: &str) -> String {
    format!("{}/{db}", base.rsplit_once('/').unwrap().0)
}

pub async fn client(url: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect (is scripts/dbs.sh start running?)");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    c
}

/// Creates (or recreates) database `db` with pgvector; returns its URL.
pub async fn fresh_db(base: &str, db: &str) -> String {
    let c = client(base).await;
    // A slot an earlier, failed online run left keeps the database from being dropped.
    c.batch_execute(&format!(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = '{db}' AND active_pid IS NOT NULL"
    ))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.batch_execute(&format!("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '{db}'"))
        .await
        .unwrap();
    c.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await.unwrap();
    c.batch_execute(&format!("CREATE DATABASE {db}")).await.unwrap();
    let url = with_db(base, db);
    client(&url).await.batch_execute("CREATE EXTENSION vector").await.unwrap();
    url
}

/// Seconds to copy `src`'s modeldata into a new modeldata in `dst` by one
/// binary COPY OUT piped into COPY IN (what `psql \copy … (FORMAT binary)`
/// piped into another does), into FastGPT's own DDL; checks `rows` arrived.
pub async fn raw_copy(src: &str, dst: &str, dim: u32, rows: u64) -> f64 {
    raw_copy_with(src, dst, dim, rows, "").await
}

/// `raw_copy` with `setup` (SQL) run on the new table before the copy.
pub async fn raw_copy_with(src: &str, dst: &str, dim: u32, rows: u64, setup: &str) -> f64 {
    let s = client(src).await;
    let d = client(dst).await;
    d.batch_execute(&format!(
        "CREATE TABLE modeldata (id BIGSERIAL PRIMARY KEY, vector VECTOR({dim}) NOT NULL, team_id VARCHAR(50) NOT NULL, \
         dataset_id VARCHAR(50) NOT NULL, collection_id VARCHAR(50) NOT NULL, createtime TIMESTAMP DEFAULT CURRENT_TIMESTAMP); {setup}"
    ))
    .await
    .unwrap();
    let started = Instant::now();
    let out = s
        .copy_out("COPY (SELECT id, vector, team_id, dataset_id, collection_id, createtime FROM modeldata ORDER BY id) TO STDOUT (FORMAT binary)")
        .await
        .unwrap();
    let sink = d.copy_in::<_, bytes::Bytes>("COPY modeldata FROM STDIN (FORMAT binary)").await.unwrap();
    let mut out = std::pin::pin!(out);
    let mut sink = std::pin::pin!(sink);
    while let Some(chunk) = out.next().await {
        sink.send(chunk.unwrap()).await.unwrap();
    }
    let n = sink.as_mut().finish().await.unwrap();
    assert_eq!(n, rows);
    started.elapsed().as_secs_f64()
}

/// Writes every dirty page of the server behind `url` out now, so that a
/// checkpoint the previous measurement's WAL triggers does not land on the next.
pub async fn checkpoint(url: &str) {
    client(url).await.batch_execute("CHECKPOINT").await.unwrap();
}

/// Seconds to read every row of `url`'s modeldata by binary COPY OUT.
pub async fn read_all(url: &str) -> f64 {
    let c = client(url).await;
    let started = Instant::now();
    let out = c.copy_out("COPY (SELECT * FROM modeldata ORDER BY id) TO STDOUT (FORMAT binary)").await.unwrap();
    let mut out = std::pin::pin!(out);
    while let Some(chunk) = out.next().await {
        chunk.unwrap();
    }
    started.elapsed().as_secs_f64()
}

/// Seconds to build FastGPT's HNSW index (m=32, ef_construction=128,
/// inner product) over the first `rows` rows of `url`'s modeldata, copied
/// into a table with the same column storage.
pub async fn hnsw_build(url: &str, rows: u64) -> f64 {
    let c = client(url).await;
    c.batch_execute(&format!(
        "DROP TABLE IF EXISTS hnsw_probe; CREATE TABLE hnsw_probe (LIKE modeldata INCLUDING STORAGE); \
         INSERT INTO hnsw_probe SELECT * FROM modeldata ORDER BY id LIMIT {rows}; SET maintenance_work_mem = '1GB'"
    ))
    .await
    .unwrap();
    let started = Instant::now();
    c.batch_execute("CREATE INDEX ON hnsw_probe USING hnsw (vector vector_ip_ops) WITH (m = 32, ef_construction = 128)").await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    c.batch_execute("DROP TABLE hnsw_probe").await.unwrap();
    secs
}
