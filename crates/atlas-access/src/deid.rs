//! De-identification at egress: a policy rule with `deid = "…"` makes its
//! grant read FHIR resources de-identified (`atlas-deid`) on the way out.
//!
//! Such a grant reads FHIR search results and NDJSON streams only, with
//! search parameters that cannot single out a person (`code`, `status`,
//! paging, format). Reads by id, `$everything`, `_id`, `patient`/`subject`,
//! `date`, `_lastUpdated` and `_sort` would take or reveal identified
//! values (a real id, a real date's order) and are refused, as are the row
//! paths (object sets, GraphQL, view rows, aggregates), whose columns are
//! not de-identified: a 403 `DeidentifiedOnly`, never identified data.
//!
//! The secret comes from `[deid] key_file` or `ATLAS_DEID_KEY`; without it
//! a de-identifying grant fails closed (503).

use crate::AccessError;
use atlas_deid::{DeidConfig, Deidentifier, profile};
use http::StatusCode;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// `[deid]` in `atlas.toml`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeidConfigSection {
    /// A file whose first line is the secret for hashing and date offsets
    /// (else `ATLAS_DEID_KEY`).
    pub key_file: Option<PathBuf>,
}

/// The search parameters a de-identifying grant may use.
pub const ALLOWED_PARAMS: &[&str] = &[
    "code",
    "status",
    "_count",
    "_total",
    "_format",
    "_page_token",
];

/// Loaded de-identifiers by the name a rule gives.
#[derive(Default)]
pub struct Engines {
    key: Option<String>,
    /// Relative configuration paths are read from here (the policy file's folder).
    base: Option<PathBuf>,
    cache: Mutex<HashMap<String, Arc<Deidentifier>>>,
}

impl Engines {
    pub fn new(section: &DeidConfigSection, policy_file: Option<&Path>) -> Result<Engines, String> {
        let key = match &section.key_file {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| format!("[deid] key_file {}: {e}", p.display()))?;
                Some(text.lines().next().unwrap_or("").trim().to_string())
                    .filter(|k| !k.is_empty())
                    .ok_or_else(|| format!("[deid] key_file {} is empty", p.display()))
                    .map(Some)?
            }
            None => std::env::var("ATLAS_DEID_KEY")
                .ok()
                .map(|k| k.trim().to_string())
                .filter(|k| !k.is_empty()),
        };
        Ok(Engines {
            key,
            base: policy_file.and_then(|p| p.parent().map(Path::to_path_buf)),
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The de-identifier a grant names (loaded once).
    pub fn get(&self, spec: &str) -> Result<Arc<Deidentifier>, AccessError> {
        let unavailable = |msg: String| {
            AccessError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "DeidentificationUnavailable",
                "deid",
                spec,
                msg,
            )
        };
        if let Some(e) = self.cache.lock().ok().and_then(|c| c.get(spec).cloned()) {
            return Ok(e);
        }
        let config = if profile::PROFILES.contains(&spec) {
            let key = self.key.as_deref().ok_or_else(|| {
                unavailable(
                    "the policy de-identifies this grant but no key is configured ([deid] key_file or ATLAS_DEID_KEY)"
                        .into(),
                )
            })?;
            profile::by_name(spec, key).map_err(|e| unavailable(e.to_string()))?
        } else {
            let path = match &self.base {
                Some(b) => b.join(spec),
                None => PathBuf::from(spec),
            };
            let text = std::fs::read_to_string(&path)
                .map_err(|e| unavailable(format!("{}: {e}", path.display())))?;
            DeidConfig::from_json(&text).map_err(|e| unavailable(e.to_string()))?
        };
        let engine = Arc::new(Deidentifier::new(config).with_change_records(false));
        if let Ok(mut c) = self.cache.lock() {
            c.insert(spec.to_string(), engine.clone());
        }
        Ok(engine)
    }
}

/// The 403 of a path a de-identifying grant may not use.
pub fn refused(parameter: &str, value: &str, why: &str) -> AccessError {
    AccessError::new(
        StatusCode::FORBIDDEN,
        "DeidentifiedOnly",
        parameter,
        value,
        format!("this grant reads de-identified FHIR resources only: {why}"),
    )
}

/// De-identifies one stored resource: its JSON and its new id. A resource
/// the engine cannot process leaves as an empty one labelled REDACTED
/// (fail closed).
pub fn apply(
    engine: &Deidentifier,
    resource_type: &str,
    json: &str,
    patient: Option<&str>,
) -> (String, Option<String>) {
    let ctx = atlas_deid::ResourceContext {
        patient_id: patient,
        ..Default::default()
    };
    match engine.deidentify_str(json, &ctx) {
        Ok(d) => (d.to_json_string(), d.id),
        Err(_) => (
            atlas_deid::Deidentified::emptied(resource_type).to_json_string(),
            None,
        ),
    }
}
