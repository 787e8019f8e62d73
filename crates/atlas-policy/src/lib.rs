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
//! * [`Policy`] (module `rules`): the policy file (TOML): rules that allow
//!   or deny by subject, role or client, resource type and action, over
//!   patient sets (explicit ids, managing organization, general
//!   practitioner, care-team membership, a FHIRPath criterion), hiding
//!   fields by element path, and requiring a purpose of use. Deny wins;
//!   no rule means no access.
//!
//! A decision intersects the SMART scopes (the types and actions a token
//! may use; a `patient` claim narrows every type to that compartment) with
//! the policy. Patient sets that need data are resolved by a
//! [`PatientDirectory`] the caller provides.
//!
//! # What it may call
//! `std`, `serde`/`toml` (the policy file) and `thiserror`: no I/O, no query
//! engine. Turning a [`RowScope`] into a predicate is the caller's job (it
//! knows the columns); so is resolving patient sets (the directory).
//!
//! ```
//! use atlas_policy::{Action, Decision, PolicyEngine, Principal};
//! let alice = Principal::new("alice", "atlas-dev")
//!     .with_scopes("patient/Observation.rs openid")
//!     .with_patient("42");
//! let engine = PolicyEngine::default();
//! match engine.decide(&alice, "Observation", Action::Search) {
//!     Decision::Allow(grant) => assert_eq!(grant.rows.patients(), Some(&["42".to_string()][..])),
//!     Decision::Deny(d) => panic!("{d}"),
//! }
//! assert!(matches!(engine.decide(&alice, "Condition", Action::Read), Decision::Deny(_)));
//! ```

use std::fmt;

mod rules;

pub use rules::{
    Effect, NoDirectory, PatientDirectory, PatientSet, Policy, PolicyError, RoleMembers, Rule,
    RuleTrace,
};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
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
    /// Roles from the token's `roles` claim (the policy file adds more).
    pub roles: Vec<String>,
    /// The purpose of use the request states (`TREAT`, `HRESCH`, ...): the
    /// token's `purpose_of_use` claim when it names one, narrowed by the
    /// `X-Purpose-Of-Use` header to one of the claim's codes (the server
    /// refuses a header outside the claim; `docs/security.md` section 9).
    pub purpose: Option<String>,
}

impl Principal {
    pub fn new(subject: impl Into<String>, issuer: impl Into<String>) -> Principal {
        Principal {
            subject: subject.into(),
            issuer: issuer.into(),
            client_id: None,
            scopes: Vec::new(),
            patient: None,
            roles: Vec::new(),
            purpose: None,
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

    pub fn with_roles<S: Into<String>>(mut self, roles: impl IntoIterator<Item = S>) -> Principal {
        self.roles.extend(roles.into_iter().map(Into::into));
        self
    }

    pub fn with_purpose(mut self, purpose: impl Into<String>) -> Principal {
        self.purpose = Some(purpose.into());
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
    /// Every row except those in these patients' compartments (sorted,
    /// distinct); rows that belong to no patient stay visible.
    Except(Vec<String>),
}

impl RowScope {
    /// The patients the scope is limited to; `None` for all rows or all
    /// but some.
    pub fn patients(&self) -> Option<&[String]> {
        match self {
            RowScope::Patients(p) => Some(p),
            RowScope::All | RowScope::Except(_) => None,
        }
    }

    /// Whether a row of this patient is inside the scope.
    pub fn admits(&self, patient: Option<&str>) -> bool {
        match self {
            RowScope::All => true,
            RowScope::Patients(p) => {
                patient.is_some_and(|x| p.binary_search_by(|y| y.as_str().cmp(x)).is_ok())
            }
            RowScope::Except(p) => {
                patient.is_none_or(|x| p.binary_search_by(|y| y.as_str().cmp(x)).is_err())
            }
        }
    }

    fn describe(&self) -> String {
        fn list(p: &[String]) -> String {
            if p.len() <= 5 {
                p.join(", ")
            } else {
                format!("{}, ... ({} patients)", p[..5].join(", "), p.len())
            }
        }
        match self {
            RowScope::All => "every row".into(),
            RowScope::Patients(p) if p.is_empty() => "no rows".into(),
            RowScope::Patients(p) => format!("the compartments of {}", list(p)),
            RowScope::Except(p) => format!("every row except the compartments of {}", list(p)),
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub resource_type: String,
    pub action: Action,
    pub reason: String,
    /// The rule that denied, when one did (`None`: no rule allowed it, or
    /// the SMART scopes do not).
    pub rule: Option<String>,
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

/// What an allowed request may see.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Grant {
    /// The rows.
    pub rows: RowScope,
    /// Element paths of the type (`telecom`, `address.line`), sorted and
    /// distinct, removed from output and refused in filters and sorts.
    pub hidden: Vec<String>,
    /// The rules that made the decision (allowing, denying patients,
    /// hiding), in policy order.
    pub rules: Vec<String>,
    /// Resources leave de-identified with this profile or configuration
    /// (`safe-harbor-minimal`, or a Microsoft anonymizer config file): set
    /// when any allow rule that applies asks for it, so a rule that grants
    /// identified access cannot widen one that grants de-identified access.
    pub deid: Option<String>,
}

impl Grant {
    /// Every row, nothing hidden.
    pub fn all(rule: &str) -> Grant {
        Grant {
            rows: RowScope::All,
            hidden: Vec::new(),
            rules: vec![rule.to_owned()],
            deid: None,
        }
    }

    /// Whether the element at `path` (`telecom`, `name.given`) is hidden:
    /// it or an element containing it is.
    pub fn hides(&self, path: &str) -> bool {
        self.hidden.iter().any(|h| {
            path == h
                || (path.starts_with(h.as_str()) && path.as_bytes().get(h.len()) == Some(&b'.'))
        })
    }
}

/// The outcome of one access check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow(Grant),
    Deny(Denial),
}

impl Decision {
    /// One line for logs, `atlas policy check` and audit records.
    pub fn describe(&self) -> String {
        match self {
            Decision::Allow(g) => {
                let mut s = format!(
                    "ALLOW {} (rules: {})",
                    g.rows.describe(),
                    g.rules.join(", ")
                );
                if !g.hidden.is_empty() {
                    s.push_str(&format!("; hidden: {}", g.hidden.join(", ")));
                }
                if let Some(d) = &g.deid {
                    s.push_str(&format!(
                        "; de-identified with {d} (FHIR search by code or status only)"
                    ));
                }
                s
            }
            Decision::Deny(d) => match &d.rule {
                Some(r) => format!("DENY {d} (rule {r})"),
                None => format!("DENY {d}"),
            },
        }
    }
}

/// Decides access. One instance serves every path of a server.
#[derive(Debug, Clone)]
pub struct PolicyEngine {
    policy: Policy,
}

impl Default for PolicyEngine {
    /// SMART scopes only (no policy file).
    fn default() -> PolicyEngine {
        PolicyEngine::new(Policy::scopes_only())
    }
}

impl PolicyEngine {
    pub fn new(policy: Policy) -> PolicyEngine {
        PolicyEngine { policy }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// May `who` do `action` on `resource_type`, and on which rows, with
    /// which fields hidden? Explicit patient ids only; see
    /// [`PolicyEngine::decide_with`] for sets that need data.
    pub fn decide(&self, who: &Principal, resource_type: &str, action: Action) -> Decision {
        self.decide_with(who, resource_type, action, &NoDirectory)
    }

    /// [`PolicyEngine::decide`] with patient sets resolved by `directory`.
    ///
    /// 1. Some SMART scope must grant the action on the type.
    /// 2. The policy's applicable rules: a deny rule over every patient
    ///    denies; otherwise the allow rules' patients, minus the deny
    ///    rules' patients, are the rows. No allow rule: denied.
    /// 3. A `patient` claim narrows the rows to that patient's compartment
    ///    (nothing, if the policy does not admit that patient).
    /// 4. Granted only by `patient/` scopes without a `patient` claim:
    ///    denied (there is no patient in context to scope to).
    pub fn decide_with(
        &self,
        who: &Principal,
        resource_type: &str,
        action: Action,
        directory: &dyn PatientDirectory,
    ) -> Decision {
        self.decide_traced(who, resource_type, action, directory, &mut None)
    }

    /// [`PolicyEngine::decide_with`], noting how every rule fared.
    pub fn explain(
        &self,
        who: &Principal,
        resource_type: &str,
        action: Action,
        directory: &dyn PatientDirectory,
    ) -> (Decision, Vec<RuleTrace>) {
        let mut trace = Some(Vec::new());
        let d = self.decide_traced(who, resource_type, action, directory, &mut trace);
        (d, trace.unwrap_or_default())
    }

    fn decide_traced(
        &self,
        who: &Principal,
        resource_type: &str,
        action: Action,
        directory: &dyn PatientDirectory,
        trace: &mut Option<Vec<RuleTrace>>,
    ) -> Decision {
        let deny = |reason: String, rule: Option<&str>| {
            Decision::Deny(Denial {
                resource_type: resource_type.to_owned(),
                action,
                reason,
                rule: rule.map(str::to_owned),
            })
        };
        let granting: Vec<&SmartScope> = who
            .scopes
            .iter()
            .filter(|s| s.grants(resource_type, action))
            .collect();
        if granting.is_empty() {
            let held: Vec<&str> = who.scopes.iter().map(|s| s.text.as_str()).collect();
            return deny(
                format!(
                    "no scope grants it (token scopes: {})",
                    if held.is_empty() {
                        "none".to_owned()
                    } else {
                        held.join(" ")
                    }
                ),
                None,
            );
        }
        if who.patient.is_none() && granting.iter().all(|s| s.context == ScopeContext::Patient) {
            return deny(
                "only patient/ scopes grant it and the token has no patient in context".to_owned(),
                None,
            );
        }

        let mut purpose_missing = Vec::new();
        let matched =
            self.policy
                .applicable(who, resource_type, action, trace, &mut purpose_missing);
        let note = |trace: &mut Option<Vec<RuleTrace>>, rule: &str, applied: bool, note: String| {
            if let Some(t) = trace.as_mut() {
                t.push(RuleTrace {
                    rule: rule.to_owned(),
                    applied,
                    note,
                });
            }
        };
        let mut rules = Vec::new();
        let mut hidden = std::collections::BTreeSet::new();
        let mut denied_patients = std::collections::BTreeSet::new();
        let mut allowed: Option<std::collections::BTreeSet<String>> = Some(Default::default());
        let mut any_allow = false;
        let mut deid: Option<String> = None;
        for r in matched {
            let resolved = match &r.patients {
                None => None,
                Some(set) => match directory.resolve(&set.for_principal(who)) {
                    Ok(ids) => Some(ids),
                    Err(e) => {
                        // Fail closed: a set that cannot be resolved grants
                        // nothing and denies everything.
                        note(
                            trace,
                            &r.id,
                            true,
                            format!("patients could not be resolved: {e}"),
                        );
                        return deny(
                            format!("rule {}'s patients could not be resolved: {e}", r.id),
                            Some(&r.id),
                        );
                    }
                },
            };
            for h in rules::hidden_for(r, resource_type) {
                hidden.insert(h.to_owned());
            }
            match r.effect {
                Effect::Deny if !r.hide.is_empty() => {
                    note(trace, &r.id, true, format!("hides {}", r.hide.join(", ")));
                    rules.push(r.id.clone());
                }
                Effect::Deny => match resolved {
                    None => {
                        note(trace, &r.id, true, "denies every row".into());
                        return deny(
                            if r.description.is_empty() {
                                format!("denied by rule {}", r.id)
                            } else {
                                format!("denied by rule {}: {}", r.id, r.description)
                            },
                            Some(&r.id),
                        );
                    }
                    Some(ids) => {
                        note(
                            trace,
                            &r.id,
                            true,
                            format!(
                                "removes {} ({} patients)",
                                rules::describe_set(&r.patients),
                                ids.len()
                            ),
                        );
                        denied_patients.extend(ids.iter().cloned());
                        rules.push(r.id.clone());
                    }
                },
                Effect::Allow => {
                    any_allow = true;
                    rules.push(r.id.clone());
                    if let (None, Some(d)) = (&deid, &r.deid) {
                        note(trace, &r.id, true, format!("de-identifies with {d}"));
                        deid = Some(d.clone());
                    }
                    match resolved {
                        None => {
                            note(trace, &r.id, true, "allows every row".into());
                            allowed = None;
                        }
                        Some(ids) => {
                            note(
                                trace,
                                &r.id,
                                true,
                                format!(
                                    "allows {} ({} patients)",
                                    rules::describe_set(&r.patients),
                                    ids.len()
                                ),
                            );
                            if let Some(a) = allowed.as_mut() {
                                a.extend(ids.iter().cloned());
                            }
                        }
                    }
                }
            }
        }
        if !any_allow {
            if let Some(r) = purpose_missing.iter().find(|r| r.effect == Effect::Allow) {
                return deny(
                    format!(
                        "rule {} allows it only for purpose of use {} (request: {})",
                        r.id,
                        r.purpose.join(" or "),
                        who.purpose.as_deref().unwrap_or("none stated")
                    ),
                    Some(&r.id),
                );
            }
            return deny("no policy rule allows it".into(), None);
        }
        let mut rows = match allowed {
            None if denied_patients.is_empty() => RowScope::All,
            None => RowScope::Except(denied_patients.into_iter().collect()),
            Some(a) => RowScope::Patients(a.difference(&denied_patients).cloned().collect()),
        };
        if let Some(p) = &who.patient {
            rows = RowScope::Patients(if rows.admits(Some(p)) {
                vec![p.clone()]
            } else {
                Vec::new()
            });
        }
        Decision::Allow(Grant {
            rows,
            hidden: hidden.into_iter().collect(),
            rules,
            deid,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(e: &PolicyEngine, who: &Principal, t: &str, a: Action) -> Option<RowScope> {
        match e.decide(who, t, a) {
            Decision::Allow(g) => Some(g.rows),
            Decision::Deny(_) => None,
        }
    }

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
            rows(&e, &user, "Condition", Action::Search),
            Some(RowScope::All)
        );
        let bound = user.clone().with_patient("p1");
        assert_eq!(
            rows(&e, &bound, "Condition", Action::Read),
            Some(RowScope::Patients(vec!["p1".into()]))
        );
        let read_only = Principal::new("u", "i").with_scopes("user/Observation.r");
        assert!(matches!(
            e.decide(&read_only, "Observation", Action::Search),
            Decision::Deny(_)
        ));
        assert_eq!(
            rows(&e, &read_only, "Observation", Action::Read),
            Some(RowScope::All)
        );
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
        let s = RowScope::Except(vec!["a".into(), "c".into()]);
        assert!(!s.admits(Some("a")) && s.admits(Some("b")) && s.admits(None));
    }
}
