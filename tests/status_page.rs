//! The live status page (`--metrics ADDR`: `/`, `/status.json`, `/metrics`)
//! of real running jobs, rendered by headless Chromium: an online
//! PostgreSQL→PostgreSQL job under a writer, an online job from seekdb, and
//! a shared export with two workers, one of them stopped. What the page
//! shows must equal `/status.json` fetched at the same moment; no secret may
//! appear on the page, in the JSON or in the metrics; every metric the
//! alert rules and the dashboard in `deploy/` use must be one a real job
//! exports.
mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use common::faults::Moment;
use common::online::{Reaper, Writer, online_args, wait_following};
use common::*;

/// A login whose password is easy to search for in everything served.
const OWNER: &str = "page_owner";
const PASSWORD: &str = "Pg-page-S3cret-do-not-show";

/// `url` with the page owner's login (created on that server if missing).
fn as_owner(url: &str) -> String {
    exec(
        url,
        &format!(
            "DO $$BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{OWNER}') THEN \
             CREATE ROLE {OWNER} LOGIN SUPERUSER PASSWORD '{PASSWORD}'; END IF; END$$"
        ),
    );
    let (scheme, rest) = url.split_once("://").unwrap();
    let host = rest.split_once('@').map_or(rest, |(_, h)| h);
    format!("{scheme}://{OWNER}:{PASSWORD}@{host}")
}

/// GET `path` from `addr`: (status line, body).
fn get(addr: &str, path: &str) -> (String, String) {
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(c, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    let (head, body) = s.split_once("\r\n\r\n").unwrap_or((&s, ""));
    (head.lines().next().unwrap_or_default().to_string(), body.to_string())
}

fn status_json(addr: &str) -> serde_json::Value {
    let (code, body) = get(addr, "/status.json");
    assert!(code.contains("200"), "{code}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/status.json is not JSON ({e}): {body}"))
}

/// Headless Chromium on the live page: its DOM once the page has fetched
/// its status (`--virtual-time-budget` lets the script run).
fn chromium(addr: &str, args: &[&str]) -> String {
    let profile = tempdir();
    let out = std::process::Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking"])
        .args(["--disable-component-update", "--disable-sync", "--virtual-time-budget=3000", &format!("--user-data-dir={}", profile.path().display())])
        .args(args)
        .arg(format!("http://{addr}/"))
        .output()
        .expect("chromium is installed (scripts/test.sh installs Debian's chromium)");
    assert!(out.status.success(), "chromium: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the element with this id in a dumped DOM.
fn text_of(dom: &str, id: &str) -> String {
    let at = dom.find(&format!("id=\"{id}\"")).unwrap_or_else(|| panic!("no #{id} on the page"));
    let rest = &dom[at..];
    let start = rest.find('>').unwrap() + 1;
    let end = rest[start..].find('<').unwrap();
    rest[start..start + end].replace("&amp;", "&")
}

/// "12,345" as the page writes numbers.
fn grouped(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The page's DOM and `/status.json` from the same moment: fetched before
/// and after the render, retried until the two fetches agree on `key`.
fn dom_and_status(addr: &str, key: &dyn Fn(&serde_json::Value) -> String) -> (String, serde_json::Value) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let before = status_json(addr);
        let dom = chromium(addr, &["--dump-dom"]);
        let after = status_json(addr);
        if key(&before) == key(&after) && dom.contains("data-loaded=\"true\"") {
            return (dom, after);
        }
        assert!(Instant::now() < deadline, "the status never held still for one render: {} vs {}", key(&before), key(&after));
    }
}

fn committed_chunks(doc: &serde_json::Value) -> usize {
    doc["chunks"]["states"].as_str().unwrap().chars().filter(|c| "cjs".contains(*c)).count()
}

/// Every sample line of Prometheus text: (metric name, labels, value).
/// Fails on anything that is not valid exposition text.
fn parse_prometheus(text: &str) -> Vec<(String, String, f64)> {
    let mut typed = BTreeSet::new();
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut w = rest.split(' ');
            let name = w.next().unwrap();
            assert!(["counter", "gauge"].contains(&w.next().unwrap_or_default()), "bad TYPE line: {line}");
            assert!(typed.insert(name.to_string()), "{name} typed twice");
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment line: {line}");
        let name_end = line.find(['{', ' ']).unwrap_or_else(|| panic!("no value: {line}"));
        let name = &line[..name_end];
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') && !name.starts_with(|c: char| c.is_ascii_digit()),
            "bad metric name in: {line}"
        );
        let (labels, value) = if line[name_end..].starts_with('{') {
            // Labels end at the first } outside a quoted value.
            let (mut quoted, mut escaped, mut end) = (false, false, None);
            for (i, c) in line[name_end..].char_indices() {
                match c {
                    _ if escaped => escaped = false,
                    '\\' if quoted => escaped = true,
                    '"' => quoted = !quoted,
                    '}' if !quoted => {
                        end = Some(name_end + i);
                        break;
                    }
                    _ => {}
                }
            }
            let end = end.unwrap_or_else(|| panic!("unclosed labels: {line}"));
            (&line[name_end + 1..end], &line[end + 1..])
        } else {
            ("", &line[name_end..])
        };
        let value: f64 = value.trim().parse().unwrap_or_else(|_| panic!("bad value in: {line}"));
        assert!(typed.contains(name), "{name} has no TYPE line before its samples");
        samples.push((name.to_string(), labels.to_string(), value));
    }
    samples
}

/// Metric names the alert rules and the dashboard in deploy/ use.
fn names_in_deploy_files() -> BTreeSet<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut names = BTreeSet::new();
    for f in ["prometheus/vmig-alerts.yml", "grafana/vmig.json"] {
        let text = std::fs::read_to_string(root.join(f)).unwrap();
        let mut rest = text.as_str();
        while let Some(at) = rest.find("vmig_") {
            let before = rest[..at].chars().last();
            let tail = &rest[at..];
            let len = tail.find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')).unwrap_or(tail.len());
            let name = &tail[..len];
            if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') && name != "vmig_job" {
                names.insert(name.to_string());
            }
            rest = &tail[len..];
        }
    }
    assert!(names.len() > 10, "deploy files name too few metrics: {names:?}");
    names
}

fn exported(addr: &str) -> BTreeSet<String> {
    let (code, body) = get(addr, "/metrics");
    assert!(code.contains("200"), "{code}");
    parse_prometheus(&body).into_iter().map(|(n, _, _)| n).collect()
}

fn assert_no_secret(addr: &str, secret: &str) {
    for path in ["/", "/status.json", "/metrics"] {
        let (_, body) = get(addr, path);
        assert!(!body.contains(secret), "{path} shows the password");
    }
}

#[test]
fn the_page_of_an_online_job_shows_what_its_status_says() {
    let src = fresh_db(&source_base(), "page_src", true);
    let dst = fresh_db(&target_base(), "page_dst", true);
    ok(&["generate", "--to", &src, "--rows", "1600", "--dim", "1536"]);
    let (src_pw, dst_pw) = (as_owner(&src), as_owner(&dst));
    let state = tempdir();
    let job = "page_online";
    let addr = "127.0.0.1:19288";
    let mut args = online_args(&src_pw, &dst_pw, state.path(), job);
    args.extend(["--http", addr].map(String::from));
    let mut reaper = Reaper(Vec::new());
    let writer = Writer::start(&src);
    let mut run = common::faults::start(&args, &Moment::Committed(0));
    reaper.0.push(run.id());
    let job_dir = state.path().join(job);
    wait_following(&mut run, &job_dir, "migrate", 20, job);
    writer.wait_for_more(30);
    writer.stop();
    // The chart needs two samples (one every 10 s): wait on what the job serves.
    let deadline = Instant::now() + Duration::from_secs(60);
    while status_json(addr)["history"].as_array().unwrap().len() < 2 {
        assert!(Instant::now() < deadline, "the job kept no history");
        std::thread::sleep(Duration::from_millis(200));
    }
    let run_of = |d: &serde_json::Value| d["runs"].as_array().unwrap().iter().find(|r| r["command"] == "migrate").unwrap().clone();
    let key = |d: &serde_json::Value| {
        let r = run_of(d);
        format!("{} {} {} {}", r["phase"], r["online"]["applied"], committed_chunks(d), r["online"]["lag_seconds"])
    };
    let (dom, doc) = dom_and_status(addr, &key);
    let r = run_of(&doc);
    assert_eq!(text_of(&dom, "job"), job);
    assert_eq!(text_of(&dom, "phase"), r["phase"].as_str().unwrap());
    assert!(["following", "catching up"].contains(&r["phase"].as_str().unwrap()), "{r}");
    assert_eq!(text_of(&dom, "chunks-committed"), grouped(committed_chunks(&doc) as u64));
    let planned = doc["chunks"]["states"].as_str().unwrap().len();
    assert_eq!(committed_chunks(&doc), planned, "every chunk of the snapshot committed: {}", doc["chunks"]);
    assert!(planned >= 4, "1,600 rows and the writer's in chunks of 400: {}", doc["chunks"]);
    assert_eq!(text_of(&dom, "chunks-total"), planned.to_string());
    for kind in ["inserts", "updates", "deletes"] {
        assert_eq!(text_of(&dom, &format!("changes-{kind}")), grouped(r["online"]["applied"][kind].as_u64().unwrap()), "{kind}");
    }
    let applied = &r["online"]["applied"];
    assert!(applied["inserts"].as_u64().unwrap() + applied["updates"].as_u64().unwrap() + applied["deletes"].as_u64().unwrap() > 20);
    assert_eq!(text_of(&dom, "lag-seconds"), format!("{:.2}", r["online"]["lag_seconds"].as_f64().unwrap()));
    assert_eq!(text_of(&dom, "retained-label"), "WAL kept for the job");
    let points = dom.split("id=\"lag-line\"").nth(1).unwrap();
    let points = points.split("points=\"").nth(1).unwrap().split('"').next().unwrap();
    assert!(points.split(' ').filter(|p| p.contains(',')).count() >= 2, "the lag chart has no points: {points}");
    // Every index build named, each with its own times.
    let builds = r["index_builds"].as_array().unwrap();
    let names: BTreeSet<&str> = builds.iter().map(|b| b["index"].as_str().unwrap()).collect();
    for ix in ["modeldata_vector_index", "modeldata_team_dataset_collection_index", "modeldata_create_time_index"] {
        assert!(names.contains(ix), "{ix} missing from the index builds: {builds:?}");
        assert!(dom.contains(&format!("data-index=\"{ix}\"")), "{ix} not on the page");
    }
    assert!(builds.iter().all(|b| b["state"] == "built" && b["ended_at"].is_string()), "{builds:?}");

    // A screenshot for the docs: a real rendered page.
    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/status-page.png");
    chromium(addr, &[&format!("--screenshot={}", shot.display()), "--window-size=1100,1000"]);
    let png = std::fs::read(&shot).expect("chromium wrote the screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 20_000, "a rendered page, not a blank one ({} bytes)", png.len());

    // The metrics: valid Prometheus text, the same numbers, no secret anywhere.
    let (_, metrics) = get(addr, "/metrics");
    let samples = parse_prometheus(&metrics);
    let value = |name: &str, label: &str| samples.iter().find(|(n, l, _)| n == name && l.contains(label)).map(|s| s.2);
    assert_eq!(value("vmig_chunks_planned", job), Some(planned as f64));
    assert_eq!(value("vmig_phase", "phase=\"following\""), Some(1.0), "{metrics}");
    assert!(value("vmig_last_progress_timestamp_seconds", job).unwrap() > 1.7e9);
    assert_no_secret(addr, PASSWORD);
    let (code, _) = get(addr, "/nothing-here");
    assert!(code.contains("404"), "{code}");
    // Every metric the rules and the dashboard use, but a shared job's, an
    // OceanBase source's and a Milvus target's own, is exported by this real job.
    let have = exported(addr);
    let own = ["vmig_changelog_rows", "vmig_target_unserved_segments"];
    let missing: Vec<_> = names_in_deploy_files()
        .into_iter()
        .filter(|n| !n.starts_with("vmig_worker_") && !own.contains(&n.as_str()) && !have.contains(n))
        .collect();
    assert!(missing.is_empty(), "deploy/ uses metrics this job does not export: {missing:?}");

    // `vmig status` shows the same index builds and chunk counts as text.
    let text = String::from_utf8_lossy(&ok(&["status", "--job", job, "--state-root", state.path().to_str().unwrap()]).stdout).into_owned();
    assert!(text.contains("index modeldata_vector_index on modeldata: built in "), "{text}");
    assert!(text.contains(&format!("chunks: {planned} committed")), "{text}");
    run.kill().unwrap();
    run.wait().unwrap();
}

#[test]
fn an_online_job_from_seekdb_exports_the_changelog_metric() {
    let src = fresh_ob_db("page_ob_src");
    ok(&["generate", "--to", &src, "--rows", "400", "--dim", "16"]);
    let dst = fresh_db(&target_base(), "page_ob_dst", true);
    let state = tempdir();
    let job = "page_ob";
    let addr = "127.0.0.1:19289";
    let mut args = online_args(&src, &dst, state.path(), job);
    args.extend(["--metrics", addr].map(String::from));
    let mut reaper = Reaper(Vec::new());
    let mut run = common::faults::start(&args, &Moment::Committed(0));
    reaper.0.push(run.id());
    let job_dir = state.path().join(job);
    common::faults::wait_for(&mut run, &job_dir, "migrate", &Moment::Phase("following".into()), job);
    ob_exec(&src, "DELETE FROM modeldata ORDER BY id LIMIT 3");
    wait_following(&mut run, &job_dir, "migrate", 0, job);
    let have = exported(addr);
    assert!(have.contains("vmig_changelog_rows"), "{have:?}");
    let dom = chromium(addr, &["--dump-dom"]);
    assert_eq!(text_of(&dom, "retained-label"), "changelog rows waiting");
    run.kill().unwrap();
    run.wait().unwrap();
}

/// Worker ids are host-pid.
fn worker_id(pid: u32) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    format!("{host}-{pid}")
}

#[test]
fn the_page_of_a_shared_job_shows_every_worker_and_one_that_is_gone() {
    let src = fresh_db(&source_base(), "page_shared_src", true);
    ok(&["generate", "--to", &src, "--rows", "4000", "--dim", "32", "--no-vector-index"]);
    let src_pw = as_owner(&src);
    let dir = tempdir();
    let staging = dir.path().join("st");
    let st = staging.to_str().unwrap();
    let addrs = ["127.0.0.1:19290", "127.0.0.1:19291"];
    let mut reaper = Reaper(Vec::new());
    let mut workers = Vec::new();
    for (n, addr) in addrs.iter().enumerate() {
        let root = dir.path().join(format!("root{n}"));
        let args: Vec<String> = [
            "export", "--from", &src_pw, "--staging", st, "--shared", "--lease", "3", "--chunk-rows", "200", "--workers", "1",
            "--rate-limit", "60", "--state-root", root.to_str().unwrap(), "--metrics", addr, "--quiet",
        ]
        .map(String::from)
        .to_vec();
        let child = std::process::Command::new(VMIG)
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        reaper.0.push(child.id());
        workers.push(child);
    }
    let (a, b) = (addrs[0], addrs[1]);
    let b_id = worker_id(workers[1].id());
    // Both workers published and hold claims: seen in worker A's document.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let running = std::net::TcpStream::connect(a).is_ok().then(|| status_json(a));
        let ready = running.as_ref().is_some_and(|d| {
            d["workers"].as_array().is_some_and(|w| w.len() == 2 && w.iter().all(|w| w["state"] == "running"))
                && committed_chunks(d) >= 1
        });
        if ready {
            break;
        }
        assert!(Instant::now() < deadline, "the two workers never showed on worker A's page: {running:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let key = |d: &serde_json::Value| format!("{} {} {}", d["chunks"]["states"], d["chunks"]["claimed_by"], d["workers"].as_array().map_or(0, |w| w.len()));
    let (dom, doc) = dom_and_status(a, &key);
    assert_eq!(text_of(&dom, "chunks-committed"), grouped(committed_chunks(&doc) as u64));
    assert_eq!(text_of(&dom, "chunks-total"), "20");
    for w in doc["workers"].as_array().unwrap() {
        let id = w["worker"]["worker"].as_str().unwrap();
        assert!(dom.contains(&format!("data-worker=\"{id}\" data-gone=\"false\"")), "worker {id} not on the page as alive");
    }
    for (chunk, worker) in doc["chunks"]["claimed_by"].as_object().unwrap() {
        let cell = dom.split(&format!("data-chunk=\"{chunk}\"")).nth(1).unwrap_or_else(|| panic!("no cell for chunk {chunk}"));
        let cell = &cell[..cell.find('>').unwrap()];
        assert!(cell.contains(&format!("data-worker=\"{}\"", worker.as_str().unwrap())), "claim of chunk {chunk} by {worker} not shown: {cell}");
    }
    // Both workers' heartbeats are in either worker's metrics.
    let (_, metrics) = get(b, "/metrics");
    let beats: Vec<_> = parse_prometheus(&metrics).into_iter().filter(|(n, _, _)| n == "vmig_worker_heartbeat_age_seconds").collect();
    assert_eq!(beats.len(), 2, "{metrics}");
    let have = exported(b);
    let missing: Vec<_> = names_in_deploy_files().into_iter().filter(|n| n.starts_with("vmig_worker_") && !have.contains(n)).collect();
    assert!(missing.is_empty(), "deploy/ uses worker metrics a shared job does not export: {missing:?}");
    assert_no_secret(a, PASSWORD);

    // Worker B stops (SIGSTOP): after its lease, A's page marks it gone.
    unsafe { libc::kill(workers[1].id() as i32, libc::SIGSTOP) };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let d = status_json(a);
        let gone = d["workers"].as_array().unwrap().iter().any(|w| w["worker"]["worker"] == b_id.as_str() && w["gone"] == true);
        if gone {
            break;
        }
        assert!(Instant::now() < deadline, "worker B never shown gone: {}", d["workers"]);
        std::thread::sleep(Duration::from_millis(200));
    }
    let dom = chromium(a, &["--dump-dom"]);
    assert!(dom.contains(&format!("data-worker=\"{b_id}\" data-gone=\"true\"")), "the stopped worker is not marked gone");
    assert!(dom.contains("gone (no heartbeat within its lease)"));
    unsafe { libc::kill(workers[1].id() as i32, libc::SIGCONT) };
    // Both finish; every chunk is staged once.
    for mut w in workers {
        let t = Instant::now();
        loop {
            if let Some(code) = w.try_wait().unwrap() {
                assert!(code.success(), "a worker failed: {code}");
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(180), "a worker did not finish");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let markers = std::fs::read_dir(staging.join("chunks")).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".commit.json")).count();
    assert_eq!(markers, 20);
    // `vmig status --json` is the same document the page reads.
    let out = ok(&["status", "--staging", st, "--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(committed_chunks(&doc), 20, "{}", doc["chunks"]);
    assert_eq!(doc["workers"].as_array().unwrap().len(), 2);
    // `--watch` redraws the view until stopped.
    let mut watch = std::process::Command::new(VMIG)
        .args(["status", "--staging", st, "--watch", "0.5"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = watch.stdout.take().unwrap();
    let (mut seen, mut buf) = (String::new(), [0u8; 4096]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.matches("Ctrl-C to stop").count() < 2 {
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0 && Instant::now() < deadline, "status --watch stopped drawing: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    watch.kill().unwrap();
    watch.wait().unwrap();
    assert!(seen.contains("chunks: 20 committed"), "{seen}");
    assert!(seen.contains("workers of export:"), "{seen}");
}
