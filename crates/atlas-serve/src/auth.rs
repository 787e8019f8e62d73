//! Authentication: every request carries a bearer JWT, checked against the
//! configured issuers (their JWKS) and, when `--dev-auth` is on, the lake's
//! local dev issuer. The result is a [`Principal`]; deciding what it may read
//! is the `PolicyEngine`'s job, not this module's.
//!
//! Accepted algorithms are RS256, RS384, ES256 and ES384 only: `none`, HMAC
//! (which a public key would turn into a forgery) and anything else are
//! refused before a key is looked at. `iss`, `aud`, `exp` and `nbf` are
//! required and checked (60 s leeway); the key is chosen by `kid` within the
//! token's issuer, and must be of the header's algorithm family.
//!
//! The dev issuer keeps an ES256 key in the lake
//! (`_atlas/auth/dev-issuer-es256.pk8`, created on first use), so `atlas
//! token` and `atlas serve --dev-auth` on the same lake agree without
//! configuration.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use atlas_lake::Lake;
use atlas_policy::Principal;

use crate::{ApiError, AppState};

/// The dev issuer's `iss`.
pub const DEV_ISSUER: &str = "urn:atlas:dev-issuer";
/// The audience the dev issuer writes and the server expects by default.
pub const DEFAULT_AUDIENCE: &str = "atlas";
const DEV_KEY_PATH: &str = "_atlas/auth/dev-issuer-es256.pk8";
const DEV_KID: &str = "atlas-dev-1";
const LEEWAY_SECS: u64 = 60;

/// One trusted token issuer.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The `iss` its tokens carry.
    pub issuer: String,
    /// The `aud` its tokens must carry for this server.
    #[serde(default = "default_audience")]
    pub audience: String,
    /// A JWKS file with the issuer's public keys...
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// ...or the issuer's JWKS URL (`jwks_uri` of its SMART configuration;
    /// https, or http to a loopback address), fetched at start and again
    /// every `jwks_refresh_secs` so rotated keys are picked up.
    #[serde(default)]
    pub jwks_url: Option<String>,
    #[serde(default = "default_jwks_refresh")]
    pub jwks_refresh_secs: u64,
}

fn default_jwks_refresh() -> u64 {
    900
}

impl IssuerConfig {
    /// Where the keys come from, for messages.
    fn source(&self) -> String {
        match (&self.jwks_file, &self.jwks_url) {
            (Some(f), _) => format!("jwks_file {}", f.display()),
            (None, Some(u)) => format!("jwks_url {u}"),
            (None, None) => "no jwks_file or jwks_url".into(),
        }
    }

    /// The JWKS text, read from the file or fetched from the URL.
    async fn jwks_text(&self) -> Result<String, AuthError> {
        let err = |m: String| {
            AuthError::Config(format!("issuer {}: {}: {m}", self.issuer, self.source()))
        };
        match (&self.jwks_file, &self.jwks_url) {
            (Some(f), None) => std::fs::read_to_string(f).map_err(|e| err(e.to_string())),
            (None, Some(u)) => fetch_jwks(u).await.map_err(err),
            _ => Err(err("give exactly one of jwks_file and jwks_url".into())),
        }
    }
}

/// GETs a JWKS over https (or http to a loopback host), with a timeout.
async fn fetch_jwks(url: &str) -> Result<String, String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
    let loopback = matches!(
        parsed.host(),
        Some(url::Host::Domain("localhost"))
            | Some(url::Host::Ipv4(std::net::Ipv4Addr::LOCALHOST))
            | Some(url::Host::Ipv6(std::net::Ipv6Addr::LOCALHOST))
    );
    if parsed.scheme() != "https" && !(parsed.scheme() == "http" && loopback) {
        return Err("must be https (http only to a loopback address)".into());
    }
    // reqwest's rustls needs a process-wide crypto provider; ring is the
    // one the HTTPS server uses (a no-op if one is installed already).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let response = client.get(parsed).send().await.map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("HTTP {}", response.status()));
    }
    response.text().await.map_err(|e| e.to_string())
}

/// The RSA and EC keys of a JWKS.
fn jwks_keys(c: &IssuerConfig, text: &str) -> Result<Vec<TrustedKey>, AuthError> {
    let set: JwkSet = serde_json::from_str(text).map_err(|e| {
        AuthError::Config(format!(
            "issuer {}: {} is not a JWKS: {e}",
            c.issuer,
            c.source()
        ))
    })?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let fam = match &jwk.algorithm {
            jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => "RSA",
            jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => "EC",
            _ => continue,
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| {
            AuthError::Config(format!(
                "issuer {}: key {:?}: {e}",
                c.issuer, jwk.common.key_id
            ))
        })?;
        keys.push(TrustedKey {
            kid: jwk.common.key_id.clone(),
            key,
            family: fam,
        });
    }
    if keys.is_empty() {
        return Err(AuthError::Config(format!(
            "issuer {}: {} has no RSA or EC keys",
            c.issuer,
            c.source()
        )));
    }
    Ok(keys)
}

fn default_audience() -> String {
    DEFAULT_AUDIENCE.to_owned()
}

/// `[auth]` in `atlas.toml`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Accept tokens from the lake's dev issuer (`atlas token`).
    pub dev: bool,
    pub issuers: Vec<IssuerConfig>,
}

/// Why a token was refused (the message goes back in the 401).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{0}")]
    Config(String),
    #[error("dev issuer key: {0}")]
    DevKey(String),
}

struct TrustedKey {
    kid: Option<String>,
    key: DecodingKey,
    family: &'static str,
}

struct TrustedIssuer {
    audience: String,
    keys: Vec<TrustedKey>,
}

/// Checks bearer tokens.
pub struct Authenticator {
    issuers: std::sync::RwLock<HashMap<String, TrustedIssuer>>,
    /// Tokens already verified, with their principal and expiry: a client
    /// sends the same bearer token on every request, and checking an ECDSA
    /// or RSA signature costs more than the rest of a one-patient read.
    /// Keyed by the whole token, so a token differing in any byte is
    /// verified afresh; an entry is used only until the token's `exp`.
    verified: std::sync::Mutex<HashMap<String, (Principal, u64)>>,
}

/// Verified tokens remembered before the cache is emptied.
const MAX_VERIFIED: usize = 10_000;

/// The claims Atlas reads.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    #[serde(default)]
    pub aud: serde_json::Value,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// SMART scopes, space-separated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Scopes as a list (some issuers write `scp`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scp: Option<Vec<String>>,
    /// SMART launch context: the patient in context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azp: Option<String>,
    /// Roles the issuer asserts (policy rules may name them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roles: Option<Vec<String>>,
    /// The purpose of use the token was issued for (`TREAT`, ...); the
    /// `X-Purpose-Of-Use` request header overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose_of_use: Option<String>,
}

fn family(alg: Algorithm) -> Option<&'static str> {
    match alg {
        Algorithm::RS256 | Algorithm::RS384 => Some("RSA"),
        Algorithm::ES256 | Algorithm::ES384 => Some("EC"),
        _ => None,
    }
}

fn unauthorized(message: impl Into<String>) -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "Unauthorized",
        "Authorization",
        "Bearer …",
        message,
    )
}

impl Authenticator {
    /// Loads the configured issuers' JWKS files and, when `auth.dev` is on,
    /// the lake's dev issuer key (creating it on first use).
    pub async fn from_config(auth: &AuthConfig, lake: &Lake) -> Result<Authenticator, AuthError> {
        let mut issuers = HashMap::new();
        for c in &auth.issuers {
            let keys = jwks_keys(c, &c.jwks_text().await?)?;
            issuers.insert(
                c.issuer.clone(),
                TrustedIssuer {
                    audience: c.audience.clone(),
                    keys,
                },
            );
        }
        if auth.dev {
            let dev = DevIssuer::open(lake).await?;
            issuers.insert(
                DEV_ISSUER.to_owned(),
                TrustedIssuer {
                    audience: DEFAULT_AUDIENCE.to_owned(),
                    keys: vec![TrustedKey {
                        kid: Some(DEV_KID.to_owned()),
                        key: DecodingKey::from_ec_der(&dev.public),
                        family: "EC",
                    }],
                },
            );
        }
        Ok(Authenticator {
            issuers: std::sync::RwLock::new(issuers),
            verified: Default::default(),
        })
    }

    /// Whether any issuer is trusted (a server with none refuses every request).
    pub fn has_issuers(&self) -> bool {
        self.issuers.read().is_ok_and(|m| !m.is_empty())
    }

    /// Refetches the keys of every `jwks_url` issuer every
    /// `jwks_refresh_secs`, until the authenticator is dropped. A failed
    /// fetch keeps the current keys (and is logged); new keys also drop the
    /// cache of verified tokens, so a key taken out stops working at once.
    pub fn spawn_refresh(self: &std::sync::Arc<Self>, auth: &AuthConfig) {
        for c in auth.issuers.iter().filter(|c| c.jwks_url.is_some()) {
            let weak = std::sync::Arc::downgrade(self);
            let c = c.clone();
            tokio::spawn(async move {
                let every = std::time::Duration::from_secs(c.jwks_refresh_secs.max(1));
                loop {
                    tokio::time::sleep(every).await;
                    let Some(me) = weak.upgrade() else { return };
                    let keys = match c.jwks_text().await.and_then(|t| jwks_keys(&c, &t)) {
                        Ok(k) => k,
                        Err(e) => {
                            tracing::warn!(issuer = %c.issuer, error = %e, "JWKS refresh failed; keeping the current keys");
                            continue;
                        }
                    };
                    if let Ok(mut m) = me.issuers.write() {
                        m.insert(
                            c.issuer.clone(),
                            TrustedIssuer {
                                audience: c.audience.clone(),
                                keys,
                            },
                        );
                    }
                    if let Ok(mut v) = me.verified.lock() {
                        v.clear();
                    }
                    tracing::info!(issuer = %c.issuer, "JWKS refreshed");
                }
            });
        }
    }

    /// Verifies a compact JWS and reads the principal from its claims.
    pub fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        let now = jsonwebtoken::get_current_timestamp();
        if let Some((p, exp)) = self
            .verified
            .lock()
            .ok()
            .and_then(|m| m.get(token).cloned())
            && now <= exp + LEEWAY_SECS
        {
            return Ok(p);
        }
        let (p, exp) = self.verify_signed(token)?;
        if let Ok(mut m) = self.verified.lock() {
            if m.len() >= MAX_VERIFIED {
                m.clear();
            }
            m.insert(token.to_owned(), (p.clone(), exp));
        }
        Ok(p)
    }

    /// The full check: header, issuer, key, signature and claims.
    fn verify_signed(&self, token: &str) -> Result<(Principal, u64), ApiError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| unauthorized(format!("the bearer token is not a JWT: {e}")))?;
        let Some(fam) = family(header.alg) else {
            return Err(unauthorized(format!(
                "token algorithm {:?} is not accepted (RS256, RS384, ES256, ES384 only)",
                header.alg
            )));
        };
        if header.jku.is_some() || header.jwk.is_some() || header.x5u.is_some() {
            return Err(unauthorized(
                "token headers jku, jwk and x5u are not honoured: keys come from the server's configuration",
            ));
        }
        // The issuer picks the key set; the signature is checked below, so
        // reading `iss` first only chooses which keys may verify it.
        let unverified: Claims = jsonwebtoken::dangerous::insecure_decode_claims(token)
            .map_err(|e| unauthorized(format!("token claims are unreadable: {e}")))?;
        let issuers = self
            .issuers
            .read()
            .map_err(|_| unauthorized("the issuer keys are unavailable"))?;
        let Some(issuer) = issuers.get(&unverified.iss) else {
            return Err(unauthorized(format!(
                "token issuer '{}' is not trusted by this server",
                unverified.iss
            )));
        };
        let candidates: Vec<&TrustedKey> = issuer
            .keys
            .iter()
            .filter(|k| k.family == fam)
            .filter(|k| match (&header.kid, &k.kid) {
                (Some(want), Some(have)) => want == have,
                (Some(_), None) => false,
                (None, _) => true,
            })
            .collect();
        if candidates.is_empty() {
            return Err(unauthorized(format!(
                "no key of issuer '{}' matches kid {:?} and algorithm {:?}",
                unverified.iss, header.kid, header.alg
            )));
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_issuer(&[unverified.iss.as_str()]);
        validation.set_audience(&[issuer.audience.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let mut last = None;
        for k in candidates {
            match jsonwebtoken::decode::<Claims>(token, &k.key, &validation) {
                Ok(data) => {
                    let exp = data.claims.exp;
                    return Ok((principal(data.claims), exp));
                }
                Err(e) => last = Some(e),
            }
        }
        let reason = last.map(|e| describe(&e)).unwrap_or_default();
        Err(unauthorized(format!("token rejected: {reason}")))
    }
}

fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => "it has expired".into(),
        K::ImmatureSignature => "it is not valid yet (nbf)".into(),
        K::InvalidAudience => "wrong audience".into(),
        K::InvalidIssuer => "wrong issuer".into(),
        K::InvalidSignature => "the signature does not verify".into(),
        K::MissingRequiredClaim(c) => format!("claim '{c}' is missing"),
        other => format!("{other:?}"),
    }
}

fn principal(c: Claims) -> Principal {
    let mut p = Principal::new(c.sub, c.iss);
    if let Some(s) = &c.scope {
        p = p.with_scopes(s);
    }
    if let Some(list) = &c.scp {
        p = p.with_scopes(&list.join(" "));
    }
    if let Some(patient) = c.patient {
        p = p.with_patient(patient);
    }
    if let Some(client) = c.client_id.or(c.azp) {
        p = p.with_client(client);
    }
    if let Some(roles) = c.roles {
        p = p.with_roles(roles);
    }
    if let Some(purpose) = c.purpose_of_use {
        p = p.with_purpose(purpose);
    }
    p
}

/// The header a request states its purpose of use in (HL7 v3
/// PurposeOfUse codes: `TREAT`, `ETREAT`, `HPAYMT`, `HRESCH`, ...).
pub const PURPOSE_HEADER: &str = "x-purpose-of-use";

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(value) = parts.headers.get(axum::http::header::AUTHORIZATION) else {
            return Err(unauthorized(
                "this endpoint needs 'Authorization: Bearer <token>' (atlas token mints one for a dev lake)",
            ));
        };
        let text = value
            .to_str()
            .map_err(|_| unauthorized("the Authorization header is not text"))?;
        let Some(token) = text
            .strip_prefix("Bearer ")
            .or_else(|| text.strip_prefix("bearer "))
        else {
            return Err(unauthorized(
                "the Authorization header must be 'Bearer <token>'",
            ));
        };
        let mut who = state.auth.verify(token.trim())?;
        if let Some(v) = parts.headers.get(PURPOSE_HEADER) {
            let purpose = v
                .to_str()
                .ok()
                .filter(|p| {
                    !p.is_empty()
                        && p.len() <= 64
                        && p.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                })
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "InvalidHeader",
                        "X-Purpose-Of-Use",
                        v.to_str().unwrap_or("…"),
                        "a purpose of use is one code (TREAT, HPAYMT, HRESCH, ...)",
                    )
                })?;
            who.purpose = Some(purpose.to_owned());
        }
        crate::audit::note(|f| {
            f.subject = Some(who.subject.clone());
            f.issuer = Some(who.issuer.clone());
            f.client = who.client_id.clone();
            f.purpose = who.purpose.clone();
        });
        Ok(who)
    }
}

/// The lake's local token issuer, for development and tests.
pub struct DevIssuer {
    pkcs8: Vec<u8>,
    /// The SEC1 uncompressed public point.
    public: Vec<u8>,
}

impl DevIssuer {
    /// Reads the lake's dev key, creating it the first time (atomically: if
    /// two processes race, both end up with the one that was written).
    pub async fn open(lake: &Lake) -> Result<DevIssuer, AuthError> {
        use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
        let bytes = read_or_create(lake, DEV_KEY_PATH, || {
            let rng = ring::rand::SystemRandom::new();
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .map(|k| k.as_ref().to_vec())
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(AuthError::DevKey)?;
        let rng = ring::rand::SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &bytes, &rng)
            .map_err(|e| AuthError::DevKey(format!("{DEV_KEY_PATH} is not an ES256 key: {e}")))?;
        Ok(DevIssuer {
            public: pair.public_key().as_ref().to_vec(),
            pkcs8: bytes,
        })
    }

    /// Mints a token the dev issuer signs (ES256, audience `atlas`).
    pub fn mint(&self, request: &TokenRequest) -> Result<String, AuthError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let claims = Claims {
            iss: DEV_ISSUER.to_owned(),
            sub: request.subject.clone(),
            aud: serde_json::Value::String(DEFAULT_AUDIENCE.to_owned()),
            exp: now + request.ttl_secs,
            nbf: Some(now),
            iat: Some(now),
            scope: Some(request.scope.clone()),
            scp: None,
            patient: request.patient.clone(),
            client_id: Some("atlas-cli".to_owned()),
            azp: None,
            roles: (!request.roles.is_empty()).then(|| request.roles.clone()),
            purpose_of_use: request.purpose.clone(),
        };
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(DEV_KID.to_owned());
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ec_der(&self.pkcs8))
            .map_err(|e| AuthError::DevKey(e.to_string()))
    }
}

/// What `atlas token` asks the dev issuer for.
#[derive(Debug, Clone, Default)]
pub struct TokenRequest {
    pub subject: String,
    pub scope: String,
    pub patient: Option<String>,
    pub ttl_secs: u64,
    /// The `roles` claim.
    pub roles: Vec<String>,
    /// The `purpose_of_use` claim.
    pub purpose: Option<String>,
}

/// The bytes at `path` in the lake, written by `make` first if absent. The
/// write is create-only, so two processes racing agree on the one that won.
pub(crate) async fn read_or_create(
    lake: &Lake,
    path: &str,
    make: impl FnOnce() -> Result<Vec<u8>, String>,
) -> Result<Vec<u8>, String> {
    use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
    let store = lake.object_store();
    let at = lake.path(path);
    let read = || async {
        match store.get(&at).await {
            Ok(r) => r.bytes().await.map(|b| Some(b.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    };
    if let Some(b) = read().await.map_err(|e| format!("{path}: {e}"))? {
        return Ok(b);
    }
    let fresh = make()?;
    let opts = PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    match store
        .put_opts(&at, PutPayload::from(fresh.clone()), opts)
        .await
    {
        Ok(_) => Ok(fresh),
        Err(object_store::Error::AlreadyExists { .. }) => read()
            .await
            .map_err(|e| format!("{path}: {e}"))?
            .ok_or_else(|| format!("{path}: vanished after a concurrent create")),
        Err(e) => Err(format!("{path}: {e}")),
    }
}
