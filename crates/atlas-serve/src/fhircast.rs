//! The FHIRcast STU3 hub of `atlas serve` (WebSocket channel): the HTTP
//! and WebSocket adapter over [`atlas_events::fhircast::Hub`].
//!
//! # Routes
//! * `GET /.well-known/fhircast-configuration` (and under the hub URL,
//!   `/fhircast/hub/.well-known/fhircast-configuration`): the capabilities;
//!   no token needed.
//! * `POST /fhircast/hub` (the `hub.url`): a form body subscribes or
//!   unsubscribes (202 with `hub.channel.endpoint`); a JSON body is a
//!   request-context-change (202, then the broadcast, the sender included,
//!   with the request's `id`). `POST /fhircast/hub/{topic}` is the same for
//!   one topic.
//! * `GET /fhircast/hub/{topic}`: the current context, with its
//!   `context.versionId` and shared content.
//! * `GET /fhircast/ws/{endpoint}`: the WebSocket. The endpoint id (244
//!   random bits) is the socket's credential, bound to its subscription
//!   and used once.
//!
//! # Who may do what
//! Every route but the well-known document needs a bearer token. A topic
//! is open to a token that is bound to it (its `hub.topic` or
//! `fhircast_topic` claim) or to any token when `[fhircast] open_topics`
//! is on (demos). Subscribing needs `fhircast/<event>.read` scopes (the
//! hub grants the events they cover), publishing `fhircast/<event>.write`
//! (`fhircast/*.read|write|*` for all); without them, 403 naming the
//! reason. Events about a patient reach a subscriber only when the access
//! policy lets it search that patient (`NoticeGate::admits`), decided at
//! each delivery; a publisher may not name a patient outside its own
//! access. Leases are clamped to `[fhircast] max_lease_secs` and to the
//! token's `exp`, so a subscriber whose token expires stops receiving.
//!
//! # Records
//! One audit entry (method `FHIRCAST`, path `/fhircast/hub/{topic}`) per
//! event the hub sends (allow, rows = subscribers it reached, patients =
//! the context's) and per refused publication (deny), and one per
//! subscription start and end; the HTTP requests themselves are recorded
//! by the audit middleware as usual. No token and no endpoint id is
//! written to these entries. Every event also goes out on
//! [`HubState::context_changes`] for `GET /events`.
//!
//! # Socket bounds
//! 1 MiB per incoming message, a ping every 30 s, 10 s per write, closed
//! when the lease ends, 1001 when the server shuts down
//! ([`HubState::shutdown`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, mpsc};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use atlas_access::Egress;
use atlas_audit::{AuditEntry, AuditLog};
use atlas_events::fhircast::{
    Ack, Admit, ChannelEndpoint, Connection, Emitted, EventPattern, FhircastScopes, Hub,
    HubConfiguration, HubError, HubObserver, HubSettings, Mode, NewSubscription, Notification,
    Owner, SubscriptionDenial, SubscriptionNote, SubscriptionRequest,
};
use atlas_lake::Lake;
use atlas_policy::Principal;

use crate::auth::Authenticated;
use crate::{ApiError, AppState, ServeConfig};

/// The protocol the hub speaks (messages, event names, the hub's logic),
/// for clients such as `atlas fhircast listen`.
pub use atlas_events::fhircast as protocol;

/// `[fhircast]` settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FhircastConfig {
    /// Serve the hub.
    pub enabled: bool,
    /// The longest lease granted, in seconds (never past the token's `exp`).
    pub max_lease_secs: u64,
    /// How long a subscriber has to acknowledge an event, in milliseconds;
    /// past it a SyncError goes to the others and it is unsubscribed.
    pub ack_timeout_ms: u64,
    /// Let any authenticated token use any topic (for demos); off, a token
    /// must carry the topic in its `hub.topic` claim.
    pub open_topics: bool,
    /// Subscriptions held at once.
    pub max_subscribers: usize,
    /// Messages queued per connection before a subscriber that does not
    /// keep up is dropped.
    pub queue: usize,
}

impl Default for FhircastConfig {
    fn default() -> Self {
        FhircastConfig {
            enabled: true,
            max_lease_secs: 3600,
            ack_timeout_ms: 10_000,
            open_topics: false,
            max_subscribers: 10_000,
            queue: 256,
        }
    }
}

impl FhircastConfig {
    fn check(&self) -> Result<(), String> {
        if self.max_lease_secs == 0
            || self.ack_timeout_ms == 0
            || self.max_subscribers == 0
            || self.queue == 0
        {
            return Err("[fhircast] max_lease_secs, ack_timeout_ms, max_subscribers and queue must be at least 1".into());
        }
        Ok(())
    }
}

/// One event the hub sent, for `GET /events` (which filters it by
/// principal).
#[derive(Debug, Clone)]
pub struct ContextChange {
    pub topic: String,
    /// The event name, canonical (`Patient-open`, `SyncError`).
    pub event: String,
    pub id: String,
    pub timestamp: String,
    /// The first patient the event is about, if any (see `patients`).
    pub patient: Option<String>,
    /// Every patient the event is about (its context, and the open
    /// contexts it closes, updates or selects in), in order.
    pub patients: Vec<String>,
    /// The topic's current `context.versionId` after the event (empty when
    /// no context is open).
    pub version_id: String,
    /// The whole event notification as subscribers received it.
    pub notification: serde_json::Value,
}

/// The largest WebSocket message accepted, and request-context-change body.
const MAX_MESSAGE: usize = 1 << 20;
const PING_EVERY: Duration = Duration::from_secs(30);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the hub's audit entries wait for the trail (whose handle the
/// first request brings: `AppState` opens it after the hub).
struct AuditSink {
    tx: mpsc::UnboundedSender<AuditEntry>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<AuditEntry>>>,
}

/// Turns what the hub did into audit entries and `/events` changes.
struct Observer {
    changes: broadcast::Sender<ContextChange>,
    audit: mpsc::UnboundedSender<AuditEntry>,
}

fn entry(owner: Option<&Owner>, topic: &str, query: String) -> AuditEntry {
    let path = format!("/fhircast/hub/{topic}");
    let query_hash = hex::encode(Sha256::digest(
        format!("FHIRCAST {path}?{query}").as_bytes(),
    ));
    AuditEntry {
        time: atlas_audit::now_rfc3339(),
        subject: owner.map(|o| o.subject.clone()),
        issuer: owner.map(|o| o.issuer.clone()),
        client: owner.and_then(|o| o.client.clone()),
        method: "FHIRCAST".to_owned(),
        path: atlas_access::facts::redact(&path),
        query,
        query_hash,
        status: 202,
        decision: "allow".to_owned(),
        ..Default::default()
    }
}

fn form(pairs: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

impl HubObserver for Observer {
    fn emitted(&self, e: &Emitted) {
        let name = e.event.to_string();
        let generated = if e.publisher.is_none() {
            "true"
        } else {
            "false"
        };
        let mut a = entry(
            e.publisher.as_ref(),
            &e.topic,
            form(&[
                ("hub.event", &name),
                ("id", &e.id),
                ("generated", generated),
            ]),
        );
        a.rows = Some(e.delivered as u64);
        if !e.patients.is_empty() {
            a.resource_types = vec!["Patient".to_owned()];
        }
        a.patients = e.patients.iter().take(20).cloned().collect();
        a.patient_count = Some(e.patients.len() as u64);
        let _ = self.audit.send(a);
        let _ = self.changes.send(ContextChange {
            topic: e.topic.clone(),
            event: name,
            id: e.id.clone(),
            timestamp: e.timestamp.clone(),
            patient: e.patients.first().cloned(),
            patients: e.patients.clone(),
            version_id: e.version_id.clone().unwrap_or_default(),
            notification: (*e.notification).clone(),
        });
    }

    fn subscription(&self, n: &SubscriptionNote) {
        let lease = n.lease_seconds.to_string();
        let query = match n.ended {
            None => form(&[
                ("hub.mode", "subscribe"),
                ("hub.events", &n.events),
                ("hub.lease_seconds", &lease),
            ]),
            Some(why) => form(&[
                ("hub.mode", "unsubscribe"),
                ("hub.events", &n.events),
                ("reason", why.as_str()),
            ]),
        };
        let mut a = entry(Some(&n.owner), &n.topic, query);
        a.rows = Some(0);
        let _ = self.audit.send(a);
    }
}

/// The hub's state shared by every handler.
pub struct HubState {
    hub: Arc<Hub>,
    config: FhircastConfig,
    changes: broadcast::Sender<ContextChange>,
    audit: AuditSink,
}

impl HubState {
    pub(crate) async fn open(_lake: &Lake, config: &ServeConfig) -> Result<Arc<HubState>, String> {
        let c = config.fhircast.clone();
        c.check()?;
        let (changes, _) = broadcast::channel(1024);
        let (tx, rx) = mpsc::unbounded_channel();
        let observer = Arc::new(Observer {
            changes: changes.clone(),
            audit: tx.clone(),
        });
        let hub = Arc::new(
            Hub::new(HubSettings {
                ack_timeout: Duration::from_millis(c.ack_timeout_ms),
                queue: c.queue,
                max_subscribers: c.max_subscribers,
                max_lease: Duration::from_secs(c.max_lease_secs),
                ..HubSettings::default()
            })
            .with_observer(observer),
        );
        if c.enabled {
            hub.spawn_sweeper();
        }
        Ok(Arc::new(HubState {
            hub,
            config: c,
            changes,
            audit: AuditSink {
                tx,
                rx: Mutex::new(Some(rx)),
            },
        }))
    }

    /// Every event the hub sends from now on (context changes, updates,
    /// selections, SyncErrors), for `GET /events`.
    pub fn context_changes(&self) -> broadcast::Receiver<ContextChange> {
        self.changes.subscribe()
    }

    /// Closes every FHIRcast socket with 1001 and refuses new
    /// subscriptions (the server is going away).
    pub fn shutdown(&self) {
        self.hub.shutdown();
    }

    /// The hub (subscription counts, for metrics and tests).
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    pub fn config(&self) -> &FhircastConfig {
        &self.config
    }

    /// Starts writing the hub's audit entries to `log` (once; without a
    /// trail they are dropped).
    fn start_audit(&self, log: &Option<Arc<AuditLog>>) {
        let Some(mut rx) = self.audit.rx.lock().ok().and_then(|mut g| g.take()) else {
            return;
        };
        let Some(log) = log.clone() else { return };
        tokio::spawn(async move {
            while let Some(e) = rx.recv().await {
                if let Err(err) = log.record(e).await {
                    tracing::error!(error = %err, "FHIRcast audit entry not written");
                }
            }
        });
    }
}

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(well_known))
        .routes(routes!(well_known_under_hub))
        .routes(routes!(hub_post))
        .routes(routes!(topic_get, topic_post))
        .routes(routes!(websocket))
}

/// The ready hub, or 404 when `[fhircast] enabled` is off.
fn ready(state: &AppState) -> Result<&HubState, ApiError> {
    let h = &state.fhircast;
    if !h.config.enabled {
        return Err(ApiError::not_found(
            "path",
            "/fhircast",
            "the FHIRcast hub is off ([fhircast] enabled = false)",
        ));
    }
    h.start_audit(&state.audit);
    Ok(h)
}

/// A refusal, its reason noted for the request's audit record.
fn forbidden(param: &str, value: &str, message: impl Into<String>) -> ApiError {
    let message = message.into();
    atlas_access::facts::note(|f| f.reason = Some(message.clone()));
    ApiError::new(
        StatusCode::FORBIDDEN,
        "FhircastForbidden",
        param,
        value,
        message,
    )
}

fn hub_error(e: HubError) -> ApiError {
    match e {
        HubError::Invalid { param, message } => ApiError::new(
            StatusCode::BAD_REQUEST,
            "InvalidFhircastRequest",
            param,
            "",
            message,
        ),
        HubError::NotFound { param, message } => ApiError::not_found(param, "", message),
        HubError::Conflict { param, message } => {
            ApiError::new(StatusCode::CONFLICT, "FhircastConflict", param, "", message)
        }
        HubError::Forbidden { param, message } => forbidden(&param, "", message),
        HubError::Denied(d) => {
            forbidden("endpoint", "", d.reason.unwrap_or_else(|| "denied".into()))
        }
        HubError::Unavailable(message) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "FhircastUnavailable",
            "hub",
            "",
            message,
        ),
    }
}

fn owner(who: &Principal) -> Owner {
    Owner {
        issuer: who.issuer.clone(),
        subject: who.subject.clone(),
        client: who.client_id.clone(),
    }
}

/// Whether the token may use `topic`: bound to it, or topics are open.
fn topic_allowed(h: &HubState, who: &Authenticated, topic: &str) -> Result<(), ApiError> {
    if h.config.open_topics || who.info.fhircast_topic.as_deref() == Some(topic) {
        return Ok(());
    }
    Err(forbidden(
        "hub.topic",
        topic,
        match &who.info.fhircast_topic {
            Some(_) => "the token is bound to another FHIRcast topic (its hub.topic claim)",
            None => {
                "the token is not bound to this topic (no hub.topic claim) and [fhircast] open_topics is off"
            }
        },
    ))
}

/// The ws(s):// base of endpoint URLs.
fn ws_base(state: &AppState) -> String {
    let base = state.config.public_base();
    match base.split_once("://") {
        Some(("https", rest)) => format!("wss://{rest}"),
        Some((_, rest)) => format!("ws://{rest}"),
        None => base,
    }
}

fn json(status: StatusCode, v: &impl serde::Serialize) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(v).unwrap_or_default(),
    )
        .into_response()
}

#[utoipa::path(get, path = "/.well-known/fhircast-configuration", tag = "fhircast", responses((status = 200, description = "The hub's FHIRcast capabilities: eventsSupported, websocketSupport, fhircastVersion, capabilities")))]
/// The hub's capabilities (STU3 2-7).
async fn well_known(State(state): State<AppState>) -> Result<Response, ApiError> {
    ready(&state)?;
    Ok(json(StatusCode::OK, &HubConfiguration::atlas()))
}

#[utoipa::path(get, path = "/fhircast/hub/.well-known/fhircast-configuration", tag = "fhircast", responses((status = 200, description = "The same document, under the hub URL as STU3 2-7 places it")))]
/// The capabilities, under `hub.url` (STU3 appends the well-known path to
/// the hub URL).
async fn well_known_under_hub(State(state): State<AppState>) -> Result<Response, ApiError> {
    well_known(State(state)).await
}

/// What a POST body is, by its content type.
enum Body {
    Form,
    Json,
}

/// By `Content-Type`; without one, by the body's first character (a JSON
/// event starts with `{`, a form never does).
fn body_kind(headers: &HeaderMap, body: &[u8]) -> Result<Body, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let media = ct.split(';').next().unwrap_or_default().trim();
    if media.is_empty() {
        return match body.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => Ok(Body::Json),
            Some(_) if body.contains(&b'=') => Ok(Body::Form),
            _ => Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                "Content-Type",
                "",
                "send a subscription form (application/x-www-form-urlencoded) or a JSON event (application/json)",
            )),
        };
    }
    match media {
        "application/x-www-form-urlencoded" => Ok(Body::Form),
        "application/json" | "application/fhir+json" => Ok(Body::Json),
        other => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            "Content-Type",
            other,
            "subscribe with application/x-www-form-urlencoded; request a context change with application/json (or application/fhir+json)",
        )),
    }
}

#[utoipa::path(post, path = "/fhircast/hub", tag = "fhircast", security(("bearer" = [])), request_body(content = String, description = "A form (hub.channel.type=websocket, hub.mode, hub.topic, hub.events, hub.lease_seconds, hub.channel.endpoint) to subscribe or unsubscribe; or a JSON event ({timestamp, id, event}) to request a context change", content_type = "application/x-www-form-urlencoded"), responses((status = 202, description = "Subscribed or unsubscribed ({\"hub.channel.endpoint\": \"ws(s)://...\"}), or the context change accepted and broadcast ({id, hub.event, delivered, context.versionId})"), (status = 400, description = "Invalid request; the body names the parameter", body = crate::openapi::ErrorBody), (status = 401, description = "No or bad bearer token", body = crate::openapi::ErrorBody), (status = 403, description = "Not bound to the topic, no fhircast/ scope for the events, or a patient outside the caller's access", body = crate::openapi::ErrorBody), (status = 409, description = "The context change does not fit the topic's state (stale context.versionId, another anchor open)", body = crate::openapi::ErrorBody), (status = 415, description = "Neither a form nor JSON", body = crate::openapi::ErrorBody)))]
/// The hub URL: subscriptions (form) and context changes (JSON).
async fn hub_post(
    State(state): State<AppState>,
    headers: HeaderMap,
    who: Authenticated,
    body: Bytes,
) -> Result<Response, ApiError> {
    let h = ready(&state)?;
    match body_kind(&headers, &body)? {
        Body::Form => subscription(&state, h, &who, &body, None),
        Body::Json => publish(&state, h, &who, &body, None),
    }
}

#[utoipa::path(post, path = "/fhircast/hub/{topic}", tag = "fhircast", security(("bearer" = [])), params(("topic" = String, Path, description = "The session topic; must equal the body's hub.topic")), request_body(content = Object, description = "A JSON event ({timestamp, id, event}), or a subscription form", content_type = "application/json"), responses((status = 202, description = "Accepted and broadcast (or subscribed)"), (status = 400, description = "Invalid request", body = crate::openapi::ErrorBody), (status = 403, description = "Refused by policy", body = crate::openapi::ErrorBody), (status = 409, description = "Does not fit the topic's state", body = crate::openapi::ErrorBody)))]
/// A context change (or subscription) for one topic.
async fn topic_post(
    State(state): State<AppState>,
    Path(topic): Path<String>,
    headers: HeaderMap,
    who: Authenticated,
    body: Bytes,
) -> Result<Response, ApiError> {
    let h = ready(&state)?;
    match body_kind(&headers, &body)? {
        Body::Form => subscription(&state, h, &who, &body, Some(&topic)),
        Body::Json => publish(&state, h, &who, &body, Some(&topic)),
    }
}

/// `topic` as the path gave it must be the body's.
fn same_topic(path: Option<&str>, body: &str) -> Result<(), ApiError> {
    match path {
        Some(p) if p != body => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "InvalidFhircastRequest",
            "hub.topic",
            body,
            format!("the body's topic is not the path's ({p})"),
        )),
        _ => Ok(()),
    }
}

fn subscription(
    state: &AppState,
    h: &HubState,
    who: &Authenticated,
    body: &[u8],
    path_topic: Option<&str>,
) -> Result<Response, ApiError> {
    let req = SubscriptionRequest::from_form(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "InvalidFhircastRequest",
            e.param.clone(),
            "",
            e.message,
        )
    })?;
    same_topic(path_topic, &req.topic)?;
    let me = owner(&who.principal);
    if req.mode == Mode::Unsubscribe {
        let url = req.channel_endpoint.clone().unwrap_or_default();
        let id = url.rsplit('/').next().unwrap_or_default();
        h.hub.unsubscribe(&req.topic, id, &me).map_err(hub_error)?;
        return Ok(json(
            StatusCode::ACCEPTED,
            &ChannelEndpoint { endpoint: url },
        ));
    }
    topic_allowed(h, who, &req.topic)?;
    let asked =
        EventPattern::parse_list(req.events.as_deref().unwrap_or_default()).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "InvalidFhircastRequest",
                "hub.events",
                req.events.clone().unwrap_or_default(),
                e.to_string(),
            )
        })?;
    let scopes = FhircastScopes::from_scopes(&who.info.scopes);
    let granted = scopes.grant_read(&asked);
    if granted.is_empty() {
        return Err(forbidden(
            "hub.events",
            req.events.as_deref().unwrap_or_default(),
            "no fhircast/<event>.read scope of the token covers any of these events",
        ));
    }
    // The lease never outlives the token (STU3 2-4) nor the hub's bound.
    let now = jsonwebtoken::get_current_timestamp();
    let token_left = who.info.exp.saturating_sub(now);
    if token_left == 0 {
        return Err(forbidden(
            "Authorization",
            "Bearer …",
            "the token expires now: a subscription would end at once",
        ));
    }
    let lease = req
        .lease_seconds
        .unwrap_or(h.config.max_lease_secs)
        .min(h.config.max_lease_secs)
        .min(token_left);
    let gate = Arc::new(
        state
            .access
            .notices(who.principal.clone(), Egress::default()),
    );
    // Each delivery is decided then, and the context's resources leave as
    // this subscriber's grant lets them (hidden elements, de-identification).
    let admit: Admit = Arc::new(move |patients: &[String], text: &Arc<str>| {
        let out = gate.release_message(text, patients)?;
        Some(if out.as_str() == text.as_ref() {
            text.clone()
        } else {
            Arc::from(out)
        })
    });
    let endpoint = req
        .channel_endpoint
        .as_deref()
        .map(|u| u.rsplit('/').next().unwrap_or_default().to_owned());
    let s = h
        .hub
        .subscribe(NewSubscription {
            topic: req.topic.clone(),
            events: granted,
            lease: Duration::from_secs(lease),
            name: req.subscriber_name.clone(),
            owner: me,
            admit,
            endpoint,
        })
        .map_err(hub_error)?;
    Ok(json(
        StatusCode::ACCEPTED,
        &ChannelEndpoint {
            endpoint: format!("{}/fhircast/ws/{}", ws_base(state), s.endpoint),
        },
    ))
}

fn publish(
    state: &AppState,
    h: &HubState,
    who: &Authenticated,
    body: &[u8],
    path_topic: Option<&str>,
) -> Result<Response, ApiError> {
    if body.len() > MAX_MESSAGE {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestTooLarge",
            "body",
            "…",
            format!("a context change is limited to {MAX_MESSAGE} bytes"),
        ));
    }
    let n = Notification::from_json(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "InvalidFhircastRequest",
            e.param.clone(),
            "",
            e.message,
        )
    })?;
    same_topic(path_topic, &n.event.topic)?;
    let event = Hub::check(&n).map_err(hub_error)?;
    let topic = n.event.topic.clone();
    let me = owner(&who.principal);
    let query = form(&[("hub.event", &event.to_string()), ("id", &n.id)]);
    let refuse = |e: ApiError, h: &HubState| {
        let mut a = entry(Some(&me), &topic, query.clone());
        a.status = e.status.as_u16();
        a.decision = "deny".to_owned();
        a.reason = Some(e.message.clone());
        a.rows = Some(0);
        let _ = h.audit.tx.send(a);
        e
    };
    topic_allowed(h, who, &topic).map_err(|e| refuse(e, h))?;
    let scopes = FhircastScopes::from_scopes(&who.info.scopes);
    if !scopes.can_write(&event) {
        return Err(refuse(
            forbidden(
                "hub.event",
                &event.to_string(),
                format!("requesting {event} needs the scope fhircast/{event}.write"),
            ),
            h,
        ));
    }
    // A publisher may not speak about a patient it may not see.
    let gate = state
        .access
        .notices(who.principal.clone(), Egress::for_request());
    let patients = h.hub.patients_for(&n);
    if !patients.iter().all(|p| gate.admits("Patient", Some(p))) {
        return Err(refuse(
            forbidden(
                "context",
                "patient",
                "the event names a patient outside the caller's access",
            ),
            h,
        ));
    }
    let published = h
        .hub
        .publish(n, me.clone())
        .map_err(|e| refuse(hub_error(e), h))?;
    for p in &published.patients {
        atlas_access::facts::note_patient(p);
    }
    // 202, as the spec's example; the body tells the sender what the
    // broadcast carries (its id, and the context version to update from).
    let mut answer = serde_json::json!({
        "id": published.notification["id"],
        "hub.event": published.event.to_string(),
        "delivered": published.delivered,
    });
    if let Some(v) = &published.version_id {
        answer["context.versionId"] = serde_json::json!(v);
    }
    Ok(json(StatusCode::ACCEPTED, &answer))
}

#[utoipa::path(get, path = "/fhircast/hub/{topic}", tag = "fhircast", security(("bearer" = [])), params(("topic" = String, Path, description = "The session topic")), responses((status = 200, description = "The current context: {context.type, context.versionId, context: [...] with the shared content}; empty when none is open (or when it is about a patient outside the caller's access)"), (status = 401, description = "No or bad bearer token", body = crate::openapi::ErrorBody), (status = 403, description = "Not bound to the topic, or no fhircast/ read scope", body = crate::openapi::ErrorBody)))]
/// Get current context (STU3 2-9).
async fn topic_get(
    State(state): State<AppState>,
    Path(topic): Path<String>,
    who: Authenticated,
) -> Result<Response, ApiError> {
    let h = ready(&state)?;
    topic_allowed(h, &who, &topic)?;
    if !FhircastScopes::from_scopes(&who.info.scopes).reads_any() {
        return Err(forbidden(
            "Authorization",
            "Bearer …",
            "reading a topic's context needs a fhircast/<event>.read scope",
        ));
    }
    let (current, patients) = h.hub.current_context(&topic);
    let gate = state
        .access
        .notices(who.principal.clone(), Egress::for_request());
    let text = serde_json::to_string(&current).unwrap_or_default();
    match gate.release_message(&text, &patients) {
        Some(released) => {
            for p in &patients {
                gate.egress().note_patient(p);
            }
            Ok((
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                released,
            )
                .into_response())
        }
        None => {
            // Answered like no context, and recorded as out of scope.
            atlas_access::facts::note(|f| f.out_of_scope = true);
            Ok(json(
                StatusCode::OK,
                &atlas_events::fhircast::CurrentContext::empty(),
            ))
        }
    }
}

#[utoipa::path(get, path = "/fhircast/ws/{endpoint}", tag = "fhircast", params(("endpoint" = String, Path, description = "The id from hub.channel.endpoint: the socket's credential, used once")), responses((status = 101, description = "WebSocket: the confirmation, the open contexts, then events; send {id, status} for each"), (status = 400, description = "Not a WebSocket upgrade", body = crate::openapi::ErrorBody), (status = 404, description = "No such subscription", body = crate::openapi::ErrorBody)))]
/// The WebSocket of one subscription.
async fn websocket(
    State(state): State<AppState>,
    Path(endpoint): Path<String>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let h = ready(&state)?;
    let ws = ws.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "NotAWebSocket",
            "Upgrade",
            "",
            format!("this endpoint is a WebSocket: {e}"),
        )
    })?;
    // The id is a credential: never echoed back.
    if !h.hub.knows(&endpoint) {
        return Err(ApiError::not_found(
            "endpoint",
            "[redacted]",
            "no such subscription: subscribe again for a new endpoint",
        ));
    }
    let ws = ws.max_message_size(MAX_MESSAGE).max_frame_size(MAX_MESSAGE);
    let hub = h.hub.clone();
    match hub.connect(&endpoint) {
        Ok(conn) => Ok(ws.on_upgrade(move |socket| run_socket(hub, socket, conn))),
        Err(HubError::Denied(d)) => Ok(ws.on_upgrade(move |socket| deny(socket, d))),
        Err(e) => Err(hub_error(e)),
    }
}

/// The STU3 denial, then close (policy violation).
async fn deny(mut socket: WebSocket, d: SubscriptionDenial) {
    let text = serde_json::to_string(&d).unwrap_or_default();
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        let _ = socket.send(Message::Text(text.into())).await;
        let _ = socket
            .send(Message::Close(Some(CloseFrame {
                code: 1008,
                reason: "subscription denied".into(),
            })))
            .await;
    })
    .await;
}

/// Sends with the write deadline; false when the socket is gone or stuck.
async fn send<S>(tx: &mut S, m: Message) -> bool
where
    S: futures::Sink<Message> + Unpin,
{
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, tx.send(m)).await,
        Ok(Ok(()))
    )
}

/// One subscription's socket: the hub's queue out, acknowledgements in.
async fn run_socket(hub: Arc<Hub>, socket: WebSocket, mut conn: Connection) {
    let endpoint = conn.endpoint.clone();
    let (mut tx, mut rx) = socket.split();
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    // The sweeper ends the lease; this is the socket's own bound should it
    // be late (re-armed when a re-subscription extended the lease).
    let grace = Duration::from_secs(2);
    let mut lease_end = tokio::time::Instant::from_std(conn.expires_at) + grace;
    loop {
        tokio::select! {
            biased;
            changed = conn.closing.changed() => {
                let closing = conn.closing.borrow().clone();
                match (changed, closing) {
                    (_, Some(c)) => {
                        if let Some(d) = c.denial {
                            send(&mut tx, Message::Text(d.as_ref().into())).await;
                        }
                        send(&mut tx, Message::Close(Some(CloseFrame { code: c.code, reason: c.reason.into() }))).await;
                        return;
                    }
                    (Err(_), None) => {
                        send(&mut tx, Message::Close(Some(CloseFrame { code: 1001, reason: "hub gone".into() }))).await;
                        return;
                    }
                    (Ok(()), None) => {}
                }
            }
            incoming = rx.next() => match incoming {
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<Ack>(t.as_str()) {
                    Ok(ack) => hub.ack(&endpoint, &ack),
                    Err(e) => tracing::debug!(error = %e, "FHIRcast: a message that is not an acknowledgement, ignored"),
                },
                Some(Ok(Message::Close(frame))) => {
                    hub.disconnected(&endpoint, frame.map(|f| f.code));
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::info!(error = %e, "FHIRcast socket error");
                    // Too large, or broken: tell the subscriber if we can.
                    send(&mut tx, Message::Close(Some(CloseFrame { code: 1009, reason: "message too large or malformed".into() }))).await;
                    hub.disconnected(&endpoint, None);
                    return;
                }
                None => {
                    hub.disconnected(&endpoint, None);
                    return;
                }
            },
            msg = conn.messages.recv() => match msg {
                Some(text) => {
                    if !send(&mut tx, Message::Text(text.as_ref().into())).await {
                        hub.disconnected(&endpoint, None);
                        return;
                    }
                }
                None => {
                    send(&mut tx, Message::Close(Some(CloseFrame { code: 1001, reason: "hub gone".into() }))).await;
                    return;
                }
            },
            _ = ping.tick() => {
                if !send(&mut tx, Message::Ping(Bytes::new())).await {
                    hub.disconnected(&endpoint, None);
                    return;
                }
            }
            _ = tokio::time::sleep_until(lease_end) => {
                hub.sweep();
                // The sweep signals `closing`; should it not, the lease
                // was renewed (wait for its new end), or end here.
                if conn.closing.borrow().is_none() {
                    match hub.lease_left(&endpoint) {
                        Some(left) if !left.is_zero() => {
                            lease_end = tokio::time::Instant::now() + left + grace;
                        }
                        _ => {
                            hub.disconnected(&endpoint, Some(1000));
                            send(&mut tx, Message::Close(Some(CloseFrame { code: 1000, reason: "lease expired".into() }))).await;
                            return;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use atlas_events::fhircast::EventName;

    #[test]
    fn config_defaults_and_bounds() {
        let c = FhircastConfig::default();
        assert!(c.enabled && !c.open_topics);
        assert_eq!(
            (
                c.max_lease_secs,
                c.ack_timeout_ms,
                c.max_subscribers,
                c.queue
            ),
            (3600, 10_000, 10_000, 256)
        );
        let parsed: FhircastConfig = toml::from_str("open_topics = true\nqueue = 8").unwrap();
        assert!(parsed.open_topics);
        assert_eq!(parsed.queue, 8);
        assert!(toml::from_str::<FhircastConfig>("nope = 1").is_err());
        assert!(FhircastConfig { queue: 0, ..c }.check().is_err());
    }

    #[test]
    fn event_names_in_scopes_are_canonical() {
        let e = EventName::parse("patient-open").unwrap();
        assert_eq!(format!("fhircast/{e}.write"), "fhircast/Patient-open.write");
    }
}
