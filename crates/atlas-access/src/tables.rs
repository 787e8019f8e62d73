//! View tables as DataFusion providers, at the latest or at a pinned Delta
//! version. The latest handle of each table is kept and brought up to date
//! (one log listing) per request; providers are cached per (view, version),
//! so pages after the first re-read the exact snapshot their token names.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use datafusion::catalog::TableProvider;
use datafusion::prelude::SessionContext;
use deltalake::DeltaTable;
use http::StatusCode;

use atlas_lake::Lake;

use crate::AccessError;

/// Providers kept before the cache is emptied (a token's snapshot is rebuilt
/// from the Delta log when it is needed again).
const MAX_PROVIDERS: usize = 256;

pub struct Tables {
    lake: Lake,
    ctx: SessionContext,
    latest: tokio::sync::Mutex<HashMap<String, DeltaTable>>,
    providers: Mutex<HashMap<(String, u64), Arc<dyn TableProvider>>>,
    slices: crate::slice::SliceCache,
    /// Live views: the table versions that reflect one store version,
    /// published together after each refresh; "latest" means these.
    pinned: std::sync::RwLock<Option<Arc<PinnedSet>>>,
}

/// Table versions that belong together: every view refreshed to one store
/// version. The store itself is never pinned: reads by key and the
/// policy's patient sets (care teams, organizations) must see deletions
/// and revocations at once, whatever the views reflect.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PinnedSet {
    /// The store version the set reflects.
    pub store_version: u64,
    /// View table directory (`views/observation`) → version.
    pub tables: HashMap<String, u64>,
}

fn unavailable(view: &str, message: String) -> AccessError {
    AccessError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "ViewUnavailable",
        "view",
        view,
        message,
    )
}

/// The lake session, tuned for selective reads: filters are evaluated while
/// decoding (late materialization: the other columns are decoded only for
/// the rows that pass, with the page index skipping pages), the most
/// selective first.
fn serving_session() -> SessionContext {
    let mut config = datafusion::prelude::SessionConfig::new();
    let parquet = &mut config.options_mut().execution.parquet;
    parquet.schema_force_view_types = false;
    parquet.pushdown_filters = true;
    parquet.reorder_filters = true;
    parquet.enable_page_index = true;
    parquet.bloom_filter_on_read = true;
    SessionContext::new_with_config(config)
}

impl Tables {
    pub fn new(lake: Lake) -> Tables {
        Tables {
            lake,
            ctx: serving_session(),
            latest: tokio::sync::Mutex::new(HashMap::new()),
            providers: Mutex::new(HashMap::new()),
            slices: Default::default(),
            pinned: std::sync::RwLock::new(None),
        }
    }

    /// Publishes a set of table versions: from now on requests that ask
    /// for the latest version of one of these tables get the pinned one, so
    /// no request reads a view refreshed to one store version next to a
    /// view (or the store) at another.
    pub fn pin(&self, set: PinnedSet) {
        if let Ok(mut p) = self.pinned.write() {
            *p = Some(Arc::new(set));
        }
    }

    /// Withdraws the published set: requests read every table's newest
    /// version again (live views whose refresh keeps failing).
    pub fn unpin(&self) {
        if let Ok(mut p) = self.pinned.write() {
            *p = None;
        }
    }

    /// The published set, if live views are on and one was published.
    pub fn pinned(&self) -> Option<Arc<PinnedSet>> {
        self.pinned.read().ok().and_then(|p| p.clone())
    }

    /// The session every query runs in (object stores registered).
    pub fn session(&self) -> &SessionContext {
        &self.ctx
    }

    /// The current version of the table at `dir` (relative to the lake
    /// root: `views/observation`, `tables/resources`).
    pub async fn latest_version(&self, view: &str) -> Result<u64, AccessError> {
        if let Some(v) = self.pinned().and_then(|p| p.tables.get(view).copied()) {
            return Ok(v);
        }
        self.newest_version(view).await
    }

    /// The newest version of the table at `dir`, whatever is pinned.
    async fn newest_version(&self, view: &str) -> Result<u64, AccessError> {
        let mut latest = self.latest.lock().await;
        if let Some(t) = latest.get_mut(view) {
            t.update_incremental(None)
                .await
                .map_err(|e| unavailable(view, format!("view table {view}: {e}")))?;
        } else {
            let t = self
                .lake
                .table_at(view)
                .await
                .map_err(|e| unavailable(view, format!("view table {view}: {e}")))?
                .ok_or_else(|| {
                    unavailable(
                        view,
                        format!(
                            "table {view} does not exist in this lake yet (views: run `atlas views refresh`; resources: `atlas ingest`)"
                        ),
                    )
                })?;
            latest.insert(view.to_owned(), t);
        }
        latest
            .get(view)
            .and_then(|t| t.version())
            .ok_or_else(|| unavailable(view, format!("view table {view} has no version")))
    }

    /// The view table at `version`, as a provider.
    pub async fn provider(
        &self,
        view: &str,
        version: u64,
    ) -> Result<Arc<dyn TableProvider>, AccessError> {
        let key = (view.to_owned(), version);
        if let Some(p) = self
            .providers
            .lock()
            .ok()
            .and_then(|m| m.get(&key).cloned())
        {
            return Ok(p);
        }
        let table = self.table_version(view, version).await?;
        table
            .update_datafusion_session(&self.ctx.state())
            .map_err(|e| unavailable(view, format!("view table {view}: {e}")))?;
        let provider = table
            .table_provider()
            .await
            .map_err(|e| unavailable(view, format!("view table {view}: {e}")))?;
        if let Ok(mut m) = self.providers.lock() {
            if m.len() >= MAX_PROVIDERS {
                m.clear();
            }
            m.insert(key, provider.clone());
        }
        Ok(provider)
    }

    /// The table at `dir` as of `version` (a 400 `PageTokenSnapshotGone`
    /// when the log no longer has it).
    async fn table_version(&self, view: &str, version: u64) -> Result<DeltaTable, AccessError> {
        let table = {
            let latest = self.latest.lock().await;
            latest.get(view).cloned()
        };
        let mut table = match table {
            Some(t) => t,
            None => {
                self.newest_version(view).await?;
                let latest = self.latest.lock().await;
                latest
                    .get(view)
                    .cloned()
                    .ok_or_else(|| unavailable(view, format!("view table {view} vanished")))?
            }
        };
        if table.version() != Some(version) {
            table.load_version(version).await.map_err(|e| {
                AccessError::new(
                    StatusCode::BAD_REQUEST,
                    "PageTokenSnapshotGone",
                    "pageToken",
                    "…",
                    format!(
                        "the snapshot this page token reads (view {view} at version {version}) is no longer available ({e}); start again from the first page"
                    ),
                )
            })?;
        }
        Ok(table)
    }

    /// The slice index of the table at `dir`, `version` (see `slice`); the
    /// reason when the table cannot be sliced.
    pub async fn slice_index(
        &self,
        view: &str,
        version: u64,
    ) -> Result<crate::slice::CachedSlices, AccessError> {
        if let Some(ix) = self.slices.get(view, version) {
            return Ok(ix);
        }
        let table = self.table_version(view, version).await?;
        let index = crate::slice::SliceIndex::load(&table).await;
        if let Err(why) = &index {
            tracing::debug!(
                view,
                version,
                why,
                "no slice index; one-patient reads plan in DataFusion"
            );
        }
        Ok(self.slices.put(view, version, index))
    }

    /// Runs a plan in the serving session and collects its batches.
    pub async fn collect(
        &self,
        plan: datafusion::logical_expr::LogicalPlan,
    ) -> Result<Vec<arrow::record_batch::RecordBatch>, AccessError> {
        datafusion::dataframe::DataFrame::new(self.ctx.state(), plan)
            .collect()
            .await
            .map_err(crate::query::internal)
    }

    /// Runs a plan in the serving session as a stream of batches.
    pub async fn execute_stream(
        &self,
        plan: datafusion::logical_expr::LogicalPlan,
    ) -> Result<datafusion::execution::SendableRecordBatchStream, AccessError> {
        datafusion::dataframe::DataFrame::new(self.ctx.state(), plan)
            .execute_stream()
            .await
            .map_err(crate::query::internal)
    }
}

/// Where the resource store lives in the lake.
pub const STORE_DIR: &str = "tables/resources";

/// The resource store's current Delta version.
pub async fn store_version(tables: &Tables) -> Result<u64, AccessError> {
    tables.latest_version(STORE_DIR).await
}
