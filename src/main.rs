use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Result, bail};
use clap::Parser;

use vmig::commands::cli::{Cli, Command};
use vmig::commands;
use vmig::commands::EXIT_CANCELLED;
use vmig::backends::{open_source, parse_side};
use vmig::model::config::{Endpoint, redact_free_text};

fn main() -> ExitCode {
    // Without one process-wide provider, the first TLS connection to Milvus
    // (https://, tonic) panicked: rustls cannot choose between ring and aws-lc-rs.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let cancel = Arc::new(AtomicBool::new(false));
    {
        let cancel = cancel.clone();
        let _ = ctrlc::set_handler(move || {
            if cancel.swap(true, Ordering::SeqCst) {
                std::process::exit(EXIT_CANCELLED);
            }
            eprintln!("\nstopping: in-flight chunks roll back, committed chunks stay (Ctrl+C again to quit now)");
        });
    }
    match run(cli, runtime.handle(), cancel.clone()) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // One line, no stack, no secrets.
            eprintln!("error: {}", redact_free_text(&format!("{e:#}")).replace('\n', " "));
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli, handle: &tokio::runtime::Handle, cancel: Arc<AtomicBool>) -> Result<u8> {
    match cli.command {
        Command::Migrate(a) => job_exit("migrate", a, handle, cancel),
        Command::Export(a) => job_exit("export", a, handle, cancel),
        Command::Import(a) => job_exit("import", a, handle, cancel),
        Command::Cutover(a) => vmig::commands::online::cutover(a, handle, cancel),
        Command::Status(a) => commands::status(a).map(|_| 0),
        Command::Inspect(a) => commands::inspect(a).map(|ok| if ok { 0 } else { 1 }),
        Command::Reset(a) => commands::reset(a, handle).map(|_| 0),
        Command::Repair(a) => {
            let (Some(from), Some(to)) = (a.from.as_deref(), a.to.as_deref()) else {
                bail!("repair needs --from (the source) and --to (the target database)");
            };
            // repair shares verify's flags; those it has no use for are refused, not ignored.
            let verify_only = [("--sample", a.sample.is_some()), ("--recall", a.recall.is_some()), ("--seed", a.seed.is_some()), ("--staging", a.staging.is_some())];
            if let Some((flag, _)) = verify_only.iter().find(|(_, given)| *given) {
                bail!("repair compares and mends every chunk; {flag} is verify's (give the source with --from and the target with --to)");
            }
            let (from, to) = (parse_side(from)?, Endpoint::parse(to)?);
            if matches!(to, Endpoint::Staging(_)) {
                bail!("repair writes a database target; --to cannot be a staging directory");
            }
            let table = a.table.clone().unwrap_or_else(|| commands::DEFAULT_TABLE.into());
            let filter = a.subset.filter()?;
            let source = vmig::backends::open_subset(&from, &table, handle, filter.as_ref())?;
            let target_table = a.target_table.clone().unwrap_or_else(|| source.spec().name.clone());
            let sink = vmig::backends::open_sink(&to, &target_table, handle, None)?;
            if let Some(f) = &filter {
                sink.restrict(f)?;
            }
            let open_target = || vmig::backends::open_subset(&to, &target_table, handle, filter.as_ref());
            let whole_target = match &filter {
                Some(_) => Some(open_source(&to, &target_table, handle)?),
                None => None,
            };
            let r = vmig::engine::repair::repair(
                source.as_ref(),
                &open_target,
                whole_target.as_deref(),
                sink.as_ref(),
                a.chunk_rows.unwrap_or(20_000),
                a.workers.unwrap_or(2),
                &|m| eprintln!("{m}"),
            )?;
            let after = r.after.as_ref().unwrap();
            if r.equal {
                println!(
                    "repair: recopied {} of {} chunks ({} rows written, {} deleted); the target equals the source ({} rows, ids and every column; vectors {})",
                    r.differing_before, r.chunks, r.rows_written, r.rows_deleted, after.target_rows, after.vector_comparison
                );
            } else {
                for d in &after.differing_chunks {
                    println!("still different: {}", d.describe());
                }
                println!("repair: recopied {} chunks, but {} chunks still differ (is the source still being written?)", r.differing_before, after.differing_chunks.len());
            }
            if let Some(p) = &a.report {
                std::fs::write(p, serde_json::to_vec_pretty(&r)?)?;
            }
            Ok(if r.equal { 0 } else { 1 })
        }
        Command::Verify(a) => vmig::commands::verify::run(&a, handle),
        Command::Generate(a) => {
            let ep = Endpoint::parse(&a.to)?;
            if matches!(ep, Endpoint::Staging(_)) {
                bail!("generate needs a database URL");
            }
            let spec = vmig::commands::generate::fastgpt_spec(&a.table, a.dim, a.halfvec, !a.no_vector_index);
            let sink = vmig::backends::open_sink(&ep, &a.table, handle, None)?;
            if a.replace {
                sink.drop_table()?;
            } else if open_source(&ep, &a.table, handle).is_ok() {
                bail!("table {} already exists in {}; use --replace to recreate it", a.table, ep.describe());
            }
            let started = std::time::Instant::now();
            vmig::commands::generate::generate(sink.as_ref(), &spec, a.rows, a.seed, &|m| eprintln!("{m}"))?;
            eprintln!(
                "generated {} rows ({}-d {}) in {} table {} in {:.1}s",
                a.rows,
                a.dim,
                if a.halfvec { "halfvec" } else { "vector" },
                ep.describe(),
                a.table,
                started.elapsed().as_secs_f64()
            );
            Ok(0)
        }
    }
}

fn job_exit(command: &str, a: vmig::commands::cli::RunArgs, handle: &tokio::runtime::Handle, cancel: Arc<AtomicBool>) -> Result<u8> {
    if commands::resolve_run_args(a.clone())?.tables.is_some() {
        let report = vmig::commands::tables::run_tables(command, a, handle, cancel.clone())?;
        if cancel.load(Ordering::SeqCst) {
            eprintln!("cancelled: {} chunks committed in this run; run the same command again to resume", report.chunks_committed());
            return Ok(EXIT_CANCELLED as u8);
        }
        return match report.error() {
            None => Ok(0),
            Some(e) => bail!("{e}"),
        };
    }
    let report = commands::run_job(command, a, handle, cancel.clone())?;
    if cancel.load(Ordering::SeqCst) {
        eprintln!("cancelled: {} chunks committed in this run; run the same command again to resume", report.chunks_committed);
        return Ok(EXIT_CANCELLED as u8);
    }
    match &report.error {
        None => Ok(0),
        Some(e) => bail!("{e}"),
    }
}
