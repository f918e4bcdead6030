//! PostgreSQL change capture for online jobs: a publication for the table and
//! a logical slot (pgoutput) named after the job, created before the
//! snapshot is read, whose exported snapshot the snapshot copy reads. Changes
//! are streamed (`stream.rs`) and confirmed to the slot only after every
//! target has committed them, so a kill at any moment loses nothing.

use super::replication::{create_slot_with_snapshot, format_lsn, parse_lsn};
use super::stream::{Decoder, Reader};
use super::*;
use crate::contract::changes::{ChangeStream, StreamBatch, StreamStats};
use crate::model::now_rfc3339;
use crate::state::online::OnlineState;

/// Age past which changes not yet drained to the server's position are a
/// backlog (a steady load is applied within a fraction of a second).
const BACKLOG_AGE_US: i64 = 1_000_000;
/// WAL still to decode past which a part batch is a backlog however young
/// its changes (a backlog written just before the job started): a steady
/// FastGPT load writes about 1 MB of WAL a second.
const BACKLOG_WAL_BYTES: u64 = 16 << 20;

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
    /// Regular session: positions, slot statistics.
    client: Option<Client>,
    app_name: String,
    slot: String,
    publication: String,
    table: TableName,
    spec: TableSpec,
    fixed_dims: Vec<bool>,
    /// The streaming thread, started on the first read (again after an error).
    reader: Option<Reader>,
    confirmed: u64,
}

/// Checks what logical decoding needs, before anything is copied.
async fn check_prerequisites(c: &Client, url: &PgUrl, table: &TableName, publication: &str) -> Result<()> {
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
            ident(publication),
            table.sql()
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
                reader: None,
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
                        end_slot_session(&c, &name, pid).await?;
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
                            end_slot_session(&c, &name, pid).await?;
                        }
                        c.execute("SELECT pg_drop_replication_slot($1)", &[&name]).await.pg("dropping the slot")?;
                    }
                    check_prerequisites(&c, &url, &table, &name).await?;
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
            changelog: String::new(),
            triggers: Vec::new(),
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

}

/// Ends the session holding `slot` and waits until the slot is free.
async fn end_slot_session(c: &Client, slot: &str, pid: i32) -> Result<()> {
    c.execute("SELECT pg_terminate_backend($1)", &[&pid]).await.pg("ending the session holding the replication slot")?;
    wait_slot_inactive(c, slot).await
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

    /// The WAL flushed so far: what the stream can reach.
    fn current_position(&mut self) -> Result<u64> {
        let h = self.handle.clone();
        h.block_on(self.lsn("SELECT pg_current_wal_flush_lsn()::text"))
    }

    fn skip_to(&mut self, position: u64) -> Result<()> {
        self.confirm(position)
    }

    fn next_batch(&mut self, max_changes: usize, upto: u64) -> Result<StreamBatch> {
        if self.reader.is_none() {
            let decoder = Decoder::new(self.table.clone(), self.spec.clone(), self.fixed_dims.clone());
            self.reader = Some(Reader::start(&self.url, &self.app_name, &self.slot, &self.publication, self.confirmed, decoder, max_changes)?);
        }
        let r = self.reader.as_ref().unwrap().next(Duration::from_millis(200));
        match r {
            Ok(mut batch) => {
                // The reader hands over part batches whenever the applier waits
                // (a slow target takes them as they come), so a backlog seldom
                // comes in full ones: changes committed a while ago, short of
                // where the server was, are a backlog too, and so is a part batch
                // far short of it.
                let old = batch.set.commit_time_us.is_some_and(|ts| chrono::Utc::now().timestamp_micros() - ts > BACKLOG_AGE_US);
                if batch.drained_to.is_some_and(|d| d < upto && (old || upto - d > BACKLOG_WAL_BYTES)) {
                    batch.drained_to = None;
                }
                Ok(batch)
            }
            Err(e) => {
                // Started again from the applied position by the next read.
                self.reader = None;
                Err(e)
            }
        }
    }

    fn confirm(&mut self, position: u64) -> Result<()> {
        if position <= self.confirmed {
            return Ok(());
        }
        self.confirmed = position;
        match &self.reader {
            Some(r) => r.confirm(position),
            None => Ok(()), // reported when the stream starts from it
        }
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
        Ok(StreamStats {
            source_position: current,
            confirmed,
            retained_bytes: current.saturating_sub(restart),
            ..Default::default()
        })
    }

    fn drop_artifacts(&mut self) -> Result<()> {
        let h = self.handle.clone();
        let url = self.url.clone();
        let slot = self.slot.clone();
        self.reader = None; // ends our streaming session, which holds the slot
        self.client = None;
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
            end_slot_session(&c, name, pid).await?;
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
