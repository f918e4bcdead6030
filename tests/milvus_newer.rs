//! Milvus beyond 2.3: the same FastGPT migrations against milvus-lite 3.2,
//! a server speaking the newer (2.6-era) protocol, started by scripts/dbs.sh
//! beside the real Milvus 2.3.5. Differences between server versions are
//! handled by behaviour (what the server answers), never by version number.
mod common;

use common::milvus_db::{as_mrows, fresh_milvus_db_on, lite_base, milvus_base, milvus_count, milvus_count_where, milvus_rows, milvus_schema, pymilvus};
use common::*;

/// PostgreSQL → milvus-lite → PostgreSQL, exact: a collection vmig creates
/// on the newer server (which answers "no index" with code 700 where 2.3
/// answered an empty list), then read back out of it.
#[test]
fn fastgpt_round_trip_through_a_newer_protocol_milvus_is_exact() {
    let src = fresh_db(&source_base(), "newer_src", true);
    ok(&["generate", "--to", &src, "--rows", "2000", "--dim", "16"]);
    let lite = fresh_milvus_db_on(&lite_base(), "newer_mv");
    let back = fresh_db(&target_base(), "newer_back", true);
    let state = tempdir();
    let root = state.path().to_str().unwrap();

    ok(&["migrate", "--from", &src, "--to", &lite, "--chunk-rows", "500", "--quiet", "--state-root", root]);
    let want = rows(&src, "modeldata");
    assert_eq!(milvus_count(&lite, "modeldata"), want.len() as i64);
    assert_eq!(milvus_rows(&lite, "modeldata"), as_mrows(&want));
    ok(&["verify", "--from", &src, "--to", &lite]);

    ok(&["migrate", "--from", &lite, "--to", &back, "--chunk-rows", "500", "--quiet", "--state-root", root]);
    assert_same_rows(&src, "modeldata", &back, "modeldata");
    ok(&["verify", "--from", &lite, "--to", &back]);
}

/// milvus-lite answers a limited query segment by segment, not in key order
/// across segments (shown here: three subset jobs leave three segments whose
/// ids interleave). Keyset pages would then skip rows; vmig checks every
/// full page against `count(*)` and reads such a server by key ranges
/// small enough to fetch whole, so reading it back is still exact.
#[test]
fn a_server_whose_pages_are_not_in_key_order_is_still_read_exactly() {
    let src = fresh_db(&source_base(), "newer_seg_src", true);
    ok(&["generate", "--to", &src, "--rows", "1200", "--dim", "16"]);
    let lite = fresh_milvus_db_on(&lite_base(), "newer_seg");
    let back = fresh_db(&target_base(), "newer_seg_back", true);
    let state = tempdir();
    let root = state.path().to_str().unwrap();
    for team in ["team-2-团队", "team-0-团队", "team-1-团队"] {
        ok(&["migrate", "--from", &src, "--to", &lite, "--team", team, "--quiet", "--state-root", root]);
    }
    assert_eq!(milvus_count(&lite, "modeldata"), 1200);

    // Pages of 100 rows, so every chunk takes many.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmig"))
        .args(["migrate", "--from", &lite, "--to", &back, "--chunk-rows", "400", "--quiet", "--state-root", root])
        .env("VMIG_MILVUS_PAGE_ROWS", "100")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_same_rows(&src, "modeldata", &back, "modeldata");
    ok(&["verify", "--from", &lite, "--to", &back]);
}

/// FastGPT's createtime may be NULL. A collection vmig creates declares the
/// field nullable where the server keeps NULLs (milvus-lite, 2.6 protocol):
/// the NULLs arrive as NULLs and come back out as NULLs. Milvus 2.3 drops
/// the flag, and vmig, reading back what the server kept, puts exactly the
/// NULL rows into the rejects file with the reason, instead of failing the
/// batch or inventing a value.
#[test]
fn nulls_go_into_a_nullable_field_where_the_server_keeps_them() {
    let src = fresh_db(&source_base(), "newer_null_src", true);
    ok(&["generate", "--to", &src, "--rows", "700", "--dim", "16"]);
    exec(&src, "UPDATE modeldata SET createtime = NULL WHERE id % 7 = 0");
    let nulls = query_i64(&src, "SELECT count(*) FROM modeldata WHERE createtime IS NULL");
    assert!(nulls >= 90, "{nulls} NULLs");
    let state = tempdir();
    let root = state.path().to_str().unwrap();

    let lite = fresh_milvus_db_on(&lite_base(), "newer_null");
    ok(&["migrate", "--from", &src, "--to", &lite, "--chunk-rows", "200", "--quiet", "--state-root", root]);
    let schema = milvus_schema(&lite, "modeldata");
    assert!(schema.contains("nullable: true"), "createTime is declared nullable: {schema}");
    assert_eq!(milvus_count(&lite, "modeldata"), 700);
    assert_eq!(milvus_count_where(&lite, "modeldata", "createTime is null"), nulls);
    ok(&["verify", "--from", &src, "--to", &lite]);
    let back = fresh_db(&target_base(), "newer_null_back", true);
    ok(&["migrate", "--from", &lite, "--to", &back, "--chunk-rows", "200", "--quiet", "--state-root", root]);
    assert_same_rows(&src, "modeldata", &back, "modeldata");
    assert_eq!(query_i64(&back, "SELECT count(*) FROM modeldata WHERE createtime IS NULL"), nulls);

    let old = fresh_milvus_db_on(&milvus_base(), "older_null");
    ok(&["migrate", "--from", &src, "--to", &old, "--chunk-rows", "200", "--quiet", "--state-root", root, "--job", "older", "--max-rejects", &nulls.to_string()]);
    assert!(!milvus_schema(&old, "modeldata").contains("nullable: true"), "Milvus 2.3 keeps no nullable fields");
    assert_eq!(milvus_count(&old, "modeldata"), 700 - nulls);
    let rejected = rejects(&state.path().join("older"));
    let want: Vec<i64> = rows(&src, "modeldata").iter().filter(|r| r.createtime.is_none()).map(|r| r.id).collect();
    assert_eq!(rejected.iter().map(|r| r.0).collect::<Vec<_>>(), want);
    assert!(rejected.iter().all(|r| r.1 == "column createtime is NULL but the target requires a value"), "{:?}", rejected[0]);
}

/// What a collection declares about BM25: its functions, the text field's
/// parameters, the sparse field, and the sparse index's type and metric.
fn bm25_declaration(probe: &serde_json::Value) -> serde_json::Value {
    let ix = &probe["indexes"]["sparse"];
    serde_json::json!({
        "functions": probe["functions"],
        "text": probe["fields"]["text"],
        "sparse": probe["fields"]["sparse"],
        "sparse_index": [ix["index_type"], ix["metric_type"]],
    })
}

/// FastGPT ≥ 4.16.2 keeps `modeldata_v2` on Milvus 2.5+: vectors plus a
/// BM25 function computing `sparse` from `text`. The sparse vectors are
/// never copied: a collection vmig creates (directly or from a staging
/// area) declares the same function, analyzer and sparse index, and Milvus
/// recomputes them, so a BM25 search finds the same rows in both. Into
/// PostgreSQL the rows arrive without `sparse`, and verify says why. A
/// target collection that does not compute `sparse` is refused.
#[test]
fn fastgpt_modeldata_v2_keeps_its_bm25_function() {
    let lite = lite_base();
    let src = fresh_milvus_db_on(&lite, "v2_src");
    let seeded = pymilvus("modeldata_v2.py", &[&lite, "v2_src", "600", "16", "11"]);
    assert_eq!(seeded["ids"].as_array().unwrap().len(), 600);
    let want = pymilvus("milvus_probe.py", &[&lite, "v2_src", "modeldata_v2"]);
    assert_eq!(want["functions"][0]["name"], "text_bm25_emb");
    assert!(want["bm25"]["迁移"].as_array().unwrap().len() > 50, "the source finds rows by BM25");
    let state = tempdir();
    let root = state.path().to_str().unwrap();
    let args = |from: &str, to: &str| -> Vec<String> {
        ["migrate", "--from", from, "--to", to, "--table", "modeldata_v2", "--chunk-rows", "200", "--quiet", "--state-root", root].map(String::from).to_vec()
    };
    let run = |a: Vec<String>| ok(&a.iter().map(String::as_str).collect::<Vec<_>>());

    // Milvus → Milvus: the function, not its output, is copied.
    let dst = fresh_milvus_db_on(&lite, "v2_dst");
    run(args(&src, &dst));
    let got = pymilvus("milvus_probe.py", &[&lite, "v2_dst", "modeldata_v2"]);
    assert_eq!(bm25_declaration(&got), bm25_declaration(&want));
    assert_eq!(got["text"], want["text"], "every row's text");
    assert_eq!(got["bm25"], want["bm25"], "BM25 finds the same rows");
    assert_eq!(milvus_rows(&dst, "modeldata_v2"), milvus_rows(&src, "modeldata_v2"));
    let v = ok(&["verify", "--from", &src, "--to", &dst, "--table", "modeldata_v2"]);
    let said = String::from_utf8_lossy(&v.stdout).to_string();
    assert!(said.contains("sparse (BM25 over text): computed by Milvus in the source, the target computes it too; not copied, not compared"), "{said}");

    // Through a staging area: the manifest carries the function.
    let staging = tempdir();
    let st = staging.path().join("st");
    let st = st.to_str().unwrap();
    ok(&["export", "--from", &src, "--table", "modeldata_v2", "--staging", st, "--quiet", "--state-root", root]);
    let staged = fresh_milvus_db_on(&lite, "v2_staged");
    ok(&["import", "--staging", st, "--to", &staged, "--quiet", "--state-root", root]);
    let got = pymilvus("milvus_probe.py", &[&lite, "v2_staged", "modeldata_v2"]);
    assert_eq!(bm25_declaration(&got), bm25_declaration(&want));
    assert_eq!(got["bm25"], want["bm25"]);

    // Into PostgreSQL: every column but the computed one, exactly.
    let pg = fresh_db(&target_base(), "v2_pg", true);
    run(args(&src, &pg));
    assert_eq!(query_i64(&pg, "SELECT count(*) FROM modeldata_v2"), 600);
    assert_eq!(query_i64(&pg, "SELECT count(*) FROM information_schema.columns WHERE table_name = 'modeldata_v2' AND column_name = 'sparse'"), 0);
    // Every copied column, read back by SQL, equals the collection as pymilvus reads it.
    let dump_dir = tempdir();
    let dumped = dump_dir.path().join("v2.json");
    pymilvus("dump_rows.py", &[&lite, "v2_src", "modeldata_v2", dumped.to_str().unwrap(), "id,vector,text,teamId,datasetId,collectionId,createTime"]);
    let want: Vec<(i64, Vec<u32>, String, String, String, String, i64)> = serde_json::from_slice::<serde_json::Value>(&std::fs::read(&dumped).unwrap())
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let s = |f: &str| r[f].as_str().unwrap().to_string();
            let bits = r["vector"].as_array().unwrap().iter().map(|x| (x.as_f64().unwrap() as f32).to_bits()).collect();
            (r["id"].as_i64().unwrap(), bits, s("text"), s("teamId"), s("datasetId"), s("collectionId"), r["createTime"].as_i64().unwrap())
        })
        .collect();
    let got: Vec<(i64, Vec<u32>, String, String, String, String, i64)> = rt().block_on(async {
        client(&pg)
            .await
            .query(
                "SELECT id, vector::real[], text, team_id, dataset_id, collection_id, (extract(epoch FROM createtime) * 1000)::int8 FROM modeldata_v2 ORDER BY id",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get::<_, Vec<f32>>(1).iter().map(|x| x.to_bits()).collect(), r.get(2), r.get(3), r.get(4), r.get(5), r.get(6)))
            .collect()
    });
    assert_eq!(got.len(), 600);
    assert!(got == want, "PostgreSQL's modeldata_v2 differs from the collection (pymilvus)");
    let page = tempdir();
    let html = page.path().join("verify.html");
    let v = ok(&["verify", "--from", &src, "--to", &pg, "--table", "modeldata_v2", "--report", html.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&v.stdout).to_string();
    let note = "sparse (BM25 over text): computed by Milvus in the source, the target does not compute it";
    assert!(said.contains(note), "{said}");
    // The page says it too, not only the terminal and the JSON.
    assert!(std::fs::read_to_string(&html).unwrap().contains(&format!("<th>not compared</th><td>{note}")), "the HTML report lacks the note");

    // A collection without the function (made from the PostgreSQL copy) is refused.
    let plain = fresh_milvus_db_on(&lite, "v2_plain");
    run(args(&pg, &plain));
    let out = vmig(&args(&src, &plain).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("the source computes sparse (BM25 over text) with function text_bm25_emb, and target collection modeldata_v2 does not"), "{err}");
}

/// Managed Milvus (Zilliz Cloud) is reached as `https://…` with an API key.
/// Here: a Milvus with users on and TLS on its gRPC port, its certificate
/// from a private CA (named by `ca=`), the key given as `MILVUS_TOKEN`.
/// PostgreSQL → that Milvus → PostgreSQL is exact; without the CA, over
/// plain http, or with a wrong key, vmig stops with the reason and never
/// prints the key.
#[test]
fn managed_milvus_over_tls_with_an_api_key() {
    let server = common::milvus_db::PrivateMilvus::start_with("tls", 19635, &["auth", "tls"]);
    let ca = server.dir.join("tls/ca.pem");
    let src = fresh_db(&source_base(), "tls_src", true);
    ok(&["generate", "--to", &src, "--rows", "600", "--dim", "16"]);
    let back = fresh_db(&target_base(), "tls_back", true);
    let state = tempdir();
    let root = state.path().to_str().unwrap();
    let milvus = format!("{}/tls_kb?ca={}", server.base, ca.display());
    let run = |token: &str, from: &str, to: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_vmig"))
            .args(["migrate", "--from", from, "--to", to, "--chunk-rows", "200", "--quiet", "--state-root", root])
            .env("MILVUS_TOKEN", token)
            .output()
            .unwrap()
    };

    let out = run("root:Milvus", &src, &milvus);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run("root:Milvus", &milvus, &back);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_same_rows(&src, "modeldata", &back, "modeldata");

    let wrong_key = "root:not-the-key-4711";
    let out = run(wrong_key, &milvus, &back);
    let err = stderr(&out);
    assert!(!out.status.success() && !err.contains("not-the-key-4711"), "{err}");
    assert!(err.to_lowercase().contains("auth") || err.contains("password"), "a wrong key says so: {err}");

    let out = run("root:Milvus", &format!("{}/tls_kb", server.base), &back);
    let err = stderr(&out);
    assert!(!out.status.success() && err.contains("certificate"), "an unknown CA is refused: {err}");
    let out = run("root:Milvus", &format!("http://127.0.0.1:{}/tls_kb", server.port), &back);
    assert!(!out.status.success(), "plain http to a TLS port fails: {}", stderr(&out));
}

/// A collection whose teamId is a partition key (Milvus hashes each row
/// into one of its partitions by teamId): a Milvus target vmig creates
/// declares the same key with as many partitions, reading walks every
/// partition, and the rows are exact in Milvus and in PostgreSQL. On the
/// 2.3.5 reference server and on milvus-lite.
#[test]
fn a_partition_key_is_declared_again_on_a_created_target() {
    for (base, label) in [(common::milvus_db::milvus_base(), "pk23"), (lite_base(), "pklite")] {
        let (src_db, dst_db) = (format!("{label}_src"), format!("{label}_dst"));
        let src = fresh_milvus_db_on(&base, &src_db);
        pymilvus("partition_key.py", &[&base, &src_db, "900", "16", "8"]);
        let want = pymilvus("milvus_probe.py", &[&base, &src_db, "modeldata"]);
        assert_eq!(want["partition_key"], serde_json::json!(["teamId"]));
        let dst = fresh_milvus_db_on(&base, &dst_db);
        let state = tempdir();
        let root = state.path().to_str().unwrap();
        ok(&["migrate", "--from", &src, "--to", &dst, "--chunk-rows", "250", "--quiet", "--state-root", root]);
        let got = pymilvus("milvus_probe.py", &[&base, &dst_db, "modeldata"]);
        assert_eq!((&got["partition_key"], &got["num_partitions"]), (&want["partition_key"], &want["num_partitions"]), "{label}");
        let rows = milvus_rows(&src, "modeldata");
        assert_eq!(rows.len(), 900);
        assert_eq!(milvus_rows(&dst, "modeldata"), rows, "{label}");

        let pg = fresh_db(&target_base(), &format!("{label}_pg"), true);
        ok(&["migrate", "--from", &src, "--to", &pg, "--chunk-rows", "250", "--quiet", "--state-root", root]);
        assert_eq!(as_mrows(&common::rows(&pg, "modeldata")), rows, "{label}");
        ok(&["verify", "--from", &src, "--to", &pg]);
    }
}

/// Rows in named partitions (an application's own `kb_a` and `kb_b`, and
/// `_default`) keep their partition, on both servers: Milvus → Milvus puts
/// each row back into the partition it came from; Milvus → PostgreSQL keeps
/// it in a `milvus_partition` column, from which PostgreSQL → Milvus
/// recreates the partitions.
#[test]
fn named_partitions_are_recreated_and_rows_land_where_they_came_from() {
    for (base, label) in [(milvus_base(), "np23"), (lite_base(), "nplite")] {
        let src_db = format!("{label}_src");
        let src = fresh_milvus_db_on(&base, &src_db);
        let state = tempdir();
        let root = state.path().to_str().unwrap();
        let seeded_file = state.path().join("seeded.json");
        pymilvus("named_partitions.py", &[&base, &src_db, "800", "16", seeded_file.to_str().unwrap()]);
        let seeded: serde_json::Value = serde_json::from_slice(&std::fs::read(&seeded_file).unwrap()).unwrap();
        let mut want: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for r in seeded.as_array().unwrap() {
            want.entry(r["partition"].as_str().unwrap().to_string()).or_default().push(r["id"].as_str().unwrap().to_string());
        }
        want.values_mut().for_each(|ids| ids.sort());
        let want = serde_json::json!(want);
        let partitions = |db: &str| pymilvus("milvus_probe.py", &[&base, db, "modeldata"])["partitions"].clone();
        assert_eq!(partitions(&src_db), want, "{label}: the fixture's partitions");

        let dst_db = format!("{label}_dst");
        let dst = fresh_milvus_db_on(&base, &dst_db);
        ok(&["migrate", "--from", &src, "--to", &dst, "--chunk-rows", "200", "--quiet", "--state-root", root]);
        assert_eq!(partitions(&dst_db), want, "{label}: Milvus → Milvus");
        ok(&["verify", "--from", &src, "--to", &dst, "--chunk-rows", "200"]);

        let pg = fresh_db(&target_base(), &format!("{label}_pg"), true);
        ok(&["migrate", "--from", &src, "--to", &pg, "--chunk-rows", "200", "--quiet", "--state-root", root]);
        let mut got: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        common::rt().block_on(async {
            for r in common::client(&pg).await.query("SELECT milvus_partition, id FROM modeldata ORDER BY id COLLATE \"C\"", &[]).await.unwrap() {
                got.entry(r.get(0)).or_default().push(r.get(1));
            }
        });
        assert_eq!(serde_json::json!(got), want, "{label}: Milvus → PostgreSQL");
        ok(&["verify", "--from", &src, "--to", &pg, "--chunk-rows", "200"]);

        let back_db = format!("{label}_back");
        let back = fresh_milvus_db_on(&base, &back_db);
        ok(&["migrate", "--from", &pg, "--to", &back, "--chunk-rows", "200", "--quiet", "--state-root", root]);
        assert_eq!(partitions(&back_db), want, "{label}: PostgreSQL → Milvus");
        ok(&["verify", "--from", &pg, "--to", &back, "--chunk-rows", "200"]);
    }
}
