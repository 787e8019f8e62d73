//! SMART Backend Services (SMART App Launch 2.x, "client-confidential-asymmetric"):
//! the client side.
//!
//! * [`SmartConfiguration`]: discovery from `[base]/.well-known/smart-configuration`.
//! * [`ClientKey`]: the client's private key, from a PEM (PKCS#1, PKCS#8 or
//!   SEC1) or a JWK/JWKS file. A file that group or others may read is refused:
//!   whoever reads it can act as the client.
//! * [`ClientKey::assertion`]: the client-assertion JWT. The header is
//!   written `{"alg","kid","typ"}` (then `jku` when configured) and the
//!   claims `iss, sub, aud, exp, jti`, the member order of the spec's worked
//!   example, so an RS384 assertion reproduces it byte for byte (PKCS#1 v1.5
//!   signatures are deterministic).
//! * [`TokenSource`]: the `client_credentials` grant; the access token is
//!   cached and renewed a margin before it expires, and renewed once when a
//!   server answers 401 with it (`renew`).
//!
//! Keys and tokens are never logged: `Debug` of the key types prints the
//! `kid` only, and errors name the file, never its content.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Digest;

use crate::error::{ConnectError, outcome_text};

/// What `.well-known/smart-configuration` says (the members a backend client uses).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct SmartConfiguration {
    pub token_endpoint: String,
    #[serde(default)]
    pub grant_types_supported: Vec<String>,
    #[serde(default)]
    pub token_endpoint_auth_methods_supported: Vec<String>,
    #[serde(default)]
    pub token_endpoint_auth_signing_alg_values_supported: Vec<String>,
    #[serde(default)]
    pub scopes_supported: Vec<String>,
}

impl SmartConfiguration {
    /// The default scope for a backend client of this server: SMART v2
    /// (`system/*.rs`) when the server lists v2 scopes, else v1 (`system/*.read`).
    pub fn default_scope(&self) -> &'static str {
        let v2 = self
            .scopes_supported
            .iter()
            .any(|s| s.starts_with("system/") && s.ends_with(".rs"));
        if v2 { "system/*.rs" } else { "system/*.read" }
    }

    /// Checks what the client needs: the `client_credentials` grant (when the
    /// server lists grants) and the key's algorithm (when it lists algorithms).
    pub fn check(&self, alg: Algorithm, url: &str) -> Result<(), ConnectError> {
        if !self.grant_types_supported.is_empty()
            && !self
                .grant_types_supported
                .iter()
                .any(|g| g == "client_credentials")
        {
            return Err(ConnectError::protocol(
                url,
                "the server does not list the client_credentials grant (grant_types_supported)",
            ));
        }
        let name = alg_name(alg);
        let algs = &self.token_endpoint_auth_signing_alg_values_supported;
        if !algs.is_empty() && !algs.iter().any(|a| a == name) {
            return Err(ConnectError::protocol(
                url,
                format!("the server does not accept {name} client assertions (it lists {algs:?})"),
            ));
        }
        Ok(())
    }
}

fn alg_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::ES384 => "ES384",
        _ => "RS384",
    }
}

/// The client's private key: RS384 (RSA) or ES384 (P-384).
pub struct ClientKey {
    alg: Algorithm,
    kid: String,
    key: EncodingKey,
    public: Value,
}

impl std::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientKey")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// The claims of a client assertion, in the order they are written.
#[derive(Debug, Clone, Serialize)]
pub struct AssertionClaims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub exp: i64,
    pub jti: String,
}

impl AssertionClaims {
    /// `iss = sub = client_id`, `aud` = the token URL, `exp` 4 minutes from
    /// now (the spec allows at most 5), a fresh random `jti`.
    pub fn new(client_id: &str, token_url: &str) -> Self {
        AssertionClaims {
            iss: client_id.to_owned(),
            sub: client_id.to_owned(),
            aud: token_url.to_owned(),
            exp: chrono::Utc::now().timestamp() + 240,
            jti: uuid::Uuid::new_v4().to_string(),
        }
    }
}

#[derive(Serialize)]
struct AssertionHeader<'a> {
    alg: &'a str,
    kid: &'a str,
    typ: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    jku: Option<&'a str>,
}

fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

fn unb64(v: &Value, member: &str) -> Result<Vec<u8>, String> {
    let s = v[member]
        .as_str()
        .ok_or_else(|| format!("the JWK has no `{member}`"))?;
    B64.decode(s.trim_end_matches('='))
        .map_err(|e| format!("JWK member `{member}` is not base64url: {e}"))
}

impl ClientKey {
    /// Reads a key file: a PEM private key, a JWK, or a JWKS (its first
    /// private key, or the one named `kid`). Refused when group or others may
    /// read it. `kid` overrides the key's own (a JWK's `kid`, else the RFC
    /// 7638 thumbprint of the public key).
    pub fn from_file(path: &Path, kid: Option<&str>) -> Result<ClientKey, ConnectError> {
        check_private(path)?;
        let text = std::fs::read_to_string(path).map_err(ConnectError::io(path))?;
        let key_err = |message: String| ConnectError::Key {
            path: path.to_path_buf(),
            message,
        };
        if text.trim_start().starts_with('{') {
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| key_err(format!("not JSON: {e} (line {})", e.line())))?;
            let jwk = pick_jwk(&v, kid).map_err(key_err)?;
            ClientKey::from_jwk(jwk, kid).map_err(key_err)
        } else {
            ClientKey::from_pem(&text, kid).map_err(key_err)
        }
    }

    /// A private JWK (`kty` RSA with `n e d p q`, or EC P-384 with `d x y`).
    pub fn from_jwk(jwk: &Value, kid: Option<&str>) -> Result<ClientKey, String> {
        let kid = kid
            .map(str::to_owned)
            .or_else(|| jwk["kid"].as_str().map(str::to_owned));
        match jwk["kty"].as_str() {
            Some("RSA") => {
                let big = |m: &str| unb64(jwk, m).map(|b| rsa::BigUint::from_bytes_be(&b));
                let key = rsa::RsaPrivateKey::from_components(
                    big("n")?,
                    big("e")?,
                    big("d")?,
                    vec![big("p")?, big("q")?],
                )
                .map_err(|e| format!("not a valid RSA key: {e}"))?;
                ClientKey::from_rsa(key, kid)
            }
            Some("EC") => {
                if jwk["crv"].as_str() != Some("P-384") {
                    return Err(format!(
                        "EC keys must be P-384 for ES384 (this one is {})",
                        jwk["crv"]
                    ));
                }
                let key = p384::SecretKey::from_slice(&unb64(jwk, "d")?)
                    .map_err(|e| format!("not a valid P-384 key: {e}"))?;
                ClientKey::from_p384(key, kid)
            }
            other => Err(format!(
                "unsupported JWK kty {other:?}: use RSA (RS384) or EC P-384 (ES384)"
            )),
        }
    }

    /// A PEM private key: `RSA PRIVATE KEY` (PKCS#1), `EC PRIVATE KEY`
    /// (SEC1, P-384) or `PRIVATE KEY` (PKCS#8, either).
    pub fn from_pem(pem: &str, kid: Option<&str>) -> Result<ClientKey, String> {
        use p384::pkcs8::DecodePrivateKey;
        use rsa::pkcs1::DecodeRsaPrivateKey;
        let kid = kid.map(str::to_owned);
        if pem.contains("BEGIN RSA PRIVATE KEY") {
            let key = rsa::RsaPrivateKey::from_pkcs1_pem(pem).map_err(|e| e.to_string())?;
            return ClientKey::from_rsa(key, kid);
        }
        if pem.contains("BEGIN EC PRIVATE KEY") {
            let key = p384::SecretKey::from_sec1_pem(pem)
                .map_err(|e| format!("not a P-384 SEC1 key: {e}"))?;
            return ClientKey::from_p384(key, kid);
        }
        if pem.contains("BEGIN PRIVATE KEY") {
            if let Ok(key) = rsa::RsaPrivateKey::from_pkcs8_pem(pem) {
                return ClientKey::from_rsa(key, kid);
            }
            let key = p384::SecretKey::from_pkcs8_pem(pem)
                .map_err(|e| format!("a PKCS#8 key that is neither RSA nor P-384: {e}"))?;
            return ClientKey::from_p384(key, kid);
        }
        if pem.contains("ENCRYPTED PRIVATE KEY") {
            return Err(
                "encrypted keys are not supported: decrypt it to a file only you can read".into(),
            );
        }
        Err(
            "no PEM private key (RSA PRIVATE KEY, EC PRIVATE KEY or PRIVATE KEY) and not a JWK"
                .into(),
        )
    }

    fn from_rsa(key: rsa::RsaPrivateKey, kid: Option<String>) -> Result<ClientKey, String> {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::traits::PublicKeyParts;
        if key.size() < 256 {
            return Err(format!(
                "RSA keys must have at least 2048 bits (this one has {})",
                key.size() * 8
            ));
        }
        let der = key.to_pkcs1_der().map_err(|e| e.to_string())?;
        let (n, e) = (b64(&key.n().to_bytes_be()), b64(&key.e().to_bytes_be()));
        // RFC 7638: the required members in lexicographic order.
        let thumb = format!(r#"{{"e":"{e}","kty":"RSA","n":"{n}"}}"#);
        let kid = kid.unwrap_or_else(|| b64(&sha2::Sha256::digest(thumb.as_bytes())));
        Ok(ClientKey {
            alg: Algorithm::RS384,
            public: json!({"kty": "RSA", "alg": "RS384", "use": "sig", "key_ops": ["verify"], "kid": kid, "n": n, "e": e}),
            kid,
            key: EncodingKey::from_rsa_der(der.as_bytes()),
        })
    }

    fn from_p384(key: p384::SecretKey, kid: Option<String>) -> Result<ClientKey, String> {
        use p384::elliptic_curve::sec1::ToEncodedPoint;
        use p384::pkcs8::EncodePrivateKey;
        let der = key.to_pkcs8_der().map_err(|e| e.to_string())?;
        let point = key.public_key().to_encoded_point(false);
        let (Some(x), Some(y)) = (point.x(), point.y()) else {
            return Err("the P-384 public point is not affine".into());
        };
        let (x, y) = (b64(x), b64(y));
        let thumb = format!(r#"{{"crv":"P-384","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let kid = kid.unwrap_or_else(|| b64(&sha2::Sha256::digest(thumb.as_bytes())));
        Ok(ClientKey {
            alg: Algorithm::ES384,
            public: json!({"kty": "EC", "crv": "P-384", "alg": "ES384", "use": "sig", "key_ops": ["verify"], "kid": kid, "x": x, "y": y}),
            kid,
            key: EncodingKey::from_ec_der(der.as_bytes()),
        })
    }

    /// A new key: RS384 (RSA 2048) or ES384 (P-384), with its PKCS#8 PEM.
    pub fn generate(alg: Algorithm) -> Result<(ClientKey, String), String> {
        use p384::pkcs8::{EncodePrivateKey, LineEnding};
        let mut rng = rand::rngs::OsRng;
        match alg {
            Algorithm::RS384 => {
                let key = rsa::RsaPrivateKey::new(&mut rng, 2048).map_err(|e| e.to_string())?;
                let pem = key
                    .to_pkcs8_pem(LineEnding::LF)
                    .map_err(|e| e.to_string())?;
                Ok((ClientKey::from_rsa(key, None)?, pem.to_string()))
            }
            Algorithm::ES384 => {
                let key = p384::SecretKey::random(&mut rng);
                let pem = key
                    .to_pkcs8_pem(LineEnding::LF)
                    .map_err(|e| e.to_string())?;
                Ok((ClientKey::from_p384(key, None)?, pem.to_string()))
            }
            other => Err(format!("{other:?}: use RS384 or ES384")),
        }
    }

    pub fn alg(&self) -> Algorithm {
        self.alg
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWKS, to register with the server (or to serve at `jku`).
    pub fn public_jwks(&self) -> Value {
        json!({"keys": [self.public]})
    }

    /// The signed client assertion (compact JWS).
    pub fn assertion(&self, claims: &AssertionClaims, jku: Option<&str>) -> Result<String, String> {
        let header = AssertionHeader {
            alg: alg_name(self.alg),
            kid: &self.kid,
            typ: "JWT",
            jku,
        };
        let header = serde_json::to_vec(&header).map_err(|e| e.to_string())?;
        let claims = serde_json::to_vec(claims).map_err(|e| e.to_string())?;
        let message = format!("{}.{}", b64(&header), b64(&claims));
        let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &self.key, self.alg)
            .map_err(|e| format!("signing failed: {e}"))?;
        Ok(format!("{message}.{signature}"))
    }
}

fn pick_jwk<'a>(v: &'a Value, kid: Option<&str>) -> Result<&'a Value, String> {
    let Some(keys) = v["keys"].as_array() else {
        return Ok(v);
    };
    keys.iter()
        .filter(|k| k.get("d").is_some())
        .find(|k| kid.is_none_or(|want| k["kid"].as_str() == Some(want)))
        .ok_or_else(|| match kid {
            Some(k) => format!("the JWKS has no private key with kid {k:?}"),
            None => "the JWKS has no private key (no member `d`)".into(),
        })
}

/// Refuses a key file that group or others may read (Unix modes).
fn check_private(path: &Path) -> Result<(), ConnectError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(ConnectError::io(path))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(ConnectError::Key {
                path: path.to_path_buf(),
                message: format!(
                    "the file may be read by others (mode {:o}); a private key must be readable by its owner only: chmod 600 {}",
                    mode & 0o777,
                    path.display()
                ),
            });
        }
    }
    Ok(())
}

/// How a connector authenticates.
#[derive(Debug, Clone)]
pub struct SmartClient {
    pub client_id: String,
    pub key_path: PathBuf,
    pub kid: Option<String>,
    pub scope: Option<String>,
    /// Sent as the assertion's `jku` header, for servers that fetch the JWKS from it.
    pub jku: Option<String>,
    /// Used when the server has no `.well-known/smart-configuration`.
    pub token_url: Option<String>,
}

#[derive(Clone)]
struct CachedToken {
    access_token: String,
    renew_at: Instant,
}

/// The access token of one client at one token endpoint: cached, renewed
/// before it expires, renewed at once after a 401.
pub struct TokenSource {
    http: reqwest::Client,
    token_url: String,
    client_id: String,
    scope: String,
    jku: Option<String>,
    key: ClientKey,
    cached: Mutex<Option<CachedToken>>,
    /// Serialises renewals so parallel downloads share one token request.
    renewing: tokio::sync::Mutex<()>,
    /// What the server granted (its `scope`), after the first token.
    granted: Mutex<Option<String>>,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    token_type: String,
    expires_in: Option<u64>,
    #[serde(default)]
    scope: Option<String>,
}

impl TokenSource {
    pub fn new(
        http: reqwest::Client,
        token_url: String,
        client_id: String,
        scope: String,
        jku: Option<String>,
        key: ClientKey,
    ) -> TokenSource {
        TokenSource {
            http,
            token_url,
            client_id,
            scope,
            jku,
            key,
            cached: Mutex::new(None),
            renewing: tokio::sync::Mutex::new(()),
            granted: Mutex::new(None),
        }
    }

    /// The scopes the server granted with the last token.
    pub fn granted_scope(&self) -> Option<String> {
        self.granted.lock().ok().and_then(|g| g.clone())
    }

    fn cached(&self) -> Option<CachedToken> {
        self.cached.lock().ok().and_then(|c| c.clone())
    }

    /// A valid access token: the cached one, or a new one when it is close
    /// to expiring.
    pub async fn token(&self) -> Result<String, ConnectError> {
        if let Some(t) = self.cached().filter(|t| Instant::now() < t.renew_at) {
            return Ok(t.access_token);
        }
        let _one = self.renewing.lock().await;
        if let Some(t) = self.cached().filter(|t| Instant::now() < t.renew_at) {
            return Ok(t.access_token);
        }
        self.fetch().await
    }

    /// A server refused `stale`: drop it (unless another task already
    /// renewed it) and get a new one.
    pub async fn renew(&self, stale: &str) -> Result<String, ConnectError> {
        let _one = self.renewing.lock().await;
        if let Some(t) = self.cached().filter(|t| t.access_token != stale) {
            return Ok(t.access_token);
        }
        self.fetch().await
    }

    /// Asks for a token, retrying a busy or failing token endpoint (429,
    /// 5xx, broken connections) a few times with backoff; a refusal
    /// (`invalid_client`, ...) is final.
    async fn fetch(&self) -> Result<String, ConnectError> {
        let policy = crate::retry::RetryPolicy::default();
        let mut attempt = 0;
        loop {
            match self.fetch_once().await {
                Err(e @ (ConnectError::Http { .. } | ConnectError::Auth { .. }))
                    if attempt + 1 < 4 && transient(&e) =>
                {
                    tracing::info!(token_url = %self.token_url, error = %e, "token request failed: retrying");
                    tokio::time::sleep(policy.backoff(attempt)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn fetch_once(&self) -> Result<String, ConnectError> {
        let claims = AssertionClaims::new(&self.client_id, &self.token_url);
        let assertion = self
            .key
            .assertion(&claims, self.jku.as_deref())
            .map_err(|m| ConnectError::protocol(&self.token_url, m))?;
        let form = [
            ("grant_type", "client_credentials"),
            ("scope", self.scope.as_str()),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion.as_str()),
        ];
        let body = form
            .iter()
            .map(|(k, v)| format!("{k}={}", urlencode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let http_err = |source| ConnectError::Http {
            method: "POST".into(),
            url: self.token_url.clone(),
            source,
        };
        let sent = Instant::now();
        let response = self
            .http
            .post(&self.token_url)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("accept", "application/json")
            .body(body)
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .map_err(http_err)?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(http_err)?;
        if !status.is_success() {
            let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            return Err(ConnectError::Auth {
                url: self.token_url.clone(),
                error: v["error"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("HTTP {}", status.as_u16())),
                description: v["error_description"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| outcome_text(&bytes)),
            });
        }
        let t: TokenResponse = serde_json::from_slice(&bytes)
            .map_err(|e| ConnectError::protocol(&self.token_url, format!("token response: {e}")))?;
        if !t.token_type.eq_ignore_ascii_case("bearer") {
            return Err(ConnectError::protocol(
                &self.token_url,
                format!("token_type {:?} (expected bearer)", t.token_type),
            ));
        }
        // Renew a margin before expiry: 10% of the lifetime, at least 5 s.
        // Clamped: a server's `expires_in` must not overflow the clock.
        let life = Duration::from_secs(t.expires_in.unwrap_or(300).clamp(1, 86_400));
        let margin = (life / 10).max(Duration::from_secs(5)).min(life / 2);
        let renew_at = sent + life - margin;
        if let Ok(mut g) = self.granted.lock() {
            *g = t.scope.clone();
        }
        if let Ok(mut c) = self.cached.lock() {
            *c = Some(CachedToken {
                access_token: t.access_token.clone(),
                renew_at,
            });
        }
        tracing::debug!(token_url = %self.token_url, expires_in = life.as_secs(), scope = ?t.scope, "new access token");
        Ok(t.access_token)
    }
}

/// A failure worth another token request: no answer, or a 429/5xx.
fn transient(e: &ConnectError) -> bool {
    match e {
        ConnectError::Http { .. } => true,
        ConnectError::Auth { error, .. } => [
            "HTTP 429",
            "HTTP 500",
            "HTTP 502",
            "HTTP 503",
            "HTTP 504",
            "temporarily_unavailable",
        ]
        .contains(&error.as_str()),
        _ => false,
    }
}

/// `application/x-www-form-urlencoded` value encoding.
pub(crate) fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_without_key_is_refused() {
        assert!(ClientKey::from_pem("hello", None).is_err());
    }

    #[test]
    fn generated_keys_sign_and_verify() {
        for alg in [Algorithm::RS384, Algorithm::ES384] {
            let (key, pem) = ClientKey::generate(alg).unwrap();
            let again = ClientKey::from_pem(&pem, None).unwrap();
            assert_eq!(key.kid(), again.kid(), "the thumbprint kid is stable");
            let claims = AssertionClaims::new("c", "https://x/token");
            let jwt = key.assertion(&claims, None).unwrap();
            let jwks: jsonwebtoken::jwk::JwkSet =
                serde_json::from_value(key.public_jwks()).unwrap();
            let dk = jsonwebtoken::DecodingKey::from_jwk(&jwks.keys[0]).unwrap();
            let mut v = jsonwebtoken::Validation::new(alg);
            v.set_audience(&["https://x/token"]);
            let got = jsonwebtoken::decode::<Value>(&jwt, &dk, &v).unwrap();
            assert_eq!(got.claims["iss"], "c");
            assert_eq!(got.header.kid.as_deref(), Some(key.kid()));
        }
    }

    #[test]
    fn default_scope_follows_the_server() {
        let mut c = SmartConfiguration::default();
        assert_eq!(c.default_scope(), "system/*.read");
        c.scopes_supported = vec!["system/*.read".into(), "system/Patient.rs".into()];
        assert_eq!(c.default_scope(), "system/*.rs");
        c.token_endpoint_auth_signing_alg_values_supported = vec!["RS384".into()];
        assert!(c.check(Algorithm::RS384, "u").is_ok());
        assert!(
            c.check(Algorithm::ES384, "u")
                .unwrap_err()
                .to_string()
                .contains("ES384")
        );
        c.grant_types_supported = vec!["authorization_code".into()];
        assert!(c.check(Algorithm::RS384, "u").is_err());
    }
}
