//! Materialized views: SQL-on-FHIR ViewDefinitions over the resource store,
//! written as Delta tables under `views/<name>/` in the lake.
//!
//! # What this crate owns
//! * The view catalog ([`ViewStore::list`], [`ViewStore::create`],
//!   [`ViewStore::drop_view`]): the built-in views from `atlas-ontology` plus
//!   user views kept as JSON under `catalog/views/<name>.json`.
//! * Full builds: each resource of the view's type is read once from the
//!   store's Parquet files, parsed once for every view over that type,
//!   evaluated on all cores into Arrow builders, sorted by patient key in
//!   bounded chunks and written as one Delta commit per view (Parquet
//!   statistics plus bloom filters on the resource and patient keys).
//! * Incremental refresh ([`ViewStore::refresh`]): only resources written
//!   since the store version the view reflects (found from the store's Delta
//!   log and the `atlas.batch_id` each ingest commit carries) are re-derived;
//!   their old rows are marked deleted with deletion vectors (or their files
//!   rewritten, past a fifth of a file) and new rows added in one atomic
//!   commit that also records the store version reached (a Delta `txn` action whose app
//!   id names the view and its definition hash, so a changed definition
//!   forces a full rebuild).
//! * Status ([`ViewStore::status`]) and the read-only SQL session over the
//!   lake's tables and every view ([`ViewStore::sql`]).
//!
//! # What it may call
//! `atlas-lake` (lake location, object store, Delta handles), `atlas-views`
//! (compiling and evaluating views), `atlas-ontology` (the built-in view
//! definitions), `deltalake`, `parquet` and DataFusion. It never writes the
//! resource store.

mod build;
mod catalog;
mod cluster;
mod dv;
mod scan;
mod sql;
pub mod sql_functions;

pub use build::{RefreshKind, RefreshOptions, RefreshReport};
pub use catalog::{ViewEntry, ViewOrigin, ViewStatus};
pub use sql::{SqlError, read_only_options};

/// The row positions a view file's deletion vector removes (for readers
/// that open view files directly, such as the serving layer's slice reads).
pub async fn deleted_rows(
    table: &deltalake::DeltaTable,
    file: &str,
    dv: &deltalake::kernel::DeletionVectorDescriptor,
) -> Result<roaring::RoaringTreemap, ViewStoreError> {
    dv::read(table, file, dv).await
}

use atlas_lake::{Lake, LakeError};

/// Everything that can go wrong with materialized views.
#[derive(Debug, thiserror::Error)]
pub enum ViewStoreError {
    #[error(transparent)]
    Lake(Box<LakeError>),
    #[error("view `{name}` is invalid:\n{diagnostics}")]
    Invalid { name: String, diagnostics: String },
    #[error("no view named `{0}` (see `atlas views list`)")]
    NotFound(String),
    #[error("{0}")]
    Refused(String),
    #[error("Delta table {table}: {source}")]
    Delta {
        table: String,
        source: Box<deltalake::DeltaTableError>,
    },
    #[error("reading {file}: {message}")]
    Read { file: String, message: String },
    /// An object of the lake (a catalog entry, a view table's file) could
    /// not be listed, read, written or deleted.
    #[error("{path}: {source}")]
    Store {
        path: String,
        #[source]
        source: object_store::Error,
    },
    /// A path in a view table's log is not a valid object path.
    #[error("{path}: {source}")]
    Path {
        path: String,
        #[source]
        source: object_store::path::Error,
    },
    /// A JSON document the catalog keeps could not be written.
    #[error("{path}: {source}")]
    Json {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    /// A view's Arrow schema has no Delta equivalent.
    #[error("view {view}: schema: {source}")]
    Schema {
        view: String,
        #[source]
        source: arrow::error::ArrowError,
    },
    /// Arrow refused a view's rows (finishing, concatenating, sorting or
    /// merging them).
    #[error("view {view}: {source}")]
    Arrow {
        view: String,
        #[source]
        source: arrow::error::ArrowError,
    },
    /// A view's row builders could not finish their batch.
    #[error("view {view}: {source}")]
    Rows {
        view: String,
        #[source]
        source: atlas_views::ViewError,
    },
    /// Writing a deletion-vector file for a view table failed.
    #[error("{table}: writing deletion vector {file}: {source}")]
    DeletionVector {
        table: String,
        file: String,
        #[source]
        source: Box<delta_kernel::Error>,
    },
    /// Registering a table or functions in a SQL session failed.
    #[error("SQL session, {what}: {source}")]
    Session {
        what: String,
        #[source]
        source: Box<datafusion::error::DataFusionError>,
    },
    /// A task of a view build panicked or was cancelled.
    #[error("{what} task failed: {source}")]
    Task {
        what: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("view {view} has no key column, so it cannot be refreshed incrementally")]
    NoKeyColumn { view: String },
    #[error("view {view}: clustering its files wrote {written} rows, expected {expected}")]
    ClusterRows {
        view: String,
        written: u64,
        expected: u64,
    },
}

impl From<LakeError> for ViewStoreError {
    fn from(e: LakeError) -> Self {
        ViewStoreError::Lake(Box::new(e))
    }
}

/// The materialized views of one lake.
#[derive(Debug, Clone)]
pub struct ViewStore {
    lake: Lake,
}

impl ViewStore {
    pub fn new(lake: Lake) -> ViewStore {
        ViewStore { lake }
    }

    pub fn lake(&self) -> &Lake {
        &self.lake
    }
}

/// Where view `name`'s Delta table lives, relative to the lake root.
pub fn view_table_dir(name: &str) -> String {
    format!("views/{name}")
}
