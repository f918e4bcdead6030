//! Milvus beyond 2.3: the same FastGPT migrations against milvus-lite 3.2,
//! a server speaking the newer (2.6-era) protocol, started by scripts/dbs.sh
//! beside the real Milvus 2.3.5. Differences between server versions are
//! handled by behaviour (what the server answers), never by version number.
mod common;

use common::milvus_db::{as_mrows, fresh_milvus_db_on, milvus_count, milvus_rows};
use common::*;

fn lite_base() -> String {
    std::env::var("VMIG_TEST_MILVUS_LITE").unwrap_or("http://127.0.0.1:19640".into())
}

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
