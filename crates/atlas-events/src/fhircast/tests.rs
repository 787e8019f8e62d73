//! Unit tests of the FHIRcast protocol and hub (the conformance examples
//! are in `tests/it/fhircast.rs`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use super::*;

// ---------------------------------------------------------------- names

#[test]
fn event_names_are_case_insensitive() {
    for (given, canonical) in [
        ("Patient-open", "Patient-open"),
        ("patient-open", "Patient-open"),
        ("PATIENT-OPEN", "Patient-open"),
        ("encounter-Close", "Encounter-close"),
        ("imagingstudy-open", "ImagingStudy-open"),
        ("diagnosticreport-UPDATE", "DiagnosticReport-update"),
        ("DiagnosticReport-select", "DiagnosticReport-select"),
        ("syncerror", "SyncError"),
        ("SYNCERROR", "SyncError"),
        ("userLogout", "UserLogout"),
        ("userHibernate", "UserHibernate"),
        ("home-open", "Home-open"),
    ] {
        let e = EventName::parse(given).unwrap_or_else(|e| panic!("{given}: {e}"));
        assert_eq!(e.to_string(), canonical, "{given}");
        assert_eq!(e, EventName::parse(canonical).unwrap());
    }
    for bad in [
        "Patient",
        "Patient_open",
        "Patient-opened",
        "-open",
        "Pa tient-open",
        "",
    ] {
        assert!(
            matches!(EventName::parse(bad), Err(EventError::Malformed(_))),
            "{bad:?}"
        );
    }
    // Well formed, but not in the catalog: refused, not forwarded blind.
    for unsupported in [
        "Observation-open",
        "Patient-update",
        "com.example.researchstudy-transmogrify",
        "org.example.patient_transmogrify",
    ] {
        assert!(
            matches!(
                EventName::parse(unsupported),
                Err(EventError::Unsupported(_))
            ),
            "{unsupported}"
        );
    }
    assert_eq!(EventName::all().len(), SUPPORTED.len());
}

#[test]
fn required_context_keys_per_event() {
    let keys = |n: &str| EventName::parse(n).unwrap().required_keys().to_vec();
    assert_eq!(keys("Patient-open"), ["patient"]);
    assert_eq!(keys("Encounter-open"), ["encounter", "patient"]);
    assert_eq!(keys("ImagingStudy-open"), ["study"]);
    assert_eq!(keys("DiagnosticReport-open"), ["report", "patient"]);
    assert_eq!(keys("DiagnosticReport-update"), ["report", "updates"]);
    assert_eq!(keys("DiagnosticReport-select"), ["report"]);
    assert_eq!(keys("SyncError"), ["operationoutcome"]);
    let n = notification("t", "Encounter-open", vec![patient_item("p1")]);
    let e = Hub::check(&n).unwrap_err();
    assert!(e.to_string().contains("\"encounter\""), "{e}");
}

#[test]
fn wildcards_and_scopes() {
    let all = EventName::all();
    let names = |p: &str| -> Vec<String> {
        let p = EventPattern::parse(p).unwrap();
        all.iter()
            .filter(|e| p.matches(e))
            .map(ToString::to_string)
            .collect()
    };
    assert_eq!(names("*").len(), SUPPORTED.len());
    assert_eq!(
        names("*-*").len(),
        10,
        "every context event, no infrastructure"
    );
    assert_eq!(names("patient-*"), ["Patient-open", "Patient-close"]);
    assert_eq!(names("*-update"), ["DiagnosticReport-update"]);
    assert_eq!(names("*-select"), ["DiagnosticReport-select"]);
    assert!(EventPattern::parse("Observation-*").is_err());
    assert!(EventPattern::parse("*-opened").is_err());
    assert_eq!(
        EventPattern::parse_list("Patient-open,patient-OPEN, Patient-close")
            .unwrap()
            .len(),
        2
    );

    let s = FhircastScopes::from_scopes(&[
        "patient/*.rs",
        "fhircast/Patient-open.read",
        "fhircast/patient-close.read",
        "fhircast/DiagnosticReport-*.write",
        "fhircast/nonsense",
    ]);
    let e = |n: &str| EventName::parse(n).unwrap();
    assert!(s.can_read(&e("Patient-open")) && s.can_read(&e("patient-close")));
    assert!(!s.can_read(&e("Encounter-open")));
    assert!(s.can_write(&e("DiagnosticReport-update")));
    assert!(!s.can_write(&e("Patient-open")));
    // A wildcard request is narrowed to what the scopes allow.
    let granted = s.grant_read(&EventPattern::parse_list("*").unwrap());
    assert_eq!(event::events_text(&granted), "Patient-open,Patient-close");
    let star = FhircastScopes::from_scopes(&["fhircast/*.read"]);
    let granted = star.grant_read(&EventPattern::parse_list("Patient-*,SyncError").unwrap());
    assert_eq!(event::events_text(&granted), "Patient-*,SyncError");
    assert!(FhircastScopes::from_scopes(&["fhircast/*.*"]).can_write(&e("SyncError")));
    assert!(!FhircastScopes::from_scopes(&["user/*.rs"]).reads_any());
}

#[test]
fn subscription_forms_are_checked_parameter_by_parameter() {
    let ok = SubscriptionRequest::from_form(
        b"hub.channel.type=websocket&hub.mode=subscribe&hub.topic=t1&hub.events=Patient-open&hub.lease_seconds=60&subscriber.name=Viewer",
    )
    .unwrap();
    assert_eq!(ok.mode, Mode::Subscribe);
    assert_eq!(ok.lease_seconds, Some(60));
    assert_eq!(ok.subscriber_name.as_deref(), Some("Viewer"));
    assert_eq!(
        SubscriptionRequest::from_form(ok.to_form().as_bytes()).unwrap(),
        ok
    );
    for (body, param) in [
        (
            "hub.mode=subscribe&hub.topic=t&hub.events=Patient-open",
            "hub.channel.type",
        ),
        (
            "hub.channel.type=webhook&hub.mode=subscribe&hub.topic=t&hub.events=Patient-open",
            "hub.channel.type",
        ),
        (
            "hub.channel.type=websocket&hub.callback=https://x&hub.mode=subscribe&hub.topic=t&hub.events=Patient-open",
            "hub.callback",
        ),
        (
            "hub.channel.type=websocket&hub.mode=subscribe&hub.topic=t",
            "hub.events",
        ),
        (
            "hub.channel.type=websocket&hub.mode=subscribe&hub.topic=t&hub.events=a&hub.events=b",
            "hub.events",
        ),
        (
            "hub.channel.type=websocket&hub.mode=unsubscribe&hub.topic=t&hub.events=Patient-open&hub.channel.endpoint=x",
            "hub.events",
        ),
        (
            "hub.channel.type=websocket&hub.mode=unsubscribe&hub.topic=t",
            "hub.channel.endpoint",
        ),
        (
            "hub.channel.type=websocket&hub.mode=publish&hub.topic=t",
            "hub.mode",
        ),
        (
            "hub.channel.type=websocket&hub.mode=subscribe&hub.topic=a/b&hub.events=Patient-open",
            "hub.topic",
        ),
        (
            "hub.channel.type=websocket&hub.mode=subscribe&hub.topic=t&hub.events=Patient-open&hub.lease_seconds=-5",
            "hub.lease_seconds",
        ),
        (
            "hub.channel.type=websocket&hub.mode=subscribe&hub.topic=t&hub.events=Patient-open&hub.lease_seconds=0",
            "hub.lease_seconds",
        ),
    ] {
        let e = SubscriptionRequest::from_form(body.as_bytes()).unwrap_err();
        assert_eq!(e.param, param, "{body}: {e}");
    }
}

#[test]
fn acks_accept_numbers_and_strings() {
    let a: Ack = serde_json::from_str(r#"{"id":"x","status":"200"}"#).unwrap();
    assert!(a.status.is_success());
    let a: Ack = serde_json::from_str(r#"{"id":"x","status":202}"#).unwrap();
    assert!(a.status.is_success());
    for bad in [
        r#"{"id":"x","status":409}"#,
        r#"{"id":"x","status":"500"}"#,
        r#"{"id":"x","status":"ok"}"#,
    ] {
        let a: Ack = serde_json::from_str(bad).unwrap();
        assert!(!a.status.is_success(), "{bad}");
    }
    assert!(serde_json::from_str::<Ack>(r#"{"id":"x"}"#).is_err());
}

// ---------------------------------------------------------------- hub

/// What an observer saw.
#[derive(Default)]
struct Seen {
    emitted: Mutex<Vec<Emitted>>,
    notes: Mutex<Vec<SubscriptionNote>>,
}

impl HubObserver for Seen {
    fn emitted(&self, e: &Emitted) {
        self.emitted.lock().unwrap().push(e.clone());
    }
    fn subscription(&self, n: &SubscriptionNote) {
        self.notes.lock().unwrap().push(n.clone());
    }
}

fn counter_ids() -> impl Fn() -> String + Send + Sync {
    let n = std::sync::atomic::AtomicU64::new(0);
    move || {
        format!(
            "v{}",
            n.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
        )
    }
}

/// A clock the tests move by hand.
#[derive(Clone)]
struct Clock(Arc<Mutex<std::time::Instant>>);

impl Clock {
    fn advance(&self, d: Duration) {
        *self.0.lock().unwrap() += d;
    }
}

thread_local! {
    static CLOCK: Clock = Clock(Arc::new(Mutex::new(std::time::Instant::now())));
}

/// This test's clock (each test runs on its own thread).
fn clock() -> Clock {
    CLOCK.with(Clock::clone)
}

fn hub_with(settings: HubSettings) -> (Arc<Hub>, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let c = clock();
    let hub = Hub::new(settings)
        .with_observer(seen.clone())
        .with_version_ids(counter_ids())
        .with_clock(move || *c.0.lock().unwrap());
    (Arc::new(hub), seen)
}

fn hub() -> (Arc<Hub>, Arc<Seen>) {
    hub_with(HubSettings::default())
}

fn owner(sub: &str) -> Owner {
    Owner {
        issuer: "iss".into(),
        subject: sub.into(),
        client: Some(format!("app-{sub}")),
    }
}

fn admit_all() -> Admit {
    Arc::new(|_: &[String], t: &Arc<str>| Some(t.clone()))
}

/// Subscribes and connects; returns the connection with its
/// confirmation already read.
fn join(hub: &Hub, topic: &str, events: &str, who: &str, admit: Admit) -> Connection {
    let s = hub
        .subscribe(NewSubscription {
            topic: topic.into(),
            events: EventPattern::parse_list(events).unwrap(),
            lease: Duration::from_secs(600),
            name: Some(who.into()),
            owner: owner(who),
            admit,
            endpoint: None,
        })
        .unwrap();
    let mut c = hub.connect(&s.endpoint).unwrap();
    let first = next(&mut c).expect("a confirmation");
    let conf: SubscriptionConfirmation = serde_json::from_value(first).unwrap();
    assert_eq!(conf.mode, "subscribe");
    assert_eq!(conf.topic, topic);
    c
}

fn next(c: &mut Connection) -> Option<Value> {
    c.messages
        .try_recv()
        .ok()
        .map(|t| serde_json::from_str(&t).unwrap())
}

fn drain(c: &mut Connection) -> Vec<Value> {
    std::iter::from_fn(|| next(c)).collect()
}

fn patient_item(id: &str) -> ContextItem {
    ContextItem::resource("patient", json!({"resourceType": "Patient", "id": id}))
}

fn notification(topic: &str, event: &str, context: Vec<ContextItem>) -> Notification {
    Notification {
        timestamp: "2024-01-01T00:00:00Z".into(),
        id: uuid::Uuid::new_v4().to_string(),
        event: Event {
            topic: topic.into(),
            event: event.into(),
            version_id: None,
            prior_version_id: None,
            context,
        },
    }
}

fn report_items(report: &str, patient: &str) -> Vec<ContextItem> {
    vec![
        ContextItem::resource(
            "report",
            json!({"resourceType": "DiagnosticReport", "id": report,
                   "subject": {"reference": format!("Patient/{patient}")}}),
        ),
        patient_item(patient),
    ]
}

fn update(topic: &str, report: &str, version: Option<&str>, entries: Value) -> Notification {
    let mut n = notification(
        topic,
        "DiagnosticReport-update",
        vec![
            ContextItem {
                key: "report".into(),
                resource: None,
                reference: Some(json!({"reference": format!("DiagnosticReport/{report}")})),
                data: None,
            },
            ContextItem::resource(
                "updates",
                json!({"resourceType": "Bundle", "id": "b1", "type": "transaction", "entry": entries}),
            ),
        ],
    );
    n.event.version_id = version.map(str::to_owned);
    n
}

#[tokio::test]
async fn a_publication_reaches_subscribers_with_the_senders_id() {
    let (hub, seen) = hub();
    let mut a = join(&hub, "t", "Patient-open,Patient-close", "a", admit_all());
    let mut b = join(&hub, "t", "patient-OPEN", "b", admit_all());
    let mut other_topic = join(&hub, "u", "*", "c", admit_all());
    let n = notification("t", "patient-open", vec![patient_item("p1")]);
    let id = n.id.clone();
    let p = hub.publish(n, owner("a")).unwrap();
    assert_eq!(p.delivered, 2);
    assert_eq!(p.patients, ["p1"]);
    for c in [&mut a, &mut b] {
        let got = drain(c);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["id"], id.as_str(), "the request's id is reused");
        assert_eq!(got[0]["event"]["hub.event"], "patient-open", "as sent");
        assert_eq!(got[0]["event"]["context.versionId"], "v1");
    }
    assert!(drain(&mut other_topic).is_empty());
    let emitted = seen.emitted.lock().unwrap().clone();
    assert_eq!(emitted.len(), 1);
    assert_eq!(emitted[0].delivered, 2);
    assert_eq!(emitted[0].event.to_string(), "Patient-open");
    assert_eq!(emitted[0].publisher, Some(owner("a")));
    // Acknowledged: nothing left to time out.
    hub.ack(&a.endpoint, &Ack::new(&id, 200));
    hub.ack(&b.endpoint, &Ack::new(&id, 202));
    clock().advance(Duration::from_secs(11));
    hub.sweep();
    assert_eq!(hub.connected(), 3);
    assert_eq!(seen.emitted.lock().unwrap().len(), 1, "no SyncError");
}

#[tokio::test]
async fn version_ids_chain_through_open_and_updates() {
    let (hub, _) = hub();
    let mut a = join(&hub, "t", "DiagnosticReport-*", "a", admit_all());
    hub.publish(
        notification("t", "DiagnosticReport-open", report_items("r1", "p1")),
        owner("a"),
    )
    .unwrap();
    let open = drain(&mut a).remove(0);
    assert_eq!(open["event"]["context.versionId"], "v1");
    assert!(open["event"].get("context.priorVersionId").is_none());

    let add = json!([{"request": {"method": "PUT"},
                      "resource": {"resourceType": "Observation", "id": "o1", "status": "preliminary"}}]);
    let p = hub
        .publish(update("t", "r1", Some("v1"), add.clone()), owner("a"))
        .unwrap();
    assert_eq!(p.version_id.as_deref(), Some("v2"));
    assert_eq!(p.patients, ["p1"], "the anchor's patient");
    let upd = drain(&mut a).remove(0);
    assert_eq!(upd["event"]["context.versionId"], "v2");
    assert_eq!(upd["event"]["context.priorVersionId"], "v1");
    assert_eq!(
        upd["event"]["context"][1]["resource"]["id"], "b1",
        "the Bundle id is kept"
    );

    // A stale version is refused, and changes nothing.
    let e = hub
        .publish(update("t", "r1", Some("v1"), add.clone()), owner("a"))
        .unwrap_err();
    assert!(
        matches!(&e, HubError::Conflict { param, .. } if param == "context.versionId"),
        "{e}"
    );
    let e = hub
        .publish(update("t", "r1", None, add.clone()), owner("a"))
        .unwrap_err();
    assert!(
        matches!(&e, HubError::Invalid { param, .. } if param == "context.versionId"),
        "{e}"
    );
    assert!(drain(&mut a).is_empty());

    let (cur, patients) = hub.current_context("t");
    assert_eq!(cur.context_type, "DiagnosticReport");
    assert_eq!(cur.version_id.as_deref(), Some("v2"));
    assert_eq!(patients, ["p1"]);
    let content = cur.context.iter().find(|c| c.key == "content").unwrap();
    let bundle = content.resource.as_ref().unwrap();
    assert_eq!(bundle["type"], "collection");
    assert_eq!(bundle["entry"][0]["resource"]["id"], "o1");
    assert!(bundle["entry"][0].get("request").is_none());

    // Replace, then delete.
    let put = json!([{"request": {"method": "PUT"},
                      "resource": {"resourceType": "Observation", "id": "o1", "status": "final"}}]);
    hub.publish(update("t", "r1", Some("v2"), put), owner("a"))
        .unwrap();
    let (cur, _) = hub.current_context("t");
    let bundle = cur.context.last().unwrap().resource.clone().unwrap();
    assert_eq!(bundle["entry"].as_array().unwrap().len(), 1);
    assert_eq!(bundle["entry"][0]["resource"]["status"], "final");
    let del = json!([{"fullUrl": "Observation/o1", "request": {"method": "DELETE"}}]);
    let p = hub
        .publish(update("t", "r1", Some("v3"), del), owner("a"))
        .unwrap();
    assert_eq!(p.version_id.as_deref(), Some("v4"));
    let (cur, _) = hub.current_context("t");
    assert_eq!(
        cur.context.last().unwrap().resource.as_ref().unwrap()["entry"],
        json!([])
    );

    // Closing the report disposes of its content; the context is empty.
    hub.publish(
        notification("t", "DiagnosticReport-close", report_items("r1", "p1")),
        owner("a"),
    )
    .unwrap();
    let (cur, _) = hub.current_context("t");
    assert_eq!(cur, CurrentContext::empty());
}

#[tokio::test]
async fn updates_are_atomic_and_name_the_open_anchor() {
    let (hub, _) = hub();
    let e = hub
        .publish(update("t", "r1", Some("v1"), json!([])), owner("a"))
        .unwrap_err();
    assert!(
        matches!(e, HubError::Conflict { .. }),
        "nothing is open: {e}"
    );
    hub.publish(
        notification("t", "DiagnosticReport-open", report_items("r1", "p1")),
        owner("a"),
    )
    .unwrap();
    let e = hub
        .publish(update("t", "r2", Some("v1"), json!([])), owner("a"))
        .unwrap_err();
    assert!(
        matches!(e, HubError::Conflict { .. }),
        "another report: {e}"
    );
    // One good entry and one bad: neither is applied.
    let mixed = json!([
        {"request": {"method": "PUT"}, "resource": {"resourceType": "Observation", "id": "o1"}},
        {"request": {"method": "PATCH"}, "resource": {"resourceType": "Observation", "id": "o2"}}
    ]);
    let e = hub
        .publish(update("t", "r1", Some("v1"), mixed), owner("a"))
        .unwrap_err();
    assert!(
        matches!(&e, HubError::Invalid { param, .. } if param == "updates"),
        "{e}"
    );
    let twice = json!([
        {"request": {"method": "PUT"}, "resource": {"resourceType": "Observation", "id": "o1"}},
        {"fullUrl": "Observation/o1", "request": {"method": "DELETE"}}
    ]);
    let e = hub
        .publish(update("t", "r1", Some("v1"), twice), owner("a"))
        .unwrap_err();
    assert!(e.to_string().contains("more than once"), "{e}");
    let (cur, _) = hub.current_context("t");
    assert_eq!(cur.version_id.as_deref(), Some("v1"), "unchanged");
    assert_eq!(
        cur.context.last().unwrap().resource.as_ref().unwrap()["entry"],
        json!([])
    );
}

#[tokio::test]
async fn select_names_the_open_report_and_keeps_the_version() {
    let (hub, _) = hub();
    let select = |report: &str| {
        notification(
            "t",
            "DiagnosticReport-select",
            vec![
                ContextItem {
                    key: "report".into(),
                    resource: None,
                    reference: Some(json!({"reference": format!("DiagnosticReport/{report}")})),
                    data: None,
                },
                ContextItem {
                    key: "select".into(),
                    resource: None,
                    reference: Some(json!({"reference": "Observation/o1"})),
                    data: None,
                },
            ],
        )
    };
    assert!(matches!(
        hub.publish(select("r1"), owner("a")),
        Err(HubError::Conflict { .. })
    ));
    hub.publish(
        notification("t", "DiagnosticReport-open", report_items("r1", "p1")),
        owner("a"),
    )
    .unwrap();
    let mut a = join(&hub, "t", "DiagnosticReport-select", "a", admit_all());
    assert!(matches!(
        hub.publish(select("r9"), owner("a")),
        Err(HubError::Conflict { .. })
    ));
    let p = hub.publish(select("r1"), owner("a")).unwrap();
    assert_eq!(
        p.version_id.as_deref(),
        Some("v1"),
        "a selection is not a new version"
    );
    assert_eq!(
        p.patients,
        ["p1"],
        "the anchor's patient, though the select names none"
    );
    let got = drain(&mut a);
    assert_eq!(got.len(), 1);
    assert!(got[0]["event"].get("context.versionId").is_none());
}

#[tokio::test]
async fn contexts_follow_the_patient() {
    let (hub, _) = hub();
    let open = |event: &str, key: &str, t: &str, id: &str, patient: &str| {
        notification(
            "t",
            event,
            vec![
                ContextItem::resource(
                    key,
                    json!({"resourceType": t, "id": id,
                    "subject": {"reference": format!("Patient/{patient}")}}),
                ),
                patient_item(patient),
            ],
        )
    };
    hub.publish(
        notification("t", "Patient-open", vec![patient_item("p1")]),
        owner("a"),
    )
    .unwrap();
    hub.publish(
        open("Encounter-open", "encounter", "Encounter", "e1", "p1"),
        owner("a"),
    )
    .unwrap();
    assert_eq!(hub.current_context("t").0.context_type, "Encounter");
    // Closing the encounter returns to the patient.
    hub.publish(
        open("Encounter-close", "encounter", "Encounter", "e1", "p1"),
        owner("a"),
    )
    .unwrap();
    assert_eq!(hub.current_context("t").0.context_type, "Patient");
    // A close naming another encounter than the open one is refused.
    hub.publish(
        open("Encounter-open", "encounter", "Encounter", "e2", "p1"),
        owner("a"),
    )
    .unwrap();
    assert!(matches!(
        hub.publish(
            open("Encounter-close", "encounter", "Encounter", "e9", "p1"),
            owner("a")
        ),
        Err(HubError::Conflict { .. })
    ));
    // Another patient: p1's contexts are gone.
    hub.publish(
        notification("t", "Patient-open", vec![patient_item("p2")]),
        owner("a"),
    )
    .unwrap();
    let (cur, patients) = hub.current_context("t");
    assert_eq!(cur.context_type, "Patient");
    assert_eq!(patients, ["p2"]);
    let mut late = join(&hub, "t", "*", "late", admit_all());
    let replay = drain(&mut late);
    assert_eq!(replay.len(), 1, "only p2's context is replayed: {replay:?}");
    // Closing p2 closes what was open about them.
    hub.publish(
        open("Encounter-open", "encounter", "Encounter", "e3", "p2"),
        owner("a"),
    )
    .unwrap();
    hub.publish(
        notification("t", "Patient-close", vec![patient_item("p2")]),
        owner("a"),
    )
    .unwrap();
    assert_eq!(hub.current_context("t").0, CurrentContext::empty());
}

#[tokio::test]
async fn a_new_subscriber_gets_the_open_contexts_replayed() {
    let (hub, _) = hub();
    let n = notification("t", "Patient-open", vec![patient_item("p1")]);
    let id = n.id.clone();
    hub.publish(n, owner("a")).unwrap();
    hub.publish(
        notification("t", "DiagnosticReport-open", report_items("r1", "p1")),
        owner("a"),
    )
    .unwrap();
    let mut all = join(&hub, "t", "*", "all", admit_all());
    let got = drain(&mut all);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0]["id"], id.as_str(), "the original event, id and all");
    assert_eq!(
        got[1]["event"]["hub.event"], "DiagnosticReport-open",
        "current last"
    );
    // Only the events subscribed to.
    let mut patients_only = join(&hub, "t", "Patient-open", "po", admit_all());
    assert_eq!(drain(&mut patients_only).len(), 1);
    // Never a patient the subscriber may not see.
    let not_p1: Admit =
        Arc::new(|p: &[String], t: &Arc<str>| (!p.iter().any(|x| x == "p1")).then(|| t.clone()));
    let mut outsider = join(&hub, "t", "*", "out", not_p1);
    assert!(drain(&mut outsider).is_empty());
    // Replays wait for their acknowledgement like any event.
    clock().advance(Duration::from_secs(11));
    hub.sweep();
    assert_eq!(
        hub.connected(),
        1,
        "only the outsider, who was sent nothing, is left"
    );
}

#[tokio::test]
async fn events_about_a_patient_outside_the_scope_are_never_sent() {
    let (hub, seen) = hub();
    let only_p2: Admit =
        Arc::new(|p: &[String], t: &Arc<str>| p.iter().all(|x| x == "p2").then(|| t.clone()));
    let mut a = join(&hub, "t", "*", "a", only_p2);
    let mut b = join(&hub, "t", "*", "b", admit_all());
    let p = hub
        .publish(
            notification("t", "Patient-open", vec![patient_item("p1")]),
            owner("b"),
        )
        .unwrap();
    assert_eq!(p.delivered, 1);
    assert!(drain(&mut a).is_empty());
    assert_eq!(drain(&mut b).len(), 1);
    // A close naming only the encounter still carries p1 (from the open).
    let enc = ContextItem::resource(
        "encounter",
        json!({"resourceType": "Encounter", "id": "e1", "subject": {"reference": "Patient/p1"}}),
    );
    let mut n = notification("t", "Encounter-open", vec![enc.clone(), patient_item("p1")]);
    hub.publish(n.clone(), owner("b")).unwrap();
    n.event.event = "Encounter-close".into();
    n.id = "close-1".into();
    let p = hub.publish(n, owner("b")).unwrap();
    assert!(p.patients.contains(&"p1".to_owned()));
    assert!(drain(&mut a).is_empty());
    // Not sent, so not awaited: no SyncError about `a`.
    clock().advance(Duration::from_secs(11));
    hub.ack(&b.endpoint, &Ack::new("x", 200));
    hub.sweep();
    let about_a = seen
        .emitted
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.event == EventName::SyncError && e.notification.to_string().contains("\"a\""))
        .count();
    assert_eq!(about_a, 0);
}

/// The SyncError in `c`'s queue, if any.
fn sync_errors(c: &mut Connection) -> Vec<Value> {
    drain(c)
        .into_iter()
        .filter(|v| v["event"]["hub.event"] == "SyncError")
        .collect()
}

fn coding(v: &Value, system: &str) -> Option<String> {
    v["event"]["context"][0]["resource"]["issue"][0]["details"]["coding"]
        .as_array()?
        .iter()
        .find(|c| c["system"] == system)
        .and_then(|c| c["code"].as_str().map(str::to_owned))
}

#[tokio::test]
async fn ack_timeout_broadcasts_a_sync_error_and_unsubscribes() {
    let (hub, seen) = hub();
    let mut slow = join(&hub, "t", "Patient-open", "slow", admit_all());
    let mut fast = join(&hub, "t", "Patient-open,SyncError", "fast", admit_all());
    let mut deaf = join(&hub, "t", "Patient-open", "deaf", admit_all());
    let n = notification("t", "Patient-open", vec![patient_item("p1")]);
    let id = n.id.clone();
    hub.publish(n, owner("fast")).unwrap();
    drain(&mut slow);
    drain(&mut fast);
    drain(&mut deaf);
    hub.ack(&fast.endpoint, &Ack::new(&id, 200));
    hub.ack(&deaf.endpoint, &Ack::new(&id, 200));
    clock().advance(Duration::from_millis(9_900));
    hub.sweep();
    assert!(sync_errors(&mut fast).is_empty(), "not yet");
    clock().advance(Duration::from_millis(200));
    hub.sweep();
    let errors = sync_errors(&mut fast);
    assert_eq!(errors.len(), 1);
    let e = &errors[0];
    assert_eq!(
        coding(e, message::SYNCERROR_EVENT_ID).as_deref(),
        Some(id.as_str())
    );
    assert_eq!(
        coding(e, message::SYNCERROR_EVENT_NAME).as_deref(),
        Some("Patient-open")
    );
    assert_eq!(
        coding(e, message::SYNCERROR_SUBSCRIBER).as_deref(),
        Some("slow")
    );
    assert_eq!(
        e["event"]["context"][0]["resource"]["issue"][0]["severity"],
        "warning"
    );
    assert!(
        drain(&mut deaf).is_empty(),
        "deaf did not subscribe to SyncError"
    );
    // The unresponsive subscriber is unsubscribed: denial, then close.
    let closing = slow.closing.borrow().clone().expect("closed");
    assert_eq!(closing.code, 1008);
    let denial: SubscriptionDenial =
        serde_json::from_str(closing.denial.as_deref().unwrap()).unwrap();
    assert_eq!(denial.mode, "denied");
    assert_eq!(hub.connected(), 2);
    let notes = seen.notes.lock().unwrap().clone();
    assert!(
        notes
            .iter()
            .any(|n| n.ended == Some(EndReason::Unresponsive))
    );
}

#[tokio::test]
async fn a_refusing_ack_broadcasts_a_sync_error() {
    let (hub, _) = hub();
    let mut refuser = join(&hub, "t", "Patient-open", "refuser", admit_all());
    let mut other = join(&hub, "t", "*", "other", admit_all());
    let n = notification("t", "Patient-open", vec![patient_item("p1")]);
    let id = n.id.clone();
    hub.publish(n, owner("other")).unwrap();
    drain(&mut other);
    drain(&mut refuser);
    hub.ack(&refuser.endpoint, &Ack::new(&id, 409));
    let errors = sync_errors(&mut other);
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].to_string().contains("status 409"),
        "{}",
        errors[0]
    );
    assert!(sync_errors(&mut refuser).is_empty(), "not to the refuser");
    assert_eq!(hub.connected(), 2, "a refusal is not unresponsiveness");
}

#[tokio::test]
async fn close_codes_1000_and_1001_raise_no_sync_error() {
    for (code, expect) in [
        (Some(1000), false),
        (Some(1001), false),
        (Some(1006), true),
        (Some(1011), true),
        (Some(4000), true),
        (None, true),
    ] {
        let (hub, _) = hub();
        let leaving = join(&hub, "t", "Patient-open", "leaving", admit_all());
        let mut watcher = join(&hub, "t", "SyncError", "watcher", admit_all());
        hub.disconnected(&leaving.endpoint, code);
        let errors = sync_errors(&mut watcher);
        assert_eq!(
            !errors.is_empty(),
            expect,
            "close code {code:?}: {errors:?}"
        );
        assert_eq!(hub.subscriptions(), 1, "{code:?}: the subscription ended");
        assert!(
            leaving.closing.borrow().is_none(),
            "the subscriber closed itself"
        );
    }
}

#[tokio::test]
async fn a_lease_ends_with_a_denial_and_close() {
    let (hub, seen) = hub();
    let s = hub
        .subscribe(NewSubscription {
            topic: "t".into(),
            events: EventPattern::parse_list("Patient-open").unwrap(),
            lease: Duration::from_secs(5),
            name: None,
            owner: owner("a"),
            admit: admit_all(),
            endpoint: None,
        })
        .unwrap();
    assert_eq!(s.lease_seconds, 5);
    let mut c = hub.connect(&s.endpoint).unwrap();
    let conf: SubscriptionConfirmation = serde_json::from_value(next(&mut c).unwrap()).unwrap();
    assert_eq!(conf.lease_seconds, 5);
    clock().advance(Duration::from_secs(4));
    hub.sweep();
    assert!(c.closing.borrow().is_none());
    clock().advance(Duration::from_secs(1));
    hub.sweep();
    let closing = c.closing.borrow().clone().expect("closed at expiry");
    assert_eq!(closing.code, 1000);
    assert!(closing.denial.unwrap().contains("lease expired"));
    assert_eq!(hub.subscriptions(), 0);
    // Nothing reaches it any more.
    let p = hub
        .publish(
            notification("t", "Patient-open", vec![patient_item("p1")]),
            owner("a"),
        )
        .unwrap();
    assert_eq!(p.delivered, 0);
    let notes = seen.notes.lock().unwrap().clone();
    assert_eq!(notes.len(), 2);
    assert_eq!(notes[0].ended, None);
    assert_eq!(notes[1].ended, Some(EndReason::LeaseExpired));
    // A lease is never longer than the hub allows.
    let s = hub
        .subscribe(NewSubscription {
            topic: "t".into(),
            events: EventPattern::parse_list("Patient-open").unwrap(),
            lease: Duration::from_secs(86_400),
            name: None,
            owner: owner("a"),
            admit: admit_all(),
            endpoint: None,
        })
        .unwrap();
    assert_eq!(s.lease_seconds, 3600);
    // An endpoint connected after its lease is denied.
    clock().advance(Duration::from_secs(3601));
    assert!(matches!(hub.connect(&s.endpoint), Err(HubError::Denied(_))));
}

#[tokio::test]
async fn a_subscription_never_connected_does_not_hold_its_place() {
    let (hub, seen) = hub();
    let s = hub
        .subscribe(NewSubscription {
            topic: "t".into(),
            events: EventPattern::parse_list("Patient-open").unwrap(),
            lease: Duration::from_secs(600),
            name: None,
            owner: owner("a"),
            admit: admit_all(),
            endpoint: None,
        })
        .unwrap();
    clock().advance(Duration::from_secs(59));
    hub.sweep();
    assert!(hub.knows(&s.endpoint));
    clock().advance(Duration::from_secs(2));
    hub.sweep();
    assert!(!hub.knows(&s.endpoint));
    let notes = seen.notes.lock().unwrap().clone();
    assert_eq!(notes.last().unwrap().ended, Some(EndReason::NotConnected));
}

#[tokio::test]
async fn endpoints_are_single_use_and_unsubscribed_by_their_owner() {
    let (hub, _) = hub();
    let s = hub
        .subscribe(NewSubscription {
            topic: "t".into(),
            events: EventPattern::parse_list("Patient-open").unwrap(),
            lease: Duration::from_secs(60),
            name: None,
            owner: owner("a"),
            admit: admit_all(),
            endpoint: None,
        })
        .unwrap();
    assert_eq!(s.endpoint.len(), 68);
    assert!(s.endpoint.starts_with("eyJ"), "redacted like a token");
    let c = hub.connect(&s.endpoint).unwrap();
    match hub.connect(&s.endpoint) {
        Err(HubError::Denied(d)) => assert!(d.reason.unwrap().contains("already connected")),
        other => panic!("{:?}", other.err()),
    }
    assert!(matches!(
        hub.connect("nope"),
        Err(HubError::NotFound { .. })
    ));
    assert!(matches!(
        hub.unsubscribe("t", &s.endpoint, &owner("mallory")),
        Err(HubError::Forbidden { .. })
    ));
    assert!(matches!(
        hub.unsubscribe("other", &s.endpoint, &owner("a")),
        Err(HubError::Conflict { .. })
    ));
    hub.unsubscribe("t", &s.endpoint, &owner("a")).unwrap();
    let closing = c.closing.borrow().clone().unwrap();
    assert_eq!(closing.code, 1000);
    let d: SubscriptionDenial = serde_json::from_str(closing.denial.as_deref().unwrap()).unwrap();
    assert_eq!(d.topic, "t");
    assert_eq!(d.events, "Patient-open");
    assert!(!hub.knows(&s.endpoint));
}

#[tokio::test]
async fn resubscribing_replaces_the_events() {
    let (hub, _) = hub();
    let mut c = join(&hub, "t", "Patient-open", "a", admit_all());
    hub.subscribe(NewSubscription {
        topic: "t".into(),
        events: EventPattern::parse_list("Encounter-open").unwrap(),
        lease: Duration::from_secs(60),
        name: None,
        owner: owner("a"),
        admit: admit_all(),
        endpoint: Some(c.endpoint.clone()),
    })
    .unwrap();
    let conf: SubscriptionConfirmation = serde_json::from_value(next(&mut c).unwrap()).unwrap();
    assert_eq!(conf.events, "Encounter-open");
    let p = hub
        .publish(
            notification("t", "Patient-open", vec![patient_item("p1")]),
            owner("a"),
        )
        .unwrap();
    assert_eq!(p.delivered, 0);
}

#[tokio::test]
async fn a_full_queue_drops_the_subscriber_not_the_publisher() {
    let (hub, _) = hub_with(HubSettings {
        queue: 8,
        ..HubSettings::default()
    });
    let mut stuck = join(&hub, "t", "Patient-*", "stuck", admit_all());
    let mut ok = join(&hub, "t", "Patient-*,SyncError", "ok", admit_all());
    for i in 0..20 {
        hub.publish(
            notification("t", "Patient-open", vec![patient_item(&format!("p{i}"))]),
            owner("ok"),
        )
        .unwrap();
        drain(&mut ok);
        if i == 10 {
            // Dropped by now: 8 queued, the 9th did not fit.
            let closing = stuck.closing.borrow().clone().expect("dropped");
            assert_eq!(closing.code, 1013);
        }
    }
    assert_eq!(hub.connected(), 1);
    let _ = drain(&mut stuck);
}

#[tokio::test]
async fn shutdown_closes_with_1001() {
    let (hub, _) = hub();
    let c = join(&hub, "t", "*", "a", admit_all());
    hub.shutdown();
    assert_eq!(c.closing.borrow().clone().unwrap().code, 1001);
    assert!(matches!(
        hub.subscribe(NewSubscription {
            topic: "t".into(),
            events: EventPattern::parse_list("*").unwrap(),
            lease: Duration::from_secs(60),
            name: None,
            owner: owner("a"),
            admit: admit_all(),
            endpoint: None,
        }),
        Err(HubError::Unavailable(_))
    ));
}

#[test]
fn patients_are_found_wherever_the_context_names_them() {
    let ctx: Vec<ContextItem> = serde_json::from_value(json!([
        {"key": "report", "reference": {"reference": "DiagnosticReport/r1"}},
        {"key": "patient", "reference": [{"reference": "https://x/fhir/Patient/p1/_history/3"}]},
        {"key": "study", "resource": {"resourceType": "ImagingStudy", "id": "s", "subject": {"reference": "Patient/p2"}}},
        {"key": "updates", "resource": {"resourceType": "Bundle", "entry": [
            {"resource": {"resourceType": "Observation", "id": "o", "subject": {"reference": "Patient/p3"}}}]}}
    ]))
    .unwrap();
    assert_eq!(patients_of(&ctx), ["p1", "p2", "p3"]);
}

#[tokio::test]
async fn shared_content_about_another_patient_joins_the_anchors_patients() {
    let (hub, _) = hub();
    hub.publish(
        notification("t", "DiagnosticReport-open", report_items("r1", "p1")),
        owner("a"),
    )
    .unwrap();
    let add = json!([{"request": {"method": "PUT"},
                      "resource": {"resourceType": "Observation", "id": "o2", "status": "final",
                                   "subject": {"reference": "Patient/p2"}}}]);
    let p = hub
        .publish(update("t", "r1", Some("v1"), add), owner("a"))
        .unwrap();
    assert!(
        p.patients.contains(&"p1".to_owned()) && p.patients.contains(&"p2".to_owned()),
        "{:?}",
        p.patients
    );
    // The current context holds content about p2: a reader limited to p1
    // must be refused it, so p2 is among its patients.
    let (cur, patients) = hub.current_context("t");
    assert!(cur.context.iter().any(|c| c.key == "content"));
    assert!(patients.contains(&"p1".to_owned()), "{patients:?}");
    assert!(patients.contains(&"p2".to_owned()), "{patients:?}");
    // A later update without it still names it (the content stays).
    let other = json!([{"request": {"method": "PUT"},
                        "resource": {"resourceType": "Observation", "id": "o3", "status": "final"}}]);
    let p = hub
        .publish(update("t", "r1", Some("v2"), other), owner("a"))
        .unwrap();
    assert!(p.patients.contains(&"p2".to_owned()), "{:?}", p.patients);
}

#[tokio::test]
async fn lease_left_follows_a_resubscription() {
    let (hub, _) = hub();
    let c = join(&hub, "t", "Patient-open", "a", admit_all());
    let first = hub.lease_left(&c.endpoint).unwrap();
    clock().advance(Duration::from_secs(10));
    assert_eq!(
        hub.lease_left(&c.endpoint),
        Some(first - Duration::from_secs(10))
    );
    hub.subscribe(NewSubscription {
        topic: "t".into(),
        events: EventPattern::parse_list("Patient-open").unwrap(),
        lease: Duration::from_secs(600),
        name: None,
        owner: owner("a"),
        admit: admit_all(),
        endpoint: Some(c.endpoint.clone()),
    })
    .unwrap();
    assert_eq!(hub.lease_left(&c.endpoint), Some(Duration::from_secs(600)));
    assert_eq!(hub.lease_left("nope"), None);
}
