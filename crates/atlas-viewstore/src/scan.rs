//! Reading the resource store's Parquet files directly: the live files of
//! one resource type, the files written since a store version (from the
//! Delta log), and their rows as `(id, deleted, resource)` chunks.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{Array, BooleanArray, RecordBatch, StringArray};
use atlas_lake::Lake;
use deltalake::DeltaTable;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ArrowPredicateFn, ArrowReaderOptions};
#[allow(deprecated)] // the replacement (`SpawnedReader`) is not released yet
use parquet::arrow::async_reader::{ParquetObjectReader, ParquetRecordBatchStreamBuilder};

use crate::ViewStoreError;

/// Which rows of a store file count as changed.
#[derive(Debug, Clone)]
pub(crate) enum RowFilter {
    All,
    /// Rows whose `batch_id` is one of these (rows a MERGE only copied keep
    /// their older batch id).
    Batches(Arc<HashSet<String>>),
}

/// A Parquet file of the resource store, relative to the table root.
#[derive(Debug, Clone)]
pub(crate) struct StoreFile {
    pub path: Path,
    pub size: u64,
    pub rows: u64,
    pub filter: RowFilter,
}

/// Rows read from the store (only the selected ones: the row filter ran in
/// the Parquet reader).
pub(crate) struct StoreChunk {
    pub ids: StringArray,
    pub deleted: BooleanArray,
    pub resources: StringArray,
    pub file: String,
}

fn delta_err(e: deltalake::DeltaTableError) -> ViewStoreError {
    ViewStoreError::Delta {
        table: atlas_lake::lake::RESOURCES.into(),
        source: Box::new(e),
    }
}

/// The live files of `resource_type` (the store is partitioned by type).
pub(crate) fn live_files(
    store: &DeltaTable,
    resource_type: &str,
) -> Result<Vec<StoreFile>, ViewStoreError> {
    let snapshot = store.snapshot().map_err(delta_err)?;
    let mut out = Vec::new();
    for f in snapshot.log_data().iter() {
        let pv = f.partition_values_map();
        if pv.get("resource_type").and_then(|v| v.as_deref()) != Some(resource_type) {
            continue;
        }
        out.push(StoreFile {
            path: f.object_store_path(),
            size: f.size().max(0) as u64,
            rows: f.num_records().unwrap_or(0) as u64,
            filter: RowFilter::All,
        });
    }
    Ok(out)
}

/// The live files of `resource_type` added by store commits `since+1 ..= until`,
/// each with the filter that picks the rows those commits changed. `None`
/// when part of that log is gone (cleaned up): the caller rebuilds in full.
pub(crate) async fn changed_files(
    lake: &Lake,
    store: &DeltaTable,
    resource_type: &str,
    since: i64,
    until: i64,
) -> Result<Option<Vec<StoreFile>>, ViewStoreError> {
    let live: HashMap<String, StoreFile> = live_files(store, resource_type)?
        .into_iter()
        .map(|f| (f.path.to_string(), f))
        .collect();
    let object_store = lake.object_store();
    let mut batches = HashSet::new();
    let mut added: Vec<(String, bool)> = Vec::new();
    for v in since + 1..=until {
        let log = lake.path(&format!(
            "tables/{}/_delta_log/{v:020}.json",
            atlas_lake::lake::RESOURCES
        ));
        let bytes = match object_store.get(&log).await {
            Ok(r) => r.bytes().await,
            Err(e) => Err(e),
        };
        let bytes = match bytes {
            Ok(b) => b,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => {
                return Err(ViewStoreError::Read {
                    file: log.to_string(),
                    message: e.to_string(),
                });
            }
        };
        let mut batch = None;
        let mut paths = Vec::new();
        for line in bytes.split(|b| *b == b'\n') {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let action: serde_json::Value =
                serde_json::from_slice(line).map_err(|e| ViewStoreError::Read {
                    file: log.to_string(),
                    message: format!("not a Delta log line: {e}"),
                })?;
            if let Some(info) = action.get("commitInfo") {
                batch = info
                    .get("atlas.batch_id")
                    .and_then(|b| b.as_str())
                    .map(str::to_owned);
            } else if let Some(add) = action.get("add") {
                let ty = add
                    .get("partitionValues")
                    .and_then(|p| p.get("resource_type"))
                    .and_then(|t| t.as_str());
                if ty == Some(resource_type)
                    && let Some(p) = add.get("path").and_then(|p| p.as_str())
                {
                    paths.push(p.to_owned());
                }
            }
        }
        let known = batch.is_some();
        if let Some(b) = batch {
            batches.insert(b);
        }
        for p in paths {
            let decoded = Path::from_url_path(&p).map(|p| p.to_string()).unwrap_or(p);
            added.push((decoded, known));
        }
    }
    let batches = Arc::new(batches);
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (path, known) in added {
        let Some(f) = live.get(&path) else {
            continue; // rewritten later in the window: the rewrite is in `added` too
        };
        if !seen.insert(path.clone()) {
            continue;
        }
        let mut f = f.clone();
        f.filter = if known {
            RowFilter::Batches(batches.clone())
        } else {
            RowFilter::All
        };
        out.push(f);
    }
    Ok(Some(out))
}

/// Chunks read from the store.
pub(crate) type ChunkReceiver = tokio::sync::mpsc::Receiver<Result<StoreChunk, ViewStoreError>>;

/// [`read_store_files`] on a task: the chunks arrive on the receiver (a few
/// in flight); await the handle after draining it.
pub(crate) fn spawn_reader(
    store: &DeltaTable,
    files: Vec<StoreFile>,
    batch_rows: usize,
) -> (ChunkReceiver, tokio::task::JoinHandle<()>) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let handle = tokio::spawn(read_store_files(
        store.object_store(),
        files,
        batch_rows,
        tx,
    ));
    (rx, handle)
}

/// Streams the files' selected rows into `tx`, one chunk per Parquet batch.
pub(crate) async fn read_store_files(
    store: Arc<dyn ObjectStore>,
    files: Vec<StoreFile>,
    batch_rows: usize,
    tx: tokio::sync::mpsc::Sender<Result<StoreChunk, ViewStoreError>>,
) {
    for f in files {
        if let Err(e) = read_one(&store, &f, batch_rows, &tx).await {
            let _ = tx.send(Err(e)).await;
            return;
        }
    }
}

async fn read_one(
    store: &Arc<dyn ObjectStore>,
    f: &StoreFile,
    batch_rows: usize,
    tx: &tokio::sync::mpsc::Sender<Result<StoreChunk, ViewStoreError>>,
) -> Result<(), ViewStoreError> {
    let file = f.path.to_string();
    let err = |m: String| ViewStoreError::Read {
        file: file.clone(),
        message: m,
    };
    #[allow(deprecated)]
    let reader = ParquetObjectReader::new(store.clone(), f.path.clone()).with_file_size(f.size);
    // The page index lets a batch filter skip the pages of `resource` (the
    // bulk of a file) that hold no changed row: a MERGE rewrites whole
    // files, but its updated rows come in runs.
    let options = ArrowReaderOptions::new()
        .with_page_index_policy(parquet::file::metadata::PageIndexPolicy::Optional);
    let mut builder = ParquetRecordBatchStreamBuilder::new_with_options(reader, options)
        .await
        .map_err(|e| err(e.to_string()))?;
    let mask = ProjectionMask::columns(builder.parquet_schema(), ["id", "deleted", "resource"]);
    if let RowFilter::Batches(set) = &f.filter {
        let by_batch = ProjectionMask::columns(builder.parquet_schema(), ["batch_id"]);
        let set = set.clone();
        // A window usually holds a few batches: comparing ids beats hashing
        // every row.
        let few: Option<Vec<String>> = (set.len() <= 8).then(|| set.iter().cloned().collect());
        let predicate = ArrowPredicateFn::new(by_batch, move |b: RecordBatch| {
            let mut keep = arrow::array::BooleanBufferBuilder::new(b.num_rows());
            atlas_lake::lake::for_each_text(b.column(0).as_ref(), |_, id| {
                keep.append(id.is_some_and(|id| match &few {
                    Some(few) => few.iter().any(|w| w == id),
                    None => set.contains(id),
                }));
            })
            .map_err(|e| arrow::error::ArrowError::ExternalError(Box::new(e)))?;
            Ok(BooleanArray::new(keep.finish(), None))
        });
        builder = builder.with_row_filter(parquet::arrow::arrow_reader::RowFilter::new(vec![
            Box::new(predicate),
        ]));
    }
    let mut stream = builder
        .with_projection(mask)
        .with_batch_size(batch_rows)
        .build()
        .map_err(|e| err(e.to_string()))?;
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(|e| err(e.to_string()))?;
        let chunk = to_chunk(&batch, &file).map_err(err)?;
        if !chunk.ids.is_empty() && tx.send(Ok(chunk)).await.is_err() {
            return Ok(()); // the consumer stopped (it reports why)
        }
    }
    Ok(())
}

fn text(batch: &RecordBatch, name: &str) -> Result<StringArray, String> {
    let i = batch
        .schema()
        .index_of(name)
        .map_err(|_| format!("no `{name}` column"))?;
    atlas_lake::lake::text_column(batch, i).map_err(|e| e.to_string())
}

fn to_chunk(batch: &RecordBatch, file: &str) -> Result<StoreChunk, String> {
    let ids = text(batch, "id")?;
    let resources = text(batch, "resource")?;
    let deleted = batch
        .column_by_name("deleted")
        .and_then(|c| c.as_any().downcast_ref::<BooleanArray>())
        .cloned()
        .ok_or("no boolean `deleted` column")?;
    Ok(StoreChunk {
        ids,
        deleted,
        resources,
        file: file.to_owned(),
    })
}
