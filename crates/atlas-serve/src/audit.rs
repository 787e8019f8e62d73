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
//!
//! A request still running after `[audit] start_record_after_ms` gets a
//! record first, `decision` "started" and status 0, so a request in flight
//! when the server dies is still in the trail; its final record shares the
//! `request_id`.
//!
//! Nothing recorded holds a credential: `access_token` and other credential
//! parameters, and anything shaped like a JWT, are replaced by
//! `[redacted]` in the path, the query and the reasons ([`redact`]).
//!
//! Every answer that passes here carries `Cache-Control: no-store` and
//! `X-Content-Type-Options: nosniff`.

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

pub use atlas_access::facts::{
    Facts, LISTED_PATIENTS, SECRET_PARAMS, current, note, note_decision, note_patient, redact,
    scoped,
};

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
    /// A request still running this long (milliseconds) gets a "started"
    /// record before its final one; 0: every request does.
    pub start_record_after_ms: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            enabled: true,
            max_body_bytes: 4 << 20,
            start_record_after_ms: 100,
        }
    }
}

/// On a response: its body was complete when the handler returned (it is
/// not a stream whatever its content type), so one record holds it all.
#[derive(Debug, Clone, Copy)]
pub struct Whole;

/// Opens the lake's audit trail.
pub async fn open(lake: &atlas_lake::Lake) -> Result<AuditLog, String> {
    let local = lake
        .is_local()
        .then(|| lake.root().to_file_path().ok())
        .flatten();
    let store = AuditStore::new(lake.object_store().clone(), &lake.path(""), local);
    AuditLog::open(store).await.map_err(|e| e.to_string())
}

/// The path and query parameters, sorted, so equal requests normalise
/// equally; credentials redacted.
fn normal_query(q: Option<&str>) -> String {
    let mut pairs: Vec<(String, String)> = url::form_urlencoded::parse(q.unwrap_or("").as_bytes())
        .map(|(k, v)| {
            let secret = SECRET_PARAMS.iter().any(|s| k.eq_ignore_ascii_case(s));
            let v = if secret {
                "[redacted]".to_owned()
            } else {
                redact(&v)
            };
            (redact(&k), v)
        })
        .collect();
    pairs.sort();
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

/// The headers every answer that passes the audit layer carries: nothing
/// holding patient data may be stored by a cache or sniffed into another
/// content type.
fn protect(response: &mut Response) {
    let h = response.headers_mut();
    // An event stream says `no-cache, no-transform` as SSE wants (so no
    // proxy buffers or rewrites it), and `no-store` like every answer.
    let event_stream = h
        .get(header::CONTENT_TYPE)
        .is_some_and(|c| c.as_bytes().starts_with(b"text/event-stream"));
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static(if event_stream {
            "no-cache, no-store, no-transform"
        } else {
            "no-store"
        }),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
}

/// The middleware.
pub async fn audit(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let mut response = audited(state, req, next).await;
    protect(&mut response);
    response
}

/// A random id for one request's records.
fn request_id() -> String {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    hex::encode(b)
}

/// The record of a request from what is known of it so far.
struct Request0 {
    time: String,
    method: String,
    path: String,
    query: String,
    query_hash: String,
    request_id: String,
    started: Instant,
}

impl Request0 {
    fn entry(&self, f: Facts, status: u16, decision: &str, streamed: bool) -> AuditEntry {
        AuditEntry {
            time: self.time.clone(),
            subject: f.subject,
            issuer: f.issuer,
            client: f.client,
            purpose: f.purpose,
            method: self.method.clone(),
            path: self.path.clone(),
            query: self.query.clone(),
            query_hash: self.query_hash.clone(),
            status,
            decision: decision.to_owned(),
            rules: f.rules.into_iter().collect(),
            resource_types: f.resource_types.into_iter().collect(),
            rows: (!streamed).then_some(f.rows),
            patients: if f.patients_unknown || f.patients.len() > LISTED_PATIENTS {
                Vec::new()
            } else {
                f.patients.iter().cloned().collect()
            },
            patient_count: (!streamed && !f.patients_overflow && !f.patients_unknown)
                .then_some(f.patients.len() as u64),
            fields_removed: f.fields_removed.into_iter().collect(),
            duration_us: self.started.elapsed().as_micros() as u64,
            request_id: Some(self.request_id.clone()),
            purpose_claim: f.purpose_claim,
            purpose_header: f.purpose_header,
            patient_binding: f.patient_binding,
            scopes: f.scopes,
            roles: f.roles,
            reason: f.reason,
            out_of_scope: f.out_of_scope,
        }
    }
}

fn withheld(e: impl std::fmt::Display) -> Response {
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

async fn audited(state: AppState, req: Request, next: Next) -> Response {
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
    let path = redact(&path);
    let mut query = normal_query(req.uri().query());
    let (parts, body) = req.into_parts();
    let facts = Arc::new(Mutex::new(Facts::default()));
    let snapshot = |facts: &Arc<Mutex<Facts>>| match facts.lock() {
        Ok(g) => g.clone(),
        Err(_) => Facts::default(),
    };
    let request_id = request_id();
    // A body too large to hash is refused, and the refusal is recorded
    // like any other answer.
    // Reading the body is part of the request's deadline: a client that
    // stalls its upload is cut, and recorded, like a slow handler.
    let deadline = std::time::Duration::from_millis(state.config.limits.request_timeout_ms);
    let read = tokio::time::timeout(
        deadline,
        axum::body::to_bytes(body, state.config.audit.max_body_bytes),
    )
    .await;
    let response = match read {
        Err(_) => {
            let mut r = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "RequestTimeout",
                "body",
                "…",
                "the request body did not arrive within the request deadline",
            )
            .into_response();
            r.extensions_mut().insert(crate::limits::DEADLINE);
            r
        }
        Ok(Err(_)) => {
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
        Ok(Ok(bytes)) => {
            if !bytes.is_empty() {
                let digest = hex::encode(Sha256::digest(&bytes));
                if !query.is_empty() {
                    query.push('&');
                }
                query.push_str("body=sha256:");
                query.push_str(&digest);
            }
            let req = Request::from_parts(parts, axum::body::Body::from(bytes));
            let run = atlas_access::facts::scoped(Some(facts.clone()), next.run(req));
            let mut run = std::pin::pin!(run);
            let after = std::time::Duration::from_millis(state.config.audit.start_record_after_ms);
            // The "started" record, built when first polled: after the
            // handler's first poll, so it names who asked when it can.
            let start = |query: String| {
                let facts = facts.clone();
                let log = log.clone();
                let r0 = Request0 {
                    time: time.clone(),
                    method: method.clone(),
                    path: path.clone(),
                    query_hash: query_hash(&method, &path, &query),
                    query,
                    request_id: request_id.clone(),
                    started,
                };
                async move {
                    let mut f = snapshot(&facts);
                    // Nothing was answered yet.
                    f.rows = 0;
                    f.patients.clear();
                    f.patients_unknown = true;
                    let mut e = r0.entry(f, 0, "started", false);
                    e.rows = None;
                    log.record(e).await
                }
            };
            let early = if after.is_zero() {
                None
            } else {
                tokio::select! {
                    r = &mut run => Some(r),
                    _ = tokio::time::sleep(after) => None,
                }
            };
            match early {
                Some(r) => r,
                None => {
                    let (r, written) = tokio::join!(run, start(query.clone()));
                    match written {
                        Ok(_) => r,
                        Err(e) => return withheld(e),
                    }
                }
            }
        }
    };
    let query_hash = query_hash(&method, &path, &query);
    let status = response.status().as_u16();
    let streamed = response.extensions().get::<Whole>().is_none()
        && response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| {
                c.contains("ndjson")
                    || c.contains("arrow")
                    || c.contains("parquet")
                    || c.contains("event-stream")
            });
    let f = match facts.lock() {
        Ok(mut g) => std::mem::take(&mut *g),
        Err(_) => Facts::default(),
    };
    let cut = response
        .extensions()
        .get::<crate::limits::Cut>()
        .map(|c| c.0);
    let decision = match status {
        _ if cut.is_some() => cut.unwrap_or_default(),
        _ if f.out_of_scope => "deny (out of scope)",
        401 => "unauthenticated",
        403 => "deny",
        200..=399 if f.denied => "allow (some types denied)",
        200..=399 => "allow",
        400..=499 => "invalid",
        _ => "error",
    };
    let r0 = Request0 {
        time,
        method,
        path,
        query,
        query_hash,
        request_id,
        started,
    };
    let entry = r0.entry(f, status, decision, streamed);
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
        Err(e) => withheld(e),
    }
}

fn query_hash(method: &str, path: &str, query: &str) -> String {
    hex::encode(Sha256::digest(
        format!("{method} {path}?{query}").as_bytes(),
    ))
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
        e.decision = f.cut.unwrap_or(decision).to_owned();
        e.rows = Some(f.rows);
        e.patients = if f.patients.len() <= LISTED_PATIENTS {
            f.patients.iter().cloned().collect()
        } else {
            Vec::new()
        };
        e.patient_count = (!f.patients_overflow).then_some(f.patients.len() as u64);
        if f.patients_unknown {
            e.patients = Vec::new();
            e.patient_count = None;
        }
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
            let next = atlas_access::facts::sync_scoped(facts, || Pin::new(inner).poll_next(cx));
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

#[cfg(test)]
mod tests {
    use super::{normal_query, redact};

    const JWT: &str = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJl";

    #[test]
    fn credentials_never_reach_the_record() {
        assert_eq!(redact(JWT), "[redacted]");
        assert_eq!(redact(&format!("Bearer {JWT} x")), "Bearer [redacted] x");
        // Unsigned (alg none) and two-part shapes are tokens too.
        assert_eq!(redact("eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIn0."), "[redacted]");
        assert_eq!(
            redact("/fhir/Patient/eyJhIjoxfQ.eyJiIjoyfQ"),
            "/fhir/Patient/[redacted]"
        );
        // Not a token: kept.
        for keep in ["eyJ", "keyJar.x", "eyJhbGci", "Patient/123", "a.b.c"] {
            assert_eq!(redact(keep), keep);
        }
        let q = normal_query(Some(&format!(
            "access_token={JWT}&code=8867-4&x={JWT}&ACCESS_TOKEN=abc&password=p"
        )));
        assert!(
            !q.contains("eyJ") && !q.contains("abc") && !q.contains("=p"),
            "{q}"
        );
        assert!(q.contains("code=8867-4"), "{q}");
        assert_eq!(q.matches("%5Bredacted%5D").count(), 4, "{q}");
    }
}
