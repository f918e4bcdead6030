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
mod ddl;
mod encode;
pub mod mapping;
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
use milvus::proto::schema::{CollectionSchema, FieldData, field_data, scalar_field};
use tokio::runtime::Handle;
use tonic::codegen::InterceptedService;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::contract::error_chain;
use crate::model::config::MilvusUrl;
use crate::model::plan::Key;

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
    milvus::proto::milvus::SearchResults,
    milvus::proto::milvus::ManualCompactionResponse,
    milvus::proto::milvus::GetCompactionStateResponse,
    milvus::proto::milvus::GetPersistentSegmentInfoResponse,
    milvus::proto::milvus::GetQuerySegmentInfoResponse,
    milvus::proto::milvus::GetLoadStateResponse
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

    /// Like `call`, for an RPC some servers do not implement (milvus-lite):
    /// None from those.
    pub fn call_if_served<T, F, Fut>(&self, what: &str, rpc: F) -> Result<Option<T>>
    where
        T: Reply,
        F: FnOnce(Grpc) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        match self.block_on(rpc(self.grpc.clone())) {
            Err(e) if e.code() == tonic::Code::Unimplemented => Ok(None),
            Err(e) => Err(self.failure(what, e)),
            Ok(r) => {
                let r = r.into_inner();
                check_status(r.reply_status(), what)?;
                Ok(Some(r))
            }
        }
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
        let r = self.describe_collection(name)?;
        Ok((r.schema.ok_or_else(|| anyhow!("Milvus returned no schema for collection {name}"))?, r.num_partitions))
    }

    pub fn collection_id(&self, name: &str) -> Result<i64> {
        Ok(self.describe_collection(name)?.collection_id)
    }

    fn describe_collection(&self, name: &str) -> Result<milvus::proto::milvus::DescribeCollectionResponse> {
        let req = DescribeCollectionRequest {
            base: base(MsgType::DescribeCollection),
            db_name: self.url.database.clone(),
            collection_name: name.into(),
            ..Default::default()
        };
        let what = format!("describing collection {name} in {}", self.url.redacted());
        self.call(&what, |mut c| async move { c.describe_collection(req).await })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stack_traces_leave_milvus_reasons() {
        let r = "attempt #0: stack trace: /w/milvus/pkg/tracer/stack_trace.go:51 github.com/milvus-io/milvus/pkg/tracer.StackTrace\n\
                 /w/milvus/internal/datacoord/services.go:116 github.com/x.(*Server).Flush: attempt #0: rpc error: node not found[node=1]";
        assert_eq!(tidy_reason(r), "attempt #0: attempt #0: rpc error: node not found[node=1]");
    }
}
