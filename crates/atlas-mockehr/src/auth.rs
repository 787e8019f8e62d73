//! SMART Backend Services: the token endpoint (client_credentials with a
//! private_key_jwt assertion signed RS384 or ES384), the registered
//! clients, SMART v1/v2 system scopes, and the bearer check every data
//! endpoint makes. Issued tokens live on the wall clock.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rand::RngCore;
use serde_json::{Value, json};

use crate::config::ClientRegistration;
use crate::respond::{error, set_header, with_body};
use crate::{MockEhr, MockError};

/// The longest assertion lifetime SMART allows: `exp` at most 5 minutes ahead.
const MAX_ASSERTION_SECS: u64 = 300;

/// One SMART scope: `system/Patient.rs`, `system/*.read`, ...
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Scope {
    context: String,
    /// `None` for `*`.
    ty: Option<String>,
    /// The v2 letters this scope grants (`read` = `rs`, `write` = `cud`).
    perms: String,
}

impl Scope {
    pub fn parse(text: &str) -> Option<Scope> {
        let (context, rest) = text.split_once('/')?;
        // v2 scopes may carry search parameters (`?category=...`); the
        // mock grants the whole type.
        let rest = rest.split('?').next()?;
        let (ty, perm) = rest.split_once('.')?;
        let perms = match perm {
            "read" => "rs".to_string(),
            "write" => "cud".to_string(),
            "*" => "cruds".to_string(),
            p if !p.is_empty() && p.chars().all(|c| "cruds".contains(c)) => p.to_string(),
            _ => return None,
        };
        let ty = (ty != "*").then(|| ty.to_string());
        Some(Scope {
            context: context.to_string(),
            ty,
            perms,
        })
    }

    /// True when this (allowed) scope grants everything `wanted` asks.
    fn covers(&self, wanted: &Scope) -> bool {
        self.context == wanted.context
            && (self.ty.is_none() || self.ty == wanted.ty)
            && wanted.perms.chars().all(|c| self.perms.contains(c))
    }

    fn reads(&self, ty: &str) -> bool {
        self.context == "system"
            && self.ty.as_deref().is_none_or(|t| t == ty)
            && (self.perms.contains('r') || self.perms.contains('s'))
    }
}

/// A registered client, its keys parsed.
pub(crate) struct Client {
    pub id: String,
    keys: JwkSet,
    allowed: Vec<Scope>,
    jku: Option<String>,
}

impl Client {
    pub fn from_registration(reg: &ClientRegistration) -> Result<Client, MockError> {
        let bad = |what: String| MockError::Config(format!("client {}: {what}", reg.client_id));
        let jwks = match &reg.jwks {
            // TOML has no JSON: a string is JSON text or the path of a JWKS file.
            Value::String(s) if s.trim_start().starts_with('{') => {
                serde_json::from_str(s).map_err(|e| bad(format!("jwks: {e}")))?
            }
            Value::String(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| bad(format!("jwks file {path}: {e}")))?;
                serde_json::from_str(&text).map_err(|e| bad(format!("jwks file {path}: {e}")))?
            }
            other => other.clone(),
        };
        let keys: JwkSet =
            serde_json::from_value(jwks).map_err(|e| bad(format!("jwks is not a JWKS: {e}")))?;
        let allowed = reg
            .scopes
            .iter()
            .map(|s| {
                Scope::parse(s).ok_or_else(|| bad(format!("scope {s:?} is not a SMART scope")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Client {
            id: reg.client_id.clone(),
            keys,
            allowed,
            jku: reg.jku.clone(),
        })
    }
}

/// What a bearer token grants.
#[derive(Debug, Clone)]
pub(crate) struct Grant {
    pub client_id: String,
    scopes: Vec<Scope>,
    expires: Instant,
}

impl Grant {
    /// The grant every request has when `require_auth` is off.
    pub fn open() -> Grant {
        Grant {
            client_id: "anonymous".into(),
            scopes: vec![Scope {
                context: "system".into(),
                ty: None,
                perms: "cruds".into(),
            }],
            expires: Instant::now() + Duration::from_secs(365 * 24 * 3600),
        }
    }

    pub fn can_read(&self, ty: &str) -> bool {
        self.scopes.iter().any(|s| s.reads(ty))
    }
}

#[derive(Default)]
pub(crate) struct AuthState {
    tokens: HashMap<String, Grant>,
    /// `(iss, jti)` of every assertion accepted: a replay is refused.
    seen: HashSet<(String, String)>,
}

impl AuthState {
    pub fn revoke(&mut self, token: &str) {
        self.tokens.remove(token);
    }
}

/// An OAuth error answer.
fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    tracing::debug!(error, description, "mock EHR refused a token request");
    let body = json!({"error": error, "error_description": description});
    let mut r = with_body(status, "application/json", body.to_string());
    set_header(&mut r, header::CACHE_CONTROL, "no-store");
    r
}

fn invalid_client(description: &str) -> Response {
    oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", description)
}

/// `POST /auth/token`.
pub(crate) fn token(ehr: &MockEhr, form: &[(String, String)]) -> Response {
    let field = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if field("grant_type") != Some("client_credentials") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "grant_type must be client_credentials",
        );
    }
    if field("client_assertion_type")
        != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "client_assertion_type must be urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        );
    }
    let (Some(assertion), Some(scope)) = (field("client_assertion"), field("scope")) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "client_assertion and scope are required",
        );
    };
    let client = match verify_assertion(ehr, assertion, field("client_id")) {
        Ok(c) => c,
        Err(why) => return invalid_client(&why),
    };
    grant(ehr, client, scope)
}

/// Checks the assertion; the registered client it authenticates, or why not.
fn verify_assertion<'a>(
    ehr: &'a MockEhr,
    jwt: &str,
    client_id: Option<&str>,
) -> Result<&'a Client, String> {
    let mut parts = jwt.split('.');
    let (Some(h), Some(c), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("client_assertion is not a compact JWS".into());
    };
    let header = decode_segment(h).ok_or("the JWT header is not base64url JSON")?;
    let claims = decode_segment(c).ok_or("the JWT claims are not base64url JSON")?;
    let (alg, kid) = check_header(&header)?;
    let iss = claims
        .get("iss")
        .and_then(Value::as_str)
        .ok_or("the assertion has no iss")?;
    let client = ehr
        .clients
        .iter()
        .find(|c| c.id == iss)
        .ok_or_else(|| format!("no client {iss:?} is registered"))?;
    if client_id.is_some_and(|id| id != iss) {
        return Err("client_id differs from the assertion's iss".into());
    }
    if let Some(jku) = header.get("jku")
        && (jku.as_str().is_none() || client.jku.as_deref() != jku.as_str())
    {
        return Err("the jku header is not the client's allow-listed JWKS URL".into());
    }
    let key = key_for(client, kid, alg)?;
    let mut validation = Validation::new(alg);
    // The claims are checked below, each with its own message.
    validation.validate_exp = false;
    validation.validate_aud = false;
    validation.required_spec_claims = HashSet::new();
    jsonwebtoken::decode::<Value>(jwt, &key, &validation)
        .map_err(|e| format!("the signature does not verify: {e}"))?;
    check_claims(ehr, &claims, iss)?;
    Ok(client)
}

/// The header's algorithm (RS384 or ES384 only: no `none`, no HMAC) and `kid`.
fn check_header(header: &Value) -> Result<(Algorithm, &str), String> {
    let alg = match header.get("alg").and_then(Value::as_str) {
        Some("RS384") => Algorithm::RS384,
        Some("ES384") => Algorithm::ES384,
        other => return Err(format!("alg {other:?}: only RS384 and ES384 are accepted")),
    };
    if header.get("typ").and_then(Value::as_str) != Some("JWT") {
        return Err("the JWT header's typ must be JWT".into());
    }
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or("the JWT header has no kid")?;
    Ok((alg, kid))
}

/// The client's key `kid`, if its type fits `alg`.
fn key_for(client: &Client, kid: &str, alg: Algorithm) -> Result<DecodingKey, String> {
    let jwk = client
        .keys
        .find(kid)
        .ok_or_else(|| format!("kid {kid:?} is not in the client's JWKS"))?;
    let fits = match (&jwk.algorithm, alg) {
        (AlgorithmParameters::RSA(_), Algorithm::RS384) => true,
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES384) => p.curve == EllipticCurve::P384,
        _ => false,
    };
    if !fits
        || jwk
            .common
            .key_algorithm
            .is_some_and(|a| format!("{a:?}") != format!("{alg:?}"))
    {
        return Err(format!("key {kid:?} is not a {alg:?} key"));
    }
    DecodingKey::from_jwk(jwk).map_err(|e| format!("key {kid:?}: {e}"))
}

fn check_claims(ehr: &MockEhr, claims: &Value, iss: &str) -> Result<(), String> {
    if claims.get("sub").and_then(Value::as_str) != Some(iss) {
        return Err("sub must equal iss (the client_id)".into());
    }
    let token_url = ehr.urls().map(|u| u.token_url.as_str()).unwrap_or("");
    let aud_ok = match claims.get("aud") {
        Some(Value::String(a)) => a == token_url,
        Some(Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(token_url)),
        _ => false,
    };
    if !aud_ok {
        return Err(format!("aud must be the token URL {token_url}"));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let exp = claims
        .get("exp")
        .and_then(Value::as_u64)
        .ok_or("exp is missing or not a number")?;
    if exp <= now {
        return Err("the assertion has expired".into());
    }
    if exp > now + MAX_ASSERTION_SECS {
        return Err("exp is more than 5 minutes in the future".into());
    }
    let jti = claims
        .get("jti")
        .and_then(Value::as_str)
        .ok_or("jti is missing")?;
    let mut auth = ehr.lock_auth();
    if !auth.seen.insert((iss.to_string(), jti.to_string())) {
        return Err("jti was already used".into());
    }
    Ok(())
}

/// Grants the requested scopes the client may have, and issues a token.
fn grant(ehr: &MockEhr, client: &Client, scope: &str) -> Response {
    let mut granted = Vec::new();
    let mut text = Vec::new();
    for s in scope.split_whitespace() {
        if let Some(parsed) = Scope::parse(s).filter(|p| client.allowed.iter().any(|a| a.covers(p)))
        {
            granted.push(parsed);
            text.push(s);
        }
    }
    if granted.is_empty() {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            "none of the requested scopes is allowed for this client",
        );
    }
    let mut bytes = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut bytes);
    let token = hex::encode(bytes);
    let ttl = ehr.config.token_ttl_secs;
    ehr.lock_auth().tokens.insert(
        token.clone(),
        Grant {
            client_id: client.id.clone(),
            scopes: granted,
            expires: Instant::now() + Duration::from_secs(ttl),
        },
    );
    let body = json!({
        "access_token": token,
        "token_type": "bearer",
        "expires_in": ttl,
        "scope": text.join(" "),
    });
    let mut r = with_body(StatusCode::OK, "application/json", body.to_string());
    set_header(&mut r, header::CACHE_CONTROL, "no-store");
    r
}

/// The bearer token of a request, if any.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The grant behind the request's bearer token, or the 401 to answer.
pub(crate) fn check(ehr: &MockEhr, headers: &HeaderMap) -> Result<Grant, Response> {
    if !ehr.config.require_auth {
        return Ok(Grant::open());
    }
    let unauthorized = |why: &str| {
        let mut r = error(StatusCode::UNAUTHORIZED, "login", why);
        set_header(
            &mut r,
            header::WWW_AUTHENTICATE,
            "Bearer error=\"invalid_token\"",
        );
        r
    };
    let Some(token) = bearer(headers) else {
        return Err(unauthorized("a bearer token is required"));
    };
    let mut auth = ehr.lock_auth();
    match auth.tokens.get(token) {
        Some(g) if g.expires > Instant::now() => Ok(g.clone()),
        Some(_) => {
            auth.tokens.remove(token);
            Err(unauthorized("the access token has expired"))
        }
        None => Err(unauthorized("unknown or revoked access token")),
    }
}

/// A base64url (unpadded, RFC 7515) segment holding a JSON object.
fn decode_segment(seg: &str) -> Option<Value> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(seg)
        .ok()?;
    let value: Value = serde_json::from_slice(&bytes).ok()?;
    value.is_object().then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes() {
        let all = Scope::parse("system/*.rs").unwrap();
        assert!(all.covers(&Scope::parse("system/*.read").unwrap()));
        assert!(all.covers(&Scope::parse("system/Patient.rs").unwrap()));
        assert!(all.covers(&Scope::parse("system/Observation.rs?category=laboratory").unwrap()));
        assert!(!all.covers(&Scope::parse("system/*.write").unwrap()));
        assert!(!all.covers(&Scope::parse("patient/*.rs").unwrap()));
        let pat = Scope::parse("system/Patient.read").unwrap();
        assert!(pat.reads("Patient") && !pat.reads("Observation"));
        assert!(Scope::parse("openid").is_none());
        assert!(Scope::parse("system/*.xyz").is_none());
    }

    #[test]
    fn base64url() {
        assert_eq!(
            decode_segment("eyJhbGciOiJSUzM4NCJ9"),
            Some(json!({"alg": "RS384"}))
        );
        assert_eq!(decode_segment("e30="), None);
    }
}
