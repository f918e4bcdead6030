//! Prometheus text metrics of a running job (`/metrics` of the live page),
//! so a long online sync is watched by a dashboard, not a terminal. Every
//! series carries `vmig_job`: Prometheus keeps `job` for its scrape job.

use std::sync::atomic::Ordering::Relaxed;

use crate::state::progress::{Progress, Status};

/// The metrics now. `workers`: a shared job's workers as read from its store.
pub fn render(job: &str, p: &Progress, workers: &[Status]) -> String {
    let c = &p.counters;
    let st = p.snapshot();
    let job = job.replace('\\', "\\\\").replace('"', "\\\"");
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, v) in samples {
            out.push_str(&format!("{name}{{vmig_job=\"{job}\"{labels}}} {v}\n"));
        }
    };
    let one = |v: u64| vec![(String::new(), v as f64)];
    let label = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', " ");
    metric(
        "vmig_job_info",
        "gauge",
        "The job's command, source and targets (addresses without secrets).",
        &[(format!(",command=\"{}\",source=\"{}\",target=\"{}\"", label(&st.command), label(&st.source), label(&st.targets.join(", "))), 1.0)],
    );
    let epoch = |t: &str| chrono::DateTime::parse_from_rfc3339(t).map(|d| d.timestamp_millis() as f64 / 1000.0).unwrap_or(0.0);
    metric("vmig_start_timestamp_seconds", "gauge", "When this run started (unix time).", &[(String::new(), epoch(&st.started_at))]);
    metric(
        "vmig_last_progress_timestamp_seconds",
        "gauge",
        "When the job last moved: rows, chunks or changes applied, a phase step, or a follower caught up (unix time).",
        &[(String::new(), p.last_progress_ms() as f64 / 1000.0)],
    );
    metric("vmig_chunks_planned", "gauge", "Chunks in the job's plan.", &one(st.chunks_total));
    metric("vmig_rows_planned", "gauge", "Rows in the job's plan (estimated at planning).", &one(st.rows_planned));
    metric("vmig_rows_per_second", "gauge", "Rows written per second over the last 30 s.", &[(String::new(), st.rows_per_second)]);
    metric("vmig_rows_copied_total", "counter", "Rows written to the target by the snapshot copy in this run.", &one(c.rows_written.load(Relaxed)));
    metric("vmig_rows_skipped_total", "counter", "Rows of chunks already committed by earlier runs.", &one(c.rows_skipped.load(Relaxed)));
    metric(
        "vmig_rows_rejected_total",
        "counter",
        "Rows sent to rejects (copy and changes).",
        &one(c.rows_rejected.load(Relaxed) + c.change_rows_rejected.load(Relaxed)),
    );
    metric("vmig_chunks_committed_total", "counter", "Chunks committed in this run.", &one(c.chunks_committed.load(Relaxed)));
    metric("vmig_chunk_failures_total", "counter", "Chunks that failed for good.", &one(st.failures.len() as u64));
    // "building index x (42%)" is the phase "building index x": one series per phase, not per percent.
    let phase = st.phase.split(" (").next().unwrap_or_default();
    metric("vmig_phase", "gauge", "The job's phase (1 for the current one).", &[(format!(",phase=\"{}\"", label(phase)), 1.0)]);
    if let Some(o) = &st.online {
        let kinds = [("insert", o.applied.inserts), ("update", o.applied.updates), ("delete", o.applied.deletes)];
        let by_kind: Vec<(String, f64)> = kinds.iter().map(|(k, v)| (format!(",kind=\"{k}\""), *v as f64)).collect();
        metric("vmig_changes_applied_total", "counter", "Source changes applied to the target, by kind.", &by_kind);
        metric("vmig_changes_per_second", "gauge", "Changes applied per second (last 10 s).", &[(String::new(), o.changes_per_second)]);
        metric("vmig_lag_seconds", "gauge", "Commit-to-apply delay of the last applied transaction.", &[(String::new(), o.lag_seconds)]);
        match o.unit {
            crate::contract::changes::PositionUnit::Bytes => {
                metric("vmig_lag_bytes", "gauge", "Source change log not yet applied, in bytes.", &one(o.lag_bytes));
                metric("vmig_source_retained_bytes", "gauge", "Change log the source keeps for the job (WAL held by the slot).", &one(o.retained_bytes));
            }
            crate::contract::changes::PositionUnit::Changes => {
                metric("vmig_changelog_rows", "gauge", "Changes waiting in the source's changelog table.", &one(o.retained_bytes));
            }
            crate::contract::changes::PositionUnit::Watermark => {}
        }
        if let Some(n) = o.unserved_segments {
            metric("vmig_target_unserved_segments", "gauge", "Flushed target segments not yet served to reads (Milvus); a cutover waits for them.", &one(n));
        }
        if let Some(v) = &o.verification {
            metric("vmig_verify_chunks", "gauge", "Chunks of the verification plan of an online job.", &one(v.chunks));
            metric("vmig_verify_chunks_verified", "gauge", "Chunks seen equal on both sides while following.", &one(v.chunks_verified));
            metric("vmig_cutover_changed_keys", "gauge", "Keys a cutover would read by id now (changed since their chunk was seen equal).", &one(v.changed_keys));
            metric("vmig_cutover_unverified_chunks", "gauge", "Chunks a cutover would read whole now (never seen equal).", &one(v.unverified_chunks));
        }
    }
    let builds = st.index_builds.iter().map(|b| (format!(",on=\"{}\",index=\"{}\",state=\"{}\"", label(&b.on), label(&b.index), b.state), b.seconds));
    metric("vmig_index_build_seconds", "gauge", "Seconds each index build took (so far, while it runs).", &builds.collect::<Vec<_>>());
    // Running workers only: one that finished has stopped beating on purpose.
    let shared: Vec<_> = workers.iter().filter(|s| s.state == "running").filter_map(|s| s.worker.as_ref()).collect();
    if !shared.is_empty() {
        let per = |f: &dyn Fn(&crate::state::claims::WorkerInfo) -> f64| {
            shared.iter().map(|w| (format!(",worker=\"{}\",host=\"{}\"", label(&w.worker), label(&w.host)), f(w))).collect::<Vec<_>>()
        };
        metric("vmig_worker_heartbeat_age_seconds", "gauge", "Seconds since each worker of the shared job last beat.", &per(&|w| w.heartbeat_age_seconds()));
        metric("vmig_worker_lease_seconds", "gauge", "Each worker's lease: a heartbeat older than this lets others take its claims.", &per(&|w| w.lease_ms as f64 / 1000.0));
    }
    out
}
