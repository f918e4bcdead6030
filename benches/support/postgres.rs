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
/// binary COPY OUT piped into COPY IN; checks `rows` arrived.
pub async fn raw_copy(src: &str, dst: &str, dim: u32, rows: u64) -> f64 {
    let s = client(src).await;
    let d = client(dst).await;
    d.batch_execute(&format!(
        "CREATE TABLE modeldata (id BIGSERIAL PRIMARY KEY, vector VECTOR({dim}) NOT NULL, team_id VARCHAR(50) NOT NULL, \
         dataset_id VARCHAR(50) NOT NULL, collection_id VARCHAR(50) NOT NULL, createtime TIMESTAMP DEFAULT CURRENT_TIMESTAMP)"
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
