//! `GET /events` (Server-Sent Events) and live views: change notices
//! follow ingest, carry ids and resume from `Last-Event-ID` without loss or
//! repetition, tickets stand in for bearer tokens once, the audit holds a
//! connection and a closing record and never a ticket, a principal hears
//! only of its own rows, and `[views] auto_refresh` makes new data visible
//! with every view pinned to one store version.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use futures::StreamExt;
use serde_json::{Value as Json, json};
use tower::ServiceExt;

use atlas_lake::{IngestOptions, Lake, LeaseOptions, Progress, WriterLease};
use atlas_serve::{AppState, router};

use crate::access::{LOAD, call, call_json, jwt, world};

/// One parsed SSE event.
#[derive(Debug, Clone)]
pub(crate) struct SseEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: Json,
}

/// The events of an SSE body (comments and `retry:` skipped).
pub(crate) fn sse_events(body: &str) -> Vec<SseEvent> {
    let mut out = Vec::new();
    for block in body.split("\n\n") {
        let (mut id, mut event, mut data) = (None, "message".to_owned(), String::new());
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("id: ") {
                id = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("event: ") {
                event = v.to_owned();
            } else if let Some(v) = line.strip_prefix("data: ") {
                data.push_str(v);
            }
        }
        if !data.is_empty() {
            out.push(SseEvent {
                id,
                event,
                data: serde_json::from_str(&data).unwrap(),
            });
        }
    }
    out
}

fn observation(id: &str, patient: &str) -> String {
    json!({"resourceType": "Observation", "id": id, "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": format!("Patient/{patient}")},
        "valueQuantity": {"value": 72, "unit": "/min"}})
    .to_string()
}

/// Ingests `lines` as one file, waiting for the writer lease (live views
/// take it too).
pub(crate) async fn ingest_lines(lake: &Lake, dir: &Path, name: &str, lines: &[String]) {
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let lease = WriterLease::acquire(
        lake,
        &LeaseOptions {
            command: "test ingest".into(),
            wait: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let set =
        atlas_ingest::collect_inputs(&[path.display().to_string()], &mut std::io::empty()).unwrap();
    let opts = IngestOptions {
        lease: Some(lease.clone()),
        ..Default::default()
    };
    let report = atlas_lake::ingest(lake, &set.inputs, &opts, &Progress::default())
        .await
        .unwrap();
    assert!(report.outcomes.reconciles());
    lease.release().await.unwrap();
}

/// An open SSE response body, read as it arrives.
struct Sse {
    body: axum::body::BodyDataStream,
    text: String,
    headers: axum::http::HeaderMap,
}

impl Sse {
    async fn open(state: &AppState, uri: &str, token: Option<&str>, last: Option<&str>) -> Sse {
        let mut req = Request::builder().method("GET").uri(uri);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if let Some(l) = last {
            req = req.header("last-event-id", l);
        }
        let response = router(state.clone())
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let headers = response.headers().clone();
        Sse {
            body: response.into_body().into_data_stream(),
            text: String::new(),
            headers,
        }
    }

    /// Reads until `n` change events arrived (or panics after `secs`).
    async fn changes(&mut self, n: usize, secs: u64) -> Vec<SseEvent> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let got: Vec<SseEvent> = sse_events(&self.text)
                .into_iter()
                .filter(|e| e.event == "change")
                .collect();
            if got.len() >= n {
                return got;
            }
            match tokio::time::timeout_at(deadline, self.body.next()).await {
                Ok(Some(chunk)) => self
                    .text
                    .push_str(&String::from_utf8_lossy(&chunk.unwrap())),
                Ok(None) => return got,
                Err(_) => panic!(
                    "{n} change events did not arrive in {secs} s: {}",
                    self.text
                ),
            }
        }
    }

    /// Reads until `needle` appears in the raw stream.
    async fn until(&mut self, needle: &str, secs: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        while !self.text.contains(needle) {
            match tokio::time::timeout_at(deadline, self.body.next()).await {
                Ok(Some(chunk)) => self
                    .text
                    .push_str(&String::from_utf8_lossy(&chunk.unwrap())),
                _ => panic!("{needle:?} did not arrive in {secs} s: {}", self.text),
            }
        }
    }
}

const EVERYONE: &str = "[[rule]]\nid = \"everyone\"\neffect = \"allow\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_notices_follow_ingest_and_resume_from_last_event_id_without_loss_or_repeat() {
    let w = world(4, None).await;
    let state = w
        .server_with(EVERYONE, |c| {
            c.events.poll_ms = 50;
            c.events.heartbeat_secs = 1;
        })
        .await;
    let token = jwt(json!({}));
    let p = w.patient_ids().into_iter().next().unwrap();
    let mut sse = Sse::open(&state, "/events", Some(&token), None).await;
    assert_eq!(sse.headers["content-type"], "text/event-stream");
    let cache = sse.headers["cache-control"].to_str().unwrap();
    assert!(
        cache.contains("no-cache") && cache.contains("no-transform") && cache.contains("no-store"),
        "{cache}"
    );
    // Heartbeats keep the connection alive while nothing changes.
    sse.until(": heartbeat", 5).await;
    let first: Vec<String> = (0..3)
        .map(|i| observation(&format!("live-a{i}"), &p))
        .collect();
    ingest_lines(&w.lake, &w.dir, "a.ndjson", &first).await;
    let got = sse.changes(3, 20).await;
    assert_eq!(got.len(), 3, "{got:?}");
    for e in &got {
        assert!(e.id.is_some(), "every event has an id: {e:?}");
        assert_eq!(e.data["op"], "create");
        assert_eq!(e.data["type"], "Observation");
        assert_eq!(e.data["patient"], json!(p));
    }
    let last = got[1].id.clone().unwrap();
    drop(sse);

    // Missed while away: the third of the first batch and two more.
    let second: Vec<String> = (0..2)
        .map(|i| observation(&format!("live-b{i}"), &p))
        .collect();
    ingest_lines(&w.lake, &w.dir, "b.ndjson", &second).await;
    let mut again = Sse::open(&state, "/events?once=true", Some(&token), Some(&last)).await;
    let resumed = again.changes(usize::MAX, 20).await;
    let ids: Vec<&str> = resumed
        .iter()
        .map(|e| e.data["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["live-a2", "live-b0", "live-b1"], "{resumed:?}");
    let event_ids: BTreeSet<&str> = resumed.iter().map(|e| e.id.as_deref().unwrap()).collect();
    assert_eq!(event_ids.len(), 3);
    assert!(!event_ids.contains(last.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_tickets_are_single_use_and_the_audit_holds_the_connection_not_the_ticket() {
    let w = world(4, None).await;
    let state = w
        .server_with(EVERYONE, |c| {
            c.audit.enabled = true;
            c.audit.start_record_after_ms = 0;
        })
        .await;
    let token = jwt(json!({"sub": "sse-user"}));
    let (s, t) = call_json(&state, "POST", "/events/ticket", &token, None, None).await;
    assert_eq!(s, StatusCode::OK, "{t}");
    let ticket = t["ticket"].as_str().unwrap().to_owned();
    assert!(t["expiresIn"].as_u64().unwrap() <= 60);
    let uri = format!("/events?ticket={ticket}&lastEventId=-1&once=true&types=Observation");
    let mut sse = Sse::open(&state, &uri, None, None).await;
    let got = sse.changes(usize::MAX, 20).await;
    assert_eq!(got.len(), w.observations.len());
    let patients: BTreeSet<String> = got
        .iter()
        .map(|e| e.data["patient"].as_str().unwrap().to_owned())
        .collect();
    // Used once: a second connection with it is refused.
    let (s, _) = call(&state, "GET", &uri, "not-a-token", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Without a ticket or token: 401.
    let (s, _) = call(&state, "GET", "/events", "garbage", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    tokio::time::sleep(Duration::from_millis(300)).await;
    let store = atlas_audit::AuditStore::new(
        w.lake.object_store().clone(),
        &w.lake.path(""),
        Some(w.dir.join("lake")),
    );
    let trail = atlas_audit::records(&store).await.unwrap();
    let text = serde_json::to_string(&trail).unwrap();
    assert!(!text.contains(&ticket), "the audit never holds a ticket");
    let sse: Vec<&atlas_audit::AuditEntry> = trail
        .iter()
        .map(|r| &r.entry)
        .filter(|e| e.path == "/events" && e.status == 200)
        .collect();
    let closing = sse
        .iter()
        .find(|e| e.rows.is_some())
        .unwrap_or_else(|| panic!("a closing record: {sse:#?}"));
    assert_eq!(closing.subject.as_deref(), Some("sse-user"));
    assert_eq!(closing.rows, Some(got.len() as u64));
    assert_eq!(closing.patient_count, Some(patients.len() as u64));
    assert!(
        sse.iter().any(|e| e.rows.is_none()),
        "a connection record: {sse:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_principal_hears_only_of_changes_to_rows_it_may_see() {
    let w = world(4, None).await;
    let state = w
        .server_with(EVERYONE, |c| {
            c.events.poll_ms = 50;
        })
        .await;
    let ids: Vec<String> = w.patient_ids().into_iter().collect();
    let (mine, other) = (&ids[0], &ids[1]);
    let token = jwt(json!({"scope": "patient/*.rs", "patient": mine}));
    let mut sse = Sse::open(&state, "/events", Some(&token), None).await;
    let lines = vec![
        observation("scope-x1", other),
        observation("scope-m1", mine),
        observation("scope-x2", other),
    ];
    ingest_lines(&w.lake, &w.dir, "c.ndjson", &lines).await;
    ingest_lines(
        &w.lake,
        &w.dir,
        "d.ndjson",
        &[observation("scope-m2", mine)],
    )
    .await;
    let got = sse.changes(2, 20).await;
    let seen: Vec<&str> = got.iter().map(|e| e.data["id"].as_str().unwrap()).collect();
    assert_eq!(seen, ["scope-m1", "scope-m2"]);
    assert!(!sse.text.contains("scope-x"), "{}", sse.text);
    assert!(!sse.text.contains(other.as_str()), "{}", sse.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_views_show_new_data_within_seconds_pinned_to_one_store_version() {
    let w = world(4, None).await;
    let state = w
        .server_with(EVERYONE, |c| {
            c.events.poll_ms = 50;
            c.views.auto_refresh = true;
        })
        .await;
    let token = jwt(json!({}));
    let p = w.patient_ids().into_iter().next().unwrap();
    ingest_lines(&w.lake, &w.dir, "e.ndjson", &[observation("fresh-1", &p)]).await;
    let store = atlas_lake::ChangeFeed::new(w.lake.clone())
        .latest_version()
        .await
        .unwrap()
        .unwrap() as u64;
    let body = json!({"objectSet": {"type": "static", "objectType": "Observation", "objects": ["fresh-1"]}});
    let started = std::time::Instant::now();
    loop {
        let (s, page) = call_json(&state, "POST", LOAD, &token, None, Some(&body)).await;
        assert_eq!(s, StatusCode::OK, "{page}");
        if page["data"].as_array().unwrap().len() == 1 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the new Observation never showed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every view and the store are pinned to the versions that reflect the
    // newest store version.
    let pinned = state.tables.pinned().expect("a pinned set");
    assert!(pinned.store_version >= store, "{pinned:?}");
    // The store is not pinned: reads by key and policy patient sets see
    // deletions and revocations at once.
    assert!(
        !pinned.tables.contains_key("tables/resources"),
        "{pinned:?}"
    );
    for v in atlas_viewstore::ViewStore::new(w.lake.clone())
        .list()
        .await
        .unwrap()
    {
        let dir = v.table_dir();
        assert!(pinned.tables.contains_key(&dir), "{dir} pinned");
        let at = pinned.tables[&dir];
        // The pinned version of each view reflects the pinned store version.
        let mut pinned_table = w.lake.table_at(&dir).await.unwrap().unwrap();
        pinned_table.load_version(at).await.unwrap();
        let r = pinned_table
            .snapshot()
            .unwrap()
            .transaction_version(pinned_table.log_store().as_ref(), v.app_id())
            .await
            .unwrap();
        assert_eq!(r, Some(pinned.store_version as i64), "{dir}");
    }
}

impl Sse {
    /// The `context` events read so far.
    fn contexts(&self) -> Vec<SseEvent> {
        sse_events(&self.text)
            .into_iter()
            .filter(|e| e.event == "context")
            .collect()
    }
}

fn patient_event(topic: &str, event: &str, id: &str, patient: &str) -> Json {
    json!({"timestamp": "2026-12-07T10:00:00Z", "id": id, "event": {
        "hub.topic": topic, "hub.event": event,
        "context": [{"key": "patient", "resource": {"resourceType": "Patient", "id": patient}}]}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_carries_the_fhircast_context_of_the_token_s_topic_within_its_rows() {
    let w = world(4, None).await;
    let state = w.server(EVERYONE).await;
    let ids: Vec<String> = w.patient_ids().into_iter().collect();
    let (x, y) = (&ids[0], &ids[1]);
    let topic = "sse-topic";
    let publisher = jwt(json!({"hub.topic": topic, "scope": "user/*.rs fhircast/*.write"}));
    let everyone = jwt(json!({"hub.topic": topic, "scope": "user/*.rs fhircast/*.read"}));
    let only_y = jwt(
        json!({"hub.topic": topic, "scope": "patient/*.rs fhircast/Patient-open.read", "patient": y}),
    );
    let no_scope = jwt(json!({"hub.topic": topic, "scope": "user/*.rs"}));
    let mut a = Sse::open(&state, "/events", Some(&everyone), None).await;
    let mut b = Sse::open(&state, "/events", Some(&only_y), None).await;
    let mut c = Sse::open(&state, "/events", Some(&no_scope), None).await;
    // Another topic is refused unless the token is bound to it.
    let (s, _) = call(&state, "GET", "/events?topic=other", &everyone, None, None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    for (event, id, p) in [
        ("Patient-open", "e1", x),
        ("Patient-close", "e2", x),
        ("Patient-open", "e3", y),
    ] {
        let body = patient_event(topic, event, id, p);
        let (s, r) = call(
            &state,
            "POST",
            "/fhircast/hub",
            &publisher,
            None,
            Some(&body),
        )
        .await;
        assert_eq!(
            s,
            StatusCode::ACCEPTED,
            "{event}: {}",
            String::from_utf8_lossy(&r)
        );
    }
    a.until("\"e3\"", 10).await;
    let got: Vec<String> = a
        .contexts()
        .iter()
        .map(|e| e.data["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got, ["e1", "e2", "e3"]);
    assert_eq!(a.contexts()[0].data["event"], "Patient-open");
    assert!(
        !a.contexts()[0].data["versionId"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    // Only Y's opening reaches the patient-bound token.
    b.until("\"e3\"", 10).await;
    let got: Vec<String> = b
        .contexts()
        .iter()
        .map(|e| e.data["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got, ["e3"], "{}", b.text);
    assert!(!b.text.contains(x.as_str()), "{}", b.text);
    // No fhircast/ read scope: no context at all.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = tokio::time::timeout(Duration::from_millis(200), c.body.next()).await;
    assert!(c.contexts().is_empty(), "{}", c.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fhircast_context_resources_leave_as_the_grant_lets_them() {
    let w = world(4, None).await;
    let state = w
        .server(&format!(
            "{EVERYONE}[[rule]]\nid = \"no-names\"\neffect = \"deny\"\nhide = [\"Patient.name\"]\n"
        ))
        .await;
    let p = w.patient_ids().into_iter().next().unwrap();
    let topic = "hidden-topic";
    let publisher = jwt(json!({"hub.topic": topic, "scope": "user/*.rs fhircast/*.write"}));
    let reader = jwt(json!({"hub.topic": topic, "scope": "user/*.rs fhircast/*.read"}));
    let mut sse = Sse::open(&state, "/events", Some(&reader), None).await;
    let body = json!({"timestamp": "2026-12-07T10:00:00Z", "id": "h1", "event": {
        "hub.topic": topic, "hub.event": "Patient-open",
        "context": [{"key": "patient", "resource": {"resourceType": "Patient", "id": p,
            "name": [{"family": "Secretname"}], "gender": "female"}}]}});
    let (s, r) = call(
        &state,
        "POST",
        "/fhircast/hub",
        &publisher,
        None,
        Some(&body),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&r));
    sse.until("\"h1\"", 10).await;
    let ctx = &sse.contexts()[0].data["notification"]["event"]["context"][0]["resource"];
    assert_eq!(ctx["gender"], "female", "{ctx}");
    assert!(ctx.get("name").is_none(), "{ctx}");
    assert!(!sse.text.contains("Secretname"));
    // The current context over HTTP leaves the same way.
    let (s, current) = call(
        &state,
        "GET",
        &format!("/fhircast/hub/{topic}"),
        &reader,
        None,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let current = String::from_utf8(current).unwrap();
    assert!(
        current.contains("female") && !current.contains("Secretname"),
        "{current}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_deidentifying_grant_notices_carry_hashed_ids_only() {
    const KEY: &str = "events-deid-key";
    let w = world(4, None).await;
    let key_file = w.dir.join("events-deid.key");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    let state = w
        .server_with(
            "[[rule]]\nid = \"registry\"\neffect = \"allow\"\ndeid = \"safe-harbor-minimal\"\n",
            |c| c.deid.key_file = Some(key_file.clone()),
        )
        .await;
    let engine = atlas_deid::Deidentifier::new(
        atlas_deid::profile::by_name("safe-harbor-minimal", KEY).unwrap(),
    );
    let token = jwt(json!({}));
    let (s, b) = call(
        &state,
        "GET",
        "/events?lastEventId=-1&once=true&types=Patient",
        &token,
        None,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let body = String::from_utf8(b).unwrap();
    let got: Vec<SseEvent> = sse_events(&body)
        .into_iter()
        .filter(|e| e.event == "change")
        .collect();
    assert_eq!(got.len(), w.patients.len(), "{body}");
    let hashed: BTreeSet<String> = w.patients.keys().map(|p| engine.hash(p)).collect();
    for e in &got {
        let id = e.data["id"].as_str().unwrap();
        assert!(hashed.contains(id), "{id} is not a hashed id");
        for gone in ["patient", "lastUpdated", "version"] {
            assert!(e.data.get(gone).is_none(), "{gone} in {}", e.data);
        }
    }
    for p in w.patients.keys() {
        assert!(!body.contains(p.as_str()), "{p} in {body}");
    }
    // A filter on a real patient id would link it to the hashed ones.
    let real = w.patients.keys().next().unwrap();
    let (_, b) = call(
        &state,
        "GET",
        &format!("/events?lastEventId=-1&once=true&patient={real}"),
        &token,
        None,
        None,
    )
    .await;
    let body = String::from_utf8(b).unwrap();
    assert!(
        !sse_events(&body).iter().any(|e| e.event == "change"),
        "{body}"
    );
    // Ids below -1 are not positions in the feed.
    let (s, _) = call(&state, "GET", "/events?lastEventId=-5", &token, None, None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}
