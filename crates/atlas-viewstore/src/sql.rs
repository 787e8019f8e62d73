//! Read-only SQL over the lake: the store tables (`resources`, `quarantine`,
//! `batches`) and every materialized view, by name, in one DataFusion session.

use datafusion::execution::context::SQLOptions;
use datafusion::prelude::{DataFrame, SessionContext};

use crate::{ViewStore, ViewStoreError};

/// Why a query was not run.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    #[error(
        "atlas sql is read-only: only queries (SELECT, WITH, VALUES, EXPLAIN, SHOW, DESCRIBE) run here; {0}"
    )]
    NotReadOnly(String),
    #[error("{0}")]
    Query(String),
    #[error(transparent)]
    Store(#[from] ViewStoreError),
}

/// The options that make a session read-only: no DDL (CREATE/DROP), no DML
/// (INSERT/UPDATE/DELETE/COPY), no statements (SET, transactions).
pub fn read_only_options() -> SQLOptions {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

impl ViewStore {
    /// A session with the lake's tables and every materialized view registered.
    pub async fn session(&self) -> Result<SessionContext, ViewStoreError> {
        let ctx = self.lake.session().await?;
        // FHIRPath and JSON functions, so SQL can read the `resources` table as FHIR.
        crate::sql_functions::register(&ctx).map_err(|e| ViewStoreError::Session {
            what: "registering the FHIRPath and JSON SQL functions".into(),
            source: Box::new(e),
        })?;
        for v in self.list().await? {
            let Some(table) = self.lake.table_at(&v.table_dir()).await? else {
                continue;
            };
            table
                .update_datafusion_session(&ctx.state())
                .map_err(|e| ViewStoreError::Delta {
                    table: v.name.clone(),
                    source: Box::new(e),
                })?;
            let provider = table
                .table_provider()
                .await
                .map_err(|e| ViewStoreError::Session {
                    what: format!("opening view {}", v.name),
                    source: Box::new(e),
                })?;
            ctx.register_table(v.name.as_str(), provider)
                .map_err(|e| ViewStoreError::Session {
                    what: format!("registering view {}", v.name),
                    source: Box::new(e),
                })?;
        }
        Ok(ctx)
    }

    /// Plans a read-only query; write statements are refused before anything runs.
    pub async fn sql(&self, query: &str) -> Result<DataFrame, SqlError> {
        let ctx = self.session().await?;
        ctx.sql_with_options(query, read_only_options())
            .await
            .map_err(|e| {
                let text = e.to_string();
                if text.contains("not supported") && is_write_error(&text) {
                    SqlError::NotReadOnly(text)
                } else {
                    SqlError::Query(text)
                }
            })
    }
}

fn is_write_error(text: &str) -> bool {
    ["DDL", "DML", "Statement"].iter().any(|k| text.contains(k))
}
