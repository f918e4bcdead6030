//! OceanBase / seekdb as source and target, against a real seekdb server:
//! PG → OB → PG, OB → staging → PG with OB stopped, PG → staging → OB,
//! OB → OB, kill -9 during an OB import, rows OB refuses, connection errors.
//! NaN and infinity that seekdb stored are refused (bad_input.rs covers the other sources).
mod common;
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

fn ob_show_create(url: &str, table: &str) -> String {
    ob_query_string(url, &format!("SHOW CREATE TABLE {table}"))
}

#[test]
fn postgres_to_oceanbase_and_back() {
    let (src, dst) = dbs("pgob");
    let ob = fresh_ob_db("pgob");
    ok(&["generate", "--to", &src, "--rows", "2500", "--dim", "1536"]);
    let original = rows(&src, "modeldata");
    let state = tempdir();
    let sr = state.path().to_str().unwrap();

    // PG → OB: FastGPT's DDL mirrored, vectors bit for bit.
    let report = state.path().join("report.json");
    ok(&["migrate", "--from", &src, "--to", &ob, "--chunk-rows", "600", "--state-root", sr, "--report", report.to_str().unwrap()]);
    assert_index_builds(&report, &["modeldata_vector_index", "modeldata_team_dataset_collection_index", "modeldata_create_time_index"]);
    let in_ob = ob_rows(&ob, "modeldata");
    assert_rows_equal(&original, &in_ob);
    let ddl = ob_show_create(&ob, "modeldata");
    assert!(
        ddl.contains("VECTOR KEY `modeldata_vector_index` (`vector`) WITH (DISTANCE=INNER_PRODUCT, TYPE=HNSW, M=32, EF_CONSTRUCTION=128"),
        "{ddl}"
    );
    assert!(ddl.contains("KEY `modeldata_team_dataset_collection_index` (`team_id`, `dataset_id`, `collection_id`)"), "{ddl}");
    // The application's next AUTO_INCREMENT id lands above every copied id.
    let max_id = original.last().unwrap().id;
    ob_exec(&ob, "INSERT INTO modeldata (vector, team_id, dataset_id, collection_id) SELECT vector, 't', 'd', 'c' FROM modeldata LIMIT 1");
    assert!(ob_query_i64(&ob, "SELECT max(id) FROM modeldata") > max_id);
    ob_exec(&ob, &format!("DELETE FROM modeldata WHERE id > {max_id}"));
    let out = ok(&["verify", "--from", &src, "--to", &ob]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("all rows equal") && said.contains("vectors bit-exact"), "{said}");
    // A rerun finds every chunk committed and writes nothing.
    let out = ok(&["migrate", "--from", &src, "--to", &ob, "--chunk-rows", "600", "--state-root", sr]);
    assert!(stderr(&out).contains("5 already committed"), "{}", stderr(&out));

    // OB → PG (the backup direction): PG receives exactly what OB stores,
    // which is exactly the original.
    ok(&["migrate", "--from", &ob, "--to", &dst, "--chunk-rows", "700", "--state-root", sr]);
    assert_rows_equal(&original, &rows(&dst, "modeldata"));
    let ix = query_i64(&dst, "SELECT count(*) FROM pg_indexes WHERE tablename = 'modeldata' AND indexdef LIKE '%hnsw (vector vector_ip_ops) WITH (m=''32'', ef_construction=''128'')%'");
    assert_eq!(ix, 1, "HNSW index with the source's parameters");
    assert!(query_i64(&dst, "SELECT nextval('modeldata_id_seq')") > max_id);
    ok(&["verify", "--from", &ob, "--to", &dst]);
    // verify still catches a real change on the OceanBase side.
    ob_exec(&ob, &format!("UPDATE modeldata SET team_id = 'changed' WHERE id = {}", original[10].id));
    let out = vmig(&["verify", "--from", &ob, "--to", &dst]);
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(&format!("different ids [{}]", original[10].id)), "{said}");
}

#[test]
fn oceanbase_to_staging_to_postgres_with_oceanbase_stopped() {
    let ob = PrivateSeekdb::start("stopped", 52991);
    let dst = fresh_db(&target_base(), "obstopped_dst", true);
    ok(&["generate", "--to", &ob.url, "--rows", "1500", "--dim", "1536"]);
    let before = ob_rows(&ob.url, "modeldata");
    let dir = tempdir();
    let st = dir.path().join("st");
    let st = st.to_str().unwrap();
    ok(&["export", "--from", &ob.url, "--staging", st, "--chunk-rows", "400"]);
    ok(&["verify", "--from", &ob.url, "--to", st]);
    ob.stop();
    let out = ok(&["import", "--staging", st, "--to", &dst]);
    assert!(!stderr(&out).contains("not bit-exact"), "vectors read from seekdb are exact: {}", stderr(&out));
    assert_rows_equal(&before, &rows(&dst, "modeldata"));
    ok(&["verify", "--from", st, "--to", &dst]);
    let out = ok(&["inspect", st]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("NOT bit-exact"), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn postgres_to_staging_to_oceanbase() {
    let (src, _) = dbs("pgstob");
    let ob = fresh_ob_db("pgstob");
    ok(&["generate", "--to", &src, "--rows", "1200", "--dim", "1536", "--halfvec"]);
    let dir = tempdir();
    let st = dir.path().join("st");
    let st = st.to_str().unwrap();
    ok(&["export", "--from", &src, "--staging", st, "--chunk-rows", "250"]);
    ok(&["import", "--staging", st, "--to", &ob]);
    // halfvec values widen exactly to float32, and seekdb keeps them bit for bit.
    assert_rows_equal(&rows(&src, "modeldata"), &ob_rows(&ob, "modeldata"));
    ok(&["verify", "--from", st, "--to", &ob]);
    ok(&["verify", "--from", &src, "--to", &ob]);
}

#[test]
fn oceanbase_to_oceanbase_keeps_index_variant() {
    let a = fresh_ob_db("obsrc");
    let b = fresh_ob_db("obdst");
    ok(&["generate", "--to", &a, "--rows", "900", "--dim", "64", "--no-vector-index"]);
    ob_exec(&a, "CREATE VECTOR INDEX vector_index ON modeldata(vector) WITH (distance=inner_product, type=hnsw_sq, m=16, ef_construction=64)");
    ok(&["migrate", "--from", &a, "--to", &b, "--target-table", "modeldata_copy", "--chunk-rows", "200", "--state-root", tempdir().path().to_str().unwrap()]);
    // Both sides read exactly (doubles in full): the same stored bits.
    assert_rows_equal(&ob_rows(&a, "modeldata"), &ob_rows(&b, "modeldata_copy"));
    let ddl = ob_show_create(&b, "modeldata_copy");
    assert!(ddl.contains("VECTOR KEY `vector_index` (`vector`) WITH (DISTANCE=INNER_PRODUCT, TYPE=HNSW_SQ, M=16, EF_CONSTRUCTION=64"), "{ddl}");
    ok(&["verify", "--from", &a, "--to", &b, "--target-table", "modeldata_copy"]);
}

#[test]
fn oceanbase_import_killed_resumes_without_duplicates() {
    let (src, _) = dbs("obkill");
    let ob = fresh_ob_db("obkill");
    ok(&["generate", "--to", &src, "--rows", "4000", "--dim", "64"]);
    let dir = tempdir();
    let st = dir.path().join("st");
    let st = st.to_str().unwrap();
    ok(&["export", "--from", &src, "--staging", st, "--chunk-rows", "200"]);
    // Chunks committed; none while the ledger table does not exist yet (seekdb
    // may list a table being created before it can be read: 1146 then too).
    let ledger = |ob: &str| match ob_try_query_i64(ob, "SELECT count(*) FROM vmig_ledger") {
        Ok(n) => n,
        Err(mysql_async::Error::Server(e)) if e.code == 1146 => 0,
        Err(e) => panic!("reading vmig_ledger: {e}"),
    };
    let mut committed_before = -1;
    for kill_after_chunks in [3i64, 9] {
        let mut child = Command::new(VMIG)
            .args(["import", "--staging", st, "--to", &ob, "--rate-limit", "1500", "--quiet"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while ledger(&ob) < kill_after_chunks {
            assert!(Instant::now() < deadline, "import did not progress");
            std::thread::sleep(Duration::from_millis(20));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let n = ledger(&ob);
        assert!(n < 20, "killed too late to test anything ({n} chunks)");
        assert!(n > committed_before);
        committed_before = n;
        // Nothing half-written: the table holds exactly the committed chunks' rows.
        let ledger_rows = ob_query_i64(&ob, "SELECT CAST(coalesce(sum(`rows`), 0) AS SIGNED) FROM vmig_ledger");
        assert_eq!(ob_query_i64(&ob, "SELECT count(*) FROM modeldata"), ledger_rows);
    }
    let out = ok(&["import", "--staging", st, "--to", &ob]);
    assert!(stderr(&out).contains("already committed"), "{}", stderr(&out));
    assert_rows_equal(&rows(&src, "modeldata"), &ob_rows(&ob, "modeldata"));
    ok(&["verify", "--from", st, "--to", &ob]);
}

#[test]
fn rows_oceanbase_cannot_take_are_rejected_and_neighbours_written() {
    let (src, _) = dbs("obbad");
    let ob = fresh_ob_db("obbad");
    exec(&src, "CREATE TABLE modeldata (id BIGINT PRIMARY KEY, vector VECTOR, team_id TEXT NOT NULL, createtime TIMESTAMP);
        INSERT INTO modeldata SELECT i, ARRAY[i, 1, 2]::real[]::vector, 'team', '2025-01-01'::timestamp + i * interval '1 second'
          FROM generate_series(1, 200) i;
        UPDATE modeldata SET team_id = 'a-much-too-long-team' WHERE id = 40;
        UPDATE modeldata SET createtime = 'infinity' WHERE id = 60;
        UPDATE modeldata SET createtime = '20000-01-01' WHERE id = 61;
        UPDATE modeldata SET vector = '[1,2,3,4]' WHERE id = 80;");
    // FastGPT-like existing target with a narrower team_id.
    ob_exec(&ob, "CREATE TABLE modeldata (id BIGINT AUTO_INCREMENT PRIMARY KEY, vector VECTOR(3) NOT NULL, team_id VARCHAR(10) NOT NULL, createtime TIMESTAMP(6))");
    let state = tempdir();
    let sr = state.path().to_str().unwrap();
    let out = vmig(&["migrate", "--from", &src, "--to", &ob, "--chunk-rows", "100", "--state-root", sr, "--job", "bad"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("4 rows rejected"), "{}", stderr(&out));
    let r = rejects(&state.path().join("bad"));
    let ids: Vec<i64> = r.iter().map(|x| x.0).collect();
    assert_eq!(ids, vec![40, 60, 61, 80], "{r:?}");
    assert!(r[0].1.contains("allows 10"), "{r:?}");
    assert!(r[1].1.contains("cannot be written to OceanBase"), "{r:?}");
    assert!(r[2].1.contains("OceanBase refused the row"), "found by bisecting the batch: {r:?}");
    assert!(r[3].1.contains("dimensions"), "{r:?}");
    // Every other row arrived exactly, including the neighbours of the refused one.
    let want: Vec<(i64, String, String, String)> = rt().block_on(async {
        client(&src)
            .await
            .query("SELECT id, vector::text, team_id, to_char(createtime, 'YYYY-MM-DD HH24:MI:SS.US') FROM modeldata WHERE id NOT IN (40, 60, 61, 80) ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect()
    });
    let got: Vec<(i64, String, String, String)> = rt().block_on(async {
        use mysql_async::prelude::Queryable;
        ob_conn(&ob).await.query("SELECT id, vector, team_id, CAST(createtime AS CHAR) FROM modeldata ORDER BY id").await.unwrap()
    });
    assert_eq!(want.len(), 196);
    assert_eq!(got, want, "seekdb holds every other row, exactly");
    ok(&["migrate", "--from", &src, "--to", &ob, "--chunk-rows", "100", "--state-root", sr, "--job", "bad", "--max-rejects", "4"]);
}

#[test]
fn oceanbase_connection_errors_are_one_line_without_secrets() {
    let base = seekdb_base();
    ob_exec(&base, "DROP USER IF EXISTS 'vmig_pw'");
    ob_exec(&base, "CREATE USER 'vmig_pw' IDENTIFIED BY 'Right-Pw-1'");
    let wrong = base.replacen("mysql://root@", "mysql://vmig_pw:S3cret-Wrong@", 1);
    let out = vmig(&["migrate", "--from", &wrong, "--to", &target_base()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("Access denied") && err.contains("mysql://vmig_pw@127.0.0.1"), "{err}");
    assert!(!err.contains("S3cret"), "password leaked: {err}");
    assert_eq!(err.lines().filter(|l| l.starts_with("error:")).count(), 1, "{err}");

    let out = vmig(&["migrate", "--from", &seekdb_base(), "--table", "no_such_table", "--to", &target_base()]);
    assert!(stderr(&out).contains("table no_such_table does not exist"), "{}", stderr(&out));
    let out = vmig(&["migrate", "--from", "mysql://root@127.0.0.1:1/test", "--to", &target_base()]);
    assert!(stderr(&out).contains("cannot connect to mysql://root@127.0.0.1:1/test"), "{}", stderr(&out));
}

/// seekdb stores NaN and infinity in a VECTOR (against its documentation)
/// and prints them as 0 in every text form; vmig reads the stored bits, so
/// such rows are refused with the reason, not copied as zeros.
#[test]
fn nan_and_infinity_stored_in_oceanbase_are_rejected_not_read_as_zero() {
    let ob = fresh_ob_db("obnan");
    let dst = fresh_db(&target_base(), "obnan_dst", true);
    ob_exec(&ob, "CREATE TABLE modeldata (id BIGINT PRIMARY KEY, vector VECTOR(3), team_id VARCHAR(50) NOT NULL)");
    let values: Vec<String> = (1..=60)
        .map(|i| {
            let v = match i {
                7 => "[nan,1,2]".to_string(),
                9 => "[1,-inf,2]".to_string(),
                _ => format!("[{i}.5,-0.0,1e-40]"),
            };
            format!("({i}, '{v}', 'team{i}')")
        })
        .collect();
    ob_exec(&ob, &format!("INSERT INTO modeldata VALUES {}", values.join(",")));
    let state = tempdir();
    let sr = state.path().to_str().unwrap();
    let out = vmig(&["migrate", "--from", &ob, "--to", &dst, "--chunk-rows", "25", "--state-root", sr, "--job", "nan"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("2 rows rejected"), "{}", stderr(&out));
    let r = rejects(&state.path().join("nan"));
    assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![7, 9], "{r:?}");
    assert!(r[0].1.contains("NaN at position 0"), "{r:?}");
    assert!(r[1].1.contains("-inf at position 1"), "{r:?}");
    // The rest arrived bit for bit: -0.0 keeps its sign, a subnormal its value.
    let got: Vec<(i64, Vec<u32>)> = rt().block_on(async {
        client(&dst)
            .await
            .query("SELECT id, vector::real[] FROM modeldata ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get::<_, Vec<f32>>(1).iter().map(|x| x.to_bits()).collect()))
            .collect()
    });
    let want: Vec<(i64, Vec<u32>)> =
        (1..=60).filter(|i| ![7, 9].contains(i)).map(|i| (i, vec![(i as f32 + 0.5).to_bits(), (-0.0f32).to_bits(), 1e-40f32.to_bits()])).collect();
    assert_eq!(got, want);
}
