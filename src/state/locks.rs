//! Who holds a job: the lock holder's identity and the checks on it.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Who runs a job: shown to a second run that finds the job locked.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    pub since: String,
}

impl Holder {
    pub fn me() -> Holder {
        static SINCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        Holder { host: host_name(), pid: std::process::id(), since: SINCE.get_or_init(crate::model::now_rfc3339).clone() }
    }
    pub fn describe(&self) -> String {
        format!("host {}, pid {}, since {}", self.host, self.pid, self.since)
    }
    /// The holder ran on this host and its process is gone.
    pub fn is_dead_here(&self) -> bool {
        self.host == host_name() && !std::path::Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

/// The error a second run of a job gets while the first is alive.
pub fn job_locked(job: &str, target: &str, holder: Option<String>) -> anyhow::Error {
    anyhow::anyhow!(
        "job {job} is already running against {target} ({}); wait for it or stop it, then run again",
        holder.unwrap_or_else(|| "holder unknown".into())
    )
}
pub fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}
