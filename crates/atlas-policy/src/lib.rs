//! The access seam: one place where access is decided.
//!
//! # What this crate owns
//! * [`Principal`]: who is asking, as established by authentication (the
//!   token's subject, issuer, client, SMART scopes and `patient` claim).
//! * [`SmartScope`]: SMART on FHIR scopes in v1 (`patient/Observation.read`,
//!   `user/*.*`) and v2 (`user/*.rs`, `system/Patient.cruds`) syntax.
//! * [`PolicyEngine`]: given a principal, a resource type and an action,
//!   a [`Decision`] made *before* any data is read: denied (with the reason),
//!   or allowed with a [`RowScope`] (all rows, or only the listed patients'
//!   compartments). Every serving path (object sets, aggregates, GraphQL,
//!   FHIR REST, streaming, export, AI context) asks this one engine and
//!   applies the scope to every table it reads, before filters, sorts,
//!   counts and page tokens are evaluated.
//!
//! The rules today are the SMART ones: a resource type is readable when a
//! scope grants read or search on it; a token with a `patient` claim (or
//! only `patient/` scopes) sees only that patient's compartment. Row-level
//! rules from a policy file, hidden fields and purpose of use build on the
//! same [`Decision`].
//!
//! # What it may call
//! Nothing but `std` and `thiserror`: no I/O, no query engine. Turning a
//! [`RowScope`] into a predicate is the caller's job (it knows the columns).
//!
//! ```
//! use atlas_policy::{Action, Decision, PolicyEngine, Principal};
//! let alice = Principal::new("alice", "atlas-dev")
//!     .with_scopes("patient/Observation.rs openid")
//!     .with_patient("42");
//! let engine = PolicyEngine::default();
//! match engine.decide(&alice, "Observation", Action::Search) {
//!     Decision::Allow(scope) => assert_eq!(scope.patients(), Some(&["42".to_string()][..])),
//!     Decision::Deny(d) => panic!("{d}"),
//! }
//! assert!(matches!(engine.decide(&alice, "Condition", Action::Read), Decision::Deny(_)));
//! ```

use std::fmt;

/// The launch context a SMART scope is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScopeContext {
    /// `patient/`: only the in-context patient's data.
    Patient,
    /// `user/`: what the user may see.
    User,
    /// `system/`: a backend service.
    System,
}

/// What a request does with a resource type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Read one object or resource by its key.
    Read,
    /// Search, list, page, aggregate or stream.
    Search,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Read => "read",
            Action::Search => "search",
        }
    }
}

/// One SMART resource scope.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SmartScope {
    pub context: ScopeContext,
    /// `None` for `*`.
    pub resource_type: Option<String>,
    pub read: bool,
    pub search: bool,
    /// The scope as written, for explanations.
    pub text: String,
}

impl SmartScope {
    /// Parses one scope; `None` for scopes that are not resource scopes
    /// (`openid`, `launch/patient`, `offline_access`, ...) or are malformed.
    ///
    /// v1 permissions: `read`, `write`, `*`. v2: a non-empty, ordered subset
    /// of `cruds` (`rs`, `cruds`); v2 query parameters (`?category=...`) are
    /// not supported yet, and such scopes grant nothing rather than more.
    pub fn parse(text: &str) -> Option<SmartScope> {
        let (context, rest) = text.split_once('/')?;
        let context = match context {
            "patient" => ScopeContext::Patient,
            "user" => ScopeContext::User,
            "system" => ScopeContext::System,
            _ => return None,
        };
        let (resource, perms) = rest.split_once('.')?;
        let resource_type = match resource {
            "*" => None,
            r if !r.is_empty() && r.bytes().all(|b| b.is_ascii_alphanumeric()) => {
                Some(r.to_owned())
            }
            _ => return None,
        };
        let (read, search) = match perms {
            "read" | "*" => (true, true),
            "write" => (false, false),
            v2 => {
                if v2.is_empty() || v2.contains('?') || !is_ordered_subset(v2, "cruds") {
                    return None;
                }
                (v2.contains('r'), v2.contains('s'))
            }
        };
        Some(SmartScope {
            context,
            resource_type,
            read,
            search,
            text: text.to_owned(),
        })
    }

    fn grants(&self, resource_type: &str, action: Action) -> bool {
        let type_ok = self
            .resource_type
            .as_deref()
            .is_none_or(|t| t == resource_type);
        type_ok
            && match action {
                Action::Read => self.read,
                Action::Search => self.search,
            }
    }
}

/// True when every letter of `s` is in `of`, in `of`'s order, once.
fn is_ordered_subset(s: &str, of: &str) -> bool {
    let mut rest = of.chars();
    s.chars().all(|c| rest.by_ref().any(|o| o == c))
}

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's `sub`.
    pub subject: String,
    /// The token's `iss`.
    pub issuer: String,
    /// The OAuth client (`client_id` or `azp`), when the token names one.
    pub client_id: Option<String>,
    /// The resource scopes granted; other scopes are dropped.
    pub scopes: Vec<SmartScope>,
    /// The SMART `patient` launch context: when set, only this patient's
    /// compartment is visible, whatever the scopes say.
    pub patient: Option<String>,
}

impl Principal {
    pub fn new(subject: impl Into<String>, issuer: impl Into<String>) -> Principal {
        Principal {
            subject: subject.into(),
            issuer: issuer.into(),
            client_id: None,
            scopes: Vec::new(),
            patient: None,
        }
    }

    /// Adds the resource scopes of a space-separated scope string.
    pub fn with_scopes(mut self, scopes: &str) -> Principal {
        self.scopes
            .extend(scopes.split_whitespace().filter_map(SmartScope::parse));
        self
    }

    pub fn with_patient(mut self, patient: impl Into<String>) -> Principal {
        self.patient = Some(patient.into());
        self
    }

    pub fn with_client(mut self, client: impl Into<String>) -> Principal {
        self.client_id = Some(client.into());
        self
    }

    /// A stable identity for binding things (page tokens) to this principal:
    /// issuer and subject.
    pub fn key(&self) -> String {
        format!("{}\u{1f}{}", self.issuer, self.subject)
    }
}

/// Which rows of an allowed resource type a request may read.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RowScope {
    /// Every row.
    All,
    /// Only rows in these patients' compartments (sorted, distinct).
    Patients(Vec<String>),
}

impl RowScope {
    /// The patients the scope is limited to; `None` for all rows.
    pub fn patients(&self) -> Option<&[String]> {
        match self {
            RowScope::All => None,
            RowScope::Patients(p) => Some(p),
        }
    }

    /// Whether a row of this patient is inside the scope.
    pub fn admits(&self, patient: Option<&str>) -> bool {
        match self {
            RowScope::All => true,
            RowScope::Patients(p) => patient.is_some_and(|x| p.iter().any(|y| y == x)),
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub resource_type: String,
    pub action: Action,
    pub reason: String,
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} on {} is not allowed: {}",
            self.action.as_str(),
            self.resource_type,
            self.reason
        )
    }
}

/// The outcome of one access check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow(RowScope),
    Deny(Denial),
}

/// Decides access. One instance serves every path of a server.
#[derive(Debug, Clone, Default)]
pub struct PolicyEngine {}

impl PolicyEngine {
    /// May `who` do `action` on `resource_type`, and on which rows?
    ///
    /// * Some scope must grant the action on the type (`*` matches any type).
    /// * A `patient` claim limits every type to that patient's compartment.
    /// * Granted only by `patient/` scopes without a `patient` claim: denied
    ///   (there is no patient in context to scope to).
    pub fn decide(&self, who: &Principal, resource_type: &str, action: Action) -> Decision {
        let granting: Vec<&SmartScope> = who
            .scopes
            .iter()
            .filter(|s| s.grants(resource_type, action))
            .collect();
        let deny = |reason: String| {
            Decision::Deny(Denial {
                resource_type: resource_type.to_owned(),
                action,
                reason,
            })
        };
        if granting.is_empty() {
            let held: Vec<&str> = who.scopes.iter().map(|s| s.text.as_str()).collect();
            return deny(format!(
                "no scope grants it (token scopes: {})",
                if held.is_empty() {
                    "none".to_owned()
                } else {
                    held.join(" ")
                }
            ));
        }
        if let Some(p) = &who.patient {
            return Decision::Allow(RowScope::Patients(vec![p.clone()]));
        }
        if granting.iter().all(|s| s.context == ScopeContext::Patient) {
            return deny(
                "only patient/ scopes grant it and the token has no patient in context".to_owned(),
            );
        }
        Decision::Allow(RowScope::All)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_in_v1_and_v2_syntax() {
        let s = SmartScope::parse("patient/Observation.read").unwrap();
        assert_eq!(s.context, ScopeContext::Patient);
        assert_eq!(s.resource_type.as_deref(), Some("Observation"));
        assert!(s.read && s.search);
        let s = SmartScope::parse("user/*.rs").unwrap();
        assert_eq!((s.resource_type, s.read, s.search), (None, true, true));
        let s = SmartScope::parse("system/Patient.r").unwrap();
        assert!(s.read && !s.search);
        let s = SmartScope::parse("user/Patient.cu").unwrap();
        assert!(!s.read && !s.search);
        for bad in [
            "openid",
            "launch/patient",
            "user/Patient",
            "user/.rs",
            "user/Patient.sr",
            "user/Patient.rr",
            "user/Patient.rs?category=x",
            "admin/*.rs",
            "user/Pa-tient.rs",
            "user/Patient.",
        ] {
            assert_eq!(SmartScope::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn decisions_follow_scopes_and_patient_context() {
        let e = PolicyEngine::default();
        let user = Principal::new("u", "i").with_scopes("user/*.rs");
        assert_eq!(
            e.decide(&user, "Condition", Action::Search),
            Decision::Allow(RowScope::All)
        );
        let bound = user.clone().with_patient("p1");
        assert_eq!(
            e.decide(&bound, "Condition", Action::Read),
            Decision::Allow(RowScope::Patients(vec!["p1".into()]))
        );
        let read_only = Principal::new("u", "i").with_scopes("user/Observation.r");
        assert!(matches!(
            e.decide(&read_only, "Observation", Action::Search),
            Decision::Deny(_)
        ));
        assert!(matches!(
            e.decide(&read_only, "Observation", Action::Read),
            Decision::Allow(RowScope::All)
        ));
        let nothing = Principal::new("u", "i").with_scopes("openid fhirUser");
        match e.decide(&nothing, "Patient", Action::Read) {
            Decision::Deny(d) => assert!(d.to_string().contains("token scopes: none"), "{d}"),
            other => panic!("{other:?}"),
        }
        let patient_scopes_only = Principal::new("u", "i").with_scopes("patient/*.rs");
        assert!(matches!(
            e.decide(&patient_scopes_only, "Patient", Action::Read),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn row_scope_admits_only_its_patients() {
        let s = RowScope::Patients(vec!["a".into()]);
        assert!(s.admits(Some("a")));
        assert!(!s.admits(Some("b")));
        assert!(!s.admits(None));
        assert!(RowScope::All.admits(None));
    }
}
