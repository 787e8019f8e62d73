//! The access matrix: every serving path under each policy case returns
//! exactly the rows the policy allows, and nothing else.
//!
//! Expected rows are worked out from the generated NDJSON (the Patient
//! resources' organization and practitioner, the CareTeam file the test
//! writes, each Observation's subject), not through the server. Tokens come
//! from a configured RS256 issuer (test-only key in `keys/`), so roles,
//! purposes, audiences and expiry can be set freely.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value as Json, json};
use tower::ServiceExt;

use atlas_lake::Lake;
use atlas_serve::{AppState, IssuerConfig, ServeConfig, router};

const ISS: &str = "https://idp.example/a";
pub(crate) const LOAD: &str = "/api/v2/ontologies/atlas/objectSets/loadObjects";
const AGG: &str = "/api/v2/ontologies/atlas/objectSets/aggregate";
const CARE_DOC: &str = "Practitioner/care-team-doc";

pub(crate) struct World {
    _dir: tempfile::TempDir,
    pub(crate) dir: PathBuf,
    pub(crate) lake: Lake,
    /// Patient id → Patient JSON.
    pub(crate) patients: BTreeMap<String, Json>,
    /// Observation id → patient id.
    pub(crate) observations: BTreeMap<String, String>,
    /// Patients that are the subject of a CareTeam with CARE_DOC.
    pub(crate) care_team: BTreeSet<String>,
}

fn read_ndjson(path: &Path) -> Vec<Json> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn subject(r: &Json) -> Option<String> {
    let s = r["subject"]["reference"].as_str()?;
    Some(s.strip_prefix("Patient/").unwrap_or(s).to_owned())
}

/// A generated lake of `patients` patients plus a CareTeam file, with
/// `keep` (when given) limiting which patients' data is ingested (for a
/// lake where the other rows do not exist).
pub(crate) async fn world(patients: usize, keep: Option<&BTreeSet<String>>) -> World {
    let dir = tempfile::tempdir().unwrap();
    let data = crate::objects::synth(dir.path(), patients, 5);
    let all_patients: Vec<Json> = read_ndjson(&data.join("Patient.ndjson"));
    let mut ids: Vec<String> = all_patients
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    // Two patients share a care team with CARE_DOC.
    let care_team: BTreeSet<String> = [ids[1].clone(), ids[3].clone()].into();
    let teams: Vec<String> = care_team
        .iter()
        .enumerate()
        .map(|(i, p)| {
            json!({"resourceType": "CareTeam", "id": format!("ct-{i}"), "status": "active",
                "subject": {"reference": format!("Patient/{p}")},
                "participant": [{"member": {"reference": CARE_DOC}},
                                {"member": {"reference": "Practitioner/someone-else"}}]})
            .to_string()
        })
        .collect();
    std::fs::write(data.join("CareTeam.ndjson"), teams.join("\n") + "\n").unwrap();
    if let Some(keep) = keep {
        // Drop every line of a patient not kept.
        for entry in std::fs::read_dir(&data).unwrap() {
            let path = entry.unwrap().path();
            let lines: Vec<String> = std::fs::read_to_string(&path)
                .unwrap()
                .lines()
                .filter(|l| {
                    let r: Json = serde_json::from_str(l).unwrap();
                    let owner = if r["resourceType"] == "Patient" {
                        r["id"].as_str().map(str::to_owned)
                    } else {
                        subject(&r)
                    };
                    owner.is_none_or(|o| keep.contains(&o))
                })
                .map(str::to_owned)
                .collect();
            std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        }
    }
    let lake = Lake::open(
        dir.path().join("lake").to_str().unwrap(),
        Default::default(),
    )
    .unwrap();
    crate::objects::ingest_and_refresh(&lake, &data).await;
    let patients = read_ndjson(&data.join("Patient.ndjson"))
        .into_iter()
        .map(|p| (p["id"].as_str().unwrap().to_owned(), p))
        .collect();
    let observations = read_ndjson(&data.join("Observation.ndjson"))
        .into_iter()
        .map(|o| (o["id"].as_str().unwrap().to_owned(), subject(&o).unwrap()))
        .collect();
    World {
        dir: dir.path().to_path_buf(),
        _dir: dir,
        lake,
        patients,
        observations,
        care_team,
    }
}

impl World {
    /// A server on this lake trusting the test RS256 issuer, under `policy`.
    pub(crate) async fn server(&self, policy: &str) -> AppState {
        self.server_with(policy, |_| {}).await
    }

    /// [`World::server`], with `tune` applied to the configuration.
    pub(crate) async fn server_with(
        &self,
        policy: &str,
        tune: impl FnOnce(&mut ServeConfig),
    ) -> AppState {
        let file = self.dir.join(format!("policy-{}.toml", rand_suffix()));
        std::fs::write(&file, policy).unwrap();
        let mut config = test_config(file, 5);
        tune(&mut config);
        AppState::open(
            self.lake.clone(),
            atlas_ontology::Ontology::builtin(),
            config,
        )
        .await
        .unwrap()
    }

    pub(crate) fn patient_ids(&self) -> BTreeSet<String> {
        self.patients.keys().cloned().collect()
    }

    pub(crate) fn observations_of(&self, ps: &BTreeSet<String>) -> BTreeSet<String> {
        self.observations
            .iter()
            .filter(|(_, p)| ps.contains(*p))
            .map(|(o, _)| o.clone())
            .collect()
    }

    pub(crate) fn where_patients(&self, f: impl Fn(&Json) -> bool) -> BTreeSet<String> {
        self.patients
            .iter()
            .filter(|(_, p)| f(p))
            .map(|(id, _)| id.clone())
            .collect()
    }
}

/// A configuration trusting the test RS256 issuer, under the policy file
/// `file`, checked for changes every `refresh_secs`.
fn test_config(file: PathBuf, refresh_secs: u64) -> ServeConfig {
    let mut config = ServeConfig::default();
    config.auth.issuers = vec![IssuerConfig {
        issuer: ISS.into(),
        audience: "atlas".into(),
        jwks_file: Some(keys_dir().join("rsa-jwks.json")),
        jwks_url: None,
        jwks_refresh_secs: 900,
    }];
    config.policy.file = Some(file);
    config.policy.refresh_secs = refresh_secs;
    config
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn keys_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/keys")
}

/// An RS256 token from the test issuer with `claims` over the defaults.
pub(crate) fn jwt(claims: Json) -> String {
    let now = jsonwebtoken::get_current_timestamp() as i64;
    let mut c = json!({"iss": ISS, "sub": "someone", "aud": "atlas", "exp": now + 600,
        "scope": "user/*.rs"});
    for (k, v) in claims.as_object().unwrap() {
        c[k] = v.clone();
    }
    let pem = std::fs::read_to_string(keys_dir().join("rsa-test.pem")).unwrap();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-1".into());
    jsonwebtoken::encode(
        &header,
        &c,
        &EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
    )
    .unwrap()
}

pub(crate) async fn call(
    state: &AppState,
    method: &str,
    uri: &str,
    token: &str,
    purpose: Option<&str>,
    body: Option<&Json>,
) -> (StatusCode, Vec<u8>) {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", format!("Bearer {token}"));
    if let Some(p) = purpose {
        req = req.header("x-purpose-of-use", p);
    }
    let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
    let response = router(state.clone())
        .oneshot(req.body(body).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 28)
        .await
        .unwrap();
    (status, bytes.to_vec())
}

pub(crate) async fn call_json(
    state: &AppState,
    method: &str,
    uri: &str,
    token: &str,
    purpose: Option<&str>,
    body: Option<&Json>,
) -> (StatusCode, Json) {
    let (s, b) = call(state, method, uri, token, purpose, body).await;
    let j = serde_json::from_slice(&b)
        .unwrap_or_else(|e| panic!("{uri}: {e}: {}", String::from_utf8_lossy(&b)));
    (s, j)
}

/// What one path answered: ids, a count, or an error status.
#[derive(Debug, PartialEq, Eq)]
enum Got {
    Ids(BTreeSet<String>),
    Count(u64),
    Status(u16),
}

struct Client<'a> {
    state: &'a AppState,
    token: String,
    purpose: Option<&'a str>,
}

impl Client<'_> {
    async fn json(&self, method: &str, uri: &str, body: Option<&Json>) -> Result<Json, u16> {
        let (s, j) = call_json(self.state, method, uri, &self.token, self.purpose, body).await;
        if s == StatusCode::OK {
            Ok(j)
        } else {
            Err(s.as_u16())
        }
    }

    /// Every object of a loadObjects request, following page tokens.
    async fn load_ids(&self, body: Json) -> Got {
        let mut body = body;
        let mut out = BTreeSet::new();
        loop {
            match self.json("POST", LOAD, Some(&body)).await {
                Err(s) => return Got::Status(s),
                Ok(page) => {
                    for o in page["data"].as_array().unwrap() {
                        out.insert(o["__primaryKey"].as_str().unwrap().to_owned());
                    }
                    match page["nextPageToken"].as_str() {
                        Some(t) => body["pageToken"] = json!(t),
                        None => return Got::Ids(out),
                    }
                }
            }
        }
    }

    async fn ndjson_ids(&self, method: &str, uri: &str, body: Option<&Json>, key: &str) -> Got {
        let (s, b) = call(self.state, method, uri, &self.token, self.purpose, body).await;
        if s != StatusCode::OK {
            return Got::Status(s.as_u16());
        }
        Got::Ids(
            String::from_utf8(b)
                .unwrap()
                .lines()
                .map(|l| {
                    let j: Json = serde_json::from_str(l).unwrap();
                    j[key].as_str().unwrap().to_owned()
                })
                .collect(),
        )
    }

    /// Every resource id of a FHIR search, following Bundle.link[next].
    async fn fhir_ids(&self, uri: &str) -> Got {
        let mut uri = uri.to_owned();
        let mut out = BTreeSet::new();
        loop {
            match self.json("GET", &uri, None).await {
                Err(s) => return Got::Status(s),
                Ok(b) => {
                    for e in b["entry"].as_array().unwrap() {
                        out.insert(e["resource"]["id"].as_str().unwrap().to_owned());
                    }
                    let next = b["link"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|l| l["relation"] == "next")
                        .map(|l| l["url"].as_str().unwrap().to_owned());
                    match next {
                        Some(n) => uri = n[n.find("/fhir/").unwrap()..].to_owned(),
                        None => return Got::Ids(out),
                    }
                }
            }
        }
    }

    /// The ids of the `change` events `GET /events` replays from the start
    /// of the change feed (`lastEventId=-1&once=true`).
    async fn sse_ids(&self, types: &str) -> Got {
        let uri = format!("/events?lastEventId=-1&once=true&types={types}");
        let (s, b) = call(self.state, "GET", &uri, &self.token, self.purpose, None).await;
        if s != StatusCode::OK {
            return Got::Status(s.as_u16());
        }
        Got::Ids(
            crate::events::sse_events(&String::from_utf8(b).unwrap())
                .into_iter()
                .filter(|e| e.event == "change")
                .map(|e| e.data["id"].as_str().unwrap().to_owned())
                .collect(),
        )
    }

    async fn graphql(&self, query: &str) -> Result<Json, u16> {
        self.json("POST", "/graphql", Some(&json!({"query": query})))
            .await
    }
}

/// What a case expects: the patients whose rows every path returns, or
/// the status every path answers.
#[derive(Debug, Clone)]
enum Expect {
    Patients(BTreeSet<String>),
    Status(u16),
}

/// Runs every path for one principal and compares with `expect`.
async fn check_paths(w: &World, case: &str, c: &Client<'_>, expect: &Expect) {
    let all_patients = w.patient_ids();
    let exp = |obs: bool| -> Got {
        match expect {
            Expect::Status(s) => Got::Status(*s),
            Expect::Patients(ps) => Got::Ids(if obs {
                w.observations_of(ps)
            } else {
                ps.clone()
            }),
        }
    };
    let obs_base = json!({"type": "base", "objectType": "Observation"});

    // Object sets: load, searchAround, aggregate, streaming.
    let got = c
        .load_ids(json!({"objectSet": obs_base, "pageSize": 500}))
        .await;
    assert_eq!(got, exp(true), "{case}: loadObjects Observation");
    let around = json!({"type": "searchAround", "link": "observations",
        "objectSet": {"type": "static", "objectType": "Patient",
                      "objects": all_patients.iter().collect::<Vec<_>>()}});
    let got = c
        .load_ids(json!({"objectSet": around, "pageSize": 500}))
        .await;
    assert_eq!(
        got,
        exp(true),
        "{case}: searchAround Patient -> observations"
    );
    let got = match c
        .json(
            "POST",
            AGG,
            Some(&json!({"objectSet": obs_base,
                "aggregation": [{"type": "count", "name": "n"}]})),
        )
        .await
    {
        Ok(a) => Got::Count(a["data"][0]["metrics"][0]["value"].as_u64().unwrap()),
        Err(s) => Got::Status(s),
    };
    let want = match exp(true) {
        Got::Ids(ids) => Got::Count(ids.len() as u64),
        other => other,
    };
    assert_eq!(got, want, "{case}: aggregate count");
    let got = c
        .ndjson_ids(
            "POST",
            &format!("{LOAD}?format=ndjson"),
            Some(&json!({"objectSet": obs_base})),
            "__primaryKey",
        )
        .await;
    assert_eq!(got, exp(true), "{case}: loadObjects NDJSON stream");
    let got = c
        .ndjson_ids("GET", "/api/v2/views/observation/rows", None, "id")
        .await;
    assert_eq!(got, exp(true), "{case}: view rows stream");
    let got = c
        .load_ids(json!({"objectSet": {"type": "base", "objectType": "Patient"}, "pageSize": 500}))
        .await;
    assert_eq!(got, exp(false), "{case}: loadObjects Patient");

    // GraphQL: the root connection, and links inside it.
    let (status, r) = call_json(
        c.state,
        "POST",
        "/graphql",
        &c.token,
        c.purpose,
        Some(&json!({"query": "{ PatientAll(first: 500) { nodes { id observations { id } } } }"})),
    )
    .await;
    let got = if status == StatusCode::UNAUTHORIZED {
        (Got::Status(401), Got::Status(401))
    } else if !r["errors"].is_null() {
        // A denied field is a GraphQL error carrying the HTTP status.
        let s = r["errors"][0]["extensions"]["status"].as_u64().unwrap() as u16;
        (Got::Status(s), Got::Status(s))
    } else {
        let nodes = r["data"]["PatientAll"]["nodes"].as_array().unwrap().clone();
        let ps = nodes
            .iter()
            .map(|n| n["id"].as_str().unwrap().to_owned())
            .collect();
        let os = nodes
            .iter()
            .flat_map(|n| n["observations"].as_array().unwrap().clone())
            .map(|o| o["id"].as_str().unwrap().to_owned())
            .collect();
        (Got::Ids(ps), Got::Ids(os))
    };
    assert_eq!(got.0, exp(false), "{case}: GraphQL PatientAll");
    assert_eq!(got.1, exp(true), "{case}: GraphQL PatientAll.observations");

    // FHIR REST: search (Bundle pages and NDJSON), read, $everything.
    let got = c.fhir_ids("/fhir/Observation?_count=400").await;
    assert_eq!(got, exp(true), "{case}: FHIR search Observation");
    let got = c
        .ndjson_ids("GET", "/fhir/Observation?_format=ndjson", None, "id")
        .await;
    assert_eq!(got, exp(true), "{case}: FHIR search NDJSON");
    let mut read = BTreeSet::new();
    let mut everything = BTreeSet::new();
    let mut statuses = BTreeSet::new();
    for p in &all_patients {
        let (s, _) = call(
            c.state,
            "GET",
            &format!("/fhir/Patient/{p}"),
            &c.token,
            c.purpose,
            None,
        )
        .await;
        statuses.insert(s.as_u16());
        if s == StatusCode::OK {
            read.insert(p.clone());
        }
        let (s, b) = call(
            c.state,
            "GET",
            &format!("/fhir/Patient/{p}/$everything?_count=1000"),
            &c.token,
            c.purpose,
            None,
        )
        .await;
        if s == StatusCode::OK {
            everything.insert(p.clone());
            // Only the patient's own resources come back.
            let bundle: Json = serde_json::from_slice(&b).unwrap();
            for e in bundle["entry"].as_array().unwrap() {
                let r = &e["resource"];
                if r["resourceType"] == "Observation" {
                    assert_eq!(
                        subject(r).as_deref(),
                        Some(p.as_str()),
                        "{case}: $everything"
                    );
                }
            }
        }
    }
    // Events: change notices replayed from the feed (a denied type sends
    // no notice rather than a 403: the connection is about many types).
    let got = c.sse_ids("Observation").await;
    let want = match exp(true) {
        Got::Status(403) => Got::Ids(BTreeSet::new()),
        other => other,
    };
    assert_eq!(got, want, "{case}: GET /events change notices");
    match expect {
        Expect::Status(s) => assert_eq!(statuses, [*s].into(), "{case}: FHIR read"),
        Expect::Patients(ps) => {
            assert_eq!(&read, ps, "{case}: FHIR read Patient/{{id}}");
            assert_eq!(&everything, ps, "{case}: $everything");
            // Outside the rows is indistinguishable from absent: 404.
            assert!(
                statuses.iter().all(|s| [200, 404].contains(s)),
                "{case}: {statuses:?}"
            );
        }
    }
}

pub(crate) fn first_org(w: &World) -> String {
    let p = w.patients.values().next().unwrap();
    p["managingOrganization"]["reference"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn first_gp(w: &World) -> String {
    let p = w.patients.values().nth(2).unwrap();
    p["generalPractitioner"][0]["reference"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_matrix_every_path_every_policy_case() {
    let w = world(12, None).await;
    let all = w.patient_ids();
    let ids: Vec<String> = all.iter().cloned().collect();
    let org = first_org(&w);
    let gp = first_gp(&w);
    let gp_id = gp.strip_prefix("Practitioner/").unwrap().to_owned();
    let in_org = w.where_patients(|p| p["managingOrganization"]["reference"] == json!(org));
    let of_gp = w.where_patients(|p| p["generalPractitioner"][0]["reference"] == json!(gp));
    let women = w.where_patients(|p| p["gender"] == "female");
    assert!(in_org.len() >= 2 && in_org.len() < all.len(), "{in_org:?}");
    let outside_org = all.difference(&in_org).next().unwrap().clone();
    let now = jsonwebtoken::get_current_timestamp() as i64;
    let everyone = "[[rule]]\nid = \"everyone\"\neffect = \"allow\"\n";

    struct Case {
        name: &'static str,
        policy: String,
        claims: Json,
        purpose: Option<&'static str>,
        expect: Expect,
    }
    let cases = vec![
        Case {
            name: "own patient only (patient/ scopes, patient claim)",
            policy: everyone.into(),
            claims: json!({"scope": "patient/*.rs", "patient": ids[0]}),
            purpose: None,
            expect: Expect::Patients([ids[0].clone()].into()),
        },
        Case {
            name: "organization",
            policy: format!("[roles.clinician]\nsubjects = [\"dr-a\"]\n[[rule]]\nid = \"org\"\neffect = \"allow\"\nroles = [\"clinician\"]\npatients = {{ organization = \"{org}\" }}\n"),
            claims: json!({"sub": "dr-a"}),
            purpose: None,
            expect: Expect::Patients(in_org.clone()),
        },
        Case {
            name: "care team",
            policy: "[[rule]]\nid = \"team\"\neffect = \"allow\"\npatients = { care_team_member = \"Practitioner/{sub}\" }\n".into(),
            claims: json!({"sub": "care-team-doc"}),
            purpose: None,
            expect: Expect::Patients(w.care_team.clone()),
        },
        Case {
            name: "general practitioner ({sub})",
            policy: "[[rule]]\nid = \"panel\"\neffect = \"allow\"\npatients = { general_practitioner = \"Practitioner/{sub}\" }\n".into(),
            claims: json!({"sub": gp_id}),
            purpose: None,
            expect: Expect::Patients(of_gp.clone()),
        },
        Case {
            name: "FHIRPath criterion",
            policy: "[[rule]]\nid = \"women\"\neffect = \"allow\"\npatients = { criterion = \"gender = 'female'\" }\n".into(),
            claims: json!({}),
            purpose: None,
            expect: Expect::Patients(women.clone()),
        },
        Case {
            name: "hidden field (rows unchanged)",
            policy: format!("{everyone}[[rule]]\nid = \"no-names\"\neffect = \"deny\"\nhide = [\"Patient.name\"]\n"),
            claims: json!({}),
            purpose: None,
            expect: Expect::Patients(all.clone()),
        },
        Case {
            name: "deny overrides allow",
            policy: format!("{everyone}[[rule]]\nid = \"vip\"\neffect = \"deny\"\npatients = {{ ids = [\"{}\"] }}\n", ids[1]),
            claims: json!({}),
            purpose: None,
            expect: Expect::Patients(all.iter().filter(|p| **p != ids[1]).cloned().collect()),
        },
        Case {
            name: "expired token",
            policy: everyone.into(),
            claims: json!({"exp": now - 3600}),
            purpose: None,
            expect: Expect::Status(401),
        },
        Case {
            name: "wrong audience",
            policy: everyone.into(),
            claims: json!({"aud": "someone-else"}),
            purpose: None,
            expect: Expect::Status(401),
        },
        Case {
            name: "patient-bound token outside the policy's patients",
            policy: format!("[[rule]]\nid = \"org\"\neffect = \"allow\"\npatients = {{ organization = \"{org}\" }}\n"),
            claims: json!({"patient": outside_org}),
            purpose: None,
            expect: Expect::Patients(BTreeSet::new()),
        },
        Case {
            name: "purpose of use missing",
            policy: "[[rule]]\nid = \"treat\"\neffect = \"allow\"\npurpose = [\"TREAT\"]\n".into(),
            claims: json!({}),
            purpose: None,
            expect: Expect::Status(403),
        },
        Case {
            name: "purpose of use picked by header among the claim's",
            policy: "[[rule]]\nid = \"treat\"\neffect = \"allow\"\npurpose = [\"TREAT\"]\n".into(),
            claims: json!({"purpose_of_use": ["HRESCH", "TREAT"]}),
            purpose: Some("TREAT"),
            expect: Expect::Patients(all.clone()),
        },
        Case {
            name: "purpose of use stated (claim)",
            policy: "[[rule]]\nid = \"treat\"\neffect = \"allow\"\npurpose = [\"TREAT\"]\n".into(),
            claims: json!({"purpose_of_use": "TREAT"}),
            purpose: None,
            expect: Expect::Patients(all.clone()),
        },
        Case {
            name: "no rule",
            policy: "[[rule]]\nid = \"others\"\neffect = \"allow\"\nsubjects = [\"not-you\"]\n".into(),
            claims: json!({}),
            purpose: None,
            expect: Expect::Status(403),
        },
        Case {
            name: "admin (role claim)",
            policy: format!("[[rule]]\nid = \"admin\"\neffect = \"allow\"\nroles = [\"admin\"]\n[[rule]]\nid = \"org\"\neffect = \"allow\"\npatients = {{ organization = \"{org}\" }}\n"),
            claims: json!({"roles": ["admin"]}),
            purpose: None,
            expect: Expect::Patients(all.clone()),
        },
    ];
    assert!(cases.len() >= 12);
    for case in &cases {
        let state = w.server(&case.policy).await;
        let client = Client {
            state: &state,
            token: jwt(case.claims.clone()),
            purpose: case.purpose,
        };
        check_paths(&w, case.name, &client, &case.expect).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_types_and_hidden_fields_on_every_path() {
    let w = world(6, None).await;
    let state = w
        .server(
            "[[rule]]\nid = \"everyone\"\neffect = \"allow\"\n\
             [[rule]]\nid = \"no-obs\"\neffect = \"deny\"\ntypes = [\"Observation\"]\n\
             [[rule]]\nid = \"no-contact\"\neffect = \"deny\"\nhide = [\"Patient.name\", \"Patient.telecom\", \"Patient.address\"]\n",
        )
        .await;
    let token = jwt(json!({}));
    let c = Client {
        state: &state,
        token: token.clone(),
        purpose: None,
    };
    let obs = json!({"objectSet": {"type": "base", "objectType": "Observation"}});
    let (s, e) = call_json(&state, "POST", LOAD, &token, None, Some(&obs)).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{e}");
    // The rule is named in the audit record and the log, not to the client.
    assert!(!e.to_string().contains("no-obs"), "{e}");
    for uri in [
        "/fhir/Observation",
        "/fhir/Observation?_format=ndjson",
        "/api/v2/views/observation/rows",
    ] {
        let (s, _) = call(&state, "GET", uri, &token, None, None).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{uri}");
    }
    let (s, _) = call(
        &state,
        "POST",
        AGG,
        &token,
        None,
        Some(&json!({"objectSet": obs["objectSet"],
        "aggregation": [{"type": "count", "name": "n"}]})),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let r = c
        .graphql("{ PatientAll(first: 5) { nodes { id observations { id } } } }")
        .await
        .unwrap();
    assert!(!r["errors"].is_null(), "{r}");
    // $everything leaves the denied type out.
    let p = w.patients.keys().next().unwrap();
    let (s, b) = call_json(
        &state,
        "GET",
        &format!("/fhir/Patient/{p}/$everything?_count=1000"),
        &token,
        None,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let types: BTreeSet<&str> = b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["resourceType"].as_str().unwrap())
        .collect();
    assert!(
        types.contains("Patient") && !types.contains("Observation"),
        "{types:?}"
    );

    // Hidden fields: gone from objects, GraphQL, FHIR JSON and view rows.
    let (s, page) = call_json(
        &state,
        "POST",
        LOAD,
        &token,
        None,
        Some(&json!({"objectSet": {"type": "base", "objectType": "Patient"}})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    for o in page["data"].as_array().unwrap() {
        for hidden in ["family", "given", "city", "state", "postal_code"] {
            assert!(o.get(hidden).is_none(), "{hidden} in {o}");
        }
        assert!(
            o.get("gender").is_some() && o.get("birth_date").is_some(),
            "{o}"
        );
        // The title falls back to the key rather than the hidden name.
        assert_eq!(o["__title"], o["__primaryKey"], "{o}");
    }
    for (body, field) in [
        (
            json!({"objectSet": {"type": "base", "objectType": "Patient"}, "where": {"type": "startsWith", "field": "family", "value": "A"}}),
            "family",
        ),
        (
            json!({"objectSet": {"type": "base", "objectType": "Patient"}, "orderBy": {"orderType": "fields", "fields": [{"field": "city", "direction": "asc"}]}}),
            "city",
        ),
        (
            json!({"objectSet": {"type": "base", "objectType": "Patient"}, "select": ["given"]}),
            "given",
        ),
        (
            json!({"objectSet": {"type": "filter", "objectSet": {"type": "base", "objectType": "Patient"}, "where": {"type": "eq", "field": "postal_code", "value": "0"}}}),
            "postal_code",
        ),
    ] {
        let (s, e) = call_json(&state, "POST", LOAD, &token, None, Some(&body)).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{body}: {e}");
        assert_eq!(e["parameters"]["property"], field, "{e}");
    }
    let (s, e) = call_json(
        &state,
        "POST",
        AGG,
        &token,
        None,
        Some(&json!({
        "objectSet": {"type": "base", "objectType": "Patient"},
        "aggregation": [{"type": "count", "name": "n"}],
        "groupBy": [{"type": "exact", "field": "family"}]})),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{e}");
    let r = c
        .graphql("{ PatientAll(first: 50) { nodes { id family gender } } }")
        .await
        .unwrap();
    for n in r["data"]["PatientAll"]["nodes"].as_array().unwrap() {
        assert!(n["family"].is_null() && n["gender"].is_string(), "{n}");
    }
    let r = c
        .graphql(r#"{ PatientAll(first: 5, where: {field: "family", type: "startsWith", value: "A"}) { nodes { id } } }"#)
        .await;
    assert!(r.as_ref().map_or(true, |r| !r["errors"].is_null()), "{r:?}");
    for p in w.patients.keys() {
        let (s, j) = call_json(
            &state,
            "GET",
            &format!("/fhir/Patient/{p}"),
            &token,
            None,
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        for hidden in ["name", "telecom", "address"] {
            assert!(j.get(hidden).is_none(), "{hidden}: {j}");
        }
        assert!(j.get("gender").is_some() && j.get("birthDate").is_some());
    }
    let (_, b) = call(
        &state,
        "GET",
        "/fhir/Patient?_format=ndjson",
        &token,
        None,
        None,
    )
    .await;
    let text = String::from_utf8(b).unwrap();
    assert_eq!(text.lines().count(), w.patients.len());
    for p in w.patients.values() {
        let family = p["name"][0]["family"].as_str().unwrap();
        assert!(
            !text.contains(&format!("\"{family}\"")),
            "{family} leaked in FHIR NDJSON"
        );
    }
    let (_, b) = call(
        &state,
        "GET",
        "/api/v2/views/patient/rows",
        &token,
        None,
        None,
    )
    .await;
    let row: Json =
        serde_json::from_str(String::from_utf8(b).unwrap().lines().next().unwrap()).unwrap();
    assert!(
        row.get("family").is_none() && row.get("city").is_none() && row.get("gender").is_some(),
        "{row}"
    );
}

/// Drops what legitimately differs between two lakes (page tokens and the
/// links carrying them).
fn comparable(mut v: Json) -> Json {
    fn strip(v: &mut Json) {
        match v {
            Json::Object(o) => {
                o.remove("nextPageToken");
                o.remove("link");
                o.values_mut().for_each(strip);
            }
            Json::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut v);
    v
}

/// Side channels: under a policy that allows one organization's patients,
/// every filter, sort, aggregate, count, searchAround, reverse link and
/// error answers exactly as on a lake holding only those patients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_outside_the_scope_leave_no_trace_in_any_answer() {
    let full = world(12, None).await;
    let org = first_org(&full);
    let in_org = full.where_patients(|p| p["managingOrganization"]["reference"] == json!(org));
    let outsider = full
        .patient_ids()
        .difference(&in_org)
        .next()
        .unwrap()
        .clone();
    let only = world(12, Some(&in_org)).await;
    assert_eq!(only.patient_ids(), in_org);

    let scoped = full
        .server(&format!(
            "[[rule]]\nid = \"org\"\neffect = \"allow\"\npatients = {{ organization = \"{org}\" }}\n"
        ))
        .await;
    let plain = only
        .server("[[rule]]\nid = \"everyone\"\neffect = \"allow\"\n")
        .await;
    let token = jwt(json!({}));
    // A value threshold and a code taken from rows *outside* the scope:
    // filtering on them must not tell those rows exist.
    let outside_obs: Vec<&String> = full
        .observations
        .iter()
        .filter(|(_, p)| **p == outsider)
        .map(|(o, _)| o)
        .collect();
    assert!(!outside_obs.is_empty());
    let all_ids: Vec<&String> = full.patients.keys().collect();

    let obs = json!({"type": "base", "objectType": "Observation"});
    let requests: Vec<(&str, String, Option<Json>)> = vec![
        (
            "POST",
            LOAD.to_owned(),
            Some(
                json!({"objectSet": obs, "pageSize": 7, "includeTotalCount": true,
            "where": {"type": "gt", "field": "value_quantity", "value": 50},
            "orderBy": {"orderType": "fields", "fields": [{"field": "value_quantity", "direction": "desc"}]}}),
            ),
        ),
        (
            "POST",
            LOAD.to_owned(),
            Some(json!({"objectSet": obs, "includeTotalCount": true,
            "where": {"type": "in", "field": "id", "value": outside_obs}})),
        ),
        (
            "POST",
            LOAD.to_owned(),
            Some(
                json!({"objectSet": {"type": "searchAround", "link": "observations",
            "objectSet": {"type": "static", "objectType": "Patient", "objects": all_ids}},
            "pageSize": 1000, "includeTotalCount": true}),
            ),
        ),
        (
            "POST",
            LOAD.to_owned(),
            Some(
                json!({"objectSet": {"type": "searchAround", "link": "patient",
            "objectSet": {"type": "static", "objectType": "Observation", "objects": outside_obs}},
            "includeTotalCount": true}),
            ),
        ),
        (
            "POST",
            LOAD.to_owned(),
            Some(
                json!({"objectSet": {"type": "searchAround", "link": "patient", "objectSet": obs},
            "pageSize": 1000, "includeTotalCount": true}),
            ),
        ),
        (
            "POST",
            format!("{LOAD}?patientId={outsider}"),
            Some(json!({"objectSet": obs, "includeTotalCount": true})),
        ),
        (
            "POST",
            AGG.to_owned(),
            Some(json!({"objectSet": obs,
            "aggregation": [{"type": "count", "name": "n"}, {"type": "avg", "field": "value_quantity", "name": "avg"},
                            {"type": "max", "field": "effective", "name": "last"},
                            {"type": "exactDistinct", "field": "patient_id", "name": "patients"}],
            "groupBy": [{"type": "exact", "field": "code"}]})),
        ),
        (
            "POST",
            AGG.to_owned(),
            Some(
                json!({"objectSet": {"type": "base", "objectType": "Patient"},
            "aggregation": [{"type": "count", "name": "n"}, {"type": "min", "field": "birth_date", "name": "oldest"}],
            "groupBy": [{"type": "exact", "field": "gender"}]}),
            ),
        ),
        (
            "GET",
            format!("/api/v2/ontologies/atlas/objects/Patient/{outsider}"),
            None,
        ),
        (
            "GET",
            format!("/api/v2/ontologies/atlas/objects/Patient/{outsider}/links/observations"),
            None,
        ),
        ("GET", format!("/fhir/Patient/{outsider}"), None),
        ("GET", format!("/fhir/Patient/{outsider}/$everything"), None),
        (
            "GET",
            format!("/fhir/Observation?_id={}&_total=accurate", outside_obs[0]),
            None,
        ),
        (
            "GET",
            "/fhir/Observation?_total=accurate&_sort=-date&_count=9".to_owned(),
            None,
        ),
        (
            "GET",
            format!("/fhir/Observation?patient={outsider}&_total=accurate"),
            None,
        ),
        (
            "GET",
            "/fhir/Condition?_total=accurate&_count=1000&_sort=_id".to_owned(),
            None,
        ),
        (
            "POST",
            "/graphql".to_owned(),
            Some(json!({"query": format!(
            "{{ PatientAll(first: 100) {{ totalCount nodes {{ id observations {{ id }} conditions {{ id }} }} }} \
               patient(id: \"{outsider}\") {{ id }} }}")})),
        ),
        (
            "POST",
            "/graphql".to_owned(),
            Some(json!({"query":
            "{ ObservationAll(first: 1000, where: {type: \"gt\", field: \"value_quantity\", value: 50}) { totalCount nodes { id patient { id } } } }"})),
        ),
    ];
    // SQL: joins, counts, aggregates, FHIRPath and errors the query's own
    // expressions raise: none may depend on a row outside the scope.
    let ids_in = outside_obs
        .iter()
        .map(|o| format!("'{o}'"))
        .collect::<Vec<_>>()
        .join(",");
    let sql = |q: String| {
        (
            "POST",
            "/api/v2/sql".to_owned(),
            Some(json!({ "query": q })),
        )
    };
    let mut requests = requests;
    requests.extend([
        sql("SELECT count(*) AS n FROM observation".into()),
        sql("SELECT resource_type, count(*) AS n, count(DISTINCT patient_id) AS p FROM resources WHERE resource_type IN ('Patient', 'Observation', 'Condition') GROUP BY resource_type ORDER BY 1".into()),
        sql(format!("SELECT count(*) AS n FROM observation WHERE id IN ({ids_in})")),
        sql(format!("SELECT count(*) AS n FROM patient WHERE id = '{outsider}'")),
        sql("SELECT o.id, p.gender, o.value_quantity FROM observation o JOIN patient p ON o.patient_id = p.id ORDER BY o.id".into()),
        sql("SELECT code, count(*) AS n, avg(value_quantity) AS a, max(effective) AS e FROM observation GROUP BY code ORDER BY code".into()),
        sql("SELECT p.id, (SELECT count(*) FROM observation o WHERE o.patient_id = p.id) AS n FROM patient p ORDER BY p.id".into()),
        // Raises only if it is evaluated on the outsider's rows.
        sql(format!("SELECT count(*) AS n FROM observation WHERE 1 / (CASE WHEN patient_id = '{outsider}' THEN 0 ELSE 1 END) = 1")),
        sql(format!("SELECT id FROM observation WHERE CAST(CASE WHEN patient_id = '{outsider}' THEN 'x' ELSE '1' END AS INT) = 1 ORDER BY id")),
        sql(format!("SELECT id FROM resources WHERE resource_type = 'Observation' AND fhirpath(resource, 'subject.reference = ''Patient/{outsider}'' implies value.ofType(Quantity).value.toString().toInteger() > 0') = 'true' ORDER BY id")),
        sql("SELECT id FROM resources WHERE resource_type = 'Observation' AND fhirpath(resource, 'value.ofType(Quantity).value > 50') = 'true' ORDER BY id".into()),
        sql("SELECT * FROM observation ORDER BY id LIMIT 3".into()),
        sql(format!("SELECT * FROM nonexistent WHERE id = '{outsider}'")),
    ]);
    for (method, uri, body) in &requests {
        let (s1, a) = call_json(&scoped, method, uri, &token, None, body.as_ref()).await;
        let (s2, b) = call_json(&plain, method, uri, &token, None, body.as_ref()).await;
        assert_eq!(s1, s2, "{method} {uri} {body:?}: {a} / {b}");
        assert_eq!(comparable(a), comparable(b), "{method} {uri} {body:?}");
    }
    // Every page of a sorted, filtered set is the same on both (each
    // server follows its own page tokens: they are signed per lake).
    let mut body_a = requests[0].2.clone().unwrap();
    let mut body_b = body_a.clone();
    let mut pages = 0;
    loop {
        let (_, a) = call_json(&scoped, "POST", LOAD, &token, None, Some(&body_a)).await;
        let (_, b) = call_json(&plain, "POST", LOAD, &token, None, Some(&body_b)).await;
        assert_eq!(comparable(a.clone()), comparable(b.clone()), "page {pages}");
        pages += 1;
        match (a["nextPageToken"].as_str(), b["nextPageToken"].as_str()) {
            (Some(x), Some(y)) => {
                body_a["pageToken"] = json!(x);
                body_b["pageToken"] = json!(y);
            }
            (None, None) => break,
            other => panic!("page {pages}: {other:?}"),
        }
    }
    assert!(pages > 1);
}

/// The JWT attack set: every forged or misused token is a 401 on every
/// kind of path, before any policy or data is touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_attacks_are_all_401() {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let w = world(4, None).await;
    let state = w
        .server("[[rule]]\nid = \"everyone\"\neffect = \"allow\"\n")
        .await;
    let good = jwt(json!({}));
    let now = jsonwebtoken::get_current_timestamp() as i64;
    let parts: Vec<&str> = good.split('.').collect();
    let claims: Json = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    let enc = |v: &Json| b64.encode(v.to_string());

    // alg none, unsigned.
    let none = format!(
        "{}.{}.",
        enc(&json!({"alg": "none", "typ": "JWT", "kid": "rsa-1"})),
        parts[1]
    );
    // HS256 keyed with the issuer's public key (RS/HS confusion).
    let public = std::fs::read(keys_dir().join("rsa-test.pub.pem")).unwrap();
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("rsa-1".into());
    let hs256 = jsonwebtoken::encode(&h, &claims, &EncodingKey::from_secret(&public)).unwrap();
    // A payload changed after signing (more roles, another patient).
    let mut more = claims.clone();
    more["roles"] = json!(["admin"]);
    more["sub"] = json!("root");
    let tampered = format!("{}.{}.{}", parts[0], enc(&more), parts[2]);
    // Unknown kid, signed with the right key.
    let pem = std::fs::read_to_string(keys_dir().join("rsa-test.pem")).unwrap();
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("rsa-2".into());
    let unknown_kid = jsonwebtoken::encode(
        &h,
        &claims,
        &EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
    )
    .unwrap();
    // A foreign jku pointing at the attacker's keys, signed by the attacker
    // (never fetched: keys come only from configured issuers).
    let ec = std::fs::read_to_string(keys_dir().join("ec384-test.pem")).unwrap();
    let mut h = Header::new(Algorithm::ES384);
    h.kid = Some("rsa-1".into());
    h.jku = Some("https://evil.example/jwks.json".into());
    let foreign_jku = jsonwebtoken::encode(
        &h,
        &claims,
        &EncodingKey::from_ec_pem(ec.as_bytes()).unwrap(),
    )
    .unwrap();
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("rsa-1".into());
    h.jku = Some("https://evil.example/jwks.json".into());
    let jku_with_good_key = jsonwebtoken::encode(
        &h,
        &claims,
        &EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
    )
    .unwrap();

    let attacks = [
        ("alg none", none),
        ("HS256 with the public key", hs256),
        ("expired", jwt(json!({"exp": now - 120}))),
        ("not yet valid", jwt(json!({"nbf": now + 3600}))),
        ("wrong issuer", jwt(json!({"iss": "https://evil.example"}))),
        ("wrong audience", jwt(json!({"aud": "not-atlas"}))),
        ("unknown kid", unknown_kid),
        ("tampered payload", tampered),
        ("foreign jku", foreign_jku),
        // Refused outright, even over a key the server trusts: a token that
        // asks to be checked against other keys is not taken.
        ("jku on a well-signed token", jku_with_good_key),
        ("empty", String::new()),
        ("garbage", "a.b.c".into()),
    ];
    let paths: [(&str, &str, Option<Json>); 5] = [
        (
            "POST",
            LOAD,
            Some(json!({"objectSet": {"type": "base", "objectType": "Patient"}})),
        ),
        (
            "POST",
            "/graphql",
            Some(json!({"query": "{ PatientAll(first: 1) { nodes { id } } }"})),
        ),
        ("GET", "/fhir/Patient", None),
        ("GET", "/api/v2/views/patient/rows", None),
        ("GET", "/api/v2/ontologies/atlas/objects/Patient", None),
    ];
    for (name, token) in &attacks {
        for (method, uri, body) in &paths {
            let (s, e) = call_json(&state, method, uri, token, None, body.as_ref()).await;
            assert_eq!(s, StatusCode::UNAUTHORIZED, "{name} on {uri}: {e}");
            // API errors and FHIR OperationOutcomes both say why.
            assert!(
                e["errorName"] == "Unauthorized" || e["issue"][0]["code"] == "login",
                "{name}: {e}"
            );
        }
    }
    // The good token works on the same paths.
    for (method, uri, body) in &paths {
        let (s, _) = call(&state, method, uri, &good, None, body.as_ref()).await;
        assert_eq!(s, StatusCode::OK, "{uri}");
    }
}

/// A changed policy file is picked up by a running server; a broken one is
/// refused and the policy in force stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_file_reloads_and_a_broken_one_keeps_the_last_good() {
    let w = world(4, None).await;
    let file = w.dir.join("reloaded.toml");
    std::fs::write(&file, "[[rule]]\nid = \"everyone\"\neffect = \"allow\"\n").unwrap();
    let config = test_config(file.clone(), 1);
    let state = AppState::open(w.lake.clone(), atlas_ontology::Ontology::builtin(), config)
        .await
        .unwrap();
    let token = jwt(json!({}));
    let status = || async {
        call(&state, "GET", "/fhir/Patient", &token, None, None)
            .await
            .0
    };
    assert_eq!(status().await, StatusCode::OK);
    let wait_for = |want: StatusCode| async move {
        for _ in 0..50 {
            if status().await == want {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        false
    };
    std::fs::write(
        &file,
        "[[rule]]\nid = \"others\"\neffect = \"allow\"\nsubjects = [\"x\"]\n",
    )
    .unwrap();
    assert!(
        wait_for(StatusCode::FORBIDDEN).await,
        "the stricter policy was not loaded"
    );
    std::fs::write(
        &file,
        "[[rule]]\nid = \"everyone\"\neffect = \"allow\"\nnot_a_field = 1\n",
    )
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(
        status().await,
        StatusCode::FORBIDDEN,
        "a broken file must not replace the policy"
    );
    std::fs::write(&file, "[[rule]]\nid = \"everyone\"\neffect = \"allow\"\n").unwrap();
    assert!(wait_for(StatusCode::OK).await);
}

/// Patient sets follow the data: a patient who joins the organization
/// after the server started becomes visible within `refresh_secs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patient_sets_follow_the_store() {
    let w = world(4, None).await;
    let org = first_org(&w);
    let file = w.dir.join("org.toml");
    std::fs::write(
        &file,
        format!("[[rule]]\nid = \"org\"\neffect = \"allow\"\npatients = {{ organization = \"{org}\" }}\n"),
    )
    .unwrap();
    let config = test_config(file, 1);
    let state = AppState::open(w.lake.clone(), atlas_ontology::Ontology::builtin(), config)
        .await
        .unwrap();
    let token = jwt(json!({}));
    let read = |id: &'static str| {
        let state = state.clone();
        let token = token.clone();
        async move {
            call(
                &state,
                "GET",
                &format!("/fhir/Patient/{id}"),
                &token,
                None,
                None,
            )
            .await
            .0
        }
    };
    assert_eq!(read("newcomer").await, StatusCode::NOT_FOUND);
    // A new patient of that organization, and one of another.
    let data = w.dir.join("more");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("Patient.ndjson"),
        format!(
            "{}\n{}\n",
            json!({"resourceType": "Patient", "id": "newcomer", "managingOrganization": {"reference": org}}),
            json!({"resourceType": "Patient", "id": "elsewhere", "managingOrganization": {"reference": "Organization/other"}})
        ),
    )
    .unwrap();
    crate::objects::ingest_and_refresh(&w.lake, &data).await;
    let mut seen = false;
    for _ in 0..50 {
        if read("newcomer").await == StatusCode::OK {
            seen = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(
        seen,
        "the new patient of the organization never became visible"
    );
    assert_eq!(read("elsewhere").await, StatusCode::NOT_FOUND);
}

/// Every request leaves one chained record naming who asked, what, the
/// decision and its rules, rows answered and fields removed; the trail
/// verifies, and tampering with any one record is caught.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_audited_in_a_verifiable_chain() {
    let w = world(4, None).await;
    let state = w
        .server(
            "[[rule]]\nid = \"everyone\"\neffect = \"allow\"\npurpose = [\"TREAT\"]\n\
             [[rule]]\nid = \"no-obs\"\neffect = \"deny\"\ntypes = [\"Observation\"]\n\
             [[rule]]\nid = \"no-names\"\neffect = \"deny\"\nhide = [\"Patient.name\"]\n",
        )
        .await;
    // Issued for treatment and research: the header picks one.
    let token = jwt(json!({"sub": "auditee", "client_id": "notebook",
        "purpose_of_use": ["TREAT", "HRESCH"]}));
    let p = w.patients.keys().next().unwrap().clone();
    // (method, uri, purpose header, body, expected status)
    type Req<'a> = (&'a str, String, Option<&'a str>, Option<Json>, u16);
    let requests: Vec<Req> = vec![
        (
            "GET",
            format!("/fhir/Patient/{p}"),
            Some("TREAT"),
            None,
            200,
        ),
        (
            "GET",
            "/fhir/Patient?_count=2&gender=x".into(),
            Some("TREAT"),
            None,
            400,
        ),
        ("GET", "/fhir/Observation".into(), Some("TREAT"), None, 403),
        ("GET", "/fhir/Patient".into(), None, None, 403),
        (
            "POST",
            LOAD.into(),
            Some("TREAT"),
            Some(json!({"objectSet": {"type": "base", "objectType": "Patient"}})),
            200,
        ),
        (
            "GET",
            "/fhir/Patient?_format=ndjson".into(),
            Some("TREAT"),
            None,
            200,
        ),
    ];
    for (method, uri, purpose, body, want) in &requests {
        let (s, _) = call(&state, method, uri, &token, *purpose, body.as_ref()).await;
        assert_eq!(s.as_u16(), *want, "{uri}");
    }
    let (s, _) = call(&state, "GET", "/fhir/Patient", "not-a-token", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // GraphQL links load in tasks of their own; their decisions still count.
    let (s, r) = call_json(
        &state,
        "POST",
        "/graphql",
        &token,
        Some("TREAT"),
        Some(&json!({"query": "{ PatientAll(first: 10) { nodes { id conditions { id } } } }"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    // A body too large to hash is refused, and still recorded.
    let huge =
        json!({"objectSet": {"type": "base", "objectType": "Patient"}, "pad": "x".repeat(5 << 20)});
    let (s, e) = call_json(&state, "POST", LOAD, &token, Some("TREAT"), Some(&huge)).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{e}");

    let local = w.dir.join("lake");
    let store = atlas_audit::AuditStore::new(
        w.lake.object_store().clone(),
        &w.lake.path(""),
        Some(local.clone()),
    );
    let trail = atlas_audit::records(&store).await.unwrap();
    // A request slower than `start_record_after_ms` has a "started"
    // record too (checked in `audit_records_hold_the_facts_and_no_credentials`).
    let recs: Vec<atlas_audit::AuditRecord> = trail
        .iter()
        .filter(|r| r.entry.decision != "started")
        .cloned()
        .collect();
    // + the unauthenticated, GraphQL and too-large requests, + the stream's completion.
    assert_eq!(recs.len(), requests.len() + 4, "{recs:#?}");
    let by_path = |i: usize| &recs[i].entry;
    let read = by_path(0);
    assert_eq!(read.subject.as_deref(), Some("auditee"));
    assert_eq!(read.client.as_deref(), Some("notebook"));
    assert_eq!(read.purpose.as_deref(), Some("TREAT"));
    assert_eq!(
        (read.status, read.decision.as_str(), read.rows),
        (200, "allow", Some(1))
    );
    assert!(
        read.rules.contains(&"everyone".to_owned()) && read.rules.contains(&"no-names".to_owned()),
        "{read:?}"
    );
    assert_eq!(read.fields_removed, ["Patient.name"]);
    assert_eq!(
        (read.patients.clone(), read.patient_count),
        (vec![p.clone()], Some(1))
    );
    assert_eq!(read.resource_types, ["Patient"]);
    assert_eq!(by_path(1).decision, "invalid");
    assert_eq!(
        (by_path(2).decision.as_str(), by_path(2).rules.clone()),
        ("deny", vec!["no-obs".to_owned()])
    );
    assert_eq!(
        (by_path(3).decision.as_str(), by_path(3).rules.clone()),
        ("deny", vec!["everyone".to_owned()])
    );
    let load = by_path(4);
    assert_eq!(load.rows, Some(w.patients.len() as u64));
    let mut all: Vec<String> = w.patients.keys().cloned().collect();
    all.sort();
    assert_eq!(
        (load.patients.clone(), load.patient_count),
        (all, Some(w.patients.len() as u64))
    );
    assert_eq!(
        (by_path(2).patients.len(), by_path(2).patient_count),
        (0, Some(0))
    );
    assert!(load.query.starts_with("body=sha256:"), "{}", load.query);
    // A stream: one record before its first byte (rows not known yet), one
    // when its body has ended, with what it held.
    assert_eq!(by_path(5).rows, None, "the first record precedes the rows");
    let done = by_path(6);
    assert_eq!(
        (done.decision.as_str(), done.path.as_str(), done.rows),
        (
            "stream complete",
            "/fhir/Patient",
            Some(w.patients.len() as u64)
        )
    );
    assert_eq!(done.patient_count, Some(w.patients.len() as u64));
    assert_eq!(done.query_hash, by_path(5).query_hash);
    assert_eq!(
        (by_path(7).decision.as_str(), by_path(7).subject.clone()),
        ("unauthenticated", None)
    );
    let gql = by_path(8);
    assert_eq!(gql.resource_types, ["Condition", "Patient"], "{gql:?}");
    assert_eq!(gql.patient_count, Some(w.patients.len() as u64), "{gql:?}");
    let refused = by_path(9);
    assert_eq!(
        (refused.status, refused.decision.as_str()),
        (413, "invalid")
    );
    assert_eq!(refused.query, "body=too-large");
    // Equal requests share a query hash; different ones do not.
    assert_ne!(recs[0].entry.query_hash, recs[3].entry.query_hash);
    let report = atlas_audit::verify(&store).await.unwrap().unwrap();
    assert_eq!(report.records, trail.len() as u64);
    // AuditEvent export carries the agent and outcome.
    let ev = atlas_audit::audit_event(&recs[2]);
    assert_eq!(ev["outcome"], "4");
    assert_eq!(ev["agent"][0]["who"]["identifier"]["value"], "auditee");

    // A client that goes away mid-stream still leaves a record of what was sent.
    let req = Request::builder()
        .uri("/fhir/Patient?_format=ndjson&_sort=_id")
        .header("authorization", format!("Bearer {token}"))
        .header("x-purpose-of-use", "TREAT")
        .body(Body::empty())
        .unwrap();
    let response = router(state.clone()).oneshot(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body().into_data_stream();
    let first = futures::StreamExt::next(&mut body).await;
    assert!(matches!(first, Some(Ok(_))));
    drop(body);
    let mut aborted = None;
    for _ in 0..50 {
        let recs = atlas_audit::records(&store).await.unwrap();
        if let Some(r) = recs.last().filter(|r| r.entry.decision == "stream aborted") {
            aborted = Some(r.entry.clone());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let aborted = aborted.expect("an aborted stream is recorded");
    assert_eq!(aborted.path, "/fhir/Patient");
    assert!(aborted.rows.is_some_and(|n| n > 0), "{aborted:?}");
    assert!(atlas_audit::verify(&store).await.unwrap().is_ok());
}

/// A grant whose rule says `deid`: FHIR search and NDJSON answer
/// de-identified resources; every path that would take or give identified
/// values is a 403 `DeidentifiedOnly`; without a key, 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deid_grants_read_deidentified_fhir_only() {
    const KEY: &str = "egress-test-key";
    let w = world(6, None).await;
    let policy = w.dir.join("policy-deid.toml");
    std::fs::write(
        &policy,
        "[[rule]]\nid = \"registry\"\neffect = \"allow\"\ndeid = \"safe-harbor-minimal\"\n",
    )
    .unwrap();
    let key_file = w.dir.join("deid.key");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    let mut config = test_config(policy.clone(), 5);
    config.deid.key_file = Some(key_file);
    let state = AppState::open(w.lake.clone(), atlas_ontology::Ontology::builtin(), config)
        .await
        .unwrap();
    let engine = atlas_deid::Deidentifier::new(
        atlas_deid::profile::by_name("safe-harbor-minimal", KEY).unwrap(),
    );
    let token = jwt(json!({}));
    let hashed: BTreeMap<String, String> = w
        .patients
        .keys()
        .map(|p| (engine.hash(p), p.clone()))
        .collect();

    // Search: every patient, de-identified, under hashed ids and fullUrls.
    let (s, b) = call_json(
        &state,
        "GET",
        "/fhir/Patient?_count=100",
        &token,
        None,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let entries = b["entry"].as_array().unwrap();
    assert_eq!(entries.len(), w.patients.len());
    for e in entries {
        let r = &e["resource"];
        let id = r["id"].as_str().unwrap();
        let original = &w.patients[hashed.get(id).unwrap_or_else(|| panic!("{id} is no hash"))];
        assert!(
            e["fullUrl"]
                .as_str()
                .unwrap()
                .ends_with(&format!("/Patient/{id}"))
        );
        for gone in ["name", "telecom"] {
            assert!(r.get(gone).is_none(), "{gone} in {r}");
        }
        for i in r["identifier"].as_array().into_iter().flatten() {
            assert!(i.get("value").is_none(), "identifier value in {r}");
        }
        let family = original["name"][0]["family"].as_str().unwrap();
        assert!(!r.to_string().contains(family), "{family} in {r}");
        if let (Some(a), Some(b)) = (r["birthDate"].as_str(), original["birthDate"].as_str()) {
            assert_ne!(a, b, "birthDate kept");
        }
        let labels: Vec<&str> = r["meta"]["security"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["code"].as_str().unwrap())
            .collect();
        assert!(
            labels.contains(&"REDACTED") && labels.contains(&"CRYTOHASH"),
            "{labels:?}"
        );
    }
    // NDJSON: every observation, its subject a hashed patient.
    let (s, body) = call(
        &state,
        "GET",
        "/fhir/Observation?_format=ndjson",
        &token,
        None,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let lines: Vec<Json> = String::from_utf8(body)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), w.observations.len());
    for o in &lines {
        let subject = o["subject"]["reference"].as_str().unwrap();
        assert!(
            hashed.contains_key(subject.trim_start_matches("Patient/")),
            "{subject}"
        );
    }
    let code = lines[0]["code"]["coding"][0]["code"].as_str().unwrap();
    let (s, _) = call(
        &state,
        "GET",
        &format!("/fhir/Observation?code={code}"),
        &token,
        None,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "code is an allowed parameter");

    // Everything that takes or returns identified values: 403 DeidentifiedOnly.
    let p = w.patients.keys().next().unwrap();
    let o = w.observations.keys().next().unwrap();
    for uri in [
        format!("/fhir/Patient/{p}"),
        format!("/fhir/Observation/{o}"),
        format!("/fhir/Patient/{p}/$everything"),
        format!("/fhir/Observation?patient={p}"),
        format!("/fhir/Observation?_id={o}"),
        "/fhir/Observation?date=ge2000-01-01".to_string(),
        "/fhir/Observation?_sort=date".to_string(),
        "/api/v2/views/observation/rows".to_string(),
    ] {
        let (s, e) = call_json(&state, "GET", &uri, &token, None, None).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{uri}: {e}");
        assert!(e.to_string().contains("DeidentifiedOnly"), "{uri}: {e}");
    }
    for (uri, body) in [
        (
            LOAD,
            json!({"objectSet": {"type": "base", "objectType": "Patient"}}),
        ),
        (
            AGG,
            json!({"objectSet": {"type": "base", "objectType": "Observation"},
                     "aggregation": [{"type": "count", "name": "n"}]}),
        ),
    ] {
        let (s, e) = call_json(&state, "POST", uri, &token, None, Some(&body)).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{uri}: {e}");
        assert!(e.to_string().contains("DeidentifiedOnly"), "{uri}: {e}");
    }
    let (s, r) = call_json(
        &state,
        "POST",
        "/graphql",
        &token,
        None,
        Some(&json!({"query": "{ PatientAll(first: 5) { nodes { id } } }"})),
    )
    .await;
    assert_ne!(s, StatusCode::OK, "{r}");
    assert!(r.to_string().contains("DeidentifiedOnly"), "{r}");

    // No key: the grant fails closed.
    if std::env::var("ATLAS_DEID_KEY").is_err() {
        let state = AppState::open(
            w.lake.clone(),
            atlas_ontology::Ontology::builtin(),
            test_config(policy, 5),
        )
        .await
        .unwrap();
        let (s, e) = call_json(&state, "GET", "/fhir/Patient", &token, None, None).await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{e}");
    }
}

/// A request with any headers: (status, response headers, body).
async fn raw(
    state: &AppState,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: Option<&Json>,
) -> (StatusCode, axum::http::HeaderMap, String) {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
    let response = router(state.clone())
        .oneshot(req.body(body).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 28)
        .await
        .unwrap();
    (
        status,
        headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

/// Every audit record in the lake, from every server's chain.
pub(crate) async fn audit_records(w: &World) -> Vec<atlas_audit::AuditRecord> {
    let store = atlas_audit::AuditStore::new(
        w.lake.object_store().clone(),
        &w.lake.path(""),
        Some(w.dir.join("lake")),
    );
    atlas_audit::records(&store).await.unwrap()
}

/// The final records (not "started", not stream completions) of `sub`'s
/// requests, in order.
async fn records_of(w: &World, sub: &str) -> Vec<atlas_audit::AuditEntry> {
    let mut out: Vec<atlas_audit::AuditRecord> = audit_records(w)
        .await
        .into_iter()
        .filter(|r| r.entry.subject.as_deref() == Some(sub))
        .filter(|r| r.entry.decision != "started" && !r.entry.decision.starts_with("stream "))
        .collect();
    out.sort_by(|a, b| a.entry.time.cmp(&b.entry.time));
    out.into_iter().map(|r| r.entry).collect()
}

/// Issue 18, part 2: the `X-Purpose-Of-Use` header may narrow the
/// token's `purpose_of_use` claim to one of the purposes it lists, never
/// replace it; a token with no claim may use the header only where the
/// deployment allows it. Both values are in the audit record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purpose_header_narrows_the_claim_and_never_replaces_it() {
    let w = world(4, None).await;
    let policy = "[[rule]]\nid = \"treat-only\"\neffect = \"allow\"\npurpose = [\"TREAT\"]\n";
    let state = w.server(policy).await;
    let body = json!({"objectSet": {"type": "base", "objectType": "Patient"}});
    let load = |sub: &str, claim: Json, header: Option<&'static str>| {
        let token = jwt(json!({"sub": sub, "purpose_of_use": claim}));
        let state = state.clone();
        let body = body.clone();
        async move { call_json(&state, "POST", LOAD, &token, header, Some(&body)).await }
    };
    // The attack: a research token claims treatment by header.
    let (s, e) = load("research-1", json!("HRESCH"), Some("TREAT")).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{e}");
    let text = e.to_string();
    assert!(
        !text.contains("treat-only") && !text.contains("HRESCH"),
        "{e}"
    );
    let (s, _) = load("research-2", json!("HRESCH"), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // A token issued for both may pick one; without a pick it states none.
    let (s, e) = load("both-1", json!(["TREAT", "HRESCH"]), Some("TREAT")).await;
    assert_eq!(s, StatusCode::OK, "{e}");
    let (s, _) = load("both-2", json!("TREAT HRESCH"), Some("TREAT")).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = load("both-3", json!(["TREAT", "HRESCH"]), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = load("both-4", json!(["TREAT", "HRESCH"]), Some("ETREAT")).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // One purpose: the claim alone, or the header repeating it.
    let (s, _) = load("treat-1", json!("TREAT"), None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = load("treat-2", json!("TREAT"), Some("TREAT")).await;
    assert_eq!(s, StatusCode::OK);
    // No claim: the header is refused by default...
    let token = jwt(json!({"sub": "no-claim"}));
    let (s, _) = call_json(&state, "POST", LOAD, &token, Some("TREAT"), Some(&body)).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // ...and taken where the deployment says so.
    let open = w
        .server_with(policy, |c| c.auth.purpose_header_without_claim = true)
        .await;
    let token = jwt(json!({"sub": "no-claim-allowed"}));
    let (s, e) = call_json(&open, "POST", LOAD, &token, Some("TREAT"), Some(&body)).await;
    assert_eq!(s, StatusCode::OK, "{e}");
    // Even there a claim binds: the header cannot step outside it.
    let token = jwt(json!({"sub": "research-3", "purpose_of_use": "HRESCH"}));
    let (s, _) = call_json(&open, "POST", LOAD, &token, Some("TREAT"), Some(&body)).await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // The trail holds both values and the purpose in force.
    let r = &records_of(&w, "research-1").await[0];
    assert_eq!(r.purpose_claim, Some(vec!["HRESCH".to_owned()]), "{r:?}");
    assert_eq!(r.purpose_header.as_deref(), Some("TREAT"));
    assert_eq!(r.purpose.as_deref(), Some("HRESCH"), "{r:?}");
    assert_eq!(r.decision, "deny");
    assert!(
        r.reason.as_deref().is_some_and(|x| x.contains("TREAT")),
        "{r:?}"
    );
    let r = &records_of(&w, "both-1").await[0];
    assert_eq!(
        r.purpose_claim,
        Some(vec!["TREAT".to_owned(), "HRESCH".to_owned()])
    );
    assert_eq!(
        (r.purpose.as_deref(), r.purpose_header.as_deref()),
        (Some("TREAT"), Some("TREAT"))
    );
    let r = &records_of(&w, "no-claim").await[0];
    assert_eq!((r.purpose_claim.clone(), r.status), (None, 403), "{r:?}");
    assert_eq!(r.purpose_header.as_deref(), Some("TREAT"));
    let r = &records_of(&w, "treat-1").await[0];
    assert_eq!(
        (r.purpose.as_deref(), r.purpose_header.as_deref()),
        (Some("TREAT"), None)
    );
}

/// Issue 18, part 3: the audit trail holds no credential and holds the
/// facts: the token's patient binding, scopes and roles, why a 401 was
/// refused, out-of-scope lookups (still answered like a missing id),
/// patients of object and view streams, `null` patients for aggregates,
/// and a "started" record for requests still running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_records_hold_the_facts_and_no_credentials() {
    let w = world(4, None).await;
    let state = w
        .server("[[rule]]\nid = \"everyone\"\neffect = \"allow\"\n")
        .await;
    let mut ids: Vec<String> = w.patients.keys().cloned().collect();
    ids.sort();
    let (p1, p2) = (ids[0].clone(), ids[1].clone());

    // A live token in the URL: refused, and written nowhere.
    let live = jwt(json!({"sub": "url-token"}));
    let (s, h, _) = raw(
        &state,
        "GET",
        &format!("/fhir/Patient?access_token={live}"),
        &[],
        None,
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let challenge = h["www-authenticate"].to_str().unwrap();
    assert!(challenge.contains("invalid_request"), "{challenge}");
    // JWT-shaped values anywhere else in the request are not kept either.
    let other = jwt(json!({"sub": "elsewhere"}));
    let auth = format!("Bearer {}", jwt(json!({"sub": "carrier"})));
    for uri in [
        format!("/fhir/Patient?_id={other}"),
        format!("/fhir/Patient/{other}"),
    ] {
        raw(&state, "GET", &uri, &[("authorization", &auth)], None).await;
    }
    let mut trail = String::new();
    for e in walk(&w.dir.join("lake/audit")) {
        trail.push_str(&std::fs::read_to_string(e).unwrap_or_default());
    }
    assert!(!trail.is_empty());
    for secret in [&live, &other] {
        let sig = secret.rsplit('.').next().unwrap();
        assert!(!trail.contains(sig), "a token is in the audit trail");
    }
    assert!(trail.contains("redacted"), "{trail}");
    let url = audit_records(&w)
        .await
        .into_iter()
        .find(|r| r.entry.query.contains("access_token"))
        .unwrap()
        .entry;
    assert_eq!(url.decision, "unauthenticated");
    assert!(
        url.reason
            .as_deref()
            .is_some_and(|r| r.contains("access_token")),
        "{url:?}"
    );

    // Why a token was refused.
    let now = jsonwebtoken::get_current_timestamp() as i64;
    let expired = jwt(json!({"sub": "late", "exp": now - 3600}));
    let (s, _) = call(&state, "GET", "/fhir/Patient", &expired, None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let refused = audit_records(&w)
        .await
        .into_iter()
        .find(|r| r.entry.status == 401 && r.entry.query.is_empty())
        .unwrap()
        .entry;
    assert!(
        refused
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("expired")),
        "{refused:?}"
    );

    // The token's binding, scopes and roles; an out-of-scope lookup.
    let bound = jwt(
        json!({"sub": "bound", "patient": p1, "scope": "patient/*.rs launch",
        "roles": ["nurse"]}),
    );
    let (s, _) = call(
        &state,
        "GET",
        &format!("/fhir/Patient/{p1}"),
        &bound,
        None,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, outside) = call(
        &state,
        "GET",
        &format!("/fhir/Patient/{p2}"),
        &bound,
        None,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, missing) = call(
        &state,
        "GET",
        "/fhir/Patient/no-such-id",
        &bound,
        None,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // The client cannot tell the two apart.
    assert_eq!(
        String::from_utf8(outside).unwrap().replace(&p2, "ID"),
        String::from_utf8(missing)
            .unwrap()
            .replace("no-such-id", "ID")
    );
    let objects = format!("/api/v2/ontologies/atlas/objects/Patient/{p2}");
    let (s, _) = call(&state, "GET", &objects, &bound, None, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let everything = format!("/fhir/Patient/{p2}/$everything");
    let (s, _) = call(&state, "GET", &everything, &bound, None, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let recs = records_of(&w, "bound").await;
    assert_eq!(recs.len(), 5, "{recs:#?}");
    let own = &recs[0];
    assert_eq!(own.patient_binding.as_deref(), Some(p1.as_str()));
    assert_eq!(own.scopes, ["patient/*.rs", "launch"]);
    assert_eq!(own.roles, ["nurse"]);
    assert!(!own.out_of_scope);
    for r in [&recs[1], &recs[3], &recs[4]] {
        assert!(r.out_of_scope, "{r:?}");
        assert_eq!(
            (r.status, r.decision.as_str()),
            (404, "deny (out of scope)")
        );
    }
    assert!(!recs[2].out_of_scope, "a missing id is not out of scope");
    assert_eq!(recs[2].decision, "invalid");

    // Streams count their patients; aggregates do not count them (null).
    let admin = jwt(json!({"sub": "streamer"}));
    let obs = json!({"objectSet": {"type": "base", "objectType": "Observation"}});
    let with_obs: BTreeSet<&String> = w.observations.values().collect();
    let (s, _) = call(
        &state,
        "POST",
        &format!("{LOAD}?format=ndjson"),
        &admin,
        None,
        Some(&obs),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = call(
        &state,
        "POST",
        &format!("{LOAD}?format=arrow"),
        &admin,
        None,
        Some(&obs),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = call(
        &state,
        "GET",
        "/api/v2/views/observation/rows",
        &admin,
        None,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let agg =
        json!({"objectSet": obs["objectSet"], "aggregation": [{"type": "count", "name": "n"}]});
    let (s, _) = call(&state, "POST", AGG, &admin, None, Some(&agg)).await;
    assert_eq!(s, StatusCode::OK);
    let all = audit_records(&w).await;
    let done: Vec<&atlas_audit::AuditEntry> = all
        .iter()
        .map(|r| &r.entry)
        .filter(|e| e.subject.as_deref() == Some("streamer") && e.decision == "stream complete")
        .collect();
    assert_eq!(done.len(), 3, "{done:#?}");
    for e in &done {
        assert_eq!(e.rows, Some(w.observations.len() as u64), "{e:?}");
        assert_eq!(
            e.patient_count,
            Some(with_obs.len() as u64),
            "{} {}: {e:?}",
            e.path,
            e.query
        );
    }
    let agg = records_of(&w, "streamer").await.pop().unwrap();
    assert_eq!(agg.path, AGG);
    assert_eq!(
        (agg.patient_count, agg.patients.len()),
        (None, 0),
        "{agg:?}"
    );

    // A request still running leaves a "started" record first (every
    // request here, with the threshold at 0), paired by request id.
    let eager = w
        .server_with("[[rule]]\nid = \"everyone\"\neffect = \"allow\"\n", |c| {
            c.audit.start_record_after_ms = 0
        })
        .await;
    let token = jwt(json!({"sub": "starter"}));
    let (s, _) = call(
        &eager,
        "GET",
        &format!("/fhir/Patient/{p1}"),
        &token,
        None,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let all = audit_records(&w).await;
    let id = all
        .iter()
        .find(|r| r.entry.subject.as_deref() == Some("starter") && r.entry.status == 200)
        .and_then(|r| r.entry.request_id.clone())
        .expect("the final record has a request id");
    let mine: Vec<&atlas_audit::AuditRecord> = all
        .iter()
        .filter(|r| r.entry.request_id.as_deref() == Some(id.as_str()))
        .collect();
    assert_eq!(mine.len(), 2, "{mine:#?}");
    let (start, end) = (&mine[0].entry, &mine[1].entry);
    assert!(mine[0].seq < mine[1].seq);
    assert_eq!(
        (start.decision.as_str(), start.status, start.rows),
        ("started", 0, None)
    );
    assert_eq!((end.decision.as_str(), end.status), ("allow", 200));
    assert!(start.request_id.is_some());
    assert_eq!(start.request_id, end.request_id);
    assert_eq!(start.path, end.path);
    let store = atlas_audit::AuditStore::new(
        w.lake.object_store().clone(),
        &w.lake.path(""),
        Some(w.dir.join("lake")),
    );
    assert!(atlas_audit::verify(&store).await.unwrap().is_ok());
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Issue 18, part 4: answers with patient data are not cacheable or
/// sniffable; refusals are short and generic (401 with a Bearer
/// challenge, 403 without rule ids or purposes); links come from the
/// configured base URL, whatever `Host` says; `/health` keeps the lake's
/// location to token holders; impossible dates are a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_private_refusals_generic_and_links_configured() {
    let w = world(4, None).await;
    let policy = "[[rule]]\nid = \"everyone\"\neffect = \"allow\"\ntypes = [\"Patient\", \"Encounter\", \"Observation\"]\n\
                  [[rule]]\nid = \"secret-obs-rule\"\neffect = \"deny\"\ntypes = [\"Observation\"]\n\
                  [[rule]]\nid = \"research-only\"\neffect = \"allow\"\ntypes = [\"Condition\"]\npurpose = [\"HRESCH\"]\n";
    let state = w
        .server_with(policy, |c| {
            c.public_base_url = Some("https://fhir.example.org/".into())
        })
        .await;
    let token = jwt(json!({}));
    let auth = format!("Bearer {token}");
    let p = w.patients.keys().next().unwrap().clone();

    // Patient data: no-store, nosniff.
    for uri in [
        format!("/fhir/Patient/{p}"),
        "/fhir/Patient".to_owned(),
        "/fhir/Patient?_format=ndjson".to_owned(),
        "/api/v2/ontologies/atlas/objects/Patient".to_owned(),
    ] {
        let (s, h, _) = raw(&state, "GET", &uri, &[("authorization", &auth)], None).await;
        assert_eq!(s, StatusCode::OK, "{uri}");
        assert_eq!(h["cache-control"], "no-store", "{uri}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{uri}");
    }

    // 401: a Bearer challenge with the error code, one short body for
    // every reason, no parser internals.
    let none = format!(
        "{}.{}.",
        base64_url(&json!({"alg": "none", "typ": "JWT"}).to_string()),
        token.split('.').nth(1).unwrap()
    );
    let mut bodies = BTreeSet::new();
    for bad in [
        none.as_str(),
        "a.b.c",
        &jwt(json!({"exp": 1000})),
        &jwt(json!({"iss": "https://evil.example"})),
    ] {
        for uri in ["/fhir/Patient", "/api/v2/ontologies/atlas/objects/Patient"] {
            let (s, h, body) = raw(
                &state,
                "GET",
                uri,
                &[("authorization", &format!("Bearer {bad}"))],
                None,
            )
            .await;
            assert_eq!(s, StatusCode::UNAUTHORIZED, "{bad}");
            let c = h["www-authenticate"].to_str().unwrap();
            assert!(
                c.starts_with("Bearer ") && c.contains("error=\"invalid_token\""),
                "{c}"
            );
            for leak in ["variant", "none", "evil", "expired", "signature", "kid"] {
                assert!(!body.contains(leak), "{leak} in {body}");
            }
            bodies.insert((uri, body));
        }
    }
    assert_eq!(bodies.len(), 2, "one body per API shape: {bodies:#?}");
    let (s, h, _) = raw(&state, "GET", "/fhir/Patient", &[], None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(
        h["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );

    // 403: no rule id, no purpose that would pass.
    for (uri, hidden) in [
        ("/fhir/Observation", "secret-obs-rule"),
        ("/fhir/Condition", "HRESCH"),
        ("/api/v2/views/observation/rows", "secret-obs-rule"),
    ] {
        let (s, _, body) = raw(&state, "GET", uri, &[("authorization", &auth)], None).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{uri}");
        assert!(!body.contains(hidden), "{uri}: {body}");
        assert!(!body.contains("rule"), "{uri}: {body}");
    }
    let obs = json!({"objectSet": {"type": "base", "objectType": "Condition"}});
    let (s, _, body) = raw(
        &state,
        "POST",
        LOAD,
        &[("authorization", &auth)],
        Some(&obs),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(
        !body.contains("HRESCH") && !body.contains("research-only"),
        "{body}"
    );

    // Links from the configured base; a forged Host changes nothing.
    for host in ["evil.example", "fhir.example.org"] {
        let (s, _, body) = raw(
            &state,
            "GET",
            "/fhir/Patient?_count=1",
            &[("authorization", &auth), ("host", host)],
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let b: Json = serde_json::from_str(&body).unwrap();
        for l in b["link"].as_array().unwrap() {
            let url = l["url"].as_str().unwrap();
            assert!(
                url.starts_with("https://fhir.example.org/fhir/Patient?"),
                "{url}"
            );
        }
        let full = b["entry"][0]["fullUrl"].as_str().unwrap();
        assert!(
            full.starts_with("https://fhir.example.org/fhir/Patient/"),
            "{full}"
        );
        assert!(!body.contains("evil"), "{body}");
    }
    let (_, _, meta) = raw(
        &state,
        "GET",
        "/fhir/metadata",
        &[("host", "evil.example")],
        None,
    )
    .await;
    let meta: Json = serde_json::from_str(&meta).unwrap();
    assert_eq!(
        meta["implementation"]["url"],
        "https://fhir.example.org/fhir"
    );
    // Without a configured base: the bind address, still not the Host.
    let plain = w.server(policy).await;
    let (_, _, body) = raw(
        &plain,
        "GET",
        "/fhir/Patient?_count=1",
        &[("authorization", &auth), ("host", "evil.example")],
        None,
    )
    .await;
    assert!(
        !body.contains("evil") && body.contains("http://127.0.0.1:8080/fhir/"),
        "{body}"
    );
    assert!(
        atlas_serve::ServeConfig::from_toml("public_base_url = \"javascript:alert(1)\"").is_err()
    );

    // /health: the lake's location only with a token.
    let lake_path = w.dir.join("lake").display().to_string();
    let (s, _, body) = raw(&state, "GET", "/health", &[], None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(body.contains("\"readable\":true"), "{body}");
    assert!(
        !body.contains(&lake_path) && !body.contains("location"),
        "{body}"
    );
    let (_, _, body) = raw(&state, "GET", "/health", &[("authorization", &auth)], None).await;
    assert!(body.contains("location"), "{body}");

    // Impossible dates are refused, not read as strings.
    for bad in ["2020-13-45", "2020-02-30", "2020-13"] {
        let uri = format!("/api/v2/ontologies/atlas/objects/Encounter?dateFrom={bad}");
        let (s, _, body) = raw(&state, "GET", &uri, &[("authorization", &auth)], None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {body}");
        let (s, _, _) = raw(
            &state,
            "POST",
            &format!("{LOAD}?dateTo={bad}"),
            &[("authorization", &auth)],
            Some(&json!({"objectSet": {"type": "base", "objectType": "Encounter"}})),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}");
    }
    let uri = "/api/v2/ontologies/atlas/objects/Encounter?dateFrom=2020-02-29";
    let (s, _, _) = raw(&state, "GET", uri, &[("authorization", &auth)], None).await;
    assert_eq!(s, StatusCode::OK);
}

fn base64_url(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

/// Key files inside the lake (the dev issuer's key, the page-token key)
/// are written 0600, and keys others can read are named for a warning.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_files_are_private_and_exposed_ones_are_named() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::open(
        dir.path().join("lake").to_str().unwrap(),
        Default::default(),
    )
    .unwrap();
    let mut config = ServeConfig::default();
    config.auth.dev = true;
    let _state = AppState::open(lake.clone(), atlas_ontology::Ontology::builtin(), config)
        .await
        .unwrap();
    let root = dir.path().join("lake");
    let keys = [
        root.join("_atlas/auth/dev-issuer-es256.pk8"),
        root.join("_atlas/serve/page-token.key"),
    ];
    for k in &keys {
        let mode = std::fs::metadata(k).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}: {mode:o}", k.display());
    }
    assert!(atlas_serve::auth::exposed_key_files(&lake).is_empty());
    for k in &keys {
        std::fs::set_permissions(k, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let warnings = atlas_serve::auth::exposed_key_files(&lake);
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings.iter().all(|w| w.contains("644")), "{warnings:?}");
    // The keys still work, and tokens minted before still verify.
    let again = AppState::open(lake.clone(), atlas_ontology::Ontology::builtin(), {
        let mut c = ServeConfig::default();
        c.auth.dev = true;
        c
    })
    .await;
    assert!(again.is_ok());
}
