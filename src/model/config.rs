//! Where data comes from and goes to: URLs, pipeline files, FastGPT's env names.
//! Precedence: command-line flag > pipeline file > environment.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// FastGPT's own environment variables; a URL argument may name one of them.
pub const FASTGPT_ENV_NAMES: &[&str] = &["PG_URL", "OCEANBASE_URL", "SEEKDB_URL", "MILVUS_ADDRESS"];

#[derive(Clone, Debug)]
pub enum Endpoint {
    Postgres(PgUrl),
    OceanBase(ObUrl),
    Milvus(MilvusUrl),
    /// A staging area: a directory or an object-store address.
    Staging(String),
}

/// A PostgreSQL URL, kept for connecting without its TLS parameters (which
/// vmig applies itself); shown only through `redacted()`.
#[derive(Clone)]
pub struct PgUrl {
    url: String,
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
    pub tls: PgTls,
}

/// libpq's `sslmode`, with libpq's meanings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    /// Plain text only.
    Disable,
    /// Plain text first; TLS if the server refuses it.
    Allow,
    /// TLS if the server offers it, plain text otherwise; certificate not checked.
    Prefer,
    /// TLS or no connection; certificate not checked (unless a CA is given: verify-ca).
    Require,
    /// TLS; the certificate must chain to the CA.
    VerifyCa,
    /// TLS; the certificate must chain to the CA and name the host.
    VerifyFull,
}

impl SslMode {
    pub fn parse(s: &str) -> Result<SslMode> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => bail!("invalid sslmode {other:?} (disable, allow, prefer, require, verify-ca or verify-full)"),
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Where the trusted CA certificates come from (`sslrootcert`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootCert {
    /// A PEM file of one or more CA certificates.
    File(PathBuf),
    /// The operating system's trust store (`sslrootcert=system`).
    System,
}

/// A PostgreSQL connection's TLS settings: the URL's `sslmode`,
/// `sslrootcert`, `sslcert`, `sslkey`, else libpq's environment
/// (`PGSSLMODE`, …), else libpq's defaults (`prefer`; `~/.postgresql/root.crt`,
/// `postgresql.crt`, `postgresql.key` when those files exist).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgTls {
    pub mode: SslMode,
    pub root_cert: Option<RootCert>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

impl PgTls {
    /// `given`: the URL's TLS parameters by name; `env`: libpq's variables.
    fn resolve(given: &[(String, String)], env: impl Fn(&str) -> Option<String>) -> Result<PgTls> {
        let get = |param: &str, var: &str| {
            given.iter().rev().find(|(k, _)| k == param).map(|(_, v)| v.clone()).or_else(|| env(var)).filter(|v| !v.is_empty())
        };
        let home_file = |name: &str| {
            env("HOME").map(|h| Path::new(&h).join(".postgresql").join(name)).filter(|p| p.is_file())
        };
        let root_cert = match get("sslrootcert", "PGSSLROOTCERT") {
            Some(v) if v == "system" => Some(RootCert::System),
            Some(v) => Some(RootCert::File(PathBuf::from(v))),
            None => home_file("root.crt").map(RootCert::File),
        };
        let mode = match get("sslmode", "PGSSLMODE") {
            Some(m) => SslMode::parse(&m)?,
            // libpq: the system store is only meaningful with the host name checked.
            None if root_cert == Some(RootCert::System) => SslMode::VerifyFull,
            None => SslMode::Prefer,
        };
        if root_cert == Some(RootCert::System) && mode < SslMode::VerifyFull {
            bail!("sslrootcert=system needs sslmode=verify-full (got {}): a public CA vouches for many hosts, so only the host name check makes it mean something", mode.name());
        }
        let client_cert = get("sslcert", "PGSSLCERT").map(PathBuf::from).or_else(|| home_file("postgresql.crt"));
        let client_key = get("sslkey", "PGSSLKEY").map(PathBuf::from).or_else(|| home_file("postgresql.key"));
        Ok(PgTls { mode, root_cert, client_cert, client_key })
    }
}

/// The URL parameters vmig handles itself rather than tokio-postgres.
const PG_TLS_PARAMS: &[&str] = &["sslmode", "sslrootcert", "sslcert", "sslkey"];

impl std::fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl PgUrl {
    pub fn parse(raw: &str) -> Result<Self> {
        Self::parse_with_env(raw, |v| std::env::var(v).ok())
    }

    fn parse_with_env(raw: &str, env: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let mut u = url::Url::parse(raw).map_err(|e| anyhow::anyhow!("invalid PostgreSQL URL: {e}"))?;
        let decode = |s: &str| {
            percent_decode(s).with_context(|| "invalid percent-encoding in PostgreSQL URL".to_string())
        };
        let (tls_params, rest): (Vec<(String, String)>, Vec<(String, String)>) =
            u.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).partition(|(k, _)| PG_TLS_PARAMS.contains(&k.as_str()));
        let tls = PgTls::resolve(&tls_params, env)?;
        if rest.is_empty() {
            u.set_query(None);
        } else {
            u.query_pairs_mut().clear().extend_pairs(rest);
        }
        Ok(PgUrl {
            url: u.to_string(),
            host: u.host_str().unwrap_or("localhost").to_string(),
            port: u.port().unwrap_or(5432),
            database: decode(u.path().trim_start_matches('/'))
                .map(|d| if d.is_empty() { "postgres".to_string() } else { d })?,
            user: decode(u.username())?,
            tls,
        })
    }

    /// The URL for tokio-postgres: everything but the TLS parameters.
    pub fn connection_string(&self) -> &str {
        &self.url
    }

    /// The same database under another name (tests and `generate` use this).
    pub fn with_database(&self, db: &str) -> Result<PgUrl> {
        let mut u = url::Url::parse(&self.url)?;
        u.set_path(&format!("/{db}"));
        let mut other = PgUrl::parse_with_env(u.as_str(), |_| None)?;
        other.tls = self.tls.clone();
        Ok(other)
    }

    pub fn redacted(&self) -> String {
        format!("postgresql://{}@{}:{}/{}", self.user, self.host, self.port, self.database)
    }
}

/// How an OceanBase connection uses TLS (`?ssl-mode=`, with the MySQL
/// client's names and meanings).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsMode {
    Disabled,
    /// TLS if the server offers it, plain text otherwise (MySQL's default).
    Preferred,
    /// TLS or no connection; certificate not checked.
    Required,
    /// TLS; the certificate must chain to a trusted CA (refused at connect:
    /// the driver cannot check the chain without the host name).
    VerifyCa,
    /// TLS; the certificate must chain to a trusted CA and name the host.
    VerifyIdentity,
}

impl TlsMode {
    pub fn name(self) -> &'static str {
        match self {
            TlsMode::Disabled => "DISABLED",
            TlsMode::Preferred => "PREFERRED",
            TlsMode::Required => "REQUIRED",
            TlsMode::VerifyCa => "VERIFY_CA",
            TlsMode::VerifyIdentity => "VERIFY_IDENTITY",
        }
    }
}

/// An OceanBase / seekdb URL (`mysql://`, `oceanbase://`, `seekdb://`). The
/// user may carry a tenant (`root@tenant`, percent-encoded in the URL).
/// TLS: `ssl-mode`, `ssl-ca` (PEM CA file; else the public CAs), `ssl-cert`
/// and `ssl-key` (a client certificate), as the MySQL client names them.
#[derive(Clone)]
pub struct ObUrl {
    pub host: String,
    pub port: u16,
    pub user: String,
    password: String,
    pub database: String,
    pub tls: TlsMode,
    pub ssl_ca: Option<PathBuf>,
    pub ssl_cert: Option<PathBuf>,
    pub ssl_key: Option<PathBuf>,
}

impl std::fmt::Debug for ObUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl ObUrl {
    pub fn parse(raw: &str) -> Result<Self> {
        let u = url::Url::parse(raw).map_err(|e| anyhow::anyhow!("invalid OceanBase URL: {e}"))?;
        let decode =
            |s: &str| percent_decode(s).with_context(|| "invalid percent-encoding in OceanBase URL".to_string());
        let mut tls = TlsMode::Preferred;
        let (mut ssl_ca, mut ssl_cert, mut ssl_key) = (None, None, None);
        for (k, v) in u.query_pairs() {
            let key = k.to_ascii_lowercase().replace('_', "-");
            match (key.as_str(), v.to_ascii_lowercase().replace('-', "_").as_str()) {
                ("ssl-mode" | "sslmode", mode) => {
                    tls = match mode {
                        "disabled" | "disable" => TlsMode::Disabled,
                        "preferred" | "prefer" => TlsMode::Preferred,
                        "required" | "require" => TlsMode::Required,
                        "verify_ca" => TlsMode::VerifyCa,
                        "verify_identity" | "verify_full" => TlsMode::VerifyIdentity,
                        other => bail!("unsupported ssl-mode {other} (disabled, preferred, required, verify_ca, verify_identity)"),
                    }
                }
                ("tls" | "ssl", "true") => tls = TlsMode::Required,
                ("tls" | "ssl", "false") => tls = TlsMode::Disabled,
                ("ssl-ca", _) => ssl_ca = Some(PathBuf::from(v.as_ref())),
                ("ssl-cert", _) => ssl_cert = Some(PathBuf::from(v.as_ref())),
                ("ssl-key", _) => ssl_key = Some(PathBuf::from(v.as_ref())),
                (k, _) => bail!("unsupported OceanBase URL parameter {k} (supported: ssl-mode, ssl-ca, ssl-cert, ssl-key)"),
            }
        }
        if ssl_cert.is_some() != ssl_key.is_some() {
            bail!("ssl-cert and ssl-key go together (a client certificate and its key)");
        }
        let database = decode(u.path().trim_start_matches('/'))?;
        if database.is_empty() {
            bail!("OceanBase URL {} names no database (…:2881/DBNAME)", redact_free_text(raw));
        }
        Ok(ObUrl {
            host: u.host_str().unwrap_or("127.0.0.1").to_string(),
            port: u.port().unwrap_or(2881),
            user: decode(u.username()).map(|s| if s.is_empty() { "root".into() } else { s })?,
            password: decode(u.password().unwrap_or(""))?,
            database,
            tls,
            ssl_ca,
            ssl_cert,
            ssl_key,
        })
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// The same server, another database.
    pub fn with_database(&self, db: &str) -> ObUrl {
        ObUrl { database: db.to_string(), ..self.clone() }
    }

    pub fn redacted(&self) -> String {
        format!("mysql://{}@{}:{}/{}", self.user, self.host, self.port, self.database)
    }
}

/// One SQL column ↔ Milvus field pair. `epoch_ms`: the SQL side is a
/// TIMESTAMP and Milvus keeps it as Int64 epoch milliseconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldMap {
    pub column: String,
    pub field: String,
    #[serde(default)]
    pub epoch_ms: bool,
}

/// One table of a many-table job (pipeline file `tables`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableEntry {
    pub table: String,
    #[serde(default)]
    pub target_table: Option<String>,
    #[serde(default)]
    pub filter: Option<String>,
    #[serde(default)]
    pub team: Option<String>,
    #[serde(default)]
    pub dataset: Option<String>,
    #[serde(default)]
    pub collection: Option<String>,
    #[serde(default)]
    pub milvus_fields: Option<Vec<FieldMap>>,
}

/// FastGPT's modeldata: snake_case columns in SQL, camelCase fields in Milvus.
pub fn fastgpt_field_map() -> Vec<FieldMap> {
    let m = |c: &str, f: &str, epoch_ms| FieldMap { column: c.into(), field: f.into(), epoch_ms };
    vec![
        m("team_id", "teamId", false),
        m("dataset_id", "datasetId", false),
        m("collection_id", "collectionId", false),
        m("createtime", "createTime", true),
    ]
}

/// The database FastGPT keeps its collections in; used when a Milvus URL names none.
pub const MILVUS_DEFAULT_DATABASE: &str = "fastgpt";

/// A Milvus address: `http://host:19530[/db]`, `https://host[:443][/db]`
/// (TLS, as Zilliz Cloud gives its endpoints),
/// `milvus://[user:password@]host[:19530][/db][?tls=true]`; `ca=PATH` trusts
/// a private CA's PEM certificate besides the system's. The token comes
/// from the URL's user:password or from `MILVUS_TOKEN` (`none` = no token).
#[derive(Clone)]
pub struct MilvusUrl {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    /// A CA certificate (PEM file) trusted for TLS besides the system's.
    pub ca: Option<std::path::PathBuf>,
    pub database: String,
    token: Option<String>,
    /// Column ↔ field mapping (FastGPT's unless a pipeline file gives one).
    pub fields: Vec<FieldMap>,
}

impl std::fmt::Debug for MilvusUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl MilvusUrl {
    pub fn parse(raw: &str) -> Result<Self> {
        let u = url::Url::parse(raw).map_err(|e| anyhow::anyhow!("invalid Milvus address: {e}"))?;
        let decode = |s: &str| percent_decode(s).with_context(|| "invalid percent-encoding in Milvus address".to_string());
        let https = u.scheme() == "https";
        let mut tls = https;
        let mut ca = None;
        for (k, v) in u.query_pairs() {
            match (k.as_ref(), v.as_ref()) {
                ("tls" | "secure", "true" | "1") => tls = true,
                ("tls" | "secure", "false" | "0") => tls = false,
                ("ca" | "sslrootcert", path) => {
                    ca = Some(std::path::PathBuf::from(path));
                    tls = true;
                }
                (k, v) => bail!("unsupported Milvus address parameter {k}={v} (supported: tls=true|false, ca=PATH)"),
            }
        }
        let database = decode(u.path().trim_matches('/'))?;
        let user = decode(u.username())?;
        let token = match (user.is_empty(), u.password()) {
            (false, Some(p)) => Some(format!("{user}:{}", decode(p)?)),
            (false, None) => Some(user),
            (true, _) => std::env::var("MILVUS_TOKEN").ok().filter(|t| !t.is_empty() && t != "none"),
        };
        Ok(MilvusUrl {
            host: u.host_str().unwrap_or("127.0.0.1").to_string(),
            // Zilliz Cloud's endpoints are https:// URLs without a port.
            port: u.port().unwrap_or(if https { 443 } else { 19530 }),
            tls,
            ca,
            database: if database.is_empty() { MILVUS_DEFAULT_DATABASE.into() } else { database },
            token,
            fields: fastgpt_field_map(),
        })
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// What tonic dials.
    pub fn grpc_address(&self) -> String {
        format!("{}://{}:{}", if self.tls { "https" } else { "http" }, self.host, self.port)
    }

    /// The same server, another database.
    pub fn with_database(&self, db: &str) -> MilvusUrl {
        MilvusUrl { database: db.to_string(), ..self.clone() }
    }

    pub fn redacted(&self) -> String {
        let user = match self.token.as_deref().and_then(|t| t.split_once(':')) {
            Some((u, _)) => format!("{u}@"),
            None if self.token.is_some() => "(token)@".into(),
            None => String::new(),
        };
        format!("milvus://{user}{}:{}/{}{}", self.host, self.port, self.database, if self.tls { "?tls=true" } else { "" })
    }
}

fn percent_decode(s: &str) -> Result<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let h = std::str::from_utf8(&bytes[i + 1..i + 3])?;
            out.push(u8::from_str_radix(h, 16)?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(String::from_utf8(out)?)
}

impl Endpoint {
    /// Parses an endpoint argument: a URL, a FastGPT env name (`PG_URL`),
    /// `env:NAME` / `$NAME`, or for staging a directory.
    pub fn parse(arg: &str) -> Result<Endpoint> {
        let raw = resolve_env_reference(arg)?;
        let scheme = raw.split("://").next().unwrap_or("");
        match scheme {
            "postgres" | "postgresql" => Ok(Endpoint::Postgres(PgUrl::parse(&raw)?)),
            "mysql" | "oceanbase" | "seekdb" => Ok(Endpoint::OceanBase(ObUrl::parse(&raw)?)),
            "milvus" | "http" | "https" => Ok(Endpoint::Milvus(MilvusUrl::parse(&raw)?)),
            "staging" => Ok(Endpoint::Staging(raw.split_once("://").unwrap().1.to_string())),
            "file" | "s3" | "s3a" | "gs" | "az" | "azure" | "abfs" | "abfss" => Ok(Endpoint::Staging(raw.clone())),
            _ if !raw.contains("://") => bail!(
                "not a database URL: {:?} (expected postgresql://…, mysql://… or http://host:19530 for Milvus; use --staging DIR for staging directories)",
                redact_free_text(&raw)
            ),
            other => bail!("unsupported URL scheme {other}:// (supported: postgresql://, mysql:// | oceanbase:// | seekdb://, milvus:// | http:// | https://)"),
        }
    }

    /// Applies a pipeline file's column ↔ field mapping to a Milvus endpoint.
    pub fn with_milvus_fields(self, fields: Option<&Vec<FieldMap>>) -> Endpoint {
        match (self, fields) {
            (Endpoint::Milvus(mut u), Some(f)) => {
                u.fields = f.clone();
                Endpoint::Milvus(u)
            }
            (ep, _) => ep,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Endpoint::Postgres(u) => u.redacted(),
            Endpoint::OceanBase(u) => u.redacted(),
            Endpoint::Milvus(u) => u.redacted(),
            Endpoint::Staging(p) => format!("staging:{}", crate::model::config::redact(p)),
        }
    }
}

fn resolve_env_reference(arg: &str) -> Result<String> {
    let name = arg
        .strip_prefix("env:")
        .or_else(|| arg.strip_prefix('$'))
        .or_else(|| FASTGPT_ENV_NAMES.contains(&arg).then_some(arg));
    match name {
        Some(n) => std::env::var(n).with_context(|| format!("environment variable {n} is not set")),
        None => Ok(arg.to_string()),
    }
}

/// Whether `s` holds a `scheme://user:password@host` with a password, or a
/// Milvus address whose user is an API key (the command line warns: `ps`
/// shows it to every user of the host).
pub fn holds_url_password(s: &str) -> bool {
    let milvus_key = ["http://", "https://", "milvus://"].iter().any(|scheme| {
        s.find(scheme).is_some_and(|i| {
            let rest = &s[i + scheme.len()..];
            rest[..rest.find('/').unwrap_or(rest.len())].contains('@')
        })
    });
    redact_free_text(s) != s || milvus_key
}

/// Hides the password of every `scheme://user:password@host` in text we echo back.
pub fn redact_free_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("://") {
        out.push_str(&rest[..i + 3]);
        rest = &rest[i + 3..];
        let end = rest.find(|c: char| c == '/' || c.is_whitespace()).unwrap_or(rest.len());
        let authority = &rest[..end];
        match authority.rfind('@').and_then(|at| authority[..at].find(':').map(|colon| (colon, at))) {
            Some((colon, at)) => {
                out.push_str(&authority[..colon]);
                out.push_str(":***");
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Pipeline file: the same settings as the flags, in JSON. Values may be
/// `env:NAME` / `$NAME` / FastGPT env names, so files need not hold secrets.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    #[serde(default)]
    pub description: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub table: Option<String>,
    pub target_table: Option<String>,
    pub staging: Option<String>,
    /// Shared jobs: the store of manifest, claims and status (direct migrate).
    pub state: Option<String>,
    #[serde(default)]
    pub shared: Option<bool>,
    /// `I/N`: this worker's static partition of a shared job.
    pub shard: Option<String>,
    /// Shards when the index comes from the scheduler (JOB_COMPLETION_INDEX).
    pub shards: Option<u32>,
    /// Seconds before an unrenewed claim is taken over.
    pub lease: Option<u64>,
    pub job: Option<String>,
    pub workers: Option<usize>,
    pub chunk_rows: Option<u64>,
    pub batch_rows: Option<usize>,
    pub on_existing: Option<String>,
    pub max_rejects: Option<u64>,
    pub rate_limit: Option<u64>,
    pub retry_for: Option<u64>,
    pub report: Option<PathBuf>,
    /// Online: snapshot, then follow the source until cutover.
    #[serde(default)]
    pub online: Option<bool>,
    /// Prometheus metrics address while the job runs.
    pub metrics: Option<String>,
    /// Online from Milvus: seconds of createTime overlap per poll.
    pub watermark_margin: Option<u64>,
    /// Online from Milvus: seconds between id-set reconciles.
    pub reconcile_every: Option<u64>,
    /// SQL column ↔ Milvus field mapping (default: FastGPT's modeldata).
    pub milvus_fields: Option<Vec<FieldMap>>,
    /// A subset: `filter` (the --filter grammar) and FastGPT's `team`,
    /// `dataset`, `collection`.
    #[serde(default)]
    pub filter: Option<String>,
    #[serde(default)]
    pub team: Option<String>,
    #[serde(default)]
    pub dataset: Option<String>,
    #[serde(default)]
    pub collection: Option<String>,
    /// Several tables in one job (instead of `table`): each with its own
    /// target table, subset and field mapping; their chunks share the workers.
    #[serde(default)]
    pub tables: Option<Vec<TableEntry>>,
}

impl TableEntry {
    /// The subset this table's entry asks for, as the command line says it.
    pub fn subset(&self) -> crate::model::config::SubsetArgs {
        crate::model::config::SubsetArgs { filter: self.filter.clone(), team: self.team.clone(), dataset: self.dataset.clone(), collection: self.collection.clone() }
    }
}

impl PipelineFile {
    /// The subset the file asks for, as the command line says it.
    pub fn subset(&self) -> crate::model::config::SubsetArgs {
        crate::model::config::SubsetArgs { filter: self.filter.clone(), team: self.team.clone(), dataset: self.dataset.clone(), collection: self.collection.clone() }
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading pipeline file {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("pipeline file {} is not valid", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_password_everywhere() {
        let e = Endpoint::parse("postgresql://u%40t:s3cr%2Ft@db.example:5433/fast").unwrap();
        let d = e.describe();
        assert_eq!(d, "postgresql://u@t@db.example:5433/fast");
        assert!(!d.contains("s3cr"));
        assert!(!format!("{e:?}").contains("s3cr"));
        assert_eq!(redact_free_text("mysql://root:pw@h/db"), "mysql://root:***@h/db");
        assert_eq!(
            redact_free_text("cannot connect to mysql://u@h:1/db: denied for 'u'@'x' and postgresql://a:b:c@d"),
            "cannot connect to mysql://u@h:1/db: denied for 'u'@'x' and postgresql://a:***@d"
        );
    }

    #[test]
    fn postgres_tls_settings_follow_libpq() {
        let none = |_: &str| None;
        let u = PgUrl::parse_with_env("postgresql://u@h/db?sslmode=verify-full&sslrootcert=/ca.pem&application_name=x", none).unwrap();
        assert_eq!((u.tls.mode, u.tls.root_cert.clone()), (SslMode::VerifyFull, Some(RootCert::File("/ca.pem".into()))));
        assert_eq!(u.connection_string(), "postgresql://u@h/db?application_name=x");
        let d = PgUrl::parse_with_env("postgresql://u@h/db", none).unwrap();
        assert_eq!((d.tls.mode, d.connection_string()), (SslMode::Prefer, "postgresql://u@h/db"));
        let env = |v: &str| match v {
            "PGSSLMODE" => Some("require".to_string()),
            "PGSSLCERT" => Some("/c.crt".to_string()),
            "PGSSLKEY" => Some("/c.key".to_string()),
            _ => None,
        };
        let e = PgUrl::parse_with_env("postgresql://u@h/db", env).unwrap();
        assert_eq!((e.tls.mode, e.tls.client_cert.as_deref(), e.tls.client_key.as_deref()), (SslMode::Require, Some(Path::new("/c.crt")), Some(Path::new("/c.key"))));
        // The URL wins over the environment.
        assert_eq!(PgUrl::parse_with_env("postgresql://u@h/db?sslmode=disable", env).unwrap().tls.mode, SslMode::Disable);
        let s = PgUrl::parse_with_env("postgresql://u@h/db?sslrootcert=system", none).unwrap();
        assert_eq!(s.tls.mode, SslMode::VerifyFull);
        assert!(PgUrl::parse_with_env("postgresql://u@h/db?sslrootcert=system&sslmode=require", none).is_err());
        assert!(PgUrl::parse_with_env("postgresql://u@h/db?sslmode=verify", none).unwrap_err().to_string().contains("verify-full"));
        assert!(holds_url_password("--from=postgresql://u:pw@h/db") && !holds_url_password("postgresql://u@h/db"));
        assert!(holds_url_password("https://APIKEY@cloud.example/db") && !holds_url_password("http://milvus:19530/fastgpt"));
    }

    #[test]
    fn env_names_resolve() {
        unsafe { std::env::set_var("VMIG_TEST_CFG_URL", "postgresql://a:b@h/d") };
        assert!(matches!(Endpoint::parse("env:VMIG_TEST_CFG_URL").unwrap(), Endpoint::Postgres(_)));
        assert!(Endpoint::parse("env:VMIG_NOT_SET_ANYWHERE").is_err());
        assert!(Endpoint::parse("redis://x@h/db").unwrap_err().to_string().contains("unsupported"));
    }

    #[test]
    fn example_pipeline_files_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let f = PipelineFile::load(&p).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
            assert!(f.description.is_some(), "{} explains itself", p.display());
            let parse = |s: crate::model::config::SubsetArgs| s.filter().unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
            parse(f.subset());
            for t in f.tables.iter().flatten() {
                parse(t.subset());
            }
            n += 1;
        }
        assert!(n >= 8);
    }

    #[test]
    fn milvus_addresses_as_fastgpt_writes_them() {
        let Endpoint::Milvus(u) = Endpoint::parse("http://milvus.example:19530").unwrap() else { panic!("not Milvus") };
        assert_eq!((u.host.as_str(), u.port, u.database.as_str(), u.tls), ("milvus.example", 19530, "fastgpt", false));
        assert_eq!(u.grpc_address(), "http://milvus.example:19530");
        let Endpoint::Milvus(t) = Endpoint::parse("milvus://root:Mil%40vus@h/kb?tls=true").unwrap() else { panic!() };
        assert_eq!((t.port, t.database.as_str(), t.tls, t.token()), (19530, "kb", true, Some("root:Mil@vus")));
        assert_eq!(t.redacted(), "milvus://root@h:19530/kb?tls=true");
        assert!(!format!("{t:?}").contains("Mil@vus"));
        let Endpoint::Milvus(k) = Endpoint::parse("https://APIKEY123@cloud.example/default").unwrap() else { panic!() };
        assert_eq!((k.tls, k.token(), k.redacted().contains("APIKEY")), (true, Some("APIKEY123"), false));
        // Zilliz Cloud endpoints come without a port; a private CA is named by ca=.
        assert_eq!((k.port, k.grpc_address()), (443, "https://cloud.example:443".to_string()));
        let Endpoint::Milvus(c) = Endpoint::parse("milvus://h:19530/kb?ca=/etc/ca.pem").unwrap() else { panic!() };
        assert_eq!((c.tls, c.ca.as_deref()), (true, Some(std::path::Path::new("/etc/ca.pem"))));
        assert_eq!(fastgpt_field_map()[3], FieldMap { column: "createtime".into(), field: "createTime".into(), epoch_ms: true });
    }

    #[test]
    fn oceanbase_urls_as_fastgpt_writes_them() {
        let Endpoint::OceanBase(u) = Endpoint::parse("mysql://root%40tenant:p%40ss@db.example:2881/fastgpt").unwrap() else {
            panic!("not an OceanBase URL")
        };
        assert_eq!((u.user.as_str(), u.password(), u.port, u.database.as_str()), ("root@tenant", "p@ss", 2881, "fastgpt"));
        assert_eq!(u.tls, TlsMode::Preferred);
        assert!(!format!("{u:?}").contains("p@ss"));
        let Endpoint::OceanBase(s) = Endpoint::parse("seekdb://root@127.0.0.1/test?ssl-mode=required").unwrap() else {
            panic!("seekdb:// is an alias")
        };
        assert_eq!((s.port, s.password(), s.tls), (2881, "", TlsMode::Required));
        assert!(Endpoint::parse("oceanbase://root@h:2881/").unwrap_err().to_string().contains("names no database"));
    }
}

/// The address without any userinfo or query (where credentials could hide).
pub fn redact(addr: &str) -> String {
    match url::Url::parse(addr) {
        Ok(mut u) if is_url(addr) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.to_string()
        }
        _ => addr.to_string(),
    }
}

/// Which rows a job, verify or repair is about (default: all).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SubsetArgs {
    /// Only rows matching EXPR: column = 'value', column IN ('a', 'b'),
    /// terms joined by AND (integers unquoted). Values are bound or escaped,
    /// never spliced; Milvus gets the mapped field names.
    #[arg(long, value_name = "EXPR")]
    pub filter: Option<String>,
    /// FastGPT: only this team's rows (team_id = ID), ANDed with --filter.
    #[arg(long, value_name = "ID")]
    pub team: Option<String>,
    /// FastGPT: only this knowledge base's rows (dataset_id = ID).
    #[arg(long, value_name = "ID")]
    pub dataset: Option<String>,
    /// FastGPT: only this collection's rows (collection_id = ID).
    #[arg(long, value_name = "ID")]
    pub collection: Option<String>,
}

impl SubsetArgs {
    /// The filter these flags ask for, None for every row.
    pub fn filter(&self) -> anyhow::Result<Option<crate::model::filter::Filter>> {
        let explicit = self.filter.as_deref().map(crate::model::filter::Filter::parse).transpose()?;
        Ok(crate::model::filter::Filter::with_fastgpt(explicit, self.team.as_deref(), self.dataset.as_deref(), self.collection.as_deref()))
    }

    /// Flags over the pipeline file's settings.
    pub fn or(self, file: SubsetArgs) -> SubsetArgs {
        SubsetArgs {
            filter: self.filter.or(file.filter),
            team: self.team.or(file.team),
            dataset: self.dataset.or(file.dataset),
            collection: self.collection.or(file.collection),
        }
    }
}

pub fn is_url(s: &str) -> bool {
    s.split_once("://").is_some_and(|(scheme, _)| scheme.chars().all(|c| c.is_ascii_alphanumeric()) && scheme.len() > 1)
}
