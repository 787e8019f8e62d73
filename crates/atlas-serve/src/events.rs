//! Events of `atlas serve`: the change-feed watcher, live views and
//! `GET /events` (Server-Sent Events).
//!
//! The watcher follows the resource store's Delta log
//! ([`atlas_lake::ChangeFeed`]) and broadcasts each new commit's changes as
//! a [`ChangeBatch`]: SSE connections, FHIR Subscriptions and live views
//! all consume that one broadcast. Nothing here decides access: every
//! notice an SSE connection sends is released by the seam's
//! [`atlas_access::notice::NoticeGate`], through the request's `Egress`,
//! so the audit's connection record and closing record (written by the
//! audit middleware, as for every stream) hold the count of events and
//! the patients they were about.
//!
//! Browsers' `EventSource` cannot send an `Authorization` header, so a
//! client with a bearer token first asks `POST /events/ticket` for a
//! short-lived, single-use ticket bound to its principal and token expiry,
//! and opens `GET /events?ticket=…` with it. Tickets are never written to
//! the audit (the query parameter is redacted).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc, watch};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use atlas_access::Egress;
use atlas_access::notice::{ChangeRef, NoticeGate, Payload};
use atlas_lake::changes::{ReadOptions, parse_event_id};
use atlas_lake::{ChangeEvent, ChangeFeed, Lake};

use crate::auth::Authenticated;
use crate::{ApiError, AppState, ServeConfig};

/// `[events]` settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Follow the store's log and push changes (SSE, subscriptions).
    pub enabled: bool,
    /// How often the store's log is looked at, in milliseconds.
    pub poll_ms: u64,
    /// SSE heartbeat interval, in seconds.
    pub heartbeat_secs: u64,
    /// How long a `POST /events/ticket` ticket stays valid, in seconds.
    pub ticket_ttl_secs: u64,
    /// How long one SSE connection may stay open, in seconds (clients
    /// reconnect with `Last-Event-ID` and lose nothing).
    pub max_connection_secs: u64,
    /// SSE connections open at once, server-wide.
    pub max_connections: usize,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            enabled: true,
            poll_ms: 500,
            heartbeat_secs: 15,
            ticket_ttl_secs: 60,
            max_connection_secs: 3600,
            max_connections: 10_000,
        }
    }
}

/// `[views]` settings.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ViewsConfig {
    /// Refresh the materialized views when the store changes, and pin
    /// queries to a set of view versions that reflect one store version.
    pub auto_refresh: bool,
}

/// The changes of one store commit, in event order, each with its stored
/// JSON (`resource`, absent for deletes).
#[derive(Debug)]
pub struct ChangeBatch {
    pub store_version: i64,
    pub events: Vec<ChangeEvent>,
}

/// Store commits kept for slow receivers before they get `Lagged`.
const BROADCAST_COMMITS: usize = 64;
/// Commits read per look at the log.
const COMMITS_PER_READ: usize = 4;
/// Commits a connection catching up reads at once: each is read with its
/// resources, so memory stays near one ingest chunk per connection.
const CATCH_UP_COMMITS: usize = 1;
/// Events one SSE connection may have queued before it is closed (the
/// client reconnects with `Last-Event-ID` and reads the rest from the
/// feed).
const SSE_QUEUE: usize = 1024;
/// How long a client may take nothing before its connection is dropped.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// What the events paths share.
pub struct Events {
    changes: broadcast::Sender<Arc<ChangeBatch>>,
    /// The newest store version whose changes were broadcast (-1: none).
    version: watch::Sender<i64>,
    feed: ChangeFeed,
    tickets: Mutex<HashMap<String, Ticket>>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
}

struct Ticket {
    who: Authenticated,
    expires: Instant,
}

impl Events {
    /// Opens the change feed and, when `[events] enabled`, starts the
    /// watcher from the store's current version.
    pub(crate) async fn open(lake: &Lake, config: &ServeConfig) -> Result<Arc<Events>, String> {
        let (changes, _) = broadcast::channel(BROADCAST_COMMITS);
        let feed = ChangeFeed::new(lake.clone());
        let start = feed
            .latest_version()
            .await
            .map_err(|e| format!("the store's change feed: {e}"))?
            .unwrap_or(-1);
        let (version, _) = watch::channel(start);
        let events = Arc::new(Events {
            changes,
            version,
            feed,
            tickets: Mutex::new(HashMap::new()),
            connections: Default::default(),
        });
        if config.events.enabled {
            let poll = Duration::from_millis(config.events.poll_ms.max(10));
            tokio::spawn(watch_store(Arc::downgrade(&events), start, poll));
        }
        Ok(events)
    }

    /// Every store commit's changes from now on, in order. A receiver that
    /// falls more than 64 commits behind gets `Lagged` and must re-read
    /// the feed from its last version ([`atlas_lake::ChangeFeed::read`]).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<ChangeBatch>> {
        self.changes.subscribe()
    }

    /// The newest store version broadcast so far, and its changes.
    pub fn versions(&self) -> watch::Receiver<i64> {
        self.version.subscribe()
    }

    /// The change feed the watcher reads.
    pub fn feed(&self) -> &ChangeFeed {
        &self.feed
    }

    fn issue_ticket(&self, who: Authenticated, ttl: Duration) -> String {
        let mut b = [0u8; 32];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
        let ticket = hex::encode(b);
        let now = Instant::now();
        // Never longer than the token it stands for.
        let token_left = who
            .info
            .exp
            .saturating_sub(jsonwebtoken::get_current_timestamp());
        let ttl = ttl.min(Duration::from_secs(token_left));
        if let Ok(mut t) = self.tickets.lock() {
            t.retain(|_, v| v.expires > now);
            t.insert(
                ticket.clone(),
                Ticket {
                    who,
                    expires: now + ttl,
                },
            );
        }
        ticket
    }

    /// The principal a ticket stands for; the ticket is used up.
    fn redeem(&self, ticket: &str) -> Option<Authenticated> {
        let mut t = self.tickets.lock().ok()?;
        let v = t.remove(ticket)?;
        (v.expires > Instant::now()).then_some(v.who)
    }
}

/// Follows the store's log: one `HEAD` per poll while nothing changes, one
/// read of the new commits when something did.
async fn watch_store(events: std::sync::Weak<Events>, mut last: i64, poll: Duration) {
    let mut backoff = poll;
    loop {
        tokio::time::sleep(backoff).await;
        let Some(ev) = events.upgrade() else { return };
        match ev.feed.has_version(last + 1).await {
            Ok(false) => {
                backoff = poll;
                continue;
            }
            Ok(true) => {}
            Err(e) => {
                tracing::warn!(error = %e, "change feed: the store's log cannot be read");
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        }
        let opts = ReadOptions {
            with_resources: true,
            max_commits: Some(COMMITS_PER_READ),
            until: None,
            scan_when_gone: false,
        };
        match ev.feed.read(last, &opts).await {
            Ok(page) => {
                backoff = poll;
                let after = last;
                last = page.until;
                // The version first, then the broadcast: a connection that
                // subscribes in between catches the commit up from the feed
                // (and drops the broadcast copy by its version), instead of
                // missing it.
                ev.version.send_replace(last);
                if let Some(why) = &page.fallback {
                    tracing::warn!(why, "change feed: commits were skipped");
                } else {
                    broadcast_page(&ev, after, page.until, page.events);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, after = last, "change feed: reading new commits failed");
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// One broadcast per commit `after + 1 ..= until` that changed something.
fn broadcast_page(ev: &Events, after: i64, until: i64, events: Vec<ChangeEvent>) {
    let mut by_version: std::collections::BTreeMap<i64, Vec<ChangeEvent>> = Default::default();
    for e in events {
        by_version.entry(e.store_version).or_default().push(e);
    }
    tracing::debug!(
        after,
        until,
        commits = by_version.len(),
        "change feed: new commits"
    );
    for (store_version, events) in by_version {
        let _ = ev.changes.send(Arc::new(ChangeBatch {
            store_version,
            events,
        }));
    }
}

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(ticket))
        .routes(routes!(stream))
}

#[utoipa::path(post, path = "/events/ticket", tag = "events", responses((status = 200, description = "A single-use ticket for `GET /events?ticket=`"), (status = 401, description = "No valid bearer token")))]
/// A short-lived, single-use ticket bound to the caller's principal, for
/// clients that cannot send an `Authorization` header (`EventSource`).
async fn ticket(State(state): State<AppState>, who: Authenticated) -> Response {
    let ttl = Duration::from_secs(state.config.events.ticket_ttl_secs);
    let t = state.events.issue_ticket(who, ttl);
    axum::Json(serde_json::json!({
        "ticket": t,
        "expiresIn": ttl.as_secs(),
        "url": format!("{}/events?ticket={t}", state.config.public_base()),
    }))
    .into_response()
}

/// Query parameters of `GET /events`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    /// A ticket from `POST /events/ticket` (instead of a bearer token).
    ticket: Option<String>,
    /// Only changes to these resource types (comma-separated).
    types: Option<String>,
    /// Only changes about this patient.
    patient: Option<String>,
    /// Resume after this event id (for clients that cannot send the
    /// `Last-Event-ID` header); the header wins.
    #[serde(rename = "lastEventId")]
    last_event_id: Option<String>,
    /// Send what the feed holds up to now, then end (for scripts that poll
    /// instead of following).
    #[serde(default)]
    once: bool,
    /// The FHIRcast topic whose context changes to follow (default: the
    /// token's `hub.topic`); one the token is bound to, unless
    /// `[fhircast] open_topics`.
    topic: Option<String>,
}

/// What one SSE connection follows.
struct Filter {
    types: Option<Vec<String>>,
    patient: Option<String>,
}

impl Filter {
    fn parse(q: &EventsQuery) -> Result<Filter, ApiError> {
        let types = match q.types.as_deref() {
            None | Some("") => None,
            Some(t) => {
                let list: Vec<String> = t.split(',').map(|s| s.trim().to_owned()).collect();
                let ok = list.len() <= 64
                    && list.iter().all(|s| {
                        !s.is_empty()
                            && s.len() <= 64
                            && s.bytes().all(|b| b.is_ascii_alphanumeric())
                    });
                if !ok {
                    return Err(crate::error::bad(
                        "InvalidParameter",
                        "types",
                        t,
                        "types is a comma-separated list of at most 64 FHIR resource type names"
                            .into(),
                    ));
                }
                Some(list)
            }
        };
        Ok(Filter {
            types,
            patient: q.patient.clone().filter(|p| !p.is_empty()),
        })
    }

    fn wants(&self, e: &ChangeEvent) -> bool {
        self.types
            .as_ref()
            .is_none_or(|t| t.contains(&e.resource_type))
            && self
                .patient
                .as_ref()
                .is_none_or(|p| e.patient.as_deref() == Some(p.as_str()))
    }
}

/// Where a connection is in the feed: the last event it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Position {
    version: i64,
    /// `None`: the whole version was sent.
    seq: Option<u32>,
}

impl Position {
    fn before(&self, e: &ChangeEvent) -> bool {
        match self.seq {
            Some(s) => (e.store_version, e.seq) > (self.version, s),
            None => e.store_version > self.version,
        }
    }
    /// The feed's `since` that covers everything after this position.
    fn since(&self) -> i64 {
        match self.seq {
            Some(_) => self.version - 1,
            None => self.version,
        }
    }
}

#[utoipa::path(get, path = "/events", tag = "events", params(("ticket" = Option<String>, Query, description = "a ticket from POST /events/ticket, instead of a bearer token"), ("types" = Option<String>, Query, description = "only these resource types, comma-separated"), ("patient" = Option<String>, Query, description = "only this patient's changes"), ("lastEventId" = Option<String>, Query, description = "resume after this event id (the Last-Event-ID header wins)"), ("once" = Option<bool>, Query, description = "send what the feed holds up to now, then end")), responses((status = 200, description = "text/event-stream: `change` events (id = `<storeVersion>.<seq>`), `context` events (FHIRcast), heartbeats"), (status = 401, description = "No valid bearer token or ticket")))]
/// Server-Sent Events for one principal: data-change notices about the
/// rows it may see, and the FHIRcast context of its topic.
async fn stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
    bearer: Result<Authenticated, ApiError>,
) -> Result<Response, ApiError> {
    let who = match (&q.ticket, bearer) {
        (Some(t), _) => {
            let who = state.events.redeem(t).ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "InvalidTicket",
                    "ticket",
                    "[redacted]",
                    "the ticket is unknown, used or expired: ask POST /events/ticket for another",
                )
            })?;
            note_principal(&who);
            who
        }
        (None, Ok(who)) => who,
        (None, Err(e)) => return Err(e),
    };
    let filter = Filter::parse(&q)?;
    let topic = context_topic(&state, &who, q.topic.as_deref())?;
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(q.last_event_id.clone());
    let start = match resume.as_deref() {
        Some(id) => {
            let (version, seq) = parse_event_id(id).ok_or_else(|| {
                crate::error::bad(
                    "InvalidParameter",
                    "Last-Event-ID",
                    id,
                    "an event id is `<storeVersion>.<seq>` as sent in `id:`".into(),
                )
            })?;
            Position { version, seq }
        }
        None => Position {
            version: *state.events.versions().borrow(),
            seq: None,
        },
    };
    let open = state
        .events
        .connections
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let guard = ConnectionSlot(state.events.connections.clone());
    if open >= state.config.events.max_connections {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "TooManyConnections",
            "events",
            "",
            "the server has as many event connections open as it allows; retry later",
        ));
    }
    let gate = state
        .access
        .notices(who.principal.clone(), Egress::for_request());
    let (tx, rx) = mpsc::channel::<bytes::Bytes>(SSE_QUEUE);
    let conn = Connection {
        once: q.once,
        state: state.clone(),
        gate,
        filter,
        tx,
        _slot: guard,
        token_exp: who.info.exp,
        until: tokio::time::Instant::now(),
        topic,
        scopes: who.info.scopes.clone(),
    };
    tokio::spawn(conn.run(start));
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache, no-store, no-transform"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}

/// The FHIRcast topic an SSE connection follows: the asked one, or the
/// token's; one the token is bound to unless `[fhircast] open_topics`.
fn context_topic(
    state: &AppState,
    who: &Authenticated,
    asked: Option<&str>,
) -> Result<Option<String>, ApiError> {
    let bound = who.info.fhircast_topic.as_deref();
    match asked {
        None => Ok(bound.map(str::to_owned)),
        Some(t) if bound == Some(t) || state.config.fhircast.open_topics => Ok(Some(t.to_owned())),
        Some(t) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "TopicNotAllowed",
            "topic",
            t,
            "the token is not bound to this FHIRcast topic (its hub.topic claim names another or none)",
        )),
    }
}

/// Whether the scopes let their holder receive FHIRcast `event`
/// (`fhircast/<Event>.read` or `fhircast/*.read`; event names are
/// case-insensitive).
fn fhircast_may_read(scopes: &[String], event: &str) -> bool {
    scopes.iter().any(|s| {
        let Some(rest) = s.strip_prefix("fhircast/") else {
            return false;
        };
        let Some((name, mode)) = rest.rsplit_once('.') else {
            return false;
        };
        mode == "read" && (name == "*" || name.eq_ignore_ascii_case(event))
    })
}

/// Notes a ticket's principal in the request's audit facts, as the bearer
/// extractor does for a token.
fn note_principal(who: &Authenticated) {
    let p = &who.principal;
    atlas_access::facts::note(|f| {
        f.subject = Some(p.subject.clone());
        f.issuer = Some(p.issuer.clone());
        f.client = p.client_id.clone();
        f.purpose = p.purpose.clone();
        f.purpose_claim = who.info.purposes.clone();
        f.patient_binding = p.patient.clone();
        f.scopes = who.info.scopes.clone();
        f.roles = p.roles.clone();
    });
}

/// Frees a connection's place when it ends.
struct ConnectionSlot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// One SSE connection's sender: catches up from the feed, then follows
/// the broadcast.
struct Connection {
    state: AppState,
    gate: NoticeGate,
    filter: Filter,
    tx: mpsc::Sender<bytes::Bytes>,
    _slot: ConnectionSlot,
    /// The token's expiry: the connection ends with it.
    token_exp: u64,
    /// When the connection ends (`max_connection_secs` or the token's
    /// expiry, whichever is first); set when it starts.
    until: tokio::time::Instant,
    /// End after catching up (`once=true`).
    once: bool,
    /// The FHIRcast topic followed, if any.
    topic: Option<String>,
    /// The token's scopes as stated (FHIRcast `fhircast/<Event>.read`).
    scopes: Vec<String>,
}

/// Why a connection's sender stopped.
enum End {
    /// The client went away or its queue filled up.
    Gone,
    /// The connection reached `max_connection_secs` or the token expired.
    Expired,
}

impl Connection {
    async fn run(mut self, start: Position) {
        let config = self.state.config.events.clone();
        let token_left = self
            .token_exp
            .saturating_sub(jsonwebtoken::get_current_timestamp());
        let until = tokio::time::Instant::now()
            + Duration::from_secs(config.max_connection_secs.min(token_left));
        self.until = until;
        let mut rx = self.state.events.subscribe();
        let mut context = self.state.fhircast.context_changes();
        let mut pos = start;
        if self.send(b"retry: 3000\n\n".to_vec()).await.is_err() {
            return;
        }
        match self.catch_up(&mut pos).await {
            Err(End::Gone) => return,
            Err(End::Expired) => {
                self.say_expired().await;
                return;
            }
            Ok(()) => {}
        }
        if self.once {
            // With an id, so a poller whose events were all filtered out
            // still moves on.
            let end = format!(
                "id: {}\nevent: end\ndata: {{\"reason\":\"caught up (once=true)\"}}\n\n",
                pos_id(pos)
            );
            let _ = self.send(end.into_bytes()).await;
            return;
        }
        let mut heartbeat =
            tokio::time::interval(Duration::from_secs(config.heartbeat_secs.max(1)));
        heartbeat.tick().await;
        let end = loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => break End::Expired,
                _ = heartbeat.tick() => {
                    if self.send(b": heartbeat\n\n".to_vec()).await.is_err() { break End::Gone; }
                }
                b = rx.recv() => match b {
                    Ok(batch) => {
                        if batch.store_version <= pos.version && pos.seq.is_none() {
                            continue;
                        }
                        if let Err(e) = self.send_events(&batch.events, &mut pos).await { break e; }
                        pos = Position { version: batch.store_version.max(pos.version), seq: None };
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        if let Err(e) = self.catch_up(&mut pos).await { break e; }
                    }
                    Err(broadcast::error::RecvError::Closed) => break End::Expired,
                },
                c = context.recv(), if self.topic.is_some() => match c {
                    Ok(c) => {
                        if self.send_context(&c, pos).await.is_err() { break End::Gone; }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(skipped = n, "SSE: context changes skipped for a slow client");
                    }
                    Err(broadcast::error::RecvError::Closed) => self.topic = None,
                },
            }
        };
        if let End::Expired = end {
            self.say_expired().await;
        }
    }

    async fn say_expired(&mut self) {
        let _ = self
            .send(
                b"event: end\ndata: {\"reason\":\"the connection reached its time limit or its token expired; reconnect with Last-Event-ID\"}\n\n"
                    .to_vec(),
            )
            .await;
    }

    /// Whether the connection's time is up (its token expired).
    fn expired(&self) -> bool {
        tokio::time::Instant::now() >= self.until
    }

    /// Sends what the feed holds after `pos` up to the watcher's version.
    async fn catch_up(&mut self, pos: &mut Position) -> Result<(), End> {
        // `once=true` answers up to the store's newest commit, which the
        // watcher may not have seen yet; a follower catches up to the
        // watcher's version and takes the rest from the broadcast.
        let once_target = if self.once {
            match self.state.events.feed().latest_version().await {
                Ok(v) => Some(v.unwrap_or(-1)),
                Err(e) => {
                    tracing::warn!(error = %e, "SSE: reading the change feed failed");
                    return Err(End::Gone);
                }
            }
        } else {
            None
        };
        loop {
            if self.tx.is_closed() {
                return Err(End::Gone);
            }
            if self.expired() {
                return Err(End::Expired);
            }
            let target = match once_target {
                Some(t) => t,
                None => *self.state.events.versions().borrow(),
            };
            if pos.version >= target && pos.seq.is_none() {
                return Ok(());
            }
            let opts = ReadOptions {
                with_resources: true,
                max_commits: Some(CATCH_UP_COMMITS),
                until: Some(target),
                scan_when_gone: false,
            };
            let page = match self.state.events.feed().read(pos.since(), &opts).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "SSE: reading the change feed failed");
                    return Err(End::Gone);
                }
            };
            if let Some(why) = &page.fallback {
                let data = serde_json::json!({
                    "reason": why,
                    "storeVersion": page.until,
                    "lastEventId": pos_id(*pos),
                });
                self.send(
                    format!("id: {}\nevent: reset\ndata: {data}\n\n", page.until).into_bytes(),
                )
                .await
                .map_err(|_| End::Gone)?;
                *pos = Position {
                    version: page.until,
                    seq: None,
                };
                continue;
            }
            self.send_events(&page.events, pos).await?;
            *pos = Position {
                version: page.until,
                seq: None,
            };
            if page.until >= target {
                return Ok(());
            }
        }
    }

    /// Sends the events after `pos` that pass the filter and the seam.
    async fn send_events(&mut self, events: &[ChangeEvent], pos: &mut Position) -> Result<(), End> {
        for e in events {
            if self.expired() {
                return Err(End::Expired);
            }
            if !pos.before(e) || !self.filter.wants(e) {
                continue;
            }
            let change = ChangeRef {
                resource_type: &e.resource_type,
                id: &e.id,
                patient: e.patient.as_deref(),
                resource: e.resource.as_deref(),
            };
            // Under a de-identifying grant a filter on a real patient id
            // would link it to hashed ids: it matches nothing.
            if self.filter.patient.is_some() && self.gate.deidentifies(&e.resource_type) {
                continue;
            }
            let Some(notice) = self.gate.release(&change, Payload::IdOnly) else {
                continue;
            };
            let data = if notice.deidentified {
                // Versions and instants are identifying too.
                serde_json::json!({
                    "type": notice.resource_type,
                    "id": notice.id,
                    "op": e.op.as_str(),
                    "storeVersion": e.store_version,
                })
            } else {
                serde_json::json!({
                    "type": notice.resource_type,
                    "id": notice.id,
                    "op": e.op.as_str(),
                    "patient": notice.patient,
                    "version": e.version_id,
                    "lastUpdated": e.last_updated,
                    "storeVersion": e.store_version,
                })
            };
            self.send(
                format!("id: {}\nevent: change\ndata: {data}\n\n", e.event_id()).into_bytes(),
            )
            .await
            .map_err(|_| End::Gone)?;
            *pos = Position {
                version: e.store_version,
                seq: Some(e.seq),
            };
        }
        Ok(())
    }

    /// Sends a FHIRcast context change of the followed topic, when the
    /// token may read that event and the context's patient is in its rows.
    async fn send_context(
        &mut self,
        c: &crate::fhircast::ContextChange,
        pos: Position,
    ) -> Result<(), ()> {
        let follows = self.topic.as_deref().is_some_and(|t| t == c.topic);
        if !follows || !fhircast_may_read(&self.scopes, &c.event) {
            return Ok(());
        }
        let patients = &c.patients;
        let text = c.notification.to_string();
        let Some(released) = self.gate.release_message(&text, patients) else {
            return Ok(());
        };
        let notification: serde_json::Value =
            serde_json::from_str(&released).unwrap_or(serde_json::Value::Null);
        for p in patients {
            self.gate.egress().note_patient(p);
        }
        let data = serde_json::json!({
            "topic": c.topic,
            "event": c.event,
            "id": c.id,
            "timestamp": c.timestamp,
            "versionId": c.version_id,
            "notification": notification,
        });
        // The id is the connection's place in the change feed, so a
        // reconnect after a context event resumes the data where it was.
        self.send(format!("id: {}\nevent: context\ndata: {data}\n\n", pos_id(pos)).into_bytes())
            .await
    }

    /// Queues bytes for the client; a client that takes nothing for
    /// [`SEND_TIMEOUT`] is let go (it resumes with `Last-Event-ID`).
    async fn send(&mut self, bytes: Vec<u8>) -> Result<(), ()> {
        match tokio::time::timeout(SEND_TIMEOUT, self.tx.send(bytes::Bytes::from(bytes))).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(()),
        }
    }
}

/// A position as an event id.
fn pos_id(p: Position) -> String {
    match p.seq {
        Some(s) => format!("{}.{s}", p.version),
        None => p.version.to_string(),
    }
}

/// Live views (`[views] auto_refresh`): after each new store version, the
/// views are refreshed incrementally under the lake's writer lease, and
/// the table versions that reflect that one store version are published
/// together ([`atlas_access::Tables::pin`]); until then readers keep the
/// previous set, so none sees one view refreshed and another not.
pub(crate) fn spawn_live_views(access: atlas_access::Access, events: &Arc<Events>) {
    let mut versions = events.versions();
    tokio::spawn(async move {
        let views = atlas_viewstore::ViewStore::new(access.lake.clone());
        let mut reflected: Option<i64> = None;
        loop {
            let target = *versions.borrow_and_update();
            if reflected.is_none_or(|r| r < target) {
                match refresh_and_pin(&views, &access).await {
                    Ok(v) => {
                        reflected = Some(v);
                        continue;
                    }
                    Err(e) => {
                        let busy = matches!(&e, atlas_viewstore::ViewStoreError::Lake(l) if matches!(**l, atlas_lake::LakeError::Busy { .. }));
                        if busy {
                            tracing::debug!("live views: the lake is being written; retrying");
                        } else {
                            // Better fresh than pinned to a set that no
                            // longer moves: readers see each view's newest
                            // version until a refresh succeeds again.
                            access.tables.unpin();
                            tracing::error!(error = %e, "live views: refresh failed; views unpinned until it succeeds");
                        }
                        tokio::time::sleep(Duration::from_secs(if busy { 1 } else { 10 })).await;
                        continue;
                    }
                }
            }
            if versions.changed().await.is_err() {
                return;
            }
        }
    });
}

/// Refreshes every view under the writer lease and publishes the
/// versions; returns the store version they reflect.
async fn refresh_and_pin(
    views: &atlas_viewstore::ViewStore,
    access: &atlas_access::Access,
) -> Result<i64, atlas_viewstore::ViewStoreError> {
    let lake = &access.lake;
    let lease = atlas_lake::WriterLease::acquire(
        lake,
        &atlas_lake::LeaseOptions {
            command: "atlas serve (live views)".into(),
            ..atlas_lake::LeaseOptions::default()
        },
    )
    .await?;
    let started = Instant::now();
    let pinned = async {
        let opts = atlas_viewstore::RefreshOptions {
            lease: Some(lease.clone()),
            ..Default::default()
        };
        let reports = views.refresh(&[], &opts).await?;
        // Under the lease nothing commits between the refresh and here.
        let store = lake.table(atlas_lake::lake::RESOURCES).await?;
        let store_version = store
            .and_then(|t| t.version())
            .map(|v| v as i64)
            .unwrap_or(-1);
        let mut tables = HashMap::new();
        for v in views.list().await? {
            let dir = v.table_dir();
            if let Some(t) = lake.table_at(&dir).await?
                && let Some(version) = t.version()
            {
                tables.insert(dir, version);
            }
        }
        let changed: usize = reports
            .iter()
            .filter(|r| !matches!(r.kind, atlas_viewstore::RefreshKind::UpToDate))
            .count();
        Ok::<_, atlas_viewstore::ViewStoreError>((store_version, tables, changed))
    }
    .await;
    let released = lease.release().await;
    let (store_version, tables, changed) = pinned?;
    released?;
    access.tables.pin(atlas_access::PinnedSet {
        store_version: store_version.max(0) as u64,
        tables,
    });
    tracing::info!(
        store_version,
        views_refreshed = changed,
        seconds = started.elapsed().as_secs_f64(),
        "live views: published"
    );
    Ok(store_version)
}
