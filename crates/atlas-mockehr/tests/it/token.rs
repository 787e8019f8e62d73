//! SMART Backend Services: good assertions get tokens; every way an
//! assertion can be wrong gets `invalid_client` (or the OAuth error the
//! case calls for); bearer tokens expire and are scoped.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};

use atlas_mockehr::{ClientRegistration, MockEhr};

use crate::{CLIENT, Mock, TestKey, b64, now_secs};

#[tokio::test]
async fn good_assertions_get_tokens_es384_and_rs384() {
    let mock = Mock::start(1, |_| {}).await;
    let (status, body) = mock
        .token_request(
            &mock.key.sign(
                mock.key.header(),
                &TestKey::claims(&mock.running.token_url, 290),
            ),
            "system/*.read system/Patient.rs patient/*.rs",
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["token_type"], "bearer");
    assert_eq!(body["expires_in"], 300);
    // v1 and v2 system scopes are granted; a patient scope is not allowed.
    assert_eq!(body["scope"], "system/*.read system/Patient.rs");

    // RS384, through a client registered with a jku allow-list.
    let rsa = TestKey::rs384("rsa-key");
    let mut config = crate::config(&rsa);
    config.clients[0].jku = Some("https://client.example/jwks.json".into());
    let ehr = MockEhr::from_resources(crate::resources(1), config).unwrap();
    let running = ehr.start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let other = Mock { running, ..mock };
    let mut header = rsa.header();
    header.jku = Some("https://client.example/jwks.json".into());
    let (status, body) = other
        .token_request(
            &rsa.sign(header, &TestKey::claims(&other.running.token_url, 60)),
            "system/*.rs",
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut header = rsa.header();
    header.jku = Some("https://evil.example/jwks.json".into());
    let (status, body) = other
        .token_request(
            &rsa.sign(header, &TestKey::claims(&other.running.token_url, 60)),
            "system/*.rs",
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_client"))
    );
}

/// `header.claims.` with no signature (`alg: none`).
fn unsigned(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}.",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    )
}

#[tokio::test]
async fn bad_assertions_are_refused() {
    let mock = Mock::start(1, |_| {}).await;
    let aud = mock.running.token_url.clone();
    let key = &mock.key;
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = TestKey::claims(&aud, 60);
        f(&mut c);
        key.sign(key.header(), &c)
    };
    let reused = TestKey::claims(&aud, 60);
    let first = key.sign(key.header(), &reused);
    assert_eq!(
        mock.token_request(&first, "system/*.rs").await.0,
        StatusCode::OK
    );
    let other_key = TestKey::es384("test-key");
    let mut no_typ = key.header();
    no_typ.typ = None;
    let mut unknown_kid = key.header();
    unknown_kid.kid = Some("nope".into());
    let cases: Vec<(&str, String)> = vec![
        (
            "wrong aud",
            with(&|c| c["aud"] = json!("https://elsewhere.example/token")),
        ),
        ("reused jti", key.sign(key.header(), &reused)),
        ("expired", with(&|c| c["exp"] = json!(now_secs() - 10))),
        ("exp too far", with(&|c| c["exp"] = json!(now_secs() + 900))),
        (
            "no exp",
            with(&|c| drop(c.as_object_mut().unwrap().remove("exp"))),
        ),
        (
            "no jti",
            with(&|c| drop(c.as_object_mut().unwrap().remove("jti"))),
        ),
        ("sub differs", with(&|c| c["sub"] = json!("someone"))),
        (
            "unknown client",
            with(&|c| {
                c["iss"] = json!("stranger");
                c["sub"] = json!("stranger");
            }),
        ),
        (
            "unknown kid",
            key.sign(unknown_kid, &TestKey::claims(&aud, 60)),
        ),
        ("no typ", key.sign(no_typ, &TestKey::claims(&aud, 60))),
        (
            "wrong key",
            other_key.sign(other_key.header(), &TestKey::claims(&aud, 60)),
        ),
        (
            "HS256",
            jsonwebtoken::encode(
                &Header {
                    kid: Some("test-key".into()),
                    ..Header::new(Algorithm::HS256)
                },
                &TestKey::claims(&aud, 60),
                &EncodingKey::from_secret(b"secret"),
            )
            .unwrap(),
        ),
        (
            "none",
            unsigned(
                &json!({"alg": "none", "typ": "JWT", "kid": "test-key"}),
                &TestKey::claims(&aud, 60),
            ),
        ),
        ("garbage", "not.a.jwt".into()),
    ];
    for (case, assertion) in cases {
        let (status, body) = mock.token_request(&assertion, "system/*.rs").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{case}: {body}");
        assert_eq!(body["error"], "invalid_client", "{case}");
    }
    let good = key.sign(key.header(), &TestKey::claims(&aud, 60));
    let (status, body) = mock.token_request(&good, "system/*.write").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_scope"))
    );
    let r = mock
        .http
        .post(&mock.running.token_url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=password")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "unsupported_grant_type"
    );
}

#[tokio::test]
async fn bearer_tokens_expire_and_are_scoped() {
    let mut mock = Mock::start(2, |c| c.token_ttl_secs = 1).await;
    assert_eq!(mock.get("/Patient").await.status(), StatusCode::OK);
    let anonymous = mock
        .http
        .get(format!("{}/Patient", mock.running.fhir_base))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    assert!(anonymous.headers().contains_key("www-authenticate"));
    // Discovery needs no token.
    let r = mock
        .http
        .get(format!("{}/metadata", mock.running.fhir_base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    mock.token = mock.new_token("system/Patient.rs").await;
    assert_eq!(mock.get("/Patient").await.status(), StatusCode::OK);
    assert_eq!(
        mock.get("/Observation").await.status(),
        StatusCode::FORBIDDEN
    );
    let manifest = mock.export("/$export").await;
    let types: Vec<&str> = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["Patient"]);

    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(
        mock.get("/Patient").await.status(),
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn clients_register_from_toml_with_jwks_text() {
    let key = TestKey::es384("k1");
    let toml = format!(
        "manifest = \"stu4\"\n[[clients]]\nclient_id = \"{CLIENT}\"\njwks = '''{}'''\n",
        key.jwks()
    );
    let config = atlas_mockehr::MockConfig::from_toml(&toml).unwrap();
    assert_eq!(config.clients[0].scopes, vec!["system/*.rs"]);
    assert!(MockEhr::from_resources(vec![], config).is_ok());
    let bad = atlas_mockehr::MockConfig {
        clients: vec![ClientRegistration {
            client_id: "x".into(),
            jwks: json!({"keys": "no"}),
            scopes: vec![],
            jku: None,
        }],
        ..Default::default()
    };
    assert!(MockEhr::from_resources(vec![], bad).is_err());
}
