//! Milvus "change capture" for online jobs. Milvus 2.3 has no change feed a
//! client can follow, and FastGPT never updates a row in place: it inserts
//! new rows (new id, createTime = now) and deletes by filter. So inserts are
//! polled by a createTime watermark (with a margin for clock skew and inserts
//! in flight, reading at a timestamp allocated from Milvus), and everything
//! the watermark cannot see — deletes, rows written with an old createTime —
//! is found by an id-set reconcile against the target, every so often and
//! always before a cutover. Nothing is installed on the source.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::backends::milvus::MilvusSource;
use crate::contract::Source;
use crate::contract::changes::{ChangeCounts, ChangeSet, ChangeStream, PositionUnit, StreamBatch, StreamStats};
use crate::contract::reconcile::{changes_for, diff_ids};
use crate::model::now_rfc3339;
use crate::model::plan::{ChunkRange, Key};
use crate::state::online::OnlineState;

/// Opens the target as the reconcile reads it (its current ids).
pub type OpenTarget = Box<dyn Fn() -> Result<Arc<dyn Source>> + Send>;

pub struct MilvusChangeStream {
    source: Arc<MilvusSource>,
    describe: String,
    /// The Int64 epoch-ms field polled (FastGPT: createTime); None: reconcile alone.
    time_field: Option<String>,
    margin_ms: i64,
    /// Every row with a time at or after this (less the margin) is polled.
    watermark: i64,
    /// Rows applied whose time is inside the margin: a poll sees them again.
    seen: HashMap<Key, i64>,
    open_target: OpenTarget,
    reconcile_every: Duration,
    last_reconcile: Instant,
    last_reconcile_summary: Option<String>,
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn format_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()).unwrap_or(ms.to_string())
}

impl MilvusChangeStream {
    /// `started_ms`: taken before the snapshot's read timestamp, so the first
    /// poll covers every row the snapshot may have missed. A resumed job
    /// starts from the watermark in its state (or, later, its ledger).
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        source: Arc<MilvusSource>,
        job_dir: &std::path::Path,
        started_ms: i64,
        margin: Duration,
        reconcile_every: Duration,
        open_target: OpenTarget,
        fb: &dyn crate::contract::Feedback,
    ) -> Result<MilvusChangeStream> {
        let coll = source.collection();
        let time_field = coll.fields.iter().find(|f| matches!(f.kind, crate::backends::milvus::mapping::FieldKind::EpochMs)).map(|f| f.field.clone());
        let describe = source.describe();
        let watermark = match OnlineState::load(job_dir)?.filter(|s| s.kind == "milvus") {
            Some(st) => st.consistent_point.parse().unwrap_or(started_ms),
            None => {
                OnlineState {
                    kind: "milvus".into(),
                    source: describe.clone(),
                    slot: String::new(),
                    publication: String::new(),
                    changelog: String::new(),
                    triggers: Vec::new(),
                    created_at: now_rfc3339(),
                    consistent_point: started_ms.to_string(),
                }
                .save(job_dir)?;
                started_ms
            }
        };
        match &time_field {
            Some(f) => fb.say(&format!(
                "following {describe} by {f} ≥ {} (less {} s), and an id-set reconcile every {} s",
                format_ms(watermark),
                margin.as_secs(),
                reconcile_every.as_secs()
            )),
            None => fb.say(&format!(
                "{describe} has no time field (Int64 epoch ms, like FastGPT's createTime): following it by an id-set \
                 reconcile alone, every {} s",
                reconcile_every.as_secs()
            )),
        }
        Ok(MilvusChangeStream {
            source,
            describe,
            time_field,
            margin_ms: margin.as_millis() as i64,
            watermark,
            seen: HashMap::new(),
            open_target,
            reconcile_every,
            last_reconcile: Instant::now(),
            last_reconcile_summary: None,
        })
    }
}

impl ChangeStream for MilvusChangeStream {
    fn artifacts(&self) -> String {
        format!("nothing on {} (polled by watermark; deletes found by reconcile)", self.describe)
    }

    fn format_position(&self, p: u64) -> String {
        format!("watermark {}", format_ms(p as i64))
    }

    fn current_position(&mut self) -> Result<u64> {
        Ok(now_ms().max(0) as u64)
    }

    fn skip_to(&mut self, position: u64) -> Result<()> {
        self.watermark = self.watermark.max(position as i64);
        Ok(())
    }

    fn idempotent(&self) -> bool {
        true
    }

    fn next_batch(&mut self, max_changes: usize, _upto: u64) -> Result<StreamBatch> {
        let read_at = now_ms();
        let Some(field) = self.time_field.clone() else {
            return Ok(StreamBatch { set: ChangeSet { position: self.watermark.max(0) as u64, ..Default::default() }, drained_to: Some(read_at as u64) });
        };
        self.source.read_now()?;
        let from = self.watermark - self.margin_ms;
        let mut fresh: Vec<(i64, Key)> = self
            .source
            .ids_with(&field, &format!("{field} >= {from}"))?
            .into_iter()
            .filter(|(id, t)| self.seen.get(id) != Some(t))
            .map(|(id, t)| (t, id))
            .collect();
        fresh.sort_unstable();
        let truncated = fresh.len() > max_changes;
        fresh.truncate(max_changes);
        let mut set = ChangeSet::default();
        if let Some(&(last_t, _)) = fresh.last() {
            let ids: Vec<Key> = fresh.iter().map(|(_, id)| id.clone()).collect();
            self.source.read_rows_by_id(&ids, &mut |b| {
                set.images.push(b);
                Ok(())
            })?;
            // A row deleted between the two reads is simply not there; reconcile covers it.
            set.counts = ChangeCounts { inserts: set.images.iter().map(|b| b.num_rows() as u64).sum(), ..Default::default() };
            set.commit_time_us = Some(last_t * 1000);
            // Never past the poll's own time: a row stamped in the future
            // (a client's clock ahead) must not hide the rows after it.
            self.watermark = self.watermark.max(last_t.min(read_at));
            for (t, id) in &fresh {
                self.seen.insert(id.clone(), *t);
            }
            let floor = self.watermark - self.margin_ms;
            self.seen.retain(|_, t| *t >= floor);
        }
        set.position = self.watermark.max(0) as u64;
        Ok(StreamBatch { set, drained_to: (!truncated).then_some(read_at as u64) })
    }

    fn confirm(&mut self, _position: u64) -> Result<()> {
        Ok(())
    }

    fn reconcile(&mut self, now: bool) -> Result<Option<ChangeSet>> {
        if !now && self.last_reconcile.elapsed() < self.reconcile_every {
            return Ok(None);
        }
        self.last_reconcile = Instant::now();
        let target = (self.open_target)()?;
        self.source.read_now()?;
        let diff = diff_ids(self.source.as_ref(), target.as_ref(), &ChunkRange::whole())?;
        let set = changes_for(self.source.as_ref(), &diff)?;
        let summary = format!("reconcile at {}: {}", now_rfc3339(), diff.summary());
        if set.has_rows() || now {
            say!("{summary}");
        }
        self.last_reconcile_summary = Some(summary);
        Ok(Some(ChangeSet { position: self.watermark.max(0) as u64, ..set }))
    }

    fn stats(&mut self) -> Result<StreamStats> {
        let how = match &self.time_field {
            Some(f) => format!("polling {f} ≥ {} less {} s", format_ms(self.watermark), self.margin_ms / 1000),
            None => "no time field: followed by id-set reconcile alone".to_string(),
        };
        let next = self.reconcile_every.saturating_sub(self.last_reconcile.elapsed()).as_secs();
        let last = self.last_reconcile_summary.as_deref().unwrap_or("no reconcile yet");
        Ok(StreamStats {
            source_position: now_ms().max(0) as u64,
            confirmed: self.watermark.max(0) as u64,
            retained_bytes: 0,
            unit: PositionUnit::Watermark,
            note: Some(format!("milvus source: {how}; next reconcile in {next} s; {last}")),
        })
    }

    fn drop_artifacts(&mut self) -> Result<()> {
        Ok(())
    }

    fn removes_artifacts(&self) -> bool {
        false
    }
}
