//! No request can hang the server: deadlines, per-principal concurrency,
//! and a shutdown that ends.
//!
//! * Every request runs under a deadline (`[limits] request_timeout_ms`):
//!   past it the handler's future is dropped and the client gets a 503
//!   `DeadlineExceeded`. A streamed body gets its own, longer deadline
//!   (`stream_timeout_secs`) and is cut when it passes.
//! * Each principal (issuer and subject) may have at most
//!   `max_concurrent_per_principal` authenticated requests running; more
//!   wait for a turn within their deadline, so one caller cannot occupy
//!   every worker. The `Principal` extractor takes the turn
//!   (`admit`) and the middleware holds it until the handler returns.
//! * Shutdown: [`serve`](crate::serve) stops accepting, lets requests in
//!   flight finish for `shutdown_timeout_ms`, then cuts the rest: each cut
//!   request answers 503 `ShuttingDown` (a cut stream ends with an error),
//!   so every one of them is audited as cut before the process exits.
//!
//! The middleware sits inside the audit middleware, so a request cut here
//! is recorded with the reason ([`Cut`]) like any other answer.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::{ApiError, AppState};

/// `[limits]` in `atlas.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// How long a request may take to produce its response (ms).
    pub request_timeout_ms: u64,
    /// How long a streamed body (NDJSON, Arrow, Parquet) may run (s).
    pub stream_timeout_secs: u64,
    /// Authenticated requests one principal may have running at once.
    pub max_concurrent_per_principal: usize,
    /// How long shutdown waits for requests in flight before cutting
    /// them (ms).
    pub shutdown_timeout_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            request_timeout_ms: 30_000,
            stream_timeout_secs: 3_600,
            max_concurrent_per_principal: 16,
            shutdown_timeout_ms: 10_000,
        }
    }
}

impl LimitsConfig {
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.request_timeout_ms == 0
            || self.stream_timeout_secs == 0
            || self.max_concurrent_per_principal == 0
        {
            return Err("[limits] request_timeout_ms, stream_timeout_secs and \
                 max_concurrent_per_principal must be at least 1"
                .into());
        }
        Ok(())
    }
}

/// Why the server ended a request itself: the audit record's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut(pub &'static str);

pub const DEADLINE: Cut = Cut("cut: deadline exceeded");
pub const SHUTDOWN: Cut = Cut("cut: server shutting down");

/// The server's shared limiter: turns per principal, requests in flight,
/// and the signal that cuts them.
pub struct Limiter {
    turns: Mutex<HashMap<String, Arc<Semaphore>>>,
    in_flight: AtomicUsize,
    cut_tx: watch::Sender<bool>,
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter {
            turns: Mutex::new(HashMap::new()),
            in_flight: AtomicUsize::new(0),
            cut_tx: watch::channel(false).0,
        }
    }
}

impl Limiter {
    /// Ends every request still running (after the shutdown grace).
    pub fn cut_all(&self) {
        self.cut_tx.send_replace(true);
    }

    /// Requests and streamed bodies still running.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Takes one of a principal's turns now, if one is free (what
    /// `admit` waits for; for operators' tools and tests).
    pub fn try_turn(
        &self,
        issuer: &str,
        subject: &str,
        permits: usize,
    ) -> Option<OwnedSemaphorePermit> {
        self.semaphore(&turn_key(issuer, subject), permits)
            .try_acquire_owned()
            .ok()
    }

    fn semaphore(&self, key: &str, permits: usize) -> Arc<Semaphore> {
        let mut turns = match self.turns.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        // Idle principals are forgotten so the map stays small.
        if turns.len() > 10_000 {
            turns.retain(|_, s| s.available_permits() < permits);
        }
        turns
            .entry(key.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(permits)))
            .clone()
    }
}

/// Where the `Principal` extractor leaves the request's turn, so that the
/// middleware (not the extractor's short-lived request parts) holds it.
#[derive(Clone, Default)]
pub(crate) struct TurnSlot(Arc<Mutex<Option<OwnedSemaphorePermit>>>);

/// Takes the principal's turn for this request, waiting while it has
/// `max_concurrent_per_principal` requests running (the request deadline
/// bounds the wait).
pub(crate) async fn admit(
    parts: &axum::http::request::Parts,
    state: &AppState,
    principal: &atlas_policy::Principal,
) {
    let Some(slot) = parts.extensions.get::<TurnSlot>() else {
        return;
    };
    let key = turn_key(&principal.issuer, &principal.subject);
    let sem = state
        .limiter
        .semaphore(&key, state.config.limits.max_concurrent_per_principal);
    if let Ok(permit) = sem.acquire_owned().await
        && let Ok(mut s) = slot.0.lock()
    {
        *s = Some(permit);
    }
}

fn turn_key(issuer: &str, subject: &str) -> String {
    format!("{issuer}\u{0}{subject}")
}

/// Counts a request or body in flight while it lives.
struct InFlight(Arc<crate::limits::Limiter>);

impl InFlight {
    fn new(l: &Arc<Limiter>) -> InFlight {
        l.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(l.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

fn cut_response(cut: Cut, limits: &LimitsConfig) -> Response {
    let (status, name, message) = if cut == DEADLINE {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "DeadlineExceeded",
            format!(
                "the request took longer than {} ms and was stopped; narrow it or ask for less",
                limits.request_timeout_ms
            ),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "ShuttingDown",
            "the server is shutting down; try again".to_owned(),
        )
    };
    let mut r = ApiError::new(status, name, "request", "", message).into_response();
    r.extensions_mut().insert(cut);
    r
}

/// Counts the request as in flight from the outermost layer, so that
/// shutdown waits for its audit record too (the audit layer writes it
/// after [`guard`] returns).
pub async fn count(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let _in_flight = InFlight::new(&state.limiter);
    next.run(req).await
}

/// The middleware: a deadline, the principal's turn, and the shutdown cut.
pub async fn guard(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let limiter = state.limiter.clone();
    let slot = TurnSlot::default();
    // Probes take no turn: a busy principal's token must not slow /health.
    let path = req.uri().path();
    if path != "/health" && path != "/metrics" {
        req.extensions_mut().insert(slot.clone());
    }
    let mut cut = limiter.cut_tx.subscribe();
    let limits = &state.config.limits;
    let deadline = Duration::from_millis(limits.request_timeout_ms);
    let response = tokio::select! {
        r = next.run(req) => r,
        _ = tokio::time::sleep(deadline) => {
            tracing::warn!(ms = limits.request_timeout_ms, "request cut at its deadline");
            return cut_response(DEADLINE, limits);
        }
        _ = cut.wait_for(|c| *c) => return cut_response(SHUTDOWN, limits),
    };
    let turn = slot.0.lock().ok().and_then(|mut t| t.take());
    if !is_streamed(&response) {
        return response;
    }
    // A stream keeps its turn and counts as in flight until it ends, and
    // is cut at its own deadline or at shutdown.
    let (parts, body) = response.into_parts();
    let stream_deadline = Duration::from_secs(limits.stream_timeout_secs);
    let body = CutBody::new(
        body.into_data_stream(),
        stream_deadline,
        cut,
        &limiter,
        turn,
    );
    Response::from_parts(parts, axum::body::Body::from_stream(body))
}

fn is_streamed(r: &Response) -> bool {
    r.headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| {
            c.contains("ndjson")
                || c.contains("arrow")
                || c.contains("parquet")
                || c.contains("event-stream")
        })
}

/// What a streamed body and its watchdog share.
struct StreamState {
    /// `None` once the watchdog dropped it (its scan ends with it).
    inner: Option<axum::body::BodyDataStream>,
    why: Option<Cut>,
    waker: Option<std::task::Waker>,
}

/// A streamed body that ends with an error at its deadline or at the
/// shutdown cut (the audit's stream record then says why). A watchdog
/// task enforces both even when the client stopped reading and nobody
/// polls the body: it drops the inner stream (and the scan behind it)
/// and wakes the body.
struct CutBody {
    shared: Arc<Mutex<StreamState>>,
    watchdog: tokio::task::AbortHandle,
    _turn: Option<OwnedSemaphorePermit>,
    _in_flight: InFlight,
    ended: bool,
}

impl CutBody {
    fn new(
        inner: axum::body::BodyDataStream,
        deadline: Duration,
        mut cut: watch::Receiver<bool>,
        limiter: &Arc<Limiter>,
        turn: Option<OwnedSemaphorePermit>,
    ) -> CutBody {
        let shared = Arc::new(Mutex::new(StreamState {
            inner: Some(inner),
            why: None,
            waker: None,
        }));
        let watched = shared.clone();
        let watchdog = tokio::spawn(async move {
            let why = tokio::select! {
                _ = tokio::time::sleep(deadline) => DEADLINE,
                _ = cut.wait_for(|c| *c) => SHUTDOWN,
            };
            let (inner, waker) = match watched.lock() {
                Ok(mut s) => {
                    s.why = Some(why);
                    (s.inner.take(), s.waker.take())
                }
                Err(_) => (None, None),
            };
            drop(inner);
            if let Some(w) = waker {
                w.wake();
            }
        })
        .abort_handle();
        CutBody {
            shared,
            watchdog,
            _turn: turn,
            _in_flight: InFlight::new(limiter),
            ended: false,
        }
    }
}

impl Drop for CutBody {
    fn drop(&mut self) {
        self.watchdog.abort();
    }
}

impl Stream for CutBody {
    type Item = Result<bytes::Bytes, axum::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let shared = self.shared.clone();
        let Ok(mut s) = shared.lock() else {
            self.ended = true;
            return Poll::Ready(Some(Err(axum::Error::new("stream state poisoned"))));
        };
        if let Some(why) = s.why {
            drop(s);
            self.ended = true;
            atlas_access::facts::note(|f| f.cut = Some(why.0));
            tracing::warn!(reason = why.0, "stream cut");
            return Poll::Ready(Some(Err(axum::Error::new(why.0))));
        }
        if !s.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            s.waker = Some(cx.waker().clone());
        }
        match s.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_next(cx),
            None => Poll::Ready(None),
        }
    }
}

/// Waits until `shutdown` resolves, then `shutdown_timeout_ms` (the
/// graceful server normally finishes first and this is never reached),
/// cuts what is still running and waits briefly for the cut requests'
/// audit records. Resolves when the server must exit.
pub(crate) async fn hard_stop(state: AppState, mut soft: watch::Receiver<bool>) {
    let _ = soft.wait_for(|s| *s).await;
    tokio::time::sleep(Duration::from_millis(
        state.config.limits.shutdown_timeout_ms,
    ))
    .await;
    let limiter = &state.limiter;
    tracing::warn!(
        in_flight = limiter.in_flight(),
        "shutdown deadline passed: cutting the requests still running"
    );
    limiter.cut_all();
    let flushed = async {
        while limiter.in_flight() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A cut stream's record is written by a task its body spawned.
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), flushed).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn body(
        inner: impl Stream<Item = Result<bytes::Bytes, axum::Error>> + Send + 'static,
        deadline: Duration,
        limiter: &Arc<Limiter>,
    ) -> CutBody {
        CutBody::new(
            axum::body::Body::from_stream(inner).into_data_stream(),
            deadline,
            limiter.cut_tx.subscribe(),
            limiter,
            None,
        )
    }

    #[tokio::test]
    async fn a_stream_that_never_ends_is_cut_at_its_deadline() {
        let limiter = Arc::new(Limiter::default());
        let first = futures::stream::iter([Ok(bytes::Bytes::from_static(b"row\n"))]);
        let never = first.chain(futures::stream::pending());
        let mut b = body(never, Duration::from_millis(50), &limiter);
        assert_eq!(limiter.in_flight(), 1);
        assert_eq!(b.next().await.unwrap().unwrap(), "row\n");
        let started = std::time::Instant::now();
        assert!(b.next().await.unwrap().is_err(), "cut with an error");
        assert!(started.elapsed() >= Duration::from_millis(40));
        assert!(b.next().await.is_none(), "and ended");
        drop(b);
        assert_eq!(limiter.in_flight(), 0);
    }

    /// Drops its flag when dropped: tells whether the scan behind a
    /// stream was let go.
    struct DropFlag(Arc<std::sync::atomic::AtomicBool>);
    impl Drop for DropFlag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_stream_nobody_reads_is_still_let_go_at_its_deadline() {
        let limiter = Arc::new(Limiter::default());
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = DropFlag(dropped.clone());
        let scan = futures::stream::pending::<Result<bytes::Bytes, axum::Error>>().map(move |x| {
            let _ = &flag;
            x
        });
        // Polled once (the client read its first bytes), then never again.
        let mut b = body(scan, Duration::from_millis(30), &limiter);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut b).poll_next(&mut cx).is_pending());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            dropped.load(Ordering::SeqCst),
            "the scan outlived the deadline"
        );
        assert!(matches!(
            Pin::new(&mut b).poll_next(&mut cx),
            Poll::Ready(Some(Err(_)))
        ));
    }

    #[tokio::test]
    async fn cut_all_ends_streams_at_once() {
        let limiter = Arc::new(Limiter::default());
        let mut b = body(
            futures::stream::pending(),
            Duration::from_secs(3600),
            &limiter,
        );
        let l = limiter.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            l.cut_all();
        });
        let e = tokio::time::timeout(Duration::from_secs(5), b.next())
            .await
            .expect("cut, not left waiting")
            .unwrap()
            .unwrap_err();
        assert!(e.to_string().contains("shutting down"), "{e}");
    }
}
