//! `--metrics ADDR`: Prometheus text metrics served over HTTP while a job
//! runs, so a long online sync is watched by a dashboard, not a terminal.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::state::progress::Progress;

/// Serves until the returned flag is set.
pub fn serve(addr: &str, job: &str, progress: Arc<Progress>) -> Result<Arc<AtomicBool>> {
    let listener = TcpListener::bind(addr).with_context(|| format!("cannot serve metrics on {addr}"))?;
    listener.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let (s, job) = (stop.clone(), job.to_string());
    std::thread::spawn(move || {
        while !s.load(Relaxed) {
            match listener.accept() {
                Ok((mut conn, _)) => {
                    let _ = conn.set_nonblocking(false);
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut buf = [0u8; 2048];
                    let _ = conn.read(&mut buf);
                    let body = render(&job, &progress);
                    let _ = write!(
                        conn,
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(50)),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    });
    Ok(stop)
}

fn render(job: &str, p: &Progress) -> String {
    let c = &p.counters;
    let st = p.status.lock().unwrap().clone();
    let job = job.replace('\\', "\\\\").replace('"', "\\\"");
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, v) in samples {
            out.push_str(&format!("{name}{{job=\"{job}\"{labels}}} {v}\n"));
        }
    };
    let one = |v: u64| vec![(String::new(), v as f64)];
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
    metric("vmig_phase", "gauge", "The job's phase (1 for the current one).", &[(format!(",phase=\"{}\"", st.phase.replace('"', "'")), 1.0)]);
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
        if let Some(v) = &o.verification {
            metric("vmig_verify_chunks", "gauge", "Chunks of the verification plan of an online job.", &one(v.chunks));
            metric("vmig_verify_chunks_verified", "gauge", "Chunks seen equal on both sides while following.", &one(v.chunks_verified));
            metric("vmig_cutover_changed_keys", "gauge", "Keys a cutover would read by id now (changed since their chunk was seen equal).", &one(v.changed_keys));
            metric("vmig_cutover_unverified_chunks", "gauge", "Chunks a cutover would read whole now (never seen equal).", &one(v.unverified_chunks));
        }
    }
    out
}
