//! Configured token issuers: a JWKS file (RS256, RS384) and a JWKS URL
//! (ES384) that is refetched, so a rotated-out key stops working. The keys
//! are test-only keys made with openssl (`keys/README.md`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use tower::ServiceExt;

use atlas_serve::{AppState, IssuerConfig, ServeConfig, router};

fn keys_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/keys")
}

fn token(alg: Algorithm, kid: &str, pem: &str, iss: &str, aud: &str, exp_in: i64) -> String {
    let now = jsonwebtoken::get_current_timestamp() as i64;
    let claims = json!({"iss": iss, "sub": "svc", "aud": aud, "exp": now + exp_in,
        "scope": "system/*.rs"});
    let key = match alg {
        Algorithm::RS256 | Algorithm::RS384 => EncodingKey::from_rsa_pem(pem.as_bytes()),
        _ => EncodingKey::from_ec_pem(pem.as_bytes()),
    }
    .unwrap();
    let mut header = Header::new(alg);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

/// 200 when the token is accepted (the lake has views), else the status.
async fn status(state: &AppState, token: &str) -> StatusCode {
    let req = Request::builder()
        .uri("/api/v2/ontologies/atlas/objects/Patient?pageSize=1")
        .header("authorization", format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap();
    router(state.clone()).oneshot(req).await.unwrap().status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_file_and_url_issuers_verify_and_rotate() {
    let f = crate::objects::small_lake(2).await;
    let rsa = std::fs::read_to_string(keys_dir().join("rsa-test.pem")).unwrap();
    let ec = std::fs::read_to_string(keys_dir().join("ec384-test.pem")).unwrap();
    let ec_jwks = std::fs::read_to_string(keys_dir().join("ec384-jwks.json")).unwrap();
    let rsa_jwks = std::fs::read_to_string(keys_dir().join("rsa-jwks.json")).unwrap();

    // A JWKS endpoint whose content the test can change.
    let served = Arc::new(Mutex::new(ec_jwks));
    let s2 = served.clone();
    let app = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let s = s2.clone();
            async move { s.lock().unwrap().clone() }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let mut config = ServeConfig::default();
    config.auth.issuers = vec![
        IssuerConfig {
            issuer: "https://idp.example/a".into(),
            audience: "atlas".into(),
            jwks_file: Some(keys_dir().join("rsa-jwks.json")),
            jwks_url: None,
            jwks_refresh_secs: 900,
        },
        IssuerConfig {
            issuer: "https://idp.example/b".into(),
            audience: "atlas-b".into(),
            jwks_file: None,
            jwks_url: Some(format!("http://{addr}/jwks.json")),
            jwks_refresh_secs: 1,
        },
    ];
    let state = AppState::open(f.lake.clone(), atlas_ontology::Ontology::builtin(), config)
        .await
        .unwrap();
    let (a, b) = ("https://idp.example/a", "https://idp.example/b");

    assert_eq!(
        status(
            &state,
            &token(Algorithm::RS256, "rsa-1", &rsa, a, "atlas", 300)
        )
        .await,
        StatusCode::OK
    );
    assert_eq!(
        status(
            &state,
            &token(Algorithm::RS384, "rsa-1", &rsa, a, "atlas", 300)
        )
        .await,
        StatusCode::OK
    );
    let es384 = token(Algorithm::ES384, "ec-1", &ec, b, "atlas-b", 300);
    assert_eq!(status(&state, &es384).await, StatusCode::OK);
    // Refused: another issuer's key, the wrong audience, an unknown kid,
    // expired (past the 60 s leeway), the dev issuer (not enabled).
    for bad in [
        token(Algorithm::ES384, "ec-1", &ec, a, "atlas", 300),
        token(Algorithm::RS256, "rsa-1", &rsa, a, "atlas-b", 300),
        token(Algorithm::RS256, "rsa-2", &rsa, a, "atlas", 300),
        token(Algorithm::RS256, "rsa-1", &rsa, a, "atlas", -120),
    ] {
        assert_eq!(
            status(&state, &bad).await,
            StatusCode::UNAUTHORIZED,
            "{bad}"
        );
    }

    // The issuer rotates its keys: once the JWKS is refetched, the old EC
    // key (and tokens already verified with it) stop working.
    *served.lock().unwrap() = rsa_jwks;
    let mut refused = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if status(&state, &es384).await == StatusCode::UNAUTHORIZED {
            refused = true;
            break;
        }
    }
    assert!(refused, "the rotated-out key is still accepted");
    assert_eq!(
        status(
            &state,
            &token(Algorithm::RS256, "rsa-1", &rsa, b, "atlas-b", 300)
        )
        .await,
        StatusCode::OK,
        "the issuer's new key works"
    );

    // A JWKS URL that is not https (and not loopback) is refused at start.
    let mut config = ServeConfig::default();
    config.auth.issuers = vec![IssuerConfig {
        issuer: "x".into(),
        audience: "atlas".into(),
        jwks_file: None,
        jwks_url: Some("http://idp.example/jwks.json".into()),
        jwks_refresh_secs: 900,
    }];
    let err = AppState::open(f.lake.clone(), atlas_ontology::Ontology::builtin(), config)
        .await
        .err()
        .unwrap();
    assert!(err.contains("https"), "{err}");
}
