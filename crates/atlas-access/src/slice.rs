//! One patient's rows of a view table, read without planning a query.
//!
//! The most common read of a clinical API is one patient's timeline. View
//! files are clustered by patient key (see `atlas-viewstore`'s `cluster`),
//! so a patient's rows sit in one row group and a page or two per column.
//! A [`SliceIndex`] keeps, per table snapshot, each file's Parquet footer
//! and page index decoded in memory and its deletion vector loaded; reading
//! a slice then costs the few page reads and nothing else: no footer parse,
//! no logical or physical planning.
//!
//! The slice is only a *prefetch*: it returns every live row whose patient
//! column equals the patient (a superset of what the query selects, never
//! less), and `query::run` evaluates the very same policy scope, set
//! predicate, narrowing and keyset expressions on it as the DataFusion path
//! does, so both paths answer identically (`objects.rs` tests compare them).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arrow::array::{Array, ArrayRef, RecordBatch, StringArray};
use arrow::compute::{cast, concat_batches};
use arrow::datatypes::{DataType, SchemaRef};
use deltalake::DeltaTable;
use futures::TryStreamExt;
use object_store::ObjectStore;
use object_store::path::Path;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::statistics::StatisticsConverter;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, RowSelection, RowSelector,
};
#[allow(deprecated)]
use parquet::arrow::async_reader::{
    AsyncFileReader, ParquetObjectReader, ParquetRecordBatchStreamBuilder,
};
use roaring::RoaringTreemap;

/// Snapshots kept before the cache is emptied.
const MAX_INDEXES: usize = 64;

/// A live file of a snapshot, with what a slice read needs decoded.
struct SliceFile {
    path: Path,
    size: u64,
    /// The open file when the lake is on local disk: page reads are then
    /// positional reads from the page cache on the calling thread, not
    /// object-store requests handed to the blocking pool (a thread hop per
    /// column chunk, which is what made the latency tail).
    local: Option<Arc<std::fs::File>>,
    meta: ArrowReaderMetadata,
    /// Rows removed by the file's deletion vector.
    deleted: Option<RoaringTreemap>,
    /// Position of each row group's first row in the file.
    first_row: Vec<u64>,
}

/// The live files of one view table snapshot, ready for slice reads.
pub struct SliceIndex {
    store: Arc<dyn ObjectStore>,
    files: Vec<SliceFile>,
    schema: SchemaRef,
}

/// Why a table has no slice index; the query takes the general path.
pub type Unsliceable = String;

/// A snapshot's slice index, or why it has none (cached either way).
pub type CachedSlices = Arc<Result<SliceIndex, Unsliceable>>;

impl SliceIndex {
    /// Loads every live file's footer and page index and its deletion
    /// vector. `Err` when the table is not laid out for slices (partition
    /// columns, files with differing schemas).
    pub async fn load(table: &DeltaTable) -> Result<SliceIndex, Unsliceable> {
        let snapshot = table.snapshot().map_err(|e| e.to_string())?;
        if !snapshot.metadata().partition_columns().is_empty() {
            return Err("partitioned table".into());
        }
        let store = table.object_store();
        let local_root = (table.table_url().scheme() == "file")
            .then(|| table.table_url().to_file_path().ok())
            .flatten();
        let mut files = Vec::new();
        let mut schema: Option<SchemaRef> = None;
        for f in snapshot.log_data().iter() {
            let path = f.object_store_path();
            #[allow(deprecated)]
            let mut reader = ParquetObjectReader::new(store.clone(), path.clone())
                .with_file_size(f.size().max(0) as u64);
            let meta = ArrowReaderMetadata::load_async(
                &mut reader,
                ArrowReaderOptions::new()
                    .with_page_index_policy(parquet::file::metadata::PageIndexPolicy::Optional),
            )
            .await
            .map_err(|e| format!("{path}: {e}"))?;
            match &schema {
                None => schema = Some(meta.schema().clone()),
                Some(s) if s.fields() == meta.schema().fields() => {}
                Some(_) => return Err(format!("{path}: schema differs from other files")),
            }
            let deleted = match f.deletion_vector_descriptor() {
                Some(dv) => Some(
                    atlas_viewstore::deleted_rows(table, path.as_ref(), &dv)
                        .await
                        .map_err(|e| e.to_string())?,
                ),
                None => None,
            };
            let mut first_row = Vec::new();
            let mut at = 0u64;
            for rg in meta.metadata().row_groups() {
                first_row.push(at);
                at += rg.num_rows().max(0) as u64;
            }
            let local = local_root
                .as_ref()
                .and_then(|root| std::fs::File::open(root.join(path.as_ref())).ok())
                .map(Arc::new);
            files.push(SliceFile {
                path,
                size: f.size().max(0) as u64,
                local,
                meta,
                deleted,
                first_row,
            });
        }
        let schema = schema.unwrap_or_else(|| Arc::new(arrow::datatypes::Schema::empty()));
        Ok(SliceIndex {
            store,
            files,
            schema,
        })
    }

    /// The files' Arrow schema.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Every live row whose `column` equals `key`, all columns, in one
    /// batch (`None` when the column is missing or not a string).
    pub async fn read(&self, column: &str, key: &str) -> Result<Option<RecordBatch>, String> {
        let Ok(field) = self.schema.field_with_name(column) else {
            return Ok(None);
        };
        if !matches!(
            field.data_type(),
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
        ) {
            return Ok(None);
        }
        let col_idx = self.schema.index_of(column).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for f in &self.files {
            if let Some(b) = self.read_file(f, column, col_idx, key).await? {
                out.push(b);
            }
        }
        concat_batches(&self.schema, &out)
            .map(Some)
            .map_err(|e| e.to_string())
    }

    async fn read_file(
        &self,
        f: &SliceFile,
        column: &str,
        col_idx: usize,
        key: &str,
    ) -> Result<Option<RecordBatch>, String> {
        let md = f.meta.metadata();
        let conv = StatisticsConverter::try_new(column, f.meta.schema(), f.meta.parquet_schema())
            .map_err(|e| e.to_string())?;
        let rg_meta = md.row_groups();
        let mins = strings(
            &conv
                .row_group_mins(rg_meta.iter())
                .map_err(|e| e.to_string())?,
        );
        let maxes = strings(
            &conv
                .row_group_maxes(rg_meta.iter())
                .map_err(|e| e.to_string())?,
        );
        let groups: Vec<usize> = (0..rg_meta.len())
            .filter(|&i| may_contain(mins.get(i), maxes.get(i), key))
            .collect();
        if groups.is_empty() {
            return Ok(None);
        }
        // Pages of the key column that may hold the key, as a selection over
        // the chosen row groups; absolute row positions kept for the
        // deletion vector.
        let mut selectors = Vec::new();
        // Selected runs: (first row in the file, first row among the chosen
        // row groups, rows).
        let mut positions: Vec<(u64, u64, u64)> = Vec::new();
        let mut space = 0u64;
        for &rg in &groups {
            let rg_rows = rg_meta[rg].num_rows().max(0) as u64;
            let pages = match (md.column_index(), md.offset_index()) {
                (Some(ci), Some(oi)) => {
                    let pmins = conv.data_page_mins(ci, oi, [&rg]).ok().map(|a| strings(&a));
                    let pmaxes = conv
                        .data_page_maxes(ci, oi, [&rg])
                        .ok()
                        .map(|a| strings(&a));
                    let counts = conv.data_page_row_counts(oi, rg_meta, [&rg]).ok().flatten();
                    match (pmins, pmaxes, counts) {
                        (Some(a), Some(b), Some(c)) if a.len() == c.len() && b.len() == c.len() => {
                            Some((a, b, c))
                        }
                        _ => None,
                    }
                }
                _ => None,
            };
            match pages {
                Some((pmins, pmaxes, counts)) => {
                    let mut at = 0u64;
                    for p in 0..counts.len() {
                        let n = counts.value(p);
                        if may_contain(pmins.get(p), pmaxes.get(p), key) {
                            selectors.push(RowSelector::select(n as usize));
                            positions.push((f.first_row[rg] + at, space + at, n));
                        } else {
                            selectors.push(RowSelector::skip(n as usize));
                        }
                        at += n;
                    }
                }
                None => {
                    selectors.push(RowSelector::select(rg_rows as usize));
                    positions.push((f.first_row[rg], space, rg_rows));
                }
            }
            space += rg_rows;
        }
        if positions.is_empty() {
            return Ok(None);
        }
        // Two passes: the key column alone over the candidate pages gives
        // the exact live rows of the key; then every column is decoded for
        // those rows only (a page holds ~2,048 rows, a patient far fewer).
        let key_only = ProjectionMask::roots(f.meta.parquet_schema(), [col_idx]);
        let keys = self
            .read_rows(f, &groups, selectors, Some(key_only))
            .await?;
        let mut exact: Vec<RowSelector> = Vec::new();
        let mut cursor = 0u64; // position among the chosen row groups
        let mut runs = positions
            .iter()
            .flat_map(|&(file_at, space_at, n)| (0..n).map(move |i| (file_at + i, space_at + i)));
        let mut found = 0usize;
        for b in &keys {
            let k = cast(b.column(0), &DataType::Utf8).map_err(|e| e.to_string())?;
            let k = k
                .as_any()
                .downcast_ref::<StringArray>()
                .ok_or("key column is not a string")?;
            for i in 0..k.len() {
                let Some((file_at, space_at)) = runs.next() else {
                    return Err(format!("{}: more key rows than selected", f.path));
                };
                let live = f.deleted.as_ref().is_none_or(|d| !d.contains(file_at));
                if live && k.is_valid(i) && k.value(i) == key {
                    if space_at > cursor {
                        exact.push(RowSelector::skip((space_at - cursor) as usize));
                    }
                    exact.push(RowSelector::select(1));
                    cursor = space_at + 1;
                    found += 1;
                }
            }
        }
        if found == 0 {
            return Ok(None);
        }
        if cursor < space {
            exact.push(RowSelector::skip((space - cursor) as usize));
        }
        let batches = self.read_rows(f, &groups, exact, None).await?;
        let batch = concat_batches(f.meta.schema(), &batches).map_err(|e| e.to_string())?;
        if batch.num_rows() != found {
            return Err(format!(
                "{}: read {} rows for {found} selected",
                f.path,
                batch.num_rows()
            ));
        }
        Ok(Some(batch))
    }

    /// The `selection` of rows of `groups` (all columns, or `projection`).
    async fn read_rows(
        &self,
        f: &SliceFile,
        groups: &[usize],
        selection: Vec<RowSelector>,
        projection: Option<ProjectionMask>,
    ) -> Result<Vec<RecordBatch>, String> {
        let reader: Box<dyn AsyncFileReader> = match &f.local {
            Some(file) => Box::new(LocalReader {
                file: file.clone(),
                meta: f.meta.metadata().clone(),
            }),
            #[allow(deprecated)]
            None => Box::new(
                ParquetObjectReader::new(self.store.clone(), f.path.clone()).with_file_size(f.size),
            ),
        };
        let mut builder =
            ParquetRecordBatchStreamBuilder::new_with_metadata(reader, f.meta.clone())
                .with_row_groups(groups.to_vec())
                .with_row_selection(RowSelection::from(selection))
                .with_batch_size(8192);
        if let Some(p) = projection {
            builder = builder.with_projection(p);
        }
        builder
            .build()
            .map_err(|e| format!("{}: {e}", f.path))?
            .try_collect()
            .await
            .map_err(|e| format!("{}: {e}", f.path))
    }
}

/// Positional reads of a local file whose metadata is already decoded.
struct LocalReader {
    file: Arc<std::fs::File>,
    meta: Arc<parquet::file::metadata::ParquetMetaData>,
}

impl AsyncFileReader for LocalReader {
    fn get_bytes(
        &mut self,
        range: std::ops::Range<u64>,
    ) -> futures::future::BoxFuture<'_, parquet::errors::Result<bytes::Bytes>> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        let read = self
            .file
            .read_exact_at(&mut buf, range.start)
            .map(|_| bytes::Bytes::from(buf))
            .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)));
        Box::pin(futures::future::ready(read))
    }

    fn get_metadata<'a>(
        &'a mut self,
        _options: Option<&'a ArrowReaderOptions>,
    ) -> futures::future::BoxFuture<
        'a,
        parquet::errors::Result<Arc<parquet::file::metadata::ParquetMetaData>>,
    > {
        Box::pin(futures::future::ready(Ok(self.meta.clone())))
    }
}

/// Statistics as optional strings (whatever string encoding they have).
fn strings(a: &ArrayRef) -> Vec<Option<String>> {
    let Ok(a) = cast(a, &DataType::Utf8) else {
        return vec![None; a.len()];
    };
    let Some(s) = a.as_any().downcast_ref::<StringArray>() else {
        return vec![None; a.len()];
    };
    (0..s.len())
        .map(|i| s.is_valid(i).then(|| s.value(i).to_owned()))
        .collect()
}

/// Whether a range with these (possibly unknown) bounds may hold `key`.
fn may_contain(min: Option<&Option<String>>, max: Option<&Option<String>>, key: &str) -> bool {
    let lo_ok = match min.and_then(|m| m.as_deref()) {
        Some(m) => m <= key,
        None => true,
    };
    let hi_ok = match max.and_then(|m| m.as_deref()) {
        Some(m) => key <= m,
        None => true,
    };
    lo_ok && hi_ok
}

/// Slice indexes per (table dir, version), built on first use.
#[derive(Default)]
pub struct SliceCache {
    indexes: Mutex<HashMap<(String, u64), CachedSlices>>,
}

impl SliceCache {
    pub fn get(&self, dir: &str, version: u64) -> Option<CachedSlices> {
        self.indexes
            .lock()
            .ok()
            .and_then(|m| m.get(&(dir.to_owned(), version)).cloned())
    }

    pub fn put(
        &self,
        dir: &str,
        version: u64,
        index: Result<SliceIndex, Unsliceable>,
    ) -> CachedSlices {
        let index = Arc::new(index);
        if let Ok(mut m) = self.indexes.lock() {
            if m.len() >= MAX_INDEXES {
                m.clear();
            }
            m.insert((dir.to_owned(), version), index.clone());
        }
        index
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{Field, Schema};
    use parquet::arrow::ArrowWriter;
    use parquet::file::properties::{EnabledStatistics, WriterProperties};

    /// A file of tiny row groups (50 rows) and pages (~8 rows), keys sorted
    /// with runs that cross page and row-group boundaries, and some rows
    /// deleted: a slice read of every key (and of absent keys) returns
    /// exactly the live rows of that key, in file order.
    #[tokio::test]
    async fn slices_are_exact_across_pages_row_groups_and_deletes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut keys: Vec<Option<String>> = Vec::new();
        for k in 0..40 {
            // Run lengths 1..=29, and a few nulls first.
            let run = 1 + (k * 7) % 29;
            for _ in 0..run {
                keys.push(Some(format!("p{k:03}")));
            }
        }
        for _ in 0..5 {
            keys.insert(0, None);
        }
        let n = keys.len();
        let schema = Arc::new(Schema::new(vec![
            Field::new("patient_id", DataType::Utf8, true),
            Field::new("n", DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(keys.clone())),
                Arc::new(Int64Array::from_iter_values(0..n as i64)),
            ],
        )
        .expect("batch");
        let props = WriterProperties::builder()
            .set_max_row_group_row_count(Some(50))
            .set_data_page_row_count_limit(8)
            .set_write_batch_size(4)
            .set_statistics_enabled(EnabledStatistics::Page)
            .build();
        let path = dir.path().join("f.parquet");
        let mut w = ArrowWriter::try_new(
            std::fs::File::create(&path).expect("create"),
            schema.clone(),
            Some(props),
        )
        .expect("writer");
        w.write(&batch).expect("write");
        w.close().expect("close");
        let size = std::fs::metadata(&path).expect("size").len();
        let store: Arc<dyn ObjectStore> = Arc::new(
            object_store::local::LocalFileSystem::new_with_prefix(dir.path()).expect("store"),
        );
        #[allow(deprecated)]
        let mut reader =
            ParquetObjectReader::new(store.clone(), Path::from("f.parquet")).with_file_size(size);
        let meta = ArrowReaderMetadata::load_async(
            &mut reader,
            ArrowReaderOptions::new()
                .with_page_index_policy(parquet::file::metadata::PageIndexPolicy::Optional),
        )
        .await
        .expect("metadata");
        assert!(meta.metadata().num_row_groups() > 5);
        assert!(meta.metadata().offset_index().is_some());
        let deleted: RoaringTreemap = (0..n as u64).filter(|i| i % 5 == 3).collect();
        let mut first_row = Vec::new();
        let mut at = 0;
        for rg in meta.metadata().row_groups() {
            first_row.push(at);
            at += rg.num_rows() as u64;
        }
        // Through the object store, and through the local-file reader.
        for local in [false, true] {
            let index = SliceIndex {
                store: store.clone(),
                schema: meta.schema().clone(),
                files: vec![SliceFile {
                    path: Path::from("f.parquet"),
                    size,
                    local: local.then(|| Arc::new(std::fs::File::open(&path).expect("open"))),
                    meta: meta.clone(),
                    deleted: Some(deleted.clone()),
                    first_row: first_row.clone(),
                }],
            };
            for k in (0..42).map(|k| format!("p{k:03}")) {
                let want: Vec<i64> = (0..n)
                    .filter(|&i| {
                        keys[i].as_deref() == Some(k.as_str()) && !deleted.contains(i as u64)
                    })
                    .map(|i| i as i64)
                    .collect();
                let got: Vec<i64> = match index.read("patient_id", &k).await.expect("read") {
                    Some(b) => b
                        .column(1)
                        .as_any()
                        .downcast_ref::<Int64Array>()
                        .expect("n")
                        .values()
                        .to_vec(),
                    None => Vec::new(),
                };
                assert_eq!(got, want, "key {k} (local: {local})");
            }
        }
    }
}
