//! The lake's location and the handles to its object store and Delta tables.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use datafusion::prelude::SessionContext;
use deltalake::DeltaTable;
use object_store::ObjectStore;
use object_store::path::Path as ObjPath;
use url::Url;

#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    #[error("lake location `{0}` is not a folder or a URL: {1}")]
    Location(String, String),
    #[error("object store at {url}: {source}")]
    Store {
        url: String,
        source: object_store::Error,
    },
    #[error("Delta table {table}: {source}")]
    Delta {
        table: String,
        source: deltalake::DeltaTableError,
    },
    #[error("query on {table}: {source}")]
    Query {
        table: String,
        source: datafusion::error::DataFusionError,
    },
    #[error(
        "the lake at {lake} is being written by {holder}; run again with --wait to wait for it, or later"
    )]
    Busy {
        lake: String,
        holder: Box<crate::lease::LeaseHolder>,
    },
    #[error(
        "lost the writer lease {generation} of the lake at {lake} (it expired and another writer took it over); nothing more was committed, run again to resume"
    )]
    LeaseLost { lake: String, generation: u64 },
    #[error(
        "another writer committed to Delta table {table} during this run ({source}); this run committed nothing more, run it again to resume"
    )]
    ConcurrentWriter {
        table: String,
        source: deltalake::DeltaTableError,
    },
    /// A file or folder of the lake could not be created, read or written.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Copying an input into `raw/` failed.
    #[error("landing {input} at {path}: {source}")]
    Land {
        input: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A JSON record the lake keeps (manifest, chunk counts, start record,
    /// lease record, the batches row's inputs) could not be written or read.
    #[error("{path}: {source}")]
    Json {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    /// Arrow refused the rows built for a table (or another named batch).
    #[error("{table}: {source}")]
    Arrow {
        table: String,
        #[source]
        source: arrow::error::ArrowError,
    },
    /// A column of a scanned batch could not be cast to what it is read as.
    #[error("column {column}: {source}")]
    ColumnCast {
        column: String,
        #[source]
        source: arrow::error::ArrowError,
    },
    /// A column of a scanned batch has another type than it is read as.
    #[error("column {column} is not {expected}")]
    ColumnType {
        column: String,
        expected: &'static str,
    },
    /// Encoding a table's rows as Parquet failed.
    #[error("{table}: writing Parquet: {source}")]
    Parquet {
        table: String,
        #[source]
        source: deltalake::parquet::errors::ParquetError,
    },
    /// Hashing the ingest inputs failed (the error names the input).
    #[error("hashing the inputs: {source}")]
    Inputs {
        #[source]
        source: atlas_ingest::InputError,
    },
    /// Reading the inputs for their identifiers (before the run) failed.
    #[error("pre-scanning the inputs for identifiers: {source}")]
    Prescan {
        #[source]
        source: std::io::Error,
    },
    /// A thread of the ingest pipeline could not be started.
    #[error("cannot start {what}: {source}")]
    Spawn {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A task of the ingest pipeline panicked or was cancelled.
    #[error("{what} task failed: {source}")]
    Task {
        what: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("batch {batch} is recorded but its manifest is missing at {path}")]
    ManifestMissing { batch: String, path: String },
    #[error(
        "another writer created {table} during this run (batch {batch}); this run committed nothing to it, run it again"
    )]
    CreatedConcurrently { table: String, batch: String },
}

/// A DataFusion session configured for lake tables: strings read as plain
/// `Utf8` (not views) so results have one predictable shape.
pub fn new_session() -> SessionContext {
    let mut config = datafusion::prelude::SessionConfig::new();
    config
        .options_mut()
        .execution
        .parquet
        .schema_force_view_types = false;
    SessionContext::new_with_config(config)
}

/// Column `i` of `batch` as plain `Utf8`, whatever string encoding the scan
/// chose (partition columns come dictionary-encoded, strings may be views).
pub fn text_column(batch: &RecordBatch, i: usize) -> Result<arrow::array::StringArray, LakeError> {
    let cast = arrow::compute::cast(batch.column(i), &arrow::datatypes::DataType::Utf8).map_err(
        |source| LakeError::ColumnCast {
            column: i.to_string(),
            source,
        },
    )?;
    cast.as_any()
        .downcast_ref::<arrow::array::StringArray>()
        .cloned()
        .ok_or_else(|| LakeError::ColumnType {
            column: i.to_string(),
            expected: "text",
        })
}

/// Calls `f(row, value)` for every row of a text column without copying
/// it (Utf8, LargeUtf8 and Utf8View read as they are; other encodings, such
/// as dictionaries, are cast first).
pub fn for_each_text(
    column: &dyn arrow::array::Array,
    mut f: impl FnMut(usize, Option<&str>),
) -> Result<(), LakeError> {
    use arrow::array::{Array, LargeStringArray, StringArray, StringViewArray};
    fn each<'a>(
        n: usize,
        valid: impl Fn(usize) -> bool,
        value: impl Fn(usize) -> &'a str,
        f: &mut impl FnMut(usize, Option<&'a str>),
    ) {
        for i in 0..n {
            f(i, valid(i).then(|| value(i)));
        }
    }
    let any = column.as_any();
    if let Some(a) = any.downcast_ref::<StringArray>() {
        each(a.len(), |i| a.is_valid(i), |i| a.value(i), &mut f);
    } else if let Some(a) = any.downcast_ref::<StringViewArray>() {
        each(a.len(), |i| a.is_valid(i), |i| a.value(i), &mut f);
    } else if let Some(a) = any.downcast_ref::<LargeStringArray>() {
        each(a.len(), |i| a.is_valid(i), |i| a.value(i), &mut f);
    } else {
        // The caller's column has no name here; its type is what went wrong.
        let column_type = || format!("of type {}", column.data_type());
        let cast =
            arrow::compute::cast(column, &arrow::datatypes::DataType::Utf8).map_err(|source| {
                LakeError::ColumnCast {
                    column: column_type(),
                    source,
                }
            })?;
        let a =
            cast.as_any()
                .downcast_ref::<StringArray>()
                .ok_or_else(|| LakeError::ColumnType {
                    column: column_type(),
                    expected: "text",
                })?;
        each(a.len(), |i| a.is_valid(i), |i| a.value(i), &mut f);
    }
    Ok(())
}

/// The three tables every lake has.
pub const RESOURCES: &str = "resources";
pub const QUARANTINE: &str = "quarantine";
pub const BATCHES: &str = "batches";

/// A lake: a root URL plus the options to reach it.
#[derive(Clone)]
pub struct Lake {
    root: Url,
    storage_options: HashMap<String, String>,
    store: Arc<dyn ObjectStore>,
    prefix: ObjPath,
}

impl std::fmt::Debug for Lake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lake")
            .field("root", &self.root.as_str())
            .finish()
    }
}

/// Storage options from the environment: every `AWS_*`, `AZURE_*` and
/// `GOOGLE_*` variable, as deltalake and object_store both understand them.
pub fn storage_options_from_env() -> HashMap<String, String> {
    let mut out = HashMap::new();
    for (k, v) in std::env::vars() {
        if k.starts_with("AWS_") || k.starts_with("AZURE_") || k.starts_with("GOOGLE_") {
            out.insert(k, v);
        }
    }
    out
}

impl Lake {
    /// Opens (and for a local folder, creates) the lake at `location`: a path or
    /// a `file://`, `s3://`, `gs://` or `az://` URL.
    pub fn open(
        location: &str,
        storage_options: HashMap<String, String>,
    ) -> Result<Lake, LakeError> {
        let root = if location.contains("://") {
            let mut u = Url::parse(location)
                .map_err(|e| LakeError::Location(location.into(), e.to_string()))?;
            if !u.path().ends_with('/') {
                u.set_path(&format!("{}/", u.path()));
            }
            u
        } else {
            let p = Path::new(location);
            std::fs::create_dir_all(p)
                .map_err(|e| LakeError::Location(location.into(), e.to_string()))?;
            let abs = std::fs::canonicalize(p)
                .map_err(|e| LakeError::Location(location.into(), e.to_string()))?;
            Url::from_directory_path(&abs)
                .map_err(|_| LakeError::Location(location.into(), "not absolute".into()))?
        };
        if root.scheme() == "file"
            && let Ok(p) = root.to_file_path()
        {
            std::fs::create_dir_all(&p)
                .map_err(|e| LakeError::Location(location.into(), e.to_string()))?;
        }
        // object_store wants lower-case keys (`aws_endpoint`), deltalake accepts either.
        let lower: Vec<(String, String)> = storage_options
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .flat_map(|(k, v)| {
                let short = k.strip_prefix("aws_").map(str::to_owned);
                std::iter::once((k, v.clone())).chain(short.map(|s| (s, v)))
            })
            .collect();
        let (store, prefix) =
            object_store::parse_url_opts(&root, lower).map_err(|source| LakeError::Store {
                url: root.to_string(),
                source,
            })?;
        Ok(Lake {
            root,
            storage_options,
            store: Arc::from(store),
            prefix,
        })
    }

    pub fn root(&self) -> &Url {
        &self.root
    }

    pub fn is_local(&self) -> bool {
        self.root.scheme() == "file"
    }

    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// An object path below the lake root.
    pub fn path(&self, relative: &str) -> ObjPath {
        let mut p = self.prefix.clone();
        for part in relative.split('/').filter(|s| !s.is_empty()) {
            p = p.join(part);
        }
        p
    }

    pub fn table_url(&self, name: &str) -> Url {
        self.table_url_at(&format!("tables/{name}"))
    }

    /// The URL of a Delta table at `dir` (relative to the lake root, e.g. `views/patient`).
    pub fn table_url_at(&self, dir: &str) -> Url {
        // Joining a relative path onto a directory URL cannot fail.
        self.root
            .join(&format!("{}/", dir.trim_end_matches('/')))
            .unwrap_or_else(|_| self.root.clone())
    }

    /// The options used to reach the lake's object store (for Delta writers).
    pub fn storage_options(&self) -> &HashMap<String, String> {
        &self.storage_options
    }

    /// The table, loaded at its latest version; `None` when it does not exist yet.
    pub async fn table(&self, name: &str) -> Result<Option<DeltaTable>, LakeError> {
        self.table_at(&format!("tables/{name}")).await
    }

    /// The table at `dir` (relative to the lake root), or `None` when it does not exist.
    pub async fn table_at(&self, dir: &str) -> Result<Option<DeltaTable>, LakeError> {
        // Look for a commit first: loading a missing table makes the kernel log errors.
        let log = self.path(&format!("{dir}/_delta_log"));
        let mut listing = self.store.list(Some(&log));
        match futures::StreamExt::next(&mut listing).await {
            None => return Ok(None),
            Some(Err(object_store::Error::NotFound { .. })) => return Ok(None),
            Some(Err(source)) => {
                return Err(LakeError::Store {
                    url: log.to_string(),
                    source,
                });
            }
            Some(Ok(_)) => {}
        }
        let t = self.table_handle_at(dir).await?;
        Ok(t.version().is_some().then_some(t))
    }

    /// A handle that may point at a table that does not exist yet (for a first write).
    pub async fn table_handle(&self, name: &str) -> Result<DeltaTable, LakeError> {
        self.table_handle_at(&format!("tables/{name}")).await
    }

    /// [`Lake::table_handle`] for a table at `dir` relative to the lake root.
    pub async fn table_handle_at(&self, dir: &str) -> Result<DeltaTable, LakeError> {
        let name = dir;
        let url = self.table_url_at(dir);
        if url.scheme() == "file"
            && let Ok(p) = url.to_file_path()
        {
            std::fs::create_dir_all(&p).map_err(|source| LakeError::Io {
                path: p.display().to_string(),
                source,
            })?;
        }
        DeltaTable::try_from_url_with_storage_options(url, self.storage_options.clone())
            .await
            .map_err(|source| LakeError::Delta {
                table: name.into(),
                source,
            })
    }

    /// A DataFusion session with every existing lake table registered by name.
    pub async fn session(&self) -> Result<SessionContext, LakeError> {
        let ctx = new_session();
        for name in [RESOURCES, QUARANTINE, BATCHES] {
            if let Some(t) = self.table(name).await? {
                t.update_datafusion_session(&ctx.state())
                    .map_err(|source| LakeError::Delta {
                        table: name.into(),
                        source,
                    })?;
                let provider = t
                    .table_provider()
                    .await
                    .map_err(|source| LakeError::Query {
                        table: name.into(),
                        source,
                    })?;
                ctx.register_table(name, provider)
                    .map_err(|source| LakeError::Query {
                        table: name.into(),
                        source,
                    })?;
            }
        }
        Ok(ctx)
    }

    /// Runs a query over the lake's tables and collects the result.
    pub async fn query(&self, sql: &str) -> Result<Vec<RecordBatch>, LakeError> {
        let ctx = self.session().await?;
        let q = |source| LakeError::Query {
            table: sql.chars().take(80).collect(),
            source,
        };
        ctx.sql(sql).await.map_err(q)?.collect().await.map_err(q)
    }

    /// Runs a query and renders every value as text (`None` for NULL): for
    /// tests, diagnostics and simple command output.
    pub async fn query_text(&self, sql: &str) -> Result<Vec<Vec<Option<String>>>, LakeError> {
        let mut out = Vec::new();
        for b in self.query(sql).await? {
            let cols = (0..b.num_columns())
                .map(|i| text_column(&b, i))
                .collect::<Result<Vec<_>, _>>()?;
            for r in 0..b.num_rows() {
                out.push(
                    cols.iter()
                        .map(|c| {
                            (!arrow::array::Array::is_null(c, r)).then(|| c.value(r).to_owned())
                        })
                        .collect(),
                );
            }
        }
        Ok(out)
    }

    /// True when the named table exists.
    pub async fn has_table(&self, name: &str) -> Result<bool, LakeError> {
        Ok(self.table(name).await?.is_some())
    }
}
