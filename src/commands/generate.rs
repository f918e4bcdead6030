//! `vmig generate`: a FastGPT-shaped modeldata table with deterministic
//! synthetic rows (gapped ids, several teams/datasets/collections, non-ASCII
//! strings, createtime spread over months at millisecond precision).

use std::sync::Arc;

use anyhow::{Result, bail};
use arrow::array::{ArrayRef, FixedSizeListArray, Float32Array, Int64Array, StringArray, TimestampMicrosecondArray};
use arrow::record_batch::RecordBatch;
use tokio::runtime::Handle;

use crate::commands::cli::GenerateArgs;
use crate::contract::{OnExisting, Sink, SinkOptions};
use crate::contract::commit::CommitRecord;
use crate::model::config::Endpoint;
use crate::model::plan::ChunkRange;
use crate::model::schema::{ColumnSpec, ColumnType, IndexKind, IndexSpec, Metric, TableSpec, vector_item_field};

/// FastGPT's modeldata (PostgreSQL flavour) with a vector of `dim` dimensions.
pub fn fastgpt_spec(table: &str, dim: u32, halfvec: bool, vector_index: bool) -> TableSpec {
    let text = |name: &str| ColumnSpec {
        name: name.into(),
        ty: ColumnType::Text { max_chars: Some(50) },
        nullable: false,
        auto_increment: false,
        default_now: false,
    };
    let mut indexes = vec![
        IndexSpec {
            name: format!("{table}_team_dataset_collection_index"),
            columns: vec!["team_id".into(), "dataset_id".into(), "collection_id".into()],
            kind: IndexKind::Btree { unique: false },
        },
        IndexSpec { name: format!("{table}_create_time_index"), columns: vec!["createtime".into()], kind: IndexKind::Btree { unique: false } },
    ];
    if vector_index {
        indexes.insert(0, IndexSpec {
            name: format!("{table}_vector_index"),
            columns: vec!["vector".into()],
            kind: IndexKind::Hnsw { metric: Metric::InnerProduct, m: 32, ef_construction: 128, quantization: None },
        });
    }
    TableSpec {
        name: table.into(),
        columns: vec![
            ColumnSpec { name: "id".into(), ty: ColumnType::Int64, nullable: false, auto_increment: true, default_now: false },
            ColumnSpec {
                name: "vector".into(),
                ty: if halfvec { ColumnType::HalfVec { dim } } else { ColumnType::Vector { dim } },
                nullable: false,
                auto_increment: false,
                default_now: false,
            },
            text("team_id"),
            text("dataset_id"),
            text("collection_id"),
            ColumnSpec {
                name: "createtime".into(),
                ty: ColumnType::Timestamp { utc: false },
                nullable: true,
                auto_increment: false,
                default_now: true,
            },
        ],
        primary_key: "id".into(),
        indexes,
        computed: Vec::new(), partition_key: None,
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Rows `start..start+n` of the synthetic data set.
pub fn batch(spec: &TableSpec, seed: u64, start: u64, n: u64) -> Result<RecordBatch> {
    let dim = spec.vector_column().unwrap().ty.vector_dim().unwrap() as usize;
    let halfvec = matches!(spec.vector_column().unwrap().ty, ColumnType::HalfVec { .. });
    let mut ids = Vec::with_capacity(n as usize);
    let mut values = Vec::with_capacity(n as usize * dim);
    let (mut teams, mut datasets, mut collections, mut times) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    const BASE_US: i64 = 1_735_689_600_000_000; // 2025-01-01
    const SPAN_MS: u64 = 200 * 24 * 3600 * 1000; // ~6.5 months
    for i in start..start + n {
        let h = splitmix(seed ^ i);
        ids.push(1000 + (i as i64) * 3 + (h % 3) as i64);
        let team = h % 3;
        let dataset = team * 10 + (h >> 8) % 2;
        let collection = dataset * 10 + (h >> 16) % 4;
        teams.push(format!("team-{team}-团队"));
        datasets.push(format!("dataset-{dataset}-données"));
        collections.push(format!("collection-{collection}-коллекция"));
        times.push(BASE_US + ((h >> 20) % SPAN_MS) as i64 * 1000);
        let start_len = values.len();
        let mut norm = 0f32;
        for d in 0..dim {
            let r = splitmix(h ^ (d as u64).wrapping_mul(0x1000_0000_01b3));
            let x = (r >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
            norm += x * x;
            values.push(x);
        }
        let inv = 1.0 / norm.sqrt().max(1e-12);
        for v in &mut values[start_len..] {
            *v *= inv;
            if halfvec {
                *v = half::f16::from_f32(*v).to_f32();
            }
        }
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(ids)),
        Arc::new(FixedSizeListArray::new(vector_item_field(), dim as i32, Arc::new(Float32Array::from(values)), None)),
        Arc::new(StringArray::from(teams)),
        Arc::new(StringArray::from(datasets)),
        Arc::new(StringArray::from(collections)),
        Arc::new(TimestampMicrosecondArray::from(times)),
    ];
    Ok(RecordBatch::try_new(spec.arrow_schema(), cols)?)
}

/// Creates the table in `sink` and fills it with `rows` rows.
pub fn generate(sink: &dyn Sink, spec: &TableSpec, rows: u64, seed: u64, progress: &dyn Fn(&str)) -> Result<()> {
    // PostgreSQL's default vector storage, as FastGPT's own DDL leaves it:
    // a generated table stands for the source users have.
    let vector_storage = Some(crate::contract::VectorStorage::Extended);
    let opts = SinkOptions { job: String::new(), on_existing: OnExisting::Upsert, create_indexes: true, online: false, shared: false, index_memory: None, vector_storage };
    let whole = ChunkRange { rows, ..ChunkRange::whole() };
    sink.prepare(spec, std::slice::from_ref(&whole), &opts)?;
    let mut w = sink.begin_chunk("", &whole)?;
    let mut done = 0;
    while done < rows {
        let n = (rows - done).min(2000);
        w.write(&batch(spec, seed, done, n)?)?;
        done += n;
    }
    w.commit(CommitRecord {
        chunk: 0,
        lo: whole.lo,
        hi: whole.hi,
        rows,
        rejected: 0,
        content_hash: String::new(),
        bytes: 0,
        sha256: None,
        file: None,
        committed_at: String::new(),
    })?;
    progress(&format!("{rows} rows written"));
    sink.finish(spec, &[whole], &opts, &crate::contract::PrintFeedback)
}

/// `vmig generate`: a FastGPT-shaped table of random rows.
pub fn run(a: GenerateArgs, handle: &Handle) -> Result<u8> {
    let ep = Endpoint::parse(&a.to)?;
    if matches!(ep, Endpoint::Staging(_)) {
        bail!("generate needs a database URL");
    }
    let spec = fastgpt_spec(&a.table, a.dim, a.halfvec, !a.no_vector_index);
    let sink = crate::backends::open_sink(&ep, &a.table, handle, None)?;
    if a.replace {
        sink.drop_table()?;
    } else if crate::backends::open_source(&ep, &a.table, handle).is_ok() {
        bail!("table {} already exists in {}; use --replace to recreate it", a.table, ep.describe());
    }
    let started = std::time::Instant::now();
    generate(sink.as_ref(), &spec, a.rows, a.seed, &|m| say!("{m}"))?;
    say!(
        "generated {} rows ({}-d {}) in {} table {} in {:.1}s",
        a.rows,
        a.dim,
        if a.halfvec { "halfvec" } else { "vector" },
        ep.describe(),
        a.table,
        started.elapsed().as_secs_f64()
    );
    Ok(0)
}
