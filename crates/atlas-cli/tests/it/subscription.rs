//! `atlas pull subscription` end to end: the binary listens for rest-hook
//! notifications (posted here as an EHR would), and each burst becomes an
//! incremental REST pull from `atlas-mockehr` (in this process, on
//! loopback) of the types the notifications name, into the lake.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use atlas_connect::smart::ClientKey;
use atlas_mockehr::{ClientRegistration, MockConfig, MockEhr, RunningMock};
use serde_json::{Value as Json, json};

use crate::{atlas, synth};

struct Ehr {
    mock: RunningMock,
    dir: tempfile::TempDir,
    key: PathBuf,
}

async fn ehr(patients: usize) -> Ehr {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path(), patients, 13);
    let (key, pem) = ClientKey::generate(jsonwebtoken::Algorithm::RS384).unwrap();
    let key_path = dir.path().join("client.pem");
    std::fs::write(&key_path, pem).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = MockConfig {
        retry_after_secs: 0,
        changes_per_tick: 20,
        clients: vec![ClientRegistration {
            client_id: "atlas".into(),
            jwks: key.public_jwks(),
            scopes: vec!["system/*.rs".into()],
            jku: None,
        }],
        ..MockConfig::default()
    };
    let mock = MockEhr::from_ndjson_dir(&data, config)
        .unwrap()
        .start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    Ehr {
        mock,
        dir,
        key: key_path,
    }
}

/// The lake's live resources of `types`: key → versionId.
async fn live(lake: &Path, types: &[&str]) -> BTreeMap<(String, String), String> {
    let mut c = atlas(lake);
    c.args([
        "sql",
        "--format",
        "csv",
        "SELECT resource_type, id, version_id FROM resources WHERE NOT deleted",
    ]);
    let out = tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut p = l.split(',');
            Some((
                (p.next()?.to_owned(), p.next()?.to_owned()),
                p.next()?.to_owned(),
            ))
        })
        .filter(|((t, _), _)| types.contains(&t.as_str()))
        .collect()
}

fn snapshot(e: &Ehr, types: &[&str]) -> BTreeMap<(String, String), String> {
    e.mock
        .ehr
        .snapshot(None)
        .into_iter()
        .filter(|((t, _), v)| !v.deleted && types.contains(&t.as_str()))
        .map(|(k, v)| (k, v.version_id.to_string()))
        .collect()
}

/// A notification Bundle as a backport server sends it.
fn notification(kind: &str, events: u64, focus: &[&str]) -> Json {
    let sub = "https://ehr.example/fhir/Subscription/s1";
    let mut params = vec![
        json!({"name": "subscription", "valueReference": {"reference": sub}}),
        json!({"name": "status", "valueCode": if kind == "handshake" { "requested" } else { "active" }}),
        json!({"name": "type", "valueCode": kind}),
        json!({"name": "events-since-subscription-start", "valueString": events.to_string()}),
    ];
    let first = events + 1 - focus.len() as u64;
    for (i, f) in focus.iter().enumerate() {
        params.push(json!({"name": "notification-event", "part": [
            {"name": "event-number", "valueString": (first + i as u64).to_string()},
            {"name": "focus", "valueReference": {"reference": format!("https://ehr.example/fhir/{f}")}}
        ]}));
    }
    json!({
        "resourceType": "Bundle",
        "type": "history",
        "entry": [{
            "fullUrl": "urn:uuid:0b0e5f9e-6a0c-4d7e-9a52-6d0f1f9d1a11",
            "resource": {"resourceType": "Parameters", "parameter": params},
            "request": {"method": "GET", "url": format!("{sub}/$status")},
            "response": {"status": "200"}
        }]
    })
}

async fn post(url: &str, header: Option<&str>, body: &Json) -> u16 {
    let mut r = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/fhir+json")
        .body(body.to_string());
    if let Some(h) = header {
        r = r.header("x-hook-secret", h);
    }
    r.send().await.unwrap().status().as_u16()
}

fn last_run(lake: &Path, source: &str) -> Option<Json> {
    let text =
        std::fs::read_to_string(lake.join("connectors").join(source).join("state.json")).ok()?;
    let s: Json = serde_json::from_str(&text).ok()?;
    s.get("last_run").cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_become_incremental_pulls_of_the_types_they_name() {
    let e = ehr(4).await;
    let lake = e.dir.path().join("lake");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}/notify");
    let mut cmd = atlas(&lake);
    cmd.args(["pull", "subscription", &e.mock.fhir_base])
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--connector",
            "ehr-sub",
        ])
        .args(["--client-id", "atlas", "--key"])
        .arg(&e.key)
        .args([
            "--max-wait-secs",
            "0.05",
            "--debounce-ms",
            "300",
            "--max-pulls",
            "2",
        ])
        .args(["--require-header", "X-Hook-Secret: s3cret"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    // Listening once it answers.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = reqwest::get(&url).await
            && r.status().is_success()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the receiver never listened"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Refused: no header, a wrong one, not a notification.
    assert_eq!(
        post(&url, None, &notification("handshake", 0, &[])).await,
        401
    );
    assert_eq!(
        post(&url, Some("guess"), &notification("handshake", 0, &[])).await,
        401
    );
    assert_eq!(
        post(
            &url,
            Some("s3cret"),
            &json!({"resourceType": "Bundle", "type": "searchset"})
        )
        .await,
        400
    );
    // The handshake, then a burst of Observation events: one pull.
    assert_eq!(
        post(&url, Some("s3cret"), &notification("handshake", 0, &[])).await,
        200
    );
    assert_eq!(
        post(&url, Some("s3cret"), &notification("heartbeat", 0, &[])).await,
        200
    );
    for n in 1..=3 {
        let focus = format!("Observation/obs-{n}");
        assert_eq!(
            post(
                &url,
                Some("s3cret"),
                &notification("event-notification", n, &[&focus])
            )
            .await,
            200
        );
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while last_run(&lake, "ehr-sub").is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no pull after the notifications"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(last_run(&lake, "ehr-sub").unwrap()["kind"], "subscription");
    // The server changes; a notification about Conditions pulls those.
    for _ in 0..2 {
        e.mock.ehr.tick();
    }
    assert_eq!(
        post(
            &url,
            Some("s3cret"),
            &notification("event-notification", 5, &["Condition/c-1"])
        )
        .await,
        200
    );
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("handshake from https://ehr.example/fhir/Subscription/s1"),
        "{stderr}"
    );
    assert!(stderr.contains("pulled Observation in"), "{stderr}");
    assert!(stderr.contains("pulled Condition in"), "{stderr}");
    assert!(
        stderr.contains("events 4-4 were not received"),
        "a gap is reported: {stderr}"
    );
    assert!(
        !stderr.contains("s3cret"),
        "the header value is never printed"
    );
    // Observations as of the first pull are in; Conditions as of the second.
    let obs = live(&lake, &["Observation"]).await;
    assert!(!obs.is_empty());
    assert_eq!(
        live(&lake, &["Condition"]).await,
        snapshot(&e, &["Condition"])
    );
    assert!(
        live(&lake, &["Patient", "Encounter"]).await.is_empty(),
        "types not named are not pulled"
    );
}
