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

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, StringArray};
use arrow::compute::{cast, concat_batches, filter_record_batch};
use arrow::datatypes::{DataType, SchemaRef};
use deltalake::DeltaTable;
use futures::TryStreamExt;
use object_store::ObjectStore;
use object_store::path::Path;
use parquet::arrow::arrow_reader::statistics::StatisticsConverter;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, RowSelection, RowSelector,
};
#[allow(deprecated)]
use parquet::arrow::async_reader::{ParquetObjectReader, ParquetRecordBatchStreamBuilder};
use roaring::RoaringTreemap;

/// Snapshots kept before the cache is emptied.
const MAX_INDEXES: usize = 64;

/// A live file of a snapshot, with what a slice read needs decoded.
struct SliceFile {
    path: Path,
    size: u64,
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
pub(crate) type Unsliceable = String;

/// A snapshot's slice index, or why it has none (cached either way).
pub(crate) type CachedSlices = Arc<Result<SliceIndex, Unsliceable>>;

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
            files.push(SliceFile {
                path,
                size: f.size().max(0) as u64,
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
        let mut positions: Vec<(u64, u64)> = Vec::new(); // (first row, rows) selected
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
                    let mut at = f.first_row[rg];
                    for p in 0..counts.len() {
                        let n = counts.value(p);
                        if may_contain(pmins.get(p), pmaxes.get(p), key) {
                            selectors.push(RowSelector::select(n as usize));
                            positions.push((at, n));
                        } else {
                            selectors.push(RowSelector::skip(n as usize));
                        }
                        at += n;
                    }
                }
                None => {
                    selectors.push(RowSelector::select(rg_rows as usize));
                    positions.push((f.first_row[rg], rg_rows));
                }
            }
        }
        if positions.is_empty() {
            return Ok(None);
        }
        #[allow(deprecated)]
        let reader =
            ParquetObjectReader::new(self.store.clone(), f.path.clone()).with_file_size(f.size);
        let stream = ParquetRecordBatchStreamBuilder::new_with_metadata(reader, f.meta.clone())
            .with_row_groups(groups)
            .with_row_selection(RowSelection::from(selectors))
            .with_batch_size(8192)
            .build()
            .map_err(|e| format!("{}: {e}", f.path))?;
        let batches: Vec<RecordBatch> = stream
            .try_collect()
            .await
            .map_err(|e| format!("{}: {e}", f.path))?;
        let batch = concat_batches(f.meta.schema(), &batches).map_err(|e| e.to_string())?;
        let keys = cast(batch.column(col_idx), &DataType::Utf8).map_err(|e| e.to_string())?;
        let keys = keys
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or("key column is not a string")?;
        let mut row_positions = positions.iter().flat_map(|&(s, n)| s..s + n);
        let keep: BooleanArray = (0..batch.num_rows())
            .map(|i| {
                let pos = row_positions.next();
                let live = match (&f.deleted, pos) {
                    (Some(d), Some(p)) => !d.contains(p),
                    _ => true,
                };
                Some(live && keys.is_valid(i) && keys.value(i) == key)
            })
            .collect();
        let batch = filter_record_batch(&batch, &keep).map_err(|e| e.to_string())?;
        Ok((batch.num_rows() > 0).then_some(batch))
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
pub(crate) struct SliceCache {
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
