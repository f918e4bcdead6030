//! How vmig reaches a PostgreSQL server, for every session it opens (data,
//! index builders, and the replication protocol it speaks itself): TLS with
//! libpq's `sslmode` meanings through rustls, and the password from the URL,
//! else `PGPASSWORD`, else the password file (`PGPASSFILE` or `~/.pgpass`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::Client;

use crate::model::config::{PgTls, PgUrl, RootCert, SslMode};

/// One way of opening a session; `allow` tries two, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    Plain,
    /// TLS if the server offers it, plain text if it does not.
    TlsIfOffered,
    TlsOnly,
}

pub fn attempts(mode: SslMode) -> &'static [Attempt] {
    match mode {
        SslMode::Disable => &[Attempt::Plain],
        SslMode::Allow => &[Attempt::Plain, Attempt::TlsOnly],
        SslMode::Prefer => &[Attempt::TlsIfOffered],
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => &[Attempt::TlsOnly],
    }
}

/// The tokio-postgres settings of `url`, the password filled in from
/// `PGPASSWORD` or the password file when the URL has none.
pub fn session_config(url: &PgUrl) -> Result<tokio_postgres::Config> {
    let mut config: tokio_postgres::Config =
        url.connection_string().parse().map_err(|e| anyhow!("invalid PostgreSQL URL {}: {e}", url.redacted()))?;
    if config.get_password().is_none()
        && let Some(p) = password_from_environment(url)
    {
        config.password(p);
    }
    Ok(config)
}

/// Opens a session with `application_name` set, so the server (and a later
/// run) can tell which job a session belongs to.
pub async fn connect_as(url: &PgUrl, application_name: Option<&str>) -> Result<Client> {
    let mut config = session_config(url)?;
    if let Some(name) = application_name {
        config.application_name(name);
    }
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(client_config(&url.tls)?.as_ref().clone());
    let mut last = None;
    for attempt in attempts(url.tls.mode) {
        config.ssl_mode(match attempt {
            Attempt::Plain => tokio_postgres::config::SslMode::Disable,
            Attempt::TlsIfOffered => tokio_postgres::config::SslMode::Prefer,
            Attempt::TlsOnly => tokio_postgres::config::SslMode::Require,
        });
        match config.connect(tls.clone()).await {
            Ok((client, conn)) => {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                return Ok(client);
            }
            Err(e) => last = Some(e),
        }
    }
    let e = last.expect("every sslmode makes at least one attempt");
    bail!("cannot connect to {}: {}", url.redacted(), failure_text(&e, url))
}

/// The one line that says why a session could not be opened: TLS failures
/// in words (no TLS offered, untrusted or wrong-host certificate), else the
/// server's own message.
pub fn failure_text(e: &(dyn std::error::Error + 'static), url: &PgUrl) -> String {
    if let Some(t) = tls_failure(e, url) {
        return t;
    }
    if let Some(db) = e.downcast_ref::<tokio_postgres::Error>().and_then(|e| e.as_db_error()) {
        return db.message().to_string();
    }
    let text = crate::contract::error_chain(e);
    // TLS 1.3 servers check a client certificate after the client's side of
    // the handshake is done, so a missing one shows as the connection dropped.
    if url.tls.mode >= SslMode::Require && url.tls.client_cert.is_none() && connection_dropped(e) {
        return format!("{text} (the server closed the TLS session: if it requires a client certificate, give sslcert and sslkey)");
    }
    text
}

fn connection_dropped(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(io.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::BrokenPipe)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

fn tls_failure(e: &(dyn std::error::Error + 'static), url: &PgUrl) -> Option<String> {
    if crate::contract::error_chain(e).contains("server does not support TLS") {
        return Some(format!("the server offers no TLS, and sslmode={} does not allow plain text", url.tls.mode.name()));
    }
    let trusted = match &url.tls.root_cert {
        Some(RootCert::System) => "the system's trusted CAs".to_string(),
        Some(RootCert::File(p)) => format!("the CA in sslrootcert ({})", p.display()),
        None => "a trusted CA".to_string(),
    };
    crate::contract::tls_failure_text(e, &url.host, &trusted).map(|t| format!("{t} (sslmode={})", url.tls.mode.name()))
}

/// The rustls settings of one connection's `sslmode`.
pub fn client_config(tls: &PgTls) -> Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    // libpq: `require` with a CA at hand checks the chain like verify-ca.
    let checks = match (tls.mode, &tls.root_cert) {
        (SslMode::VerifyFull, Some(_)) => Checks::ChainAndName,
        (SslMode::VerifyCa, Some(_)) | (SslMode::Require, Some(_)) => Checks::Chain,
        (SslMode::VerifyFull | SslMode::VerifyCa, None) => bail!(
            "sslmode={} needs the CA that signed the server's certificate: add sslrootcert=FILE (a PEM file), or sslrootcert=system for a public CA",
            tls.mode.name()
        ),
        _ => Checks::None,
    };
    let builder = match checks {
        Checks::None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider.signature_verification_algorithms))),
        Checks::Chain | Checks::ChainAndName => {
            let roots = Arc::new(trusted_roots(tls.root_cert.as_ref().expect("checked above"))?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .context("building the certificate verifier")?;
            if checks == Checks::Chain {
                builder.dangerous().with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
            } else {
                builder.with_webpki_verifier(webpki)
            }
        }
    };
    let config = match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| anyhow!("the client certificate (sslcert) cannot be read: {e}"))?;
            // The key's path and contents stay out of every message.
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| anyhow!("the client key (sslkey) cannot be read: {}", pem_error_kind(&e)))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| anyhow!("the client certificate and key do not go together: {e}"))?
        }
        (Some(_), None) => bail!("sslcert is given without sslkey"),
        (None, Some(_)) => bail!("sslkey is given without sslcert"),
        (None, None) => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

fn pem_error_kind(e: &rustls::pki_types::pem::Error) -> &'static str {
    match e {
        rustls::pki_types::pem::Error::Io(_) => "not readable",
        rustls::pki_types::pem::Error::NoItemsFound => "no private key in it",
        _ => "not a PEM private key",
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Checks {
    None,
    Chain,
    ChainAndName,
}

fn trusted_roots(root: &RootCert) -> Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    match root {
        RootCert::File(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| anyhow!("sslrootcert {}: {e}", path.display()))?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                bail!("sslrootcert {} holds no CA certificate", path.display());
            }
        }
        RootCert::System => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                bail!("sslrootcert=system: this host's trust store has no CA certificates");
            }
        }
    }
    Ok(store)
}

/// `prefer` / `require` without a CA: encrypted against eavesdroppers, the
/// certificate unchecked (libpq's meaning); the handshake's signatures are
/// still verified.
#[derive(Debug)]
struct EncryptOnly(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(&self, _: &CertificateDer<'_>, _: &[CertificateDer<'_>], _: &ServerName<'_>, _: &[u8], _: UnixTime) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }
    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to the CA; the host name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(&self, end: &CertificateDer<'_>, inter: &[CertificateDer<'_>], name: &ServerName<'_>, ocsp: &[u8], now: UnixTime) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain before the name, so a name error means the chain passed.
        match self.0.verify_server_cert(end, inter, name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. })) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }
    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// libpq's fallbacks for a URL without a password.
fn password_from_environment(url: &PgUrl) -> Option<String> {
    if let Ok(p) = std::env::var("PGPASSWORD") {
        return Some(p);
    }
    let file = std::env::var_os("PGPASSFILE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".pgpass")))?;
    let text = std::fs::read_to_string(&file).ok()?;
    pgpass_lookup(&text, &url.host, url.port, &url.database, &url.user)
}

/// The first line of a `.pgpass` text matching host:port:database:user
/// (`*` matches anything; `\:` and `\\` are a literal colon and backslash).
pub fn pgpass_lookup(text: &str, host: &str, port: u16, database: &str, user: &str) -> Option<String> {
    let port = port.to_string();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut fields = Vec::with_capacity(5);
        let mut cur = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => cur.extend(chars.next()),
                ':' if fields.len() < 4 => fields.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        fields.push(cur);
        if fields.len() != 5 {
            continue;
        }
        let host_matches = fields[0] == "*" || fields[0] == host || (fields[0] == "localhost" && host == "127.0.0.1");
        let matches = |f: &str, v: &str| f == "*" || f == v;
        if host_matches && matches(&fields[1], &port) && matches(&fields[2], database) && matches(&fields[3], user) {
            return Some(fields[4].clone());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgpass_lines_match_like_libpq() {
        let text = "# comment\nother:5432:*:*:no\ndb.example:5433:fast:u\\:x:p\\:w\\\\d\n*:*:*:u:any\n";
        assert_eq!(pgpass_lookup(text, "db.example", 5433, "fast", "u:x").as_deref(), Some("p:w\\d"));
        assert_eq!(pgpass_lookup(text, "db.example", 5432, "fast", "u").as_deref(), Some("any"));
        assert_eq!(pgpass_lookup(text, "db.example", 5432, "fast", "v"), None);
    }

    #[test]
    fn verify_modes_need_a_ca() {
        let tls = |mode| PgTls { mode, root_cert: None, client_cert: None, client_key: None };
        assert!(client_config(&tls(SslMode::VerifyFull)).unwrap_err().to_string().contains("sslrootcert"));
        assert!(client_config(&tls(SslMode::VerifyCa)).is_err());
        assert!(client_config(&tls(SslMode::Require)).is_ok());
        assert_eq!(attempts(SslMode::Allow), &[Attempt::Plain, Attempt::TlsOnly]);
    }
}
