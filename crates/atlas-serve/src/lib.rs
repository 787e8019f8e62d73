//! `atlas serve`: the HTTP API over a lake.
//!
//! # What this crate owns
//! * The server ([`serve`]): configuration ([`ServeConfig`], from a TOML
//!   file, environment and flags), binding, graceful shutdown, request
//!   tracing.
//! * The router ([`router`]): `/health` (liveness and lake readability),
//!   `/metrics` (Prometheus text), and the ontology metadata in the shape
//!   of Foundry's ontology API v2 (`/api/v2/ontologies/...`).
//! * Errors as JSON bodies that name the parameter and the reason
//!   ([`ApiError`]); no input yields a 500 or a panic.
//! * The HTTP adapters of every data path: object sets, aggregates,
//!   GraphQL, FHIR REST, NDJSON/Arrow/Parquet streams, view rows and
//!   `POST /api/v2/sql`. Each parses its request, calls the access seam and
//!   writes the answer; none decides access or emits rows itself.
//! * Authentication (`auth`), the audit middleware (`audit`), deadlines and
//!   turns (`limits`), the OpenAPI document.
//!
//! # What it may call
//! `atlas-access` (decisions, scoped scans, `Egress`: every row or
//! resource an answer holds is released there), `atlas-audit` (the trail),
//! `atlas-lake`, `atlas-ontology`, `atlas-objectset`, `atlas-viewstore`
//! and `atlas-policy` (types and decoding), axum, async-graphql,
//! jsonwebtoken.

mod aggregate;
pub mod audit;
pub mod auth;
mod config;
mod error;
pub mod events;
mod fhir;
pub mod fhircast;
pub mod graphql;
mod graphql_limits;
pub mod limits;
mod metrics;
mod objects;
mod ontology;
mod openapi;
mod params;
mod sql;
mod stream;
pub mod subscriptions;
mod tls;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use atlas_access::{
    Access, LakeDirectory, PageTokens, PolicyConfig, PolicyHandle, Tables, read_policy,
};
/// The seam's modules under their old paths, for the binary and tests.
pub use atlas_access::{deid, policy};
pub use auth::{AuthConfig, Authenticator, DevIssuer, IssuerConfig, TokenRequest};
pub use config::{ConfigError, ServeConfig};
pub use error::ApiError;
pub use metrics::Metrics;
pub use tls::TlsConfig;

use atlas_lake::Lake;
// The seam's modules, so handlers name them as before (`crate::query::…`).
use atlas_access::query;
use atlas_ontology::Ontology;

/// What every handler shares: the access seam ([`Access`], reached
/// through `Deref`) and what only the HTTP layer needs.
#[derive(Clone)]
pub struct AppState {
    /// The access seam: every data path decides, scans and answers
    /// through it.
    pub access: Access,
    pub config: Arc<ServeConfig>,
    pub metrics: Arc<Metrics>,
    pub auth: Arc<Authenticator>,
    /// The GraphQL schema generated from the ontology.
    pub graphql: Arc<async_graphql::dynamic::Schema>,
    /// The audit trail every request is written to (`[audit] enabled`).
    pub audit: Option<Arc<atlas_audit::AuditLog>>,
    /// Deadlines, turns per principal and the shutdown cut (`[limits]`).
    pub limiter: Arc<limits::Limiter>,
    /// The change feed watcher, SSE tickets and live views (`events`).
    pub events: Arc<events::Events>,
    /// The FHIRcast hub (`fhircast`).
    pub fhircast: Arc<fhircast::HubState>,
    /// FHIR Subscriptions (`subscriptions`).
    pub subscriptions: Arc<subscriptions::SubscriptionState>,
}

impl std::ops::Deref for AppState {
    type Target = Access;
    fn deref(&self) -> &Access {
        &self.access
    }
}

impl AppState {
    /// Opens what the server needs from the lake: the trusted token issuers
    /// (the dev issuer's key when `auth.dev` is on) and the page-token key.
    pub async fn open(
        lake: Lake,
        ontology: Ontology,
        config: ServeConfig,
    ) -> Result<AppState, String> {
        let auth = Authenticator::from_config(&config.auth, &lake)
            .await
            .map_err(|e| e.to_string())?;
        let key = auth::read_or_create(&lake, atlas_access::token::KEY_PATH, || {
            let mut k = vec![0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut k)
                .map_err(|e| e.to_string())?;
            Ok(k)
        })
        .await?;
        let page_tokens = PageTokens::with_key(&key, config.page_token_ttl_secs)?;
        let graphql = graphql::schema(&ontology, &config)?;
        let auth = Arc::new(auth);
        auth.spawn_refresh(&config.auth);
        let tables = Arc::new(Tables::new(lake.clone()));
        let audit = if config.audit.enabled {
            Some(Arc::new(audit::open(&lake).await?))
        } else {
            None
        };
        let policy = Arc::new(PolicyHandle::open(&config.policy, &tables).await?);
        let deid = Arc::new(atlas_access::deid::Engines::new(
            &config.deid,
            config.policy.file.as_deref(),
        )?);
        policy.spawn_refresh(
            tables.clone(),
            std::time::Duration::from_secs(config.policy.refresh_secs),
        );
        let metrics = Metrics::default();
        let access = Access {
            lake,
            ontology: Arc::new(ontology),
            tables,
            policy,
            page_tokens: Arc::new(page_tokens),
            deid,
            settings: atlas_access::AccessSettings {
                slice_reads: config.slice_reads,
            },
            counters: metrics.seam.clone(),
        };
        let events = events::Events::open(&access.lake, &config).await?;
        if config.views.auto_refresh {
            events::spawn_live_views(access.clone(), &events);
        }
        let fhircast = fhircast::HubState::open(&access.lake, &config).await?;
        let subscriptions = subscriptions::SubscriptionState::open(&access.lake, &config).await?;
        let state = AppState {
            access,
            events,
            fhircast,
            subscriptions,
            graphql: Arc::new(graphql),
            config: Arc::new(config),
            metrics: Arc::new(metrics),
            audit,
            auth,
            limiter: Arc::new(limits::Limiter::default()),
        };
        // Saved Subscriptions resume delivery from where they stopped.
        state.subscriptions.start(&state);
        Ok(state)
    }
}

/// Every route, with metrics and JSON errors for unknown paths and methods.
pub fn router(state: AppState) -> Router {
    let (router, api) = api_router().split_for_parts();
    let doc = Arc::new(api.to_pretty_json().unwrap_or_default());
    router
        .route(
            "/openapi.json",
            get(move || {
                let doc = doc.clone();
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        doc.as_ref().clone(),
                    )
                }
            }),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Inside the audit: a request cut at its deadline is recorded as such.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limits::guard,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            audit::audit,
        ))
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        // Outermost: shutdown waits for a request until its record is written.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limits::count,
        ))
        .with_state(state)
}

/// Every documented route, with its OpenAPI entry.
fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(<openapi::ApiDoc as utoipa::OpenApi>::openapi())
        .routes(routes!(health))
        .routes(routes!(metrics::render))
        .merge(ontology::routes())
        .merge(objects::routes())
        .merge(aggregate::routes())
        .merge(graphql::routes())
        .merge(stream::routes())
        .merge(fhir::routes())
        .merge(sql::routes())
        .merge(events::routes())
        .merge(fhircast::routes())
        .merge(subscriptions::routes())
}

/// The OpenAPI document (what `/openapi.json` serves), as pretty JSON.
pub fn openapi_json() -> String {
    api_router()
        .split_for_parts()
        .1
        .to_pretty_json()
        .unwrap_or_default()
}

/// Counts and times each request by its route pattern (not its raw path,
/// which would make a label per patient id).
async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = req.method().clone();
    let started = Instant::now();
    let response = next.run(req).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    state.metrics.observe(&route, status, elapsed);
    if let Some(kind) = response.extensions().get::<error::ErrorKind>() {
        state.metrics.error(kind.0);
    }
    tracing::info!(%method, route, status, ms = elapsed.as_secs_f64() * 1e3, "request");
    response
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found("path", req.uri().path(), "no such endpoint")
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
        "method",
        req.method().as_str(),
        format!("{} does not accept this method", req.uri().path()),
    )
}

#[utoipa::path(get, path = "/health", tag = "operations", responses((status = 200, description = "Alive and the lake readable"), (status = 503, description = "The lake cannot be read")))]
/// Liveness and lake readability: 200 with the store's Delta version when
/// the lake opens (a lake with no data yet is readable), 503 when it does
/// not. Where the lake is, and why it cannot be read, only with a valid
/// bearer token (and in the server log).
async fn health(
    State(state): State<AppState>,
    who: Result<atlas_policy::Principal, ApiError>,
) -> Response {
    let trusted = who.is_ok();
    match state.lake.table(atlas_lake::lake::RESOURCES).await {
        Ok(table) => {
            let version = table.as_ref().and_then(|t| t.version());
            let mut lake = serde_json::json!({
                "readable": true,
                "resourcesVersion": version,
            });
            if trusted {
                lake["location"] = serde_json::json!(state.lake.root().to_string());
            }
            axum::Json(serde_json::json!({"status": "ok", "lake": lake})).into_response()
        }
        Err(e) => {
            tracing::error!(lake = %state.lake.root(), error = %e, "health: the lake cannot be read");
            let mut lake = serde_json::json!({"readable": false});
            if trusted {
                lake["location"] = serde_json::json!(state.lake.root().to_string());
                lake["error"] = serde_json::json!(e.to_string());
            }
            (
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(serde_json::json!({"status": "unavailable", "lake": lake})),
            )
                .into_response()
        }
    }
}

/// Serves `router(state)` on the configured address until `shutdown`
/// resolves, then lets the requests in flight finish for
/// `[limits] shutdown_timeout_ms` and cuts the rest (each audited as cut):
/// shutdown always ends.
pub async fn serve(
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(state.config.bind).await?;
    let addr = listener.local_addr()?;
    let tls = match &state.config.tls {
        Some(c) => Some(tls::server_config(c).map_err(std::io::Error::other)?),
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(%addr, scheme, lake = %state.lake.root(), "atlas serve listening");
    let (soft_tx, soft_rx) = tokio::sync::watch::channel(false);
    let hub = state.fhircast.clone();
    tokio::spawn(async move {
        shutdown.await;
        soft_tx.send_replace(true);
        // WebSockets are not requests the shutdown deadline can cut: the
        // hub closes them (1001, going away).
        hub.shutdown();
    });
    let graceful = {
        let mut rx = soft_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let hard = limits::hard_stop(state.clone(), soft_rx);
    let app = router(state);
    let server = async move {
        match tls {
            Some(config) => tls::serve_tls(listener, config, app, graceful).await,
            None => {
                axum::serve(listener, app)
                    .with_graceful_shutdown(graceful)
                    .await
            }
        }
    };
    tokio::select! {
        r = server => r,
        _ = hard => Ok(()),
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: finishing requests in flight");
}
