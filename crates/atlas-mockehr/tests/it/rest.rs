//! REST: `_lastUpdated` search with stable keyset paging while the data
//! changes, read and vread, `_history` newest first with deletes, and the
//! server's self-description.

use std::collections::{BTreeMap, BTreeSet};

use reqwest::StatusCode;
use serde_json::Value;

use atlas_mockehr::ChangeKind;

use crate::{Mock, enc};

/// Every page of a search or history, following `next`; the entries.
async fn pages(mock: &Mock, first: &str, between: impl Fn()) -> Vec<Value> {
    let mut url = first.to_string();
    let mut entries = Vec::new();
    for _ in 0..100 {
        let bundle = mock.get_json(&url).await;
        entries.extend(bundle["entry"].as_array().unwrap().iter().cloned());
        let next = bundle["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next");
        match next {
            Some(l) => url = l["url"].as_str().unwrap().to_string(),
            None => return entries,
        }
        between();
    }
    panic!("too many pages");
}

#[tokio::test]
async fn last_updated_paging_is_stable_while_data_changes() {
    let mock = Mock::start(10, |c| c.changes_per_tick = 5).await;
    let start = mock.ehr().snapshot(None);
    let entries = pages(
        &mock,
        "/Observation?_lastUpdated=ge2026-01-01T00:00:00Z&_count=4&_sort=_lastUpdated",
        || {
            mock.ehr().tick();
        },
    )
    .await;
    // A resource changed while paging comes again in its new version,
    // later in the order; no version comes twice, none is skipped.
    let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut last = (String::new(), String::new());
    for e in &entries {
        let r = &e["resource"];
        let id = r["id"].as_str().unwrap().to_string();
        assert_eq!(
            e["fullUrl"],
            format!("{}/Observation/{id}", mock.running.fhir_base)
        );
        let order = (
            r["meta"]["lastUpdated"].as_str().unwrap().to_string(),
            id.clone(),
        );
        assert!(order > last, "ordered by (lastUpdated, id)");
        last = order;
        *seen
            .entry((id, r["meta"]["versionId"].as_str().unwrap().to_string()))
            .or_default() += 1;
    }
    assert!(seen.values().all(|n| *n == 1), "no version twice");
    // Every Observation live now was returned in its current version.
    let end = mock.ehr().snapshot(None);
    let mut live = 0;
    for ((ty, id), v) in &end {
        if ty == "Observation" && !v.deleted {
            live += 1;
            assert!(
                seen.contains_key(&(id.clone(), v.version_id.to_string())),
                "{id} v{} missing",
                v.version_id
            );
        }
    }
    assert!(live > 20 && start.len() > live);
}

#[tokio::test]
async fn last_updated_gt_finds_the_changes() {
    let mock = Mock::start(10, |c| c.changes_per_tick = 8).await;
    let t0 = mock.ehr().now();
    let changes = mock.ehr().tick();
    for ty in ["Patient", "Observation", "Condition", "Encounter"] {
        let bundle = mock
            .get_json(&format!("/{ty}?_lastUpdated=gt{}", enc(&t0)))
            .await;
        let got: BTreeSet<String> = bundle["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
            .collect();
        let want: BTreeSet<String> = changes
            .changes
            .iter()
            .filter(|c| c.key.0 == ty && c.kind != ChangeKind::Deleted)
            .map(|c| c.key.1.clone())
            .collect();
        assert_eq!(got, want, "{ty}");
        assert_eq!(bundle["total"], want.len());
    }
    let r = mock.get("/Observation?_sort=-date").await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = mock.get("/Observation?_lastUpdated=gtnever").await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn history_is_newest_first_with_deletes() {
    let mock = Mock::start(10, |c| c.changes_per_tick = 6).await;
    let t0 = mock.ehr().now();
    let mut changes = mock.ehr().tick().changes;
    changes.extend(mock.ehr().tick().changes);
    let since = enc(&t0);
    // `_since` is inclusive for history: the initial versions at t0 would
    // come too, so ask from one millisecond later.
    let after = since.replace("00.000Z", "00.001Z");
    let entries = pages(&mock, &format!("/_history?_since={after}&_count=5"), || {}).await;
    assert_eq!(entries.len(), changes.len());
    for (e, c) in entries.iter().zip(changes.iter().rev()) {
        let (ty, id) = &c.key;
        assert_eq!(
            e["fullUrl"],
            format!("{}/{ty}/{id}", mock.running.fhir_base)
        );
        assert_eq!(e["response"]["etag"], format!("W/\"{}\"", c.version_id));
        assert_eq!(e["response"]["lastModified"], c.last_updated);
        let method = match c.kind {
            ChangeKind::Created => "POST",
            ChangeKind::Updated => "PUT",
            ChangeKind::Deleted => "DELETE",
        };
        assert_eq!(e["request"]["method"], method);
        assert_eq!(e.get("resource").is_none(), c.kind == ChangeKind::Deleted);
    }
    let obs = pages(
        &mock,
        &format!("/Observation/_history?_since={after}"),
        || {},
    )
    .await;
    assert_eq!(
        obs.len(),
        changes.iter().filter(|c| c.key.0 == "Observation").count()
    );
    let all = mock.get_json("/_history?_count=1000").await;
    assert_eq!(all["type"], "history");
    assert_eq!(all["entry"].as_array().unwrap().len(), 61 + changes.len());

    // Read, vread, deleted.
    if let Some(d) = changes.iter().find(|c| c.kind == ChangeKind::Deleted) {
        let (ty, id) = &d.key;
        assert_eq!(
            mock.get(&format!("/{ty}/{id}")).await.status(),
            StatusCode::GONE
        );
        let v1 = mock.get(&format!("/{ty}/{id}/_history/1")).await;
        assert_eq!(v1.status(), StatusCode::OK);
        assert_eq!(v1.headers()["etag"], "W/\"1\"");
        let instance = mock.get_json(&format!("/{ty}/{id}/_history")).await;
        assert_eq!(instance["entry"][0]["request"]["method"], "DELETE");
    }
    assert_eq!(
        mock.get("/Patient/nope").await.status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn history_off_and_self_description() {
    let mock = Mock::start(1, |c| c.history = false).await;
    assert_eq!(mock.get("/_history").await.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        mock.get("/Patient/_history").await.status(),
        StatusCode::NOT_FOUND
    );
    let cap = mock.get_json("/metadata").await;
    assert!(cap["rest"][0].get("interaction").is_none());
    let on = Mock::start(1, |_| {}).await;
    let cap = on.get_json("/metadata").await;
    assert_eq!(cap["resourceType"], "CapabilityStatement");
    assert_eq!(
        cap["instantiates"][0],
        "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"
    );
    assert_eq!(cap["rest"][0]["interaction"][0]["code"], "history-system");
    assert_eq!(cap["rest"][0]["operation"][0]["name"], "export");
    assert_eq!(
        cap["rest"][0]["security"]["extension"][0]["extension"][0]["valueUri"],
        on.running.token_url
    );
    let smart = on.get_json("/.well-known/smart-configuration").await;
    assert_eq!(smart["token_endpoint"], on.running.token_url);
    assert_eq!(
        smart["token_endpoint_auth_signing_alg_values_supported"],
        serde_json::json!(["RS384", "ES384"])
    );
    assert!(
        smart["scopes_supported"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s == "system/*.rs")
    );
}
