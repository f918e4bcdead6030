//! `vmig verify`: the full chunk comparison or a random sample of rows, and
//! optionally recall@K of both sides' vector indexes, printed and written
//! as one JSON report.

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tokio::runtime::Handle;

use crate::backends::{open_subset, parse_side};
use crate::commands::cli::VerifyArgs;
use crate::commands::job::DEFAULT_TABLE;
use crate::engine::recall::{RecallOptions, RecallReport, recall};
use crate::engine::verify::{SampleReport, VerifyReport, verify, verify_sample};
use crate::model::config::Endpoint;
use crate::state::manifest::Manifest;

/// The `--report` file: the full comparison's fields at the top level (as
/// before samples and recall existed), the others beside them.
#[derive(Serialize)]
struct Output<'a> {
    #[serde(flatten)]
    rows: Option<&'a VerifyReport>,
    sample: Option<&'a SampleReport>,
    recall: Option<&'a RecallReport>,
    passed: bool,
}

fn seed_or_clock(seed: Option<u64>) -> u64 {
    seed.unwrap_or_else(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        t.as_nanos() as u64 ^ ((std::process::id() as u64) << 32)
    })
}

pub fn run(a: &VerifyArgs, handle: &Handle) -> Result<u8> {
    let from = a.from.as_deref().map(parse_side).transpose()?;
    let to = a.to.as_deref().map(parse_side).transpose()?;
    let staging = a.staging.clone().map(Endpoint::Staging);
    let (from, to) = match (from, to, staging) {
        (Some(f), Some(t), None) => (f, t),
        (Some(f), None, Some(s)) => (f, s),
        (None, Some(t), Some(s)) => (s, t),
        _ => bail!("verify needs two sides: --from and --to, or one of them and --staging DIR"),
    };
    let table = a.table.clone().unwrap_or_else(|| DEFAULT_TABLE.into());
    // A staging side exported as a subset stands for that subset.
    let staged = [&from, &to].into_iter().find_map(|e| match e {
        Endpoint::Staging(d) => Some(d.clone()),
        _ => None,
    });
    let filter = match (a.subset.filter()?, staged) {
        (None, Some(d)) => Manifest::load(&crate::state::store::Store::open(&d)?)?
            .and_then(|m| m.filter)
            .map(|f| crate::model::filter::Filter::parse(&f))
            .transpose()?,
        (f, _) => f,
    };
    let from_src = open_subset(&from, &table, handle, filter.as_ref())?;
    let target_table = a.target_table.clone().unwrap_or_else(|| from_src.spec().name.clone());
    let to_src = open_subset(&to, &target_table, handle, filter.as_ref())?;
    if let Some(f) = &filter {
        say!("verify: the subset {}", f.describe());
    }
    let seed = seed_or_clock(a.seed);

    let (mut rows, mut sample) = (None, None);
    if let Some(n) = a.sample {
        let r = verify_sample(from_src.as_ref(), to_src.as_ref(), n.max(1), seed)?;
        print_sample(&r);
        sample = Some(r);
    } else {
        let plan = match (&from, &to) {
            (Endpoint::Staging(d), _) | (_, Endpoint::Staging(d)) => {
                Manifest::load(&crate::state::store::Store::open(d)?)?.map(|m| m.plan).unwrap_or_default()
            }
            _ => from_src.plan(a.chunk_rows.unwrap_or(20_000))?,
        };
        let r = verify(from_src.as_ref(), to_src.as_ref(), &plan, a.workers.unwrap_or(2))?;
        print_rows(&r);
        rows = Some(r);
    }
    let recall = match a.recall {
        Some(k) => {
            let opts = RecallOptions {
                k,
                queries: a.queries,
                noise: a.noise,
                seed,
                min_ratio: a.min_recall_ratio,
                chunk_rows: a.chunk_rows.unwrap_or(20_000),
            };
            let r = recall(from_src.as_ref(), to_src.as_ref(), &opts)?;
            print_recall(&r);
            Some(r)
        }
        None => None,
    };
    let passed = rows.as_ref().is_none_or(|r| r.equal) && sample.as_ref().is_none_or(|r| r.equal) && recall.as_ref().is_none_or(|r| r.passed);
    if let Some(p) = &a.report {
        let out = Output { rows: rows.as_ref(), sample: sample.as_ref(), recall: recall.as_ref(), passed };
        let json = serde_json::to_string_pretty(&out)?;
        let html = p.extension().is_some_and(|e| e.eq_ignore_ascii_case("html") || e.eq_ignore_ascii_case("htm"));
        let text = if html { crate::commands::verify_html::render(rows.as_ref(), sample.as_ref(), recall.as_ref(), passed, &json) } else { json };
        std::fs::write(p, text).with_context(|| format!("writing the report to {}", p.display()))?;
    }
    Ok(if passed { 0 } else { 1 })
}

fn print_rows(r: &VerifyReport) {
    for d in &r.differing_chunks {
        println!("{}", d.describe());
    }
    for n in &r.not_compared {
        println!("{n}");
    }
    if r.source_duplicates > 0 {
        println!(
            "note: the source holds {} copies beyond one per id, of ids {} (Milvus keeps an old copy when it loses a delete; reads return one, and that one was compared)",
            r.source_duplicates,
            crate::engine::verify::key_list(&r.source_duplicate_ids)
        );
    }
    println!(
        "verify: {} chunks · source {} rows · target {} rows · {}",
        r.chunks,
        r.source_rows,
        r.target_rows,
        if r.equal {
            format!("all rows equal (ids, every column; vectors {}; timestamps {})", r.vector_comparison, r.timestamp_comparison)
        } else {
            format!("{} chunks DIFFER", r.differing_chunks.len())
        }
    );
}

fn print_sample(r: &SampleReport) {
    for n in &r.not_compared {
        println!("{n}");
    }
    if !r.missing.is_empty() {
        println!("missing in the target (first 20 sampled ids): {}", crate::engine::verify::key_list(&r.missing));
    }
    if !r.different.is_empty() {
        println!("different in the target (first 20 sampled ids): {}", crate::engine::verify::key_list(&r.different));
    }
    if r.target_duplicates > 0 {
        println!("the target holds {} row copies beyond one per id (Milvus count(*))", r.target_duplicates);
    }
    println!(
        "verify --sample: source {} rows · target {} rows{} · {} sampled (seed {}; vectors {}; timestamps {})",
        r.source_rows,
        r.target_rows,
        if r.source_rows == r.target_rows { "" } else { " · COUNTS DIFFER" },
        r.sampled,
        r.seed,
        r.vector_comparison,
        r.timestamp_comparison
    );
    println!("{}", r.statement());
}

fn print_recall(r: &RecallReport) {
    println!("recall: metric {}; search breadth {} ({}); exact top-{} {}", r.metric, r.ef, r.ef_from, r.k, r.exact);
    println!("  source: {}", r.source.search);
    println!("  target: {}", r.target.search);
    println!("  {:>5}  {:>8}  {:>8}", "k", "source", "target");
    for ((k, s), (_, t)) in r.source.curve.iter().zip(&r.target.curve) {
        println!("  {k:>5}  {s:>8.4}  {t:>8.4}");
    }
    println!("{}", r.statement());
}
