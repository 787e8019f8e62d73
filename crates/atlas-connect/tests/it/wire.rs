//! The client on the wire, against a scripted HTTP server that records
//! every request byte for byte: the headers and parameters the Bulk Data
//! spec asks a client to send, and the IG's own example manifest and
//! NDJSON served as a server would (built from the specification, not
//! from `atlas-mockehr`'s behaviour).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use atlas_connect::bulk::{BulkClient, BulkOptions, ExportLevel, ExportRequest, PullProgress};
use atlas_connect::http::{HttpClient, HttpOptions};
use atlas_connect::manifest::{FileKind, Manifest};
use atlas_connect::retry::RetryPolicy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::{missing, shared};

/// One request as received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A response: status, headers, body.
pub type Reply = (u16, Vec<(String, String)>, Vec<u8>);

type Script = Arc<dyn Fn(&Seen, &str) -> Reply + Send + Sync>;

/// A loopback HTTP/1.1 server answering each request with `script(request, base)`.
pub struct WireServer {
    pub base: String,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl WireServer {
    pub async fn start(
        script: impl Fn(&Seen, &str) -> Reply + Send + Sync + 'static,
    ) -> WireServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script: Script = Arc::new(script);
        let (s, b) = (seen.clone(), base.clone());
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let (s, b, script) = (s.clone(), b.clone(), script.clone());
                tokio::spawn(async move {
                    while let Some(req) = read_request(&mut sock).await {
                        s.lock().unwrap().push(req.clone());
                        let (status, headers, body) = script(&req, &b);
                        let mut out =
                            format!("HTTP/1.1 {status} X\r\ncontent-length: {}\r\n", body.len());
                        for (n, v) in headers {
                            out.push_str(&format!("{n}: {v}\r\n"));
                        }
                        out.push_str("\r\n");
                        if sock.write_all(out.as_bytes()).await.is_err()
                            || sock.write_all(&body).await.is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        WireServer { base, seen }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn read_request(sock: &mut tokio::net::TcpStream) -> Option<Seen> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = sock.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, target) = (first.next()?.to_owned(), first.next()?.to_owned());
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        })
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = sock.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&tmp[..n]);
    }
    Some(Seen {
        method,
        target,
        headers,
        body,
        at: Instant::now(),
    })
}

fn client(base: &str) -> BulkClient {
    let opts = HttpOptions {
        retry: RetryPolicy {
            max_attempts: 3,
            base: Duration::from_millis(5),
            max_wait: Duration::from_secs(2),
            min_wait: Duration::ZERO,
        },
        ..HttpOptions::default()
    };
    let bulk = BulkOptions {
        poll: RetryPolicy {
            max_attempts: u32::MAX,
            base: Duration::from_millis(5),
            max_wait: Duration::from_secs(3),
            min_wait: Duration::ZERO,
        },
        ..BulkOptions::default()
    };
    BulkClient::new(
        HttpClient::new(opts, None).unwrap(),
        &format!("{base}/fhir"),
        bulk,
    )
    .unwrap()
}

fn accepted(base: &str) -> Reply {
    (
        202,
        vec![("content-location".into(), format!("{base}/status/1"))],
        Vec::new(),
    )
}

/// Kick-off: POST with a Parameters body, `Accept: application/fhir+json`
/// and `Prefer: respond-async`; after a 405, GET with the same parameters
/// as query parameters.
#[tokio::test]
async fn kickoff_sends_the_spec_headers_and_parameters() {
    let server = WireServer::start(|req, base| match req.method.as_str() {
        "POST" => (405, vec![], b"{}".to_vec()),
        _ => accepted(base),
    })
    .await;
    let mut req = ExportRequest::new(ExportLevel::Group("g1".into()));
    req.types = vec!["Patient".into(), "Observation".into()];
    req.since = Some("2026-01-02T03:04:05.678+01:00".into());
    req.type_filters = vec!["Observation?category=laboratory".into()];
    let status = client(&server.base).kickoff(&req).await.unwrap();
    assert_eq!(status, format!("{}/status/1", server.base));
    let seen = server.seen();
    let post = &seen[0];
    assert_eq!(
        (post.method.as_str(), post.target.as_str()),
        ("POST", "/fhir/Group/g1/$export")
    );
    assert_eq!(post.header("accept"), Some("application/fhir+json"));
    assert_eq!(post.header("prefer"), Some("respond-async"));
    assert_eq!(post.header("content-type"), Some("application/fhir+json"));
    let params: serde_json::Value = serde_json::from_slice(&post.body).unwrap();
    assert_eq!(params["resourceType"], "Parameters");
    let names: Vec<&str> = params["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["_outputFormat", "_type", "_type", "_since", "_typeFilter"]
    );
    let get = &seen[1];
    assert_eq!(get.method, "GET");
    let url = url::Url::parse(&format!("{}{}", server.base, get.target)).unwrap();
    let q: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    assert!(
        q.contains(&("_type".into(), "Patient,Observation".into())),
        "{q:?}"
    );
    assert!(
        q.contains(&("_since".into(), "2026-01-02T03:04:05.678+01:00".into())),
        "a `+` survives: {q:?}"
    );
    assert!(
        q.contains(&(
            "_typeFilter".into(),
            "Observation?category=laboratory".into()
        )),
        "{q:?}"
    );
    assert!(
        q.contains(&("_outputFormat".into(), "application/fhir+ndjson".into())),
        "{q:?}"
    );
    assert_eq!(get.header("prefer"), Some("respond-async"));
}

/// Status polling asks for JSON, waits what `Retry-After` says, and reads
/// the manifest when the server answers 200.
#[tokio::test]
async fn status_polls_ask_for_json_and_honour_retry_after() {
    let polls = Arc::new(Mutex::new(0u32));
    let p = polls.clone();
    let server = WireServer::start(move |_, base| {
        let mut n = p.lock().unwrap();
        *n += 1;
        if *n <= 2 {
            (202, vec![("x-progress".into(), format!("{}% done", *n * 40)), ("retry-after".into(), "1".into())], vec![])
        } else {
            let m = format!(r#"{{"transactionTime":"2026-01-01T00:00:00Z","request":"{base}/fhir/$export","requiresAccessToken":false,"output":[],"error":[]}}"#);
            (200, vec![("content-type".into(), "application/json".into())], m.into_bytes())
        }
    })
    .await;
    let progress = PullProgress::default();
    let m = client(&server.base)
        .poll(&format!("{}/status/1", server.base), &progress)
        .await
        .unwrap();
    assert_eq!(m.transaction_time, "2026-01-01T00:00:00Z");
    let seen = server.seen();
    assert_eq!(seen.len(), 3);
    assert!(
        seen.iter()
            .all(|s| s.header("accept") == Some("application/json"))
    );
    for w in seen.windows(2) {
        let gap = w[1].at - w[0].at;
        assert!(
            gap >= Duration::from_millis(950),
            "Retry-After: 1 honoured ({gap:?})"
        );
    }
    assert!(
        progress.status().contains("80% done"),
        "X-Progress shown: {}",
        progress.status()
    );
}

/// The Bulk Data IG's example manifest (STU2), served with its file URLs
/// on this server, and the IG's example NDJSON as the Patient file: the
/// client downloads every file of every kind and counts its lines. The
/// manifest says `requiresAccessToken: true`; this client has no token
/// source, so none is sent — see the mock tests for the token itself.
#[tokio::test]
async fn the_ig_example_manifest_and_ndjson_download() {
    let Some(dir) = shared() else {
        missing("../shared (conformance/bulk-data)");
        return;
    };
    let ig = dir.join("conformance/bulk-data/stu2-2.0.0");
    let (Ok(manifest), Ok(ndjson)) = (
        std::fs::read_to_string(ig.join("status-complete-manifest.json")),
        std::fs::read(ig.join("output-patient-example.ndjson")),
    ) else {
        missing(&format!("{}", ig.display()));
        return;
    };
    let example: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    let ndjson = Arc::new(ndjson);
    let nd = ndjson.clone();
    let manifest_text = manifest.clone();
    let server = WireServer::start(move |req, base| {
        if req.target.starts_with("/status") {
            // The IG's manifest with its file URLs moved to this server.
            let mut v: serde_json::Value = serde_json::from_str(&manifest_text).unwrap();
            for list in ["output", "error", "deleted"] {
                for f in v[list].as_array_mut().into_iter().flatten() {
                    let u = f["url"].as_str().unwrap_or_default().to_owned();
                    let name = u.rsplit('/').next().unwrap_or("x").to_owned();
                    f["url"] = format!("{base}/files/{name}").into();
                }
            }
            return (200, vec![], serde_json::to_vec(&v).unwrap());
        }
        (
            200,
            vec![("content-type".into(), "application/fhir+ndjson".into())],
            nd.to_vec(),
        )
    })
    .await;
    let client = client(&server.base);
    let m: Manifest = client
        .poll(
            &format!("{}/status/1", server.base),
            &PullProgress::default(),
        )
        .await
        .unwrap();
    assert_eq!(m.output.len(), example["output"].as_array().unwrap().len());
    let tmp = tempfile::tempdir().unwrap();
    let lines = ndjson
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .count() as u64;
    for (i, (kind, f)) in m.files().enumerate() {
        let mut f = f.clone();
        f.count = None;
        let done = client
            .download(
                &f,
                kind,
                false,
                tmp.path(),
                &format!("{i}.ndjson"),
                &PullProgress::default(),
            )
            .await
            .unwrap();
        assert_eq!(done.lines, lines, "{}", f.url);
        assert_eq!(done.kind, kind);
    }
    assert!(m.files().any(|(k, _)| k == FileKind::Error));
    let seen = server.seen();
    let file_gets: Vec<_> = seen
        .iter()
        .filter(|s| s.target.starts_with("/files/"))
        .collect();
    assert!(
        file_gets
            .iter()
            .all(|s| s.header("accept") == Some("application/fhir+ndjson"))
    );
}

/// A server that ignores `_typeFilter` sends more than asked: the client
/// does not fail, and keeps what it got (Bulk Data STU2: clients SHOULD be
/// robust to that).
#[tokio::test]
async fn a_type_filter_the_server_ignores_is_not_an_error() {
    let server = WireServer::start(|req, base| {
        if req.target.contains("$export") {
            return accepted(base);
        }
        if req.target.starts_with("/status") {
            let m = format!(r#"{{"transactionTime":"2026-01-01T00:00:00Z","requiresAccessToken":false,"output":[{{"type":"Observation","url":"{base}/files/1"}}]}}"#);
            return (200, vec![], m.into_bytes());
        }
        let lines = "{\"resourceType\":\"Observation\",\"id\":\"lab\",\"category\":[{\"text\":\"laboratory\"}]}\n{\"resourceType\":\"Observation\",\"id\":\"vital\"}\n";
        (200, vec![], lines.as_bytes().to_vec())
    })
    .await;
    let client = client(&server.base);
    let mut req = ExportRequest::new(ExportLevel::System);
    req.type_filters = vec!["Observation?category=laboratory".into()];
    let status = client.kickoff(&req).await.unwrap();
    let m = client
        .poll(&status, &PullProgress::default())
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let done = client
        .download(
            &m.output[0],
            FileKind::Output,
            false,
            tmp.path(),
            "o.ndjson",
            &PullProgress::default(),
        )
        .await
        .unwrap();
    assert_eq!(done.lines, 2, "both resources kept");
}

/// A file sent with `Content-Encoding: gzip` is staged compressed (the
/// bytes as received, hashed) with its lines counted through the
/// decompressor; a gzip stream cut short is downloaded again.
#[tokio::test]
async fn gzip_files_are_staged_compressed_and_checked() {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    for i in 0..1000 {
        writeln!(gz, "{{\"resourceType\":\"Patient\",\"id\":\"p{i}\"}}").unwrap();
    }
    let whole = Arc::new(gz.finish().unwrap());
    let calls = Arc::new(Mutex::new(0u32));
    let (w, c) = (whole.clone(), calls.clone());
    let server = WireServer::start(move |req, _| {
        let mut n = c.lock().unwrap();
        *n += 1;
        assert_eq!(req.header("accept-encoding"), Some("gzip"));
        // The first answer is cut mid-stream (a proxy that gave up).
        let body = if *n == 1 {
            w[..w.len() / 2].to_vec()
        } else {
            w.to_vec()
        };
        (200, vec![("content-encoding".into(), "gzip".into())], body)
    })
    .await;
    let client = client(&server.base);
    let file = atlas_connect::manifest::OutputFile {
        resource_type: Some("Patient".into()),
        url: format!("{}/files/p", server.base),
        count: Some(1000),
        continues_in_file: None,
    };
    let tmp = tempfile::tempdir().unwrap();
    let done = client
        .download(
            &file,
            FileKind::Output,
            false,
            tmp.path(),
            "p.ndjson",
            &PullProgress::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        *calls.lock().unwrap(),
        2,
        "the cut stream was fetched again"
    );
    assert_eq!(done.file, "p.ndjson.gz");
    assert_eq!(done.lines, 1000);
    let staged = std::fs::read(tmp.path().join("p.ndjson.gz")).unwrap();
    assert_eq!(staged, *whole, "the bytes as received");
    use sha2::Digest;
    assert_eq!(done.sha256, hex::encode(sha2::Sha256::digest(&staged)));
}

/// A token source whose endpoint is `server`'s `/token`.
fn tokens(server: &WireServer) -> Arc<atlas_connect::smart::TokenSource> {
    let (key, _) =
        atlas_connect::smart::ClientKey::generate(jsonwebtoken::Algorithm::ES384).unwrap();
    Arc::new(atlas_connect::smart::TokenSource::new(
        atlas_connect::http::build_reqwest(&HttpOptions::default()).unwrap(),
        format!("{}/token", server.base),
        "c".into(),
        "system/*.rs".into(),
        None,
        key,
    ))
}

/// The token goes to the FHIR base's origin only: a status URL (or file,
/// or `next` page) that a server points at another origin gets none.
#[tokio::test]
async fn the_token_never_leaves_the_fhir_base_origin() {
    let elsewhere = WireServer::start(|_, base| {
        let m = format!(r#"{{"transactionTime":"2026-01-01T00:00:00Z","requiresAccessToken":true,"output":[{{"type":"Patient","url":"{base}/files/1"}}]}}"#);
        (200, vec![], m.into_bytes())
    })
    .await;
    let status_elsewhere = format!("{}/status/1", elsewhere.base);
    let ehr = WireServer::start(move |req, _| {
        if req.target == "/token" {
            let t = br#"{"access_token":"secret-token","token_type":"bearer","expires_in":18446744073709551615}"#;
            return (200, vec![], t.to_vec());
        }
        (202, vec![("content-location".into(), status_elsewhere.clone())], vec![])
    })
    .await;
    let http = HttpClient::new(HttpOptions::default(), Some(tokens(&ehr))).unwrap();
    let client =
        BulkClient::new(http, &format!("{}/fhir", ehr.base), BulkOptions::default()).unwrap();
    let status = client
        .kickoff(&ExportRequest::new(ExportLevel::System))
        .await
        .unwrap();
    client
        .poll(&status, &PullProgress::default())
        .await
        .unwrap();
    let kickoff = ehr
        .seen()
        .into_iter()
        .find(|s| s.target.contains("$export"))
        .unwrap();
    assert_eq!(
        kickoff.header("authorization"),
        Some("Bearer secret-token"),
        "the FHIR base gets it"
    );
    assert!(
        elsewhere
            .seen()
            .iter()
            .all(|s| s.header("authorization").is_none()),
        "another origin never does"
    );
}

/// A kick-off POST answered 500 is not sent again: a retry could start a
/// second export the client would never cancel.
#[tokio::test]
async fn a_failed_kickoff_post_is_not_retried() {
    let server = WireServer::start(|_, _| (500, vec![], br#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"exception","diagnostics":"database down"}]}"#.to_vec())).await;
    let e = client(&server.base)
        .kickoff(&ExportRequest::new(ExportLevel::System))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("database down"),
        "the server's words: {e}"
    );
    assert_eq!(server.seen().len(), 1, "one POST, no retry");
}
