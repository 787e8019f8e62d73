//! Bulk Data export: kick-off by GET and POST, the status dance, the
//! manifest in each shape, files that hold exactly the data as of
//! `transactionTime`, `_since` after ticks, compartments, filters.

use std::collections::BTreeSet;

use reqwest::StatusCode;
use serde_json::{Value, json};

use atlas_mockehr::{KickoffMode, ManifestShape};

use crate::{Mock, keys};

/// Every live key as of now, from the mock's own snapshot.
fn live_keys(mock: &Mock) -> BTreeSet<(String, String)> {
    mock.ehr()
        .snapshot(None)
        .into_iter()
        .filter(|(_, v)| !v.deleted)
        .map(|(k, _)| k)
        .collect()
}

#[tokio::test]
async fn full_export_in_each_manifest_shape() {
    for shape in [
        ManifestShape::Stu2,
        ManifestShape::Stu3,
        ManifestShape::Stu4,
    ] {
        let mock = Mock::start(5, |c| {
            c.manifest = shape;
            c.max_lines_per_file = 2;
        })
        .await;
        let manifest = mock
            .export("/$export?_outputFormat=application%2Ffhir%2Bndjson")
            .await;
        assert_eq!(manifest["transactionTime"], mock.ehr().now());
        assert_eq!(manifest["requiresAccessToken"], true);
        let stu4 = shape == ManifestShape::Stu4;
        assert_eq!(manifest.get("request").is_some(), !stu4, "{shape:?}");
        assert_eq!(manifest.get("manifestType").is_some(), stu4);
        assert_eq!(manifest.get("outcome").is_some(), stu4);
        assert_eq!(manifest.get("error").is_some(), !stu4);
        assert_eq!(manifest["extension"].is_array(), stu4);
        assert!(manifest.get("deleted").is_none() && manifest.get("link").is_none());
        if !stu4 {
            assert!(
                manifest["request"]
                    .as_str()
                    .unwrap()
                    .ends_with("/fhir/$export?_outputFormat=application%2Ffhir%2Bndjson")
            );
        }
        let mut all = Vec::new();
        for o in manifest["output"].as_array().unwrap() {
            let lines = mock.download(o["url"].as_str().unwrap()).await;
            assert_eq!(o["count"], lines.len());
            assert!(lines.len() <= 2);
            assert!(
                lines.iter().all(|r| r["resourceType"] == o["type"]),
                "one type per file"
            );
            all.extend(lines);
        }
        assert_eq!(all.len(), 31);
        assert_eq!(keys(&all), live_keys(&mock));
        assert!(all.iter().all(|r| r["meta"]["versionId"] == "1"
            && r["meta"]["lastUpdated"] == "2026-01-01T00:00:00.000Z"));
    }
}

#[tokio::test]
async fn post_kickoff_with_parameters_and_methods() {
    let mock = Mock::start(6, |c| c.kickoff = KickoffMode::PostOnly).await;
    let post = |path: &str, body: Value| {
        mock.http
            .post(format!("{}{path}", mock.running.fhir_base))
            .bearer_auth(&mock.token)
            .header("accept", "application/fhir+json")
            .header("prefer", "respond-async")
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
    };
    let params = json!({"resourceType": "Parameters", "parameter": [
        {"name": "_type", "valueString": "Patient,Observation"},
        {"name": "patient", "valueReference": {"reference": "Patient/p0"}},
        {"name": "patient", "valueReference": {"reference": "Patient/p1"}},
        {"name": "_outputFormat", "valueString": "ndjson"}
    ]});
    // The cohort is every 2nd patient: p0, p2, p4; asking for p0 and p1 gives p0.
    let r = post("/Group/cohort/$export", params).await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let status_url = r.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(status_url.starts_with("http://127.0.0.1:"));
    let manifest: Value = mock.poll(&status_url).await.json().await.unwrap();
    let got = keys(&mock.outputs(&manifest).await);
    let want: BTreeSet<_> = [
        ("Patient", "p0"),
        ("Observation", "o0-0"),
        ("Observation", "o0-1"),
        ("Observation", "o0-2"),
    ]
    .iter()
    .map(|(t, i)| (t.to_string(), i.to_string()))
    .collect();
    assert_eq!(got, want);
    let r = mock.kickoff("/$export").await;
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers()["allow"], "POST");
}

#[tokio::test]
async fn kickoff_errors_concurrency_and_cancel() {
    let mock = Mock::start(2, |_| {}).await;
    let r = mock.get("/$export").await;
    assert_eq!(
        r.status(),
        StatusCode::BAD_REQUEST,
        "no Prefer: respond-async"
    );
    assert_eq!(
        r.json::<Value>().await.unwrap()["resourceType"],
        "OperationOutcome"
    );
    for bad in [
        "/$export?_outputFormat=text%2Fcsv",
        "/$export?_since=yesterday",
        "/$export?_type=Nope",
        "/$export?_foo=1",
        "/$export?patient=Patient%2Fp0",
        "/$export?includeAssociatedData=LatestProvenanceResources",
        "/$export?organizeOutputBy=Patient",
        "/$export?_typeFilter=Observation%3Fdate%3Dgt2020",
    ] {
        let r = mock.kickoff(bad).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad}");
    }
    let r = mock
        .kickoff("/$export?_typeFilter=Observation%3Fdate%3Dgt2020")
        .await;
    let text = r.text().await.unwrap();
    assert!(
        text.contains("date"),
        "the error names the parameter: {text}"
    );
    assert_eq!(
        mock.kickoff("/Group/nope/$export").await.status(),
        StatusCode::NOT_FOUND
    );

    let r = mock.kickoff("/Patient/$export").await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let status_url = r.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string();
    let busy = mock.kickoff("/$export").await;
    assert_eq!(busy.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(busy.headers()["retry-after"], "0");
    let r = mock
        .http
        .delete(&status_url)
        .bearer_auth(&mock.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = mock.get(&status_url).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        r.json::<Value>().await.unwrap()["resourceType"],
        "OperationOutcome"
    );

    // Lenient handling: the unknown parameter is reported in the error file.
    let r = mock
        .http
        .get(format!(
            "{}/$export?_foo=1&_type=Patient",
            mock.running.fhir_base
        ))
        .bearer_auth(&mock.token)
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async, handling=lenient")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let status_url = r.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string();
    let manifest: Value = mock.poll(&status_url).await.json().await.unwrap();
    let errors = mock
        .download(manifest["error"][0]["url"].as_str().unwrap())
        .await;
    assert!(
        errors[0]["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("_foo")
    );
}

#[tokio::test]
async fn since_after_tick_yields_exactly_the_changes() {
    let mock = Mock::start(20, |c| c.changes_per_tick = 12).await;
    let first = mock.export("/$export").await;
    let t1 = first["transactionTime"].as_str().unwrap().to_string();
    let changes = mock.ehr().tick();
    assert_eq!(changes.changes.len(), 12);
    let (deleted, changed): (Vec<_>, Vec<_>) = changes
        .changes
        .iter()
        .partition(|c| c.kind == atlas_mockehr::ChangeKind::Deleted);
    assert!(
        !deleted.is_empty() && !changed.is_empty(),
        "seed 1 mixes deletes and writes"
    );
    let manifest = mock
        .export(&format!("/$export?_since={}", crate::enc(&t1)))
        .await;
    assert_eq!(manifest["transactionTime"], mock.ehr().now());
    assert!(manifest["transactionTime"].as_str().unwrap() > t1.as_str());
    let out = mock.outputs(&manifest).await;
    let want: BTreeSet<_> = changed.iter().map(|c| c.key.clone()).collect();
    assert_eq!(keys(&out), want);
    for r in &out {
        let c = changed.iter().find(|c| c.key.1 == r["id"]).unwrap();
        assert_eq!(r["meta"]["versionId"], c.version_id.to_string());
        assert_eq!(r["meta"]["lastUpdated"], c.last_updated);
    }
    let mut gone = BTreeSet::new();
    for d in manifest["deleted"].as_array().unwrap() {
        assert_eq!(d["type"], "Bundle");
        for bundle in mock.download(d["url"].as_str().unwrap()).await {
            assert_eq!(bundle["type"], "transaction");
            for e in bundle["entry"].as_array().unwrap() {
                assert_eq!(e["request"]["method"], "DELETE");
                assert!(
                    e["fullUrl"]
                        .as_str()
                        .unwrap()
                        .starts_with(&mock.running.fhir_base)
                );
                assert!(e["response"]["etag"].as_str().unwrap().starts_with("W/\""));
                let (ty, id) = e["request"]["url"]
                    .as_str()
                    .unwrap()
                    .split_once('/')
                    .unwrap();
                gone.insert((ty.to_string(), id.to_string()));
            }
        }
    }
    let want_gone: BTreeSet<_> = deleted.iter().map(|c| c.key.clone()).collect();
    assert_eq!(gone, want_gone);
    // Nothing changed since the last export: empty output, empty deleted.
    let again = mock
        .export(&format!(
            "/$export?_since={}",
            crate::enc(manifest["transactionTime"].as_str().unwrap())
        ))
        .await;
    assert_eq!(again["output"], json!([]));
    assert_eq!(again["deleted"], json!([]));
}

#[tokio::test]
async fn the_export_holds_the_state_at_transaction_time() {
    let mock = Mock::start(10, |c| c.export_delay_polls = 2).await;
    let before = live_keys(&mock);
    let r = mock.kickoff("/$export").await;
    let status_url = r.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string();
    let t = mock.ehr().now();
    // Changes between kick-off and download are not in this export.
    mock.ehr().tick();
    mock.ehr().tick();
    let manifest: Value = mock.poll(&status_url).await.json().await.unwrap();
    assert_eq!(manifest["transactionTime"], t);
    let out = mock.outputs(&manifest).await;
    assert_eq!(keys(&out), before);
    assert!(out.iter().all(|r| r["meta"]["versionId"] == "1"));
}

#[tokio::test]
async fn compartments_filters_and_elements() {
    let mock = Mock::start(4, |_| {}).await;
    let patient_level = mock.outputs(&mock.export("/Patient/$export").await).await;
    assert_eq!(patient_level.len(), 24, "everything but the Organization");
    assert!(!keys(&patient_level).contains(&("Organization".into(), "org1".into())));
    let cohort = mock
        .outputs(&mock.export("/Group/cohort/$export?_type=Patient").await)
        .await;
    assert_eq!(
        keys(&cohort),
        [
            ("Patient".to_string(), "p0".to_string()),
            ("Patient".into(), "p2".into())
        ]
        .into()
    );
    let group = mock.get_json("/Group/cohort").await;
    assert_eq!(group["member"].as_array().unwrap().len(), 2);

    let filtered = mock
        .outputs(&mock.export("/$export?_type=Observation,Patient&_typeFilter=Observation%3Fcode%3Dhttp%3A%2F%2Floinc.org%7C8867-4").await)
        .await;
    let obs: Vec<_> = filtered
        .iter()
        .filter(|r| r["resourceType"] == "Observation")
        .collect();
    assert_eq!(obs.len(), 4);
    assert!(
        obs.iter()
            .all(|o| o["code"]["coding"][0]["code"] == "8867-4")
    );
    assert_eq!(filtered.len(), 8, "Patients are not filtered");

    let subset = mock
        .outputs(
            &mock
                .export("/$export?_type=Patient&_elements=Patient.gender")
                .await,
        )
        .await;
    for p in &subset {
        let members: BTreeSet<&str> = p.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(members, ["gender", "id", "meta", "resourceType"].into());
        assert_eq!(p["meta"]["tag"][0]["code"], "SUBSETTED");
    }
}

#[tokio::test]
async fn organized_by_patient_stu3() {
    let mock = Mock::start(3, |c| {
        c.manifest = ManifestShape::Stu3;
        c.max_lines_per_file = 4;
    })
    .await;
    let manifest = mock
        .export("/Patient/$export?organizeOutputBy=Patient")
        .await;
    assert_eq!(manifest["outputOrganizedBy"], "Patient");
    let outputs = manifest["output"].as_array().unwrap();
    assert!(outputs.iter().all(|o| o.get("type").is_none()));
    // 3 patients x 6 resources in files of 4: blocks of 6 cross files.
    assert_eq!(outputs.len(), 5);
    assert_eq!(outputs[0]["continuesInFile"], outputs[1]["url"]);
    let all = mock.outputs(&manifest).await;
    assert_eq!(all.len(), 18);
    for block in all.chunks(6) {
        assert_eq!(block[0]["resourceType"], "Patient");
        let pid = block[0]["id"].as_str().unwrap();
        assert!(
            block[1..]
                .iter()
                .all(|r| r["subject"]["reference"] == format!("Patient/{pid}"))
        );
    }
}

#[tokio::test]
async fn files_are_gzipped_on_request_and_need_the_token() {
    use std::io::Read;
    let mock = Mock::start(3, |_| {}).await;
    let manifest = mock.export("/$export?_type=Observation").await;
    let url = manifest["output"][0]["url"].as_str().unwrap();
    let plain = mock.get(url).await.bytes().await.unwrap();
    let r = mock
        .http
        .get(url)
        .bearer_auth(&mock.token)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-encoding"], "gzip");
    let gz = r.bytes().await.unwrap();
    let mut text = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut text)
        .unwrap();
    assert_eq!(text, plain);
    let r = mock.http.get(url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn loads_ndjson_folders_and_runs_deterministically() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let mut lines = String::new();
    for r in crate::resources(3) {
        lines.push_str(&r.to_string());
        lines.push('\n');
    }
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(
        dir.path().join("a.ndjson"),
        format!("{lines}not json\n[1]\n{{\"resourceType\":\"Patient\"}}\n\n"),
    )
    .unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(
        br#"{"resourceType":"Observation","id":"gz1","valueQuantity":{"value":16942.30}}"#,
    )
    .unwrap();
    gz.write_all(b"\n{\"resourceType\":\"Patient\",\"id\":\"p0\"}\n")
        .unwrap();
    std::fs::write(dir.path().join("sub/b.ndjson.gz"), gz.finish().unwrap()).unwrap();
    std::fs::write(dir.path().join("ignored.json"), "{}").unwrap();
    let load = || atlas_mockehr::MockEhr::from_ndjson_dir(dir.path(), Default::default()).unwrap();
    let (a, b) = (load(), load());
    let stats = a.stats();
    assert_eq!(
        (
            stats.files,
            stats.resources,
            stats.skipped,
            stats.duplicates
        ),
        (2, 20, 3, 1)
    );
    for _ in 0..3 {
        assert_eq!(a.tick(), b.tick());
    }
    assert_eq!(a.snapshot(None), b.snapshot(None));
    assert_eq!(a.now(), b.now());
    // As of the start, every key is version 1.
    assert!(
        a.snapshot(Some("2026-01-01T00:00:00Z"))
            .values()
            .all(|v| v.version_id == 1 && !v.deleted)
    );
    let running = a.start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    assert!(matches!(
        a.start("127.0.0.1:0".parse().unwrap()).await,
        Err(atlas_mockehr::MockError::AlreadyStarted)
    ));
    running.shutdown().await;
}
