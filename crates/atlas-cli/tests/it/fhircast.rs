//! `atlas fhircast listen` as a process: it follows one hub's topic and
//! republishes the context to another topic. One `atlas serve` plays both
//! hubs (the "external" topic and the Atlas topic), each token bound to
//! its topic.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const EXTERNAL: &str = "ext-topic";
const ATLAS: &str = "atlas-topic";

/// A raw HTTP/1.1 request: (status code, body).
fn http(
    port: u16,
    method: &str,
    path: &str,
    token: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    Ok((code, body))
}

fn token(lake: &std::path::Path, sub: &str, topic: &str) -> String {
    let out = crate::run_ok(crate::atlas(lake).args([
        "token",
        "--sub",
        sub,
        "--scope",
        "user/*.rs fhircast/*.read fhircast/*.write",
        "--fhircast-topic",
        topic,
        "--ttl",
        "10m",
    ]));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn patient(event: &str, id: &str, patient: &str) -> String {
    serde_json::json!({"timestamp": "2024-05-01T10:00:00Z", "id": id,
        "event": {"hub.topic": EXTERNAL, "hub.event": event,
                  "context": [{"key": "patient", "resource": {"resourceType": "Patient", "id": patient}}]}})
    .to_string()
}

/// Kills a child on drop (a failed assertion must not leave servers behind).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let started = Instant::now();
    while !f() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn listen_republishes_an_external_topic_and_unsubscribes_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let external = token(&lake, "ehr", EXTERNAL);
    let atlas = token(&lake, "bridge", ATLAS);
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _serve = Reaped(
        crate::atlas(&lake)
            .args([
                "serve",
                "--dev-auth",
                "--bind",
                &format!("127.0.0.1:{port}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("the server", || {
        http(port, "GET", "/health", &atlas, "").is_ok_and(|(c, _)| c == 200)
    });
    // The EHR opens a patient before the bridge starts: the replay brings it.
    let (code, body) = http(
        port,
        "POST",
        "/fhircast/hub",
        &external,
        &patient("Patient-open", "ehr-1", "p42"),
    )
    .unwrap();
    assert_eq!(code, 202, "{body}");
    let log = dir.path().join("listen.log");
    let mut listener = Reaped(
        Command::new(env!("CARGO_BIN_EXE_atlas"))
            .args([
                "fhircast",
                "listen",
                "--hub",
                &format!("http://127.0.0.1:{port}/fhircast/hub"),
                "--topic",
                EXTERNAL,
                "--events",
                "Patient-open,Patient-close",
                "--token",
                &external,
                "--to",
                &format!("http://127.0.0.1:{port}"),
                "--to-topic",
                ATLAS,
                "--to-token",
                &atlas,
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let current = |want: Option<&str>| {
        let (code, body) =
            http(port, "GET", &format!("/fhircast/hub/{ATLAS}"), &atlas, "").unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        code == 200
            && match want {
                Some(p) => v["context"][0]["resource"]["id"] == p,
                None => v["context.type"] == "",
            }
    };
    wait_for("the replayed Patient-open on the Atlas topic", || {
        current(Some("p42"))
    });
    let (code, _) = http(
        port,
        "POST",
        "/fhircast/hub",
        &external,
        &patient("Patient-close", "ehr-2", "p42"),
    )
    .unwrap();
    assert_eq!(code, 202);
    wait_for("the Patient-close on the Atlas topic", || current(None));
    // Ctrl-C: unsubscribes and exits cleanly.
    let pid = listener.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let started = Instant::now();
    let status = loop {
        if let Some(s) = listener.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the listener did not stop on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{status}: {text}");
    assert!(text.contains("following ext-topic"), "{text}");
    assert!(text.contains("republished"), "{text}");
    assert!(!text.contains("unsubscribing failed"), "{text}");
}
