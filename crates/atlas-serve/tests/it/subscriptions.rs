//! FHIR Subscriptions (R4 backport) end to end: a real rest-hook receiver
//! on loopback (a small axum app keeping every notification), resources
//! ingested into the lake, notifications checked for their shape.
//!
//! One test per must-do of the brief's Subscriptions list (topic-based;
//! history Bundle with the status Parameters first; handshake, heartbeat,
//! event-notification; payloads empty, id-only, full-resource; `$status`
//! with events-since-subscription-start; refusals of unsupported topics,
//! filters, channels and payloads), and the rest: filters by patient,
//! batching by max-count, retries then `error` then recovery, a subscriber
//! whose token expires, access (a subscriber limited to one patient never
//! hears of another; a grant hiding an element gets full resources
//! without it, and a filter on it never matches), restarts, the audit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value as Json, json};

use atlas_events::subscriptions::{Notification, NotificationType, Status};
use atlas_lake::Lake;
use atlas_serve::{AppState, ServeConfig};

use crate::access::{World, call, call_json, jwt, world};

const EVERYONE: &str = "[[rule]]\nid = \"everyone\"\neffect = \"allow\"\n";
const TOPIC: &str = "http://atlas.local/SubscriptionTopic/observation-change";
const FILTER: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-filter-criteria";
const CONTENT: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-payload-content";
const HEARTBEAT: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-heartbeat-period";
const MAX_COUNT: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-max-count";
const SECRET: &str = "hook-secret-0d1e";

/// What the receiver got: every POST, answered or failed on purpose.
#[derive(Clone)]
struct Got {
    headers: HeaderMap,
    body: Vec<u8>,
    answered: u16,
}

/// A rest-hook endpoint on loopback.
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Got>>>,
    /// Requests still to fail with 503.
    fail: Arc<AtomicUsize>,
    /// Handshakes still to answer (200) only after 1.5 s.
    slow_handshakes: Arc<AtomicUsize>,
    /// Event notifications still to hold 3 s, then answer 503.
    stall_events: Arc<AtomicUsize>,
    /// Event notifications held so far.
    stalled: Arc<AtomicUsize>,
}

/// Takes one from `n` if it is not zero.
fn take_one(n: &AtomicUsize) -> bool {
    n.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok()
}

impl Receiver {
    async fn start() -> Receiver {
        let got: Arc<Mutex<Vec<Got>>> = Arc::default();
        let fail = Arc::new(AtomicUsize::new(0));
        let slow_handshakes = Arc::new(AtomicUsize::new(0));
        let stall_events = Arc::new(AtomicUsize::new(0));
        let stalled = Arc::new(AtomicUsize::new(0));
        let (g, f) = (got.clone(), fail.clone());
        let (sh, se, sd) = (
            slow_handshakes.clone(),
            stall_events.clone(),
            stalled.clone(),
        );
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let (g, f) = (g.clone(), f.clone());
                let (sh, se, sd) = (sh.clone(), se.clone(), sd.clone());
                async move {
                    let kind = Notification::parse(&body).ok().map(|n| n.status.kind);
                    let mut stalled = false;
                    if kind == Some(NotificationType::Handshake) && take_one(&sh) {
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                    } else if kind == Some(NotificationType::EventNotification) && take_one(&se) {
                        sd.fetch_add(1, Ordering::AcqRel);
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        stalled = true;
                    }
                    let failing = stalled || take_one(&f);
                    let answered = if failing { 503 } else { 200 };
                    g.lock().unwrap().push(Got {
                        headers,
                        body: body.to_vec(),
                        answered,
                    });
                    StatusCode::from_u16(answered).unwrap()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            url: format!("http://{addr}/hook"),
            got,
            fail,
            slow_handshakes,
            stall_events,
            stalled,
        }
    }

    /// The notifications it took (answered 200), parsed.
    fn taken(&self) -> Vec<Notification> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|g| g.answered == 200)
            .map(|g| Notification::parse(&g.body).unwrap())
            .collect()
    }

    fn of(&self, kind: NotificationType) -> Vec<Notification> {
        self.taken()
            .into_iter()
            .filter(|n| n.status.kind == kind)
            .collect()
    }

    /// Waits until `ok` holds of the notifications taken.
    async fn wait(
        &self,
        what: &str,
        secs: u64,
        ok: impl Fn(&[Notification]) -> bool,
    ) -> Vec<Notification> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let t = self.taken();
            if ok(&t) {
                return t;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "{what}: not within {secs} s; got {:#?}",
                    t.iter()
                        .map(|n| (n.status.kind, n.status.events.len()))
                        .collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The event numbers delivered, in order.
    fn event_numbers(&self) -> Vec<u64> {
        self.of(NotificationType::EventNotification)
            .iter()
            .flat_map(|n| n.status.events.iter().map(|e| e.number))
            .collect()
    }
}

fn events_total(n: &[Notification]) -> usize {
    n.iter()
        .filter(|n| n.status.kind == NotificationType::EventNotification)
        .map(|n| n.status.events.len())
        .sum()
}

/// A server on `w` with fast polling, 1 s heartbeats allowed, quick
/// retries and private (loopback) endpoints allowed.
async fn server(w: &World, policy: &str, tune: impl FnOnce(&mut ServeConfig)) -> AppState {
    let s = w
        .server_with(policy, |c| {
            c.events.poll_ms = 50;
            // The receivers are on loopback.
            c.subscriptions.private_endpoints = true;
            c.subscriptions.min_heartbeat_secs = 1;
            c.subscriptions.retry_attempts = 3;
            c.subscriptions.retry_base_ms = 20;
            c.subscriptions.retry_max_ms = 100;
            tune(c)
        })
        .await;
    s.subscriptions.start(&s);
    s
}

fn observation(id: &str, patient: &str, value: u32) -> String {
    json!({"resourceType": "Observation", "id": id, "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": format!("Patient/{patient}")},
        "valueQuantity": {"value": value, "unit": "/min"}})
    .to_string()
}

use crate::events::ingest_lines as ingest;

/// A backport Subscription to the Observation topic.
fn subscription(endpoint: &str, payload: &str, filters: &[&str]) -> Json {
    let filters: Vec<Json> = filters
        .iter()
        .map(|f| json!({"url": FILTER, "valueString": f}))
        .collect();
    json!({
        "resourceType": "Subscription",
        "meta": {"profile": ["http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription"]},
        "status": "requested",
        "reason": "test",
        "criteria": TOPIC,
        "_criteria": {"extension": filters},
        "channel": {
            "type": "rest-hook",
            "endpoint": endpoint,
            "header": [format!("X-Hook-Secret: {SECRET}")],
            "payload": "application/fhir+json",
            "_payload": {"extension": [{"url": CONTENT, "valueCode": payload}]}
        }
    })
}

async fn create(s: &AppState, token: &str, body: &Json) -> (StatusCode, Json) {
    call_json(s, "POST", "/fhir/Subscription", token, None, Some(body)).await
}

/// Creates `body` and checks the answer: 201, an id, active.
async fn created(s: &AppState, token: &str, body: &Json) -> String {
    let (st, j) = create(s, token, body).await;
    assert_eq!(st, StatusCode::CREATED, "{j}");
    assert_eq!(j["status"], "active", "{j}");
    j["id"].as_str().unwrap().to_owned()
}

fn patients(w: &World) -> (String, String) {
    let mut ids = w.patient_ids().into_iter();
    (ids.next().unwrap(), ids.next().unwrap())
}

fn status_params(bundle: &Json) -> &Json {
    assert_eq!(bundle["type"], "searchset", "{bundle}");
    &bundle["entry"][0]["resource"]
}

fn param<'j>(params: &'j Json, name: &str) -> &'j Json {
    params["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or(&Json::Null)
}

/// Topic-based: a subscription names one of the topics the server offers
/// (listed at `/fhir/SubscriptionTopic` as R4 Basic resources), and only
/// changes of the topic's type reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_based_subscriptions_name_an_offered_topic() {
    let w = world(4, None).await;
    let s = server(&w, EVERYONE, |_| {}).await;
    let token = jwt(json!({"sub": "alice"}));
    let (st, topics) = call_json(
        &s,
        "GET",
        "/fhir/SubscriptionTopic?resource=Observation",
        &token,
        None,
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{topics}");
    assert_eq!(topics["total"], 1, "{topics}");
    let basic = &topics["entry"][0]["resource"];
    assert_eq!(basic["resourceType"], "Basic");
    assert_eq!(basic["code"]["coding"][0]["code"], "SubscriptionTopic");
    assert!(basic.to_string().contains(TOPIC), "{basic}");
    let id = basic["id"].as_str().unwrap();
    let (st, one) = call_json(
        &s,
        "GET",
        &format!("/fhir/SubscriptionTopic/{id}"),
        &token,
        None,
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(&one, basic);
    assert!(s.subscriptions.capability().to_string().contains(TOPIC));

    let r = Receiver::start().await;
    let (p, _) = patients(&w);
    created(&s, &token, &subscription(&r.url, "id-only", &[])).await;
    // A Condition is not the topic's: nothing; an Observation is.
    let condition = json!({"resourceType": "Condition", "id": "c-topic", "subject": {"reference": format!("Patient/{p}")},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]}}).to_string();
    ingest(&w.lake, &w.dir, "c.ndjson", &[condition]).await;
    ingest(
        &w.lake,
        &w.dir,
        "o.ndjson",
        &[observation("o-topic", &p, 70)],
    )
    .await;
    let got = r
        .wait("an event notification", 20, |n| events_total(n) >= 1)
        .await;
    let focus: Vec<String> = got
        .iter()
        .flat_map(|n| n.status.events.iter().filter_map(|e| e.focus.clone()))
        .collect();
    assert_eq!(focus.len(), 1, "{focus:?}");
    assert!(focus[0].ends_with("/fhir/Observation/o-topic"), "{focus:?}");
}

/// Every notification is a `history` Bundle whose first entry is the
/// status Parameters (backport-subscription-status-r4), its request a read
/// of the subscription's `$status`; every entry has a request and response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_are_history_bundles_whose_first_entry_is_the_status_parameters() {
    let w = world(4, None).await;
    let s = server(&w, EVERYONE, |_| {}).await;
    let r = Receiver::start().await;
    let token = jwt(json!({"sub": "alice"}));
    let id = created(&s, &token, &subscription(&r.url, "full-resource", &[])).await;
    let (p, _) = patients(&w);
    ingest(
        &w.lake,
        &w.dir,
        "o.ndjson",
        &[observation("o-shape", &p, 70)],
    )
    .await;
    r.wait("an event notification", 20, |n| events_total(n) >= 1)
        .await;
    let raw = r.got.lock().unwrap().clone();
    assert!(raw.len() >= 2, "handshake and event");
    for g in &raw {
        assert_eq!(g.headers["content-type"], "application/fhir+json");
        assert_eq!(
            g.headers["x-hook-secret"], SECRET,
            "channel headers are sent"
        );
        let b: Json = serde_json::from_slice(&g.body).unwrap();
        assert_eq!(b["resourceType"], "Bundle");
        assert_eq!(b["type"], "history");
        assert_eq!(
            b["meta"]["profile"][0],
            "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-notification-r4"
        );
        let first = &b["entry"][0];
        assert_eq!(first["resource"]["resourceType"], "Parameters");
        assert_eq!(
            first["resource"]["meta"]["profile"][0],
            "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-status-r4"
        );
        assert_eq!(first["request"]["method"], "GET");
        let status_url = first["request"]["url"].as_str().unwrap();
        assert!(
            status_url.ends_with(&format!("/fhir/Subscription/{id}/$status")),
            "{status_url}"
        );
        assert_eq!(
            param(&first["resource"], "subscription")["valueReference"]["reference"]
                .as_str()
                .unwrap(),
            status_url.trim_end_matches("/$status")
        );
        for e in b["entry"].as_array().unwrap() {
            assert!(e["request"].is_object() && e["response"].is_object(), "{e}");
        }
    }
}

/// Handshake: a new subscription starts `requested`; the server POSTs a
/// handshake (events 0) and answers `active` once the endpoint took it,
/// `error` when it did not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_on_create_makes_the_subscription_active_or_error() {
    let w = world(4, None).await;
    let s = server(&w, EVERYONE, |_| {}).await;
    let r = Receiver::start().await;
    let token = jwt(json!({"sub": "alice"}));
    let (st, j) = create(&s, &token, &subscription(&r.url, "empty", &[])).await;
    assert_eq!(st, StatusCode::CREATED, "{j}");
    assert_eq!(j["status"], "active");
    let hs = r.of(NotificationType::Handshake);
    assert_eq!(hs.len(), 1);
    assert_eq!(hs[0].status.status, Status::Requested);
    assert_eq!(hs[0].status.events_since_start, Some(0));
    assert_eq!(hs[0].status.topic.as_deref(), Some(TOPIC));
    assert!(hs[0].status.events.is_empty() && hs[0].entries.is_empty());
    // Read back: headers redacted; the server's id, meta, adjusted channel.
    let id = j["id"].as_str().unwrap();
    let (st, back) = call_json(
        &s,
        "GET",
        &format!("/fhir/Subscription/{id}"),
        &token,
        None,
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(back["channel"]["header"][0], "X-Hook-Secret: [redacted]");
    assert!(!back.to_string().contains(SECRET));
    assert_eq!(back["meta"]["versionId"], "1");
    assert!(back["channel"]["extension"].to_string().contains(MAX_COUNT));

    // An endpoint that refuses the handshake: error, saying why.
    r.fail.store(1, Ordering::Release);
    let (st, j) = create(&s, &token, &subscription(&r.url, "empty", &[])).await;
    assert_eq!(st, StatusCode::CREATED, "{j}");
    assert_eq!(j["status"], "error", "{j}");
    assert!(j["error"].as_str().unwrap().contains("503"), "{j}");
    assert!(!j["error"].as_str().unwrap().contains(SECRET));
}

/// Heartbeat: with `backport-heartbeat-period`, a heartbeat every period
/// while nothing else is sent, carrying the event count so far.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_are_sent_every_heartbeat_period() {
    let w = world(4, None).await;
    let s = server(&w, EVERYONE, |_| {}).await;
    let r = Receiver::start().await;
    let token = jwt(json!({"sub": "alice"}));
    let mut sub = subscription(&r.url, "id-only", &[]);
    sub["channel"]["extension"] = json!([{"url": HEARTBEAT, "valueUnsignedInt": 1}]);
    created(&s, &token, &sub).await;
    let got = r
        .wait("two heartbeats", 15, |n| {
            n.iter()
                .filter(|n| n.status.kind == NotificationType::Heartbeat)
                .count()
                >= 2
        })
        .await;
    for h in got
        .iter()
        .filter(|n| n.status.kind == NotificationType::Heartbeat)
    {
        assert_eq!(h.status.status, Status::Active);
        assert_eq!(h.status.events_since_start, Some(0));
        assert!(h.status.events.is_empty() && h.entries.is_empty());
    }
}

/// Event notification: each change the topic fires for and the filters
/// pass is an event, numbered from 1, in a notification of type
/// event-notification; filters narrow by patient.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_notifications_follow_changes_and_filters_by_patient() {
    let w = world(4, None).await;
    let s = server(&w, EVERYONE, |_| {}).await;
    let r = Receiver::start().await;
    let token = jwt(json!({"sub": "alice"}));
    let (p, q) = patients(&w);
    let filter = format!("Observation?patient=Patient/{p}");
    created(&s, &token, &subscription(&r.url, "id-only", &[&filter])).await;
    ingest(
        &w.lake,
        &w.dir,
        "a.ndjson",
        &[observation("ev-p", &p, 70), observation("ev-q", &q, 71)],
    )
    .await;
    ingest(&w.lake, &w.dir, "b.ndjson", &[observation("ev-p", &p, 90)]).await;
    let got = r.wait("two events", 20, |n| events_total(n) >= 2).await;
    let events: Vec<_> = got
        .iter()
        .filter(|n| n.status.kind == NotificationType::EventNotification)
        .collect();
    let all: Vec<String> = events
        .iter()
        .flat_map(|n| n.status.events.iter().map(|e| e.focus.clone().unwrap()))
        .collect();
    assert!(
        all.iter().all(|f| f.ends_with("/Observation/ev-p")),
        "only patient {p}'s: {all:?}"
    );
    assert_eq!(r.event_numbers(), [1, 2]);
    let methods: Vec<String> = events
        .iter()
        .flat_map(|n| n.entries.iter().map(|e| e.method.clone()))
        .collect();
    assert_eq!(methods, ["POST", "PUT"], "a create, then an update");
    assert_eq!(events.last().unwrap().status.events_since_start, Some(2));
    assert_eq!(events[0].status.status, Status::Active);
}

/// Payload `empty`: the status only, no focus, no topic (the IG: it
/// should not be sent), no entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_empty_carries_neither_focus_nor_entries() {
    let w = world(4, None).await;
    let s = server(&w, EVERYONE, |_| {}).await;
    let r = Receiver::start().await;
    let token = jwt(json!({"sub": "alice"}));
    created(&s, &token, &subscription(&r.url, "empty", &[])).await;
    let (p, _) = patients(&w);
    ingest(
        &w.lake,
        &w.dir,
        "o.ndjson",
        &[observation("empty-1", &p, 70)],
    )
    .await;
    let got = r.wait("an event", 20, |n| events_total(n) >= 1).await;
    let n = got
        .iter()
        .find(|n| n.status.kind == NotificationType::EventNotification)
        .unwrap();
    assert!(n.entries.is_empty());
    assert_eq!(n.status.topic, None);
    assert_eq!(n.status.events[0].focus, None);
    assert!(n.status.events[0].timestamp.is_some());
    let raw = r
        .got
        .lock()
        .unwrap()
        .iter()
        .map(|g| String::from_utf8_lossy(&g.body).into_owned())
        .collect::<String>();
    assert!(
        !raw.contains("empty-1") && !raw.contains(&p),
        "nothing about the resource leaves"
    );
}

/// Payload `id-only`: the focus reference, and an entry per focus with its
/// fullUrl and request but no resource.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_id_only_carries_focus_references_without_resources() {
    let w = world(4, None).await;
    let s = server(&w, EVERYONE, |_| {}).await;
    let r = Receiver::start().await;
    let token = jwt(json!({"sub": "alice"}));
    created(&s, &token, &subscription(&r.url, "id-only", &[])).await;
    let (p, _) = patients(&w);
    ingest(
        &w.lake,
        &w.dir,
        "o.ndjson",
        &[observation("idonly-1", &p, 70)],
    )
    .await;
    let got = r.wait("an event", 20, |n| events_total(n) >= 1).await;
    let n = got
        .iter()
        .find(|n| n.status.kind == NotificationType::EventNotification)
        .unwrap();
    let focus = n.status.events[0].focus.clone().unwrap();
    assert!(focus.ends_with("/fhir/Observation/idonly-1"), "{focus}");
    assert_eq!(n.entries.len(), 1);
    assert_eq!(n.entries[0].full_url, focus);
    assert!(n.entries[0].resource.is_none());
    assert_eq!(
        (n.entries[0].method.as_str(), n.entries[0].url.as_str()),
        ("POST", "Observation")
    );
    assert_eq!(n.status.topic.as_deref(), Some(TOPIC));
}

/// Payload `full-resource`: the resource as the subscriber's grant lets it
/// out (here everything), in the focus entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_full_resource_carries_the_resources() {
    let w = world(4, None).await;
    let s = server(&w, EVERYONE, |_| {}).await;
    let r = Receiver::start().await;
    let token = jwt(json!({"sub": "alice"}));
    created(&s, &token, &subscription(&r.url, "full-resource", &[])).await;
    let (p, _) = patients(&w);
    ingest(
        &w.lake,
        &w.dir,
        "o.ndjson",
        &[observation("full-1", &p, 70)],
    )
    .await;
    let got = r.wait("an event", 20, |n| events_total(n) >= 1).await;
    let n = got
        .iter()
        .find(|n| n.status.kind == NotificationType::EventNotification)
        .unwrap();
    let res = n.entries[0].resource_json().unwrap();
    assert_eq!(res["id"], "full-1");
    assert_eq!(res["valueQuantity"]["value"], 70);
    assert_eq!(
        n.status.events[0].focus.as_deref(),
        Some(n.entries[0].full_url.as_str())
    );
}

/// `$status`: the status Parameters (query-status) with
/// events-since-subscription-start, by instance and by type; `$events`
/// gives the kept events back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_operation_reports_events_since_subscription_start() {
    let w = world(4, None).await;
    let s = server(&w, EVERYONE, |_| {}).await;
    let r = Receiver::start().await;
    let token = jwt(json!({"sub": "alice"}));
    let id = created(&s, &token, &subscription(&r.url, "id-only", &[])).await;
    let (p, q) = patients(&w);
    ingest(
        &w.lake,
        &w.dir,
        "o.ndjson",
        &[
            observation("st-1", &p, 1),
            observation("st-2", &q, 2),
            observation("st-3", &p, 3),
        ],
    )
    .await;
    r.wait("three events", 20, |n| events_total(n) >= 3).await;
    let (st, b) = call_json(
        &s,
        "GET",
        &format!("/fhir/Subscription/{id}/$status"),
        &token,
        None,
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    let params = status_params(&b);
    assert_eq!(
        param(params, "events-since-subscription-start")["valueString"],
        "3",
        "{params}"
    );
    assert_eq!(param(params, "type")["valueCode"], "query-status");
    assert_eq!(param(params, "status")["valueCode"], "active");
    assert_eq!(param(params, "topic")["valueCanonical"], TOPIC);
    for uri in [
        format!("/fhir/Subscription/$status?id={id}"),
        "/fhir/Subscription/$status?status=active".into(),
    ] {
        let (st, b) = call_json(&s, "GET", &uri, &token, None, None).await;
        assert_eq!(st, StatusCode::OK, "{b}");
        assert_eq!(b["total"], 1, "{uri}: {b}");
        assert_eq!(
            param(status_params(&b), "events-since-subscription-start")["valueString"],
            "3"
        );
    }
    let (st, b) = call_json(
        &s,
        "POST",
        "/fhir/Subscription/$status",
        &token,
        None,
        Some(&json!({"resourceType": "Parameters", "parameter": [{"name": "id", "valueId": id}]})),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    assert_eq!(b["total"], 1);
    let (_, b) = call_json(
        &s,
        "GET",
        "/fhir/Subscription/$status?status=off",
        &token,
        None,
        None,
    )
    .await;
    assert_eq!(b["total"], 0);
    // Someone else's: not found.
    let other = jwt(json!({"sub": "mallory"}));
    let (st, _) = call_json(
        &s,
        "GET",
        &format!("/fhir/Subscription/{id}/$status"),
        &other,
        None,
        None,
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (_, b) = call_json(&s, "GET", "/fhir/Subscription/$status", &other, None, None).await;
    assert_eq!(b["total"], 0);
    // $events: the kept events, by number.
    let (st, b) = call(
        &s,
        "GET",
        &format!("/fhir/Subscription/{id}/$events?eventsSinceNumber=2"),
        &token,
        None,
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let n = Notification::parse(&b).unwrap();
    assert_eq!(n.status.kind, NotificationType::QueryEvent);
    let numbers: Vec<u64> = n.status.events.iter().map(|e| e.number).collect();
    assert_eq!(numbers, [2, 3]);
    assert!(n.entries.iter().all(|e| e.resource.is_none()));
}

/// Unsupported topics, filters, channels and payloads are refused with an
/// OperationOutcome naming the element (422; 400 when malformed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_topics_filters_channels_and_payloads_are_rejected() {
    let w = world(4, None).await;
    let s = server(&w, EVERYONE, |_| {}).await;
    let r = Receiver::start().await;
    let token = jwt(json!({"sub": "alice"}));
    let base = subscription(&r.url, "id-only", &[]);
    let cases: Vec<(&str, Json, u16, &str)> = vec![
        (
            "topic",
            {
                let mut b = base.clone();
                b["criteria"] = json!("http://hl7.org/SubscriptionTopic/admission");
                b
            },
            422,
            "Subscription.criteria",
        ),
        (
            "filter",
            subscription(&r.url, "id-only", &["Observation?value-quantity=gt5"]),
            422,
            "Subscription.criteria.extension:filterCriteria[0]",
        ),
        (
            "filter modifier",
            subscription(&r.url, "id-only", &["Observation?code:not=1"]),
            422,
            "Subscription.criteria.extension:filterCriteria[0]",
        ),
        (
            "channel",
            {
                let mut b = base.clone();
                b["channel"]["type"] = json!("websocket");
                b
            },
            422,
            "Subscription.channel.type",
        ),
        (
            "custom channel",
            {
                let mut b = base.clone();
                b["channel"]["_type"] = json!({"extension": [{"url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-channel-type", "valueCoding": {"code": "zulip"}}]});
                b
            },
            422,
            "Subscription.channel.type",
        ),
        (
            "payload content",
            subscription(&r.url, "everything", &[]),
            422,
            "Subscription.channel.payload.extension:content",
        ),
        (
            "payload type",
            {
                let mut b = base.clone();
                b["channel"]["payload"] = json!("application/fhir+xml");
                b
            },
            422,
            "Subscription.channel.payload",
        ),
        (
            "http endpoint",
            {
                let mut b = base.clone();
                b["channel"]["endpoint"] = json!("http://hooks.example/x");
                b
            },
            422,
            "Subscription.channel.endpoint",
        ),
        (
            "no criteria",
            {
                let mut b = base.clone();
                b.as_object_mut().unwrap().remove("criteria");
                b
            },
            400,
            "Subscription.criteria",
        ),
        (
            "not a Subscription",
            json!({"resourceType": "Patient"}),
            400,
            "Subscription",
        ),
    ];
    for (what, body, status, element) in cases {
        let (st, oo) = create(&s, &token, &body).await;
        assert_eq!(st.as_u16(), status, "{what}: {oo}");
        assert_eq!(oo["resourceType"], "OperationOutcome", "{what}");
        let named = oo["issue"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["expression"][0] == element);
        assert!(named, "{what}: {oo}");
    }
    let (st, oo) = call_json(
        &s,
        "POST",
        "/fhir/Subscription",
        &token,
        None,
        Some(&json!("not json")),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{oo}");
    assert!(r.taken().is_empty(), "nothing refused was handshaken");
    let (_, list) = call_json(&s, "GET", "/fhir/Subscription", &token, None, None).await;
    assert_eq!(list["total"], 0);
    // A search parameter the list does not know is refused, not ignored.
    let (st, _) = call_json(&s, "GET", "/fhir/Subscription?bogus=1", &token, None, None).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
}

/// Many changes in one commit go out in notifications of at most
/// max-count events, numbered without gaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_batched_up_to_max_count() {
    let w = world(4, None).await;
    let s = server(&w, EVERYONE, |_| {}).await;
    let r = Receiver::start().await;
    let token = jwt(json!({"sub": "alice"}));
    let mut sub = subscription(&r.url, "id-only", &[]);
    sub["channel"]["extension"] = json!([{"url": MAX_COUNT, "valuePositiveInt": 10}]);
    created(&s, &token, &sub).await;
    let (p, _) = patients(&w);
    let lines: Vec<String> = (0..25)
        .map(|i| observation(&format!("batch-{i:02}"), &p, i))
        .collect();
    ingest(&w.lake, &w.dir, "many.ndjson", &lines).await;
    let got = r.wait("25 events", 20, |n| events_total(n) >= 25).await;
    let sizes: Vec<usize> = got
        .iter()
        .filter(|n| n.status.kind == NotificationType::EventNotification)
        .map(|n| n.status.events.len())
        .collect();
    assert_eq!(sizes, [10, 10, 5]);
    assert_eq!(r.event_numbers(), (1..=25).collect::<Vec<u64>>());
}

/// A failing endpoint gets retries with backoff; when they run out the
/// subscription goes `error` (events still counted); the next
/// notification that gets through makes it `active` again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_endpoints_get_retries_then_error_then_recover() {
    let w = world(4, None).await;
    let s = server(&w, EVERYONE, |_| {}).await;
    let r = Receiver::start().await;
    let token = jwt(json!({"sub": "alice"}));
    let id = created(&s, &token, &subscription(&r.url, "id-only", &[])).await;
    let (p, _) = patients(&w);
    // Two failures, then through on the third attempt.
    r.fail.store(2, Ordering::Release);
    ingest(
        &w.lake,
        &w.dir,
        "a.ndjson",
        &[observation("retry-1", &p, 1)],
    )
    .await;
    r.wait("the first event", 20, |n| events_total(n) >= 1)
        .await;
    let attempts = r
        .got
        .lock()
        .unwrap()
        .iter()
        .filter(|g| g.answered == 503)
        .count();
    assert_eq!(attempts, 2);
    assert_eq!(s.subscriptions.status_of(&id), Some((Status::Active, 1)));
    // Every attempt fails: error, the event counted all the same.
    r.fail.store(100, Ordering::Release);
    ingest(
        &w.lake,
        &w.dir,
        "b.ndjson",
        &[observation("retry-2", &p, 2)],
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while s.subscriptions.status_of(&id).map(|x| x.0) != Some(Status::Error) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            s.subscriptions.status_of(&id)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, b) = call_json(
        &s,
        "GET",
        &format!("/fhir/Subscription/{id}/$status"),
        &token,
        None,
        None,
    )
    .await;
    let params = status_params(&b);
    assert_eq!(param(params, "status")["valueCode"], "error");
    assert_eq!(
        param(params, "events-since-subscription-start")["valueString"],
        "2"
    );
    assert!(
        param(params, "error")["valueCodeableConcept"]["text"]
            .as_str()
            .unwrap()
            .contains("503")
    );
    let (_, read) = call_json(
        &s,
        "GET",
        &format!("/fhir/Subscription/{id}"),
        &token,
        None,
        None,
    )
    .await;
    assert_eq!(read["status"], "error");
    // The endpoint is back: the next notification gets through, active again.
    r.fail.store(0, Ordering::Release);
    ingest(
        &w.lake,
        &w.dir,
        "c.ndjson",
        &[observation("retry-3", &p, 3)],
    )
    .await;
    r.wait("the third event", 20, |n| {
        n.iter()
            .any(|n| n.status.events.iter().any(|e| e.number == 3))
    })
    .await;
    assert_eq!(s.subscriptions.status_of(&id), Some((Status::Active, 3)));
}

/// A subscriber whose token expires: the subscription goes `off`, says
/// why, and nothing more is sent; updating it with a valid token resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_whose_token_expires_gets_nothing_more() {
    let w = world(4, None).await;
    let s = server(&w, EVERYONE, |_| {}).await;
    let r = Receiver::start().await;
    let now = jsonwebtoken::get_current_timestamp();
    let short = jwt(json!({"sub": "alice", "exp": now + 3}));
    let long = jwt(json!({"sub": "alice"}));
    let id = created(&s, &short, &subscription(&r.url, "id-only", &[])).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while s.subscriptions.status_of(&id).map(|x| x.0) != Some(Status::Off) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            s.subscriptions.status_of(&id)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (p, _) = patients(&w);
    ingest(&w.lake, &w.dir, "a.ndjson", &[observation("exp-1", &p, 1)]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        r.of(NotificationType::EventNotification).is_empty(),
        "nothing after the token expired"
    );
    let (st, j) = call_json(
        &s,
        "GET",
        &format!("/fhir/Subscription/{id}"),
        &long,
        None,
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(j["status"], "off");
    assert!(j["error"].as_str().unwrap().contains("expired"), "{j}");
    // The owner renews it with a valid token: handshake, active, events again
    // (only those after it was renewed).
    let mut renewed = j.clone();
    renewed["status"] = json!("requested");
    let (st, j) = call_json(
        &s,
        "PUT",
        &format!("/fhir/Subscription/{id}"),
        &long,
        None,
        Some(&renewed),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{j}");
    assert_eq!(j["status"], "active");
    assert_eq!(j["meta"]["versionId"], "2");
    assert_eq!(r.of(NotificationType::Handshake).len(), 2);
    let raw = r.got.lock().unwrap().last().unwrap().headers["x-hook-secret"].clone();
    assert_eq!(raw, SECRET, "the redacted header kept its stored value");
    ingest(&w.lake, &w.dir, "b.ndjson", &[observation("exp-2", &p, 2)]).await;
    let got = r
        .wait("an event after renewal", 20, |n| events_total(n) >= 1)
        .await;
    let focus: Vec<String> = got
        .iter()
        .flat_map(|n| n.status.events.iter().filter_map(|e| e.focus.clone()))
        .collect();
    assert!(focus.iter().all(|f| f.ends_with("/exp-2")), "{focus:?}");
}

/// Access: a subscriber bound to one patient never receives anything about
/// another (not the event, not its number, not its count), and the
/// audit names only the patients sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_never_receives_events_about_a_patient_outside_its_scope() {
    let w = world(4, None).await;
    let s = server(&w, EVERYONE, |_| {}).await;
    let r = Receiver::start().await;
    let (p, q) = patients(&w);
    let token = jwt(json!({"sub": "pat-app", "scope": "patient/*.rs", "patient": p}));
    let id = created(&s, &token, &subscription(&r.url, "full-resource", &[])).await;
    // A filter asking for the other patient gets nothing either.
    let r2 = Receiver::start().await;
    let filter = format!("Observation?patient=Patient/{q}");
    let id2 = created(
        &s,
        &token,
        &subscription(&r2.url, "full-resource", &[&filter]),
    )
    .await;
    ingest(
        &w.lake,
        &w.dir,
        "a.ndjson",
        &[
            observation("scope-q1", &q, 1),
            observation("scope-p1", &p, 2),
            observation("scope-q2", &q, 3),
        ],
    )
    .await;
    r.wait("p's event", 20, |n| events_total(n) >= 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let raw: String = r
        .got
        .lock()
        .unwrap()
        .iter()
        .chain(r2.got.lock().unwrap().iter())
        .map(|g| String::from_utf8_lossy(&g.body).into_owned())
        .collect();
    assert!(
        !raw.contains("scope-q") && !raw.contains(&format!("Patient/{q}")),
        "nothing about {q}"
    );
    assert_eq!(
        r.event_numbers(),
        [1],
        "the other patient's changes are not numbered"
    );
    assert_eq!(s.subscriptions.status_of(&id), Some((Status::Active, 1)));
    assert_eq!(s.subscriptions.status_of(&id2), Some((Status::Active, 0)));
    assert!(r2.of(NotificationType::EventNotification).is_empty());
    // One audit record per delivery: the creator, the endpoint's host and
    // path, the rows and patients sent; never the channel header.
    let records = crate::access::audit_records(&w).await;
    let text = serde_json::to_string(&records).unwrap();
    assert!(
        !text.contains(SECRET),
        "the channel headers are never audited"
    );
    let url = url::Url::parse(&r.url).unwrap();
    let path = format!("{}:{}/hook", url.host_str().unwrap(), url.port().unwrap());
    let deliveries: Vec<&atlas_audit::AuditEntry> = records
        .iter()
        .map(|x| &x.entry)
        .filter(|e| e.path == path && e.query.contains("event-notification"))
        .collect();
    assert_eq!(deliveries.len(), 1, "{deliveries:#?}");
    let d = deliveries[0];
    assert_eq!((d.method.as_str(), d.decision.as_str()), ("POST", "allow"));
    assert_eq!(d.subject.as_deref(), Some("pat-app"));
    assert_eq!(d.rows, Some(1));
    assert_eq!(d.patients, std::slice::from_ref(&p));
    assert_eq!(d.patient_binding.as_deref(), Some(p.as_str()));
    assert!(
        records
            .iter()
            .any(|x| x.entry.path == path && x.entry.query.contains("handshake"))
    );
}

/// Access: a grant that hides an element gets full resources without it,
/// and a filter on a hidden element never matches (it would tell the
/// element's value).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_hiding_an_element_gets_full_resources_without_it() {
    let w = world(4, None).await;
    let policy = format!(
        "{EVERYONE}[[rule]]\nid = \"no-values\"\neffect = \"deny\"\nhide = [\"Observation.valueQuantity\", \"Observation.category\"]\n"
    );
    let s = server(&w, &policy, |_| {}).await;
    let r = Receiver::start().await;
    let r2 = Receiver::start().await;
    let token = jwt(json!({"sub": "alice"}));
    created(&s, &token, &subscription(&r.url, "full-resource", &[])).await;
    created(
        &s,
        &token,
        &subscription(&r2.url, "id-only", &["Observation?category=vital-signs"]),
    )
    .await;
    let (p, _) = patients(&w);
    ingest(
        &w.lake,
        &w.dir,
        "a.ndjson",
        &[observation("hidden-1", &p, 70)],
    )
    .await;
    let got = r.wait("an event", 20, |n| events_total(n) >= 1).await;
    let n = got
        .iter()
        .find(|n| n.status.kind == NotificationType::EventNotification)
        .unwrap();
    let res = n.entries[0].resource_json().unwrap();
    assert_eq!(res["id"], "hidden-1");
    assert!(
        res.get("valueQuantity").is_none() && res.get("category").is_none(),
        "{res}"
    );
    assert_eq!(res["code"]["coding"][0]["code"], "8867-4");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        r2.of(NotificationType::EventNotification).is_empty(),
        "a filter on a hidden element never matches"
    );
}

/// Subscriptions live in the lake: after a restart they resume where they
/// stopped (changes made while the server was down included), with their
/// counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_survive_a_restart_and_catch_up() {
    let w = world(4, None).await;
    let r = Receiver::start().await;
    let token = jwt(json!({"sub": "alice"}));
    let (p, _) = patients(&w);
    let id = {
        let s = server(&w, EVERYONE, |_| {}).await;
        let id = created(&s, &token, &subscription(&r.url, "id-only", &[])).await;
        ingest(
            &w.lake,
            &w.dir,
            "a.ndjson",
            &[observation("restart-1", &p, 1)],
        )
        .await;
        r.wait("the first event", 20, |n| events_total(n) >= 1)
            .await;
        id
    };
    // Give the dropped server's task time to see it is gone.
    tokio::time::sleep(Duration::from_millis(300)).await;
    ingest(
        &w.lake,
        &w.dir,
        "b.ndjson",
        &[observation("restart-2", &p, 2)],
    )
    .await;
    let s = server(&w, EVERYONE, |_| {}).await;
    assert_eq!(
        s.subscriptions.status_of(&id).map(|x| x.0),
        Some(Status::Active)
    );
    r.wait("the event made while down", 20, |n| events_total(n) >= 2)
        .await;
    assert_eq!(r.event_numbers(), [1, 2]);
    let (st, j) = call_json(
        &s,
        "GET",
        &format!("/fhir/Subscription/{id}"),
        &token,
        None,
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(j["status"], "active");
    // Deleted: gone from the lake too, and nothing more is sent.
    let (st, _) = call(
        &s,
        "DELETE",
        &format!("/fhir/Subscription/{id}"),
        &token,
        None,
        None,
    )
    .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, _) = call(
        &s,
        "GET",
        &format!("/fhir/Subscription/{id}"),
        &token,
        None,
        None,
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert!(
        !w.dir
            .join(format!("lake/events/subscriptions/{id}.json"))
            .exists()
    );
    ingest(
        &w.lake,
        &w.dir,
        "c.ndjson",
        &[observation("restart-3", &p, 3)],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(r.event_numbers(), [1, 2]);
}

/// Only the owner sees, changes or deletes a subscription; others get 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_belong_to_their_creator() {
    let w = world(4, None).await;
    let s = server(&w, EVERYONE, |c| c.subscriptions.max_per_principal = 2).await;
    let r = Receiver::start().await;
    let alice = jwt(json!({"sub": "alice"}));
    let bob = jwt(json!({"sub": "bob"}));
    let id = created(&s, &alice, &subscription(&r.url, "id-only", &[])).await;
    let uri = format!("/fhir/Subscription/{id}");
    for (method, body) in [
        ("GET", None),
        ("PUT", Some(subscription(&r.url, "empty", &[]))),
        ("DELETE", None),
    ] {
        let (st, _) = call(&s, method, &uri, &bob, None, body.as_ref()).await;
        assert_eq!(st, StatusCode::NOT_FOUND, "{method}");
    }
    let (_, list) = call_json(&s, "GET", "/fhir/Subscription", &bob, None, None).await;
    assert_eq!(list["total"], 0);
    let (_, list) = call_json(
        &s,
        "GET",
        "/fhir/Subscription?status=active",
        &alice,
        None,
        None,
    )
    .await;
    assert_eq!(list["total"], 1);
    assert!(!list.to_string().contains(SECRET));
    // Off on request: no handshake, no task; the limit per principal holds.
    let mut off = subscription(&r.url, "id-only", &[]);
    off["status"] = json!("off");
    let (st, j) = create(&s, &alice, &off).await;
    assert_eq!(
        (st, j["status"].as_str()),
        (StatusCode::CREATED, Some("off"))
    );
    let (st, oo) = create(&s, &alice, &subscription(&r.url, "id-only", &[])).await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{oo}");
    assert_eq!(r.of(NotificationType::Handshake).len(), 1);
    // An update with a body of another id is refused.
    let mut other = subscription(&r.url, "empty", &[]);
    other["id"] = json!("not-it");
    let (st, _) = call(&s, "PUT", &uri, &alice, None, Some(&other)).await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
}

/// `[subscriptions]` keys parse (unknown ones are refused, naming them),
/// and a topic type Atlas has no topic for stops the server at start.
#[tokio::test]
async fn subscriptions_configuration_is_checked() {
    let c = ServeConfig::from_toml(
        "[subscriptions]\ntopic_types = [\"Observation\", \"Condition\"]\nallow_http = true\n\
         min_heartbeat_secs = 5\ndefault_max_count = 50\nmax_max_count = 100\nretry_attempts = 2\n\
         events_kept = 10\nmax_per_principal = 3\nprivate_endpoints = true\n",
    )
    .unwrap();
    assert_eq!(c.subscriptions.topic_types, ["Observation", "Condition"]);
    assert!(c.subscriptions.allow_http && c.subscriptions.private_endpoints);
    assert!(!ServeConfig::default().subscriptions.private_endpoints);
    let e = ServeConfig::from_toml("[subscriptions]\nbogus = 1\n").unwrap_err();
    assert!(e.contains("bogus"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::open(
        dir.path().join("lake").to_str().unwrap(),
        Default::default(),
    )
    .unwrap();
    for (toml, says) in [
        (
            "[subscriptions]\ntopic_types = [\"Organization\"]\n",
            "Organization",
        ),
        (
            "[subscriptions]\ndefault_max_count = 10\nmax_max_count = 5\n",
            "default_max_count",
        ),
    ] {
        let c = ServeConfig::from_toml(toml).unwrap();
        let e = AppState::open(lake.clone(), atlas_ontology::Ontology::builtin(), c)
            .await
            .err()
            .unwrap();
        assert!(e.contains(says), "{e}");
    }
    // Off: the routes say so.
    let mut c = ServeConfig::default();
    c.subscriptions.enabled = false;
    let s = AppState::open(lake, atlas_ontology::Ontology::builtin(), c)
        .await
        .unwrap();
    let (st, oo) = call_json(&s, "GET", "/fhir/Subscription", "x", None, None).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{oo}");
}

/// With the default `[subscriptions] private_endpoints = false`, an
/// endpoint on this machine or the private network is refused (422 naming
/// `channel.endpoint`), and nothing is sent there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_endpoints_are_refused_by_default() {
    let w = world(4, None).await;
    let s = server(&w, EVERYONE, |c| c.subscriptions.private_endpoints = false).await;
    let r = Receiver::start().await;
    let token = jwt(json!({"sub": "alice"}));
    let port = r.url.rsplit(':').next().unwrap().trim_end_matches("/hook");
    for endpoint in [
        r.url.clone(),
        format!("http://localhost:{port}/hook"),
        "https://10.0.0.7/hook".to_owned(),
        "https://169.254.169.254/latest".to_owned(),
        "https://[fd00::1]/hook".to_owned(),
    ] {
        let (st, oo) = create(&s, &token, &subscription(&endpoint, "id-only", &[])).await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{endpoint}: {oo}");
        assert_eq!(oo["resourceType"], "OperationOutcome");
        let named = oo["issue"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["expression"][0] == "Subscription.channel.endpoint");
        assert!(named, "{endpoint}: {oo}");
    }
    assert!(r.got.lock().unwrap().is_empty(), "nothing was sent");
    let (_, list) = call_json(&s, "GET", "/fhir/Subscription", &token, None, None).await;
    assert_eq!(list["total"], 0);
}

/// An update that stops a task in the middle of a notification leaves the
/// changes it carried owed: the new task sends them (the old one neither
/// marks them processed nor overwrites the state the update set).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_during_a_delivery_loses_no_event() {
    let w = world(4, None).await;
    let s = server(&w, EVERYONE, |_| {}).await;
    let r = Receiver::start().await;
    let token = jwt(json!({"sub": "alice"}));
    let (p1, _) = patients(&w);
    let body = subscription(&r.url, "id-only", &[]);
    let id = created(&s, &token, &body).await;
    r.stall_events.store(1, Ordering::Release);
    ingest(
        &w.lake,
        &w.dir,
        "cut.ndjson",
        &[observation("obs-cut", &p1, 70)],
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while r.stalled.load(Ordering::Acquire) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no notification started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The POST is in flight: the update stops the task that sends it.
    let mut again = body.clone();
    again["id"] = json!(id);
    let (st, j) = call_json(
        &s,
        "PUT",
        &format!("/fhir/Subscription/{id}"),
        &token,
        None,
        Some(&again),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{j}");
    let got = r
        .wait("the cut notification sent again", 15, |n| {
            events_total(n) >= 1
        })
        .await;
    let focus: Vec<String> = got
        .iter()
        .filter(|n| n.status.kind == NotificationType::EventNotification)
        .flat_map(|n| n.status.events.iter().filter_map(|e| e.focus.clone()))
        .collect();
    assert!(
        focus.iter().any(|f| f.ends_with("Observation/obs-cut")),
        "{focus:?}"
    );
}

/// A `PUT` racing a `DELETE` (the update handshaking while the delete
/// goes through) leaves no delivery task behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_racing_a_delete_leaves_no_task() {
    let w = world(4, None).await;
    let s = server(&w, EVERYONE, |_| {}).await;
    let r = Receiver::start().await;
    let token = jwt(json!({"sub": "alice"}));
    let mut body = subscription(&r.url, "id-only", &[]);
    body["channel"]["extension"] = json!([{"url": HEARTBEAT, "valueUnsignedInt": 1}]);
    let id = created(&s, &token, &body).await;
    r.slow_handshakes.store(1, Ordering::Release);
    let mut again = body.clone();
    again["id"] = json!(id);
    let put = {
        let (s, token, id) = (s.clone(), token.clone(), id.clone());
        tokio::spawn(async move {
            call_json(
                &s,
                "PUT",
                &format!("/fhir/Subscription/{id}"),
                &token,
                None,
                Some(&again),
            )
            .await
        })
    };
    // The update is in its (slow) handshake.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (st, _) = call(
        &s,
        "DELETE",
        &format!("/fhir/Subscription/{id}"),
        &token,
        None,
        None,
    )
    .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, j) = put.await.unwrap();
    assert_eq!(st, StatusCode::NOT_FOUND, "{j}");
    let before = r.got.lock().unwrap().len();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after = r.got.lock().unwrap().len();
    assert_eq!(before, after, "a deleted subscription sent heartbeats");
    assert_eq!(s.subscriptions.status_of(&id), None);
}

const DEID: &str =
    "[[rule]]\nid = \"registry\"\neffect = \"allow\"\ndeid = \"safe-harbor-minimal\"\n";

/// Under a de-identifying grant (focus ids hashed), a filter on ids or
/// references (`_id`, `patient`, `subject`) would link real ids to the
/// hashed ones: refused at create, naming the filter; code and status
/// filters are fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deidentifying_grants_cannot_filter_by_id_or_reference() {
    let w = world(4, None).await;
    let key_file = w.dir.join("subs-deid.key");
    std::fs::write(&key_file, "subs-deid-key\n").unwrap();
    let s = server(&w, DEID, |c| c.deid.key_file = Some(key_file.clone())).await;
    let r = Receiver::start().await;
    let token = jwt(json!({"sub": "alice"}));
    let (p1, _) = patients(&w);
    let by_patient = format!("Observation?patient=Patient/{p1}");
    let by_subject = format!("Observation?subject=Patient/{p1}");
    for (filters, n) in [
        (vec![by_patient.as_str()], 0),
        (vec!["Observation?code=8867-4", by_subject.as_str()], 1),
        (vec!["Observation?_id=obs-1"], 0),
    ] {
        let (st, oo) = create(&s, &token, &subscription(&r.url, "id-only", &filters)).await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{filters:?}: {oo}");
        let element = format!("Subscription.criteria.extension:filterCriteria[{n}]");
        let named = oo["issue"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["expression"][0] == element.as_str());
        assert!(named, "{filters:?}: {oo}");
    }
    created(
        &s,
        &token,
        &subscription(&r.url, "id-only", &["Observation?code=8867-4&status=final"]),
    )
    .await;
}

/// A subscription made before the policy turned de-identifying: its
/// `patient` filter never matches any more, while a code filter still
/// does (decided per delivery, as policies reload).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reference_filter_never_matches_once_the_grant_deidentifies() {
    let w = world(4, None).await;
    let key_file = w.dir.join("subs-deid2.key");
    std::fs::write(&key_file, "subs-deid-key\n").unwrap();
    let mut policy = None;
    let s = server(&w, EVERYONE, |c| {
        c.deid.key_file = Some(key_file.clone());
        c.policy.refresh_secs = 1;
        policy = c.policy.file.clone();
    })
    .await;
    let policy = policy.unwrap();
    let (by_patient, by_code) = (Receiver::start().await, Receiver::start().await);
    let token = jwt(json!({"sub": "alice"}));
    let (p1, _) = patients(&w);
    let filter = format!("Observation?patient=Patient/{p1}");
    created(
        &s,
        &token,
        &subscription(&by_patient.url, "id-only", &[filter.as_str()]),
    )
    .await;
    created(
        &s,
        &token,
        &subscription(&by_code.url, "id-only", &["Observation?code=8867-4"]),
    )
    .await;
    std::fs::write(&policy, DEID).unwrap();
    // Reloaded: FHIR search by patient is refused under the new grant.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (st, _) = call(
            &s,
            "GET",
            &format!("/fhir/Observation?patient={p1}"),
            &token,
            None,
            None,
        )
        .await;
        if st == StatusCode::FORBIDDEN {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "policy not reloaded"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ingest(
        &w.lake,
        &w.dir,
        "deid.ndjson",
        &[observation("obs-deid", &p1, 71)],
    )
    .await;
    let got = by_code
        .wait("the code filter", 15, |n| events_total(n) >= 1)
        .await;
    let focus: Vec<String> = got
        .iter()
        .flat_map(|n| n.status.events.iter().filter_map(|e| e.focus.clone()))
        .collect();
    assert!(
        !focus.iter().any(|f| f.ends_with("/obs-deid")),
        "the focus id is hashed: {focus:?}"
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        events_total(&by_patient.taken()),
        0,
        "a patient filter matched under a de-identifying grant"
    );
}
