//! Milvus test helpers. Collections are seeded and read back with the SDK's
//! own v1 client, not with vmig's code, so a vmig bug cannot hide itself.
use std::collections::HashMap;

use milvus::client::Client;
use milvus::data::FieldColumn;
use milvus::index::{IndexParams, IndexType, MetricType};
use milvus::options::LoadOptions;
use milvus::query::QueryOptions;
use milvus::schema::{CollectionSchemaBuilder, FieldSchema};
use milvus::value::ValueVec;

use super::{Row, rt};

/// The Milvus started by scripts/dbs.sh (no auth).
pub fn milvus_base() -> String {
    std::env::var("VMIG_TEST_MILVUS").unwrap_or("http://127.0.0.1:19530".into())
}

/// FastGPT's largest safe id is 2^53 - 1; very old deployments used autoID ids above it.
pub const ABOVE_2_53: i64 = 1 << 53;

/// A modeldata row as Milvus holds it (createTime in epoch milliseconds).
#[derive(Clone, Debug, PartialEq)]
pub struct MRow {
    pub id: i64,
    pub vector_bits: Vec<u32>,
    pub team_id: String,
    pub dataset_id: String,
    pub collection_id: String,
    pub create_time_ms: i64,
}

/// (http://host:port, database, user:password) of `http://[user:password@]host:port[/db]`.
fn split(url: &str) -> (String, String, Option<(String, String)>) {
    let rest = url.split_once("://").unwrap().1;
    let (auth, rest) = match rest.split_once('@') {
        Some((a, r)) => (a.split_once(':').map(|(u, p)| (u.to_string(), p.to_string())), r),
        None => (None, rest),
    };
    let (hostport, db) = rest.split_once('/').unwrap_or((rest, "fastgpt"));
    (format!("http://{hostport}"), db.to_string(), auth)
}

async fn connect(base: &str, auth: &Option<(String, String)>) -> Client {
    let mut b = milvus::client::ClientBuilder::new(base.to_string());
    if let Some((u, p)) = auth {
        b = b.username(u).password(p);
    }
    b.build().await.unwrap_or_else(|e| panic!("connect to Milvus: {e}"))
}

async fn client(url: &str) -> Client {
    let (base, db, auth) = split(url);
    let mut c = connect(&base, &auth).await;
    c.using_database(db).await.unwrap();
    c
}

/// Drops database `name` (with its collections) on `base` and creates it empty. Returns its URL.
pub fn fresh_milvus_db_on(base: &str, name: &str) -> String {
    let (plain, _, auth) = split(base);
    rt().block_on(async {
        let c = connect(&plain, &auth).await;
        // Right after a restart Milvus can refuse database calls for a few
        // seconds (its coordinators still starting): each is asked again.
        if settled("listing databases", || c.list_databases()).await.iter().any(|d| d == name) {
            let mut d = connect(&plain, &auth).await;
            d.using_database(name).await.unwrap();
            for coll in d.list_collections().await.unwrap() {
                // Just after a restart Milvus reloads what was loaded, and a
                // drop can time out meanwhile.
                settled(&format!("dropping leftover collection {name}.{coll}"), || d.drop_collection(coll.clone())).await;
            }
            settled("dropping the database", || c.drop_database(name)).await;
        }
        settled("creating the database", || c.create_database(name, None)).await;
    });
    format!("{base}/{name}")
}

/// `call`'s value once it succeeds, asked again every 2 s for up to a minute.
async fn settled<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(what: &str, mut call: impl FnMut() -> F) -> T {
    let mut attempt = 0;
    loop {
        match call().await {
            Ok(v) => return v,
            Err(e) => {
                attempt += 1;
                assert!(attempt < 30, "{what} on Milvus: {e}");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
        }
    }
}

pub fn fresh_milvus_db(name: &str) -> String {
    fresh_milvus_db_on(&milvus_base(), name)
}

/// Deterministic FastGPT-like rows: random-looking ids (some above 2^53),
/// vectors with full float32 mantissas, epoch-ms creation times.
pub fn fastgpt_rows(n: usize, dim: usize, seed: u64) -> Vec<MRow> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut ids = std::collections::BTreeSet::new();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let id = loop {
            let id = if i % 10 == 0 { ABOVE_2_53 + (next() % 1_000_000_000_000) as i64 } else { (next() % 8_999_999_999_999_999) as i64 + 1 };
            if ids.insert(id) {
                break id;
            }
        };
        out.push(MRow {
            id,
            vector_bits: (0..dim).map(|_| (((next() >> 40) as f32 / (1u64 << 24) as f32) - 0.5).to_bits()).collect(),
            team_id: format!("team{}", i % 3),
            dataset_id: format!("dataset{}", i % 7),
            collection_id: format!("coll{:04}", i % 50),
            create_time_ms: 1_700_000_000_000 + (next() % 100_000_000_000) as i64,
        });
    }
    out
}

/// Creates collection `name` as FastGPT does (autoID off unless `auto_id`,
/// dynamic field on), inserts `rows` in `segments` flushed parts in the given
/// order, builds HNSW (IP, M=32, efConstruction=128) and loads it.
pub fn seed_fastgpt(url: &str, name: &str, rows: &[MRow], dim: usize, segments: usize, auto_id: bool) {
    rt().block_on(async {
        let c = client(url).await;
        let schema = CollectionSchemaBuilder::new(name, "FastGPT modeldata")
            .add_field(FieldSchema::new_primary_int64("id", "", auto_id))
            .add_field(FieldSchema::new_float_vector("vector", "", dim as i64))
            .add_field(FieldSchema::new_varchar("teamId", "", 64))
            .add_field(FieldSchema::new_varchar("datasetId", "", 64))
            .add_field(FieldSchema::new_varchar("collectionId", "", 64))
            .add_field(FieldSchema::new_int64("createTime", ""))
            .enable_dynamic_field()
            .build()
            .unwrap();
        c.create_collection(schema.clone(), None).await.unwrap();
        let per = rows.len().div_ceil(segments.max(1)).max(1);
        for part in rows.chunks(per) {
            let mut cols = vec![
                FieldColumn::new(schema.get_field("vector").unwrap(), part.iter().flat_map(|r| r.vector_bits.iter().map(|b| f32::from_bits(*b))).collect::<Vec<f32>>()),
                FieldColumn::new(schema.get_field("teamId").unwrap(), part.iter().map(|r| r.team_id.clone()).collect::<Vec<_>>()),
                FieldColumn::new(schema.get_field("datasetId").unwrap(), part.iter().map(|r| r.dataset_id.clone()).collect::<Vec<_>>()),
                FieldColumn::new(schema.get_field("collectionId").unwrap(), part.iter().map(|r| r.collection_id.clone()).collect::<Vec<_>>()),
                FieldColumn::new(schema.get_field("createTime").unwrap(), part.iter().map(|r| r.create_time_ms).collect::<Vec<i64>>()),
            ];
            if !auto_id {
                cols.insert(0, FieldColumn::new(schema.get_field("id").unwrap(), part.iter().map(|r| r.id).collect::<Vec<i64>>()));
            }
            c.insert(name, cols, None).await.unwrap();
            c.flush(name).await.unwrap();
        }
        let params = HashMap::from([("M".to_string(), "32".to_string()), ("efConstruction".to_string(), "128".to_string())]);
        match c.create_index(name, "vector", IndexParams::new("vector_index".into(), IndexType::HNSW, MetricType::IP, params)).await {
            Ok(()) => {}
            // The SDK (written for 2.3) waits for the index by describing it
            // and cannot read milvus-lite's answer; the index exists, and the
            // load below needs it.
            Err(milvus::error::Error::Unexpected(m)) if m == "failed to describe index" => {}
            Err(e) => panic!("creating index on {name}: {e}"),
        }
        c.load_collection(name, Some(LoadOptions::default())).await.unwrap();
    });
}

/// Writes one row with the SDK's upsert (as FastGPT would rewrite it).
pub fn milvus_upsert(url: &str, name: &str, row: &MRow) {
    write_row(url, name, row, true)
}

/// Writes one row with a plain insert: a second copy when the id is there
/// already, as an upsert leaves behind when Milvus loses its delete.
pub fn milvus_insert_copy(url: &str, name: &str, row: &MRow) {
    write_row(url, name, row, false)
}

/// Deletes one id (every copy of it).
pub fn milvus_delete(url: &str, name: &str, id: i64) {
    rt().block_on(async {
        client(url).await.delete(name, &milvus::mutate::DeleteOptions::with_filter(format!("id in [{id}]"))).await.unwrap();
    });
}

fn write_row(url: &str, name: &str, row: &MRow, upsert: bool) {
    rt().block_on(async {
        let c = client(url).await;
        let cols = vec![
            FieldColumn::new(&FieldSchema::new_primary_int64("id", "", false), vec![row.id]),
            FieldColumn::new(&FieldSchema::new_float_vector("vector", "", row.vector_bits.len() as i64), row.vector_bits.iter().map(|b| f32::from_bits(*b)).collect::<Vec<f32>>()),
            FieldColumn::new(&FieldSchema::new_varchar("teamId", "", 64), vec![row.team_id.clone()]),
            FieldColumn::new(&FieldSchema::new_varchar("datasetId", "", 64), vec![row.dataset_id.clone()]),
            FieldColumn::new(&FieldSchema::new_varchar("collectionId", "", 64), vec![row.collection_id.clone()]),
            FieldColumn::new(&FieldSchema::new_int64("createTime", ""), vec![row.create_time_ms]),
        ];
        if upsert {
            c.upsert(name, cols, None::<milvus::mutate::InsertOptions>).await.unwrap();
        } else {
            c.insert(name, cols, None).await.unwrap();
        }
    });
}

fn longs(c: &FieldColumn) -> Vec<i64> {
    match &c.value {
        ValueVec::Long(v) => v.clone(),
        other => panic!("{}: not Int64: {other:?}", c.name),
    }
}

fn strings(c: &FieldColumn) -> Vec<String> {
    match &c.value {
        ValueVec::String(v) => v.clone(),
        other => panic!("{}: not VarChar: {other:?}", c.name),
    }
}

/// Every row of a FastGPT-shaped collection, ordered by id (the collection
/// must be loaded), after checking that it holds one copy per id: queries
/// return one copy of an id however many Milvus stores, so a strongly
/// consistent `count(*)` must equal the ids read (given the time Milvus 2.3
/// takes to stop over-counting after upserts, see `milvus_count_settled`).
pub fn milvus_rows(url: &str, name: &str) -> Vec<MRow> {
    let rows = milvus_query_rows(url, name);
    let copies = milvus_count_settled(url, name, rows.len() as i64);
    assert_eq!(copies, rows.len() as i64, "{name}: count(*) is {copies} for {} distinct ids: the collection holds second copies", rows.len());
    rows
}

/// Every row as queries show it (one copy per id, whatever count(*) says).
/// Reads every id first, then the rows by id in groups: no reliance on the
/// order of a limited query's reply, which servers differ on (milvus-lite
/// answers segment by segment).
pub fn milvus_query_rows(url: &str, name: &str) -> Vec<MRow> {
    rt().block_on(async {
        let c = client(url).await;
        let strong = || QueryOptions::new().consistency_level(0);
        let ids_of = |cols: &[FieldColumn]| longs(cols.iter().find(|c| c.name == "id").expect("no field id"));
        // No filter (negative ids included): Milvus takes an empty expression with a limit.
        let mut ids = ids_of(&c.query(name, "", &strong().output_fields(vec!["id".to_string()]).limit(16_384)).await.unwrap());
        ids.sort_unstable();
        assert!(ids.len() < 16_384, "milvus_rows reads test-sized collections only");
        let mut out: Vec<MRow> = Vec::new();
        for group in ids.chunks(400) {
            let expr = format!("id in [{}]", group.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(","));
            let opts = strong()
                .output_fields(["id", "vector", "teamId", "datasetId", "collectionId", "createTime"].map(String::from).to_vec())
                .limit(group.len() as i64);
            let cols = c.query(name, &expr, &opts).await.unwrap_or_else(|e| panic!("query {name}: {e}"));
            let get = |n: &str| cols.iter().find(|c| c.name == n).unwrap_or_else(|| panic!("no field {n}"));
            let ids = longs(get("id"));
            let v = get("vector");
            let dim = v.dim as usize;
            let ValueVec::Float(vs) = &v.value else { panic!("vector not float") };
            let (t, d, co, ct) = (strings(get("teamId")), strings(get("datasetId")), strings(get("collectionId")), longs(get("createTime")));
            out.extend((0..ids.len()).map(|i| MRow {
                id: ids[i],
                vector_bits: vs[i * dim..(i + 1) * dim].iter().map(|x| x.to_bits()).collect(),
                team_id: t[i].clone(),
                dataset_id: d[i].clone(),
                collection_id: co[i].clone(),
                create_time_ms: ct[i],
            }));
        }
        out.sort_by_key(|r| r.id);
        out
    })
}

/// `count(*)` of a loaded collection, strongly consistent.
pub fn milvus_count(url: &str, name: &str) -> i64 {
    milvus_count_where(url, name, "")
}

/// `count(*)` of the rows matching `expr` ("" for all), strongly consistent.
pub fn milvus_count_where(url: &str, name: &str, expr: &str) -> i64 {
    // The SDK's plain count() reads at the collection's default (Bounded) consistency.
    let strong = QueryOptions::new().consistency_level(0);
    rt().block_on(async { client(url).await.count_with_expr(name, expr, &strong).await.unwrap_or_else(|e| panic!("count {name} where {expr}: {e}")) })
}

/// `count(*)` once it equals `want`, or its last value after 90 s. Milvus
/// 2.3's count(*) over-counts for a while after many upserts of existing
/// ids (milvus-io/milvus#27515: "if you wait … count(*) returns correct
/// then"), though queries already return each id once; a real duplicate
/// never settles.
pub fn milvus_count_settled(url: &str, name: &str, want: i64) -> i64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        let n = milvus_count(url, name);
        if n == want || std::time::Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// The vector index's parameters as Milvus describes them (raw gRPC: the
/// SDK's v1 client drops Milvus 2.3's nested "params").
pub fn milvus_index_params(url: &str, name: &str) -> String {
    use milvus::proto::milvus::{DescribeIndexRequest, milvus_service_client::MilvusServiceClient};
    let (base, db, _) = split(url);
    rt().block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(base).unwrap().connect().await.unwrap();
        let db: tonic::metadata::MetadataValue<_> = db.parse().unwrap();
        let mut c = MilvusServiceClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("dbname", db.clone());
            Ok(r)
        });
        let r = c
            .describe_index(DescribeIndexRequest { collection_name: name.into(), field_name: "vector".into(), ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        r.index_descriptions.iter().flat_map(|d| d.params.iter().map(|kv| format!("{}={}", kv.key, kv.value))).collect::<Vec<_>>().join("; ")
    })
}

/// Field names, types and autoID of a collection.
pub fn milvus_schema(url: &str, name: &str) -> String {
    rt().block_on(async {
        let c = client(url).await;
        let d = c.describe_collection(name).await.unwrap();
        format!("{:?}", d.schema)
    })
}

/// PostgreSQL / OceanBase rows in Milvus form: createtime floored to milliseconds.
pub fn as_mrows(rows: &[Row]) -> Vec<MRow> {
    rows.iter()
        .map(|r| MRow {
            id: r.id,
            vector_bits: r.vector_bits.clone(),
            team_id: r.team_id.clone(),
            dataset_id: r.dataset_id.clone(),
            collection_id: r.collection_id.clone(),
            create_time_ms: chrono::NaiveDateTime::parse_from_str(r.createtime.as_deref().expect("createtime"), "%Y-%m-%d %H:%M:%S%.f")
                .unwrap_or_else(|e| panic!("createtime {:?}: {e}", r.createtime))
                .and_utc()
                .timestamp_millis(),
        })
        .collect()
}

/// Sorted by id, as the readers return them.
pub fn sorted(mut rows: Vec<MRow>) -> Vec<MRow> {
    rows.sort_by_key(|r| r.id);
    rows
}

/// A Milvus server of the test's own (so the test can stop it).
pub struct PrivateMilvus {
    pub dir: std::path::PathBuf,
    pub base: String,
    pub port: u16,
}

impl PrivateMilvus {
    /// With `auth`, users are on and `base` carries root's default password.
    pub fn start(name: &str, port: u16, auth: bool) -> Self {
        Self::start_with(name, port, if auth { &["auth"] } else { &[] })
    }

    /// `options`: "auth" (users on; `base` carries root's default password)
    /// and "tls" (TLS with a certificate of `dir/tls/ca.pem`; `base` is
    /// `https://`, without credentials).
    pub fn start_with(name: &str, port: u16, options: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("vmig-test-milvus-{name}-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        let port_s = port.to_string();
        let mut args = vec!["milvus-start", dir.to_str().unwrap(), &port_s];
        args.extend(options);
        assert!(super::dbs_script(&args), "milvus did not start");
        // Healthy (its /healthz) can come before the proxy opens its port.
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < std::time::Duration::from_secs(90), "milvus never opened port {port}");
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        let base = if options.contains(&"tls") {
            format!("https://127.0.0.1:{port}")
        } else {
            format!("http://{}127.0.0.1:{port}", if options.contains(&"auth") { "root:Milvus@" } else { "" })
        };
        PrivateMilvus { dir, base, port }
    }

    pub fn stop(&self) {
        super::dbs_script(&["milvus-stop", self.dir.to_str().unwrap()]);
    }

    /// Stops the server and starts it again on the same data (no auth),
    /// until its gRPC port answers. Milvus 2.3 restarted on the same data
    /// now and then reports healthy without ever opening its proxy port (seen
    /// once in CI); then it is restarted again, and its log is shown.
    pub fn restart(&self) {
        for attempt in 1..=3 {
            self.stop();
            assert!(super::dbs_script(&["milvus-start", self.dir.to_str().unwrap(), &self.port.to_string()]), "milvus did not start again");
            let started = std::time::Instant::now();
            while started.elapsed() < std::time::Duration::from_secs(60) {
                if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            let log = std::fs::read_to_string(self.dir.join("wrapper.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            eprintln!("milvus restart {attempt}: port {} closed 60 s after a healthy start; log tail:\n{}", self.port, tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        panic!("milvus never reopened port {} after a restart", self.port);
    }
}

impl Drop for PrivateMilvus {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The ids a writer gives its new rows.
#[derive(Clone, Copy)]
pub enum NewIds {
    /// Int64 ids counting up from this one.
    CountingFrom(i64),
    /// VarChar ids "w-<n>" (the collection is keyed by VarChar).
    Strings,
}

/// FastGPT's traffic on a Milvus source: new rows (`ids`, createTime = now)
/// and whole collections deleted by filter.
pub fn milvus_writer(url: &str, name: &str, dim: usize, ids: NewIds) -> super::online::Writer {
    let (url, name) = (url.to_string(), name.to_string());
    super::online::Writer::spawn(
        move || async move { (client(&url).await, name) },
        move |(c, name), i| {
            Box::pin(async move {
                if i % 4 == 3 {
                    let filter = format!("collectionId == \"col_w{}\"", (i / 4) % 5);
                    c.delete(name.as_str(), &milvus::mutate::DeleteOptions::with_filter(filter)).await.unwrap();
                    return;
                }
                let now = chrono_ms();
                let n = (0..4).map(|k| i * 4 + k);
                let id_column = match ids {
                    NewIds::CountingFrom(first) => FieldColumn::new(&FieldSchema::new_primary_int64("id", "", false), n.map(|n| first + n as i64).collect::<Vec<i64>>()),
                    NewIds::Strings => FieldColumn::new(&FieldSchema::new_primary_varchar("id", "", false, 64), n.map(|n| format!("w-{n}")).collect::<Vec<String>>()),
                };
                let vectors: Vec<f32> = (0..4 * dim).map(|d| ((i as usize * 31 + d * 17) % 1000) as f32 / 1000.0 - 0.5).collect();
                let cols = vec![
                    id_column,
                    FieldColumn::new(&FieldSchema::new_float_vector("vector", "", dim as i64), vectors),
                    FieldColumn::new(&FieldSchema::new_varchar("teamId", "", 64), vec!["team_w".to_string(); 4]),
                    FieldColumn::new(&FieldSchema::new_varchar("datasetId", "", 64), vec!["ds_w".to_string(); 4]),
                    FieldColumn::new(&FieldSchema::new_varchar("collectionId", "", 64), vec![format!("col_w{}", i % 5); 4]),
                    FieldColumn::new(&FieldSchema::new_int64("createTime", ""), vec![now; 4]),
                ];
                c.insert(name.as_str(), cols, None).await.unwrap();
            })
        },
    )
}

fn chrono_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// The newer-protocol server (milvus-lite, started by scripts/dbs.sh).
pub fn lite_base() -> String {
    std::env::var("VMIG_TEST_MILVUS_LITE").unwrap_or("http://127.0.0.1:19640".into())
}

/// Runs a pymilvus script of tests/fixtures (FastGPT's own way to create
/// and read collections, independent of vmig) and parses its JSON line.
pub fn pymilvus(script: &str, args: &[&str]) -> serde_json::Value {
    let python = std::env::var("VMIG_TEST_PYMILVUS").expect("VMIG_TEST_PYMILVUS (scripts/dbs.sh env) names the python with pymilvus");
    let path = format!("{}/tests/fixtures/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(python).arg(&path).args(args).output().unwrap();
    assert!(out.status.success(), "{script} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{script}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}
