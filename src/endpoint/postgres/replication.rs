//! A minimal replication-protocol session (`replication=database`), used for
//! one command: `CREATE_REPLICATION_SLOT … LOGICAL pgoutput (SNAPSHOT
//! 'export')`. Only that command hands out the snapshot matching the slot's
//! consistent point exactly, so the snapshot copy and the change stream meet
//! without a gap or an overlap. tokio-postgres has no replication mode, so
//! this speaks the wire protocol itself (postgres-protocol does the framing
//! and SCRAM). The session must stay open, idle, until the snapshot has been
//! imported by another transaction.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::{backend::Message, frontend};

use crate::config::PgUrl;

/// What `CREATE_REPLICATION_SLOT` returned; the snapshot lives as long as the session.
pub struct CreatedSlot {
    pub consistent_point: u64,
    pub snapshot_name: String,
    session: ReplicationSession,
}

impl CreatedSlot {
    /// Ends the session (the exported snapshot goes with it).
    pub fn close(self) {
        drop(self.session);
    }
}

struct ReplicationSession {
    stream: TcpStream,
    buf: BytesMut,
}

impl Drop for ReplicationSession {
    fn drop(&mut self) {
        let mut out = BytesMut::new();
        frontend::terminate(&mut out);
        let _ = self.stream.write_all(&out);
    }
}

impl ReplicationSession {
    fn connect(url: &PgUrl, application_name: &str) -> Result<Self> {
        let config: tokio_postgres::Config =
            url.connection_string().parse().map_err(|e| anyhow!("invalid PostgreSQL URL {}: {e}", url.redacted()))?;
        let user = config.get_user().unwrap_or("postgres").to_string();
        let dbname = config.get_dbname().unwrap_or(&user).to_string();
        let password = config.get_password().map(|p| p.to_vec());
        let stream = TcpStream::connect((url.host.as_str(), url.port))
            .with_context(|| format!("replication connection to {}", url.redacted()))?;
        stream.set_read_timeout(Some(Duration::from_secs(300)))?;
        let mut s = ReplicationSession { stream, buf: BytesMut::new() };
        let mut out = BytesMut::new();
        frontend::startup_message(
            [("user", user.as_str()), ("database", dbname.as_str()), ("replication", "database"), ("application_name", application_name)],
            &mut out,
        )?;
        s.send(&out)?;
        let mut scram: Option<ScramSha256> = None;
        loop {
            match s.recv()? {
                Message::AuthenticationOk => {}
                Message::AuthenticationCleartextPassword => {
                    let p = password.as_deref().ok_or_else(|| anyhow!("the server asks for a password; the URL has none"))?;
                    out.clear();
                    frontend::password_message(p, &mut out)?;
                    s.send(&out)?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let p = password.as_deref().ok_or_else(|| anyhow!("the server asks for a password; the URL has none"))?;
                    let hash = postgres_protocol::authentication::md5_hash(user.as_bytes(), p, body.salt());
                    out.clear();
                    frontend::password_message(hash.as_bytes(), &mut out)?;
                    s.send(&out)?;
                }
                Message::AuthenticationSasl(body) => {
                    let mechanisms: Vec<String> = body.mechanisms().map(|m| Ok(m.to_string())).collect()?;
                    if !mechanisms.iter().any(|m| m == SCRAM_SHA_256) {
                        bail!("the server offers SASL mechanisms {mechanisms:?}; vmig speaks {SCRAM_SHA_256}");
                    }
                    let p = password.as_deref().ok_or_else(|| anyhow!("the server asks for a password; the URL has none"))?;
                    let sc = ScramSha256::new(p, ChannelBinding::unsupported());
                    out.clear();
                    frontend::sasl_initial_response(SCRAM_SHA_256, sc.message(), &mut out)?;
                    s.send(&out)?;
                    scram = Some(sc);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let sc = scram.as_mut().ok_or_else(|| anyhow!("unexpected SASL message"))?;
                    sc.update(body.data()).context("SCRAM authentication")?;
                    out.clear();
                    frontend::sasl_response(sc.message(), &mut out)?;
                    s.send(&out)?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let mut sc = scram.take().ok_or_else(|| anyhow!("unexpected SASL message"))?;
                    sc.finish(body.data()).context("SCRAM authentication")?;
                }
                Message::ErrorResponse(body) => bail!("{}", error_text(body)?),
                Message::ReadyForQuery(_) => return Ok(s),
                _ => {} // ParameterStatus, BackendKeyData, notices
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).context("replication connection")
    }

    fn recv(&mut self) -> Result<Message> {
        loop {
            if let Some(m) = Message::parse(&mut self.buf).context("replication protocol")? {
                return Ok(m);
            }
            let mut chunk = [0u8; 8192];
            let n = self.stream.read(&mut chunk).context("replication connection")?;
            if n == 0 {
                bail!("the server closed the replication connection");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Runs one command; returns the text fields of its first row.
    fn simple_query(&mut self, sql: &str) -> Result<Vec<Option<String>>> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out)?;
        self.send(&out)?;
        let mut row = None;
        let mut error = None;
        loop {
            match self.recv()? {
                Message::DataRow(body) if row.is_none() => {
                    let buf = body.buffer();
                    let fields: Vec<Option<String>> = body
                        .ranges()
                        .map(|r| Ok(r.map(|r| String::from_utf8_lossy(&buf[r]).into_owned())))
                        .collect()?;
                    row = Some(fields);
                }
                Message::ErrorResponse(body) => error = Some(error_text(body)?),
                Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        match error {
            Some(e) => bail!("{e}"),
            None => Ok(row.unwrap_or_default()),
        }
    }
}

fn error_text(body: postgres_protocol::message::backend::ErrorResponseBody) -> Result<String> {
    let mut fields = body.fields();
    let mut msg = String::new();
    while let Some(f) = fields.next()? {
        if f.type_() == b'M' {
            msg = String::from_utf8_lossy(f.value_bytes()).into_owned();
        }
    }
    Ok(msg)
}

/// Creates the logical slot `slot` (pgoutput) and returns its consistent
/// point with the snapshot exported at exactly that point.
pub fn create_slot_with_snapshot(url: &PgUrl, slot: &str, application_name: &str) -> Result<CreatedSlot> {
    let mut session = ReplicationSession::connect(url, application_name)?;
    let row = session
        .simple_query(&format!("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'export')", super::ident(slot)))
        .with_context(|| format!("creating replication slot {slot}"))?;
    let field = |i: usize| row.get(i).cloned().flatten().ok_or_else(|| anyhow!("CREATE_REPLICATION_SLOT returned no field {i}"));
    let consistent_point = parse_lsn(&field(1)?)?;
    let snapshot_name = field(2)?;
    Ok(CreatedSlot { consistent_point, snapshot_name, session })
}

/// `16/B374D848` → u64.
pub fn parse_lsn(s: &str) -> Result<u64> {
    let (hi, lo) = s.split_once('/').ok_or_else(|| anyhow!("not an LSN: {s}"))?;
    Ok((u64::from_str_radix(hi, 16)? << 32) | u64::from_str_radix(lo, 16)?)
}

pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trip() {
        for s in ["0/0", "16/B374D848", "FFFFFFFF/FFFFFFFF"] {
            assert_eq!(format_lsn(parse_lsn(s).unwrap()), s);
        }
        assert!(parse_lsn("12").is_err());
    }
}
