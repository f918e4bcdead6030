//! Milvus as source and target, against a real Milvus 2.3 standalone:
//! Milvus ↔ PG, Milvus ↔ OB, Milvus → staging → PG with Milvus stopped,
//! PG → staging → Milvus, Milvus → Milvus, kill -9 during a Milvus import,
//! rows and schemas Milvus cannot take. Collections are seeded and read back
//! with the SDK's client, independently of vmig.
mod common;
use common::milvus_db::*;
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

const DIM: usize = 1536;

#[test]
fn milvus_to_postgres_and_back_keeps_every_id() {
    let m = fresh_milvus_db("m2pg");
    let (_, dst) = dbs("m2pg");
    // Inserted out of id order, in 3 segments; ids above 2^53 among them.
    let seeded = fastgpt_rows(1800, DIM, 7);
    seed_fastgpt(&m, "modeldata", &seeded, DIM, 3, false);
    let state = tempdir();
    let sr = state.path().to_str().unwrap();

    // Small pages, so each chunk and the plan take many keyset pages over
    // segments inserted out of order.
    let out = Command::new(VMIG)
        .args(["migrate", "--from", &m, "--to", &dst, "--chunk-rows", "500", "--state-root", sr])
        .env("VMIG_MILVUS_PAGE_ROWS", "97")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let in_pg = rows(&dst, "modeldata");
    assert_eq!(as_mrows(&in_pg), sorted(seeded.clone()), "PostgreSQL must hold exactly what Milvus held");
    assert!(in_pg.iter().filter(|r| r.id > ABOVE_2_53).count() >= 180, "ids above 2^53 arrive unchanged");
    let cols = query_i64(&dst, "SELECT count(*) FROM information_schema.columns WHERE table_name = 'modeldata' AND column_name IN ('team_id', 'dataset_id', 'collection_id', 'createtime')");
    assert_eq!(cols, 4, "FastGPT's SQL column names");
    let ix = query_i64(&dst, "SELECT count(*) FROM pg_indexes WHERE tablename = 'modeldata' AND indexdef LIKE '%hnsw (vector vector_ip_ops) WITH (m=''32'', ef_construction=''128'')%'");
    assert_eq!(ix, 1, "the SQL vector index takes Milvus' index parameters");
    let max_id = seeded.iter().map(|r| r.id).max().unwrap();
    assert!(query_i64(&dst, "SELECT nextval('modeldata_id_seq')") > max_id, "new FastGPT rows get ids above every copied one");
    ok(&["verify", "--from", &m, "--to", &dst]);

    // PG → Milvus (a fresh database): the same ids, vectors and times again.
    let back = fresh_milvus_db("m2pg_back");
    exec(&dst, &format!("DELETE FROM modeldata WHERE id > {max_id}"));
    ok(&["migrate", "--from", &dst, "--to", &back, "--chunk-rows", "700", "--state-root", sr]);
    assert_eq!(milvus_rows(&back, "modeldata"), sorted(seeded.clone()), "Milvus → PG → Milvus changes nothing");
    let schema = milvus_schema(&back, "modeldata");
    assert!(schema.contains("auto_id: false") && schema.contains("\"teamId\"") && schema.contains("\"createTime\""), "{schema}");
    // Servers print the JSON with or without spaces (milvus-lite: Python's json.dumps).
    let ix = milvus_index_params(&back, "modeldata").replace(" ", "");
    assert!(ix.contains("index_type=HNSW") && ix.contains("metric_type=IP") && ix.contains(r#""M":32"#) && ix.contains(r#""efConstruction":128"#), "{ix}");
    ok(&["verify", "--from", &dst, "--to", &back]);
    // verify notices a change made in Milvus.
    let mut changed = seeded[5].clone();
    changed.team_id = "changed".into();
    milvus_upsert(&back, "modeldata", &changed);
    let out = vmig(&["verify", "--from", &dst, "--to", &back]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("different ids [{}]", changed.id)));
}

#[test]
fn postgres_to_milvus_truncates_microseconds_then_milvus_to_milvus() {
    let (src, _) = dbs("pg2m");
    let m = fresh_milvus_db("pg2m");
    ok(&["generate", "--to", &src, "--rows", "1500", "--dim", "1536"]);
    // FastGPT's PostgreSQL default CURRENT_TIMESTAMP has microseconds; Milvus keeps milliseconds.
    exec(&src, "UPDATE modeldata SET createtime = createtime + interval '123457 microseconds' WHERE id % 3 = 0");
    let original = rows(&src, "modeldata");
    let state = tempdir();
    let sr = state.path().to_str().unwrap();
    ok(&["migrate", "--from", &src, "--to", &m, "--chunk-rows", "400", "--state-root", sr]);
    assert_eq!(milvus_rows(&m, "modeldata"), as_mrows(&original), "ids, vectors (bit-exact), strings, createTime floored to ms");
    let out = ok(&["verify", "--from", &src, "--to", &m]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("all rows equal") && said.contains("timestamps milliseconds"), "{said}");
    // A rerun finds every chunk in the ledger file and writes nothing.
    let out = ok(&["migrate", "--from", &src, "--to", &m, "--chunk-rows", "400", "--state-root", sr]);
    assert!(stderr(&out).contains("4 already committed"), "{}", stderr(&out));

    // Milvus → Milvus, another database and collection name: bit-exact, index kept.
    let copy = fresh_milvus_db("pg2m_copy");
    ok(&["migrate", "--from", &m, "--to", &copy, "--target-table", "modeldata_v1", "--chunk-rows", "600", "--state-root", sr]);
    assert_eq!(milvus_rows(&copy, "modeldata_v1"), milvus_rows(&m, "modeldata"));
    assert_eq!(milvus_count(&copy, "modeldata_v1"), 1500);
    ok(&["verify", "--from", &m, "--to", &copy, "--target-table", "modeldata_v1"]);

    // Another job into the same, non-empty collection: refused, unless told to empty it first.
    let again = ["migrate", "--from", &src, "--to", &copy, "--target-table", "modeldata_v1", "--state-root", sr, "--job", "second"];
    let out = vmig(&again);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("already has rows and no vmig ledger"), "{}", stderr(&out));
    exec(&src, "DELETE FROM modeldata WHERE id % 2 = 0");
    ok(&[&again[..], &["--on-existing", "truncate"]].concat());
    assert_eq!(milvus_rows(&copy, "modeldata_v1"), as_mrows(&rows(&src, "modeldata")), "only the source's rows remain");
    assert!(milvus_index_params(&copy, "modeldata_v1").contains("index_type=HNSW"), "the emptied collection keeps its index");
}

#[test]
fn milvus_to_oceanbase_and_back() {
    let m = fresh_milvus_db("m2ob");
    let ob = fresh_ob_db("m2ob");
    let seeded = fastgpt_rows(1200, DIM, 11);
    seed_fastgpt(&m, "modeldata", &seeded, DIM, 2, false);
    let state = tempdir();
    let sr = state.path().to_str().unwrap();
    ok(&["migrate", "--from", &m, "--to", &ob, "--chunk-rows", "500", "--state-root", sr]);
    let in_ob = ob_rows(&ob, "modeldata");
    let ob_m = as_mrows(&in_ob);
    let want = sorted(seeded.clone());
    assert_eq!(ob_m.iter().map(|r| r.id).collect::<Vec<_>>(), want.iter().map(|r| r.id).collect::<Vec<_>>(), "ids (above 2^53 too)");
    assert_eq!(
        ob_m.iter().map(|r| (&r.team_id, r.create_time_ms)).collect::<Vec<_>>(),
        want.iter().map(|r| (&r.team_id, r.create_time_ms)).collect::<Vec<_>>()
    );
    let seeded_rows: Vec<Row> = rows_from_mrows(&want);
    assert_rows_equal(&seeded_rows, &in_ob);
    assert!(ob_query_string(&ob, "SHOW CREATE TABLE modeldata").contains("DISTANCE=INNER_PRODUCT, TYPE=HNSW, M=32, EF_CONSTRUCTION=128"));
    ok(&["verify", "--from", &m, "--to", &ob]);

    // OB → Milvus: Milvus receives exactly what OceanBase returns, ids unchanged.
    let back = fresh_milvus_db("m2ob_back");
    ok(&["migrate", "--from", &ob, "--to", &back, "--chunk-rows", "500", "--state-root", sr]);
    assert_eq!(milvus_rows(&back, "modeldata"), ob_m);
    ok(&["verify", "--from", &ob, "--to", &back]);
}

/// Milvus rows as `rows()` returns SQL rows (createtime printed as PostgreSQL does).
fn rows_from_mrows(m: &[MRow]) -> Vec<Row> {
    m.iter()
        .map(|r| {
            let t = chrono::DateTime::from_timestamp_millis(r.create_time_ms).unwrap().naive_utc();
            let mut s = t.format("%Y-%m-%d %H:%M:%S%.3f").to_string();
            s = s.trim_end_matches('0').trim_end_matches('.').to_string();
            Row {
                id: r.id,
                vector_bits: r.vector_bits.clone(),
                team_id: r.team_id.clone(),
                dataset_id: r.dataset_id.clone(),
                collection_id: r.collection_id.clone(),
                createtime: Some(s),
            }
        })
        .collect()
}

#[test]
fn milvus_to_staging_to_postgres_with_milvus_stopped() {
    // A server with users on: vmig authenticates with MILVUS_TOKEN as FastGPT does.
    let server = PrivateMilvus::start("stopped", 19631, true);
    let m = fresh_milvus_db_on(&server.base, "fastgpt");
    let address = "http://127.0.0.1:19631";
    let dst = fresh_db(&target_base(), "mstopped_dst", true);
    let seeded = fastgpt_rows(1000, DIM, 13);
    seed_fastgpt(&m, "modeldata", &seeded, DIM, 2, false);
    let dir = tempdir();
    let st = dir.path().join("st");
    let st = st.to_str().unwrap();
    let export = |token: &str| {
        // The FastGPT form of the address: MILVUS_ADDRESS, database fastgpt implied.
        Command::new(VMIG)
            .args(["export", "--from", "MILVUS_ADDRESS", "--staging", st, "--chunk-rows", "300"])
            .env("MILVUS_ADDRESS", address)
            .env("MILVUS_TOKEN", token)
            .output()
            .unwrap()
    };
    let out = export("root:WrongPw9");
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(e.lines().count() <= 2 && e.contains("milvus://root@127.0.0.1:19631/fastgpt") && !e.contains("WrongPw9"), "{e}");
    let out = export("root:Milvus");
    assert!(out.status.success(), "{}", stderr(&out));
    let with_token = std::env::var("MILVUS_TOKEN").is_ok();
    assert!(!with_token, "tests must not inherit MILVUS_TOKEN");
    ok(&["verify", "--from", &m.replacen("http://", "milvus://", 1), "--to", st]);
    server.stop();
    ok(&["import", "--staging", st, "--to", &dst]);
    assert_eq!(as_mrows(&rows(&dst, "modeldata")), sorted(seeded));
    ok(&["verify", "--from", st, "--to", &dst]);
}

#[test]
fn postgres_to_staging_to_milvus() {
    let (src, _) = dbs("pgst2m");
    let m = fresh_milvus_db("pgst2m");
    ok(&["generate", "--to", &src, "--rows", "1200", "--dim", "1536"]);
    let dir = tempdir();
    let st = dir.path().join("st");
    let st = st.to_str().unwrap();
    ok(&["export", "--from", &src, "--staging", st, "--chunk-rows", "500"]);
    let report = dir.path().join("report.json");
    ok(&["import", "--staging", st, "--to", &m, "--report", report.to_str().unwrap()]);
    assert_index_builds(&report, &["vector_index"]);
    assert_eq!(milvus_rows(&m, "modeldata"), as_mrows(&rows(&src, "modeldata")));
    assert!(std::path::Path::new(st).join("milvus-ledger.jsonl").exists(), "the ledger file sits in the job's state directory");
    ok(&["verify", "--from", st, "--to", &m]);
    // reset forgets the job's ledger lines, and the file with them.
    let out = ok(&["reset", "--staging", st, "--to", &m, "--yes"]);
    assert!(stderr(&out).contains("deleted 3 ledger rows"), "{}", stderr(&out));
    assert!(!std::path::Path::new(st).join("milvus-ledger.jsonl").exists());
}

/// Chunks the ledger file records (not the line that marks the job's first write).
fn ledger_lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).map(|t| t.lines().filter(|l| l.contains("\"record\"")).count()).unwrap_or(0)
}

#[test]
fn kill_during_milvus_import_then_resume() {
    let (src, _) = dbs("killm");
    let m = fresh_milvus_db("killm");
    ok(&["generate", "--to", &src, "--rows", "4000", "--dim", "1536"]);
    let dir = tempdir();
    let st = dir.path().join("st");
    ok(&["export", "--from", &src, "--staging", st.to_str().unwrap(), "--chunk-rows", "200"]);
    let ledger = st.join("milvus-ledger.jsonl");
    for min_committed in [3, 9] {
        let mut child = Command::new(VMIG)
            .args(["import", "--staging", st.to_str().unwrap(), "--to", &m, "--quiet"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while ledger_lines(&ledger) < min_committed {
            assert!(started.elapsed() < Duration::from_secs(120), "import made no progress");
            assert!(child.try_wait().unwrap().is_none(), "import ended before it was killed");
            std::thread::sleep(Duration::from_millis(20));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    let committed = ledger_lines(&ledger);
    assert!(committed >= 9 && committed < 20, "killed mid-way ({committed} chunks)");
    let out = ok(&["import", "--staging", st.to_str().unwrap(), "--to", &m]);
    assert!(stderr(&out).contains(&format!("{committed} already committed")), "{}", stderr(&out));
    let got = milvus_rows(&m, "modeldata");
    assert_eq!(milvus_count(&m, "modeldata"), 4000, "no duplicates: count(*) equals the source");
    assert_eq!(got, as_mrows(&rows(&src, "modeldata")));
    ok(&["verify", "--from", &src, "--to", &m]);
}

#[test]
fn rows_milvus_cannot_take_go_to_rejects_and_bad_schemas_fail_before_writing() {
    let (src, _) = dbs("mbad");
    let m = fresh_milvus_db("mbad");
    // FastGPT's own collection (VarChar(64) ids), empty, as the target.
    seed_fastgpt(&m, "modeldata", &[], 8, 1, false);
    exec(
        &src,
        "CREATE TABLE modeldata (id BIGSERIAL PRIMARY KEY, vector VECTOR NOT NULL, team_id VARCHAR(100) NOT NULL,
           dataset_id VARCHAR(50) NOT NULL, collection_id VARCHAR(50) NOT NULL, createtime TIMESTAMP DEFAULT CURRENT_TIMESTAMP);
         INSERT INTO modeldata (vector, team_id, dataset_id, collection_id)
           SELECT ('[' || array_to_string(array_fill(i::real / 100, ARRAY[8]), ',') || ']')::vector, 't', 'd', 'c' FROM generate_series(1, 40) i;
         UPDATE modeldata SET vector = '[1,2,3]' WHERE id = 5;
         UPDATE modeldata SET team_id = repeat('x', 70) WHERE id = 9;
         UPDATE modeldata SET team_id = repeat('中', 22) WHERE id = 12;
         UPDATE modeldata SET team_id = repeat('中', 21) WHERE id = 13;
         UPDATE modeldata SET createtime = NULL WHERE id = 20;",
    );
    let state = tempdir();
    let sr = state.path().to_str().unwrap();
    let out = vmig(&["migrate", "--from", &src, "--to", &m, "--state-root", sr]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let job_dir = std::fs::read_dir(state.path()).unwrap().next().unwrap().unwrap().path();
    let r = rejects(&job_dir);
    assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![5, 9, 12, 20], "{r:?}");
    assert!(r[0].1.contains("dimension") || r[0].1.contains("dim"), "{r:?}");
    assert!(r[2].1.contains("66 bytes") && r[2].1.contains("max_length 64"), "counted in bytes as Milvus does: {r:?}");
    assert!(r[3].1.contains("NULL"), "{r:?}");
    let good: Vec<Row> = rows(&src, "modeldata").into_iter().filter(|x| ![5, 9, 12, 20].contains(&x.id)).collect();
    assert_eq!(good.len(), 36);
    assert_eq!(milvus_rows(&m, "modeldata"), as_mrows(&good), "every other row arrives exactly, once");

    // A target collection with autoID=true would renumber FastGPT's rows: refused before writing.
    let auto = fresh_milvus_db("mbad_auto");
    seed_fastgpt(&auto, "modeldata", &[], 8, 1, true);
    exec(&src, "DELETE FROM modeldata WHERE id IN (5, 9, 12, 20)");
    let out = vmig(&["migrate", "--from", &src, "--to", &auto, "--state-root", sr]);
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(e.contains("autoID=true") && e.contains("MongoDB"), "{e}");

    // A timestamp column the mapping does not name cannot become a Milvus field.
    exec(&src, "ALTER TABLE modeldata ADD COLUMN updated_at TIMESTAMP");
    let fresh = fresh_milvus_db("mbad_map");
    let out = vmig(&["migrate", "--from", &src, "--to", &fresh, "--state-root", sr]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("updated_at is a timestamp"), "{}", stderr(&out));

    // An unreachable address with a password: one line, no secret.
    let out = vmig(&["migrate", "--from", &src, "--to", "milvus://root:S3cretPw@127.0.0.1:1/fastgpt", "--state-root", sr]);
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(e.contains("cannot connect to Milvus at milvus://root@127.0.0.1:1/fastgpt") && !e.contains("S3cretPw"), "{e}");
}

#[test]
fn nan_in_staged_vectors_is_rejected_before_milvus() {
    let (src, _) = dbs("mnan");
    let m = fresh_milvus_db("mnan");
    ok(&["generate", "--to", &src, "--rows", "50", "--dim", "8"]);
    let dir = tempdir();
    let st = dir.path().join("st");
    let (bad5, bad9) = stage_with_nan_and_inf(&src, &st);
    let out = vmig(&["import", "--staging", st.to_str().unwrap(), "--to", &m]);
    assert_eq!(out.status.code(), Some(1));
    let r = rejects(&st);
    assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![bad5, bad9]);
    let good: Vec<Row> = rows(&src, "modeldata").into_iter().filter(|x| x.id != bad5 && x.id != bad9).collect();
    assert_eq!(good.len(), 48);
    assert_eq!(milvus_rows(&m, "modeldata"), as_mrows(&good), "every other row arrives exactly, once");
}

#[test]
fn a_pipeline_file_maps_other_tables() {
    let (src, dst) = dbs("mmap");
    let m = fresh_milvus_db("mmap");
    exec(
        &src,
        "CREATE TABLE kb (id INTEGER PRIMARY KEY, emb VECTOR(8) NOT NULL, tenant VARCHAR(20) NOT NULL, created TIMESTAMP NOT NULL, score REAL NOT NULL);
         INSERT INTO kb SELECT i, ('[' || array_to_string(array_fill(i::real / 7, ARRAY[8]), ',') || ']')::vector, 't' || (i % 4),
           TIMESTAMP '2025-01-02 03:04:05.678' + i * interval '1 minute', i / 3.0 FROM generate_series(1, 300) i;",
    );
    let dir = tempdir();
    let file = dir.path().join("kb.json");
    let pipeline = |from: &str, to: &str| {
        serde_json::json!({
            "from": from, "to": to, "table": "kb", "chunk_rows": 100,
            "milvus_fields": [
                {"column": "tenant", "field": "tenantId"},
                {"column": "created", "field": "createdAt", "epoch_ms": true}
            ]
        })
    };
    std::fs::write(&file, pipeline(&src, &m).to_string()).unwrap();
    let sr = dir.path().join("state");
    ok(&["migrate", "--config", file.to_str().unwrap(), "--state-root", sr.to_str().unwrap()]);
    let schema = milvus_schema(&m, "kb");
    assert!(schema.contains("\"tenantId\"") && schema.contains("\"createdAt\"") && schema.contains("\"score\""), "{schema}");
    // An integer key became Milvus' Int64 one. And back into PostgreSQL under
    // the SQL names, through the same mapping.
    std::fs::write(&file, pipeline(&m, &dst).to_string()).unwrap();
    ok(&["migrate", "--config", file.to_str().unwrap(), "--state-root", sr.to_str().unwrap()]);
    let q = "SELECT string_agg(id || ':' || emb::text || ':' || tenant || ':' || created || ':' || score, ',' ORDER BY id) FROM kb";
    let text = |url: &str| rt().block_on(async { client(url).await.query_one(q, &[]).await.unwrap().get::<_, String>(0) });
    assert_eq!(text(&src), text(&dst));
}
