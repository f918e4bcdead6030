//! Table specification: what a table looks like, independent of the backend
//! that holds it. Discovered live from a catalog, stored in manifests, and
//! mapped to the Arrow schema that travels between stages.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use serde::{Deserialize, Serialize};

/// Logical column type. Vectors travel as `FixedSizeList<Float32, dim>`;
/// halfvec is widened to Float32 (exact) and narrowed again at a halfvec target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ColumnType {
    Int16,
    Int32,
    Int64,
    Float32,
    Float64,
    Bool,
    /// Text; `max_chars` is the declared length limit (varchar(n)), if any.
    Text { max_chars: Option<u32> },
    /// A UUID, travelling as its canonical lowercase text (36 characters):
    /// the text order of that form is the byte order of the UUID.
    Uuid,
    Json { binary: bool },
    /// Timestamp in microseconds; `utc` = with time zone.
    Timestamp { utc: bool },
    Vector { dim: u32 },
    HalfVec { dim: u32 },
}

impl ColumnType {
    pub fn is_vector(&self) -> bool {
        matches!(self, ColumnType::Vector { .. } | ColumnType::HalfVec { .. })
    }

    pub fn vector_dim(&self) -> Option<u32> {
        match self {
            ColumnType::Vector { dim } | ColumnType::HalfVec { dim } => Some(*dim),
            _ => None,
        }
    }

    pub fn arrow_type(&self) -> DataType {
        match self {
            ColumnType::Int16 => DataType::Int16,
            ColumnType::Int32 => DataType::Int32,
            ColumnType::Int64 => DataType::Int64,
            ColumnType::Float32 => DataType::Float32,
            ColumnType::Float64 => DataType::Float64,
            ColumnType::Bool => DataType::Boolean,
            ColumnType::Text { .. } | ColumnType::Uuid | ColumnType::Json { .. } => DataType::Utf8,
            ColumnType::Timestamp { utc } => {
                DataType::Timestamp(TimeUnit::Microsecond, utc.then(|| Arc::from("UTC")))
            }
            ColumnType::Vector { dim } | ColumnType::HalfVec { dim } => vector_arrow_type(*dim),
        }
    }
}

pub fn vector_item_field() -> Arc<Field> {
    Arc::new(Field::new("item", DataType::Float32, false))
}

pub fn vector_arrow_type(dim: u32) -> DataType {
    DataType::FixedSizeList(vector_item_field(), dim as i32)
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnSpec {
    pub name: String,
    #[serde(flatten)]
    pub ty: ColumnType,
    pub nullable: bool,
    /// Filled by the database when omitted: a sequence / AUTO_INCREMENT.
    #[serde(default)]
    pub auto_increment: bool,
    /// DEFAULT CURRENT_TIMESTAMP (FastGPT's createtime).
    #[serde(default)]
    pub default_now: bool,
}

/// Vector index metric, named as pgvector's opclasses / OceanBase distances / Milvus metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    InnerProduct,
    Cosine,
    L2,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum IndexKind {
    /// Ordinary (btree) index over `columns`.
    Btree { unique: bool },
    /// HNSW vector index over the single vector column.
    Hnsw {
        metric: Metric,
        m: u32,
        ef_construction: u32,
        /// OceanBase's quantised variants (`hnsw_sq`, `hnsw_bq`): "sq" or "bq".
        /// Targets without them build a plain HNSW index.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        quantization: Option<String>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexSpec {
    pub name: String,
    pub columns: Vec<String>,
    #[serde(flatten)]
    pub kind: IndexKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSpec {
    pub name: String,
    pub columns: Vec<ColumnSpec>,
    /// Single-column primary key: an integer (FastGPT's `id`) or a string
    /// (ordered by its UTF-8 bytes).
    pub primary_key: String,
    /// Secondary indexes (not the primary key).
    #[serde(default)]
    pub indexes: Vec<IndexSpec>,
    /// Fields the database computes from columns (Milvus functions): never
    /// read or written, declared again on a Milvus target vmig creates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub computed: Vec<ComputedField>,
    /// Milvus partition key: the column whose value picks a row's partition
    /// (hashed by Milvus), and how many partitions the collection has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_key: Option<PartitionKey>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionKey {
    pub column: String,
    pub partitions: u32,
}

/// A field a Milvus function computes from columns, e.g. FastGPT's
/// `modeldata_v2.sparse`: BM25 over `text` (function `text_bm25_emb`).
/// Kept as the source declared it, so a created target computes the same.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputedField {
    /// The output field.
    pub field: String,
    /// Milvus data type of the output, e.g. "SparseFloatVector".
    pub data_type: String,
    /// The function: its name, type ("BM25") and parameters.
    pub function: String,
    pub function_type: String,
    #[serde(default)]
    pub function_params: Vec<(String, String)>,
    /// Input columns, each with the Milvus type parameters the function
    /// needs on it (`enable_analyzer`, `analyzer_params`, `enable_match`).
    pub inputs: Vec<ComputedInput>,
    /// The index on the output field: name and parameters as described.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<(String, Vec<(String, String)>)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputedInput {
    pub column: String,
    #[serde(default)]
    pub params: Vec<(String, String)>,
}

impl ComputedField {
    /// "sparse (BM25 over text)".
    pub fn describe(&self) -> String {
        let inputs: Vec<&str> = self.inputs.iter().map(|i| i.column.as_str()).collect();
        format!("{} ({} over {})", self.field, self.function_type, inputs.join(", "))
    }

    /// The same function type over the same input columns into the same field.
    pub fn computes_same_as(&self, other: &ComputedField) -> bool {
        self.field == other.field
            && self.function_type == other.function_type
            && self.inputs.iter().map(|i| &i.column).eq(other.inputs.iter().map(|i| &i.column))
    }
}

impl TableSpec {
    pub fn column(&self, name: &str) -> Option<&ColumnSpec> {
        self.columns.iter().find(|c| c.name == name)
    }

    pub fn pk_index(&self) -> usize {
        self.columns
            .iter()
            .position(|c| c.name == self.primary_key)
            .expect("primary key is one of the columns")
    }

    pub fn vector_column(&self) -> Option<&ColumnSpec> {
        self.columns.iter().find(|c| c.ty.is_vector())
    }

    pub fn arrow_schema(&self) -> SchemaRef {
        Arc::new(Schema::new(
            self.columns
                .iter()
                .map(|c| Field::new(&c.name, c.ty.arrow_type(), c.nullable))
                .collect::<Vec<_>>(),
        ))
    }

    /// Checks the invariants the pipeline relies on, with a message a user can act on.
    pub fn validate(&self) -> anyhow::Result<()> {
        let pk = self.column(&self.primary_key).ok_or_else(|| {
            anyhow::anyhow!("table {}: primary key column {} not found", self.name, self.primary_key)
        })?;
        if !matches!(pk.ty, ColumnType::Int64 | ColumnType::Int32 | ColumnType::Int16 | ColumnType::Text { .. } | ColumnType::Uuid) {
            anyhow::bail!(
                "table {}: primary key {} must be an integer or string column",
                self.name,
                self.primary_key
            );
        }
        if self.vector_column().is_none() {
            anyhow::bail!("table {}: no vector column found", self.name);
        }
        Ok(())
    }

    /// Column names of `self` in the order of `other`'s columns (for comparing
    /// two tables that hold the same data). Errors on a missing column.
    pub fn same_columns_as(&self, other: &TableSpec) -> anyhow::Result<()> {
        for c in &other.columns {
            let mine = self.column(&c.name).ok_or_else(|| {
                anyhow::anyhow!("target table {} has no column {}", self.name, c.name)
            })?;
            let compatible = match (&c.ty, &mine.ty) {
                (a, b) if a == b => true,
                (ColumnType::Text { .. }, ColumnType::Text { .. }) => true,
                // Text into a uuid column: rows not in canonical form are rejected.
                (ColumnType::Text { .. } | ColumnType::Uuid, ColumnType::Text { .. } | ColumnType::Uuid) => true,
                (ColumnType::Json { .. }, ColumnType::Json { .. }) => true,
                (a, b) if a.is_vector() && b.is_vector() => a.vector_dim() == b.vector_dim(),
                (ColumnType::Timestamp { .. }, ColumnType::Timestamp { .. }) => true,
                // Widening is exact (Milvus keys are Int64; SQL keys may be integer).
                (ColumnType::Int16 | ColumnType::Int32, ColumnType::Int64) | (ColumnType::Int16, ColumnType::Int32) => true,
                _ => false,
            };
            if !compatible {
                anyhow::bail!(
                    "column {}: source type {:?} cannot be written to target type {:?}",
                    c.name,
                    c.ty,
                    mine.ty
                );
            }
        }
        Ok(())
    }
}

/// "4GB", "512MB", "1.5 GiB", "800kB", "1048576": bytes (units are powers of 1024, as PostgreSQL reads them).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{text:?} is not a size like 4GB or 512MB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("{text:?}: unknown unit {other:?} (use kB, MB, GB or TB)")),
    };
    Ok((n * mult as f64) as u64)
}

#[cfg(test)]
mod size_tests {
    #[test]
    fn sizes_read_as_postgresql_reads_them() {
        assert_eq!(super::parse_size("4GB"), Ok(4 << 30));
        assert_eq!(super::parse_size("1.5 GiB"), Ok(3 << 29));
        assert_eq!(super::parse_size("800kB"), Ok(800 << 10));
        assert_eq!(super::parse_size("1048576"), Ok(1 << 20));
        assert!(super::parse_size("lots").is_err());
    }
}

pub fn estimate_row_bytes(spec: &TableSpec) -> usize {
    spec.columns
        .iter()
        .map(|c| match c.ty.vector_dim() {
            Some(d) => d as usize * 4,
            None => 64,
        })
        .sum()
}
