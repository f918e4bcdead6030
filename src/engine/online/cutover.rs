//! The end of an online job: drained, every target finished and checked
//! against the source, the source's artefacts removed, "safe to switch".

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Result, bail};

use crate::contract::changes::ChangeStream;
use crate::engine::online::CutoverCheck;
use crate::engine::online::watch::{Checked, MayDiffer, WatchCheck, Watching};
use crate::engine::pipeline::{JobConfig, PreparedJob, finish_targets};
use crate::model::now_rfc3339;
use crate::model::retry::with_retries;
use crate::state::online::{CutoverRequest, OnlineState};
use crate::state::progress::Progress;

pub(super) fn standalone_cutover(dir: &std::path::Path, command: &str) -> bool {
    CutoverRequest::load(dir, command).ok().flatten().is_some_and(|r| r.standalone)
}

/// Drained: finish every target, check it against the source (what changed
/// since each chunk was seen equal, or both whole tables without a watch or
/// with `--full-verify`), remove the source's artefacts. The writes are
/// stopped from `drain_started` on: the line "cutover window" says how long
/// that lasted and where the time went.
#[allow(clippy::too_many_arguments)]
pub(super) fn cutover(
    cfg: &JobConfig,
    job: &PreparedJob,
    stream: &mut dyn ChangeStream,
    cancel: &Arc<AtomicBool>,
    progress: &Arc<Progress>,
    check: &dyn Fn() -> Result<CutoverCheck>,
    watching: Option<&Watching<'_>>,
    drain_started: Instant,
) -> Result<()> {
    let dir = cfg.job_dir.clone();
    let drained = drain_started.elapsed();
    let fail = |msg: String| -> Result<()> {
        if let Some(mut req) = CutoverRequest::load(&dir, &cfg.command)? {
            req.state = "failed".into();
            req.message = Some(msg.clone());
            req.finished_at = Some(now_rfc3339());
            req.save(&dir, &cfg.command)?;
        }
        bail!("{msg}")
    };
    let finish_started = Instant::now();
    if let Some(e) = finish_targets(cfg, job, cancel, progress) {
        return fail(format!("cutover: finishing the target failed: {e}"));
    }
    let finished = finish_started.elapsed();
    progress.set_phase("verifying");
    // Milvus 2.3 can drop acknowledged deletes while it hands freshly
    // flushed segments over to its query node (milvus#32915): copies
    // counted before that are not what queries show after. The check
    // starts once reads come from what every target persisted.
    let serve_started = Instant::now();
    let mut waited = false;
    for t in &job.targets {
        let what = format!("waiting until {} serves what it persisted", t.sink.describe());
        match with_retries(&what, cfg.retry_for, 0, cancel, &|m| progress.println(m), || t.sink.serve_persisted()) {
            Ok(w) => waited |= w,
            Err(e) => return fail(format!("cutover: {what} failed: {e:#}")),
        }
    }
    let served = if waited { format!(", segments served {:.1} s", serve_started.elapsed().as_secs_f64()) } else { String::new() };
    let full = CutoverRequest::load(&dir, &cfg.command)?.is_some_and(|r| r.full_verify);
    let check_started = Instant::now();
    let checked = match watching.filter(|_| !full) {
        Some(w) => w.check().map(|checked| match checked {
            Checked::Compared(c) => {
                let counted = if c.copies_counted > 0 { format!(", counted the copies in {} chunks", c.copies_counted) } else { String::new() };
                let what = format!(
                    "checked {} changed keys and {} unverified chunks ({} rows){counted}",
                    c.changed_keys, c.unverified_chunks, c.rows_compared
                );
                (changed_only(&c, w.may_differ()), what)
            }
            Checked::Digested(d) => {
                let what = format!(
                    "digested: read {} changed keys again and {} chunks never digested ({} rows)",
                    d.changed_keys, d.undigested_chunks, d.rows_read
                );
                (d.check, what)
            }
        }),
        None => check().map(|r| (r, "verified both whole tables".to_string())),
    };
    let (r, what) = match checked {
        Ok(r) => r,
        Err(e) => return fail(format!("cutover: verify failed to run: {e:#}")),
    };
    let window = format!(
        "cutover window {:.1} s: drain {:.1} s, finish {:.1} s{served}, {what} in {:.1} s",
        drain_started.elapsed().as_secs_f64(),
        drained.as_secs_f64(),
        finished.as_secs_f64(),
        check_started.elapsed().as_secs_f64()
    );
    progress.println(&window);
    if !r.equal {
        let advice = if r.only_extra_copies {
            "the target kept copies of rows it had acknowledged deleting (a Milvus 2.3 defect, see docs/limits.md), whatever the \
             source did. The job keeps following; request the cutover again, or stop the job and run `vmig repair` from the source"
        } else {
            "were writes to the source stopped? The job keeps following; stop the writes and request the cutover again"
        };
        return fail(format!("cutover: the target differs from the source after draining ({}; {window}); {advice}", r.differences));
    }
    let artifacts = stream.artifacts();
    stream.drop_artifacts()?;
    let _ = std::fs::remove_file(OnlineState::path(&dir));
    crate::engine::online::watch::discard(&crate::engine::online::watch::watch_dir(&dir, &cfg.command))?;
    let removed = if stream.removes_artifacts() { format!("; {artifacts} removed") } else { String::new() };
    let msg = format!("safe to switch: {}{removed} ({window})", r.summary);
    // Also a cutover nobody asked for (an import whose export cut over):
    // a later `vmig cutover` prints this result instead of starting over.
    let mut req = CutoverRequest::load(&dir, &cfg.command)?.unwrap_or_else(|| CutoverRequest::new(""));
    req.state = "done".into();
    req.message = Some(msg.clone());
    req.finished_at = Some(now_rfc3339());
    req.save(&dir, &cfg.command)?;
    progress.println(&msg);
    Ok(())
}

/// A watch's check as the cutover reports it.
fn changed_only(c: &WatchCheck, may_differ: Option<MayDiffer>) -> CutoverCheck {
    let unseen = may_differ.and_then(MayDiffer::unseen).map(|u| format!("; {u}")).unwrap_or_default();
    let mended = match may_differ.filter(|_| !c.mended.is_empty()) {
        None => String::new(),
        Some(why) => format!(
            " (recopied from the source and then equal: {}; {})",
            c.mended.iter().take(3).map(|d| d.describe()).collect::<Vec<_>>().join("; "),
            why.why_mended()
        ),
    };
    CutoverCheck {
        equal: c.differing.is_empty(),
        summary: format!(
            "the target equals the source (every chunk seen equal while following; the {} keys changed since and {} chunks never seen equal \
             compared now: ids, every column and, in Milvus, the copies of each id and of each chunk; vectors {}{unseen}){mended}",
            c.changed_keys, c.unverified_chunks, c.vectors
        ),
        differences: c.differing.iter().take(3).map(|d| d.describe()).collect::<Vec<_>>().join("; "),
        only_extra_copies: crate::engine::verify::all_extra_copies(&c.differing),
    }
}
