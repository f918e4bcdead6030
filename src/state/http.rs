//! The live page of a running job (`--metrics ADDR`, also `--http`): `/` is
//! an HTML page for a person, `/status.json` the document `vmig status
//! --json` prints (with this run's fresh status and the last hour of lag),
//! `/metrics` Prometheus text. Read-only: nothing served changes the job.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::json;

use crate::state::job_status::JobStatus;
use crate::state::progress::{Progress, worker_statuses};
use crate::state::store::Store;

/// The page: plain HTML, CSS and a few lines of script that fetch
/// `/status.json`; nothing loaded from elsewhere.
const PAGE: &str = include_str!("page.html");

/// One point of the lag chart, every `SAMPLE_EVERY`, an hour kept.
#[derive(Clone, Debug, Serialize)]
struct Sample {
    at: String,
    lag_seconds: f64,
    changes_per_second: f64,
    rows_per_second: f64,
}

const SAMPLE_EVERY: Duration = Duration::from_secs(10);
const SAMPLES_KEPT: usize = 360;

struct Page {
    job: String,
    progress: Arc<Progress>,
    store: Store,
    history: Mutex<VecDeque<Sample>>,
}

/// Serves on `addr` until the returned flag is set.
pub fn serve(addr: &str, job: &str, progress: Arc<Progress>, store: Store) -> Result<Arc<AtomicBool>> {
    let listener = TcpListener::bind(addr).with_context(|| format!("cannot serve the status page on {addr}"))?;
    listener.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let page = Page { job: job.to_string(), progress, store, history: Mutex::new(VecDeque::new()) };
    let s = stop.clone();
    std::thread::spawn(move || {
        let mut last_sample: Option<Instant> = None;
        while !s.load(Relaxed) {
            if last_sample.is_none_or(|t| t.elapsed() >= SAMPLE_EVERY) {
                page.sample();
                last_sample = Some(Instant::now());
            }
            match listener.accept() {
                Ok((conn, _)) => page.answer(conn),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    });
    Ok(stop)
}

impl Page {
    fn sample(&self) {
        let st = self.progress.snapshot();
        let (lag, cps) = st.online.as_ref().map_or((0.0, 0.0), |o| (o.lag_seconds, o.changes_per_second));
        let mut h = self.history.lock().unwrap();
        h.push_back(Sample { at: crate::model::now_rfc3339(), lag_seconds: lag, changes_per_second: cps, rows_per_second: st.rows_per_second });
        while h.len() > SAMPLES_KEPT {
            h.pop_front();
        }
    }

    fn answer(&self, mut conn: TcpStream) {
        let _ = conn.set_nonblocking(false);
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        let Some(path) = request_path(&mut conn) else { return };
        let (code, kind, body) = match path.as_str() {
            "/" | "/index.html" => ("200 OK", "text/html; charset=utf-8", PAGE.as_bytes().to_vec()),
            "/status.json" => ("200 OK", "application/json", self.document()),
            "/metrics" => {
                let workers = worker_statuses(&self.store).unwrap_or_default();
                ("200 OK", "text/plain; version=0.0.4", crate::state::metrics::render(&self.job, &self.progress, &workers).into_bytes())
            }
            _ => ("404 Not Found", "text/plain", b"not found: try /, /status.json or /metrics\n".to_vec()),
        };
        let head = format!(
            "HTTP/1.1 {code}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = conn.write_all(head.as_bytes()).and_then(|_| conn.write_all(&body));
    }

    /// The job's document with this run's fresh status in it, and the history.
    fn document(&self) -> Vec<u8> {
        let live = self.progress.snapshot();
        let mut doc = match JobStatus::read(&self.store, Some(&live)) {
            Ok(st) => st.document(),
            // Still planning: no manifest yet, only this run.
            Err(_) => json!({
                "job": self.job, "source": live.source, "generated_at": crate::model::now_rfc3339(),
                "chunks_planned": live.chunks_total, "rows_planned": live.rows_planned,
                "chunks": {"ids": [], "states": "", "claimed_by": {}}, "runs": [live], "workers": [],
            }),
        };
        doc["live_command"] = json!(live.command);
        doc["history"] = json!(self.history.lock().unwrap().iter().collect::<Vec<_>>());
        serde_json::to_vec(&doc).unwrap_or_default()
    }
}

/// The path of a GET request ("/status.json"), without its query.
fn request_path(conn: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let mut words = text.lines().next()?.split_whitespace();
    let (method, target) = (words.next()?, words.next()?);
    if method != "GET" && method != "HEAD" {
        let _ = conn.write_all(b"HTTP/1.1 405 Method Not Allowed\r\nAllow: GET\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return None;
    }
    Some(target.split('?').next().unwrap_or("/").to_string())
}
