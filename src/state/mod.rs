//! Floor 3, state: what a job remembers and shows. The state store (local
//! directory or object storage), files written atomically, the ledger file,
//! claims and leases of shared jobs, job locks, status and progress, metrics.
//! Knows the model and the contract; nothing of backends or the engine.

pub mod claims;
pub mod files;
pub mod http;
pub mod job_status;
pub mod ledger;
pub mod locks;
pub mod manifest;
pub mod metrics;
pub mod online;
pub mod parquet;
pub mod progress;
pub mod store;
