//! OceanBase / seekdb change capture for online jobs. seekdb has no binlog a
//! client can follow, so before the snapshot copy vmig installs row triggers
//! that append `(seq, op, id, at)` to a changelog table next to the source
//! table. Applying reads the changelog in `seq` order, re-reads the current
//! rows of the changed ids (gone ids are deletes), and purges exactly the
//! changelog rows it applied once every target has them. Re-reading current
//! rows makes a replay converge, so the snapshot needs no shared snapshot and
//! a resumed job simply applies what is left in the changelog again.

use std::collections::BTreeMap;
use std::sync::Arc;

use mysql_async::prelude::Queryable;

use super::*;
use crate::contract::Feedback;
use crate::contract::changes::{ChangeCounts, ChangeSet, ChangeStream, PositionUnit, StreamBatch, StreamStats};
use crate::model::now_rfc3339;
use crate::model::plan::Key;
use crate::state::online::OnlineState;

/// Changelog rows purged per statement.
const PURGE_ROWS: usize = 5_000;

/// The changelog table and the three triggers vmig installs for `table`.
#[derive(Clone, Debug)]
pub struct Capture {
    pub changelog: String,
    pub triggers: [String; 3],
}

impl Capture {
    pub fn for_table(table: &str) -> Capture {
        let clean: String =
            table.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).collect();
        let name = |prefix: &str, suffix: &str| {
            let mut s = format!("{prefix}{clean}");
            s.truncate(64 - suffix.len());
            s + suffix
        };
        Capture {
            changelog: name("vmig_changes_", ""),
            triggers: [name("vmig_", "_ins"), name("vmig_", "_upd"), name("vmig_", "_del")],
        }
    }

    fn from_state(st: &OnlineState) -> Capture {
        let mut c = Capture::for_table("");
        c.changelog = st.changelog.clone();
        for (i, t) in st.triggers.iter().take(3).enumerate() {
            c.triggers[i] = t.clone();
        }
        c
    }

    pub fn describe(&self) -> String {
        format!("changelog table {} and triggers {}", self.changelog, self.triggers.join(", "))
    }

    /// Which of the changelog and triggers exist.
    async fn present(&self, c: &mut Conn) -> Result<(bool, usize)> {
        let table = query_i64(
            c,
            &format!(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = database() AND table_name = {}",
                str_literal(&self.changelog)
            ),
            "looking for the changelog table",
        )
        .await?
        .unwrap_or(0);
        let list: Vec<String> = self.triggers.iter().map(|t| str_literal(t)).collect();
        let triggers = query_i64(
            c,
            &format!(
                "SELECT count(*) FROM information_schema.triggers WHERE trigger_schema = database() AND trigger_name IN ({})",
                list.join(",")
            ),
            "looking for the triggers",
        )
        .await?
        .unwrap_or(0);
        Ok((table > 0, triggers as usize))
    }

    /// Drops the triggers first (writes stop being logged), then the changelog.
    async fn drop_all(&self, c: &mut Conn) -> Result<Vec<String>> {
        let (table, triggers) = self.present(c).await?;
        for t in &self.triggers {
            c.query_drop(format!("DROP TRIGGER IF EXISTS {}", ident(t))).await.ob("dropping a trigger")?;
        }
        if table {
            c.query_drop(format!("DROP TABLE IF EXISTS {}", ident(&self.changelog))).await.ob("dropping the changelog")?;
        }
        let mut dropped = Vec::new();
        if triggers > 0 {
            dropped.push(format!("triggers {}", self.triggers.join(", ")));
        }
        if table {
            dropped.push(format!("changelog table {}", self.changelog));
        }
        Ok(dropped)
    }

    async fn install(&self, c: &mut Conn, url: &ObUrl, table: &str, pk: &ColumnSpec) -> Result<()> {
        let log = ident(&self.changelog);
        c.query_drop(format!(
            "CREATE TABLE {log} (seq BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY, op CHAR(1) NOT NULL, \
             id {} NOT NULL, at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6))",
            key_sql_type(pk)
        ))
        .await
        .ob("creating the changelog table")?;
        let (t, pk) = (ident(table), ident(&pk.name));
        // An update that changes the key logs the old key too (it is gone).
        let bodies = [
            ("INSERT", format!("INSERT INTO {log} (op, id) VALUES ('I', NEW.{pk})")),
            (
                "UPDATE",
                format!(
                    "INSERT INTO {log} (op, id) SELECT 'U', NEW.{pk} FROM DUAL \
                     UNION ALL SELECT 'D', OLD.{pk} FROM DUAL WHERE OLD.{pk} <> NEW.{pk}"
                ),
            ),
            ("DELETE", format!("INSERT INTO {log} (op, id) VALUES ('D', OLD.{pk})")),
        ];
        for (name, (event, body)) in self.triggers.iter().zip(bodies) {
            let r = c.query_drop(format!("CREATE TRIGGER {} AFTER {event} ON {t} FOR EACH ROW {body}", ident(name))).await;
            if let Err(e) = r {
                let _ = self.drop_all(c).await;
                if matches!(&e, mysql_async::Error::Server(s) if s.code == 1142 || s.code == 1227) {
                    bail!(
                        "user {} on source {} lacks the TRIGGER privilege that online migration from OceanBase needs \
                         (vmig logs changes with triggers): GRANT TRIGGER ON {}.* TO {}",
                        url.user,
                        url.redacted(),
                        url.database,
                        url.user
                    );
                }
                return Err(e).ob(&format!("creating trigger {name}"));
            }
        }
        Ok(())
    }
}

pub struct ObChangeStream {
    url: ObUrl,
    handle: Handle,
    capture: Capture,
    source: Arc<ObSource>,
    conn: Option<Conn>,
    /// Highest changelog sequence read or seen.
    high: u64,
    confirmed: u64,
    /// Batches read and not yet purged: their highest seq and every seq.
    pending: Vec<(u64, Vec<u64>)>,
}

impl ObChangeStream {
    /// Installs capture for a new online job (before the snapshot copy), or
    /// reopens it for a resumed one. `committed`: the targets already hold
    /// part of the job, so a lost changelog cannot be silently recreated.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        url: ObUrl,
        table: &str,
        handle: Handle,
        job_dir: &std::path::Path,
        source: Arc<ObSource>,
        committed: bool,
        fb: &dyn Feedback,
    ) -> Result<ObChangeStream> {
        let capture = Capture::for_table(table);
        let state = OnlineState::load(job_dir)?;
        let pk = source.spec().column(&source.spec().primary_key).cloned().ok_or_else(|| anyhow!("no primary key column"))?;
        let conn = handle.block_on(async {
            let mut c = connect(&url).await?;
            let (has_log, triggers) = capture.present(&mut c).await?;
            let complete = has_log && triggers == 3;
            if committed {
                if !complete {
                    bail!(
                        "the {} of this job on source {} are gone (or incomplete), so changes since the job's last \
                         applied batch may be lost; run `vmig reset` for this job (with --to and --from) and start again",
                        capture.describe(),
                        url.redacted()
                    );
                }
                let n = query_i64(&mut c, &format!("SELECT count(*) FROM {}", ident(&capture.changelog)), "counting changes")
                    .await?
                    .unwrap_or(0);
                fb.say(&format!("resuming change capture from changelog {} ({n} changes waiting)", capture.changelog));
            } else {
                if has_log || triggers > 0 {
                    if state.as_ref().is_none_or(|s| s.kind != "oceanbase") {
                        bail!(
                            "source {} already has {} (another online job follows table {table}, or its reset did not \
                             finish): reset that job with --from, or drop them",
                            url.redacted(),
                            capture.describe()
                        );
                    }
                    // Ours, from a run that copied nothing: start clean.
                    fb.say(&format!("dropping the {} of an earlier run that copied nothing", capture.describe()));
                    capture.drop_all(&mut c).await?;
                }
                // Recorded before anything exists, so reset can always find it.
                save_state(&capture, &url, job_dir, "pending")?;
                capture.install(&mut c, &url, table, &pk).await?;
                save_state(&capture, &url, job_dir, "installed before the snapshot copy")?;
                fb.say(&format!("installed {} on {}", capture.describe(), url.redacted()));
            }
            Ok::<_, anyhow::Error>(c)
        })?;
        if state.is_none() && committed {
            save_state(&capture, &url, job_dir, "recorded on resume")?;
        }
        Ok(ObChangeStream { url, handle, capture, source, conn: Some(conn), high: 0, confirmed: 0, pending: Vec::new() })
    }

    async fn conn(&mut self) -> Result<&mut Conn> {
        if self.conn.is_none() {
            self.conn = Some(connect(&self.url).await?);
        }
        Ok(self.conn.as_mut().unwrap())
    }

    /// Runs `f` on the stream's session; a failed session is replaced next time.
    fn with_conn<T>(&mut self, f: impl AsyncFnOnce(&mut Conn, &str) -> Result<T>) -> Result<T> {
        let h = self.handle.clone();
        let log = ident(&self.capture.changelog);
        let r = h.block_on(async {
            let c = self.conn().await?;
            f(c, &log).await
        });
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    /// Purges the changelog rows of every applied batch.
    fn purge(&mut self) -> Result<()> {
        let upto = self.confirmed;
        let seqs: Vec<u64> =
            self.pending.iter().filter(|(max, _)| *max <= upto).flat_map(|(_, s)| s.iter().copied()).collect();
        if seqs.is_empty() {
            return Ok(());
        }
        self.with_conn(async |c, log| {
            for part in seqs.chunks(PURGE_ROWS) {
                let list: Vec<String> = part.iter().map(|s| s.to_string()).collect();
                c.query_drop(format!("DELETE FROM {log} WHERE seq IN ({})", list.join(",")))
                    .await
                    .ob("purging applied changes")?;
            }
            Ok(())
        })?;
        self.pending.retain(|(max, _)| *max > upto);
        Ok(())
    }
}

fn save_state(capture: &Capture, url: &ObUrl, job_dir: &std::path::Path, note: &str) -> Result<()> {
    OnlineState {
        kind: "oceanbase".into(),
        source: url.redacted(),
        slot: String::new(),
        publication: String::new(),
        changelog: capture.changelog.clone(),
        triggers: capture.triggers.to_vec(),
        created_at: now_rfc3339(),
        consistent_point: note.into(),
    }
    .save(job_dir)
}

impl ChangeStream for ObChangeStream {
    fn artifacts(&self) -> String {
        format!("{} on {}", self.capture.describe(), self.url.redacted())
    }

    fn format_position(&self, p: u64) -> String {
        format!("changelog seq {p}")
    }

    fn idempotent(&self) -> bool {
        true
    }

    fn current_position(&mut self) -> Result<u64> {
        let max = self.with_conn(async |c, log| {
            Ok(query_i64(c, &format!("SELECT COALESCE(MAX(seq), 0) FROM {log}"), "reading the changelog").await?.unwrap_or(0))
        })?;
        self.high = self.high.max(max as u64);
        Ok(self.high)
    }

    fn skip_to(&mut self, position: u64) -> Result<()> {
        self.high = self.high.max(position);
        self.confirmed = self.confirmed.max(position);
        Ok(())
    }

    fn next_batch(&mut self, max_changes: usize, _upto: u64) -> Result<StreamBatch> {
        // A purge that failed earlier is retried first (its rows would be read again).
        self.purge()?;
        let rows: Vec<(u64, String, String, i64)> = self.with_conn(async |c, log| {
            c.query(format!(
                "SELECT seq, op, id, CAST(UNIX_TIMESTAMP(at) * 1000000 AS SIGNED) FROM {log} ORDER BY seq LIMIT {max_changes}"
            ))
            .await
            .ob("reading the changelog")
        })?;
        let mut counts = ChangeCounts::default();
        // Collapsed per id: what happened last does not matter, the current row does.
        let key = KeySql::of(self.source.spec());
        let mut ids: BTreeMap<Key, ()> = BTreeMap::new();
        let mut seqs = Vec::with_capacity(rows.len());
        for (seq, op, id, _) in &rows {
            match op.as_str() {
                "I" => counts.inserts += 1,
                "U" => counts.updates += 1,
                _ => counts.deletes += 1,
            }
            ids.insert(key.parse(id)?, ());
            seqs.push(*seq);
        }
        let max_seq = seqs.iter().copied().max().unwrap_or(0);
        self.high = self.high.max(max_seq);
        let mut set = ChangeSet { position: self.high, commit_time_us: rows.last().map(|r| r.3), counts, ..Default::default() };
        if !ids.is_empty() {
            let wanted: Vec<Key> = ids.into_keys().collect();
            let pk = self.source.spec().primary_key.clone();
            let mut found = std::collections::HashSet::new();
            self.source.read_rows_by_id(&wanted, &mut |b| {
                found.extend(crate::contract::changes::keys_of(&b, &pk)?);
                set.images.push(b);
                Ok(())
            })?;
            set.deletes = wanted.into_iter().filter(|k| !found.contains(k)).collect();
            self.pending.push((self.high, seqs));
        }
        // Fewer rows than asked: everything committed before the read is in it.
        let drained_to = (rows.len() < max_changes).then_some(self.high);
        Ok(StreamBatch { set, drained_to })
    }

    fn confirm(&mut self, position: u64) -> Result<()> {
        self.confirmed = self.confirmed.max(position);
        // Not fatal: rows left in the changelog are applied again (it converges).
        if let Err(e) = self.purge() {
            say!("warning: purging applied changes from {} failed ({e:#}); retrying later", self.capture.changelog);
        }
        Ok(())
    }

    fn stats(&mut self) -> Result<StreamStats> {
        let (max, waiting) = self.with_conn(async |c, log| {
            let r: Option<(i64, i64)> = c
                .query_first(format!("SELECT COALESCE(MAX(seq), 0), count(*) FROM {log}"))
                .await
                .ob("reading the changelog")?;
            Ok(r.unwrap_or((0, 0)))
        })?;
        self.high = self.high.max(max as u64);
        Ok(StreamStats {
            source_position: self.high,
            // Changes still in the changelog are not applied yet.
            confirmed: self.high.saturating_sub(waiting as u64),
            retained_bytes: waiting as u64,
            unit: PositionUnit::Changes,
            note: None,
        })
    }

    fn drop_artifacts(&mut self) -> Result<()> {
        let capture = self.capture.clone();
        self.with_conn(async |c, _| capture.drop_all(c).await.map(|_| ()))
    }
}

/// Drops the triggers and changelog an online job recorded in its state;
/// returns what was dropped.
pub fn drop_recorded(url: &ObUrl, state: &OnlineState, handle: &Handle) -> Result<Vec<String>> {
    let capture = Capture::from_state(state);
    handle.block_on(async {
        let mut c = connect(url).await?;
        capture.drop_all(&mut c).await
    })
}
