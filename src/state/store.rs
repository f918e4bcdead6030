//! Where a job's files live: a local directory or object storage (S3 and
//! S3-compatible stores, Google Cloud Storage, Azure Blob) through Apache
//! Arrow's `object_store`. Staging chunks, commit markers, the manifest,
//! claims and worker status all go through this one interface, so a staging
//! area is the same layout wherever it is.
//!
//! Credentials come from each cloud's standard environment (`AWS_*`,
//! `GOOGLE_*`, `AZURE_*`); they never appear in `describe()` or in errors.

use crate::model::config::{is_url, redact};
use crate::state::files::{sync_dir, write_atomic};
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use futures_util::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, UpdateVersion, WriteMultipart};
use sha2::{Digest, Sha256};

/// Multipart part size for chunk uploads (S3's minimum is 5 MiB).
const PART_BYTES: usize = 8 << 20;
/// Parts in flight per upload.
const PARTS_IN_FLIGHT: usize = 4;

/// A staging or state store: a root under which keys like
/// `chunks/000017.parquet` live.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    root: ObjPath,
    /// The address as the user gave it, without credentials.
    shown: String,
    /// Set for a local directory: files are written and read in place.
    local: Option<PathBuf>,
    rt: &'static tokio::runtime::Runtime,
}

/// An object's content and the version a conditional replace needs.
pub struct Object {
    pub bytes: Bytes,
    pub version: UpdateVersion,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

/// True for `s3://`, `gs://`, `az://`, `file://` … addresses (not plain paths).
/// The version of a write to a store without versions (a local directory, a
/// server that returned no ETag): `replace` then just writes.
const UNVERSIONED: UpdateVersion = UpdateVersion { e_tag: None, version: None };

impl Store {
    /// Opens `addr`: a directory path, `file:///dir`, `s3://bucket/prefix`,
    /// `gs://bucket/prefix` or `az://container/prefix`. Nothing is created
    /// or contacted yet.
    pub fn open(addr: &str) -> Result<Store> {
        let rt = runtime();
        if !is_url(addr) || addr.starts_with("file://") {
            let dir = PathBuf::from(addr.strip_prefix("file://").unwrap_or(addr));
            return Ok(Store {
                inner: Arc::new(object_store::local::LocalFileSystem::new()),
                root: ObjPath::default(),
                shown: dir.display().to_string(),
                local: Some(dir),
                rt,
            });
        }
        let url = url::Url::parse(addr).map_err(|e| anyhow!("not a storage address: {}: {e}", redact(addr)))?;
        if !url.username().is_empty() || url.password().is_some() || url.query().is_some() {
            bail!(
                "{}: put no credentials in the address; vmig reads them from the environment (AWS_ACCESS_KEY_ID …)",
                redact(addr)
            );
        }
        let bucket = url.host_str().unwrap_or_default().to_string();
        let prefix = url.path().trim_matches('/').to_string();
        let inner: Arc<dyn ObjectStore> = match url.scheme() {
            "s3" | "s3a" => {
                let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(&bucket);
                let endpoint = std::env::var("AWS_ENDPOINT_URL").or_else(|_| std::env::var("AWS_ENDPOINT")).unwrap_or_default();
                if endpoint.starts_with("http://") {
                    b = b.with_allow_http(true);
                }
                if !endpoint.is_empty() && std::env::var("AWS_VIRTUAL_HOSTED_STYLE_REQUEST").is_err() {
                    // S3-compatible servers (MinIO, Ceph, moto …) address buckets by path.
                    b = b.with_virtual_hosted_style_request(false);
                }
                Arc::new(b.build().map_err(|e| anyhow!("{}: {}", redact(addr), clean(&e.to_string())))?)
            }
            "gs" => Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(&bucket)
                    .build()
                    .map_err(|e| anyhow!("{}: {}", redact(addr), clean(&e.to_string())))?,
            ),
            "az" | "azure" | "abfs" | "abfss" => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_container_name(&bucket)
                    .build()
                    .map_err(|e| anyhow!("{}: {}", redact(addr), clean(&e.to_string())))?,
            ),
            other => bail!("{}: unknown storage scheme {other}:// (s3://, gs://, az://, file:// or a directory)", redact(addr)),
        };
        Ok(Store { inner, root: ObjPath::from(prefix.as_str()), shown: redact(addr), local: None, rt })
    }

    /// The address without credentials, for messages and manifests.
    pub fn describe(&self) -> &str {
        &self.shown
    }

    /// The local directory, when the store is one.
    pub fn local_dir(&self) -> Option<&Path> {
        self.local.as_deref()
    }

    pub fn is_remote(&self) -> bool {
        self.local.is_none()
    }

    /// A store rooted at `sub` under this one.
    pub fn sub(&self, sub: &str) -> Store {
        let mut s = self.clone();
        match &mut s.local {
            Some(d) => *d = d.join(sub),
            None => s.root = self.key(sub),
        }
        s.shown = format!("{}/{sub}", self.shown.trim_end_matches('/'));
        s
    }

    fn key(&self, key: &str) -> ObjPath {
        match &self.local {
            Some(d) => ObjPath::from_absolute_path(abs(&d.join(key))).expect("a local path"),
            None => key.split('/').filter(|p| !p.is_empty()).fold(self.root.clone(), |p, part| p.clone().join(part)),
        }
    }

    fn block<T>(&self, f: impl Future<Output = T>) -> T {
        self.rt.block_on(f)
    }

    fn err(&self, what: &str, key: &str, e: object_store::Error) -> anyhow::Error {
        anyhow!("{what} {}/{key}: {}", self.shown.trim_end_matches('/'), explain(&e.to_string()))
    }

    /// Checks that the store answers (bucket exists, credentials accepted):
    /// one line if not.
    pub fn check_reachable(&self) -> Result<()> {
        if let Some(d) = &self.local {
            return fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()));
        }
        let prefix = self.root.clone();
        let r = self.block(async { self.inner.list_with_delimiter(Some(&prefix)).await });
        r.map(|_| ()).map_err(|e| anyhow!("cannot use {}: {}", self.shown, explain(&e.to_string())))
    }

    pub fn get(&self, key: &str) -> Result<Option<Object>> {
        if let Some(d) = &self.local {
            return match fs::read(d.join(key)) {
                Ok(b) => Ok(Some(Object { bytes: b.into(), version: UpdateVersion { e_tag: None, version: None } })),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e).with_context(|| format!("reading {}", d.join(key).display())),
            };
        }
        let path = self.key(key);
        let r = self.block(async {
            let g = self.inner.get(&path).await?;
            let version = UpdateVersion { e_tag: g.meta.e_tag.clone(), version: g.meta.version.clone() };
            Ok::<_, object_store::Error>(Object { bytes: g.bytes().await?, version })
        });
        match r {
            Ok(o) => Ok(Some(o)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("reading", key, e)),
        }
    }

    pub fn exists(&self, key: &str) -> Result<bool> {
        if let Some(d) = &self.local {
            return Ok(d.join(key).exists());
        }
        let path = self.key(key);
        match self.block(async { self.inner.head(&path).await }) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.err("checking", key, e)),
        }
    }

    /// Writes `bytes` under `key`, replacing what is there (atomically).
    pub fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
        if let Some(d) = &self.local {
            let path = d.join(key);
            if let Some(p) = path.parent() {
                fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
            }
            return write_atomic(&path, bytes);
        }
        let path = self.key(key);
        let payload = Bytes::copy_from_slice(bytes);
        self.block(async { self.inner.put(&path, payload.into()).await }).map_err(|e| self.err("writing", key, e))?;
        Ok(())
    }

    /// Writes `bytes` under `key` only if nothing is there; false if
    /// something is (another worker was first).
    pub fn create(&self, key: &str, bytes: &[u8]) -> Result<bool> {
        Ok(self.create_versioned(key, bytes)?.is_some())
    }

    /// `create`, returning the version written (for a later `replace`).
    pub fn create_versioned(&self, key: &str, bytes: &[u8]) -> Result<Option<UpdateVersion>> {
        if let Some(d) = &self.local {
            let path = d.join(key);
            if let Some(p) = path.parent() {
                fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
            }
            // Written aside, then hard-linked: link fails if the name exists.
            let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
            {
                let mut f = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
                f.write_all(bytes)?;
                f.sync_all()?;
            }
            let linked = fs::hard_link(&tmp, &path);
            let _ = fs::remove_file(&tmp);
            return match linked {
                Ok(()) => {
                    sync_dir(path.parent().unwrap())?;
                    Ok(Some(UNVERSIONED))
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(None),
                Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
            };
        }
        let path = self.key(key);
        let payload = Bytes::copy_from_slice(bytes);
        let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.block(async { self.inner.put_opts(&path, payload.into(), opts).await }) {
            Ok(r) => Ok(Some(UpdateVersion { e_tag: r.e_tag, version: r.version })),
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => Ok(None),
            Err(e) => Err(self.err("creating", key, e)),
        }
    }

    /// Replaces `key` only if it is still at `version` (compare and swap);
    /// false if someone changed it since. A local directory has no versions:
    /// the write just happens (claims only need to be mostly right; the
    /// ledger makes a chunk done twice harmless). Returns the new version,
    /// None if refused.
    pub fn replace(&self, key: &str, bytes: &[u8], version: &UpdateVersion) -> Result<Option<UpdateVersion>> {
        if self.local.is_some() || (version.e_tag.is_none() && version.version.is_none()) {
            self.put(key, bytes)?;
            return Ok(Some(UNVERSIONED));
        }
        let path = self.key(key);
        let payload = Bytes::copy_from_slice(bytes);
        let opts = PutOptions { mode: PutMode::Update(version.clone()), ..Default::default() };
        match self.block(async { self.inner.put_opts(&path, payload.into(), opts).await }) {
            Ok(r) => Ok(Some(UpdateVersion { e_tag: r.e_tag, version: r.version })),
            Err(object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("replacing", key, e)),
        }
    }

    pub fn delete(&self, key: &str) -> Result<()> {
        if let Some(d) = &self.local {
            return match fs::remove_file(d.join(key)) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e).with_context(|| format!("removing {}", d.join(key).display())),
            };
        }
        let path = self.key(key);
        match self.block(async { self.inner.delete(&path).await }) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("deleting", key, e)),
        }
    }

    /// Keys under `prefix` (a folder: `chunks`), relative to it, with sizes,
    /// in key order. Recursive.
    pub fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        if let Some(d) = &self.local {
            let base = d.join(prefix);
            list_local(&base, &base, &mut out)?;
        } else {
            let path = self.key(prefix);
            let strip = format!("{}/", path.as_ref());
            let metas: Vec<_> = self.block(async { self.inner.list(Some(&path)).collect::<Vec<_>>().await });
            for m in metas {
                let m = m.map_err(|e| self.err("listing", prefix, e))?;
                let loc = m.location.as_ref();
                out.push((loc.strip_prefix(&strip).unwrap_or(loc).to_string(), m.size));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Deletes every key under `prefix`; returns how many.
    pub fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        if let Some(d) = &self.local {
            let p = d.join(prefix);
            let n = self.list(prefix)?.len() as u64;
            return match fs::remove_dir_all(&p) {
                Ok(()) => Ok(n),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
                Err(e) => Err(e).with_context(|| format!("removing {}", p.display())),
            };
        }
        let keys = self.list(prefix)?;
        for (k, _) in &keys {
            self.delete(&format!("{prefix}/{k}"))?;
        }
        Ok(keys.len() as u64)
    }

    /// A writer for a large object (a chunk file): local files are written
    /// aside and renamed; remote ones go up as a multipart upload.
    pub fn writer(&self, key: &str) -> Result<StoreWriter> {
        let (sink, tmp) = match &self.local {
            Some(d) => {
                let dest = d.join(key);
                if let Some(p) = dest.parent() {
                    fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
                }
                let tmp = dest.with_extension(format!(
                    "{}.tmp",
                    dest.extension().and_then(|e| e.to_str()).unwrap_or("")
                ));
                let f = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
                (WriterSink::File(f), Some((tmp, dest)))
            }
            None => {
                let path = self.key(key);
                let upload = self
                    .block(async { self.inner.put_multipart(&path).await })
                    .map_err(|e| self.err("starting upload of", key, e))?;
                (WriterSink::Upload(Some(WriteMultipart::new_with_chunk_size(upload, PART_BYTES))), None)
            }
        };
        Ok(StoreWriter { store: self.clone(), key: key.to_string(), sink, tmp, sha: Sha256::new(), bytes: 0 })
    }

    /// Opens `key` for reading after checking its size and sha256 against
    /// what its commit marker says (`name` names it in errors). A remote
    /// object is downloaded to a temporary file first, hashed on the way.
    pub fn open_verified(&self, key: &str, name: &str, bytes: u64, sha256: Option<&str>) -> Result<fs::File> {
        let mut h = Sha256::new();
        let mut len = 0u64;
        let mut file = if let Some(d) = &self.local {
            let path = d.join(key);
            let mut f = fs::File::open(&path).map_err(|e| anyhow!("{name}: cannot open {}: {e}", path.display()))?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                len += n as u64;
                h.update(&buf[..n]);
            }
            f
        } else {
            let path = self.key(key);
            let mut tmp = tempfile::tempfile().context("creating a temporary file for a download")?;
            let r: Result<(), object_store::Error> = self.block(async {
                let mut stream = self.inner.get(&path).await?.into_stream();
                while let Some(part) = stream.next().await {
                    let part = part?;
                    len += part.len() as u64;
                    h.update(&part);
                    tmp.write_all(&part).map_err(|e| object_store::Error::Generic { store: "download", source: Box::new(e) })?;
                }
                Ok(())
            });
            match r {
                Ok(()) => {}
                Err(object_store::Error::NotFound { .. }) => bail!("{name}: {}/{key} is missing", self.shown),
                Err(e) => return Err(self.err("downloading", key, e)),
            }
            tmp
        };
        if len != bytes {
            bail!("{name}: file is {len} bytes, its commit marker says {bytes} (truncated or altered); refusing it");
        }
        if Some(hex::encode(h.finalize()).as_str()) != sha256 {
            bail!("{name}: sha256 of the file does not match its commit marker (file altered or damaged); refusing it");
        }
        use std::io::Seek;
        file.seek(io::SeekFrom::Start(0))?;
        Ok(file)
    }

    /// Uploads a local file under `key` (rejects files made on a worker).
    pub fn upload_file(&self, local: &Path, key: &str) -> Result<()> {
        if self.local.is_some() {
            return Ok(());
        }
        let mut w = self.writer(key)?;
        io::copy(&mut fs::File::open(local)?, &mut w)?;
        w.finish()?;
        Ok(())
    }
}

/// One runtime for every store of the process, never dropped (a runtime
/// dropped inside another's thread panics).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vmig-store")
            .enable_all()
            .build()
            .expect("starting the storage runtime")
    })
}

fn abs(p: &Path) -> PathBuf {
    if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir().unwrap_or_default().join(p) }
}

fn list_local(base: &Path, dir: &Path, out: &mut Vec<(String, u64)>) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    for e in entries {
        let e = e?;
        let path = e.path();
        if e.file_type()?.is_dir() {
            list_local(base, &path, out)?;
        } else {
            let rel = path.strip_prefix(base).unwrap_or(&path).to_string_lossy().to_string();
            out.push((rel, e.metadata()?.len()));
        }
    }
    Ok(())
}

/// One line saying why a store refused, without the XML body, request ids
/// or signed URLs of object_store's message.
fn explain(msg: &str) -> String {
    let code = msg.split("<Code>").nth(1).and_then(|t| t.split("</Code>").next()).unwrap_or("");
    let reason = match code {
        "NoSuchBucket" => "the bucket does not exist".to_string(),
        "InvalidAccessKeyId" => "the access key was refused (InvalidAccessKeyId); check AWS_ACCESS_KEY_ID".to_string(),
        "SignatureDoesNotMatch" => "the credentials were refused (SignatureDoesNotMatch); check AWS_SECRET_ACCESS_KEY".to_string(),
        "AccessDenied" => "access denied (the credentials lack permission on this bucket or prefix)".to_string(),
        "" if msg.contains("error sending request") || msg.contains("Connection refused") => {
            "the store did not answer (unreachable endpoint? check AWS_ENDPOINT_URL)".to_string()
        }
        "" => clean(msg).chars().take(300).collect(),
        other => format!("the store answered {other}"),
    };
    let endpoint = msg
        .split_whitespace()
        .find(|w| w.starts_with("http://") || w.starts_with("https://"))
        .and_then(|u| url::Url::parse(u).ok())
        .map(|u| format!(" [{}]", &u[..url::Position::BeforePath]));
    format!("{reason}{}", endpoint.unwrap_or_default())
}

/// object_store's messages can quote request URLs with signatures; keep the
/// first line and drop query strings.
fn clean(msg: &str) -> String {
    let mut out = String::new();
    for word in msg.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        match word.split_once('?') {
            Some((a, _)) if a.contains("://") => out.push_str(a),
            _ => out.push_str(word),
        }
    }
    for secret in ["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_STORAGE_ACCOUNT_KEY", "AWS_ACCESS_KEY_ID"] {
        if let Ok(v) = std::env::var(secret) {
            if v.len() >= 4 {
                out = out.replace(&v, "***");
            }
        }
    }
    out
}

enum WriterSink {
    File(fs::File),
    Upload(Option<WriteMultipart>),
}

/// Hashes and counts what passes through; `finish` makes the object appear
/// under its name (rename or multipart completion) and returns (bytes, sha256).
pub struct StoreWriter {
    store: Store,
    key: String,
    sink: WriterSink,
    tmp: Option<(PathBuf, PathBuf)>,
    sha: Sha256,
    bytes: u64,
}

impl Write for StoreWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.sink {
            WriterSink::File(f) => {
                let n = f.write(buf)?;
                self.sha.update(&buf[..n]);
                self.bytes += n as u64;
                Ok(n)
            }
            WriterSink::Upload(up) => {
                let up = up.as_mut().expect("writer used after finish");
                let _guard = self.store.rt.enter();
                up.write(buf);
                self.store
                    .rt
                    .block_on(up.wait_for_capacity(PARTS_IN_FLIGHT))
                    .map_err(|e| io::Error::other(clean(&e.to_string())))?;
                self.sha.update(buf);
                self.bytes += buf.len() as u64;
                Ok(buf.len())
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.sink {
            WriterSink::File(f) => f.flush(),
            WriterSink::Upload(_) => Ok(()),
        }
    }
}

impl StoreWriter {
    pub fn finish(mut self) -> Result<(u64, String)> {
        match &mut self.sink {
            WriterSink::File(f) => {
                f.flush()?;
                f.sync_all()?;
                let (tmp, dest) = self.tmp.take().unwrap();
                fs::rename(&tmp, &dest)?;
                sync_dir(dest.parent().unwrap())?;
            }
            WriterSink::Upload(up) => {
                let up = up.take().unwrap();
                let _guard = self.store.rt.enter();
                self.store.rt.block_on(up.finish()).map_err(|e| self.store.err("uploading", &self.key, e))?;
            }
        }
        Ok((self.bytes, hex::encode(self.sha.clone().finalize())))
    }
}

impl Drop for StoreWriter {
    fn drop(&mut self) {
        // An unfinished upload is aborted, an unfinished local file removed.
        if let WriterSink::Upload(up) = &mut self.sink {
            if let Some(up) = up.take() {
                let _guard = self.store.rt.enter();
                let _ = self.store.rt.block_on(up.abort());
            }
        }
        if let Some((tmp, _)) = &self.tmp {
            let _ = fs::remove_file(tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_create_is_create_only_and_writers_appear_only_when_finished() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_str().unwrap()).unwrap();
        assert!(store.create("work/x/claims/a.json", b"1").unwrap());
        assert!(!store.create("work/x/claims/a.json", b"2").unwrap());
        assert_eq!(&store.get("work/x/claims/a.json").unwrap().unwrap().bytes[..], b"1");
        let mut w = store.writer("chunks/000001.parquet").unwrap();
        w.write_all(b"hello").unwrap();
        assert!(!store.exists("chunks/000001.parquet").unwrap(), "not visible before finish");
        let (n, sha) = w.finish().unwrap();
        assert_eq!(n, 5);
        assert!(store.open_verified("chunks/000001.parquet", "chunk 1", 5, Some(&sha)).is_ok());
        let err = store.open_verified("chunks/000001.parquet", "chunk 1", 5, Some("00")).unwrap_err().to_string();
        assert!(err.contains("refusing it"), "{err}");
        let keys: Vec<String> = store.list("work").unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec!["x/claims/a.json".to_string()]);
        assert_eq!(store.delete_prefix("work").unwrap(), 1);
    }

    #[test]
    fn addresses_never_carry_credentials() {
        assert!(Store::open("s3://AKIA:secret@bucket/p").unwrap_err().to_string().contains("no credentials"));
        assert!(!redact("s3://AKIA:secret@bucket/p?x=1").contains("secret"));
        assert_eq!(
            explain("Error performing PUT http://127.0.0.1:9/b/k?X-Amz-Signature=abc - <Error><Code>NoSuchBucket</Code></Error>"),
            "the bucket does not exist [http://127.0.0.1:9]"
        );
    }
}
