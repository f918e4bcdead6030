//! PostgreSQL → PostgreSQL, directly and through staging, against real servers.
mod common;
use common::*;

#[test]
fn direct_migration_is_exact_with_indexes_and_sequence() {
    let (src, dst) = dbs("direct1536");
    ok(&["generate", "--to", &src, "--rows", "1500", "--dim", "1536"]);
    let state = tempdir();
    let report = state.path().join("report.json");
    let out = ok(&[
        "migrate", "--from", &src, "--to", &dst, "--chunk-rows", "400", "--workers", "2",
        "--state-root", state.path().to_str().unwrap(), "--report", report.to_str().unwrap(),
    ]);
    assert_eq!(assert_same_rows(&src, "modeldata", &dst, "modeldata"), 1500);
    // The HNSW build is sized and says so: 1500 × 1536-d fits well in 1 GB.
    let said = stderr(&out);
    assert!(said.contains("HNSW graph ≈ 10.5 MiB (1500 rows × 1536 dims, m=32); maintenance_work_mem 1.0 GiB"), "{said}");
    assert!(!said.contains("does not fit"), "{said}");
    // The report splits the finish: each index build has its own time.
    assert!(said.contains("time: load ") && said.contains("building index modeldata_vector_index "), "{said}");
    let out = ok(&["verify", "--from", &src, "--to", &dst, "--chunk-rows", "333"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("all rows equal"));

    // Indexes mirror the source's, HNSW parameters and opclass included.
    let rt = rt();
    let defs: Vec<String> = rt.block_on(async {
        client(&dst).await.query("SELECT indexdef FROM pg_indexes WHERE tablename = 'modeldata'", &[]).await.unwrap()
            .iter().map(|r| r.get(0)).collect()
    });
    assert!(defs.iter().any(|d| d.contains("hnsw") && d.contains("vector_ip_ops") && d.contains("m='32'") && d.contains("ef_construction='128'")), "{defs:?}");
    assert!(defs.iter().any(|d| d.contains("(team_id, dataset_id, collection_id)")), "{defs:?}");
    assert!(defs.iter().any(|d| d.contains("(createtime)")), "{defs:?}");

    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["ok"], true);
    assert_eq!(r["stages"][2]["rows"], 1500);
    assert_eq!(r["chunks_total"], 4);
    let phases: Vec<&str> = r["finish_phases"].as_array().unwrap().iter().map(|p| p["phase"].as_str().unwrap()).collect();
    assert!(phases.contains(&"building index modeldata_vector_index"), "{phases:?}");
    assert_index_builds(&report, &["modeldata_vector_index", "modeldata_team_dataset_collection_index", "modeldata_create_time_index"]);


    // A second run finds everything committed and writes nothing.
    let out = ok(&["migrate", "--from", &src, "--to", &dst, "--chunk-rows", "400", "--state-root", state.path().to_str().unwrap()]);
    assert!(stderr(&out).contains("already committed"), "{}", stderr(&out));
    // The application's next id does not collide.
    let max = query_i64(&dst, "SELECT max(id) FROM modeldata");
    exec(&dst, "INSERT INTO modeldata (vector, team_id, dataset_id, collection_id) SELECT vector, 't', 'd', 'c' FROM modeldata LIMIT 1");
    assert!(query_i64(&dst, "SELECT max(id) FROM modeldata") > max);

    // verify notices a changed row and names its id.
    exec(&dst, "UPDATE modeldata SET team_id = 'changed' WHERE id = (SELECT min(id) FROM modeldata)");
    let out = vmig(&["verify", "--from", &src, "--to", &dst]);
    assert_eq!(out.status.code(), Some(1));
    let min = query_i64(&src, "SELECT min(id) FROM modeldata");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("different ids [{min}]")));
}

/// A graph larger than the memory allowed is announced before the build,
/// with the setting that would make it fit; the index is still built.
#[test]
fn an_hnsw_graph_over_the_index_memory_cap_is_announced() {
    let (src, dst) = dbs("index_memory");
    ok(&["generate", "--to", &src, "--rows", "300", "--dim", "1536"]);
    let state = tempdir();
    let out = ok(&["migrate", "--from", &src, "--to", &dst, "--index-memory", "1MB", "--state-root", state.path().to_str().unwrap()]);
    let said = stderr(&out);
    assert!(said.contains("maintenance_work_mem 1.0 MiB (cap 1.0 MiB from --index-memory)"), "{said}");
    assert!(said.contains("warning: the HNSW graph (≈2.1 MiB) does not fit in maintenance_work_mem (1.0 MiB)") && said.contains("--index-memory 3MB"), "{said}");
    assert_eq!(query_i64(&dst, "SELECT count(*) FROM pg_indexes WHERE tablename = 'modeldata' AND indexdef LIKE '%hnsw%'"), 1);
}

#[test]
fn halfvec_small_dimension_round_trips_bit_exact() {
    let (src, dst) = dbs("halfvec8");
    ok(&["generate", "--to", &src, "--rows", "900", "--dim", "8", "--halfvec"]);
    let state = tempdir();
    ok(&["migrate", "--from", &src, "--to", &dst, "--chunk-rows", "250", "--state-root", state.path().to_str().unwrap()]);
    assert_eq!(assert_same_rows(&src, "modeldata", &dst, "modeldata"), 900);
    assert_eq!(query_i64(&dst, "SELECT count(*) FROM pg_attribute WHERE attrelid = 'modeldata'::regclass AND format_type(atttypid, atttypmod) = 'halfvec(8)'"), 1);
    ok(&["verify", "--from", &src, "--to", &dst]);
}

#[test]
fn non_empty_target_is_refused_unless_policy_given() {
    let (src, dst) = dbs("guard");
    ok(&["generate", "--to", &src, "--rows", "300", "--dim", "16"]);
    ok(&["generate", "--to", &dst, "--rows", "10", "--dim", "16", "--seed", "7"]);
    let state = tempdir();
    let sr = state.path().to_str().unwrap();
    let out = vmig(&["migrate", "--from", &src, "--to", &dst, "--state-root", sr]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--on-existing"), "{}", stderr(&out));
    assert_eq!(query_i64(&dst, "SELECT count(*) FROM modeldata"), 10);
    ok(&["migrate", "--from", &src, "--to", &dst, "--state-root", sr, "--on-existing", "truncate"]);
    assert_same_rows(&src, "modeldata", &dst, "modeldata");
}

#[test]
fn tee_through_staging_and_pipeline_file() {
    let (src, dst) = dbs("tee");
    ok(&["generate", "--to", &src, "--rows", "700", "--dim", "32"]);
    let dir = tempdir();
    let staging = dir.path().join("st");
    let pipeline = dir.path().join("p.json");
    std::fs::write(&pipeline, serde_json::json!({"from": "env:TEE_SRC", "to": "env:TEE_DST", "table": "modeldata",
        "staging": staging, "chunk_rows": 200}).to_string()).unwrap();
    let out = std::process::Command::new(VMIG).args(["migrate", "--config", pipeline.to_str().unwrap()])
        .env("TEE_SRC", &src).env("TEE_DST", &dst).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_same_rows(&src, "modeldata", &dst, "modeldata");
    ok(&["verify", "--from", &src, "--staging", staging.to_str().unwrap()]);
    // No secret reaches the manifest or status files.
    for f in ["manifest.json", "status-migrate.json"] {
        let text = std::fs::read_to_string(staging.join(f)).unwrap();
        assert!(!text.contains(":postgres@"), "{f} leaks the password");
    }
}

/// Indexes vmig cannot recreate (partial, expression, other methods) are not
/// carried, and the run says which, before the load and in its report; a
/// partial UNIQUE index is never made whole (it would refuse the source's rows).
#[test]
fn indexes_not_carried_are_named_and_partial_unique_is_not_made_whole() {
    let (src, dst) = dbs("index_kinds");
    exec(
        &src,
        "CREATE TABLE docs (id bigint PRIMARY KEY, email text NOT NULL, deleted boolean NOT NULL, vector vector(4) NOT NULL); \
         INSERT INTO docs SELECT g, 'u' || (g % 50) || '@x', g > 50, ARRAY[g, 1, 2, 3]::vector FROM generate_series(1, 400) g; \
         CREATE UNIQUE INDEX docs_live_email ON docs (email) WHERE NOT deleted; \
         CREATE INDEX docs_lower_email ON docs (lower(email)); \
         CREATE INDEX docs_email ON docs (email); \
         CREATE INDEX docs_ivf ON docs USING ivfflat (vector vector_l2_ops) WITH (lists = 4)",
    );
    let state = tempdir();
    let report = state.path().join("report.json");
    let out = ok(&[
        "migrate", "--from", &src, "--to", &dst, "--table", "docs", "--state-root", state.path().to_str().unwrap(),
        "--report", report.to_str().unwrap(),
    ]);
    // Every row, the deleted ones sharing live ones' emails included (a whole UNIQUE index would refuse them).
    let q = "SELECT count(*) || '|' || string_agg(id || ':' || email || ':' || deleted || ':' || vector::text, ',' ORDER BY id) FROM docs";
    let text = |url: &str| rt().block_on(async { client(url).await.query_one(q, &[]).await.unwrap().get::<_, String>(0) });
    assert!(text(&src).starts_with("400|"));
    assert_eq!(text(&src), text(&dst));
    let said = stderr(&out);
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let notes: Vec<&str> = r["notes"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    for name in ["docs_live_email", "docs_lower_email", "docs_ivf"] {
        assert!(said.contains("note: source index not carried to the target (vmig recreates plain btree and vector indexes only): CREATE") && said.contains(name), "{said}");
        assert!(notes.iter().any(|n| n.contains("not carried") && n.contains(name)), "{notes:?}");
    }
    assert!(!notes.iter().any(|n| n.contains("docs_email ")), "{notes:?}");
    let target_indexes: Vec<String> = rt().block_on(async {
        client(&dst).await.query("SELECT indexname::text FROM pg_indexes WHERE tablename = 'docs' ORDER BY 1", &[]).await.unwrap()
            .iter().map(|r| r.get(0)).collect()
    });
    assert_eq!(target_indexes, ["docs_email", "docs_pkey"]);
}

/// How many vector columns of `modeldata` have storage `mode` (pg_attribute.attstorage).
fn vector_storage_is(url: &str, mode: char) -> bool {
    query_i64(url, &format!("SELECT count(*) FROM pg_attribute WHERE attrelid = 'modeldata'::regclass AND attname = 'vector' AND attstorage = '{mode}'")) == 1
}

/// A table vmig creates keeps 1536-d vectors inline (PLAIN: no compression
/// attempt, no TOAST) and says why; vectors too wide for a page go EXTERNAL;
/// an existing table keeps its storage (named when it is the slow kind)
/// unless --vector-storage asks. Rows are equal in every case.
#[test]
fn vector_storage_is_chosen_for_a_new_table_and_left_alone_on_an_existing_one() {
    let (src, dst) = dbs("vstorage");
    ok(&["generate", "--to", &src, "--rows", "300", "--dim", "1536"]);
    assert!(vector_storage_is(&src, 'x'), "the source keeps PostgreSQL's default");
    let state = tempdir();
    let sr = state.path().to_str().unwrap();
    let report = state.path().join("report.json");
    let out = ok(&["migrate", "--from", &src, "--to", &dst, "--state-root", sr, "--report", report.to_str().unwrap()]);
    let said = stderr(&out);
    assert!(said.contains("vector storage: vector PLAIN (inline: a row takes at most 6265 bytes of the 8160 a 8 kB page holds"), "{said}");
    assert!(vector_storage_is(&dst, 'p'));
    assert_eq!(query_i64(&dst, "SELECT coalesce(pg_relation_size(reltoastrelid), 0) FROM pg_class WHERE oid = 'modeldata'::regclass"), 0, "no vector went to TOAST");
    assert_eq!(assert_same_rows(&src, "modeldata", &dst, "modeldata"), 300);
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert!(r["notes"].as_array().unwrap().iter().any(|n| n.as_str().unwrap().starts_with("vector storage: vector PLAIN")), "{}", r["notes"]);

    // An existing table with PostgreSQL's default: left as it is, and named.
    let (_, again) = dbs("vstorage_existing");
    ok(&["generate", "--to", &again, "--rows", "10", "--dim", "1536", "--seed", "7"]);
    let out = ok(&["migrate", "--from", &src, "--to", &again, "--state-root", sr, "--job", "existing", "--on-existing", "truncate"]);
    let said = stderr(&out);
    assert!(said.contains("note: the existing table modeldata stores vector EXTENDED") && said.contains("--vector-storage plain"), "{said}");
    assert!(vector_storage_is(&again, 'x'), "an existing table's storage is left alone");
    assert_eq!(assert_same_rows(&src, "modeldata", &again, "modeldata"), 300);
    // …unless asked.
    let out = ok(&[
        "migrate", "--from", &src, "--to", &again, "--state-root", sr, "--job", "asked", "--on-existing", "truncate", "--vector-storage", "external",
    ]);
    assert!(stderr(&out).contains("vector storage: vector EXTERNAL on the existing table modeldata (as --vector-storage asks"), "{}", stderr(&out));
    assert!(vector_storage_is(&again, 'e'));
    assert_eq!(assert_same_rows(&src, "modeldata", &again, "modeldata"), 300);

    // Vectors too wide to keep inline: EXTERNAL, no compression attempt.
    let (wide_src, wide_dst) = dbs("vstorage_wide");
    ok(&["generate", "--to", &wide_src, "--rows", "60", "--dim", "2100", "--no-vector-index"]);
    let out = ok(&["migrate", "--from", &wide_src, "--to", &wide_dst, "--state-root", sr, "--job", "wide"]);
    assert!(stderr(&out).contains("vector storage: vector EXTERNAL (out of line without a compression attempt: a row with its vectors inline would take up to 8521 bytes"), "{}", stderr(&out));
    assert!(vector_storage_is(&wide_dst, 'e'));
    assert_eq!(assert_same_rows(&wide_src, "modeldata", &wide_dst, "modeldata"), 60);
}
