//! Milvus endpoint over the gRPC client that milvus-sdk-rust generates
//! (`milvus::proto`): the SDK's v1 client cannot poll flush state, send a
//! bare token or raise its 4 MiB response limit, and its v2 client converts
//! every value through its own row model; the generated client lets columns
//! go straight between Arrow arrays and Milvus `FieldData`.
//!
//! This module connects and maps schemas (SQL columns ↔ Milvus fields) and
//! holds the Source; the Sink is in `milvus_sink.rs`.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use arrow::array::{
    Array, ArrayRef, BooleanArray, FixedSizeListArray, Float32Array, Float64Array, Int16Array, Int32Array,
    Int64Array, StringArray, TimestampMicrosecondArray, UInt32Array,
};
use arrow::datatypes::Int64Type;
use arrow::record_batch::RecordBatch;
use base64::Engine;
use milvus::proto::common::{self, ConsistencyLevel, KeyValuePair, MsgBase, MsgType};
use milvus::proto::milvus::milvus_service_client::MilvusServiceClient;
use milvus::proto::milvus::{
    DescribeCollectionRequest, DescribeIndexRequest, GetLoadingProgressRequest, HasCollectionRequest,
    ListDatabasesRequest, LoadCollectionRequest, QueryRequest,
};
use milvus::proto::schema::{self, CollectionSchema, DataType, FieldData, field_data, scalar_field, vector_field};
use tokio::runtime::Handle;
use tonic::codegen::InterceptedService;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::Source;
use crate::config::{FieldMap, MilvusUrl};
use crate::plan::{ChunkRange, ranges_from_bounds};
use crate::schema::{ColumnSpec, ColumnType, IndexKind, IndexSpec, Metric, TableSpec, vector_item_field};

/// Query responses may be this large; the client's default (4 MiB) stops at
/// ~680 rows of 1536-d.
const MAX_MESSAGE_BYTES: usize = 256 << 20;
/// Bytes of rows per read page.
const PAGE_BYTES: usize = 16 << 20;
/// Milvus refuses `limit` (plus offset) above this.
pub const MAX_QUERY_LIMIT: usize = 16_384;
/// The field Milvus keeps dynamic (schema-less) values in.
const DYNAMIC_FIELD: &str = "$meta";

// ---------------------------------------------------------------- connection

/// Adds the token and database to every call, as Milvus' own SDKs do.
#[derive(Clone)]
pub struct CallMetadata {
    authorization: Option<MetadataValue<Ascii>>,
    database: MetadataValue<Ascii>,
}

impl Interceptor for CallMetadata {
    fn call(&mut self, mut req: tonic::Request<()>) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(a) = &self.authorization {
            req.metadata_mut().insert("authorization", a.clone());
        }
        req.metadata_mut().insert("dbname", self.database.clone());
        Ok(req)
    }
}

pub type Grpc = MilvusServiceClient<InterceptedService<Channel, CallMetadata>>;

/// One connection (an HTTP/2 channel; clones share it).
#[derive(Clone)]
pub struct Milvus {
    pub grpc: Grpc,
    pub url: MilvusUrl,
    handle: Handle,
}

/// Fails on a non-success status, with Milvus' reason.
#[allow(deprecated)]
pub fn check_status(status: &Option<common::Status>, what: &str) -> Result<()> {
    match status {
        Some(s) if s.code != 0 || s.error_code != 0 => {
            bail!("{what}: {} (Milvus code {})", s.reason, if s.code != 0 { s.code } else { s.error_code })
        }
        _ => Ok(()),
    }
}

pub fn base(t: MsgType) -> Option<MsgBase> {
    Some(MsgBase::new(t))
}

impl Milvus {
    pub fn connect(url: &MilvusUrl, handle: &Handle) -> Result<Milvus> {
        let authorization = match url.token() {
            Some(t) => Some(
                base64::engine::general_purpose::STANDARD
                    .encode(t)
                    .parse()
                    .map_err(|_| anyhow!("the Milvus token cannot be sent as gRPC metadata"))?,
            ),
            None => None,
        };
        let database = url.database.parse().map_err(|_| anyhow!("invalid Milvus database name {:?}", url.database))?;
        let mut ep = Endpoint::from_shared(url.grpc_address())
            .map_err(|e| anyhow!("invalid Milvus address {}: {e}", url.redacted()))?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        if url.tls {
            ep = ep.tls_config(ClientTlsConfig::new().with_native_roots()).context("Milvus TLS configuration")?;
        }
        let channel = handle
            .block_on(ep.connect())
            .map_err(|e| anyhow!("cannot connect to Milvus at {}: {}", url.redacted(), error_chain(&e)))?;
        let grpc = MilvusServiceClient::with_interceptor(channel, CallMetadata { authorization, database })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Milvus { grpc, url: url.clone(), handle: handle.clone() })
    }

    pub fn block_on<T>(&self, f: impl Future<Output = T>) -> T {
        self.handle.block_on(f)
    }

    pub fn database_exists(&self) -> Result<bool> {
        let mut c = self.grpc.clone();
        let r = self
            .block_on(c.list_databases(ListDatabasesRequest { base: base(MsgType::ListDatabases) }))
            .map_err(|e| self.rpc_error("listing databases", e))?
            .into_inner();
        check_status(&r.status, "listing databases")?;
        Ok(r.db_names.iter().any(|d| d == &self.url.database))
    }

    pub fn has_collection(&self, name: &str) -> Result<bool> {
        let mut c = self.grpc.clone();
        let r = self
            .block_on(c.has_collection(HasCollectionRequest {
                base: base(MsgType::HasCollection),
                db_name: self.url.database.clone(),
                collection_name: name.into(),
                time_stamp: 0,
            }))
            .map_err(|e| self.rpc_error("checking the collection", e))?
            .into_inner();
        check_status(&r.status, "checking the collection")?;
        Ok(r.value)
    }

    pub fn describe(&self, name: &str) -> Result<CollectionSchema> {
        let mut c = self.grpc.clone();
        let r = self
            .block_on(c.describe_collection(DescribeCollectionRequest {
                base: base(MsgType::DescribeCollection),
                db_name: self.url.database.clone(),
                collection_name: name.into(),
                ..Default::default()
            }))
            .map_err(|e| self.rpc_error("describing the collection", e))?
            .into_inner();
        check_status(&r.status, &format!("describing collection {name} in {}", self.url.redacted()))?;
        r.schema.ok_or_else(|| anyhow!("Milvus returned no schema for collection {name}"))
    }

    /// Index descriptions; none when the collection has no index.
    pub fn indexes(&self, name: &str) -> Result<Vec<milvus::proto::milvus::IndexDescription>> {
        let mut c = self.grpc.clone();
        let r = self
            .block_on(c.describe_index(DescribeIndexRequest {
                base: base(MsgType::DescribeIndex),
                db_name: self.url.database.clone(),
                collection_name: name.into(),
                ..Default::default()
            }))
            .map_err(|e| self.rpc_error("describing indexes", e))?
            .into_inner();
        if let Some(s) = &r.status {
            // "index not found" is how Milvus says there are none.
            if s.code != 0 && s.reason.to_ascii_lowercase().contains("index not") {
                return Ok(Vec::new());
            }
            #[allow(deprecated)]
            if s.error_code == common::ErrorCode::IndexNotExist as i32 {
                return Ok(Vec::new());
            }
        }
        check_status(&r.status, "describing indexes")?;
        Ok(r.index_descriptions)
    }

    /// Loads the collection (reads and counts need it) and waits until it is.
    pub fn load(&self, name: &str) -> Result<()> {
        let mut c = self.grpc.clone();
        let r = self
            .block_on(c.load_collection(LoadCollectionRequest {
                base: base(MsgType::LoadCollection),
                db_name: self.url.database.clone(),
                collection_name: name.into(),
                ..Default::default()
            }))
            .map_err(|e| self.rpc_error("loading the collection", e))?
            .into_inner();
        check_status(&Some(r), &format!("loading collection {name}"))?;
        let started = Instant::now();
        loop {
            let p = self
                .block_on(c.get_loading_progress(GetLoadingProgressRequest {
                    base: base(MsgType::LoadCollection),
                    collection_name: name.into(),
                    db_name: self.url.database.clone(),
                    ..Default::default()
                }))
                .map_err(|e| self.rpc_error("waiting for the load", e))?
                .into_inner();
            check_status(&p.status, "waiting for the load")?;
            if p.progress >= 100 {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(1800) {
                bail!("collection {name} did not finish loading in 30 minutes ({}%)", p.progress);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs a query; `limit` 0 means none (count(*) takes none).
    pub fn query(&self, collection: &str, expr: &str, output: &[String], limit: usize) -> Result<Vec<FieldData>> {
        let mut c = self.grpc.clone();
        let mut params = Vec::new();
        if limit > 0 {
            params.push(KeyValuePair { key: "limit".into(), value: limit.to_string() });
        }
        let r = self
            .block_on(c.query(QueryRequest {
                base: base(MsgType::Retrieve),
                db_name: self.url.database.clone(),
                collection_name: collection.into(),
                expr: expr.into(),
                output_fields: output.to_vec(),
                query_params: params,
                // Reads must see every acknowledged write.
                consistency_level: ConsistencyLevel::Strong as i32,
                use_default_consistency: false,
                ..Default::default()
            }))
            .map_err(|e| self.rpc_error("query", e))?
            .into_inner();
        check_status(&r.status, &format!("query `{expr}` on {collection}"))?;
        Ok(r.fields_data)
    }

    /// Rows in the collection, strongly consistent (the collection must be loaded).
    pub fn count(&self, collection: &str) -> Result<u64> {
        let data = self.query(collection, "", &["count(*)".to_string()], 0)?;
        let n = data
            .first()
            .and_then(|f| match &f.field {
                Some(field_data::Field::Scalars(s)) => match &s.data {
                    Some(scalar_field::Data::LongData(l)) => l.data.first().copied(),
                    _ => None,
                },
                _ => None,
            })
            .ok_or_else(|| anyhow!("count(*) on {collection} returned no number"))?;
        Ok(n as u64)
    }

    pub fn rpc_error(&self, what: &str, e: tonic::Status) -> anyhow::Error {
        anyhow!("{what} on {}: {} ({:?})", self.url.redacted(), e.message(), e.code())
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

// ---------------------------------------------------------------- schema mapping

/// How one Milvus field is held in Arrow.
#[derive(Clone, Debug, PartialEq)]
pub enum FieldKind {
    Int64,
    Int32,
    Int16,
    Int8,
    Bool,
    Float,
    Double,
    /// `max_len` in bytes, as Milvus counts.
    VarChar { max_len: u32 },
    Json,
    FloatVector { dim: u32 },
    /// Int64 epoch milliseconds that the SQL side holds as a timestamp.
    EpochMs,
}

#[derive(Clone, Debug)]
pub struct FieldInfo {
    pub column: String,
    pub field: String,
    pub kind: FieldKind,
}

/// A collection seen through the mapping: its SQL-side spec and how each
/// column becomes a field.
#[derive(Clone, Debug)]
pub struct Collection {
    pub spec: TableSpec,
    /// In `spec.columns` order.
    pub fields: Vec<FieldInfo>,
    pub pk_field: String,
    pub auto_id: bool,
    pub dynamic: bool,
}

fn type_param(f: &schema::FieldSchema, key: &str) -> Option<u32> {
    f.type_params.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.parse().ok())
}

pub fn column_of<'a>(map: &'a [FieldMap], field: &'a str) -> (&'a str, bool) {
    map.iter().find(|m| m.field == field).map(|m| (m.column.as_str(), m.epoch_ms)).unwrap_or((field, false))
}

pub fn field_of<'a>(map: &'a [FieldMap], column: &'a str) -> &'a str {
    map.iter().find(|m| m.column == column).map(|m| m.field.as_str()).unwrap_or(column)
}

pub fn metric_from_milvus(s: &str) -> Option<Metric> {
    match s.to_ascii_uppercase().as_str() {
        "IP" => Some(Metric::InnerProduct),
        "COSINE" => Some(Metric::Cosine),
        "L2" => Some(Metric::L2),
        _ => None,
    }
}

pub fn metric_to_milvus(m: Metric) -> &'static str {
    match m {
        Metric::InnerProduct => "IP",
        Metric::Cosine => "COSINE",
        Metric::L2 => "L2",
    }
}

/// Maps a collection's schema and indexes to a table spec. Fails, before any
/// write, on what the mapping cannot express.
pub fn map_collection(
    name: &str,
    schema: &CollectionSchema,
    indexes: &[milvus::proto::milvus::IndexDescription],
    map: &[FieldMap],
) -> Result<Collection> {
    let mut columns = Vec::new();
    let mut fields = Vec::new();
    let mut pk = None;
    let mut auto_id = false;
    for f in &schema.fields {
        if f.is_dynamic || f.name == DYNAMIC_FIELD {
            continue;
        }
        if f.is_function_output {
            // Computed by Milvus from another field (BM25 sparse vectors).
            continue;
        }
        let (column, epoch_ms) = column_of(map, &f.name);
        let dt = DataType::try_from(f.data_type).unwrap_or(DataType::None);
        let (kind, ty) = match dt {
            DataType::Int64 if epoch_ms => (FieldKind::EpochMs, ColumnType::Timestamp { utc: false }),
            _ if epoch_ms => bail!(
                "collection {name}: field {} is mapped to the timestamp column {column} (epoch milliseconds) but is {dt:?}, not Int64",
                f.name
            ),
            DataType::Int64 => (FieldKind::Int64, ColumnType::Int64),
            DataType::Int32 => (FieldKind::Int32, ColumnType::Int32),
            DataType::Int16 => (FieldKind::Int16, ColumnType::Int16),
            DataType::Int8 => (FieldKind::Int8, ColumnType::Int16),
            DataType::Bool => (FieldKind::Bool, ColumnType::Bool),
            DataType::Float => (FieldKind::Float, ColumnType::Float32),
            DataType::Double => (FieldKind::Double, ColumnType::Float64),
            DataType::VarChar | DataType::String => {
                let max_len = type_param(f, "max_length").unwrap_or(65_535);
                (FieldKind::VarChar { max_len }, ColumnType::Text { max_chars: Some(max_len) })
            }
            DataType::Json => (FieldKind::Json, ColumnType::Json { binary: true }),
            DataType::FloatVector => {
                let dim = type_param(f, "dim").ok_or_else(|| anyhow!("collection {name}: vector field {} has no dim", f.name))?;
                (FieldKind::FloatVector { dim }, ColumnType::Vector { dim })
            }
            other => bail!(
                "collection {name}: field {} has type {other:?}, which vmig cannot map to a table column \
                 (supported: integers, Bool, Float, Double, VarChar, JSON, FloatVector)",
                f.name
            ),
        };
        if f.is_primary_key {
            if !matches!(kind, FieldKind::Int64) {
                bail!("collection {name}: primary key {} is {dt:?}; only Int64 primary keys are supported yet", f.name);
            }
            pk = Some((column.to_string(), f.name.clone()));
            auto_id = f.auto_id;
        }
        columns.push(ColumnSpec {
            name: column.to_string(),
            ty,
            nullable: f.nullable,
            // FastGPT on PostgreSQL/OceanBase lets the database number new
            // rows: a SQL target gets a sequence / AUTO_INCREMENT above max(id).
            auto_increment: f.is_primary_key,
            default_now: false,
        });
        fields.push(FieldInfo { column: column.to_string(), field: f.name.clone(), kind });
    }
    let (pk_column, pk_field) = pk.ok_or_else(|| anyhow!("collection {name} has no primary key"))?;
    let mut spec_indexes = Vec::new();
    for ix in indexes {
        let Some(info) = fields.iter().find(|f| f.field == ix.field_name) else { continue };
        let param = |k: &str| ix.params.iter().find(|kv| kv.key.eq_ignore_ascii_case(k)).map(|kv| kv.value.clone());
        // Parameters come as "params": {"M":..,"efConstruction":..} or as separate pairs.
        let nested: serde_json::Value =
            param("params").and_then(|p| serde_json::from_str(&p).ok()).unwrap_or(serde_json::Value::Null);
        let number = |k: &str| -> Option<u32> {
            param(k).and_then(|v| v.parse().ok()).or_else(|| {
                nested.get(k).and_then(|v| v.as_u64().map(|n| n as u32).or_else(|| v.as_str().and_then(|s| s.parse().ok())))
            })
        };
        if matches!(info.kind, FieldKind::FloatVector { .. }) {
            let metric = param("metric_type").and_then(|m| metric_from_milvus(&m)).unwrap_or(Metric::InnerProduct);
            let hnsw = param("index_type").is_some_and(|t| t.eq_ignore_ascii_case("HNSW"));
            spec_indexes.push(IndexSpec {
                name: ix.index_name.clone(),
                columns: vec![info.column.clone()],
                kind: IndexKind::Hnsw {
                    metric,
                    // Other index types (IVF, DiskANN…) become FastGPT's HNSW.
                    m: number("M").filter(|_| hnsw).unwrap_or(32),
                    ef_construction: number("efConstruction").filter(|_| hnsw).unwrap_or(128),
                    quantization: None,
                },
            });
        } else if info.field != pk_field {
            spec_indexes.push(IndexSpec {
                name: ix.index_name.clone(),
                columns: vec![info.column.clone()],
                kind: IndexKind::Btree { unique: false },
            });
        }
    }
    let spec = TableSpec { name: name.to_string(), columns, primary_key: pk_column, indexes: spec_indexes };
    spec.validate()?;
    Ok(Collection { spec, fields, pk_field, auto_id, dynamic: schema.enable_dynamic_field })
}

pub fn discover(conn: &Milvus, name: &str, map: &[FieldMap]) -> Result<Collection> {
    if !conn.has_collection(name)? {
        bail!("collection {name} not found in Milvus database {} ({})", conn.url.database, conn.url.redacted());
    }
    let schema = conn.describe(name)?;
    let indexes = conn.indexes(name)?;
    map_collection(name, &schema, &indexes, map)
}

/// `pk > last` within `[lo, hi]`; bounds at the ends of i64 are left out
/// (Milvus cannot parse -9223372036854775808).
pub fn range_expr(pk: &str, lo: i64, hi: i64, after: Option<i64>) -> String {
    let mut parts = Vec::new();
    match after {
        Some(a) => parts.push(format!("{pk} > {a}")),
        None if lo != i64::MIN => parts.push(format!("{pk} >= {lo}")),
        None => {}
    }
    if hi != i64::MAX {
        parts.push(format!("{pk} <= {hi}"));
    }
    parts.join(" and ")
}

// ---------------------------------------------------------------- decoding

fn scalar(fd: &FieldData) -> Option<&scalar_field::Data> {
    match &fd.field {
        Some(field_data::Field::Scalars(s)) => s.data.as_ref(),
        _ => None,
    }
}

/// One field of a query result as the Arrow column of `info`.
pub fn decode_field(info: &FieldInfo, fd: &FieldData) -> Result<ArrayRef> {
    let bad = || anyhow!("Milvus returned field {} in an unexpected form", info.field);
    Ok(match (&info.kind, scalar(fd)) {
        (FieldKind::Int64, Some(scalar_field::Data::LongData(l))) => Arc::new(Int64Array::from(l.data.clone())),
        (FieldKind::EpochMs, Some(scalar_field::Data::LongData(l))) => {
            let us = l
                .data
                .iter()
                .map(|ms| ms.checked_mul(1000).ok_or_else(|| anyhow!("{}: {ms} ms is out of range", info.field)))
                .collect::<Result<Vec<i64>>>()?;
            Arc::new(TimestampMicrosecondArray::from(us))
        }
        (FieldKind::Int32, Some(scalar_field::Data::IntData(l))) => Arc::new(Int32Array::from(l.data.clone())),
        (FieldKind::Int16 | FieldKind::Int8, Some(scalar_field::Data::IntData(l))) => {
            Arc::new(l.data.iter().map(|v| *v as i16).collect::<Int16Array>())
        }
        (FieldKind::Bool, Some(scalar_field::Data::BoolData(l))) => Arc::new(BooleanArray::from(l.data.clone())),
        (FieldKind::Float, Some(scalar_field::Data::FloatData(l))) => Arc::new(Float32Array::from(l.data.clone())),
        (FieldKind::Double, Some(scalar_field::Data::DoubleData(l))) => Arc::new(Float64Array::from(l.data.clone())),
        (FieldKind::VarChar { .. }, Some(scalar_field::Data::StringData(l))) => {
            Arc::new(StringArray::from_iter_values(l.data.iter()))
        }
        (FieldKind::Json, Some(scalar_field::Data::JsonData(l))) => Arc::new(StringArray::from(
            l.data
                .iter()
                .map(|b| std::str::from_utf8(b).map_err(|_| anyhow!("{}: JSON value is not UTF-8", info.field)))
                .collect::<Result<Vec<&str>>>()?,
        )),
        (FieldKind::FloatVector { dim }, _) => {
            let Some(field_data::Field::Vectors(v)) = &fd.field else { return Err(bad()) };
            let Some(vector_field::Data::FloatVector(f)) = &v.data else { return Err(bad()) };
            let values = Float32Array::from(f.data.clone());
            Arc::new(FixedSizeListArray::try_new(vector_item_field(), *dim as i32, Arc::new(values), None)?)
        }
        _ => return Err(bad()),
    })
}

/// Dynamic values would be lost on the way: refuse them, naming a row.
fn check_no_dynamic_values(fd: &FieldData, ids: &Int64Array, collection: &str) -> Result<()> {
    if let Some(scalar_field::Data::JsonData(l)) = scalar(fd) {
        for (i, v) in l.data.iter().enumerate() {
            let s = String::from_utf8_lossy(v);
            let t = s.trim();
            if !t.is_empty() && t != "{}" && t != "null" {
                bail!(
                    "collection {collection}: row id {} has dynamic fields {t}; vmig copies declared fields only, \
                     declare them in the collection schema first",
                    ids.value(i)
                );
            }
        }
    }
    Ok(())
}

/// A query result as a batch in the order of `coll.spec`, sorted by id.
pub fn decode_result(coll: &Collection, data: &[FieldData]) -> Result<RecordBatch> {
    let find = |name: &str| data.iter().find(|f| f.field_name == name);
    let cols = coll
        .fields
        .iter()
        .map(|info| {
            let fd = find(&info.field).ok_or_else(|| anyhow!("Milvus left field {} out of the result", info.field))?;
            decode_field(info, fd)
        })
        .collect::<Result<Vec<_>>>()?;
    let batch = RecordBatch::try_new(coll.spec.arrow_schema(), cols).context("assembling a Milvus page")?;
    let pk = batch.column(coll.spec.pk_index()).as_any().downcast_ref::<Int64Array>().unwrap().clone();
    if coll.dynamic {
        if let Some(fd) = find(DYNAMIC_FIELD) {
            check_no_dynamic_values(fd, &pk, &coll.spec.name)?;
        }
    }
    if pk.values().windows(2).all(|w| w[0] < w[1]) {
        return Ok(batch);
    }
    let order: UInt32Array = arrow::compute::sort_to_indices(&pk, None, None)?;
    Ok(arrow::compute::take_record_batch(&batch, &order)?)
}

// ---------------------------------------------------------------- source

pub struct MilvusSource {
    conn: Milvus,
    coll: Collection,
    output: Vec<String>,
    page_rows: usize,
}

impl MilvusSource {
    pub fn open(url: MilvusUrl, collection: &str, handle: Handle) -> Result<Self> {
        let conn = Milvus::connect(&url, &handle)?;
        if !conn.database_exists()? {
            bail!("Milvus database {} does not exist on {}", url.database, url.redacted());
        }
        let coll = discover(&conn, collection, &url.fields)?;
        if !coll.spec.indexes.iter().any(|i| matches!(i.kind, IndexKind::Hnsw { .. })) {
            bail!("collection {collection} has no vector index, so Milvus cannot load it for reading; create one first");
        }
        conn.load(collection)?;
        let mut output: Vec<String> = coll.fields.iter().map(|f| f.field.clone()).collect();
        if coll.dynamic {
            output.push(DYNAMIC_FIELD.into());
        }
        let row_bytes = crate::pipeline::estimate_row_bytes(&coll.spec).max(1);
        let page_rows = std::env::var("VMIG_MILVUS_PAGE_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(PAGE_BYTES / row_bytes)
            .clamp(1, MAX_QUERY_LIMIT);
        Ok(MilvusSource { conn, coll, output, page_rows })
    }

    /// Ids in `[lo, hi]` page by page (`pk > last`, sorted by id).
    fn pages(&self, lo: i64, hi: i64, output: &[String], limit: usize, f: &mut dyn FnMut(RecordBatch) -> Result<()>) -> Result<()> {
        let name = &self.coll.spec.name;
        let pk = &self.coll.pk_field;
        let mut after = None;
        loop {
            let expr = range_expr(pk, lo, hi, after);
            let data = self.conn.query(name, &expr, output, limit)?;
            let batch = if output.len() == 1 {
                let info = self.coll.fields.iter().find(|f| &f.field == pk).unwrap();
                let fd = data.iter().find(|d| &d.field_name == pk).ok_or_else(|| anyhow!("query returned no ids"))?;
                let ids = decode_field(info, fd)?;
                let ids = arrow::compute::sort(&ids, None)?;
                RecordBatch::try_from_iter([("id", ids)])?
            } else {
                decode_result(&self.coll, &data)?
            };
            let n = batch.num_rows();
            if n == 0 {
                return Ok(());
            }
            let ids = batch.column_by_name(if output.len() == 1 { "id" } else { &self.coll.spec.primary_key }).unwrap();
            let ids = ids.as_any().downcast_ref::<Int64Array>().unwrap();
            let last = ids.value(n - 1);
            if after.is_some_and(|a| ids.value(0) <= a) {
                bail!("Milvus returned ids out of order while paging {name}");
            }
            f(batch)?;
            if n < limit {
                return Ok(());
            }
            after = Some(last);
        }
    }
}

impl Source for MilvusSource {
    fn describe(&self) -> String {
        format!("{} collection {}", self.conn.url.redacted(), self.coll.spec.name)
    }

    fn spec(&self) -> &TableSpec {
        &self.coll.spec
    }

    fn timestamps_ms(&self) -> bool {
        true
    }

    fn plan(&self, chunk_rows: u64) -> Result<Vec<ChunkRange>> {
        // Walk the ids (8 bytes each) and note every chunk_rows-th.
        let mut bounds = Vec::new();
        let mut total = 0u64;
        let limit = if std::env::var_os("VMIG_MILVUS_PAGE_ROWS").is_some() { self.page_rows } else { MAX_QUERY_LIMIT };
        self.pages(i64::MIN, i64::MAX, &[self.coll.pk_field.clone()], limit, &mut |b| {
            let ids = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
            for i in 0..ids.len() {
                total += 1;
                if total % chunk_rows == 0 {
                    bounds.push(ids.value(i));
                }
            }
            Ok(())
        })?;
        Ok(ranges_from_bounds(&bounds, total, chunk_rows))
    }

    fn read_chunk(&self, chunk: &ChunkRange, batch_rows: usize, out: &mut dyn FnMut(RecordBatch) -> Result<()>) -> Result<()> {
        let output = self.output.clone();
        self.pages(chunk.lo, chunk.hi, &output, self.page_rows, &mut |b| {
            let mut off = 0;
            while off < b.num_rows() {
                let n = batch_rows.min(b.num_rows() - off);
                out(b.slice(off, n))?;
                off += n;
            }
            Ok(())
        })
    }
}

/// Ids of a batch's primary-key column as i64 (any integer width).
pub fn ids_of(batch: &RecordBatch, pk: usize) -> Result<Int64Array> {
    let a = arrow::compute::cast(batch.column(pk), &arrow::datatypes::DataType::Int64)?;
    Ok(arrow::array::AsArray::as_primitive::<Int64Type>(&a).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_expressions_leave_out_the_ends_of_i64() {
        assert_eq!(range_expr("id", i64::MIN, i64::MAX, None), "");
        assert_eq!(range_expr("id", 10, i64::MAX, None), "id >= 10");
        assert_eq!(range_expr("id", i64::MIN, 20, Some(5)), "id > 5 and id <= 20");
    }

    #[test]
    fn fastgpt_fields_map_to_sql_columns() {
        let map = crate::config::fastgpt_field_map();
        assert_eq!(column_of(&map, "teamId"), ("team_id", false));
        assert_eq!(column_of(&map, "createTime"), ("createtime", true));
        assert_eq!(field_of(&map, "collection_id"), "collectionId");
        assert_eq!(field_of(&map, "vector"), "vector");
    }
}
