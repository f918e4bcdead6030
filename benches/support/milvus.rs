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
/// Upsert request size vmig uses (src/endpoint/milvus_sink.rs).
pub const REQUEST_BYTES: usize = 16 << 20;

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
        let d = client(base, Some(name)).await;
        for coll in d.list_collections().await.unwrap() {
            d.drop_collection(coll).await.unwrap();
        }
        c.drop_database(name).await.unwrap();
    }
    c.create_database(name, None).await.unwrap();
    format!("{base}/{name}")
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

fn columns(s: &CollectionSchema, ids: &[i64], dim: u32) -> Vec<FieldColumn> {
    let x = |id: i64, j: u32| ((id as u32).wrapping_mul(2654435761).wrapping_add(j.wrapping_mul(40503)) % 20000) as f32 / 10000.0 - 1.0;
    let f = |n: &str| s.get_field(n).unwrap();
    vec![
        FieldColumn::new(f("id"), ids.to_vec()),
        FieldColumn::new(f("vector"), ids.iter().flat_map(|&id| (0..dim).map(move |j| x(id, j))).collect::<Vec<f32>>()),
        FieldColumn::new(f("teamId"), ids.iter().map(|i| format!("team-{}", i % 7)).collect::<Vec<_>>()),
        FieldColumn::new(f("datasetId"), ids.iter().map(|i| format!("dataset-{}", i % 31)).collect::<Vec<_>>()),
        FieldColumn::new(f("collectionId"), ids.iter().map(|i| format!("collection-{}", i % 97)).collect::<Vec<_>>()),
        FieldColumn::new(f("createTime"), ids.iter().map(|i| 1_735_689_600_123 + i).collect::<Vec<i64>>()),
    ]
}

/// Rows/s of a plain SDK upsert loop of `rows` synthetic rows over STREAMS
/// connections, in requests of REQUEST_BYTES, then one flush.
pub async fn raw_upsert(url: &str, rows: u64, dim: u32) -> f64 {
    let (base, db) = split(url);
    let s = schema(dim);
    client(base, Some(db)).await.create_collection(s.clone(), None).await.unwrap();
    let per_request = (REQUEST_BYTES / (dim as usize * 4 + 64)).max(1);
    let started = Instant::now();
    let tasks: Vec<_> = (0..STREAMS as i64)
        .map(|w| {
            let (base, db, s) = (base.to_string(), db.to_string(), s.clone());
            tokio::spawn(async move {
                let c = client(&base, Some(&db)).await;
                let ids: Vec<i64> = (1..=rows as i64).filter(|i| i % STREAMS as i64 == w).collect();
                for part in ids.chunks(per_request) {
                    c.upsert("modeldata", columns(&s, part, dim), None::<InsertOptions>).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    client(base, Some(db)).await.flush("modeldata").await.unwrap();
    rows as f64 / started.elapsed().as_secs_f64()
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

/// Rows/s of plain keyset reads (`id > last`, `limit page`) of the whole
/// collection, the id space split between STREAMS connections.
pub async fn raw_keyset_read(url: &str, rows: u64, page: usize) -> f64 {
    let (base, db) = split(url);
    let started = Instant::now();
    let step = rows as i64 / STREAMS as i64 + 1;
    let tasks: Vec<_> = (0..STREAMS as i64)
        .map(|w| {
            let (base, db) = (base.to_string(), db.to_string());
            tokio::spawn(async move {
                let c = client(&base, Some(&db)).await;
                let (mut last, end) = (w * step, (w + 1) * step);
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
    assert_eq!(n, rows);
    n as f64 / started.elapsed().as_secs_f64()
}
