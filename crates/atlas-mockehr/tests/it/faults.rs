//! Each fault kind, observable from the client's side (and the request log).

use reqwest::StatusCode;
use serde_json::Value;

use atlas_mockehr::{Endpoint, Fault, FaultKind, ManifestShape};

use crate::{Mock, keys};

/// A kick-off whose files are shaped by `kind`: its manifest.
async fn export_with(mock: &Mock, kind: FaultKind, path: &str) -> Value {
    mock.ehr()
        .set_faults(vec![Fault::nth(Endpoint::Kickoff, 1, kind)]);
    mock.export(path).await
}

#[tokio::test]
async fn status_faults_with_retry_after_texts() {
    let mock = Mock::start(2, |_| {}).await;
    let texts = [
        "120",
        "Wed, 21 Oct 2026 07:28:00 GMT",
        "999999",
        "-5",
        "soon",
    ];
    mock.ehr().set_faults(
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                Fault::nth(
                    Endpoint::Search,
                    i as u32 + 1,
                    FaultKind::Status {
                        code: 503,
                        retry_after: Some(t.to_string()),
                    },
                )
            })
            .collect(),
    );
    for t in texts {
        let r = mock.get("/Patient").await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()["retry-after"], t);
    }
    assert_eq!(mock.get("/Patient").await.status(), StatusCode::OK);
    // `times`: two 429s in a row on the token endpoint, then tokens again.
    mock.ehr().set_faults(vec![Fault {
        at: Endpoint::Token,
        nth: Some(1),
        times: 2,
        kind: FaultKind::Status {
            code: 429,
            retry_after: None,
        },
    }]);
    let assertion = || {
        mock.key.sign(
            mock.key.header(),
            &crate::TestKey::claims(&mock.running.token_url, 60),
        )
    };
    assert_eq!(
        mock.token_request(&assertion(), "system/*.rs").await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        mock.token_request(&assertion(), "system/*.rs").await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        mock.token_request(&assertion(), "system/*.rs").await.0,
        StatusCode::OK
    );
    let log = mock.ehr().requests();
    assert_eq!(
        log.iter()
            .filter(|l| l.endpoint == Some(Endpoint::Token) && l.status == 429)
            .count(),
        2
    );
}

#[tokio::test]
async fn bodies_reset_or_truncated() {
    let mock = Mock::start(3, |_| {}).await;
    let manifest = mock.export("/$export?_type=Observation").await;
    let url = manifest["output"][0]["url"].as_str().unwrap();
    let full = mock.get(url).await.bytes().await.unwrap();
    mock.ehr().set_faults(vec![Fault::nth(
        Endpoint::File,
        1,
        FaultKind::ResetAfter { bytes: 50 },
    )]);
    let r = mock.get(url).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.bytes().await.is_err(), "the connection is cut mid-body");
    mock.ehr().set_faults(vec![Fault::nth(
        Endpoint::File,
        1,
        FaultKind::Truncate { bytes: 50 },
    )]);
    let cut = mock.get(url).await.bytes().await.unwrap();
    assert_eq!(&cut[..], &full[..50]);
    assert_eq!(mock.get(url).await.bytes().await.unwrap(), full);
}

#[tokio::test]
async fn redirects_to_the_other_host_without_the_token() {
    let mut mock = Mock::start(3, |_| {}).await;
    let manifest = mock.export("/$export?_type=Patient").await;
    let url = manifest["output"][0]["url"].as_str().unwrap().to_string();
    let path = url.split_once("/files/").unwrap().1.to_string();
    mock.ehr().set_faults(vec![Fault::every(
        Endpoint::File,
        FaultKind::RedirectOtherHost,
    )]);
    let r = mock.get(&url).await;
    assert_eq!(r.status(), StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(
        r.headers()["location"],
        format!("{}/files/{path}", mock.running.other_host)
    );
    // A client that follows redirects drops Authorization for another host.
    mock.http = reqwest::Client::new();
    let lines = mock.download(&url).await;
    assert_eq!(lines.len(), 3);
    let there: Vec<_> = mock
        .ehr()
        .requests()
        .into_iter()
        .filter(|l| l.other_host)
        .collect();
    assert_eq!(there.len(), 1);
    assert!(!there[0].had_authorization);
    assert_eq!(there[0].status, 200);
    assert!(mock.running.other_host.ends_with(&there[0].host));
}

#[tokio::test]
async fn expired_tokens_and_files() {
    let mut mock = Mock::start(3, |_| {}).await;
    let manifest = mock.export("/$export").await;
    let urls: Vec<String> = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["url"].as_str().unwrap().to_string())
        .collect();
    mock.ehr()
        .set_faults(vec![Fault::nth(Endpoint::File, 1, FaultKind::ExpireToken)]);
    let r = mock.get(&urls[0]).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        mock.get(&urls[0]).await.status(),
        StatusCode::UNAUTHORIZED,
        "the token is revoked"
    );
    mock.token = mock.new_token("system/*.rs").await;
    assert_eq!(mock.get(&urls[0]).await.status(), StatusCode::OK);

    mock.ehr()
        .set_faults(vec![Fault::nth(Endpoint::File, 2, FaultKind::ExpireFiles)]);
    assert_eq!(mock.get(&urls[0]).await.status(), StatusCode::OK);
    assert_eq!(mock.get(&urls[1]).await.status(), StatusCode::GONE);
    assert_eq!(
        mock.get(&urls[0]).await.status(),
        StatusCode::GONE,
        "all of the job's files"
    );
}

#[tokio::test]
async fn export_shaping_faults() {
    let mock = Mock::start(4, |c| c.changes_per_tick = 30).await;
    let tiny = export_with(&mock, FaultKind::TinyFiles, "/$export").await;
    assert_eq!(tiny["output"].as_array().unwrap().len(), 25);

    let huge = export_with(
        &mock,
        FaultKind::HugeLine { bytes: 3 << 20 },
        "/$export?_type=Patient",
    )
    .await;
    let binary = huge["output"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["type"] == "Binary")
        .unwrap();
    let text = mock
        .get(binary["url"].as_str().unwrap())
        .await
        .text()
        .await
        .unwrap();
    assert!(text.len() > 3 << 20 && text.lines().count() == 1);
    assert_eq!(
        serde_json::from_str::<Value>(text.trim()).unwrap()["resourceType"],
        "Binary"
    );

    let wrong = export_with(
        &mock,
        FaultKind::WrongType,
        "/$export?_type=Patient,Condition",
    )
    .await;
    let first = &wrong["output"][0];
    let lines = mock.download(first["url"].as_str().unwrap()).await;
    assert!(lines.iter().any(|r| r["resourceType"] != first["type"]));

    let count = export_with(&mock, FaultKind::CountMismatch, "/$export?_type=Patient").await;
    let lines = mock
        .download(count["output"][0]["url"].as_str().unwrap())
        .await;
    assert_eq!(count["output"][0]["count"], lines.len() + 1);

    let failed = {
        mock.ehr()
            .set_faults(vec![Fault::nth(Endpoint::Kickoff, 1, FaultKind::FailJob)]);
        let r = mock.kickoff("/$export").await;
        mock.poll(r.headers()["content-location"].to_str().unwrap())
            .await
    };
    assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        failed.json::<Value>().await.unwrap()["resourceType"],
        "OperationOutcome"
    );

    mock.ehr().tick();
    let dup = export_with(&mock, FaultKind::DuplicateIds, "/$export").await;
    let all = mock.outputs(&dup).await;
    assert_eq!(keys(&all).len() + 1, all.len(), "one key twice");
    let mut seen = std::collections::BTreeMap::new();
    for r in &all {
        let key = (r["resourceType"].to_string(), r["id"].to_string());
        let v: u64 = r["meta"]["versionId"].as_str().unwrap().parse().unwrap();
        if let Some(earlier) = seen.insert(key, v) {
            assert!(v < earlier, "the second copy is older");
        }
    }
}

#[tokio::test]
async fn partial_manifests_link_next() {
    let mock = Mock::start(3, |c| {
        c.manifest = ManifestShape::Stu4;
        c.max_lines_per_file = 2;
    })
    .await;
    let whole = mock.export("/$export").await;
    let manifest = export_with(&mock, FaultKind::PartialManifest, "/$export").await;
    let mut outputs = Vec::new();
    let mut page = manifest;
    let mut pages = 1;
    loop {
        outputs.extend(
            page["output"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o["count"].clone()),
        );
        let Some(next) = page.get("link").and_then(|l| l[0]["url"].as_str()) else {
            break;
        };
        assert_eq!(page["link"][0]["relation"], "next");
        page = mock.get_json(next).await;
        pages += 1;
    }
    assert_eq!(pages, 3);
    let counts: Vec<Value> = whole["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["count"].clone())
        .collect();
    assert_eq!(outputs, counts);
}

#[tokio::test]
async fn auto_tick_changes_data_between_calls() {
    let mock = Mock::start(5, |c| c.auto_tick_every = Some(2)).await;
    let t0 = mock.ehr().now();
    mock.get("/Patient").await;
    assert!(
        mock.ehr().now() > t0,
        "the token request and this search are two requests"
    );
    let n = mock.ehr().requests().len();
    assert_eq!(n, 2);
}
