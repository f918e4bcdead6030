//! Schema mapping between SQL columns and Milvus fields: how each field is
//! held in Arrow, the collection as vmig sees it, FastGPT's field names.

use anyhow::{Result, anyhow, bail};
use milvus::proto::common::KeyValuePair;
use milvus::proto::schema::{self, CollectionSchema, DataType};

use crate::model::config::FieldMap;
use crate::model::schema::{ColumnSpec, ColumnType, ComputedField, ComputedInput, IndexKind, IndexSpec, Metric, PartitionKey, TableSpec};

use super::*;

/// How one Milvus field is held in Arrow.
#[derive(Clone, Debug, PartialEq)]
pub enum FieldKind {
    Int64,
    Int32,
    Int16,
    Int8,
    Bool,
    Float,
    Double,
    /// `max_len` in bytes, as Milvus counts.
    VarChar { max_len: u32 },
    Json,
    FloatVector { dim: u32 },
    /// Int64 epoch milliseconds that the SQL side holds as a timestamp.
    EpochMs,
}

#[derive(Clone, Debug)]
pub struct FieldInfo {
    pub column: String,
    pub field: String,
    pub kind: FieldKind,
    /// The server keeps NULLs in this field (a nullable scalar, Milvus 2.5+).
    pub nullable: bool,
}

/// The column that carries each row's partition when a collection keeps its
/// rows in named partitions (and has no partition key): a row is read from
/// its partition and written into the partition it names, created when
/// missing. A SQL table keeps it as a plain column, so Milvus → SQL → Milvus
/// puts every row back into its partition.
pub const PARTITION_COLUMN: &str = "milvus_partition";

/// Milvus' own partition, which every collection has.
const DEFAULT_PARTITION: &str = "_default";

/// A collection seen through the mapping: its SQL-side spec and how each
/// column becomes a field.
#[derive(Clone, Debug)]
pub struct Collection {
    /// With named partitions, the last column is `PARTITION_COLUMN` (no field).
    pub spec: TableSpec,
    /// In `spec.columns` order.
    pub fields: Vec<FieldInfo>,
    pub pk_field: String,
    pub auto_id: bool,
    pub dynamic: bool,
}

impl Collection {
    /// Rows travel with the name of their partition.
    pub fn partitioned(&self) -> bool {
        self.spec.column(PARTITION_COLUMN).is_some()
    }

    /// Rows of this collection carry their partition (`PARTITION_COLUMN`),
    /// or stop carrying it.
    pub fn carry_partitions(&mut self, carry: bool) {
        self.spec.columns.retain(|c| c.name != PARTITION_COLUMN);
        if carry {
            self.spec.columns.push(ColumnSpec {
                name: PARTITION_COLUMN.into(),
                ty: ColumnType::Text { max_chars: Some(255) },
                nullable: false,
                auto_increment: false,
                default_now: false,
            });
        }
    }
}

fn type_param(f: &schema::FieldSchema, key: &str) -> Option<u32> {
    f.type_params.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.parse().ok())
}

pub fn column_of<'a>(map: &'a [FieldMap], field: &'a str) -> (&'a str, bool) {
    map.iter().find(|m| m.field == field).map(|m| (m.column.as_str(), m.epoch_ms)).unwrap_or((field, false))
}

pub fn field_of<'a>(map: &'a [FieldMap], column: &'a str) -> &'a str {
    map.iter().find(|m| m.column == column).map(|m| m.field.as_str()).unwrap_or(column)
}

pub fn metric_from_milvus(s: &str) -> Option<Metric> {
    match s.to_ascii_uppercase().as_str() {
        "IP" => Some(Metric::InnerProduct),
        "COSINE" => Some(Metric::Cosine),
        "L2" => Some(Metric::L2),
        _ => None,
    }
}

pub fn metric_to_milvus(m: Metric) -> &'static str {
    match m {
        Metric::InnerProduct => "IP",
        Metric::Cosine => "COSINE",
        Metric::L2 => "L2",
    }
}

/// Maps a collection's schema and indexes to a table spec. Fails, before any
/// write, on what the mapping cannot express.
pub fn map_collection(
    name: &str,
    schema: &CollectionSchema,
    partitions: i64,
    indexes: &[milvus::proto::milvus::IndexDescription],
    map: &[FieldMap],
) -> Result<Collection> {
    let mut columns = Vec::new();
    let mut fields = Vec::new();
    let mut pk = None;
    let mut auto_id = false;
    let mut partition_key = None;
    for f in &schema.fields {
        if f.is_dynamic || f.name == source::DYNAMIC_FIELD {
            continue;
        }
        if f.is_function_output {
            // Computed by Milvus from other fields (BM25 sparse vectors): see below.
            continue;
        }
        let (column, epoch_ms) = column_of(map, &f.name);
        let dt = DataType::try_from(f.data_type).unwrap_or(DataType::None);
        let (kind, ty) = match dt {
            DataType::Int64 if epoch_ms => (FieldKind::EpochMs, ColumnType::Timestamp { utc: false }),
            _ if epoch_ms => bail!(
                "collection {name}: field {} is mapped to the timestamp column {column} (epoch milliseconds) but is {dt:?}, not Int64",
                f.name
            ),
            DataType::Int64 => (FieldKind::Int64, ColumnType::Int64),
            DataType::Int32 => (FieldKind::Int32, ColumnType::Int32),
            DataType::Int16 => (FieldKind::Int16, ColumnType::Int16),
            DataType::Int8 => (FieldKind::Int8, ColumnType::Int16),
            DataType::Bool => (FieldKind::Bool, ColumnType::Bool),
            DataType::Float => (FieldKind::Float, ColumnType::Float32),
            DataType::Double => (FieldKind::Double, ColumnType::Float64),
            DataType::VarChar | DataType::String => {
                let max_len = type_param(f, "max_length").unwrap_or(65_535);
                (FieldKind::VarChar { max_len }, ColumnType::Text { max_chars: Some(max_len) })
            }
            DataType::Json => (FieldKind::Json, ColumnType::Json { binary: true }),
            DataType::FloatVector => {
                let dim = type_param(f, "dim").ok_or_else(|| anyhow!("collection {name}: vector field {} has no dim", f.name))?;
                (FieldKind::FloatVector { dim }, ColumnType::Vector { dim })
            }
            other => bail!(
                "collection {name}: field {} has type {other:?}, which vmig cannot map to a table column \
                 (supported: integers, Bool, Float, Double, VarChar, JSON, FloatVector)",
                f.name
            ),
        };
        if f.is_primary_key {
            if !matches!(kind, FieldKind::Int64 | FieldKind::VarChar { .. }) {
                bail!("collection {name}: primary key {} is {dt:?}; vmig reads Int64 and VarChar primary keys", f.name);
            }
            pk = Some((column.to_string(), f.name.clone()));
            auto_id = f.auto_id;
        }
        columns.push(ColumnSpec {
            name: column.to_string(),
            ty,
            nullable: f.nullable,
            // FastGPT on PostgreSQL/OceanBase lets the database number new
            // rows: a SQL target gets a sequence / AUTO_INCREMENT above max(id).
            auto_increment: f.is_primary_key && matches!(kind, FieldKind::Int64),
            default_now: false,
        });
        if f.is_partition_key {
            partition_key = Some(PartitionKey { column: column.to_string(), partitions: partitions.max(0) as u32 });
        }
        // Nullable vectors (2.6) are read and written as NOT NULL for now.
        let nullable = f.nullable && !matches!(kind, FieldKind::FloatVector { .. });
        fields.push(FieldInfo { column: column.to_string(), field: f.name.clone(), kind, nullable });
    }
    let (pk_column, pk_field) = pk.ok_or_else(|| anyhow!("collection {name} has no primary key"))?;
    let mut spec_indexes = Vec::new();
    for ix in indexes {
        let Some(info) = fields.iter().find(|f| f.field == ix.field_name) else { continue };
        let param = |k: &str| ix.params.iter().find(|kv| kv.key.eq_ignore_ascii_case(k)).map(|kv| kv.value.clone());
        // Parameters come as "params": {"M":..,"efConstruction":..} or as separate pairs.
        let nested: serde_json::Value =
            param("params").and_then(|p| serde_json::from_str(&p).ok()).unwrap_or(serde_json::Value::Null);
        let number = |k: &str| -> Option<u32> {
            param(k).and_then(|v| v.parse().ok()).or_else(|| {
                nested.get(k).and_then(|v| v.as_u64().map(|n| n as u32).or_else(|| v.as_str().and_then(|s| s.parse().ok())))
            })
        };
        if matches!(info.kind, FieldKind::FloatVector { .. }) {
            let metric = param("metric_type").and_then(|m| metric_from_milvus(&m)).unwrap_or(Metric::InnerProduct);
            let hnsw = param("index_type").is_some_and(|t| t.eq_ignore_ascii_case("HNSW"));
            spec_indexes.push(IndexSpec {
                name: ix.index_name.clone(),
                columns: vec![info.column.clone()],
                kind: IndexKind::Hnsw {
                    metric,
                    // Other index types (IVF, DiskANN…) become FastGPT's HNSW.
                    m: number("M").filter(|_| hnsw).unwrap_or(32),
                    ef_construction: number("efConstruction").filter(|_| hnsw).unwrap_or(128),
                    quantization: None,
                },
            });
        } else if info.field != pk_field {
            spec_indexes.push(IndexSpec {
                name: ix.index_name.clone(),
                columns: vec![info.column.clone()],
                kind: IndexKind::Btree { unique: false },
            });
        }
    }
    let computed = computed_fields(name, schema, indexes, map)?;
    let spec = TableSpec { name: name.to_string(), columns, primary_key: pk_column, indexes: spec_indexes, computed, partition_key };
    spec.validate()?;
    Ok(Collection { spec, fields, pk_field, auto_id, dynamic: schema.enable_dynamic_field })
}

/// Type parameters of an input field that only its function needs (the
/// rest, max_length and dim, follow from the column's type).
const FUNCTION_INPUT_PARAMS: [&str; 4] = ["enable_analyzer", "analyzer_params", "enable_match", "multi_analyzer_params"];

/// The collection's function output fields, as `ComputedField`s: each with
/// its function, the input columns (and their analyzer parameters) and the
/// output's index, so a target can declare exactly the same.
fn computed_fields(
    name: &str,
    schema: &CollectionSchema,
    indexes: &[milvus::proto::milvus::IndexDescription],
    map: &[FieldMap],
) -> Result<Vec<ComputedField>> {
    let pairs = |kvs: &[KeyValuePair]| kvs.iter().map(|kv| (kv.key.clone(), kv.value.clone())).collect::<Vec<_>>();
    let mut out = Vec::new();
    for f in schema.fields.iter().filter(|f| f.is_function_output) {
        let function = schema
            .functions
            .iter()
            .find(|g| g.output_field_names.contains(&f.name))
            .ok_or_else(|| anyhow!("collection {name}: field {} is a function output, but no function computes it", f.name))?;
        if function.output_field_names.len() != 1 {
            bail!("collection {name}: function {} has {} outputs; vmig copies one-output functions", function.name, function.output_field_names.len());
        }
        let function_type = schema::FunctionType::try_from(function.r#type).map(|t| t.as_str_name().to_string()).unwrap_or(function.r#type.to_string());
        let inputs = function
            .input_field_names
            .iter()
            .map(|input| {
                let field = schema.fields.iter().find(|g| &g.name == input).ok_or_else(|| anyhow!("collection {name}: function {} reads the missing field {input}", function.name))?;
                let params = field.type_params.iter().filter(|kv| FUNCTION_INPUT_PARAMS.contains(&kv.key.as_str())).map(|kv| (kv.key.clone(), kv.value.clone())).collect();
                Ok(ComputedInput { column: column_of(map, input).0.to_string(), params })
            })
            .collect::<Result<Vec<_>>>()?;
        let data_type = DataType::try_from(f.data_type).map(|t| t.as_str_name().to_string()).unwrap_or(f.data_type.to_string());
        let index = indexes.iter().find(|ix| ix.field_name == f.name).map(|ix| (ix.index_name.clone(), pairs(&ix.params)));
        out.push(ComputedField {
            field: f.name.clone(),
            data_type,
            function: function.name.clone(),
            function_type,
            function_params: pairs(&function.params),
            inputs,
            index,
        });
    }
    Ok(out)
}

pub fn discover(conn: &Milvus, name: &str, map: &[FieldMap]) -> Result<Collection> {
    if !conn.has_collection(name)? {
        bail!("collection {name} not found in Milvus database {} ({})", conn.url.database, conn.url.redacted());
    }
    let (schema, partitions) = conn.describe(name)?;
    let indexes = conn.indexes(name)?;
    let mut coll = map_collection(name, &schema, partitions, &indexes, map)?;
    // Named partitions (a partition key's are Milvus' own business).
    if coll.spec.partition_key.is_none() {
        let names = conn.partitions(name)?;
        if names.iter().any(|p| p != DEFAULT_PARTITION) {
            if coll.spec.column(PARTITION_COLUMN).is_some() {
                bail!("collection {name} has a field {PARTITION_COLUMN}, the name vmig gives each row's partition; rename the field");
            }
            coll.carry_partitions(true);
        }
    }
    Ok(coll)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fastgpt_fields_map_to_sql_columns() {
        let map = crate::model::config::fastgpt_field_map();
        assert_eq!(column_of(&map, "teamId"), ("team_id", false));
        assert_eq!(column_of(&map, "createTime"), ("createtime", true));
        assert_eq!(field_of(&map, "collection_id"), "collectionId");
        assert_eq!(field_of(&map, "vector"), "vector");
    }
}
