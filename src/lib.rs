//! vmig: move vector tables between databases, exactly and resumably.
//! Export → transform → import over Arrow batches; any stage boundary can be a
//! Parquet staging directory; every chunk commit is recorded in a ledger.
//!
//! The modules stand on six floors; each imports only from floors below it
//! (`tests/floors.rs` checks this, `docs/architecture.md` draws it):
//!
//! 1. [`model`]: schema, keys and chunk ranges, filters, hashing, the
//!    pipeline file and URLs, retry and cancellation, vector values.
//! 2. [`contract`]: the `Source` / `Sink` / change-stream traits, change
//!    types, the commit record, row-batch columns.
//! 3. [`state`]: the state store, ledger file, claims, locks, status, metrics.
//! 4. [`backends`]: PostgreSQL, OceanBase, Milvus, Parquet staging, and
//!    opening one from a URL.
//! 5. [`engine`]: the offline pipeline, shared jobs, online follow, transform,
//!    verify, repair, recall.
//! 6. [`commands`]: the command line and one module per subcommand.

#[macro_use]
pub mod model;
pub mod contract;
pub mod state;
pub mod backends;
pub mod engine;
pub mod commands;
