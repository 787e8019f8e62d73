//! Integration tests for `atlas serve` (one test binary for the crate):
//! the router answered in process (tower `oneshot`), on a fresh lake.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::Value as Json;
use tower::ServiceExt;

use atlas_serve::{AppState, ServeConfig, router};

mod access;
mod egress;
mod events;
mod fhircast;
mod issuers;
mod limits;
mod objects;
mod subscriptions;

async fn state(dir: &std::path::Path) -> AppState {
    let lake =
        atlas_lake::Lake::open(dir.join("lake").to_str().unwrap(), Default::default()).unwrap();
    AppState::open(
        lake,
        atlas_ontology::Ontology::builtin(),
        ServeConfig::default(),
    )
    .await
    .unwrap()
}

async fn call(state: &AppState, method: &str, uri: &str) -> (StatusCode, String) {
    let response = router(state.clone())
        .oneshot(
            Request::builder()
                .method(method)
                .uri(uri)
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 24)
        .await
        .unwrap();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

async fn get_json(state: &AppState, uri: &str) -> (StatusCode, Json) {
    let (status, body) = call(state, "GET", uri).await;
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{uri}: {e}: {body}"));
    (status, json)
}

#[tokio::test]
async fn health_reports_a_readable_lake() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path()).await;
    let (status, body) = get_json(&s, "/health").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "ok");
    assert_eq!(body["lake"]["readable"], true);
    assert!(body["lake"]["resourcesVersion"].is_null(), "{body}");
}

#[tokio::test]
async fn health_is_503_when_the_lake_cannot_be_read() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path()).await;
    // A store whose log is not JSON: the lake exists but cannot be read.
    let log = dir.path().join("lake/tables/resources/_delta_log");
    std::fs::create_dir_all(&log).unwrap();
    std::fs::write(log.join("00000000000000000000.json"), "not json\n").unwrap();
    let (status, body) = get_json(&s, "/health").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["lake"]["readable"], false);
}

#[tokio::test]
async fn ontology_metadata_in_the_v2_shape() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path()).await;
    let (status, body) = get_json(&s, "/api/v2/ontologies").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["data"][0]["apiName"], "atlas");
    let rid = body["data"][0]["rid"].as_str().unwrap().to_owned();
    let (status, _) = get_json(&s, &format!("/api/v2/ontologies/{rid}")).await;
    assert_eq!(status, StatusCode::OK, "the rid names the ontology too");

    let (status, body) = get_json(&s, "/api/v2/ontologies/atlas/objectTypes").await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["apiName"].as_str().unwrap())
        .collect();
    for t in [
        "Patient",
        "Encounter",
        "Observation",
        "Condition",
        "MedicationRequest",
    ] {
        assert!(names.contains(&t), "{names:?}");
    }
    assert!(body["nextPageToken"].is_null());

    let (status, obs) = get_json(&s, "/api/v2/ontologies/atlas/objectTypes/Observation").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(obs["primaryKey"], "id");
    assert_eq!(
        obs["properties"]["value_quantity"]["dataType"]["type"],
        "decimal"
    );
    assert_eq!(
        obs["properties"]["effective"]["dataType"]["type"],
        "timestamp"
    );
    assert_eq!(obs["properties"]["status"]["dataType"]["type"], "string");
    // Every property of the metadata is listed, typed and described.
    let onto = atlas_ontology::Ontology::builtin();
    let t = onto.object_type("Observation").unwrap();
    assert_eq!(
        obs["properties"].as_object().unwrap().len(),
        t.properties.len()
    );

    let (status, links) = get_json(
        &s,
        "/api/v2/ontologies/atlas/objectTypes/Patient/outgoingLinkTypes",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let patient_links: Vec<(&str, &str, &str)> = links["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["apiName"].as_str().unwrap(),
                l["objectTypeApiName"].as_str().unwrap(),
                l["cardinality"].as_str().unwrap(),
            )
        })
        .collect();
    for want in [
        ("encounters", "Encounter", "MANY"),
        ("observations", "Observation", "MANY"),
        ("conditions", "Condition", "MANY"),
        ("medicationRequests", "MedicationRequest", "MANY"),
    ] {
        assert!(patient_links.contains(&want), "{patient_links:?}");
    }
    // The reverse side: an observation has one patient, through patient_id.
    let (status, link) = get_json(
        &s,
        "/api/v2/ontologies/atlas/objectTypes/Observation/outgoingLinkTypes/patient",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(link["objectTypeApiName"], "Patient");
    assert_eq!(link["cardinality"], "ONE");
    assert_eq!(link["foreignKeyPropertyApiName"], "patient_id");
}

#[tokio::test]
async fn bad_requests_are_4xx_json_naming_the_parameter() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path()).await;
    for (uri, status, parameter, value) in [
        (
            "/api/v2/ontologies/nope/objectTypes",
            StatusCode::NOT_FOUND,
            "ontology",
            "nope",
        ),
        (
            "/api/v2/ontologies/atlas/objectTypes/Pateint",
            StatusCode::NOT_FOUND,
            "objectType",
            "Pateint",
        ),
        (
            "/api/v2/ontologies/atlas/objectTypes/Patient/outgoingLinkTypes/friends",
            StatusCode::NOT_FOUND,
            "linkType",
            "friends",
        ),
        (
            "/api/v2/ontologies/atlas/objectTypes?pageSize=100000000",
            StatusCode::BAD_REQUEST,
            "pageSize",
            "100000000",
        ),
        (
            "/api/v2/ontologies/atlas/objectTypes?pageSize=-1",
            StatusCode::BAD_REQUEST,
            "pageSize",
            "-1",
        ),
        (
            "/api/v2/ontologies/atlas/objectTypes?pageToken=forged",
            StatusCode::BAD_REQUEST,
            "pageToken",
            "forged",
        ),
        (
            "/no/such/path",
            StatusCode::NOT_FOUND,
            "path",
            "/no/such/path",
        ),
    ] {
        let (got, body) = get_json(&s, uri).await;
        assert_eq!(got, status, "{uri}: {body}");
        assert_eq!(body["parameters"][parameter], value, "{uri}: {body}");
        assert!(
            !body["message"].as_str().unwrap().is_empty(),
            "{uri}: {body}"
        );
        assert!(body["errorName"].is_string(), "{uri}: {body}");
    }
    let (status, body) = call(&s, "DELETE", "/api/v2/ontologies").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{body}");
    assert!(body.contains("\"method\":\"DELETE\""), "{body}");
    let (_, body) = get_json(&s, "/api/v2/ontologies/atlas/objectTypes/Pateint").await;
    assert!(
        body["message"].as_str().unwrap().contains("Patient"),
        "the error lists the known types: {body}"
    );
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_errors_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path()).await;
    for id in ["Patient", "Encounter", "Nope"] {
        call(
            &s,
            "GET",
            &format!("/api/v2/ontologies/atlas/objectTypes/{id}"),
        )
        .await;
    }
    let (status, text) = call(&s, "GET", "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let route = "/api/v2/ontologies/{ontology}/objectTypes/{object_type}";
    assert!(
        text.contains(&format!(
            "atlas_http_requests_total{{route=\"{route}\",status=\"200\"}} 2"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "atlas_http_requests_total{{route=\"{route}\",status=\"404\"}} 1"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "atlas_http_request_duration_seconds_count{{route=\"{route}\"}} 3"
        )),
        "{text}"
    );
    assert!(
        text.contains("atlas_http_errors_total{kind=\"ObjectTypeNotFound\"} 1"),
        "{text}"
    );
    // One label per route pattern, never per raw path.
    assert!(!text.contains("objectTypes/Patient\""), "{text}");
}

/// `/openapi.json`: every route the server answers is documented (the
/// document is generated from the handlers), and an independent validator
/// (`openapi-spec-validator`, from scripts/test.sh's venv) accepts it.
#[tokio::test]
async fn openapi_document_covers_every_route_and_validates() {
    let dir = tempfile::tempdir().unwrap();
    let s = state(dir.path()).await;
    let (status, doc) = get_json(&s, "/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    let paths: Vec<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for p in [
        "/health",
        "/metrics",
        "/api/v2/ontologies",
        "/api/v2/ontologies/{ontology}/objectTypes/{object_type}",
        "/api/v2/ontologies/{ontology}/objectSets/loadObjects",
        "/api/v2/ontologies/{ontology}/objectSets/aggregate",
        "/api/v2/ontologies/{ontology}/objects/{object_type}/{primary_key}/links/{link}",
        "/graphql",
        "/fhir/metadata",
        "/fhir/{resource_type}",
        "/fhir/{resource_type}/{id}/{operation}",
    ] {
        assert!(paths.contains(&p), "{p} missing from {paths:?}");
    }
    // Every documented path is a real route: never the "no such endpoint" fallback.
    for p in &paths {
        let uri = p
            .replace("{ontology}", "atlas")
            .replace("{object_type}", "Patient")
            .replace("{resource_type}", "Patient")
            .replace(['{', '}'], "");
        for method in doc["paths"][*p].as_object().unwrap().keys() {
            let (status, body) = call(&s, &method.to_uppercase(), &uri).await;
            assert!(
                !body.contains("no such endpoint"),
                "{method} {uri}: {status} {body}"
            );
        }
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());

    let py = std::env::var("ATLAS_PYTHON").ok().or_else(|| {
        let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
        venv.exists().then(|| venv.display().to_string())
    });
    let has_validator = py.as_ref().is_some_and(|py| {
        std::process::Command::new(py)
            .args(["-c", "import openapi_spec_validator"])
            .status()
            .is_ok_and(|s| s.success())
    });
    if !has_validator {
        let msg = "MISSING: no Python with openapi-spec-validator (run scripts/test.sh); /openapi.json was not validated independently";
        eprintln!("{msg}");
        assert!(std::env::var("CI").is_err(), "{msg}");
        return;
    }
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, doc.to_string()).unwrap();
    let out = std::process::Command::new(py.unwrap())
        .args(["-m", "openapi_spec_validator"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openapi-spec-validator: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
