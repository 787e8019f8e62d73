//! Authentication: every request carries a bearer JWT, checked against the
//! configured issuers (their JWKS) and, when `--dev-auth` is on, the lake's
//! local dev issuer. The result is a [`Principal`]; deciding what it may read
//! is the `PolicyEngine`'s job, not this module's.
//!
//! Accepted algorithms are RS256, RS384, ES256 and ES384 only: `none`, HMAC
//! (which a public key would turn into a forgery) and anything else are
//! refused before a key is looked at. `iss`, `aud`, `exp` and `nbf` are
//! required and checked (`[auth] leeway_secs`, 30 s by default and at
//! most); the key is chosen by `kid` within the token's issuer (a `kid` is
//! required when the issuer has more than one key), and must be of the
//! header's algorithm family. A `crit` header is refused (no extension is
//! understood), and so is an ECDSA signature whose `s` is in the upper half
//! of the curve order (the malleable twin of a valid signature).
//!
//! 401 answers are short and the same for every refused token; the reason
//! goes to the server log and the request's audit record.
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
/// The default and largest clock leeway for `exp` and `nbf`.
pub const MAX_LEEWAY_SECS: u64 = 30;

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
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Accept tokens from the lake's dev issuer (`atlas token`).
    pub dev: bool,
    pub issuers: Vec<IssuerConfig>,
    /// Clock leeway when checking `exp` and `nbf`, in seconds: 30 by
    /// default, and no more than 30.
    pub leeway_secs: u64,
    /// Whether a token with no `purpose_of_use` claim may state a purpose
    /// with the `X-Purpose-Of-Use` header (default: no, such a request is
    /// refused). A token with the claim may always narrow it with the
    /// header to one of the purposes it lists, never to another.
    pub purpose_header_without_claim: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            dev: false,
            issuers: Vec::new(),
            leeway_secs: MAX_LEEWAY_SECS,
            purpose_header_without_claim: false,
        }
    }
}

impl AuthConfig {
    /// Refuses a leeway above [`MAX_LEEWAY_SECS`].
    pub fn check(&self) -> Result<(), String> {
        if self.leeway_secs > MAX_LEEWAY_SECS {
            return Err(format!(
                "[auth] leeway_secs = {} is more than the {MAX_LEEWAY_SECS} s allowed",
                self.leeway_secs
            ));
        }
        Ok(())
    }
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

/// What a verified token said besides the principal, for the audit trail
/// and the purpose-of-use check.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenInfo {
    /// The scopes as the token states them (`scope` and `scp`).
    pub scopes: Vec<String>,
    /// The purposes of use the token was issued for; `None`: no claim.
    pub purposes: Option<Vec<String>>,
    /// The token's expiry (`exp`, seconds since the epoch): what outlives
    /// the request (an SSE ticket, a FHIRcast lease, a Subscription) ends
    /// with it.
    pub exp: u64,
    /// The FHIRcast topic the token binds its holder to (`hub.topic`, as
    /// in the SMART launch response, or `fhircast_topic`).
    pub fhircast_topic: Option<String>,
}

/// Checks bearer tokens.
pub struct Authenticator {
    issuers: std::sync::RwLock<HashMap<String, TrustedIssuer>>,
    leeway: u64,
    /// Tokens already verified, with their principal and expiry: a client
    /// sends the same bearer token on every request, and checking an ECDSA
    /// or RSA signature costs more than the rest of a one-patient read.
    /// Keyed by the whole token, so a token differing in any byte is
    /// verified afresh; an entry is used only until the token's `exp`.
    verified: std::sync::Mutex<HashMap<String, (Principal, TokenInfo, u64)>>,
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
    /// The purposes of use the token was issued for (`TREAT`, or a list:
    /// `["TREAT", "HRESCH"]` or `"TREAT HRESCH"`); the `X-Purpose-Of-Use`
    /// request header may pick one of them, never another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose_of_use: Option<PurposeClaim>,
    /// The FHIRcast topic of the session (`hub.topic`).
    #[serde(
        default,
        rename = "hub.topic",
        alias = "fhircast_topic",
        skip_serializing_if = "Option::is_none"
    )]
    pub hub_topic: Option<String>,
}

/// The `purpose_of_use` claim: one code, or several.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PurposeClaim {
    One(String),
    Many(Vec<String>),
}

impl PurposeClaim {
    /// The codes listed (a string may list several, space or comma separated).
    pub fn codes(&self) -> Vec<String> {
        match self {
            PurposeClaim::One(s) => s
                .split([' ', ','])
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect(),
            PurposeClaim::Many(v) => v.clone(),
        }
    }
}

fn family(alg: Algorithm) -> Option<&'static str> {
    match alg {
        Algorithm::RS256 | Algorithm::RS384 => Some("RSA"),
        Algorithm::ES256 | Algorithm::ES384 => Some("EC"),
        _ => None,
    }
}

/// A refused token, with the reason (for the log and the audit record;
/// the client gets [`refused`]'s generic answer).
fn unauthorized(message: impl Into<String>) -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "Unauthorized",
        "Authorization",
        "Bearer …",
        message,
    )
}

/// The realm named in `WWW-Authenticate`.
const REALM: &str = "atlas";

/// What the client is told when its credentials are refused: the same
/// short answer whatever the reason (RFC 6750 error codes: none when no
/// credentials came, `invalid_request` for credentials in the wrong place
/// or shape, `invalid_token` for a token that does not verify). The
/// reason is noted for the audit record and logged.
fn refused(kind: Refusal, reason: &str) -> ApiError {
    let reason = atlas_access::facts::redact(reason);
    match kind {
        // No credentials at all: health probes and first tries, not news.
        Refusal::Missing => tracing::debug!(reason = %reason, "request refused: 401"),
        _ => tracing::info!(reason = %reason, "request refused: 401"),
    }
    atlas_access::facts::note(|f| f.reason = Some(reason.clone()));
    let (message, challenge) = match kind {
        Refusal::Missing => (
            "this endpoint needs 'Authorization: Bearer <token>'",
            format!("Bearer realm=\"{REALM}\""),
        ),
        Refusal::Request => (
            "send the bearer token in the Authorization header, and only there",
            format!("Bearer realm=\"{REALM}\", error=\"invalid_request\""),
        ),
        Refusal::Token => (
            "the bearer token was not accepted",
            format!("Bearer realm=\"{REALM}\", error=\"invalid_token\""),
        ),
    };
    let mut e = unauthorized(message);
    e.challenge = Some(challenge);
    e
}

#[derive(Debug, Clone, Copy)]
enum Refusal {
    Missing,
    Request,
    Token,
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
        auth.check().map_err(AuthError::Config)?;
        Ok(Authenticator {
            issuers: std::sync::RwLock::new(issuers),
            leeway: auth.leeway_secs,
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

    /// Verifies a compact JWS and reads the principal from its claims. The
    /// error's message names the reason (for logs and tests, not clients).
    pub fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        self.verify_info(token).map(|(p, _)| p)
    }

    /// [`Authenticator::verify`], with what else the token said.
    pub fn verify_info(&self, token: &str) -> Result<(Principal, TokenInfo), ApiError> {
        let now = jsonwebtoken::get_current_timestamp();
        if let Some((p, info, exp)) = self
            .verified
            .lock()
            .ok()
            .and_then(|m| m.get(token).cloned())
            && now <= exp + self.leeway
        {
            return Ok((p, info));
        }
        let (p, info, exp) = self.verify_signed(token)?;
        if let Ok(mut m) = self.verified.lock() {
            if m.len() >= MAX_VERIFIED {
                m.clear();
            }
            m.insert(token.to_owned(), (p.clone(), info.clone(), exp));
        }
        Ok((p, info))
    }

    /// The full check: header, issuer, key, signature and claims.
    fn verify_signed(&self, token: &str) -> Result<(Principal, TokenInfo, u64), ApiError> {
        check_raw_header(token)?;
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
        if header.kid.is_none() && issuer.keys.len() > 1 {
            return Err(unauthorized(format!(
                "token has no kid, and issuer '{}' has {} keys",
                unverified.iss,
                issuer.keys.len()
            )));
        }
        if fam == "EC" {
            check_low_s(token, header.alg)?;
        }
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
        validation.leeway = self.leeway;
        validation.validate_nbf = true;
        validation.set_issuer(&[unverified.iss.as_str()]);
        validation.set_audience(&[issuer.audience.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let mut last = None;
        for k in candidates {
            match jsonwebtoken::decode::<Claims>(token, &k.key, &validation) {
                Ok(data) => {
                    let exp = data.claims.exp;
                    let info = TokenInfo {
                        scopes: data
                            .claims
                            .scope
                            .iter()
                            .flat_map(|s| s.split_whitespace().map(str::to_owned))
                            .chain(data.claims.scp.iter().flatten().cloned())
                            .collect(),
                        purposes: data.claims.purpose_of_use.as_ref().map(PurposeClaim::codes),
                        exp,
                        fhircast_topic: data.claims.hub_topic.clone(),
                    };
                    return Ok((principal(data.claims), info, exp));
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
    // One purpose in the claim is the request's purpose; several leave the
    // choice to the header (none chosen: no purpose stated).
    if let Some(mut codes) = c.purpose_of_use.as_ref().map(PurposeClaim::codes)
        && codes.len() == 1
        && let Some(purpose) = codes.pop()
    {
        p = p.with_purpose(purpose);
    }
    p
}

/// The base64url-decoded JSON of a compact JWS's header, checked for what
/// `jsonwebtoken`'s `Header` does not carry: a `crit` header (RFC 7515
/// 4.1.11) lists extensions the recipient must understand, and this
/// server understands none, so any `crit` is refused.
fn check_raw_header(token: &str) -> Result<(), ApiError> {
    use base64::Engine;
    let not_jwt = || unauthorized("the bearer token is not a compact JWS (three base64url parts)");
    let mut parts = token.split('.');
    let (Some(head), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(not_jwt());
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head)
        .map_err(|_| not_jwt())?;
    let json: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| not_jwt())?;
    let Some(obj) = json.as_object() else {
        return Err(not_jwt());
    };
    if let Some(crit) = obj.get("crit") {
        return Err(unauthorized(format!(
            "token header crit {crit} names extensions this server does not understand"
        )));
    }
    Ok(())
}

/// The order of P-256 and P-384 (big-endian).
const P256_N: &str = "ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551";
const P384_N: &str = "ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf581a0db248b0a77aecec196accc52973";

/// Refuses an ECDSA signature whose `s` is above half the curve order.
/// `(r, s)` and `(r, n − s)` both verify; accepting only the low one
/// makes the signature (and so the token's bytes) unique, so a token
/// cannot be re-signed into a different string that still verifies.
fn check_low_s(token: &str, alg: Algorithm) -> Result<(), ApiError> {
    let Some((n, len)) = curve_order(alg) else {
        return Ok(());
    };
    let sig = signature_bytes(token)
        .filter(|s| s.len() == 2 * len)
        .ok_or_else(|| unauthorized("the ECDSA signature is not r || s of the curve's size"))?;
    if is_high(&sig[len..], &n) {
        return Err(unauthorized(
            "the ECDSA signature's s is in the upper half of the curve order (high-S)",
        ));
    }
    Ok(())
}

/// The curve order (big-endian) and scalar size of an ECDSA algorithm.
fn curve_order(alg: Algorithm) -> Option<(Vec<u8>, usize)> {
    let (n_hex, len) = match alg {
        Algorithm::ES256 => (P256_N, 32),
        Algorithm::ES384 => (P384_N, 48),
        _ => return None,
    };
    hex::decode(n_hex).ok().map(|n| (n, len))
}

fn signature_bytes(token: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let sig = token.rsplit('.').next()?;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(sig)
        .ok()
}

/// Whether big-endian `s` (as long as `n`) is above floor(n / 2).
fn is_high(s: &[u8], n: &[u8]) -> bool {
    // half = floor(n / 2): shift the big-endian bytes right by one bit.
    let mut half = vec![0u8; n.len()];
    let mut carry = 0u8;
    for (i, b) in n.iter().enumerate() {
        half[i] = (b >> 1) | (carry << 7);
        carry = b & 1;
    }
    s > &half[..]
}

/// A signed ES256/ES384 token with a high `s` turned into its low twin
/// (`n − s`, equally valid), so the server accepts it; other tokens are
/// returned as they are. ECDSA signers are not bound to produce low-S
/// (ring, OpenSSL and RustCrypto's P-256 do not), so the dev issuer
/// normalises what it mints, and other issuers must too.
pub fn to_low_s(token: &str) -> String {
    use base64::Engine;
    let Some((n, len)) = jsonwebtoken::decode_header(token)
        .ok()
        .and_then(|h| curve_order(h.alg))
    else {
        return token.to_owned();
    };
    let Some(mut sig) = signature_bytes(token).filter(|s| s.len() == 2 * len) else {
        return token.to_owned();
    };
    if !is_high(&sig[len..], &n) {
        return token.to_owned();
    }
    // s := n - s, big-endian with borrow.
    let mut borrow = 0i16;
    for i in (0..len).rev() {
        let mut d = i16::from(n[i]) - i16::from(sig[len + i]) - borrow;
        borrow = i16::from(d < 0);
        if d < 0 {
            d += 256;
        }
        sig[len + i] = d as u8;
    }
    let signed = token.rsplit_once('.').map_or(token, |(m, _)| m);
    format!(
        "{signed}.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig)
    )
}

/// The header a request states its purpose of use in (HL7 v3
/// PurposeOfUse codes: `TREAT`, `ETREAT`, `HPAYMT`, `HRESCH`, ...).
pub const PURPOSE_HEADER: &str = "x-purpose-of-use";

/// A verified bearer token: the principal and what else the token said
/// (expiry, raw scopes, FHIRcast topic). The extractor of paths whose
/// answer outlives the request.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub principal: Principal,
    pub info: TokenInfo,
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Authenticated::from_request_parts(parts, state)
            .await
            .map(|a| a.principal)
    }
}

impl FromRequestParts<AppState> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // A token in the URL ends up in logs, proxies and browser history:
        // refused even next to a good header (RFC 6750 2.3 is optional).
        let in_query = parts.uri.query().is_some_and(|q| {
            url::form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k == "access_token")
        });
        if in_query {
            return Err(refused(
                Refusal::Request,
                "an access_token query parameter was sent (tokens are taken from the Authorization header only)",
            ));
        }
        let Some(value) = parts.headers.get(axum::http::header::AUTHORIZATION) else {
            return Err(refused(Refusal::Missing, "no Authorization header"));
        };
        let Ok(text) = value.to_str() else {
            return Err(refused(
                Refusal::Request,
                "the Authorization header is not text",
            ));
        };
        let Some(token) = text
            .strip_prefix("Bearer ")
            .or_else(|| text.strip_prefix("bearer "))
        else {
            return Err(refused(
                Refusal::Request,
                "the Authorization header is not 'Bearer <token>'",
            ));
        };
        let (mut who, info) = state
            .auth
            .verify_info(token.trim())
            .map_err(|e| refused(Refusal::Token, &e.message))?;
        let header = match parts.headers.get(PURPOSE_HEADER) {
            None => None,
            Some(v) => Some(
                v.to_str()
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
                            "…",
                            "a purpose of use is one code (TREAT, HPAYMT, HRESCH, ...)",
                        )
                    })?
                    .to_owned(),
            ),
        };
        atlas_access::facts::note(|f| {
            f.subject = Some(who.subject.clone());
            f.issuer = Some(who.issuer.clone());
            f.client = who.client_id.clone();
            f.purpose = who.purpose.clone();
            f.purpose_claim = info.purposes.clone();
            f.purpose_header = header.clone();
            f.patient_binding = who.patient.clone();
            f.scopes = info.scopes.clone();
            f.roles = who.roles.clone();
        });
        if let Some(h) = header {
            purpose_from_header(&h, info.purposes.as_deref(), &state.config.auth)?;
            who.purpose = Some(h);
            atlas_access::facts::note(|f| f.purpose = who.purpose.clone());
        }
        // The principal's turn (`[limits] max_concurrent_per_principal`).
        crate::limits::admit(parts, state, &who).await;
        Ok(Authenticated {
            principal: who,
            info,
        })
    }
}

/// Whether a request may state `header` as its purpose of use: the header
/// narrows the token's claim to one of the purposes it lists and never
/// names another; a token with no claim may use it only when the
/// deployment says so (`[auth] purpose_header_without_claim`).
fn purpose_from_header(
    header: &str,
    claim: Option<&[String]>,
    config: &AuthConfig,
) -> Result<(), ApiError> {
    let reason = match claim {
        Some(list) if list.iter().any(|c| c == header) => return Ok(()),
        None if config.purpose_header_without_claim => return Ok(()),
        Some(list) => format!(
            "X-Purpose-Of-Use {header} is not among the token's purpose_of_use claim ({})",
            if list.is_empty() {
                "empty".to_owned()
            } else {
                list.join(" ")
            }
        ),
        None => format!(
            "X-Purpose-Of-Use {header} sent with a token that has no purpose_of_use claim \
             ([auth] purpose_header_without_claim is off)"
        ),
    };
    tracing::info!(reason = %reason, "request refused: 403");
    atlas_access::facts::note(|f| f.reason = Some(reason));
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "PurposeNotPermitted",
        "X-Purpose-Of-Use",
        header,
        "this purpose of use is not permitted for this token",
    ))
}

/// Refuses the dev issuer on an address other machines can reach unless
/// `allow_remote` says so: anyone who can read the lake can mint its
/// tokens, so a dev-auth server is for one machine.
pub fn check_dev_auth_bind(
    auth: &AuthConfig,
    bind: std::net::SocketAddr,
    allow_remote: bool,
) -> Result<(), String> {
    if auth.dev && !bind.ip().is_loopback() && !allow_remote {
        return Err(format!(
            "dev auth (--dev-auth or [auth] dev) trusts tokens anyone who can read the lake can mint; \
             it is refused on {bind}, which is not a loopback address. Bind 127.0.0.1, or pass \
             --allow-remote-dev-auth if you really mean it"
        ));
    }
    Ok(())
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
            purpose_of_use: request.purpose.as_ref().map(|p| {
                let codes = PurposeClaim::One(p.clone()).codes();
                match <[String; 1]>::try_from(codes) {
                    Ok([one]) => PurposeClaim::One(one),
                    Err(many) => PurposeClaim::Many(many),
                }
            }),
            hub_topic: request.fhircast_topic.clone(),
        };
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(DEV_KID.to_owned());
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ec_der(&self.pkcs8))
            .map(|t| to_low_s(&t))
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
    /// The `purpose_of_use` claim: one code, or several separated by
    /// commas (`TREAT,HRESCH`: the request header then picks one).
    pub purpose: Option<String>,
    /// The FHIRcast topic the token binds its holder to (`hub.topic`).
    pub fhircast_topic: Option<String>,
}

/// The key files a lake holds (the dev issuer's signing key, the
/// page-token key).
pub const KEY_FILES: &[&str] = &[DEV_KEY_PATH, atlas_access::token::KEY_PATH];

/// The path of `path` on disk, for a lake on the local file system.
fn local_file(lake: &Lake, path: &str) -> Option<PathBuf> {
    if !lake.is_local() {
        return None;
    }
    lake.root().to_file_path().ok().map(|root| root.join(path))
}

/// The lake's key files that others than their owner may read (group or
/// world permission bits), with their mode: `atlas serve` warns about each.
pub fn exposed_key_files(lake: &Lake) -> Vec<String> {
    KEY_FILES
        .iter()
        .filter_map(|k| {
            let file = local_file(lake, k)?;
            let mode = file_mode(&file)?;
            (mode & 0o077 != 0).then(|| {
                format!(
                    "{} is readable by others (mode {mode:o}); chmod 600 it",
                    file.display()
                )
            })
        })
        .collect()
}

#[cfg(unix)]
fn file_mode(file: &std::path::Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(file)
        .ok()
        .map(|m| m.permissions().mode() & 0o777)
}

#[cfg(not(unix))]
fn file_mode(_: &std::path::Path) -> Option<u32> {
    None
}

/// [`read_or_create`] on a local disk: the key is written to a private
/// (0600) temporary file, then linked into place create-only, so a racing
/// process either wins or reads the winner's whole key, and the key is
/// never readable by others, not even for a moment.
fn local_read_or_create(
    file: &std::path::Path,
    path: &str,
    make: impl FnOnce() -> Result<Vec<u8>, String>,
) -> Result<Vec<u8>, String> {
    use std::io::Write;
    let err = |e: std::io::Error| format!("{path}: {e}");
    match std::fs::read(file) {
        Ok(b) => {
            if file_mode(file).is_some_and(|m| m & 0o077 != 0) {
                tracing::warn!(file = %file.display(), "key file is readable by others; chmod 600 it");
            }
            return Ok(b);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let fresh = make()?;
    let dir = file
        .parent()
        .ok_or_else(|| format!("{path}: no parent directory"))?;
    std::fs::create_dir_all(dir).map_err(err)?;
    let mut suffix = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut suffix)
        .map_err(|e| format!("{path}: {e}"))?;
    let tmp = dir.join(format!(".key-{}.tmp", hex::encode(suffix)));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let written = opts.open(&tmp).and_then(|mut f| {
        f.write_all(&fresh)?;
        f.sync_all()
    });
    let linked = written.and_then(|_| std::fs::hard_link(&tmp, file));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(fresh),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => std::fs::read(file).map_err(err),
        Err(e) => Err(err(e)),
    }
}

/// The bytes at `path` in the lake, written by `make` first if absent. The
/// write is create-only, so two processes racing agree on the one that won.
/// On a local lake the file is private to its owner (0600).
pub(crate) async fn read_or_create(
    lake: &Lake,
    path: &str,
    make: impl FnOnce() -> Result<Vec<u8>, String>,
) -> Result<Vec<u8>, String> {
    use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
    if let Some(file) = local_file(lake, path) {
        return local_read_or_create(&file, path, make);
    }
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
