//! Event delivery, end to end on loopback (a plain `main`, not criterion:
//! what is measured is latency across sockets, not a function).
//!
//! 1. **FHIRcast fan-out**: `--subscribers` WebSocket subscribers of one
//!    topic; `--events` context changes published one after another; for
//!    each, the time from the publisher's request to each subscriber's
//!    receipt (p50, p99, max over every subscriber × event).
//! 2. **Change delivery**: `--sse` SSE connections follow `GET /events`,
//!    and one FHIR Subscription (R4 backport, rest-hook, full-resource)
//!    posts to a receiver on loopback, while `--resources` Observations are
//!    ingested in `--batches` batches; for each SSE notice and each event
//!    of each notification, its receipt time minus its store commit's time
//!    (`commitInfo.timestamp` in the Delta log), p50/p99/max; and the
//!    process's resident memory before and after.
//!
//! The server, the clients and the ingest share this one process (and the
//! machine's cores), as a deployment on one host would.
//!
//! ```text
//! cargo bench -p atlas-serve --bench events -- --subscribers 1000 --events 20 --resources 10000
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::{SinkExt, StreamExt};
use serde_json::{Value as Json, json};
use tokio_tungstenite::tungstenite::Message;

use atlas_lake::{IngestOptions, Lake, LeaseOptions, Progress, WriterLease};
use atlas_serve::{AppState, DevIssuer, ServeConfig, TokenRequest, router};

const TOPIC: &str = "bench-topic";

struct Args {
    subscribers: usize,
    events: usize,
    sse: usize,
    resources: usize,
    batches: usize,
}

fn args() -> Args {
    let mut a = Args {
        subscribers: 1000,
        events: 20,
        sse: 10,
        resources: 10_000,
        batches: 10,
    };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        let value = || argv.get(i + 1).and_then(|v| v.parse::<usize>().ok());
        match argv[i].as_str() {
            "--subscribers" => a.subscribers = value().unwrap_or(a.subscribers),
            "--events" => a.events = value().unwrap_or(a.events),
            "--sse" => a.sse = value().unwrap_or(a.sse),
            "--resources" => a.resources = value().unwrap_or(a.resources),
            "--batches" => a.batches = value().unwrap_or(a.batches).max(1),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

fn percentiles(mut ms: Vec<f64>) -> String {
    if ms.is_empty() {
        return "no samples".into();
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| ms[((ms.len() as f64 * q).ceil() as usize).clamp(1, ms.len()) - 1];
    format!(
        "n={} p50={:.1} ms p99={:.1} ms max={:.1} ms",
        ms.len(),
        at(0.5),
        at(0.99),
        ms[ms.len() - 1]
    )
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1e3)
        .unwrap_or(0.0)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let a = args();
    let dir = tempfile::tempdir().expect("a temporary folder");
    let lake = Lake::open(
        dir.path().join("lake").to_str().unwrap(),
        Default::default(),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let mut config = ServeConfig::default();
    config.auth.dev = true;
    config.public_base_url = Some(base.clone());
    config.events.poll_ms = 100;
    // The subscription's receiver is on loopback.
    config.subscriptions.private_endpoints = true;
    config.fhircast.max_subscribers = a.subscribers.max(1) + 16;
    config.limits.max_concurrent_per_principal = 1_000_000;
    let state = AppState::open(lake.clone(), atlas_ontology::Ontology::builtin(), config)
        .await
        .unwrap();
    let token = DevIssuer::open(&lake)
        .await
        .unwrap()
        .mint(&TokenRequest {
            subject: "bench".into(),
            scope: "user/*.rs fhircast/*.read fhircast/*.write".into(),
            ttl_secs: 3600,
            fhircast_topic: Some(TOPIC.into()),
            ..Default::default()
        })
        .unwrap();
    tokio::spawn(async move {
        axum::serve(listener, router(state)).await.ok();
    });
    let http = reqwest::Client::new();
    println!(
        "atlas events bench: {} subscribers, {} events; {} SSE connections, {} resources in {} batches",
        a.subscribers, a.events, a.sse, a.resources, a.batches
    );
    fanout(&http, &base, &token, &a).await;
    changes(&http, &base, &token, &lake, dir.path(), &a).await;
}

/// Receipt times of one event id, one per subscriber.
type Receipts = Arc<Mutex<HashMap<String, Vec<Instant>>>>;

async fn subscribe(http: &reqwest::Client, base: &str, token: &str) -> String {
    let form = [
        ("hub.channel.type", "websocket"),
        ("hub.mode", "subscribe"),
        ("hub.topic", TOPIC),
        ("hub.events", "Patient-open,Patient-close"),
        ("hub.lease_seconds", "3600"),
    ];
    let r = http
        .post(format!("{base}/fhircast/hub"))
        .bearer_auth(token)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(
            url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(form)
                .finish(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        202,
        "{}",
        r.text().await.unwrap_or_default()
    );
    let j: Json = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    j["hub.channel.endpoint"].as_str().unwrap().to_owned()
}

async fn fanout(http: &reqwest::Client, base: &str, token: &str, a: &Args) {
    let receipts: Receipts = Default::default();
    let started = Instant::now();
    let mut ready = Vec::new();
    let subs = futures::stream::iter(0..a.subscribers)
        .map(|_| async {
            let endpoint = subscribe(http, base, token).await;
            let (ws, _) = tokio_tungstenite::connect_async(endpoint.as_str())
                .await
                .unwrap();
            ws
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    for ws in subs {
        let (tx, rx) = tokio::sync::oneshot::channel();
        ready.push(rx);
        tokio::spawn(subscriber(ws, receipts.clone(), tx));
    }
    for r in ready {
        let _ = r.await;
    }
    println!(
        "fhircast: {} subscribers connected and confirmed in {:.1} s",
        a.subscribers,
        started.elapsed().as_secs_f64()
    );
    let mut latencies = Vec::new();
    for k in 0..a.events {
        let id = format!("bench-{k}");
        let event = if k % 2 == 0 {
            "Patient-open"
        } else {
            "Patient-close"
        };
        let body = json!({
            "timestamp": chrono_now(),
            "id": id,
            "event": {
                "hub.topic": TOPIC,
                "hub.event": event,
                "context": [{"key": "patient", "resource": {"resourceType": "Patient", "id": format!("p{}", k / 2)}}]
            }
        });
        let sent = Instant::now();
        post_json(
            http,
            &format!("{base}/fhircast/hub"),
            token,
            "application/json",
            &body,
            202,
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n = receipts.lock().unwrap().get(&id).map_or(0, Vec::len);
            if n >= a.subscribers || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let got = receipts.lock().unwrap().remove(&id).unwrap_or_default();
        if got.len() < a.subscribers {
            println!(
                "fhircast: event {id} reached {} of {} subscribers",
                got.len(),
                a.subscribers
            );
        }
        latencies.extend(
            got.iter()
                .map(|t| t.duration_since(sent).as_secs_f64() * 1e3),
        );
    }
    println!(
        "fhircast fan-out latency (publish request → each subscriber): {}",
        percentiles(latencies)
    );
}

fn chrono_now() -> String {
    let s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // RFC 3339 in UTC without a date library: seconds are enough here.
    let days = s / 86_400;
    let (y, m, d) = civil(days as i64);
    let r = s % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        r / 3600,
        r / 60 % 60,
        r % 60
    )
}

/// Days since 1970-01-01 → (year, month, day) (Howard Hinnant's algorithm).
fn civil(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

async fn subscriber(
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    receipts: Receipts,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let (mut tx, mut rx) = ws.split();
    let mut ready = Some(ready);
    while let Some(Ok(msg)) = rx.next().await {
        let now = Instant::now();
        let Message::Text(text) = msg else { continue };
        let Ok(j) = serde_json::from_str::<Json>(&text) else {
            continue;
        };
        if j.get("hub.mode").is_some() {
            if let Some(r) = ready.take() {
                let _ = r.send(());
            }
            continue;
        }
        let Some(id) = j["id"].as_str() else { continue };
        if j["event"]["hub.event"].is_string() {
            receipts
                .lock()
                .unwrap()
                .entry(id.to_owned())
                .or_default()
                .push(now);
            let ack = json!({"id": id, "status": "200"}).to_string();
            if tx.send(Message::Text(ack.into())).await.is_err() {
                return;
            }
        }
    }
}

async fn changes(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    lake: &Lake,
    dir: &std::path::Path,
    a: &Args,
) {
    let receipts: Arc<Mutex<Vec<(i64, f64)>>> = Default::default();
    let hooks: Arc<Mutex<Vec<(String, f64)>>> = Default::default();
    let hook_url = rest_hook_receiver(hooks.clone()).await;
    subscribe_rest_hook(http, base, token, &hook_url).await;
    for _ in 0..a.sse {
        let r = http
            .get(format!("{base}/events?types=Observation"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        tokio::spawn(read_sse(r, receipts.clone()));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = rss_kib("VmRSS:");
    let per = a.resources.div_ceil(a.batches);
    let started = Instant::now();
    for b in 0..a.batches {
        let lines: Vec<String> = (b * per..((b + 1) * per).min(a.resources))
            .map(|i| {
                json!({"resourceType": "Observation", "id": format!("bench-o{i}"), "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                    "subject": {"reference": format!("Patient/p{}", i % 100)},
                    "valueQuantity": {"value": i % 200, "unit": "/min"}})
                .to_string()
            })
            .collect();
        let path = dir.join(format!("batch-{b}.ndjson"));
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let lease = WriterLease::acquire(
            lake,
            &LeaseOptions {
                command: "events bench".into(),
                wait: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let set =
            atlas_ingest::collect_inputs(&[path.display().to_string()], &mut std::io::empty())
                .unwrap();
        let opts = IngestOptions {
            lease: Some(lease.clone()),
            ..Default::default()
        };
        atlas_lake::ingest(lake, &set.inputs, &opts, &Progress::default())
            .await
            .unwrap();
        lease.release().await.unwrap();
    }
    let ingested = started.elapsed();
    let expected = a.resources * a.sse;
    let deadline = Instant::now() + Duration::from_secs(60);
    while (receipts.lock().unwrap().len() < expected || hooks.lock().unwrap().len() < a.resources)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = std::mem::take(&mut *receipts.lock().unwrap());
    let commits = commit_times(lake).await;
    let latencies: Vec<f64> = got
        .iter()
        .filter_map(|(v, at)| commits.get(v).map(|c| at - c))
        .collect();
    println!(
        "changes: {} resources ingested in {:.1} s; {} of {} SSE notices received",
        a.resources,
        ingested.as_secs_f64(),
        got.len(),
        expected
    );
    println!(
        "SSE notice latency (store commit → receipt): {}",
        percentiles(latencies)
    );
    let hooked = std::mem::take(&mut *hooks.lock().unwrap());
    let versions = focus_versions(lake).await;
    let hook_latencies: Vec<f64> = hooked
        .iter()
        .filter_map(|(focus, at)| commits.get(versions.get(focus)?).map(|c| at - c))
        .collect();
    println!(
        "rest-hook: {} of {} events received",
        hooked.len(),
        a.resources
    );
    println!(
        "rest-hook event latency (store commit → notification received): {}",
        percentiles(hook_latencies)
    );
    println!(
        "memory: VmRSS {} MiB before the ingest, {} MiB after; VmHWM {} MiB",
        rss_before / 1024,
        rss_kib("VmRSS:") / 1024,
        rss_kib("VmHWM:") / 1024
    );
}

/// Each notice's store version and receipt time (ms since the epoch).
async fn read_sse(mut r: reqwest::Response, out: Arc<Mutex<Vec<(i64, f64)>>>) {
    let mut buf = String::new();
    while let Ok(Some(chunk)) = r.chunk().await {
        let now = now_ms();
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            if !block.contains("event: change") {
                continue;
            }
            if let Some(v) = block
                .lines()
                .find_map(|l| l.strip_prefix("id: "))
                .and_then(|id| id.split('.').next()?.parse::<i64>().ok())
            {
                out.lock().unwrap().push((v, now));
            }
        }
    }
}

/// Store version → its commit's time (ms since the epoch).
async fn commit_times(lake: &Lake) -> HashMap<i64, f64> {
    let mut out = HashMap::new();
    let Some(latest) = atlas_lake::ChangeFeed::new(lake.clone())
        .latest_version()
        .await
        .unwrap()
    else {
        return out;
    };
    for v in 0..=latest {
        let path = lake
            .root()
            .to_file_path()
            .unwrap()
            .join(format!("tables/resources/_delta_log/{v:020}.json"));
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        for line in text.lines() {
            let Ok(j) = serde_json::from_str::<Json>(line) else {
                continue;
            };
            if let Some(ts) = j["commitInfo"]["timestamp"].as_f64() {
                out.insert(v, ts);
            }
        }
    }
    out
}

/// A rest-hook endpoint on loopback: records each notification event's
/// focus (`Observation/<id>`) with the time its notification arrived.
async fn rest_hook_receiver(out: Arc<Mutex<Vec<(String, f64)>>>) -> String {
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let out = out.clone();
            async move {
                let now = now_ms();
                if let Ok(j) = serde_json::from_slice::<Json>(&body) {
                    let mut focus = Vec::new();
                    collect_focus(&j["entry"][0]["resource"], &mut focus);
                    out.lock()
                        .unwrap()
                        .extend(focus.into_iter().map(|f| (f, now)));
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(listener, app).await.ok();
    });
    url
}

/// Every `focus.reference` under the status Parameters.
fn collect_focus(v: &Json, out: &mut Vec<String>) {
    match v {
        Json::Object(m) => {
            if m.get("name").and_then(Json::as_str) == Some("focus")
                && let Some(r) = m["valueReference"]["reference"].as_str()
            {
                // `Type/id`, whether the reference is relative or absolute.
                let parts: Vec<&str> = r.rsplitn(3, '/').collect();
                if parts.len() >= 2 {
                    out.push(format!("{}/{}", parts[1], parts[0]));
                }
            }
            for x in m.values() {
                collect_focus(x, out);
            }
        }
        Json::Array(a) => a.iter().for_each(|x| collect_focus(x, out)),
        _ => {}
    }
}

async fn subscribe_rest_hook(http: &reqwest::Client, base: &str, token: &str, endpoint: &str) {
    const IG: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition";
    let body = json!({
        "resourceType": "Subscription",
        "meta": {"profile": [format!("{IG}/backport-subscription")]},
        "status": "requested",
        "reason": "events bench",
        "criteria": "http://atlas.local/SubscriptionTopic/observation-change",
        "channel": {
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": "application/fhir+json",
            "_payload": {"extension": [{"url": format!("{IG}/backport-payload-content"), "valueCode": "full-resource"}]}
        }
    });
    let url = format!("{base}/fhir/Subscription");
    post_json(http, &url, token, "application/fhir+json", &body, 201).await;
}

/// `Type/id` → the store version whose commit wrote it.
async fn focus_versions(lake: &Lake) -> HashMap<String, i64> {
    let opts = atlas_lake::ReadOptions {
        max_commits: Some(100_000),
        ..Default::default()
    };
    let page = atlas_lake::ChangeFeed::new(lake.clone())
        .read(-1, &opts)
        .await
        .unwrap();
    page.events
        .into_iter()
        .map(|e| (format!("{}/{}", e.resource_type, e.id), e.store_version))
        .collect()
}

/// POSTs `body` and insists on `status`.
async fn post_json(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    content_type: &str,
    body: &Json,
    status: u16,
) {
    let r = http
        .post(url)
        .bearer_auth(token)
        .header("content-type", content_type)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        status,
        "{}",
        r.text().await.unwrap_or_default()
    );
}
