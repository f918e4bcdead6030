//! A minimal replication-protocol session (`replication=database`), for two
//! commands. `CREATE_REPLICATION_SLOT … LOGICAL pgoutput (SNAPSHOT 'export')`:
//! only it hands out the snapshot matching the slot's consistent point
//! exactly, so the snapshot copy and the change stream meet without a gap or
//! an overlap (the session stays open, idle, until the snapshot has been
//! imported by another transaction). `START_REPLICATION SLOT … LOGICAL`: the
//! server streams changes as they commit, ahead of what vmig has applied,
//! and vmig reports the applied position back (standby status updates).
//! tokio-postgres has no replication mode, so this speaks the wire protocol
//! itself (postgres-protocol does the startup, SCRAM and simple queries).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::{Buf, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::{backend::Message, frontend};

use super::connect::{Attempt, attempts, client_config, failure_text, session_config};
use crate::model::config::PgUrl;

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
    wire: Wire,
    buf: BytesMut,
}

/// The session's byte stream, plain or TLS, shared with the thread that
/// sends status updates: a TLS stream cannot be split, so both take turns
/// (reads wait at most the socket's read timeout).
#[derive(Clone)]
struct Wire {
    stream: Arc<Mutex<Stream>>,
    /// The same socket, for its timeouts.
    socket: Arc<TcpStream>,
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Wire {
    fn lock(&self) -> MutexGuard<'_, Stream> {
        self.stream.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn write_all(&self, bytes: &[u8]) -> std::io::Result<()> {
        match &mut *self.lock() {
            Stream::Plain(s) => s.write_all(bytes).and_then(|_| s.flush()),
            Stream::Tls(s) => s.write_all(bytes).and_then(|_| s.flush()),
        }
    }
    fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        match &mut *self.lock() {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Drop for ReplicationSession {
    fn drop(&mut self) {
        let mut out = BytesMut::new();
        frontend::terminate(&mut out);
        let _ = self.wire.write_all(&out);
    }
}

/// Opens the TCP connection and, as `sslmode` asks, upgrades it to TLS
/// before the startup message (SSLRequest, then the handshake).
fn open_wire(url: &PgUrl, attempt: Attempt) -> Result<Wire> {
    let socket = TcpStream::connect((url.host.as_str(), url.port))
        .with_context(|| format!("replication connection to {}", url.redacted()))?;
    socket.set_read_timeout(Some(Duration::from_secs(300)))?;
    let timeouts = Arc::new(socket.try_clone()?);
    if attempt == Attempt::Plain {
        return Ok(Wire { stream: Arc::new(Mutex::new(Stream::Plain(socket))), socket: timeouts });
    }
    let mut socket = socket;
    let mut out = BytesMut::new();
    frontend::ssl_request(&mut out);
    socket.write_all(&out)?;
    let mut answer = [0u8; 1];
    socket.read_exact(&mut answer).context("the server's answer to the TLS request")?;
    match (answer[0], attempt) {
        (b'S', _) => {}
        (b'N', Attempt::TlsIfOffered) => {
            return Ok(Wire { stream: Arc::new(Mutex::new(Stream::Plain(socket))), socket: timeouts });
        }
        (b'N', _) => bail!("the server offers no TLS, and sslmode={} does not allow plain text", url.tls.mode.name()),
        (other, _) => bail!("unexpected answer {other:#x} to the TLS request"),
    }
    let name = rustls::pki_types::ServerName::try_from(url.host.clone()).map_err(|e| anyhow!("host {}: {e}", url.host))?;
    let conn = rustls::ClientConnection::new(client_config(&url.tls)?, name).context("TLS")?;
    let mut tls = rustls::StreamOwned::new(conn, socket);
    // The handshake now, so a refused certificate is reported as such.
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).map_err(|e| anyhow!(failure_text(&e, url)))?;
    }
    Ok(Wire { stream: Arc::new(Mutex::new(Stream::Tls(Box::new(tls)))), socket: timeouts })
}

impl ReplicationSession {
    fn connect(url: &PgUrl, application_name: &str) -> Result<Self> {
        let mut last = None;
        for &attempt in attempts(url.tls.mode) {
            match Self::connect_once(url, application_name, attempt) {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        let e = last.expect("every sslmode makes at least one attempt");
        Err(e.context(format!("replication connection to {}", url.redacted())))
    }

    fn connect_once(url: &PgUrl, application_name: &str, attempt: Attempt) -> Result<Self> {
        let config = session_config(url)?;
        let user = config.get_user().unwrap_or("postgres").to_string();
        let dbname = config.get_dbname().unwrap_or(&user).to_string();
        let password = config.get_password().map(|p| p.to_vec());
        let mut s = ReplicationSession { wire: open_wire(url, attempt)?, buf: BytesMut::new() };
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
        self.wire.write_all(bytes).context("replication connection")
    }

    /// One message as (tag, body), framed by hand: the copy-both messages
    /// of streaming replication are not in postgres-protocol's parser.
    fn recv_raw(&mut self) -> Result<(u8, Bytes)> {
        loop {
            if let Some(m) = self.take_raw() {
                return Ok(m);
            }
            self.fill()?;
        }
    }

    /// Like `recv_raw`, None when the read timeout passes with no whole message.
    fn try_recv_raw(&mut self) -> Result<Option<(u8, Bytes)>> {
        loop {
            if let Some(m) = self.take_raw() {
                return Ok(Some(m));
            }
            match self.fill() {
                Ok(()) => {}
                Err(e) if e.downcast_ref::<std::io::Error>().is_some_and(|io| {
                    matches!(io.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
                }) =>
                {
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn take_raw(&mut self) -> Option<(u8, Bytes)> {
        if self.buf.len() < 5 {
            return None;
        }
        let len = i32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
        if self.buf.len() < 1 + len {
            return None;
        }
        let mut m = self.buf.split_to(1 + len);
        let tag = m[0];
        m.advance(5);
        Some((tag, m.freeze()))
    }

    fn fill(&mut self) -> Result<()> {
        let mut chunk = [0u8; 64 * 1024];
        // A signal (a debugger attaching, a profiler) interrupts a read; it is no error.
        let n = loop {
            match self.wire.read(&mut chunk) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r?,
            }
        };
        if n == 0 {
            bail!("the server closed the replication connection");
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    fn recv(&mut self) -> Result<Message> {
        loop {
            if let Some(m) = Message::parse(&mut self.buf).context("replication protocol")? {
                return Ok(m);
            }
            let mut chunk = [0u8; 8192];
            let n = self.wire.read(&mut chunk).context("replication connection")?;
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

/// What the server sends while streaming.
pub enum WalEvent {
    /// One pgoutput message.
    Data(Bytes),
    /// The server's position; `reply`: it wants a status update now.
    Keepalive { wal_end: u64, reply: bool },
}

/// A logical replication stream (START_REPLICATION, copy-both mode).
pub struct LogicalStream {
    session: ReplicationSession,
}

/// Sends standby status updates on a stream's connection (any thread).
#[derive(Clone)]
pub struct StatusSender {
    wire: Wire,
}

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

impl StatusSender {
    /// Tells the server everything up to `flush` is applied (it may free
    /// that WAL and will not send it again); `reply` asks for a keepalive.
    pub fn send(&self, flush: u64, reply: bool) -> Result<()> {
        let mut body = Vec::with_capacity(34);
        body.push(b'r');
        for lsn in [flush, flush, flush] {
            body.extend_from_slice(&lsn.to_be_bytes());
        }
        body.extend_from_slice(&(chrono::Utc::now().timestamp_micros() - PG_EPOCH_OFFSET_US).to_be_bytes());
        body.push(reply as u8);
        let mut msg = vec![b'd'];
        msg.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        msg.extend_from_slice(&body);
        self.wire.write_all(&msg).context("sending the applied position")
    }
}

/// Starts streaming `slot` from `start` (the server starts at the slot's
/// confirmed position if that is later).
pub fn start_streaming(url: &PgUrl, application_name: &str, slot: &str, publication: &str, start: u64) -> Result<(LogicalStream, StatusSender)> {
    let mut session = ReplicationSession::connect(url, application_name)?;
    let mut out = BytesMut::new();
    frontend::query(
        &format!(
            "START_REPLICATION SLOT {} LOGICAL {} (proto_version '1', publication_names '{}', binary 'true')",
            super::ident(slot),
            format_lsn(start),
            super::ident(publication).replace('\'', "''")
        ),
        &mut out,
    )?;
    session.send(&out)?;
    loop {
        let (tag, body) = session.recv_raw()?;
        match tag {
            b'W' => break, // copy-both: the stream begins
            b'E' => bail!("starting replication from slot {slot}: {}", error_text_raw(tag, &body)?),
            _ => {}
        }
    }
    session.wire.socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    let sender = StatusSender { wire: session.wire.clone() };
    Ok((LogicalStream { session }, sender))
}

impl LogicalStream {
    /// The next event, or None when nothing arrived within 100 ms.
    pub fn next(&mut self) -> Result<Option<WalEvent>> {
        let Some((tag, mut body)) = self.session.try_recv_raw()? else { return Ok(None) };
        match tag {
            b'd' if body.first() == Some(&b'w') => {
                body.advance(1 + 8 + 8 + 8); // tag, wal start, wal end, send time
                Ok(Some(WalEvent::Data(body)))
            }
            b'd' if body.first() == Some(&b'k') => {
                body.advance(1);
                let wal_end = body.get_u64();
                body.advance(8);
                Ok(Some(WalEvent::Keepalive { wal_end, reply: body.first() == Some(&1) }))
            }
            b'E' => bail!("the replication stream failed: {}", error_text_raw(tag, &body)?),
            b'c' => bail!("the server ended the replication stream"),
            _ => Ok(None), // notices, parameter changes
        }
    }
}

fn error_text_raw(tag: u8, body: &[u8]) -> Result<String> {
    let mut framed = BytesMut::with_capacity(body.len() + 5);
    framed.extend_from_slice(&[tag]);
    framed.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    framed.extend_from_slice(body);
    match Message::parse(&mut framed)? {
        Some(Message::ErrorResponse(b)) => error_text(b),
        _ => Ok("unreadable error".into()),
    }
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
