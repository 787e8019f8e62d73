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
    #[error("{0}")]
    Other(String),
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
