//! Fault injection: kill -9 a vmig run at a chosen moment, found by watching
//! its status file (phase, committed chunks), then run it again and check
//! the target. `VMIG_TEST_PAUSE_AT` holds a phase open so the kill lands in
//! it; nothing else about the run changes.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{VMIG, ok};

/// When to kill a run.
#[derive(Clone, Debug)]
pub enum Moment {
    /// As soon as the run enters a phase starting with this text (held open).
    Phase(String),
    /// Once at least this many chunks are committed (the run is throttled).
    Committed(u64),
}

pub fn phase(p: &str) -> Moment {
    Moment::Phase(p.to_string())
}

/// One migration to break and resume, again and again.
pub struct Scenario<'a> {
    pub name: &'a str,
    /// The command line (export, import or migrate …) without rate limit.
    pub args: Vec<String>,
    /// Where the run's status file lives (the staging or state directory).
    pub job_dir: PathBuf,
    /// Rows per second while a kill is pending, so load moments can be hit.
    pub rate_limit: u64,
    /// Empties the target (and the job's state) before the next kill.
    pub reset: &'a dyn Fn(),
    /// Asserts the target equals the source, ids unique, indexes once and valid …
    pub check: &'a dyn Fn(),
}

pub fn status_of(job_dir: &Path, command: &str) -> Option<serde_json::Value> {
    let bytes = std::fs::read(job_dir.join(format!("status-{command}.json"))).ok()?;
    serde_json::from_slice(&bytes).ok()
}

impl Scenario<'_> {
    fn command(&self) -> &str {
        &self.args[0]
    }

    /// Starts the run, waits until `moment` is observed, kills it (SIGKILL).
    /// Runs the job and kills it at `moment`; true when the kill ended a
    /// live run (it was still running, and SIGKILL is what ended it).
    fn kill_at(&self, moment: &Moment) -> bool {
        let _ = std::fs::remove_file(self.job_dir.join(format!("status-{}.json", self.command())));
        let mut args = self.args.clone();
        args.extend(["--rate-limit".to_string(), self.rate_limit.to_string(), "--quiet".to_string()]);
        let mut child = start(&args, moment);
        wait_for(&mut child, &self.job_dir, self.command(), moment, self.name);
        let alive = child.try_wait().unwrap().is_none();
        child.kill().unwrap();
        let ended = child.wait().unwrap();
        alive && std::os::unix::process::ExitStatusExt::signal(&ended) == Some(9)
    }

    /// For every moment: reset, run and kill there, run again to the end
    /// (it must exit 0), check. Returns how many kills ended a live run.
    pub fn run(&self, moments: &[Moment]) -> usize {
        let mut kills = 0;
        for m in moments {
            let t = Instant::now();
            (self.reset)();
            let reset = t.elapsed().as_secs_f64();
            if self.kill_at(m) {
                kills += 1;
            } else {
                eprintln!("{}: the run had already ended when it was to be killed at {m:?}", self.name);
            }
            let killed = t.elapsed().as_secs_f64();
            let args: Vec<&str> = self.args.iter().map(|s| s.as_str()).collect();
            ok(&args);
            let resumed = t.elapsed().as_secs_f64();
            (self.check)();
            eprintln!(
                "{}: killed at {m:?} and resumed (reset {reset:.1}s, killed at {killed:.1}s, resumed at {resumed:.1}s, checked at {:.1}s)",
                self.name,
                t.elapsed().as_secs_f64()
            );
        }
        kills
    }
}

/// The moments every database target is killed at: planning, preparing the
/// target, early and late in the load, between the last chunk and the finish,
/// `finish_phases` (each index build, the sequence …), and after the finish.
pub fn database_moments(chunks: u64, finish_phases: &[&str]) -> Vec<Moment> {
    let mut m = vec![phase("planning"), phase("preparing target"), Moment::Committed(1), Moment::Committed(chunks - 2), phase("finishing")];
    m.extend(finish_phases.iter().map(|p| phase(p)));
    m.push(phase("done"));
    m
}

/// Starts vmig in the background; a `Phase` moment is held open when reached.
pub fn start(args: &[String], moment: &Moment) -> Child {
    let mut cmd = Command::new(VMIG);
    cmd.args(args).env_remove("VMIG_STATE_ROOT").stdout(Stdio::null()).stderr(Stdio::piped());
    // Debugging a failure: every run's stderr appended to this file.
    if let Ok(f) = std::env::var("VMIG_TEST_STDERR") {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(f).unwrap();
        cmd.stderr(f);
    }
    if let Moment::Phase(p) = moment {
        cmd.env("VMIG_TEST_PAUSE_AT", p);
    }
    cmd.spawn().expect("start vmig")
}

/// Waits until the run's status file shows `moment`; panics if the run ends first.
pub fn wait_for(child: &mut Child, job_dir: &Path, command: &str, moment: &Moment, what: &str) {
    let started = Instant::now();
    loop {
        let st = status_of(job_dir, command);
        let reached = st.as_ref().is_some_and(|s| match moment {
            Moment::Phase(p) => s["phase"].as_str().is_some_and(|ph| ph.starts_with(p.as_str())),
            Moment::Committed(n) => s["chunks_committed"].as_u64().is_some_and(|c| c >= *n),
        });
        if reached {
            return;
        }
        if let Some(code) = child.try_wait().unwrap() {
            let err = child.stderr.take().map(|e| std::io::read_to_string(e).unwrap_or_default()).unwrap_or_default();
            panic!("{what}: the run ended ({code}) before {moment:?} was seen; status {st:?}\n{err}");
        }
        assert!(started.elapsed() < Duration::from_secs(120), "{what}: {moment:?} not reached in 120 s; status {st:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// While one run of a job is alive (held in its load), a second run of the
/// same job gets one line naming the first (host, pid, since) and exits
/// non-zero; once the first is killed, the second takes the lock over.
pub fn second_run_is_refused_while_the_first_lives(args: &[String], job_dir: &Path, what: &str) {
    let command = args[0].clone();
    let mut first = start(args, &phase("loading"));
    wait_for(&mut first, job_dir, &command, &phase("loading"), what);
    let plain: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let out = super::vmig(&plain);
    let err = super::stderr(&out);
    assert!(!out.status.success(), "{what}: a second run was let in");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: one line expected: {err}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains("already running") && lines[0].contains(&format!("pid {}", first.id())) && lines[0].contains("since "),
        "{what}: {err}"
    );
    // The refused run left the first one's status alone.
    assert_eq!(status_of(job_dir, &command).unwrap()["pid"].as_u64(), Some(first.id() as u64), "{what}");
    first.kill().unwrap();
    first.wait().unwrap();
    ok(&plain);
}

/// Runs `args` (throttled), calls `restart` once `after_chunks` are committed,
/// and returns the run's exit status and what it printed.
pub fn run_across_a_restart(args: &[String], job_dir: &Path, after_chunks: u64, rate_limit: u64, restart: &dyn Fn(), what: &str) -> (bool, String) {
    let command = args[0].clone();
    let _ = std::fs::remove_file(job_dir.join(format!("status-{command}.json")));
    let mut a = args.to_vec();
    a.extend(["--rate-limit".to_string(), rate_limit.to_string()]);
    let mut child = start(&a, &Moment::Committed(after_chunks));
    // Read stderr as it comes, so a chatty run never blocks on a full pipe.
    let err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || std::io::read_to_string(err).unwrap_or_default());
    wait_for(&mut child, job_dir, &command, &Moment::Committed(after_chunks), what);
    restart();
    let status = child.wait().unwrap();
    let text = reader.join().unwrap();
    eprintln!("{what}:\n{text}");
    (status.success(), text)
}
