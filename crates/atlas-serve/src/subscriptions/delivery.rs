//! Delivery of one subscription's notifications: its own task, following
//! the store's change broadcast.
//!
//! The task reads the commits after the subscription's last processed
//! store version from the change feed (after a restart, after falling
//! behind the broadcast, or when `[events]` is off), then follows the
//! broadcast. The broadcast's fixed capacity is the task's only queue: a
//! task slowed down by a failing endpoint gets `Lagged` and re-reads what
//! it missed from the feed, a few commits at a time, so nothing is held
//! without bound and nothing is skipped.
//!
//! For each commit it keeps the changes the topic fires for, that the
//! creator's grant admits (type and patient, decided now, not when the
//! subscription was made) and that pass the filters (a filter on an
//! element the grant hides never matches), and sends them in notification
//! Bundles of at most `max-count` events. Every event is released through
//! the access seam ([`atlas_access::notice::NoticeGate`]): a change the
//! gate refuses is not sent, not numbered and not counted, so nothing
//! about it reaches the subscriber. Each delivery (a POST with its
//! retries: handshake, heartbeat or events) gets one audit record, written
//! before the notification leaves: who (the creator), the endpoint's host
//! and path, the rows and patients released.
//!
//! A subscription whose creator's token has expired, or whose `end` has
//! passed, goes `off` and its task ends; an endpoint that keeps failing
//! puts it in `error` (events still numbered and counted, as the IG asks)
//! and every later notification is tried once until one gets through.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, watch};

use atlas_access::facts::{Facts, LISTED_PATIENTS};
use atlas_access::notice::{ChangeRef, Payload};
use atlas_access::{Access, Egress};
use atlas_audit::{AuditEntry, AuditLog};
use atlas_events::subscriptions::notification::resource_url;
use atlas_events::subscriptions::{
    Endpoint, Entry, Interaction, Notification, NotificationEvent, NotificationType,
    PayloadContent, RestHook, Retry, Spec, Status, StatusInfo, TopicCatalog,
};
use atlas_lake::changes::ReadOptions;
use atlas_lake::{ChangeEvent, ChangeFeed, ChangeOp};
use atlas_policy::{Action, Decision, Principal};

use crate::events::Events;

/// Commits read from the feed per step when catching up (each commit is
/// at most one ingest chunk, so memory stays bounded).
const CATCH_UP_COMMITS: usize = 2;

/// Who made a subscription: the principal its notifications are released
/// to, as the token stated it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Owner {
    pub subject: String,
    pub issuer: String,
    pub client: Option<String>,
    /// The token's scopes, space-separated, as it stated them.
    pub scopes: String,
    /// The SMART `patient` claim.
    pub patient: Option<String>,
    pub roles: Vec<String>,
    pub purpose: Option<String>,
}

impl Owner {
    pub fn from_principal(p: &Principal, raw_scopes: &[String]) -> Owner {
        Owner {
            subject: p.subject.clone(),
            issuer: p.issuer.clone(),
            client: p.client_id.clone(),
            scopes: raw_scopes.join(" "),
            patient: p.patient.clone(),
            roles: p.roles.clone(),
            purpose: p.purpose.clone(),
        }
    }

    /// The principal the subscription's notices are decided for.
    pub fn principal(&self) -> Principal {
        let mut p = Principal::new(&self.subject, &self.issuer).with_scopes(&self.scopes);
        if let Some(x) = &self.patient {
            p = p.with_patient(x.clone());
        }
        if let Some(x) = &self.client {
            p = p.with_client(x.clone());
        }
        if let Some(x) = &self.purpose {
            p = p.with_purpose(x.clone());
        }
        p.with_roles(self.roles.iter().cloned())
    }

    pub fn is(&self, p: &Principal) -> bool {
        self.subject == p.subject && self.issuer == p.issuer
    }
}

/// What the lake keeps of a subscription (`events/subscriptions/<id>.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Record {
    /// The Subscription as the server holds it (channel headers included).
    pub resource: Json,
    pub owner: Owner,
    /// The creator's token's `exp` (seconds since the epoch).
    pub token_exp: u64,
    /// `events-since-subscription-start`.
    pub events: u64,
    /// The store version whose changes were all processed.
    pub version: i64,
}

impl Record {
    pub fn status(&self) -> Status {
        self.resource["status"]
            .as_str()
            .and_then(Status::parse)
            .unwrap_or(Status::Error)
    }

    pub fn error(&self) -> Option<&str> {
        self.resource["error"].as_str()
    }

    pub fn set_status(&mut self, status: Status, error: Option<String>) {
        self.resource["status"] = Json::from(status.code());
        match error {
            Some(e) => self.resource["error"] = Json::from(e),
            None => {
                if let Some(o) = self.resource.as_object_mut() {
                    o.remove("error");
                }
            }
        }
    }
}

/// An event kept for `$events`: where it is in the store, not what it said.
#[derive(Debug, Clone)]
pub(crate) struct Recent {
    pub number: u64,
    pub timestamp: String,
    pub resource_type: String,
    pub id: String,
    pub patient: Option<String>,
    pub interaction: Interaction,
}

/// One subscription, shared by its handlers and its task.
pub(crate) struct Sub {
    pub id: String,
    pub rec: Mutex<Record>,
    /// `None` when the stored resource no longer validates (a topic taken
    /// out of the configuration): it is kept, in `error`, and not run.
    pub spec: Mutex<Option<Arc<Spec>>>,
    pub recent: Mutex<VecDeque<Recent>>,
    /// Serialises the puts of the record, so the newest state lands last.
    pub save: tokio::sync::Mutex<()>,
    pub stop: Mutex<Option<watch::Sender<bool>>>,
    pub task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Set when the subscription is deleted: its record is not written again.
    pub deleted: std::sync::atomic::AtomicBool,
}

impl Sub {
    pub fn new(id: String, rec: Record, spec: Option<Arc<Spec>>) -> Sub {
        Sub {
            id,
            rec: Mutex::new(rec),
            spec: Mutex::new(spec),
            recent: Mutex::new(VecDeque::new()),
            save: tokio::sync::Mutex::new(()),
            stop: Mutex::new(None),
            task: Mutex::new(None),
            deleted: Default::default(),
        }
    }

    pub fn record(&self) -> Record {
        lock(&self.rec).clone()
    }

    pub fn spec(&self) -> Option<Arc<Spec>> {
        lock(&self.spec).clone()
    }

    pub fn status(&self) -> Status {
        lock(&self.rec).status()
    }

    fn set_status(&self, status: Status, error: Option<String>) -> bool {
        let mut r = lock(&self.rec);
        let changed = r.status() != status || r.error() != error.as_deref();
        r.set_status(status, error);
        changed
    }

    /// Asks the task to end after the delivery it is in (if any).
    pub fn signal_stop(&self) -> Option<tokio::task::JoinHandle<()>> {
        if let Some(tx) = lock(&self.stop).take() {
            let _ = tx.send(true);
        }
        lock(&self.task).take()
    }

    /// Why the subscription must stop now, if it must.
    fn expired(&self, spec: &Spec) -> Option<String> {
        let exp = lock(&self.rec).token_exp;
        let now = jsonwebtoken::get_current_timestamp();
        if now >= exp {
            return Some(format!(
                "the access token of the subscription's creator expired at {}; update the \
                 subscription with a valid token to resume",
                instant(exp)
            ));
        }
        spec.end
            .filter(|e| *e <= chrono::Utc::now())
            .map(|e| format!("the subscription ended at {}", e.to_rfc3339()))
    }

    /// When [`Sub::expired`] will next say so.
    fn expiry_in(&self, spec: &Spec) -> Duration {
        let exp = lock(&self.rec).token_exp;
        let now = jsonwebtoken::get_current_timestamp();
        let mut d = Duration::from_secs(exp.saturating_sub(now));
        if let Some(end) = spec.end {
            let left = (end - chrono::Utc::now()).to_std().unwrap_or_default();
            d = d.min(left);
        }
        // Re-checked at least hourly: clocks move.
        d.min(Duration::from_secs(3600))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An RFC 3339 instant from seconds since the epoch.
fn instant(secs: u64) -> String {
    chrono::DateTime::from_timestamp(secs as i64, 0)
        .map(|t| t.to_rfc3339())
        .unwrap_or_else(|| secs.to_string())
}

/// What every delivery task shares.
pub(crate) struct Runtime {
    pub access: Access,
    pub audit: Option<Arc<AuditLog>>,
    pub events: Arc<Events>,
    pub catalog: Arc<TopicCatalog>,
    /// `<public base>/fhir`.
    pub base: String,
    pub hook: RestHook,
    pub retry: Retry,
    /// Events kept per subscription for `$events`.
    pub events_kept: usize,
    /// Read the feed this often when the broadcast is off (`[events] enabled = false`).
    pub poll: Option<Duration>,
}

/// The record's path in the lake.
pub(crate) fn record_path(id: &str) -> String {
    format!("{}/{id}.json", super::DIR)
}

/// Writes the subscription's record (the newest state wins).
pub(crate) async fn save(access: &Access, sub: &Sub) -> Result<(), String> {
    use object_store::{ObjectStoreExt, PutPayload};
    let _turn = sub.save.lock().await;
    if sub.deleted.load(std::sync::atomic::Ordering::Acquire) {
        return Ok(());
    }
    let bytes = serde_json::to_vec(&sub.record()).map_err(|e| e.to_string())?;
    access
        .lake
        .object_store()
        .put(
            &access.lake.path(&record_path(&sub.id)),
            PutPayload::from(bytes),
        )
        .await
        .map(|_| ())
        .map_err(|e| format!("saving subscription {}: {e}", sub.id))
}

async fn save_logged(access: &Access, sub: &Sub) {
    if let Err(e) = save(access, sub).await {
        tracing::error!(subscription = %sub.id, error = %e, "subscription state not saved");
    }
}

/// Something that ends a delivery early (the subscription was deleted,
/// updated or the server is stopping).
pub(crate) struct Stop(Option<watch::Receiver<bool>>);

impl Stop {
    pub fn never() -> Stop {
        Stop(None)
    }

    async fn wait(&mut self) {
        match &mut self.0 {
            Some(rx) => {
                // A dropped sender stops too.
                let _ = rx.wait_for(|s| *s).await;
            }
            None => std::future::pending::<()>().await,
        }
    }

    fn is_set(&self) -> bool {
        self.0.as_ref().is_some_and(|rx| *rx.borrow())
            || self.0.as_ref().is_some_and(|rx| rx.has_changed().is_err())
    }
}

/// Starts the subscription's task (after the previous one ends).
/// A deleted subscription gets none: the check and the sender's
/// installation are under the `stop` lock that `DELETE` takes after
/// marking it deleted, so either this sees the mark or the delete stops
/// what this starts.
pub(crate) fn spawn(rt: &Arc<Runtime>, sub: &Arc<Sub>) {
    let previous = sub.signal_stop();
    let (tx, rx) = watch::channel(false);
    {
        let mut stop = lock(&sub.stop);
        if sub.deleted.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        *stop = Some(tx);
    }
    let handle = tokio::spawn(run(rt.clone(), sub.clone(), Stop(Some(rx)), previous));
    *lock(&sub.task) = Some(handle);
}

async fn run(
    rt: Arc<Runtime>,
    sub: Arc<Sub>,
    mut stop: Stop,
    previous: Option<tokio::task::JoinHandle<()>>,
) {
    if let Some(p) = previous {
        let _ = p.await;
    }
    let Some(spec) = sub.spec() else { return };
    let endpoint = match Endpoint::new(spec.endpoint.clone(), &spec.headers) {
        Ok(e) => e,
        Err(e) => {
            sub.set_status(Status::Error, Some(e));
            save_logged(&rt.access, &sub).await;
            return;
        }
    };
    let d = Delivery {
        rt: &rt,
        sub: &sub,
        spec: &spec,
        endpoint: &endpoint,
    };
    // Subscribed before catching up, so no commit falls between the two.
    let mut rx = rt.events.subscribe();
    // A subscription whose creator's token expired while the server was
    // down sends nothing, not even what it missed.
    if let Some(why) = sub.expired(&spec) {
        sub.set_status(Status::Off, Some(why));
        save_logged(&rt.access, &sub).await;
        return;
    }
    if sub.status() == Status::Requested {
        d.handshake(&mut stop).await;
    }
    match sub.status() {
        Status::Active | Status::Error => {}
        _ => return,
    }
    let mut processed = lock(&sub.rec).version;
    d.catch_up(&mut processed, &mut stop).await;
    let heartbeat = spec
        .heartbeat_secs
        .map(|s| Duration::from_secs(u64::from(s)));
    let mut next_beat = heartbeat.map(|h| tokio::time::Instant::now() + h);
    loop {
        if stop.is_set() || sub.deleted.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        if let Some(why) = sub.expired(&spec) {
            tracing::info!(subscription = %sub.id, reason = %why, "subscription off");
            sub.set_status(Status::Off, Some(why));
            save_logged(&rt.access, &sub).await;
            return;
        }
        let beat = async {
            match next_beat {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        let poll = async {
            match rt.poll {
                Some(p) => tokio::time::sleep(p).await,
                None => std::future::pending().await,
            }
        };
        let wake = tokio::select! {
            _ = stop.wait() => Wake::Stop,
            r = rx.recv() => Wake::Batch(r),
            _ = beat => Wake::Beat,
            _ = poll => Wake::Poll,
            _ = tokio::time::sleep(sub.expiry_in(&spec)) => Wake::Clock,
        };
        match wake {
            Wake::Stop => return,
            Wake::Batch(Ok(batch)) => {
                if batch.store_version > processed {
                    let done = d.deliver(&batch.events, &mut stop).await;
                    if done.sent {
                        next_beat = heartbeat.map(|h| tokio::time::Instant::now() + h);
                    }
                    if !done.finished {
                        // Stopped part-way: the commit stays owed, to
                        // whichever task comes next.
                        return;
                    }
                    processed = batch.store_version;
                    d.processed(processed).await;
                }
            }
            Wake::Batch(Err(broadcast::error::RecvError::Lagged(n))) => {
                tracing::debug!(subscription = %sub.id, missed = n, "subscription behind the broadcast; reading the feed");
                d.catch_up(&mut processed, &mut stop).await;
            }
            Wake::Batch(Err(broadcast::error::RecvError::Closed)) => return,
            Wake::Beat => {
                d.heartbeat(&mut stop).await;
                next_beat = heartbeat.map(|h| tokio::time::Instant::now() + h);
            }
            Wake::Poll => d.catch_up(&mut processed, &mut stop).await,
            Wake::Clock => {}
        }
    }
}

/// Whether every filter on `resource_type` is one a de-identifying grant
/// may search by ([`atlas_access::deid::ALLOWED_PARAMS`]: no ids, no
/// references).
pub(crate) fn deid_safe(
    filters: &atlas_events::subscriptions::FilterSet,
    resource_type: &str,
) -> bool {
    filters
        .criteria
        .iter()
        .filter(|c| c.resource_type == resource_type)
        .all(|c| atlas_access::deid::ALLOWED_PARAMS.contains(&c.param.as_str()))
}

/// What [`Delivery::deliver`] did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Delivered {
    /// Some notification was sent.
    pub sent: bool,
    /// Every change was dealt with; false when stopped part-way.
    pub finished: bool,
}

/// What woke a subscription's task.
enum Wake {
    Stop,
    Batch(Result<Arc<crate::events::ChangeBatch>, broadcast::error::RecvError>),
    Beat,
    Poll,
    Clock,
}

/// One subscription's delivery context.
pub(crate) struct Delivery<'a> {
    pub rt: &'a Runtime,
    pub sub: &'a Sub,
    pub spec: &'a Spec,
    pub endpoint: &'a Endpoint,
}

impl Delivery<'_> {
    fn subscription_url(&self) -> String {
        format!("{}/Subscription/{}", self.rt.base, self.sub.id)
    }

    /// The status Parameters as they stand, for a notification of `kind`.
    fn status(&self, kind: NotificationType) -> StatusInfo {
        let r = lock(&self.sub.rec);
        // The IG: no topic with empty payloads (it would say what changed).
        let topic = (kind != NotificationType::EventNotification
            || self.spec.payload != PayloadContent::Empty)
            .then(|| self.spec.topic.clone());
        let mut s = StatusInfo::new(self.subscription_url(), topic, r.status(), kind, r.events);
        if let Some(e) = r.error() {
            s.errors.push(serde_json::json!({"text": e}));
        }
        s
    }

    /// The handshake: `requested` → `active` when the endpoint takes it,
    /// `error` when it does not (one attempt: the client is waiting).
    pub async fn handshake(&self, stop: &mut Stop) -> bool {
        let n = Notification {
            id: None,
            timestamp: Some(atlas_audit::now_rfc3339()),
            status: self.status(NotificationType::Handshake),
            entries: Vec::new(),
        };
        let once = Retry {
            attempts: 1,
            ..self.rt.retry.clone()
        };
        let ok = self
            .send(&n, Arc::default(), "handshake", &once, stop)
            .await;
        self.after(ok, "handshake").await;
        ok
    }

    async fn heartbeat(&self, stop: &mut Stop) {
        let n = Notification {
            id: None,
            timestamp: Some(atlas_audit::now_rfc3339()),
            status: self.status(NotificationType::Heartbeat),
            entries: Vec::new(),
        };
        let retry = self.retry();
        let ok = self
            .send(&n, Arc::default(), "heartbeat", &retry, stop)
            .await;
        self.after(ok, "heartbeat").await;
    }

    /// The retries in force: all of them while the endpoint works, one
    /// once it has failed (every later notification is that one try).
    fn retry(&self) -> Retry {
        match self.sub.status() {
            Status::Error => Retry {
                attempts: 1,
                ..self.rt.retry.clone()
            },
            _ => self.rt.retry.clone(),
        }
    }

    /// The status after a delivery.
    async fn after(&self, ok: bool, what: &str) {
        let changed = if ok {
            self.sub.set_status(Status::Active, None)
        } else {
            false
        };
        if changed {
            tracing::info!(subscription = %self.sub.id, what, "subscription active");
        }
        if changed || !ok {
            save_logged(&self.rt.access, self.sub).await;
        }
    }

    async fn processed(&self, version: i64) {
        lock(&self.sub.rec).version = version;
        save_logged(&self.rt.access, self.sub).await;
    }

    /// Reads the feed after `processed` until it is current.
    async fn catch_up(&self, processed: &mut i64, stop: &mut Stop) {
        let feed = ChangeFeed::new(self.rt.access.lake.clone());
        let opts = ReadOptions {
            with_resources: true,
            max_commits: Some(CATCH_UP_COMMITS),
            until: None,
            scan_when_gone: false,
        };
        let mut wait = Duration::from_millis(500);
        loop {
            if stop.is_set() {
                return;
            }
            let page = match feed.read(*processed, &opts).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(subscription = %self.sub.id, error = %e, "change feed unreadable; retrying");
                    tokio::select! {
                        _ = stop.wait() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(Duration::from_secs(30));
                    continue;
                }
            };
            if let Some(why) = &page.fallback {
                // The log no longer reaches back: the page is a scan of the
                // store, not its changes, and sending it would be false.
                tracing::warn!(subscription = %self.sub.id, why, after = *processed, until = page.until, "changes skipped: the store's log was cleaned up");
            } else if !page.events.is_empty() && !self.deliver(&page.events, stop).await.finished {
                // Stopped part-way: the page stays owed.
                return;
            }
            let moved = page.until > *processed;
            *processed = page.until.max(*processed);
            if moved {
                self.processed(*processed).await;
            }
            if !moved || page.until >= page.latest {
                return;
            }
        }
    }

    /// Sends the changes the subscription is owed from `events`, in
    /// notifications of at most max-count events: whether any was sent,
    /// and whether it finished (not stopped before or during a
    /// notification, so the changes are no longer owed).
    pub async fn deliver(&self, events: &[ChangeEvent], stop: &mut Stop) -> Delivered {
        let Some(topic) = self.rt.catalog.get(&self.spec.topic) else {
            return Delivered {
                sent: false,
                finished: true,
            };
        };
        // Decided for the creator only while its token is valid (the task
        // goes off when it is not: nothing is owed).
        if self.sub.expired(self.spec).is_some() {
            return Delivered {
                sent: false,
                finished: true,
            };
        }
        let who = lock(&self.sub.rec).owner.principal();
        let mut decisions: HashMap<String, Decision> = HashMap::new();
        let mut owed: Vec<&ChangeEvent> = Vec::new();
        for e in events {
            let interaction = interaction(e.op);
            if !topic.fires(&e.resource_type, interaction) {
                continue;
            }
            let d = decisions.entry(e.resource_type.clone()).or_insert_with(|| {
                self.rt
                    .access
                    .decide_unnoted(&who, &e.resource_type, Action::Search)
            });
            let Decision::Allow(grant) = d else { continue };
            if !grant.rows.admits(e.patient.as_deref()) {
                continue;
            }
            // A filter on an element the grant hides would tell the
            // subscriber what the element holds: it never matches.
            let probes_hidden = self.spec.filters.elements(&e.resource_type).any(|el| {
                grant.hidden.iter().any(|h| {
                    h == el || h.starts_with(&format!("{el}.")) || el.starts_with(&format!("{h}."))
                })
            });
            if probes_hidden {
                continue;
            }
            // Under a de-identifying grant focus ids are hashed: a filter
            // FHIR search would refuse there (`_id`, `patient`, `subject`)
            // would link real ids to them. It never matches.
            if grant.deid.is_some() && !deid_safe(&self.spec.filters, &e.resource_type) {
                continue;
            }
            let change = atlas_events::subscriptions::Change {
                resource_type: &e.resource_type,
                id: &e.id,
                interaction,
                patient: e.patient.as_deref(),
                resource: e.resource.as_deref(),
            };
            if self.spec.filters.matches(&change) {
                owed.push(e);
            }
        }
        let mut sent = false;
        for chunk in owed.chunks(self.spec.max_count.max(1) as usize) {
            if stop.is_set() {
                break;
            }
            sent |= self.send_events(&who, chunk, &decisions, stop).await;
        }
        // A stop during the last POST cut it: that one is owed too.
        Delivered {
            sent,
            finished: !stop.is_set(),
        }
    }

    /// One event notification: each change released through the seam
    /// (refused ones dropped), numbered, sent.
    async fn send_events(
        &self,
        who: &Principal,
        chunk: &[&ChangeEvent],
        decisions: &HashMap<String, Decision>,
        stop: &mut Stop,
    ) -> bool {
        let facts: Arc<Mutex<Facts>> = Arc::default();
        let gate = self
            .rt
            .access
            .notices(who.clone(), Egress::with_facts(facts.clone()));
        let payload = match self.spec.payload {
            PayloadContent::Empty => Payload::Empty,
            PayloadContent::IdOnly => Payload::IdOnly,
            PayloadContent::FullResource => Payload::FullResource,
        };
        let mut noted = std::collections::BTreeSet::new();
        let mut released = Vec::with_capacity(chunk.len());
        for e in chunk {
            let change = ChangeRef {
                resource_type: &e.resource_type,
                id: &e.id,
                patient: e.patient.as_deref(),
                resource: e.resource.as_deref(),
            };
            if let Some(n) = gate.release(&change, payload) {
                if noted.insert(e.resource_type.as_str())
                    && let Some(d) = decisions.get(&e.resource_type)
                {
                    gate.egress().decision(&e.resource_type, d);
                }
                released.push((*e, n));
            }
        }
        if released.is_empty() {
            return false;
        }
        let (first, total) = {
            let mut r = lock(&self.sub.rec);
            let first = r.events + 1;
            r.events += released.len() as u64;
            (first, r.events)
        };
        let timestamp = atlas_audit::now_rfc3339();
        let mut status = self.status(NotificationType::EventNotification);
        status.events_since_start = Some(total);
        let mut entries = Vec::new();
        {
            let mut recent = lock(&self.sub.recent);
            for (i, (e, n)) in released.into_iter().enumerate() {
                let number = first + i as u64;
                let interaction = interaction(e.op);
                let focus = match self.spec.payload {
                    PayloadContent::Empty => None,
                    _ => n.id,
                };
                status.events.push(NotificationEvent {
                    number,
                    timestamp: Some(timestamp.clone()),
                    focus: focus
                        .as_deref()
                        .map(|id| resource_url(&self.rt.base, &n.resource_type, id)),
                    additional_context: Vec::new(),
                    other_parts: Vec::new(),
                });
                if let Some(id) = &focus {
                    // The released JSON moves into the Bundle as it is.
                    let resource = n.resource.and_then(|r| RawValue::from_string(r).ok());
                    entries.push(Entry::for_change(
                        &self.rt.base,
                        interaction,
                        &n.resource_type,
                        id,
                        resource,
                    ));
                }
                if self.rt.events_kept > 0 {
                    if recent.len() >= self.rt.events_kept {
                        recent.pop_front();
                    }
                    recent.push_back(Recent {
                        number,
                        timestamp: timestamp.clone(),
                        resource_type: e.resource_type.clone(),
                        id: e.id.clone(),
                        patient: e.patient.clone(),
                        interaction,
                    });
                }
            }
        }
        let n = Notification {
            id: None,
            timestamp: Some(timestamp),
            status,
            entries,
        };
        let what = format!("events {first}-{total}");
        let retry = self.retry();
        let ok = self.send(&n, facts, &what, &retry, stop).await;
        self.after(ok, "events").await;
        true
    }

    /// Records the delivery in the audit trail, then POSTs it. A record
    /// that cannot be written keeps the notification from leaving.
    async fn send(
        &self,
        n: &Notification,
        facts: Arc<Mutex<Facts>>,
        what: &str,
        retry: &Retry,
        stop: &mut Stop,
    ) -> bool {
        let body = match n.to_json() {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(subscription = %self.sub.id, error = %e, "notification not encoded");
                return false;
            }
        };
        let kind = n.status.kind;
        if self.sub.expired(self.spec).is_some() {
            return false;
        }
        if let Some(log) = &self.rt.audit {
            let f = lock(&facts).clone();
            let entry = self.audit_entry(kind, what, f);
            if let Err(e) = log.record(entry).await {
                tracing::error!(subscription = %self.sub.id, error = %e, "audit record not written: notification withheld");
                self.sub.set_status(
                    Status::Error,
                    Some("the notification's audit record could not be written".into()),
                );
                return false;
            }
        }
        let timeout = Duration::from_secs(u64::from(self.spec.timeout_secs.max(1)));
        let started = Instant::now();
        let result = tokio::select! {
            r = self.rt.hook.post(self.endpoint, &body, timeout, retry) => Some(r),
            _ = stop.wait() => None,
        };
        match result {
            Some(Ok(d)) => {
                tracing::debug!(subscription = %self.sub.id, kind = kind.code(), what, status = d.status, attempts = d.attempts, ms = started.elapsed().as_millis() as u64, "notification delivered");
                true
            }
            Some(Err(e)) => {
                tracing::warn!(subscription = %self.sub.id, kind = kind.code(), what, error = %e, "notification not delivered");
                // The subscriber learns that it failed, never why (no
                // telling a closed port from a timeout).
                self.sub.set_status(Status::Error, Some(e.public_text()));
                false
            }
            None => false,
        }
    }

    /// One delivery's audit record: the creator, the endpoint's host and
    /// path, what was released.
    fn audit_entry(&self, kind: NotificationType, what: &str, f: Facts) -> AuditEntry {
        let owner = lock(&self.sub.rec).owner.clone();
        let path = self.endpoint.audit_path();
        let query = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("events", what)
            .append_pair("subscription", &self.sub.id)
            .append_pair("type", kind.code())
            .finish();
        let query_hash = hex::encode(Sha256::digest(format!("POST {path}?{query}").as_bytes()));
        AuditEntry {
            time: atlas_audit::now_rfc3339(),
            subject: Some(owner.subject),
            issuer: Some(owner.issuer),
            client: owner.client,
            purpose: owner.purpose,
            method: "POST".into(),
            path,
            query,
            query_hash,
            // Written before the notification leaves: no answer yet.
            status: 0,
            decision: "allow".into(),
            rules: f.rules.into_iter().collect(),
            resource_types: f.resource_types.into_iter().collect(),
            rows: Some(f.rows),
            patients: if f.patients.len() > LISTED_PATIENTS {
                Vec::new()
            } else {
                f.patients.iter().cloned().collect()
            },
            patient_count: (!f.patients_overflow).then_some(f.patients.len() as u64),
            fields_removed: f.fields_removed.into_iter().collect(),
            duration_us: 0,
            request_id: Some(uuid_like()),
            purpose_claim: None,
            purpose_header: None,
            patient_binding: owner.patient,
            scopes: owner.scopes.split_whitespace().map(str::to_owned).collect(),
            roles: owner.roles,
            reason: None,
            out_of_scope: false,
        }
    }
}

fn uuid_like() -> String {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    hex::encode(b)
}

pub(crate) fn interaction(op: ChangeOp) -> Interaction {
    match op {
        ChangeOp::Create => Interaction::Create,
        ChangeOp::Update => Interaction::Update,
        ChangeOp::Delete => Interaction::Delete,
    }
}
