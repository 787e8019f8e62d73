//! No request can hang the server: GraphQL documents that would cost
//! exponential time are refused in linear time while `/health` answers,
//! requests past their deadline are cut and audited as cut, and one
//! principal cannot take more than its turns.
//!
//! These run the router on a real TCP listener, so a blocked worker would
//! show as `/health` not answering.

use std::time::{Duration, Instant};

use serde_json::{Value as Json, json};

use atlas_lake::Lake;
use atlas_serve::{AppState, DevIssuer, ServeConfig, TokenRequest, router};

struct Server {
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
    lake: Lake,
    state: AppState,
    base: String,
    issuer: DevIssuer,
    http: reqwest::Client,
}

async fn server(patients: usize, edit: impl FnOnce(&mut ServeConfig)) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::open(
        dir.path().join("lake").to_str().unwrap(),
        Default::default(),
    )
    .unwrap();
    let data = crate::objects::synth(dir.path(), patients, 3);
    crate::objects::ingest_and_refresh(&lake, &data).await;
    let mut config = ServeConfig::default();
    config.auth.dev = true;
    edit(&mut config);
    let state = AppState::open(lake.clone(), atlas_ontology::Ontology::builtin(), config)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = router(state.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let issuer = DevIssuer::open(&lake).await.unwrap();
    Server {
        dir: dir.path().to_path_buf(),
        _dir: dir,
        lake,
        state,
        base,
        issuer,
        http: reqwest::Client::new(),
    }
}

impl Server {
    fn token(&self, sub: &str) -> String {
        self.issuer
            .mint(&TokenRequest {
                subject: sub.into(),
                scope: "user/*.rs".into(),
                ttl_secs: 600,
                ..Default::default()
            })
            .unwrap()
    }

    async fn graphql(&self, token: &str, query: &str) -> (u16, Json, Duration) {
        self.graphql_body(token, json!({ "query": query })).await
    }

    async fn graphql_body(&self, token: &str, request: Json) -> (u16, Json, Duration) {
        let started = Instant::now();
        let r = self
            .http
            .post(format!("{}/graphql", self.base))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(request.to_string())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body: Json = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        (status, body, started.elapsed())
    }

    async fn post(&self, token: &str, path: &str, body: &Json) -> (u16, Json) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let bytes = r.bytes().await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap_or(Json::Null))
    }

    async fn audit(&self) -> Vec<atlas_audit::AuditRecord> {
        let store = atlas_audit::AuditStore::new(
            self.lake.object_store().clone(),
            &self.lake.path(""),
            Some(self.dir.join("lake")),
        );
        atlas_audit::records(&store).await.unwrap()
    }
}

/// `fragment F0 { id ...F1 ...F1 } … fragment F<n> { id }`: 2^n fields
/// once expanded.
fn fragment_chain(levels: usize) -> String {
    let mut q = String::from("{ PatientAll(first: 1) { nodes { ...F0 } } }\n");
    for i in 0..levels {
        q.push_str(&format!(
            "fragment F{i} on Patient {{ id ...F{n} ...F{n} }}\n",
            n = i + 1
        ));
    }
    q.push_str(&format!("fragment F{levels} on Patient {{ id }}\n"));
    q
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graphql_bombs_are_refused_fast_while_health_answers() {
    let s = server(3, |_| {}).await;
    let token = s.token("mallory");
    // Warm up the connection pool and the schema.
    let (status, body, _) = s
        .graphql(&token, "{ PatientAll(first: 1) { nodes { id } } }")
        .await;
    assert_eq!(status, 200, "{body}");

    // /health is polled the whole time the attacks run.
    let health = {
        let (http, url) = (s.http.clone(), format!("{}/health", s.base));
        tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            let mut answered = 0;
            let until = Instant::now() + Duration::from_millis(1500);
            while Instant::now() < until {
                let t = Instant::now();
                let r = http.get(&url).send().await.unwrap();
                assert_eq!(r.status().as_u16(), 200);
                slowest = slowest.max(t.elapsed());
                answered += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (answered, slowest)
        })
    };

    // 40 levels of doubling fragments: 2^40 fields; refused by counting
    // each fragment once.
    let (status, body, took) = s.graphql(&token, &fragment_chain(40)).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["errors"][0]["extensions"]["errorName"], "QueryTooComplex",
        "{body}"
    );
    eprintln!("fragment chain, 40 levels: {took:?}");
    assert!(
        took < Duration::from_millis(100),
        "fragment chain took {took:?}"
    );

    // The same chain behind an operationName that names nothing, or
    // behind a decoy operation: async-graphql validates every operation,
    // so every operation is bounded.
    for (name, doc) in [
        ("x", fragment_chain(30)),
        (
            "A",
            format!("query A {{ __typename }}\nquery B {}", fragment_chain(30)),
        ),
    ] {
        let (status, body, took) = s
            .graphql_body(&token, json!({"query": doc, "operationName": name}))
            .await;
        assert_eq!(status, 400, "{body}");
        eprintln!("fragment chain behind operationName {name}: {took:?}");
        assert!(took < Duration::from_millis(100), "{name}: {took:?}");
    }

    // 1,000 aliases of a connection asking for 10,000 rows each.
    let aliases: String = (0..1000)
        .map(|i| format!("a{i}: ObservationAll(first: 10000) {{ nodes {{ id }} }} "))
        .collect();
    let (status, body, took) = s.graphql(&token, &format!("{{ {aliases} }}")).await;
    assert_eq!(status, 400, "{body}");
    eprintln!("1,000 aliases: {took:?}");
    assert!(
        took < Duration::from_millis(100),
        "1000 aliases took {took:?}"
    );

    // Root fields reserve their rows before any runs: 11 × 10,000 is over
    // the 100,000 budget even though the lake holds far fewer rows.
    let eleven: String = (0..11)
        .map(|i| format!("a{i}: ObservationAll(first: 10000) {{ nodes {{ id }} }} "))
        .collect();
    let (status, body, _) = s.graphql(&token, &format!("{{ {eleven} }}")).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("110000"), "{body}");

    // Deep nesting is refused before the grammar recurses.
    let deep = format!("{{ {}id{} }}", "a { ".repeat(5000), " }".repeat(5000));
    let (status, body, took) = s.graphql(&token, &deep).await;
    assert_eq!(status, 400, "{body}");
    eprintln!("5,000 nested braces: {took:?}");
    assert!(
        took < Duration::from_millis(100),
        "deep nesting took {took:?}"
    );

    // At the field cap, repeated response names (what the overlapping-
    // fields rule compares pairwise) still validate quickly.
    let same = format!("{{ patient(id: \"x\") {{ {} }} }}", "id ".repeat(4_990));
    let (status, body, took) = s.graphql(&token, &same).await;
    assert_eq!(status, 200, "{body}");
    eprintln!("4,990 repeated fields: {took:?}");
    assert!(
        took < Duration::from_millis(1_000),
        "repeated fields took {took:?}"
    );

    // A fair document with fragments still runs.
    let (status, body, _) = s.graphql(&token, &fragment_chain(6)).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["data"]["PatientAll"]["nodes"][0]["id"].is_string(),
        "{body}"
    );

    let (answered, slowest) = health.await.unwrap();
    assert!(answered > 10, "/health answered {answered} times");
    assert!(
        slowest < Duration::from_millis(500),
        "/health took {slowest:?}"
    );

    // The refusals are audited like any answer; GraphQL records count rows.
    let recs = s.audit().await;
    let gql: Vec<_> = recs
        .iter()
        .filter(|r| r.entry.path == "/graphql" && r.entry.decision != "started")
        .collect();
    assert_eq!(gql.len(), 9, "{gql:#?}");
    assert_eq!(gql[1].entry.status, 400);
    assert_eq!(gql[0].entry.rows, Some(1), "{:#?}", gql[0]);
    assert_eq!(gql[8].entry.rows, Some(1), "{:#?}", gql[8]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_their_deadline_are_cut_and_audited() {
    // 1 ms: no object-set query (a DataFusion plan) finishes in time.
    let s = server(3, |c| c.limits.request_timeout_ms = 1).await;
    let token = s.token("alice");
    let (status, body) = s
        .post(
            &token,
            "/api/v2/ontologies/atlas/objectSets/loadObjects",
            &json!({"objectSet": {"type": "base", "objectType": "Observation"}}),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["errorName"], "DeadlineExceeded", "{body}");
    let recs = s.audit().await;
    let cut = recs
        .iter()
        .rfind(|r| r.entry.decision != "started")
        .unwrap();
    assert_eq!(cut.entry.decision, "cut: deadline exceeded", "{cut:#?}");
    assert_eq!(cut.entry.status, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_principal_cannot_take_more_than_its_turns() {
    let s = server(3, |c| {
        c.limits.max_concurrent_per_principal = 1;
        c.limits.request_timeout_ms = 2_000;
    })
    .await;
    let (alice, bob) = (s.token("alice"), s.token("bob"));
    let load = json!({"objectSet": {"type": "base", "objectType": "Patient"}, "pageSize": 1});
    const LOAD: &str = "/api/v2/ontologies/atlas/objectSets/loadObjects";
    // Alice's one turn is taken (as by a long request of hers).
    let held = s
        .state
        .limiter
        .try_turn(atlas_serve::auth::DEV_ISSUER, "alice", 1)
        .expect("a free turn");
    let started = Instant::now();
    let (status, body) = s.post(&alice, LOAD, &load).await;
    assert_eq!(
        status, 503,
        "alice waits for a turn until her deadline: {body}"
    );
    assert!(started.elapsed() >= Duration::from_millis(1_900));
    // Bob is not held up by Alice.
    let started = Instant::now();
    let (status, body) = s.post(&bob, LOAD, &load).await;
    assert_eq!(status, 200, "{body}");
    assert!(started.elapsed() < Duration::from_millis(1_500));
    // Alice's turn comes back, and so does she.
    drop(held);
    let (status, body) = s.post(&alice, LOAD, &load).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cuts_what_is_still_running_after_its_deadline_and_audits_it() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let s = server(2, |c| {
        c.bind = format!("127.0.0.1:{port}").parse().unwrap();
        c.limits.shutdown_timeout_ms = 300;
        c.limits.max_concurrent_per_principal = 1;
    })
    .await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(atlas_serve::serve(s.state.clone(), async move {
        let _ = stop_rx.await;
    }));
    let base = format!("http://127.0.0.1:{port}");
    let up = Instant::now();
    while s.http.get(format!("{base}/health")).send().await.is_err() {
        assert!(
            up.elapsed() < Duration::from_secs(10),
            "server did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Carol's request waits for her only turn: it is in flight when the
    // server is told to stop, and stays so past the shutdown deadline.
    let held = s
        .state
        .limiter
        .try_turn(atlas_serve::auth::DEV_ISSUER, "carol", 1)
        .unwrap();
    let token = s.token("carol");
    let request = {
        let http = s.http.clone();
        let url = format!("{base}/api/v2/ontologies/atlas/objectSets/loadObjects");
        tokio::spawn(async move {
            let r = http
                .post(url)
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body(r#"{"objectSet": {"type": "base", "objectType": "Patient"}}"#)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.text().await.unwrap())
        })
    };
    while s.state.limiter.in_flight() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stopping = Instant::now();
    stop_tx.send(()).unwrap();
    let (status, body) = request.await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .expect("serve returned within its shutdown deadline")
        .unwrap()
        .unwrap();
    let took = stopping.elapsed();
    assert!(
        took >= Duration::from_millis(300),
        "the grace was skipped: {took:?}"
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("ShuttingDown"), "{body}");
    drop(held);
    let recs = s.audit().await;
    let cut = recs
        .iter()
        .rfind(|r| r.entry.subject.as_deref() == Some("carol"))
        .expect("the cut request is in the audit trail");
    assert_eq!(cut.entry.decision, "cut: server shutting down", "{cut:#?}");
}
