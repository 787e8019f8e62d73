//! The specifications' examples as oracles.

use std::os::unix::fs::PermissionsExt;

use atlas_connect::manifest::{FileKind, Manifest};
use atlas_connect::smart::{AssertionClaims, ClientKey};
use serde_json::Value;

use crate::{missing, shared};

fn read_json(rel: &str) -> Option<Value> {
    let Some(dir) = shared() else {
        missing("../shared (conformance/smart, conformance/bulk-data)");
        return None;
    };
    let path = dir.join("conformance").join(rel);
    let Ok(text) = std::fs::read_to_string(&path) else {
        missing(&path.display().to_string());
        return None;
    };
    Some(serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

/// SMART App Launch 2.x, client-confidential-asymmetric § Worked example:
/// the RS384 client assertion, byte for byte, from the published test key.
#[test]
fn smart_worked_rs384_assertion_is_reproduced_byte_for_byte() {
    let (Some(example), Some(jwks)) = (
        read_json("smart/example-rs384-jwt.json"),
        read_json("smart/RS384.private.json"),
    ) else {
        return;
    };
    let private = jwks["keys"]
        .as_array()
        .and_then(|k| k.iter().find(|k| k.get("d").is_some()))
        .expect("a private key in RS384.private.json");
    let key = ClientKey::from_jwk(private, None).unwrap();
    assert_eq!(key.kid(), "eee9f17a3b598fd86417a980b591fbe6");
    let p = &example["payloadDecoded"];
    let claims = AssertionClaims {
        iss: p["iss"].as_str().unwrap().into(),
        sub: p["sub"].as_str().unwrap().into(),
        aud: p["aud"].as_str().unwrap().into(),
        exp: p["exp"].as_i64().unwrap(),
        jti: p["jti"].as_str().unwrap().into(),
    };
    let jwt = key.assertion(&claims, None).unwrap();
    assert_eq!(jwt, example["jwt"].as_str().unwrap());
}

/// The ES384 test key signs assertions its public JWKS verifies (ECDSA is
/// randomised: verification is the oracle).
#[test]
fn smart_es384_test_key_signs_verifiable_assertions() {
    let (Some(private), Some(public)) = (
        read_json("smart/ES384.private.json"),
        read_json("smart/ES384.public.json"),
    ) else {
        return;
    };
    let d = private["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k.get("d").is_some())
        .unwrap();
    let key = ClientKey::from_jwk(d, None).unwrap();
    let claims = AssertionClaims::new(
        "https://bili-monitor.example.com",
        "https://ehr.example/token",
    );
    let jwt = key
        .assertion(
            &claims,
            Some("https://bili-monitor.example.com/.well-known/jwks.json"),
        )
        .unwrap();
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_value(public).unwrap();
    let jwk = set.find(key.kid()).expect("the kid is in the public JWKS");
    let dk = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES384);
    v.set_audience(&["https://ehr.example/token"]);
    let got = jsonwebtoken::decode::<Value>(&jwt, &dk, &v).unwrap();
    assert_eq!(got.header.typ.as_deref(), Some("JWT"));
    assert_eq!(
        got.header.jku.as_deref(),
        Some("https://bili-monitor.example.com/.well-known/jwks.json")
    );
    assert_eq!(got.claims["iss"], got.claims["sub"]);
    let exp = got.claims["exp"].as_i64().unwrap();
    let now = chrono::Utc::now().timestamp();
    assert!(exp > now && exp <= now + 300, "exp within 5 minutes");
}

/// A key file others may read is refused, naming the file and the fix; the
/// same file with mode 600 is accepted.
#[test]
fn a_key_file_readable_by_others_is_refused() {
    let (_, pem) = ClientKey::generate(jsonwebtoken::Algorithm::ES384).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("client.pem");
    std::fs::write(&path, &pem).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = ClientKey::from_file(&path, None).unwrap_err().to_string();
    assert!(
        e.contains("client.pem") && e.contains("chmod 600") && e.contains("644"),
        "{e}"
    );
    assert!(
        !e.contains("PRIVATE KEY"),
        "the error never shows the key: {e}"
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let key = ClientKey::from_file(&path, None).unwrap();
    assert!(
        !format!("{key:?}").contains("PRIVATE"),
        "Debug shows no key material"
    );
}

/// Every manifest example of the Bulk Data IG (STU2, STU3, STU4 ballot) reads.
#[test]
fn bulk_manifest_examples_of_every_version_read() {
    let cases = [
        (
            "bulk-data/stu2-2.0.0/status-complete-manifest.json",
            3,
            1,
            1,
        ),
        ("bulk-data/v3.0.0/manifest-example.json", 3, 1, 1),
        (
            "bulk-data/v3.0.0/manifest-organized-by-patient-partial.json",
            3,
            1,
            1,
        ),
        (
            "bulk-data/current-4.0.0-ballot/BulkDataManifestByTypeExample.json",
            3,
            1,
            1,
        ),
        (
            "bulk-data/current-4.0.0-ballot/BulkDataManifestMinimalExample.json",
            1,
            0,
            0,
        ),
        (
            "bulk-data/current-4.0.0-ballot/BulkDataManifestOrganizedByPatientExample.json",
            3,
            1,
            1,
        ),
    ];
    for (rel, outputs, errors, deleted) in cases {
        let Some(v) = read_json(rel) else { return };
        let m = Manifest::parse(&serde_json::to_vec(&v).unwrap(), rel)
            .unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert_eq!(m.output.len(), outputs, "{rel}");
        assert_eq!(m.error.len(), errors, "{rel}");
        assert_eq!(m.deleted.len(), deleted, "{rel}");
        assert!(!m.transaction_time.is_empty(), "{rel}");
        assert_eq!(
            m.files().filter(|(k, _)| *k == FileKind::Error).count(),
            m.error.len()
        );
    }
    let Some(v) = read_json("bulk-data/v3.0.0/manifest-organized-by-patient-partial.json") else {
        return;
    };
    let m = Manifest::parse(&serde_json::to_vec(&v).unwrap(), "partial").unwrap();
    assert_eq!(
        m.next.as_deref(),
        Some("https://example.com/output/manifest-2.json")
    );
    assert_eq!(m.organized_by.as_deref(), Some("Patient"));
    assert!(m.output[1].continues_in_file.is_some());
}
