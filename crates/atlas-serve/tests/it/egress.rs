//! Every path out of the lake goes through `atlas_access::Egress`: the
//! audit record names the patients each answer holds, on every path and
//! in every streamed format; hidden fields are absent everywhere; and
//! `POST /api/v2/sql` answers inside the caller's scope only.
//!
//! `scripts/egress-mutants.sh` disables each of the egress's duties in
//! turn and shows these tests (and the access matrix) fail for each.

use std::collections::BTreeSet;

use axum::http::StatusCode;
use serde_json::{Value as Json, json};

use crate::access::{LOAD, World, audit_records, call, call_json, first_org, jwt, world};

const SQL: &str = "/api/v2/sql";

/// `POST /api/v2/sql` with `body`.
async fn sql(state: &atlas_serve::AppState, token: &str, body: Json) -> (StatusCode, Json) {
    call_json(state, "POST", SQL, token, None, Some(&body)).await
}

/// The patients and rows the records of `sub`'s requests name (the final
/// record of a whole answer, the completion record of a stream).
async fn recorded(w: &World, sub: &str) -> (BTreeSet<String>, Option<u64>, u64) {
    let mut patients = BTreeSet::new();
    let mut rows = 0;
    let mut count = None;
    for r in audit_records(w).await {
        let e = r.entry;
        if e.subject.as_deref() != Some(sub) || e.decision == "started" {
            continue;
        }
        patients.extend(e.patients.iter().cloned());
        rows = rows.max(e.rows.unwrap_or(0));
        if e.patient_count.unwrap_or(0) > 0 {
            count = e.patient_count;
        }
    }
    (patients, count, rows)
}

/// A world of 8 patients and a server that lets one organization's
/// patients be read, with `Observation.value` hidden.
async fn scoped_world() -> (World, atlas_serve::AppState, BTreeSet<String>) {
    let w = world(8, None).await;
    let org = first_org(&w);
    let in_org = w.where_patients(|p| p["managingOrganization"]["reference"] == json!(org));
    assert!(!in_org.is_empty() && in_org.len() < w.patients.len());
    let state = w
        .server(&format!(
            "[[rule]]\nid = \"org\"\neffect = \"allow\"\npatients = {{ organization = \"{org}\" }}\n\
             [[rule]]\nid = \"no-values\"\neffect = \"deny\"\nhide = [\"Observation.value\"]\n"
        ))
        .await;
    (w, state, in_org)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_names_the_patients_of_every_path_and_format() {
    let (w, state, in_org) = scoped_world().await;
    let obs = w.observations_of(&in_org);
    let with_obs: BTreeSet<String> = obs.iter().map(|o| w.observations[o].clone()).collect();
    let one = in_org.iter().next().unwrap().clone();
    let set =
        json!({"objectSet": {"type": "base", "objectType": "Observation"}, "pageSize": 10000});
    // (name, method, uri, body, patients the answer holds, rows)
    type Case = (
        &'static str,
        &'static str,
        String,
        Option<Json>,
        BTreeSet<String>,
        usize,
    );
    let mut cases: Vec<Case> = vec![
        (
            "page",
            "POST",
            LOAD.into(),
            Some(set.clone()),
            with_obs.clone(),
            obs.len(),
        ),
        (
            "graphql",
            "POST",
            "/graphql".into(),
            Some(json!({"query": "{ ObservationAll(first: 10000) { nodes { id } } }"})),
            with_obs.clone(),
            obs.len(),
        ),
        (
            "fhir-bundle",
            "GET",
            "/fhir/Observation?_count=1000".into(),
            None,
            with_obs.clone(),
            obs.len(),
        ),
        (
            "fhir-ndjson",
            "GET",
            "/fhir/Observation?_format=ndjson".into(),
            None,
            with_obs.clone(),
            obs.len(),
        ),
        (
            "fhir-read",
            "GET",
            format!("/fhir/Patient/{one}"),
            None,
            [one.clone()].into(),
            1,
        ),
        (
            "sql-rows",
            "POST",
            SQL.into(),
            Some(json!({"query": "SELECT id, code FROM observation"})),
            with_obs.clone(),
            obs.len(),
        ),
        (
            "sql-count",
            "POST",
            SQL.into(),
            Some(json!({"query": "SELECT count(*) AS n FROM observation"})),
            with_obs.clone(),
            1,
        ),
    ];
    let whole = json!({"objectSet": {"type": "base", "objectType": "Observation"}});
    for format in ["ndjson", "arrow", "parquet"] {
        cases.push((
            "objects-stream",
            "POST",
            format!("{LOAD}?format={format}"),
            Some(whole.clone()),
            with_obs.clone(),
            obs.len(),
        ));
        cases.push((
            "view-rows",
            "GET",
            format!("/api/v2/views/observation/rows?format={format}"),
            None,
            with_obs.clone(),
            obs.len(),
        ));
        cases.push((
            "sql-format",
            "POST",
            SQL.into(),
            Some(json!({"query": "SELECT id FROM observation", "format": format})),
            with_obs.clone(),
            obs.len(),
        ));
    }
    for (i, (name, method, uri, body, patients, rows)) in cases.iter().enumerate() {
        let sub = format!("egress-{i}");
        let token = jwt(json!({"sub": sub}));
        let (s, b) = call(&state, method, uri, &token, None, body.as_ref()).await;
        assert_eq!(
            s,
            StatusCode::OK,
            "{name} {uri}: {}",
            String::from_utf8_lossy(&b)
        );
        let (got, count, got_rows) = recorded(&w, &sub).await;
        assert_eq!(&got, patients, "{name} {uri}: patients in the record");
        assert_eq!(count, Some(patients.len() as u64), "{name} {uri}");
        assert_eq!(got_rows, *rows as u64, "{name} {uri}: rows in the record");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hidden_fields_never_leave_on_any_path() {
    let (w, state, in_org) = scoped_world().await;
    let token = jwt(json!({}));
    let set =
        json!({"objectSet": {"type": "base", "objectType": "Observation"}, "pageSize": 10000});
    let (s, page) = call_json(&state, "POST", LOAD, &token, None, Some(&set)).await;
    assert_eq!(s, StatusCode::OK, "{page}");
    let objects = page["data"].as_array().unwrap();
    assert_eq!(objects.len(), w.observations_of(&in_org).len());
    for o in objects {
        assert!(
            o.get("value_quantity").is_none() && o.get("code").is_some(),
            "{o}"
        );
    }
    let (_, b) = call(
        &state,
        "POST",
        &format!("{LOAD}?format=ndjson"),
        &token,
        None,
        Some(&set),
    )
    .await;
    let text = String::from_utf8(b).unwrap();
    assert!(
        !text.is_empty() && !text.contains("value_quantity"),
        "{text}"
    );
    let (_, b) = call(
        &state,
        "GET",
        "/api/v2/views/observation/rows",
        &token,
        None,
        None,
    )
    .await;
    let text = String::from_utf8(b).unwrap();
    assert!(
        !text.is_empty() && !text.contains("value_quantity"),
        "{text}"
    );
    let (_, b) = call(
        &state,
        "GET",
        "/fhir/Observation?_format=ndjson",
        &token,
        None,
        None,
    )
    .await;
    let text = String::from_utf8(b).unwrap();
    assert!(!text.is_empty());
    for line in text.lines() {
        let r: Json = serde_json::from_str(line).unwrap();
        let keys: Vec<&String> = r.as_object().unwrap().keys().collect();
        assert!(
            !keys.iter().any(|k| k.starts_with("value")) && r.get("code").is_some(),
            "{line}"
        );
    }
    // SQL: the column is not there, so naming it is an error like any
    // unknown column; `*` leaves it out.
    let (s, rows) = sql(
        &state,
        &token,
        json!({"query": "SELECT * FROM observation"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{rows}");
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .all(|r| r.get("value_quantity").is_none() && r.get("code").is_some())
    );
    let (s, e) = sql(
        &state,
        &token,
        json!({"query": "SELECT max(value_quantity) FROM observation"}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    // A type with hidden elements is not offered whole in `resources`.
    let (s, rows) = sql(
        &state,
        &token,
        json!({"query": "SELECT DISTINCT resource_type FROM resources ORDER BY 1"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{rows}");
    assert!(
        !rows.to_string().contains("Observation") && rows.to_string().contains("Patient"),
        "{rows}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_is_read_only_and_bounded() {
    let w = world(4, None).await;
    let state = w
        .server_with("[[rule]]\nid = \"everyone\"\neffect = \"allow\"\n", |c| {
            c.sql.max_rows = 5;
        })
        .await;
    let token = jwt(json!({}));
    for (query, construct) in [
        ("DROP TABLE patient", "DROP"),
        ("CREATE TABLE x AS SELECT 1", "CREATE TABLE"),
        (
            "CREATE EXTERNAL TABLE x STORED AS PARQUET LOCATION '/etc'",
            "CREATE EXTERNAL",
        ),
        ("INSERT INTO patient SELECT * FROM patient", "INSERT"),
        ("COPY patient TO '/tmp/x.parquet'", "COPY"),
        ("SET datafusion.execution.batch_size = 1", "SET"),
        ("EXPLAIN SELECT * FROM patient", "EXPLAIN"),
    ] {
        let (s, e) = sql(&state, &token, json!({"query": query})).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{query}: {e}");
        assert_eq!(e["errorName"], "SqlNotAllowed", "{query}: {e}");
        assert_eq!(e["parameters"]["query"], construct, "{query}: {e}");
    }
    for query in [
        "SELECT 1; SELECT 2",
        "SELECT * FROM '/etc/passwd'",
        "SELECT * FROM read_parquet('/x')",
        "SELECT * FROM information_schema.tables",
    ] {
        let (s, e) = sql(&state, &token, json!({"query": query})).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{query}: {e}");
    }
    let (s, e) = sql(
        &state,
        &token,
        json!({"query": "SELECT * FROM observation"}),
    )
    .await;
    assert_eq!(
        (s, e["errorName"].as_str()),
        (StatusCode::BAD_REQUEST, Some("SqlTooManyRows")),
        "{e}"
    );
    let (s, rows) = sql(
        &state,
        &token,
        json!({"query": "SELECT id FROM observation ORDER BY id LIMIT 5"}),
    )
    .await;
    assert_eq!(
        (s, rows.as_array().map(Vec::len)),
        (StatusCode::OK, Some(5)),
        "{rows}"
    );
    // FHIRPath over the store, checked against the generated JSON.
    let (s, rows) = sql(&state, &token, json!({"query":
        "SELECT count(*) AS n FROM resources WHERE resource_type = 'Patient' AND fhirpath(resource, 'gender') = '\"female\"'"})).await;
    assert_eq!(s, StatusCode::OK, "{rows}");
    let female = w.where_patients(|p| p["gender"] == "female").len();
    assert_eq!(rows, json!([{"n": female}]));
    let (s, csv) = call(&state, "POST", SQL, &token, None,
        Some(&json!({"query": "SELECT gender, count(*) AS n FROM patient GROUP BY gender ORDER BY gender", "format": "csv"}))).await;
    assert_eq!(s, StatusCode::OK);
    assert!(String::from_utf8(csv).unwrap().starts_with("gender,n\n"));
    // A patient-bound token sees its own rows only, and the server's
    // OpenAPI document lists the endpoint.
    let one = w.patients.keys().next().unwrap().clone();
    let bound = jwt(json!({"patient": one, "scope": "patient/*.rs"}));
    let (s, rows) = sql(
        &state,
        &bound,
        json!({"query": "SELECT DISTINCT patient_id FROM observation"}),
    )
    .await;
    assert_eq!((s, rows), (StatusCode::OK, json!([{"patient_id": one}])));
    assert!(atlas_serve::openapi_json().contains("/api/v2/sql"));
}
