//! PostgreSQL target indexes: built after the load with the source's
//! definitions, beside each other, HNSW memory sized from the graph's estimate.

use super::*;

impl PgSink {
    /// Sizes the session's maintenance_work_mem for the largest HNSW graph
    /// (pgvector builds far faster while the graph fits in it), within the
    /// cap, and says what it chose and why; warns before the build when the
    /// graph cannot fit.
    pub(super) async fn size_index_memory(&self, c: &Client, spec: &TableSpec, cap: Option<u64>, fb: &dyn Feedback) -> Result<()> {
        let floor: u64 = 1 << 30;
        let graphs: Vec<(u32, u64, u32)> = spec
            .indexes
            .iter()
            .filter_map(|ix| match &ix.kind {
                IndexKind::Hnsw { m, .. } => {
                    let col = spec.columns.iter().find(|c| ix.columns.first() == Some(&c.name))?;
                    let per_value = if matches!(col.ty, ColumnType::HalfVec { .. }) { 2 } else { 4 };
                    Some((col.ty.vector_dim()?, per_value, *m))
                }
                _ => None,
            })
            .collect();
        let (cap, cap_from) = match cap {
            Some(b) => (b, "--index-memory".to_string()),
            None => match server_memory(c).await {
                Some(total) => (total / 4, format!("a quarter of the server's {}", crate::model::human_bytes(total))),
                None => (floor, "vmig's default (the server's memory is not readable to this role)".to_string()),
            },
        };
        let current: i64 = c
            .query_one("SELECT setting::bigint * 1024 FROM pg_settings WHERE name = 'maintenance_work_mem'", &[])
            .await
            .pg("reading maintenance_work_mem")?
            .get(0);
        let Some(&(dim, per_value, m)) = graphs.iter().max_by_key(|(d, b, m)| *d as u64 * b + *m as u64) else {
            let chosen = floor.max(current as u64).min(cap).max(1 << 20);
            return c.batch_execute(&format!("SET maintenance_work_mem = '{}kB'", chosen >> 10)).await.pg("setting maintenance_work_mem");
        };
        let rows: i64 = c.query_one(&format!("SELECT count(*) FROM {}", self.table.sql()), &[]).await.pg("counting rows")?.get(0);
        let need = hnsw_graph_bytes(rows.max(0) as u64, dim, per_value, m);
        // Room over the estimate, never below what the server or 1 GB gives; the cap wins.
        let chosen = (need + need / 4).max(floor).max(current as u64).min(cap).max(1 << 20);
        c.batch_execute(&format!("SET maintenance_work_mem = '{}kB'", chosen >> 10)).await.pg("setting maintenance_work_mem")?;
        let workers: String =
            c.query_one("SELECT current_setting('max_parallel_maintenance_workers')", &[]).await.pg("reading max_parallel_maintenance_workers")?.get(0);
        let hb = crate::model::human_bytes;
        fb.say(&format!(
            "HNSW graph ≈ {} ({rows} rows × {dim} dims, m={m}); maintenance_work_mem {} (cap {} from {cap_from}); \
             {workers} parallel maintenance workers (the server's max_parallel_maintenance_workers)",
            hb(need),
            hb(chosen),
            hb(cap)
        ));
        if need > chosen {
            fb.say(&format!(
                "warning: the HNSW graph (≈{}) does not fit in maintenance_work_mem ({}): pgvector builds much more slowly once it \
                 overflows; --index-memory {}MB would make it fit, if the server has that much free memory",
                hb(need),
                hb(chosen),
                (need + need / 4).div_ceil(1 << 20)
            ));
        }
        Ok(())
    }

    pub(super) async fn create_indexes(&self, c: &Client, spec: &TableSpec, cap: Option<u64>, fb: &dyn Feedback) -> Result<()> {
        let existing: Vec<(String, bool)> = c
            .query(
                "SELECT c.relname::text, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
                 WHERE i.indrelid = to_regclass($1)",
                &[&self.table.sql()],
            )
            .await
            .pg("listing target indexes")?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        if spec.indexes.iter().any(|ix| !existing.iter().any(|(n, valid)| n == &ix.name && *valid)) {
            self.size_index_memory(c, spec, cap, fb).await?;
        }
        let mut todo: Vec<&IndexSpec> = Vec::new();
        for ix in &spec.indexes {
            // Indexes this table already has are kept. No IF NOT EXISTS: a name
            // taken by another table's index must fail, not silently skip the index.
            match existing.iter().find(|(n, _)| n == &ix.name) {
                Some((_, true)) => continue,
                Some((_, false)) => {
                    // Left INVALID by a build that did not finish: unusable, so rebuilt.
                    fb.say(&format!("index {} is INVALID (a build that did not finish); dropping and rebuilding it", ix.name));
                    let drop = format!("DROP INDEX IF EXISTS {}", self.index_sql_name(&ix.name));
                    c.batch_execute(&drop).await.pg(&format!("dropping invalid index {}", ix.name))?;
                }
                None => {}
            }
            todo.push(ix);
        }
        // Every build runs at once, each on a session of its own: the btree
        // indexes beside the vector index instead of after it. The vector
        // index is built last on `c`, the session sized for its graph, and
        // its progress is what the phase shows.
        todo.sort_by_key(|ix| matches!(ix.kind, IndexKind::Hnsw { .. }));
        let mut sessions = Vec::new();
        for _ in 1..todo.len() {
            sessions.push(self.pool.get().await?);
        }
        let sqls: Vec<String> = todo.iter().map(|ix| create_index_sql(&self.table, spec, ix)).collect();
        let last_pid: i32 = c.query_one("SELECT pg_backend_pid()", &[]).await.pg("reading the session's pid")?.get(0);
        let started = std::time::Instant::now();
        let outcome = {
            let mut builds = Vec::new();
            for (i, (ix, sql)) in todo.iter().zip(&sqls).enumerate() {
                let session = if i + 1 == todo.len() { c } else { &sessions[i] };
                let name = ix.name.clone();
                let on = self.table.plain();
                let mut build = Box::pin(async move {
                    let r = session.batch_execute(sql).await;
                    // Each build ends on its own; the report times each.
                    fb.index_finished(&on, &name, r.is_ok());
                    (name, r, started.elapsed().as_secs_f64())
                });
                fb.index_started(&self.table.plain(), &ix.name);
                // Send the statement before announcing the phase: from here on the
                // build runs in the server even if this process dies.
                let done = std::future::poll_fn(|cx| std::task::Poll::Ready(build.as_mut().poll(cx))).await;
                fb.phase(&format!("building index {}", ix.name));
                builds.push((done, build));
            }
            if let Some(last) = todo.last() {
                let all = futures_util::future::join_all(builds.into_iter().map(|(done, build)| async move {
                    match done {
                        std::task::Poll::Ready(r) => r,
                        std::task::Poll::Pending => build.await,
                    }
                }));
                let watcher = self.watch_index_build(last.name.clone(), last_pid, fb);
                tokio::pin!(all, watcher);
                let results = tokio::select! {
                    r = &mut all => r,
                    _ = &mut watcher => unreachable!(),
                };
                let mut first_error = None;
                for (name, r, seconds) in results {
                    match r {
                        Ok(()) => fb.say(&format!("index {name} built in {seconds:.1}s")),
                        Err(e) if first_error.is_none() => first_error = Err::<(), _>(e).pg(&format!("building index {name}")).err(),
                        Err(_) => {}
                    }
                }
                first_error.map_or(Ok(()), Err)
            } else {
                Ok(())
            }
        };
        for session in sessions {
            self.pool.put(session);
        }
        outcome
    }

    pub(super) fn index_sql_name(&self, name: &str) -> String {
        match &self.table.schema {
            Some(s) => format!("{}.{}", ident(s), ident(name)),
            None => ident(name),
        }
    }

    /// Reports CREATE INDEX progress from pg_stat_progress_create_index until dropped.
    /// Shows the progress of the index build session `pid` runs.
    pub(super) async fn watch_index_build(&self, name: String, pid: i32, fb: &dyn Feedback) {
        let Ok(c) = connect(&self.url).await else { return std::future::pending().await };
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if let Ok(Some(r)) = c
                .query_opt(
                    "SELECT phase, tuples_done, tuples_total, blocks_done, blocks_total FROM pg_stat_progress_create_index \
                     WHERE pid = $1",
                    &[&pid],
                )
                .await
            {
                let phase: String = r.get(0);
                let (td, tt, bd, bt): (i64, i64, i64, i64) = (r.get(1), r.get(2), r.get(3), r.get(4));
                let pct = if tt > 0 { 100.0 * td as f64 / tt as f64 } else if bt > 0 { 100.0 * bd as f64 / bt as f64 } else { 0.0 };
                fb.phase(&format!("building index {name} ({phase}, {pct:.0}%)"));
            }
        }
    }

}

/// pgvector's in-memory HNSW graph, estimated per element: its vector, its
/// neighbour lists (2·m at layer 0, about m/(m−1) more above; 16 bytes per
/// candidate) and ~100 bytes of element header and heap pointers.
pub fn hnsw_graph_bytes(rows: u64, dim: u32, bytes_per_value: u64, m: u32) -> u64 {
    let m = m.max(2) as u64;
    let neighbours = 2 * m + m / (m - 1) + 1;
    rows * (dim as u64 * bytes_per_value + 8 + neighbours * 16 + 100)
}



/// The server's memory, where this role may read /proc/meminfo through the server.
async fn server_memory(c: &Client) -> Option<u64> {
    let text: String = c.query_one("SELECT pg_read_file('/proc/meminfo', 0, 200)", &[]).await.ok()?.get(0);
    let kb: u64 = text.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb << 10)
}

#[cfg(test)]
mod sizing_tests {
    #[test]
    fn a_fastgpt_graph_of_200k_rows_no_longer_fits_in_1gb() {
        // 1536-d float vectors, m = 16: about 6.9 KB per row.
        let b = super::hnsw_graph_bytes(200_000, 1536, 4, 16);
        assert!(b > 1 << 30 && b < 3 << 29, "{b}");
        assert!(super::hnsw_graph_bytes(20_000, 1536, 4, 16) < 1 << 30);
    }
}
