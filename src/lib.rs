//! vmig: move vector tables between databases, exactly and resumably.
//! Export → transform → import over Arrow batches; any stage boundary can be a
//! Parquet staging directory; every chunk commit is recorded in a ledger.

pub mod claims;
pub mod cli;
pub mod commands;
pub mod config;
pub mod endpoint;
pub mod filter;
pub mod generate;
pub mod hash;
pub mod ledger;
pub mod metrics;
pub mod online;
pub mod pipeline;
pub mod plan;
pub mod progress;
pub mod recall;
pub mod repair;
pub mod retry;
pub mod schema;
pub mod shared;
pub mod store;
pub mod tables;
pub mod transform;
pub mod verify;
pub mod verify_command;
pub mod verify_html;
