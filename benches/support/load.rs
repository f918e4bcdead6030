//! FastGPT-like insert loads on each kind of source, for the online
//! benchmark: new rows copied from a seed pool (PostgreSQL, OceanBase) or
//! made in memory (Milvus: new ids, createTime = now, as FastGPT inserts).

use mysql_async::prelude::Queryable;

pub enum Load {
    Postgres(tokio_postgres::Client),
    OceanBase(mysql_async::Conn),
    Milvus { client: milvus::client::Client, next_id: i64, dim: u32 },
}

impl Load {
    /// Connects to a source whose `modeldata_seed` (SQL sources) holds the pool.
    pub async fn connect(kind: &str, url: &str, dim: u32) -> Load {
        match kind {
            "pg" => Load::Postgres(super::postgres::client(url).await),
            "ob" => Load::OceanBase(super::oceanbase::conn(url).await),
            "milvus" => {
                let (base, db) = url.rsplit_once('/').unwrap();
                let mut client = milvus::client::Client::new(base.to_string()).await.unwrap();
                client.using_database(db).await.unwrap();
                // Ids never used before, however many loads connect in a run.
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
                Load::Milvus { client, next_id: (1 << 40) + (now - 1_700_000_000_000) * 1000, dim }
            }
            other => panic!("unknown source kind {other}"),
        }
    }

    /// The id the next Milvus row gets (ids are consecutive within one load).
    pub fn next_milvus_id(&self) -> Option<i64> {
        match self {
            Load::Milvus { next_id, .. } => Some(*next_id),
            _ => None,
        }
    }

    /// Inserts `n` rows in one transaction (one request for Milvus), tagged `team`.
    pub async fn insert(&mut self, n: u64, team: &str) {
        match self {
            Load::Postgres(c) => c
                .batch_execute(&format!(
                    "INSERT INTO modeldata (vector, team_id, dataset_id, collection_id) \
                     SELECT vector, '{team}', dataset_id, collection_id FROM modeldata_seed ORDER BY random() LIMIT {n}"
                ))
                .await
                .unwrap(),
            Load::OceanBase(c) => c
                .query_drop(format!(
                    "INSERT INTO modeldata (vector, team_id, dataset_id, collection_id) \
                     SELECT vector, '{team}', dataset_id, collection_id FROM modeldata_seed ORDER BY rand() LIMIT {n}"
                ))
                .await
                .unwrap(),
            Load::Milvus { client, next_id, dim } => {
                use milvus::data::FieldColumn;
                use milvus::schema::FieldSchema;
                let dim = *dim as usize;
                let ids: Vec<i64> = (0..n as i64).map(|k| *next_id + k).collect();
                *next_id += n as i64;
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
                let vectors: Vec<f32> =
                    ids.iter().flat_map(|id| (0..dim).map(move |d| ((*id as usize * 31 + d * 17) % 2000) as f32 / 1000.0 - 1.0)).collect();
                let s = n as usize;
                let cols = vec![
                    FieldColumn::new(&FieldSchema::new_primary_int64("id", "", false), ids),
                    FieldColumn::new(&FieldSchema::new_float_vector("vector", "", dim as i64), vectors),
                    FieldColumn::new(&FieldSchema::new_varchar("teamId", "", 64), vec![team.to_string(); s]),
                    FieldColumn::new(&FieldSchema::new_varchar("datasetId", "", 64), vec!["ds-bench".to_string(); s]),
                    FieldColumn::new(&FieldSchema::new_varchar("collectionId", "", 64), vec!["col-bench".to_string(); s]),
                    FieldColumn::new(&FieldSchema::new_int64("createTime", ""), vec![now; s]),
                ];
                client.insert("modeldata", cols, None).await.unwrap();
            }
        }
    }

    /// Single-row inserts per second over `n` of them (the source's own write rate).
    /// A FastGPT-like insert load: `rate` rows/s in transactions of 10 rows
    /// for `secs`, calling `tick` after each; returns the rows inserted.
    pub async fn steady(&mut self, rate: u64, secs: u64, mut tick: impl FnMut()) -> u64 {
        let t = std::time::Instant::now();
        let period = std::time::Duration::from_secs_f64(10.0 / rate as f64);
        let mut next = std::time::Instant::now();
        let mut rows = 0u64;
        while t.elapsed() < std::time::Duration::from_secs(secs) {
            self.insert(10, "bench").await;
            rows += 10;
            tick();
            next += period;
            if let Some(d) = next.checked_duration_since(std::time::Instant::now()) {
                tokio::time::sleep(d).await;
            }
        }
        rows
    }

    pub async fn single_row_rate(&mut self, n: u64) -> f64 {
        let t = std::time::Instant::now();
        for _ in 0..n {
            self.insert(1, "rate").await;
        }
        n as f64 / t.elapsed().as_secs_f64()
    }
}
