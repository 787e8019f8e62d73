//! The FHIRcast hub of `atlas serve` over real sockets: a server on
//! loopback, HTTP by reqwest, WebSockets by tokio-tungstenite. Each test
//! is named after the must-do line it checks. Tokens come from the test
//! RS256 issuer (`keys/`), so scopes, `hub.topic`, `patient` and `exp`
//! are set freely.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use atlas_serve::{AppState, IssuerConfig, ServeConfig};

const TOPIC: &str = "fdb2f928-5546-4f52-87a0-0648e9ded065";
const ALL: &str = "user/*.rs fhircast/*.read fhircast/*.write";

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Server {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    addr: SocketAddr,
    state: AppState,
    http: reqwest::Client,
}

fn keys_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/keys")
}

/// A server on a fresh lake trusting the test issuer, `tune` applied.
async fn server(tune: impl FnOnce(&mut ServeConfig)) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let lake = atlas_lake::Lake::open(
        dir.path().join("lake").to_str().unwrap(),
        Default::default(),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = ServeConfig::default();
    config.auth.issuers = vec![IssuerConfig {
        issuer: "https://idp.example/a".into(),
        audience: "atlas".into(),
        jwks_file: Some(keys_dir().join("rsa-jwks.json")),
        jwks_url: None,
        jwks_refresh_secs: 900,
    }];
    config.public_base_url = Some(format!("http://{addr}"));
    tune(&mut config);
    let state = AppState::open(lake, atlas_ontology::Ontology::builtin(), config)
        .await
        .unwrap();
    let app = atlas_serve::router(state.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let _ = rustls::crypto::ring::default_provider().install_default();
    Server {
        dir: dir.path().to_path_buf(),
        _dir: dir,
        addr,
        state,
        http: reqwest::Client::new(),
    }
}

/// An RS256 token from the test issuer with `claims` over the defaults.
fn jwt(claims: Value) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    let mut c = json!({"iss": "https://idp.example/a", "sub": "someone", "aud": "atlas",
        "exp": now + 600, "scope": "user/*.rs"});
    for (k, v) in claims.as_object().unwrap() {
        c[k] = v.clone();
    }
    let pem = std::fs::read_to_string(keys_dir().join("rsa-test.pem")).unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some("rsa-1".into());
    jsonwebtoken::encode(
        &header,
        &c,
        &jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// A token for `sub` with `scope`, bound to `TOPIC`, plus `extra` claims.
fn token(sub: &str, scope: &str, extra: Value) -> String {
    let mut c =
        json!({"sub": sub, "scope": scope, "hub.topic": TOPIC, "client_id": format!("app-{sub}")});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    jwt(c)
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn post(&self, path: &str, token: &str, ct: &str, body: String) -> (u16, String) {
        let r = self
            .http
            .post(self.url(path))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", ct)
            .body(body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut r = self.http.get(self.url(path));
        if let Some(t) = token {
            r = r.header("authorization", format!("Bearer {t}"));
        }
        let r = r.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// `POST /fhircast/hub` with a subscription form.
    async fn subscribe_raw(&self, token: &str, form: &[(&str, &str)]) -> (u16, Value) {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let (s, text) = self
            .post(
                "/fhircast/hub",
                token,
                "application/x-www-form-urlencoded",
                body,
            )
            .await;
        (
            s,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Subscribes: the `hub.channel.endpoint` URL.
    async fn subscribe(&self, token: &str, events: &str, extra: &[(&str, &str)]) -> String {
        let mut form = vec![
            ("hub.channel.type", "websocket"),
            ("hub.mode", "subscribe"),
            ("hub.topic", TOPIC),
            ("hub.events", events),
        ];
        form.extend_from_slice(extra);
        let (s, v) = self.subscribe_raw(token, &form).await;
        assert_eq!(s, 202, "{v}");
        v["hub.channel.endpoint"].as_str().unwrap().to_owned()
    }

    /// Subscribes and connects; returns the socket and its confirmation.
    async fn join(&self, token: &str, events: &str, name: &str) -> (Ws, Value, String) {
        let url = self
            .subscribe(token, events, &[("subscriber.name", name)])
            .await;
        let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap();
        let confirmation = recv(&mut ws).await.expect("a confirmation");
        assert_eq!(confirmation["hub.mode"], "subscribe", "{confirmation}");
        (ws, confirmation, url)
    }

    /// A request-context-change; the status.
    async fn publish(&self, token: &str, body: &Value) -> (u16, String) {
        self.post("/fhircast/hub", token, "application/json", body.to_string())
            .await
    }

    async fn audit(&self) -> Vec<atlas_audit::AuditEntry> {
        let lake = &self.state.lake;
        let store = atlas_audit::AuditStore::new(
            lake.object_store().clone(),
            &lake.path(""),
            Some(self.dir.join("lake")),
        );
        atlas_audit::records(&store)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.entry)
            .collect()
    }
}

fn event(event: &str, id: &str, context: Value) -> Value {
    json!({"timestamp": "2024-05-01T10:00:00.000Z", "id": id,
           "event": {"hub.topic": TOPIC, "hub.event": event, "context": context}})
}

fn patient_open(patient: &str, id: &str) -> Value {
    event(
        "Patient-open",
        id,
        json!([{"key": "patient", "resource": {"resourceType": "Patient", "id": patient}}]),
    )
}

/// The next JSON message within 5 s (pings skipped); `None` on close or
/// silence.
async fn recv(ws: &mut Ws) -> Option<Value> {
    recv_within(ws, Duration::from_secs(5)).await
}

async fn recv_within(ws: &mut Ws, d: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + d;
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next()).await.ok()??;
        match m.ok()? {
            Message::Text(t) => return serde_json::from_str(t.as_str()).ok(),
            Message::Close(_) => return None,
            _ => {}
        }
    }
}

/// Reads until the close frame (within `d`): the messages before it and
/// the close code.
async fn until_close(ws: &mut Ws, d: Duration) -> (Vec<Value>, Option<u16>) {
    let deadline = tokio::time::Instant::now() + d;
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => got.push(serde_json::from_str(t.as_str()).unwrap()),
            Ok(Some(Ok(Message::Close(f)))) => return (got, f.map(|f| u16::from(f.code))),
            Ok(Some(Ok(_))) => {}
            _ => return (got, None),
        }
    }
}

async fn ack(ws: &mut Ws, id: &str, status: &str) {
    ws.send(Message::Text(
        json!({"id": id, "status": status}).to_string().into(),
    ))
    .await
    .unwrap();
}

async fn close(ws: &mut Ws, code: u16) {
    let _ = ws
        .close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: "bye".into(),
        }))
        .await;
}

/// The default configuration: topics are bound by the tokens' claim.
fn bound_topics(_: &mut ServeConfig) {}

#[tokio::test]
async fn well_known_configuration_needs_no_token() {
    let s = server(bound_topics).await;
    for path in [
        "/.well-known/fhircast-configuration",
        "/fhircast/hub/.well-known/fhircast-configuration",
    ] {
        let (status, v) = s.get(path, None).await;
        assert_eq!(status, 200, "{path}: {v}");
        assert_eq!(v["websocketSupport"], true);
        let events = v["eventsSupported"].as_array().unwrap();
        for e in [
            "Patient-open",
            "Encounter-close",
            "DiagnosticReport-update",
            "SyncError",
        ] {
            assert!(events.contains(&json!(e)), "{e}");
        }
    }
    // Everything else needs one.
    let (status, _) = s.get(&format!("/fhircast/hub/{TOPIC}"), None).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn subscribe_answers_202_with_an_endpoint_and_the_hub_confirms_on_connect() {
    let s = server(bound_topics).await;
    let t = token("alice", ALL, json!({}));
    let url = s
        .subscribe(
            &t,
            "patient-open,Patient-close",
            &[("hub.lease_seconds", "120")],
        )
        .await;
    let prefix = format!("ws://{}/fhircast/ws/", s.addr);
    assert!(url.starts_with(&prefix), "{url}");
    let id = &url[prefix.len()..];
    assert_eq!(id.len(), 68, "unguessable: 244 random bits");
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    let c = recv(&mut ws).await.unwrap();
    assert_eq!(
        c,
        json!({"hub.mode": "subscribe", "hub.topic": TOPIC,
               "hub.events": "Patient-open,Patient-close", "hub.lease_seconds": 120})
    );
    // The endpoint is single use.
    let (mut again, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    let (msgs, code) = until_close(&mut again, Duration::from_secs(5)).await;
    assert_eq!(msgs[0]["hub.mode"], "denied", "{msgs:?}");
    assert_eq!(code, Some(1008));
    // An unknown endpoint is a 404 without an upgrade.
    let bad = format!("{prefix}{}", "0".repeat(64));
    assert!(
        tokio_tungstenite::connect_async(bad.as_str())
            .await
            .is_err()
    );
    assert_eq!(s.state.fhircast.hub().connected(), 1);
}

#[tokio::test]
async fn publish_patient_open_reaches_the_subscriber_which_acknowledges() {
    let s = server(bound_topics).await;
    let t = token("alice", ALL, json!({}));
    let (mut ws, _, _) = s.join(&t, "Patient-open", "viewer").await;
    let (status, body) = s.publish(&t, &patient_open("p1", "evt-1")).await;
    assert_eq!(status, 202, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["id"], "evt-1");
    assert_eq!(answer["delivered"], 1);
    let got = recv(&mut ws).await.unwrap();
    assert_eq!(got["id"], "evt-1");
    assert_eq!(got["event"]["hub.event"], "Patient-open");
    assert_eq!(got["event"]["context"][0]["resource"]["id"], "p1");
    assert_eq!(
        got["event"]["context.versionId"],
        answer["context.versionId"]
    );
    ack(&mut ws, "evt-1", "200").await;
    // Acknowledged: no SyncError, still subscribed after the timeout.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.state.fhircast.hub().connected(), 1);
}

#[tokio::test]
async fn request_context_change_is_echoed_to_the_sender_with_its_id() {
    let s = server(bound_topics).await;
    let sender = token("sender", ALL, json!({}));
    let other = token("other", ALL, json!({}));
    let (mut ws_sender, _, _) = s.join(&sender, "*", "sender-app").await;
    let (mut ws_other, _, _) = s.join(&other, "*", "other-app").await;
    let (status, _) = s
        .publish(&sender, &patient_open("p1", "the-senders-id"))
        .await;
    assert_eq!(status, 202);
    for ws in [&mut ws_sender, &mut ws_other] {
        let got = recv(ws).await.unwrap();
        assert_eq!(got["id"], "the-senders-id");
    }
    // On the hub URL with the topic in the path too, as fhir+json.
    let (status, _) = s
        .post(
            &format!("/fhircast/hub/{TOPIC}"),
            &sender,
            "application/fhir+json",
            patient_open("p2", "second").to_string(),
        )
        .await;
    assert_eq!(status, 202);
    assert_eq!(recv(&mut ws_sender).await.unwrap()["id"], "second");
    // A body whose topic is not the path's is refused.
    let (status, body) = s
        .post(
            "/fhircast/hub/another-topic",
            &sender,
            "application/json",
            patient_open("p2", "x").to_string(),
        )
        .await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn get_current_context_returns_the_context_with_its_version_id() {
    let s = server(bound_topics).await;
    let t = token("alice", ALL, json!({}));
    let path = format!("/fhircast/hub/{TOPIC}");
    let (status, empty) = s.get(&path, Some(&t)).await;
    assert_eq!(status, 200);
    assert_eq!(empty, json!({"context.type": "", "context": []}));
    let (mut ws, _, _) = s.join(&t, "*", "viewer").await;
    s.publish(&t, &patient_open("p1", "e1")).await;
    let sent = recv(&mut ws).await.unwrap();
    let (status, cur) = s.get(&path, Some(&t)).await;
    assert_eq!(status, 200, "{cur}");
    assert_eq!(cur["context.type"], "Patient");
    assert_eq!(cur["context.versionId"], sent["event"]["context.versionId"]);
    assert_eq!(cur["context"][0]["resource"]["id"], "p1");
    // DiagnosticReport: update with the version, then a stale one (409).
    let report = json!([
        {"key": "report", "resource": {"resourceType": "DiagnosticReport", "id": "r1", "subject": {"reference": "Patient/p1"}}},
        {"key": "patient", "resource": {"resourceType": "Patient", "id": "p1"}}
    ]);
    s.publish(&t, &event("DiagnosticReport-open", "e2", report))
        .await;
    let v1 = recv(&mut ws).await.unwrap()["event"]["context.versionId"].clone();
    let mut upd = event(
        "DiagnosticReport-update",
        "e3",
        json!([
            {"key": "report", "reference": {"reference": "DiagnosticReport/r1"}},
            {"key": "updates", "resource": {"resourceType": "Bundle", "type": "transaction", "entry": [
                {"request": {"method": "PUT"}, "resource": {"resourceType": "Observation", "id": "o1", "status": "preliminary"}}]}}
        ]),
    );
    upd["event"]["context.versionId"] = v1.clone();
    let (status, body) = s.publish(&t, &upd).await;
    assert_eq!(status, 202, "{body}");
    let got = recv(&mut ws).await.unwrap();
    assert_eq!(got["event"]["context.priorVersionId"], v1);
    let v2 = got["event"]["context.versionId"].clone();
    assert_ne!(v1, v2);
    let (status, body) = s.publish(&t, &upd).await;
    assert_eq!(status, 409, "stale version: {body}");
    let (_, cur) = s.get(&path, Some(&t)).await;
    assert_eq!(cur["context.type"], "DiagnosticReport");
    assert_eq!(cur["context.versionId"], v2);
    let content = cur["context"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["key"] == "content")
        .unwrap();
    assert_eq!(content["resource"]["entry"][0]["resource"]["id"], "o1");
}

#[tokio::test]
async fn unsubscribe_answers_202_then_denies_and_closes_the_socket() {
    let s = server(bound_topics).await;
    let t = token("alice", ALL, json!({}));
    let (mut ws, _, url) = s.join(&t, "Patient-open", "viewer").await;
    // Not someone else's to end.
    let mallory = token("mallory", ALL, json!({}));
    let unsub = [
        ("hub.channel.type", "websocket"),
        ("hub.channel.endpoint", url.as_str()),
        ("hub.mode", "unsubscribe"),
        ("hub.topic", TOPIC),
    ];
    let (status, _) = s.subscribe_raw(&mallory, &unsub).await;
    assert_eq!(status, 403);
    let (status, v) = s.subscribe_raw(&t, &unsub).await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["hub.channel.endpoint"], url.as_str());
    let (msgs, code) = until_close(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert_eq!(msgs[0]["hub.mode"], "denied");
    assert_eq!(msgs[0]["hub.topic"], TOPIC);
    assert_eq!(code, Some(1000));
    assert_eq!(s.state.fhircast.hub().subscriptions(), 0);
}

#[tokio::test]
async fn denied_without_a_fhircast_scope_or_a_topic_binding() {
    let s = server(|_| {}).await;
    let form = |topic: &'static str| {
        vec![
            ("hub.channel.type", "websocket"),
            ("hub.mode", "subscribe"),
            ("hub.topic", topic),
            ("hub.events", "Patient-open"),
        ]
    };
    // No fhircast/ scope.
    let no_scope = token("a", "user/*.rs", json!({}));
    let (status, v) = s.subscribe_raw(&no_scope, &form(TOPIC)).await;
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["parameters"]["hub.events"], "Patient-open", "{v}");
    // Only Encounter events may be read: Patient-open is not granted.
    let enc = token("a", "user/*.rs fhircast/Encounter-*.read", json!({}));
    assert_eq!(s.subscribe_raw(&enc, &form(TOPIC)).await.0, 403);
    // A wildcard is narrowed to what the scopes grant.
    let (status, v) = s
        .subscribe_raw(
            &enc,
            &[
                ("hub.channel.type", "websocket"),
                ("hub.mode", "subscribe"),
                ("hub.topic", TOPIC),
                ("hub.events", "*"),
            ],
        )
        .await;
    assert_eq!(status, 202, "{v}");
    // Bound to another topic, or to none (open_topics is off).
    let t = token("a", ALL, json!({}));
    let (status, v) = s.subscribe_raw(&t, &form("another-topic")).await;
    assert_eq!(status, 403);
    assert!(v["message"].as_str().unwrap().contains("another"), "{v}");
    let unbound = jwt(json!({"sub": "a", "scope": ALL}));
    let (status, v) = s.subscribe_raw(&unbound, &form(TOPIC)).await;
    assert_eq!(status, 403);
    assert!(
        v["message"].as_str().unwrap().contains("open_topics"),
        "{v}"
    );
    // Publishing needs the write scope.
    let reader = token("r", "user/*.rs fhircast/*.read", json!({}));
    let (status, body) = s.publish(&reader, &patient_open("p1", "x")).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("fhircast/Patient-open.write"), "{body}");
    let (status, _) = s.publish(&unbound, &patient_open("p1", "x")).await;
    assert_eq!(status, 403);
    // Protocol errors are 400s naming the parameter, media types 415.
    let (status, v) = s
        .subscribe_raw(&t, &[("hub.mode", "subscribe"), ("hub.topic", TOPIC)])
        .await;
    assert_eq!(status, 400);
    assert!(v["parameters"].get("hub.channel.type").is_some(), "{v}");
    let (status, _) = s
        .post("/fhircast/hub", &t, "text/plain", "hello".into())
        .await;
    assert_eq!(status, 415);
    let (status, body) = s
        .publish(&t, &event("Observation-open", "x", json!([])))
        .await;
    assert_eq!(status, 400, "{body}");
    // With open topics, an unbound token may use any topic.
    let open = server(|c| c.fhircast.open_topics = true).await;
    assert_eq!(
        open.subscribe_raw(&unbound, &form("any-topic")).await.0,
        202
    );
}

#[tokio::test]
async fn the_lease_is_clamped_to_the_token_lifetime_and_the_socket_closed_at_expiry() {
    let s = server(bound_topics).await;
    let now = jsonwebtoken::get_current_timestamp();
    let short = token("alice", ALL, json!({"exp": now + 3}));
    let (mut ws, confirmation, _) = s.join(&short, "Patient-open", "viewer").await;
    let lease = confirmation["hub.lease_seconds"].as_u64().unwrap();
    assert!(
        (1..=3).contains(&lease),
        "lease {lease} past the token's exp"
    );
    let started = std::time::Instant::now();
    let (msgs, code) = until_close(&mut ws, Duration::from_secs(10)).await;
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert_eq!(msgs[0]["hub.mode"], "denied");
    assert!(
        msgs[0]["hub.reason"].as_str().unwrap().contains("lease"),
        "{msgs:?}"
    );
    assert_eq!(code, Some(1000));
    // The subscriber whose token expired receives nothing more.
    let publisher = token("p", ALL, json!({}));
    s.publish(&publisher, &patient_open("p1", "late")).await;
    assert_eq!(s.state.fhircast.hub().subscriptions(), 0);
    // The hub's own bound applies too.
    let bounded = server(|c| {
        c.fhircast.max_lease_secs = 60;
    })
    .await;
    let t = token("alice", ALL, json!({}));
    let (_ws, c, _) = bounded.join(&t, "Patient-open", "viewer").await;
    assert_eq!(c["hub.lease_seconds"], 60);
}

#[tokio::test]
async fn reconnecting_gets_the_current_context_replayed() {
    let s = server(bound_topics).await;
    let t = token("alice", ALL, json!({}));
    s.publish(&t, &patient_open("p1", "opened-before")).await;
    let (mut ws, _, _) = s.join(&t, "Patient-open,Patient-close", "viewer").await;
    let replay = recv(&mut ws).await.unwrap();
    assert_eq!(replay["id"], "opened-before");
    ack(&mut ws, "opened-before", "200").await;
    close(&mut ws, 1000).await;
    // A new subscription (the old endpoint is spent) gets it again.
    let (mut again, _, _) = s.join(&t, "Patient-open", "viewer").await;
    let replay = recv(&mut again).await.unwrap();
    assert_eq!(replay["id"], "opened-before");
    assert_eq!(replay["event"]["context"][0]["resource"]["id"], "p1");
    // Not once the context is closed.
    let close_evt = event(
        "Patient-close",
        "closed",
        json!([{"key": "patient", "resource": {"resourceType": "Patient", "id": "p1"}}]),
    );
    assert_eq!(s.publish(&t, &close_evt).await.0, 202);
    let (mut third, _, _) = s.join(&t, "Patient-open", "viewer").await;
    assert!(
        recv_within(&mut third, Duration::from_millis(500))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn ack_timeout_broadcasts_a_sync_error_to_the_others() {
    let s = server(|c| {
        c.fhircast.ack_timeout_ms = 1000;
    })
    .await;
    let good = token("good", ALL, json!({}));
    let silent = token("silent", ALL, json!({}));
    let (mut ws_good, _, _) = s.join(&good, "Patient-open,SyncError", "good-app").await;
    let (mut ws_silent, _, _) = s.join(&silent, "Patient-open", "silent-app").await;
    s.publish(&good, &patient_open("p1", "needs-ack")).await;
    assert_eq!(recv(&mut ws_good).await.unwrap()["id"], "needs-ack");
    ack(&mut ws_good, "needs-ack", "200").await;
    assert_eq!(recv(&mut ws_silent).await.unwrap()["id"], "needs-ack");
    // The silent one never acknowledges.
    let err = recv_within(&mut ws_good, Duration::from_secs(5))
        .await
        .expect("a SyncError");
    assert_eq!(err["event"]["hub.event"], "SyncError");
    let coding = err["event"]["context"][0]["resource"]["issue"][0]["details"]["coding"]
        .as_array()
        .unwrap()
        .clone();
    let code = |system: &str| {
        coding
            .iter()
            .find(|c| c["system"].as_str().unwrap().ends_with(system))
            .map(|c| c["code"].clone())
    };
    assert_eq!(code("eventid"), Some(json!("needs-ack")));
    assert_eq!(code("eventname"), Some(json!("Patient-open")));
    assert_eq!(code("subscriber"), Some(json!("silent-app")));
    // ... and is unsubscribed.
    let (msgs, close_code) = until_close(&mut ws_silent, Duration::from_secs(5)).await;
    assert_eq!(msgs[0]["hub.mode"], "denied", "{msgs:?}");
    assert_eq!(close_code, Some(1008));
    // A refusing acknowledgement is a SyncError too.
    let refuser = token("refuser", ALL, json!({}));
    let (mut ws_ref, _, _) = s.join(&refuser, "Patient-open", "refusing-app").await;
    // It joins with p1's context replayed, and takes it.
    let replay = recv(&mut ws_ref).await.unwrap();
    assert_eq!(replay["id"], "needs-ack");
    ack(&mut ws_ref, "needs-ack", "200").await;
    s.publish(&good, &patient_open("p2", "refused")).await;
    assert_eq!(recv(&mut ws_good).await.unwrap()["id"], "refused");
    ack(&mut ws_good, "refused", "200").await;
    assert_eq!(recv(&mut ws_ref).await.unwrap()["id"], "refused");
    ack(&mut ws_ref, "refused", "409").await;
    let err = recv(&mut ws_good).await.unwrap();
    assert_eq!(err["event"]["hub.event"], "SyncError");
    assert!(err.to_string().contains("refusing-app"), "{err}");
}

#[tokio::test]
async fn close_codes_1000_and_1001_raise_no_sync_error() {
    let s = server(bound_topics).await;
    let t = token("w", ALL, json!({}));
    let (mut watcher, _, _) = s.join(&t, "SyncError", "watcher").await;
    for code in [1000, 1001] {
        let (mut ws, _, _) = s.join(&t, "Patient-open", "leaving").await;
        close(&mut ws, code).await;
        assert!(
            recv_within(&mut watcher, Duration::from_millis(700))
                .await
                .is_none(),
            "close {code} raised a SyncError"
        );
    }
    let (mut ws, _, _) = s.join(&t, "Patient-open", "crashing").await;
    close(&mut ws, 4000).await;
    let err = recv(&mut watcher)
        .await
        .expect("a SyncError for close 4000");
    assert_eq!(err["event"]["hub.event"], "SyncError");
    assert!(err.to_string().contains("crashing"), "{err}");
    // A dropped connection (no close frame) too.
    let (ws, _, _) = s.join(&t, "Patient-open", "vanishing").await;
    drop(ws);
    let err = recv(&mut watcher)
        .await
        .expect("a SyncError for a dropped socket");
    assert!(err.to_string().contains("vanishing"), "{err}");
}

#[tokio::test]
async fn a_subscriber_never_receives_an_event_about_a_patient_outside_its_scope() {
    let s = server(bound_topics).await;
    let publisher = token("pub", ALL, json!({}));
    // Bound to patient Y by the SMART `patient` claim.
    let bound = token(
        "bound",
        "patient/*.rs fhircast/*.read",
        json!({"patient": "Y"}),
    );
    let (mut ws, _, _) = s.join(&bound, "*", "bound-app").await;
    let (mut ws_pub, _, _) = s.join(&publisher, "*", "pub-app").await;
    assert_eq!(
        s.publish(&publisher, &patient_open("X", "about-x")).await.0,
        202
    );
    assert_eq!(recv(&mut ws_pub).await.unwrap()["id"], "about-x");
    // Nor does the current context give X away.
    let (_, cur) = s.get(&format!("/fhircast/hub/{TOPIC}"), Some(&bound)).await;
    assert_eq!(cur, json!({"context.type": "", "context": []}));
    // Nor an encounter of X, which names X only through the open.
    let enc = event(
        "Encounter-open",
        "enc-x",
        json!([{"key": "encounter", "resource": {"resourceType": "Encounter", "id": "e1", "subject": {"reference": "Patient/X"}}},
               {"key": "patient", "resource": {"resourceType": "Patient", "id": "X"}}]),
    );
    assert_eq!(s.publish(&publisher, &enc).await.0, 202);
    assert_eq!(
        s.publish(&publisher, &patient_open("Y", "about-y")).await.0,
        202
    );
    let first = recv(&mut ws).await.unwrap();
    assert_eq!(first["id"], "about-y", "X's events never arrived");
    // A replay to a new subscriber bound to Y skips X as well.
    s.publish(&publisher, &patient_open("X", "x-again")).await;
    let (mut late, _, _) = s.join(&bound, "*", "late-app").await;
    assert!(
        recv_within(&mut late, Duration::from_millis(500))
            .await
            .is_none()
    );
    // A publisher may not speak about a patient it may not see.
    let bound_writer = token(
        "bw",
        "patient/*.rs fhircast/*.write",
        json!({"patient": "Y"}),
    );
    let (status, body) = s.publish(&bound_writer, &patient_open("X", "nope")).await;
    assert_eq!(status, 403, "{body}");
}

#[tokio::test]
async fn events_and_subscriptions_are_audited_without_credentials() {
    let s = server(bound_topics).await;
    let t = token("alice", ALL, json!({}));
    let (mut ws, _, url) = s.join(&t, "*", "viewer").await;
    s.publish(&t, &patient_open("p7", "audited")).await;
    let _ = recv(&mut ws).await;
    let reader = token("r", "user/*.rs fhircast/*.read", json!({}));
    assert_eq!(
        s.publish(&reader, &patient_open("p8", "refused")).await.0,
        403
    );
    close(&mut ws, 1000).await;
    let endpoint_id = url.rsplit('/').next().unwrap().to_owned();
    let mut entries = Vec::new();
    for _ in 0..50 {
        entries = s.audit().await;
        let fc: Vec<_> = entries.iter().filter(|e| e.method == "FHIRCAST").collect();
        if fc.iter().any(|e| e.query.contains("reason=closed")) && fc.len() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fc: Vec<_> = entries.iter().filter(|e| e.method == "FHIRCAST").collect();
    let path = format!("/fhircast/hub/{TOPIC}");
    let published = fc
        .iter()
        .find(|e| e.query.contains("id=audited"))
        .expect("the publication's entry");
    assert_eq!(published.path, path);
    assert_eq!(published.decision, "allow");
    assert_eq!(published.patients, ["p7"]);
    assert_eq!(published.rows, Some(1));
    assert_eq!(published.subject.as_deref(), Some("alice"));
    let denied = fc
        .iter()
        .find(|e| e.query.contains("id=refused"))
        .expect("the refusal's entry");
    assert_eq!(denied.decision, "deny");
    assert_eq!(denied.status, 403);
    assert!(fc.iter().any(|e| e.query.contains("hub.mode=subscribe")));
    assert!(fc.iter().any(|e| e.query.contains("hub.mode=unsubscribe")));
    // Not in the hub's entries, nor in any request's (the socket's
    // upgrade request is recorded with the id redacted).
    assert!(
        entries.iter().any(|e| e.path == "/fhircast/ws/[redacted]"),
        "the upgrade request's record"
    );
    for e in &entries {
        let text = serde_json::to_string(e).unwrap();
        assert!(!text.contains(&endpoint_id), "endpoint id in {text}");
        assert!(!text.contains("eyJ"), "a token in {text}");
    }
}

#[tokio::test]
async fn context_changes_feed_the_events_stream() {
    let s = server(bound_topics).await;
    let mut changes = s.state.fhircast.context_changes();
    let t = token("alice", ALL, json!({}));
    s.publish(&t, &patient_open("p1", "for-sse")).await;
    let c = tokio::time::timeout(Duration::from_secs(5), changes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.topic, TOPIC);
    assert_eq!(c.event, "Patient-open");
    assert_eq!(c.id, "for-sse");
    assert_eq!(c.patient.as_deref(), Some("p1"));
    assert!(!c.version_id.is_empty());
    assert_eq!(
        c.notification["event"]["context.versionId"],
        c.version_id.as_str()
    );
}

#[tokio::test]
async fn shutdown_closes_sockets_with_1001() {
    let s = server(bound_topics).await;
    let t = token("alice", ALL, json!({}));
    let (mut ws, _, _) = s.join(&t, "*", "viewer").await;
    s.state.fhircast.shutdown();
    let (msgs, code) = until_close(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(msgs[0]["hub.mode"], "denied");
    assert_eq!(code, Some(1001));
    let (status, _) = s
        .subscribe_raw(
            &t,
            &[
                ("hub.channel.type", "websocket"),
                ("hub.mode", "subscribe"),
                ("hub.topic", TOPIC),
                ("hub.events", "*"),
            ],
        )
        .await;
    assert_eq!(status, 503);
}

#[tokio::test]
async fn a_disabled_hub_answers_404() {
    let s = server(|c| c.fhircast.enabled = false).await;
    let (status, _) = s.get("/.well-known/fhircast-configuration", None).await;
    assert_eq!(status, 404);
}

/// A report opened about Y, then shared content about X added to it.
fn report_open(report: &str, patient: &str, id: &str) -> Value {
    event(
        "DiagnosticReport-open",
        id,
        json!([{"key": "report", "resource": {"resourceType": "DiagnosticReport", "id": report,
                 "subject": {"reference": format!("Patient/{patient}")}}},
               {"key": "patient", "resource": {"resourceType": "Patient", "id": patient}}]),
    )
}

fn report_update(report: &str, version: &str, about: &str, id: &str) -> Value {
    let mut e = event(
        "DiagnosticReport-update",
        id,
        json!([{"key": "report", "reference": {"reference": format!("DiagnosticReport/{report}")}},
               {"key": "updates", "resource": {"resourceType": "Bundle", "id": "b1", "type": "transaction",
                 "entry": [{"request": {"method": "PUT"},
                            "resource": {"resourceType": "Observation", "id": "o-shared", "status": "final",
                                         "subject": {"reference": format!("Patient/{about}")}}}]}}]),
    );
    e["event"]["context.versionId"] = json!(version);
    e
}

/// `ContextChange.patients` names every patient of the event (the first
/// one stays in `patient`); the topic's context with shared content about
/// another patient is not released to a reader limited to the first.
#[tokio::test]
async fn context_changes_name_every_patient_and_shared_content_is_guarded() {
    let s = server(bound_topics).await;
    let mut changes = s.state.fhircast.context_changes();
    let t = token("alice", ALL, json!({}));
    assert_eq!(
        s.publish(&t, &report_open("r1", "Y", "open-r1")).await.0,
        202
    );
    let open = tokio::time::timeout(Duration::from_secs(5), changes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(open.patients, ["Y"]);
    let (status, body) = s
        .publish(&t, &report_update("r1", &open.version_id, "X", "upd-r1"))
        .await;
    assert_eq!(status, 202, "{body}");
    let upd = tokio::time::timeout(Duration::from_secs(5), changes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(upd.id, "upd-r1");
    assert!(
        upd.patients.contains(&"X".to_owned()) && upd.patients.contains(&"Y".to_owned()),
        "{:?}",
        upd.patients
    );
    assert_eq!(upd.patient.as_ref(), upd.patients.first());
    // A reader bound to Y may not read the context that now holds X's
    // observation.
    let bound = token(
        "bound",
        "patient/*.rs fhircast/*.read",
        json!({"patient": "Y"}),
    );
    let (_, cur) = s.get(&format!("/fhircast/hub/{TOPIC}"), Some(&bound)).await;
    assert!(!cur.to_string().contains("o-shared"), "{cur}");
    assert_eq!(cur, json!({"context.type": "", "context": []}));
    // One who may see both does.
    let (_, cur) = s.get(&format!("/fhircast/hub/{TOPIC}"), Some(&t)).await;
    assert!(cur.to_string().contains("o-shared"), "{cur}");
}

/// A re-subscription renews the lease of a connected socket: the socket
/// stays open past the first lease's end and still receives events.
#[tokio::test]
async fn a_renewed_lease_keeps_the_socket_open() {
    let s = server(bound_topics).await;
    let t = token("alice", ALL, json!({}));
    let url = s
        .subscribe(&t, "Patient-open", &[("hub.lease_seconds", "1")])
        .await;
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    let confirmation = recv(&mut ws).await.unwrap();
    assert_eq!(confirmation["hub.lease_seconds"], 1);
    let renewed = s
        .subscribe(
            &t,
            "Patient-open",
            &[("hub.lease_seconds", "60"), ("hub.channel.endpoint", &url)],
        )
        .await;
    assert_eq!(renewed, url);
    let again = recv(&mut ws).await.unwrap();
    assert_eq!(again["hub.lease_seconds"], 60, "{again}");
    // Past the first lease and the socket's grace.
    let (msgs, code) = until_close(&mut ws, Duration::from_secs(4)).await;
    assert_eq!(code, None, "closed at the first lease's end: {msgs:?}");
    assert_eq!(s.state.fhircast.hub().subscriptions(), 1);
    assert_eq!(s.publish(&t, &patient_open("p1", "after")).await.0, 202);
    assert_eq!(recv(&mut ws).await.unwrap()["id"], "after");
}
