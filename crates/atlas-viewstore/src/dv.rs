//! Deletion vectors for view tables (Delta protocol `deletionVectors`).
//!
//! An incremental refresh marks the rows of changed or deleted resources as
//! deleted in the files that hold them, instead of rewriting those files:
//! one small `deletion_vector_<uuid>.bin` per refresh commit, holding one
//! RoaringTreemap per touched file, named by `storageType: "u"` descriptors.
//! Writing and reading the file format is delta-kernel's (the same code
//! delta-rs and DuckDB's delta extension read with), so what Atlas writes is
//! what every reader expects. This module may call delta-rs and its kernel,
//! nothing else of Atlas.

use delta_kernel::actions::deletion_vector_writer::{
    KernelDeletionVector, StreamingDeletionVectorWriter,
};
use deltalake::DeltaTable;
use deltalake::kernel::{DeletionVectorDescriptor, StorageType};
use object_store::ObjectStoreExt as _;
use roaring::RoaringTreemap;

use crate::ViewStoreError;

/// Whether the table's protocol lets writers add deletion vectors (tables
/// made by Atlas before it wrote them do not: those keep copy-on-write).
pub(crate) fn enabled(table: &DeltaTable) -> bool {
    table.snapshot().is_ok_and(|s| {
        let p = s.protocol();
        p.min_reader_version() >= 3
            && p.min_writer_version() >= 7
            && p.reader_features().is_some_and(|f| {
                f.iter()
                    .any(|f| f == &delta_kernel::table_features::TableFeature::DeletionVectors)
            })
    })
}

/// The row positions a file's current deletion vector removes.
pub(crate) async fn read(
    table: &DeltaTable,
    file: &str,
    dv: &DeletionVectorDescriptor,
) -> Result<RoaringTreemap, ViewStoreError> {
    let err = |message: String| ViewStoreError::Read {
        file: format!("{file} (deletion vector)"),
        message,
    };
    let descriptor: delta_kernel::actions::deletion_vector::DeletionVectorDescriptor =
        dv.clone().try_into().map_err(|e| err(format!("{e}")))?;
    let engine = table.log_store().engine(None);
    let mut root = table.table_url().clone();
    if !root.path().ends_with('/') {
        root.set_path(&format!("{}/", root.path()));
    }
    // The kernel's storage handler blocks on its own runtime: run it off
    // the async workers.
    tokio::task::spawn_blocking(move || descriptor.read(engine.storage_handler(), &root))
        .await
        .map_err(|e| err(format!("reader task: {e}")))?
        .map_err(|e| err(format!("{e}")))
}

/// Writes one deletion-vector file holding `vectors` (in order) at the
/// table root and returns a descriptor per vector. Nothing refers to the
/// file until the commit that uses the descriptors lands; a killed refresh
/// leaves at most an unreferenced file, which `vacuum` removes.
pub(crate) async fn write(
    table: &DeltaTable,
    vectors: &[RoaringTreemap],
) -> Result<Vec<DeletionVectorDescriptor>, ViewStoreError> {
    let uuid = uuid::Uuid::new_v4();
    let name = format!("deletion_vector_{uuid}.bin");
    let err = |source: delta_kernel::Error| ViewStoreError::DeletionVector {
        table: table.table_url().to_string(),
        file: name.clone(),
        source: Box::new(source),
    };
    let mut bytes = Vec::new();
    let mut written = Vec::with_capacity(vectors.len());
    {
        let mut writer = StreamingDeletionVectorWriter::new(&mut bytes);
        for v in vectors {
            let mut dv = KernelDeletionVector::new();
            dv.add_deleted_row_indexes(v.iter());
            written.push(writer.write_deletion_vector(dv).map_err(err)?);
        }
        writer.finalize().map_err(err)?;
    }
    table
        .object_store()
        .put(
            &object_store::path::Path::from(name.as_str()),
            bytes::Bytes::from(bytes).into(),
        )
        .await
        .map_err(|source| ViewStoreError::Store {
            path: format!(
                "{}/{name}",
                table.table_url().as_str().trim_end_matches('/')
            ),
            source,
        })?;
    let encoded = z85::encode(uuid.as_bytes());
    Ok(written
        .into_iter()
        .map(|w| DeletionVectorDescriptor {
            storage_type: StorageType::UuidRelativePath,
            path_or_inline_dv: encoded.clone(),
            offset: Some(w.offset),
            size_in_bytes: w.size_in_bytes,
            cardinality: w.cardinality,
        })
        .collect())
}

/// Stats of a file that now has a deletion vector: `numRecords` stays the
/// physical count, and the bounds are no longer tight (the protocol's
/// `tightBounds: false`), which keeps data skipping correct.
pub(crate) fn loosen_stats(stats: Option<&str>) -> Option<String> {
    let mut v: serde_json::Value = serde_json::from_str(stats?).ok()?;
    v.as_object_mut()?
        .insert("tightBounds".into(), serde_json::Value::Bool(false));
    Some(v.to_string())
}

/// Rows a file holds after its deletion vector.
pub(crate) fn live_rows(num_records: Option<usize>, dv: Option<&DeletionVectorDescriptor>) -> u64 {
    let n = num_records.unwrap_or(0) as u64;
    n.saturating_sub(dv.map_or(0, |d| d.cardinality.max(0) as u64))
}
