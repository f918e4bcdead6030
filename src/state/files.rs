//! Durable local files: atomic writes and JSON state files.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use anyhow::{Context, Result};

/// Writes `bytes` to `path` atomically: temp file, fsync, rename, fsync dir.
/// The temp file is the writer's own (process and call): two threads saving
/// the same file (a job's status) must not write into one temp file, where
/// the longer document's tail would outlive the shorter one's end.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let tmp = path.with_extension(format!(
        "{}.{}-{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or(""),
        std::process::id(),
        WRITES.fetch_add(1, Relaxed)
    ));
    {
        let mut f = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync of directory {}", dir.display()))
}

pub fn load_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| format!("{} is damaged", path.display()))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    /// Two threads saving one file (a job's status: its reporter and its
    /// follow loop) leave one whole document, never one's tail after the other.
    #[test]
    fn concurrent_atomic_writes_leave_one_whole_document() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.json");
        let (short, long) = (b"{\"a\":1}".to_vec(), format!("{{\"a\":\"{}\"}}", "x".repeat(4000)).into_bytes());
        std::thread::scope(|s| {
            for doc in [&short, &long] {
                let path = &path;
                s.spawn(move || {
                    for _ in 0..200 {
                        write_atomic(path, doc).unwrap();
                    }
                });
            }
            s.spawn(|| {
                for _ in 0..400 {
                    if let Ok(got) = fs::read(&path) {
                        assert!(got == short || got == long, "a torn document: {} bytes", got.len());
                    }
                }
            });
        });
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 1, "temp files left: {left:?}");
    }
}
