//! The online side of the commands: `migrate --online`, `cutover`, and what
//! `reset` and `status` do about a job's source artefacts.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use tokio::runtime::Handle;

use crate::backends::open_source;
use crate::backends::milvus::MilvusSource;
use crate::backends::milvus::changes::{MilvusChangeStream, OpenTarget};
use crate::backends::oceanbase::ObSource;
use crate::backends::oceanbase::changes::{ObChangeStream, drop_recorded};
use crate::backends::postgres::PgSource;
use crate::backends::postgres::changes::{PgChangeStream, drop_artifacts};
use crate::backends::staging::StagingSource;
use crate::backends::staging::changes::{EndMarker, StagingChangeStream, changes_dir, compare_digests, read_change_markers, read_end, write_end};
use crate::commands::job::JobSetup;
use crate::contract::{Feedback, Source};
use crate::engine::online::watch::{DigestSide, Digests, Judge, MayDiffer, Mend, WatchSides, hashes_dir, keep_hashes, row_hashes, watch_dir};
use crate::engine::verify::Normalise;
use crate::model::hash::ChunkDigest;
use crate::model::plan::ChunkRange;
use crate::engine::online::{CutoverCheck, run_online};
use crate::engine::online::follow::OpenStream;
use crate::model::now_rfc3339;
use crate::model::config::Endpoint;
use crate::state::online::{CutoverRequest, OnlineState};
use crate::state::progress::{Report, Status};

/// `migrate --online`, `export --online`, `import --online`.
pub fn run_online_job(job: &JobSetup, handle: &Handle, cancel: Arc<AtomicBool>) -> Result<Report> {
    let dir = &job.cfg.job_dir;
    if let Some(done) = CutoverRequest::load(dir, &job.cfg.command)?.filter(|r| r.state == "done") {
        bail!(
            "job {} was cut over at {} ({}); nothing left to follow. `vmig reset` it to start over",
            job.cfg.job,
            done.finished_at.unwrap_or_default(),
            done.message.unwrap_or_default()
        );
    }
    match &job.source_ep {
        Endpoint::Postgres(url) => from_postgres(job, url, handle, cancel),
        Endpoint::OceanBase(url) => from_oceanbase(job, url, handle, cancel),
        Endpoint::Milvus(url) => from_milvus(job, url, handle, cancel),
        Endpoint::Staging(addr) => {
            let store = crate::state::store::Store::open(addr)?;
            let dir = store
                .local_dir()
                .ok_or_else(|| anyhow!("online jobs stage change files in a local directory, not {}", store.describe()))?
                .to_path_buf();
            from_staging(job, &dir, handle, cancel)
        }
    }
}

/// Milvus answers reads only from an indexed, loaded collection, and an
/// online job reads its target (partial updates, the cutover's verify).
fn check_target(job: &JobSetup) -> Result<()> {
    if matches!(job.target_ep, Some(Endpoint::Milvus(_))) && !job.cfg.create_indexes {
        bail!(
            "online into Milvus needs the collection's vector index (Milvus reads only indexed, loaded collections, and \
             the job reads its target for partial updates and the cutover's verify); drop --no-indexes"
        );
    }
    Ok(())
}

/// Change capture on a PostgreSQL source (logical replication slot).
fn from_postgres(job: &JobSetup, url: &crate::model::config::PgUrl, handle: &Handle, cancel: Arc<AtomicBool>) -> Result<Report> {
    check_target(job)?;
    let cfg = &job.cfg;
    let pg = Arc::new(PgSource::open(url.clone(), &job.table, handle.clone())?);
    let job_dir = cfg.job_dir.clone();
    let open_stream: OpenStream<'_> = Box::new(|fb: &crate::state::progress::Progress, committed: bool| {
        let s = PgChangeStream::open(url.clone(), &job.table, handle.clone(), &cfg.job, &job_dir, &pg, committed, fb as &dyn Feedback)?;
        Ok(Box::new(s) as Box<dyn crate::contract::changes::ChangeStream>)
    });
    from_database(job, pg.clone(), open_stream, false, handle, cancel)
}

/// Change capture on an OceanBase / seekdb source (triggers and a changelog).
fn from_oceanbase(job: &JobSetup, url: &crate::model::config::ObUrl, handle: &Handle, cancel: Arc<AtomicBool>) -> Result<Report> {
    check_target(job)?;
    let cfg = &job.cfg;
    let ob = Arc::new(ObSource::open(url.clone(), &job.table, handle.clone())?);
    let job_dir = cfg.job_dir.clone();
    let reader = ob.clone();
    let open_stream: OpenStream<'_> = Box::new(move |fb: &crate::state::progress::Progress, committed: bool| {
        let s = ObChangeStream::open(url.clone(), &job.table, handle.clone(), &job_dir, reader, committed, fb as &dyn Feedback)?;
        Ok(Box::new(s) as Box<dyn crate::contract::changes::ChangeStream>)
    });
    from_database(job, ob, open_stream, false, handle, cancel)
}

/// A Milvus source: inserts polled by createTime watermark, deletes found by
/// an id-set reconcile against the target (so there must be one database
/// target, and no staging in between).
fn from_milvus(job: &JobSetup, url: &crate::model::config::MilvusUrl, handle: &Handle, cancel: Arc<AtomicBool>) -> Result<Report> {
    check_target(job)?;
    let Some(target_ep) = job.target_ep.clone().filter(|_| job.sinks.len() == 1) else {
        bail!(
            "online from Milvus needs one database target (--to) and no staging: its deletes are found by comparing the \
             ids of source and target. Migrate directly, or export/import offline and converge with `vmig repair`"
        );
    };
    let cfg = &job.cfg;
    // Before the snapshot's read timestamp: the first poll covers what it missed.
    let started_ms = crate::backends::milvus::changes::now_ms();
    let snapshot = Arc::new(MilvusSource::open(url.clone(), &job.table, handle.clone())?);
    let job_dir = cfg.job_dir.clone();
    let margin = Duration::from_secs(job.args.watermark_margin.unwrap_or(5));
    let every = Duration::from_secs(job.args.reconcile_every.unwrap_or(300).max(1));
    let (url, table, target_table, h) = (url.clone(), job.table.clone(), job.target_table.clone(), handle.clone());
    let open_stream: OpenStream<'_> = Box::new(move |fb: &crate::state::progress::Progress, _committed: bool| {
        let polled = Arc::new(MilvusSource::open(url, &table, h.clone())?);
        let open_target: OpenTarget = Box::new(move || open_source(&target_ep, &target_table, &h));
        let s = MilvusChangeStream::open(polled, &job_dir, started_ms, margin, every, open_target, fb as &dyn Feedback)?;
        Ok(Box::new(s) as Box<dyn crate::contract::changes::ChangeStream>)
    });
    from_database(job, snapshot, open_stream, true, handle, cancel)
}

/// A database source into a database, a staging area, or both: the
/// cutover verifies the target against the source as it is then, or (an
/// export) writes the digests its import verifies against. `blind_source`:
/// the source has no change stream that sees everything (Milvus), so what
/// the cutover finds differing is recopied, and `--full-verify` is `vmig
/// repair` (verify, recopy differing chunks, verify); so into Milvus too.
fn from_database(
    job: &JobSetup,
    source: Arc<dyn Source>,
    open_stream: OpenStream<'_>,
    blind_source: bool,
    handle: &Handle,
    cancel: Arc<AtomicBool>,
) -> Result<Report> {
    let cfg = &job.cfg;
    let may_differ = |target_ep: &Endpoint| MayDiffer::of(blind_source, matches!(target_ep, Endpoint::Milvus(_)));
    let check = || -> Result<CutoverCheck> {
        // The source as it is now (not the snapshot the copy read).
        let now = open_source(&job.source_ep, &job.table, handle)?;
        match (&job.target_ep, job.target_ep.as_ref().and_then(may_differ)) {
            // Milvus targets too: Milvus 2.3 can lose a delete it acknowledged
            // (the delete of an upsert as well, leaving an old copy), so a
            // difference there is recopied and verified again.
            (Some(target_ep), Some(why)) => {
                let sink = crate::backends::open_sink(target_ep, &job.target_table, handle, None)?;
                let open_target = || open_source(target_ep, &job.target_table, handle);
                let say = |m: &str| say!("{m}");
                let mut found = Vec::new();
                let mut check = None;
                for _round in 0..REPAIR_ROUNDS {
                    let r = crate::engine::repair::repair(
                        now.as_ref(),
                        &open_target,
                        None,
                        sink.as_ref(),
                        cfg.chunk_rows,
                        cfg.workers,
                        crate::engine::repair::RECOPY_SETTLE,
                        &say,
                    )?;
                    if let Some(before) = r.before.as_ref().filter(|b| !b.equal) {
                        found.push(format!("{} differing chunks ({})", before.differing_chunks.len(), first_differences(before)));
                    }
                    let after: CutoverCheck = r.after.ok_or_else(|| anyhow!("repair left no verify report"))?.into();
                    let equal = after.equal;
                    check = Some(after);
                    if equal {
                        break;
                    }
                }
                // The last round's verify is the answer: no second read of both sides.
                let mut check = check.expect("at least one repair round");
                if check.equal && !found.is_empty() {
                    check.summary =
                        format!("{} (repair recopied, in {} rounds: {}; {})", check.summary, found.len(), found.join("; then "), why.why_mended());
                }
                Ok(check)
            }
            (Some(target_ep), None) => {
                let plan = now.plan(cfg.chunk_rows)?;
                let target = open_source(target_ep, &job.target_table, handle)?;
                Ok(crate::engine::verify::verify(now.as_ref(), target.as_ref(), &plan, cfg.workers)?.into())
            }
            // Export: the import side verifies against these digests.
            (None, _) => {
                let plan = now.plan(cfg.chunk_rows)?;
                let digests = crate::engine::verify::digests_all_modes(now.as_ref(), &plan)?;
                end_of_export(&cfg.job_dir, plan, digests)
            }
        }
    };
    // Verified while following, so the cutover checks only what changed. A
    // Milvus target also counts the copies of those keys and of each chunk,
    // and a chunk found differing there (Milvus 2.3 can lose a delete it
    // acknowledged) is recopied and compared again. From a Milvus source
    // (watermark and id reconcile) a differing chunk is recopied too: a
    // write that left the watermark as it was reaches the target no other way.
    let judge = match &job.target_ep {
        Some(target_ep) => Judge::Compare {
            open: Box::new(move || Ok((open_source(&job.source_ep, &job.table, handle)?, open_source(target_ep, &job.target_table, handle)?))),
            mend: may_differ(target_ep).map(|why| Mend {
                why,
                recopy: Box::new(move |from: &dyn Source, to: &dyn Source, plan: &[ChunkRange], chunks: &[ChunkRange]| {
                    let sink = crate::backends::open_sink(target_ep, &job.target_table, handle, None)?;
                    let say = |m: &str| say!("{m}");
                    crate::engine::repair::recopy_chunks(from, to, None, sink.as_ref(), plan, chunks, &say).map(|_| ())
                }),
            }),
        },
        // An export: the source's digests in every mode an import may compare in.
        None => Judge::Digest(DigestSide {
            open: Box::new(move || open_source(&job.source_ep, &job.table, handle)),
            columns: source.spec().columns.iter().map(|c| c.name.clone()).collect(),
            modes: Box::new(|_| Normalise::ALL.to_vec()),
            finish: Box::new(move |plan, digests| end_of_export(&cfg.job_dir, plan.to_vec(), digests.clone())),
            count_copies: false,
        }),
    };
    let watch_sides = Some(WatchSides { judge, rate: job.args.verify_rate.unwrap_or(0) });
    run_online(cfg, source, job.sinks.clone(), open_stream, &check, watch_sides, cancel)
}

/// The end of an online export: its source's digests (as the source is with
/// the writes stopped) in `changes/end.json`, for the import to compare.
fn end_of_export(dir: &std::path::Path, plan: Vec<ChunkRange>, digests: Digests) -> Result<CutoverCheck> {
    let source_rows = digests.values().next().map(|d| d.iter().map(|c| c.rows).sum()).unwrap_or(0);
    let last_file = read_change_markers(dir)?.keys().next_back().copied().unwrap_or(0);
    // Each row's hash, so that an import whose chunk differs can name the ids.
    keep_hashes(&watch_dir(dir, "export"), &end_hashes(dir))?;
    write_end(dir, &EndMarker { last_file, source_rows, plan, digests, written_at: now_rfc3339() })?;
    Ok(CutoverCheck {
        equal: true,
        summary: format!(
            "the export is complete ({source_rows} source rows, {last_file} change files; digests in changes/end.json). \
             The target is ready once `vmig import --online` on this staging area prints its own \"safe to switch\""
        ),
        differences: String::new(),
        only_extra_copies: false,
    })
}

/// Repairs a cutover's check may run before it reports a difference.
const REPAIR_ROUNDS: usize = 3;

/// The first differing chunks of a verify, for a one-line summary.
fn first_differences(r: &crate::engine::verify::VerifyReport) -> String {
    r.differing_chunks.iter().take(3).map(|d| d.describe()).collect::<Vec<_>>().join("; ")
}

/// `import --online`: the export's snapshot chunks, then its change files in
/// order; cuts over once the export has cut over and everything is applied.
fn from_staging(job: &JobSetup, dir: &std::path::Path, handle: &Handle, cancel: Arc<AtomicBool>) -> Result<Report> {
    check_target(job)?;
    let cfg = &job.cfg;
    let staging = StagingSource::open(crate::state::store::Store::open(&dir.to_string_lossy())?)?;
    wait_for_snapshot(&staging, &cancel)?;
    let spec = staging.spec().clone();
    let exact = staging.vectors_exact();
    let source: Arc<dyn Source> = Arc::new(staging);
    let open_stream: OpenStream<'_> = Box::new(|_: &crate::state::progress::Progress, _| {
        Ok(Box::new(StagingChangeStream::open(dir.to_path_buf(), spec.clone())) as Box<dyn crate::contract::changes::ChangeStream>)
    });
    let target_ep = job.target_ep.clone().ok_or_else(|| anyhow!("import needs --to"))?;
    let columns: Vec<String> = source.spec().columns.iter().map(|c| c.name.clone()).collect();
    let end_of_export = || read_end(dir)?.ok_or_else(|| anyhow!("the export has not cut over (no changes/end.json)"));
    let check = || -> Result<CutoverCheck> {
        let end = end_of_export()?;
        let target = open_source(&target_ep, &job.target_table, handle)?;
        let (mode, got) = crate::engine::verify::digests_for(target.as_ref(), &end.plan, &columns, exact, false)?;
        against_export(&end, &mode, &got, &|_| None)
    };
    let import_watch = watch_dir(&cfg.job_dir, "import");
    // The target's digests while following, in the mode it is compared in;
    // at cutover, with the export's (same plan: the snapshot's), or read
    // whole if the export planned otherwise.
    let judge = Judge::Digest(DigestSide {
        open: Box::new(|| open_source(&target_ep, &job.target_table, handle)),
        columns: columns.clone(),
        modes: Box::new(move |target| vec![Normalise::for_side(target, exact, false)]),
        finish: Box::new(|plan, digests| {
            let end = end_of_export()?;
            match digests.iter().next() {
                Some((mode, got)) if end.plan == plan => {
                    against_export(&end, mode, got, &|w| differing_ids(dir, &import_watch, &end, mode, w))
                }
                _ => check(),
            }
        }),
        count_copies: true,
    });
    let watch_sides = WatchSides { judge, rate: job.args.verify_rate.unwrap_or(0) };
    run_online(cfg, source.clone(), job.sinks.clone(), open_stream, &check, Some(watch_sides), cancel)
}

/// An import's digests (`mode`) compared with those its export wrote at
/// cutover; `ids` names what differs in a chunk, where it can.
fn against_export(end: &EndMarker, mode: &str, got: &[ChunkDigest], ids: &dyn Fn(&ChunkDigest) -> Option<String>) -> Result<CutoverCheck> {
    let want = end.digests.get(mode).ok_or_else(|| anyhow!("changes/end.json has no digests for comparison mode {mode}"))?;
    let diffs = compare_digests(want, got);
    let rows: u64 = got.iter().map(|d| d.rows).sum();
    Ok(CutoverCheck {
        equal: diffs.is_empty(),
        summary: format!("the target equals the export's source at its cutover ({rows} rows; per-chunk digests of ids and every column, {mode})"),
        differences: diffs.into_iter().take(5).map(|(w, said)| ids(w).unwrap_or(said)).collect::<Vec<_>>().join("; "),
        only_extra_copies: false,
    })
}

/// Where an export's cutover leaves its source's row hashes (every mode).
fn end_hashes(dir: &std::path::Path) -> std::path::PathBuf {
    changes_dir(dir).join("end-hashes")
}

/// A differing chunk's missing, extra and different ids: the export's row
/// hashes against the import's (both as they were at their cutovers).
fn differing_ids(dir: &std::path::Path, import_watch: &std::path::Path, end: &EndMarker, mode: &str, w: &ChunkDigest) -> Option<String> {
    let chunk = end.plan.iter().find(|c| c.id == w.chunk)?;
    let ours = Normalise::ALL.into_iter().find(|n| n.key() == mode)?;
    let source = row_hashes(&end_hashes(dir), w.chunk, &Normalise::ALL, mode).ok()??;
    let target = row_hashes(&hashes_dir(import_watch), w.chunk, &[ours], mode).ok()??;
    Some(crate::engine::verify::diff_of(chunk, &source, &target, target.len() as u64).describe())
}

/// An online import starts once the export's snapshot is complete.
fn wait_for_snapshot(staging: &StagingSource, cancel: &AtomicBool) -> Result<()> {
    let total = staging.manifest().plan.len();
    let mut said = usize::MAX;
    loop {
        let ready = staging.ready_chunks()?.len();
        if ready >= total {
            return Ok(());
        }
        if cancel.load(Relaxed) {
            bail!("cancelled while waiting for the export's snapshot ({ready} of {total} chunks)");
        }
        if ready != said {
            say!("waiting for the export's snapshot: {ready} of {total} chunks exported");
            said = ready;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `reset` of an online job: drops what it keeps on its source (needs the
/// source), or refuses before anything is forgotten.
pub fn reset_artifacts(dir: &std::path::Path, from: Option<&str>, handle: &Handle) -> Result<()> {
    let Some(state) = OnlineState::load(dir)? else { return Ok(()) };
    if !state.has_artifacts() {
        std::fs::remove_file(OnlineState::path(dir))?;
        return Ok(());
    }
    let Some(from) = from else {
        bail!(
            "job in {} owns {}; give --from URL so reset drops them (left behind, they keep {})",
            dir.display(),
            state.describe(),
            if state.kind == "postgres" { "WAL and fill the source's disk" } else { "logging every write to the table" }
        );
    };
    let (dropped, source) = match Endpoint::parse(from)? {
        Endpoint::Postgres(url) if state.kind == "postgres" => (handle.block_on(drop_artifacts(&url, &state.slot))?, url.redacted()),
        Endpoint::OceanBase(url) if state.kind == "oceanbase" => (drop_recorded(&url, &state, handle)?, url.redacted()),
        _ => bail!("--from must be the job's source ({})", state.source),
    };
    if dropped.is_empty() {
        say!("nothing of {} was left on {source}", state.describe());
    } else {
        say!("dropped {} on {source}", dropped.join(" and "));
    }
    std::fs::remove_file(OnlineState::path(dir))?;
    Ok(())
}

/// Lines `vmig status` prints about an online job.
pub fn status_lines(dir: &std::path::Path, runs: &[Status]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for s in runs {
        if let Some(o) = &s.online {
            out.push(format!(
                "online ({}): {} · applied position {} · source at {}",
                if s.state == "running" { s.phase.as_str() } else { s.state.as_str() },
                o.summary(),
                o.applied_position,
                o.source_position
            ));
            if let Some(n) = &o.note {
                out.push(n.clone());
            }
            if let Some(v) = &o.verification {
                out.push(format!("verification while following: {}", v.summary()));
            }
            if let Some(w) = &o.warning {
                out.push(format!("warning: {w}"));
            }
        }
    }
    if let Some(st) = OnlineState::load(dir)?.filter(|s| s.has_artifacts()) {
        out.push(format!("source artefacts: {} (kept until cutover or `vmig reset --from`)", st.describe()));
    }
    for command in ["export", "import", "migrate"] {
        if let Some(r) = CutoverRequest::load(dir, command)? {
            out.push(format!("{command} cutover: {}{}", r.state, r.message.map(|m| format!(" · {m}")).unwrap_or_default()));
        }
    }
    Ok(out)
}
