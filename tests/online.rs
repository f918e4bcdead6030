//! Online migration from PostgreSQL against real servers: a writer imitates
//! FastGPT traffic on the source through the snapshot and the stream; the
//! job is killed (SIGKILL) during the snapshot and while following, resumed,
//! cut over; the target must then equal the source row by row, with the
//! sequence past max(id) and no slot or publication left on the source.
mod common;

use common::faults::{Moment, start, wait_for};
use common::milvus_db::{as_mrows, fastgpt_rows, fresh_milvus_db, milvus_count_settled, milvus_count_where, milvus_insert_copy, milvus_rows, milvus_upsert, seed_fastgpt};
use common::online::{
    OnlineSource, Reaper, Writer, applied, assert_read_changed_keys_only, online_args, online_scenario, source_artifacts, staging_scenario,
    wait_following, wait_for_a_digested_pass,
};
use common::*;

fn http_get(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    s
}

/// A PostgreSQL source of 1,600 rows, the writer, and where its slot would stay.
fn pg_source(name: &str) -> OnlineSource {
    let src = fresh_db(&source_base(), &format!("{name}_src"), true);
    ok(&["generate", "--to", &src, "--rows", "1600", "--dim", "1536"]);
    let (w, l) = (src.clone(), src.clone());
    let artifact = format!("vmig_{name}");
    OnlineSource {
        url: src,
        extra_args: Vec::new(),
        writer: Box::new(move || Writer::start(&w)),
        leftovers: Box::new(move || {
            let (slots, pubs) = source_artifacts(&l, &artifact);
            if (slots, pubs) == (0, 0) { String::new() } else { format!("{slots} slots, {pubs} publications") }
        }),
    }
}

#[test]
fn online_into_postgres_survives_kills_and_cuts_over_exactly() {
    let dst = fresh_db(&target_base(), "online_pg_dst", true);
    online_scenario("online_pg", &pg_source("online_pg"), &dst, &|src| {
        let n = assert_same_rows(src, "modeldata", &dst, "modeldata");
        let max_id = query_i64(&dst, "SELECT max(id) FROM modeldata");
        let next = query_i64(&dst, "SELECT nextval('modeldata_id_seq')");
        assert!(next > max_id, "sequence {next} not past max(id) {max_id}");
        assert!(n > 1200);
    });
}

#[test]
fn online_into_oceanbase_survives_kills_and_cuts_over_exactly() {
    let ob = fresh_ob_db("online_ob");
    online_scenario("online_ob", &pg_source("online_ob"), &ob, &|src| {
        let want = rows(src, "modeldata");
        assert_rows_equal(&want, &ob_rows(&ob, "modeldata"));
        let ddl = ob_query_string(&ob, "SHOW CREATE TABLE modeldata");
        let auto: i64 = ddl.split("AUTO_INCREMENT = ").nth(1).and_then(|t| t.split_whitespace().next()).unwrap().parse().unwrap();
        assert!(auto > want.last().unwrap().id, "AUTO_INCREMENT {auto} past max(id)");
    });
}

#[test]
fn online_into_milvus_survives_kills_and_cuts_over_exactly() {
    let m = fresh_milvus_db("online_mv");
    online_scenario("online_mv", &pg_source("online_mv"), &m, &|src| {
        let want = as_mrows(&rows(src, "modeldata"));
        assert_eq!(milvus_count_settled(&m, "modeldata", want.len() as i64), want.len() as i64, "count(*) equals the source: no duplicates");
        assert_eq!(milvus_rows(&m, "modeldata"), want);
    });
}

/// Online across hosts: export and import are separate processes joined
/// only by the staging directory (snapshot chunks, then change files).
#[test]
fn online_through_staging_with_separate_export_and_import_survives_kills() {
    let name = "online_st";
    let source = pg_source(name);
    let src = source.url.clone();
    let dst = fresh_db(&target_base(), &format!("{name}_dst"), true);
    let dir = staging_scenario(name, &source, &dst);
    let st_s = dir.path().join("st").to_str().unwrap().to_string();
    assert_same_rows(&src, "modeldata", &dst, "modeldata");
    assert!(query_i64(&dst, "SELECT nextval('modeldata_id_seq')") > query_i64(&dst, "SELECT max(id) FROM modeldata"));
    // Change files are plain Parquet: any reader gets ops, keys and row images.
    let py = std::env::var("VMIG_TEST_PYTHON").expect("VMIG_TEST_PYTHON not set: run the suite through scripts/test.sh");
    let script = format!(
        "import pyarrow.parquet as pq, pyarrow as pa, duckdb, glob, json\n\
         files = sorted(glob.glob('{st_s}/changes/*.parquet'))\n\
         t = pa.concat_tables([pq.read_table(f) for f in files])\n\
         marked = sum(json.load(open(f))['rows'] for f in glob.glob('{st_s}/changes/*.commit.json'))\n\
         assert t.num_rows == marked, (t.num_rows, marked)\n\
         assert str(t.schema.field('vector').type) == 'fixed_size_list<item: float not null>[1536]', t.schema\n\
         ops = dict(duckdb.sql(\"select op, count(*) from '{st_s}/changes/*.parquet' group by op\").fetchall())\n\
         assert set(ops) == {{'upsert', 'update', 'delete'}}, ops\n\
         kept = duckdb.sql(\"select count(*) from '{st_s}/changes/*.parquet' where op = 'update' and unchanged = 'vector' and vector is null\").fetchall()[0][0]\n\
         assert kept > 0, 'no scalar-only update carried'\n\
         print(len(files), ops)\n"
    );
    let out = std::process::Command::new(py).args(["-c", &script]).output().unwrap();
    assert!(out.status.success(), "pyarrow/duckdb: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("change files: {}", String::from_utf8_lossy(&out.stdout));
}

/// Through staging, each side digests its chunks while following and the
/// import's cutover reads only the keys changed since: a target row of such
/// a key altered behind vmig's back (as it arrives) is still found, and the
/// cutover fails naming its chunk.
#[test]
fn through_staging_the_import_cutover_finds_a_changed_row_altered_in_the_target() {
    let src = fresh_db(&source_base(), "online_stdmg_src", true);
    ok(&["generate", "--to", &src, "--rows", "1200", "--dim", "16"]);
    let dst = fresh_db(&target_base(), "online_stdmg_dst", true);
    let mut pair = StagingPair::following(&src, &dst, "online_stdmg");
    let id = query_i64(&src, "SELECT id FROM modeldata ORDER BY id OFFSET 500 LIMIT 1");
    behind_vmigs_back(&dst, id, "BEFORE", "NEW.team_id := 'damaged'; RETURN NEW;");
    exec(&src, &format!("UPDATE modeldata SET team_id = 'moved' WHERE id = {id}"));
    wait_until("the change in the target (altered)", 120, &|| {
        query_i64(&dst, &format!("SELECT count(*) FROM modeldata WHERE id = {id} AND team_id = 'damaged'")) == 1
    });
    stop_behind_vmigs_back(&dst);
    let said = pair.cut_export();
    assert_read_changed_keys_only(&said, 1200);
    let (out, said) = pair.cut_import();
    assert!(!out.status.success(), "an import cutover over a target with an altered row must fail: {said}");
    let named = said.split("chunk ").skip(1).find_map(|c| {
        let (lo, hi) = c.split_once(" [")?.1.split_once(']')?.0.split_once(", ")?;
        Some((lo.parse::<i64>().ok()?, hi.parse::<i64>().ok()?))
    });
    assert!(named.is_some_and(|(lo, hi)| lo <= id && id <= hi), "the cutover names the chunk of {id}: {said}");
    assert!(said.contains(&format!("different ids [{id}]")), "the cutover names the id that differs: {said}");
    assert!(said.contains("digested: read ") && said.contains(" 0 chunks never digested"), "only changed keys were read: {said}");
}

#[test]
fn reset_drops_the_slot_and_publication_and_refuses_without_the_source() {
    let (src, dst) = dbs("online_reset");
    ok(&["generate", "--to", &src, "--rows", "300", "--dim", "16"]);
    let state = tempdir();
    let job = "online_reset";
    let args = online_args(&src, &dst, state.path(), job);
    let job_dir = state.path().join(job);
    let mut with_metrics = args.clone();
    with_metrics.extend(["--metrics".into(), "127.0.0.1:19187".into()]);
    let mut run = start(&with_metrics, &Moment::Committed(0));
    wait_for(&mut run, &job_dir, "migrate", &Moment::Phase("following".into()), job);
    exec(&src, "DELETE FROM modeldata WHERE id IN (SELECT id FROM modeldata ORDER BY id LIMIT 5)");
    wait_following(&mut run, &job_dir, "migrate", 0, job);
    // The status and the metrics show what was applied.
    let status = String::from_utf8_lossy(&ok(&["status", "--job", job, "--state-root", state.path().to_str().unwrap()]).stdout).into_owned();
    assert!(status.contains("online (following): applied 0 inserts, 0 updates, 5 deletes"), "{status}");
    assert!(status.contains("replication slot vmig_online_reset"), "{status}");
    let metrics = http_get("127.0.0.1:19187");
    assert!(metrics.contains("vmig_changes_applied_total{vmig_job=\"online_reset\",kind=\"delete\"} 5"), "{metrics}");
    assert!(metrics.contains("vmig_lag_bytes{vmig_job=\"online_reset\"}"), "{metrics}");
    // SIGTERM stops it cleanly: exit 130, the slot kept for the resume.
    unsafe { libc::kill(run.id() as i32, libc::SIGTERM) };
    assert_eq!(run.wait().unwrap().code(), Some(130));
    assert_eq!(source_artifacts(&src, "vmig_online_reset"), (1, 1));
    let st = state.path().to_str().unwrap();
    let out = vmig(&["reset", "--job", job, "--state-root", st, "--to", &dst, "--yes"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("give --from"), "{}", stderr(&out));
    assert_eq!(source_artifacts(&src, "vmig_online_reset"), (1, 1), "a refused reset must not drop anything");
    ok(&["reset", "--job", job, "--state-root", st, "--to", &dst, "--from", &src, "--yes"]);
    assert_eq!(source_artifacts(&src, "vmig_online_reset"), (0, 0));
    assert!(!job_dir.exists());
}

/// A TRUNCATE of the source is refused, not replayed: the job stops with one
/// line; its slot stays for a reset.
#[test]
fn truncate_of_the_source_stops_the_job_with_one_line() {
    let (src, dst) = dbs("online_trunc");
    ok(&["generate", "--to", &src, "--rows", "100", "--dim", "8"]);
    let state = tempdir();
    let args = online_args(&src, &dst, state.path(), "online_trunc");
    let job_dir = state.path().join("online_trunc");
    let mut run = start(&args, &Moment::Committed(0));
    let _reap = Reaper(vec![run.id()]);
    wait_for(&mut run, &job_dir, "migrate", &Moment::Phase("following".into()), "online_trunc");
    exec(&src, "TRUNCATE modeldata");
    let status = run.wait().unwrap();
    assert_eq!(status.code(), Some(1));
    let err = std::io::read_to_string(run.stderr.take().unwrap()).unwrap();
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(errors[0].contains("was truncated") && errors[0].contains("does not replay TRUNCATE"), "{err}");
    assert_eq!(query_i64(&dst, "SELECT count(*) FROM modeldata"), 100, "the target was not emptied");
    assert_eq!(source_artifacts(&src, "vmig_online_trunc"), (1, 1));
    ok(&["reset", "--job", "online_trunc", "--state-root", state.path().to_str().unwrap(), "--from", &src, "--to", &dst, "--yes"]);
    assert_eq!(source_artifacts(&src, "vmig_online_trunc"), (0, 0));
}

/// Each missing prerequisite: one clear line before anything is copied.
#[test]
fn missing_prerequisites_are_one_clear_line_each() {
    let expect_line = |src: &str, dst: &str, wanted: &[&str], what: &str| {
        let state = tempdir();
        let args = online_args(src, dst, state.path(), what);
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let out = vmig(&a);
        let err = stderr(&out);
        assert!(!out.status.success(), "{what}: started");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{what}: one line expected: {err}");
        for w in wanted {
            assert!(lines[0].contains(w), "{what}: {w:?} not in {err}");
        }
        assert_eq!(query_i64(dst, "SELECT count(*) FROM pg_tables WHERE tablename = 'modeldata'"), 0, "{what}: copied");
    };

    // wal_level: the target cluster runs with replica.
    let no_logical = fresh_db(&target_base(), "online_prereq_wal", true);
    ok(&["generate", "--to", &no_logical, "--rows", "20", "--dim", "8"]);
    let dst = fresh_db(&target_base(), "online_prereq_dst", true);
    expect_line(&no_logical, &dst, &["wal_level = replica", "wal_level = logical", "restart"], "prereq_wal");

    // REPLICATION privilege.
    let src = fresh_db(&source_base(), "online_prereq_role", true);
    ok(&["generate", "--to", &src, "--rows", "20", "--dim", "8"]);
    exec(&src, "DROP ROLE IF EXISTS vmig_norepl; CREATE ROLE vmig_norepl LOGIN PASSWORD 'pw'; ALTER TABLE modeldata OWNER TO vmig_norepl");
    let as_user = src.replacen("postgres:postgres@", "vmig_norepl:pw@", 1);
    expect_line(&as_user, &dst, &["vmig_norepl", "REPLICATION", "ALTER ROLE"], "prereq_role");
    exec(&src, "DROP TABLE modeldata; DROP ROLE vmig_norepl");

    // No free slot.
    let cluster = PrivateCluster::start_with("online-slots", 55495, "-c wal_level=logical -c max_replication_slots=1");
    ok(&["generate", "--to", &cluster.url, "--rows", "20", "--dim", "8"]);
    exec(&cluster.url, "SELECT pg_create_logical_replication_slot('someone_else', 'pgoutput')");
    expect_line(&cluster.url, &dst, &["no free replication slot", "max_replication_slots = 1"], "prereq_slot");
}

/// Verification while following: once every chunk was seen equal, a cutover
/// reads only the keys changed since (and chunks never seen equal). A row of
/// a changed key deleted from the target behind vmig's back is found and
/// named; once the source changes it again the job repairs it, and the next
/// cutover passes. The target is then compared with SQL, not vmig's verify.
#[test]
fn cutover_checks_what_changed_since_each_chunk_was_seen_equal() {
    let (src, dst) = dbs("online_watch");
    ok(&["generate", "--to", &src, "--rows", "1200", "--dim", "16"]);
    let state = tempdir();
    let job = "online_watch";
    let args = online_args(&src, &dst, state.path(), job);
    let job_dir = state.path().join(job);
    let (mut run, _reap) = start_following(&args, &job_dir, job);
    // Every chunk seen equal (1200 rows in chunks of 400: 3 chunks, or more).
    let chunks = || verification(&job_dir, "chunks");
    wait_until("a full pass", 120, &|| chunks().is_some() && verification(&job_dir, "chunks_verified") == chunks());
    assert!(chunks().unwrap() >= 3);
    let id = id_in_the_chunk_checked_last(&job_dir, &src);
    // Behind vmig's back: the changed row goes from the target as it arrives.
    behind_vmigs_back(&dst, id, "AFTER", "DELETE FROM modeldata WHERE id = NEW.id; RETURN NULL;");
    let before = applied(&job_dir, "migrate");
    exec(&src, &format!("UPDATE modeldata SET team_id = 'moved' WHERE id = {id}"));
    wait_following(&mut run, &job_dir, "migrate", before, job);
    wait_until("the change applied (and the row gone)", 120, &|| query_i64(&dst, &format!("SELECT count(*) FROM modeldata WHERE id = {id}")) == 0);
    stop_behind_vmigs_back(&dst);
    let cut = cutover_args(&args);
    let out = vmig(&cut);
    assert!(!out.status.success(), "a cutover over a target missing a changed row must fail");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(said.contains(&format!("missing ids [{id}]")), "the cutover names the missing id: {said}");
    // The job keeps following: the source's next change of that row repairs it.
    let before = applied(&job_dir, "migrate");
    exec(&src, &format!("UPDATE modeldata SET team_id = 'moved again' WHERE id = {id}"));
    wait_following(&mut run, &job_dir, "migrate", before, job);
    let out = ok(&cut);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.contains("safe to switch"), "{said}");
    assert!(said.contains("cutover window") && said.contains("changed keys"), "the cutover says what it checked: {said}");
    assert!(run.wait().unwrap().success());
    assert_same_rows(&src, "modeldata", &dst, "modeldata");
    assert!(!job_dir.join("watch.json").exists(), "a finished cutover removes its verification record");
}

#[test]
fn a_caught_up_job_shows_no_lag_once_nothing_is_left_to_apply() {
    let (src, dst) = dbs("online_idle_lag");
    ok(&["generate", "--to", &src, "--rows", "200", "--dim", "16"]);
    let state = tempdir();
    let job = "online_idle_lag";
    let args = online_args(&src, &dst, state.path(), job);
    let job_dir = state.path().join(job);
    let (mut run, mut reap) = start_following(&args, &job_dir, job);
    run.kill().unwrap();
    run.wait().unwrap();
    let before = applied(&job_dir, "migrate");
    exec(&src, "UPDATE modeldata SET team_id = 'late' WHERE id = (SELECT min(id) FROM modeldata)");
    // The change is two seconds old when the restarted job applies it.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let mut run = start(&args, &Moment::Committed(0));
    reap.0.push(run.id());
    wait_following(&mut run, &job_dir, "migrate", before, job);
    // Nothing is left to apply: the lag is none, not that change's age.
    let lag = || common::faults::status_of(&job_dir, "migrate").and_then(|s| s["online"]["lag_seconds"].as_f64());
    wait_until("no lag shown once caught up", 30, &|| lag().is_some_and(|l| l < 1.0));
    ok(&cutover_args(&args));
    assert!(run.wait().unwrap().success());
    assert_same_rows(&src, "modeldata", &dst, "modeldata");
}

/// A backlog of many full batches: rows updated again and again (batches
/// sharing keys, applied one after the other), then new rows (batches with
/// disjoint keys, each written while the one before goes in), then deletes.
/// The job is killed while catching up and resumed. The target must equal
/// the source, and every change be counted once: a batch committed out of
/// order, or applied twice, would show in the rows or in the counts.
#[test]
fn a_backlog_in_overlapping_batches_survives_a_kill_and_counts_each_change_once() {
    let (src, dst) = dbs("online_overlap");
    ok(&["generate", "--to", &src, "--rows", "8000", "--dim", "16"]);
    let state = tempdir();
    let job = "online_overlap";
    let args = online_args(&src, &dst, state.path(), job);
    let job_dir = state.path().join(job);
    let (run, mut reap) = start_following(&args, &job_dir, job);
    common::online::kill(run);
    let before = applied(&job_dir, "migrate");
    // The backlog, while the job is stopped: 3 x 6,000 updates of the same
    // rows (one transaction each, a batch of its own), 24 x 1,000 inserts,
    // then the deletes of every tenth row.
    let updated = query_i64(&src, "SELECT count(*) FROM modeldata WHERE id % 4 <> 0");
    for round in 0..3 {
        exec(&src, &format!("UPDATE modeldata SET team_id = team_id || '+{round}' WHERE id % 4 <> 0"));
    }
    for t in 0..24 {
        exec(
            &src,
            &format!(
                "INSERT INTO modeldata (vector, team_id, dataset_id, collection_id) \
                 SELECT (SELECT array_agg(random()::real) FROM generate_series(1, 16)), 'team_b' || g, 'ds_b', 'col_b{t}' \
                 FROM generate_series(1, 1000) g"
            ),
        );
    }
    let deleted = query_i64(&src, "SELECT count(*) FROM modeldata WHERE id % 10 = 0");
    exec(&src, "DELETE FROM modeldata WHERE id % 10 = 0");
    let backlog = (3 * updated + 24_000 + deleted) as u64;

    // Killed while catching up (once some of the backlog is in, not all).
    let report = state.path().join("report.json");
    let mut resumed = args.clone();
    resumed.extend(["--report".into(), report.to_str().unwrap().into()]);
    let mut run = start(&args, &Moment::Committed(0));
    reap.0.push(run.id());
    wait_until("part of the backlog applied", 120, &|| applied(&job_dir, "migrate") > before);
    let at_kill = applied(&job_dir, "migrate");
    assert!(at_kill < before + backlog, "the whole backlog was in before the kill ({at_kill} applied): nothing was interrupted");
    run.kill().unwrap();
    run.wait().unwrap();

    let mut run = start(&resumed, &Moment::Committed(0));
    reap.0.push(run.id());
    wait_following(&mut run, &job_dir, "migrate", before + backlog - 1, job);
    ok(&cutover_args(&args));
    assert!(run.wait().unwrap().success());
    assert_same_rows(&src, "modeldata", &dst, "modeldata");
    let counts = &common::faults::status_of(&job_dir, "migrate").unwrap()["online"]["applied"];
    assert_eq!(
        (counts["inserts"].as_i64().unwrap(), counts["updates"].as_i64().unwrap(), counts["deletes"].as_i64().unwrap()),
        (24_000, 3 * updated, deleted),
        "each change counted once (inserts, updates, deletes)"
    );
    // The resumed run wrote some batches beside the one before (the inserts').
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let note = report["notes"].as_array().unwrap().iter().filter_map(|n| n.as_str()).find(|n| n.starts_with("changes applied")).unwrap().to_string();
    let overlapped: u64 = note.split("; ").nth(1).and_then(|p| p.split(' ').next()).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{note}"));
    assert!(overlapped > 0, "no batch overlapped another: {note}");
}

/// A job whose stderr went away (a `| tee` that exited, a closed terminal)
/// follows and cuts over: what it says is lost, not the job.
#[test]
fn a_job_whose_stderr_is_gone_still_follows_and_cuts_over() {
    let (src, dst) = dbs("online_no_stderr");
    ok(&["generate", "--to", &src, "--rows", "200", "--dim", "16"]);
    let state = tempdir();
    let job = "online_no_stderr";
    let args = online_args(&src, &dst, state.path(), job);
    let job_dir = state.path().join(job);
    // A pipe whose reader is gone before the job starts: every line it says fails.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut run = std::process::Command::new(VMIG).args(&args).stdout(std::process::Stdio::null()).stderr(writer).spawn().unwrap();
    let _reap = Reaper(vec![run.id()]);
    wait_for(&mut run, &job_dir, "migrate", &Moment::Phase("following".into()), job);
    let before = applied(&job_dir, "migrate");
    exec(&src, "UPDATE modeldata SET team_id = 'said to no one' WHERE id = (SELECT min(id) FROM modeldata)");
    wait_following(&mut run, &job_dir, "migrate", before, job);
    ok(&cutover_args(&args));
    assert!(run.wait().unwrap().success());
    assert_same_rows(&src, "modeldata", &dst, "modeldata");
}

/// An online export from `src` and its import into `dst` through a fresh
/// staging area, both following, each with a digested pass behind it.
struct StagingPair {
    _dir: tempfile::TempDir,
    export: Vec<String>,
    import: Vec<String>,
    exp: std::process::Child,
    /// Held: its output pipes stay open while it runs.
    _imp: std::process::Child,
    _reap: Reaper,
}

impl StagingPair {
    fn following(src: &str, dst: &str, job: &str) -> StagingPair {
        let dir = tempdir();
        let st = dir.path().join("st");
        let st_s = st.to_str().unwrap();
        let export: Vec<String> =
            ["export", "--online", "--from", src, "--staging", st_s, "--job", job, "--chunk-rows", "400", "--workers", "1", "--quiet"].map(String::from).to_vec();
        let import: Vec<String> = ["import", "--online", "--staging", st_s, "--to", dst, "--quiet"].map(String::from).to_vec();
        let mut exp = start(&export, &Moment::Committed(0));
        let mut reap = Reaper(vec![exp.id()]);
        wait_for(&mut exp, &st, "export", &Moment::Phase("following".into()), job);
        let mut imp = start(&import, &Moment::Committed(0));
        reap.0.push(imp.id());
        wait_for(&mut imp, &st, "import", &Moment::Phase("following".into()), job);
        wait_for_a_digested_pass(&st, "export");
        wait_for_a_digested_pass(&st, "import");
        StagingPair { _dir: dir, export, import, exp, _imp: imp, _reap: reap }
    }

    /// The export's cutover, which must succeed; what it said.
    fn cut_export(&mut self) -> String {
        let said = String::from_utf8_lossy(&ok(&cutover_args(&self.export)).stdout).into_owned();
        assert!(said.contains("the export is complete"), "{said}");
        assert!(self.exp.wait().unwrap().success());
        said
    }

    /// The import's cutover, and all it said.
    fn cut_import(&self) -> (std::process::Output, String) {
        let out = vmig(&cutover_args(&self.import));
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
        (out, said)
    }
}

/// The same job's `vmig cutover` arguments.
fn cutover_args(args: &[String]) -> Vec<&str> {
    std::iter::once("cutover").chain(args[1..].iter().map(|s| s.as_str())).collect()
}

/// Starts the online job; returns once it follows.
fn start_following(args: &[String], job_dir: &std::path::Path, job: &str) -> (std::process::Child, Reaper) {
    let mut run = start(args, &Moment::Committed(0));
    let reap = Reaper(vec![run.id()]);
    wait_for(&mut run, job_dir, "migrate", &Moment::Phase("following".into()), job);
    (run, reap)
}

/// Starts the online job; returns once it follows and its verifier has seen
/// every chunk (at least three) equal.
fn start_and_wait_for_a_full_pass(args: &[String], job_dir: &std::path::Path, job: &str) -> (std::process::Child, Reaper) {
    let (run, reap) = start_following(args, job_dir, job);
    let chunks = || verification(job_dir, "chunks").unwrap_or(0);
    wait_until("a full pass", 180, &|| chunks() >= 3 && verification(job_dir, "chunks_verified") == Some(chunks()));
    (run, reap)
}

/// Polls `done` every 50 ms for up to `secs`.
fn wait_until(what: &str, secs: u64, done: &dyn Fn() -> bool) {
    let t = std::time::Instant::now();
    while !done() {
        assert!(t.elapsed() < std::time::Duration::from_secs(secs), "{what} not reached in {secs} s");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Stands for whatever writes the target behind vmig's back, from the
/// instant a change of row `id` is applied (a trigger running `body`), so the
/// row differs before the background verifier can have seen it equal. A
/// write made after the apply would race the verifier's next look at the
/// chunk, and on a loaded machine it can come first: the damage then
/// rightly lies outside what the cutover checks.
fn behind_vmigs_back(url: &str, id: i64, when: &str, body: &str) {
    exec(
        url,
        &format!(
            "CREATE FUNCTION behind_vmigs_back() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN {body} END $$;
             CREATE TRIGGER behind_vmigs_back {when} INSERT OR UPDATE ON modeldata FOR EACH ROW
             WHEN (NEW.id = {id}) EXECUTE FUNCTION behind_vmigs_back();"
        ),
    );
}

fn stop_behind_vmigs_back(url: &str) {
    exec(url, "DROP TRIGGER behind_vmigs_back ON modeldata; DROP FUNCTION behind_vmigs_back();");
}

/// A field of the verification while following, from the job's status.
fn verification(job_dir: &std::path::Path, field: &str) -> Option<u64> {
    common::faults::status_of(job_dir, "migrate").and_then(|s| s["online"]["verification"][field].as_u64())
}

/// `watch.json`'s (chunks seen equal, chunks in the verification plan).
fn watch_record(job_dir: &std::path::Path) -> (usize, usize) {
    std::fs::read(job_dir.join("watch.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .map(|w| (w["checked"].as_object().map_or(0, |c| c.len()), w["plan"].as_array().map_or(0, |p| p.len())))
        .unwrap_or((0, 0))
}

fn chunks_seen_equal(job_dir: &std::path::Path) -> usize {
    watch_record(job_dir).0
}

/// The smallest id of the chunk the verifier last saw equal (`watch.json`):
/// that chunk is compared again 30 s after its last comparison at the
/// earliest, so a change and a damage made to this id now fall after its
/// last check and before its next.
fn id_in_the_chunk_checked_last(job_dir: &std::path::Path, src: &str) -> i64 {
    let w: serde_json::Value = serde_json::from_slice(&std::fs::read(job_dir.join("watch.json")).unwrap()).unwrap();
    let (last, _) = w["checked"].as_object().unwrap().iter().max_by_key(|(_, c)| c["at"].as_str().unwrap().to_string()).unwrap();
    let chunk = w["plan"].as_array().unwrap().iter().find(|c| c["id"].to_string() == *last).unwrap();
    let (lo, hi) = (chunk["lo"].as_i64().unwrap(), chunk["hi"].as_i64().unwrap());
    query_i64(src, &format!("SELECT min(id) FROM modeldata WHERE id BETWEEN {lo} AND {hi}"))
}

/// Killed (-9) in the middle of a verification pass while a writer runs,
/// the job resumes the pass where it was (the chunks already seen equal stay
/// so), completes it, and cuts over with nothing left unverified; the target
/// then equals the source by SQL, not by vmig's verify.
#[test]
fn a_job_killed_during_a_verification_pass_resumes_the_pass() {
    let source = pg_source("online_pass");
    let dst = fresh_db(&target_base(), "online_pass_dst", true);
    let state = tempdir();
    let job = "online_pass";
    let mut args = online_args(&source.url, &dst, state.path(), job);
    // 16 chunks of 100 rows at 100 rows/s: a pass lasts about 16 s.
    let at = args.iter().position(|a| a == "--chunk-rows").unwrap();
    args[at + 1] = "100".into();
    args.extend(["--verify-rate", "100"].map(String::from));
    let job_dir = state.path().join(job);
    let writer = (source.writer)();
    let mut run = start(&args, &Moment::Committed(0));
    let _reap = Reaper(vec![run.id()]);
    wait_for(&mut run, &job_dir, "migrate", &Moment::Phase("following".into()), job);
    let chunks = || verification(&job_dir, "chunks").unwrap_or(0);
    wait_until("three chunks seen equal", 120, &|| chunks_seen_equal(&job_dir) >= 3);
    let (seen, planned) = watch_record(&job_dir);
    assert!(seen < planned, "killed before the pass ended: {seen} of {planned} chunks");
    common::online::kill(run);
    let seen = chunks_seen_equal(&job_dir);
    writer.wait_for_more(10);

    let mut run = start(&args, &Moment::Committed(0));
    let _reap2 = Reaper(vec![run.id()]);
    // The resumed job's first word on verification already counts the
    // chunks the killed run saw equal (a fresh start would begin at 0).
    let pid = run.id() as u64;
    let of_this_run = || common::faults::status_of(&job_dir, "migrate").is_some_and(|s| s["pid"].as_u64() == Some(pid));
    wait_until("the resumed job's verification status", 120, &|| of_this_run() && verification(&job_dir, "chunks_verified").is_some());
    let resumed_at = verification(&job_dir, "chunks_verified").unwrap();
    assert!(resumed_at >= seen as u64, "the resumed job counts {resumed_at} chunks verified, the killed run had {seen}");
    wait_until("a full pass", 180, &|| chunks() > 0 && verification(&job_dir, "chunks_verified") == Some(chunks()));
    writer.stop();
    let cut = cutover_args(&args);
    let said = String::from_utf8_lossy(&ok(&cut).stdout).into_owned();
    assert!(said.contains("safe to switch") && said.contains(" 0 unverified chunks"), "{said}");
    assert!(run.wait().unwrap().success());
    assert_same_rows(&source.url, "modeldata", &dst, "modeldata");
    assert_eq!((source.leftovers)(), "", "the slot and publication are gone");
}

/// Into Milvus, a change applied wrongly is caught at cutover: after a key
/// changed (and its chunk's last check), a second copy of it is written to
/// the collection with a plain SDK insert, and one of an unchanged key in
/// another chunk. The cutover counts the copies of the changed keys and of
/// every chunk, recopies both chunks, and only then says "safe to switch";
/// the collection then holds one copy per id, equal to the source (read
/// with the Milvus SDK, not vmig).
/// Through staging into Milvus: a second copy of a row no change touched
/// (a lost delete Milvus hides from queries, so from the digests too) is
/// found by the import cutover's count of each chunk's stored copies.
#[test]
fn through_staging_the_import_cutover_into_milvus_counts_each_chunks_copies() {
    let src = fresh_db(&source_base(), "online_stmv_src", true);
    ok(&["generate", "--to", &src, "--rows", "1200", "--dim", "16"]);
    let m = fresh_milvus_db("online_stmv");
    let mut pair = StagingPair::following(&src, &m, "online_stmv");
    let source_rows = as_mrows(&rows(&src, "modeldata"));
    let id = source_rows[700].id;
    milvus_insert_copy(&m, "modeldata", &source_rows[700]);
    assert_eq!(milvus_count_where(&m, "modeldata", &format!("id == {id}")), 2, "the collection holds a second copy");
    pair.cut_export();
    let (out, said) = pair.cut_import();
    assert!(!out.status.success(), "an import cutover over a target holding a second copy must fail: {said}");
    assert!(said.contains(&format!("duplicate copies of ids [{id}]")), "the cutover names the id held twice: {said}");
    // The writes were stopped: the advice is about the copies, not the writes.
    assert!(said.contains("copies of rows it had acknowledged deleting") && !said.contains("were writes to the source stopped"), "{said}");
}

#[test]
fn cutover_into_milvus_finds_a_second_copy_of_a_changed_key() {
    let src = fresh_db(&source_base(), "online_dup_src", true);
    ok(&["generate", "--to", &src, "--rows", "1200", "--dim", "16"]);
    let m = fresh_milvus_db("online_dup");
    let state = tempdir();
    let job = "online_dup";
    let args = online_args(&src, &m, state.path(), job);
    let job_dir = state.path().join(job);
    let (mut run, _reap) = start_and_wait_for_a_full_pass(&args, &job_dir, job);
    // While following, the status counts the segments Milvus has not yet
    // handed over to its query node: what a cutover would wait for.
    let counted = || common::faults::status_of(&job_dir, "migrate").is_some_and(|s| s["online"]["unserved_segments"].is_u64());
    wait_until("the status counts the target's segments not yet served", 60, &counted);
    let id = id_in_the_chunk_checked_last(&job_dir, &src);
    let before = applied(&job_dir, "migrate");
    exec(&src, &format!("UPDATE modeldata SET team_id = 'moved' WHERE id = {id}"));
    wait_following(&mut run, &job_dir, "migrate", before, job);
    wait_until("the change in the target", 60, &|| milvus_count_where(&m, "modeldata", &format!("id == {id} and teamId == 'moved'")) == 1);
    let source_rows = as_mrows(&rows(&src, "modeldata"));
    milvus_insert_copy(&m, "modeldata", source_rows.iter().find(|r| r.id == id).unwrap());
    assert_eq!(milvus_count_where(&m, "modeldata", &format!("id == {id}")), 2, "the collection holds a second copy");
    // And of a key no change marked, in another chunk (a lost delete that
    // resurfaces): the cutover's count per chunk finds it.
    let (lo, hi) = (source_rows.first().unwrap().id, source_rows.last().unwrap().id);
    let other = if id - lo < hi - id { hi } else { lo };
    milvus_insert_copy(&m, "modeldata", source_rows.iter().find(|r| r.id == other).unwrap());
    assert_eq!(milvus_count_where(&m, "modeldata", &format!("id == {other}")), 2);
    let cut = cutover_args(&args);
    let said = String::from_utf8_lossy(&ok(&cut).stdout).into_owned();
    // Both copies are found and their chunks recopied: the changed key's
    // by its id (named) while it is still marked, which it is unless the
    // verifier compared its chunk again in between (30 s after its last
    // comparison at the earliest, later on a loaded machine); either copy
    // by the cutover's count per chunk.
    assert!(said.contains("recopied from the source and then equal") && said.contains("safe to switch"), "{said}");
    assert!(said.contains("counted the copies in") && said.matches("duplicate copies").count() >= 2, "both copies found: {said}");
    if !said.contains("checked 0 changed keys") {
        assert!(said.contains(&format!("1 duplicate copies of ids [{id}]")), "the cutover names the changed key's second copy: {said}");
    }
    assert!(run.wait().unwrap().success());
    let want = as_mrows(&rows(&src, "modeldata"));
    assert_eq!(milvus_count_settled(&m, "modeldata", want.len() as i64), want.len() as i64, "one copy per id");
    assert_eq!(milvus_rows(&m, "modeldata"), want);
}

/// From a Milvus source (watermark and id reconcile), the cutover checks
/// only what changed too: after a full pass, a row inserted into the source
/// reaches the target altered behind vmig's back (the reconcile compares ids
/// only, so it cannot see this). Its createTime is older than the watermark,
/// so only the reconcile copies it, once: a row the polls can also see may
/// be applied by both, and the second, clean copy would undo the damage
/// before the cutover looks. The cutover
/// reads the changed keys by id, finds the row, recopies its chunk and says
/// so, without reading the whole table; the target then equals the source
/// read with the Milvus SDK.
#[test]
fn cutover_from_milvus_checks_what_changed_and_recopies_what_the_target_lost() {
    let src = fresh_milvus_db("online_mvcut_src");
    let seeded = fastgpt_rows(1200, 16, 29);
    seed_fastgpt(&src, "modeldata", &seeded, 16, 1, false);
    let dst = fresh_db(&target_base(), "online_mvcut_dst", true);
    let state = tempdir();
    let job = "online_mvcut";
    let mut args = online_args(&src, &dst, state.path(), job);
    args.extend(["--reconcile-every", "2", "--watermark-margin", "3"].map(String::from));
    let job_dir = state.path().join(job);
    let (mut run, _reap) = start_and_wait_for_a_full_pass(&args, &job_dir, job);
    let mut row = seeded[7].clone();
    row.id = 4_242_424_242;
    row.create_time_ms = 1_700_000_000_000;
    behind_vmigs_back(&dst, row.id, "BEFORE", "NEW.team_id := 'damaged'; RETURN NEW;");
    milvus_upsert(&src, "modeldata", &row);
    let arrived = format!("SELECT count(*) FROM modeldata WHERE id = {} AND team_id = 'damaged'", row.id);
    wait_until("the new row in the target (altered)", 120, &|| query_i64(&dst, &arrived) == 1);
    stop_behind_vmigs_back(&dst);
    let cut = cutover_args(&args);
    let said = String::from_utf8_lossy(&ok(&cut).stdout).into_owned();
    assert!(said.contains("safe to switch") && said.contains(" 0 unverified chunks"), "{said}");
    assert!(said.contains("recopied from the source and then equal") && said.contains(&format!("different ids [{}]", row.id)), "{said}");
    let keys: usize = said.split("checked ").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok()).expect(&said);
    assert!(keys >= 1 && keys < seeded.len(), "the cutover read {keys} changed keys by id, not the whole table: {said}");
    assert!(said.contains("upsert in place"), "the cutover says what a Milvus source's stream cannot see: {said}");
    assert!(run.wait().unwrap().success());
    let want = milvus_rows(&src, "modeldata");
    assert_eq!(want.len(), seeded.len() + 1);
    assert_eq!(as_mrows(&rows(&dst, "modeldata")), want);
}
