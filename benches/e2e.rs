//! End-to-end benchmark against the real local databases (scripts/dbs.sh start):
//!
//!     BENCH_ROWS=200000 cargo bench --bench e2e      (BENCH_DIM, BENCH_WORKERS too)
//!
//! Measured in the same run: the raw ceiling (binary COPY OUT piped straight
//! into binary COPY IN between the two clusters, no pipeline), `vmig migrate`,
//! `vmig export`, `vmig import`; rows/s, MB/s, ratio to the ceiling, peak RSS.
//! (BENCH_PG=0 skips vmig's PostgreSQL paths, keeping the raw pipe.)
//! Then, unless BENCH_OB=0, the same for OceanBase/seekdb (see support/oceanbase.rs),
//! and unless BENCH_MILVUS=0, for Milvus (see support/milvus.rs).

use std::process::Command;
use std::time::Instant;


#[path = "support/oceanbase.rs"]
mod oceanbase;
#[path = "support/postgres.rs"]
mod postgres;
use postgres::{env_or, fresh_db};
// The online benchmark's helpers go unused here.
#[allow(dead_code)]
#[path = "support/milvus.rs"]
mod milvus_bench;

const VMIG: &str = env!("CARGO_BIN_EXE_vmig");

/// Runs vmig, returning (seconds, peak RSS MB) from wait4's rusage.
fn run_vmig(args: &[&str]) -> (f64, f64) {
    let started = Instant::now();
    let mut cmd = Command::new(VMIG);
    cmd.args(args);
    if args[0] != "generate" {
        if let Ok(w) = std::env::var("BENCH_WORKERS") {
            cmd.args(["--workers", &w]);
        }
    }
    let child = cmd.spawn().expect("spawn vmig");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "vmig {args:?} failed");
    (started.elapsed().as_secs_f64(), usage.ru_maxrss as f64 / 1024.0)
}

/// `vmig migrate --no-indexes` from → to; (rows/s of the load phase, whole seconds, peak RSS MB).
fn migrate_rate(from: &str, to: &str, rows: u64, state: &std::path::Path, report: &std::path::Path) -> (f64, f64, f64) {
    let (total, rss) = run_vmig(&[
        "migrate", "--from", from, "--to", to, "--state-root", state.to_str().unwrap(), "--quiet", "--no-indexes",
        "--report", report.to_str().unwrap(),
    ]);
    (rows as f64 / load_seconds(report), total, rss)
}

fn load_seconds(report: &std::path::Path) -> f64 {
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(report).unwrap()).unwrap();
    r["load_seconds"].as_f64().unwrap()
}

fn main() {
    let rows: u64 = env_or("BENCH_ROWS", "200000").parse().unwrap();
    let dim: u32 = env_or("BENCH_DIM", "1536").parse().unwrap();
    let src_base = env_or("VMIG_TEST_PG_SOURCE", "postgresql://postgres:postgres@127.0.0.1:55432/postgres");
    let dst_base = env_or("VMIG_TEST_PG_TARGET", "postgresql://postgres:postgres@127.0.0.1:55433/postgres");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let src = rt.block_on(fresh_db(&src_base, "bench_src"));
    let rows_s = rows.to_string();
    let dim_s = dim.to_string();
    eprintln!("generating {rows} rows of {dim}-d …");
    run_vmig(&["generate", "--to", &src, "--rows", &rows_s, "--dim", &dim_s, "--no-vector-index"]);
    let mb = rows as f64 * (dim as f64 * 4.0 + 100.0) / 1e6;

    // Raw ceiling: COPY OUT (binary) piped into COPY IN (binary), one stream.
    let raw_dst = rt.block_on(fresh_db(&dst_base, "bench_raw"));
    rt.block_on(postgres::checkpoint(&dst_base));
    let raw_secs = rt.block_on(postgres::raw_copy(&src, &raw_dst, dim, rows));
    let tmp = tempfile::tempdir().unwrap();
    let raw_rate = rows as f64 / raw_secs;
    if env_or("BENCH_PG", "1") != "0" {
        let state = tmp.path().join("state");
        let state_s = state.to_str().unwrap();
        let mig_dst = rt.block_on(fresh_db(&dst_base, "bench_migrate"));
        let mig_report = tmp.path().join("migrate.json");
        rt.block_on(postgres::checkpoint(&dst_base));
        let (mig_total, mig_rss) = run_vmig(&["migrate", "--from", &src, "--to", &mig_dst, "--state-root", state_s, "--quiet", "--report", mig_report.to_str().unwrap()]);
        let mig_load = load_seconds(&mig_report);

        let staging = tmp.path().join("st");
        let exp_report = tmp.path().join("export.json");
        let (exp_total, exp_rss) = run_vmig(&["export", "--from", &src, "--staging", staging.to_str().unwrap(), "--quiet", "--report", exp_report.to_str().unwrap()]);
        let imp_dst = rt.block_on(fresh_db(&dst_base, "bench_import"));
        let imp_report = tmp.path().join("import.json");
        let (imp_total, imp_rss) = run_vmig(&["import", "--staging", staging.to_str().unwrap(), "--to", &imp_dst, "--quiet", "--report", imp_report.to_str().unwrap()]);
        let staged_bytes: u64 = std::fs::read_dir(staging.join("chunks")).unwrap()
            .filter_map(|e| e.ok()).filter(|e| e.path().extension().is_some_and(|x| x == "parquet"))
            .map(|e| e.metadata().unwrap().len()).sum();

        println!("\nvmig e2e benchmark: {rows} rows × {dim}-d (≈{mb:.0} MB of row data), PostgreSQL 18 → PostgreSQL 18 on loopback");
        println!("{:<34} {:>10} {:>10} {:>9} {:>12}", "path", "rows/s", "MB/s", "vs raw", "peak RSS MB");
        let line = |name: &str, secs: f64, rss: Option<f64>| {
            let rate = rows as f64 / secs;
            println!(
                "{:<34} {:>10.0} {:>10.1} {:>8.2}× {:>12}",
                name, rate, mb / secs, rate / raw_rate,
                rss.map(|r| format!("{r:.0}")).unwrap_or("-".into())
            );
        };
        line("raw COPY OUT → COPY IN (ceiling)", raw_secs, None);
        line("vmig migrate (load phase)", mig_load, Some(mig_rss));
        line("vmig migrate (whole command)", mig_total, None);
        line("vmig export (to Parquet)", exp_total, Some(exp_rss));
        line("vmig import (from Parquet)", imp_total, Some(imp_rss));
        vector_storages(&rt, &src, &dst_base, rows, dim, tmp.path());
        println!("staging size: {:.1} MB = {:.2} of raw float32 vector bytes", staged_bytes as f64 / 1e6, staged_bytes as f64 / (rows as f64 * dim as f64 * 4.0));
        let _ = load_seconds(&exp_report) + load_seconds(&imp_report);
    }

    if env_or("BENCH_OB", "1") != "0" {
        let ob_base = env_or("VMIG_TEST_SEEKDB", "mysql://root@127.0.0.1:52881/test");
        bench_oceanbase(&rt, &ob_base, &src, &dst_base, rows, dim, raw_rate, mb, tmp.path());
    }
    if env_or("BENCH_MILVUS", "1") != "0" {
        let milvus_base = env_or("VMIG_TEST_MILVUS", "http://127.0.0.1:19530");
        bench_milvus(&rt, &milvus_base, &src, &dst_base, rows, dim, raw_rate, mb, tmp.path());
    }
}

/// The vector storages of a PostgreSQL target, same rows, same server: the
/// binary COPY pipe into FastGPT's DDL (EXTENDED), into PLAIN (with and
/// without toast_tuple_target) and into EXTERNAL, and `vmig migrate` with
/// its own choice and told to use EXTENDED. Alternated over BENCH_ROUNDS
/// rounds, each after a CHECKPOINT; the median of each is printed with its
/// samples, and each pipe's table is then read whole and indexed (HNSW over
/// its first BENCH_HNSW_ROWS rows).
fn vector_storages(rt: &tokio::runtime::Runtime, src: &str, dst_base: &str, rows: u64, dim: u32, tmp: &std::path::Path) {
    let rounds: usize = env_or("BENCH_ROUNDS", "3").parse().unwrap();
    let hnsw_rows: u64 = env_or("BENCH_HNSW_ROWS", "3000").parse().unwrap();
    let pipes = [
        ("pipe: EXTENDED (FastGPT's DDL)", ""),
        ("pipe: PLAIN, toast_tuple_target 8160", "ALTER TABLE modeldata ALTER COLUMN vector SET STORAGE PLAIN, SET (toast_tuple_target = 8160)"),
        ("pipe: PLAIN alone", "ALTER TABLE modeldata ALTER COLUMN vector SET STORAGE PLAIN"),
        ("pipe: EXTERNAL", "ALTER TABLE modeldata ALTER COLUMN vector SET STORAGE EXTERNAL"),
    ];
    let vmigs = [("vmig migrate (its choice: PLAIN)", None), ("vmig migrate --vector-storage extended", Some("extended"))];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); pipes.len() + vmigs.len()];
    let mut reads = vec![0.0; pipes.len()];
    let mut builds = vec![0.0; pipes.len()];
    for round in 0..rounds {
        for (i, (_, setup)) in pipes.iter().enumerate() {
            let url = rt.block_on(fresh_db(dst_base, &format!("bench_storage_{i}")));
            rt.block_on(postgres::checkpoint(dst_base));
            samples[i].push(rt.block_on(postgres::raw_copy_with(src, &url, dim, rows, setup)));
            if round == 0 {
                reads[i] = rt.block_on(postgres::read_all(&url));
                builds[i] = rt.block_on(postgres::hnsw_build(&url, hnsw_rows));
            }
        }
        for (j, (_, storage)) in vmigs.iter().enumerate() {
            let url = rt.block_on(fresh_db(dst_base, &format!("bench_storage_vmig_{j}")));
            let state = tmp.join(format!("storage-state-{round}-{j}"));
            let report = tmp.join(format!("storage-{round}-{j}.json"));
            let mut args = vec!["migrate", "--from", src, "--to", &url, "--state-root", state.to_str().unwrap(), "--quiet", "--report", report.to_str().unwrap()];
            if let Some(s) = storage {
                args.extend(["--vector-storage", s]);
            }
            rt.block_on(postgres::checkpoint(dst_base));
            run_vmig(&args);
            samples[pipes.len() + j].push(load_seconds(&report));
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let base = median(&samples[0]);
    println!("\nvector storage of the target table: {rows} rows, median of {rounds} alternated rounds, a CHECKPOINT before each");
    println!("{:<42} {:>10} {:>11} {:>12} {:>10}  load seconds", "case", "rows/s", "vs FastGPT", "read rows/s", "HNSW s");
    let names = pipes.iter().map(|p| p.0).chain(vmigs.iter().map(|v| v.0));
    for (i, name) in names.enumerate() {
        let m = median(&samples[i]);
        let (read, build) = if i < pipes.len() { (format!("{:.0}", rows as f64 / reads[i]), format!("{:.1}", builds[i])) } else { ("-".into(), "-".into()) };
        let all = samples[i].iter().map(|s| format!("{s:.2}")).collect::<Vec<_>>().join(" ");
        println!("{:<42} {:>10.0} {:>10.2}× {:>12} {:>10}  {all}", name, rows as f64 / m, base / m, read, build);
    }
    println!("(HNSW: FastGPT's index, m=32, ef_construction=128, over the first {hnsw_rows} rows copied into a table of the same storage)");
}

#[allow(clippy::too_many_arguments)]
fn bench_milvus(
    rt: &tokio::runtime::Runtime,
    base: &str,
    pg_src: &str,
    pg_dst_base: &str,
    rows: u64,
    dim: u32,
    pg_raw_rate: f64,
    mb: f64,
    tmp: &std::path::Path,
) {
    eprintln!("Milvus: raw SDK upsert ceiling …");
    let raw_db = rt.block_on(milvus_bench::fresh_db(base, "bench_raw"));
    let raw_upsert = rt.block_on(milvus_bench::raw_upsert(&raw_db, rows, dim));
    rt.block_on(milvus_bench::load_for_reading(&raw_db));
    let page = milvus_bench::read_page(dim);
    eprintln!("Milvus: raw keyset read ({page} rows per page) …");
    let raw_read = rt.block_on(milvus_bench::raw_keyset_read(&raw_db, rows, page));

    let state = tmp.join("milvus-state");
    let vmig_db = rt.block_on(milvus_bench::fresh_db(base, "bench_vmig"));
    let (pg_m, t1, rss1) = migrate_rate(pg_src, &vmig_db, rows, &state, &tmp.join("pg-milvus.json"));
    // Read back the raw collection (it is indexed and loaded; vmig's is not, with --no-indexes).
    let pg_back = rt.block_on(fresh_db(pg_dst_base, "bench_from_milvus"));
    let (m_pg, t2, rss2) = migrate_rate(&raw_db, &pg_back, rows, &state, &tmp.join("milvus-pg.json"));

    println!("\nvmig e2e benchmark, Milvus (2.3 standalone, {rows} rows × {dim}-d, ≈{mb:.0} MB), upserts of {} MiB, 2 streams", milvus_bench::REQUEST_BYTES >> 20);
    println!("{:<46} {:>10} {:>10} {:>12}", "path", "rows/s", "ratio", "peak RSS MB");
    println!("{:<46} {:>10.0} {:>10} {:>12}", "raw SDK upsert loop (ceiling)", raw_upsert, "1.00×", "-");
    println!("{:<46} {:>10.0} {:>10} {:>12}", &format!("raw SDK keyset read, {page} rows/page (ceiling)"), raw_read, "1.00×", "-");
    // Each ratio against the ceiling doing the same work into the same end
    // state: the upsert loop with its flush waited for; the keyset read.
    println!(
        "{:<46} {:>10.0} {:>9.2}× {:>12.0}   ({pg_m:.0} / upsert ceiling {raw_upsert:.0}; PG pipe {pg_raw_rate:.0}; whole command {t1:.1}s)",
        "vmig migrate PG → Milvus (load phase)", pg_m, pg_m / raw_upsert, rss1
    );
    println!(
        "{:<46} {:>10.0} {:>9.2}× {:>12.0}   ({m_pg:.0} / read ceiling {raw_read:.0}; PG pipe {pg_raw_rate:.0}; whole command {t2:.1}s)",
        "vmig migrate Milvus → PG (load phase)", m_pg, m_pg / raw_read, rss2
    );
}

#[allow(clippy::too_many_arguments)]
fn bench_oceanbase(
    rt: &tokio::runtime::Runtime,
    ob_base: &str,
    pg_src: &str,
    pg_dst_base: &str,
    rows: u64,
    dim: u32,
    pg_raw_rate: f64,
    mb: f64,
    tmp: &std::path::Path,
) {
    eprintln!("OceanBase: raw binary-literal INSERT ceiling …");
    let raw_db = rt.block_on(oceanbase::fresh_db(ob_base, "bench_ob_raw"));
    let raw_insert = rt.block_on(oceanbase::raw_insert(&raw_db, rows, dim, false));
    eprintln!("OceanBase: raw text-literal INSERT …");
    let text_db = rt.block_on(oceanbase::fresh_db(ob_base, "bench_ob_text"));
    let raw_text = rt.block_on(oceanbase::raw_insert(&text_db, rows, dim, true));
    // The page vmig reads: 8 MiB of rows (vectors as float32).
    let page = ((8usize << 20) / (dim as usize * 4 + 256)).clamp(500, 20_000);
    let text_page = (page / 5).max(100);
    eprintln!("OceanBase: raw keyset read, exact vectors by element, binary protocol ({page} rows per page) …");
    let raw_read = rt.block_on(oceanbase::raw_keyset_read(&raw_db, page, dim, oceanbase::ReadForm::Elements));
    eprintln!("OceanBase: raw keyset read, exact vectors as arrays of doubles ({text_page} rows per page) …");
    let raw_read_array = rt.block_on(oceanbase::raw_keyset_read(&raw_db, text_page, dim, oceanbase::ReadForm::DoubleArray));
    eprintln!("OceanBase: raw keyset read, seekdb's default 6-digit text …");
    let raw_read_lossy = rt.block_on(oceanbase::raw_keyset_read(&raw_db, text_page * 2, dim, oceanbase::ReadForm::Lossy));

    let state = tmp.join("ob-state");
    let ob_mig = rt.block_on(oceanbase::fresh_db(ob_base, "bench_ob_vmig"));
    let (pg_ob, t1, rss1) = migrate_rate(pg_src, &ob_mig, rows, &state, &tmp.join("pg-ob.json"));
    let pg_back = rt.block_on(fresh_db(pg_dst_base, "bench_from_ob"));
    let (ob_pg, t2, rss2) = migrate_rate(&ob_mig, &pg_back, rows, &state, &tmp.join("ob-pg.json"));

    println!("\nvmig e2e benchmark, OceanBase (seekdb 1.4, {rows} rows × {dim}-d, ≈{mb:.0} MB), statements of {} MiB, 2 connections", oceanbase::STATEMENT_BYTES >> 20);
    println!("{:<46} {:>10} {:>10} {:>12}", "path", "rows/s", "ratio", "peak RSS MB");
    println!("{:<46} {:>10.0} {:>10} {:>12}", "raw INSERT, X'…' binary literals (ceiling)", raw_insert, "1.00×", "-");
    println!("{:<46} {:>10.0} {:>9.2}× {:>12}", "raw INSERT, '[…]' text literals", raw_text, raw_text / raw_insert, "-");
    println!("{:<46} {:>10.0} {:>10} {:>12}", "raw read, element_at binary, exact (ceiling)", raw_read, "1.00×", "-");
    println!("{:<46} {:>10.0} {:>9.2}× {:>12}", "raw read, arrays of doubles, exact", raw_read_array, raw_read_array / raw_read, "-");
    println!("{:<46} {:>10.0} {:>9.2}× {:>12}", "raw read, 6-digit text (lossy)", raw_read_lossy, raw_read_lossy / raw_read, "-");
    println!(
        "{:<46} {:>10.0} {:>9.2}× {:>12.0}   ({pg_ob:.0} / insert ceiling {raw_insert:.0}; {:.1}× the text path; whole command {t1:.1}s)",
        "vmig migrate PG → OB (load phase)", pg_ob, pg_ob / raw_insert, rss1, pg_ob / raw_text
    );
    println!(
        "{:<46} {:>10.0} {:>9.2}× {:>12.0}   ({ob_pg:.0} / exact read ceiling {raw_read:.0}; PG pipe {pg_raw_rate:.0}; whole command {t2:.1}s)",
        "vmig migrate OB → PG (load phase)", ob_pg, ob_pg / raw_read, rss2
    );
}
