//! Arrow schemas of the lake's Delta tables. Column names are a public
//! contract: DuckDB, Spark and later Atlas crates read them by name.

use std::sync::{Arc, LazyLock};

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

fn ts() -> DataType {
    // UTC instants, not timestamp_ntz, so older Spark and Delta readers can read them.
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// The resource store: one row per (resource_type, id), the latest version.
pub static RESOURCES: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("resource_type", DataType::Utf8, false),
        Field::new("id", DataType::Utf8, false),
        Field::new("version_id", DataType::Utf8, true),
        Field::new("last_updated", ts(), true),
        Field::new("patient_id", DataType::Utf8, true),
        Field::new("fhir_version", DataType::Utf8, false),
        Field::new("is_synthetic", DataType::Boolean, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("batch_id", DataType::Utf8, false),
        Field::new("file", DataType::Utf8, false),
        Field::new("line", DataType::Int64, false),
        Field::new("ingested_at", ts(), false),
        Field::new("deleted", DataType::Boolean, false),
        Field::new("content_hash", DataType::Utf8, false),
        Field::new(
            "identifiers",
            DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
            true,
        ),
        Field::new("resource", DataType::Utf8, true),
    ]))
});

/// Rejected lines, with enough to find and fix them.
pub static QUARANTINE: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("batch_id", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("file", DataType::Utf8, false),
        Field::new("line", DataType::Int64, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("message", DataType::Utf8, false),
        Field::new("resource_type", DataType::Utf8, true),
        Field::new("resource_id", DataType::Utf8, true),
        Field::new("field", DataType::Utf8, true),
        Field::new("byte_len", DataType::Int64, false),
        Field::new("prefix", DataType::Binary, false),
        Field::new("quarantined_at", ts(), false),
    ]))
});

/// One row per completed batch: the batch's manifest in table form.
pub static BATCHES: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("batch_id", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("raw_path", DataType::Utf8, false),
        Field::new("started_at", ts(), false),
        Field::new("finished_at", ts(), false),
        Field::new("inputs", DataType::Utf8, false),
        Field::new("bytes", DataType::Int64, false),
        Field::new("lines_read", DataType::Int64, false),
        Field::new("stored", DataType::Int64, false),
        Field::new("unchanged", DataType::Int64, false),
        // Lines older than the stored copy (`older_than_stored` in reports
        // and `stats`); the column keeps its first name so that every lake,
        // old or new, has one schema.
        Field::new("superseded", DataType::Int64, false),
        Field::new("quarantined", DataType::Int64, false),
        Field::new("skipped", DataType::Int64, false),
        Field::new("deleted", DataType::Int64, false),
        Field::new("unresolved_references", DataType::Int64, false),
        Field::new("outcome", DataType::Utf8, false),
    ]))
});
