//! `vmig repair` against real servers: after an offline migration the
//! source changes (rows updated, inserted, deleted); repair recopies only
//! the differing chunks, and the target then equals the source in each
//! kind of database.
mod common;

use common::milvus_db::{as_mrows, fresh_milvus_db, milvus_count, milvus_insert_copy, milvus_query_rows, milvus_rows};
use common::*;

/// Changes three separate parts of the key space and leaves the rest alone.
fn change_source(src: &str) {
    let nth = |offset: u32, n: u32| format!("(SELECT id FROM modeldata ORDER BY id OFFSET {offset} LIMIT {n})");
    exec(
        src,
        &format!(
            "UPDATE modeldata SET team_id = 'team_changed', vector = array_fill(0.25::real, ARRAY[16])::vector WHERE id IN {}",
            nth(10, 5)
        ),
    );
    exec(src, &format!("DELETE FROM modeldata WHERE id IN {}", nth(150, 3)));
    exec(
        src,
        &format!(
            "INSERT INTO modeldata (vector, team_id, dataset_id, collection_id) \
             SELECT vector, 'team_new', dataset_id, collection_id FROM modeldata WHERE id IN {}",
            nth(0, 7)
        ),
    );
}

fn repair(src: &str, dst: &str) -> String {
    let out = ok(&["repair", "--from", src, "--to", dst, "--chunk-rows", "50"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn repair_recopies_only_differing_chunks_into_every_kind_of_target() {
    let src = fresh_db(&source_base(), "repair_src", true);
    ok(&["generate", "--to", &src, "--rows", "400", "--dim", "16"]);
    let pg = fresh_db(&target_base(), "repair_pg", true);
    let ob = fresh_ob_db("repair_ob");
    let mv = fresh_milvus_db("repair_mv");
    let state = tempdir();
    for dst in [&pg, &ob, &mv] {
        ok(&["migrate", "--from", &src, "--to", dst, "--chunk-rows", "100", "--quiet", "--state-root", state.path().to_str().unwrap()]);
    }
    change_source(&src);
    let want = rows(&src, "modeldata");

    let said = repair(&src, &pg);
    // 404 rows in chunks of 50: the updated and deleted ranges and the two chunks the
    // appended rows fall in differ, nothing else.
    assert!(said.contains("repair: recopied 4 of 9 chunks"), "{said}");
    assert_same_rows(&src, "modeldata", &pg, "modeldata");

    let said = repair(&src, &ob);
    assert!(said.contains("recopied 4 of 9 chunks"), "{said}");
    assert_rows_equal(&want, &ob_rows(&ob, "modeldata"));

    let said = repair(&src, &mv);
    assert!(said.contains("recopied 4 of 9 chunks"), "{said}");
    assert_eq!(milvus_count(&mv, "modeldata"), want.len() as i64);
    assert_eq!(milvus_rows(&mv, "modeldata"), as_mrows(&want));

    // Equal now: a second repair changes nothing.
    let out = ok(&["repair", "--from", &src, "--to", &pg, "--chunk-rows", "50"]);
    assert!(stderr(&out).contains("nothing to repair"), "{}", stderr(&out));
    // And a difference it cannot see is impossible to miss: verify agrees.
    ok(&["verify", "--from", &src, "--to", &pg]);
}

/// Milvus does not enforce unique keys: an upsert whose delete Milvus lost
/// leaves the old copy behind, hidden from queries, counted by `count(*)`
/// (and by FastGPT's dataset sizes). verify finds the chunk from its
/// per-chunk `count(*)`, and repair leaves one copy.
#[test]
fn verify_finds_a_second_copy_in_milvus_and_repair_removes_it() {
    let src = fresh_db(&source_base(), "repair_dup_src", true);
    ok(&["generate", "--to", &src, "--rows", "200", "--dim", "16"]);
    let mv = fresh_milvus_db("repair_dup_mv");
    let state = tempdir();
    ok(&["migrate", "--from", &src, "--to", &mv, "--chunk-rows", "50", "--quiet", "--state-root", state.path().to_str().unwrap()]);
    let want = as_mrows(&rows(&src, "modeldata"));
    let copied = &want[120];
    milvus_insert_copy(&mv, "modeldata", copied);
    assert_eq!(milvus_count(&mv, "modeldata"), want.len() as i64 + 1, "Milvus keeps both copies");
    assert_eq!(milvus_query_rows(&mv, "modeldata"), want, "queries show one copy");

    let out = vmig(&["verify", "--from", &src, "--to", &mv, "--chunk-rows", "50"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("1 duplicate copies") && said.contains("1 chunks DIFFER"), "{said}");

    let said = repair(&src, &mv);
    assert!(said.contains("repair: recopied 1 of 4 chunks"), "{said}");
    assert_eq!(milvus_count(&mv, "modeldata"), want.len() as i64);
    assert_eq!(milvus_rows(&mv, "modeldata"), want);
}
