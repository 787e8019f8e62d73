//! The hub's logic, without a server: topics and their open contexts,
//! subscriptions and their leases, fan-out to WebSocket connections,
//! acknowledgements and SyncError.
//!
//! # Topics
//! A topic holds the contexts opened on it and not yet closed, one per
//! anchor type (Patient, Encounter, ImagingStudy, DiagnosticReport), the
//! most recent last: that one is the *current context* `GET [hub]/{topic}`
//! answers, and all of them are replayed to a new subscriber (STU3 2-4,
//! "most recent open per anchor type"). Opening a context assigns it a
//! `context.versionId` (a UUID); opening one for another patient drops the
//! open contexts of the previous patient, and closing a patient closes the
//! contexts that belong to them, so a replay never mixes two patients.
//! `*-update` is content sharing (STU3 2-10): it must name the open
//! anchor and its current `context.versionId`, its Bundle is applied
//! atomically (PUT adds or replaces, DELETE removes), and the broadcast
//! carries a new `context.versionId` with the old one as
//! `context.priorVersionId`. `*-select` must name the open anchor.
//!
//! # Fan-out
//! Each connection has a bounded queue: publishing serialises the
//! notification once and `try_send`s the same text to every subscriber
//! under one lock, so the publisher never waits for a slow subscriber. A
//! subscriber whose queue is full is dropped (closed with 1013) and a
//! SyncError about it goes to the others. Each subscription has an
//! `Admit` the server supplies (its access policy over the event's
//! patients); an event it does not admit is not sent, and not awaited.
//!
//! # Acknowledgements and SyncError
//! Every notification delivered waits for the subscriber's `{id, status}`
//! for `ack_timeout` (10 s by default). A non-2xx status, a missing
//! acknowledgement, a full queue, or a connection closed with a code other
//! than 1000/1001 each make a SyncError the hub broadcasts to the topic's
//! other subscribers that subscribed to SyncError (STU3 2-5); an
//! unresponsive subscriber is then unsubscribed. SyncErrors themselves are
//! not awaited, so a failing subscriber cannot start a storm of them.
//!
//! # Leases
//! A lease runs from the subscribe request, at most `max_lease`; the
//! server clamps it to the token's lifetime before. At its end the hub
//! sends a denial and closes the socket ([`Hub::sweep`], run by the
//! sweeper task), so a subscriber whose token expires stops receiving.
//!
//! What the hub did is reported to a [`HubObserver`] (audit, SSE), after
//! the lock is released.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;
use std::time::Instant;
use tokio::sync::{mpsc, watch};

use super::event::{Action, EventName, EventPattern, events_text};
use super::message::{
    ContextItem, CurrentContext, Notification, ProtocolError, SubscriptionConfirmation,
    SubscriptionDenial, SyncErrorInfo, split_reference, sync_error,
};

/// The hub's bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSettings {
    /// How long a subscriber has to acknowledge a notification.
    pub ack_timeout: Duration,
    /// Per-connection queue length.
    pub queue: usize,
    /// Subscriptions (pending or connected) at once; also the most topics.
    pub max_subscribers: usize,
    /// The longest lease granted.
    pub max_lease: Duration,
    /// How long a subscription waits for its socket: one never connected
    /// does not hold a place until its lease ends.
    pub connect_within: Duration,
}

impl Default for HubSettings {
    fn default() -> Self {
        HubSettings {
            ack_timeout: Duration::from_secs(10),
            queue: 256,
            max_subscribers: 10_000,
            max_lease: Duration::from_secs(3600),
            connect_within: Duration::from_secs(60),
        }
    }
}

/// The message as one subscriber may receive it, given the patient ids
/// the event's context names (empty: none) and the message text: `None`
/// when it may not receive it at all, else the text (the same, or with the
/// context's resources as the subscriber's grant lets them out: hidden
/// elements removed, de-identified). The server's access policy, decided
/// at delivery time.
pub type Admit = Arc<dyn Fn(&[String], &Arc<str>) -> Option<Arc<str>> + Send + Sync>;

/// Who made a subscription or published an event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Owner {
    pub issuer: String,
    pub subject: String,
    pub client: Option<String>,
}

/// A subscription request the server has authorised.
pub struct NewSubscription {
    pub topic: String,
    /// The events granted (see `FhircastScopes::grant_read`).
    pub events: Vec<EventPattern>,
    /// The lease the server allows (clamped to `max_lease` here).
    pub lease: Duration,
    pub name: Option<String>,
    pub owner: Owner,
    pub admit: Admit,
    /// An existing subscription's endpoint id, to change its events and
    /// lease (STU3 2-4: a re-request overrides the previous state).
    pub endpoint: Option<String>,
}

/// A subscription accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribed {
    /// The unguessable id of its WebSocket endpoint.
    pub endpoint: String,
    pub lease_seconds: u64,
    /// The granted events as `hub.events` lists them.
    pub events: String,
}

/// Why the hub is closing a connection: the close frame, after the
/// denial message when there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closing {
    pub code: u16,
    pub reason: String,
    pub denial: Option<Arc<str>>,
}

/// A connected subscription, for the server's socket loop: send what
/// `messages` yields, close as `closing` says, report acks with
/// [`Hub::ack`] and the end with [`Hub::disconnected`].
pub struct Connection {
    pub endpoint: String,
    pub topic: String,
    pub messages: mpsc::Receiver<Arc<str>>,
    pub closing: watch::Receiver<Option<Closing>>,
    pub expires_at: Instant,
}

/// Why a subscription ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    Unsubscribed,
    LeaseExpired,
    /// The subscriber closed the socket (the close code, if it sent one).
    Closed(Option<u16>),
    /// No acknowledgement within the timeout.
    Unresponsive,
    /// Its queue was full: it did not keep up.
    QueueFull,
    /// No socket came within `connect_within`.
    NotConnected,
    Shutdown,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Unsubscribed => "unsubscribed",
            EndReason::LeaseExpired => "lease-expired",
            EndReason::Closed(Some(1000 | 1001)) => "closed",
            EndReason::Closed(_) => "closed-abnormally",
            EndReason::Unresponsive => "unresponsive",
            EndReason::QueueFull => "queue-full",
            EndReason::NotConnected => "not-connected",
            EndReason::Shutdown => "shutdown",
        }
    }
}

/// A subscription started or ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionNote {
    pub topic: String,
    pub events: String,
    pub owner: Owner,
    pub lease_seconds: u64,
    /// `None`: started; else why it ended.
    pub ended: Option<EndReason>,
}

/// An event the hub sent out (published, or generated: SyncError).
#[derive(Debug, Clone)]
pub struct Emitted {
    pub topic: String,
    pub event: EventName,
    pub id: String,
    pub timestamp: String,
    pub patients: Vec<String>,
    /// The topic's current `context.versionId` after the event.
    pub version_id: Option<String>,
    /// Subscribers it was queued to.
    pub delivered: usize,
    pub notification: Arc<Value>,
    /// The publisher; `None` for hub-generated events.
    pub publisher: Option<Owner>,
}

/// Told what the hub did, after its lock is released (so it may take
/// other locks, but should not block).
pub trait HubObserver: Send + Sync {
    fn emitted(&self, e: &Emitted);
    fn subscription(&self, n: &SubscriptionNote);
}

/// The result of a publication.
#[derive(Debug, Clone)]
pub struct Published {
    pub event: EventName,
    pub notification: Arc<Value>,
    pub delivered: usize,
    pub version_id: Option<String>,
    pub patients: Vec<String>,
}

/// Why the hub refused a request; `param` names what was wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HubError {
    #[error("{param}: {message}")]
    Invalid { param: String, message: String },
    #[error("{param}: {message}")]
    NotFound { param: String, message: String },
    #[error("{param}: {message}")]
    Conflict { param: String, message: String },
    #[error("{param}: {message}")]
    Forbidden { param: String, message: String },
    /// The subscription exists but cannot be connected: the denial to
    /// send over the socket.
    #[error("subscription denied: {}", .0.reason.clone().unwrap_or_default())]
    Denied(SubscriptionDenial),
    #[error("{0}")]
    Unavailable(String),
}

impl From<ProtocolError> for HubError {
    fn from(e: ProtocolError) -> HubError {
        HubError::Invalid {
            param: e.param,
            message: e.message,
        }
    }
}

fn invalid(param: &str, message: impl Into<String>) -> HubError {
    HubError::Invalid {
        param: param.to_owned(),
        message: message.into(),
    }
}

fn conflict(param: &str, message: impl Into<String>) -> HubError {
    HubError::Conflict {
        param: param.to_owned(),
        message: message.into(),
    }
}

struct Link {
    tx: mpsc::Sender<Arc<str>>,
    closing: watch::Sender<Option<Closing>>,
}

struct Pending {
    deadline: Instant,
    event: String,
}

struct Sub {
    topic: String,
    events: Vec<EventPattern>,
    events_text: String,
    name: Option<String>,
    owner: Owner,
    admit: Admit,
    expires_at: Instant,
    /// Until when the socket may connect.
    connect_by: Instant,
    lease_seconds: u64,
    link: Option<Link>,
    pending: HashMap<String, Pending>,
    /// The last event delivered (id, name), for a SyncError about a
    /// broken connection.
    last_event: Option<(String, String)>,
}

impl Sub {
    fn wants(&self, e: &EventName) -> bool {
        self.events.iter().any(|p| p.matches(e))
    }

    /// What SyncErrors call this subscriber: its `subscriber.name`, else
    /// its OAuth client, never its user.
    fn label(&self) -> String {
        self.name
            .clone()
            .or_else(|| self.owner.client.clone())
            .unwrap_or_else(|| "unnamed subscriber".to_owned())
    }
}

/// One open context.
struct Anchor {
    event: EventName,
    resource: &'static str,
    id: Option<String>,
    patients: Vec<String>,
    /// The open notification as broadcast.
    open: Notification,
    version: String,
    /// Shared content (STU3 2-10): (type, id, resource), in order added.
    content: Vec<(String, String, Value)>,
    bundle_id: String,
    selected: Vec<ContextItem>,
}

#[derive(Default)]
struct Topic {
    anchors: Vec<Anchor>,
    subs: BTreeSet<String>,
}

#[derive(Default)]
struct State {
    subs: HashMap<String, Sub>,
    topics: HashMap<String, Topic>,
    closed: bool,
}

enum Effect {
    Emitted(Emitted),
    Note(SubscriptionNote),
}

type Ids = Box<dyn Fn() -> String + Send + Sync>;
type Clock = Box<dyn Fn() -> Instant + Send + Sync>;

/// The hub. Share it in an `Arc`; run [`Hub::spawn_sweeper`] so leases
/// and acknowledgements time out.
pub struct Hub {
    state: Mutex<State>,
    settings: HubSettings,
    observer: Option<Arc<dyn HubObserver>>,
    version_ids: Ids,
    clock: Clock,
}

fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// 244 random bits (two v4 UUIDs, from the OS's CSPRNG): the WebSocket
/// URL is the socket's credential, so it must be unguessable. Written
/// `eyJ<hex>.<hex>`, the shape of a JWT, so that every log and audit record
/// that redacts tokens (`atlas_access::facts::redact`) redacts it too.
fn endpoint_id() -> String {
    format!(
        "eyJ{}.{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

fn now_timestamp() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The patient a reference names (`Patient/1`, absolute, versioned).
fn patient_ref(v: &Value) -> Option<String> {
    let r = v.get("reference").and_then(Value::as_str)?;
    split_reference(r).and_then(|(t, id)| (t == "Patient").then_some(id))
}

/// Every patient an event's context names: `patient` items, and the
/// `subject`/`patient` references of its resources and of the entries of
/// an `updates` or `content` Bundle.
pub fn patients_of(context: &[ContextItem]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut add = |p: String| {
        if !out.contains(&p) {
            out.push(p);
        }
    };
    fn subjects(r: &Value, add: &mut dyn FnMut(String)) {
        if r.get("resourceType").and_then(Value::as_str) == Some("Patient")
            && let Some(id) = r.get("id").and_then(Value::as_str)
        {
            add(id.to_owned());
        }
        for k in ["subject", "patient"] {
            if let Some(p) = r.get(k).and_then(patient_ref) {
                add(p);
            }
        }
        if let Some(entries) = r.get("entry").and_then(Value::as_array) {
            for e in entries {
                if let Some(res) = e.get("resource") {
                    subjects(res, add);
                }
            }
        }
    }
    for item in context {
        if item.key == "patient" {
            for (t, id) in item.references() {
                if t == "Patient" {
                    add(id);
                }
            }
        }
        if let Some(r) = &item.resource {
            subjects(r, &mut add);
        }
    }
    out
}

/// The anchor resource's id, from its context item.
fn anchor_id(event: &Notification, key: &str) -> Option<String> {
    event
        .event
        .items(key)
        .flat_map(ContextItem::references)
        .map(|(_, id)| id)
        .next()
}

fn merge(a: &mut Vec<String>, b: &[String]) {
    for p in b {
        if !a.contains(p) {
            a.push(p.clone());
        }
    }
}

/// A Bundle entry of an update, checked.
enum Change {
    Put(String, String, Value),
    Delete(String, String),
}

fn changes_of(bundle: &Value) -> Result<Vec<Change>, HubError> {
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(invalid("updates", "must hold one Bundle resource"));
    }
    let entries = match bundle.get("entry") {
        None => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(invalid("updates", "Bundle.entry must be a list")),
    };
    let mut out = Vec::new();
    let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
    for (i, e) in entries.iter().enumerate() {
        let method = e
            .pointer("/request/method")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_ascii_uppercase();
        let change = match method.as_str() {
            "PUT" | "POST" => {
                let r = e.get("resource").filter(|r| r.is_object()).ok_or_else(|| {
                    invalid("updates", format!("entry[{i}]: a PUT needs its resource"))
                })?;
                let (Some(t), Some(id)) = (
                    r.get("resourceType").and_then(Value::as_str),
                    r.get("id").and_then(Value::as_str),
                ) else {
                    return Err(invalid(
                        "updates",
                        format!("entry[{i}]: the resource needs resourceType and id"),
                    ));
                };
                Change::Put(t.to_owned(), id.to_owned(), r.clone())
            }
            "DELETE" => {
                let url = e
                    .get("fullUrl")
                    .and_then(Value::as_str)
                    .or_else(|| e.pointer("/request/url").and_then(Value::as_str));
                let from_resource = e.get("resource").and_then(|r| {
                    Some((
                        r.get("resourceType")?.as_str()?.to_owned(),
                        r.get("id")?.as_str()?.to_owned(),
                    ))
                });
                let (t, id) = url
                    .and_then(split_reference)
                    .or(from_resource)
                    .ok_or_else(|| {
                        invalid(
                            "updates",
                            format!("entry[{i}]: a DELETE needs fullUrl Type/id"),
                        )
                    })?;
                Change::Delete(t, id)
            }
            _ => {
                return Err(invalid(
                    "updates",
                    format!("entry[{i}]: request.method must be PUT or DELETE"),
                ));
            }
        };
        let key = match &change {
            Change::Put(t, id, _) | Change::Delete(t, id) => (t.clone(), id.clone()),
        };
        if !seen.insert(key.clone()) {
            return Err(invalid(
                "updates",
                format!("{}/{} appears more than once in the Bundle", key.0, key.1),
            ));
        }
        out.push(change);
    }
    Ok(out)
}

impl Hub {
    pub fn new(settings: HubSettings) -> Hub {
        Hub {
            state: Mutex::new(State::default()),
            settings,
            observer: None,
            version_ids: Box::new(uuid),
            clock: Box::new(Instant::now),
        }
    }

    /// Reads time from `clock` (tests move it by hand; leases and
    /// acknowledgement deadlines are measured on it).
    pub fn with_clock(mut self, clock: impl Fn() -> Instant + Send + Sync + 'static) -> Hub {
        self.clock = Box::new(clock);
        self
    }

    fn now(&self) -> Instant {
        (self.clock)()
    }

    /// Reports what the hub does to `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn HubObserver>) -> Hub {
        self.observer = Some(observer);
        self
    }

    /// Draws `context.versionId`s from `ids` (tests reproduce the spec's
    /// examples with it; the default is random UUIDs).
    pub fn with_version_ids(mut self, ids: impl Fn() -> String + Send + Sync + 'static) -> Hub {
        self.version_ids = Box::new(ids);
        self
    }

    pub fn settings(&self) -> &HubSettings {
        &self.settings
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent-enough state
        // (every step is a single map edit); keep serving.
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn report(&self, effects: Vec<Effect>) {
        let Some(o) = &self.observer else { return };
        for e in effects {
            match e {
                Effect::Emitted(e) => o.emitted(&e),
                Effect::Note(n) => o.subscription(&n),
            }
        }
    }

    /// Subscriptions held (pending and connected).
    pub fn subscriptions(&self) -> usize {
        self.lock().subs.len()
    }

    /// Subscriptions with a connected socket.
    pub fn connected(&self) -> usize {
        self.lock()
            .subs
            .values()
            .filter(|s| s.link.is_some())
            .count()
    }

    /// Accepts a subscription (or changes one, when `endpoint` names it).
    pub fn subscribe(&self, new: NewSubscription) -> Result<Subscribed, HubError> {
        if new.events.is_empty() {
            return Err(invalid("hub.events", "no events granted"));
        }
        let lease = new.lease.min(self.settings.max_lease);
        if lease.is_zero() {
            return Err(invalid("hub.lease_seconds", "the lease would be empty"));
        }
        let lease_seconds = lease.as_secs().max(1);
        let now = self.now();
        let events_text = events_text(&new.events);
        let mut effects = Vec::new();
        let result = {
            let mut st = self.lock();
            if st.closed {
                return Err(HubError::Unavailable("the hub is shutting down".into()));
            }
            if let Some(e) = &new.endpoint {
                let Some(sub) = st.subs.get_mut(e) else {
                    return Err(HubError::NotFound {
                        param: "hub.channel.endpoint".into(),
                        message: "no such subscription".into(),
                    });
                };
                if sub.owner.issuer != new.owner.issuer || sub.owner.subject != new.owner.subject {
                    return Err(HubError::Forbidden {
                        param: "hub.channel.endpoint".into(),
                        message: "the subscription belongs to someone else".into(),
                    });
                }
                if sub.topic != new.topic {
                    return Err(conflict(
                        "hub.topic",
                        "the subscription is to another topic",
                    ));
                }
                sub.events = new.events;
                sub.events_text = events_text.clone();
                sub.admit = new.admit;
                sub.name = new.name.or(sub.name.take());
                sub.expires_at = now + lease;
                sub.lease_seconds = lease_seconds;
                if let Some(link) = &sub.link {
                    let c = confirmation(&sub.topic, &sub.events_text, lease_seconds);
                    if link.tx.try_send(c).is_err() {
                        tracing::debug!("re-subscription confirmation not queued");
                    }
                }
                Subscribed {
                    endpoint: e.clone(),
                    lease_seconds,
                    events: events_text,
                }
            } else {
                if st.subs.len() >= self.settings.max_subscribers {
                    return Err(HubError::Unavailable(format!(
                        "the hub holds its maximum of {} subscriptions",
                        self.settings.max_subscribers
                    )));
                }
                if !st.topics.contains_key(&new.topic)
                    && st.topics.len() >= self.settings.max_subscribers
                {
                    return Err(HubError::Unavailable("too many topics".into()));
                }
                let endpoint = endpoint_id();
                st.topics
                    .entry(new.topic.clone())
                    .or_default()
                    .subs
                    .insert(endpoint.clone());
                effects.push(Effect::Note(SubscriptionNote {
                    topic: new.topic.clone(),
                    events: events_text.clone(),
                    owner: new.owner.clone(),
                    lease_seconds,
                    ended: None,
                }));
                st.subs.insert(
                    endpoint.clone(),
                    Sub {
                        topic: new.topic,
                        events: new.events,
                        events_text: events_text.clone(),
                        name: new.name,
                        owner: new.owner,
                        admit: new.admit,
                        expires_at: now + lease,
                        connect_by: now + self.settings.connect_within,
                        lease_seconds,
                        link: None,
                        pending: HashMap::new(),
                        last_event: None,
                    },
                );
                Subscribed {
                    endpoint,
                    lease_seconds,
                    events: events_text,
                }
            }
        };
        self.report(effects);
        Ok(result)
    }

    /// Ends a subscription at its owner's request: a denial, then close 1000.
    pub fn unsubscribe(&self, topic: &str, endpoint: &str, owner: &Owner) -> Result<(), HubError> {
        let mut effects = Vec::new();
        {
            let mut st = self.lock();
            let Some(sub) = st.subs.get(endpoint) else {
                return Err(HubError::NotFound {
                    param: "hub.channel.endpoint".into(),
                    message: "no such subscription".into(),
                });
            };
            if sub.owner.issuer != owner.issuer || sub.owner.subject != owner.subject {
                return Err(HubError::Forbidden {
                    param: "hub.channel.endpoint".into(),
                    message: "the subscription belongs to someone else".into(),
                });
            }
            if sub.topic != topic {
                return Err(conflict(
                    "hub.topic",
                    "the subscription is to another topic",
                ));
            }
            end(
                &mut st,
                endpoint,
                EndReason::Unsubscribed,
                1000,
                "unsubscribed",
                &mut effects,
            );
        }
        self.report(effects);
        Ok(())
    }

    /// How long the subscription's lease still runs (`None`: no such
    /// subscription). A re-subscription extends it; the socket loop asks
    /// when the lease it was told of ends.
    pub fn lease_left(&self, endpoint: &str) -> Option<Duration> {
        let now = self.now();
        self.lock()
            .subs
            .get(endpoint)
            .map(|s| s.expires_at.saturating_duration_since(now))
    }

    /// Whether an endpoint id names a subscription (the server answers 404
    /// to others without upgrading).
    pub fn knows(&self, endpoint: &str) -> bool {
        self.lock().subs.contains_key(endpoint)
    }

    /// Binds a WebSocket to its subscription (once: the endpoint is single
    /// use). The queue starts with the confirmation, then the open
    /// contexts of the topic the subscriber may see.
    pub fn connect(&self, endpoint: &str) -> Result<Connection, HubError> {
        let now = self.now();
        let mut effects = Vec::new();
        let result = {
            let mut st = self.lock();
            let closed = st.closed;
            let Some(sub) = st.subs.get_mut(endpoint) else {
                return Err(HubError::NotFound {
                    param: "endpoint".into(),
                    message: "no such subscription".into(),
                });
            };
            let denial = |sub: &Sub, reason: &str| {
                HubError::Denied(SubscriptionDenial::new(
                    &sub.topic,
                    &sub.events_text,
                    reason,
                ))
            };
            if closed {
                Err(denial(sub, "the hub is shutting down"))
            } else if sub.link.is_some() {
                Err(denial(sub, "this endpoint is already connected"))
            } else if sub.expires_at <= now {
                let e = denial(sub, "the subscription's lease has expired");
                end(
                    &mut st,
                    endpoint,
                    EndReason::LeaseExpired,
                    1000,
                    "lease expired",
                    &mut effects,
                );
                Err(e)
            } else {
                // Room for the confirmation and one replay per anchor type,
                // whatever the configured queue.
                let (tx, rx) = mpsc::channel(self.settings.queue.max(8));
                let (ctx, crx) = watch::channel(None);
                // Rounded: the lease was granted in whole seconds a moment ago.
                let remaining = sub.expires_at.saturating_duration_since(now);
                let remaining = ((remaining.as_millis() + 500) / 1000).max(1) as u64;
                let _ = tx.try_send(confirmation(&sub.topic, &sub.events_text, remaining));
                let topic = sub.topic.clone();
                let expires_at = sub.expires_at;
                sub.link = Some(Link {
                    tx: tx.clone(),
                    closing: ctx,
                });
                // Replay: the most recent open per anchor type, oldest
                // first so the current context arrives last.
                let deadline = now + self.settings.ack_timeout;
                let st = &mut *st;
                if let (Some(t), Some(sub)) = (st.topics.get(&topic), st.subs.get_mut(endpoint)) {
                    for a in &t.anchors {
                        if !sub.wants(&a.event) {
                            continue;
                        }
                        let mut n = a.open.clone();
                        n.event.version_id = Some(a.version.clone());
                        let text: Arc<str> = serde_json::to_string(&n).unwrap_or_default().into();
                        let Some(text) = (sub.admit)(&a.patients, &text) else {
                            continue;
                        };
                        if tx.try_send(text).is_ok() {
                            sub.pending.insert(
                                n.id.clone(),
                                Pending {
                                    deadline,
                                    event: n.event.event.clone(),
                                },
                            );
                            sub.last_event = Some((n.id.clone(), n.event.event.clone()));
                        }
                    }
                }
                Ok(Connection {
                    endpoint: endpoint.to_owned(),
                    topic,
                    messages: rx,
                    closing: crx,
                    expires_at,
                })
            }
        };
        self.report(effects);
        result
    }

    /// A subscriber's acknowledgement. A non-2xx status makes a SyncError
    /// for the topic's other subscribers.
    pub fn ack(&self, endpoint: &str, ack: &super::message::Ack) {
        let mut effects = Vec::new();
        {
            let mut st = self.lock();
            let Some(sub) = st.subs.get_mut(endpoint) else {
                return;
            };
            let Some(p) = sub.pending.remove(&ack.id) else {
                return;
            };
            if ack.status.is_success() {
                return;
            }
            let status = match ack.status.code() {
                Some(c) => c.to_string(),
                None => "not a status".to_owned(),
            };
            let info = SyncErrorInfo {
                topic: sub.topic.clone(),
                event_id: Some(ack.id.clone()),
                event_name: Some(p.event),
                subscriber: sub.label(),
                diagnostics: format!("{} did not follow the event (status {status})", sub.label()),
                codes: Vec::new(),
            };
            self.sync_error(&mut st, &info, Some(endpoint), &mut effects);
        }
        self.report(effects);
    }

    /// The socket ended. Closes 1000 and 1001 are a subscriber leaving;
    /// any other code (or none) makes a SyncError for the others.
    pub fn disconnected(&self, endpoint: &str, code: Option<u16>) {
        let mut effects = Vec::new();
        {
            let mut st = self.lock();
            let Some(sub) = st.subs.get(endpoint) else {
                return;
            };
            let normal = matches!(code, Some(1000 | 1001));
            let info = (!normal).then(|| {
                let (event_id, event_name) = sub
                    .pending
                    .iter()
                    .max_by_key(|(_, p)| p.deadline)
                    .map(|(id, p)| (id.clone(), p.event.clone()))
                    .or_else(|| sub.last_event.clone())
                    .unzip();
                SyncErrorInfo {
                    topic: sub.topic.clone(),
                    event_id,
                    event_name,
                    subscriber: sub.label(),
                    diagnostics: format!(
                        "{}'s connection closed abnormally ({})",
                        sub.label(),
                        code.map_or("no close frame".to_owned(), |c| format!("code {c}"))
                    ),
                    codes: Vec::new(),
                }
            });
            end(
                &mut st,
                endpoint,
                EndReason::Closed(code),
                code.unwrap_or(1006),
                "closed",
                &mut effects,
            );
            if let Some(info) = info {
                self.sync_error(&mut st, &info, Some(endpoint), &mut effects);
            }
        }
        self.report(effects);
    }

    /// Ends expired leases and subscribers that did not acknowledge in
    /// time (SyncError to the others, then unsubscribed).
    pub fn sweep(&self) {
        let now = self.now();
        let mut effects = Vec::new();
        {
            let mut st = self.lock();
            let expired: Vec<String> = st
                .subs
                .iter()
                .filter(|(_, s)| s.expires_at <= now)
                .map(|(e, _)| e.clone())
                .collect();
            for e in expired {
                end(
                    &mut st,
                    &e,
                    EndReason::LeaseExpired,
                    1000,
                    "lease expired",
                    &mut effects,
                );
            }
            let unconnected: Vec<String> = st
                .subs
                .iter()
                .filter(|(_, s)| s.link.is_none() && s.connect_by <= now)
                .map(|(e, _)| e.clone())
                .collect();
            for e in unconnected {
                end(
                    &mut st,
                    &e,
                    EndReason::NotConnected,
                    1000,
                    "no socket connected in time",
                    &mut effects,
                );
            }
            let late: Vec<(String, SyncErrorInfo)> = st
                .subs
                .iter()
                .filter_map(|(e, s)| {
                    let (id, p) = s
                        .pending
                        .iter()
                        .filter(|(_, p)| p.deadline <= now)
                        .min_by_key(|(_, p)| p.deadline)?;
                    Some((
                        e.clone(),
                        SyncErrorInfo {
                            topic: s.topic.clone(),
                            event_id: Some(id.clone()),
                            event_name: Some(p.event.clone()),
                            subscriber: s.label(),
                            diagnostics: format!(
                                "{} did not acknowledge the event within {} ms",
                                s.label(),
                                self.settings.ack_timeout.as_millis()
                            ),
                            codes: Vec::new(),
                        },
                    ))
                })
                .collect();
            for (e, info) in late {
                end(
                    &mut st,
                    &e,
                    EndReason::Unresponsive,
                    1008,
                    "no acknowledgement in time",
                    &mut effects,
                );
                self.sync_error(&mut st, &info, Some(&e), &mut effects);
            }
            st.topics
                .retain(|_, t| !t.subs.is_empty() || !t.anchors.is_empty());
        }
        self.report(effects);
    }

    /// Runs [`Hub::sweep`] every tick until the hub is dropped.
    pub fn spawn_sweeper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        let every = (self.settings.ack_timeout / 20)
            .clamp(Duration::from_millis(20), Duration::from_millis(500));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(hub) = weak.upgrade() else { return };
                hub.sweep();
            }
        })
    }

    /// Closes every socket with 1001 and refuses new subscriptions.
    pub fn shutdown(&self) {
        let mut effects = Vec::new();
        {
            let mut st = self.lock();
            st.closed = true;
            let all: Vec<String> = st.subs.keys().cloned().collect();
            for e in all {
                end(
                    &mut st,
                    &e,
                    EndReason::Shutdown,
                    1001,
                    "the hub is shutting down",
                    &mut effects,
                );
            }
        }
        self.report(effects);
    }

    /// The topic's current context (STU3 2-9), with its content, and the
    /// patients it is about (for the server's access check).
    pub fn current_context(&self, topic: &str) -> (CurrentContext, Vec<String>) {
        let st = self.lock();
        let Some(a) = st.topics.get(topic).and_then(|t| t.anchors.last()) else {
            return (CurrentContext::empty(), Vec::new());
        };
        let mut context = a.open.event.context.clone();
        let entries: Vec<Value> = a
            .content
            .iter()
            .map(|(_, _, r)| serde_json::json!({"resource": r}))
            .collect();
        context.push(ContextItem::resource(
            "content",
            serde_json::json!({
                "resourceType": "Bundle",
                "id": a.bundle_id,
                "type": "collection",
                "entry": entries,
            }),
        ));
        (
            CurrentContext {
                context_type: a.resource.to_owned(),
                version_id: Some(a.version.clone()),
                context,
            },
            a.patients.clone(),
        )
    }

    /// Checks an event's name and required context keys.
    pub fn check(n: &Notification) -> Result<EventName, HubError> {
        n.check()?;
        let event =
            EventName::parse(&n.event.event).map_err(|e| invalid("hub.event", e.to_string()))?;
        for key in event.required_keys() {
            if n.event.items(key).next().is_none() {
                return Err(invalid(
                    "context",
                    format!("{event} needs a context item with key {key:?}"),
                ));
            }
        }
        Ok(event)
    }

    /// The patients an event would be about once the topic's state is
    /// taken into account (a close, update or select names its anchor,
    /// whose patient the open said).
    pub fn patients_for(&self, n: &Notification) -> Vec<String> {
        let mut p = patients_of(&n.event.context);
        if let Ok(event) = EventName::parse(&n.event.event)
            && let Some(resource) = event.resource()
        {
            let st = self.lock();
            if let Some(a) = st
                .topics
                .get(&n.event.topic)
                .and_then(|t| t.anchors.iter().find(|a| a.resource == resource))
            {
                merge(&mut p, &a.patients);
            }
        }
        p
    }

    /// Applies a request-context-change to its topic and broadcasts it
    /// (with the request's id) to every subscriber that asked for the
    /// event and may see it, the sender included.
    pub fn publish(&self, request: Notification, publisher: Owner) -> Result<Published, HubError> {
        let event = Hub::check(&request)?;
        let mut effects = Vec::new();
        let published = {
            let mut st = self.lock();
            if st.closed {
                return Err(HubError::Unavailable("the hub is shutting down".into()));
            }
            if !st.topics.contains_key(&request.event.topic)
                && st.topics.len() >= self.settings.max_subscribers
            {
                return Err(HubError::Unavailable("too many topics".into()));
            }
            let topic_name = request.event.topic.clone();
            let topic = st.topics.entry(topic_name.clone()).or_default();
            let (out, patients) = self.apply(topic, request, event)?;
            let version = topic.anchors.last().map(|a| a.version.clone());
            let value = Arc::new(out.to_value());
            let text: Arc<str> = serde_json::to_string(&*value).unwrap_or_default().into();
            let delivered = self.fan_out(
                &mut st,
                &topic_name,
                &event,
                &out.id,
                &text,
                &patients,
                None,
                true,
                &mut effects,
            );
            effects.push(Effect::Emitted(Emitted {
                topic: topic_name,
                event,
                id: out.id.clone(),
                timestamp: out.timestamp.clone(),
                patients: patients.clone(),
                version_id: version.clone(),
                delivered,
                notification: value.clone(),
                publisher: Some(publisher),
            }));
            Published {
                event,
                notification: value,
                delivered,
                version_id: version,
                patients,
            }
        };
        // The broadcast is reported before any SyncError it caused.
        effects.rotate_right(1);
        self.report(effects);
        Ok(published)
    }

    /// The topic's state after `n`, and what goes out.
    fn apply(
        &self,
        topic: &mut Topic,
        mut n: Notification,
        event: EventName,
    ) -> Result<(Notification, Vec<String>), HubError> {
        let mut patients = patients_of(&n.event.context);
        let (Some(resource), Some(action), Some(key)) =
            (event.resource(), event.action(), event.anchor_key())
        else {
            // Infrastructure events change no context.
            n.event.version_id = None;
            n.event.prior_version_id = None;
            return Ok((n, patients));
        };
        let id = anchor_id(&n, key);
        let position = topic.anchors.iter().position(|a| a.resource == resource);
        let same = |a: &Anchor| match (&a.id, &id) {
            (Some(x), Some(y)) => x == y,
            _ => true,
        };
        match action {
            Action::Open => {
                if let Some(i) = position {
                    topic.anchors.remove(i);
                }
                // A context of another patient does not survive a change
                // of patient.
                if !patients.is_empty() {
                    topic.anchors.retain(|a| {
                        a.patients.is_empty() || a.patients.iter().any(|p| patients.contains(p))
                    });
                }
                let version = (self.version_ids)();
                n.event.version_id = Some(version.clone());
                n.event.prior_version_id = None;
                topic.anchors.push(Anchor {
                    event,
                    resource,
                    id,
                    patients: patients.clone(),
                    open: n.clone(),
                    version,
                    content: Vec::new(),
                    bundle_id: uuid(),
                    selected: Vec::new(),
                });
                Ok((n, patients))
            }
            Action::Close => {
                n.event.version_id = None;
                n.event.prior_version_id = None;
                if let Some(i) = position {
                    if !same(&topic.anchors[i]) {
                        return Err(conflict(
                            "context",
                            format!("the open {resource} context is another {resource}"),
                        ));
                    }
                    let a = topic.anchors.remove(i);
                    merge(&mut patients, &a.patients);
                }
                if resource == "Patient" {
                    // Closing a patient closes what was open about them.
                    topic
                        .anchors
                        .retain(|a| !a.patients.iter().any(|p| patients.contains(p)));
                }
                Ok((n, patients))
            }
            Action::Update => {
                let Some(i) = position else {
                    return Err(conflict(
                        "context",
                        format!("no {resource} context is open to update"),
                    ));
                };
                let a = &mut topic.anchors[i];
                if !same(a) {
                    return Err(conflict(
                        "context",
                        format!("the open {resource} context is another {resource}"),
                    ));
                }
                let Some(given) = n.event.version_id.clone() else {
                    return Err(invalid(
                        "context.versionId",
                        "an update must give the context's current versionId",
                    ));
                };
                if given != a.version {
                    return Err(conflict(
                        "context.versionId",
                        format!(
                            "{given} is not the current version of the {resource} context; GET the topic for the current one"
                        ),
                    ));
                }
                let mut changes = Vec::new();
                for item in n.event.items("updates") {
                    let bundle = item
                        .resource
                        .as_ref()
                        .ok_or_else(|| invalid("updates", "must hold one Bundle resource"))?;
                    changes.extend(changes_of(bundle)?);
                }
                if n.event.items("updates").count() != 1 {
                    return Err(invalid("updates", "give exactly one updates Bundle"));
                }
                // Atomic: every entry was checked above; now apply all.
                for c in changes {
                    match c {
                        Change::Put(t, id, r) => {
                            match a
                                .content
                                .iter_mut()
                                .find(|(ct, cid, _)| *ct == t && *cid == id)
                            {
                                Some(slot) => slot.2 = r,
                                None => a.content.push((t, id, r)),
                            }
                        }
                        Change::Delete(t, id) => {
                            a.content.retain(|(ct, cid, _)| !(*ct == t && *cid == id));
                        }
                    }
                }
                let version = (self.version_ids)();
                n.event.prior_version_id = Some(std::mem::replace(&mut a.version, version.clone()));
                n.event.version_id = Some(version);
                // The shared content is about its patients too: the
                // current context (and its replay) is released only to
                // those who may see them all.
                merge(&mut a.patients, &patients);
                merge(&mut patients, &a.patients);
                Ok((n, patients))
            }
            Action::Select => {
                let Some(i) = position else {
                    return Err(conflict(
                        "context",
                        format!("no {resource} context is open to select in"),
                    ));
                };
                let a = &mut topic.anchors[i];
                if !same(a) {
                    return Err(conflict(
                        "context",
                        format!("the open {resource} context is another {resource}"),
                    ));
                }
                n.event.version_id = None;
                n.event.prior_version_id = None;
                // A selection replaces the previous one.
                a.selected = n.event.items("select").cloned().collect();
                merge(&mut patients, &a.patients);
                Ok((n, patients))
            }
        }
    }

    /// Queues `text` to every subscriber of `topic` that wants `event` and
    /// may see `patients`; returns how many. Full queues are dropped (and
    /// reported by a SyncError unless this is one).
    #[allow(clippy::too_many_arguments)]
    fn fan_out(
        &self,
        st: &mut State,
        topic: &str,
        event: &EventName,
        id: &str,
        text: &Arc<str>,
        patients: &[String],
        except: Option<&str>,
        track: bool,
        effects: &mut Vec<Effect>,
    ) -> usize {
        let State { subs, topics, .. } = st;
        let Some(t) = topics.get(topic) else {
            return 0;
        };
        let deadline = self.now() + self.settings.ack_timeout;
        let mut delivered = 0;
        let mut full = Vec::new();
        let mut gone = Vec::new();
        let name = event.to_string();
        for e in &t.subs {
            if except == Some(e.as_str()) {
                continue;
            }
            let Some(sub) = subs.get_mut(e) else {
                continue;
            };
            let Some(link) = &sub.link else { continue };
            if !sub.wants(event) {
                continue;
            }
            let Some(out) = (sub.admit)(patients, text) else {
                continue;
            };
            match link.tx.try_send(out) {
                Ok(()) => {
                    delivered += 1;
                    if track {
                        sub.pending.insert(
                            id.to_owned(),
                            Pending {
                                deadline,
                                event: name.clone(),
                            },
                        );
                        sub.last_event = Some((id.to_owned(), name.clone()));
                    }
                }
                Err(mpsc::error::TrySendError::Full(_)) => full.push(e.clone()),
                Err(mpsc::error::TrySendError::Closed(_)) => gone.push(e.clone()),
            }
        }
        for e in gone {
            end(st, &e, EndReason::Closed(None), 1006, "closed", effects);
        }
        let mut infos = Vec::new();
        for e in full {
            if let Some(sub) = st.subs.get(&e) {
                infos.push(SyncErrorInfo {
                    topic: sub.topic.clone(),
                    event_id: Some(id.to_owned()),
                    event_name: Some(event.to_string()),
                    subscriber: sub.label(),
                    diagnostics: format!(
                        "{} did not keep up (its queue of {} messages was full) and was unsubscribed",
                        sub.label(),
                        self.settings.queue
                    ),
                    codes: Vec::new(),
                });
            }
            end(
                st,
                &e,
                EndReason::QueueFull,
                1013,
                "too slow: queue full",
                effects,
            );
        }
        if track {
            for info in infos {
                self.sync_error(st, &info, None, effects);
            }
        }
        delivered
    }

    /// Broadcasts a hub-generated SyncError to the topic's subscribers
    /// (but `except`) that subscribed to it.
    fn sync_error(
        &self,
        st: &mut State,
        info: &SyncErrorInfo,
        except: Option<&str>,
        effects: &mut Vec<Effect>,
    ) {
        let n = sync_error(info, &uuid(), &now_timestamp());
        let value = Arc::new(n.to_value());
        let text: Arc<str> = serde_json::to_string(&*value).unwrap_or_default().into();
        let delivered = self.fan_out(
            st,
            &info.topic,
            &EventName::SyncError,
            &n.id,
            &text,
            &[],
            except,
            false,
            effects,
        );
        let version = st
            .topics
            .get(&info.topic)
            .and_then(|t| t.anchors.last())
            .map(|a| a.version.clone());
        effects.push(Effect::Emitted(Emitted {
            topic: info.topic.clone(),
            event: EventName::SyncError,
            id: n.id.clone(),
            timestamp: n.timestamp.clone(),
            patients: Vec::new(),
            version_id: version,
            delivered,
            notification: value,
            publisher: None,
        }));
    }
}

fn confirmation(topic: &str, events: &str, lease_seconds: u64) -> Arc<str> {
    let c = SubscriptionConfirmation {
        mode: "subscribe".to_owned(),
        topic: topic.to_owned(),
        events: events.to_owned(),
        lease_seconds,
    };
    serde_json::to_string(&c).unwrap_or_default().into()
}

/// Removes a subscription, closing its socket (after a denial naming
/// `reason`) when it has one.
fn end(
    st: &mut State,
    endpoint: &str,
    why: EndReason,
    code: u16,
    reason: &str,
    effects: &mut Vec<Effect>,
) {
    let Some(sub) = st.subs.remove(endpoint) else {
        return;
    };
    if let Some(t) = st.topics.get_mut(&sub.topic) {
        t.subs.remove(endpoint);
    }
    if let Some(link) = &sub.link
        && !matches!(why, EndReason::Closed(_))
    {
        let denial = SubscriptionDenial::new(&sub.topic, &sub.events_text, reason);
        let _ = link.closing.send(Some(Closing {
            code,
            reason: reason.to_owned(),
            denial: serde_json::to_string(&denial).ok().map(Into::into),
        }));
    }
    effects.push(Effect::Note(SubscriptionNote {
        topic: sub.topic,
        events: sub.events_text,
        owner: sub.owner,
        lease_seconds: sub.lease_seconds,
        ended: Some(why),
    }));
}
