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
//!
//! A streamed answer (NDJSON, Arrow, Parquet) gets a second record when its
//! body ends: `decision` "stream complete" with the rows and patients it
//! held, written before the body's last chunk (a failed write cuts the
//! stream short, so the client sees an incomplete answer), or "stream
//! aborted" with what was sent when the client goes away first.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use futures::Stream;

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
    let template = streamed.then(|| entry.clone());
    match log.record(entry).await {
        Ok(_) => match template {
            Some(t) => {
                let (parts, body) = response.into_parts();
                let body = StreamAudit {
                    inner: body.into_data_stream(),
                    facts,
                    log,
                    template: Some(t),
                    started,
                    finishing: None,
                    done: false,
                };
                Response::from_parts(parts, axum::body::Body::from_stream(body))
            }
            None => response,
        },
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

type Finishing = Pin<Box<dyn Future<Output = Result<u64, atlas_audit::AuditError>> + Send>>;

/// A streamed body that counts what it sends (its polls run with the
/// request's [`Facts`]) and writes the completion record at its end.
struct StreamAudit {
    inner: axum::body::BodyDataStream,
    facts: Arc<Mutex<Facts>>,
    log: Arc<AuditLog>,
    template: Option<AuditEntry>,
    started: Instant,
    finishing: Option<Finishing>,
    done: bool,
}

impl StreamAudit {
    /// The completion record: the first record's request, what was sent.
    fn completion(&mut self, decision: &str) -> Option<AuditEntry> {
        let mut e = self.template.take()?;
        let f = match self.facts.lock() {
            Ok(mut g) => std::mem::take(&mut *g),
            Err(_) => Facts::default(),
        };
        e.time = atlas_audit::now_rfc3339();
        e.decision = decision.to_owned();
        e.rows = Some(f.rows);
        e.patients = if f.patients.len() <= LISTED_PATIENTS {
            f.patients.iter().cloned().collect()
        } else {
            Vec::new()
        };
        e.patient_count = (!f.patients_overflow).then_some(f.patients.len() as u64);
        e.duration_us = self.started.elapsed().as_micros() as u64;
        Some(e)
    }
}

impl Stream for StreamAudit {
    type Item = Result<bytes::Bytes, axum::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(fut) = this.finishing.as_mut() {
                let r = std::task::ready!(fut.as_mut().poll(cx));
                this.finishing = None;
                this.done = true;
                return Poll::Ready(match r {
                    Ok(_) => None,
                    Err(e) => {
                        tracing::error!("stream's completion record not written: {e}");
                        Some(Err(axum::Error::new(e)))
                    }
                });
            }
            if this.done {
                return Poll::Ready(None);
            }
            let facts = this.facts.clone();
            let inner = &mut this.inner;
            let next = FACTS.sync_scope(facts, || Pin::new(inner).poll_next(cx));
            match next {
                Poll::Ready(None) => match this.completion("stream complete") {
                    Some(entry) => {
                        let log = this.log.clone();
                        this.finishing = Some(Box::pin(async move { log.record(entry).await }));
                    }
                    None => this.done = true,
                },
                other => return other,
            }
        }
    }
}

impl Drop for StreamAudit {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // The client went away (or the server is stopping): record what was sent.
        let pending = match self.finishing.take() {
            Some(f) => Some(f),
            None => self.completion("stream aborted").map(|entry| {
                let log = self.log.clone();
                Box::pin(async move { log.record(entry).await }) as Finishing
            }),
        };
        if let (Some(f), Ok(rt)) = (pending, tokio::runtime::Handle::try_current()) {
            rt.spawn(async move {
                if let Err(e) = f.await {
                    tracing::error!("aborted stream's record not written: {e}");
                }
            });
        }
    }
}
