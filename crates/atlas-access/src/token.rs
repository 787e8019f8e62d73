//! Page tokens: opaque, signed, and bound to who asked, what they asked and
//! the table versions the first page read.
//!
//! A token is `base64url(json) . base64url(hmac-sha256)` under a key kept in
//! the lake (`_atlas/serve/page-token.key`, created on first use, so every
//! server on one lake accepts the others' tokens). The JSON holds:
//! * `p`: a hash of the principal (issuer and subject): another user's
//!   token is refused;
//! * `r`: a hash of the normalised request (object set, filters, order,
//!   selection, narrowing parameters, not the page size): a token replayed
//!   on a different query is refused;
//! * `t`: the Delta version of every table the query reads: later pages
//!   read those versions (time travel), so an ingest that commits between
//!   pages changes nothing the client sees;
//! * `a`: the sort key of the last object served (keyset paging: the next
//!   page starts strictly after it, so no object is skipped or repeated);
//! * `e`: the expiry (Unix seconds).

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

use crate::AccessError;

pub const KEY_PATH: &str = "_atlas/serve/page-token.key";

/// What a page token carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageState {
    pub v: u8,
    pub p: String,
    pub r: String,
    pub t: BTreeMap<String, u64>,
    pub a: Vec<Json>,
    pub e: u64,
}

/// Issues and checks page tokens.
pub struct PageTokens {
    key: ring::hmac::Key,
    ttl_secs: u64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A short, stable hash of some text (hex).
pub fn digest(text: &str) -> String {
    hex::encode(&Sha256::digest(text.as_bytes())[..16])
}

fn invalid(name: &'static str, message: impl Into<String>) -> AccessError {
    AccessError::new(
        http::StatusCode::BAD_REQUEST,
        name,
        "pageToken",
        "…",
        message,
    )
}

impl PageTokens {
    /// Page tokens signed with `key` (the lake's page-token key, at
    /// [`KEY_PATH`]; at least 32 bytes).
    pub fn with_key(key: &[u8], ttl_secs: u64) -> Result<PageTokens, String> {
        if key.len() < 32 {
            return Err(format!("{KEY_PATH}: shorter than 32 bytes"));
        }
        Ok(PageTokens {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key),
            ttl_secs,
        })
    }

    /// A token for the page after `after`.
    pub fn issue(
        &self,
        principal: &str,
        request: &str,
        tables: BTreeMap<String, u64>,
        after: Vec<Json>,
    ) -> String {
        let state = PageState {
            v: 1,
            p: digest(principal),
            r: request.to_owned(),
            t: tables,
            a: after,
            e: now() + self.ttl_secs,
        };
        let body = serde_json::to_vec(&state).unwrap_or_default();
        let tag = ring::hmac::sign(&self.key, &body);
        format!("{}.{}", B64.encode(&body), B64.encode(tag.as_ref()))
    }

    /// Checks a token: signature, principal, request, expiry.
    pub fn read(
        &self,
        token: &str,
        principal: &str,
        request: &str,
    ) -> Result<PageState, AccessError> {
        let tampered = || {
            invalid(
                "InvalidPageToken",
                "the page token is not valid: it was altered, truncated or issued by another server",
            )
        };
        let (body, tag) = token.split_once('.').ok_or_else(tampered)?;
        let body = B64.decode(body).map_err(|_| tampered())?;
        let tag = B64.decode(tag).map_err(|_| tampered())?;
        ring::hmac::verify(&self.key, &body, &tag).map_err(|_| tampered())?;
        let state: PageState = serde_json::from_slice(&body).map_err(|_| tampered())?;
        if state.v != 1 {
            return Err(tampered());
        }
        if state.p != digest(principal) {
            return Err(invalid(
                "PageTokenForeign",
                "the page token was issued to another principal",
            ));
        }
        if state.r != request {
            return Err(invalid(
                "PageTokenMismatch",
                "the page token belongs to a different request: send the same object set, filters, order, selection and parameters as the first page",
            ));
        }
        if state.e < now() {
            return Err(invalid(
                "PageTokenExpired",
                "the page token has expired; start again from the first page",
            ));
        }
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_bind_principal_request_and_signature() {
        let t = PageTokens::with_key(&[7u8; 32], 60).expect("32-byte key");
        let mut tables = BTreeMap::new();
        tables.insert("observation".to_owned(), 3);
        let tok = t.issue("alice", "req1", tables.clone(), vec![Json::from("k")]);
        let s = t.read(&tok, "alice", "req1").unwrap();
        assert_eq!((s.t, s.a), (tables, vec![Json::from("k")]));
        assert_eq!(
            t.read(&tok, "bob", "req1").unwrap_err().name,
            "PageTokenForeign"
        );
        assert_eq!(
            t.read(&tok, "alice", "req2").unwrap_err().name,
            "PageTokenMismatch"
        );
        // Flip one character of the body: the signature no longer matches.
        let mut bytes = tok.clone().into_bytes();
        bytes[3] = if bytes[3] == b'A' { b'B' } else { b'A' };
        let bad = String::from_utf8(bytes).unwrap();
        assert_eq!(
            t.read(&bad, "alice", "req1").unwrap_err().name,
            "InvalidPageToken"
        );
        let other = PageTokens::with_key(&[8u8; 32], 60).expect("32-byte key");
        assert_eq!(
            other.read(&tok, "alice", "req1").unwrap_err().name,
            "InvalidPageToken"
        );
        for junk in ["", ".", "abc", "a.b.c", "%%%.%%%"] {
            assert_eq!(
                t.read(junk, "alice", "req1").unwrap_err().name,
                "InvalidPageToken"
            );
        }
        let expired = PageTokens::with_key(&[7u8; 32], 0).expect("32-byte key");
        let tok = expired.issue("alice", "r", BTreeMap::new(), vec![]);
        // `e` = now: still valid this second, expired after it. Rewind instead
        // of sleeping: re-sign a state whose expiry is in the past.
        let mut state = expired.read(&tok, "alice", "r").unwrap();
        state.e = 1;
        let body = serde_json::to_vec(&state).unwrap();
        let tag = ring::hmac::sign(&expired.key, &body);
        let old = format!("{}.{}", B64.encode(&body), B64.encode(tag.as_ref()));
        assert_eq!(
            expired.read(&old, "alice", "r").unwrap_err().name,
            "PageTokenExpired"
        );
    }
}
