//! Verification while following, so that a cutover checks only what can
//! still differ. A background verifier walks the job's chunks, compares
//! each on both sides with verify's rules (or, across a staging area,
//! digests its one side: see `digest`) and records, per chunk, the change
//! mark it was last seen equal at. Every
//! change is marked (its key, a sequence number) before it is applied, so a
//! key changed after its chunk's check stays "changed" until the next check.
//! At cutover only changed keys (read by id on both sides) and chunks never
//! seen equal (read whole) are compared.
//!
//! Both records live in the job's directory beside its status and survive
//! kill -9: `watch.json` (plan, per-chunk checks) is replaced atomically;
//! `changed-keys.jsonl` is appended and fsynced before the change it marks
//! reaches any target, so a crash can leave a key marked that was never
//! applied (checked once more), never the reverse.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use serde::{Deserialize, Serialize};

use crate::contract::Source;
use crate::engine::verify::{ChunkDiff, Comparison};
use crate::model::now_rfc3339;
use crate::model::plan::{Bounds, ChunkRange, Key};
use crate::state::files::{load_json, write_atomic};
use crate::state::progress::VerifyProgress;

mod digest;
pub use digest::{DigestCheck, DigestSide, Digests, hashes_dir, keep_hashes, row_hashes};

const WATCH_FILE: &str = "watch.json";
const CHANGED_FILE: &str = "changed-keys.jsonl";
/// A chunk is compared again no sooner than this after its last comparison:
/// a chunk the writers keep changing is not re-read without pause, and one
/// that differs while changes are in flight waits for them to settle.
const RECHECK_AFTER: Duration = Duration::from_secs(30);
/// Times a cutover recopies chunks that still differ before it reports them.
const MEND_ROUNDS: usize = 3;

/// `watch.json`: the verification plan and what each chunk was last seen equal at.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct WatchFile {
    plan: Vec<ChunkRange>,
    /// Chunk id → its last equal check.
    checked: BTreeMap<u32, ChunkCheck>,
    /// When every chunk had been seen equal at least once (the first full pass).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    first_full_pass: Option<String>,
    /// When the verifier last finished a walk over every chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_full_pass: Option<String>,
}

/// A chunk seen equal: every change marked up to `mark` was in that comparison.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ChunkCheck {
    mark: u64,
    at: String,
    rows: u64,
    /// One side's digest by comparison mode, where the other side is a
    /// staging area (see `digest`): its rows' hashes are in `watch-hashes/`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    digests: BTreeMap<String, String>,
}

/// One line of `changed-keys.jsonl`.
#[derive(Serialize, Deserialize)]
struct ChangedLine {
    mark: u64,
    keys: Vec<Key>,
}

struct State {
    file: WatchFile,
    /// Per chunk of the plan (by position): key → the last mark it was
    /// changed at, for keys no equal check of the chunk has covered yet.
    changed: Vec<HashMap<Key, u64>>,
    /// The last mark given.
    mark: u64,
    /// Every change marked up to here is applied to the targets: a chunk
    /// seen equal covers these marks, not those still being applied.
    applied: u64,
    log: File,
    /// Lines in the change log since it was last rewritten.
    log_lines: u64,
    /// Per chunk of the plan: when this run last compared it.
    compared: Vec<Option<Instant>>,
    /// Where the verifier walks next.
    cursor: usize,
    /// Chunks compared in the current walk.
    walked: usize,
}

/// What a cutover compared and found.
pub struct WatchCheck {
    /// How vectors were compared, as a report says it.
    pub vectors: String,
    pub changed_keys: usize,
    pub unverified_chunks: usize,
    pub rows_compared: u64,
    /// Chunks whose copies were counted against the source's ids (Milvus).
    pub copies_counted: usize,
    pub differing: Vec<ChunkDiff>,
    /// What differed and was recopied from the source, then found equal
    /// (Milvus targets: writes Milvus acknowledged and lost).
    pub mended: Vec<ChunkDiff>,
}

pub struct Watch {
    dir: PathBuf,
    state: Mutex<State>,
}

/// Where a command keeps its watch: a migrate in its job directory; an
/// export and an import share theirs (the staging area), so each in its own.
pub fn watch_dir(job_dir: &Path, command: &str) -> PathBuf {
    match command {
        "export" | "import" => job_dir.join(format!("watch-{command}")),
        _ => job_dir.to_path_buf(),
    }
}

/// Forgets a job's watch: a job that starts over (or has cut over) must not
/// trust checks made of another copy.
pub fn discard(dir: &Path) -> Result<()> {
    for p in [dir.join(WATCH_FILE), dir.join(CHANGED_FILE)] {
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).with_context(|| format!("removing {}", p.display())),
            _ => {}
        }
    }
    digest::discard(dir)
}

impl Watch {
    /// The job's watch: loaded as a killed run left it, or over `plan`
    /// (the job's chunks, which cover every possible key).
    pub fn open(dir: &Path, plan: &[ChunkRange]) -> Result<Watch> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let file = match load_json::<WatchFile>(&dir.join(WATCH_FILE))? {
            Some(f) => f,
            None => {
                let f = WatchFile { plan: plan.to_vec(), ..Default::default() };
                write_atomic(&dir.join(WATCH_FILE), &serde_json::to_vec_pretty(&f)?)?;
                f
            }
        };
        let path = dir.join(CHANGED_FILE);
        let log = OpenOptions::new().create(true).append(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
        let mut state = State {
            changed: vec![HashMap::new(); file.plan.len()],
            compared: vec![None; file.plan.len()],
            file,
            mark: 0,
            applied: 0,
            log,
            log_lines: 0,
            cursor: 0,
            walked: 0,
        };
        if let Ok(f) = File::open(&path) {
            for line in BufReader::new(f).lines() {
                // A line cut short by a kill was never followed by its apply.
                let Ok(l) = serde_json::from_str::<ChangedLine>(&line?) else { continue };
                state.note(l.mark, l.keys)?;
                state.log_lines += 1;
            }
        }
        for at in 0..state.file.plan.len() {
            state.forget_covered(at);
        }
        // A change a killed run marked but did not apply is delivered again
        // and marked anew.
        state.applied = state.mark;
        Ok(Watch { dir: dir.to_path_buf(), state: Mutex::new(state) })
    }

    /// Marks `keys` as changed, durably, before the change is applied;
    /// `applied` with the mark returned once every target has it.
    pub fn mark(&self, keys: Vec<Key>) -> Result<u64> {
        let mut st = self.state.lock().unwrap();
        if keys.is_empty() {
            return Ok(st.mark);
        }
        let mark = st.mark + 1;
        let mut line = serde_json::to_vec(&ChangedLine { mark, keys: keys.clone() })?;
        line.push(b'\n');
        st.log.write_all(&line)?;
        st.log.sync_data()?;
        st.note(mark, keys)?;
        st.log_lines += 1;
        Ok(mark)
    }

    /// The changes marked up to `mark` are applied to every target.
    pub fn applied(&self, mark: u64) {
        let mut st = self.state.lock().unwrap();
        st.applied = st.applied.max(mark);
    }

    /// Compares the next chunk due (never seen equal, or holding keys
    /// changed since its check) and records it when equal; returns the
    /// rows compared, None when no chunk is due. A chunk that differs while
    /// changes are in flight is simply due again on a later walk.
    pub fn verify_next(&self, cmp: &Comparison, from: &dyn Source, to: &dyn Source) -> Result<Option<u64>> {
        let Some((at, chunk, mark)) = self.next_due() else { return Ok(None) };
        let diff = cmp.chunk(from, to, &chunk)?;
        let rows = diff.source_rows.max(diff.target_rows);
        // Under steady writes a chunk rarely reads equal: a few keys are in
        // flight between the two reads. Those keys are marked changed (the
        // cutover compares them by id) and the rest of the chunk counts as
        // seen equal. A chunk with more differences, or copies not named,
        // waits for a later walk.
        if let Some(keys) = diff.all_differing_ids() {
            self.mark(keys)?;
            self.record_equal(at, mark, diff.source_rows)?;
        }
        Ok(Some(rows))
    }

    /// The next chunk due (position, range, the applied mark it is read
    /// at), or None once a walk found none.
    fn next_due(&self) -> Option<(usize, ChunkRange, u64)> {
        let mut st = self.state.lock().unwrap();
        let n = st.file.plan.len();
        let Some(offset) = (0..n).find(|i| st.due((st.cursor + i) % n)) else {
            st.finish_walk();
            return None;
        };
        let at = (st.cursor + offset) % n;
        if at < st.cursor {
            st.finish_walk();
        }
        st.cursor = at + 1;
        st.walked += 1;
        st.compared[at] = Some(Instant::now());
        Some((at, st.file.plan[at].clone(), st.applied))
    }

    /// Chunk `at` was seen equal with every change up to `mark` applied.
    fn record_equal(&self, at: usize, mark: u64, rows: u64) -> Result<()> {
        self.record(at, ChunkCheck { mark, at: now_rfc3339(), rows, digests: BTreeMap::new() })
    }

    fn record(&self, at: usize, check: ChunkCheck) -> Result<()> {
        let mut st = self.state.lock().unwrap();
        let id = st.file.plan[at].id;
        st.file.checked.insert(id, check);
        if st.file.first_full_pass.is_none() && st.file.checked.len() == st.file.plan.len() {
            st.file.first_full_pass = Some(now_rfc3339());
        }
        st.forget_covered(at);
        write_atomic(&self.dir.join(WATCH_FILE), &serde_json::to_vec_pretty(&st.file)?)?;
        st.compact_log(&self.dir)
    }

    fn plan(&self) -> Vec<ChunkRange> {
        self.state.lock().unwrap().file.plan.clone()
    }

    fn applied_mark(&self) -> u64 {
        self.state.lock().unwrap().applied
    }

    /// Where verification stands, and what a cutover would compare now.
    pub fn progress(&self) -> VerifyProgress {
        let st = self.state.lock().unwrap();
        let (keys, chunks) = st.pending();
        VerifyProgress {
            chunks: st.file.plan.len() as u64,
            chunks_verified: st.file.checked.len() as u64,
            first_full_pass: st.file.first_full_pass.clone(),
            last_full_pass: st.file.last_full_pass.clone(),
            changed_keys: keys.iter().map(|(_, k)| k.len() as u64).sum(),
            unverified_chunks: chunks.len() as u64,
        }
    }

    /// The cutover's check, with the writes stopped and the stream drained:
    /// changed keys by id on both sides, chunks never seen equal whole.
    pub fn check(&self, cmp: &Comparison, from: &dyn Source, to: &dyn Source) -> Result<WatchCheck> {
        let (plan, keys, chunks) = {
            let st = self.state.lock().unwrap();
            let (keys, chunks) = st.pending();
            (st.file.plan.clone(), keys, chunks)
        };
        let mut out = WatchCheck {
            vectors: cmp.vector_comparison.clone(),
            changed_keys: keys.iter().map(|(_, k)| k.len()).sum(),
            unverified_chunks: chunks.len(),
            rows_compared: 0,
            copies_counted: 0,
            differing: Vec::new(),
            mended: Vec::new(),
        };
        for &at in &chunks {
            let d = cmp.chunk(from, to, &plan[at])?;
            out.rows_compared += d.source_rows.max(d.target_rows);
            if !d.is_equal() {
                out.differing.push(d);
            }
        }
        for (at, ks) in keys {
            for part in ks.chunks(1_000) {
                let d = cmp.keys(from, to, &plan[at], part)?;
                out.rows_compared += d.source_rows.max(d.target_rows);
                if !d.is_equal() {
                    out.differing.push(d);
                }
            }
        }
        // A store that can hold several copies of a key (Milvus) can also
        // show one that no change marked: a delete it acknowledged and lost
        // (milvus#32915) resurfaces later. So every other chunk's copies are
        // counted against the source's ids.
        let seen: Vec<u32> = out.differing.iter().map(|d| d.chunk).collect();
        let found = self.count_copies(cmp, from, to, &|at| chunks.contains(&at) || seen.contains(&plan[at].id), &mut out)?;
        out.differing.extend(found);
        Ok(out)
    }

    /// Counts each chunk's stored copies (one count, ids only) against the
    /// source's ids, except where `skip` says; a chunk where they differ is
    /// compared whole. Returns the chunks then found differing (none of a
    /// store that keeps one copy per key).
    fn count_copies(&self, cmp: &Comparison, from: &dyn Source, to: &dyn Source, skip: &dyn Fn(usize) -> bool, out: &mut WatchCheck) -> Result<Vec<ChunkDiff>> {
        let plan = self.plan();
        let mut differing = Vec::new();
        for (at, chunk) in plan.iter().enumerate() {
            if skip(at) {
                continue;
            }
            let Some(copies) = to.stored_copies(chunk)? else { break };
            let mut ids = 0u64;
            from.read_ids(chunk, &mut |ks| {
                ids += ks.len() as u64;
                Ok(())
            })?;
            out.copies_counted += 1;
            if copies != ids {
                let d = cmp.chunk(from, to, chunk)?;
                out.rows_compared += d.source_rows.max(d.target_rows);
                if !d.is_equal() {
                    differing.push(d);
                }
            }
        }
        Ok(differing)
    }
}

impl State {
    /// Records that `keys` changed at `mark`.
    fn note(&mut self, mark: u64, keys: Vec<Key>) -> Result<()> {
        for k in keys {
            let at = chunk_of(&self.file.plan, &k).ok_or_else(|| anyhow!("key {k} lies in no chunk of the verification plan"))?;
            self.changed[at].insert(k, mark);
        }
        self.mark = self.mark.max(mark);
        Ok(())
    }

    /// Never seen equal, or holding keys changed since its last check; and
    /// not compared in the last `RECHECK_AFTER`.
    fn due(&self, at: usize) -> bool {
        let stale = !self.file.checked.contains_key(&self.file.plan[at].id) || !self.changed[at].is_empty();
        stale && self.compared[at].is_none_or(|t| t.elapsed() >= RECHECK_AFTER)
    }

    /// A walk over every chunk is complete.
    fn finish_walk(&mut self) {
        if self.walked > 0 && self.file.checked.len() == self.file.plan.len() {
            self.file.last_full_pass = Some(now_rfc3339());
        }
        self.walked = 0;
    }

    /// Keys the chunk's last equal check covered are no longer changed.
    fn forget_covered(&mut self, at: usize) {
        if let Some(chk) = self.file.checked.get(&self.file.plan[at].id) {
            let covered = chk.mark;
            self.changed[at].retain(|_, m| *m > covered);
        }
    }

    /// Changed keys by chunk position (chunks seen equal before the change),
    /// and the positions of chunks never seen equal (compared whole).
    fn pending(&self) -> (Vec<(usize, Vec<Key>)>, Vec<usize>) {
        let mut keys = Vec::new();
        let mut unverified = Vec::new();
        for (at, c) in self.file.plan.iter().enumerate() {
            if !self.file.checked.contains_key(&c.id) {
                unverified.push(at);
            } else if !self.changed[at].is_empty() {
                let mut ks: Vec<Key> = self.changed[at].keys().cloned().collect();
                ks.sort();
                keys.push((at, ks));
            }
        }
        (keys, unverified)
    }

    /// Rewrites the change log with only the keys still changed, once it
    /// has grown well past them (a job that follows for days).
    fn compact_log(&mut self, dir: &Path) -> Result<()> {
        let still: usize = self.changed.iter().map(HashMap::len).sum();
        if self.log_lines < 1_000 || self.log_lines < 4 * still as u64 {
            return Ok(());
        }
        let mut by_mark: BTreeMap<u64, Vec<Key>> = BTreeMap::new();
        for (k, m) in self.changed.iter().flatten() {
            by_mark.entry(*m).or_default().push(k.clone());
        }
        let mut text = Vec::new();
        for (mark, keys) in &by_mark {
            text.extend(serde_json::to_vec(&ChangedLine { mark: *mark, keys: keys.clone() })?);
            text.push(b'\n');
        }
        let path = dir.join(CHANGED_FILE);
        write_atomic(&path, &text)?;
        self.log = OpenOptions::new().append(true).open(&path)?;
        self.log_lines = by_mark.len() as u64;
        Ok(())
    }
}

/// The position of the chunk holding `key` (plans are in key order and
/// cover every key of their type).
fn chunk_of(plan: &[ChunkRange], key: &Key) -> Option<usize> {
    let below = |c: &ChunkRange| match (c.bounds(), key) {
        (Bounds::Int { hi, .. }, Key::Int(k)) => hi < *k,
        (Bounds::Text { upto: Some(u), .. }, Key::Str(k)) => k.as_str() > u,
        _ => false,
    };
    let at = plan.partition_point(below);
    plan.get(at).filter(|c| c.contains(key)).map(|_| at).or_else(|| plan.iter().position(|c| c.contains(key)))
}

/// Opens both sides afresh: each comparison reads the rows as they are
/// now (a source keeps one snapshot for every read it makes).
pub type OpenSides<'a> = Box<dyn Fn() -> Result<(Arc<dyn Source>, Arc<dyn Source>)> + Send + Sync + 'a>;

/// Recopies `chunks` (of `plan`) from the source to the target: (source, target, plan, chunks).
pub type MendChunks<'a> = Box<dyn Fn(&dyn Source, &dyn Source, &[ChunkRange], &[ChunkRange]) -> Result<()> + Send + Sync + 'a>;

/// A job's verification while following: its record, how the chunks are
/// judged, and the background verifier's pace.
pub struct Watching<'a> {
    pub watch: Watch,
    judge: Judging<'a>,
    /// Rows per second the verifier reads at most (0: no limit).
    rate: u64,
    /// A cutover holds the verifier still while it checks.
    paused: AtomicBool,
    /// The job is catching up with a backlog: the verifier waits, since
    /// chunks read now would differ by changes in flight, and the catch-up
    /// gets the machine. Set until the job's first batch says otherwise: a
    /// resumed job may start with a backlog.
    behind: AtomicBool,
    busy: Mutex<()>,
}

enum Judging<'a> {
    Compare { open: OpenSides<'a>, mend: Option<Mend<'a>>, cmp: Comparison },
    Digest(DigestSide<'a>),
}

/// What a cutover's check compared and found.
pub enum Checked {
    /// Both sides compared (changed keys by id, chunks never seen equal whole).
    Compared(WatchCheck),
    /// One side digested (the other is a staging area).
    Digested(DigestCheck),
}

impl<'a> Watching<'a> {
    /// Opens (or resumes) the job's watch over `plan`, judged as `sides` says.
    pub fn open(dir: &Path, sides: WatchSides<'a>, plan: &[ChunkRange]) -> Result<Watching<'a>> {
        let WatchSides { judge, rate } = sides;
        let judge = match judge {
            Judge::Compare { open, mend } => {
                let (from, to) = open()?;
                let cmp = Comparison::of(from.as_ref(), to.as_ref());
                Judging::Compare { open, mend, cmp }
            }
            Judge::Digest(side) => Judging::Digest(side),
        };
        let watch = Watch::open(dir, plan)?;
        Ok(Watching { watch, judge, rate, paused: AtomicBool::new(false), behind: AtomicBool::new(true), busy: Mutex::new(()) })
    }

    /// Judges the next chunk due; the rows read, None when none is due.
    fn step(&self) -> Result<Option<u64>> {
        match &self.judge {
            Judging::Compare { open, cmp, .. } => {
                let (from, to) = open()?;
                self.watch.verify_next(cmp, from.as_ref(), to.as_ref())
            }
            Judging::Digest(side) => digest::digest_next(&self.watch, side),
        }
    }

    /// The background verifier: compares the chunks due, one at a time,
    /// until `stop`. Errors are said and retried (the job keeps following).
    pub fn run_verifier(&self, stop: &AtomicBool, say: &dyn Fn(&str)) {
        let mut last_error: Option<String> = None;
        while !stop.load(Relaxed) {
            if self.paused.load(Relaxed) || self.behind.load(Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            let started = Instant::now();
            let done = {
                let _busy = self.busy.lock().unwrap();
                self.step()
            };
            let idle = match done {
                Ok(Some(rows)) => {
                    last_error = None;
                    if self.rate > 0 { Duration::from_secs_f64(rows as f64 / self.rate as f64).saturating_sub(started.elapsed()) } else { Duration::ZERO }
                }
                Ok(None) => Duration::from_secs(1),
                Err(e) => {
                    let msg = format!("{e:#}");
                    if last_error.as_deref() != Some(msg.as_str()) {
                        say(&format!("warning: verifying while following: {msg} (tried again)"));
                    }
                    last_error = Some(msg);
                    Duration::from_secs(5)
                }
            };
            let until = Instant::now() + idle;
            while Instant::now() < until && !stop.load(Relaxed) {
                std::thread::sleep(Duration::from_millis(50).min(until - Instant::now()));
            }
        }
    }

    /// The cutover's check, on both sides as they are now. The verifier is
    /// held still from here on (a finished cutover removes the record);
    /// `resume` lets it go on after a cutover that failed.
    ///
    /// Where the sides can mend (Milvus targets or sources), differing chunks are
    /// recopied from the source and compared whole again; what then is
    /// equal is reported as mended, not as differing.
    pub fn check(&self) -> Result<Checked> {
        self.paused.store(true, Relaxed);
        let _busy = self.busy.lock().unwrap();
        match &self.judge {
            Judging::Compare { open, mend, cmp } => self.compare_and_mend(open, mend.as_ref(), cmp).map(Checked::Compared),
            Judging::Digest(side) => digest::check(&self.watch, side).map(Checked::Digested),
        }
    }

    fn compare_and_mend(&self, open: &OpenSides<'a>, mend: Option<&Mend<'a>>, cmp: &Comparison) -> Result<WatchCheck> {
        let (from, to) = open()?;
        let mut c = self.watch.check(cmp, from.as_ref(), to.as_ref())?;
        let Some(mend) = mend.filter(|_| !c.differing.is_empty()) else { return Ok(c) };
        let plan = self.watch.plan();
        let at_of = |d: &ChunkDiff| plan.iter().position(|p| p.id == d.chunk);
        // What was found first is what the cutover names; later rounds
        // (Milvus' count(*) can over-count for a while after upserts,
        // milvus-io/milvus#27515) only decide whether it is mended.
        let mut found: Vec<ChunkDiff> = std::mem::take(&mut c.differing);
        let mut left: Vec<usize> = found.iter().filter_map(at_of).collect();
        left.sort_unstable();
        left.dedup();
        // A recopied chunk is compared once more after a pause: Milvus 2.3
        // can bring back a delete's row after the compare that followed the
        // recopy had found it gone (milvus#32915), so equal right away is
        // not yet mended.
        let compare = |left: &[usize], c: &mut WatchCheck, record: bool| -> Result<Vec<usize>> {
            let (from, to) = open()?;
            let mark = self.watch.applied_mark();
            let mut still = Vec::new();
            c.differing.clear();
            for &at in left {
                let again = cmp.chunk(from.as_ref(), to.as_ref(), &plan[at])?;
                c.rows_compared += again.source_rows.max(again.target_rows);
                if !again.is_equal() {
                    still.push(at);
                    c.differing.push(again);
                } else if record {
                    self.watch.record_equal(at, mark, again.source_rows)?;
                }
            }
            Ok(still)
        };
        for _round in 0..MEND_ROUNDS {
            let chunks: Vec<ChunkRange> = left.iter().map(|at| plan[*at].clone()).collect();
            let (from, to) = open()?;
            (mend.recopy)(from.as_ref(), to.as_ref(), &plan, &chunks)?;
            let mut still = compare(&left, &mut c, false)?;
            if still.is_empty() {
                std::thread::sleep(crate::engine::repair::RECOPY_SETTLE);
                still = compare(&left, &mut c, true)?;
            }
            if still.is_empty() {
                // The recopy compacted the collection, and a compaction can
                // bring back a delete Milvus lost in any chunk: the copies of
                // every chunk not just compared whole are counted again.
                let (from, to) = open()?;
                let again = self.watch.count_copies(cmp, from.as_ref(), to.as_ref(), &|at| left.contains(&at), &mut c)?;
                still = again.iter().filter_map(at_of).collect();
                for d in &again {
                    if !found.iter().any(|f| f.chunk == d.chunk) {
                        found.push(d.clone());
                    }
                }
                c.differing = again;
            }
            left = still;
            if left.is_empty() {
                break;
            }
        }
        found.retain(|d| at_of(d).is_some_and(|at| !left.contains(&at)));
        c.mended = found;
        Ok(c)
    }

    /// Why a chunk could differ with every change applied, if it can.
    pub fn may_differ(&self) -> Option<MayDiffer> {
        match &self.judge {
            Judging::Compare { mend, .. } => mend.as_ref().map(|m| m.why),
            Judging::Digest(_) => None,
        }
    }

    /// Whether the job is catching up with a backlog (see `behind`).
    pub fn set_behind(&self, behind: bool) {
        self.behind.store(behind, Relaxed);
    }

    pub fn resume(&self) {
        self.paused.store(false, Relaxed);
    }
}

/// How an online job verifies while it follows, set up once the snapshot
/// is loaded (the target exists by then), and the verifier's pace.
pub struct WatchSides<'a> {
    pub judge: Judge<'a>,
    /// Rows per second at most (0: no limit).
    pub rate: u64,
}

/// What the background verifier does with each chunk.
pub enum Judge<'a> {
    /// Both sides are databases (the source, the target read back): compare
    /// them with verify's rules.
    Compare {
        open: OpenSides<'a>,
        /// Recopies chunks that differ although every change was applied.
        mend: Option<Mend<'a>>,
    },
    /// The other side is a staging area (an export, an import): record this
    /// side's digests for a comparison at the end.
    Digest(DigestSide<'a>),
}

/// How a chunk found differing is made equal, and why it could differ.
pub struct Mend<'a> {
    pub why: MayDiffer,
    pub recopy: MendChunks<'a>,
}

/// Why a chunk can differ although every change the stream carried was
/// applied, so that the cutover recopies it rather than reporting it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MayDiffer {
    /// The target (Milvus 2.3) can lose writes it acknowledged.
    LossyTarget,
    /// The source's stream (Milvus: watermark and id reconcile) cannot see
    /// every write; the target may be lossy too.
    BlindSource,
}

impl MayDiffer {
    /// Of a job: `blind_source` (a Milvus source), `lossy_target` (a Milvus target).
    pub fn of(blind_source: bool, lossy_target: bool) -> Option<MayDiffer> {
        if blind_source {
            Some(MayDiffer::BlindSource)
        } else {
            lossy_target.then_some(MayDiffer::LossyTarget)
        }
    }

    /// Why a recopied chunk could have differed, as the cutover says it.
    pub fn why_mended(self) -> &'static str {
        match self {
            MayDiffer::LossyTarget => "the target had lost writes it acknowledged, a known Milvus 2.3 defect, see docs/limits.md",
            MayDiffer::BlindSource => {
                "the source's watermark did not show those writes, or the target lost writes it acknowledged (Milvus 2.3, see docs/limits.md)"
            }
        }
    }

    /// What the source's stream cannot see, said with every cutover.
    pub fn unseen(self) -> Option<&'static str> {
        match self {
            MayDiffer::LossyTarget => None,
            MayDiffer::BlindSource => Some(
                "a write to the Milvus source that left its watermark field as it was (an upsert in place) shows only to the verifier's \
                 passes: `cutover --full-verify` compares everything",
            ),
        }
    }
}
