//! Object sets end to end on a small generated lake: paging visits every
//! object once, in order, from one snapshot even while ingests commit; the
//! patient scope holds on every path; bad input and bad tokens are 4xx
//! naming the field. Expected answers come from `atlas sql` over the same
//! view tables (a separate read path).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value as Json, json};
use tower::ServiceExt;

use atlas_ingest::collect_inputs;
use atlas_lake::{IngestOptions, Lake, Progress};
use atlas_serve::{AppState, DevIssuer, ServeConfig, TokenRequest, router};
use atlas_viewstore::{RefreshOptions, ViewStore};

const LOAD: &str = "/api/v2/ontologies/atlas/objectSets/loadObjects";

pub(crate) fn synth(dir: &Path, patients: usize, seed: u64) -> PathBuf {
    let out = dir.join(format!("synth-{seed}"));
    let opts = atlas_synth::SynthOptions {
        patients,
        seed,
        ..Default::default()
    };
    atlas_synth::generate(&opts, &out, &AtomicU64::new(0)).unwrap();
    out
}

pub(crate) async fn ingest_and_refresh(lake: &Lake, data: &Path) {
    let names = vec![data.display().to_string()];
    let set = collect_inputs(&names, &mut std::io::empty()).unwrap();
    let report = atlas_lake::ingest(
        lake,
        &set.inputs,
        &IngestOptions::default(),
        &Progress::default(),
    )
    .await
    .unwrap();
    assert!(report.outcomes.reconciles());
    ViewStore::new(lake.clone())
        .refresh(&[], &RefreshOptions::default())
        .await
        .unwrap();
}

/// A generated lake with views, for tests that need data behind the API.
pub(crate) async fn small_lake(patients: usize) -> Fixture {
    fixture(patients).await
}

pub(crate) struct Fixture {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    pub(crate) lake: Lake,
    state: AppState,
    issuer: DevIssuer,
}

async fn fixture(patients: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::open(
        dir.path().join("lake").to_str().unwrap(),
        Default::default(),
    )
    .unwrap();
    let data = synth(dir.path(), patients, 11);
    ingest_and_refresh(&lake, &data).await;
    let mut config = ServeConfig::default();
    config.auth.dev = true;
    let state = AppState::open(lake.clone(), atlas_ontology::Ontology::builtin(), config)
        .await
        .unwrap();
    let issuer = DevIssuer::open(&lake).await.unwrap();
    Fixture {
        dir: dir.path().to_path_buf(),
        _dir: dir,
        lake,
        state,
        issuer,
    }
}

impl Fixture {
    fn token(&self, sub: &str, scope: &str, patient: Option<&str>) -> String {
        self.issuer
            .mint(&TokenRequest {
                subject: sub.into(),
                scope: scope.into(),
                patient: patient.map(str::to_owned),
                ttl_secs: 600,
                ..Default::default()
            })
            .unwrap()
    }

    fn admin(&self) -> String {
        self.token("admin", "user/*.rs", None)
    }

    async fn call(
        &self,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: Option<&Json>,
    ) -> (StatusCode, Json) {
        self.call_on(&self.state, method, uri, token, body).await
    }

    async fn call_on(
        &self,
        state: &AppState,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: Option<&Json>,
    ) -> (StatusCode, Json) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let body = match body {
            Some(b) => Body::from(b.to_string()),
            None => Body::empty(),
        };
        let response = router(state.clone())
            .oneshot(req.body(body).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 26)
            .await
            .unwrap();
        let json = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{uri}: {e}: {}", String::from_utf8_lossy(&bytes)));
        (status, json)
    }

    async fn load(&self, token: &str, body: &Json) -> (StatusCode, Json) {
        self.call("POST", LOAD, Some(token), Some(body)).await
    }

    /// Every page of a loadObjects request, following nextPageToken.
    async fn load_all(&self, token: &str, body: &Json) -> Vec<Json> {
        self.load_all_on(&self.state, LOAD, token, body).await.0
    }

    /// Every page of a loadObjects request to `uri` on `state`, and the
    /// first page's totalCount.
    async fn load_all_on(
        &self,
        state: &AppState,
        uri: &str,
        token: &str,
        body: &Json,
    ) -> (Vec<Json>, Json) {
        let mut out = Vec::new();
        let mut total = Json::Null;
        let mut body = body.clone();
        loop {
            let (status, page) = self
                .call_on(state, "POST", uri, Some(token), Some(&body))
                .await;
            if out.is_empty() {
                total = page["totalCount"].clone();
            }
            assert_eq!(status, StatusCode::OK, "{page}");
            out.extend(page["data"].as_array().unwrap().iter().cloned());
            match page["nextPageToken"].as_str() {
                Some(t) => body["pageToken"] = json!(t),
                None => return (out, total),
            }
        }
    }

    async fn sql(&self, q: &str) -> Vec<String> {
        let df = ViewStore::new(self.lake.clone()).sql(q).await.unwrap();
        let mut out = Vec::new();
        for b in df.collect().await.unwrap() {
            for r in 0..b.num_rows() {
                out.push(arrow::util::display::array_value_to_string(b.column(0), r).unwrap());
            }
        }
        out
    }
}

fn keys(objs: &[Json]) -> Vec<String> {
    objs.iter()
        .map(|o| o["__primaryKey"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_objects_pages_filter_and_order_like_sql() {
    let f = fixture(8).await;
    let admin = f.admin();

    // Every patient once, in primary-key order, over pages of 3.
    let all = f
        .load_all(
            &admin,
            &json!({"objectSet": {"type": "base", "objectType": "Patient"}, "pageSize": 3}),
        )
        .await;
    let mut expected = f.sql("SELECT id FROM patient").await;
    expected.sort();
    assert_eq!(keys(&all), expected);
    assert_eq!(all[0]["__apiName"], "Patient");
    // Null properties are present as null, not dropped.
    let t = atlas_ontology::Ontology::builtin();
    let props = &t.object_type("Patient").unwrap().properties;
    for o in &all {
        for p in props {
            assert!(
                o.get(&p.api_name).is_some(),
                "{} missing from {o}",
                p.api_name
            );
        }
    }
    assert!(all.iter().any(|o| o["deceased_date_time"].is_null()));

    // A filter, an order on a non-unique property and a selection, paged.
    let code: String = f
        .sql("SELECT code FROM observation GROUP BY code ORDER BY count(*) DESC, code LIMIT 1")
        .await
        .remove(0);
    let body = json!({
        "objectSet": {"type": "filter",
            "objectSet": {"type": "reference", "reference": "ObservationAll"},
            "where": {"type": "eq", "field": "code", "value": code}},
        "orderBy": {"orderType": "fields", "fields": [{"field": "effective", "direction": "desc"}]},
        "select": ["effective", "value_quantity"],
        "pageSize": 7,
        "includeTotalCount": true,
    });
    let (status, first) = f.load(&admin, &body).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let objs = f.load_all(&admin, &body).await;
    let expected = f
        .sql(&format!("SELECT id FROM observation WHERE code = '{code}' ORDER BY effective DESC NULLS LAST, id"))
        .await;
    assert!(expected.len() > 7, "the test needs several pages");
    assert_eq!(keys(&objs), expected);
    assert_eq!(first["totalCount"], json!(expected.len()));
    assert_eq!(
        first["data"][0]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect::<BTreeSet<_>>(),
        [
            "__apiName",
            "__primaryKey",
            "__title",
            "effective",
            "value_quantity"
        ]
        .map(String::from)
        .into_iter()
        .collect()
    );
    let sum_sql = f
        .sql(&format!(
            "SELECT CAST(sum(value_quantity) AS VARCHAR) FROM observation WHERE code = '{code}'"
        ))
        .await;
    let sum_api: f64 = objs
        .iter()
        .filter_map(|o| o["value_quantity"].as_f64())
        .sum();
    let sum_sql: f64 = sum_sql[0].parse().unwrap_or(0.0);
    assert!(
        (sum_api - sum_sql).abs() < 1e-6 * sum_sql.abs().max(1.0),
        "{sum_api} vs {sum_sql}"
    );

    // searchAround, union, intersect and subtract agree with SQL.
    let pids = f.sql("SELECT id FROM patient ORDER BY id LIMIT 2").await;
    let around = json!({"type": "searchAround", "link": "conditions",
        "objectSet": {"type": "static", "objectType": "Patient", "objects": pids}});
    let got = f
        .load_all(&admin, &json!({"objectSet": around, "pageSize": 1000}))
        .await;
    let expected = f
        .sql(&format!(
            "SELECT id FROM condition WHERE patient_id IN ('{}', '{}') ORDER BY id",
            pids[0], pids[1]
        ))
        .await;
    assert_eq!(keys(&got), expected);
    let first_only = json!({"type": "searchAround", "link": "conditions",
        "objectSet": {"type": "static", "objectType": "Patient", "objects": [pids[0]]}});
    let got = f
        .load_all(&admin, &json!({"objectSet": {"type": "subtract", "objectSets": [around, first_only]}, "pageSize": 1000}))
        .await;
    let expected = f
        .sql(&format!(
            "SELECT id FROM condition WHERE patient_id = '{}' ORDER BY id",
            pids[1]
        ))
        .await;
    assert_eq!(keys(&got), expected, "subtract");
    let got = f
        .load_all(&admin, &json!({"objectSet": {"type": "intersect", "objectSets": [around, first_only]}, "pageSize": 1000}))
        .await;
    let expected = f
        .sql(&format!(
            "SELECT id FROM condition WHERE patient_id = '{}' ORDER BY id",
            pids[0]
        ))
        .await;
    assert_eq!(keys(&got), expected, "intersect");
    // Reverse link: observations -> their patients.
    let got = f
        .load_all(&admin, &json!({"objectSet": {"type": "searchAround", "link": "patient",
            "objectSet": {"type": "filter", "objectSet": {"type": "base", "objectType": "Observation"},
                "where": {"type": "eq", "field": "code", "value": code}}}}))
        .await;
    let expected = f
        .sql(&format!(
            "SELECT DISTINCT patient_id FROM observation WHERE code = '{code}' ORDER BY patient_id"
        ))
        .await;
    assert_eq!(keys(&got), expected, "reverse link");

    // Not, isNull and text filters.
    let got = f
        .load_all(&admin, &json!({"objectSet": {"type": "base", "objectType": "Patient"},
            "where": {"type": "not", "value": {"type": "isNull", "field": "deceased_date_time", "value": true}}}))
        .await;
    let expected = f
        .sql("SELECT id FROM patient WHERE deceased_date_time IS NOT NULL ORDER BY id")
        .await;
    assert_eq!(keys(&got), expected, "not isNull");
    let family = all[0]["family"].as_str().unwrap().to_owned();
    let got = f
        .load_all(&admin, &json!({"objectSet": {"type": "base", "objectType": "Patient"},
            "where": {"type": "containsAnyTerm", "field": "family", "value": format!("zzz {}", family.to_lowercase())}}))
        .await;
    assert!(keys(&got).contains(&all[0]["__primaryKey"].as_str().unwrap().to_owned()));
    let got = f
        .load_all(
            &admin,
            &json!({"objectSet": {"type": "base", "objectType": "Patient"},
            "where": {"type": "startsWith", "field": "family", "value": &family[..2]}}),
        )
        .await;
    assert!(
        got.iter()
            .all(|o| o["family"].as_str().unwrap().starts_with(&family[..2]))
    );

    // One object, its links, and the narrowing parameters.
    let pid = &pids[0];
    let (status, p) = f
        .call(
            "GET",
            &format!("/api/v2/ontologies/atlas/objects/Patient/{pid}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{p}");
    assert_eq!(p["__primaryKey"], json!(pid));
    let (status, linked) = f
        .call(
            "GET",
            &format!("/api/v2/ontologies/atlas/objects/Patient/{pid}/links/observations?pageSize=10000&orderBy=effective:asc&dateFrom=2015&dateTo=2020-06"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{linked}");
    let expected = f
        .sql(&format!("SELECT id FROM observation WHERE patient_id = '{pid}' AND left(effective, 4) >= '2015' AND left(effective, 7) <= '2020-06' ORDER BY effective, id"))
        .await;
    assert_eq!(keys(linked["data"].as_array().unwrap()), expected);
    let (status, listed) = f
        .call(
            "GET",
            &format!("/api/v2/ontologies/atlas/objects/Condition?patientId={pid}&pageSize=10000"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    let expected = f
        .sql(&format!(
            "SELECT id FROM condition WHERE patient_id = '{pid}' ORDER BY id"
        ))
        .await;
    assert_eq!(keys(listed["data"].as_array().unwrap()), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_reads_one_snapshot_while_ingests_commit() {
    let f = fixture(6).await;
    let admin = f.admin();
    let body = json!({"objectSet": {"type": "base", "objectType": "Observation"},
        "orderBy": {"orderType": "fields", "fields": [{"field": "effective"}]}, "pageSize": 40});
    let before = f.sql("SELECT id FROM observation").await;
    let (status, first) = f.load(&admin, &body).await;
    assert_eq!(status, StatusCode::OK);
    let mut seen = keys(first["data"].as_array().unwrap());

    // A second population lands and the views refresh between pages.
    let more = synth(&f.dir, 4, 99);
    ingest_and_refresh(&f.lake, &more).await;
    let after = f.sql("SELECT id FROM observation").await;
    assert!(after.len() > before.len());

    let mut next = body.clone();
    let mut token = first["nextPageToken"].as_str().map(str::to_owned);
    while let Some(t) = token {
        next["pageToken"] = json!(t);
        let (status, page) = f.load(&admin, &next).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        seen.extend(keys(page["data"].as_array().unwrap()));
        token = page["nextPageToken"].as_str().map(str::to_owned);
    }
    let distinct: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(distinct.len(), seen.len(), "an object was served twice");
    let mut want = before.clone();
    want.sort();
    let mut got = seen.clone();
    got.sort();
    assert_eq!(got, want, "the pages are exactly the first page's snapshot");
    // A new request reads the new snapshot.
    let fresh = f
        .load_all(
            &admin,
            &json!({"objectSet": {"type": "base", "objectType": "Observation"}, "pageSize": 10000}),
        )
        .await;
    assert_eq!(fresh.len(), after.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patient_bound_token_reads_only_its_patient_on_every_path() {
    let f = fixture(6).await;
    let pids = f.sql("SELECT id FROM patient ORDER BY id").await;
    let (mine, other) = (&pids[0], &pids[1]);
    let tok = f.token("pat", "patient/*.rs", Some(mine));
    let other_obs = f
        .sql(&format!(
            "SELECT id FROM observation WHERE patient_id = '{other}' LIMIT 1"
        ))
        .await;
    let my_obs = f
        .sql(&format!(
            "SELECT id FROM observation WHERE patient_id = '{mine}' ORDER BY id"
        ))
        .await;

    // loadObjects over all observations: only mine, and the count says so.
    let (status, page) = f
        .load(&tok, &json!({"objectSet": {"type": "base", "objectType": "Observation"}, "pageSize": 10000, "includeTotalCount": true}))
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(keys(page["data"].as_array().unwrap()), my_obs);
    assert_eq!(page["totalCount"], json!(my_obs.len()));
    // searchAround from the other patient: nothing (the source scan is scoped).
    let (status, page) = f
        .load(
            &tok,
            &json!({"objectSet": {"type": "searchAround", "link": "observations",
            "objectSet": {"type": "static", "objectType": "Patient", "objects": [other]}}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["data"], json!([]));
    // A filter that names the other patient's row finds nothing.
    let (_, page) = f
        .load(
            &tok,
            &json!({"objectSet": {"type": "base", "objectType": "Observation"},
            "where": {"type": "eq", "field": "id", "value": other_obs[0]}}),
        )
        .await;
    assert_eq!(page["data"], json!([]));
    // One object: 404 for the other patient's, exactly like a missing one.
    let (s1, b1) = f
        .call(
            "GET",
            &format!(
                "/api/v2/ontologies/atlas/objects/Observation/{}",
                other_obs[0]
            ),
            Some(&tok),
            None,
        )
        .await;
    let (s2, b2) = f
        .call(
            "GET",
            "/api/v2/ontologies/atlas/objects/Observation/no-such-id",
            Some(&tok),
            None,
        )
        .await;
    assert_eq!((s1, s2), (StatusCode::NOT_FOUND, StatusCode::NOT_FOUND));
    assert_eq!(b1["errorName"], b2["errorName"]);
    let (s, _) = f
        .call(
            "GET",
            &format!("/api/v2/ontologies/atlas/objects/Observation/{}", my_obs[0]),
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    // Links from the other patient, and listing with patientId=other: empty.
    let (s, page) = f
        .call(
            "GET",
            &format!("/api/v2/ontologies/atlas/objects/Patient/{other}/links/conditions"),
            Some(&tok),
            None,
        )
        .await;
    assert_eq!((s, &page["data"]), (StatusCode::OK, &json!([])));
    let (s, page) = f
        .call(
            "GET",
            &format!("/api/v2/ontologies/atlas/objects/Encounter?patientId={other}"),
            Some(&tok),
            None,
        )
        .await;
    assert_eq!((s, &page["data"]), (StatusCode::OK, &json!([])));
    // Reverse link from my observations reaches only me.
    let (_, page) = f
        .load(
            &tok,
            &json!({"objectSet": {"type": "searchAround", "link": "patient",
            "objectSet": {"type": "base", "objectType": "Observation"}}}),
        )
        .await;
    assert_eq!(keys(page["data"].as_array().unwrap()), vec![mine.clone()]);

    // A type no scope grants is a 403 naming it.
    let obs_only = f.token("o", "user/Observation.rs", None);
    let (s, e) = f
        .load(
            &obs_only,
            &json!({"objectSet": {"type": "base", "objectType": "Condition"}}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{e}");
    assert_eq!(e["parameters"]["objectType"], "Condition");
    // ... also when reached through a link.
    let (s, _) = f
        .load(
            &obs_only,
            &json!({"objectSet": {"type": "searchAround", "link": "patient",
            "objectSet": {"type": "base", "objectType": "Observation"}}}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_and_bad_tokens_are_4xx_naming_the_field() {
    let f = fixture(3).await;
    let admin = f.admin();
    let base = json!({"objectSet": {"type": "base", "objectType": "Patient"}, "pageSize": 1});
    let cases: Vec<(Json, &str)> = vec![
        (
            json!({"objectSet": {"type": "base", "objectType": "Patient"}, "pageSiz": 1}),
            "pageSiz",
        ),
        (
            json!({"objectSet": {"type": "base", "objectType": "Patient"}, "pageSize": 100001}),
            "pageSize",
        ),
        (
            json!({"objectSet": {"type": "base", "objectType": "Patient"}, "pageSize": -1}),
            "pageSize",
        ),
        (
            json!({"objectSet": {"type": "base", "objectType": "Nope"}}),
            "Nope",
        ),
        (
            json!({"objectSet": {"type": "base", "objectType": "Patient"}, "where": {"type": "eq", "field": "nope", "value": 1}}),
            "nope",
        ),
        (
            json!({"objectSet": {"type": "base", "objectType": "Patient"}, "where": {"type": "eq", "field": "age", "value": "old"}}),
            "age",
        ),
        (
            json!({"objectSet": {"type": "base", "objectType": "Patient"}, "orderBy": {"fields": [{"field": "nope"}]}}),
            "nope",
        ),
        (
            json!({"objectSet": {"type": "base", "objectType": "Patient"}, "select": ["nope"]}),
            "nope",
        ),
        (
            json!({"objectSet": {"type": "base", "objectType": "Patient"}, "pageToken": "garbage"}),
            "page token",
        ),
    ];
    for (body, mention) in cases {
        let (s, e) = f.load(&admin, &body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body} -> {e}");
        assert!(
            e.to_string().contains(mention),
            "{body} -> {e} should name {mention}"
        );
    }
    let (s, e) = f.call("POST", LOAD, Some(&admin), None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    let (s, e) = f
        .call(
            "POST",
            &format!("{LOAD}?dateFrom=yesterday"),
            Some(&admin),
            Some(&base),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["parameters"]["dateFrom"], "yesterday");

    // Page tokens: another principal's, another request's, altered.
    let (_, page) = f.load(&admin, &base).await;
    let tok = page["nextPageToken"].as_str().unwrap().to_owned();
    let mut next = base.clone();
    next["pageToken"] = json!(tok);
    let bob = f.token("bob", "user/*.rs", None);
    let (s, e) = f.load(&bob, &next).await;
    assert_eq!(
        (s, e["errorName"].as_str()),
        (StatusCode::BAD_REQUEST, Some("PageTokenForeign"))
    );
    let mut other = next.clone();
    other["objectSet"] = json!({"type": "base", "objectType": "Condition"});
    let (s, e) = f.load(&admin, &other).await;
    assert_eq!(
        (s, e["errorName"].as_str()),
        (StatusCode::BAD_REQUEST, Some("PageTokenMismatch"))
    );
    let mut altered = next.clone();
    let mut t = tok.clone().into_bytes();
    t[5] = if t[5] == b'x' { b'y' } else { b'x' };
    altered["pageToken"] = json!(String::from_utf8(t).unwrap());
    let (s, e) = f.load(&admin, &altered).await;
    assert_eq!(
        (s, e["errorName"].as_str()),
        (StatusCode::BAD_REQUEST, Some("InvalidPageToken"))
    );

    // Authentication: none, malformed, unsigned, wrong issuer.
    let (s, _) = f.call("POST", LOAD, None, Some(&base)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = f.call("POST", LOAD, Some("not-a-jwt"), Some(&base)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = admin.split('.').collect();
    let none = format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        parts[1]
    );
    let (s, e) = f.call("POST", LOAD, Some(&none), Some(&base)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{e}");
    let mut claims: Json = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    claims["sub"] = json!("mallory");
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        b64.encode(claims.to_string()),
        parts[2]
    );
    let (s, e) = f.call("POST", LOAD, Some(&forged), Some(&base)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{e}");
    // The client is told the token was refused; the reason goes to the
    // log and the audit record.
    assert_eq!(e["message"], "the bearer token was not accepted", "{e}");
    let why = f.state.auth.verify(&forged).unwrap_err().message.clone();
    assert!(why.contains("signature"), "{why}");
    let expired = f
        .issuer
        .mint(&TokenRequest {
            subject: "a".into(),
            scope: "user/*.rs".into(),
            patient: None,
            ttl_secs: 1,
            ..Default::default()
        })
        .unwrap();
    let mut c: Json =
        serde_json::from_slice(&b64.decode(expired.split('.').nth(1).unwrap()).unwrap()).unwrap();
    assert!(c["exp"].as_u64().unwrap() > 0);
    c["iss"] = json!("https://evil.example");
    let foreign = format!("{}.{}.{}", parts[0], b64.encode(c.to_string()), parts[2]);
    let (s, e) = f.call("POST", LOAD, Some(&foreign), Some(&base)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(e["message"], "the bearer token was not accepted", "{e}");
    let why = f.state.auth.verify(&foreign).unwrap_err().message.clone();
    assert!(why.contains("not trusted"), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregates_match_sql_and_respect_the_patient_scope() {
    let f = fixture(8).await;
    let admin = f.admin();
    const AGG: &str = "/api/v2/ontologies/atlas/objectSets/aggregate";
    let body = json!({
        "objectSet": {"type": "base", "objectType": "Patient"},
        "aggregation": [
            {"type": "count", "name": "n"},
            {"type": "min", "field": "birth_date"},
            {"type": "max", "field": "age", "name": "oldest"},
            {"type": "avg", "field": "age"},
            {"type": "sum", "field": "age"},
            {"type": "exactDistinct", "field": "state"}
        ],
        "groupBy": [{"type": "exact", "field": "gender"}]
    });
    let (s, agg) = f.call("POST", AGG, Some(&admin), Some(&body)).await;
    assert_eq!(s, StatusCode::OK, "{agg}");
    let expected = f
        .sql("SELECT concat_ws('|', gender, count(*), min(birth_date), max(age), sum(age), count(DISTINCT state)) FROM patient GROUP BY gender ORDER BY gender")
        .await;
    let got: Vec<String> = agg["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            let m = &g["metrics"];
            let v = |i: usize| match &m[i]["value"] {
                Json::String(s) => s.clone(),
                other => other.to_string(),
            };
            format!(
                "{}|{}|{}|{}|{}|{}",
                g["group"]["gender"].as_str().unwrap(),
                v(0),
                v(1),
                v(2),
                v(4),
                v(5)
            )
        })
        .collect();
    assert_eq!(got, expected);
    assert_eq!(agg["data"][0]["metrics"][1]["name"], "min_birth_date");
    assert_eq!(agg["accuracy"], "ACCURATE");

    // Duration buckets over a dateTime and numeric ranges.
    let body = json!({
        "objectSet": {"type": "base", "objectType": "Encounter"},
        "aggregation": [{"type": "count"}],
        "groupBy": [{"type": "duration", "field": "period_start", "value": 1, "unit": "YEARS"}]
    });
    let (s, agg) = f.call("POST", AGG, Some(&admin), Some(&body)).await;
    assert_eq!(s, StatusCode::OK, "{agg}");
    let expected = f
        .sql("SELECT concat(y, '-01-01|', n) FROM (SELECT left(period_start, 4) AS y, count(*) AS n FROM encounter WHERE period_start IS NOT NULL GROUP BY 1) ORDER BY y")
        .await;
    let got: Vec<String> = agg["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            format!(
                "{}|{}",
                g["group"]["period_start"].as_str().unwrap(),
                g["metrics"][0]["value"]
            )
        })
        .collect();
    assert_eq!(got, expected);
    let body = json!({
        "objectSet": {"type": "base", "objectType": "Patient"},
        "aggregation": [{"type": "count"}],
        "groupBy": [{"type": "ranges", "field": "age", "ranges": [{"startValue": 0, "endValue": 18}, {"startValue": 18}]}]
    });
    let (s, agg) = f.call("POST", AGG, Some(&admin), Some(&body)).await;
    assert_eq!(s, StatusCode::OK, "{agg}");
    let adults = f
        .sql("SELECT CAST(count(*) AS VARCHAR) FROM patient WHERE age >= 18")
        .await;
    let last = agg["data"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        last["group"]["age"],
        json!({"startValue": 18, "endValue": null})
    );
    assert_eq!(last["metrics"][0]["value"].to_string(), adults[0]);

    // A patient-bound token counts only its own patient's rows.
    let pid = f
        .sql("SELECT id FROM patient ORDER BY id LIMIT 1")
        .await
        .remove(0);
    let tok = f.token("p", "patient/*.rs", Some(&pid));
    let body = json!({"objectSet": {"type": "base", "objectType": "Observation"}, "aggregation": [{"type": "count"}]});
    let (s, agg) = f.call("POST", AGG, Some(&tok), Some(&body)).await;
    assert_eq!(s, StatusCode::OK, "{agg}");
    let mine = f
        .sql(&format!(
            "SELECT CAST(count(*) AS VARCHAR) FROM observation WHERE patient_id = '{pid}'"
        ))
        .await;
    assert_eq!(agg["data"][0]["metrics"][0]["value"].to_string(), mine[0]);

    // Bad aggregations name the field.
    for (body, mention) in [
        (
            json!({"objectSet": {"type": "base", "objectType": "Patient"}, "aggregation": [{"type": "sum", "field": "gender"}]}),
            "aggregation[0].field",
        ),
        (
            json!({"objectSet": {"type": "base", "objectType": "Patient"}, "aggregation": [{"type": "median", "field": "age"}]}),
            "aggregation[0].type",
        ),
        (
            json!({"objectSet": {"type": "base", "objectType": "Patient"}, "aggregation": [{"type": "count"}], "groupBy": [{"type": "exact", "field": "nope"}]}),
            "groupBy[0].field",
        ),
        (
            json!({"objectSet": {"type": "base", "objectType": "Patient"}, "aggregation": []}),
            "aggregation",
        ),
        (
            json!({"objectSet": {"type": "base", "objectType": "Patient"}, "aggregation": [{"type": "approximateDistinct", "field": "state"}], "accuracy": "REQUIRE_ACCURATE"}),
            "aggregation[0].type",
        ),
    ] {
        let (s, e) = f.call("POST", AGG, Some(&admin), Some(&body)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body} -> {e}");
        assert!(e.to_string().contains(mention), "{e} should name {mention}");
    }
}

async fn graphql(f: &Fixture, token: &str, query: &str, variables: Json) -> (StatusCode, Json) {
    f.call(
        "POST",
        "/graphql",
        Some(token),
        Some(&json!({"query": query, "variables": variables})),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graphql_links_connections_and_limits() {
    let f = fixture(6).await;
    let admin = f.admin();
    let pids = f.sql("SELECT id FROM patient ORDER BY id").await;
    let pid = &pids[0];

    // One patient with its links; link arguments narrow like loadObjects.
    let code = f
        .sql(&format!("SELECT code FROM observation WHERE patient_id = '{pid}' GROUP BY code ORDER BY count(*) DESC, code LIMIT 1"))
        .await
        .remove(0);
    let q = r#"query($id: String!, $code: String) {
        patient(id: $id) {
            id family
            medicationRequests { id status authored_on }
            conditions { id code onset }
            observations(code: $code, from: "2000") { id effective value_quantity encounter { id } }
        }
    }"#;
    let (s, r) = graphql(&f, &admin, q, json!({"id": pid, "code": code})).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert!(r["errors"].is_null(), "{r}");
    let p = &r["data"]["patient"];
    assert_eq!(p["id"], json!(pid));
    let ids = |v: &Json| -> Vec<String> {
        let mut out: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["id"].as_str().unwrap().to_owned())
            .collect();
        out.sort();
        out
    };
    assert_eq!(
        ids(&p["conditions"]),
        f.sql(&format!(
            "SELECT id FROM condition WHERE patient_id = '{pid}' ORDER BY id"
        ))
        .await
    );
    assert_eq!(
        ids(&p["medicationRequests"]),
        f.sql(&format!(
            "SELECT id FROM medication_request WHERE patient_id = '{pid}' ORDER BY id"
        ))
        .await
    );
    assert_eq!(
        ids(&p["observations"]),
        f.sql(&format!("SELECT id FROM observation WHERE patient_id = '{pid}' AND code = '{code}' AND left(effective, 4) >= '2000' ORDER BY id")).await
    );
    // Observations come in time order within the patient.
    let times: Vec<&str> = p["observations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["effective"].as_str().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");

    // A connection over every patient, paged by cursor, links batched.
    let q = r#"query($after: String) {
        PatientAll(first: 4, after: $after) {
            totalCount
            pageInfo { hasNextPage endCursor }
            nodes { id conditions { id } }
        }
    }"#;
    let link_queries = |m: &str| -> u64 {
        m.lines()
            .find_map(|l| l.strip_prefix("atlas_graphql_link_queries_total "))
            .unwrap()
            .parse()
            .unwrap()
    };
    let metrics = || async {
        let r = router(f.state.clone())
            .oneshot(
                Request::builder()
                    .uri("/metrics")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        String::from_utf8(
            axum::body::to_bytes(r.into_body(), 1 << 20)
                .await
                .unwrap()
                .to_vec(),
        )
        .unwrap()
    };
    let before = link_queries(&metrics().await);
    let mut pages = 0;
    let mut after = Json::Null;
    let mut seen = Vec::new();
    let mut conditions = 0;
    loop {
        pages += 1;
        let (s, r) = graphql(&f, &admin, q, json!({"after": after})).await;
        assert_eq!(s, StatusCode::OK, "{r}");
        let c = &r["data"]["PatientAll"];
        assert_eq!(c["totalCount"], json!(pids.len()));
        for n in c["nodes"].as_array().unwrap() {
            seen.push(n["id"].as_str().unwrap().to_owned());
            conditions += n["conditions"].as_array().unwrap().len();
        }
        if c["pageInfo"]["hasNextPage"] == json!(false) {
            break;
        }
        after = c["pageInfo"]["endCursor"].clone();
    }
    assert_eq!(seen, pids);
    // Links load in batches, not one query per patient (no N+1): one query
    // per page normally; the DataLoader's 1 ms collection window can split a
    // page's batch when the machine is saturated, never into one per patient.
    let queries = link_queries(&metrics().await) - before;
    assert!(
        queries >= pages && queries < seen.len() as u64,
        "{queries} link queries for {pages} pages of {} patients",
        seen.len()
    );
    assert_eq!(
        conditions.to_string(),
        f.sql("SELECT CAST(count(*) AS VARCHAR) FROM condition")
            .await[0]
    );

    // The same filters as object sets.
    let q = r#"{ PatientAll(where: {type: "eq", field: "gender", value: "female"}, first: 100) { nodes { id gender } } }"#;
    let (s, r) = graphql(&f, &admin, q, json!({})).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    let got = ids(&r["data"]["PatientAll"]["nodes"]);
    assert_eq!(
        got,
        f.sql("SELECT id FROM patient WHERE gender = 'female' ORDER BY id")
            .await
    );

    // A patient-bound token: other patients are null/empty, on the root and in links.
    let tok = f.token("p", "patient/*.rs", Some(pid));
    let q = r#"query($other: String!) {
        patient(id: $other) { id }
        PatientAll { nodes { id observations(first: 1) { patient { id } } } }
    }"#;
    let (s, r) = graphql(&f, &tok, q, json!({"other": pids[1]})).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert!(r["data"]["patient"].is_null(), "{r}");
    let nodes = r["data"]["PatientAll"]["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0]["id"], json!(pid));
    // Reaching another patient's encounter through a link finds nothing.
    let other_obs = f
        .sql(&format!(
            "SELECT id FROM observation WHERE patient_id = '{}' LIMIT 1",
            pids[1]
        ))
        .await;
    let (_, r) = graphql(
        &f,
        &tok,
        r#"query($id: String!) { observation(id: $id) { id patient { id } } }"#,
        json!({"id": other_obs[0]}),
    )
    .await;
    assert!(r["data"]["observation"].is_null(), "{r}");

    // Limits: depth, unknown fields, bad filters, bad cursors: 4xx or errors naming the problem.
    let deep = format!(
        "{{ patient(id: \"{pid}\") {{ {} id {} }} }}",
        "encounters { patient { ".repeat(8),
        "} } ".repeat(8)
    );
    let (s, r) = graphql(&f, &admin, &deep, json!({})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{r}");
    assert!(
        r.to_string().contains("too deep") || r.to_string().contains("depth"),
        "{r}"
    );
    let (s, r) = graphql(&f, &admin, "{ patient(id: \"x\") { nope } }", json!({})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{r}");
    assert!(r.to_string().contains("nope"), "{r}");
    let (s, r) = graphql(
        &f,
        &admin,
        r#"{ PatientAll(where: {type: "eq", field: "nope", value: 1}) { nodes { id } } }"#,
        json!({}),
    )
    .await;
    assert!(
        r["errors"][0]["message"].as_str().unwrap().contains("nope"),
        "{s} {r}"
    );
    let (_, r) = graphql(
        &f,
        &admin,
        r#"{ PatientAll(after: "forged") { nodes { id } } }"#,
        json!({}),
    )
    .await;
    assert_eq!(
        r["errors"][0]["extensions"]["errorName"], "InvalidPageToken",
        "{r}"
    );
    let (s, _) = f
        .call("POST", "/graphql", Some(&admin), Some(&json!({"nope": 1})))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = f
        .call(
            "POST",
            "/graphql",
            None,
            Some(&json!({"query": "{ __typename }"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

/// Every page of a FHIR search, following Bundle.link[next].
async fn fhir_all(f: &Fixture, token: &str, uri: &str) -> (Vec<Json>, Json) {
    let mut out = Vec::new();
    let mut uri = uri.to_owned();
    let mut first = Json::Null;
    loop {
        let (s, b) = f.call("GET", &uri, Some(token), None).await;
        assert_eq!(s, StatusCode::OK, "{uri}: {b}");
        assert_eq!(b["resourceType"], "Bundle");
        if first.is_null() {
            first = b.clone();
        }
        out.extend(
            b["entry"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["resource"].clone()),
        );
        let next = b["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
            .map(|l| l["url"].as_str().unwrap().to_owned());
        match next {
            // Links start at the configured base (here the bind address).
            Some(u) => uri = u.strip_prefix("http://127.0.0.1:8080").unwrap().to_owned(),
            None => return (out, first),
        }
    }
}

fn ids_of(resources: &[Json]) -> Vec<String> {
    resources
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fhir_rest_reads_searches_and_everything() {
    let f = fixture(5).await;
    let admin = f.admin();
    let pids = f.sql("SELECT id FROM patient ORDER BY id").await;
    let pid = &pids[0];

    // Read: the stored JSON, byte for byte.
    let obs = f
        .sql(&format!(
            "SELECT id FROM observation WHERE patient_id = '{pid}' ORDER BY id LIMIT 1"
        ))
        .await
        .remove(0);
    let stored = f
        .sql(&format!(
            "SELECT resource FROM resources WHERE resource_type = 'Observation' AND id = '{obs}'"
        ))
        .await
        .remove(0);
    let r = router(f.state.clone())
        .oneshot(
            Request::builder()
                .uri(format!("/fhir/Observation/{obs}"))
                .header("authorization", format!("Bearer {admin}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/fhir+json");
    let bytes = axum::body::to_bytes(r.into_body(), 1 << 24).await.unwrap();
    assert_eq!(std::str::from_utf8(&bytes).unwrap(), stored);
    let (s, oo) = f
        .call("GET", "/fhir/Observation/nope", Some(&admin), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(oo["resourceType"], "OperationOutcome");

    // Search by patient and code, paged through next links.
    let code = f
        .sql(&format!("SELECT code FROM observation WHERE patient_id = '{pid}' GROUP BY code ORDER BY count(*) DESC, code LIMIT 1"))
        .await
        .remove(0);
    let (got, first) = fhir_all(
        &f,
        &admin,
        &format!("/fhir/Observation?patient=Patient/{pid}&code={code}&_count=1&_total=accurate"),
    )
    .await;
    let expected = f
        .sql(&format!(
            "SELECT id FROM observation WHERE patient_id = '{pid}' AND code = '{code}' ORDER BY id"
        ))
        .await;
    assert!(expected.len() > 1, "several pages");
    assert_eq!(ids_of(&got), expected);
    assert_eq!(first["total"], json!(expected.len()));
    // date with a prefix, and _lastUpdated, and _sort descending.
    let (got, _) = fhir_all(
        &f,
        &admin,
        &format!("/fhir/Condition?subject={pid}&date=ge2010&_sort=-_id"),
    )
    .await;
    let mut expected = f.sql(&format!("SELECT id FROM condition WHERE patient_id = '{pid}' AND left(onset, 4) >= '2010' ORDER BY id DESC")).await;
    assert_eq!(ids_of(&got), expected);
    let (got, _) = fhir_all(
        &f,
        &admin,
        "/fhir/Patient?_lastUpdated=ge2000-01-01&_count=2",
    )
    .await;
    expected = f.sql("SELECT id FROM resources WHERE resource_type = 'Patient' AND last_updated >= '2000-01-01T00:00:00Z' ORDER BY id").await;
    assert_eq!(ids_of(&got), expected);
    let (got, _) = fhir_all(
        &f,
        &admin,
        &format!(
            "/fhir/Encounter?_id={},nope",
            f.sql("SELECT id FROM encounter ORDER BY id LIMIT 1").await[0]
        ),
    )
    .await;
    assert_eq!(got.len(), 1);

    // $everything: the patient's whole compartment, paged, with _type.
    let (got, _) = fhir_all(
        &f,
        &admin,
        &format!("/fhir/Patient/{pid}/$everything?_count=50"),
    )
    .await;
    let expected = f.sql(&format!("SELECT CAST(count(*) AS VARCHAR) FROM resources WHERE patient_id = '{pid}' AND NOT deleted")).await;
    assert_eq!(got.len().to_string(), expected[0]);
    assert!(
        got.iter()
            .any(|r| r["resourceType"] == "Patient" && r["id"] == json!(pid))
    );
    let (got, _) = fhir_all(
        &f,
        &admin,
        &format!("/fhir/Patient/{pid}/$everything?_type=Condition,Encounter"),
    )
    .await;
    assert!(
        got.iter()
            .all(|r| r["resourceType"] == "Condition" || r["resourceType"] == "Encounter")
    );
    let expected = f.sql(&format!("SELECT CAST(count(*) AS VARCHAR) FROM resources WHERE patient_id = '{pid}' AND resource_type IN ('Condition', 'Encounter') AND NOT deleted")).await;
    assert_eq!(got.len().to_string(), expected[0]);

    // A patient-bound token: its own data only, on read, search and $everything.
    let tok = f.token("p", "patient/*.rs", Some(pid));
    let other = &pids[1];
    let other_obs = f
        .sql(&format!(
            "SELECT id FROM observation WHERE patient_id = '{other}' LIMIT 1"
        ))
        .await
        .remove(0);
    let (s, _) = f
        .call(
            "GET",
            &format!("/fhir/Observation/{other_obs}"),
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = f
        .call("GET", &format!("/fhir/Observation/{obs}"), Some(&tok), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (got, _) = fhir_all(&f, &tok, "/fhir/Observation?_count=1000").await;
    let mine = f
        .sql(&format!(
            "SELECT id FROM observation WHERE patient_id = '{pid}' ORDER BY id"
        ))
        .await;
    assert_eq!(ids_of(&got), mine);
    let (got, _) = fhir_all(&f, &tok, &format!("/fhir/Condition?patient={other}")).await;
    assert!(got.is_empty());
    let (s, _) = f
        .call(
            "GET",
            &format!("/fhir/Patient/{other}/$everything"),
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, b) = f
        .call(
            "GET",
            &format!("/fhir/Observation?patient={pid}&code={code}"),
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    // A type the scopes do not grant.
    let obs_only = f.token("o", "user/Observation.rs", None);
    let (s, oo) = f
        .call("GET", "/fhir/Condition", Some(&obs_only), None)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{oo}");
    assert_eq!(oo["issue"][0]["code"], "forbidden");
    // $everything needs the Patient itself to be readable.
    let (s, _) = f
        .call(
            "GET",
            &format!("/fhir/Patient/{pid}/$everything"),
            Some(&obs_only),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // ... and leaves out the types a token may not read.
    let some = f.token("s", "user/Patient.rs user/Condition.rs", None);
    let (got, _) = fhir_all(&f, &some, &format!("/fhir/Patient/{pid}/$everything")).await;
    let expected = f.sql(&format!("SELECT CAST(count(*) AS VARCHAR) FROM resources WHERE patient_id = '{pid}' AND resource_type IN ('Patient', 'Condition') AND NOT deleted")).await;
    assert_eq!(got.len().to_string(), expected[0]);

    // Bad input: OperationOutcome 4xx naming the parameter.
    for (uri, param) in [
        ("/fhir/Observation?foo=1", "foo"),
        ("/fhir/Observation?_count=0", "_count"),
        ("/fhir/Observation?date=yesterday", "date"),
        ("/fhir/Observation?_lastUpdated=ap2020", "_lastUpdated"),
        ("/fhir/Observation?_sort=code", "_sort"),
        ("/fhir/Observation?_page_token=forged", "_page_token"),
    ] {
        let (s, oo) = f.call("GET", uri, Some(&admin), None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{uri}: {oo}");
        assert_eq!(oo["issue"][0]["expression"][0], param, "{uri}: {oo}");
    }
    let (s, _) = f.call("GET", "/fhir/NotAType/1", Some(&admin), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, oo) = f.call("GET", "/fhir/Observation", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(oo["resourceType"], "OperationOutcome");

    // The CapabilityStatement lists what works, without a token.
    let (s, cs) = f.call("GET", "/fhir/metadata", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let obs_cap = cs["rest"][0]["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "Observation")
        .unwrap()
        .clone();
    let names: Vec<&str> = obs_cap["searchParam"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "_id",
            "_lastUpdated",
            "patient",
            "subject",
            "code",
            "date",
            "status"
        ]
    );
}

async fn raw_post(
    f: &Fixture,
    uri: &str,
    token: &str,
    accept: Option<&str>,
    body: &Json,
) -> (StatusCode, String, Vec<u8>) {
    raw_call(f, "POST", uri, token, accept, Some(body)).await
}

async fn raw_call(
    f: &Fixture,
    method: &str,
    uri: &str,
    token: &str,
    accept: Option<&str>,
    body: Option<&Json>,
) -> (StatusCode, String, Vec<u8>) {
    let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", format!("Bearer {token}"));
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let r = router(f.state.clone())
        .oneshot(req.body(body).unwrap())
        .await
        .unwrap();
    let status = r.status();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let bytes = axum::body::to_bytes(r.into_body(), 1 << 28).await.unwrap();
    (status, ct, bytes.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_sets_stream_as_ndjson_arrow_and_parquet_within_scope() {
    let f = fixture(5).await;
    let admin = f.admin();
    let body = json!({"objectSet": {"type": "base", "objectType": "Observation"}, "select": ["code", "value_quantity", "effective"]});
    let all = f.sql("SELECT id FROM observation ORDER BY id").await;

    let (s, ct, bytes) = raw_post(&f, &format!("{LOAD}?format=ndjson"), &admin, None, &body).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(ct, "application/x-ndjson");
    let lines: Vec<Json> = std::str::from_utf8(&bytes)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut got = keys(&lines);
    got.sort();
    assert_eq!(got, all);
    assert!(lines[0].get("value_quantity").is_some() && lines[0].get("status").is_none());

    let (s, ct, bytes) = raw_post(
        &f,
        LOAD,
        &admin,
        Some("application/vnd.apache.arrow.stream"),
        &body,
    )
    .await;
    assert_eq!(
        (s, ct.as_str()),
        (StatusCode::OK, "application/vnd.apache.arrow.stream")
    );
    let reader =
        arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None).unwrap();
    let names: Vec<String> = reader
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(names, ["code", "value_quantity", "effective"]);
    let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(rows, all.len());

    let (s, _, bytes) = raw_post(&f, &format!("{LOAD}?format=parquet"), &admin, None, &body).await;
    assert_eq!(s, StatusCode::OK);
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        bytes::Bytes::from(bytes),
    )
    .unwrap()
    .build()
    .unwrap();
    let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(rows, all.len());

    // The patient scope holds on the streaming path too.
    let pid = f
        .sql("SELECT id FROM patient ORDER BY id LIMIT 1")
        .await
        .remove(0);
    let tok = f.token("p", "patient/*.rs", Some(&pid));
    let (s, _, bytes) = raw_post(&f, &format!("{LOAD}?format=ndjson"), &tok, None, &body).await;
    assert_eq!(s, StatusCode::OK);
    let mut got: Vec<String> = std::str::from_utf8(&bytes)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Json>(l).unwrap()["__primaryKey"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        f.sql(&format!(
            "SELECT id FROM observation WHERE patient_id = '{pid}' ORDER BY id"
        ))
        .await
    );

    // Paging parameters do not mix with a stream; unknown formats are refused.
    let mut paged = body.clone();
    paged["pageSize"] = json!(10);
    let (s, _, _) = raw_post(&f, &format!("{LOAD}?format=ndjson"), &admin, None, &paged).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _, _) = raw_post(&f, &format!("{LOAD}?format=xml"), &admin, None, &body).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

/// Paging while an ingest and a view refresh run at the same time: every
/// page comes from the first page's snapshot, so the union of the pages is
/// exactly that snapshot, each object once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_concurrently_with_an_ingest_sees_one_snapshot() {
    let f = fixture(6).await;
    let admin = f.admin();
    let before = {
        let mut v = f.sql("SELECT id FROM observation").await;
        v.sort();
        v
    };
    let more = synth(&f.dir, 5, 123);
    let lake = f.lake.clone();
    let writer = tokio::spawn(async move { ingest_and_refresh(&lake, &more).await });
    let body = json!({"objectSet": {"type": "base", "objectType": "Observation"}, "pageSize": 8});
    let mut seen = Vec::new();
    let mut next = body.clone();
    let mut pages = 0;
    loop {
        let (s, page) = f.load(&admin, &next).await;
        assert_eq!(s, StatusCode::OK, "{page}");
        seen.extend(keys(page["data"].as_array().unwrap()));
        pages += 1;
        // Pace the pages so the writer commits while they are being read.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        match page["nextPageToken"].as_str() {
            Some(t) => next["pageToken"] = json!(t),
            None => break,
        }
    }
    writer.await.unwrap();
    assert!(pages > 10, "{pages} pages");
    let mut got = seen.clone();
    got.sort();
    let distinct: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(distinct.len(), seen.len(), "an object was served twice");
    assert_eq!(got, before, "the pages are the first page's snapshot");
    let after = f.sql("SELECT id FROM observation").await;
    assert!(after.len() > before.len(), "the writer committed");
}

/// One-patient reads take the slice path (cached footers and page index, no
/// plan) and answer exactly as the planned query does, before and after an
/// incremental refresh marks rows deleted with deletion vectors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_patient_slice_reads_answer_like_the_planned_query() {
    let f = fixture(6).await;
    let mut config = ServeConfig::default();
    config.auth.dev = true;
    config.slice_reads = false;
    let planned = AppState::open(f.lake.clone(), atlas_ontology::Ontology::builtin(), config)
        .await
        .unwrap();
    let admin = f.admin();
    let code: String = f
        .sql("SELECT code FROM observation GROUP BY code ORDER BY count(*) DESC, code LIMIT 1")
        .await
        .remove(0);
    let bodies = [
        json!({"objectSet": {"type": "base", "objectType": "Observation"},
            "orderBy": {"orderType": "fields", "fields": [{"field": "effective", "direction": "desc"}]},
            "pageSize": 7, "includeTotalCount": true}),
        json!({"objectSet": {"type": "filter",
                "objectSet": {"type": "reference", "reference": "ObservationAll"},
                "where": {"type": "or", "value": [
                    {"type": "eq", "field": "code", "value": code},
                    {"type": "isNull", "field": "value_quantity", "value": true}]}},
            "orderBy": {"orderType": "fields", "fields": [{"field": "value_quantity"}, {"field": "effective", "direction": "desc"}]},
            "select": ["effective", "value_quantity", "code"],
            "pageSize": 5, "includeTotalCount": true}),
        json!({"objectSet": {"type": "subtract", "objectSets": [
                {"type": "base", "objectType": "Encounter"},
                {"type": "filter", "objectSet": {"type": "base", "objectType": "Encounter"},
                 "where": {"type": "startsWith", "field": "class_code", "value": "AMB"}}]},
            "pageSize": 4}),
        json!({"objectSet": {"type": "base", "objectType": "Condition"}, "pageSize": 3}),
    ];
    let compare = |patient: String, stage: &'static str| {
        let f = &f;
        let planned = &planned;
        let admin = &admin;
        let bodies = &bodies;
        async move {
            for (i, body) in bodies.iter().enumerate() {
                for range in ["", "&dateFrom=2012&dateTo=2020-06"] {
                    let uri = format!("{LOAD}?patientId={patient}{range}");
                    let (sliced, sliced_total) = f.load_all_on(&f.state, &uri, admin, body).await;
                    let (plan, plan_total) = f.load_all_on(planned, &uri, admin, body).await;
                    assert_eq!(sliced, plan, "{stage}: body {i} for {patient}{range}");
                    assert_eq!(
                        sliced_total, plan_total,
                        "{stage}: body {i} for {patient}{range}"
                    );
                }
            }
        }
    };
    let patients = f.sql("SELECT id FROM patient ORDER BY id").await;
    let reads = |state: &AppState| {
        state
            .metrics
            .render_text()
            .lines()
            .find_map(|l| l.strip_prefix("atlas_slice_reads_total "))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap()
    };
    for p in &patients {
        compare(p.clone(), "fresh").await;
    }
    let fresh_reads = reads(&f.state);
    assert!(
        fresh_reads >= patients.len() as u64 * 8,
        "{fresh_reads} slice reads"
    );
    assert_eq!(reads(&planned), 0);
    // The patient-bound token's own scope also takes the slice path.
    let mine = &patients[0];
    let tok = f.token("pat", "patient/*.rs", Some(mine));
    let (own, _) = f.load_all_on(&f.state, LOAD, &tok, &bodies[0]).await;
    let (own_planned, _) = f.load_all_on(&planned, LOAD, &tok, &bodies[0]).await;
    assert_eq!(own, own_planned);
    assert!(!own.is_empty());
    assert!(reads(&f.state) > fresh_reads);
    // And finds nothing of another patient when asked for one.
    let uri = format!("{LOAD}?patientId={}", patients[1]);
    let (theirs, total) = f.load_all_on(&f.state, &uri, &tok, &bodies[0]).await;
    assert!(theirs.is_empty(), "{theirs:?}");
    assert_eq!(total, json!(0));

    // Update and delete some of one patient's observations: the refresh
    // marks their old rows deleted (deletion vectors), which slice reads
    // must honour.
    let victim = &patients[2];
    let ids = f
        .sql(&format!(
            "SELECT id FROM observation WHERE patient_id = '{victim}' ORDER BY id LIMIT 6"
        ))
        .await;
    let raw = std::fs::read_to_string(f.dir.join("synth-11/Observation.ndjson")).unwrap();
    let mut changes = String::new();
    for line in raw.lines() {
        let mut v: Json = serde_json::from_str(line).unwrap();
        if v["id"].as_str() == Some(ids[0].as_str()) || v["id"].as_str() == Some(ids[1].as_str()) {
            v["meta"]["versionId"] = json!("77");
            v["status"] = json!("amended");
            changes.push_str(&v.to_string());
            changes.push('\n');
        }
    }
    let delta = f.dir.join("slice-delta");
    std::fs::create_dir_all(&delta).unwrap();
    std::fs::write(delta.join("changes.ndjson"), changes).unwrap();
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": ids[2..5].iter().map(|id|
        json!({"request": {"method": "DELETE", "url": format!("Observation/{id}")}})).collect::<Vec<_>>()});
    std::fs::write(delta.join("deletes.json"), bundle.to_string()).unwrap();
    ingest_and_refresh(&f.lake, &delta).await;
    compare(victim.clone(), "after deletes").await;
    let uri = format!("{LOAD}?patientId={victim}");
    let (objs, _) = f
        .load_all_on(
            &f.state,
            &uri,
            &admin,
            &json!({"objectSet": {"type": "base", "objectType": "Observation"}, "pageSize": 1000}),
        )
        .await;
    let want = f
        .sql(&format!(
            "SELECT id FROM observation WHERE patient_id = '{victim}' ORDER BY id"
        ))
        .await;
    assert_eq!(keys(&objs), want);
    for gone in &ids[2..5] {
        assert!(!want.contains(gone));
    }
    assert_eq!(
        objs.iter().filter(|o| o["status"] == "amended").count(),
        2,
        "updated rows read once, at their new version"
    );
}

/// FHIR search and `$everything` stream every match as NDJSON (the stored
/// JSON, one resource per line, in the search's order), within the token's
/// scope, and equal the Bundle pages of the same search.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fhir_search_streams_ndjson_within_scope() {
    let f = fixture(5).await;
    let admin = f.admin();
    let pids = f.sql("SELECT id FROM patient ORDER BY id").await;
    let (mine, other) = (&pids[0], &pids[1]);
    let lines = |body: &[u8]| -> Vec<Json> {
        std::str::from_utf8(body)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let uri = format!("/fhir/Observation?patient={other}&_sort=-_lastUpdated");
    let (paged, _) = fhir_all(&f, &admin, &format!("{uri}&_count=7")).await;
    let (status, ct, body) = raw_call(
        &f,
        "GET",
        &format!("{uri}&_format=ndjson"),
        &admin,
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(ct, "application/fhir+ndjson");
    let streamed = lines(&body);
    assert!(streamed.len() > 7, "the test needs more than a page");
    assert_eq!(streamed, paged, "NDJSON equals the Bundle pages, in order");
    let want = f
        .sql(&format!(
            "SELECT id FROM observation WHERE patient_id = '{other}' ORDER BY id"
        ))
        .await;
    let mut got = ids_of(&streamed);
    got.sort();
    assert_eq!(got, want);
    // By Accept, too.
    let (status, ct, body) = raw_call(
        &f,
        "GET",
        &uri,
        &admin,
        Some("application/fhir+ndjson"),
        None,
    )
    .await;
    assert_eq!(
        (status, ct.as_str()),
        (StatusCode::OK, "application/fhir+ndjson")
    );
    assert_eq!(lines(&body), streamed);

    // A patient-bound token streams only its own compartment.
    let tok = f.token("pat", "patient/*.rs", Some(mine));
    let (status, _, body) = raw_call(
        &f,
        "GET",
        "/fhir/Observation?_format=ndjson",
        &tok,
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let own = lines(&body);
    let want = f
        .sql(&format!(
            "SELECT id FROM observation WHERE patient_id = '{mine}' ORDER BY id"
        ))
        .await;
    let mut got = ids_of(&own);
    got.sort();
    assert_eq!(got, want, "without _sort, in store order: the same set");
    let (status, _, body) = raw_call(
        &f,
        "GET",
        &format!("/fhir/Observation?patient={other}&_format=ndjson"),
        &tok,
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.is_empty(),
        "another patient's rows: {}",
        String::from_utf8_lossy(&body)
    );
    // $everything as NDJSON: the patient and its resources, the same set as
    // the paged Bundle.
    let (status, _, body) = raw_call(
        &f,
        "GET",
        &format!("/fhir/Patient/{mine}/$everything?_format=ndjson"),
        &tok,
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let mut everything = lines(&body);
    let (mut paged, _) = fhir_all(&f, &tok, &format!("/fhir/Patient/{mine}/$everything")).await;
    let by_key = |r: &Json| (r["resourceType"].to_string(), r["id"].to_string());
    everything.sort_by_key(by_key);
    paged.sort_by_key(by_key);
    assert_eq!(everything, paged);
    assert!(everything.iter().any(|r| r["resourceType"] == "Patient"));

    // _sort=date orders by the type's time property (from its view), in
    // pages and in NDJSON alike.
    for (sort, order) in [("date", "ASC"), ("-date", "DESC")] {
        let uri = format!("/fhir/Observation?patient={other}&_sort={sort}");
        let (paged, _) = fhir_all(&f, &admin, &format!("{uri}&_count=4")).await;
        let want = f
            .sql(&format!(
                "SELECT id FROM observation WHERE patient_id = '{other}' ORDER BY effective {order} NULLS LAST, id"
            ))
            .await;
        assert_eq!(ids_of(&paged), want, "_sort={sort}");
        let (status, _, body) = raw_call(
            &f,
            "GET",
            &format!("{uri}&_format=ndjson"),
            &admin,
            None,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(lines(&body), paged, "_sort={sort} as NDJSON");
    }
    let (status, b) = f
        .call("GET", "/fhir/Patient?_sort=date", Some(&admin), None)
        .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "Patient has no time property: {b}"
    );

    // NDJSON has no pages: paging parameters are refused, naming them.
    for (q, param) in [("_count=5", "_count"), ("_total=accurate", "_total")] {
        let (status, b) = f
            .call(
                "GET",
                &format!("/fhir/Observation?{q}&_format=ndjson"),
                Some(&admin),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{b}");
        assert!(b.to_string().contains(param), "{b}");
    }
    let (status, b) = f
        .call("GET", "/fhir/Observation?_format=xml", Some(&admin), None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{b}");
}

/// A view's rows stream as NDJSON, Arrow or Parquet through the same
/// policy seam: all rows for an admin, one patient's for a patient-bound
/// token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn view_rows_stream_within_scope() {
    let f = fixture(4).await;
    let admin = f.admin();
    let (status, ct, body) = raw_call(
        &f,
        "GET",
        "/api/v2/views/condition/rows",
        &admin,
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(ct, "application/x-ndjson");
    let rows: Vec<Json> = std::str::from_utf8(&body)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut got: Vec<String> = rows
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    got.sort();
    let want = f.sql("SELECT id FROM condition ORDER BY id").await;
    assert_eq!(got, want);
    assert!(rows[0].as_object().unwrap().contains_key("patient_id"));

    let pids = f
        .sql("SELECT patient_id FROM condition GROUP BY patient_id ORDER BY patient_id")
        .await;
    let tok = f.token("pat", "patient/*.rs", Some(&pids[0]));
    let (status, _, body) = raw_call(
        &f,
        "GET",
        "/api/v2/views/condition/rows?format=arrow",
        &tok,
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let reader =
        arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(body), None).unwrap();
    let mut n = 0;
    for b in reader {
        let b = b.unwrap();
        let p = b.column_by_name("patient_id").unwrap();
        for r in 0..b.num_rows() {
            assert_eq!(
                arrow::util::display::array_value_to_string(p, r).unwrap(),
                pids[0]
            );
        }
        n += b.num_rows();
    }
    let own = f
        .sql(&format!(
            "SELECT id FROM condition WHERE patient_id = '{}'",
            pids[0]
        ))
        .await;
    assert_eq!(n, own.len());
    // Asking for another patient gives nothing; an admin's patientId narrows.
    let (_, _, body) = raw_call(
        &f,
        "GET",
        &format!("/api/v2/views/condition/rows?patientId={}", pids[1]),
        &tok,
        None,
        None,
    )
    .await;
    assert!(body.is_empty());
    let (_, _, body) = raw_call(
        &f,
        "GET",
        &format!("/api/v2/views/condition/rows?patientId={}", pids[1]),
        &admin,
        None,
        None,
    )
    .await;
    let theirs = f
        .sql(&format!(
            "SELECT id FROM condition WHERE patient_id = '{}'",
            pids[1]
        ))
        .await;
    assert_eq!(
        std::str::from_utf8(&body).unwrap().lines().count(),
        theirs.len()
    );
    // Unknown views, parameters and formats are 4xx naming them.
    let (status, b) = f
        .call("GET", "/api/v2/views/nope/rows", Some(&admin), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{b}");
    let (status, b) = f
        .call(
            "GET",
            "/api/v2/views/condition/rows?limit=3",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{b}");
    assert!(b.to_string().contains("limit"), "{b}");
    let (status, b) = f
        .call(
            "GET",
            "/api/v2/views/condition/rows?format=csv",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{b}");
    // A token that may not read Conditions may not read their view.
    let obs_only = f.token("o", "user/Observation.rs", None);
    let (status, b) = f
        .call("GET", "/api/v2/views/condition/rows", Some(&obs_only), None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{b}");
}
