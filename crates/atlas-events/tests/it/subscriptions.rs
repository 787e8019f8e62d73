//! FHIR Subscriptions (R4 backport) against the IG's own examples and
//! Inferno's fixtures (`../shared/conformance/subscriptions/`, read at test
//! time: see its README), and the rest-hook sender against a real socket.
//!
//! Every example file is accounted for: notification Bundles are parsed,
//! produced again from what was parsed and from scratch, and compared;
//! Subscriptions are validated (accepted, or refused naming the element
//! for what Atlas does not do); the Basic topic is refused for the
//! criteria Atlas cannot evaluate; the conformance resources agree with
//! the constants and codes the crate uses.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use serde_json::{Value as Json, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use atlas_events::subscriptions::topic::{FilterDef, Topic, TopicCatalog, Trigger};
use atlas_events::subscriptions::{
    self as subs, Change, DeliveryError, Endpoint, Entry, Interaction, Notification,
    NotificationEvent, NotificationType, PayloadContent, RestHook, Retry, Rules, Status,
    StatusInfo,
};

/// The shared conformance folder, or `None` (and a note) when absent; in
/// CI its absence fails the test.
fn shared() -> Option<PathBuf> {
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/conformance/subscriptions"
    ));
    if dir.is_dir() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "../shared/conformance/subscriptions is missing (CI must have it)"
    );
    println!("skipped: ../shared missing");
    None
}

fn read(path: &std::path::Path) -> Json {
    serde_json::from_slice(&std::fs::read(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every JSON file of the folder, sorted.
fn files(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for sub in [
        "v1.1.0/examples",
        "v1.1.0/conformance",
        "v1.2.0-ballot/examples",
        "inferno-fixtures",
    ] {
        for e in std::fs::read_dir(dir.join(sub)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "json") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// JSON without narrative, with Parameters' parameters in name order (the
/// IG's standalone status example lists them in another order than its
/// Bundles; a Parameters' order carries no meaning).
fn normal(mut v: Json) -> Json {
    fn walk(v: &mut Json) {
        match v {
            Json::Object(o) => {
                o.remove("text");
                if o.get("resourceType").and_then(Json::as_str) == Some("Parameters")
                    && let Some(Json::Array(p)) = o.get_mut("parameter")
                {
                    p.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
                }
                o.values_mut().for_each(walk);
            }
            Json::Array(a) => a.iter_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut v);
    v
}

fn instant(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// The IG's admission topic as Atlas would hold it (its examples
/// subscribe to it for Encounters and, in multi-resource, Observations),
/// and Inferno's copy of it.
fn example_catalog() -> TopicCatalog {
    let topic = |url: &str| Topic {
        id: "admission".into(),
        url: url.into(),
        version: None,
        name: "admission".into(),
        title: "Admission".into(),
        description: "Encounters of admitted patients".into(),
        status: "active".into(),
        triggers: ["Encounter", "Observation"]
            .iter()
            .map(|t| Trigger {
                resource_type: (*t).into(),
                interactions: vec![Interaction::Create, Interaction::Update],
                description: String::new(),
            })
            .collect(),
        can_filter_by: [("Encounter", "patient"), ("Observation", "subject")]
            .iter()
            .map(|(t, p)| FilterDef {
                resource_type: (*t).into(),
                param: (*p).into(),
                description: String::new(),
            })
            .collect(),
    };
    TopicCatalog::default()
        .with(topic("http://hl7.org/SubscriptionTopic/admission"))
        .with(topic(
            "http://inferno.healthit.gov/suites/custom/subscriptions_r5_backport_r4_client/topics/patient-admission",
        ))
        .with(topic("http://fhirserver.org/topics/patient-admission"))
}

#[test]
fn every_example_file_is_accounted_for() {
    let Some(dir) = shared() else { return };
    let mut by_kind = std::collections::BTreeMap::<String, usize>::new();
    for path in files(&dir) {
        let j = read(&path);
        let kind = j["resourceType"].as_str().unwrap_or("?").to_owned();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        match kind.as_str() {
            "Bundle" if j["type"] == "history" => {
                let parsed = Notification::parse(&std::fs::read(&path).unwrap());
                if name.contains("non_conformant") {
                    let e = parsed.unwrap_err();
                    assert!(e.contains("request"), "{name}: {e}");
                } else {
                    parsed.unwrap_or_else(|e| panic!("{name}: {e}"));
                }
            }
            "Bundle" => {
                // Inferno's $status answer: a searchset of status Parameters.
                assert_eq!(j["type"], "searchset", "{name}");
                for e in j["entry"].as_array().unwrap() {
                    StatusInfo::from_parameters(&e["resource"]).unwrap();
                }
            }
            "Parameters" => {
                let s = StatusInfo::from_parameters(&j).unwrap();
                assert_eq!(s.events_since_start, Some(2), "{name}");
            }
            "Subscription" => {
                // Checked one by one in their own test.
                assert!(j["criteria"].is_string(), "{name}");
            }
            "Basic" => {
                assert!(Topic::from_basic(&j).is_err(), "{name}");
            }
            "CapabilityStatement"
            | "OperationDefinition"
            | "SearchParameter"
            | "StructureDefinition"
            | "CodeSystem"
            | "ValueSet" => {}
            other => panic!("{name}: unexpected {other}"),
        }
        *by_kind.entry(kind).or_default() += 1;
    }
    // 11 + 15 IG examples, 20 conformance resources, 12 Inferno fixtures;
    // 24 notifications (one of Inferno's non-conformant) and a $status answer.
    assert_eq!(by_kind.values().sum::<usize>(), 58, "{by_kind:?}");
    assert_eq!(by_kind["Bundle"], 25, "{by_kind:?}");
}

#[test]
fn notifications_parsed_and_produced_again_equal_the_examples() {
    let Some(dir) = shared() else { return };
    let mut n = 0;
    for path in files(&dir) {
        let j = read(&path);
        if j["resourceType"] != "Bundle" || j["type"] != "history" {
            continue;
        }
        let name = path.display().to_string();
        let Ok(parsed) = Notification::parse(&std::fs::read(&path).unwrap()) else {
            assert!(name.contains("non_conformant"), "{name}");
            continue;
        };
        let produced: Json = serde_json::from_slice(&parsed.to_json().unwrap()).unwrap();
        assert_eq!(normal(produced), normal(j), "{name}");
        n += 1;
    }
    assert_eq!(n, 23);
}

/// The IG's notifications, built from scratch with the values their
/// narrative states: the builder alone produces the examples.
#[test]
fn notifications_built_from_scratch_equal_the_ig_examples() {
    let Some(dir) = shared() else { return };
    let sub = "https://example.org/fhir/Subscription/admission";
    let topic = Some("http://hl7.org/SubscriptionTopic/admission".to_owned());
    let ts = "2020-05-29T11:44:13.1882432-05:00";
    let encounter = "https://example.org/fhir/Encounter/86009987-eabe-42bf-8c02-b112b18cb616";
    let status = |id: &str, st: Status, kind: NotificationType, n: u64| StatusInfo {
        id: id.into(),
        ..StatusInfo::new(sub, topic.clone(), st, kind, n)
    };
    let event = |focus: Option<&str>| NotificationEvent {
        number: 2,
        timestamp: Some(ts.into()),
        focus: focus.map(str::to_owned),
        additional_context: Vec::new(),
        other_parts: Vec::new(),
    };
    let enc = r#"{"resourceType":"Encounter","id":"86009987-eabe-42bf-8c02-b112b18cb616","status":"in-progress","class":{"code":"VR","system":"http://terminology.hl7.org/CodeSystem/v3-ActCode"},"subject":{"reference":"https://example.org/fhir/Patient/1599eb66-431a-447c-a3de-6897fe9ae9a1","display":"Example Patient"}}"#;
    let cases: Vec<(&str, Notification)> = vec![
        (
            "handshake",
            Notification {
                id: Some("r4-notification-handshake".into()),
                timestamp: Some(ts.into()),
                status: status(
                    "63c28e8a-f402-43e4-beb2-75b1c0f6833f",
                    Status::Requested,
                    NotificationType::Handshake,
                    0,
                ),
                entries: vec![],
            },
        ),
        (
            "heartbeat",
            Notification {
                id: Some("r4-notification-heartbeat".into()),
                timestamp: Some(ts.into()),
                status: status(
                    "385b23bd-6d03-462e-894d-a0694045d65c",
                    Status::Active,
                    NotificationType::Heartbeat,
                    2,
                ),
                entries: vec![],
            },
        ),
        (
            "empty",
            Notification {
                id: Some("r4-notification-empty".into()),
                timestamp: Some(ts.into()),
                status: StatusInfo {
                    events: vec![event(None)],
                    ..status(
                        "9e41ff6d-5be6-4e6a-8b85-abd4e7f58400",
                        Status::Active,
                        NotificationType::EventNotification,
                        2,
                    )
                },
                entries: vec![],
            },
        ),
        (
            "id-only",
            Notification {
                id: Some("r4-notification-id-only".into()),
                timestamp: Some(ts.into()),
                status: StatusInfo {
                    events: vec![event(Some(encounter))],
                    ..status(
                        "292d3c72-edc1-4d8a-afaa-d85e19c7f563",
                        Status::Active,
                        NotificationType::EventNotification,
                        2,
                    )
                },
                entries: vec![],
            },
        ),
        (
            "full-resource",
            Notification {
                id: Some("r4-notification-full-resource".into()),
                timestamp: Some(ts.into()),
                status: StatusInfo {
                    events: vec![event(Some(encounter))],
                    ..status(
                        "2d5afc69-6ef2-420f-a8d1-8500c99eb96c",
                        Status::Active,
                        NotificationType::EventNotification,
                        2,
                    )
                },
                entries: vec![Entry::for_change(
                    "https://example.org/fhir",
                    Interaction::Create,
                    "Encounter",
                    "86009987-eabe-42bf-8c02-b112b18cb616",
                    Some(RawValue::from_string(enc.into()).unwrap()),
                )],
            },
        ),
        (
            "error",
            Notification {
                id: Some("r4-notification-error".into()),
                timestamp: Some(ts.into()),
                status: StatusInfo {
                    errors: vec![
                        json!({"coding": [{"code": "no-response", "system": "http://terminology.hl7.org/CodeSystem/subscription-error"}]}),
                    ],
                    ..status(
                        "7bd91d26-c951-4520-9ac6-67f41bfbe897",
                        Status::Error,
                        NotificationType::QueryStatus,
                        3,
                    )
                },
                entries: vec![],
            },
        ),
    ];
    for version in ["v1.1.0", "v1.2.0-ballot"] {
        for (name, n) in &cases {
            let want = read(&dir.join(format!(
                "{version}/examples/Bundle-r4-notification-{name}.json"
            )));
            let got: Json = serde_json::from_slice(&n.to_json().unwrap()).unwrap();
            assert_eq!(normal(got), normal(want), "{version} {name}");
        }
    }
}

#[test]
fn subscription_examples_are_accepted_or_refused_as_atlas_supports_them() {
    let Some(dir) = shared() else { return };
    let cat = example_catalog();
    let then = instant("2020-06-01T00:00:00Z");
    let rules = Rules::default();
    let ig =
        |v: &str, name: &str| read(&dir.join(format!("{v}/examples/Subscription-{name}.json")));

    for v in ["v1.1.0", "v1.2.0-ballot"] {
        // Multi-resource: an Observation filter on the admission topic.
        let s = subs::validate(&ig(v, "subscription-multi-resource"), &cat, &rules, then).unwrap();
        assert_eq!(s.payload, PayloadContent::IdOnly);
        assert_eq!(
            (s.heartbeat_secs, s.timeout_secs, s.max_count),
            (Some(86_400), 60, 20)
        );
        assert_eq!(s.filter_criteria, ["Observation?subject=Patient/123"]);
        // Zulip: a custom channel type.
        let r = subs::validate(&ig(v, "subscription-zulip"), &cat, &rules, then).unwrap_err();
        assert!(r.names("Subscription.channel.type"), "{r}");
        assert_eq!(r.issues.len(), 1, "{r}");
        assert_eq!(r.status(), 422);
    }
    let adm = ig("v1.1.0", "subscription-admission");
    let s = subs::validate(&adm, &cat, &rules, then).unwrap();
    assert_eq!(s.filter_criteria, ["Encounter?patient=Patient/123"]);
    let p123 = Change {
        resource_type: "Encounter",
        id: "e1",
        interaction: Interaction::Create,
        patient: Some("123"),
        resource: Some(r#"{"resourceType":"Encounter","id":"e1"}"#),
    };
    assert!(s.filters.matches(&p123));
    assert!(!s.filters.matches(&Change {
        patient: Some("9"),
        ..p123
    }));
    // Past its end, and against Atlas's own topics: refused, naming why.
    let r = subs::validate(&adm, &cat, &rules, instant("2021-01-01T00:00:00Z")).unwrap_err();
    assert!(r.names("Subscription.end"), "{r}");
    let builtin = TopicCatalog::builtin(subs::topic::DEFAULT_TYPES).unwrap();
    let r = subs::validate(&adm, &builtin, &rules, then).unwrap_err();
    assert!(r.names("Subscription.criteria"), "{r}");
    assert!(
        r.to_string().contains("observation-change"),
        "lists the offered topics: {r}"
    );

    // Inferno's: http to a public host (refused unless the server allows
    // it), the `Type.param=value` filter spelling, a bearer header.
    for payload in ["empty", "id-only", "full-resource"] {
        let j = read(&dir.join(format!("inferno-fixtures/Subscription_{payload}.json")));
        let r = subs::validate(&j, &cat, &rules, then).unwrap_err();
        assert!(r.names("Subscription.channel.endpoint"), "{payload}: {r}");
        assert_eq!(r.issues.len(), 1, "{payload}: {r}");
        let lax = Rules {
            allow_http: true,
            ..Rules::default()
        };
        let s = subs::validate(&j, &cat, &lax, then).unwrap();
        assert_eq!(s.payload, PayloadContent::parse(payload).unwrap());
        assert_eq!(
            s.headers,
            [("Authorization".to_owned(), "Bearer SAMPLE_TOKEN".to_owned())]
        );
        assert!(!format!("{s:?}").contains("SAMPLE_TOKEN"));
        assert_eq!(s.filters.criteria[0].param, "patient");
        assert_eq!(s.heartbeat_secs, None);
    }
    let j = read(&dir.join("inferno-fixtures/subscription_resource_example.json"));
    let r = subs::validate(&j, &cat, &rules, then).unwrap_err();
    assert!(r.names("Subscription.channel.type"), "{r}");
}

#[test]
fn the_basic_topic_example_is_refused_for_what_atlas_cannot_evaluate() {
    let Some(dir) = shared() else { return };
    let mut basic = read(&dir.join("v1.2.0-ballot/examples/Basic-r4-encounter-complete.json"));
    let r = Topic::from_basic(&basic).unwrap_err();
    let said = r.to_string();
    for what in [
        "queryCriteria",
        "fhirPathCriteria",
        "'_in'",
        "notification shapes",
    ] {
        assert!(said.contains(what), "{what}: {said}");
    }
    assert_eq!(r.status(), 422);
    // Without them, the rest is a topic Atlas can run.
    let ext = basic["extension"].as_array_mut().unwrap();
    ext.retain(|e| {
        let url = e["url"].as_str().unwrap();
        let in_filter = url.ends_with("canFilterBy")
            && e["extension"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["valueString"] == "_in");
        !url.ends_with("notificationShape") && !in_filter
    });
    for e in ext.iter_mut() {
        if e["url"].as_str().unwrap().ends_with("resourceTrigger") {
            e["extension"]
                .as_array_mut()
                .unwrap()
                .retain(|p| p["url"] != "queryCriteria" && p["url"] != "fhirPathCriteria");
        }
    }
    let t = Topic::from_basic(&basic).unwrap();
    assert_eq!(
        t.url,
        "http://hl7.org/fhir/uv/subscriptions-backport/SubscriptionTopic/r4-encounter-complete"
    );
    assert_eq!(t.status, "draft");
    assert!(t.fires("Encounter", Interaction::Update));
    assert!(!t.fires("Encounter", Interaction::Delete));
    assert!(t.can_filter("Encounter", "subject"));
    // And it round-trips through Atlas's own Basic form.
    assert_eq!(Topic::from_basic(&t.to_basic()).unwrap(), t);
}

#[test]
fn conformance_resources_agree_with_the_crate() {
    let Some(dir) = shared() else { return };
    let conf = dir.join("v1.1.0/conformance");
    for (file, url) in [
        (
            "StructureDefinition-backport-filter-criteria.json",
            subs::EXT_FILTER_CRITERIA,
        ),
        (
            "StructureDefinition-backport-heartbeat-period.json",
            subs::EXT_HEARTBEAT_PERIOD,
        ),
        (
            "StructureDefinition-backport-timeout.json",
            subs::EXT_TIMEOUT,
        ),
        (
            "StructureDefinition-backport-max-count.json",
            subs::EXT_MAX_COUNT,
        ),
        (
            "StructureDefinition-backport-payload-content.json",
            subs::EXT_PAYLOAD_CONTENT,
        ),
        (
            "StructureDefinition-backport-channel-type.json",
            subs::EXT_CHANNEL_TYPE,
        ),
        (
            "StructureDefinition-backport-subscription.json",
            subs::PROFILE_SUBSCRIPTION,
        ),
        (
            "StructureDefinition-backport-subscription-notification-r4.json",
            subs::PROFILE_NOTIFICATION,
        ),
        (
            "StructureDefinition-backport-subscription-status-r4.json",
            subs::PROFILE_STATUS,
        ),
        (
            "OperationDefinition-backport-subscription-status.json",
            subs::OP_STATUS,
        ),
        (
            "OperationDefinition-backport-subscription-events.json",
            subs::OP_EVENTS,
        ),
    ] {
        assert_eq!(read(&conf.join(file))["url"], url, "{file}");
    }
    // The payload codes are the IG's.
    let cs = read(&conf.join("CodeSystem-backport-content-code-system.json"));
    let codes: Vec<&str> = cs["concept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["code"].as_str().unwrap())
        .collect();
    for c in &codes {
        assert_eq!(PayloadContent::parse(c).unwrap().code(), *c);
    }
    assert_eq!(codes.len(), 3);
    // $status takes id and status; $events the numbers and content.
    let params = |f: &str| -> Vec<String> {
        read(&conf.join(f))["parameter"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["use"] == "in")
            .map(|p| p["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        params("OperationDefinition-backport-subscription-status.json"),
        ["id", "status"]
    );
    assert_eq!(
        params("OperationDefinition-backport-subscription-events.json"),
        ["eventsSinceNumber", "eventsUntilNumber", "content"]
    );
    // Topics are advertised the way the example CapabilityStatement does.
    let cap = read(&dir.join("inferno-fixtures/capability_statement_example.json"));
    let sub = cap["rest"][0]["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "Subscription")
        .unwrap();
    let topics: Vec<&str> = sub["extension"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["url"] == subs::EXT_CAPABILITY_TOPIC)
        .map(|e| e["valueCanonical"].as_str().unwrap())
        .collect();
    assert_eq!(topics.len(), 2);
}

/// A one-route HTTP/1.1 server on loopback answering each request with the
/// next of `answers` (the last repeats), recording what came.
/// Each request's head and body.
type Seen = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

struct Hook {
    url: url::Url,
    seen: Seen,
}

async fn hook(answers: Vec<(u16, &'static str)>, stall: bool) -> Hook {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        let mut n = 0usize;
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Headers, then Content-Length bytes of body.
            let (head, body_start) = loop {
                let k = sock.read(&mut chunk).await.unwrap_or(0);
                if k == 0 {
                    break (String::new(), 0);
                }
                buf.extend_from_slice(&chunk[..k]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break (String::from_utf8_lossy(&buf[..i]).into_owned(), i + 4);
                }
            };
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            while buf.len() < body_start + len {
                let k = sock.read(&mut chunk).await.unwrap_or(0);
                if k == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..k]);
            }
            log.lock().unwrap().push((head, buf[body_start..].to_vec()));
            if stall {
                tokio::time::sleep(Duration::from_secs(30)).await;
                continue;
            }
            let (status, extra) = answers[n.min(answers.len() - 1)];
            n += 1;
            let resp = format!(
                "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n{extra}\r\n"
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        }
    });
    Hook {
        url: url::Url::parse(&format!("http://{addr}/notify?secret=s3cret")).unwrap(),
        seen,
    }
}

fn quick() -> Retry {
    Retry {
        attempts: 4,
        base: Duration::from_millis(20),
        max: Duration::from_millis(100),
    }
}

#[tokio::test]
async fn rest_hook_retries_server_errors_then_delivers_with_the_channel_headers() {
    let h = hook(vec![(503, ""), (500, ""), (200, "")], false).await;
    let ep = Endpoint::new(
        h.url.clone(),
        &[("Authorization".into(), "Bearer abc".into())],
    )
    .unwrap();
    let d = RestHook::new(true)
        .unwrap()
        .post(
            &ep,
            b"{\"resourceType\":\"Bundle\"}",
            Duration::from_secs(5),
            &quick(),
        )
        .await
        .unwrap();
    assert_eq!((d.status, d.attempts), (200, 3));
    let seen = h.seen.lock().unwrap();
    assert_eq!(seen.len(), 3);
    for (head, body) in seen.iter() {
        let lower = head.to_ascii_lowercase();
        assert!(lower.starts_with("post /notify?secret=s3cret"), "{head}");
        assert!(
            lower.contains("content-type: application/fhir+json"),
            "{head}"
        );
        assert!(lower.contains("authorization: bearer abc"), "{head}");
        assert_eq!(body, b"{\"resourceType\":\"Bundle\"}");
    }
}

#[tokio::test]
async fn rest_hook_does_not_retry_refusals_or_follow_redirects() {
    for (status, extra) in [
        (400, ""),
        (404, ""),
        (302, "location: https://elsewhere.example/\r\n"),
    ] {
        let h = hook(vec![(status, extra)], false).await;
        let ep = Endpoint::new(h.url.clone(), &[]).unwrap();
        let e = RestHook::new(true)
            .unwrap()
            .post(&ep, b"{}", Duration::from_secs(5), &quick())
            .await
            .unwrap_err();
        assert_eq!((e.status(), e.attempts()), (Some(status), 1), "{e}");
        assert_eq!(h.seen.lock().unwrap().len(), 1);
    }
    // 429 and 408 are retried (Retry-After honoured up to the cap).
    let h = hook(
        vec![(429, "retry-after: 1\r\n"), (408, ""), (204, "")],
        false,
    )
    .await;
    let ep = Endpoint::new(h.url.clone(), &[]).unwrap();
    let started = std::time::Instant::now();
    let d = RestHook::new(true)
        .unwrap()
        .post(&ep, b"{}", Duration::from_secs(5), &quick())
        .await
        .unwrap();
    assert_eq!((d.status, d.attempts), (204, 3));
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "waited the capped Retry-After"
    );
}

#[tokio::test]
async fn rest_hook_gives_up_after_its_attempts_and_never_names_secrets() {
    let h = hook(vec![], true).await;
    let ep = Endpoint::new(h.url.clone(), &[("X-Secret".into(), "hunter2".into())]).unwrap();
    let retry = Retry {
        attempts: 2,
        ..quick()
    };
    let e = RestHook::new(true)
        .unwrap()
        .post(&ep, b"{}", Duration::from_millis(300), &retry)
        .await
        .unwrap_err();
    assert!(
        matches!(e, DeliveryError::Unreachable { attempts: 2, .. }),
        "{e:?}"
    );
    let said = format!("{e} {e:?} {ep:?}");
    assert!(
        !said.contains("s3cret") && !said.contains("hunter2"),
        "{said}"
    );
    assert!(said.contains("/notify"), "{said}");
    // Nobody listening at all.
    let dead = url::Url::parse("http://127.0.0.1:9/x").unwrap();
    let e = RestHook::new(true)
        .unwrap()
        .post(
            &Endpoint::new(dead, &[]).unwrap(),
            b"{}",
            Duration::from_secs(2),
            &retry,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, DeliveryError::Unreachable { .. }), "{e:?}");
}

#[tokio::test]
async fn rest_hook_refuses_private_endpoints_unless_allowed() {
    let h = hook(vec![(200, "")], false).await;
    let port = h.url.port().unwrap();
    let retry = Retry {
        attempts: 2,
        ..quick()
    };
    for u in [
        h.url.to_string(),
        format!("http://localhost:{port}/notify"),
        format!("http://[::ffff:127.0.0.1]:{port}/notify"),
    ] {
        let ep = Endpoint::new(url::Url::parse(&u).unwrap(), &[]).unwrap();
        let e = RestHook::new(false)
            .unwrap()
            .post(&ep, b"{}", Duration::from_secs(2), &retry)
            .await
            .unwrap_err();
        assert!(matches!(e, DeliveryError::Unreachable { .. }), "{u}: {e:?}");
        // The subscriber's text says nothing of why.
        assert_eq!(
            e.public_text(),
            "the endpoint could not be reached or refused the notification"
        );
    }
    assert!(h.seen.lock().unwrap().is_empty(), "nothing was sent");
    // Allowed, the same endpoint takes it.
    let ep = Endpoint::new(h.url.clone(), &[]).unwrap();
    let d = RestHook::new(true)
        .unwrap()
        .post(&ep, b"{}", Duration::from_secs(2), &retry)
        .await
        .unwrap();
    assert_eq!(d.status, 200);
    // Answers: the status only.
    let e = DeliveryError::Refused {
        endpoint: "x/y".into(),
        status: 404,
        attempts: 1,
    };
    assert_eq!(
        e.public_text(),
        "the endpoint could not be reached or refused the notification (HTTP 404)"
    );
}
