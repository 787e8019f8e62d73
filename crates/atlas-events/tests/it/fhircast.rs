//! FHIRcast STU3: every example of `../shared/conformance/fhircast/`
//! parsed (and refused where upstream's JSON is broken), serialised back
//! and compared, and produced by our hub from the same inputs.
//!
//! The folder's README says what is wrong upstream: four files are not
//! JSON (refused here; three are repaired the obvious way and then must
//! parse), and timestamps are opaque (the hub never rewrites them, so the
//! comparisons include them).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use atlas_events::fhircast::*;

/// The examples folder, or `None` (with a note) when `../shared` is not
/// there; under CI its absence fails the test.
fn examples() -> Option<PathBuf> {
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/conformance/fhircast"
    ));
    if dir.join("index.json").is_file() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI is set but the FHIRcast examples are missing at {}",
        dir.display()
    );
    eprintln!(
        "skipped: ../shared missing (no FHIRcast examples at {})",
        dir.display()
    );
    None
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn json_file(dir: &Path, file: &str) -> Value {
    serde_json::from_str(&read(dir, file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// An ```http block: its first line, headers and body.
struct Http {
    start: String,
    headers: Vec<(String, String)>,
    body: String,
}

fn http(dir: &Path, file: &str) -> Http {
    let text = read(dir, file).replace("\r\n", "\n");
    let (head, body) = text.split_once("\n\n").unwrap_or((text.as_str(), ""));
    let mut lines = head.lines();
    let start = lines.next().unwrap_or_default().to_owned();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Http {
        start,
        headers,
        body: body.trim().to_owned(),
    }
}

impl Http {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses `v` as `T`, serialises it back and compares as JSON values.
fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(file: &str, v: &Value) -> T {
    let t: T = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{file}: {e}"));
    let back = serde_json::to_value(&t).unwrap();
    assert_eq!(&back, v, "{file} does not survive parse and serialise");
    t
}

/// `hub.event` compared case-insensitively (the spec's examples mix
/// `syncerror` and `SyncError`), everything else exactly.
fn same_event(mut got: Value, mut want: Value, what: &str) {
    for v in [&mut got, &mut want] {
        if let Some(e) = v.pointer_mut("/event/hub.event") {
            *e = json!(e.as_str().unwrap_or_default().to_ascii_lowercase());
        }
    }
    assert_eq!(got, want, "{what}");
}

fn without_version(mut v: Value) -> Value {
    if let Some(e) = v.get_mut("event").and_then(Value::as_object_mut) {
        e.remove("context.versionId");
        e.remove("context.priorVersionId");
    }
    v
}

#[test]
fn every_example_file_is_indexed_and_parses_as_its_message_type() {
    let Some(dir) = examples() else { return };
    let index = json_file(&dir, "index.json");
    let listed: BTreeSet<String> = index["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["file"].as_str().unwrap().to_owned())
        .collect();
    let mut on_disk = BTreeSet::new();
    for sub in ["", "events/"] {
        for e in std::fs::read_dir(dir.join(sub)).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().is_file() && name != "README.md" && name != "index.json" {
                on_disk.insert(format!("{sub}{name}"));
            }
        }
    }
    assert_eq!(listed, on_disk, "index.json and the folder disagree");
    let mut checked = 0;
    for f in index["files"].as_array().unwrap() {
        let file = f["file"].as_str().unwrap();
        if file.ends_with(".invalid-json.txt") {
            assert_eq!(f["validJson"], false, "{file}");
            let text = read(&dir, file);
            assert!(
                serde_json::from_str::<Value>(&text).is_err(),
                "{file} is marked invalid upstream but parses"
            );
            checked += 1;
            continue;
        }
        if file.ends_with(".http.txt") {
            let h = http(&dir, file);
            assert!(
                h.start.starts_with("POST ")
                    || h.start.starts_with("GET ")
                    || h.start.starts_with("HTTP/1.1 "),
                "{file}: {}",
                h.start
            );
            checked += 1;
            continue;
        }
        let v = json_file(&dir, file);
        match file {
            "subscribe-response.json" | "unsubscribe-response.json" => {
                round_trip::<ChannelEndpoint>(file, &v);
            }
            "subscription-confirmation.json" => {
                round_trip::<SubscriptionConfirmation>(file, &v);
            }
            "subscription-denial.json" => {
                round_trip::<SubscriptionDenial>(file, &v);
            }
            "event-notification-response.json" => {
                round_trip::<Ack>(file, &v);
            }
            "wellknown-fhircast-configuration.json" => {
                round_trip::<HubConfiguration>(file, &v);
            }
            "extension-example.json" => {
                round_trip::<ContextList>(file, &v);
            }
            "get-context-response-empty.json" => {
                round_trip::<CurrentContext>(file, &v);
            }
            "smart-token-response-fhircast.json" => {
                let l: LaunchContext = round_trip(file, &v);
                assert_eq!(
                    l.hub_topic.as_deref(),
                    Some("fdb2f928-5546-4f52-87a0-0648e9ded065")
                );
                assert_eq!(l.hub_url.as_deref(), Some("https://hub.example.com"));
            }
            f if f == "event-notification-patient-open.json" || f.starts_with("events/") => {
                let n: Notification = round_trip(file, &v);
                let checked = Hub::check(&n);
                if file == "events/template.json" {
                    // Placeholders, not an event: no `patient` item.
                    assert!(
                        checked.is_err(),
                        "the template must not pass as Patient-open"
                    );
                } else {
                    checked.unwrap_or_else(|e| panic!("{file}: {e}"));
                }
            }
            other => panic!("{other}: no message type for this example; add one"),
        }
        checked += 1;
    }
    assert_eq!(checked, listed.len());
}

#[test]
fn invalid_upstream_examples_are_refused_and_parse_once_repaired() {
    let Some(dir) = examples() else { return };
    // The hub's own parser refuses the broken request body (400 material).
    let body = read(
        &dir,
        "request-context-change-patient-close.invalid-json.txt",
    );
    let e = Notification::from_json(body.as_bytes()).unwrap_err();
    assert_eq!(e.param, "body");
    let h = http(&dir, "request-context-change-patient-close.http.txt");
    assert_eq!(h.body, body.trim(), "the .http.txt carries the same body");
    assert!(Notification::from_json(h.body.as_bytes()).is_err());

    // A missing comma after `identifier` (line 88).
    let text = read(
        &dir,
        "get-context-response-diagnosticreport.invalid-json.txt",
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[86].trim(),
        "]",
        "the README's line 88 is the one after"
    );
    let repaired = text.replacen(
        "              ]\n              \"partOf\"",
        "              ],\n              \"partOf\"",
        1,
    );
    let v: Value = serde_json::from_str(&repaired).expect("repaired");
    let cur: CurrentContext = round_trip("get-context-response-diagnosticreport", &v);
    assert_eq!(cur.context_type, "DiagnosticReport");
    assert!(cur.version_id.is_some());
    assert_eq!(
        cur.context
            .iter()
            .map(|c| c.key.as_str())
            .collect::<Vec<_>>(),
        ["report", "patient", "study", "content"]
    );

    // A trailing comma.
    let text = read(
        &dir,
        "smart-launch-token-response-with-context.invalid-json.txt",
    );
    let repaired = text.replace(
        "\"fdb2f928-5546-4f52-87a0-0648e9ded065\",\n}",
        "\"fdb2f928-5546-4f52-87a0-0648e9ded065\"\n}",
    );
    let v: Value = serde_json::from_str(&repaired).expect("repaired");
    let l: LaunchContext = round_trip("smart-launch-token-response-with-context", &v);
    assert_eq!(
        l.hub_topic.as_deref(),
        Some("fdb2f928-5546-4f52-87a0-0648e9ded065")
    );
    assert_eq!(l.other["imagingstudy"], "789");
}

#[test]
fn subscribe_by_form_post_with_websocket_channel() {
    let Some(dir) = examples() else { return };
    let h = http(&dir, "subscribe-request.http.txt");
    assert!(h.start.starts_with("POST "));
    assert_eq!(
        h.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    assert!(h.header("authorization").unwrap().starts_with("Bearer "));
    let r = SubscriptionRequest::from_form(h.body.as_bytes()).unwrap();
    assert_eq!(r.mode, Mode::Subscribe);
    assert_eq!(r.channel_type, "websocket");
    assert_eq!(r.topic, "fdb2f928-5546-4f52-87a0-0648e9ded065");
    assert_eq!(r.events.as_deref(), Some("Patient-open,Patient-close"));
    assert_eq!(r.lease_seconds, None);
    // Produced: the same parameters (our encoder escapes the comma, which
    // any form decoder reads back).
    let pairs = |b: &str| -> BTreeSet<(String, String)> {
        url::form_urlencoded::parse(b.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    };
    assert_eq!(pairs(&r.to_form()), pairs(&h.body));
}

#[test]
fn subscribe_answers_202_with_the_channel_endpoint() {
    let Some(dir) = examples() else { return };
    let h = http(&dir, "subscribe-response.http.txt");
    assert_eq!(h.start, "HTTP/1.1 202 Accepted");
    let v: Value = serde_json::from_str(&h.body).unwrap();
    assert_eq!(v, json_file(&dir, "subscribe-response.json"));
    let ep: ChannelEndpoint = serde_json::from_value(v.clone()).unwrap();
    // Produced: the hub's endpoint id in the same shape.
    let hub = Hub::new(HubSettings::default());
    let s = hub
        .subscribe(subscription(
            "fdb2f928-5546-4f52-87a0-0648e9ded065",
            "Patient-open,Patient-close",
            3600,
        ))
        .unwrap();
    let ours = ChannelEndpoint {
        endpoint: format!("wss://hub.example.com/{}", s.endpoint),
    };
    let ours = serde_json::to_value(&ours).unwrap();
    assert_eq!(
        ours.as_object().unwrap().keys().collect::<Vec<_>>(),
        v.as_object().unwrap().keys().collect::<Vec<_>>()
    );
    assert!(ep.endpoint.starts_with("wss://"));
    assert!(s.endpoint.len() >= 64);
}

fn admit_all() -> Admit {
    Arc::new(|_: &[String], t: &Arc<str>| Some(t.clone()))
}

fn subscription(topic: &str, events: &str, lease: u64) -> NewSubscription {
    NewSubscription {
        topic: topic.into(),
        events: EventPattern::parse_list(events).unwrap(),
        lease: Duration::from_secs(lease),
        name: Some("conformance".into()),
        owner: Owner {
            issuer: "iss".into(),
            subject: "sub".into(),
            client: None,
        },
        admit: admit_all(),
        endpoint: None,
    }
}

fn recv(c: &mut Connection) -> Value {
    let t = c.messages.try_recv().expect("a message");
    serde_json::from_str(&t).unwrap()
}

#[test]
fn confirmation_on_connect_and_denial_match_the_examples() {
    let Some(dir) = examples() else { return };
    let hub = Hub::new(HubSettings {
        max_lease: Duration::from_secs(7200),
        ..HubSettings::default()
    });
    let topic = "fdb2f928-5546-4f52-87a0-0648e9ded065";
    let s = hub
        .subscribe(subscription(topic, "Patient-open,Patient-close", 7200))
        .unwrap();
    let mut c = hub.connect(&s.endpoint).unwrap();
    assert_eq!(
        recv(&mut c),
        json_file(&dir, "subscription-confirmation.json")
    );

    let want = json_file(&dir, "subscription-denial.json");
    let d = SubscriptionDenial::new(
        "fba7b1e2-53e9-40aa-883a-2af57ab4e2c",
        "Patient-open,Patient-close",
        "session unexpectedly stopped",
    );
    assert_eq!(serde_json::to_value(&d).unwrap(), want);
    // What the hub sends when it ends a subscription has the same shape.
    hub.unsubscribe(topic, &s.endpoint, &subscription(topic, "*", 1).owner)
        .unwrap();
    let closing = c.closing.borrow().clone().unwrap();
    let sent: Value = serde_json::from_str(closing.denial.as_deref().unwrap()).unwrap();
    assert_eq!(
        sent.as_object().unwrap().keys().collect::<BTreeSet<_>>(),
        want.as_object().unwrap().keys().collect::<BTreeSet<_>>()
    );
    assert_eq!(sent["hub.mode"], "denied");
    assert_eq!(sent["hub.topic"], topic);
}

#[test]
fn unsubscribe_by_form_post_names_the_endpoint() {
    let Some(dir) = examples() else { return };
    let h = http(&dir, "unsubscribe-request.http.txt");
    let r = SubscriptionRequest::from_form(h.body.as_bytes()).unwrap();
    assert_eq!(r.mode, Mode::Unsubscribe);
    assert_eq!(r.events, None);
    // Upstream's URL ends with an encoded newline; trimmed.
    assert_eq!(
        r.channel_endpoint.as_deref(),
        Some("wss://hub.example.com/ee30d3b9-1558-464f-a299-cbad6f8135de")
    );
    let back = SubscriptionRequest::from_form(r.to_form().as_bytes()).unwrap();
    assert_eq!(back, r);
    let resp: ChannelEndpoint =
        serde_json::from_value(json_file(&dir, "unsubscribe-response.json")).unwrap();
    assert_eq!(Some(resp.endpoint), r.channel_endpoint);
}

/// A hub whose `context.versionId`s are the examples' ones, in order.
fn example_hub(versions: &[&str]) -> Hub {
    let v: Vec<String> = versions.iter().map(|s| (*s).to_owned()).collect();
    let n = std::sync::atomic::AtomicUsize::new(0);
    Hub::new(HubSettings::default()).with_version_ids(move || {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        v.get(i).cloned().unwrap_or_else(|| format!("v{i}"))
    })
}

fn listener(hub: &Hub, topic: &str) -> Connection {
    let s = hub.subscribe(subscription(topic, "*", 600)).unwrap();
    let mut c = hub.connect(&s.endpoint).unwrap();
    let _confirmation = recv(&mut c);
    c
}

fn publish(hub: &Hub, dir: &Path, file: &str) -> Value {
    let body = read(dir, file);
    let n = Notification::from_json(body.as_bytes()).unwrap_or_else(|e| panic!("{file}: {e}"));
    hub.publish(n, Owner::default())
        .unwrap_or_else(|e| panic!("{file}: {e}"));
    json_file(dir, file)
}

#[test]
fn event_notifications_produced_equal_the_examples() {
    let Some(dir) = examples() else { return };
    let topic = "fdb2f928-5546-4f52-87a0-0648e9ded065";
    // Context events, each published to a fresh hub and compared with
    // what a subscriber receives: the request's id and timestamp are
    // kept, the hub adds only `context.versionId` to an open.
    for file in [
        "event-notification-patient-open.json",
        "events/Patient-open.json",
        "events/Patient-close.json",
        "events/Encounter-open.json",
        "events/Encounter-close.json",
        "events/ImagingStudy-open.json",
        "events/ImagingStudy-close.json",
        "events/DiagnosticReport-open-request.json",
        "events/DiagnosticReport-close.json",
        "events/UserLogout.json",
        "events/UserHibernate.json",
        "events/Home-open.json",
        "events/SyncError.json",
    ] {
        let want = json_file(&dir, file);
        let t = want["event"]["hub.topic"].as_str().unwrap().to_owned();
        let hub = example_hub(&[]);
        let mut c = listener(&hub, &t);
        publish(&hub, &dir, file);
        let got = recv(&mut c);
        if file.contains("open") && !file.contains("Home") {
            assert!(got["event"]["context.versionId"].is_string(), "{file}");
        }
        same_event(without_version(got), want, file);
    }

    // DiagnosticReport: open, update (the hub's broadcast is the
    // example's, versions and all), delete, select.
    let hub = example_hub(&[
        "b9574cb0-e9e5-4be1-8957-5fcb51ef33c1",
        "efcac43a-ed38-49e4-8d79-73f78290292a",
    ]);
    let mut c = listener(&hub, topic);
    let open = publish(&hub, &dir, "events/DiagnosticReport-open-request.json");
    let got_open = recv(&mut c);
    // The hub's open event is upstream's "as above" example, completed.
    let hub_event = read(
        &dir,
        "events/DiagnosticReport-open-hub-event.invalid-json.txt",
    );
    let context = serde_json::to_string(&open["event"]["context"]).unwrap();
    let completed = hub_event.replace("[\n      ... as above ...\n    ]", &context);
    let want_open: Value = serde_json::from_str(&completed).expect("completed example");
    assert_eq!(got_open, want_open);

    publish(
        &hub,
        &dir,
        "events/DiagnosticReport-update-add-request.json",
    );
    assert_eq!(
        recv(&mut c),
        json_file(
            &dir,
            "events/DiagnosticReport-update-add-hub-broadcast.json"
        )
    );
    let delete = publish(
        &hub,
        &dir,
        "events/DiagnosticReport-update-delete-request.json",
    );
    let got = recv(&mut c);
    assert_eq!(
        got["event"]["context.priorVersionId"],
        "efcac43a-ed38-49e4-8d79-73f78290292a"
    );
    assert_eq!(without_version(got), without_version(delete));
    let (cur, _) = hub.current_context(topic);
    let content = cur.context.iter().find(|i| i.key == "content").unwrap();
    let ids: Vec<String> = content.resource.as_ref().unwrap()["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["id"].as_str().unwrap().to_owned())
        .collect();
    // Added: the study, o-40afe766 and the report; deleted: o-40afe766.
    assert_eq!(
        ids,
        [
            "7e9deb91-0017-4690-aebd-951cef34aba4",
            "2402d3bd-e988-414b-b7f2-4322e86c9327"
        ]
    );
    let select = publish(&hub, &dir, "events/DiagnosticReport-select.json");
    assert_eq!(recv(&mut c), select);
    publish(&hub, &dir, "events/DiagnosticReport-close.json");
    let _close = recv(&mut c);
    assert_eq!(hub.current_context(topic).0, CurrentContext::empty());
}

#[test]
fn sync_error_produced_equals_the_example() {
    let Some(dir) = examples() else { return };
    let want = json_file(&dir, "events/SyncError.json");
    let n = sync_error(
        &SyncErrorInfo {
            topic: "7544fe65-ea26-44b5-835d-14287e46390b".into(),
            event_id: Some("fdb2f928-5546-4f52-87a0-0648e9ded065".into()),
            event_name: Some("Patient-open".into()),
            subscriber: "Acme Product".into(),
            diagnostics: "Acme Product failed to follow context".into(),
            codes: vec![(
                "http://example.com/events/syncerror/your-error-code-system".into(),
                "FHIRcast sync error".into(),
            )],
        },
        "q9v3jubddqt63n1",
        "2018-01-08T01:37:05.14",
    );
    same_event(n.to_value(), want, "SyncError");
}

#[test]
fn acknowledgement_example_is_accepted_by_the_hub() {
    let Some(dir) = examples() else { return };
    let ack: Ack =
        serde_json::from_value(json_file(&dir, "event-notification-response.json")).unwrap();
    assert!(ack.status.is_success());
    let hub = Hub::new(HubSettings {
        ack_timeout: Duration::from_millis(1),
        ..HubSettings::default()
    });
    let topic = "fdb2f928-5546-4f52-87a0-0648e9ded065";
    let mut c = listener(&hub, topic);
    let mut watcher = listener(&hub, topic);
    publish(&hub, &dir, "event-notification-patient-open.json");
    assert_eq!(recv(&mut c)["id"], ack.id.as_str());
    let _ = recv(&mut watcher);
    hub.ack(&c.endpoint, &ack);
    hub.ack(&watcher.endpoint, &ack);
    std::thread::sleep(Duration::from_millis(5));
    hub.sweep();
    assert_eq!(hub.connected(), 2, "acknowledged in time by both");
}

#[test]
fn get_current_context_matches_the_examples() {
    let Some(dir) = examples() else { return };
    let hub = example_hub(&["b9574cb0-e9e5-4be1-8957-5fcb51ef33c1"]);
    let topic = "fdb2f928-5546-4f52-87a0-0648e9ded065";
    let (empty, _) = hub.current_context(topic);
    assert_eq!(
        serde_json::to_value(&empty).unwrap(),
        json_file(&dir, "get-context-response-empty.json")
    );
    let open = publish(&hub, &dir, "events/DiagnosticReport-open-request.json");
    let (cur, patients) = hub.current_context(topic);
    assert_eq!(patients, ["503824b8-fe8c-4227-b061-7181ba6c3926"]);
    let got = serde_json::to_value(&cur).unwrap();
    assert_eq!(got["context.type"], "DiagnosticReport");
    assert_eq!(
        got["context.versionId"],
        "b9574cb0-e9e5-4be1-8957-5fcb51ef33c1"
    );
    // The open's context, then the (empty) content, as upstream's
    // DiagnosticReport example lays it out.
    let items = got["context"].as_array().unwrap();
    assert_eq!(
        &items[..3],
        open["event"]["context"].as_array().unwrap().as_slice()
    );
    assert_eq!(items[3]["key"], "content");
    assert_eq!(items[3]["resource"]["type"], "collection");
    assert_eq!(items[3]["resource"]["entry"], json!([]));
}

#[test]
fn well_known_configuration_has_the_examples_members() {
    let Some(dir) = examples() else { return };
    let want = json_file(&dir, "wellknown-fhircast-configuration.json");
    let ours = serde_json::to_value(HubConfiguration::atlas()).unwrap();
    for k in want.as_object().unwrap().keys() {
        assert!(ours.get(k).is_some(), "ours lacks {k}: {ours}");
    }
    assert_eq!(ours["websocketSupport"], true);
    assert_eq!(ours["fhircastVersion"], want["fhircastVersion"]);
    let events: Vec<&str> = ours["eventsSupported"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    for e in ["Patient-open", "Patient-close", "SyncError"] {
        assert!(events.contains(&e), "{e}");
    }
    assert!(!events.contains(&"com.example.researchstudy-transmogrify"));
    assert_eq!(ours["capabilities"]["supportsGetCurrentContext"], true);
    let h = http(&dir, "wellknown-fhircast-configuration-request.http.txt");
    assert_eq!(h.start, "GET /.well-known/fhircast-configuration HTTP/1.1");
    // A `webhookSupport` member is ignored, as the spec says.
    let mut with_webhook = want.clone();
    with_webhook["webhookSupport"] = json!(true);
    let parsed: HubConfiguration = serde_json::from_value(with_webhook).unwrap();
    assert_eq!(serde_json::to_value(parsed).unwrap(), want);
}

#[test]
fn request_context_change_is_accepted_with_202_and_extensions_pass_through() {
    let Some(dir) = examples() else { return };
    let h = http(&dir, "request-context-change-response.http.txt");
    assert_eq!(h.start, "HTTP/1.1 202 Accepted");
    assert!(h.body.is_empty());
    let req = http(&dir, "request-context-change-patient-close.http.txt");
    assert_eq!(req.header("content-type"), Some("application/fhir+json"));
    // An extension item (`data`) travels with the event unchanged.
    let ext: ContextList =
        serde_json::from_value(json_file(&dir, "extension-example.json")).unwrap();
    let hub = Hub::new(HubSettings::default());
    let mut c = listener(&hub, "t");
    let n = Notification {
        timestamp: "2024-01-01T00:00:00Z".into(),
        id: "with-extension".into(),
        event: Event {
            topic: "t".into(),
            event: "Patient-open".into(),
            version_id: None,
            prior_version_id: None,
            context: ext.context.clone(),
        },
    };
    hub.publish(n, Owner::default()).unwrap();
    let got: Notification = serde_json::from_value(recv(&mut c)).unwrap();
    assert_eq!(got.event.context, ext.context);
}
