//! Milvus part of the e2e benchmark: raw ceilings measured with the plain
//! milvus-sdk-rust client in the same run (an upsert loop; a keyset read
//! loop at the SDK's default 4 MiB response limit), then `vmig migrate`
//! PostgreSQL → Milvus and Milvus → PostgreSQL.

use std::collections::HashMap;
use std::time::Instant;

use milvus::client::Client;
use milvus::data::FieldColumn;
use milvus::index::{IndexParams, IndexType, MetricType};
use milvus::mutate::InsertOptions;
use milvus::query::QueryOptions;
use milvus::schema::{CollectionSchema, CollectionSchemaBuilder, FieldSchema};
use milvus::value::ValueVec;

/// Streams = vmig's default workers.
const STREAMS: usize = 2;
/// Upsert request size vmig uses (src/endpoint/milvus/sink.rs).
pub const REQUEST_BYTES: usize = 8 << 20;

async fn client(base: &str, db: Option<&str>) -> Client {
    let mut c = Client::new(base.to_string()).await.expect("connect to Milvus (is scripts/dbs.sh start running?)");
    if let Some(db) = db {
        c.using_database(db).await.unwrap();
    }
    c
}

/// (base, db) of `http://host:port/db`.
fn split(url: &str) -> (&str, &str) {
    url.rsplit_once('/').unwrap()
}

pub async fn fresh_db(base: &str, name: &str) -> String {
    let c = client(base, None).await;
    if c.list_databases().await.unwrap().iter().any(|d| d == name) {
        drop_db(base, name).await;
    }
    c.create_database(name, None).await.unwrap();
    format!("{base}/{name}")
}

/// Drops a database made by `fresh_db`, if it is there (a loaded collection
/// holds memory and CPU the next measurement would share).
pub async fn drop_db(base: &str, name: &str) {
    if !client(base, None).await.list_databases().await.unwrap().iter().any(|d| d == name) {
        return;
    }
    let d = client(base, Some(name)).await;
    for coll in d.list_collections().await.unwrap() {
        d.drop_collection(coll).await.unwrap();
    }
    client(base, None).await.drop_database(name).await.unwrap();
}

fn schema(dim: u32) -> CollectionSchema {
    CollectionSchemaBuilder::new("modeldata", "FastGPT modeldata")
        .add_field(FieldSchema::new_primary_int64("id", "", false))
        .add_field(FieldSchema::new_float_vector("vector", "", dim as i64))
        .add_field(FieldSchema::new_varchar("teamId", "", 64))
        .add_field(FieldSchema::new_varchar("datasetId", "", 64))
        .add_field(FieldSchema::new_varchar("collectionId", "", 64))
        .add_field(FieldSchema::new_int64("createTime", ""))
        .enable_dynamic_field()
        .build()
        .unwrap()
}

/// Rows `start..start+n` of `vmig generate`'s data set (the rows vmig moves
/// in the same run) as SDK columns: Milvus is fed the same values both ways.
fn columns(s: &CollectionSchema, start: u64, n: u64, dim: u32) -> Vec<FieldColumn> {
    use arrow::array::AsArray;
    use arrow::datatypes::{Float32Type, Int64Type, TimestampMicrosecondType};
    let spec = vmig::commands::generate::fastgpt_spec("modeldata", dim, false, false);
    let b = vmig::commands::generate::batch(&spec, 42, start, n).unwrap();
    let strings = |i: usize| b.column(i).as_string::<i32>().iter().map(|v| v.unwrap().to_string()).collect::<Vec<_>>();
    let f = |n: &str| s.get_field(n).unwrap();
    vec![
        FieldColumn::new(f("id"), b.column(0).as_primitive::<Int64Type>().values().to_vec()),
        FieldColumn::new(f("vector"), b.column(1).as_fixed_size_list().values().as_primitive::<Float32Type>().values().to_vec()),
        FieldColumn::new(f("teamId"), strings(2)),
        FieldColumn::new(f("datasetId"), strings(3)),
        FieldColumn::new(f("collectionId"), strings(4)),
        FieldColumn::new(f("createTime"), b.column(5).as_primitive::<TimestampMicrosecondType>().values().iter().map(|us| us / 1000).collect::<Vec<i64>>()),
    ]
}

/// Rows/s of a plain SDK upsert loop of the `rows` generated rows over
/// STREAMS connections, in requests of REQUEST_BYTES, then one flush, waited
/// for until the collection's statistics count every row as flushed (the
/// end state vmig's load reaches: it waits for each chunk's flush). The rows
/// are made in memory before each request's clock starts.
pub async fn raw_upsert(url: &str, rows: u64, dim: u32) -> f64 {
    let (base, db) = split(url);
    let s = schema(dim);
    client(base, Some(db)).await.create_collection(s.clone(), None).await.unwrap();
    rows as f64 / upsert_loop(base, db, &s, 0, rows, dim).await.as_secs_f64()
}

/// Rows/s of the same loop into the state an online target follows in: a
/// collection already holding `held` rows, with FastGPT's HNSW index (vmig's
/// default: IP, M=32, efConstruction=128) built and loaded, so Milvus also
/// serves the new rows to queries and indexes each segment they seal.
pub async fn raw_upsert_loaded(url: &str, held: u64, rows: u64, dim: u32) -> f64 {
    let (base, db) = split(url);
    let s = schema(dim);
    let c = client(base, Some(db)).await;
    c.create_collection(s.clone(), None).await.unwrap();
    upsert_loop(base, db, &s, 0, held, dim).await;
    // The SDK waits for the build to finish, as vmig does before it loads.
    let params = HashMap::from([("M".to_string(), "32".to_string()), ("efConstruction".to_string(), "128".to_string())]);
    c.create_index("modeldata", "vector", IndexParams::new("vector_index".into(), IndexType::HNSW, MetricType::IP, params)).await.unwrap();
    c.load_collection("modeldata", None).await.unwrap();
    rows as f64 / upsert_loop(base, db, &s, held, rows, dim).await.as_secs_f64()
}

/// Upserts generated rows `first..first+rows` as above; the time until they
/// are all flushed.
async fn upsert_loop(base: &str, db: &str, s: &CollectionSchema, first: u64, rows: u64, dim: u32) -> std::time::Duration {
    let per_request = (REQUEST_BYTES / (dim as usize * 4 + 64)).max(1);
    let tasks: Vec<_> = (0..STREAMS as u64)
        .map(|w| {
            let (base, db, s) = (base.to_string(), db.to_string(), s.clone());
            tokio::spawn(async move {
                let c = client(&base, Some(&db)).await;
                let mut spent = std::time::Duration::ZERO;
                let mut start = w * per_request as u64;
                while start < rows {
                    let cols = columns(&s, first + start, per_request.min((rows - start) as usize) as u64, dim);
                    let t = Instant::now();
                    c.upsert("modeldata", cols, None::<InsertOptions>).await.unwrap();
                    spent += t.elapsed();
                    start += (STREAMS * per_request) as u64;
                }
                spent
            })
        })
        .collect();
    let mut slowest = std::time::Duration::ZERO;
    for t in tasks {
        slowest = slowest.max(t.await.unwrap());
    }
    let t = Instant::now();
    let c = client(base, Some(db)).await;
    c.flush("modeldata").await.unwrap();
    loop {
        let stats = c.get_collection_stats("modeldata").await.unwrap();
        let flushed: u64 = stats.get("row_count").and_then(|n| n.parse().ok()).unwrap_or(0);
        if flushed >= first + rows {
            break;
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(600), "Milvus flushed {flushed} of {} rows in 10 minutes", first + rows);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    slowest + t.elapsed()
}

/// Makes the raw collection readable: a FLAT index (nothing to build) and a load.
pub async fn load_for_reading(url: &str) {
    let (base, db) = split(url);
    let c = client(base, Some(db)).await;
    c.create_index("modeldata", "vector", IndexParams::new("vector_index".into(), IndexType::Flat, MetricType::IP, HashMap::new()))
        .await
        .unwrap();
    c.load_collection("modeldata", None).await.unwrap();
}

/// Rows per page of a keyset read: what the SDK's default 4 MiB response limit allows.
pub fn read_page(dim: u32) -> usize {
    ((4usize << 20) * 3 / 4 / (dim as usize * 4 + 100)).clamp(64, 16_384)
}

/// Rows/s of plain keyset reads (`id > last`, `limit page`) of the whole
/// collection, the id space split between STREAMS connections.
pub async fn raw_keyset_read(url: &str, rows: u64, page: usize) -> f64 {
    // Generated ids run from 1000 to 1000 + 3 * rows.
    let (n, rate) = raw_keyset_read_ids(url, 0, 1000 + 3 * rows as i64, page).await;
    assert_eq!(n, rows);
    rate
}

/// (rows, rows/s) of keyset reads of the ids in `from..to`, with every field
/// a FastGPT collection has, split between STREAMS connections.
pub async fn raw_keyset_read_ids(url: &str, from: i64, to: i64, page: usize) -> (u64, f64) {
    let (base, db) = split(url);
    let started = Instant::now();
    let step = (to - from) / STREAMS as i64 + 1;
    let tasks: Vec<_> = (0..STREAMS as i64)
        .map(|w| {
            let (base, db) = (base.to_string(), db.to_string());
            tokio::spawn(async move {
                let c = client(&base, Some(&db)).await;
                let (mut last, end) = (from + w * step - 1, (from + (w + 1) * step - 1).min(to - 1));
                let mut n = 0u64;
                let fields = ["id", "vector", "teamId", "datasetId", "collectionId", "createTime"].map(String::from).to_vec();
                loop {
                    let opts = QueryOptions::new().output_fields(fields.clone()).limit(page as i64);
                    let cols = c.query("modeldata", &format!("id > {last} and id <= {end}"), &opts).await.unwrap();
                    let ids = match &cols.iter().find(|c| c.name == "id").unwrap().value {
                        ValueVec::Long(v) => v.clone(),
                        _ => unreachable!(),
                    };
                    let Some(&max) = ids.iter().max() else { break };
                    last = max;
                    n += ids.len() as u64;
                    if ids.len() < page {
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
    (n, n as f64 / started.elapsed().as_secs_f64())
}
