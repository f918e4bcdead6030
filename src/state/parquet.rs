//! Parquet files written into a state store: zstd, vector columns
//! BYTE_STREAM_SPLIT without dictionary (chunks, change files, rejects).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

use crate::model::schema::TableSpec;
use crate::state::store::{Store, StoreWriter};

const ROW_GROUP_ROWS: usize = 4096;

/// Writer properties: zstd, vector leaf BYTE_STREAM_SPLIT without dictionary.
pub fn writer_properties(spec: &TableSpec) -> Result<WriterProperties> {
    writer_properties_for(spec, &spec.arrow_schema())
}

/// Writer properties for a file of `schema` whose columns include `spec`'s.
pub fn writer_properties_for(spec: &TableSpec, schema: &arrow::datatypes::Schema) -> Result<WriterProperties> {
    let mut b = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3)?))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS));
    let parquet_schema = parquet::arrow::ArrowSchemaConverter::new().convert(schema)?;
    for col in parquet_schema.columns() {
        let path = col.path();
        if spec.column(&path.parts()[0]).is_some_and(|c| c.ty.is_vector()) {
            b = b
                .set_column_dictionary_enabled(ColumnPath::new(path.parts().to_vec()), false)
                .set_column_encoding(ColumnPath::new(path.parts().to_vec()), Encoding::BYTE_STREAM_SPLIT);
        }
    }
    Ok(b.build())
}

/// Writes Parquet files of `spec`'s schema (chunks, change files, rejects).
pub struct ParquetFileWriter {
    name: String,
    writer: ArrowWriter<StoreWriter>,
}

impl ParquetFileWriter {
    /// A local file, written aside and renamed into place by `finish`.
    pub fn create(dest: PathBuf, schema: arrow::datatypes::SchemaRef, props: WriterProperties) -> Result<Self> {
        let dir = dest.parent().unwrap_or(Path::new("."));
        let file = dest.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default();
        ParquetFileWriter::create_in(&Store::open(&dir.to_string_lossy())?, &file, schema, props)
    }

    /// An object `key` of `store` (a multipart upload when remote).
    pub fn create_in(store: &Store, key: &str, schema: arrow::datatypes::SchemaRef, props: WriterProperties) -> Result<Self> {
        let writer = ArrowWriter::try_new(store.writer(key)?, schema, Some(props))?;
        Ok(ParquetFileWriter { name: format!("{}/{key}", store.describe().trim_end_matches('/')), writer })
    }

    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        self.writer.write(batch).with_context(|| format!("writing {}", self.name))
    }

    /// Finishes the file durably under its final name; returns (bytes, sha256).
    pub fn finish(self) -> Result<(u64, String)> {
        let inner = self.writer.into_inner().with_context(|| format!("writing {}", self.name))?;
        inner.finish()
    }
}
