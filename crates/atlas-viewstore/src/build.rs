//! Full builds and incremental refreshes of view tables.
//!
//! The pipeline: a reader task decodes the store's Parquet files into
//! chunks; up to one evaluation per core runs on the blocking pool (each
//! resource parsed once, then appended by every view over its type); the
//! async loop gathers each view's rows, sorts them by patient key in bounded
//! chunks and writes one Parquet file per chunk. Nothing is visible until the
//! single Delta commit per view at the end.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{Array, RecordBatch, StringArray};
use arrow::compute::{SortColumn, concat_batches, lexsort_to_indices, take_record_batch};
use arrow::datatypes::SchemaRef;
use atlas_views::{Appended, CompiledView, ViewSet, ViewSetState};
use deltalake::DeltaTable;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties, TableReference};
use deltalake::kernel::{Action, Add, StructType, Transaction};
use deltalake::operations::create::CreateBuilder;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};

use crate::catalog::ViewEntry;
use crate::scan::{self, StoreChunk, StoreFile};
use crate::{ViewStore, ViewStoreError};

/// How a refresh went for one view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefreshKind {
    /// Already reflects the store's latest version.
    UpToDate,
    /// Rebuilt from every live resource of its type.
    Full,
    /// Re-derived only the resources written since its last refresh.
    Incremental,
    /// There is no resource store yet.
    NoStore,
}

/// What a refresh did, per view.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RefreshReport {
    pub name: String,
    pub kind: RefreshKind,
    /// The store version the view reflects after the refresh.
    pub store_version: Option<i64>,
    /// Store rows read (changed resources for an incremental refresh).
    pub resources_read: u64,
    pub rows_written: u64,
    /// View rows removed because their resource changed or was deleted.
    pub rows_removed: u64,
    pub files_added: u64,
    pub files_removed: u64,
    /// Resources the view could not evaluate (their rows are missing); the
    /// first messages are in `first_errors`.
    pub errors: u64,
    pub first_errors: Vec<String>,
    pub seconds: f64,
}

/// Progress callback: (what, resources done, resources total).
pub type ProgressFn = Arc<dyn Fn(&str, u64, u64) + Send + Sync>;

#[derive(Clone)]
pub struct RefreshOptions {
    /// Rebuild even when an incremental refresh is possible.
    pub full: bool,
    /// Rows gathered per sorted output file.
    pub file_rows: usize,
    /// Store rows per evaluation task.
    pub batch_rows: usize,
    pub progress: Option<ProgressFn>,
}

impl Default for RefreshOptions {
    fn default() -> Self {
        RefreshOptions {
            full: false,
            file_rows: 1 << 20,
            batch_rows: 4096,
            progress: None,
        }
    }
}

impl std::fmt::Debug for RefreshOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefreshOptions")
            .field("full", &self.full)
            .field("file_rows", &self.file_rows)
            .field("batch_rows", &self.batch_rows)
            .finish()
    }
}

fn delta(table: &str) -> impl Fn(deltalake::DeltaTableError) -> ViewStoreError + '_ {
    move |source| ViewStoreError::Delta {
        table: table.to_owned(),
        source: Box::new(source),
    }
}

const MAX_ERRORS_KEPT: usize = 5;

impl ViewStore {
    /// Refreshes the named views (all when `names` is empty): incrementally
    /// where the view has a key column and reflects an earlier store version
    /// for its current definition, in full otherwise.
    pub async fn refresh(
        &self,
        names: &[String],
        opts: &RefreshOptions,
    ) -> Result<Vec<RefreshReport>, ViewStoreError> {
        let all = self.list().await?;
        for n in names {
            if !all.iter().any(|v| &v.name == n) {
                return Err(ViewStoreError::NotFound(n.clone()));
            }
        }
        let views: Vec<ViewEntry> = all
            .into_iter()
            .filter(|v| names.is_empty() || names.contains(&v.name))
            .collect();
        let Some(store) = self.lake.table(atlas_lake::lake::RESOURCES).await? else {
            return Ok(views
                .into_iter()
                .map(|v| empty_report(&v.name, RefreshKind::NoStore, None))
                .collect());
        };
        let store_version = store.version().map(|v| v as i64).unwrap_or(0);
        let mut reports = Vec::new();
        let mut full: BTreeMap<String, Vec<ViewEntry>> = BTreeMap::new();
        for v in views {
            let reflected = match self.lake.table_at(&v.table_dir()).await? {
                Some(t) => t
                    .snapshot()
                    .map_err(delta(&v.name))?
                    .transaction_version(t.log_store().as_ref(), v.app_id())
                    .await
                    .map_err(delta(&v.name))?,
                None => None,
            };
            match reflected {
                Some(r) if !opts.full && r == store_version => {
                    reports.push(empty_report(&v.name, RefreshKind::UpToDate, Some(r)));
                }
                // A view that resolves references depends on other resources
                // too (a changed Medication changes medication_request rows):
                // rebuild it in full whenever the store moved.
                Some(r) if !opts.full && v.key_column.is_some() && !v.plan.uses_resolve() => {
                    match self
                        .refresh_incremental(&store, &v, r, store_version, opts)
                        .await?
                    {
                        Some(rep) => reports.push(rep),
                        None => full.entry(v.resource_type.clone()).or_default().push(v),
                    }
                }
                _ => full.entry(v.resource_type.clone()).or_default().push(v),
            }
        }
        for (ty, group) in full {
            reports.extend(
                self.build_full(&store, &ty, &group, store_version, opts)
                    .await?,
            );
        }
        Ok(reports)
    }

    /// Rebuilds every view in `group` (all over `resource_type`) from one
    /// scan of the store; one overwrite commit per view.
    async fn build_full(
        &self,
        store: &DeltaTable,
        resource_type: &str,
        group: &[ViewEntry],
        store_version: i64,
        opts: &RefreshOptions,
    ) -> Result<Vec<RefreshReport>, ViewStoreError> {
        let started = Instant::now();
        let files = scan::live_files(store, resource_type)?;
        let mut sinks = Vec::new();
        for v in group {
            self.lake.table_handle_at(&v.table_dir()).await?;
            sinks.push(ViewSink::new(self, v, opts.file_rows)?);
        }
        let label = group
            .iter()
            .map(|v| v.name.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let stats = self
            .derive(store, files, &mut sinks, false, opts, &label)
            .await?;
        let mut reports = Vec::new();
        for (v, sink) in group.iter().zip(sinks) {
            let (adds, rows_written) = sink.finish().await?;
            let files_added = adds.len() as u64;
            let existing = self.lake.table_at(&v.table_dir()).await?;
            let files_removed = existing
                .as_ref()
                .and_then(|t| t.snapshot().ok().map(|s| s.log_data().num_files() as u64))
                .unwrap_or(0);
            let rows_removed = existing
                .as_ref()
                .and_then(|t| {
                    t.snapshot().ok().map(|s| {
                        s.log_data()
                            .iter()
                            .map(|f| f.num_records().unwrap_or(0) as u64)
                            .sum::<u64>()
                    })
                })
                .unwrap_or(0);
            let schema: StructType = v
                .plan
                .schema()
                .as_ref()
                .try_into_kernel()
                .map_err(|e| ViewStoreError::Other(format!("view {} schema: {e}", v.name)))?;
            let description = v
                .definition
                .get("description")
                .and_then(|d| d.as_str())
                .unwrap_or("")
                .to_owned();
            let mut create = CreateBuilder::new()
                .with_location(self.lake.table_url_at(&v.table_dir()).to_string())
                .with_storage_options(self.lake.storage_options().clone())
                .with_table_name(v.name.clone())
                .with_columns(schema.fields().cloned())
                .with_save_mode(SaveMode::Overwrite)
                .with_actions(adds.into_iter().map(Action::Add))
                .with_commit_properties(
                    CommitProperties::default()
                        .with_application_transaction(Transaction::new(v.app_id(), store_version)),
                );
            if !description.is_empty() {
                create = create.with_comment(description);
            }
            create.await.map_err(delta(&v.name))?;
            tracing::info!(view = %v.name, rows = rows_written, files = files_added, "view rebuilt");
            reports.push(RefreshReport {
                name: v.name.clone(),
                kind: RefreshKind::Full,
                store_version: Some(store_version),
                resources_read: stats.resources,
                rows_written,
                rows_removed,
                files_added,
                files_removed,
                errors: stats.errors,
                first_errors: stats.first_errors.clone(),
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        Ok(reports)
    }

    /// Re-derives the resources written after store version `since`.
    /// `None` when the store's log no longer covers that range.
    async fn refresh_incremental(
        &self,
        store: &DeltaTable,
        v: &ViewEntry,
        since: i64,
        until: i64,
        opts: &RefreshOptions,
    ) -> Result<Option<RefreshReport>, ViewStoreError> {
        let started = Instant::now();
        let Some(key_column) = v.key_column.clone() else {
            return Ok(None);
        };
        let Some(files) =
            scan::changed_files(&self.lake, store, &v.resource_type, since, until).await?
        else {
            return Ok(None);
        };
        let mut sinks = vec![ViewSink::new(self, v, opts.file_rows)?];
        let stats = self
            .derive(store, files, &mut sinks, true, opts, &v.name)
            .await?;
        let touched = stats.touched;
        let table = self
            .lake
            .table_at(&v.table_dir())
            .await?
            .ok_or_else(|| ViewStoreError::NotFound(v.name.clone()))?;
        let mut sink = sinks
            .pop()
            .ok_or_else(|| ViewStoreError::Other("no sink".into()))?;
        // Rewrite the view files that hold rows of touched resources.
        let mut removes = Vec::new();
        let mut rows_removed = 0u64;
        if !touched.is_empty() {
            let snapshot = table.snapshot().map_err(delta(&v.name))?;
            let view_files: Vec<StoreFile> = snapshot
                .log_data()
                .iter()
                .map(|f| StoreFile {
                    path: f.object_store_path(),
                    size: f.size().max(0) as u64,
                    rows: f.num_records().unwrap_or(0) as u64,
                    filter: scan::RowFilter::All,
                })
                .collect();
            let remove_actions: std::collections::HashMap<String, _> = snapshot
                .log_data()
                .iter()
                .map(|f| (f.object_store_path().to_string(), f.remove_action(true)))
                .collect();
            for f in view_files {
                let (kept, removed) =
                    rewrite_without(&table, &f, &key_column, &touched, opts.batch_rows).await?;
                if removed == 0 {
                    continue;
                }
                rows_removed += removed;
                for b in kept {
                    sink.push(b).await?;
                }
                if let Some(r) = remove_actions.get(&f.path.to_string()) {
                    removes.push(Action::Remove(r.clone()));
                }
            }
        }
        let (adds, rows_written) = sink.finish().await?;
        let files_added = adds.len() as u64;
        let files_removed = removes.len() as u64;
        let mut actions = removes;
        actions.extend(adds.into_iter().map(Action::Add));
        let props = CommitProperties::default()
            .with_application_transaction(Transaction::new(v.app_id(), until));
        let snapshot = table.snapshot().map_err(delta(&v.name))?;
        CommitBuilder::from(props)
            .with_actions(actions)
            .build(
                Some(snapshot as &dyn TableReference),
                table.log_store(),
                DeltaOperation::Write {
                    mode: SaveMode::Overwrite,
                    partition_by: None,
                    predicate: Some(format!(
                        "atlas view refresh: {} changed resources (store versions {}..={})",
                        touched.len(),
                        since + 1,
                        until
                    )),
                },
            )
            .await
            .map_err(delta(&v.name))?;
        tracing::info!(view = %v.name, changed = touched.len(), rows_removed, rows_written, "view refreshed");
        Ok(Some(RefreshReport {
            name: v.name.clone(),
            kind: RefreshKind::Incremental,
            store_version: Some(until),
            resources_read: stats.resources,
            rows_written,
            rows_removed,
            files_added,
            files_removed,
            errors: stats.errors,
            first_errors: stats.first_errors,
            seconds: started.elapsed().as_secs_f64(),
        }))
    }

    /// Reads `files` from the store, evaluates every sink's view over the
    /// live resources, and feeds the rows to the sinks. With `collect_keys`,
    /// returns every resource id read (deleted ones included).
    /// For views with `resolve().ofType(T)` paths: every live resource of
    /// those types from the store, by `T/id` (contained references resolve
    /// without it).
    async fn resolver_for(
        &self,
        store: &DeltaTable,
        plans: &[Arc<CompiledView>],
        opts: &RefreshOptions,
    ) -> Result<Option<Arc<StoreResolver>>, ViewStoreError> {
        let mut types: Vec<String> = plans.iter().flat_map(|p| p.resolved_types()).collect();
        types.sort();
        types.dedup();
        if types.is_empty() {
            return Ok(None);
        }
        let mut by_ref = std::collections::HashMap::new();
        for ty in &types {
            let files = scan::live_files(store, ty)?;
            let (mut rx, reader) = scan::spawn_reader(store, files, opts.batch_rows);
            while let Some(chunk) = rx.recv().await {
                let chunk = chunk?;
                for &i in &chunk.rows {
                    let i = i as usize;
                    if (chunk.deleted.is_valid(i) && chunk.deleted.value(i))
                        || !chunk.resources.is_valid(i)
                        || !chunk.ids.is_valid(i)
                    {
                        continue;
                    }
                    // Stored resources were validated at ingest; one that no
                    // longer parses simply does not resolve.
                    if let Ok(json) = serde_json::from_str(chunk.resources.value(i)) {
                        by_ref.insert(format!("{ty}/{}", chunk.ids.value(i)), json);
                    }
                }
            }
            reader
                .await
                .map_err(|e| ViewStoreError::Other(format!("reader task: {e}")))?;
        }
        tracing::info!(types = ?types, resources = by_ref.len(), "loaded resources for resolve()");
        Ok(Some(Arc::new(StoreResolver { by_ref })))
    }

    async fn derive(
        &self,
        store: &DeltaTable,
        files: Vec<StoreFile>,
        sinks: &mut [ViewSink],
        collect_keys: bool,
        opts: &RefreshOptions,
        label: &str,
    ) -> Result<DeriveStats, ViewStoreError> {
        let total: u64 = files.iter().map(|f| f.rows).sum();
        let (mut rx, reader) = scan::spawn_reader(store, files, opts.batch_rows);
        let plans: Vec<Arc<CompiledView>> = sinks.iter().map(|s| s.plan.clone()).collect();
        let resolver = self.resolver_for(store, &plans, opts).await?;
        let set = Arc::new(match resolver {
            Some(r) => ViewSet::new(plans).with_resolver(r),
            None => ViewSet::new(plans),
        });
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        let mut in_flight = FuturesOrdered::new();
        let mut stats = DeriveStats::default();
        let mut done = 0u64;
        let mut input_open = true;
        loop {
            while input_open && in_flight.len() < workers {
                match rx.recv().await {
                    Some(chunk) => {
                        let chunk = chunk?;
                        let set = set.clone();
                        in_flight.push_back(tokio::task::spawn_blocking(move || {
                            evaluate(&chunk, &set, collect_keys)
                        }));
                    }
                    None => input_open = false,
                }
            }
            let Some(result) = in_flight.next().await else {
                break;
            };
            let out =
                result.map_err(|e| ViewStoreError::Other(format!("evaluation task: {e}")))??;
            done += out.resources;
            stats.resources += out.resources;
            stats.errors += out.errors.0;
            for m in out.errors.1 {
                if stats.first_errors.len() < MAX_ERRORS_KEPT {
                    stats.first_errors.push(m);
                }
            }
            stats.touched.extend(out.keys);
            for (sink, batch) in sinks.iter_mut().zip(out.batches) {
                sink.push(batch).await?;
            }
            if let Some(p) = &opts.progress {
                p(label, done, total);
            }
        }
        reader
            .await
            .map_err(|e| ViewStoreError::Other(format!("reader task: {e}")))?;
        Ok(stats)
    }
}

fn empty_report(name: &str, kind: RefreshKind, store_version: Option<i64>) -> RefreshReport {
    RefreshReport {
        name: name.to_owned(),
        kind,
        store_version,
        resources_read: 0,
        rows_written: 0,
        rows_removed: 0,
        files_added: 0,
        files_removed: 0,
        errors: 0,
        first_errors: Vec::new(),
        seconds: 0.0,
    }
}

/// `resolve()` against the store: `Type/id` (relative, absolute URL, or
/// with `/_history/n`) to the live resource.
pub(crate) struct StoreResolver {
    by_ref: std::collections::HashMap<String, serde_json::Value>,
}

impl atlas_fhirpath::ResourceResolver for StoreResolver {
    fn resolve(&self, reference: &str) -> Option<&serde_json::Value> {
        let r = reference.split("/_history/").next().unwrap_or(reference);
        let mut parts = r.rsplit('/');
        let (id, ty) = (parts.next()?, parts.next()?);
        self.by_ref.get(&format!("{ty}/{id}"))
    }
}

#[derive(Default)]
struct DeriveStats {
    resources: u64,
    errors: u64,
    first_errors: Vec<String>,
    touched: HashSet<String>,
}

struct Evaluated {
    resources: u64,
    batches: Vec<RecordBatch>,
    errors: (u64, Vec<String>),
    keys: Vec<String>,
}

/// Parses each live resource once and appends it to every view (one
/// projected parse serves every view: the fast path where the views allow
/// it, the full evaluator otherwise; same results).
fn evaluate(
    chunk: &StoreChunk,
    set: &ViewSet,
    collect_keys: bool,
) -> Result<Evaluated, ViewStoreError> {
    let mut state = ViewSetState::new();
    let mut builders = set.row_builders();
    let mut errors = (0u64, Vec::new());
    let mut keys = Vec::new();
    let mut resources = 0;
    for &i in &chunk.rows {
        let i = i as usize;
        resources += 1;
        if collect_keys && chunk.ids.is_valid(i) {
            keys.push(chunk.ids.value(i).to_owned());
        }
        if chunk.deleted.is_valid(i) && chunk.deleted.value(i) {
            continue;
        }
        if !chunk.resources.is_valid(i) {
            continue;
        }
        let text = chunk.resources.value(i);
        let outcome = set.append(text, &mut state, &mut builders, |_, e| {
            errors.0 += 1;
            if errors.1.len() < MAX_ERRORS_KEPT {
                errors.1.push(e.to_string());
            }
        });
        if let Appended::NotJson(e) = outcome {
            errors.0 += 1;
            if errors.1.len() < MAX_ERRORS_KEPT {
                errors.1.push(format!(
                    "{}: stored resource {} is not JSON: {e}",
                    chunk.file,
                    chunk.ids.value(i)
                ));
            }
        }
    }
    let batches = builders
        .iter_mut()
        .map(|b| b.finish())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ViewStoreError::Other(e.to_string()))?;
    Ok(Evaluated {
        resources,
        batches,
        errors,
        keys,
    })
}

/// Gathers one view's rows, writes them sorted by (patient key, resource
/// key) in files of about `file_rows` rows, and returns the Add actions.
struct ViewSink {
    plan: Arc<CompiledView>,
    schema: SchemaRef,
    sort_columns: Vec<usize>,
    pending: Vec<RecordBatch>,
    pending_rows: usize,
    file_rows: usize,
    writer: RecordBatchWriter,
    adds: Vec<Add>,
    rows_written: u64,
}

impl ViewSink {
    fn new(vs: &ViewStore, v: &ViewEntry, file_rows: usize) -> Result<ViewSink, ViewStoreError> {
        let schema = v.plan.schema();
        let sort_columns = [&v.patient_column, &v.key_column]
            .into_iter()
            .flatten()
            .filter_map(|c| schema.index_of(c).ok())
            .collect();
        let mut props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).unwrap_or_default()))
            .set_max_row_group_row_count(Some(64 * 1024))
            .set_statistics_enabled(EnabledStatistics::Page);
        for c in [&v.patient_column, &v.key_column].into_iter().flatten() {
            props = props.set_column_bloom_filter_enabled(c.as_str().into(), true);
        }
        let writer = RecordBatchWriter::try_new(
            vs.lake.table_url_at(&v.table_dir()).as_str(),
            schema.clone(),
            None,
            Some(vs.lake.storage_options().clone()),
        )
        .map_err(delta(&v.name))?
        .with_writer_properties(props.build());
        Ok(ViewSink {
            plan: v.plan.clone(),
            schema,
            sort_columns,
            pending: Vec::new(),
            pending_rows: 0,
            file_rows,
            writer,
            adds: Vec::new(),
            rows_written: 0,
        })
    }

    async fn push(&mut self, batch: RecordBatch) -> Result<(), ViewStoreError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        self.pending_rows += batch.num_rows();
        self.pending.push(batch);
        if self.pending_rows >= self.file_rows {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), ViewStoreError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let batch = concat_batches(&self.schema, &self.pending)
            .map_err(|e| ViewStoreError::Other(e.to_string()))?;
        self.pending.clear();
        self.pending_rows = 0;
        let batch = if self.sort_columns.is_empty() {
            batch
        } else {
            let cols: Vec<SortColumn> = self
                .sort_columns
                .iter()
                .map(|&i| SortColumn {
                    values: batch.column(i).clone(),
                    options: None,
                })
                .collect();
            let idx = lexsort_to_indices(&cols, None)
                .map_err(|e| ViewStoreError::Other(e.to_string()))?;
            take_record_batch(&batch, &idx).map_err(|e| ViewStoreError::Other(e.to_string()))?
        };
        self.rows_written += batch.num_rows() as u64;
        self.writer
            .write(batch)
            .await
            .map_err(|e| ViewStoreError::Other(format!("writing view rows: {e}")))?;
        let adds = self
            .writer
            .flush()
            .await
            .map_err(|e| ViewStoreError::Other(format!("writing view rows: {e}")))?;
        self.adds.extend(adds);
        Ok(())
    }

    async fn finish(mut self) -> Result<(Vec<Add>, u64), ViewStoreError> {
        self.flush().await?;
        Ok((self.adds, self.rows_written))
    }
}

/// Reads a view file and returns its rows whose key is not in `touched`,
/// plus how many rows were dropped (0: the file is untouched and stays).
async fn rewrite_without(
    table: &DeltaTable,
    f: &StoreFile,
    key_column: &str,
    touched: &HashSet<String>,
    batch_rows: usize,
) -> Result<(Vec<RecordBatch>, u64), ViewStoreError> {
    #[allow(deprecated)]
    use parquet::arrow::async_reader::{ParquetObjectReader, ParquetRecordBatchStreamBuilder};
    let file = f.path.to_string();
    let err = |m: String| ViewStoreError::Read {
        file: file.clone(),
        message: m,
    };
    #[allow(deprecated)]
    let open = || async {
        let reader =
            ParquetObjectReader::new(table.object_store(), f.path.clone()).with_file_size(f.size);
        ParquetRecordBatchStreamBuilder::new(reader)
            .await
            .map_err(|e| err(e.to_string()))
    };
    // First pass: the key column only, to see whether the file is touched.
    let builder = open().await?;
    let mask = parquet::arrow::ProjectionMask::columns(builder.parquet_schema(), [key_column]);
    let mut keys = builder
        .with_projection(mask)
        .with_batch_size(batch_rows)
        .build()
        .map_err(|e| err(e.to_string()))?;
    let mut hit = false;
    while let Some(b) = keys.next().await {
        let b = b.map_err(|e| err(e.to_string()))?;
        let k = key_array(&b, 0).map_err(err)?;
        if (0..k.len()).any(|i| k.is_valid(i) && touched.contains(k.value(i))) {
            hit = true;
            break;
        }
    }
    if !hit {
        return Ok((Vec::new(), 0));
    }
    let mut stream = open()
        .await?
        .with_batch_size(batch_rows)
        .build()
        .map_err(|e| err(e.to_string()))?;
    let mut kept = Vec::new();
    let mut removed = 0u64;
    while let Some(b) = stream.next().await {
        let b = b.map_err(|e| err(e.to_string()))?;
        let i = b
            .schema()
            .index_of(key_column)
            .map_err(|e| err(e.to_string()))?;
        let k = key_array(&b, i).map_err(err)?;
        let keep: arrow::array::BooleanArray = (0..k.len())
            .map(|r| Some(!(k.is_valid(r) && touched.contains(k.value(r)))))
            .collect();
        removed += keep.false_count() as u64;
        let b = arrow::compute::filter_record_batch(&b, &keep).map_err(|e| err(e.to_string()))?;
        if b.num_rows() > 0 {
            kept.push(b);
        }
    }
    Ok((kept, removed))
}

fn key_array(b: &RecordBatch, i: usize) -> Result<StringArray, String> {
    atlas_lake::lake::text_column(b, i).map_err(|e| e.to_string())
}
