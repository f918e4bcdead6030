//! OceanBase part of the e2e benchmark: raw ceilings measured with a plain
//! mysql_async client in the same run (multi-row INSERT with `X'…'` binary
//! vector literals, the same with `'[…]'` text literals, keyset reads), then
//! `vmig migrate` PostgreSQL → OceanBase and OceanBase → PostgreSQL.

use std::time::Instant;

use mysql_async::prelude::Queryable;

/// Statement size vmig uses (src/endpoint/oceanbase.rs), so raw and vmig compare at the same batch size.
pub const STATEMENT_BYTES: usize = 4 << 20;
/// Connections = vmig's default workers.
const CONNECTIONS: usize = 2;

pub async fn conn(url: &str) -> mysql_async::Conn {
    let opts = mysql_async::OptsBuilder::from_opts(mysql_async::Opts::from_url(url).unwrap())
        .prefer_socket(false)
        .init(vec!["SET time_zone = '+00:00'", "SET ob_query_timeout = 86400000000", "SET ob_trx_timeout = 86400000000"]);
    mysql_async::Conn::new(opts).await.expect("connect to seekdb (is scripts/dbs.sh start running?)")
}

pub async fn fresh_db(base: &str, db: &str) -> String {
    let mut c = conn(base).await;
    c.query_drop(format!("DROP DATABASE IF EXISTS {db}")).await.unwrap();
    c.query_drop(format!("CREATE DATABASE {db}")).await.unwrap();
    c.query_drop("SET GLOBAL max_allowed_packet = 67108864").await.unwrap();
    format!("{}/{db}", base.rsplit_once('/').unwrap().0)
}

fn create_table(dim: u32) -> String {
    format!(
        "CREATE TABLE modeldata (id BIGINT AUTO_INCREMENT PRIMARY KEY, vector VECTOR({dim}) NOT NULL, team_id VARCHAR(50) NOT NULL, \
         dataset_id VARCHAR(50) NOT NULL, collection_id VARCHAR(50) NOT NULL, createtime TIMESTAMP(6) DEFAULT CURRENT_TIMESTAMP(6))"
    )
}

fn encode_row(id: u64, dim: u32, text: bool, out: &mut String) {
    use std::fmt::Write;
    write!(out, "({id},").unwrap();
    let x = |j: u32| ((id as u32).wrapping_mul(2654435761).wrapping_add(j.wrapping_mul(40503)) % 20000) as f32 / 10000.0 - 1.0;
    if text {
        out.push_str("'[");
        for j in 0..dim {
            if j > 0 {
                out.push(',');
            }
            write!(out, "{}", x(j)).unwrap();
        }
        out.push_str("]'");
    } else {
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        out.push_str("X'");
        for j in 0..dim {
            for b in x(j).to_le_bytes() {
                out.push(HEX[(b >> 4) as usize] as char);
                out.push(HEX[(b & 15) as usize] as char);
            }
        }
        out.push('\'');
    }
    write!(out, ",'team-{}','dataset-{}','collection-{}','2025-01-01 00:00:00.123000')", id % 7, id % 31, id % 97).unwrap();
}

/// Rows/s of plain multi-row INSERTs of `rows` synthetic rows over CONNECTIONS sessions.
pub async fn raw_insert(url: &str, rows: u64, dim: u32, text: bool) -> f64 {
    conn(url).await.query_drop(create_table(dim)).await.unwrap();
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONNECTIONS as u64)
        .map(|w| {
            let url = url.to_string();
            tokio::spawn(async move {
                let mut c = conn(&url).await;
                let mut sql = String::new();
                let mut id = w;
                while id < rows {
                    sql.clear();
                    sql.push_str("INSERT INTO modeldata (id, vector, team_id, dataset_id, collection_id, createtime) VALUES ");
                    let mut first = true;
                    while id < rows && sql.len() < STATEMENT_BYTES {
                        if !first {
                            sql.push(',');
                        }
                        first = false;
                        encode_row(id + 1, dim, text, &mut sql);
                        id += CONNECTIONS as u64;
                    }
                    c.query_drop(sql.as_str()).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    rows as f64 / started.elapsed().as_secs_f64()
}

/// Rows/s of plain keyset reads (`id > last ORDER BY id LIMIT page`) of the
/// whole table, the id space split between CONNECTIONS sessions; values are
/// fetched, not decoded.
/// Rows/s of keyset pages over CONNECTIONS sessions. `exact`: vectors as
/// vmig reads them, arrays of doubles seekdb prints in full (the fastest
/// exact form found); else seekdb's default VECTOR text (6 significant
/// digits, lossy), for reference.
/// How a raw read selects the vectors.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ReadForm {
    /// `element_at` of each dimension in a prepared statement: each float32
    /// as its 4 bytes (exact; what vmig reads).
    Elements,
    /// An array of doubles, printed in full (exact, text protocol).
    DoubleArray,
    /// seekdb's default text, 6 significant digits (lossy).
    Lossy,
}

/// Rows per second of a keyset read of the whole table over `CONNECTIONS`
/// id ranges, each a statement prepared once (`?` for the bounds).
pub async fn raw_keyset_read(url: &str, page: usize, dim: u32, form: ReadForm) -> f64 {
    let vector = match form {
        ReadForm::Elements => (1..=dim).map(|i| format!("element_at(vector, {i}) AS e{i}")).collect::<Vec<_>>().join(", "),
        ReadForm::DoubleArray => format!("array_slice(array_append(vector, 0e0), 1, {dim})"),
        ReadForm::Lossy => "vector".to_string(),
    };
    let mut c = conn(url).await;
    let (lo, hi): (i64, i64) = c.query_first("SELECT min(id), max(id) FROM modeldata").await.unwrap().unwrap();
    let total: i64 = c.query_first("SELECT count(*) FROM modeldata").await.unwrap().unwrap();
    let started = Instant::now();
    let step = (hi - lo) / CONNECTIONS as i64 + 1;
    let tasks: Vec<_> = (0..CONNECTIONS as i64)
        .map(|w| {
            let url = url.to_string();
            let vector = vector.clone();
            tokio::spawn(async move {
                let mut c = conn(&url).await;
                let sql = format!(
                    "SELECT id, {vector}, team_id, dataset_id, collection_id, createtime FROM modeldata \
                     WHERE id > ? AND id <= ? ORDER BY id LIMIT {page}"
                );
                let (mut last, end) = (lo + w * step - 1, (lo + (w + 1) * step - 1).min(hi));
                let mut n = 0u64;
                loop {
                    let rows: Vec<mysql_async::Row> = if form == ReadForm::Elements {
                        c.exec(sql.as_str(), (last, end)).await.unwrap()
                    } else {
                        c.query(sql.replacen('?', &last.to_string(), 1).replacen('?', &end.to_string(), 1)).await.unwrap()
                    };
                    let Some(r) = rows.last() else { break };
                    last = r.get::<i64, _>(0).unwrap();
                    n += rows.len() as u64;
                    if rows.len() < page {
                        break;
                    }
                }
                n
            })
        })
        .collect();
    let mut n = 0;
    for t in tasks {
        n += t.await.unwrap();
    }
    assert_eq!(n as i64, total);
    n as f64 / started.elapsed().as_secs_f64()
}
