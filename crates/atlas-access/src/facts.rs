//! The facts a request's audit record is made of, gathered where they
//! happen: who asked (the `Principal`), each access decision (type, rules,
//! hidden fields), and what [`crate::Egress`] let out (rows, patients).
//!
//! The facts live in a task-local the HTTP layer's audit middleware sets
//! for each request ([`scoped`], [`sync_scoped`]); work that leaves the
//! task (GraphQL's batched loads, DataFusion's partitions) carries the
//! handle explicitly ([`current`]). Outside a request, noting does
//! nothing. Nothing noted here is a credential: reasons pass [`redact`].

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

/// What the handler learned while answering, for the record.
#[derive(Debug, Default, Clone)]
pub struct Facts {
    pub subject: Option<String>,
    pub issuer: Option<String>,
    pub client: Option<String>,
    pub purpose: Option<String>,
    /// The token's `purpose_of_use` claim (`None`: no claim).
    pub purpose_claim: Option<Vec<String>>,
    /// The `X-Purpose-Of-Use` header as sent.
    pub purpose_header: Option<String>,
    /// The token's `patient` claim.
    pub patient_binding: Option<String>,
    pub scopes: Vec<String>,
    pub roles: Vec<String>,
    /// Why the request was refused, in full.
    pub reason: Option<String>,
    /// A read by key that found the row outside the principal's scope.
    pub out_of_scope: bool,
    /// The answer's patients are not counted (aggregates): the record
    /// says `null`, not 0.
    pub patients_unknown: bool,
    pub resource_types: BTreeSet<String>,
    pub rules: BTreeSet<String>,
    pub denied: bool,
    pub fields_removed: BTreeSet<String>,
    pub rows: u64,
    /// The patients whose rows the answer holds (up to `MAX_PATIENTS`).
    pub patients: BTreeSet<String>,
    /// More distinct patients than `MAX_PATIENTS` were answered.
    pub patients_overflow: bool,
    /// The server ended the request itself (deadline, shutdown): why.
    pub cut: Option<&'static str>,
}

/// Distinct patients remembered per request; beyond, the record says "at
/// least this many".
const MAX_PATIENTS: usize = 100_000;

/// Patient ids listed in a record; above this only the count is written.
pub const LISTED_PATIENTS: usize = 20;

/// A patient whose row is in the answer.
pub fn note_patient(p: &str) {
    note(|f| add_patient(f, p));
}

/// Adds `p` to the answered patients (up to `MAX_PATIENTS`, then marks
/// the overflow).
pub fn add_patient(f: &mut Facts, p: &str) {
    if f.patients.len() < MAX_PATIENTS {
        if !f.patients.contains(p) {
            f.patients.insert(p.to_owned());
        }
    } else if !f.patients.contains(p) {
        f.patients_overflow = true;
    }
}

/// The current request's facts, to carry into work it spawns (GraphQL's
/// batched link loads run in tasks of their own).
pub fn current() -> Option<Arc<Mutex<Facts>>> {
    FACTS.try_with(|f| f.clone()).ok()
}

/// Runs `fut` with `facts` as the current request's facts.
pub async fn scoped<F: std::future::Future>(facts: Option<Arc<Mutex<Facts>>>, fut: F) -> F::Output {
    match facts {
        Some(f) => FACTS.scope(f, fut).await,
        None => fut.await,
    }
}

tokio::task_local! {
    static FACTS: Arc<Mutex<Facts>>;
}

/// Adds to the current request's facts (nothing outside a request, e.g.
/// in a streamed body's later polls).
pub fn note(f: impl FnOnce(&mut Facts)) {
    let _ = FACTS.try_with(|facts| {
        if let Ok(mut g) = facts.lock() {
            f(&mut g);
        }
    });
}

/// The decision for one resource type, noted.
pub fn note_decision(resource_type: &str, d: &atlas_policy::Decision) {
    note(|f| add_decision(f, resource_type, d));
}

/// Adds one decision to `f`.
pub fn add_decision(f: &mut Facts, resource_type: &str, d: &atlas_policy::Decision) {
    {
        f.resource_types.insert(resource_type.to_owned());
        match d {
            atlas_policy::Decision::Allow(g) => {
                f.rules.extend(g.rules.iter().cloned());
                f.fields_removed
                    .extend(g.hidden.iter().map(|h| format!("{resource_type}.{h}")));
            }
            atlas_policy::Decision::Deny(x) => {
                f.denied = true;
                f.rules.extend(x.rule.iter().cloned());
                if f.reason.is_none() {
                    f.reason = Some(redact(&x.to_string()));
                }
            }
        }
    }
}

/// Query parameters whose values are credentials, never recorded.
pub const SECRET_PARAMS: &[&str] = &[
    "access_token",
    "id_token",
    "refresh_token",
    "authorization",
    "client_secret",
    "password",
    "api_key",
    "apikey",
    // A `GET /events` ticket stands for a bearer token until it is used.
    "ticket",
];

/// `text` with every JWT-shaped run (`eyJ…` base64url, a dot, more
/// base64url: a JWS or JWE, signed or not) replaced by `[redacted]`.
pub fn redact(text: &str) -> String {
    let b = text.as_bytes();
    let is_b64 = |c: u8| c.is_ascii_alphanumeric() || c == b'-' || c == b'_';
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut copied = 0;
    while let Some(at) = text[i..].find("eyJ").map(|k| i + k) {
        // A token starts at a boundary, not inside a longer word.
        if at > 0 && is_b64(b[at - 1]) {
            i = at + 3;
            continue;
        }
        let mut j = at;
        let mut segments = 0;
        loop {
            let start = j;
            while j < b.len() && is_b64(b[j]) {
                j += 1;
            }
            if j > start {
                segments += 1;
            }
            if j < b.len() && b[j] == b'.' && segments > 0 {
                j += 1;
            } else {
                break;
            }
        }
        if segments >= 2 {
            out.push_str(&text[copied..at]);
            out.push_str("[redacted]");
            copied = j;
        }
        i = j.max(at + 3);
    }
    out.push_str(&text[copied..]);
    out
}

/// Runs `f` (a synchronous poll) with `facts` as the current request's
/// facts: a streamed body's later polls note into its request's record.
pub fn sync_scoped<R>(facts: Arc<Mutex<Facts>>, f: impl FnOnce() -> R) -> R {
    FACTS.sync_scope(facts, f)
}

/// Adds to `facts` directly (work running outside the request's task).
pub fn note_into(facts: &Mutex<Facts>, f: impl FnOnce(&mut Facts)) {
    if let Ok(mut g) = facts.lock() {
        f(&mut g);
    }
}
