//! Floor 4, the backends: one folder per database (and the Parquet staging
//! area), each with its `Source` and `Sink`. A backend knows the model, the
//! contract and the state floor, never another backend, the engine or the
//! commands. This file is the one place that knows them all: it opens the
//! endpoint a URL names.

pub mod milvus;
pub mod oceanbase;
pub mod postgres;
pub mod staging;

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use tokio::runtime::Handle;

use crate::contract::{Sink, Source};
use crate::model::config::Endpoint;
use crate::state::store::Store;
use milvus::{MilvusSink, MilvusSource};
use oceanbase::{ObSink, ObSource};
use postgres::{PgSink, PgSource};
use staging::{StagingSink, StagingSource};

pub fn open_source(ep: &Endpoint, table: &str, handle: &Handle) -> Result<Arc<dyn Source>> {
    Ok(match ep {
        Endpoint::Postgres(u) => Arc::new(PgSource::open(u.clone(), table, handle.clone())?),
        Endpoint::OceanBase(u) => Arc::new(ObSource::open(u.clone(), table, handle.clone())?),
        Endpoint::Milvus(u) => Arc::new(MilvusSource::open(u.clone(), table, handle.clone())?),
        Endpoint::Staging(addr) => Arc::new(StagingSource::open(Store::open(addr)?)?),
    })
}

/// `open_source`, restricted to a subset when a filter is given.
pub fn open_subset(ep: &Endpoint, table: &str, handle: &Handle, filter: Option<&crate::model::filter::Filter>) -> Result<Arc<dyn Source>> {
    let s = open_source(ep, table, handle)?;
    if let Some(f) = filter {
        s.restrict(f)?;
    }
    Ok(s)
}

/// `state`: the job's state store (where sinks without a ledger of their
/// own, like Milvus, keep one); None when no job runs.
pub fn open_sink(ep: &Endpoint, table: &str, handle: &Handle, state: Option<&Store>) -> Result<Arc<dyn Sink>> {
    Ok(match ep {
        Endpoint::Postgres(u) => Arc::new(PgSink::open(u.clone(), table, handle.clone())?),
        Endpoint::OceanBase(u) => Arc::new(ObSink::open(u.clone(), table, handle.clone())?),
        Endpoint::Milvus(u) => Arc::new(MilvusSink::open(u.clone(), table, handle.clone(), state)?),
        Endpoint::Staging(addr) => Arc::new(StagingSink::new(Store::open(addr)?)),
    })
}

/// Parses a verify/inspect side: an existing directory is a staging area.
pub fn parse_side(arg: &str) -> Result<Endpoint> {
    let p = Path::new(arg);
    if p.is_dir() {
        return Ok(Endpoint::Staging(arg.to_string()));
    }
    Endpoint::parse(arg)
}
