//! The HTTP side: the main listener's router (FHIR base `/fhir`, token,
//! jobs, files) behind the layer that counts calls, fires faults, ticks
//! the data and logs every request; the other host (files only, no token:
//! where `RedirectOtherHost` sends clients); start and shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{any, get, post};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Endpoint, FaultKind};
use crate::export::Level;
use crate::respond::{error, fhir, set_header};
use crate::rest::HistoryOf;
use crate::{MockEhr, MockError, RequestLog, Urls, auth, capability, export, jobs, rest};

/// How long `shutdown` lets open connections finish.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(3);
/// Every request is answered (or refused with 503) within this: handlers
/// build whole bodies in memory, so this bounds the work per request.
const REQUEST_DEADLINE: Duration = Duration::from_secs(60);

/// The faults that fired on this request and that handlers act on.
#[derive(Clone, Default)]
struct Fired(Vec<FaultKind>);

/// A running mock: its URLs and its state. Dropping it stops the servers.
pub struct RunningMock {
    /// The FHIR base, e.g. `http://127.0.0.1:PORT/fhir`.
    pub fhir_base: String,
    /// The token endpoint (the `aud` of client assertions).
    pub token_url: String,
    /// The other host's origin, e.g. `http://127.0.0.1:PORT2`.
    pub other_host: String,
    pub ehr: Arc<MockEhr>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningMock {
    /// Stops accepting, lets open requests finish for a few seconds, then
    /// cuts what is left.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for task in self.tasks.drain(..) {
            let abort = task.abort_handle();
            if tokio::time::timeout(SHUTDOWN_DEADLINE, task).await.is_err() {
                abort.abort();
            }
        }
    }
}

impl Drop for RunningMock {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for task in &self.tasks {
            task.abort();
        }
    }
}

pub(crate) async fn start(ehr: &Arc<MockEhr>, addr: SocketAddr) -> Result<RunningMock, MockError> {
    let bind = |a: SocketAddr| async move {
        TcpListener::bind(a)
            .await
            .map_err(|source| MockError::Bind { addr: a, source })
    };
    let main = bind(addr).await?;
    let other = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let local = |l: &TcpListener, asked: SocketAddr| {
        let mut a = l.local_addr().unwrap_or(asked);
        // A wildcard bind is reached on loopback: URLs must name a host.
        if a.ip().is_unspecified() {
            a.set_ip([127, 0, 0, 1].into());
        }
        format!("http://{a}")
    };
    let origin = local(&main, addr);
    let urls = Urls {
        fhir_base: format!("{origin}/fhir"),
        token_url: format!("{origin}/auth/token"),
        other_origin: local(&other, addr),
        origin,
    };
    ehr.urls
        .set(urls.clone())
        .map_err(|_| MockError::AlreadyStarted)?;
    let (stop, rx) = watch::channel(false);
    let tasks = vec![
        serve(main, main_router(ehr.clone()), rx.clone()),
        serve(other, other_router(ehr.clone()), rx),
    ];
    tracing::info!(fhir_base = %urls.fhir_base, other_host = %urls.other_origin, "mock EHR listening");
    Ok(RunningMock {
        fhir_base: urls.fhir_base,
        token_url: urls.token_url,
        other_host: urls.other_origin,
        ehr: ehr.clone(),
        stop,
        tasks,
    })
}

fn serve(listener: TcpListener, router: Router, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!(error = %e, "mock EHR listener stopped");
        }
    })
}

fn main_router(ehr: Arc<MockEhr>) -> Router {
    Router::new()
        .route("/fhir", any(fhir_route))
        .route("/fhir/{*rest}", any(fhir_route))
        .route("/auth/token", post(token_route))
        .route("/jobs/{id}", get(status_route).delete(cancel_route))
        .route("/files/{job}/{n}", get(file_route))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(ehr.clone(), main_layer))
        .layer(middleware::from_fn(deadline))
        .with_state(ehr)
}

fn other_router(ehr: Arc<MockEhr>) -> Router {
    Router::new()
        .route("/files/{job}/{n}", get(other_file_route))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(ehr.clone(), other_layer))
        .layer(middleware::from_fn(deadline))
        .with_state(ehr)
}

/// Cuts a request that runs past [`REQUEST_DEADLINE`].
async fn deadline(req: Request, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_DEADLINE, next.run(req)).await {
        Ok(r) => r,
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            "the request ran past the mock's deadline",
        ),
    }
}

async fn not_found(uri: Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not-found",
        &format!("nothing at {}", uri.path()),
    )
}

/// Which endpoint a request is, for the fault counters.
fn endpoint_of(path: &str) -> Option<Endpoint> {
    if path == "/auth/token" {
        return Some(Endpoint::Token);
    }
    if path.starts_with("/jobs/") {
        return Some(Endpoint::Status);
    }
    if path.starts_with("/files/") {
        return Some(Endpoint::File);
    }
    let segs = fhir_segments(path)?;
    match segs.as_slice() {
        [.., last] if last == "$export" => Some(Endpoint::Kickoff),
        segs if segs.iter().any(|s| s == "_history") => Some(Endpoint::History),
        [ty, ..] if atlas_fhir::is_resource_type(ty) => Some(Endpoint::Search),
        _ => None,
    }
}

/// The percent-decoded path segments below `/fhir`.
fn fhir_segments(path: &str) -> Option<Vec<String>> {
    let rest = path.strip_prefix("/fhir")?;
    if !rest.is_empty() && !rest.starts_with('/') {
        return None;
    }
    Some(
        rest.split('/')
            .filter(|s| !s.is_empty())
            .map(percent_decode)
            .collect(),
    )
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Counts the call, fires its faults, ticks when due, runs the handler,
/// shapes the body and logs the request.
async fn main_layer(State(ehr): State<Arc<MockEhr>>, mut req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let endpoint = endpoint_of(uri.path());
    let fired = ehr.lock_faults().call(endpoint);
    ehr.maybe_auto_tick();
    let response = match answer_fault(&ehr, &fired, &req, endpoint) {
        Some(r) => r,
        None => {
            req.extensions_mut().insert(Fired(fired.clone()));
            let (headers, r) = (req.headers().clone(), next.run(req).await);
            ehr.log_request(&method, &uri, &headers, r.status(), endpoint, false);
            return shape_body(r, &fired).await;
        }
    };
    ehr.log_request(
        &method,
        &uri,
        req.headers(),
        response.status(),
        endpoint,
        false,
    );
    response
}

/// The response of a fault that answers the request itself, if one fired.
fn answer_fault(
    ehr: &MockEhr,
    fired: &[FaultKind],
    req: &Request,
    endpoint: Option<Endpoint>,
) -> Option<Response> {
    for kind in fired {
        match kind {
            FaultKind::Status { code, retry_after } => {
                return Some(status_fault(*code, retry_after.as_deref()));
            }
            FaultKind::RedirectOtherHost => {
                let path = req
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str())
                    .unwrap_or("/");
                let mut r = Response::new(Body::empty());
                *r.status_mut() = StatusCode::TEMPORARY_REDIRECT;
                let location = format!("{}{path}", ehr.other_origin());
                set_header(&mut r, header::LOCATION, &location);
                return Some(r);
            }
            FaultKind::ExpireToken => {
                if let Some(token) = auth::bearer(req.headers()) {
                    ehr.lock_auth().revoke(token);
                }
                let text = "the access token has expired";
                let mut r = error(StatusCode::UNAUTHORIZED, "login", text);
                let challenge = "Bearer error=\"invalid_token\"";
                set_header(&mut r, header::WWW_AUTHENTICATE, challenge);
                return Some(r);
            }
            // Marks the job; the file handler then answers 410.
            FaultKind::ExpireFiles if endpoint == Some(Endpoint::File) => {
                if let Some(job) = req.uri().path().split('/').nth(2) {
                    ehr.lock_jobs().expire(job);
                }
            }
            _ => {}
        }
    }
    None
}

/// A scripted status with an OperationOutcome and the raw `Retry-After`.
fn status_fault(code: u16, retry_after: Option<&str>) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = error(status, "transient", &format!("scripted fault: {code}"));
    if let Some(text) = retry_after {
        set_header(&mut r, header::RETRY_AFTER, text);
    }
    r
}

/// `Truncate` and `ResetAfter`: the body cut after N bytes, cleanly or by
/// an error that makes hyper drop the connection.
async fn shape_body(r: Response, fired: &[FaultKind]) -> Response {
    let cut = fired.iter().find_map(|k| match k {
        FaultKind::Truncate { bytes } => Some((*bytes, false)),
        FaultKind::ResetAfter { bytes } => Some((*bytes, true)),
        _ => None,
    });
    let Some((n, reset)) = cut else {
        return r;
    };
    let (mut parts, body) = r.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "exception",
            "the body could not be read",
        );
    };
    let head = bytes.slice(..n.min(bytes.len()));
    parts.headers.remove(header::CONTENT_LENGTH);
    let body = if reset {
        use futures::StreamExt;
        // The pause lets hyper flush the head and the first bytes: an error
        // in the same poll would drop them with the connection.
        let fail = futures::stream::once(async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "scripted reset",
            ))
        });
        Body::from_stream(futures::stream::iter([Ok::<Bytes, std::io::Error>(head)]).chain(fail))
    } else {
        Body::from(head)
    };
    Response::from_parts(parts, body)
}

/// The other host only logs (its calls count for no fault).
async fn other_layer(State(ehr): State<Arc<MockEhr>>, req: Request, next: Next) -> Response {
    let (method, uri, headers) = (
        req.method().clone(),
        req.uri().clone(),
        req.headers().clone(),
    );
    let r = next.run(req).await;
    ehr.log_request(
        &method,
        &uri,
        &headers,
        r.status(),
        endpoint_of(uri.path()),
        true,
    );
    r
}

async fn token_route(State(ehr): State<Arc<MockEhr>>, body: Bytes) -> Response {
    let form: Vec<(String, String)> = url::form_urlencoded::parse(&body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    auth::token(&ehr, &form)
}

async fn status_route(
    State(ehr): State<Arc<MockEhr>>,
    Path(id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    jobs::status(&ehr, &id, uri.query(), &headers)
}

async fn cancel_route(
    State(ehr): State<Arc<MockEhr>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    jobs::cancel(&ehr, &id, &headers)
}

async fn file_route(
    State(ehr): State<Arc<MockEhr>>,
    Path((job, n)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    jobs::file(&ehr, &job, &n, &headers, false)
}

async fn other_file_route(
    State(ehr): State<Arc<MockEhr>>,
    Path((job, n)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    jobs::file(&ehr, &job, &n, &headers, true)
}

/// Everything under `/fhir`, dispatched on its segments.
async fn fhir_route(
    State(ehr): State<Arc<MockEhr>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    req: Request,
) -> Response {
    let fired = req.extensions().get::<Fired>().cloned().unwrap_or_default();
    let Ok(body) = axum::body::to_bytes(req.into_body(), 16 << 20).await else {
        let text = "the request body is too large";
        return error(StatusCode::PAYLOAD_TOO_LARGE, "too-long", text);
    };
    let segs = fhir_segments(uri.path()).unwrap_or_default();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let level = match segs.as_slice() {
        ["$export"] => Some(Level::System),
        ["Patient", "$export"] => Some(Level::Patient),
        ["Group", id, "$export"] => Some(Level::Group(id.to_string())),
        _ => None,
    };
    let Some(level) = level else {
        if method != Method::GET {
            let text = "this mock serves reads only";
            return error(StatusCode::METHOD_NOT_ALLOWED, "not-supported", text);
        }
        return read_route(&ehr, &segs, &uri, &headers);
    };
    if method != Method::GET && method != Method::POST {
        let text = "$export takes GET or POST";
        return error(StatusCode::METHOD_NOT_ALLOWED, "not-supported", text);
    }
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("");
    let url = format!("{}{path}", ehr.origin());
    export::kickoff(ehr, level, &method, url, &headers, &body, &fired.0).await
}

/// The GETs under `/fhir`: discovery, search, read, history.
fn read_route(ehr: &MockEhr, segs: &[&str], uri: &Uri, headers: &HeaderMap) -> Response {
    let known = |ty: &str| atlas_fhir::is_resource_type(ty);
    let query = uri.query();
    match segs {
        [".well-known", "smart-configuration"] => {
            let mut r = fhir(StatusCode::OK, &capability::smart_configuration(ehr));
            set_header(&mut r, header::CONTENT_TYPE, "application/json");
            r
        }
        ["metadata"] => fhir(StatusCode::OK, &capability::capability_statement(ehr)),
        ["_history"] => rest::history(ehr, HistoryOf::System, query, headers),
        [ty] if known(ty) => rest::search(ehr, ty, query, headers),
        [ty, "_history"] if known(ty) => rest::history(ehr, HistoryOf::Type(ty), query, headers),
        [ty, id] if known(ty) => rest::read(ehr, ty, id, None, headers),
        [ty, id, "_history"] if known(ty) => {
            rest::history(ehr, HistoryOf::Instance(ty, id), query, headers)
        }
        [ty, id, "_history", vid] if known(ty) => rest::read(ehr, ty, id, Some(vid), headers),
        _ => {
            let text = format!("nothing at {}", uri.path());
            error(StatusCode::NOT_FOUND, "not-found", &text)
        }
    }
}

/// What the request log records of a request.
pub(crate) fn log_entry(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    status: StatusCode,
    endpoint: Option<Endpoint>,
    other_host: bool,
) -> RequestLog {
    RequestLog {
        method: method.to_string(),
        path: uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default(),
        host: headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("")
            .to_string(),
        had_authorization: headers.contains_key(header::AUTHORIZATION),
        status: status.as_u16(),
        endpoint,
        other_host,
    }
}
