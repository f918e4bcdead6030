//! What every job command shares: flags over the pipeline file over the
//! environment, the job id and state directory, endpoints opened and checked.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Result, anyhow, bail};
use tokio::runtime::Handle;

use crate::backends::{open_sink, open_source};
use crate::backends::staging::{StagingSink, StagingSource};
use crate::commands::cli::RunArgs;
use crate::contract::{OnExisting, Sink, Source};
use crate::engine::pipeline::JobConfig;
use crate::model::config::{Endpoint, PipelineFile};
use crate::state::manifest::Manifest;
use crate::state::store::Store;

pub const DEFAULT_TABLE: &str = "modeldata";

pub const DEFAULT_STATE_ROOT: &str = "staging";

/// Exit code for a run that was cancelled (Ctrl+C).
pub const EXIT_CANCELLED: i32 = 130;

/// Flags merged over the pipeline file, over the environment.
pub fn resolve_run_args(mut a: RunArgs) -> Result<RunArgs> {
    let file = match &a.config {
        Some(p) => PipelineFile::load(p)?,
        None => PipelineFile::default(),
    };
    a.subset = a.subset.or(file.subset());
    a.from = a.from.or(file.from).or_else(|| std::env::var("VMIG_FROM").ok());
    a.to = a.to.or(file.to).or_else(|| std::env::var("VMIG_TO").ok());
    a.table = a.table.or(file.table);
    a.target_table = a.target_table.or(file.target_table);
    a.staging = a.staging.or(file.staging);
    a.job = a.job.or(file.job);
    a.workers = a.workers.or(file.workers);
    a.chunk_rows = a.chunk_rows.or(file.chunk_rows);
    a.batch_rows = a.batch_rows.or(file.batch_rows);
    if a.on_existing.is_none() {
        a.on_existing = match file.on_existing.as_deref() {
            None => None,
            Some("fail") => Some(OnExisting::Fail),
            Some("upsert") => Some(OnExisting::Upsert),
            Some("truncate") => Some(OnExisting::Truncate),
            Some(o) => bail!("pipeline file: on_existing must be fail, upsert or truncate, not {o:?}"),
        };
    }
    a.max_rejects = a.max_rejects.or(file.max_rejects);
    a.rate_limit = a.rate_limit.or(file.rate_limit);
    a.retry_for = a.retry_for.or(file.retry_for);
    a.report = a.report.or(file.report);
    a.metrics = a.metrics.or(file.metrics);
    a.watermark_margin = a.watermark_margin.or(file.watermark_margin);
    a.reconcile_every = a.reconcile_every.or(file.reconcile_every);
    a.online = a.online || file.online.unwrap_or(false);
    a.milvus_fields = a.milvus_fields.or(file.milvus_fields);
    a.state = a.state.or(file.state);
    a.shared = a.shared || file.shared.unwrap_or(false);
    a.shard = a.shard.or(file.shard);
    a.shards = a.shards.or(file.shards);
    a.lease = a.lease.or(file.lease);
    a.tables = a.tables.or(file.tables);
    Ok(a)
}

/// A stable job id from what is copied where (no secrets in it).
pub fn derive_job_id(table: &str, from: &str, to: &str) -> String {
    let h = xxhash_rust::xxh3::xxh3_64(format!("{from}\n{to}").as_bytes());
    let t: String = table.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    format!("{t}-{:08x}", h as u32)
}

/// What a job copies to, for its id: a subset is a job of its own (moving
/// team A, then team B, into one target are two jobs with two ledgers).
fn subset_target(to: &str, filter: Option<&crate::model::filter::Filter>) -> String {
    match filter {
        Some(f) => format!("{to} where {}", f.describe()),
        None => to.to_string(),
    }
}

/// Batches of about 1 MB: small enough to keep every stage busy (the
/// database starts on a batch while the next one is decoded), large enough
/// to amortise per-batch work. 1536-d float32 rows give ~160 rows.
fn auto_batch_rows(row_bytes: usize) -> usize {
    (1_000_000 / row_bytes.max(1)).clamp(64, 4096)
}

pub fn state_root(a: &Option<PathBuf>) -> PathBuf {
    a.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_ROOT))
}

/// A job resolved from its flags: settings, endpoints, directory.
pub struct JobSetup {
    pub args: RunArgs,
    pub cfg: JobConfig,
    pub source_ep: Endpoint,
    pub target_ep: Option<Endpoint>,
    pub source: Arc<dyn Source>,
    pub sinks: Vec<(String, Arc<dyn Sink>)>,
    pub table: String,
    pub target_table: String,
}

/// Resolves flags, pipeline file and environment into a job (opens its endpoints).
pub fn setup_job(command: &str, args: RunArgs, handle: &Handle) -> Result<JobSetup> {
    let a = resolve_run_args(args)?;
    let table = a.table.clone().unwrap_or_else(|| DEFAULT_TABLE.to_string());
    let need = |v: &Option<String>, flag: &str| -> Result<Endpoint> {
        let ep = Endpoint::parse(v.as_deref().ok_or_else(|| anyhow!("{command} needs --{flag} (or VMIG_{})", flag.to_uppercase()))?)?;
        Ok(ep.with_milvus_fields(a.milvus_fields.as_ref()))
    };
    let staging = a.staging.clone();
    let (source_ep, target_ep) = match command {
        "migrate" => (need(&a.from, "from")?, Some(need(&a.to, "to")?)),
        "export" => (need(&a.from, "from")?, None),
        "import" => (
            Endpoint::Staging(staging.clone().ok_or_else(|| anyhow!("import needs --staging DIR|URL"))?),
            Some(need(&a.to, "to")?),
        ),
        _ => unreachable!(),
    };
    if command == "export" && staging.is_none() {
        bail!("export needs --staging DIR|URL");
    }
    let source = open_source(&source_ep, &table, handle)?;
    let target_table = a.target_table.clone().unwrap_or_else(|| source.spec().name.clone());
    let filter = match (command, a.subset.filter()?) {
        // An import moves the subset its export chose.
        ("import", asked) => {
            let st = StagingSource::open(Store::open(staging.as_deref().unwrap())?)?;
            let filter = st.manifest().filter.as_deref().map(crate::model::filter::Filter::parse).transpose()?;
            if let Some(asked) = asked {
                st.restrict(&asked)?;
            }
            filter
        }
        (_, f) => f,
    };
    if let Some(f) = &filter {
        if a.online {
            bail!("subset jobs (--filter, --team, --dataset, --collection) run offline for now; drop --online or the filter");
        }
        if command != "import" {
            source.restrict(f)?;
        }
    }

    let staging_store = staging.as_deref().map(Store::open).transpose()?;
    let state_store = a.state.as_deref().map(Store::open).transpose()?;
    for st in staging_store.iter().chain(state_store.iter()).filter(|s| s.is_remote()) {
        st.check_reachable()?;
    }
    let shard = crate::state::claims::shard_from(a.shard.as_deref(), a.shards)?;
    let shared = a.shared
        || shard.is_some()
        || state_store.is_some()
        || staging_store.as_ref().is_some_and(|s| s.is_remote());
    // Where the manifest (and a shared job's claims) live.
    let home = staging_store.clone().or_else(|| state_store.clone());
    let job = match command {
        "import" => {
            let st = staging_store.as_ref().unwrap();
            let m = Manifest::load(st)?.ok_or_else(|| anyhow!("{} has no manifest.json", st.describe()))?;
            a.job.clone().unwrap_or(m.job)
        }
        _ => {
            let to_desc = match (&target_ep, &staging_store) {
                (Some(t), _) => format!("{} {}", t.describe(), target_table),
                (None, Some(st)) => format!("staging {}", st.describe()),
                _ => unreachable!(),
            };
            match (&a.job, home.as_ref().map(Manifest::load)) {
                (Some(j), _) => j.clone(),
                (None, Some(Ok(Some(m)))) => m.job,
                _ => derive_job_id(&table, &source.describe(), &subset_target(&to_desc, filter.as_ref())),
            }
        }
    };
    // The job's local directory (status, rejects): the store itself when it
    // is a local directory, else one under the state root.
    let job_dir = match home.as_ref().and_then(|h| h.local_dir()) {
        Some(d) => d.to_path_buf(),
        None => state_root(&a.state_root).join(&job),
    };
    let store = match &home {
        Some(h) => h.clone(),
        None => Store::open(&job_dir.to_string_lossy())?,
    };
    if shared && a.online {
        bail!("online jobs run as one process; drop --shard/--shared/--state (or use a local --staging directory)");
    }
    let mut sinks: Vec<(String, Arc<dyn Sink>)> = Vec::new();
    if command != "import" {
        if let Some(st) = &staging_store {
            sinks.push(("staging".into(), Arc::new(StagingSink::new(st.clone()))));
        }
    }
    if let Some(t) = &target_ep {
        sinks.push(("target".into(), open_sink(t, &target_table, handle, Some(&store))?));
    }
    if let Some(f) = &filter {
        for (_, sink) in &sinks {
            sink.restrict(f)?;
        }
    }
    // Lanes keep an export and imports to different targets apart in one store.
    let lane = match &target_ep {
        None => "export".to_string(),
        Some(t) => format!(
            "{command}-{:08x}",
            xxhash_rust::xxh3::xxh3_64(format!("{} {target_table}", t.describe()).as_bytes()) as u32
        ),
    };
    let distributed = shared.then(|| crate::state::claims::Distributed {
        shard,
        lease: std::time::Duration::from_secs(a.lease.unwrap_or(60).max(1)),
    });
    let vectors_exact = source.vectors_exact();
    let cfg = JobConfig {
        command: command.to_string(),
        job,
        job_dir,
        workers: a.workers.unwrap_or(2).max(1),
        chunk_rows: a.chunk_rows.unwrap_or(20_000).max(1),
        batch_rows: a.batch_rows.unwrap_or_else(|| auto_batch_rows(crate::model::schema::estimate_row_bytes(source.spec()))).max(1),
        channel_batches: 4,
        on_existing: a.on_existing.unwrap_or_default(),
        max_rejects: a.max_rejects.unwrap_or(0),
        rate_limit: a.rate_limit,
        create_indexes: !a.no_indexes,
        index_memory: a.index_memory,
        vector_storage: a.vector_storage,
        retry_for: std::time::Duration::from_secs(a.retry_for.unwrap_or(120)),
        quiet: a.quiet,
        vectors_exact,
        online: a.online,
        metrics: a.metrics.clone(),
        store,
        distributed,
        lane,
        filter,
        permits: None,
    };
    Ok(JobSetup { args: a, cfg, source_ep, target_ep, source, sinks, table, target_table })
}

/// The job's store: the staging area (or state store) given, or the job's
/// directory under the state root.
pub fn job_store_of(staging: &Option<String>, job: &Option<String>, root: &Option<PathBuf>) -> Result<Store> {
    match (staging, job) {
        (Some(d), _) => Store::open(d),
        (None, Some(j)) => Store::open(&state_root(root).join(j).to_string_lossy()),
        (None, None) => bail!("give --staging DIR|URL or --job ID"),
    }
}
