//! Every request leaves an audit record (`atlas-audit`), written before its
//! response goes out.
//!
//! The `audit` middleware wraps every route but `/health` and `/metrics`:
//! it normalises the request (sorted query parameters, the body's SHA-256),
//! runs the handler inside a task-local [`Facts`] that the access seam
//! fills in (who, via the `Principal` extractor; each decision's resource
//! type, rules and hidden fields, via `AppState::decide`; rows answered,
//! via `Metrics::rows`), then chains and writes the record. If the record
//! cannot be written the client gets a 503 instead of the answer: no data
//! leaves without its record.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use atlas_audit::{AuditEntry, AuditLog, AuditStore};
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::{ApiError, AppState};

/// `[audit]` in `atlas.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Write a record per request (on by default; off only for
    /// benchmarks and tests that measure without it).
    pub enabled: bool,
    /// The largest request body buffered to hash it (bytes).
    pub max_body_bytes: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            enabled: true,
            max_body_bytes: 4 << 20,
        }
    }
}

/// Opens the lake's audit trail.
pub async fn open(lake: &atlas_lake::Lake) -> Result<AuditLog, String> {
    let local = lake
        .is_local()
        .then(|| lake.root().to_file_path().ok())
        .flatten();
    let store = AuditStore::new(lake.object_store().clone(), &lake.path(""), local);
    AuditLog::open(store).await.map_err(|e| e.to_string())
}

/// What the handler learned while answering, for the record.
#[derive(Debug, Default)]
pub struct Facts {
    pub subject: Option<String>,
    pub issuer: Option<String>,
    pub client: Option<String>,
    pub purpose: Option<String>,
    pub resource_types: BTreeSet<String>,
    pub rules: BTreeSet<String>,
    pub denied: bool,
    pub fields_removed: BTreeSet<String>,
    pub rows: u64,
    /// The patients whose rows the answer holds (up to `MAX_PATIENTS`).
    pub patients: BTreeSet<String>,
    /// More distinct patients than `MAX_PATIENTS` were answered.
    pub patients_overflow: bool,
}

/// Distinct patients remembered per request; beyond, the record says "at
/// least this many".
const MAX_PATIENTS: usize = 100_000;

/// Patient ids listed in a record; above this only the count is written.
const LISTED_PATIENTS: usize = 20;

/// A patient whose row is in the answer.
pub fn note_patient(p: &str) {
    note(|f| {
        if f.patients.len() < MAX_PATIENTS {
            if !f.patients.contains(p) {
                f.patients.insert(p.to_owned());
            }
        } else if !f.patients.contains(p) {
            f.patients_overflow = true;
        }
    });
}

/// The current request's facts, to carry into work it spawns (GraphQL's
/// batched link loads run in tasks of their own).
pub fn current() -> Option<Arc<Mutex<Facts>>> {
    FACTS.try_with(|f| f.clone()).ok()
}

/// Runs `fut` with `facts` as the current request's facts.
pub async fn scoped<F: std::future::Future>(facts: Option<Arc<Mutex<Facts>>>, fut: F) -> F::Output {
    match facts {
        Some(f) => FACTS.scope(f, fut).await,
        None => fut.await,
    }
}

tokio::task_local! {
    static FACTS: Arc<Mutex<Facts>>;
}

/// Adds to the current request's facts (nothing outside a request, e.g.
/// in a streamed body's later polls).
pub fn note(f: impl FnOnce(&mut Facts)) {
    let _ = FACTS.try_with(|facts| {
        if let Ok(mut g) = facts.lock() {
            f(&mut g);
        }
    });
}

/// The decision for one resource type, noted.
pub fn note_decision(resource_type: &str, d: &atlas_policy::Decision) {
    note(|f| {
        f.resource_types.insert(resource_type.to_owned());
        match d {
            atlas_policy::Decision::Allow(g) => {
                f.rules.extend(g.rules.iter().cloned());
                f.fields_removed
                    .extend(g.hidden.iter().map(|h| format!("{resource_type}.{h}")));
            }
            atlas_policy::Decision::Deny(x) => {
                f.denied = true;
                f.rules.extend(x.rule.iter().cloned());
            }
        }
    });
}

/// The path and query parameters, sorted, so equal requests normalise
/// equally.
fn normal_query(q: Option<&str>) -> String {
    let mut pairs: Vec<(String, String)> = url::form_urlencoded::parse(q.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    pairs.sort();
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

/// The middleware.
pub async fn audit(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(log) = state.audit.clone() else {
        return next.run(req).await;
    };
    let path = req.uri().path().to_owned();
    if path == "/health" || path == "/metrics" {
        return next.run(req).await;
    }
    let started = Instant::now();
    let time = atlas_audit::now_rfc3339();
    let method = req.method().to_string();
    let mut query = normal_query(req.uri().query());
    let (parts, body) = req.into_parts();
    let facts = Arc::new(Mutex::new(Facts::default()));
    // A body too large to hash is refused, and the refusal is recorded
    // like any other answer.
    let response = match axum::body::to_bytes(body, state.config.audit.max_body_bytes).await {
        Err(_) => {
            query.push_str(if query.is_empty() {
                "body=too-large"
            } else {
                "&body=too-large"
            });
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestTooLarge",
                "body",
                "…",
                format!(
                    "request bodies are limited to {} bytes",
                    state.config.audit.max_body_bytes
                ),
            )
            .into_response()
        }
        Ok(bytes) => {
            if !bytes.is_empty() {
                let digest = hex::encode(Sha256::digest(&bytes));
                if !query.is_empty() {
                    query.push('&');
                }
                query.push_str("body=sha256:");
                query.push_str(&digest);
            }
            let req = Request::from_parts(parts, axum::body::Body::from(bytes));
            FACTS.scope(facts.clone(), next.run(req)).await
        }
    };
    let query_hash = hex::encode(Sha256::digest(
        format!("{method} {path}?{query}").as_bytes(),
    ));
    let status = response.status().as_u16();
    let streamed = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.contains("ndjson") || c.contains("arrow") || c.contains("parquet"));
    let f = match facts.lock() {
        Ok(mut g) => std::mem::take(&mut *g),
        Err(_) => Facts::default(),
    };
    let decision = match status {
        401 => "unauthenticated",
        403 => "deny",
        200..=399 if f.denied => "allow (some types denied)",
        200..=399 => "allow",
        400..=499 => "invalid",
        _ => "error",
    };
    let entry = AuditEntry {
        time,
        subject: f.subject,
        issuer: f.issuer,
        client: f.client,
        purpose: f.purpose,
        method,
        path,
        query,
        query_hash,
        status,
        decision: decision.to_owned(),
        rules: f.rules.into_iter().collect(),
        resource_types: f.resource_types.into_iter().collect(),
        rows: (!streamed).then_some(f.rows),
        patients: if f.patients.len() <= LISTED_PATIENTS {
            f.patients.iter().cloned().collect()
        } else {
            Vec::new()
        },
        patient_count: (!streamed && !f.patients_overflow).then_some(f.patients.len() as u64),
        fields_removed: f.fields_removed.into_iter().collect(),
        duration_us: started.elapsed().as_micros() as u64,
    };
    match log.record(entry).await {
        Ok(_) => response,
        Err(e) => {
            tracing::error!("audit record not written, answer withheld: {e}");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "AuditUnavailable",
                "audit",
                "",
                "the request's audit record could not be written, so its answer is withheld",
            )
            .into_response()
        }
    }
}
