//! Milvus endpoint over the gRPC client that milvus-sdk-rust generates
//! (`milvus::proto`): the SDK's v1 client cannot poll flush state, send a
//! bare token or raise its 4 MiB response limit, and its v2 client converts
//! every value through its own row model; the generated client lets columns
//! go straight between Arrow arrays and Milvus `FieldData`.
//!
//! This module connects and maps schemas (SQL columns ↔ Milvus fields); the
//! source is in `source.rs`, the sink in `sink.rs`.

mod apply;
pub mod changes;
mod encode;
mod sink;
mod source;

pub use sink::{LEDGER_FILE, MilvusSink};
pub use source::MilvusSource;

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use milvus::proto::common::{self, ConsistencyLevel, KeyValuePair, MsgBase, MsgType};
use milvus::proto::milvus::milvus_service_client::MilvusServiceClient;
use milvus::proto::milvus::{
    AllocTimestampRequest, CreatePartitionRequest, DescribeCollectionRequest, DescribeIndexRequest, GetLoadingProgressRequest,
    HasCollectionRequest, HasPartitionRequest, ListDatabasesRequest, LoadCollectionRequest, QueryRequest, ReleaseCollectionRequest,
    ShowPartitionsRequest,
};
use milvus::proto::schema::{self, CollectionSchema, DataType, FieldData, field_data, scalar_field};
use tokio::runtime::Handle;
use tonic::codegen::InterceptedService;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::contract::error_chain;
use crate::model::config::{FieldMap, MilvusUrl};
use crate::model::plan::Key;
use crate::model::schema::{ColumnSpec, ColumnType, ComputedField, ComputedInput, IndexKind, IndexSpec, Metric, PartitionKey, TableSpec};

/// Query responses may be this large; the client's default (4 MiB) stops at
/// ~680 rows of 1536-d.
const MAX_MESSAGE_BYTES: usize = 256 << 20;

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
pub fn check_status(status: Option<&common::Status>, what: &str) -> Result<()> {
    match status {
        Some(s) if s.code != 0 || s.error_code != 0 => {
            bail!("{what}: {} (Milvus code {})", tidy_reason(&s.reason), if s.code != 0 { s.code } else { s.error_code })
        }
        _ => Ok(()),
    }
}

/// A Milvus reason without the Go stack trace some servers put in it
/// ("stack trace: /path/x.go:51 pkg.Func …"): one readable line.
pub fn tidy_reason(reason: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let mut skip_next = false;
    for word in reason.split_whitespace() {
        if skip_next {
            skip_next = false;
        } else if word.contains(".go:") {
            skip_next = true; // the function name that follows the file
        } else if !(word == "stack" || word == "trace:") {
            out.push(word);
        }
    }
    out.join(" ")
}

pub fn base(t: MsgType) -> Option<MsgBase> {
    Some(MsgBase::new(t))
}

/// A Milvus reply that carries a status.
pub trait Reply {
    fn reply_status(&self) -> Option<&common::Status>;
}

impl Reply for common::Status {
    fn reply_status(&self) -> Option<&common::Status> {
        Some(self)
    }
}

macro_rules! replies {
    ($($t:ty),*) => {$(
        impl Reply for $t {
            fn reply_status(&self) -> Option<&common::Status> {
                self.status.as_ref()
            }
        }
    )*};
}

replies!(
    milvus::proto::milvus::ListDatabasesResponse,
    milvus::proto::milvus::BoolResponse,
    milvus::proto::milvus::DescribeCollectionResponse,
    milvus::proto::milvus::DescribeIndexResponse,
    milvus::proto::milvus::GetLoadingProgressResponse,
    milvus::proto::milvus::QueryResults,
    milvus::proto::milvus::MutationResult,
    milvus::proto::milvus::FlushResponse,
    milvus::proto::milvus::GetFlushStateResponse,
    milvus::proto::milvus::GetCollectionStatisticsResponse,
    milvus::proto::milvus::AllocTimestampResponse,
    milvus::proto::milvus::ShowPartitionsResponse,
    milvus::proto::milvus::SearchResults
);

/// Longest any single RPC may take (they are all quick: loads, flushes and
/// index builds are started by one call and polled).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

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
            // No call may hang on a server that went away mid-request (restart).
            .timeout(REQUEST_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        if url.tls {
            let mut tls = ClientTlsConfig::new().with_native_roots();
            if let Some(ca) = &url.ca {
                let pem = std::fs::read(ca).with_context(|| format!("reading the Milvus CA certificate {}", ca.display()))?;
                tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
            }
            ep = ep.tls_config(tls).context("Milvus TLS configuration")?;
        }
        let channel = handle
            .block_on(ep.connect())
            .map_err(|e| anyhow!("cannot connect to Milvus at {}: {}", url.redacted(), error_chain(&e)))?;
        let grpc = MilvusServiceClient::with_interceptor(channel, CallMetadata { authorization, database })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Milvus { grpc, url: url.clone(), handle: handle.clone() })
    }

    /// One RPC on a clone of the channel; transport errors name the server.
    pub fn call_unchecked<T, F, Fut>(&self, what: &str, rpc: F) -> Result<T>
    where
        F: FnOnce(Grpc) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        self.block_on(rpc(self.grpc.clone())).map(|r| r.into_inner()).map_err(|e| self.failure(what, e))
    }

    /// A call that did not reach Milvus or was cut off, naming the server.
    fn failure(&self, what: &str, e: tonic::Status) -> anyhow::Error {
        anyhow!("{what} on {}: {} ({:?})", self.url.redacted(), e.message(), e.code())
    }

    /// One RPC whose reply must say success, as a future that owns what it
    /// needs (to block on, or to spawn and wait for later).
    pub fn request<T, F, Fut>(&self, what: &str, rpc: F) -> impl Future<Output = Result<T>> + Send + 'static + use<T, F, Fut>
    where
        T: Reply + Send + 'static,
        F: FnOnce(Grpc) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>> + Send + 'static,
    {
        let (rpc, me, what) = (rpc(self.grpc.clone()), self.clone(), what.to_string());
        async move {
            let r = rpc.await.map_err(|e| me.failure(&what, e))?.into_inner();
            check_status(r.reply_status(), &what)?;
            Ok(r)
        }
    }

    /// Blocks the calling (pipeline) thread on `f`.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.handle.block_on(f)
    }

    /// Runs `f` on the shared runtime (an RPC in flight while the caller goes on).
    pub fn spawn<F>(&self, f: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(f)
    }

    /// One RPC whose reply must say success, waited for here.
    pub fn call<T, F, Fut>(&self, what: &str, rpc: F) -> Result<T>
    where
        T: Reply + Send + 'static,
        F: FnOnce(Grpc) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>> + Send + 'static,
    {
        self.block_on(self.request(what, rpc))
    }

    pub fn database_exists(&self) -> Result<bool> {
        let req = ListDatabasesRequest { base: base(MsgType::ListDatabases) };
        let r = self.call("listing databases", |mut c| async move { c.list_databases(req).await })?;
        Ok(r.db_names.iter().any(|d| d == &self.url.database))
    }

    pub fn has_collection(&self, name: &str) -> Result<bool> {
        let req = HasCollectionRequest {
            base: base(MsgType::HasCollection),
            db_name: self.url.database.clone(),
            collection_name: name.into(),
            time_stamp: 0,
        };
        Ok(self.call("checking the collection", |mut c| async move { c.has_collection(req).await })?.value)
    }

    /// The collection's schema and its number of partitions.
    pub fn describe(&self, name: &str) -> Result<(CollectionSchema, i64)> {
        let req = DescribeCollectionRequest {
            base: base(MsgType::DescribeCollection),
            db_name: self.url.database.clone(),
            collection_name: name.into(),
            ..Default::default()
        };
        let what = format!("describing collection {name} in {}", self.url.redacted());
        let r = self.call(&what, |mut c| async move { c.describe_collection(req).await })?;
        Ok((r.schema.ok_or_else(|| anyhow!("Milvus returned no schema for collection {name}"))?, r.num_partitions))
    }

    /// The collection's partitions, `_default` included.
    pub fn partitions(&self, name: &str) -> Result<Vec<String>> {
        let req = ShowPartitionsRequest {
            base: base(MsgType::ShowPartitions),
            db_name: self.url.database.clone(),
            collection_name: name.into(),
            ..Default::default()
        };
        Ok(self.call(&format!("listing the partitions of {name}"), |mut c| async move { c.show_partitions(req).await })?.partition_names)
    }

    /// Creates the partition unless the collection has it.
    pub fn ensure_partition(&self, name: &str, partition: &str) -> Result<()> {
        let req = HasPartitionRequest {
            base: base(MsgType::HasPartition),
            db_name: self.url.database.clone(),
            collection_name: name.into(),
            partition_name: partition.into(),
        };
        if self.call(&format!("checking partition {partition} of {name}"), |mut c| async move { c.has_partition(req).await })?.value {
            return Ok(());
        }
        let req = CreatePartitionRequest {
            base: base(MsgType::CreatePartition),
            db_name: self.url.database.clone(),
            collection_name: name.into(),
            partition_name: partition.into(),
        };
        self.call(&format!("creating partition {partition} of {name}"), |mut c| async move { c.create_partition(req).await })?;
        Ok(())
    }

    /// Index descriptions; none when the collection has no index.
    pub fn indexes(&self, name: &str) -> Result<Vec<milvus::proto::milvus::IndexDescription>> {
        let req = DescribeIndexRequest {
            base: base(MsgType::DescribeIndex),
            db_name: self.url.database.clone(),
            collection_name: name.into(),
            ..Default::default()
        };
        let r = self.call_unchecked("describing indexes", |mut c| async move { c.describe_index(req).await })?;
        if let Some(s) = &r.status {
            // How servers say there are none, by version: 2.3 "index not
            // found" or IndexNotExist; newer ones code 700 (merr's
            // ErrIndexNotFound), milvus-lite "no index on collection …".
            let reason = s.reason.to_ascii_lowercase();
            if s.code == 700 || (s.code != 0 && (reason.contains("index not") || reason.contains("no index"))) {
                return Ok(Vec::new());
            }
            #[allow(deprecated)]
            if s.error_code == common::ErrorCode::IndexNotExist as i32 {
                return Ok(Vec::new());
            }
        }
        check_status(r.status.as_ref(), "describing indexes")?;
        Ok(r.index_descriptions)
    }

    /// Releases a loaded collection (Milvus refuses to load it again after an
    /// index was added while it was loaded).
    pub fn release(&self, name: &str) -> Result<()> {
        let req = ReleaseCollectionRequest {
            base: base(MsgType::ReleaseCollection),
            db_name: self.url.database.clone(),
            collection_name: name.into(),
        };
        self.call(&format!("releasing collection {name}"), |mut c| async move { c.release_collection(req).await })?;
        Ok(())
    }

    /// Loads the collection (reads and counts need it) and waits until it is.
    pub fn load(&self, name: &str) -> Result<()> {
        let req = LoadCollectionRequest {
            base: base(MsgType::LoadCollection),
            db_name: self.url.database.clone(),
            collection_name: name.into(),
            ..Default::default()
        };
        self.call(&format!("loading collection {name}"), |mut c| async move { c.load_collection(req).await })?;
        let started = Instant::now();
        loop {
            let req = GetLoadingProgressRequest {
                base: base(MsgType::LoadCollection),
                collection_name: name.into(),
                db_name: self.url.database.clone(),
                ..Default::default()
            };
            let p = self.call("waiting for the load", |mut c| async move { c.get_loading_progress(req).await })?;
            if p.progress >= 100 {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(1800) {
                bail!("collection {name} did not finish loading in 30 minutes ({}%)", p.progress);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A timestamp from Milvus' own clock: every write acknowledged before
    /// this call is visible to a query that guarantees it.
    pub fn alloc_timestamp(&self) -> Result<u64> {
        let req = AllocTimestampRequest { base: base(MsgType::AllocTimestamp) };
        Ok(self.call("allocating a timestamp", |mut c| async move { c.alloc_timestamp(req).await })?.timestamp)
    }

    /// Runs a query; `limit` 0 means none (count(*) takes none). With
    /// `guarantee`, it sees every write up to that timestamp; without, it is
    /// Strong (each such query waits ~0.3 s for Milvus' clock to pass "now").
    pub fn query(&self, collection: &str, expr: &str, output: &[String], limit: usize, guarantee: Option<u64>) -> Result<Vec<FieldData>> {
        self.query_in(collection, None, expr, output, limit, guarantee)
    }

    /// `query` within one partition (None: every partition).
    pub fn query_in(
        &self,
        collection: &str,
        partition: Option<&str>,
        expr: &str,
        output: &[String],
        limit: usize,
        guarantee: Option<u64>,
    ) -> Result<Vec<FieldData>> {
        let mut params = Vec::new();
        if limit > 0 {
            params.push(KeyValuePair { key: "limit".into(), value: limit.to_string() });
        }
        let req = QueryRequest {
            base: base(MsgType::Retrieve),
            db_name: self.url.database.clone(),
            collection_name: collection.into(),
            expr: expr.into(),
            output_fields: output.to_vec(),
            partition_names: partition.map(|p| vec![p.to_string()]).unwrap_or_default(),
            query_params: params,
            consistency_level: if guarantee.is_some() { ConsistencyLevel::Customized } else { ConsistencyLevel::Strong } as i32,
            guarantee_timestamp: guarantee.unwrap_or(0),
            use_default_consistency: false,
            ..Default::default()
        };
        Ok(self.call(&format!("query `{expr}` on {collection}"), |mut c| async move { c.query(req).await })?.fields_data)
    }

    /// Rows in the collection, strongly consistent (the collection must be loaded).
    pub fn count(&self, collection: &str) -> Result<u64> {
        self.count_where(collection, "", None)
    }

    /// `count(*)` of the rows matching `expr` (every stored copy: Milvus
    /// does not deduplicate keys when counting).
    pub fn count_where(&self, collection: &str, expr: &str, guarantee: Option<u64>) -> Result<u64> {
        self.count_where_in(collection, None, expr, guarantee)
    }

    /// `count_where` within one partition (None: every partition).
    pub fn count_where_in(&self, collection: &str, partition: Option<&str>, expr: &str, guarantee: Option<u64>) -> Result<u64> {
        let data = self.query_in(collection, partition, expr, &["count(*)".to_string()], 0, guarantee)?;
        let n = match data.first().and_then(scalar) {
            Some(scalar_field::Data::LongData(l)) => l.data.first().copied(),
            _ => None,
        }
        .ok_or_else(|| anyhow!("count(*) on {collection} returned no number"))?;
        Ok(n as u64)
    }
}

/// `pk in [ids]`: the rows with these keys.
pub fn in_expr(pk_field: &str, ids: &[Key]) -> String {
    let list: Vec<String> = ids.iter().map(key_literal).collect();
    format!("{pk_field} in [{}]", list.join(","))
}

/// A key in a Milvus expression: strings double-quoted with `\\`, `"`
/// and line breaks escaped (the escapes Milvus 2.3 and 2.6 both read).
pub fn key_literal(k: &Key) -> String {
    match k {
        Key::Int(v) => v.to_string(),
        Key::Str(s) => {
            let mut out = String::with_capacity(s.len() + 2);
            out.push('"');
            for c in s.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '"' => out.push_str("\\\""),
                    '\n' => out.push_str("\\n"),
                    '\t' => out.push_str("\\t"),
                    c => out.push(c),
                }
            }
            out.push('"');
            out
        }
    }
}

/// The values of a scalar field in a reply.
pub fn scalar(fd: &FieldData) -> Option<&scalar_field::Data> {
    match &fd.field {
        Some(field_data::Field::Scalars(s)) => s.data.as_ref(),
        _ => None,
    }
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
    /// The server keeps NULLs in this field (a nullable scalar, Milvus 2.5+).
    pub nullable: bool,
}

/// The column that carries each row's partition when a collection keeps its
/// rows in named partitions (and has no partition key): a row is read from
/// its partition and written into the partition it names, created when
/// missing. A SQL table keeps it as a plain column, so Milvus → SQL → Milvus
/// puts every row back into its partition.
pub const PARTITION_COLUMN: &str = "milvus_partition";

/// Milvus' own partition, which every collection has.
const DEFAULT_PARTITION: &str = "_default";

/// A collection seen through the mapping: its SQL-side spec and how each
/// column becomes a field.
#[derive(Clone, Debug)]
pub struct Collection {
    /// With named partitions, the last column is `PARTITION_COLUMN` (no field).
    pub spec: TableSpec,
    /// In `spec.columns` order.
    pub fields: Vec<FieldInfo>,
    pub pk_field: String,
    pub auto_id: bool,
    pub dynamic: bool,
}

impl Collection {
    /// Rows travel with the name of their partition.
    pub fn partitioned(&self) -> bool {
        self.spec.column(PARTITION_COLUMN).is_some()
    }

    /// Rows of this collection carry their partition (`PARTITION_COLUMN`),
    /// or stop carrying it.
    pub fn carry_partitions(&mut self, carry: bool) {
        self.spec.columns.retain(|c| c.name != PARTITION_COLUMN);
        if carry {
            self.spec.columns.push(ColumnSpec {
                name: PARTITION_COLUMN.into(),
                ty: ColumnType::Text { max_chars: Some(255) },
                nullable: false,
                auto_increment: false,
                default_now: false,
            });
        }
    }
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
    partitions: i64,
    indexes: &[milvus::proto::milvus::IndexDescription],
    map: &[FieldMap],
) -> Result<Collection> {
    let mut columns = Vec::new();
    let mut fields = Vec::new();
    let mut pk = None;
    let mut auto_id = false;
    let mut partition_key = None;
    for f in &schema.fields {
        if f.is_dynamic || f.name == source::DYNAMIC_FIELD {
            continue;
        }
        if f.is_function_output {
            // Computed by Milvus from other fields (BM25 sparse vectors): see below.
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
            if !matches!(kind, FieldKind::Int64 | FieldKind::VarChar { .. }) {
                bail!("collection {name}: primary key {} is {dt:?}; vmig reads Int64 and VarChar primary keys", f.name);
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
            auto_increment: f.is_primary_key && matches!(kind, FieldKind::Int64),
            default_now: false,
        });
        if f.is_partition_key {
            partition_key = Some(PartitionKey { column: column.to_string(), partitions: partitions.max(0) as u32 });
        }
        // Nullable vectors (2.6) are read and written as NOT NULL for now.
        let nullable = f.nullable && !matches!(kind, FieldKind::FloatVector { .. });
        fields.push(FieldInfo { column: column.to_string(), field: f.name.clone(), kind, nullable });
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
    let computed = computed_fields(name, schema, indexes, map)?;
    let spec = TableSpec { name: name.to_string(), columns, primary_key: pk_column, indexes: spec_indexes, computed, partition_key };
    spec.validate()?;
    Ok(Collection { spec, fields, pk_field, auto_id, dynamic: schema.enable_dynamic_field })
}

/// Type parameters of an input field that only its function needs (the
/// rest, max_length and dim, follow from the column's type).
const FUNCTION_INPUT_PARAMS: [&str; 4] = ["enable_analyzer", "analyzer_params", "enable_match", "multi_analyzer_params"];

/// The collection's function output fields, as `ComputedField`s: each with
/// its function, the input columns (and their analyzer parameters) and the
/// output's index, so a target can declare exactly the same.
fn computed_fields(
    name: &str,
    schema: &CollectionSchema,
    indexes: &[milvus::proto::milvus::IndexDescription],
    map: &[FieldMap],
) -> Result<Vec<ComputedField>> {
    let pairs = |kvs: &[KeyValuePair]| kvs.iter().map(|kv| (kv.key.clone(), kv.value.clone())).collect::<Vec<_>>();
    let mut out = Vec::new();
    for f in schema.fields.iter().filter(|f| f.is_function_output) {
        let function = schema
            .functions
            .iter()
            .find(|g| g.output_field_names.contains(&f.name))
            .ok_or_else(|| anyhow!("collection {name}: field {} is a function output, but no function computes it", f.name))?;
        if function.output_field_names.len() != 1 {
            bail!("collection {name}: function {} has {} outputs; vmig copies one-output functions", function.name, function.output_field_names.len());
        }
        let function_type = schema::FunctionType::try_from(function.r#type).map(|t| t.as_str_name().to_string()).unwrap_or(function.r#type.to_string());
        let inputs = function
            .input_field_names
            .iter()
            .map(|input| {
                let field = schema.fields.iter().find(|g| &g.name == input).ok_or_else(|| anyhow!("collection {name}: function {} reads the missing field {input}", function.name))?;
                let params = field.type_params.iter().filter(|kv| FUNCTION_INPUT_PARAMS.contains(&kv.key.as_str())).map(|kv| (kv.key.clone(), kv.value.clone())).collect();
                Ok(ComputedInput { column: column_of(map, input).0.to_string(), params })
            })
            .collect::<Result<Vec<_>>>()?;
        let data_type = DataType::try_from(f.data_type).map(|t| t.as_str_name().to_string()).unwrap_or(f.data_type.to_string());
        let index = indexes.iter().find(|ix| ix.field_name == f.name).map(|ix| (ix.index_name.clone(), pairs(&ix.params)));
        out.push(ComputedField {
            field: f.name.clone(),
            data_type,
            function: function.name.clone(),
            function_type,
            function_params: pairs(&function.params),
            inputs,
            index,
        });
    }
    Ok(out)
}

pub fn discover(conn: &Milvus, name: &str, map: &[FieldMap]) -> Result<Collection> {
    if !conn.has_collection(name)? {
        bail!("collection {name} not found in Milvus database {} ({})", conn.url.database, conn.url.redacted());
    }
    let (schema, partitions) = conn.describe(name)?;
    let indexes = conn.indexes(name)?;
    let mut coll = map_collection(name, &schema, partitions, &indexes, map)?;
    // Named partitions (a partition key's are Milvus' own business).
    if coll.spec.partition_key.is_none() {
        let names = conn.partitions(name)?;
        if names.iter().any(|p| p != DEFAULT_PARTITION) {
            if coll.spec.column(PARTITION_COLUMN).is_some() {
                bail!("collection {name} has a field {PARTITION_COLUMN}, the name vmig gives each row's partition; rename the field");
            }
            coll.carry_partitions(true);
        }
    }
    Ok(coll)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stack_traces_leave_milvus_reasons() {
        let r = "attempt #0: stack trace: /w/milvus/pkg/tracer/stack_trace.go:51 github.com/milvus-io/milvus/pkg/tracer.StackTrace\n\
                 /w/milvus/internal/datacoord/services.go:116 github.com/x.(*Server).Flush: attempt #0: rpc error: node not found[node=1]";
        assert_eq!(tidy_reason(r), "attempt #0: attempt #0: rpc error: node not found[node=1]");
    }

    #[test]
    fn fastgpt_fields_map_to_sql_columns() {
        let map = crate::model::config::fastgpt_field_map();
        assert_eq!(column_of(&map, "teamId"), ("team_id", false));
        assert_eq!(column_of(&map, "createTime"), ("createtime", true));
        assert_eq!(field_of(&map, "collection_id"), "collectionId");
        assert_eq!(field_of(&map, "vector"), "vector");
    }
}
