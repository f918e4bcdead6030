//! Verification while following where the other side is a staging area:
//! an online export and its import never see each other, so each records
//! its own side instead of comparing. Per chunk, the digest (by comparison
//! mode) and every row's hash go into the watch at the change mark they
//! were read at. At cutover only the keys changed since are read again, by
//! id: a digest is a sum of row hashes, so a changed row's old hash comes
//! out and its new one goes in. The export writes the digests for its
//! import (`changes/end.json`); the import compares its own with them.
//!
//! Row hashes live in `watch-hashes/<chunk id>` beside `watch.json`, written
//! before the check that names them; a kill between the two leaves newer
//! hashes under an older check, whose changed keys (a superset) are then
//! read again: still exact.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};

use super::{ChunkCheck, Watch};
use crate::contract::Source;
use crate::engine::online::CutoverCheck;
use crate::engine::verify::{Normalise, chunk_digest, digest_of, duplicated_keys, key_list, read_ids_side_modes, read_side_modes};
use crate::model::hash::ChunkDigest;
use crate::model::now_rfc3339;
use crate::model::plan::{ChunkRange, Key};
use crate::state::files::write_atomic;

const HASHES_DIR: &str = "watch-hashes";

/// Digests by comparison mode (`Normalise::key`), one per chunk of the plan.
pub type Digests = BTreeMap<String, Vec<ChunkDigest>>;

/// The side an export or import records, and what its cutover does with
/// the digests.
pub struct DigestSide<'a> {
    /// Opens the side afresh (a read sees it as it is then).
    pub open: Box<dyn Fn() -> Result<Arc<dyn Source>> + Send + Sync + 'a>,
    /// The source's columns, hashed in this order.
    pub columns: Vec<String>,
    /// Modes to digest in, given the side opened: an export every mode an
    /// import may need, an import the one its target is compared in.
    pub modes: Box<dyn Fn(&dyn Source) -> Vec<Normalise> + Send + Sync + 'a>,
    /// At cutover, with the digests of the side as it is then: an export
    /// writes them for its import, an import compares them with the export's.
    pub finish: Box<dyn Fn(&[ChunkRange], &Digests) -> Result<CutoverCheck> + Send + Sync + 'a>,
    /// At cutover, also count the copies each chunk's rows are stored in
    /// (an import: a Milvus target can hold an id twice, which its queries,
    /// and so the digests, hide).
    pub count_copies: bool,
}

/// What a cutover read to digest its side, and what the digests showed.
pub struct DigestCheck {
    pub check: CutoverCheck,
    pub changed_keys: usize,
    pub undigested_chunks: usize,
    pub rows_read: u64,
}

pub(super) fn discard(dir: &Path) -> Result<()> {
    let d = dir.join(HASHES_DIR);
    match std::fs::remove_dir_all(&d) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).with_context(|| format!("removing {}", d.display())),
        _ => Ok(()),
    }
}

fn hashes_path(dir: &Path, chunk: u32) -> PathBuf {
    hashes_dir(dir).join(format!("{chunk}"))
}

/// Where a watch keeps its chunks' row hashes.
pub fn hashes_dir(watch_dir: &Path) -> PathBuf {
    watch_dir.join(HASHES_DIR)
}

/// A chunk's row hashes (one map per mode). Written by a digest pass, and
/// again by a cutover with the rows as they are then: a hash file newer
/// than its check stays exact, since the keys changed since that check are
/// corrected again from the side itself.
fn write_hashes(dir: &Path, chunk: u32, rows: &[HashMap<Key, u64>]) -> Result<()> {
    let path = hashes_path(dir, chunk);
    std::fs::create_dir_all(path.parent().unwrap())?;
    write_atomic(&path, &encode(rows))
}

/// A chunk's row hashes in the mode `mode` of `modes` (the modes the file
/// was written with), from the hash files in `files` (a watch's
/// `hashes_dir`, or what an export left its import); None when there are none.
pub fn row_hashes(files: &Path, chunk: u32, modes: &[Normalise], mode: &str) -> Result<Option<HashMap<Key, u64>>> {
    let Some(at) = modes.iter().position(|n| n.key() == mode) else { return Ok(None) };
    let path = files.join(format!("{chunk}"));
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    Ok(Some(decode(&bytes, modes.len()).with_context(|| format!("{} is damaged", path.display()))?.swap_remove(at)))
}

/// Leaves the row hashes of a cutover's check (every chunk's, current after
/// `check`) in `to`, which outlives the watch: hard links where the file
/// system allows, copies where not.
pub fn keep_hashes(watch_dir: &Path, to: &Path) -> Result<()> {
    let from = hashes_dir(watch_dir);
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    let entries = match std::fs::read_dir(&from) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()), // a plan without chunks
        r => r.with_context(|| format!("reading {}", from.display()))?,
    };
    for entry in entries {
        let entry = entry?;
        let target = to.join(entry.file_name());
        let _ = std::fs::remove_file(&target);
        if std::fs::hard_link(entry.path(), &target).is_err() {
            std::fs::copy(entry.path(), &target).with_context(|| format!("copying {} to {}", entry.path().display(), target.display()))?;
        }
    }
    Ok(())
}

/// Records the next chunk due: its digests and its rows' hashes; returns
/// the rows read, None when no chunk is due.
pub(super) fn digest_next(watch: &Watch, side: &DigestSide) -> Result<Option<u64>> {
    let Some((at, chunk, mark)) = watch.next_due() else { return Ok(None) };
    let read = (side.open)()?;
    let modes = (side.modes)(read.as_ref());
    let rows = read_side_modes(read.as_ref(), &chunk, &side.columns, &modes)?;
    write_hashes(&watch.dir, chunk.id, &rows)?;
    let digests = modes.iter().zip(&rows).map(|(n, r)| (n.key().to_string(), digest_of(&chunk, r).digest)).collect();
    let n = rows.first().map_or(0, |r| r.len() as u64);
    watch.record(at, ChunkCheck { mark, at: now_rfc3339(), rows: n, digests })?;
    Ok(Some(n))
}

/// The cutover's digests, with the writes stopped and every change marked
/// applied: chunks never recorded read whole, recorded ones corrected by
/// the keys changed since.
pub(super) fn check(watch: &Watch, side: &DigestSide) -> Result<DigestCheck> {
    let (plan, keys, unrecorded, checks) = {
        let st = watch.state.lock().unwrap();
        let (keys, unrecorded) = st.pending();
        (st.file.plan.clone(), keys, unrecorded, st.file.checked.clone())
    };
    let read = (side.open)()?;
    let modes = (side.modes)(read.as_ref());
    let keyed: HashMap<usize, Vec<Key>> = keys.into_iter().collect();
    let mut out = DigestCheck {
        check: CutoverCheck::default(),
        changed_keys: keyed.values().map(Vec::len).sum(),
        undigested_chunks: unrecorded.len(),
        rows_read: 0,
    };
    let mut digests: Digests = BTreeMap::new();
    let mut copies = Vec::new();
    let mut counted = false;
    for (at, chunk) in plan.iter().enumerate() {
        let mut held: Option<Vec<Key>> = None;
        let per_mode: Vec<ChunkDigest> = if unrecorded.contains(&at) {
            let rows = read_side_modes(read.as_ref(), chunk, &side.columns, &modes)?;
            out.rows_read += rows.first().map_or(0, |r| r.len() as u64);
            held = rows.first().map(|r| r.keys().cloned().collect());
            write_hashes(&watch.dir, chunk.id, &rows)?;
            rows.iter().map(|r| digest_of(chunk, r)).collect()
        } else if let Some(ks) = keyed.get(&at) {
            let path = hashes_path(&watch.dir, chunk.id);
            let mut rows = decode(&std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?, modes.len())
                .with_context(|| format!("{} is damaged", path.display()))?;
            for part in ks.chunks(1_000) {
                let now = read_ids_side_modes(read.as_ref(), part, &side.columns, &modes)?;
                out.rows_read += now.first().map_or(0, |r| r.len() as u64);
                for (held, fresh) in rows.iter_mut().zip(now) {
                    for k in part {
                        held.remove(k);
                    }
                    held.extend(fresh);
                }
            }
            held = rows.first().map(|r| r.keys().cloned().collect());
            write_hashes(&watch.dir, chunk.id, &rows)?;
            rows.iter().map(|r| digest_of(chunk, r)).collect()
        } else {
            let c = checks.get(&chunk.id).ok_or_else(|| anyhow!("chunk {} has no check", chunk.id))?;
            modes
                .iter()
                .map(|n| {
                    let digest = c.digests.get(n.key()).cloned().ok_or_else(|| anyhow!("chunk {}'s check has no {} digest", chunk.id, n.key()))?;
                    Ok(chunk_digest(chunk, c.rows, digest))
                })
                .collect::<Result<_>>()?
        };
        if side.count_copies {
            let rows = per_mode.first().map_or(0, |d| d.rows);
            let stored = read.stored_copies(chunk)?;
            counted |= stored.is_some();
            if let Some(n) = stored.filter(|n| *n > rows) {
                copies.push(extra_copies(read.as_ref(), watch, chunk, held, &modes, rows, n)?);
            }
        }
        for (n, d) in modes.iter().zip(per_mode) {
            digests.entry(n.key().to_string()).or_default().push(d);
        }
    }
    out.check = (side.finish)(&plan, &digests)?;
    if counted {
        out.check.summary.push_str(", and each chunk's stored copies counted: one per id");
    }
    if !copies.is_empty() {
        out.check.only_extra_copies = out.check.equal;
        out.check.equal = false;
        let found = copies.into_iter().take(5).collect::<Vec<_>>().join("; ");
        out.check.differences = if out.check.differences.is_empty() { found } else { format!("{}; {found}", out.check.differences) };
    }
    Ok(out)
}

/// "chunk 000002 [400, 799]: the target stores 401 copies of its 400 rows;
/// duplicate copies of ids [512]": the ids held more than once, found by
/// counting (the keys from the cutover's read, else the chunk's hashes).
#[allow(clippy::too_many_arguments)]
fn extra_copies(
    read: &dyn Source,
    watch: &Watch,
    chunk: &ChunkRange,
    held: Option<Vec<Key>>,
    modes: &[Normalise],
    rows: u64,
    copies: u64,
) -> Result<String> {
    let mut keys = match held {
        Some(k) => k,
        None => row_hashes(&hashes_dir(&watch.dir), chunk.id, modes, modes[0].key())?
            .ok_or_else(|| anyhow!("chunk {} has a check but no row hashes", chunk.id))?
            .into_keys()
            .collect(),
    };
    keys.sort();
    let ids = duplicated_keys(read, &keys, copies)?;
    Ok(format!(
        "chunk {:06} {}: the target stores {copies} copies of its {rows} rows; duplicate copies of ids {} (Milvus lost deletes it \
         acknowledged, a known Milvus 2.3 defect, see docs/limits.md; `vmig repair` from the source removes them)",
        chunk.id,
        chunk.describe_bounds(),
        key_list(&ids)
    ))
}

/// Rows' hashes under each mode: for every key (in the first mode's map)
/// a tag (0 integer, 1 text), the key, then one u64 per mode.
fn encode(rows: &[HashMap<Key, u64>]) -> Vec<u8> {
    let Some(first) = rows.first() else { return Vec::new() };
    let mut out = Vec::with_capacity(first.len() * (17 + 8 * rows.len()));
    for k in first.keys() {
        match k {
            Key::Int(i) => {
                out.push(0);
                out.extend(i.to_le_bytes());
            }
            Key::Str(s) => {
                out.push(1);
                out.extend((s.len() as u32).to_le_bytes());
                out.extend(s.as_bytes());
            }
        }
        for r in rows {
            out.extend(r.get(k).copied().unwrap_or(0).to_le_bytes());
        }
    }
    out
}

fn decode(mut b: &[u8], modes: usize) -> Result<Vec<HashMap<Key, u64>>> {
    fn take<'b>(b: &mut &'b [u8], n: usize) -> Result<&'b [u8]> {
        if b.len() < n {
            bail!("cut short");
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Ok(head)
    }
    let mut out = vec![HashMap::new(); modes];
    while !b.is_empty() {
        let key = match take(&mut b, 1)?[0] {
            0 => Key::Int(i64::from_le_bytes(take(&mut b, 8)?.try_into().unwrap())),
            1 => {
                let n = u32::from_le_bytes(take(&mut b, 4)?.try_into().unwrap()) as usize;
                Key::Str(String::from_utf8(take(&mut b, n)?.to_vec())?)
            }
            t => bail!("unknown key tag {t}"),
        };
        for r in out.iter_mut() {
            r.insert(key.clone(), u64::from_le_bytes(take(&mut b, 8)?.try_into().unwrap()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_hashes_read_back_as_written() {
        let mut a = HashMap::new();
        let mut b = HashMap::new();
        for (i, k) in [Key::Int(-7), Key::Int(i64::MAX), Key::Str(String::new()), Key::Str("é\u{1}x".into())].into_iter().enumerate() {
            a.insert(k.clone(), i as u64 * 3 + 1);
            b.insert(k, u64::MAX - i as u64);
        }
        let rows = vec![a, b];
        assert_eq!(decode(&encode(&rows), 2).unwrap(), rows);
        let bytes = encode(&rows);
        assert!(decode(&bytes[..bytes.len() - 1], 2).is_err(), "a file cut short is an error, not fewer rows");
    }
}
