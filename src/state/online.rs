//! An online job's files in its state directory: which source artefacts it
//! owns (`online.json`) and the cutover handshake (`cutover-<command>.json`).

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::files::{load_json, write_atomic};

/// `online.json` in the job's directory: which source artefacts the job
/// owns (so `reset` and `status` can name them even when no run is alive).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OnlineState {
    /// Source kind: postgres, oceanbase, milvus.
    pub kind: String,
    /// The source, without secrets.
    pub source: String,
    /// PostgreSQL: the replication slot and publication.
    #[serde(default)]
    pub slot: String,
    #[serde(default)]
    pub publication: String,
    /// OceanBase: the changelog table and its triggers.
    #[serde(default)]
    pub changelog: String,
    #[serde(default)]
    pub triggers: Vec<String>,
    pub created_at: String,
    /// Where the snapshot ends and the stream begins.
    pub consistent_point: String,
}

impl OnlineState {
    pub fn path(job_dir: &Path) -> PathBuf {
        job_dir.join("online.json")
    }
    pub fn load(job_dir: &Path) -> Result<Option<OnlineState>> {
        load_json(&Self::path(job_dir))
    }
    pub fn save(&self, job_dir: &Path) -> Result<()> {
        write_atomic(&Self::path(job_dir), &serde_json::to_vec_pretty(self)?)
    }
    /// What the job keeps on its source, for the user.
    pub fn describe(&self) -> String {
        match self.kind.as_str() {
            "postgres" => format!("replication slot {} and publication {} on {}", self.slot, self.publication, self.source),
            "oceanbase" => format!("changelog table {} and triggers {} on {}", self.changelog, self.triggers.join(", "), self.source),
            _ => format!("nothing on {} (vmig polls it)", self.source),
        }
    }
    /// The source holds something a reset must drop.
    pub fn has_artifacts(&self) -> bool {
        matches!(self.kind.as_str(), "postgres" | "oceanbase")
    }
}

/// `cutover-<command>.json` in the job's directory: written by `vmig
/// cutover` (requested), answered by the online job (done or failed). Per
/// command: an export and its import share a staging directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CutoverRequest {
    pub requested_at: String,
    /// requested, done, failed
    pub state: String,
    /// The source position to drain to (set by the job when it takes the request).
    #[serde(default)]
    pub position: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub finished_at: Option<String>,
    /// Made by a `vmig cutover` that runs the job itself (no online run was
    /// alive): a failed cutover ends the run instead of following on.
    #[serde(default)]
    pub standalone: bool,
    /// `cutover --full-verify`: compare both whole tables, not only what changed.
    #[serde(default)]
    pub full_verify: bool,
}

impl CutoverRequest {
    /// A request made now, in `state`.
    pub fn new(state: &str) -> CutoverRequest {
        CutoverRequest {
            requested_at: crate::model::now_rfc3339(),
            state: state.into(),
            position: None,
            message: None,
            finished_at: None,
            standalone: false,
            full_verify: false,
        }
    }
    pub fn path(job_dir: &Path, command: &str) -> PathBuf {
        job_dir.join(format!("cutover-{command}.json"))
    }
    pub fn load(job_dir: &Path, command: &str) -> Result<Option<CutoverRequest>> {
        load_json(&Self::path(job_dir, command))
    }
    pub fn save(&self, job_dir: &Path, command: &str) -> Result<()> {
        write_atomic(&Self::path(job_dir, command), &serde_json::to_vec_pretty(self)?)
    }
}
