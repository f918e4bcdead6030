//! Command-line interface (clap). Each command becomes one call in `commands`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::contract::OnExisting;
use crate::model::config::SubsetArgs;

#[derive(Parser, Debug)]
#[command(
    name = "vmig",
    version,
    about = "Move vector tables (FastGPT modeldata and others) between PostgreSQL/pgvector, OceanBase/seekdb, Milvus and Parquet staging, exactly and resumably",
    long_about = None
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Copy a table from the source straight to the target (optionally teeing through staging files).
    Migrate(RunArgs),
    /// Copy a table from the source into a staging directory of Parquet chunk files.
    Export(RunArgs),
    /// Load a staging directory into the target (no access to the source needed).
    Import(RunArgs),
    /// Finish an online job: drain the source's changes, finish and verify the target, print when it is safe to switch.
    Cutover(RunArgs),
    /// Show a job's plan, committed chunks, rows, failures and last error (works while it runs).
    Status(StatusArgs),
    /// Compare two sides chunk by chunk (row counts and content hashes); exit 1 on any difference.
    Verify(VerifyArgs),
    /// Make a target equal to a source that kept changing: verify chunk by chunk, recopy only the differing chunks, verify again; exit 0 only when equal.
    Repair(RepairArgs),
    /// Show a staging directory's manifest, schema and chunks, checking every chunk file's sha256.
    Inspect(InspectArgs),
    /// Forget a job's progress (ledger rows in the target, local state, staged chunks).
    Reset(ResetArgs),
    /// Create a FastGPT-shaped modeldata table filled with deterministic synthetic rows.
    Generate(GenerateArgs),
}

#[derive(Args, Debug, Clone, Default)]
pub struct RunArgs {
    /// Pipeline file (JSON) holding any of these settings; flags win over it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Source URL (postgresql://…, mysql://…, http://host:19530/db for Milvus), or an env name: PG_URL, OCEANBASE_URL, MILVUS_ADDRESS, env:NAME, $NAME. Env: VMIG_FROM.
    #[arg(long)]
    pub from: Option<String>,
    /// Target URL (postgresql://…, mysql://…, http://host:19530/db for Milvus), or an env name. Env: VMIG_TO.
    #[arg(long)]
    pub to: Option<String>,
    /// Source table (schema.table or table) or Milvus collection. Default: modeldata.
    #[arg(long)]
    pub table: Option<String>,
    /// Target table name, when it differs from the source's.
    #[arg(long)]
    pub target_table: Option<String>,
    /// Staging area (one job's chunk files and manifest): a directory, or
    /// s3://bucket/prefix, gs://…, az://…, file://… (credentials from the
    /// cloud's environment: AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL …).
    #[arg(long)]
    pub staging: Option<String>,
    /// Where workers of a direct `migrate` share the job's manifest, claims
    /// and status (s3://…, or a directory all of them see); makes the job shared.
    #[arg(long, value_name = "URL")]
    pub state: Option<String>,
    /// Share the job with other workers through the staging/state store even
    /// when it is a local directory (remote stores and shards always share).
    #[arg(long)]
    pub shared: bool,
    /// Take only chunks with id % N == I (static partitions of a shared job).
    #[arg(long, value_name = "I/N")]
    pub shard: Option<String>,
    /// Number of shards when the index comes from the scheduler
    /// (Kubernetes Indexed Jobs: JOB_COMPLETION_INDEX). Slurm arrays
    /// (SLURM_ARRAY_TASK_ID/COUNT) are read without it.
    #[arg(long, value_name = "N")]
    pub shards: Option<u32>,
    /// Seconds a claimed chunk stays claimed without a heartbeat before other
    /// workers take it over. Default: 60.
    #[arg(long, value_name = "SECS")]
    pub lease: Option<u64>,
    /// Job id (default: derived from source and target, or the staging manifest's).
    #[arg(long)]
    pub job: Option<String>,
    /// Chunks in flight at once, each with its own connections. Default: 2.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Rows per chunk (the unit of commit and resume). Default: 20000.
    #[arg(long)]
    pub chunk_rows: Option<u64>,
    /// Rows per Arrow batch between stages. Default: about 1 MB of rows (~160 rows of 1536-d).
    #[arg(long)]
    pub batch_rows: Option<usize>,
    /// A target that has rows but no ledger for this job: fail (default), upsert or truncate.
    #[arg(long, value_enum)]
    pub on_existing: Option<OnExisting>,
    /// Rejected rows allowed before the run counts as failed. Default: 0.
    #[arg(long)]
    pub max_rejects: Option<u64>,
    /// Read at most this many rows per second (protects a production source).
    #[arg(long)]
    pub rate_limit: Option<u64>,
    /// Seconds a chunk or the finish keeps retrying, with backoff, while a
    /// database is unreachable (a restart). Default: 120.
    #[arg(long)]
    pub retry_for: Option<u64>,
    /// Online: copy a snapshot, then apply the source's changes continuously
    /// until `vmig cutover` (PostgreSQL with wal_level = logical; OceanBase /
    /// seekdb via triggers; Milvus via a createTime watermark and reconcile).
    #[arg(long)]
    pub online: bool,
    /// Online: rows per second the verifier that checks chunks while the job
    /// follows may read (default: as fast as one reader goes).
    #[arg(long, value_name = "ROWS")]
    pub verify_rate: Option<u64>,
    /// Cutover: compare both whole tables instead of only what changed since
    /// each chunk was last seen equal.
    #[arg(long)]
    pub full_verify: bool,
    /// Online from Milvus: rows are polled with createTime ≥ watermark −
    /// this many seconds (clock skew, inserts in flight). Default: 5.
    #[arg(long, value_name = "SECS")]
    pub watermark_margin: Option<u64>,
    /// Online from Milvus: compare the ids of source and target (deletes,
    /// and inserts the watermark missed) every this many seconds, and
    /// always at cutover. Default: 300.
    #[arg(long, value_name = "SECS")]
    pub reconcile_every: Option<u64>,
    /// Do not build secondary and vector indexes after the load.
    #[arg(long)]
    pub no_indexes: bool,
    /// Most memory a PostgreSQL HNSW build may use (maintenance_work_mem),
    /// e.g. 4GB. Default: a quarter of the server's memory where it can be
    /// read, else 1GB. vmig sizes the build to the graph's estimate within it.
    #[arg(long, value_name = "SIZE", value_parser = crate::model::schema::parse_size)]
    pub index_memory: Option<u64>,
    /// PostgreSQL targets: how the vector columns are stored. Default for a
    /// table vmig creates: plain (inline) when a row fits a page, else
    /// external (out of line, no compression attempt). An existing table's
    /// storage is changed only when this is given.
    #[arg(long, value_name = "MODE", value_enum)]
    pub vector_storage: Option<crate::contract::VectorStorage>,
    /// Write the final report as JSON to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Serve a live status page on ADDR (e.g. 127.0.0.1:9187) while the job
    /// runs: / (HTML), /status.json and /metrics (Prometheus text).
    #[arg(long, value_name = "ADDR", alias = "http")]
    pub metrics: Option<String>,
    /// Directory holding jobs' local state when no --staging is given. Default: staging.
    #[arg(long, env = "VMIG_STATE_ROOT")]
    pub state_root: Option<PathBuf>,
    /// No progress display (the final summary is still printed).
    #[arg(long)]
    pub quiet: bool,
    /// SQL column ↔ Milvus field mapping (pipeline file only; default: FastGPT's).
    #[arg(skip)]
    pub milvus_fields: Option<Vec<crate::model::config::FieldMap>>,
    /// Which rows: --filter, --team, --dataset, --collection.
    #[command(flatten)]
    pub subset: SubsetArgs,
    /// Several tables in one job (pipeline file only).
    #[arg(skip)]
    pub tables: Option<Vec<crate::model::config::TableEntry>>,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Staging area (directory or s3://… address) or --state store of the job.
    #[arg(long, conflicts_with = "job")]
    pub staging: Option<String>,
    /// Job id (its state lives in STATE_ROOT/JOB).
    #[arg(long)]
    pub job: Option<String>,
    /// Directory holding jobs' local state. Default: staging.
    #[arg(long, env = "VMIG_STATE_ROOT")]
    pub state_root: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Redraw the text view every SECONDS (default 3) until interrupted.
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "3", conflicts_with = "json")]
    pub watch: Option<f64>,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// One side: a URL, an env name, or a staging directory.
    #[arg(long)]
    pub from: Option<String>,
    /// The other side: a URL, an env name, or a staging directory.
    #[arg(long)]
    pub to: Option<String>,
    /// A staging area standing for whichever of --from/--to is missing.
    #[arg(long)]
    pub staging: Option<String>,
    /// Table (Milvus: collection) on the --from side. Default: modeldata.
    #[arg(long)]
    pub table: Option<String>,
    /// Table on the --to side. Default: the same name as --table.
    #[arg(long)]
    pub target_table: Option<String>,
    /// Rows per compared chunk when neither side is staging. Default: 20000.
    #[arg(long)]
    pub chunk_rows: Option<u64>,
    /// Chunks compared at once. Default: 2.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Compare N rows chosen uniformly at random by primary key (every
    /// column, the same rules) and both row counts, instead of every chunk:
    /// for tables too large to read twice. Prints a confidence statement.
    #[arg(long, value_name = "N")]
    pub sample: Option<usize>,
    /// Seed of the random choices of --sample and --recall (printed; the
    /// same seed chooses the same ids).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Also measure recall@K of both sides' vector indexes: query vectors
    /// sampled from the source, the exact top-K computed by vmig over the
    /// source's rows, each side searched through its own index.
    #[arg(long, value_name = "K")]
    pub recall: Option<usize>,
    /// Query vectors for --recall.
    #[arg(long, default_value_t = 100, requires = "recall")]
    pub queries: usize,
    /// Noise added to each query coordinate for --recall, as a share of the
    /// vector's RMS (0: the rows' own vectors).
    #[arg(long, default_value_t = 0.0, requires = "recall")]
    pub noise: f32,
    /// --recall fails when the target's recall is below this share of the source's.
    #[arg(long, default_value_t = 0.98, requires = "recall")]
    pub min_recall_ratio: f64,
    /// Write the verify report to this file: JSON, or a self-contained page
    /// with a recall-vs-k chart when the name ends in .html.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Which rows: --filter, --team, --dataset, --collection.
    #[command(flatten)]
    pub subset: SubsetArgs,
}

#[derive(Args, Debug)]
pub struct RepairArgs {
    /// The source: a URL, an env name, or a staging directory.
    #[arg(long)]
    pub from: String,
    /// The target database to mend: a URL or an env name.
    #[arg(long)]
    pub to: String,
    /// Table (Milvus: collection) in the source. Default: modeldata.
    #[arg(long)]
    pub table: Option<String>,
    /// Table in the target. Default: the same name as --table.
    #[arg(long)]
    pub target_table: Option<String>,
    /// Rows per compared chunk. Default: 20000.
    #[arg(long)]
    pub chunk_rows: Option<u64>,
    /// Chunks compared and mended at once. Default: 2.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Write the repair report (JSON) to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Which rows: --filter, --team, --dataset, --collection.
    #[command(flatten)]
    pub subset: SubsetArgs,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Staging area: a directory or s3://… address.
    pub dir: String,
    /// Also decode every chunk and recompute its row count and content hash.
    #[arg(long)]
    pub deep: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ResetArgs {
    /// Staging area (directory or s3://… address) to clear.
    #[arg(long)]
    pub staging: Option<String>,
    /// Job id whose local state (STATE_ROOT/JOB) to clear.
    #[arg(long)]
    pub job: Option<String>,
    /// Target whose ledger rows for the job are deleted too (the copied rows stay).
    #[arg(long)]
    pub to: Option<String>,
    /// Source of an online job: its replication slot and publication are dropped.
    #[arg(long)]
    pub from: Option<String>,
    /// Directory holding jobs' local state. Default: staging.
    #[arg(long, env = "VMIG_STATE_ROOT")]
    pub state_root: Option<PathBuf>,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub yes: bool,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Database URL to create the table in (or an env name).
    #[arg(long)]
    pub to: String,
    /// Rows to generate.
    #[arg(long, default_value_t = 10_000)]
    pub rows: u64,
    /// Dimensions of each vector.
    #[arg(long, default_value_t = 1536)]
    pub dim: u32,
    /// Table (Milvus: collection) to create.
    #[arg(long, default_value = "modeldata")]
    pub table: String,
    /// Seed of the random rows (the same seed gives the same rows).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Store vectors as halfvec instead of vector.
    #[arg(long)]
    pub halfvec: bool,
    /// Do not create the HNSW vector index (bulk demos and benchmarks).
    #[arg(long)]
    pub no_vector_index: bool,
    /// Drop the table first if it exists.
    #[arg(long)]
    pub replace: bool,
}
