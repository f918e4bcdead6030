//! `vmig verify --sample N` and `--recall K` against real servers: a uniform
//! sample of rows compared by id on both sides, counts compared in full, a
//! confidence statement when nothing differs; recall@K of each side's own
//! vector index against the exact top-K.
mod common;

use common::milvus_db::fresh_milvus_db;
use common::*;

fn sample(src: &str, dst: &str, n: &str, seed: &str) -> (i32, String) {
    let out = vmig(&["verify", "--from", src, "--to", dst, "--sample", n, "--seed", seed]);
    (out.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out)))
}

#[test]
fn a_sample_finds_changed_rows_and_counts_and_states_its_confidence() {
    let src = fresh_db(&source_base(), "sample_src", true);
    ok(&["generate", "--to", &src, "--rows", "300", "--dim", "16"]);
    let pg = fresh_db(&target_base(), "sample_pg", true);
    let mv = fresh_milvus_db("sample_mv");
    let state = tempdir();
    for dst in [&pg, &mv] {
        ok(&["migrate", "--from", &src, "--to", dst, "--chunk-rows", "100", "--quiet", "--state-root", state.path().to_str().unwrap()]);
    }

    // Equal: 100 clean samples bound the differing share below 1 - 0.05^(1/100).
    for dst in [&pg, &mv] {
        let (code, said) = sample(&src, dst, "100", "7");
        assert_eq!(code, 0, "{said}");
        assert!(said.contains("source 300 rows · target 300 rows · 100 sampled (seed 7"), "{said}");
        assert!(said.contains("no difference in 100 sampled rows: with 95 % confidence fewer than 2.951 %"), "{said}");
    }

    // One vector changed in the target: a sample of every row finds it by id.
    let changed = query_i64(&pg, "SELECT id FROM modeldata ORDER BY id OFFSET 123 LIMIT 1");
    exec(&pg, &format!("UPDATE modeldata SET vector = array_fill(0.5::real, ARRAY[16])::vector WHERE id = {changed}"));
    let (code, said) = sample(&src, &pg, "300", "7");
    assert_eq!(code, 1, "{said}");
    assert!(said.contains(&format!("different in the target (first 20 sampled ids): [{changed}]")), "{said}");
    assert!(said.contains("1 of 300 sampled rows DIFFER"), "{said}");

    // A row gone from the target fails on the counts even when no sample hits it.
    exec(&pg, "DELETE FROM modeldata WHERE id = (SELECT max(id) FROM modeldata)");
    let (code, said) = sample(&src, &pg, "1", "7");
    assert_eq!(code, 1, "{said}");
    assert!(said.contains("target 299 rows · COUNTS DIFFER"), "{said}");
}

fn recall_of(src: &str, dst: &str, extra: &[&str]) -> (i32, String, serde_json::Value) {
    let dir = tempdir();
    let report = dir.path().join("r.json");
    let mut args = vec!["verify", "--from", src, "--to", dst, "--sample", "20", "--recall", "10", "--queries", "25", "--seed", "3"];
    args.extend_from_slice(&["--report", report.to_str().unwrap()]);
    args.extend_from_slice(extra);
    let out = vmig(&args);
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    let json = std::fs::read(&report).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    (out.status.code().unwrap_or(-1), said, json)
}

#[test]
fn recall_of_each_targets_index_matches_the_sources_and_a_damaged_target_fails() {
    let src = fresh_db(&source_base(), "recall_src", true);
    ok(&["generate", "--to", &src, "--rows", "400", "--dim", "16"]);
    let pg = fresh_db(&target_base(), "recall_pg", true);
    let ob = fresh_ob_db("recall_ob");
    let mv = fresh_milvus_db("recall_mv");
    let state = tempdir();
    for dst in [&pg, &ob, &mv] {
        ok(&["migrate", "--from", &src, "--to", dst, "--chunk-rows", "100", "--quiet", "--state-root", state.path().to_str().unwrap()]);
    }
    for dst in [&pg, &ob, &mv] {
        let (code, said, r) = recall_of(&src, dst, &[]);
        assert_eq!(code, 0, "{said}");
        assert!(said.contains("recall@10: target"), "{said}");
        let rec = &r["recall"];
        assert_eq!(rec["k"], 10, "{r}");
        assert_eq!(rec["queries"], 25, "{r}");
        // The rows' own vectors as queries: each row is its own nearest
        // neighbour under inner product only if it has the largest norm, so
        // recall is measured against vmig's exact top-10, not assumed.
        let (s, t) = (rec["source"]["recall"].as_f64().unwrap(), rec["target"]["recall"].as_f64().unwrap());
        assert!(s > 0.8 && t > 0.8 && t >= 0.98 * s, "source {s}, target {t}: {said}");
        assert!(rec["source"]["latency_p50_ms"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r["sample"]["sampled"], 20, "{r}");
        assert_eq!(r["passed"], true, "{r}");
    }

    // The same as a page, rendered by a real browser.
    let dir = tempdir();
    let page = dir.path().join("verify.html");
    let out = vmig(&["verify", "--from", &src, "--to", &mv, "--recall", "10", "--queries", "25", "--seed", "3", "--report", page.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let (_, _, json) = recall_of(&src, &mv, &[]);
    let dom = chromium(&page, &["--dump-dom"]);
    assert!(dom.contains("vmig verify: <span class=\"passed\">PASSED</span>"), "{dom}");
    let target = format!("{:.4}", json["recall"]["target"]["recall"].as_f64().unwrap());
    assert!(dom.contains(&format!("target {target}")), "the chart's legend shows the target's recall {target}: {dom}");
    assert!(dom.contains("<polyline class=\"source\"") && dom.contains("<polyline class=\"target\""), "{dom}");
    assert!(dom.contains("all rows equal") || dom.contains("compared by count and content hash, 0 differ"), "{dom}");
    let shot = dir.path().join("verify.png");
    chromium(&page, &[&format!("--screenshot={}", shot.display()), "--window-size=1000,900"]);
    let png = std::fs::read(&shot).expect("chromium wrote the screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a rendered page, not a blank one ({} bytes)", png.len());

    // The target's vectors replaced: its index answers other rows.
    exec(&pg, "UPDATE modeldata SET vector = (SELECT array_agg(random()::real) FROM generate_series(1, 16) WHERE modeldata.id IS NOT NULL)::vector");
    let (code, said, r) = recall_of(&src, &pg, &["--noise", "0.05"]);
    assert_eq!(code, 1, "{said}");
    assert!(said.contains("TARGET RECALL TOO LOW"), "{said}");
    assert_eq!(r["recall"]["passed"], false, "{r}");
}

/// Runs Debian's Chromium headless on a local page (scripts/test.sh installs it).
fn chromium(page: &std::path::Path, args: &[&str]) -> String {
    let profile = tempdir();
    let out = std::process::Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking"])
        .args(["--disable-component-update", "--disable-sync", &format!("--user-data-dir={}", profile.path().display())])
        .args(args)
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("chromium is installed (scripts/test.sh installs Debian's chromium)");
    assert!(out.status.success(), "chromium: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
