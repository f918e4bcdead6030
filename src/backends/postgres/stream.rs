//! The reading side of PostgreSQL change capture: a thread streams the
//! job's slot (START_REPLICATION, pgoutput, binary values), collapses whole
//! transactions into batches of about `max_changes` changes, decodes them to
//! Arrow and hands them over through a bounded channel, so reading the next
//! batch overlaps applying the current one. What is applied is reported back
//! to the server (`Reader::confirm`) by the streaming thread, which alone
//! uses the connection; until then the server keeps the WAL.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, SendTimeoutError, Sender, bounded};

use super::copy::CopyDecoder;
use super::pgoutput::{self, Message};
use super::replication::{LogicalStream, StatusSender, WalEvent, start_streaming};
use super::*;
use crate::contract::changes::{ChangeSet, StreamBatch};
use crate::contract::collapse::{ChangeOp, Collapser, Field, RowChange};

/// Turns pgoutput messages of one table into collapsed Arrow change sets.
pub(super) struct Decoder {
    pub table: TableName,
    pub spec: TableSpec,
    pub fixed_dims: Vec<bool>,
    /// Relation id → for each of its columns, the spec column it is.
    relations: HashMap<u32, Vec<usize>>,
}

impl Decoder {
    pub fn new(table: TableName, spec: TableSpec, fixed_dims: Vec<bool>) -> Self {
        Decoder { table, spec, fixed_dims, relations: HashMap::new() }
    }

    /// Adds one message's row change to `batch`.
    fn add(&mut self, msg: Message, batch: &mut Collapser) -> Result<()> {
        match msg {
            Message::Relation { id, namespace, name, columns } => self.describe_relation(id, &namespace, &name, &columns)?,
            Message::Insert { relation, new } => {
                let fields = self.to_spec_order(relation, new)?;
                let key = self.key_of(&fields)?;
                batch.add(RowChange { op: ChangeOp::Insert, key, old_key: None, fields });
            }
            Message::Update { relation, old, new } => {
                let fields = self.to_spec_order(relation, new)?;
                let key = self.key_of(&fields)?;
                let old_key = match old {
                    Some(o) => Some(self.key_of(&self.to_spec_order(relation, o)?)?),
                    None => None,
                };
                batch.add(RowChange { op: ChangeOp::Update, key, old_key, fields });
            }
            Message::Delete { relation, old } => {
                let key = self.key_of(&self.to_spec_order(relation, old)?)?;
                batch.add(RowChange { op: ChangeOp::Delete, key, old_key: None, fields: Vec::new() });
            }
            Message::Truncate { relations } => {
                if relations.iter().any(|r| self.relations.contains_key(r)) {
                    bail!(
                        "source table {} was truncated; vmig does not replay TRUNCATE online (it would empty the \
                         target). Truncate the target yourself if that is intended, then reset the job and start again",
                        self.table.name
                    );
                }
            }
            Message::Begin | Message::Commit { .. } | Message::Other => {}
        }
        Ok(())
    }

    /// A batch of whole transactions as a change set ending at `position`.
    fn finish(&self, batch: Collapser, position: u64, commit_time_us: Option<i64>) -> Result<ChangeSet> {
        let counts = batch.counts;
        let collapsed = batch.finish();
        let all: Vec<usize> = (0..self.spec.columns.len()).collect();
        let mut set = ChangeSet { position, commit_time_us, deletes: collapsed.deletes, counts, ..Default::default() };
        if !collapsed.full.is_empty() {
            set.images.push(self.decode(&all, &collapsed.full)?);
        }
        for (mask, rows) in &collapsed.partial {
            let cols: Vec<usize> = all.iter().copied().filter(|&i| mask[i]).collect();
            set.partial.push(self.decode(&cols, rows)?);
        }
        Ok(set)
    }

    /// A tuple in the relation's column order → the spec's order.
    fn to_spec_order(&self, relation: u32, tuple: Vec<Field>) -> Result<Vec<Field>> {
        let map = self
            .relations
            .get(&relation)
            .ok_or_else(|| anyhow!("change for relation {relation} before its description"))?;
        let mut out = vec![Field::Null; self.spec.columns.len()];
        for (i, f) in tuple.into_iter().enumerate() {
            if let Some(&j) = map.get(i) {
                out[j] = f;
            }
        }
        Ok(out)
    }

    fn key_of(&self, fields: &[Field]) -> Result<Key> {
        let pk = self.spec.pk_index();
        let ty = &self.spec.columns[pk].ty;
        match &fields[pk] {
            Field::Value(b) if *ty == ColumnType::Uuid => Ok(Key::Str(crate::contract::columns::format_uuid(
                b[..].try_into().map_err(|_| anyhow!("primary key {} arrived as {} bytes, not a UUID", self.spec.primary_key, b.len()))?,
            ))),
            Field::Value(b) if matches!(ty, ColumnType::Text { .. }) => Ok(Key::Str(
                String::from_utf8(b.to_vec()).map_err(|_| anyhow!("primary key {} arrived as invalid UTF-8", self.spec.primary_key))?,
            )),
            Field::Value(b) => match b.len() {
                2 => Ok(Key::Int(i16::from_be_bytes(b[..].try_into().unwrap()) as i64)),
                4 => Ok(Key::Int(i32::from_be_bytes(b[..].try_into().unwrap()) as i64)),
                8 => Ok(Key::Int(i64::from_be_bytes(b[..].try_into().unwrap()))),
                n => bail!("primary key {} arrived as {n} bytes, not an integer", self.spec.primary_key),
            },
            other => bail!("change without its primary key {} ({other:?})", self.spec.primary_key),
        }
    }

    fn describe_relation(&mut self, id: u32, namespace: &str, name: &str, columns: &[String]) -> Result<()> {
        if name != self.table.name || self.table.schema.as_deref().is_some_and(|s| s != namespace) {
            return Ok(()); // another table of the publication: not ours
        }
        let mut map = Vec::with_capacity(columns.len());
        for c in columns {
            match self.spec.columns.iter().position(|s| &s.name == c) {
                Some(j) => map.push(j),
                None => bail!(
                    "source table {name} has a new column {c}; online migration cannot follow schema changes \
                     (finish with cutover first, or reset the job and start again)"
                ),
            }
        }
        if map.len() != self.spec.columns.len() {
            bail!("source table {name} lost columns since the job began; online migration cannot follow schema changes");
        }
        self.relations.insert(id, map);
        Ok(())
    }

    /// Rows of one shape (`cols`: spec column indexes) decoded into Arrow:
    /// pgoutput's binary values are the types' send format, as in binary COPY.
    fn decode(&self, cols: &[usize], rows: &[(Key, Vec<Field>)]) -> Result<RecordBatch> {
        let sub = TableSpec {
            name: self.spec.name.clone(),
            columns: cols.iter().map(|&i| self.spec.columns[i].clone()).collect(),
            primary_key: self.spec.primary_key.clone(),
            indexes: Vec::new(),
            computed: Vec::new(), partition_key: None,
        };
        let mut decoder = CopyDecoder::new(
            sub.arrow_schema(),
            sub.columns.iter().map(|c| c.ty.clone()).collect(),
            cols.iter().map(|&i| self.fixed_dims[i]).collect(),
        );
        decoder.expect_rows(rows.len());
        for (_, fields) in rows {
            decoder
                .append_row(cols.iter().map(|&i| match &fields[i] {
                    Field::Value(b) => Some(&b[..]),
                    _ => None,
                }))
                .context("decoding changed rows")?;
        }
        decoder.take_batch()
    }
}

/// The streaming thread and what the applying side shares with it.
pub(super) struct Reader {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    rx: Receiver<Result<ChangeSet>>,
    /// Every commit before this position has been handed to the channel.
    drained: Arc<AtomicU64>,
    /// Applied everywhere: reported to the server in status updates.
    confirmed: Arc<AtomicU64>,
}

/// Batches buffered between the stream and the applier.
const BUFFERED_BATCHES: usize = 2;
/// A batch is handed over at the first commit after this age when the
/// applier has nothing to do, full or not.
const MAX_BATCH_AGE: Duration = Duration::from_millis(100);

/// The streaming thread's state.
struct Streamer {
    stream: LogicalStream,
    decoder: Decoder,
    max_changes: usize,
    batch: Collapser,
    pending: usize,
    in_txn: bool,
    last_commit: Option<(u64, i64)>,
    /// When the batch being collected got its first change.
    batch_started: Option<Instant>,
    last_ask: Instant,
    tx: Sender<Result<ChangeSet>>,
    stop: Arc<AtomicBool>,
    drained: Arc<AtomicU64>,
    confirmed: Arc<AtomicU64>,
    /// The applied position last reported to the server, and when.
    reported: u64,
    reported_at: Instant,
    status: StatusSender,
}

impl Streamer {
    /// Tells the server the applied position (`reply`: and asks where it is).
    fn report(&mut self, reply: bool) -> Result<()> {
        let confirmed = self.confirmed.load(Relaxed);
        self.status.send(confirmed, reply)?;
        self.reported = confirmed;
        self.reported_at = Instant::now();
        Ok(())
    }

    fn run(mut self) {
        while !self.stop.load(Relaxed) {
            match self.step() {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    let _ = self.tx.send(Err(e));
                    break;
                }
            }
        }
        // Dropping the stream ends the session: the slot is free again.
    }

    /// One event; false when the run stops.
    fn step(&mut self) -> Result<bool> {
        // What the applier confirmed since, reported between two reads: the
        // connection is this thread's alone (another thread writing would wait
        // for the lock a read holds, as long as the stream keeps it busy).
        if self.confirmed.load(Relaxed) > self.reported {
            self.report(false)?;
        }
        match self.stream.next()? {
            Some(WalEvent::Data(data)) => match pgoutput::parse(&data)? {
                Message::Begin => self.in_txn = true,
                Message::Commit { end_lsn, commit_time_us } => {
                    self.in_txn = false;
                    self.last_commit = Some((end_lsn, commit_time_us));
                    // Full; or old enough while the applier waits (a steady
                    // trickle must not wait for a full batch, a backlog
                    // should still come in large ones).
                    if self.pending >= self.max_changes || self.due() {
                        return self.flush();
                    }
                }
                msg => {
                    if matches!(msg, Message::Insert { .. } | Message::Update { .. } | Message::Delete { .. }) {
                        self.pending += 1;
                        self.batch_started.get_or_insert_with(Instant::now);
                    }
                    self.decoder.add(msg, &mut self.batch)?;
                }
            },
            Some(WalEvent::Keepalive { wal_end, reply }) => {
                if !self.in_txn && self.last_commit.is_none() {
                    self.drained.fetch_max(wal_end, Relaxed);
                }
                if reply {
                    self.report(false)?;
                }
                // The server pings as it decodes WAL none of it ours (other
                // tables and databases, hint-bit page images a read causes):
                // the stream is then never quiet, and what is complete must
                // not wait for it to be.
                if !self.in_txn && self.due() {
                    return self.flush();
                }
            }
            None if !self.in_txn => {
                // Quiet for a moment: hand over what is complete, and ask
                // where the server is, so "drained" keeps up with it.
                if !self.flush()? {
                    return Ok(false);
                }
                if self.last_ask.elapsed() >= Duration::from_millis(100) {
                    self.report(true)?;
                    self.last_ask = Instant::now();
                }
            }
            None => {}
        }
        Ok(true)
    }

    /// The whole transactions collected are old enough to hand over, and the
    /// applier waits for them.
    fn due(&self) -> bool {
        self.last_commit.is_some() && self.batch_started.is_some_and(|t| t.elapsed() >= MAX_BATCH_AGE) && self.tx.is_empty()
    }

    /// Hands the whole transactions collected so far over; false when the run stops.
    fn flush(&mut self) -> Result<bool> {
        let Some((end, ts)) = self.last_commit.take() else { return Ok(true) };
        self.pending = 0;
        self.batch_started = None;
        let mut set = Ok(self.decoder.finish(std::mem::take(&mut self.batch), end, Some(ts))?);
        loop {
            match self.tx.send_timeout(set, Duration::from_millis(100)) {
                Ok(()) => break,
                // The applier is busy: report what it confirms meanwhile, and
                // keep the connection alive.
                Err(SendTimeoutError::Timeout(back)) => {
                    if self.stop.load(Relaxed) {
                        return Ok(false);
                    }
                    if self.confirmed.load(Relaxed) > self.reported || self.reported_at.elapsed() >= Duration::from_secs(5) {
                        self.report(false)?;
                    }
                    set = back;
                }
                Err(SendTimeoutError::Disconnected(_)) => return Ok(false),
            }
        }
        self.drained.fetch_max(end, Relaxed);
        Ok(true)
    }
}

impl Reader {
    /// Streams from `from` (the applied position) on its own thread.
    pub fn start(url: &PgUrl, app_name: &str, slot: &str, publication: &str, from: u64, decoder: Decoder, max_changes: usize) -> Result<Reader> {
        let (stream, status) = start_streaming(url, app_name, slot, publication, from)?;
        let (tx, rx) = bounded::<Result<ChangeSet>>(BUFFERED_BATCHES);
        let stop = Arc::new(AtomicBool::new(false));
        let drained = Arc::new(AtomicU64::new(from));
        let confirmed = Arc::new(AtomicU64::new(from));
        let streamer = Streamer {
            stream,
            decoder,
            max_changes,
            batch: Collapser::default(),
            pending: 0,
            in_txn: false,
            last_commit: None,
            batch_started: None,
            last_ask: Instant::now(),
            tx,
            stop: stop.clone(),
            drained: drained.clone(),
            confirmed: confirmed.clone(),
            reported: from,
            reported_at: Instant::now(),
            status,
        };
        let thread = std::thread::spawn(move || streamer.run());
        Ok(Reader { stop, thread: Some(thread), rx, drained, confirmed })
    }

    /// The next batch, or an empty one after `wait` with nothing new.
    pub fn next(&self, wait: Duration) -> Result<StreamBatch> {
        let confirmed = self.confirmed.load(Relaxed);
        let before = self.drained.load(Relaxed);
        match self.rx.recv_timeout(wait) {
            Ok(Ok(set)) => {
                let drained_to = if self.rx.is_empty() { before.max(set.position) } else { set.position };
                Ok(StreamBatch { set, drained_to: Some(drained_to) })
            }
            Ok(Err(e)) => Err(e),
            Err(RecvTimeoutError::Timeout) => {
                let d = self.drained.load(Relaxed);
                let drained_to = self.rx.is_empty().then_some(d);
                Ok(StreamBatch { set: ChangeSet { position: confirmed, ..Default::default() }, drained_to })
            }
            Err(RecvTimeoutError::Disconnected) => bail!("the replication stream ended"),
        }
    }

    /// Records `position` as applied; the streaming thread reports it within
    /// a read (100 ms), and the server frees the WAL before it.
    pub fn confirm(&self, position: u64) -> Result<()> {
        self.confirmed.fetch_max(position, Relaxed);
        Ok(())
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        // Dropping the receiver ends a hand-over in progress.
        self.rx = crossbeam_channel::never();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
