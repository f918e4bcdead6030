//! `vmig inspect`: checks a staging area against its manifest and markers.

use anyhow::Result;

use crate::backends::staging::{StagingSource, check_chunk_file};
use crate::commands::cli::InspectArgs;
use crate::contract::Source;
use crate::model::hash::ContentHash;
use crate::state::manifest::read_markers;
use crate::state::store::Store;

/// Returns false when any chunk file fails its check.
pub fn inspect(a: InspectArgs) -> Result<bool> {
    let store = Store::open(&a.dir)?;
    let source = StagingSource::open(store.clone())?;
    let m = source.manifest().clone();
    let markers = read_markers(&store)?;
    let mut ok = true;
    let mut chunks = Vec::new();
    for c in &m.plan {
        let (state, rows, bytes) = match markers.get(&c.id) {
            None => ("not exported".to_string(), 0, 0),
            Some(rec) => {
                let mut state = match check_chunk_file(&store, rec) {
                    Ok(_) => "ok".to_string(),
                    Err(e) => {
                        ok = false;
                        format!("BAD: {e:#}")
                    }
                };
                if a.deep && state == "ok" {
                    let mut h = ContentHash::default();
                    source.read_chunk(c, 4096, &mut |b| {
                        h.add_batch(&b);
                        Ok(())
                    })?;
                    if h.rows != rec.rows || h.hex() != rec.content_hash {
                        ok = false;
                        state = format!("BAD: content ({} rows, hash {}) differs from its marker", h.rows, h.hex());
                    }
                }
                (state, rec.rows, rec.bytes)
            }
        };
        chunks.push(serde_json::json!({"chunk": c.id, "lo": c.lo, "hi": c.hi, "text": c.text, "rows": rows, "bytes": bytes, "state": state}));
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"manifest": m, "chunks": chunks, "ok": ok}))?);
        return Ok(ok);
    }
    println!("staging {} · format {} · job {} · created {}", store.describe(), m.format_version, m.job, m.created_at);
    println!("source: {}", m.source);
    println!("table {} (primary key {}):", m.table.name, m.table.primary_key);
    for c in &m.table.columns {
        println!("  {:<16} {:?}{}", c.name, c.ty, if c.nullable { "" } else { " NOT NULL" });
    }
    for ix in &m.table.indexes {
        println!("  index {} on ({}) {:?}", ix.name, ix.columns.join(", "), ix.kind);
    }
    println!("vectors: {}{}", m.vector_encoding, if m.vectors_exact { ", bit-exact" } else { ", NOT bit-exact" });
    println!("{:>8} {:>21} {:>21} {:>9} {:>12}  state", "chunk", "lo", "hi", "rows", "bytes");
    for c in &chunks {
        println!(
            "{:>8} {:>21} {:>21} {:>9} {:>12}  {}",
            c["chunk"], c["lo"], c["hi"], c["rows"], c["bytes"], c["state"].as_str().unwrap()
        );
    }
    println!(
        "{} of {} chunks exported, {} rows, {:.1} MB · {}",
        markers.len(),
        m.plan.len(),
        markers.values().map(|r| r.rows).sum::<u64>(),
        markers.values().map(|r| r.bytes).sum::<u64>() as f64 / 1e6,
        if ok { "all chunk files intact" } else { "DAMAGED chunk files (see above)" }
    );
    Ok(ok)
}
