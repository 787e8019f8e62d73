//! Integration tests for the mock EHR (one test binary for the crate):
//! each test starts a mock on loopback port 0, signs client assertions
//! with a key it generates, and talks HTTP to it with reqwest.

use std::collections::BTreeSet;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};

use atlas_mockehr::{ClientRegistration, MockConfig, MockEhr, RunningMock};

mod export;
mod faults;
mod rest;
mod token;

pub const CLIENT: &str = "test-client";

/// A signing key generated for the test, and its public JWK.
pub struct TestKey {
    pub kid: String,
    pub alg: Algorithm,
    pub encoding: EncodingKey,
    pub jwk: Value,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl TestKey {
    pub fn es384(kid: &str) -> TestKey {
        use p384::elliptic_curve::sec1::ToEncodedPoint;
        use p384::pkcs8::{EncodePrivateKey, LineEnding};
        let secret = p384::SecretKey::random(&mut rand::rngs::OsRng);
        let pem = secret.to_pkcs8_pem(LineEnding::LF).unwrap();
        let point = secret.public_key().to_encoded_point(false);
        TestKey {
            kid: kid.into(),
            alg: Algorithm::ES384,
            encoding: EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
            jwk: json!({
                "kty": "EC", "crv": "P-384", "kid": kid, "alg": "ES384", "use": "sig",
                "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap())
            }),
        }
    }

    pub fn rs384(kid: &str) -> TestKey {
        use rsa::pkcs1::{EncodeRsaPrivateKey, LineEnding};
        use rsa::traits::PublicKeyParts;
        let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
        let pem = key.to_pkcs1_pem(LineEnding::LF).unwrap();
        TestKey {
            kid: kid.into(),
            alg: Algorithm::RS384,
            encoding: EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
            jwk: json!({
                "kty": "RSA", "kid": kid, "alg": "RS384", "use": "sig",
                "n": b64(&key.n().to_bytes_be()), "e": b64(&key.e().to_bytes_be())
            }),
        }
    }

    pub fn jwks(&self) -> Value {
        json!({"keys": [self.jwk.clone()]})
    }

    /// A client assertion with these claims, signed with this key.
    pub fn sign(&self, header: Header, claims: &Value) -> String {
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }

    pub fn header(&self) -> Header {
        let mut h = Header::new(self.alg);
        h.kid = Some(self.kid.clone());
        h
    }

    /// Good claims for `aud`, expiring in `ttl` seconds.
    pub fn claims(aud: &str, ttl: i64) -> Value {
        json!({
            "iss": CLIENT, "sub": CLIENT, "aud": aud,
            "exp": now_secs() + ttl,
            "jti": format!("jti-{}", rand::random::<u64>()),
        })
    }
}

pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Two patients' worth of records per `n`: Patients, Observations with
/// LOINC codes, Conditions, Encounters, and one Organization outside
/// every compartment.
pub fn resources(n: usize) -> Vec<Value> {
    let mut out =
        vec![json!({"resourceType": "Organization", "id": "org1", "name": "Mock Hospital"})];
    for i in 0..n {
        let subject = json!({"reference": format!("Patient/p{i}")});
        out.push(json!({"resourceType": "Patient", "id": format!("p{i}"), "gender": if i % 2 == 0 {"female"} else {"male"}, "name": [{"family": format!("Doe{i}")}]}));
        for j in 0..3 {
            let code = if j == 0 { "8867-4" } else { "29463-7" };
            out.push(json!({
                "resourceType": "Observation", "id": format!("o{i}-{j}"), "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                "subject": subject, "valueQuantity": {"value": 70 + j}
            }));
        }
        out.push(json!({"resourceType": "Condition", "id": format!("c{i}"), "subject": subject}));
        out.push(json!({"resourceType": "Encounter", "id": format!("e{i}"), "status": "finished", "subject": subject}));
    }
    out
}

/// A quick configuration: one registered client, one 202 before the
/// manifest, no waiting between polls.
pub fn config(key: &TestKey) -> MockConfig {
    MockConfig {
        clients: vec![ClientRegistration {
            client_id: CLIENT.into(),
            jwks: key.jwks(),
            scopes: vec!["system/*.rs".into()],
            jku: None,
        }],
        export_delay_polls: 1,
        retry_after_secs: 0,
        ..MockConfig::default()
    }
}

/// A running mock, a client and a token.
pub struct Mock {
    pub running: RunningMock,
    pub http: reqwest::Client,
    pub key: TestKey,
    pub token: String,
}

impl Mock {
    pub async fn start(patients: usize, tweak: impl FnOnce(&mut MockConfig)) -> Mock {
        let key = TestKey::es384("test-key");
        let mut config = config(&key);
        tweak(&mut config);
        let ehr = MockEhr::from_resources(resources(patients), config).unwrap();
        let running = ehr.start("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let mut mock = Mock {
            running,
            http,
            key,
            token: String::new(),
        };
        if mock.running.ehr.config().require_auth {
            mock.token = mock.new_token("system/*.rs").await;
        }
        mock
    }

    pub fn ehr(&self) -> &MockEhr {
        &self.running.ehr
    }

    /// Posts a token request with `assertion`; status and JSON body.
    pub async fn token_request(&self, assertion: &str, scope: &str) -> (StatusCode, Value) {
        let form = [
            ("grant_type", "client_credentials"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion),
            ("scope", scope),
        ];
        let body = url_encode(&form);
        let r = self
            .http
            .post(&self.running.token_url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        (status, r.json().await.unwrap())
    }

    pub async fn new_token(&self, scope: &str) -> String {
        let assertion = self.key.sign(
            self.key.header(),
            &TestKey::claims(&self.running.token_url, 120),
        );
        let (status, body) = self.token_request(&assertion, scope).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["access_token"].as_str().unwrap().to_string()
    }

    /// `GET base + path` with the token.
    pub async fn get(&self, url: &str) -> reqwest::Response {
        let url = if url.starts_with("http") {
            url.to_string()
        } else {
            format!("{}{url}", self.running.fhir_base)
        };
        self.http
            .get(url)
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap()
    }

    pub async fn get_json(&self, url: &str) -> Value {
        let r = self.get(url).await;
        assert_eq!(r.status(), StatusCode::OK, "{url}");
        r.json().await.unwrap()
    }

    /// A GET kick-off of `path` (below the FHIR base, with its query).
    pub async fn kickoff(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.running.fhir_base))
            .bearer_auth(&self.token)
            .header("accept", "application/fhir+json")
            .header("prefer", "respond-async")
            .send()
            .await
            .unwrap()
    }

    /// Polls a status URL until it is no longer 202.
    pub async fn poll(&self, status_url: &str) -> reqwest::Response {
        for _ in 0..50 {
            let r = self.get(status_url).await;
            if r.status() != StatusCode::ACCEPTED {
                return r;
            }
            assert!(r.headers()["x-progress"].len() < 100);
            assert_eq!(r.headers()["retry-after"], "0");
        }
        panic!("the export never finished");
    }

    /// Kick-off, poll, manifest.
    pub async fn export(&self, path: &str) -> Value {
        let r = self.kickoff(path).await;
        assert_eq!(
            r.status(),
            StatusCode::ACCEPTED,
            "{}",
            r.text().await.unwrap()
        );
        let status_url = r.headers()["content-location"]
            .to_str()
            .unwrap()
            .to_string();
        let r = self.poll(&status_url).await;
        assert_eq!(r.status(), StatusCode::OK);
        r.json().await.unwrap()
    }

    /// The parsed lines of one file.
    pub async fn download(&self, url: &str) -> Vec<Value> {
        let r = self.get(url).await;
        assert_eq!(r.status(), StatusCode::OK, "{url}");
        assert_eq!(r.headers()["content-type"], "application/fhir+ndjson");
        let text = r.text().await.unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Every resource of the manifest's `output` files (one page).
    pub async fn outputs(&self, manifest: &Value) -> Vec<Value> {
        let mut all = Vec::new();
        for o in manifest["output"].as_array().unwrap() {
            all.extend(self.download(o["url"].as_str().unwrap()).await);
        }
        all
    }
}

pub fn url_encode(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

pub fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `Type/id` of each resource.
pub fn keys(resources: &[Value]) -> BTreeSet<(String, String)> {
    resources
        .iter()
        .map(|r| {
            (
                r["resourceType"].as_str().unwrap().to_string(),
                r["id"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}
