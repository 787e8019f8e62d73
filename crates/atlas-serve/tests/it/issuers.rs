//! Configured token issuers: a JWKS file (RS256, RS384) and a JWKS URL
//! (ES384) that is refetched, so a rotated-out key stops working. The keys
//! are test-only keys made with openssl (`keys/README.md`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value as Json, json};
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
    // ECDSA signers may write a high s, which the server refuses: send
    // the low twin, as a conforming issuer does.
    atlas_serve::auth::to_low_s(&jsonwebtoken::encode(&header, &claims, &key).unwrap())
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
    // expired (past the 30 s leeway), the dev issuer (not enabled).
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

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// A server on `lake` trusting the test RSA key (`rsa-jwks.json`, or
/// `jwks` when given) and the lake's dev issuer, with `leeway` seconds.
async fn server(lake: &atlas_lake::Lake, jwks: Option<&std::path::Path>, leeway: u64) -> AppState {
    let mut config = ServeConfig::default();
    config.auth.dev = true;
    config.auth.leeway_secs = leeway;
    config.auth.issuers = vec![IssuerConfig {
        issuer: "https://idp.example/a".into(),
        audience: "atlas".into(),
        jwks_file: Some(jwks.map_or_else(|| keys_dir().join("rsa-jwks.json"), |p| p.to_path_buf())),
        jwks_url: None,
        jwks_refresh_secs: 900,
    }];
    AppState::open(lake.clone(), atlas_ontology::Ontology::builtin(), config)
        .await
        .unwrap()
}

/// The clock leeway is 30 s by default, configurable, and never more: a
/// token 45 s past its `exp` is refused (60 s were allowed before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_leeway_is_at_most_30_seconds() {
    let f = crate::objects::small_lake(2).await;
    let rsa = std::fs::read_to_string(keys_dir().join("rsa-test.pem")).unwrap();
    let a = "https://idp.example/a";
    let state = server(&f.lake, None, 30).await;
    let past = |secs: i64| token(Algorithm::RS256, "rsa-1", &rsa, a, "atlas", -secs);
    assert_eq!(
        status(&state, &past(10)).await,
        StatusCode::OK,
        "within the leeway"
    );
    assert_eq!(status(&state, &past(45)).await, StatusCode::UNAUTHORIZED);
    // Not yet valid by more than the leeway.
    let now = jsonwebtoken::get_current_timestamp();
    let claims = json!({"iss": a, "sub": "svc", "aud": "atlas", "exp": now + 600, "nbf": now + 45,
        "scope": "system/*.rs"});
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-1".into());
    let early = jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_rsa_pem(rsa.as_bytes()).unwrap(),
    )
    .unwrap();
    assert_eq!(status(&state, &early).await, StatusCode::UNAUTHORIZED);
    // Configurable: no leeway at all.
    let strict = server(&f.lake, None, 0).await;
    assert_eq!(status(&strict, &past(10)).await, StatusCode::UNAUTHORIZED);
    // The default is 30, and more is refused.
    assert_eq!(ServeConfig::default().auth.leeway_secs, 30);
    let e = ServeConfig::from_toml("[auth]\nleeway_secs = 31\n").unwrap_err();
    assert!(e.contains("leeway_secs"), "{e}");
    let mut config = ServeConfig::default();
    config.auth.leeway_secs = 120;
    assert!(
        AppState::open(f.lake.clone(), atlas_ontology::Ontology::builtin(), config)
            .await
            .is_err()
    );
}

/// Header checks `jsonwebtoken` leaves to the caller: a `crit` header is
/// refused (no extension is understood here), and a token without `kid`
/// is refused when its issuer has more than one key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crit_headers_and_missing_kid_with_several_keys_are_refused() {
    let f = crate::objects::small_lake(2).await;
    let rsa = std::fs::read_to_string(keys_dir().join("rsa-test.pem")).unwrap();
    let key = EncodingKey::from_rsa_pem(rsa.as_bytes()).unwrap();
    let a = "https://idp.example/a";
    let now = jsonwebtoken::get_current_timestamp();
    let claims = json!({"iss": a, "sub": "svc", "aud": "atlas", "exp": now + 600,
        "scope": "system/*.rs"});
    let sign = |header: &Json| {
        let msg = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let sig = jsonwebtoken::crypto::sign(msg.as_bytes(), &key, Algorithm::RS256).unwrap();
        format!("{msg}.{sig}")
    };
    let state = server(&f.lake, None, 30).await;
    let plain = sign(&json!({"alg": "RS256", "typ": "JWT", "kid": "rsa-1"}));
    assert_eq!(status(&state, &plain).await, StatusCode::OK, "the control");
    for crit in [
        json!({"alg": "RS256", "kid": "rsa-1", "crit": ["exp"]}),
        json!({"alg": "RS256", "kid": "rsa-1", "crit": ["urn:x:unknown"], "urn:x:unknown": 1}),
        json!({"alg": "RS256", "kid": "rsa-1", "crit": []}),
    ] {
        let t = sign(&crit);
        assert_eq!(status(&state, &t).await, StatusCode::UNAUTHORIZED, "{crit}");
    }

    // One key: a token may leave out its kid.
    let no_kid = sign(&json!({"alg": "RS256", "typ": "JWT"}));
    assert_eq!(status(&state, &no_kid).await, StatusCode::OK);
    // Two keys (the RSA one and an EC one): kid required.
    let dir = tempfile::tempdir().unwrap();
    let mut set: Json =
        serde_json::from_str(&std::fs::read_to_string(keys_dir().join("rsa-jwks.json")).unwrap())
            .unwrap();
    let ec: Json =
        serde_json::from_str(&std::fs::read_to_string(keys_dir().join("ec384-jwks.json")).unwrap())
            .unwrap();
    set["keys"]
        .as_array_mut()
        .unwrap()
        .push(ec["keys"][0].clone());
    let two = dir.path().join("two.json");
    std::fs::write(&two, set.to_string()).unwrap();
    let state = server(&f.lake, Some(&two), 30).await;
    assert_eq!(status(&state, &plain).await, StatusCode::OK, "with kid");
    assert_eq!(status(&state, &no_kid).await, StatusCode::UNAUTHORIZED);
}

/// n − s, big-endian (the test's own arithmetic, not the server's).
fn n_minus(n: &[u8], s: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; n.len()];
    let mut borrow = 0i32;
    for i in (0..n.len()).rev() {
        let mut d = i32::from(n[i]) - i32::from(s[i]) - borrow;
        borrow = 0;
        if d < 0 {
            d += 256;
            borrow = 1;
        }
        out[i] = d as u8;
    }
    out
}

/// The token with its signature's s set to `s`.
fn with_s(token: &str, s: &[u8]) -> String {
    let (msg, sig) = token.rsplit_once('.').unwrap();
    let mut sig = B64.decode(sig).unwrap();
    let len = sig.len() / 2;
    sig[len..].copy_from_slice(s);
    format!("{msg}.{}", B64.encode(sig))
}

/// ECDSA signatures are malleable: (r, s) and (r, n − s) both verify. The
/// server takes only the low one, on ES256 (the dev issuer) and ES384 (a
/// configured issuer). Both twins are first shown to verify with `ring`,
/// so the refusal is the server's rule, not a broken signature.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_s_ecdsa_signatures_are_refused() {
    use ring::signature::{
        ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED,
        EcdsaKeyPair, KeyPair, UnparsedPublicKey,
    };
    let f = crate::objects::small_lake(2).await;
    let p256_n =
        hex::decode("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551").unwrap();
    let p384_n = hex::decode("ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf581a0db248b0a77aecec196accc52973").unwrap();

    // (low, high) twins of `token`, both checked to verify under `public`.
    let twins = |token: &str,
                 n: &[u8],
                 alg: &'static ring::signature::EcdsaVerificationAlgorithm,
                 public: &[u8]| {
        let (msg, sig) = token.rsplit_once('.').unwrap();
        let sig = B64.decode(sig).unwrap();
        let len = sig.len() / 2;
        let s = sig[len..].to_vec();
        let other = n_minus(n, &s);
        let (low, high) = if s < other { (s, other) } else { (other, s) };
        let (low, high) = (with_s(token, &low), with_s(token, &high));
        for t in [&low, &high] {
            let sig = B64.decode(t.rsplit_once('.').unwrap().1).unwrap();
            UnparsedPublicKey::new(alg, public)
                .verify(msg.as_bytes(), &sig)
                .expect("both twins are valid signatures");
        }
        (low, high)
    };

    // ES256 from the lake's dev issuer.
    let state = server(&f.lake, None, 30).await;
    let issuer = atlas_serve::DevIssuer::open(&f.lake).await.unwrap();
    let pk8 = std::fs::read(
        f.lake
            .root()
            .to_file_path()
            .unwrap()
            .join("_atlas/auth/dev-issuer-es256.pk8"),
    )
    .unwrap();
    let rng = ring::rand::SystemRandom::new();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pk8, &rng).unwrap();
    for _ in 0..4 {
        let minted = issuer
            .mint(&atlas_serve::TokenRequest {
                subject: "a".into(),
                scope: "user/*.rs".into(),
                ttl_secs: 600,
                ..Default::default()
            })
            .unwrap();
        let (low, high) = twins(
            &minted,
            &p256_n,
            &ECDSA_P256_SHA256_FIXED,
            pair.public_key().as_ref(),
        );
        assert_eq!(minted, low, "the dev issuer mints low-S");
        assert_eq!(status(&state, &low).await, StatusCode::OK);
        assert_eq!(status(&state, &high).await, StatusCode::UNAUTHORIZED);
    }

    // ES384 from a configured JWKS issuer.
    let ec = std::fs::read_to_string(keys_dir().join("ec384-test.pem")).unwrap();
    let mut config = ServeConfig::default();
    config.auth.issuers = vec![IssuerConfig {
        issuer: "https://idp.example/b".into(),
        audience: "atlas".into(),
        jwks_file: Some(keys_dir().join("ec384-jwks.json")),
        jwks_url: None,
        jwks_refresh_secs: 900,
    }];
    let state = AppState::open(f.lake.clone(), atlas_ontology::Ontology::builtin(), config)
        .await
        .unwrap();
    let jwks: Json =
        serde_json::from_str(&std::fs::read_to_string(keys_dir().join("ec384-jwks.json")).unwrap())
            .unwrap();
    let mut public = vec![4u8];
    for c in ["x", "y"] {
        public.extend(B64.decode(jwks["keys"][0][c].as_str().unwrap()).unwrap());
    }
    let key = EncodingKey::from_ec_pem(ec.as_bytes()).unwrap();
    for _ in 0..4 {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = json!({"iss": "https://idp.example/b", "sub": "svc", "aud": "atlas",
            "exp": now + 600, "scope": "system/*.rs"});
        let mut header = Header::new(Algorithm::ES384);
        header.kid = Some("ec-1".into());
        let signed = jsonwebtoken::encode(&header, &claims, &key).unwrap();
        let (low, high) = twins(&signed, &p384_n, &ECDSA_P384_SHA384_FIXED, &public);
        assert_eq!(status(&state, &low).await, StatusCode::OK);
        assert_eq!(status(&state, &high).await, StatusCode::UNAUTHORIZED);
    }
}
