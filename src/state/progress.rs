//! Counters shared by the stages, live display (bars on a terminal, plain
//! lines otherwise), the status file `vmig status` reads, and the final report.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use crate::contract::changes::{ChangeCounts, PositionUnit};
use crate::model::human_bytes;
use crate::state::store::Store;

#[derive(Default)]
pub struct Counters {
    pub rows_read: AtomicU64,
    pub bytes_read: AtomicU64,
    pub rows_transformed: AtomicU64,
    pub rows_rejected: AtomicU64,
    pub rows_written: AtomicU64,
    pub bytes_written: AtomicU64,
    pub chunks_committed: AtomicU64,
    pub chunks_skipped: AtomicU64,
    pub rows_skipped: AtomicU64,
    pub read_ns: AtomicU64,
    pub write_ns: AtomicU64,
    pub finish_ns: AtomicU64,
    /// Rows of applied changes the targets' rules refused (online).
    pub change_rows_rejected: AtomicU64,
    /// Online: time spent reading changes from the source and applying them.
    pub change_read_ns: AtomicU64,
    pub change_apply_ns: AtomicU64,
    /// Online: change batches applied, and how many of them were written
    /// while the batch before was still going in.
    pub change_batches: AtomicU64,
    pub change_batches_overlapped: AtomicU64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChunkFailure {
    pub chunk: u32,
    pub error: String,
}

/// The live status of one command on one job (`status-<command>.json`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    pub job: String,
    pub command: String,
    /// running, done, failed, cancelled, incomplete
    pub state: String,
    /// planning, preparing target, loading, finishing, building index NAME
    /// (percent), fixing sequence, done …
    #[serde(default)]
    pub phase: String,
    pub pid: u32,
    pub source: String,
    pub targets: Vec<String>,
    pub started_at: String,
    pub updated_at: String,
    pub chunks_total: u64,
    pub chunks_committed: u64,
    pub chunks_skipped: u64,
    pub rows_planned: u64,
    pub rows_read: u64,
    pub rows_written: u64,
    pub rows_rejected: u64,
    pub bytes_written: u64,
    pub failures: Vec<ChunkFailure>,
    pub last_error: Option<String>,
    /// Online jobs: change capture and apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online: Option<crate::state::progress::OnlineStatus>,
    /// A worker of a shared job: host, claims, heartbeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<crate::state::claims::WorkerInfo>,
    /// One character per chunk of the plan, in plan order (see `chunk_state`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub chunk_map: String,
    /// Rows written per second over the last 30 s, and the time left at
    /// that rate while copying.
    #[serde(default)]
    pub rows_per_second: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
    /// When the job last moved: rows or changes applied, a chunk committed,
    /// a phase step, or a follower that found itself caught up.
    #[serde(default)]
    pub last_progress_at: String,
    /// Every index build of the finish, each timed on its own (they overlap).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub index_builds: Vec<IndexBuild>,
}

impl Status {
    /// A shared job's worker that runs but stopped beating: killed, stopped or cut off.
    pub fn worker_gone(&self) -> bool {
        self.state == "running" && self.worker.as_ref().is_some_and(crate::state::claims::WorkerInfo::lease_ran_out)
    }

    /// A shared job's worker that runs and beats within its lease.
    pub fn worker_alive(&self) -> bool {
        self.state == "running" && self.worker.as_ref().is_some_and(|w| !w.lease_ran_out())
    }
}

/// The characters of `Status::chunk_map`.
pub mod chunk_state {
    /// Not copied yet.
    pub const PENDING: char = '.';
    /// Being copied now (by this process, or claimed by a worker).
    pub const RUNNING: char = 'r';
    /// Committed in this run.
    pub const COMMITTED: char = 'c';
    /// Committed in this run, with rows sent to rejects.
    pub const COMMITTED_WITH_REJECTS: char = 'j';
    /// Committed by an earlier run (skipped).
    pub const SKIPPED: char = 's';
    /// Failed for good.
    pub const FAILED: char = 'x';
    /// Another worker's shard.
    pub const ELSEWHERE: char = 'o';

    /// Which of two reports of one chunk wins when workers' maps are merged.
    pub fn rank(c: char) -> u8 {
        match c {
            COMMITTED | COMMITTED_WITH_REJECTS | SKIPPED => 5,
            FAILED => 4,
            RUNNING => 3,
            PENDING => 2,
            _ => 1,
        }
    }
}

/// One index build: on which table or collection, when it began and ended.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct IndexBuild {
    pub on: String,
    pub index: String,
    pub started_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    /// Seconds so far while it runs; its duration once ended.
    pub seconds: f64,
    /// building, built, failed
    pub state: String,
}

/// Drives the display and the status file while a job runs.
pub struct Progress {
    pub counters: Counters,
    pub status: Mutex<Status>,
    status_path: PathBuf,
    started: Instant,
    bars: Option<(MultiProgress, ProgressBar, ProgressBar, ProgressBar)>,
    done: AtomicBool,
    /// The status file is written only once the run holds the job's locks,
    /// so a refused second run leaves the first one's status alone.
    owns_status: AtomicBool,
    /// While the targets finish: seconds per phase ("building index …",
    /// "loading collection …"), for the report.
    finish_timing: Mutex<Option<PhaseClock>>,
    finish_phases: Mutex<Vec<PhaseTime>>,
    /// Index builds and when each began (for its seconds while it runs).
    index_builds: Mutex<Vec<(IndexBuild, Instant)>>,
    /// Plan position of each chunk id (`Status::chunk_map`).
    chunk_positions: Mutex<std::collections::HashMap<u32, usize>>,
    /// (when, rows written) over the last 30 s, for rows/s and the ETA.
    rate_window: Mutex<std::collections::VecDeque<(Instant, u64)>>,
    /// What the job had done when last seen moving, and when (ms since the epoch).
    moved: Mutex<(String, i64)>,
}

/// The phase being timed and when it began.
struct PhaseClock {
    name: String,
    since: Instant,
}

/// Seconds spent in one phase of the finish (index builds, loads, …).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PhaseTime {
    pub phase: String,
    pub seconds: f64,
}

impl Progress {
    pub fn new(status: Status, status_path: PathBuf, quiet: bool) -> Self {
        let bars = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let mp = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{prefix:>9} [{bar:30}] {pos}/{len} rows  {msg}  {per_sec}  eta {eta}",
            )
            .unwrap()
            .progress_chars("=> ");
            let mk = |name: &str| {
                let b = mp.add(ProgressBar::new(status.rows_planned));
                b.set_style(style.clone());
                b.set_prefix(name.to_string());
                b
            };
            let (e, t, i) = (mk("export"), mk("transform"), mk("import"));
            (mp, e, t, i)
        });
        Progress {
            counters: Counters::default(),
            status: Mutex::new(status),
            status_path,
            started: Instant::now(),
            bars,
            done: AtomicBool::new(false),
            owns_status: AtomicBool::new(false),
            finish_timing: Mutex::new(None),
            finish_phases: Mutex::new(Vec::new()),
            index_builds: Mutex::new(Vec::new()),
            chunk_positions: Mutex::new(Default::default()),
            rate_window: Mutex::new(Default::default()),
            moved: Mutex::new((String::new(), crate::model::now_ms())),
        }
    }

    /// The chunks of the plan, in order, and which this process copies
    /// (the others belong to other workers' shards).
    pub fn set_chunks(&self, ids: &[u32], mine: impl Fn(u32) -> bool) {
        let mut map = String::with_capacity(ids.len());
        let mut pos = self.chunk_positions.lock().unwrap();
        pos.clear();
        for (i, id) in ids.iter().enumerate() {
            pos.insert(*id, i);
            map.push(if mine(*id) { chunk_state::PENDING } else { chunk_state::ELSEWHERE });
        }
        self.status.lock().unwrap().chunk_map = map;
    }

    /// A chunk changed state (a `chunk_state` character).
    pub fn chunk_state(&self, id: u32, state: char) {
        let Some(&i) = self.chunk_positions.lock().unwrap().get(&id) else { return };
        let mut s = self.status.lock().unwrap();
        // Every state is one ASCII character: the map is changed in place.
        if i < s.chunk_map.len() {
            s.chunk_map.replace_range(i..=i, state.encode_utf8(&mut [0; 4]));
        }
    }

    /// The job is where it should be now (a follower found itself caught up).
    pub fn touch(&self) {
        self.moved.lock().unwrap().1 = crate::model::now_ms();
    }

    /// When the job last moved, in ms since the epoch.
    pub fn last_progress_ms(&self) -> i64 {
        self.moved.lock().unwrap().1
    }

    /// Index builds so far, the running ones with their seconds until now.
    pub fn index_builds(&self) -> Vec<IndexBuild> {
        self.index_builds
            .lock()
            .unwrap()
            .iter()
            .map(|(b, since)| {
                let mut b = b.clone();
                if b.ended_at.is_none() {
                    b.seconds = since.elapsed().as_secs_f64();
                }
                b
            })
            .collect()
    }

    /// From now on this run writes the job's status file.
    pub fn own_status(&self) {
        self.owns_status.store(true, Relaxed);
    }

    /// The plan is known: sizes the bars and the status.
    pub fn set_plan(&self, chunks: u64, rows: u64) {
        {
            let mut s = self.status.lock().unwrap();
            s.chunks_total = chunks;
            s.rows_planned = rows;
        }
        if let Some((_, e, t, i)) = &self.bars {
            for b in [e, t, i] {
                b.set_length(rows);
            }
        }
    }

    /// Enters a phase: written to the status file at once (so `vmig status`
    /// and tests watching it see it), shown on the bars' line on a terminal,
    /// off a terminal in the 5-second progress line (an index build prints
    /// one line every 5 s, not one per percent).
    pub fn set_phase(&self, phase: &str) {
        if let Some(clock) = self.finish_timing.lock().unwrap().as_mut() {
            // "building index x (42%)" is still the phase "building index x".
            let name = phase.split(" (").next().unwrap_or(phase);
            if clock.name != name {
                self.close_phase(clock);
                *clock = PhaseClock { name: name.to_string(), since: Instant::now() };
            }
        }
        self.status.lock().unwrap().phase = phase.to_string();
        if let Some((_, _, _, i)) = &self.bars {
            i.set_message(phase.to_string());
        }
        self.write_status(None);
        test_pause(phase);
    }

    fn close_phase(&self, clock: &PhaseClock) {
        let seconds = clock.since.elapsed().as_secs_f64();
        let mut phases = self.finish_phases.lock().unwrap();
        match phases.iter_mut().find(|p| p.phase == clock.name) {
            Some(p) => p.seconds += seconds,
            None => phases.push(PhaseTime { phase: clock.name.clone(), seconds }),
        }
    }

    /// Times the phases the targets' finish goes through until `end_finish_timing`.
    pub fn begin_finish_timing(&self) {
        *self.finish_timing.lock().unwrap() = Some(PhaseClock { name: "other".into(), since: Instant::now() });
    }

    pub fn end_finish_timing(&self) {
        if let Some(clock) = self.finish_timing.lock().unwrap().take() {
            self.close_phase(&clock);
        }
    }

    /// Seconds per phase of the finish so far, in the order first entered.
    pub fn finish_phases(&self) -> Vec<PhaseTime> {
        self.finish_phases.lock().unwrap().iter().filter(|p| p.seconds >= 0.005).cloned().collect()
    }

    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// A message for the user (above the bars when there are bars).
    pub fn println(&self, msg: &str) {
        match &self.bars {
            Some((mp, ..)) => {
                let _ = mp.println(msg);
            }
            None => say!("{msg}"),
        }
    }

    fn refresh(&self) {
        let c = &self.counters;
        if let Some((_, e, t, i)) = &self.bars {
            e.set_position(c.rows_read.load(Relaxed));
            e.set_message(format!("{:.1} MB", c.bytes_read.load(Relaxed) as f64 / 1e6));
            t.set_position(c.rows_transformed.load(Relaxed));
            t.set_message(format!("{} rejected", c.rows_rejected.load(Relaxed)));
            i.set_position(c.rows_written.load(Relaxed) + c.rows_skipped.load(Relaxed));
            i.set_message(format!("{:.1} MB", c.bytes_written.load(Relaxed) as f64 / 1e6));
        }
        self.write_status(None);
    }

    pub fn write_status(&self, state: Option<&str>) {
        if !self.owns_status.load(Relaxed) {
            return;
        }
        let bytes = self.status_doc(state, None);
        let _ = crate::state::files::write_atomic(&self.status_path, &bytes);
    }

    /// The status as a shared job's worker publishes it in the store.
    pub fn status_json(&self, worker: Option<crate::state::claims::WorkerInfo>) -> Vec<u8> {
        self.status_doc(None, worker)
    }

    /// The status as it is now (what the live page serves).
    pub fn snapshot(&self) -> Status {
        let mut s = self.status.lock().unwrap();
        self.refresh_status(&mut s);
        s.clone()
    }

    fn status_doc(&self, state: Option<&str>, worker: Option<crate::state::claims::WorkerInfo>) -> Vec<u8> {
        let mut s = self.status.lock().unwrap();
        if let Some(st) = state {
            s.state = st.to_string();
        }
        if worker.is_some() {
            s.worker = worker;
        }
        self.refresh_status(&mut s);
        serde_json::to_vec_pretty(&*s).unwrap_or_default()
    }

    /// Copies the counters into the status, with the rate, the ETA and the
    /// time the job last moved.
    fn refresh_status(&self, s: &mut Status) {
        let c = &self.counters;
        s.updated_at = crate::model::now_rfc3339();
        s.rows_read = c.rows_read.load(Relaxed);
        s.rows_written = c.rows_written.load(Relaxed);
        s.rows_rejected = c.rows_rejected.load(Relaxed);
        s.bytes_written = c.bytes_written.load(Relaxed);
        s.chunks_committed = c.chunks_committed.load(Relaxed);
        s.chunks_skipped = c.chunks_skipped.load(Relaxed);
        s.rows_per_second = self.rows_per_second(s.rows_written);
        let left = s.rows_planned.saturating_sub(s.rows_written + c.rows_skipped.load(Relaxed));
        s.eta_seconds = (matches!(s.phase.as_str(), "loading" | "snapshot") && s.rows_per_second > 0.0)
            .then(|| left as f64 / s.rows_per_second);
        // Anything that moved counts as progress: rows, chunks, changes, the phase text (an index build's percent).
        let applied = s.online.as_ref().map(|o| o.applied.inserts + o.applied.updates + o.applied.deletes).unwrap_or(0);
        let seen = format!("{} {} {} {applied} {}", s.rows_read, s.rows_written, s.chunks_committed, s.phase);
        {
            let mut moved = self.moved.lock().unwrap();
            if moved.0 != seen {
                *moved = (seen, crate::model::now_ms());
            }
            s.last_progress_at = crate::model::rfc3339_of_ms(moved.1);
        }
        s.index_builds = self.index_builds();
    }

    /// Rows written per second over the last 30 s.
    fn rows_per_second(&self, written: u64) -> f64 {
        let now = Instant::now();
        let mut w = self.rate_window.lock().unwrap();
        w.push_back((now, written));
        while w.len() > 2 && now.duration_since(w[0].0) > Duration::from_secs(30) {
            w.pop_front();
        }
        let (t0, r0) = w[0];
        let dt = now.duration_since(t0).as_secs_f64();
        if dt < 1.0 { 0.0 } else { written.saturating_sub(r0) as f64 / dt }
    }

    fn plain_line(&self) {
        let (phase, online) = {
            let s = self.status.lock().unwrap();
            (s.phase.clone(), s.online.clone())
        };
        if let (Some(o), "following" | "catching up" | "cutting over") = (&online, phase.as_str()) {
            match &o.verification {
                Some(v) => say!("progress: {phase} · {} · {}", o.summary(), v.summary()),
                None => say!("progress: {phase} · {}", o.summary()),
            }
            return;
        }
        if !phase.is_empty() && phase != "loading" && phase != "snapshot" {
            say!("progress: {phase} · {:.0}s", self.elapsed());
            return;
        }
        let c = &self.counters;
        let secs = self.elapsed().max(1e-9);
        let written = c.rows_written.load(Relaxed);
        let planned = self.status.lock().unwrap().rows_planned;
        say!(
            "progress: read {} · written {} (+{} already committed) of {planned} rows · {} rejected · {:.0} rows/s · {:.1} MB written",
            c.rows_read.load(Relaxed),
            written,
            c.rows_skipped.load(Relaxed),
            c.rows_rejected.load(Relaxed),
            written as f64 / secs,
            c.bytes_written.load(Relaxed) as f64 / 1e6
        );
    }

    /// Refreshes until `stop()`; call on its own thread.
    pub fn run_ticker(&self) {
        let mut last_line = Instant::now();
        while !self.done.load(Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            self.refresh();
            if self.bars.is_none() && last_line.elapsed() >= Duration::from_secs(5) {
                self.plain_line();
                last_line = Instant::now();
            }
        }
    }

    pub fn stop(&self) {
        self.done.store(true, Relaxed);
        self.refresh();
        if let Some((mp, e, t, i)) = &self.bars {
            for b in [e, t, i] {
                b.abandon();
            }
            let _ = mp.clear();
        }
    }
}

impl crate::contract::Feedback for Progress {
    fn say(&self, msg: &str) {
        self.println(msg);
    }
    fn phase(&self, phase: &str) {
        self.set_phase(phase);
    }
    fn index_started(&self, on: &str, index: &str) {
        let build = IndexBuild {
            on: on.to_string(),
            index: index.to_string(),
            started_at: crate::model::now_rfc3339(),
            ended_at: None,
            seconds: 0.0,
            state: "building".into(),
        };
        self.index_builds.lock().unwrap().push((build, Instant::now()));
        self.write_status(None);
    }
    fn index_finished(&self, on: &str, index: &str, ok: bool) {
        let mut builds = self.index_builds.lock().unwrap();
        if let Some((b, since)) = builds.iter_mut().rev().find(|(b, _)| b.on == on && b.index == index && b.ended_at.is_none()) {
            b.ended_at = Some(crate::model::now_rfc3339());
            b.seconds = since.elapsed().as_secs_f64();
            b.state = if ok { "built" } else { "failed" }.into();
        }
        drop(builds);
        self.write_status(None);
    }
}

/// Fault-injection hook for the kill tests: with `VMIG_TEST_PAUSE_AT=TEXT`,
/// the process stops for up to a minute when it enters a phase starting with
/// TEXT, after the status file shows it, so a test can kill it at exactly
/// that moment. Nothing else changes.
fn test_pause(phase: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if let Some(at) = AT.get_or_init(|| std::env::var("VMIG_TEST_PAUSE_AT").ok().filter(|s| !s.is_empty())) {
        if phase.starts_with(at.as_str()) {
            std::thread::sleep(Duration::from_secs(60));
        }
    }
}

/// Per-stage totals of one run, printed as a table and written with --report.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StageReport {
    pub stage: String,
    pub rows: u64,
    pub rejected: u64,
    pub skipped_committed: u64,
    pub bytes: u64,
    pub seconds: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub job: String,
    pub command: String,
    pub ok: bool,
    pub source: String,
    pub targets: Vec<String>,
    pub stages: Vec<StageReport>,
    pub chunks_total: u64,
    pub chunks_committed: u64,
    pub chunks_skipped: u64,
    pub chunks_pending: u64,
    pub rows_rejected_total: u64,
    pub load_seconds: f64,
    pub finish_seconds: f64,
    /// Where the finish's time went: each index build, load, sequence, …
    #[serde(default)]
    pub finish_phases: Vec<PhaseTime>,
    /// Every index build, each with its own start, end and seconds.
    #[serde(default)]
    pub index_builds: Vec<IndexBuild>,
    pub total_seconds: f64,
    pub rows_per_second: f64,
    pub peak_rss_mb: f64,
    pub vectors_exact: bool,
    pub notes: Vec<String>,
    pub error: Option<String>,
}

impl Report {
    pub fn table(&self) -> String {
        let mut s = format!(
            "{:<10} {:>12} {:>10} {:>12} {:>12} {:>9}\n",
            "stage", "rows", "rejected", "skipped", "MB", "seconds"
        );
        for st in &self.stages {
            s += &format!(
                "{:<10} {:>12} {:>10} {:>12} {:>12.1} {:>9.2}\n",
                st.stage,
                st.rows,
                st.rejected,
                st.skipped_committed,
                st.bytes as f64 / 1e6,
                st.seconds
            );
        }
        if self.finish_seconds > 0.0 {
            let phases: Vec<String> = self.finish_phases.iter().map(|p| format!("{} {:.1}s", p.phase, p.seconds)).collect();
            s += &format!("time: load {:.1}s · finish {:.1}s", self.load_seconds, self.finish_seconds);
            if !phases.is_empty() {
                s += &format!(" ({})", phases.join(" · "));
            }
            s += "\n";
        }
        for b in &self.index_builds {
            s += &format!("index {} on {}: {} in {:.1}s ({} → {})\n", b.index, b.on, b.state, b.seconds, b.started_at, b.ended_at.as_deref().unwrap_or("…"));
        }
        s += &format!(
            "chunks: {} total, {} committed now, {} already committed, {} pending · {:.0} rows/s · peak RSS {:.0} MB · {:.1}s",
            self.chunks_total,
            self.chunks_committed,
            self.chunks_skipped,
            self.chunks_pending,
            self.rows_per_second,
            self.peak_rss_mb,
            self.total_seconds
        );
        s
    }
}

/// Peak resident set size of this process, from /proc (MB).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// What `vmig status` shows of an online job.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct OnlineStatus {
    pub artifacts: String,
    pub applied: ChangeCounts,
    pub changes_per_second: f64,
    pub lag_bytes: u64,
    pub lag_seconds: f64,
    pub retained_bytes: u64,
    pub applied_position: String,
    pub source_position: String,
    #[serde(default)]
    pub unit: PositionUnit,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    /// Verification while following (targets checked at cutover by what changed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<VerifyProgress>,
    /// Stored parts the targets have not yet handed over to what serves
    /// their reads (Milvus: flushed segments awaiting their index and the
    /// query node); a cutover waits for them before its check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unserved_segments: Option<u64>,
}

/// Verification while following: chunks seen equal, and what a cutover
/// would compare if it ran now.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VerifyProgress {
    pub chunks: u64,
    pub chunks_verified: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_full_pass: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_full_pass: Option<String>,
    /// Keys changed since their chunk was last seen equal (read by id at cutover).
    pub changed_keys: u64,
    /// Chunks never seen equal (read whole at cutover).
    pub unverified_chunks: u64,
}

impl VerifyProgress {
    /// "verified 12/40 chunks (last full pass …) · cutover would check 31 changed keys and 28 chunks".
    pub fn summary(&self) -> String {
        let pass = match &self.last_full_pass {
            Some(t) => format!(" (last full pass {t})"),
            None => String::new(),
        };
        format!(
            "verified {}/{} chunks{pass} · cutover would check {} changed keys and {} unverified chunks",
            self.chunks_verified, self.chunks, self.changed_keys, self.unverified_chunks
        )
    }
}

impl OnlineStatus {
    /// One line: applied changes, rate, lag, retained log.
    pub fn summary(&self) -> String {
        let behind = match self.unit {
            PositionUnit::Bytes => format!(
                ", {} · source keeps {} for the job",
                human_bytes(self.lag_bytes),
                human_bytes(self.retained_bytes)
            ),
            PositionUnit::Changes => format!(" · {} changes waiting in the source's changelog", self.retained_bytes),
            PositionUnit::Watermark => String::new(),
        };
        let unserved = match self.unserved_segments {
            Some(n) if n > 0 => format!(" · target segments not yet served: {n} (a cutover now waits for them)"),
            _ => String::new(),
        };
        format!(
            "applied {} inserts, {} updates, {} deletes · {:.0} changes/s · lag {:.1} s{behind}{unserved}",
            self.applied.inserts, self.applied.updates, self.applied.deletes, self.changes_per_second, self.lag_seconds,
        )
    }
}

/// Retained change log above which `status` warns (the source's disk fills).
pub const RETAINED_WARN_BYTES: u64 = 1 << 30;

/// What every worker of a shared job last published (`work/*/workers/*.json`).
pub fn worker_statuses(store: &Store) -> anyhow::Result<Vec<Status>> {
    let mut out = Vec::new();
    for (key, _) in store.list("work")? {
        if !key.contains("/workers/") || !key.ends_with(".json") {
            continue;
        }
        if let Some(o) = store.get(&format!("work/{key}"))? {
            if let Ok(s) = serde_json::from_slice::<Status>(&o.bytes) {
                out.push(s);
            }
        }
    }
    Ok(out)
}
