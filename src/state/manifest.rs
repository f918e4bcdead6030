//! The job's manifest (`manifest.json` in its state store: format version,
//! table spec, plan, no secrets) and the commit markers beside its chunks
//! (`chunks/000017.commit.json`), which are the ledger of a staging area.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::contract::commit::{CommitRecord, Ledger};
use crate::model::plan::ChunkRange;
use crate::model::schema::TableSpec;
use crate::state::store::Store;

pub const FORMAT_VERSION: u32 = 1;

/// The job's description, written once when the job is planned.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub job: String,
    pub created_at: String,
    /// Where the rows came from (no credentials).
    pub source: String,
    pub table: TableSpec,
    pub chunk_rows: u64,
    pub plan: Vec<ChunkRange>,
    /// How vectors are stored in chunk files.
    pub vector_encoding: String,
    /// True when vectors are bit-exact copies of the source's storage.
    pub vectors_exact: bool,
    /// A subset job's filter, in its canonical text: the chunks hold only
    /// the matching rows, and a resume must use the same filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
}

impl Manifest {
    pub fn load(store: &Store) -> Result<Option<Manifest>> {
        let Some(obj) = store.get(MANIFEST)? else { return Ok(None) };
        let where_ = format!("{}/{MANIFEST}", store.describe().trim_end_matches('/'));
        let m: Manifest = serde_json::from_slice(&obj.bytes).with_context(|| format!("{where_} is not a vmig manifest"))?;
        if m.format_version > FORMAT_VERSION {
            bail!("{where_}: format version {} is newer than this vmig understands ({FORMAT_VERSION})", m.format_version);
        }
        Ok(Some(m))
    }

    /// `load` for a local directory.
    pub fn load_dir(dir: &Path) -> Result<Option<Manifest>> {
        Manifest::load(&Store::open(&dir.to_string_lossy())?)
    }

    pub fn save(&self, store: &Store) -> Result<()> {
        store.put(MANIFEST, &serde_json::to_vec_pretty(self)?)
    }

    /// Saves the manifest only if none exists (the first worker's plan
    /// wins); false if one does.
    pub fn create(&self, store: &Store) -> Result<bool> {
        store.create(MANIFEST, &serde_json::to_vec_pretty(self)?)
    }
}

const MANIFEST: &str = "manifest.json";

pub fn marker_key(id: u32) -> String {
    format!("chunks/{id:06}.commit.json")
}

/// Reads every commit marker in the store.
pub fn read_markers(store: &Store) -> Result<Ledger> {
    let mut cache = Ledger::new();
    read_markers_into(store, &mut cache)?;
    Ok(cache)
}

/// Reads the commit markers not in `known` yet (markers never change once
/// written), and drops those that are gone (a reset).
pub fn read_markers_into(store: &Store, known: &mut Ledger) -> Result<()> {
    let mut present = BTreeSet::new();
    for (key, _) in store.list("chunks")? {
        let Some(id) = key.strip_suffix(".commit.json").and_then(|n| n.parse::<u32>().ok()) else { continue };
        present.insert(id);
        if known.contains_key(&id) {
            continue;
        }
        if let Some(obj) = store.get(&marker_key(id))? {
            let rec: CommitRecord = serde_json::from_slice(&obj.bytes)
                .with_context(|| format!("commit marker of chunk {id:06} in {} is damaged", store.describe()))?;
            known.insert(rec.chunk, rec);
        }
    }
    known.retain(|id, _| present.contains(id));
    Ok(())
}
