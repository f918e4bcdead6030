//! String primary keys in every direction: Milvus VarChar keys (md5 ids and
//! keys awkward in expressions), PostgreSQL `text` and `uuid` keys, an
//! OceanBase `utf8mb4_bin` key, and staging. Chunks are planned and read in
//! byte order on every side; every comparison below is against rows read
//! without vmig (SQL, pymilvus) or against what the fixtures seeded.
mod common;

use common::faults::{Moment, start, wait_for};
use common::milvus_db::{NewIds, fresh_milvus_db, fresh_milvus_db_on, lite_base, milvus_base, milvus_writer, pymilvus};
use common::online::{OnlineSource, Writer, ob_leftovers, online_scenario, source_artifacts};
use common::*;

/// A FastGPT-shaped row keyed by a string; vectors as f32 bit patterns.
#[derive(Debug, PartialEq)]
struct KeyedRow {
    id: String,
    vector_bits: Vec<u32>,
    team_id: String,
    dataset_id: String,
    collection_id: String,
    create_ms: i64,
}

/// Rows as the pymilvus fixtures write them (seeded, or dumped), by id bytes.
fn json_rows(path: &std::path::Path) -> Vec<KeyedRow> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let mut rows: Vec<KeyedRow> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| KeyedRow {
            id: r["id"].as_str().unwrap().to_string(),
            // pymilvus stores each float as the nearest f32, as `as f32` rounds.
            vector_bits: r["vector"].as_array().unwrap().iter().map(|x| (x.as_f64().unwrap() as f32).to_bits()).collect(),
            team_id: r["teamId"].as_str().unwrap().to_string(),
            dataset_id: r["datasetId"].as_str().unwrap().to_string(),
            collection_id: r["collectionId"].as_str().unwrap().to_string(),
            create_ms: r["createTime"].as_i64().unwrap(),
        })
        .collect();
    rows.sort_by(|a, b| a.id.cmp(&b.id));
    rows
}

/// A PostgreSQL copy of such a collection, read with SQL, by id bytes.
fn pg_keyed_rows(url: &str) -> Vec<KeyedRow> {
    rt().block_on(async {
        client(url)
            .await
            .query(
                "SELECT id::text, vector::real[], team_id, dataset_id, collection_id, \
                 (extract(epoch FROM createtime) * 1000)::int8 FROM modeldata ORDER BY id::text COLLATE \"C\"",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| KeyedRow {
                id: r.get(0),
                vector_bits: r.get::<_, Vec<f32>>(1).iter().map(|x| x.to_bits()).collect(),
                team_id: r.get(2),
                dataset_id: r.get(3),
                collection_id: r.get(4),
                create_ms: r.get(5),
            })
            .collect()
    })
}

/// Every row of a table as text (`cols` cast to text, vectors as f32 bits),
/// ordered by the key's bytes.
fn pg_text_rows(url: &str, table: &str, key: &str, cols: &str) -> Vec<(String, Vec<String>, Vec<u32>)> {
    rt().block_on(async {
        client(url)
            .await
            .query(&format!("SELECT {key}::text, ARRAY[{cols}]::text[], vector::real[] FROM {table} ORDER BY {key}::text COLLATE \"C\""), &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get::<_, Vec<f32>>(2).iter().map(|x| x.to_bits()).collect()))
            .collect()
    })
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// A VarChar-keyed collection (md5 ids and keys with quotes, a backslash,
/// both cases, non-ASCII; a partition key over 4 partitions; several
/// segments) goes Milvus → PostgreSQL, killed -9 after 2 chunks and
/// resumed, then PostgreSQL → a Milvus collection vmig creates, on Milvus
/// 2.3.5 and on milvus-lite. Both copies hold exactly the seeded rows.
#[test]
fn a_varchar_keyed_collection_goes_to_postgres_and_back_across_a_kill() {
    for (base, label) in [(milvus_base(), "sk23"), (lite_base(), "sklite")] {
        let src_db = format!("{label}_src");
        let src = fresh_milvus_db_on(&base, &src_db);
        let state = tempdir();
        let root = state.path().to_str().unwrap();
        let seeded_file = state.path().join("seeded.json");
        pymilvus("partition_key.py", &[&base, &src_db, "900", "16", "4", "varchar", seeded_file.to_str().unwrap()]);
        let seeded = json_rows(&seeded_file);
        assert_eq!(seeded.len(), 900);
        assert!(seeded.iter().any(|r| r.id == "a\"q") && seeded.iter().any(|r| r.id == "a\\b") && seeded.iter().any(|r| r.id == "A"));

        let pg = fresh_db(&target_base(), &format!("{label}_pg"), true);
        let job = format!("{label}-to-pg");
        let job_dir = state.path().join(&job);
        let run = args(&["migrate", "--from", &src, "--to", &pg, "--chunk-rows", "100", "--job", &job, "--state-root", root]);
        let mut killed = run.clone();
        killed.extend(args(&["--rate-limit", "150", "--quiet"]));
        let mut child = start(&killed, &Moment::Committed(2));
        wait_for(&mut child, &job_dir, "migrate", &Moment::Committed(2), label);
        child.kill().unwrap();
        child.wait().unwrap();
        let resumed = ok(&run.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        assert!(stderr(&resumed).contains("already committed"), "{label}: {}", stderr(&resumed));
        assert_eq!(pg_keyed_rows(&pg), seeded, "{label}: Milvus → PostgreSQL");
        let types: Vec<String> = rt().block_on(async {
            client(&pg)
                .await
                .query("SELECT data_type FROM information_schema.columns WHERE table_name = 'modeldata' AND column_name = 'id'", &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect()
        });
        assert_eq!(types, ["character varying"], "{label}");
        ok(&["verify", "--from", &src, "--to", &pg, "--chunk-rows", "100"]);

        let back_db = format!("{label}_back");
        let back = fresh_milvus_db_on(&base, &back_db);
        ok(&["migrate", "--from", &pg, "--to", &back, "--chunk-rows", "150", "--quiet", "--state-root", root]);
        let probe = pymilvus("milvus_probe.py", &[&base, &back_db, "modeldata"]);
        // VarChar is DataType 21 (pymilvus prints the number or the name).
        let id_type = probe["fields"]["id"]["type"].as_str().unwrap();
        assert!(id_type == "21" || id_type.contains("VARCHAR"), "{label}: {probe}");
        let dumped = state.path().join("back.json");
        pymilvus("dump_rows.py", &[&base, &back_db, "modeldata", dumped.to_str().unwrap()]);
        assert_eq!(json_rows(&dumped), seeded, "{label}: PostgreSQL → Milvus");
        ok(&["verify", "--from", &pg, "--to", &back, "--chunk-rows", "100"]);
    }
}

/// A `uuid`-keyed PostgreSQL table → Milvus (VarChar key) → PostgreSQL is
/// exact; PostgreSQL → PostgreSQL keeps the `uuid` type; a text id that is
/// not a UUID in canonical form is rejected by name, never altered.
#[test]
fn a_uuid_keyed_postgres_table_goes_through_milvus_and_back() {
    let src = fresh_db(&source_base(), "sk_uuid_src", true);
    exec(
        &src,
        "CREATE TABLE docs (id uuid PRIMARY KEY, team_id text NOT NULL, q text NOT NULL, vector vector(16) NOT NULL);
         INSERT INTO docs SELECT md5(i::text)::uuid, 'team-' || (i % 3), 'question ' || i,
           ARRAY(SELECT sin(i * 16 + j)::real FROM generate_series(1, 16) j)::vector
         FROM generate_series(1, 1200) i;
         CREATE INDEX docs_vector ON docs USING hnsw (vector vector_cosine_ops);",
    );
    let state = tempdir();
    let root = state.path().to_str().unwrap();
    let mv = fresh_milvus_db("sk_uuid_mv");
    ok(&["migrate", "--from", &src, "--to", &mv, "--table", "docs", "--chunk-rows", "250", "--quiet", "--state-root", root]);
    ok(&["verify", "--from", &src, "--to", &mv, "--table", "docs", "--chunk-rows", "200"]);

    let back = fresh_db(&target_base(), "sk_uuid_back", true);
    ok(&["migrate", "--from", &mv, "--to", &back, "--table", "docs", "--chunk-rows", "300", "--quiet", "--state-root", root]);
    let want = pg_text_rows(&src, "docs", "id", "team_id, q");
    assert_eq!(want.len(), 1200);
    assert_eq!(pg_text_rows(&back, "docs", "id", "team_id, q"), want);

    let same = fresh_db(&target_base(), "sk_uuid_pg", true);
    ok(&["migrate", "--from", &src, "--to", &same, "--table", "docs", "--chunk-rows", "250", "--quiet", "--state-root", root]);
    assert_eq!(query_i64(&same, "SELECT count(*) FROM information_schema.columns WHERE table_name = 'docs' AND column_name = 'id' AND data_type = 'uuid'"), 1);
    assert_eq!(pg_text_rows(&same, "docs", "id", "team_id, q"), want);
    ok(&["verify", "--from", &src, "--to", &same, "--table", "docs", "--chunk-rows", "200"]);

    // Into the uuid table again, from the copy whose ids are text: one of
    // them is upper case now, another is no UUID at all.
    exec(&back, "UPDATE docs SET id = upper(id) WHERE id = (SELECT min(id) FROM docs); INSERT INTO docs SELECT 'not-a-uuid', team_id, q, vector FROM docs LIMIT 1");
    let upper = query_text(&back, "SELECT id FROM docs WHERE id <> lower(id)");
    let job = "sk-uuid-again";
    let out = vmig(&["migrate", "--from", &back, "--to", &same, "--table", "docs", "--on-existing", "upsert", "--max-rejects", "2", "--job", job, "--quiet", "--state-root", root]);
    assert!(out.status.success(), "{}", stderr(&out));
    let refused = rejected_keys(&state.path().join(job), "id");
    assert_eq!(refused.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(), [upper.as_str(), "not-a-uuid"]);
    assert!(refused.iter().all(|r| r.1.contains("not a UUID in canonical form")), "{refused:?}");
    assert_eq!(pg_text_rows(&same, "docs", "id", "team_id, q"), want);

    // Again with --on-existing truncate and a chunk bound on a key that is no
    // UUID: each chunk's clearing DELETE compares the uuid column with it.
    exec(&back, "INSERT INTO docs SELECT '8-no-uuid', team_id, q, vector FROM docs LIMIT 1");
    let at = query_i64(&back, "SELECT count(*) FROM docs WHERE id COLLATE \"C\" <= '8-no-uuid'");
    let job = "sk-uuid-truncate";
    let out = vmig(&[
        "migrate", "--from", &back, "--to", &same, "--table", "docs", "--on-existing", "truncate", "--chunk-rows", &at.to_string(),
        "--max-rejects", "3", "--job", job, "--quiet", "--state-root", root,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(state.path().join(job).join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["plan"][0]["text"]["upto"], "8-no-uuid", "{}", manifest["plan"]);
    let mut refused: Vec<String> = rejected_keys(&state.path().join(job), "id").into_iter().map(|r| r.0).collect();
    refused.sort();
    let mut expected = vec![upper.clone(), "8-no-uuid".to_string(), "not-a-uuid".to_string()];
    expected.sort();
    assert_eq!(refused, expected);
    let lowered = upper.to_lowercase();
    let kept: Vec<_> = want.iter().filter(|r| r.0 != lowered).cloned().collect();
    assert_eq!(kept.len(), 1199);
    assert_eq!(pg_text_rows(&same, "docs", "id", "team_id, q"), kept);
}

fn query_text(url: &str, sql: &str) -> String {
    rt().block_on(async { client(url).await.query_one(sql, &[]).await.unwrap().get(0) })
}

/// A `text` key whose values are awkward in SQL and in order ('a' and 'A',
/// quotes, a backslash, spaces, non-ASCII, an emoji) goes PostgreSQL →
/// seekdb → PostgreSQL, PostgreSQL → milvus-lite → PostgreSQL and through a
/// staging area; every copy is exact and verify (small chunks, so ranges
/// fall between awkward keys) and `verify --sample` of the staging area
/// pass. Keys seekdb's utf8mb4_bin cannot order by their bytes (a trailing
/// space, a tab) are rejected there by name, never merged. A seekdb table
/// whose key collation is case-insensitive is refused.
#[test]
fn awkward_text_keys_go_through_every_backend_and_staging() {
    let src = fresh_db(&source_base(), "sk_text_src", true);
    exec(
        &src,
        r#"CREATE TABLE notes (k text PRIMARY KEY, q text NOT NULL, vector vector(8) NOT NULL);
           INSERT INTO notes SELECT k, 'note ' || k, ARRAY(SELECT (length(k) + j)::real FROM generate_series(1, 8) j)::vector
           FROM unnest(ARRAY['a', 'A', 'b', 'B', 'a b', 'a''q', 'a"q', E'a\\b', 'é', 'z', '日本', '0', '10', '9', '~',
                             'zz', 'Zebra', '😀', ' lead', 'tab	in', 'trail ', 'key-100']) k;
           INSERT INTO notes SELECT 'key-' || i, 'n' || i, ARRAY(SELECT (i * j % 17)::real FROM generate_series(1, 8) j)::vector
           FROM generate_series(1, 600) i WHERE i <> 100;
           CREATE INDEX notes_vector ON notes USING hnsw (vector vector_l2_ops);"#,
    );
    let want = pg_text_rows(&src, "notes", "k", "q");
    assert_eq!(want.len(), 621);
    let state = tempdir();
    let root = state.path().to_str().unwrap();

    let ob = fresh_ob_db("sk_text_ob");
    ok(&["migrate", "--from", &src, "--to", &ob, "--table", "notes", "--chunk-rows", "60", "--max-rejects", "2", "--job", "sk-ob", "--quiet", "--state-root", root]);
    let refused = rejected_keys(&state.path().join("sk-ob"), "k");
    assert_eq!(refused.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(), ["tab\tin", "trail "], "{refused:?}");
    assert!(refused[0].1.contains("sorts before the end of a string") && refused[1].1.contains("ends with a space"), "{refused:?}");
    let in_ob: Vec<_> = want.iter().filter(|r| r.0 != "tab\tin" && r.0 != "trail ").cloned().collect();
    assert_eq!(
        ob_query_string(&ob, "SELECT collation_name FROM information_schema.columns WHERE table_schema = DATABASE() AND table_name = 'notes' AND column_name = 'k'"),
        "utf8mb4_bin"
    );
    let v = vmig(&["verify", "--from", &src, "--to", &ob, "--table", "notes", "--chunk-rows", "40"]);
    let said = String::from_utf8_lossy(&v.stdout);
    assert!(!v.status.success() && said.contains("missing ids [") && said.contains("\"tab\\tin\"") && said.contains("\"trail \""), "{said}");
    let lite = fresh_milvus_db_on(&lite_base(), "sk_text_lite");
    ok(&["migrate", "--from", &src, "--to", &lite, "--table", "notes", "--chunk-rows", "60", "--quiet", "--state-root", root]);
    ok(&["verify", "--from", &src, "--to", &lite, "--table", "notes", "--chunk-rows", "40"]);
    for (from, label, expected) in [(&ob, "ob", &in_ob), (&lite, "lite", &want)] {
        let back = fresh_db(&target_base(), &format!("sk_text_back_{label}"), true);
        ok(&["migrate", "--from", from, "--to", &back, "--table", "notes", "--chunk-rows", "70", "--quiet", "--state-root", root]);
        assert_eq!(&pg_text_rows(&back, "notes", "k", "q"), expected, "via {label}");
    }

    // repair finds the differing chunks by string ranges and mends them.
    let back = "sk_text_back_lite";
    let back = with_db(&target_base(), back);
    exec(&back, r#"DELETE FROM notes WHERE k = 'a"q'; UPDATE notes SET q = 'changed' WHERE k = '日本'; INSERT INTO notes VALUES ('a''q extra', 'x', '[0,0,0,0,0,0,0,0]')"#);
    assert!(!vmig(&["verify", "--from", &src, "--to", &back, "--table", "notes", "--chunk-rows", "40"]).status.success());
    ok(&["repair", "--from", &src, "--to", &back, "--table", "notes", "--chunk-rows", "40"]);
    assert_eq!(pg_text_rows(&back, "notes", "k", "q"), want, "repaired");

    let staging = state.path().join("staging");
    let st = staging.to_str().unwrap();
    ok(&["export", "--from", &src, "--table", "notes", "--staging", st, "--chunk-rows", "80", "--quiet", "--state-root", root]);
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(staging.join("manifest.json")).unwrap()).unwrap();
    assert!(manifest["plan"][0]["text"]["upto"].is_string(), "the plan's string bounds: {}", manifest["plan"][0]);
    ok(&["verify", "--staging", st, "--to", &src, "--table", "notes"]);
    let sample = ok(&["verify", "--from", st, "--to", &src, "--table", "notes", "--sample", "100"]);
    assert!(String::from_utf8_lossy(&sample.stdout).contains("no difference in 100 sampled rows"), "{}", String::from_utf8_lossy(&sample.stdout));
    let imported = fresh_db(&target_base(), "sk_text_imported", true);
    ok(&["import", "--staging", st, "--to", &imported, "--quiet", "--state-root", root]);
    assert_eq!(pg_text_rows(&imported, "notes", "k", "q"), want);

    // 'a' and 'A' would be one key in a case-insensitive collation.
    ob_exec(&ob, "CREATE TABLE ci_notes (k VARCHAR(64) COLLATE utf8mb4_general_ci PRIMARY KEY, vector VECTOR(8) NOT NULL)");
    let refused = vmig(&["migrate", "--from", &ob, "--table", "ci_notes", "--to", &imported, "--quiet", "--state-root", root]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("utf8mb4_general_ci") && stderr(&refused).contains("binary collation"), "{}", stderr(&refused));
}

/// The online writers' traffic on `notes`, change `i`: new rows with keys
/// awkward in SQL, an update of a text, of a vector, a delete, and a key
/// renamed; `one` picks the row, `quote` writes a string literal.
fn notes_change(i: u64, one: &str, quote: &dyn Fn(&str) -> String) -> String {
    match i % 5 {
        0 => format!("INSERT INTO notes VALUES ({}, 'new', '[1,2,3,4,5,6,7,8]'), ('W{i}', 'new', '[8,7,6,5,4,3,2,1]')", quote(&format!("w{i} a'q\\é"))),
        1 => format!("UPDATE notes SET q = concat(q, '+') WHERE k = {one}"),
        2 => format!("UPDATE notes SET vector = '[{i},0,0,0,0,0,0,1]' WHERE k = {one}"),
        3 => format!("DELETE FROM notes WHERE k = {one}"),
        _ => format!("UPDATE notes SET k = concat(k, ' moved \"{i}\"') WHERE k = {one}"),
    }
}

/// A text-keyed PostgreSQL source followed online (killed in its snapshot
/// and while following, resumed, cut over) into PostgreSQL and into Milvus,
/// while a writer inserts rows with awkward keys, updates, deletes, and
/// changes keys: the target equals the source afterwards.
#[test]
fn online_from_postgres_follows_a_text_keyed_table_exactly() {
    for target in ["pg", "milvus"] {
        let name = format!("sk_online_{target}");
        let src = fresh_db(&source_base(), &format!("{name}_src"), true);
        exec(
            &src,
            "CREATE TABLE notes (k text PRIMARY KEY, q text NOT NULL, vector vector(8) NOT NULL);
             INSERT INTO notes SELECT md5(i::text), 'note ' || i, ARRAY(SELECT (i * j % 23)::real FROM generate_series(1, 8) j)::vector
             FROM generate_series(1, 1600) i;
             CREATE INDEX notes_vector ON notes USING hnsw (vector vector_l2_ops);",
        );
        let (w, l, artifact) = (src.clone(), src.clone(), format!("vmig_{name}"));
        let source = OnlineSource {
            url: src.clone(),
            extra_args: args(&["--table", "notes"]),
            writer: Box::new(move || {
                let w = w.clone();
                Writer::spawn(
                    move || async move { client(&w).await },
                    |c, i| {
                        Box::pin(async move {
                            // standard_conforming_strings: only quotes are doubled.
                            let quote = |s: &str| format!("'{}'", s.replace('\'', "''"));
                            let sql = notes_change(i, "(SELECT k FROM notes ORDER BY random() LIMIT 1)", &quote);
                            c.batch_execute(&sql).await.unwrap_or_else(|e| panic!("writer: {sql}: {e}"));
                        })
                    },
                )
            }),
            leftovers: Box::new(move || {
                let (slots, pubs) = source_artifacts(&l, &artifact);
                if (slots, pubs) == (0, 0) { String::new() } else { format!("{slots} slots, {pubs} publications") }
            }),
        };
        let dst = match target {
            "pg" => fresh_db(&target_base(), &format!("{name}_dst"), true),
            _ => fresh_milvus_db(&name),
        };
        let check_dst = dst.clone();
        online_scenario(&name, &source, &dst, &move |src| {
            let want = pg_text_rows(src, "notes", "k", "q");
            assert!(want.len() > 1600 && want.iter().any(|r| r.0.contains("moved")), "the writer's changes are in the source");
            match target {
                "pg" => assert_eq!(pg_text_rows(&check_dst, "notes", "k", "q"), want),
                _ => {
                    // Read back with pymilvus (no vmig code), every copy counted.
                    let (base, db) = check_dst.rsplit_once('/').unwrap();
                    let state = tempdir();
                    let dumped = state.path().join("notes.json");
                    pymilvus("dump_rows.py", &[base, db, "notes", dumped.to_str().unwrap(), "k,q,vector"]);
                    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&dumped).unwrap()).unwrap();
                    let got: Vec<(String, Vec<String>, Vec<u32>)> = v
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|r| {
                            let bits = r["vector"].as_array().unwrap().iter().map(|x| (x.as_f64().unwrap() as f32).to_bits()).collect();
                            (r["k"].as_str().unwrap().to_string(), vec![r["q"].as_str().unwrap().to_string()], bits)
                        })
                        .collect();
                    assert_eq!(got, want, "Milvus holds the source's keys, text and vectors");
                    let out = vmig(&["verify", "--from", src, "--to", &check_dst, "--table", "notes", "--chunk-rows", "300"]);
                    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
                }
            }
        });
    }
}

/// (key, q, vector bits) of every row of a seekdb table, in byte order of
/// the keys (the writer's vectors are small integers: exact in seekdb's text).
fn ob_text_rows(url: &str, table: &str) -> Vec<(String, String, Vec<u32>)> {
    use mysql_async::prelude::Queryable;
    let rows: Vec<(String, String, String)> =
        rt().block_on(async { ob_conn(url).await.query(format!("SELECT k, q, vector FROM {table} ORDER BY k")).await.unwrap() });
    rows.into_iter()
        .map(|(k, q, v)| (k, q, v.trim_matches(|c| c == '[' || c == ']').split(',').map(|x| x.parse::<f32>().unwrap().to_bits()).collect()))
        .collect()
}

/// A MySQL string literal.
fn ob_literal(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// A seekdb table keyed by `VARCHAR … utf8mb4_bin`, followed online (its
/// triggers log string keys) into PostgreSQL while a writer inserts
/// awkward keys, updates, deletes and changes keys; killed in both phases,
/// resumed, cut over: equal afterwards, and no trigger or changelog left.
#[test]
fn online_from_seekdb_follows_a_text_keyed_table_exactly() {
    use mysql_async::prelude::Queryable;
    let name = "sk_online_ob";
    let src = fresh_ob_db(&format!("{name}_src"));
    ob_exec(&src, "CREATE TABLE notes (k VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PRIMARY KEY, q VARCHAR(255) NOT NULL, vector VECTOR(8) NOT NULL)");
    for part in (1..=1600).collect::<Vec<u32>>().chunks(400) {
        let rows: Vec<String> = part.iter().map(|i| format!("('k{i:05}-{}', 'note {i}', '[{i},1,2,3,4,5,6,7]')", i % 7)).collect();
        ob_exec(&src, &format!("INSERT INTO notes VALUES {}", rows.join(",")));
    }
    let (w, l) = (src.clone(), src.clone());
    let source = OnlineSource {
        url: src.clone(),
        extra_args: args(&["--table", "notes"]),
        writer: Box::new(move || {
            let w = w.clone();
            Writer::spawn(
                move || async move { ob_conn(&w).await },
                |c, i| {
                    Box::pin(async move {
                        let one: Option<String> = c.query_first("SELECT k FROM notes ORDER BY rand() LIMIT 1").await.unwrap();
                        let sql = notes_change(i, &ob_literal(&one.unwrap_or_default()), &ob_literal);
                        c.query_drop(&sql).await.unwrap_or_else(|e| panic!("writer: {sql}: {e}"));
                    })
                },
            )
        }),
        leftovers: Box::new(move || ob_leftovers(&l)),
    };
    let dst = fresh_db(&target_base(), &format!("{name}_dst"), true);
    let check_dst = dst.clone();
    online_scenario(name, &source, &dst, &move |src| {
        let want = ob_text_rows(src, "notes");
        assert!(want.len() > 1600 && want.iter().any(|r| r.0.contains("moved")), "the writer's changes are in the source");
        let got: Vec<(String, String, Vec<u32>)> = pg_text_rows(&check_dst, "notes", "k", "q").into_iter().map(|(k, q, v)| (k, q[0].clone(), v)).collect();
        assert_eq!(got, want, "keys, text and vectors");
        let out = vmig(&["verify", "--from", src, "--to", &check_dst, "--table", "notes", "--chunk-rows", "300"]);
        assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    });
}

/// A VarChar-keyed Milvus collection followed online into PostgreSQL (new
/// rows by createTime watermark, deletes by the id-set reconcile, over
/// string ids) while a writer inserts rows with string ids and deletes
/// whole FastGPT collections; killed in both phases, resumed, cut over.
#[test]
fn online_from_a_varchar_keyed_milvus_collection_is_exact() {
    let name = "sk_online_mv";
    let db = format!("{name}_src");
    let base = milvus_base();
    let src = fresh_milvus_db_on(&base, &db);
    pymilvus("partition_key.py", &[&base, &db, "1600", "16", "4", "varchar"]);
    let w = src.clone();
    let source = OnlineSource {
        url: src,
        extra_args: args(&["--reconcile-every", "2", "--watermark-margin", "3"]),
        writer: Box::new(move || milvus_writer(&w, "modeldata", 16, NewIds::Strings)),
        leftovers: Box::new(String::new),
    };
    let dst = fresh_db(&target_base(), &format!("{name}_dst"), true);
    let check_dst = dst.clone();
    online_scenario(name, &source, &dst, &move |_| {
        let state = tempdir();
        let dumped = state.path().join("source.json");
        pymilvus("dump_rows.py", &[&base, &db, "modeldata", dumped.to_str().unwrap()]);
        let want = json_rows(&dumped);
        assert!(want.iter().any(|r| r.team_id == "team_w"), "the writer's rows are in the source");
        assert_eq!(pg_keyed_rows(&check_dst), want);
    });
}

/// Online into seekdb, a changed row whose key utf8mb4_bin cannot order (a
/// trailing space) goes to rejects with its reason, as a snapshot row would,
/// and the job keeps following; once the source row is mended, the cutover
/// finds the target equal.
#[test]
fn a_change_the_target_refuses_goes_to_rejects_and_the_job_keeps_following() {
    let name = "sk_online_refused";
    let src = fresh_db(&source_base(), &format!("{name}_src"), true);
    exec(
        &src,
        "CREATE TABLE notes (k text PRIMARY KEY, q text NOT NULL, vector vector(8) NOT NULL);
         INSERT INTO notes SELECT md5(i::text), 'note ' || i, ARRAY(SELECT (i * j % 23)::real FROM generate_series(1, 8) j)::vector
         FROM generate_series(1, 300) i;",
    );
    let ob = fresh_ob_db(name);
    let state = tempdir();
    let mut a = common::online::online_args(&src, &ob, state.path(), name);
    // The refused row counts against --max-rejects, also after the cutover.
    a.extend(args(&["--table", "notes", "--max-rejects", "1"]));
    let job_dir = state.path().join(name);
    let mut job = start(&a, &Moment::Committed(0));
    let _reap = common::online::Reaper(vec![job.id()]);
    let exactly = |k: &str| format!("SELECT count(*) FROM notes WHERE k = {} AND k LIKE {}", ob_literal(k), ob_literal(k));
    let ob_has = |k: &str| ob_query_i64(&ob, &exactly(k));
    let wait_row = |job: &mut std::process::Child, k: &str| {
        let t = std::time::Instant::now();
        // The job creates the table once it starts.
        while ob_try_query_i64(&ob, &exactly(k)).unwrap_or(0) == 0 {
            assert!(job.try_wait().unwrap().is_none(), "the online job ended");
            assert!(t.elapsed() < std::time::Duration::from_secs(180), "{k} never reached the target");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    exec(&src, "INSERT INTO notes VALUES ('before', 'x', '[1,1,1,1,1,1,1,1]')");
    wait_row(&mut job, "before");
    // One transaction: the refused row and a good one arrive in one batch.
    exec(&src, "INSERT INTO notes VALUES ('trail ', 'refused', '[2,2,2,2,2,2,2,2]'), ('after', 'kept', '[3,3,3,3,3,3,3,3]')");
    wait_row(&mut job, "after");
    assert_eq!(ob_has("trail "), 0);
    let refused = rejected_keys(&job_dir, "k");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].0, "trail ");
    assert!(refused[0].1.contains("utf8mb4_bin"), "{refused:?}");
    // Still following. The source gains 'trail' and then drops the refused
    // 'trail ': PAD SPACE would make that delete remove 'trail' on seekdb.
    exec(&src, "INSERT INTO notes VALUES ('trail', 'kept', '[4,4,4,4,4,4,4,4]')");
    wait_row(&mut job, "trail");
    exec(&src, "DELETE FROM notes WHERE k = 'trail '");
    exec(&src, "UPDATE notes SET q = 'later' WHERE k = 'after'");
    let t = std::time::Instant::now();
    while ob_query_i64(&ob, "SELECT count(*) FROM notes WHERE k = 'after' AND q = 'later'") == 0 {
        assert!(job.try_wait().unwrap().is_none(), "the online job ended");
        assert!(t.elapsed() < std::time::Duration::from_secs(180), "the update never arrived");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(ob_has("trail"), 1, "the delete of 'trail ' removed 'trail'");
    // The cutover finds both sides equal.
    let mut cut = a.clone();
    cut[0] = "cutover".into();
    let cut: Vec<&str> = cut.iter().map(|s| s.as_str()).collect();
    let out = ok(&cut);
    assert!(String::from_utf8_lossy(&out.stdout).contains("safe to switch"), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(job.wait().unwrap().success());
    let want: Vec<(String, String, Vec<u32>)> = pg_text_rows(&src, "notes", "k", "q").into_iter().map(|r| (r.0, r.1[0].clone(), r.2)).collect();
    assert_eq!(ob_text_rows(&ob, "notes"), want);
}
