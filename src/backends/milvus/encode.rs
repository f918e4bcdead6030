//! Arrow columns as Milvus `FieldData`, the rows Milvus would refuse, and
//! the upsert request.

use anyhow::{Result, anyhow, bail};
use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType as ArrowType, Float32Type, Float64Type, Int32Type, Int64Type, TimeUnit};
use arrow::record_batch::RecordBatch;
use milvus::proto::common::MsgType;
use milvus::proto::milvus::UpsertRequest;
use milvus::proto::schema::{
    BoolArray, DataType, DoubleArray, FieldData, FloatArray, IntArray, JsonArray, LongArray, ScalarField, StringArray,
    VectorField, field_data, scalar_field, vector_field,
};

use crate::backends::milvus::{Milvus, base};
use crate::backends::milvus::mapping::{Collection, FieldInfo, FieldKind, PARTITION_COLUMN};
use crate::contract::RowReject;

fn scalars(dt: DataType, name: &str, data: scalar_field::Data) -> FieldData {
    FieldData {
        r#type: dt as i32,
        field_name: name.into(),
        field: Some(field_data::Field::Scalars(ScalarField { data: Some(data), ..Default::default() })),
        ..Default::default()
    }
}

/// One column as a Milvus field (rows already checked by `refused_rows`). A
/// nullable field carries the values of its non-null rows and one validity
/// flag per row (`FieldData.valid_data`, as pymilvus writes it).
fn encode_field(info: &FieldInfo, col: &dyn Array) -> Result<FieldData> {
    if !info.nullable {
        return encode_values(info, col);
    }
    let valid: Vec<bool> = (0..col.len()).map(|i| col.is_valid(i)).collect();
    let values = arrow::compute::filter(col, &arrow::array::BooleanArray::from(valid.clone()))?;
    Ok(FieldData { valid_data: valid, ..encode_values(info, values.as_ref())? })
}

fn encode_values(info: &FieldInfo, col: &dyn Array) -> Result<FieldData> {
    use scalar_field::Data as D;
    let cast = |t: &ArrowType| arrow::compute::cast(col, t);
    let f = &info.field;
    Ok(match &info.kind {
        FieldKind::Int64 => scalars(DataType::Int64, f, D::LongData(LongArray { data: cast_to_i64(col)? })),
        FieldKind::EpochMs => {
            let us = cast_to_i64(cast(&ArrowType::Timestamp(TimeUnit::Microsecond, None))?.as_ref())?;
            // Milvus keeps milliseconds: sub-millisecond digits are dropped (floor).
            let ms = us.iter().map(|us| us.div_euclid(1000)).collect();
            scalars(DataType::Int64, f, D::LongData(LongArray { data: ms }))
        }
        FieldKind::Int32 | FieldKind::Int16 | FieldKind::Int8 => {
            let dt = match info.kind {
                FieldKind::Int32 => DataType::Int32,
                FieldKind::Int16 => DataType::Int16,
                _ => DataType::Int8,
            };
            let a = cast(&ArrowType::Int32)?;
            scalars(dt, f, D::IntData(IntArray { data: a.as_primitive::<Int32Type>().values().to_vec() }))
        }
        FieldKind::Bool => {
            let a = cast(&ArrowType::Boolean)?;
            scalars(DataType::Bool, f, D::BoolData(BoolArray { data: a.as_boolean().iter().map(|v| v.unwrap_or(false)).collect() }))
        }
        FieldKind::Float => {
            let a = cast(&ArrowType::Float32)?;
            scalars(DataType::Float, f, D::FloatData(FloatArray { data: a.as_primitive::<Float32Type>().values().to_vec() }))
        }
        FieldKind::Double => {
            let a = cast(&ArrowType::Float64)?;
            scalars(DataType::Double, f, D::DoubleData(DoubleArray { data: a.as_primitive::<Float64Type>().values().to_vec() }))
        }
        FieldKind::VarChar { .. } => {
            let a = cast(&ArrowType::Utf8)?;
            let s = a.as_string::<i32>().iter().map(|v| v.unwrap_or_default().to_string()).collect();
            scalars(DataType::VarChar, f, D::StringData(StringArray { data: s }))
        }
        FieldKind::Json => {
            let a = cast(&ArrowType::Utf8)?;
            let s = a.as_string::<i32>().iter().map(|v| v.unwrap_or("null").as_bytes().to_vec()).collect();
            scalars(DataType::Json, f, D::JsonData(JsonArray { data: s }))
        }
        FieldKind::FloatVector { dim } => {
            let l = col.as_fixed_size_list_opt().ok_or_else(|| anyhow!("column {} is not a vector", info.column))?;
            let values = l.values().as_primitive::<Float32Type>();
            let start = l.value_offset_at(0);
            let data = values.values()[start..start + l.len() * *dim as usize].to_vec();
            FieldData {
                r#type: DataType::FloatVector as i32,
                field_name: f.clone(),
                field: Some(field_data::Field::Vectors(VectorField {
                    dim: *dim as i64,
                    data: Some(vector_field::Data::FloatVector(FloatArray { data })),
                    ..Default::default()
                })),
                ..Default::default()
            }
        }
    })
}

fn cast_to_i64(a: &dyn Array) -> Result<Vec<i64>> {
    let a = arrow::compute::cast(a, &ArrowType::Int64)?;
    Ok(a.as_primitive::<Int64Type>().values().to_vec())
}

/// Rows Milvus would refuse for the whole request: NULLs in a field that is
/// not nullable (every field before Milvus 2.5) and strings over a VarChar's
/// max_length in bytes.
pub(super) fn refused_rows(coll: &Collection, batch: &RecordBatch) -> Result<Vec<RowReject>> {
    // The first reason found for each row.
    let mut reasons: Vec<Option<String>> = vec![None; batch.num_rows()];
    for info in &coll.fields {
        let col = batch
            .column_by_name(&info.column)
            .ok_or_else(|| anyhow!("rows have no column {} for Milvus field {}", info.column, info.field))?;
        for (row, reason) in reasons.iter_mut().enumerate().filter(|(_, r)| r.is_none()) {
            if col.is_null(row) {
                if !info.nullable {
                    *reason = Some(format!("NULL in {}: Milvus field {} is not nullable", info.column, info.field));
                }
            } else if let (FieldKind::VarChar { max_len }, Some(s)) = (&info.kind, col.as_string_opt::<i32>()) {
                let n = s.value(row).len();
                if n > *max_len as usize {
                    *reason = Some(format!(
                        "{}: {n} bytes exceed the Milvus VarChar max_length {max_len} of field {}",
                        info.column, info.field
                    ));
                }
            }
        }
    }
    if let Some(names) = batch.column_by_name(PARTITION_COLUMN).filter(|_| coll.partitioned()).and_then(|c| c.as_string_opt::<i32>()) {
        for (row, reason) in reasons.iter_mut().enumerate().filter(|(_, r)| r.is_none()) {
            let name = names.is_valid(row).then(|| names.value(row)).unwrap_or_default();
            if !is_partition_name(name) {
                *reason = Some(format!(
                    "{PARTITION_COLUMN} {name:?} is not a Milvus partition name (a letter or _, then letters, digits, _; at most 255)"
                ));
            }
        }
    }
    Ok(reasons.into_iter().enumerate().filter_map(|(row, r)| r.map(|reason| RowReject { row, reason })).collect())
}

/// Milvus' rule for partition names.
fn is_partition_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 255
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Upsert requests one writer keeps in flight. Two keep Milvus' proxy and
/// data node busy while the next request is encoded and sent, where one left
/// the server idle between requests. Callers send only rows of disjoint keys
/// at once (a chunk's, a collapsed change set's), so their order is free.
pub(super) const UPSERTS_IN_FLIGHT: usize = 2;

/// Starts an upsert of `batch` and returns at once; the handle says how it
/// ended. Rows that carry their partition go into it (one request per
/// partition, created first when missing).
pub(super) fn start_upsert(conn: &Milvus, coll: &Collection, batch: &RecordBatch) -> Result<tokio::task::JoinHandle<Result<()>>> {
    let mut requests = Vec::new();
    for (partition, rows) in by_partition(coll, batch)? {
        if let Some(p) = &partition {
            conn.ensure_partition(&coll.spec.name, p)?;
        }
        let fields = coll
            .fields
            .iter()
            .map(|info| encode_field(info, rows.column_by_name(&info.column).unwrap().as_ref()))
            .collect::<Result<Vec<_>>>()?;
        let req = UpsertRequest {
            base: base(MsgType::Upsert),
            db_name: conn.url.database.clone(),
            collection_name: coll.spec.name.clone(),
            partition_name: partition.unwrap_or_default(),
            fields_data: fields,
            num_rows: rows.num_rows() as u32,
            ..Default::default()
        };
        let what = format!("upsert of {} rows into {}", rows.num_rows(), coll.spec.name);
        requests.push((conn.request(&what, |mut c| async move { c.upsert(req).await }), what));
    }
    Ok(conn.spawn(async move {
        for (upsert, what) in requests {
            let r = upsert.await?;
            if !r.err_index.is_empty() {
                bail!("Milvus refused {} rows of the {what}", r.err_index.len());
            }
        }
        Ok(())
    }))
}

/// The batch's rows grouped by the partition they name (`PARTITION_COLUMN`),
/// or all of them for the collection's default routing.
fn by_partition(coll: &Collection, batch: &RecordBatch) -> Result<Vec<(Option<String>, RecordBatch)>> {
    if !coll.partitioned() {
        return Ok(vec![(None, batch.clone())]);
    }
    let names = batch
        .column_by_name(PARTITION_COLUMN)
        .and_then(|c| c.as_string_opt::<i32>())
        .ok_or_else(|| anyhow!("rows for {} lack their partition ({PARTITION_COLUMN})", coll.spec.name))?;
    let mut groups: std::collections::BTreeMap<&str, Vec<u32>> = Default::default();
    for (i, name) in names.iter().enumerate() {
        groups.entry(name.unwrap_or_default()).or_default().push(i as u32);
    }
    groups
        .into_iter()
        .map(|(name, rows)| Ok((Some(name.to_string()), arrow::compute::take_record_batch(batch, &arrow::array::UInt32Array::from(rows))?)))
        .collect()
}
