//! Fault injection: every target kind (PostgreSQL, OceanBase, Milvus,
//! staging) under every command that writes it (export, import, migrate) is
//! killed with SIGKILL at 8+ moments spread over the run — planning,
//! preparing, early and late in the load, before the finish, during each
//! index build, while the sequence / AUTO_INCREMENT is fixed, after the
//! finish — and the next run must exit 0 with the target equal to the source,
//! ids unique, indexes present once and valid, the sequence past max(id).
//! Moments are found by watching the status file, never by sleeping.
mod common;
use common::faults::*;
use common::milvus_db::*;
use common::*;
use std::path::{Path, PathBuf};

const ROWS: usize = 1600;
const DIM: &str = "32";
const CHUNK_ROWS: &str = "200";
const CHUNKS: u64 = 8;
const MILVUS_CHUNK_ROWS: &str = "400";
const MILVUS_CHUNKS: u64 = 4;
/// FastGPT's three indexes, in the order vmig builds them (by name).
const PG_INDEXES: [&str; 3] = ["modeldata_create_time_index", "modeldata_team_dataset_collection_index", "modeldata_vector_index"];

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn remove(paths: &[PathBuf]) {
    for p in paths {
        let _ = std::fs::remove_dir_all(p);
        let _ = std::fs::remove_file(p);
    }
}

/// A FastGPT-shaped source and its staging export.
fn source_and_staging(name: &str, dir: &Path, chunk_rows: &str) -> (String, PathBuf) {
    let src = fresh_db(&source_base(), &format!("{name}_src"), true);
    ok(&["generate", "--to", &src, "--rows", &ROWS.to_string(), "--dim", DIM]);
    let st = dir.join("st");
    ok(&["export", "--from", &src, "--staging", st.to_str().unwrap(), "--chunk-rows", chunk_rows, "--quiet"]);
    (src, st)
}

/// The command line of a scenario and the directory its status file is in:
/// `import` from the staging area, or `migrate` straight from the source.
fn job_args(command: &str, src: &str, st: &Path, to: &str, chunk_rows: &str, state: &Path) -> (Vec<String>, PathBuf) {
    match command {
        "import" => (s(&["import", "--staging", st.to_str().unwrap(), "--to", to]), st.to_path_buf()),
        _ => (
            s(&["migrate", "--from", src, "--to", to, "--chunk-rows", chunk_rows, "--job", "fault", "--state-root", state.to_str().unwrap()]),
            state.join("fault"),
        ),
    }
}

fn pg_index_phases() -> Vec<String> {
    let mut p: Vec<String> = PG_INDEXES.iter().map(|i| format!("building index {i}")).collect();
    p.push("fixing sequence".into());
    p
}

/// The PostgreSQL target holds exactly the source: rows bit-exact, ids
/// unique, FastGPT's indexes once each and valid, the sequence past max(id).
fn check_pg(src: &str, dst: &str) {
    assert_eq!(assert_same_rows(src, "modeldata", dst, "modeldata"), ROWS);
    let names = rt().block_on(async {
        client(dst)
            .await
            .query(
                "SELECT c.relname::text, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
                 WHERE i.indrelid = 'modeldata'::regclass ORDER BY 1",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, bool>(1)))
            .collect::<Vec<_>>()
    });
    let mut want: Vec<(String, bool)> = PG_INDEXES.iter().map(|n| (n.to_string(), true)).collect();
    want.push(("modeldata_pkey".into(), true));
    want.sort();
    assert_eq!(names, want, "every index once and valid");
    let max_id = query_i64(dst, "SELECT max(id) FROM modeldata");
    assert!(query_i64(dst, "SELECT last_value FROM modeldata_id_seq") >= max_id, "sequence past max(id)");
}

fn pg_scenario(command: &str) {
    let name = format!("fault_pg_{command}");
    let dir = tempdir();
    let (src, st) = source_and_staging(&name, dir.path(), CHUNK_ROWS);
    let dst = with_db(&target_base(), &format!("{name}_dst"));
    let state = dir.path().join("state");
    let (args, job_dir) = job_args(command, &src, &st, &dst, CHUNK_ROWS, &state);
    let reset = || {
        fresh_db(&target_base(), &format!("{name}_dst"), true);
        if command != "import" {
            remove(&[state.clone()]);
        }
    };
    let check = || check_pg(&src, &dst);
    let phases = pg_index_phases();
    let moments = database_moments(CHUNKS, &phases.iter().map(|p| p.as_str()).collect::<Vec<_>>());
    let n = Scenario { name: &name, args, job_dir, rate_limit: 800, reset: &reset, check: &check }.run(&moments);
    assert_eq!(n, moments.len(), "every moment saw a live run killed");
    assert!(n >= 8);
}

#[test]
fn import_into_postgres_killed_at_every_moment_resumes() {
    pg_scenario("import");
}

#[test]
fn migrate_into_postgres_killed_at_every_moment_resumes() {
    pg_scenario("migrate");
}

#[test]
fn export_into_staging_killed_at_every_moment_resumes() {
    let name = "fault_export";
    let src = fresh_db(&source_base(), &format!("{name}_src"), true);
    ok(&["generate", "--to", &src, "--rows", &ROWS.to_string(), "--dim", DIM]);
    let dir = tempdir();
    let st = dir.path().join("st");
    let st_s = st.to_str().unwrap().to_string();
    let args = s(&["export", "--from", &src, "--staging", &st_s, "--chunk-rows", CHUNK_ROWS]);
    let reset = || remove(&[st.clone()]);
    let check = || {
        assert_eq!(staged_rows(&st), rows(&src, "modeldata"), "the staged rows (pyarrow) equal the source's (SQL)");
        ok(&["verify", "--from", &src, "--to", &st_s]);
        ok(&["inspect", &st_s, "--deep"]);
        let markers = std::fs::read_dir(st.join("chunks")).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".commit.json")).count();
        assert_eq!(markers as u64, CHUNKS, "one commit marker per chunk");
    };
    let moments = vec![
        phase("planning"),
        phase("preparing target"),
        Moment::Committed(1),
        Moment::Committed(3),
        Moment::Committed(5),
        Moment::Committed(CHUNKS - 1),
        phase("finishing"),
        phase("done"),
    ];
    let n = Scenario { name, args, job_dir: st.clone(), rate_limit: 800, reset: &reset, check: &check }.run(&moments);
    assert_eq!(n, moments.len(), "every moment saw a live run killed");
    assert!(n >= 8);
}

// ---------------------------------------------------------------- OceanBase

fn ob_scenario(command: &str) {
    let name = format!("fault_ob_{command}");
    let dir = tempdir();
    let (src, st) = source_and_staging(&name, dir.path(), CHUNK_ROWS);
    let ob = fresh_ob_db(&name);
    let state = dir.path().join("state");
    let (args, job_dir) = job_args(command, &src, &st, &ob, CHUNK_ROWS, &state);
    let reset = || {
        fresh_ob_db(&name);
        if command != "import" {
            remove(&[state.clone()]);
        }
    };
    let source_rows = rows(&src, "modeldata");
    let check = || {
        assert_rows_equal(&source_rows, &ob_rows(&ob, "modeldata"));
        let ddl = ob_query_string(&ob, "SHOW CREATE TABLE modeldata");
        for ix in PG_INDEXES {
            assert_eq!(ddl.matches(&format!("KEY `{ix}`")).count(), 1, "index {ix} once: {ddl}");
        }
        let auto: i64 = ddl.split("AUTO_INCREMENT = ").nth(1).and_then(|t| t.split_whitespace().next()).unwrap().parse().unwrap();
        assert!(auto > source_rows.last().unwrap().id, "AUTO_INCREMENT {auto} past max(id)");
    };
    let mut phases: Vec<String> = PG_INDEXES.iter().map(|i| format!("building index {i}")).collect();
    phases.push("fixing AUTO_INCREMENT".into());
    let moments = database_moments(CHUNKS, &phases.iter().map(|p| p.as_str()).collect::<Vec<_>>());
    let n = Scenario { name: &name, args, job_dir, rate_limit: 800, reset: &reset, check: &check }.run(&moments);
    assert_eq!(n, moments.len(), "every moment saw a live run killed");
    assert!(n >= 8);
}

#[test]
fn import_into_oceanbase_killed_at_every_moment_resumes() {
    ob_scenario("import");
}

#[test]
fn migrate_into_oceanbase_killed_at_every_moment_resumes() {
    ob_scenario("migrate");
}

// ---------------------------------------------------------------- Milvus

fn milvus_scenario(command: &str) {
    let name = format!("fault_mv_{command}");
    let dir = tempdir();
    // Fewer, larger chunks: every Milvus chunk waits for its flush.
    let (src, st) = source_and_staging(&name, dir.path(), MILVUS_CHUNK_ROWS);
    let m = fresh_milvus_db(&name);
    let state = dir.path().join("state");
    let (args, job_dir) = job_args(command, &src, &st, &m, MILVUS_CHUNK_ROWS, &state);
    let reset = || {
        fresh_milvus_db(&name);
        match command {
            "import" => remove(&[st.join("milvus-ledger.jsonl"), st.join("milvus-ledger.lock")]),
            _ => remove(&[state.clone()]),
        }
    };
    let want = as_mrows(&rows(&src, "modeldata"));
    let check = || {
        assert_eq!(milvus_count_settled(&m, "modeldata", ROWS as i64), ROWS as i64, "count(*) equals the source: no duplicates");
        assert_eq!(milvus_rows(&m, "modeldata"), want);
        let ix = milvus_index_params(&m, "modeldata");
        assert_eq!(ix.matches("index_type=HNSW").count(), 1, "one vector index: {ix}");
    };
    // Every Milvus rerun waits for index builds that take Milvus up to a
    // minute after rewritten rows: migrate gets the 8 moments spread over
    // the run, import all 11.
    let moments = match command {
        "import" => database_moments(
            MILVUS_CHUNKS,
            &["creating index vector_index", "creating index teamId_index", "building indexes of modeldata", "loading collection"],
        ),
        _ => vec![
            phase("planning"),
            Moment::Committed(1),
            Moment::Committed(MILVUS_CHUNKS - 2),
            phase("finishing"),
            phase("creating index vector_index"),
            phase("building indexes of modeldata"),
            phase("loading collection"),
            phase("done"),
        ],
    };
    let n = Scenario { name: &name, args, job_dir, rate_limit: 400, reset: &reset, check: &check }.run(&moments);
    assert_eq!(n, moments.len(), "every moment saw a live run killed");
    assert!(n >= 8);
}

#[test]
fn import_into_milvus_killed_at_every_moment_resumes() {
    milvus_scenario("import");
}

#[test]
fn migrate_into_milvus_killed_at_every_moment_resumes() {
    milvus_scenario("migrate");
}

/// The case a user hit: a Milvus import killed after its upserts reached
/// Milvus but before the first chunk's flush was recorded. The rerun must
/// take those rows for the job's own (the ledger marked the job's first
/// write), not refuse the collection as a stranger's.
#[test]
fn milvus_import_killed_before_its_first_flush_resumes() {
    let name = "fault_mv_first_flush";
    let dir = tempdir();
    let (src, st) = source_and_staging(name, dir.path(), MILVUS_CHUNK_ROWS);
    let m = fresh_milvus_db(name);
    let ledger = st.join("milvus-ledger.jsonl");
    let records = || std::fs::read_to_string(&ledger).map(|t| t.matches("\"record\"").count()).unwrap_or(0);
    let args = s(&["import", "--staging", st.to_str().unwrap(), "--to", &m]);
    let mut caught = false;
    for _attempt in 0..5 {
        fresh_milvus_db(name);
        remove(&[ledger.clone(), st.join("status-import.json")]);
        let mut a = args.clone();
        a.extend(s(&["--rate-limit", "400", "--quiet"]));
        let mut child = start(&a, &Moment::Committed(0));
        // A chunk whose upserts returned (status counts it) while its flush
        // has not reached the ledger yet.
        wait_for(&mut child, &st, "import", &Moment::Committed(1), name);
        let unrecorded = records() == 0;
        child.kill().unwrap();
        child.wait().unwrap();
        if unrecorded && records() == 0 {
            caught = true;
            break;
        }
    }
    assert!(caught, "never caught a chunk between its upserts and its flush");
    let text = std::fs::read_to_string(&ledger).unwrap();
    assert!(text.contains("began_at"), "the job's first write is marked: {text}");
    let plain: Vec<&str> = args.iter().map(|x| x.as_str()).collect();
    ok(&plain);
    assert_eq!(milvus_count(&m, "modeldata"), ROWS as i64, "no duplicates");
    assert_eq!(milvus_rows(&m, "modeldata"), as_mrows(&rows(&src, "modeldata")));
    // Rows from elsewhere are still refused: the same import without its
    // ledger (another state directory) finds rows it did not write.
    remove(&[ledger.clone()]);
    let out = vmig(&plain);
    assert!(!out.status.success() && stderr(&out).contains("already has rows and no vmig ledger"), "{}", stderr(&out));
}
