//! The status document of one job: what `vmig status --json` prints and the
//! live page's `/status.json` serves. Read from the job's store (manifest,
//! staged chunk markers, every shared worker's published status) and the
//! local runs' status files; a running process puts its own fresh status in
//! place of its file's.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use serde_json::{Value, json};

use crate::state::ledger::JobDir;
use crate::state::locks::process_alive;
use crate::state::manifest::{Manifest, read_markers};
use crate::state::progress::{Status, chunk_state, worker_statuses};
use crate::state::store::Store;

/// The commands whose runs leave a status file in the job directory.
const COMMANDS: [&str; 3] = ["export", "migrate", "import"];

/// Everything the document is made of, read once.
pub struct JobStatus {
    pub manifest: Manifest,
    pub staged: crate::contract::commit::Ledger,
    /// The runs of this job on this host (export, migrate, import).
    pub runs: Vec<Status>,
    /// Every worker of a shared job, as it last published itself.
    pub workers: Vec<Status>,
    pub reject_files: usize,
    pub job_dir: Option<std::path::PathBuf>,
}

impl JobStatus {
    /// Reads the job's state; `live`: the caller's own run, fresher than its file.
    pub fn read(store: &Store, live: Option<&Status>) -> Result<JobStatus> {
        let manifest = Manifest::load(store)?
            .ok_or_else(|| anyhow!("no job state in {} (nothing planned yet)", store.describe()))?;
        let staged = read_markers(store)?;
        let workers = worker_statuses(store)?;
        let job_dir = store.local_dir().map(Path::to_path_buf);
        let mut runs = Vec::new();
        if let Some(dir) = &job_dir {
            for cmd in COMMANDS {
                if let Some(l) = live.filter(|l| l.command == cmd) {
                    runs.push(l.clone());
                    continue;
                }
                let p = JobDir::new(dir).status(cmd);
                if let Ok(bytes) = std::fs::read(&p) {
                    let mut s: Status = serde_json::from_slice(&bytes).with_context(|| format!("{} is damaged", p.display()))?;
                    if s.state == "running" && !process_alive(s.pid) {
                        s.state = "interrupted (process gone)".into();
                    }
                    runs.push(s);
                }
            }
        } else if let Some(l) = live {
            runs.push(l.clone());
        }
        let reject_files = job_dir.as_ref().map_or(0, |d| std::fs::read_dir(JobDir::new(d).rejects()).map(|d| d.count()).unwrap_or(0));
        Ok(JobStatus { manifest, staged, runs, workers, reject_files, job_dir })
    }

    /// Every chunk's state, in plan order, merged over the staged markers,
    /// the runs and the workers; and which worker holds a claim on which chunk.
    pub fn chunk_map(&self) -> (String, BTreeMap<u32, String>) {
        let plan = &self.manifest.plan;
        let mut map: Vec<char> = vec![chunk_state::PENDING; plan.len()];
        let pos: BTreeMap<u32, usize> = plan.iter().enumerate().map(|(i, c)| (c.id, i)).collect();
        for id in self.staged.keys() {
            if let Some(&i) = pos.get(id) {
                map[i] = chunk_state::COMMITTED;
            }
        }
        for s in self.runs.iter().chain(&self.workers) {
            if s.chunk_map.chars().count() != map.len() {
                continue;
            }
            for (m, c) in map.iter_mut().zip(s.chunk_map.chars()) {
                if chunk_state::rank(c) > chunk_state::rank(*m) {
                    *m = c;
                }
            }
        }
        let mut claimed_by = BTreeMap::new();
        for s in self.workers.iter().filter(|s| s.worker_alive()) {
            let Some(w) = &s.worker else { continue };
            for id in &w.claims {
                if let Some(&i) = pos.get(id) {
                    if chunk_state::rank(map[i]) < chunk_state::rank(chunk_state::COMMITTED) {
                        map[i] = chunk_state::RUNNING;
                    }
                    claimed_by.insert(*id, w.worker.clone());
                }
            }
        }
        (map.into_iter().collect(), claimed_by)
    }

    /// The JSON document.
    pub fn document(&self) -> Value {
        let m = &self.manifest;
        let (states, claimed_by) = self.chunk_map();
        let workers: Vec<Value> = self
            .workers
            .iter()
            .map(|s| {
                let mut v = serde_json::to_value(s).unwrap_or(Value::Null);
                if let (Some(w), Some(o)) = (&s.worker, v.as_object_mut()) {
                    o.insert("heartbeat_age_seconds".into(), json!(w.heartbeat_age_seconds()));
                    o.insert("gone".into(), json!(s.worker_gone()));
                }
                v
            })
            .collect();
        json!({
            "job": m.job, "source": m.source, "created_at": m.created_at,
            "generated_at": crate::model::now_rfc3339(),
            "chunks_planned": m.plan.len(), "rows_planned": m.plan.iter().map(|c| c.rows).sum::<u64>(),
            "staged_chunks": self.staged.len(), "staged_rows": self.staged.values().map(|r| r.rows).sum::<u64>(),
            "staged_bytes": self.staged.values().map(|r| r.bytes).sum::<u64>(), "reject_files": self.reject_files,
            "chunks": {
                "ids": m.plan.iter().map(|c| c.id).collect::<Vec<_>>(),
                "states": states,
                "claimed_by": claimed_by,
            },
            "runs": self.runs,
            "workers": workers,
        })
    }
}
