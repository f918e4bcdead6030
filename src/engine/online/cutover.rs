//! The end of an online job: drained, every target finished and checked
//! against the source, the source's artefacts removed, "safe to switch".

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Result, bail};

use crate::contract::changes::ChangeStream;
use crate::engine::online::CutoverCheck;
use crate::engine::pipeline::{JobConfig, PreparedJob, finish_targets};
use crate::model::now_rfc3339;
use crate::state::online::{CutoverRequest, OnlineState};
use crate::state::progress::Progress;

pub(super) fn standalone_cutover(dir: &std::path::Path, command: &str) -> bool {
    CutoverRequest::load(dir, command).ok().flatten().is_some_and(|r| r.standalone)
}

/// Drained: finish every target, verify, remove the source's artefacts.
pub(super) fn cutover(
    cfg: &JobConfig,
    job: &PreparedJob,
    stream: &mut dyn ChangeStream,
    cancel: &Arc<AtomicBool>,
    progress: &Arc<Progress>,
    check: &dyn Fn() -> Result<CutoverCheck>,
) -> Result<()> {
    let dir = cfg.job_dir.clone();
    let fail = |msg: String| -> Result<()> {
        if let Some(mut req) = CutoverRequest::load(&dir, &cfg.command)? {
            req.state = "failed".into();
            req.message = Some(msg.clone());
            req.finished_at = Some(now_rfc3339());
            req.save(&dir, &cfg.command)?;
        }
        bail!("{msg}")
    };
    if let Some(e) = finish_targets(cfg, job, cancel, progress) {
        return fail(format!("cutover: finishing the target failed: {e}"));
    }
    progress.set_phase("verifying");
    let r = match check() {
        Ok(r) => r,
        Err(e) => return fail(format!("cutover: verify failed to run: {e:#}")),
    };
    if !r.equal {
        return fail(format!(
            "cutover: the target differs from the source after draining ({}); were writes to the source stopped? \
             The job keeps following; stop the writes and request the cutover again",
            r.differences
        ));
    }
    let artifacts = stream.artifacts();
    stream.drop_artifacts()?;
    let _ = std::fs::remove_file(OnlineState::path(&dir));
    let removed = if stream.removes_artifacts() { format!("; {artifacts} removed") } else { String::new() };
    let msg = format!("safe to switch: {}{removed}", r.summary);
    if let Some(mut req) = CutoverRequest::load(&dir, &cfg.command)? {
        req.state = "done".into();
        req.message = Some(msg.clone());
        req.finished_at = Some(now_rfc3339());
        req.save(&dir, &cfg.command)?;
    }
    progress.println(&msg);
    Ok(())
}
