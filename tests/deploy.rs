//! The monitoring examples in deploy/: the Prometheus alert rules pass
//! promtool's check and unit tests, the Grafana dashboard is a dashboard, and
//! both use only metrics vmig documents. No database needed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const RULES: &str = "deploy/prometheus/vmig-alerts.yml";
const RULE_TESTS: &str = "deploy/prometheus/vmig-alerts.test.yml";
const DASHBOARD: &str = "deploy/grafana/vmig.json";

/// The metrics `vmig --metrics` documents (docs/online.md and the metrics
/// module). The other engineer's test checks a real job's /metrics page
/// against the same deploy files; this list is what the files may rely on.
const DOCUMENTED: &[&str] = &[
    "vmig_job_info",
    "vmig_phase",
    "vmig_start_timestamp_seconds",
    "vmig_last_progress_timestamp_seconds",
    "vmig_chunks_planned",
    "vmig_rows_planned",
    "vmig_rows_copied_total",
    "vmig_rows_skipped_total",
    "vmig_rows_rejected_total",
    "vmig_chunks_committed_total",
    "vmig_chunk_failures_total",
    "vmig_changes_applied_total",
    "vmig_changes_per_second",
    "vmig_lag_seconds",
    "vmig_lag_bytes",
    "vmig_source_retained_bytes",
    "vmig_changelog_rows",
    "vmig_verify_chunks",
    "vmig_verify_chunks_verified",
    "vmig_cutover_changed_keys",
    "vmig_cutover_unverified_chunks",
    "vmig_target_unserved_segments",
    "vmig_worker_heartbeat_age_seconds",
    "vmig_worker_lease_seconds",
];

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_file(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

/// Where each metric name in `text` stands: each longest `vmig_[a-z0-9_]+`
/// token that no name character precedes, except the label `vmig_job`.
fn metric_spans(text: &str) -> Vec<(usize, usize)> {
    let name_char = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = text.as_bytes();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i..].starts_with(b"vmig_") || (i > 0 && name_char(bytes[i - 1])) {
            i += 1;
            continue;
        }
        let mut end = i + "vmig_".len();
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end].is_ascii_digit() || bytes[end] == b'_') {
            end += 1;
        }
        if !matches!(&text[i..end], "vmig_" | "vmig_job") {
            spans.push((i, end));
        }
        i = end;
    }
    spans
}

fn metric_names_in(text: &str) -> BTreeSet<String> {
    metric_spans(text).into_iter().map(|(a, b)| text[a..b].to_string()).collect()
}

/// The vmig metric names the alert rules and the dashboard use.
pub fn metric_names_used() -> BTreeSet<String> {
    let mut names = metric_names_in(&read(RULES));
    names.extend(metric_names_in(&read(DASHBOARD)));
    names
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("promtool is installed (scripts/test.sh installs Debian's prometheus package)");
    assert!(
        out.status.success(),
        "promtool {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_pass_promtool() {
    promtool(&["check", "rules", RULES]);
    promtool(&["test", "rules", RULE_TESTS]);
}

#[test]
fn dashboard_is_valid_json_and_uses_known_panels() {
    let text = read(DASHBOARD);
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert!(dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36), "schemaVersion: {}", dash["schemaVersion"]);
    assert!(dash["title"].is_string() && dash["uid"].is_string());
    assert!(
        dash["__inputs"].as_array().is_some_and(|i| i.iter().any(|i| i["name"] == "DS_PROMETHEUS")),
        "a DS_PROMETHEUS input for the import dialog"
    );

    let vars = dash["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| vars.iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("no variable {name}"));
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    let job = var("vmig_job");
    assert_eq!(job["type"], "query");
    assert_eq!(job["definition"], "label_values(vmig_job_info, vmig_job)");

    let known = ["row", "stat", "timeseries", "table", "gauge", "bargauge"];
    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut queries = 0;
    for p in panels {
        let title = p["title"].as_str().expect("every panel has a title");
        let kind = p["type"].as_str().unwrap_or_default();
        assert!(known.contains(&kind), "panel {title:?}: unknown type {kind:?}");
        assert!(ids.insert(p["id"].as_u64().expect("panel id")), "panel {title:?}: id used twice");
        for k in ["x", "y", "w", "h"] {
            assert!(p["gridPos"][k].is_u64(), "panel {title:?}: gridPos.{k}");
        }
        assert!(p["gridPos"]["x"].as_u64().unwrap() + p["gridPos"]["w"].as_u64().unwrap() <= 24, "panel {title:?}: wider than the grid");
        if kind == "row" {
            assert!(p["panels"].as_array().is_some_and(|c| c.is_empty()), "row {title:?}: panels belong at the top level");
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {title:?}: datasource");
        let targets = p["targets"].as_array().filter(|t| !t.is_empty());
        let targets = targets.unwrap_or_else(|| panic!("panel {title:?} has no targets"));
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(!expr.trim().is_empty(), "panel {title:?}: a target without expr");
            assert!(t["refId"].is_string(), "panel {title:?}: a target without refId");
            // Every selector follows the job picked at the top.
            let spans = metric_spans(expr);
            assert!(!spans.is_empty(), "panel {title:?}: no vmig metric in {expr}");
            for (a, b) in spans {
                assert!(
                    expr[b..].starts_with("{vmig_job=~\"$vmig_job\""),
                    "panel {title:?}: {} is not filtered by $vmig_job in {expr}",
                    &expr[a..b]
                );
            }
            queries += 1;
        }
    }
    assert!(queries >= 15, "only {queries} queries");
}

#[test]
fn deploy_files_use_only_documented_metrics() {
    let documented: BTreeSet<String> = DOCUMENTED.iter().map(|s| s.to_string()).collect();
    let used = metric_names_used();
    let undocumented: Vec<_> = used.difference(&documented).collect();
    assert!(undocumented.is_empty(), "deploy files use metrics vmig does not document: {undocumented:?}");
    // And the other way: every documented metric is alerted on or shown.
    let unused: Vec<_> = documented.difference(&used).collect();
    assert!(unused.is_empty(), "documented metrics neither alerted on nor shown: {unused:?}");

    // The extraction itself: longest names, the label vmig_job left out.
    let sample = r#"time() - vmig_last_progress_timestamp_seconds{vmig_job="x"} > 900
        unless vmig_phase{phase="done"} / vmig_verify_chunks_verified $vmig_job xvmig_no vmig-alerts.yml"#;
    let names: Vec<_> = metric_names_in(sample).into_iter().collect();
    assert_eq!(names, ["vmig_last_progress_timestamp_seconds", "vmig_phase", "vmig_verify_chunks_verified"]);
}
