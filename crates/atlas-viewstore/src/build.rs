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

use arrow::array::{Array, RecordBatch};
use arrow::compute::{SortColumn, concat_batches, lexsort_to_indices, take_record_batch};
use arrow::datatypes::SchemaRef;
use atlas_views::{Appended, CompiledView, ViewSet, ViewSetState};
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties, TableReference};
use deltalake::kernel::{Action, Add, StructType, Transaction};
use deltalake::operations::create::CreateBuilder;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, TableProperty};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use parquet::basic::Compression;
use parquet::file::properties::{EnabledStatistics, WriterProperties};

use crate::catalog::ViewEntry;
use crate::dv;
use crate::scan::{self, StoreChunk, StoreFile};
use crate::{ViewStore, ViewStoreError};
use roaring::RoaringTreemap;

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
    /// Files replaced by a rewrite of their remaining rows.
    pub files_removed: u64,
    /// Files whose changed rows were marked deleted by a deletion vector.
    pub deletion_vectors: u64,
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
    /// The lake's writer lease, when the caller holds it already (to wait
    /// for it, or to ingest and refresh under one lease). Without it,
    /// `refresh` takes the lease itself and fails at once when another
    /// writer holds it.
    pub lease: Option<atlas_lake::WriterLease>,
}

impl Default for RefreshOptions {
    fn default() -> Self {
        RefreshOptions {
            full: false,
            file_rows: 1 << 20,
            batch_rows: 4096,
            progress: None,
            lease: None,
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
    /// for its current definition, in full otherwise. Runs under the lake's
    /// writer lease (`opts.lease`, or one taken here).
    pub async fn refresh(
        &self,
        names: &[String],
        opts: &RefreshOptions,
    ) -> Result<Vec<RefreshReport>, ViewStoreError> {
        if let Some(lease) = &opts.lease {
            return self.refresh_leased(names, opts, lease).await;
        }
        let lease = atlas_lake::WriterLease::acquire(
            &self.lake,
            &atlas_lake::LeaseOptions {
                command: format!(
                    "views refresh ({})",
                    std::env::args().collect::<Vec<_>>().join(" ")
                ),
                ..atlas_lake::LeaseOptions::default()
            },
        )
        .await?;
        let result = self.refresh_leased(names, opts, &lease).await;
        let released = lease.release().await;
        let reports = result?;
        released?;
        Ok(reports)
    }

    async fn refresh_leased(
        &self,
        names: &[String],
        opts: &RefreshOptions,
        lease: &atlas_lake::WriterLease,
    ) -> Result<Vec<RefreshReport>, ViewStoreError> {
        lease.check()?;
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
        let mut incremental: BTreeMap<(String, i64), Vec<ViewEntry>> = BTreeMap::new();
        // View tables loaded once here serve the incremental refreshes too.
        let mut tables: std::collections::HashMap<String, DeltaTable> = Default::default();
        let loaded: Vec<(ViewEntry, Option<DeltaTable>, Option<i64>)> =
            futures::stream::iter(views.into_iter().map(|v| async move {
                let Some(t) = self.lake.table_at(&v.table_dir()).await? else {
                    return Ok::<_, ViewStoreError>((v, None, None));
                };
                let r = t
                    .snapshot()
                    .map_err(delta(&v.name))?
                    .transaction_version(t.log_store().as_ref(), v.app_id())
                    .await
                    .map_err(delta(&v.name))?;
                Ok((v, Some(t), r))
            }))
            .buffered(4)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        for (v, table, reflected) in loaded {
            if let Some(t) = table {
                tables.insert(v.name.clone(), t);
            }
            match reflected {
                Some(r) if !opts.full && r == store_version => {
                    reports.push(empty_report(&v.name, RefreshKind::UpToDate, Some(r)));
                }
                // A view that resolves references depends on other resources
                // too (a changed Medication changes medication_request rows):
                // it is refreshed incrementally only while none of the types
                // it resolves changed, in full otherwise.
                Some(r)
                    if !opts.full
                        && v.key_column.is_some()
                        && !self
                            .resolved_types_changed(&store, &v, r, store_version)
                            .await? =>
                {
                    incremental
                        .entry((v.resource_type.clone(), r))
                        .or_default()
                        .push(v);
                }
                _ => full.entry(v.resource_type.clone()).or_default().push(v),
            }
        }
        // Resource types refresh side by side (each is small and partly
        // single-threaded); each view still lands in its own commit.
        let store = &store;
        let tables = &tables;
        let mut runs = futures::stream::iter(incremental.into_iter().map(
            |((ty, since), group)| async move {
                lease.check()?;
                let done = self
                    .refresh_incremental(
                        store,
                        &ty,
                        &group,
                        tables,
                        StoreWindow {
                            since,
                            until: store_version,
                        },
                        opts,
                    )
                    .await?;
                Ok::<_, ViewStoreError>((ty, group, done))
            },
        ))
        .buffer_unordered(2);
        while let Some(run) = runs.next().await {
            match run? {
                (_, _, Some(reps)) => reports.extend(reps),
                (ty, group, None) => full.entry(ty).or_default().extend(group),
            }
        }
        drop(runs);
        for (ty, group) in full {
            lease.check()?;
            reports.extend(
                self.build_full(store, &ty, &group, store_version, opts)
                    .await?,
            );
        }
        reports.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(reports)
    }

    /// Whether any resource of a type `v` resolves references to was
    /// written after store version `since` (or that part of the log is gone).
    async fn resolved_types_changed(
        &self,
        store: &DeltaTable,
        v: &ViewEntry,
        since: i64,
        until: i64,
    ) -> Result<bool, ViewStoreError> {
        for ty in v.plan.resolved_types() {
            match scan::changed_files(&self.lake, store, &ty, since, until).await? {
                Some(files) if files.is_empty() => {}
                _ => return Ok(true),
            }
        }
        // Only the types named by `resolve().ofType(T)` are loaded from the
        // store (other references resolve to contained resources only, which
        // are part of the resource itself), so nothing else can matter.
        Ok(false)
    }

    /// One sink per view of `group`, and the group's label for progress.
    fn sinks(
        &self,
        group: &[ViewEntry],
        opts: &RefreshOptions,
    ) -> Result<(Vec<ViewSink>, String), ViewStoreError> {
        let sinks = group
            .iter()
            .map(|v| ViewSink::new(self, v, opts.file_rows))
            .collect::<Result<Vec<_>, _>>()?;
        let label = group
            .iter()
            .map(|v| v.name.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        Ok((sinks, label))
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
        let mut handles = Vec::with_capacity(group.len());
        for v in group {
            handles.push(self.lake.table_handle_at(&v.table_dir()).await?);
        }
        let (mut sinks, label) = self.sinks(group, opts)?;
        let stats = self
            .derive(store, files, &mut sinks, false, opts, &label)
            .await?;
        let mut reports = Vec::new();
        for ((v, sink), handle) in group.iter().zip(sinks).zip(&handles) {
            let (adds, rows_written) = sink.finish(handle).await?;
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
                            .map(|f| {
                                dv::live_rows(
                                    f.num_records(),
                                    f.deletion_vector_descriptor().as_ref(),
                                )
                            })
                            .sum::<u64>()
                    })
                })
                .unwrap_or(0);
            let schema: StructType =
                v.plan
                    .schema()
                    .as_ref()
                    .try_into_kernel()
                    .map_err(|source| ViewStoreError::Schema {
                        view: v.name.clone(),
                        source,
                    })?;
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
                // Incremental refreshes mark changed rows deleted instead of
                // rewriting whole files (see `dv`).
                .with_configuration_property(TableProperty::EnableDeletionVectors, Some("true"))
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
                deletion_vectors: 0,
                errors: stats.errors,
                first_errors: stats.first_errors.clone(),
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        Ok(reports)
    }

    /// Re-derives the resources of `resource_type` written after store
    /// version `since`, once for every view in `group` (all of which reflect
    /// `since`), then updates each view in its own commit. `None` when the
    /// store's log no longer covers that range.
    async fn refresh_incremental(
        &self,
        store: &DeltaTable,
        resource_type: &str,
        group: &[ViewEntry],
        tables: &std::collections::HashMap<String, DeltaTable>,
        window: StoreWindow,
        opts: &RefreshOptions,
    ) -> Result<Option<Vec<RefreshReport>>, ViewStoreError> {
        let StoreWindow { since, until } = window;
        let started = Instant::now();
        let Some(files) =
            scan::changed_files(&self.lake, store, resource_type, since, until).await?
        else {
            return Ok(None);
        };
        let (mut sinks, label) = self.sinks(group, opts)?;
        let stats = self
            .derive(store, files, &mut sinks, true, opts, &label)
            .await?;
        let derived = started.elapsed();
        tracing::info!(
            resource_type,
            views = %label,
            changed = stats.touched.len(),
            derive_s = derived.as_secs_f64(),
            "changed resources re-derived"
        );
        let touched = Arc::new(stats.touched.clone());
        let mut reports = Vec::new();
        for (v, sink) in group.iter().zip(sinks) {
            let table = tables
                .get(&v.name)
                .ok_or_else(|| ViewStoreError::NotFound(v.name.clone()))?;
            let mut r = self
                .apply_changes(v, table, sink, &touched, window, opts)
                .await?;
            r.resources_read = stats.resources;
            r.errors = stats.errors;
            r.first_errors = stats.first_errors.clone();
            r.seconds += derived.as_secs_f64();
            reports.push(r);
        }
        Ok(Some(reports))
    }

    /// Applies one incremental refresh to view `v`: the rows of `touched`
    /// resources go (deletion vectors, or rewrites), the re-derived rows in
    /// `sink` come in, in one commit that records store version `until`.
    async fn apply_changes(
        &self,
        v: &ViewEntry,
        table: &DeltaTable,
        mut sink: ViewSink,
        touched: &Arc<KeySet>,
        window: StoreWindow,
        opts: &RefreshOptions,
    ) -> Result<RefreshReport, ViewStoreError> {
        let StoreWindow { since, until } = window;
        let started = Instant::now();
        let key_column = v
            .key_column
            .clone()
            .ok_or_else(|| ViewStoreError::NoKeyColumn {
                view: v.name.clone(),
            })?;
        // Mark the rows of touched resources deleted in the files that hold
        // them: a deletion vector per file, or, where a file would lose more
        // than 1/COMPACT_AT of its rows (or the table predates deletion
        // vectors), a rewrite of its remaining rows (copy-on-write).
        let mut actions = Vec::new();
        let mut rows_removed = 0u64;
        let mut files_removed = 0u64;
        let mut deletion_vectors = 0u64;
        if !touched.is_empty() {
            let use_dv = dv::enabled(table);
            let snapshot = table.snapshot().map_err(delta(&v.name))?;
            #[allow(deprecated)]
            let view_files: Vec<ViewFile> = snapshot
                .log_data()
                .iter()
                .map(|f| ViewFile {
                    path: f.object_store_path(),
                    size: f.size().max(0) as u64,
                    rows: f.num_records().unwrap_or(0) as u64,
                    dv: f.deletion_vector_descriptor(),
                    add: f.add_action(),
                    remove: f.remove_action(true),
                })
                .collect();
            let mut scans = futures::stream::iter(view_files.into_iter().map(|f| {
                let key_column = key_column.as_str();
                async move {
                    let deleted = match &f.dv {
                        Some(d) => dv::read(table, f.path.as_ref(), d).await?,
                        None => RoaringTreemap::new(),
                    };
                    let hits =
                        rows_with_keys(table, &f, key_column, touched, &deleted, opts.batch_rows)
                            .await?;
                    Ok::<_, ViewStoreError>((f, deleted, hits))
                }
            }))
            .buffer_unordered(2);
            let mut marked: Vec<(ViewFile, RoaringTreemap)> = Vec::new();
            while let Some(scan) = scans.next().await {
                let (f, deleted, hits) = scan?;
                if hits.is_empty() {
                    continue;
                }
                rows_removed += hits.len();
                let all = deleted | hits;
                if use_dv && all.len().saturating_mul(COMPACT_AT) <= f.rows {
                    marked.push((f, all));
                } else {
                    for b in read_except(table, &f, &all, opts.batch_rows).await? {
                        sink.push(b).await?;
                    }
                    files_removed += 1;
                    actions.push(Action::Remove(f.remove));
                }
            }
            drop(scans);
            if !marked.is_empty() {
                let vectors: Vec<RoaringTreemap> = marked.iter().map(|(_, d)| d.clone()).collect();
                let descriptors = dv::write(table, &vectors).await?;
                let now = chrono::Utc::now().timestamp_millis();
                for ((f, _), d) in marked.into_iter().zip(descriptors) {
                    let mut add = f.add;
                    add.stats = dv::loosen_stats(add.stats.as_deref()).or(add.stats);
                    add.deletion_vector = Some(d);
                    add.data_change = true;
                    add.modification_time = now;
                    actions.push(Action::Remove(f.remove));
                    actions.push(Action::Add(add));
                    deletion_vectors += 1;
                }
            }
        }
        let marked_at = started.elapsed();
        let (adds, rows_written) = sink.finish(table).await?;
        let files_added = adds.len() as u64;
        actions.extend(adds.into_iter().map(Action::Add));
        let written_at = started.elapsed();
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
        tracing::info!(
            view = %v.name,
            changed = touched.len(),
            rows_removed,
            rows_written,
            deletion_vectors,
            mark_s = marked_at.as_secs_f64(),
            write_s = (written_at - marked_at).as_secs_f64(),
            commit_s = (started.elapsed() - written_at).as_secs_f64(),
            "view refreshed"
        );
        Ok(RefreshReport {
            name: v.name.clone(),
            kind: RefreshKind::Incremental,
            store_version: Some(until),
            resources_read: 0,
            rows_written,
            rows_removed,
            files_added,
            files_removed,
            deletion_vectors,
            errors: 0,
            first_errors: Vec::new(),
            seconds: started.elapsed().as_secs_f64(),
        })
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
                for i in 0..chunk.ids.len() {
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
            reader.await.map_err(|source| ViewStoreError::Task {
                what: "store reader",
                source,
            })?;
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
            let out = result.map_err(|source| ViewStoreError::Task {
                what: "evaluation",
                source,
            })??;
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
        reader.await.map_err(|source| ViewStoreError::Task {
            what: "store reader",
            source,
        })?;
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
        deletion_vectors: 0,
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

/// Resource keys: a refresh probes the set with every row of a view.
pub(crate) type KeySet = HashSet<String, std::hash::BuildHasherDefault<KeyHasher>>;

/// One-shot xxh3 of a key's bytes (`str` hashing feeds the bytes, then a
/// 0xff terminator, which is folded in cheaply instead of through xxh3's
/// streaming state).
#[derive(Default)]
pub(crate) struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0 = xxhash_rust::xxh3::xxh3_64_with_seed(bytes, self.0);
    }
    fn write_u8(&mut self, b: u8) {
        self.0 = self.0.rotate_left(8) ^ u64::from(b);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

#[derive(Default)]
struct DeriveStats {
    resources: u64,
    errors: u64,
    first_errors: Vec<String>,
    touched: KeySet,
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
    for i in 0..chunk.ids.len() {
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
        .zip(set.views())
        .map(|(b, v)| {
            b.finish().map_err(|source| ViewStoreError::Rows {
                view: v.name().unwrap_or("(unnamed)").to_owned(),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
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
    /// The view's catalog name, for errors.
    view: String,
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
        // Views are read far more than written, and most reads are one
        // patient's rows. With rows clustered by patient, row-group
        // statistics and the page index narrow such a read to a page or two
        // per column (pages of ~2,048 rows). What is left is per-column
        // fixed cost, so: Snappy (decoding is several times cheaper than
        // zstd and needs no decoder context; every engine reads it), and a
        // 64 KiB dictionary limit so high-cardinality columns (resource and
        // encounter ids) fall back to plain pages instead of making every
        // read decode a megabyte dictionary; low-cardinality columns (codes,
        // units, status) stay dictionary-encoded.
        let mut props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_dictionary_page_size_limit(64 * 1024)
            .set_max_row_group_row_count(Some(32 * 1024))
            .set_data_page_row_count_limit(2048)
            .set_write_batch_size(1024)
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
            view: v.name.clone(),
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

    fn arrow_err(&self) -> impl FnOnce(arrow::error::ArrowError) -> ViewStoreError + '_ {
        |source| ViewStoreError::Arrow {
            view: self.view.clone(),
            source,
        }
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
        let batch = concat_batches(&self.schema, &self.pending).map_err(self.arrow_err())?;
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
            let idx = lexsort_to_indices(&cols, None).map_err(self.arrow_err())?;
            take_record_batch(&batch, &idx).map_err(self.arrow_err())?
        };
        self.rows_written += batch.num_rows() as u64;
        self.writer.write(batch).await.map_err(delta(&self.view))?;
        let adds = self.writer.flush().await.map_err(delta(&self.view))?;
        self.adds.extend(adds);
        Ok(())
    }

    /// Writes what is pending, then, when the view has a sort key and more
    /// than one file was written, merges the files so their key ranges do
    /// not overlap (see `cluster`).
    async fn finish(mut self, table: &DeltaTable) -> Result<(Vec<Add>, u64), ViewStoreError> {
        self.flush().await?;
        if self.adds.len() < 2 || self.sort_columns.is_empty() {
            return Ok((self.adds, self.rows_written));
        }
        let chunks = std::mem::take(&mut self.adds);
        let (adds, rows) = crate::cluster::merge_sorted_files(
            table.object_store(),
            &chunks,
            &self.schema,
            &self.sort_columns,
            &mut self.writer,
            self.file_rows,
            &self.view,
        )
        .await?;
        if rows != self.rows_written {
            return Err(ViewStoreError::ClusterRows {
                view: self.view.clone(),
                written: rows,
                expected: self.rows_written,
            });
        }
        Ok((adds, rows))
    }
}

/// Store versions `since` (exclusive) to `until` (inclusive): what an
/// incremental refresh catches up on.
#[derive(Debug, Clone, Copy)]
struct StoreWindow {
    since: i64,
    until: i64,
}

/// A live file of a view table, with what a refresh needs to replace it.
struct ViewFile {
    path: object_store::path::Path,
    size: u64,
    rows: u64,
    dv: Option<deltalake::kernel::DeletionVectorDescriptor>,
    add: Add,
    remove: deltalake::kernel::Remove,
}

/// A file gets a deletion vector while it keeps more than 1 - 1/COMPACT_AT
/// of its rows; past that its live rows are rewritten (so readers never
/// scan mostly-deleted files).
const COMPACT_AT: u64 = 5;

#[allow(deprecated)]
async fn open_file(
    table: &DeltaTable,
    f: &ViewFile,
) -> Result<
    parquet::arrow::async_reader::ParquetRecordBatchStreamBuilder<
        parquet::arrow::async_reader::ParquetObjectReader,
    >,
    ViewStoreError,
> {
    use parquet::arrow::async_reader::{ParquetObjectReader, ParquetRecordBatchStreamBuilder};
    let reader =
        ParquetObjectReader::new(table.object_store(), f.path.clone()).with_file_size(f.size);
    ParquetRecordBatchStreamBuilder::new(reader)
        .await
        .map_err(|e| read_err(f, e.to_string()))
}

fn read_err(f: &ViewFile, message: String) -> ViewStoreError {
    ViewStoreError::Read {
        file: f.path.to_string(),
        message,
    }
}

/// Row positions (in the file) of the live rows whose key is in `touched`:
/// reads the key column only, its row groups split over the cores.
async fn rows_with_keys(
    table: &DeltaTable,
    f: &ViewFile,
    key_column: &str,
    touched: &Arc<KeySet>,
    deleted: &RoaringTreemap,
    batch_rows: usize,
) -> Result<RoaringTreemap, ViewStoreError> {
    #[allow(deprecated)]
    use parquet::arrow::async_reader::{ParquetObjectReader, ParquetRecordBatchStreamBuilder};
    let builder = open_file(table, f).await?;
    let metadata = builder.metadata().clone();
    let mask = parquet::arrow::ProjectionMask::columns(builder.parquet_schema(), [key_column]);
    let arrow_meta = parquet::arrow::arrow_reader::ArrowReaderMetadata::try_new(
        metadata.clone(),
        Default::default(),
    )
    .map_err(|e| read_err(f, e.to_string()))?;
    let mut first_row = Vec::new();
    let mut at = 0u64;
    for rg in metadata.row_groups() {
        first_row.push(at);
        at += rg.num_rows().max(0) as u64;
    }
    let groups: Vec<usize> = (0..first_row.len()).collect();
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let per_task = groups.len().div_ceil(workers).max(1);
    let mut tasks = Vec::new();
    for part in groups.chunks(per_task) {
        let part = part.to_vec();
        let start = first_row[part[0]];
        #[allow(deprecated)]
        let reader =
            ParquetObjectReader::new(table.object_store(), f.path.clone()).with_file_size(f.size);
        let stream = ParquetRecordBatchStreamBuilder::new_with_metadata(reader, arrow_meta.clone())
            .with_projection(mask.clone())
            .with_row_groups(part)
            .with_batch_size(batch_rows)
            .build()
            .map_err(|e| read_err(f, e.to_string()))?;
        let touched = touched.clone();
        let file = f.path.to_string();
        tasks.push(tokio::spawn(async move {
            let mut stream = stream;
            let mut hits = Vec::new();
            let mut at = start;
            while let Some(b) = stream.next().await {
                let b = b.map_err(|e| (file.clone(), e.to_string()))?;
                atlas_lake::lake::for_each_text(b.column(0).as_ref(), |i, k| {
                    if k.is_some_and(|k| touched.contains(k)) {
                        hits.push(at + i as u64);
                    }
                })
                .map_err(|e| (file.clone(), e.to_string()))?;
                at += b.num_rows() as u64;
            }
            Ok::<_, (String, String)>(hits)
        }));
    }
    let mut hits = RoaringTreemap::new();
    for t in tasks {
        let rows = t
            .await
            .map_err(|e| read_err(f, format!("key scan task: {e}")))?
            .map_err(|(file, message)| ViewStoreError::Read { file, message })?;
        hits.extend(rows.into_iter().filter(|r| !deleted.contains(*r)));
    }
    Ok(hits)
}

/// A file's rows except those at the positions in `deleted`.
async fn read_except(
    table: &DeltaTable,
    f: &ViewFile,
    deleted: &RoaringTreemap,
    batch_rows: usize,
) -> Result<Vec<RecordBatch>, ViewStoreError> {
    let mut stream = open_file(table, f)
        .await?
        .with_batch_size(batch_rows)
        .build()
        .map_err(|e| read_err(f, e.to_string()))?;
    let mut kept = Vec::new();
    let mut at = 0u64;
    while let Some(b) = stream.next().await {
        let b = b.map_err(|e| read_err(f, e.to_string()))?;
        let n = b.num_rows() as u64;
        let keep: arrow::array::BooleanArray =
            (at..at + n).map(|r| Some(!deleted.contains(r))).collect();
        at += n;
        let b = arrow::compute::filter_record_batch(&b, &keep)
            .map_err(|e| read_err(f, e.to_string()))?;
        if b.num_rows() > 0 {
            kept.push(b);
        }
    }
    Ok(kept)
}
