//! PostgreSQL change capture for online jobs: a publication for the table and
//! a logical slot (pgoutput) named after the job, created before the
//! snapshot is read, whose exported snapshot the snapshot copy reads. Changes
//! are read with `pg_logical_slot_peek_binary_changes` (binary values) and
//! confirmed with `pg_replication_slot_advance` only after every target has
//! committed them, so a kill at any moment loses nothing.

use std::collections::HashMap;

use super::copy::{CopyDecoder, copy_header};
use super::pgoutput::{self, Message};
use super::replication::{create_slot_with_snapshot, format_lsn, parse_lsn};
use super::*;
use crate::ledger::now_rfc3339;
use crate::online::collapse::{ChangeOp, Collapser, Field, RowChange};
use crate::online::{ChangeSet, ChangeStream, OnlineState, StreamBatch, StreamStats};

/// The slot's and publication's name: `vmig_<job>`, lower-case letters,
/// digits and `_` only, at most 63 bytes.
pub fn artifact_name(job: &str) -> String {
    let mut s: String = format!("vmig_{job}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' })
        .collect();
    s.truncate(63);
    s
}

pub struct PgChangeStream {
    url: PgUrl,
    handle: Handle,
    client: Option<Client>,
    app_name: String,
    slot: String,
    publication: String,
    table: TableName,
    spec: TableSpec,
    fixed_dims: Vec<bool>,
    /// Relation id → for each of its columns, the spec column it is.
    relations: HashMap<u32, Vec<usize>>,
    confirmed: u64,
}

/// Checks what logical decoding needs, before anything is copied.
async fn check_prerequisites(c: &Client, url: &PgUrl, table: &TableName) -> Result<()> {
    let src = url.redacted();
    let wal_level: String = c.query_one("SHOW wal_level", &[]).await.pg("reading wal_level")?.get(0);
    if wal_level != "logical" {
        bail!(
            "source {src} has wal_level = {wal_level}; online migration needs wal_level = logical \
             (ALTER SYSTEM SET wal_level = logical, then restart the server)"
        );
    }
    let r = c
        .query_one(
            "SELECT current_user::text, rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .pg("reading the user's privileges")?;
    let (user, can_replicate): (String, bool) = (r.get(0), r.get(1));
    if !can_replicate {
        bail!(
            "user {user} on source {src} lacks the REPLICATION privilege that online migration needs \
             (ALTER ROLE {user} REPLICATION, as a superuser)"
        );
    }
    let r = c
        .query_one(
            "SELECT current_setting('max_replication_slots')::int, (SELECT count(*) FROM pg_replication_slots)::int, \
                    current_setting('max_wal_senders')::int, (SELECT count(*) FROM pg_stat_replication)::int",
            &[],
        )
        .await
        .pg("reading replication settings")?;
    let (max_slots, used_slots, max_senders, used_senders): (i32, i32, i32, i32) = (r.get(0), r.get(1), r.get(2), r.get(3));
    if used_slots >= max_slots {
        bail!(
            "source {src} has no free replication slot (max_replication_slots = {max_slots}, {used_slots} in use): \
             drop an unused slot (pg_drop_replication_slot) or raise max_replication_slots and restart"
        );
    }
    if used_senders >= max_senders {
        bail!(
            "source {src} has no free WAL sender (max_wal_senders = {max_senders}, {used_senders} in use), which creating \
             the replication slot needs: raise max_wal_senders and restart"
        );
    }
    let owner: bool = c
        .query_one(
            "SELECT pg_has_role(current_user, c.relowner, 'USAGE') FROM pg_class c WHERE c.oid = to_regclass($1)",
            &[&table.sql()],
        )
        .await
        .pg("reading the table's owner")?
        .get(0);
    if !owner {
        bail!(
            "user {user} does not own table {} on source {src}; creating its publication needs the owner \
             (or create publication {} FOR TABLE {} yourself and run again)",
            table.name,
            artifact_name("…"),
            table.name
        );
    }
    Ok(())
}

impl PgChangeStream {
    /// Sets up capture for a new online job (prerequisites, publication,
    /// slot; the snapshot copy then reads the slot's snapshot), or reopens it
    /// for a resumed one. `committed`: the targets already hold part of the job.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        url: PgUrl,
        table: &str,
        handle: Handle,
        job: &str,
        job_dir: &std::path::Path,
        source: &PgSource,
        committed: bool,
        fb: &dyn Feedback,
    ) -> Result<PgChangeStream> {
        let table = TableName::parse(table);
        let name = artifact_name(job);
        let app_name = super::sink::session_name(job);
        let h = handle.clone();
        h.block_on(async {
            let c = connect_as(&url, Some(&app_name)).await?;
            let slot: Option<(String, Option<i32>, String)> = c
                .query_opt(
                    "SELECT coalesce(plugin, ''), active_pid, coalesce(confirmed_flush_lsn::text, '0/0') \
                     FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()",
                    &[&name],
                )
                .await
                .pg("looking for the job's replication slot")?
                .map(|r| (r.get(0), r.get(1), r.get(2)));
            let state = OnlineState::load(job_dir)?;
            let mut stream = PgChangeStream {
                url: url.clone(),
                handle: handle.clone(),
                client: None,
                app_name: app_name.clone(),
                slot: name.clone(),
                publication: name.clone(),
                table: table.clone(),
                spec: source.spec().clone(),
                fixed_dims: source.fixed_dims().to_vec(),
                relations: HashMap::new(),
                confirmed: 0,
            };
            match slot {
                Some((plugin, active, confirmed)) if committed => {
                    if plugin != "pgoutput" {
                        bail!("replication slot {name} on {} uses plugin {plugin}, not pgoutput; it is not vmig's", url.redacted());
                    }
                    if let Some(pid) = active {
                        // Held by a killed run's session (the job's lock is ours).
                        fb.say(&format!("replication slot {name} is held by session {pid} of an earlier run; ending it"));
                        c.execute("SELECT pg_terminate_backend($1)", &[&pid]).await.pg("ending the earlier session")?;
                        wait_slot_inactive(&c, &name).await?;
                    }
                    stream.confirmed = parse_lsn(&confirmed)?;
                    fb.say(&format!("resuming change capture from slot {name} at {confirmed}"));
                    if state.is_none() {
                        stream.save_state(job_dir, &confirmed)?;
                    }
                }
                None if committed => bail!(
                    "replication slot {name} is gone from source {}, so the changes since this job's last applied \
                     position are lost; run `vmig reset` for this job (with --to and --from) and start again",
                    url.redacted()
                ),
                leftover => {
                    // Nothing copied yet: start clean, so the snapshot is the slot's own.
                    if leftover.is_some() {
                        fb.say(&format!("dropping replication slot {name} of an earlier run that copied nothing"));
                        if let Some(pid) = leftover.as_ref().and_then(|s| s.1) {
                            c.execute("SELECT pg_terminate_backend($1)", &[&pid]).await.pg("ending the earlier session")?;
                            wait_slot_inactive(&c, &name).await?;
                        }
                        c.execute("SELECT pg_drop_replication_slot($1)", &[&name]).await.pg("dropping the slot")?;
                    }
                    check_prerequisites(&c, &url, &table).await?;
                    let has_pub: bool = c
                        .query_one("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)", &[&name])
                        .await
                        .pg("looking for the publication")?
                        .get(0);
                    if !has_pub {
                        c.batch_execute(&format!("CREATE PUBLICATION {} FOR TABLE {}", ident(&name), table.sql()))
                            .await
                            .pg("creating the publication")?;
                    }
                    // Recorded before the slot exists, so reset can always find it.
                    stream.save_state(job_dir, "pending")?;
                    let created = create_slot_with_snapshot(&url, &name, &app_name)?;
                    source.adopt_snapshot(&created.snapshot_name).await?;
                    stream.confirmed = created.consistent_point;
                    created.close();
                    stream.save_state(job_dir, &format_lsn(stream.confirmed))?;
                    fb.say(&format!(
                        "created publication {name} and replication slot {name}; the snapshot is the slot's, at {}",
                        format_lsn(stream.confirmed)
                    ));
                }
            }
            stream.client = Some(c);
            Ok(stream)
        })
    }

    fn save_state(&self, job_dir: &std::path::Path, consistent_point: &str) -> Result<()> {
        OnlineState {
            kind: "postgres".into(),
            source: self.url.redacted(),
            slot: self.slot.clone(),
            publication: self.publication.clone(),
            created_at: now_rfc3339(),
            consistent_point: consistent_point.into(),
        }
        .save(job_dir)
    }

    async fn client(&mut self) -> Result<&Client> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = Some(connect_as(&self.url, Some(&self.app_name)).await?);
        }
        Ok(self.client.as_ref().unwrap())
    }

    async fn lsn(&mut self, sql: &str) -> Result<u64> {
        let s: String = self.client().await?.query_one(sql, &[]).await.pg("reading the WAL position")?.get(0);
        parse_lsn(&s)
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

    fn key_of(&self, fields: &[Field]) -> Result<i64> {
        let pk = self.spec.columns.iter().position(|c| c.name == self.spec.primary_key).unwrap();
        match &fields[pk] {
            Field::Value(b) => match b.len() {
                2 => Ok(i16::from_be_bytes(b[..].try_into().unwrap()) as i64),
                4 => Ok(i32::from_be_bytes(b[..].try_into().unwrap()) as i64),
                8 => Ok(i64::from_be_bytes(b[..].try_into().unwrap())),
                n => bail!("primary key {} arrived as {n} bytes; online needs an integer key", self.spec.primary_key),
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

    /// Rows of one shape (`cols`: spec column indexes) decoded into Arrow.
    fn decode(&self, cols: &[usize], rows: &[(i64, Vec<Field>)]) -> Result<RecordBatch> {
        let sub = TableSpec {
            name: self.spec.name.clone(),
            columns: cols.iter().map(|&i| self.spec.columns[i].clone()).collect(),
            primary_key: self.spec.primary_key.clone(),
            indexes: Vec::new(),
        };
        let mut decoder = CopyDecoder::new(
            sub.arrow_schema(),
            sub.columns.iter().map(|c| c.ty.clone()).collect(),
            cols.iter().map(|&i| self.fixed_dims[i]).collect(),
        );
        let mut buf = copy_header();
        for (_, fields) in rows {
            buf.extend_from_slice(&(cols.len() as i16).to_be_bytes());
            for &i in cols {
                match &fields[i] {
                    Field::Value(b) => {
                        buf.extend_from_slice(&(b.len() as i32).to_be_bytes());
                        buf.extend_from_slice(b);
                    }
                    _ => buf.extend_from_slice(&(-1i32).to_be_bytes()),
                }
            }
        }
        decoder.feed(&buf, usize::MAX, &mut |_| Ok(())).context("decoding changed rows")?;
        decoder.take_batch()
    }
}

async fn wait_slot_inactive(c: &Client, slot: &str) -> Result<()> {
    for _ in 0..600 {
        let active: bool = c
            .query_one("SELECT coalesce((SELECT active FROM pg_replication_slots WHERE slot_name = $1), false)", &[&slot])
            .await
            .pg("waiting for the slot")?
            .get(0);
        if !active {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("replication slot {slot} stayed in use by an earlier session for 60 s")
}

impl ChangeStream for PgChangeStream {
    fn artifacts(&self) -> String {
        format!("replication slot {} and publication {} on {}", self.slot, self.publication, self.url.redacted())
    }

    fn format_position(&self, p: u64) -> String {
        format_lsn(p)
    }

    fn current_position(&mut self) -> Result<u64> {
        let h = self.handle.clone();
        h.block_on(self.lsn("SELECT pg_current_wal_lsn()::text"))
    }

    fn skip_to(&mut self, position: u64) -> Result<()> {
        self.confirm(position)
    }

    fn next_batch(&mut self, max_changes: usize, upto: u64) -> Result<StreamBatch> {
        let h = self.handle.clone();
        let (slot, publication) = (self.slot.clone(), self.publication.clone());
        let rows = h.block_on(async {
            let c = self.client().await?;
            c.query(
                "SELECT data FROM pg_logical_slot_peek_binary_changes($1, $2::text::pg_lsn, $3, \
                 'proto_version', '1', 'publication_names', $4, 'binary', 'true')",
                &[&slot, &format_lsn(upto), &(max_changes as i32), &publication],
            )
            .await
            .pg("reading changes from the replication slot")
        })?;
        let complete = rows.len() < max_changes;
        let mut collapser = Collapser::default();
        let mut position = self.confirmed;
        let mut commit_time_us = None;
        for r in &rows {
            let data = Bytes::copy_from_slice(r.get::<_, &[u8]>(0));
            match pgoutput::parse(&data)? {
                Message::Relation { id, namespace, name, columns } => self.describe_relation(id, &namespace, &name, &columns)?,
                Message::Insert { relation, new } => {
                    let fields = self.to_spec_order(relation, new)?;
                    let key = self.key_of(&fields)?;
                    collapser.add(RowChange { op: ChangeOp::Insert, key, old_key: None, fields });
                }
                Message::Update { relation, old, new } => {
                    let fields = self.to_spec_order(relation, new)?;
                    let key = self.key_of(&fields)?;
                    let old_key = match old {
                        Some(o) => Some(self.key_of(&self.to_spec_order(relation, o)?)?),
                        None => None,
                    };
                    collapser.add(RowChange { op: ChangeOp::Update, key, old_key, fields });
                }
                Message::Delete { relation, old } => {
                    let key = self.key_of(&self.to_spec_order(relation, old)?)?;
                    collapser.add(RowChange { op: ChangeOp::Delete, key, old_key: None, fields: Vec::new() });
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
                Message::Commit { end_lsn, commit_time_us: ts } => {
                    position = end_lsn;
                    commit_time_us = Some(ts);
                }
                Message::Begin | Message::Other => {}
            }
        }
        let counts = collapser.counts;
        let collapsed = collapser.finish();
        let all: Vec<usize> = (0..self.spec.columns.len()).collect();
        let mut set = ChangeSet { position, commit_time_us, deletes: collapsed.deletes, counts, ..Default::default() };
        if !collapsed.full.is_empty() {
            set.images.push(self.decode(&all, &collapsed.full)?);
        }
        for (mask, rows) in &collapsed.partial {
            let cols: Vec<usize> = all.iter().copied().filter(|&i| mask[i]).collect();
            set.partial.push(self.decode(&cols, rows)?);
        }
        Ok(StreamBatch { set, complete })
    }

    fn confirm(&mut self, position: u64) -> Result<()> {
        if position <= self.confirmed {
            return Ok(());
        }
        let h = self.handle.clone();
        let slot = self.slot.clone();
        h.block_on(async {
            self.client()
                .await?
                .query_one("SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)::text", &[&slot, &format_lsn(position)])
                .await
                .pg("confirming applied changes to the replication slot")
        })?;
        self.confirmed = position;
        Ok(())
    }

    fn stats(&mut self) -> Result<StreamStats> {
        let h = self.handle.clone();
        let slot = self.slot.clone();
        let r = h.block_on(async {
            self.client()
                .await?
                .query_one(
                    "SELECT pg_current_wal_lsn()::text, coalesce(confirmed_flush_lsn, '0/0')::text, \
                            coalesce(restart_lsn, '0/0')::text FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await
                .pg("reading the replication slot")
        })?;
        let (current, confirmed, restart) =
            (parse_lsn(r.get(0))?, parse_lsn(r.get(1))?, parse_lsn(r.get(2))?);
        Ok(StreamStats { source_position: current, confirmed, retained_bytes: current.saturating_sub(restart) })
    }

    fn drop_artifacts(&mut self) -> Result<()> {
        let h = self.handle.clone();
        let url = self.url.clone();
        let slot = self.slot.clone();
        self.client = None; // our session must not hold the slot
        h.block_on(drop_artifacts(&url, &slot))?;
        Ok(())
    }
}

/// Drops a job's slot and publication if they exist; returns what was dropped.
pub async fn drop_artifacts(url: &PgUrl, name: &str) -> Result<Vec<String>> {
    let c = connect(url).await?;
    let mut dropped = Vec::new();
    if let Some(r) = c
        .query_opt("SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", &[&name])
        .await
        .pg("looking for the replication slot")?
    {
        if let Some(pid) = r.get::<_, Option<i32>>(0) {
            c.execute("SELECT pg_terminate_backend($1)", &[&pid]).await.pg("ending the slot's session")?;
            wait_slot_inactive(&c, name).await?;
        }
        c.execute("SELECT pg_drop_replication_slot($1)", &[&name]).await.pg("dropping the replication slot")?;
        dropped.push(format!("replication slot {name}"));
    }
    let has_pub: bool = c
        .query_one("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)", &[&name])
        .await
        .pg("looking for the publication")?
        .get(0);
    if has_pub {
        c.batch_execute(&format!("DROP PUBLICATION {}", ident(name))).await.pg("dropping the publication")?;
        dropped.push(format!("publication {name}"));
    }
    Ok(dropped)
}

/// A slot's retained WAL in bytes (None: no such slot), for `status`.
pub async fn retained_wal(url: &PgUrl, name: &str) -> Result<Option<u64>> {
    let c = connect(url).await?;
    let r = c
        .query_opt(
            "SELECT pg_current_wal_lsn()::text, coalesce(restart_lsn, '0/0')::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await
        .pg("reading the replication slot")?;
    match r {
        Some(r) => Ok(Some(parse_lsn(r.get(0))?.saturating_sub(parse_lsn(r.get(1))?))),
        None => Ok(None),
    }
}
