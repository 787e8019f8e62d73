//! FHIR Subscriptions (R4 backport IG, topic-based, `rest-hook`) of
//! `atlas serve`.
//!
//! # What this module owns
//! * The routes under `/fhir`: `POST /fhir/Subscription` (the server
//!   assigns the id; the subscription starts `requested`, is handshaken
//!   and answers `active` or `error`), `GET`, `PUT`, `DELETE
//!   /fhir/Subscription/{id}`, `GET /fhir/Subscription` (the caller's own),
//!   `$status` (`GET /fhir/Subscription/{id}/$status`, and
//!   `GET|POST /fhir/Subscription/$status?id=&status=`), `$events`
//!   (`GET /fhir/Subscription/{id}/$events`: the last `[subscriptions]
//!   events_kept` events, at most id-only), and the topics
//!   (`GET /fhir/SubscriptionTopic`, `/fhir/SubscriptionTopic/{id}`: R4
//!   `Basic` resources in the IG's cross-version form).
//! * The subscriptions' state: one record each in the lake
//!   (`events/subscriptions/<id>.json`: the resource, its creator, the
//!   creator's token expiry, the event counter and the store version
//!   processed), loaded by `SubscriptionState::open`, so subscriptions
//!   and their counters survive restarts and resume where they stopped.
//! * Their delivery (`delivery`): a task per subscription following the
//!   store's change broadcast, releasing every event through the access
//!   seam for the subscription's creator, batching events into
//!   notifications, heartbeats, retries, one audit record per delivery.
//!
//! What a subscription may ask for (topics, filters, channel, payload) is
//! decided by `atlas-events` (`atlas_events::subscriptions`); refusals are
//! OperationOutcomes naming the element (400 malformed, 422 unsupported).
//!
//! Access: a subscription belongs to the principal that made it (issuer and
//! subject); others get 404 for it. Its notifications are decided for that
//! principal (scopes, roles, purpose and patient claim as its token said)
//! when each event happens, and stop when that token expires (status `off`,
//! until the owner updates the subscription with a valid token). The
//! channel headers (often credentials) are kept to be sent, and never
//! shown: reads answer them as `Name: [redacted]`, and an update that
//! sends that back keeps the stored value.

mod delivery;

/// The protocol itself (topics, filters, notification Bundles, the
/// rest-hook sender), for this crate's users: `atlas pull subscription`
/// parses the notifications it receives with it.
pub use atlas_events::subscriptions as backport;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::Deserialize;
use serde_json::{Value as Json, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use atlas_access::Egress;
use atlas_access::notice::{ChangeRef, Payload};
use atlas_events::subscriptions::notification::resource_url;
use atlas_events::subscriptions::{
    EXT_CAPABILITY_TOPIC, Endpoint, Entry, IssueCode, Notification, NotificationEvent,
    NotificationType, OP_EVENTS, OP_STATUS, PROFILE_SUBSCRIPTION, PayloadContent, Rejection,
    RestHook, Retry, Rules, Spec, Status, StatusInfo, TopicCatalog, topic,
};
use atlas_lake::{ChangeFeed, Lake};
use atlas_policy::{Action, Decision, Principal};

use crate::auth::Authenticated;
use crate::fhir::Outcome;
use crate::{ApiError, AppState, ServeConfig};
use delivery::{Delivery, Owner, Record, Runtime, Stop, Sub};

/// Where the subscriptions' records live in the lake.
pub(crate) const DIR: &str = "events/subscriptions";
/// How channel header values are shown.
const REDACTED: &str = "[redacted]";
/// The largest Subscription body taken.
const MAX_BODY: usize = 256 << 10;

/// `[subscriptions]` settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubscriptionsConfig {
    /// Offer FHIR Subscriptions (off: the routes answer 404).
    pub enabled: bool,
    /// The resource types with a topic (`<type>-change`: create, update, delete).
    pub topic_types: Vec<String>,
    /// Plain http to endpoints other than loopback (never in production:
    /// notifications carry patient data and the channel headers).
    pub allow_http: bool,
    /// Endpoints on this machine or the private network (`localhost`,
    /// loopback, RFC 1918, fc00::/7, link-local, unspecified addresses,
    /// and host names resolving to any): off (the default), they are
    /// refused at create and update (422) and at every delivery, and no
    /// HTTP proxy is used for notifications.
    pub private_endpoints: bool,
    /// Heartbeat periods asked for are kept within these bounds (seconds).
    pub min_heartbeat_secs: u32,
    pub max_heartbeat_secs: u32,
    /// Per-request timeout of a notification when the subscription names
    /// none (`backport-timeout`), and the largest it may name (seconds).
    pub default_timeout_secs: u32,
    pub max_timeout_secs: u32,
    /// Events per notification when the subscription names no
    /// `backport-max-count`, and the largest it may name.
    pub default_max_count: u32,
    pub max_max_count: u32,
    /// Attempts per notification (connection errors, timeouts, 408, 429,
    /// 5xx), with exponential backoff from `retry_base_ms` to `retry_max_ms`.
    pub retry_attempts: u32,
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// Subscriptions per principal, and in all.
    pub max_per_principal: usize,
    pub max_total: usize,
    /// Events kept per subscription for `$events`.
    pub events_kept: usize,
}

impl Default for SubscriptionsConfig {
    fn default() -> Self {
        let rules = Rules::default();
        let retry = Retry::default();
        SubscriptionsConfig {
            enabled: true,
            topic_types: topic::DEFAULT_TYPES.iter().map(|s| s.to_string()).collect(),
            allow_http: false,
            private_endpoints: rules.private_endpoints,
            min_heartbeat_secs: rules.min_heartbeat_secs,
            max_heartbeat_secs: rules.max_heartbeat_secs,
            default_timeout_secs: rules.default_timeout_secs,
            max_timeout_secs: rules.max_timeout_secs,
            default_max_count: rules.default_max_count,
            max_max_count: rules.max_max_count,
            retry_attempts: retry.attempts,
            retry_base_ms: retry.base.as_millis() as u64,
            retry_max_ms: retry.max.as_millis() as u64,
            max_per_principal: 20,
            max_total: 1000,
            events_kept: 256,
        }
    }
}

impl SubscriptionsConfig {
    fn rules(&self) -> Rules {
        Rules {
            allow_http: self.allow_http,
            private_endpoints: self.private_endpoints,
            min_heartbeat_secs: self.min_heartbeat_secs,
            max_heartbeat_secs: self.max_heartbeat_secs,
            default_timeout_secs: self.default_timeout_secs,
            max_timeout_secs: self.max_timeout_secs,
            default_max_count: self.default_max_count,
            max_max_count: self.max_max_count,
            ..Rules::default()
        }
    }

    fn retry(&self) -> Retry {
        Retry {
            attempts: self.retry_attempts.max(1),
            base: std::time::Duration::from_millis(self.retry_base_ms.max(1)),
            max: std::time::Duration::from_millis(self.retry_max_ms.max(self.retry_base_ms)),
        }
    }

    fn check(&self) -> Result<(), String> {
        let bad = |what: &str| Err(format!("[subscriptions] {what}"));
        if self.min_heartbeat_secs == 0 || self.min_heartbeat_secs > self.max_heartbeat_secs {
            return bad("min_heartbeat_secs must be from 1 to max_heartbeat_secs");
        }
        if self.default_timeout_secs == 0 || self.default_timeout_secs > self.max_timeout_secs {
            return bad("default_timeout_secs must be from 1 to max_timeout_secs");
        }
        if self.default_max_count == 0 || self.default_max_count > self.max_max_count {
            return bad("default_max_count must be from 1 to max_max_count");
        }
        Ok(())
    }
}

/// Subscriptions, topics and their delivery.
pub struct SubscriptionState {
    config: SubscriptionsConfig,
    rules: Rules,
    retry: Retry,
    catalog: Arc<TopicCatalog>,
    subs: Mutex<BTreeMap<String, Arc<Sub>>>,
    runtime: OnceLock<Arc<Runtime>>,
    started: AtomicBool,
    /// Serialises creates, so the limits hold.
    admit: tokio::sync::Mutex<()>,
}

impl SubscriptionState {
    /// Loads the lake's subscriptions. Their delivery starts with
    /// [`SubscriptionState::start`].
    pub(crate) async fn open(
        lake: &Lake,
        config: &ServeConfig,
    ) -> Result<Arc<SubscriptionState>, String> {
        let c = config.subscriptions.clone();
        c.check()?;
        let catalog = TopicCatalog::builtin(&c.topic_types)
            .map_err(|e| format!("[subscriptions] topic_types: {e}"))?;
        let rules = c.rules();
        let subs = load(lake, &catalog, &rules).await?;
        Ok(Arc::new(SubscriptionState {
            retry: c.retry(),
            config: c,
            rules,
            catalog: Arc::new(catalog),
            subs: Mutex::new(subs),
            runtime: OnceLock::new(),
            started: AtomicBool::new(false),
            admit: tokio::sync::Mutex::new(()),
        }))
    }

    /// Starts delivering: each subscription that is not `off` gets its
    /// task. Idempotent; every Subscription route calls it, and the server
    /// should once it is up (so subscriptions resume after a restart
    /// before any request comes).
    pub fn start(&self, state: &AppState) {
        let Some(rt) = self.runtime(state) else {
            return;
        };
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        for sub in lock(&self.subs).values() {
            let runs = matches!(
                sub.status(),
                Status::Requested | Status::Active | Status::Error
            );
            if runs && sub.spec().is_some() {
                delivery::spawn(&rt, sub);
            }
        }
    }

    fn runtime(&self, state: &AppState) -> Option<Arc<Runtime>> {
        if !self.config.enabled {
            return None;
        }
        if let Some(rt) = self.runtime.get() {
            return Some(rt.clone());
        }
        let hook = match RestHook::new(self.config.private_endpoints) {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "FHIR Subscriptions cannot deliver");
                return None;
            }
        };
        let poll = (!state.config.events.enabled)
            .then(|| std::time::Duration::from_millis(state.config.events.poll_ms.max(10)));
        let rt = Arc::new(Runtime {
            access: state.access.clone(),
            audit: state.audit.clone(),
            events: state.events.clone(),
            catalog: self.catalog.clone(),
            base: base_url(state),
            hook,
            retry: self.retry.clone(),
            events_kept: self.config.events_kept,
            poll,
        });
        Some(self.runtime.get_or_init(|| rt).clone())
    }

    /// The topics offered.
    pub fn catalog(&self) -> &TopicCatalog {
        &self.catalog
    }

    /// The CapabilityStatement's `rest.resource` entry for Subscription:
    /// the backport profile, the interactions, `$status` and `$events`,
    /// and every topic offered (`capabilitystatement-subscriptiontopic-canonical`).
    pub fn capability(&self) -> Json {
        let topics: Vec<Json> = self
            .catalog
            .iter()
            .map(|t| json!({"url": EXT_CAPABILITY_TOPIC, "valueCanonical": t.url}))
            .collect();
        json!({
            "type": "Subscription",
            "extension": topics,
            "supportedProfile": [PROFILE_SUBSCRIPTION],
            "interaction": [
                {"code": "read"}, {"code": "create"}, {"code": "update"},
                {"code": "delete"}, {"code": "search-type"}
            ],
            "searchParam": [
                {"name": "status", "definition": "http://hl7.org/fhir/SearchParameter/Subscription-status", "type": "token"},
                {"name": "url", "definition": "http://hl7.org/fhir/SearchParameter/Subscription-url", "type": "uri"},
                {"name": "topic", "definition": "http://hl7.org/fhir/uv/subscriptions-backport/SearchParameter/Subscription-topic", "type": "uri"}
            ],
            "operation": [
                {"name": "status", "definition": OP_STATUS},
                {"name": "events", "definition": OP_EVENTS}
            ]
        })
    }

    /// A subscription's status and event counter (for operators and tests).
    pub fn status_of(&self, id: &str) -> Option<(Status, u64)> {
        let sub = lock(&self.subs).get(id).cloned()?;
        let r = sub.record();
        Some((r.status(), r.events))
    }

    fn get(&self, id: &str) -> Option<Arc<Sub>> {
        lock(&self.subs).get(id).cloned()
    }

    /// `id` if `who` made it; otherwise the same 404 as for no such id.
    fn owned(&self, id: &str, who: &Principal) -> Result<Arc<Sub>, Refused> {
        self.get(id)
            .filter(|s| lock(&s.rec).owner.is(who))
            .ok_or_else(|| {
                refused(ApiError::not_found(
                    "id",
                    id,
                    format!("no Subscription/{id} of yours"),
                ))
            })
    }

    fn of(&self, who: &Principal) -> Vec<Arc<Sub>> {
        lock(&self.subs)
            .values()
            .filter(|s| lock(&s.rec).owner.is(who))
            .cloned()
            .collect()
    }

    fn enabled(&self) -> Result<(), Refused> {
        if self.config.enabled {
            Ok(())
        } else {
            Err(refused(ApiError::not_found(
                "resourceType",
                "Subscription",
                "FHIR Subscriptions are off on this server ([subscriptions] enabled = false)",
            )))
        }
    }
}

impl Drop for SubscriptionState {
    fn drop(&mut self) {
        for sub in lock(&self.subs).values() {
            sub.signal_stop();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads every record under [`DIR`]. A record that cannot be read is
/// logged and left in place (it is the owner's data), not served.
async fn load(
    lake: &Lake,
    catalog: &TopicCatalog,
    rules: &Rules,
) -> Result<BTreeMap<String, Arc<Sub>>, String> {
    use futures::StreamExt;
    use object_store::ObjectStoreExt;
    let store = lake.object_store();
    let mut out = BTreeMap::new();
    let mut list = store.list(Some(&lake.path(DIR)));
    let mut paths = Vec::new();
    while let Some(meta) = list.next().await {
        let meta = meta.map_err(|e| format!("listing {DIR}: {e}"))?;
        paths.push(meta.location);
    }
    for path in paths {
        let Some(id) = path
            .filename()
            .and_then(|f| f.strip_suffix(".json"))
            .map(str::to_owned)
        else {
            continue;
        };
        let bytes = match store.get(&path).await {
            Ok(r) => r.bytes().await.map_err(|e| format!("{path}: {e}"))?,
            Err(e) => return Err(format!("{path}: {e}")),
        };
        let mut rec: Record = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(%path, error = %e, "subscription record unreadable; not served");
                continue;
            }
        };
        // `end` is checked by the task; a stored subscription is valid as
        // of when it was made.
        let spec = match atlas_events::subscriptions::validate(
            &rec.resource,
            catalog,
            rules,
            chrono::DateTime::<Utc>::MIN_UTC,
        ) {
            Ok(s) => Some(Arc::new(s)),
            Err(r) => {
                if rec.status() != Status::Off {
                    rec.set_status(
                        Status::Error,
                        Some(format!("no longer valid on this server: {r}")),
                    );
                }
                None
            }
        };
        out.insert(id.clone(), Arc::new(Sub::new(id, rec, spec)));
    }
    Ok(out)
}

/// `<public base>/fhir`: the base of every URL a notification carries.
fn base_url(state: &AppState) -> String {
    format!("{}/fhir", state.config.public_base())
}

fn fhir(status: StatusCode, body: &Json) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/fhir+json")],
        body.to_string(),
    )
        .into_response()
}

/// A refusal on its way out of a helper (boxed: a `Response` is large).
type Refused = Box<Response>;

fn refused(e: ApiError) -> Refused {
    Box::new(oo(e))
}

/// An error as an OperationOutcome.
fn oo(e: ApiError) -> Response {
    Outcome::from(e).into_response()
}

/// What every Subscription route does first: the feature is on, the caller
/// is authenticated, and delivery runs.
fn open_route(
    state: &AppState,
    who: Result<Authenticated, ApiError>,
) -> Result<(Arc<SubscriptionState>, Authenticated), Refused> {
    let subs = state.subscriptions.clone();
    subs.enabled()?;
    let who = who.map_err(|e| Box::new(oo(e)))?;
    subs.start(state);
    Ok((subs, who))
}

/// A refused Subscription: every issue, naming its element.
fn reject(r: &Rejection) -> Response {
    let status = StatusCode::from_u16(r.status()).unwrap_or(StatusCode::BAD_REQUEST);
    let mut resp = fhir(status, &r.operation_outcome());
    resp.extensions_mut()
        .insert(crate::error::ErrorKind("SubscriptionRejected"));
    atlas_access::facts::note(|f| f.reason = Some(atlas_access::facts::redact(&r.to_string())));
    resp
}

fn bad(parameter: &str, value: &str, message: impl Into<String>) -> Response {
    oo(crate::error::bad(
        "InvalidParameter",
        parameter,
        value,
        message.into(),
    ))
}

fn internal(e: impl std::fmt::Display) -> Response {
    oo(crate::error::internal(e))
}

/// The request body as a JSON resource.
fn parse_body(body: &Bytes) -> Result<Json, Refused> {
    if body.len() > MAX_BODY {
        return Err(Box::new(reject(&Rejection::one(
            IssueCode::Structure,
            "Subscription",
            format!("a Subscription is at most {MAX_BODY} bytes"),
        ))));
    }
    serde_json::from_slice::<Json>(body).map_err(|e| {
        Box::new(reject(&Rejection::one(
            IssueCode::Structure,
            "Subscription",
            format!("the body is not JSON: {e}"),
        )))
    })
}

/// The resource as shown: channel header values redacted.
fn masked(resource: &Json) -> Json {
    let mut r = resource.clone();
    if let Some(h) = r["channel"]["header"].as_array_mut() {
        for line in h.iter_mut() {
            let name = line
                .as_str()
                .and_then(|l| l.split_once(':'))
                .map(|(n, _)| n.trim().to_owned());
            if let Some(n) = name {
                *line = Json::from(format!("{n}: {REDACTED}"));
            }
        }
    }
    r
}

/// An update's header lines that say `[redacted]` take the stored value
/// of the same header back.
fn unmask(new: &mut Json, old: &Json) -> Result<(), Rejection> {
    let stored: Vec<(String, String)> = old["channel"]["header"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l.as_str()?.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let Some(lines) = new["channel"]["header"].as_array_mut() else {
        return Ok(());
    };
    for line in lines.iter_mut() {
        let Some((n, v)) = line.as_str().and_then(|l| l.split_once(':')) else {
            continue;
        };
        if v.trim() != REDACTED {
            continue;
        }
        let name = n.trim().to_owned();
        let Some((_, value)) = stored.iter().find(|(k, _)| k.eq_ignore_ascii_case(&name)) else {
            return Err(Rejection::one(
                IssueCode::Value,
                "Subscription.channel.header",
                format!("header '{name}' says {REDACTED} but none was stored: send its value"),
            ));
        };
        *line = Json::from(format!("{name}: {value}"));
    }
    Ok(())
}

/// The creator must be able to learn of some change the topic fires for.
/// A Subscription resource checked against the offered topics and rules,
/// then against what its creator may read (create and update alike).
fn checked_spec(
    state: &AppState,
    subs: &SubscriptionState,
    who: &Principal,
    resource: &Json,
) -> Result<Spec, Refused> {
    let spec =
        atlas_events::subscriptions::validate(resource, &subs.catalog, &subs.rules, Utc::now())
            .map_err(|r| Box::new(reject(&r)))?;
    check_access(state, who, &spec)?;
    Ok(spec)
}

fn check_access(state: &AppState, who: &Principal, spec: &Spec) -> Result<(), Refused> {
    let Some(topic) = state.subscriptions.catalog.get(&spec.topic) else {
        return Err(Box::new(internal("the topic vanished")));
    };
    let mut any = false;
    for t in &topic.triggers {
        let Decision::Allow(grant) = state.decide(who, &t.resource_type, Action::Search) else {
            continue;
        };
        any = true;
        // A de-identifying grant sees hashed ids: a filter on ids or
        // references would link them to the real ones. Refused here,
        // never matched in delivery (policies reload).
        if grant.deid.is_some() && !delivery::deid_safe(&spec.filters, &t.resource_type) {
            let n = spec
                .filter_criteria
                .iter()
                .position(|raw| {
                    atlas_events::subscriptions::FilterSet::parse(
                        topic,
                        std::slice::from_ref(raw),
                        |_| String::new(),
                    )
                    .is_ok_and(|f| !delivery::deid_safe(&f, &t.resource_type))
                })
                .unwrap_or(0);
            return Err(Box::new(reject(&Rejection::one(
                IssueCode::NotSupported,
                format!("Subscription.criteria.extension:filterCriteria[{n}]"),
                format!(
                    "your access to {} is de-identified: a filter on ids or references \
                     (_id, patient, subject) would reveal the real ones; filter by code or \
                     status only",
                    t.resource_type
                ),
            ))));
        }
    }
    if any {
        return Ok(());
    }
    let r = Rejection::one(
        IssueCode::NotSupported,
        "Subscription.criteria",
        format!(
            "you may not read the resources topic {} is about",
            spec.topic
        ),
    );
    let mut resp = fhir(StatusCode::FORBIDDEN, &r.operation_outcome());
    resp.extensions_mut()
        .insert(crate::error::ErrorKind("SubscriptionForbidden"));
    Err(Box::new(resp))
}

/// A fresh subscription id (128 random bits, hex).
fn new_id() -> String {
    let mut b = [0u8; 16];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    hex::encode(b)
}

/// The resource with the server's elements: id, meta, status, and the
/// channel settings in force.
fn stamp(mut resource: Json, id: &str, version: u64, spec: &Spec) -> Json {
    resource["id"] = Json::from(id);
    let mut profiles: Vec<Json> = resource["meta"]["profile"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !profiles.iter().any(|p| p == PROFILE_SUBSCRIPTION) {
        profiles.push(Json::from(PROFILE_SUBSCRIPTION));
    }
    resource["meta"] = json!({
        "versionId": version.to_string(),
        "lastUpdated": atlas_audit::now_rfc3339(),
        "profile": profiles,
    });
    resource["status"] = Json::from(match spec.status {
        Status::Off => "off",
        _ => "requested",
    });
    if let Some(o) = resource.as_object_mut() {
        o.remove("error");
    }
    spec.write_back(&mut resource);
    resource
}

/// The store's newest version: a new (or re-enabled) subscription gets
/// the changes after it.
async fn store_version(state: &AppState) -> i64 {
    ChangeFeed::new(state.lake.clone())
        .latest_version()
        .await
        .ok()
        .flatten()
        .unwrap_or(-1)
}

/// Handshakes a subscription that asks to run, then starts its task.
async fn activate(state: &AppState, sub: &Arc<Sub>) {
    let Some(rt) = state.subscriptions.runtime(state) else {
        return;
    };
    let Some(spec) = sub.spec() else { return };
    if sub.status() == Status::Off {
        return;
    }
    match Endpoint::new(spec.endpoint.clone(), &spec.headers) {
        Ok(endpoint) => {
            let d = Delivery {
                rt: &rt,
                sub,
                spec: &spec,
                endpoint: &endpoint,
            };
            d.handshake(&mut Stop::never()).await;
        }
        Err(e) => {
            lock(&sub.rec).set_status(Status::Error, Some(e));
        }
    }
    delivery::spawn(&rt, sub);
}

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(search, create))
        .routes(routes!(status_many, status_many_post))
        .routes(routes!(read, update, delete))
        .routes(routes!(operation))
        .routes(routes!(topics))
        .routes(routes!(topic_read))
}

#[utoipa::path(post, path = "/fhir/Subscription", operation_id = "subscription_create", tag = "fhir", security(("bearer" = [])), request_body(content = Object, description = "A Subscription (backport profile): criteria = a topic's canonical URL, backport-filter-criteria, channel rest-hook with backport-payload-content", content_type = "application/fhir+json"), responses((status = 201, description = "The subscription as held (status active when the handshake went through, error when not)", content_type = "application/fhir+json"), (status = 400, description = "OperationOutcome: not a well-formed Subscription"), (status = 401, description = "OperationOutcome"), (status = 403, description = "OperationOutcome: the topic's resources are not yours to read"), (status = 422, description = "OperationOutcome naming the unsupported topic, filter, channel or payload")))]
/// Creates a subscription: checked, stored, handshaken, started.
async fn create(
    State(state): State<AppState>,
    who: Result<Authenticated, ApiError>,
    body: Bytes,
) -> Response {
    let (subs, who) = match open_route(&state, who) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let resource = match parse_body(&body) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let spec = match checked_spec(&state, &subs, &who.principal, &resource) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let turn = subs.admit.lock().await;
    let (mine, all) = {
        let m = lock(&subs.subs);
        (
            m.values()
                .filter(|s| lock(&s.rec).owner.is(&who.principal))
                .count(),
            m.len(),
        )
    };
    if mine >= subs.config.max_per_principal || all >= subs.config.max_total {
        return reject(&Rejection::one(
            IssueCode::Value,
            "Subscription",
            format!(
                "too many subscriptions ({} per principal, {} in all); delete one first",
                subs.config.max_per_principal, subs.config.max_total
            ),
        ));
    }
    let id = new_id();
    let stored = stamp(resource, &id, 1, &spec);
    let rec = Record {
        resource: stored,
        owner: Owner::from_principal(&who.principal, &who.info.scopes),
        token_exp: who.info.exp,
        events: 0,
        version: store_version(&state).await,
    };
    let sub = Arc::new(Sub::new(id.clone(), rec, Some(Arc::new(spec))));
    if let Err(e) = delivery::save(&state.access, &sub).await {
        return internal(e);
    }
    lock(&subs.subs).insert(id.clone(), sub.clone());
    drop(turn);
    activate(&state, &sub).await;
    if let Err(e) = delivery::save(&state.access, &sub).await {
        tracing::error!(subscription = %id, error = %e, "subscription state not saved");
    }
    let mut r = fhir(StatusCode::CREATED, &masked(&sub.record().resource));
    if let Ok(loc) = format!("{}/Subscription/{id}", base_url(&state)).parse() {
        r.headers_mut().insert(header::LOCATION, loc);
    }
    r
}

#[utoipa::path(get, path = "/fhir/Subscription/{id}", operation_id = "subscription_read", tag = "fhir", security(("bearer" = [])), params(("id" = String, Path)), responses((status = 200, description = "The subscription (channel header values redacted)", content_type = "application/fhir+json"), (status = 404, description = "OperationOutcome: none of yours by that id")))]
/// One of the caller's subscriptions.
async fn read(
    State(state): State<AppState>,
    Path(id): Path<String>,
    who: Result<Authenticated, ApiError>,
) -> Response {
    let (subs, who) = match open_route(&state, who) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    match subs.owned(&id, &who.principal) {
        Ok(sub) => fhir(StatusCode::OK, &masked(&sub.record().resource)),
        Err(r) => *r,
    }
}

#[utoipa::path(put, path = "/fhir/Subscription/{id}", operation_id = "subscription_update", tag = "fhir", security(("bearer" = [])), params(("id" = String, Path)), request_body(content = Object, description = "The subscription, changed (a header value sent back as [redacted] keeps the stored one)", content_type = "application/fhir+json"), responses((status = 200, description = "The subscription as now held; re-handshaken unless off", content_type = "application/fhir+json"), (status = 400, description = "OperationOutcome"), (status = 404, description = "OperationOutcome"), (status = 422, description = "OperationOutcome naming what is not supported")))]
/// Changes a subscription (the caller's token becomes the one it lives by).
async fn update(
    State(state): State<AppState>,
    Path(id): Path<String>,
    who: Result<Authenticated, ApiError>,
    body: Bytes,
) -> Response {
    let (subs, who) = match open_route(&state, who) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let sub = match subs.owned(&id, &who.principal) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let mut resource = match parse_body(&body) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    if resource["id"].as_str().is_some_and(|x| x != id) {
        return reject(&Rejection::one(
            IssueCode::Value,
            "Subscription.id",
            format!("the body's id is not {id}"),
        ));
    }
    let old = sub.record();
    if let Err(r) = unmask(&mut resource, &old.resource) {
        return reject(&r);
    }
    let spec = match checked_spec(&state, &subs, &who.principal, &resource) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    // The old task ends first (its delivery in progress is cut, and what
    // it did not finish stays owed), so nothing it writes lands on the
    // state set here.
    if let Some(p) = sub.signal_stop() {
        let _ = p.await;
    }
    if sub.deleted.load(Ordering::Acquire) {
        return oo(ApiError::not_found(
            "id",
            &id,
            format!("no Subscription/{id} of yours"),
        ));
    }
    let now = sub.record();
    let version = now.resource["meta"]["versionId"]
        .as_str()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1)
        + 1;
    // Changes made while it was off are not owed.
    let processed = if now.status() == Status::Off {
        store_version(&state).await
    } else {
        now.version
    };
    {
        let mut r = lock(&sub.rec);
        r.resource = stamp(resource, &id, version, &spec);
        r.owner = Owner::from_principal(&who.principal, &who.info.scopes);
        r.token_exp = who.info.exp;
        r.version = processed;
    }
    *lock(&sub.spec) = Some(Arc::new(spec));
    activate(&state, &sub).await;
    if sub.deleted.load(Ordering::Acquire) {
        // Deleted meanwhile: no task was started, nothing is kept.
        return oo(ApiError::not_found(
            "id",
            &id,
            format!("no Subscription/{id} of yours"),
        ));
    }
    if let Err(e) = delivery::save(&state.access, &sub).await {
        return internal(e);
    }
    fhir(StatusCode::OK, &masked(&sub.record().resource))
}

#[utoipa::path(delete, path = "/fhir/Subscription/{id}", operation_id = "subscription_delete", tag = "fhir", security(("bearer" = [])), params(("id" = String, Path)), responses((status = 204, description = "Deleted: no more notifications"), (status = 404, description = "OperationOutcome")))]
/// Ends a subscription and forgets it.
async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
    who: Result<Authenticated, ApiError>,
) -> Response {
    use object_store::ObjectStoreExt;
    let (subs, who) = match open_route(&state, who) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let sub = match subs.owned(&id, &who.principal) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    sub.deleted.store(true, Ordering::Release);
    lock(&subs.subs).remove(&id);
    if let Some(task) = sub.signal_stop() {
        let _ = task.await;
    }
    let path = state.lake.path(&delivery::record_path(&id));
    match state.lake.object_store().delete(&path).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => {
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => internal(format!("deleting subscription {id}: {e}")),
    }
}

/// The query string as pairs.
fn pairs(raw: Option<&str>) -> Vec<(String, String)> {
    url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// Refuses parameters outside `allowed` (a filter silently ignored
/// answers more than was asked).
fn only(pairs: &[(String, String)], allowed: &[&str]) -> Result<(), Refused> {
    match pairs.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
        Some((k, v)) => Err(Box::new(bad(
            k,
            v,
            format!(
                "parameter '{k}' is not supported here; supported: {}",
                allowed.join(", ")
            ),
        ))),
        None => Ok(()),
    }
}

fn values<'p>(pairs: &'p [(String, String)], name: &str) -> Vec<&'p str> {
    pairs
        .iter()
        .filter(|(k, _)| k == name)
        .flat_map(|(_, v)| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect()
}

fn searchset(entries: Vec<Json>) -> Json {
    json!({
        "resourceType": "Bundle",
        "id": new_id(),
        "type": "searchset",
        "timestamp": atlas_audit::now_rfc3339(),
        "total": entries.len(),
        "entry": entries,
    })
}

#[utoipa::path(get, path = "/fhir/Subscription", operation_id = "subscription_search", tag = "fhir", security(("bearer" = [])), params(("status" = Option<String>, Query), ("url" = Option<String>, Query, description = "the channel endpoint"), ("topic" = Option<String>, Query, description = "the topic's canonical URL"), ("_id" = Option<String>, Query)), responses((status = 200, description = "searchset Bundle of the caller's subscriptions", content_type = "application/fhir+json"), (status = 400, description = "OperationOutcome naming the parameter")))]
/// The caller's subscriptions.
async fn search(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
    who: Result<Authenticated, ApiError>,
) -> Response {
    let (subs, who) = match open_route(&state, who) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let pairs = pairs(raw.as_deref());
    if let Err(r) = only(&pairs, &["status", "url", "topic", "_id"]) {
        return *r;
    }
    let (status, url, topic, ids) = (
        values(&pairs, "status"),
        values(&pairs, "url"),
        values(&pairs, "topic"),
        values(&pairs, "_id"),
    );
    let base = base_url(&state);
    let entries = subs
        .of(&who.principal)
        .into_iter()
        .map(|s| (s.id.clone(), s.record().resource))
        .filter(|(id, r)| {
            (status.is_empty() || status.iter().any(|v| r["status"] == *v))
                && (url.is_empty() || url.iter().any(|v| r["channel"]["endpoint"] == *v))
                && (topic.is_empty() || topic.iter().any(|v| r["criteria"] == *v))
                && (ids.is_empty() || ids.contains(&id.as_str()))
        })
        .map(|(id, r)| {
            json!({
                "fullUrl": format!("{base}/Subscription/{id}"),
                "resource": masked(&r),
                "search": {"mode": "match"},
            })
        })
        .collect();
    fhir(StatusCode::OK, &searchset(entries))
}

/// The `$status` Parameters of `sub` (a `query-status`).
fn status_entry(base: &str, sub: &Sub) -> Json {
    let r = sub.record();
    let topic = r.resource["criteria"].as_str().map(str::to_owned);
    let mut s = StatusInfo::new(
        format!("{base}/Subscription/{}", sub.id),
        topic,
        r.status(),
        NotificationType::QueryStatus,
        r.events,
    );
    if let Some(e) = r.error() {
        s.errors.push(json!({"text": e}));
    }
    json!({
        "fullUrl": format!("urn:uuid:{}", s.id),
        "resource": s.to_parameters(),
        "search": {"mode": "match"},
    })
}

#[utoipa::path(get, path = "/fhir/Subscription/$status", operation_id = "subscription_status", tag = "fhir", security(("bearer" = [])), params(("id" = Option<String>, Query, description = "subscription ids (repeated or comma-separated); none: all of yours"), ("status" = Option<String>, Query, description = "only subscriptions in these statuses")), responses((status = 200, description = "searchset Bundle of status Parameters (backport-subscription-status-r4, type query-status)", content_type = "application/fhir+json")))]
/// `$status` of several of the caller's subscriptions.
async fn status_many(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
    who: Result<Authenticated, ApiError>,
) -> Response {
    status_of_many(state, raw, who, Vec::new()).await
}

#[utoipa::path(post, path = "/fhir/Subscription/$status", operation_id = "subscription_status_post", tag = "fhir", security(("bearer" = [])), request_body(content = Object, description = "Parameters with id and status parameters (optional; the query works too)", content_type = "application/fhir+json"), responses((status = 200, description = "searchset Bundle of status Parameters", content_type = "application/fhir+json")))]
/// `$status` by POST (a Parameters body, or the query).
async fn status_many_post(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
    who: Result<Authenticated, ApiError>,
    body: Bytes,
) -> Response {
    let mut extra = Vec::new();
    if !body.is_empty() {
        let p: Json = match serde_json::from_slice(&body) {
            Ok(p) => p,
            Err(e) => return bad("body", "…", format!("not a Parameters resource: {e}")),
        };
        for x in p["parameter"].as_array().into_iter().flatten() {
            let name = x["name"].as_str().unwrap_or_default();
            let v = x["valueId"]
                .as_str()
                .or_else(|| x["valueCode"].as_str())
                .or_else(|| x["valueString"].as_str())
                .unwrap_or_default();
            extra.push((name.to_owned(), v.to_owned()));
        }
    }
    status_of_many(state, raw, who, extra).await
}

async fn status_of_many(
    state: AppState,
    raw: Option<String>,
    who: Result<Authenticated, ApiError>,
    extra: Vec<(String, String)>,
) -> Response {
    let (subs, who) = match open_route(&state, who) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let mut pairs = pairs(raw.as_deref());
    pairs.extend(extra);
    if let Err(r) = only(&pairs, &["id", "status"]) {
        return *r;
    }
    let (ids, status) = (values(&pairs, "id"), values(&pairs, "status"));
    let base = base_url(&state);
    let entries = subs
        .of(&who.principal)
        .into_iter()
        .filter(|s| ids.is_empty() || ids.contains(&s.id.as_str()))
        .filter(|s| status.is_empty() || status.contains(&s.status().code()))
        .map(|s| status_entry(&base, &s))
        .collect();
    fhir(StatusCode::OK, &searchset(entries))
}

#[utoipa::path(get, path = "/fhir/Subscription/{id}/{operation}", operation_id = "subscription_operation", tag = "fhir", security(("bearer" = [])), params(("id" = String, Path), ("operation" = String, Path, description = "$status or $events"), ("eventsSinceNumber" = Option<String>, Query, description = "$events: from this event number"), ("eventsUntilNumber" = Option<String>, Query, description = "$events: up to this event number"), ("content" = Option<String>, Query, description = "$events: empty or id-only (full-resource is answered id-only)")), responses((status = 200, description = "$status: searchset Bundle of the status Parameters; $events: history Bundle (query-event) of the events still kept", content_type = "application/fhir+json"), (status = 404, description = "OperationOutcome")))]
/// `$status` or `$events` of one of the caller's subscriptions.
async fn operation(
    State(state): State<AppState>,
    Path((id, op)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
    who: Result<Authenticated, ApiError>,
) -> Response {
    let (subs, who) = match open_route(&state, who) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let sub = match subs.owned(&id, &who.principal) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let pairs = pairs(raw.as_deref());
    let base = base_url(&state);
    match op.as_str() {
        "$status" => {
            if let Err(r) = only(&pairs, &[]) {
                return *r;
            }
            fhir(StatusCode::OK, &searchset(vec![status_entry(&base, &sub)]))
        }
        "$events" => events(&state, &who.principal, &sub, &pairs, &base),
        _ => oo(ApiError::not_found(
            "operation",
            &op,
            format!("Subscription/{{id}}/{op} is not supported; $status and $events are"),
        )),
    }
}

/// `$events`: the kept events in the asked range, released again through
/// the seam for the caller now (a grant narrowed since drops them), at
/// most id-only (the kept events hold where the change is, not what it
/// was).
fn events(
    state: &AppState,
    who: &Principal,
    sub: &Sub,
    pairs: &[(String, String)],
    base: &str,
) -> Response {
    if let Err(r) = only(
        pairs,
        &["eventsSinceNumber", "eventsUntilNumber", "content"],
    ) {
        return *r;
    }
    let number = |name: &str| -> Result<Option<u64>, Refused> {
        match values(pairs, name).first() {
            None => Ok(None),
            Some(v) => v
                .parse::<u64>()
                .map(Some)
                .map_err(|_| Box::new(bad(name, v, format!("{name} is an event number")))),
        }
    };
    let (since, until) = match (number("eventsSinceNumber"), number("eventsUntilNumber")) {
        (Ok(s), Ok(u)) => (s.unwrap_or(0), u.unwrap_or(u64::MAX)),
        (Err(r), _) | (_, Err(r)) => return *r,
    };
    let Some(spec) = sub.spec() else {
        return bad("id", &sub.id, "the subscription is no longer valid here");
    };
    let mut content = match values(pairs, "content").first() {
        None => spec.payload,
        Some(c) => match PayloadContent::parse(c) {
            Some(p) => p,
            None => return bad("content", c, "content is empty, id-only or full-resource"),
        },
    };
    if content == PayloadContent::FullResource || spec.payload == PayloadContent::Empty {
        content = if spec.payload == PayloadContent::Empty {
            PayloadContent::Empty
        } else {
            PayloadContent::IdOnly
        };
    }
    let kept: Vec<delivery::Recent> = lock(&sub.recent)
        .iter()
        .filter(|e| e.number >= since && e.number <= until)
        .cloned()
        .collect();
    let gate = state.access.notices(who.clone(), Egress::for_request());
    let payload = if content == PayloadContent::Empty {
        Payload::Empty
    } else {
        Payload::IdOnly
    };
    let r = sub.record();
    let topic = (content != PayloadContent::Empty)
        .then(|| r.resource["criteria"].as_str().map(str::to_owned))
        .flatten();
    let mut status = StatusInfo::new(
        format!("{base}/Subscription/{}", sub.id),
        topic,
        r.status(),
        NotificationType::QueryEvent,
        r.events,
    );
    let mut entries = Vec::new();
    for e in kept {
        let change = ChangeRef {
            resource_type: &e.resource_type,
            id: &e.id,
            patient: e.patient.as_deref(),
            resource: None,
        };
        let Some(n) = gate.release(&change, payload) else {
            continue;
        };
        let focus = n.id.as_deref().filter(|_| content != PayloadContent::Empty);
        status.events.push(NotificationEvent {
            number: e.number,
            timestamp: Some(e.timestamp.clone()),
            focus: focus.map(|id| resource_url(base, &e.resource_type, id)),
            additional_context: Vec::new(),
            other_parts: Vec::new(),
        });
        if let Some(id) = focus {
            entries.push(Entry::for_change(
                base,
                e.interaction,
                &e.resource_type,
                id,
                None,
            ));
        }
    }
    let n = Notification {
        id: Some(new_id()),
        timestamp: Some(atlas_audit::now_rfc3339()),
        status,
        entries,
    };
    match n.to_json() {
        Ok(b) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/fhir+json")],
            b,
        )
            .into_response(),
        Err(e) => internal(e),
    }
}

#[utoipa::path(get, path = "/fhir/SubscriptionTopic", operation_id = "subscription_topic_search", tag = "fhir", security(("bearer" = [])), params(("url" = Option<String>, Query, description = "the topic's canonical URL"), ("_id" = Option<String>, Query), ("resource" = Option<String>, Query, description = "topics firing for this resource type")), responses((status = 200, description = "searchset Bundle of the topics offered, each an R4 Basic (backport cross-version form)", content_type = "application/fhir+json")))]
/// The topics offered, as R4 `Basic` resources.
async fn topics(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
    who: Result<Authenticated, ApiError>,
) -> Response {
    let subs = state.subscriptions.clone();
    if let Err(r) = subs.enabled() {
        return *r;
    }
    if let Err(e) = who {
        return oo(e);
    }
    let pairs = pairs(raw.as_deref());
    if let Err(r) = only(&pairs, &["url", "_id", "resource"]) {
        return *r;
    }
    let (url, ids, resource) = (
        values(&pairs, "url"),
        values(&pairs, "_id"),
        values(&pairs, "resource"),
    );
    let base = base_url(&state);
    let entries = subs
        .catalog
        .iter()
        .filter(|t| url.is_empty() || url.contains(&t.url.as_str()))
        .filter(|t| ids.is_empty() || ids.contains(&t.id.as_str()))
        .filter(|t| {
            resource.is_empty()
                || t.triggers
                    .iter()
                    .any(|tr| resource.contains(&tr.resource_type.as_str()))
        })
        .map(|t| {
            json!({
                "fullUrl": format!("{base}/SubscriptionTopic/{}", t.id),
                "resource": t.to_basic(),
                "search": {"mode": "match"},
            })
        })
        .collect();
    fhir(StatusCode::OK, &searchset(entries))
}

#[utoipa::path(get, path = "/fhir/SubscriptionTopic/{id}", operation_id = "subscription_topic_read", tag = "fhir", security(("bearer" = [])), params(("id" = String, Path)), responses((status = 200, description = "The topic as an R4 Basic", content_type = "application/fhir+json"), (status = 404, description = "OperationOutcome")))]
/// One topic, as an R4 `Basic`.
async fn topic_read(
    State(state): State<AppState>,
    Path(id): Path<String>,
    who: Result<Authenticated, ApiError>,
) -> Response {
    let subs = state.subscriptions.clone();
    if let Err(r) = subs.enabled() {
        return *r;
    }
    if let Err(e) = who {
        return oo(e);
    }
    match subs.catalog.by_id(&id) {
        Some(t) => fhir(StatusCode::OK, &t.to_basic()),
        None => oo(ApiError::not_found("id", &id, format!("no topic {id}"))),
    }
}
