//! The view catalog: built-in views plus user views stored as JSON files
//! under `catalog/views/<name>.json` (one atomic object-store put each).

use std::sync::Arc;

use atlas_views::{CompiledView, ViewCompiler, ViewDefinition, render_diagnostics};
use futures::TryStreamExt;
use object_store::{ObjectStoreExt, PutPayload};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

use crate::{ViewStore, ViewStoreError, view_table_dir};

/// Where a view's definition comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ViewOrigin {
    /// Shipped with Atlas (`atlas-ontology/builtin/views`).
    Builtin,
    /// Created with `atlas views create`.
    User,
}

/// A view in the catalog, compiled.
#[derive(Debug, Clone)]
pub struct ViewEntry {
    pub name: String,
    pub origin: ViewOrigin,
    pub resource_type: String,
    /// The definition as stored.
    pub definition: Json,
    /// First 16 hex digits of the SHA-256 of the canonical definition JSON.
    pub hash: String,
    /// The column holding the resource key (a top-level `getResourceKey()`
    /// or `id` column); incremental refresh needs one.
    pub key_column: Option<String>,
    /// The column holding the patient key (`patient_id`, or a top-level
    /// `getReferenceKey(Patient)` column); rows are sorted by it.
    pub patient_column: Option<String>,
    pub plan: Arc<CompiledView>,
}

/// One row of `atlas views status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ViewStatus {
    pub name: String,
    pub origin: ViewOrigin,
    pub resource_type: String,
    /// False until the first refresh.
    pub materialized: bool,
    pub rows: u64,
    pub files: u64,
    /// The view table's Delta version.
    pub table_version: Option<i64>,
    /// The resource-store version the view reflects (for the current definition).
    pub store_version: Option<i64>,
    /// The resource store's current version.
    pub store_latest: Option<i64>,
    /// Store commits not yet reflected; `None` when the view was never built
    /// for its current definition.
    pub lag_versions: Option<i64>,
    /// When the last refresh committed (RFC 3339).
    pub last_refresh: Option<String>,
    pub incremental: bool,
}

/// View names are SQL identifiers: the same name works in `atlas sql`,
/// DuckDB and Spark without quoting.
pub fn is_valid_view_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 64
}

const RESERVED: &[&str] = &["resources", "quarantine", "batches"];

impl ViewEntry {
    /// Parses, validates and compiles a view definition. `name` overrides the
    /// definition's own `name`.
    pub fn from_json(
        text: &str,
        origin: ViewOrigin,
        name: Option<&str>,
    ) -> Result<ViewEntry, ViewStoreError> {
        let label = name.unwrap_or("(unnamed)").to_owned();
        let definition: Json = serde_json::from_str(text).map_err(|e| ViewStoreError::Invalid {
            name: label.clone(),
            diagnostics: format!("not JSON: {e}"),
        })?;
        let parsed =
            ViewDefinition::from_json(&definition).map_err(|d| ViewStoreError::Invalid {
                name: label.clone(),
                diagnostics: render_diagnostics(&d),
            })?;
        let name = match name.map(str::to_owned).or(parsed.name.clone()) {
            Some(n) => n,
            None => {
                return Err(ViewStoreError::Invalid {
                    name: label,
                    diagnostics:
                        "name: a materialized view needs a name (set `name` or pass --name)".into(),
                });
            }
        };
        if !is_valid_view_name(&name) {
            return Err(ViewStoreError::Invalid {
                name: name.clone(),
                diagnostics: format!(
                    "name: `{name}` must be a lower-case SQL identifier ([a-z_][a-z0-9_]*, at most 64)"
                ),
            });
        }
        let plan = ViewCompiler::new()
            .compile(&parsed)
            .map_err(|d| ViewStoreError::Invalid {
                name: name.clone(),
                diagnostics: render_diagnostics(&d),
            })?;
        let canonical = serde_json::to_string(&definition).unwrap_or_default();
        let hash = hex::encode(&Sha256::digest(canonical.as_bytes())[..8]);
        let (key_column, patient_column) = key_columns(&definition);
        Ok(ViewEntry {
            name,
            origin,
            resource_type: plan.resource_type().to_owned(),
            definition,
            hash,
            key_column,
            patient_column,
            plan: Arc::new(plan),
        })
    }

    /// The Delta `txn` app id recording which store version this definition reflects.
    pub fn app_id(&self) -> String {
        format!("atlas-view/{}/{}", self.name, self.hash)
    }

    pub fn table_dir(&self) -> String {
        view_table_dir(&self.name)
    }
}

/// Finds the resource-key and patient-key columns among the top-level
/// select's plain columns (not under forEach/repeat/unionAll, where paths are
/// relative to another focus).
fn key_columns(def: &Json) -> (Option<String>, Option<String>) {
    let (mut key, mut patient) = (None, None);
    let selects = def.get("select").and_then(Json::as_array);
    for s in selects.into_iter().flatten() {
        let iterates = ["forEach", "forEachOrNull", "repeat"]
            .iter()
            .any(|k| s.get(k).is_some());
        if iterates {
            continue;
        }
        for c in s
            .get("column")
            .and_then(Json::as_array)
            .into_iter()
            .flatten()
        {
            let (Some(name), Some(path)) = (
                c.get("name").and_then(Json::as_str),
                c.get("path").and_then(Json::as_str),
            ) else {
                continue;
            };
            let path: String = path.chars().filter(|c| !c.is_whitespace()).collect();
            if key.is_none() && (path == "getResourceKey()" || path == "id") {
                key = Some(name.to_owned());
            }
            if patient.is_none()
                && (name == "patient_id" || path.ends_with("getReferenceKey(Patient)"))
            {
                patient = Some(name.to_owned());
            }
        }
    }
    (key, patient)
}

impl ViewStore {
    fn catalog_path(&self, name: &str) -> object_store::path::Path {
        self.lake.path(&format!("catalog/views/{name}.json"))
    }

    /// Built-in views first (in their fixed order), then user views by name.
    pub async fn list(&self) -> Result<Vec<ViewEntry>, ViewStoreError> {
        let mut out = Vec::new();
        for b in atlas_ontology::builtin_views() {
            out.push(ViewEntry::from_json(
                b.json,
                ViewOrigin::Builtin,
                Some(b.name),
            )?);
        }
        let store = self.lake.object_store();
        let prefix = self.lake.path("catalog/views");
        let mut metas: Vec<_> =
            store
                .list(Some(&prefix))
                .try_collect()
                .await
                .map_err(|source| ViewStoreError::Store {
                    path: prefix.to_string(),
                    source,
                })?;
        metas.sort_by(|a, b| a.location.cmp(&b.location));
        for m in metas {
            let Some(file) = m.location.filename() else {
                continue;
            };
            let Some(name) = file.strip_suffix(".json") else {
                continue;
            };
            let read = |source: object_store::Error| ViewStoreError::Store {
                path: m.location.to_string(),
                source,
            };
            let bytes = store
                .get(&m.location)
                .await
                .map_err(read)?
                .bytes()
                .await
                .map_err(read)?;
            let text = String::from_utf8_lossy(&bytes);
            out.push(ViewEntry::from_json(&text, ViewOrigin::User, Some(name))?);
        }
        Ok(out)
    }

    /// The named view, or [`ViewStoreError::NotFound`].
    pub async fn get(&self, name: &str) -> Result<ViewEntry, ViewStoreError> {
        self.list()
            .await?
            .into_iter()
            .find(|v| v.name == name)
            .ok_or_else(|| ViewStoreError::NotFound(name.to_owned()))
    }

    /// Adds a user view (validated and compiled first; nothing is stored when
    /// it is invalid). With `replace`, an existing user view of that name is
    /// replaced and its table is rebuilt on the next refresh.
    pub async fn create(
        &self,
        text: &str,
        name: Option<&str>,
        replace: bool,
    ) -> Result<ViewEntry, ViewStoreError> {
        let entry = ViewEntry::from_json(text, ViewOrigin::User, name)?;
        if RESERVED.contains(&entry.name.as_str()) {
            return Err(ViewStoreError::Refused(format!(
                "`{}` is the name of a lake table; choose another view name",
                entry.name
            )));
        }
        if atlas_ontology::builtin_views()
            .iter()
            .any(|b| b.name == entry.name)
        {
            return Err(ViewStoreError::Refused(format!(
                "`{}` is a built-in view; copy it under another name to change it",
                entry.name
            )));
        }
        let exists = self.list().await?.iter().any(|v| v.name == entry.name);
        if exists && !replace {
            return Err(ViewStoreError::Refused(format!(
                "view `{}` exists; pass --replace to change its definition",
                entry.name
            )));
        }
        let path = self.catalog_path(&entry.name);
        let pretty = serde_json::to_vec_pretty(&entry.definition).map_err(|source| {
            ViewStoreError::Json {
                path: path.to_string(),
                source,
            }
        })?;
        self.lake
            .object_store()
            .put(&path, PutPayload::from(pretty))
            .await
            .map_err(|source| ViewStoreError::Store {
                path: path.to_string(),
                source,
            })?;
        Ok(entry)
    }

    /// Removes a user view and its table. Built-in views cannot be dropped.
    pub async fn drop_view(&self, name: &str) -> Result<(), ViewStoreError> {
        let entry = self.get(name).await?;
        if entry.origin == ViewOrigin::Builtin {
            return Err(ViewStoreError::Refused(format!(
                "`{name}` is a built-in view and cannot be dropped"
            )));
        }
        let store = self.lake.object_store();
        // The catalog entry goes first: a crash after it leaves only an
        // orphaned table folder, which the next create of that name overwrites.
        let path = self.catalog_path(name);
        store
            .delete(&path)
            .await
            .map_err(|source| ViewStoreError::Store {
                path: path.to_string(),
                source,
            })?;
        let prefix = self.lake.path(&entry.table_dir());
        let files: Vec<_> = store
            .list(Some(&prefix))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(|source| ViewStoreError::Store {
                path: prefix.to_string(),
                source,
            })?;
        for f in files {
            store
                .delete(&f)
                .await
                .map_err(|source| ViewStoreError::Store {
                    path: f.to_string(),
                    source,
                })?;
        }
        if self.lake.is_local()
            && let Ok(root) = self.lake.root().to_file_path()
        {
            let _ = std::fs::remove_dir_all(root.join(entry.table_dir()));
        }
        Ok(())
    }

    /// Status of every view.
    pub async fn status(&self) -> Result<Vec<ViewStatus>, ViewStoreError> {
        let store_latest = match self.lake.table(atlas_lake::lake::RESOURCES).await? {
            Some(t) => t.version().map(|v| v as i64),
            None => None,
        };
        let mut out = Vec::new();
        for v in self.list().await? {
            let mut s = ViewStatus {
                name: v.name.clone(),
                origin: v.origin,
                resource_type: v.resource_type.clone(),
                materialized: false,
                rows: 0,
                files: 0,
                table_version: None,
                store_version: None,
                store_latest,
                lag_versions: None,
                last_refresh: None,
                incremental: v.key_column.is_some(),
            };
            if let Some(table) = self.lake.table_at(&v.table_dir()).await? {
                s.materialized = true;
                s.table_version = table.version().map(|v| v as i64);
                let snapshot = table.snapshot().map_err(|e| ViewStoreError::Delta {
                    table: v.name.clone(),
                    source: Box::new(e),
                })?;
                for f in snapshot.log_data().iter() {
                    s.files += 1;
                    s.rows += crate::dv::live_rows(
                        f.num_records(),
                        f.deletion_vector_descriptor().as_ref(),
                    );
                }
                s.store_version = snapshot
                    .transaction_version(table.log_store().as_ref(), v.app_id())
                    .await
                    .map_err(|e| ViewStoreError::Delta {
                        table: v.name.clone(),
                        source: Box::new(e),
                    })?;
                s.lag_versions = match (s.store_version, store_latest) {
                    (Some(a), Some(b)) => Some(b - a),
                    _ => None,
                };
                let mut history = table.history(Some(1));
                let last = futures::StreamExt::next(&mut history)
                    .await
                    .and_then(Result::ok);
                s.last_refresh = last
                    .and_then(|c| c.timestamp)
                    .and_then(chrono::DateTime::from_timestamp_millis)
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
            }
            out.push(s);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_names_are_sql_identifiers() {
        assert!(is_valid_view_name("patient"));
        assert!(is_valid_view_name("obs_2024"));
        assert!(!is_valid_view_name("Patient"));
        assert!(!is_valid_view_name("1obs"));
        assert!(!is_valid_view_name("a-b"));
        assert!(!is_valid_view_name(""));
    }

    #[test]
    fn key_columns_are_found_only_at_top_level() {
        let def = serde_json::json!({"resource": "Observation", "select": [
            {"column": [{"name": "oid", "path": "getResourceKey()"},
                        {"name": "subj", "path": "subject.getReferenceKey( Patient )"}]},
            {"forEach": "component", "column": [{"name": "cid", "path": "id"}]}]});
        assert_eq!(
            key_columns(&def),
            (Some("oid".to_owned()), Some("subj".to_owned()))
        );
        let def = serde_json::json!({"resource": "Observation", "select": [
            {"forEach": "component", "column": [{"name": "cid", "path": "id"}]}]});
        assert_eq!(key_columns(&def), (None, None));
    }

    #[test]
    fn invalid_views_are_refused_with_diagnostics() {
        let err = ViewEntry::from_json(
            r#"{"resourceType": "ViewDefinition", "name": "bad", "resource": "Patient",
                "select": [{"column": [{"name": "x", "path": "name.nosuchfn()"}]}]}"#,
            ViewOrigin::User,
            None,
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("select[0].column[0].path"), "{err}");
        let err = ViewEntry::from_json(
            r#"{"resource": "Patient", "select": [{"column": [{"name": "id", "path": "id"}]}]}"#,
            ViewOrigin::User,
            None,
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("needs a name"), "{err}");
    }
}
