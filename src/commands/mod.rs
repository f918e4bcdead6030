//! Floor 6, the commands: the command line (`cli`) and one function or
//! module per subcommand: resolve settings, open endpoints, call the engine.

pub mod cli;
pub mod generate;
pub mod online;
pub mod tables;
pub mod verify;
pub mod verify_html;

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result, anyhow, bail};
use tokio::runtime::Handle;

use crate::backends::{open_sink, open_source};
use crate::backends::staging::{StagingSink, StagingSource, check_chunk_file};
use crate::commands::cli::{InspectArgs, ResetArgs, RunArgs, StatusArgs};
use crate::contract::{OnExisting, Sink, Source};
use crate::engine::pipeline::{JobConfig, run};
use crate::model::config::{Endpoint, PipelineFile};
use crate::model::hash::ContentHash;
use crate::state::ledger::JobDir;
use crate::state::locks::process_alive;
use crate::state::manifest::{Manifest, read_markers};
use crate::state::progress::{Report, Status, worker_statuses};
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

fn state_root(a: &Option<PathBuf>) -> PathBuf {
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

/// `migrate`, `export` and `import`.
pub fn run_job(command: &str, args: RunArgs, handle: &Handle, cancel: Arc<AtomicBool>) -> Result<Report> {
    let job = setup_job(command, args, handle)?;
    let report = run_setup(command, &job, handle, cancel)?;
    eprintln!("{}", report.table());
    for n in &report.notes {
        eprintln!("note: {n}");
    }
    if let Some(path) = &job.args.report {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing report {}", path.display()))?;
    }
    Ok(report)
}

/// Runs a job that is set up: offline or online, an import only over the
/// chunks its staging area holds.
pub fn run_setup(command: &str, job: &JobSetup, handle: &Handle, cancel: Arc<AtomicBool>) -> Result<Report> {
    Ok(if job.cfg.online {
        crate::commands::online::run_online_job(&job, handle, cancel)?
    } else {
        let ready = match command {
            "import" => Some(StagingSource::open(job.cfg.store.clone())?.ready_chunks()?),
            _ => None,
        };
        run(&job.cfg, job.source.clone(), job.sinks.clone(), ready, cancel)?
    })
}

/// The job's store: the staging area (or state store) given, or the job's
/// directory under the state root.
fn job_store_of(staging: &Option<String>, job: &Option<String>, root: &Option<PathBuf>) -> Result<Store> {
    match (staging, job) {
        (Some(d), _) => Store::open(d),
        (None, Some(j)) => Store::open(&state_root(root).join(j).to_string_lossy()),
        (None, None) => bail!("give --staging DIR|URL or --job ID"),
    }
}

pub fn status(a: StatusArgs) -> Result<()> {
    let store = job_store_of(&a.staging, &a.job, &a.state_root)?;
    let manifest = Manifest::load(&store)?
        .ok_or_else(|| anyhow!("no job state in {} (nothing planned yet)", store.describe()))?;
    let markers = read_markers(&store)?;
    let workers = worker_statuses(&store)?;
    let dir = store.local_dir().map(Path::to_path_buf).unwrap_or_default();
    let mut runs: Vec<Status> = Vec::new();
    for cmd in ["export", "migrate", "import"] {
        let p = JobDir::new(&dir).status(cmd);
        if store.is_remote() {
            break;
        }
        if let Ok(bytes) = std::fs::read(&p) {
            let mut s: Status = serde_json::from_slice(&bytes).with_context(|| format!("{} is damaged", p.display()))?;
            if s.state == "running" && !process_alive(s.pid) {
                s.state = "interrupted (process gone)".into();
            }
            runs.push(s);
        }
    }
    let rejects = std::fs::read_dir(JobDir::new(&dir).rejects()).map(|d| d.count()).unwrap_or(0);
    if a.json {
        let v = serde_json::json!({
            "job": manifest.job, "source": manifest.source, "created_at": manifest.created_at,
            "chunks_planned": manifest.plan.len(), "rows_planned": manifest.plan.iter().map(|c| c.rows).sum::<u64>(),
            "staged_chunks": markers.len(), "staged_rows": markers.values().map(|r| r.rows).sum::<u64>(),
            "staged_bytes": markers.values().map(|r| r.bytes).sum::<u64>(), "reject_files": rejects, "runs": runs,
            "workers": workers,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("job {}  (planned {})", manifest.job, manifest.created_at);
    println!("source: {}", manifest.source);
    println!(
        "plan: {} chunks, {} rows",
        manifest.plan.len(),
        manifest.plan.iter().map(|c| c.rows).sum::<u64>()
    );
    if !markers.is_empty() {
        println!(
            "staged: {}/{} chunks, {} rows, {:.1} MB",
            markers.len(),
            manifest.plan.len(),
            markers.values().map(|r| r.rows).sum::<u64>(),
            markers.values().map(|r| r.bytes).sum::<u64>() as f64 / 1e6
        );
    }
    for s in &runs {
        let phase = if s.phase.is_empty() || s.state != "running" { String::new() } else { format!(" ({})", s.phase) };
        println!(
            "{}: {}{phase} · {} chunks committed, {} skipped (already committed) of {} · {} rows written · {} rejected · {:.1} MB · updated {}",
            s.command,
            s.state,
            s.chunks_committed,
            s.chunks_skipped,
            s.chunks_total,
            s.rows_written,
            s.rows_rejected,
            s.bytes_written as f64 / 1e6,
            s.updated_at
        );
        for f in &s.failures {
            println!("  failed chunk {}: {}", f.chunk, f.error);
        }
        if let Some(e) = &s.last_error {
            println!("  last error: {e}");
        }
    }
    for line in crate::commands::online::status_lines(&dir, &runs)? {
        println!("{line}");
    }
    for line in crate::engine::pipeline::shared::status_lines(&workers) {
        println!("{line}");
    }
    if rejects > 0 {
        println!("rejects: {rejects} files in {}", JobDir::new(&dir).rejects().display());
    }
    Ok(())
}

/// Returns false when any chunk file fails its check.
pub fn inspect(a: InspectArgs) -> Result<bool> {
    let store = Store::open(&a.dir)?;
    let source = StagingSource::open(store.clone())?;
    let m = source.manifest().clone();
    let markers = read_markers(&store)?;
    let mut ok = true;
    let mut chunks = Vec::new();
    for c in &m.plan {
        let (state, rows, bytes) = match markers.get(&c.id) {
            None => ("not exported".to_string(), 0, 0),
            Some(rec) => {
                let mut state = match check_chunk_file(&store, rec) {
                    Ok(_) => "ok".to_string(),
                    Err(e) => {
                        ok = false;
                        format!("BAD: {e:#}")
                    }
                };
                if a.deep && state == "ok" {
                    let mut h = ContentHash::default();
                    source.read_chunk(c, 4096, &mut |b| {
                        h.add_batch(&b);
                        Ok(())
                    })?;
                    if h.rows != rec.rows || h.hex() != rec.content_hash {
                        ok = false;
                        state = format!("BAD: content ({} rows, hash {}) differs from its marker", h.rows, h.hex());
                    }
                }
                (state, rec.rows, rec.bytes)
            }
        };
        chunks.push(serde_json::json!({"chunk": c.id, "lo": c.lo, "hi": c.hi, "text": c.text, "rows": rows, "bytes": bytes, "state": state}));
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"manifest": m, "chunks": chunks, "ok": ok}))?);
        return Ok(ok);
    }
    println!("staging {} · format {} · job {} · created {}", store.describe(), m.format_version, m.job, m.created_at);
    println!("source: {}", m.source);
    println!("table {} (primary key {}):", m.table.name, m.table.primary_key);
    for c in &m.table.columns {
        println!("  {:<16} {:?}{}", c.name, c.ty, if c.nullable { "" } else { " NOT NULL" });
    }
    for ix in &m.table.indexes {
        println!("  index {} on ({}) {:?}", ix.name, ix.columns.join(", "), ix.kind);
    }
    println!("vectors: {}{}", m.vector_encoding, if m.vectors_exact { ", bit-exact" } else { ", NOT bit-exact" });
    println!("{:>8} {:>21} {:>21} {:>9} {:>12}  state", "chunk", "lo", "hi", "rows", "bytes");
    for c in &chunks {
        println!(
            "{:>8} {:>21} {:>21} {:>9} {:>12}  {}",
            c["chunk"], c["lo"], c["hi"], c["rows"], c["bytes"], c["state"].as_str().unwrap()
        );
    }
    println!(
        "{} of {} chunks exported, {} rows, {:.1} MB · {}",
        markers.len(),
        m.plan.len(),
        markers.values().map(|r| r.rows).sum::<u64>(),
        markers.values().map(|r| r.bytes).sum::<u64>() as f64 / 1e6,
        if ok { "all chunk files intact" } else { "DAMAGED chunk files (see above)" }
    );
    Ok(ok)
}

pub fn reset(a: ResetArgs, handle: &Handle) -> Result<()> {
    let store = job_store_of(&a.staging, &a.job, &a.state_root)?;
    let job = match (&a.job, Manifest::load(&store)?) {
        (Some(j), _) => j.clone(),
        (None, Some(m)) => m.job,
        (None, None) => bail!("no job in {}", store.describe()),
    };
    let dir = store.local_dir().map(Path::to_path_buf).unwrap_or_else(|| state_root(&a.state_root).join(&job));
    let target = a.to.as_deref().map(Endpoint::parse).transpose()?;
    if !a.yes {
        eprintln!("This forgets job {job}: removes {} (manifest, chunks, change files, claims, status, rejects)", store.describe());
        if let Some(t) = &target {
            eprintln!("and its ledger rows in {} (rows already copied stay).", t.describe());
        }
        if let Some(st) = crate::state::online::OnlineState::load(&dir)? {
            eprintln!("It drops replication slot {} and publication {} on {}.", st.slot, st.publication, st.source);
        }
        eprint!("Proceed? [y/N] ");
        std::io::stderr().flush()?;
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        if !matches!(line.trim(), "y" | "Y" | "yes") {
            bail!("reset aborted");
        }
    }
    crate::commands::online::reset_artifacts(&dir, a.from.as_deref(), handle)?;
    if let Some(t) = &target {
        // The ledger is per database, not per table.
        let n = open_sink(t, DEFAULT_TABLE, handle, Some(&store))?.forget_job(&job)?;
        eprintln!("deleted {n} ledger rows of job {job}");
    }
    // A shared job's claims and worker status, and a remote store's objects.
    for prefix in ["work", "ledger", "chunks", "rejects"] {
        if store.is_remote() || prefix == "work" {
            store.delete_prefix(prefix)?;
        }
    }
    if store.is_remote() {
        store.delete("manifest.json")?;
    }
    let jd = JobDir::new(&dir);
    for p in [jd.chunks(), jd.rejects(), crate::backends::staging::changes::changes_dir(&dir)] {
        if p.exists() {
            std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    let mut files = vec![jd.manifest()];
    for command in ["export", "import", "migrate"] {
        files.extend([jd.status(command), crate::state::online::CutoverRequest::path(&dir, command)]);
    }
    for p in files {
        if p.exists() {
            std::fs::remove_file(&p)?;
        }
    }
    let _ = std::fs::remove_dir(&dir); // only if now empty
    eprintln!("job {job} reset");
    Ok(())
}
