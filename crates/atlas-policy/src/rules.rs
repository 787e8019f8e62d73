//! The policy file: who may read which resource types, which patients'
//! rows, with which fields hidden, for which purpose of use.
//!
//! ```toml
//! # Roles come from the token's `roles` claim and from here.
//! [roles.clinician]
//! subjects = ["alice", "bob"]
//! [roles.researcher]
//! clients = ["notebook"]
//!
//! [[rule]]
//! id = "clinicians-own-panel"
//! effect = "allow"
//! roles = ["clinician"]
//! types = ["*"]
//! patients = { general_practitioner = "Practitioner/{sub}" }
//! purpose = ["TREAT"]
//!
//! [[rule]]
//! id = "researchers-no-contact-details"
//! effect = "deny"
//! roles = ["researcher"]
//! hide = ["Patient.telecom", "Patient.address.line"]
//! ```
//!
//! A rule applies to a request when its subject, role or client lists
//! match (all empty: every authenticated principal), its `types` contain
//! the resource type (or `*`), its `actions` the action, and, when it
//! names a `purpose`, the request's purpose of use is one of them.
//!
//! * `allow` rules grant rows: of every patient, or of their `patients`
//!   set; several allow rules grant the union.
//! * `deny` rules without `hide` take rows away: the whole type, or their
//!   `patients` set. Deny wins over allow.
//! * `hide` (on either kind) removes fields, by element path
//!   (`Patient.telecom`, `Patient.address.line`): from output, and from what
//!   filters and sorts may name.
//! * No allow rule: no access.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::Deserialize;

use crate::{Action, Principal};

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    Allow,
    Deny,
}

/// Who holds a role, besides tokens whose `roles` claim names it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleMembers {
    #[serde(default)]
    pub subjects: Vec<String>,
    #[serde(default)]
    pub clients: Vec<String>,
}

/// Which patients a rule is about: the union of the selectors given.
/// `{sub}` in a value stands for the token's subject.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatientSet {
    /// Patient ids.
    #[serde(default)]
    pub ids: Vec<String>,
    /// Patients whose `managingOrganization` is this reference
    /// (`Organization/org-1`).
    #[serde(default)]
    pub organization: Option<String>,
    /// Patients with this `generalPractitioner` reference
    /// (`Practitioner/{sub}`).
    #[serde(default)]
    pub general_practitioner: Option<String>,
    /// Patients who are the subject of a CareTeam with this participant
    /// member (`Practitioner/{sub}`).
    #[serde(default)]
    pub care_team_member: Option<String>,
    /// Patients for whom this FHIRPath expression over the Patient resource
    /// is true (`birthDate < @1960-01-01`, `gender = 'female'`).
    #[serde(default)]
    pub criterion: Option<String>,
}

impl PatientSet {
    /// The set with `{sub}` replaced by `who`'s subject.
    pub fn for_principal(&self, who: &Principal) -> PatientSet {
        let sub = |s: &String| s.replace("{sub}", &who.subject);
        PatientSet {
            ids: self.ids.iter().map(sub).collect(),
            organization: self.organization.as_ref().map(sub),
            general_practitioner: self.general_practitioner.as_ref().map(sub),
            care_team_member: self.care_team_member.as_ref().map(sub),
            criterion: self.criterion.clone(),
        }
    }

    /// Whether only explicit ids are named (no data is needed to resolve).
    pub fn is_explicit(&self) -> bool {
        self.organization.is_none()
            && self.general_practitioner.is_none()
            && self.care_team_member.is_none()
            && self.criterion.is_none()
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.ids.is_empty() {
            parts.push(format!("ids {}", self.ids.join(", ")));
        }
        for (name, v) in [
            ("organization", &self.organization),
            ("general_practitioner", &self.general_practitioner),
            ("care_team_member", &self.care_team_member),
            ("criterion", &self.criterion),
        ] {
            if let Some(v) = v {
                parts.push(format!("{name} {v}"));
            }
        }
        if parts.is_empty() {
            "no patients".into()
        } else {
            parts.join(" or ")
        }
    }
}

/// One rule of the policy file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Named in decisions, explanations and audit records.
    pub id: String,
    pub effect: Effect,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub subjects: Vec<String>,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub clients: Vec<String>,
    /// Resource types, or `*`.
    #[serde(default = "every_type")]
    pub types: Vec<String>,
    /// `read` and/or `search`; default both.
    #[serde(default = "every_action")]
    pub actions: Vec<Action>,
    /// The patients the rule is about; absent: every patient (and rows
    /// belonging to no patient).
    #[serde(default)]
    pub patients: Option<PatientSet>,
    /// Element paths (`Patient.telecom`) removed from output and refused in
    /// filters and sorts.
    #[serde(default)]
    pub hide: Vec<String>,
    /// Purposes of use (`TREAT`, `HPAYMT`, `HRESCH`, ...): the rule applies
    /// only to requests that state one of them.
    #[serde(default)]
    pub purpose: Vec<String>,
    /// An allow rule's resources leave de-identified: a built-in profile
    /// (`safe-harbor-minimal`) or the path of a Microsoft FHIR anonymizer
    /// configuration (relative to the policy file). Such a grant reads FHIR
    /// resources only; row paths (object sets, GraphQL, views) refuse it.
    #[serde(default)]
    pub deid: Option<String>,
}

fn every_type() -> Vec<String> {
    vec!["*".into()]
}

fn every_action() -> Vec<Action> {
    vec![Action::Read, Action::Search]
}

/// A parsed, checked policy file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    pub roles: BTreeMap<String, RoleMembers>,
    #[serde(default, rename = "rule")]
    pub rules: Vec<Rule>,
}

/// A policy file that does not parse or does not make sense.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy: {0}")]
    Parse(String),
    #[error("policy rule {rule}: {message}")]
    Rule { rule: String, message: String },
}

impl Policy {
    /// The policy used when none is configured: every authenticated
    /// principal may read what its SMART scopes grant.
    pub fn scopes_only() -> Policy {
        Policy {
            roles: BTreeMap::new(),
            rules: vec![Rule {
                id: "builtin:scopes-only".into(),
                effect: Effect::Allow,
                description: "No policy file: SMART scopes and the patient claim decide".into(),
                subjects: vec![],
                roles: vec![],
                clients: vec![],
                types: every_type(),
                actions: every_action(),
                patients: None,
                hide: vec![],
                purpose: vec![],
                deid: None,
            }],
        }
    }

    /// Parses and checks a policy file's TOML text.
    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        let p: Policy = toml::from_str(text).map_err(|e| PolicyError::Parse(e.to_string()))?;
        p.check()?;
        Ok(p)
    }

    fn check(&self) -> Result<(), PolicyError> {
        let mut ids = BTreeSet::new();
        for r in &self.rules {
            let bad = |message: String| PolicyError::Rule {
                rule: r.id.clone(),
                message,
            };
            if r.id.trim().is_empty() {
                return Err(bad("id is empty".into()));
            }
            if !ids.insert(r.id.as_str()) {
                return Err(bad("the id is used by another rule".into()));
            }
            if r.types.is_empty() {
                return Err(bad("types is empty (use [\"*\"] for every type)".into()));
            }
            if r.actions.is_empty() {
                return Err(bad("actions is empty".into()));
            }
            for h in &r.hide {
                let Some((ty, path)) = h.split_once('.') else {
                    return Err(bad(format!(
                        "hide entry '{h}' is not Type.element (Patient.telecom)"
                    )));
                };
                let ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric());
                if !ok(ty) || !path.split('.').all(ok) {
                    return Err(bad(format!(
                        "hide entry '{h}' is not Type.element (Patient.telecom)"
                    )));
                }
                if path == "id" || path == "subject" || path == "patient" {
                    return Err(bad(format!(
                        "hide entry '{h}': keys and patient references cannot be hidden (de-identify them instead)"
                    )));
                }
            }
            if let Some(d) = &r.deid {
                if r.effect == Effect::Deny {
                    return Err(bad("deid belongs on allow rules".into()));
                }
                if d.trim().is_empty() {
                    return Err(bad(
                        "deid is empty (safe-harbor-minimal or a config file)".into()
                    ));
                }
            }
            if r.effect == Effect::Deny && !r.hide.is_empty() && r.patients.is_some() {
                return Err(bad(
                    "a deny rule hides fields or removes patients, not both: split it".into(),
                ));
            }
            if let Some(p) = &r.patients
                && p.is_explicit()
                && p.ids.is_empty()
            {
                return Err(bad("patients names no selector".into()));
            }
        }
        Ok(())
    }

    /// Every patient set the rules name (before `{sub}` substitution): what
    /// a directory must be able to resolve.
    pub fn patient_sets(&self) -> Vec<&PatientSet> {
        self.rules
            .iter()
            .filter_map(|r| r.patients.as_ref())
            .collect()
    }

    /// The FHIRPath criteria the rules name.
    pub fn criteria(&self) -> BTreeSet<String> {
        self.patient_sets()
            .into_iter()
            .filter_map(|p| p.criterion.clone())
            .collect()
    }

    fn roles_of(&self, who: &Principal) -> BTreeSet<String> {
        let mut roles: BTreeSet<String> = who.roles.iter().cloned().collect();
        for (role, m) in &self.roles {
            if m.subjects.contains(&who.subject)
                || who
                    .client_id
                    .as_ref()
                    .is_some_and(|c| m.clients.iter().any(|x| x == c))
            {
                roles.insert(role.clone());
            }
        }
        roles
    }
}

/// Resolves patient sets against the data (Patient and CareTeam
/// resources). Implemented by the server over the lake; the engine stays
/// free of I/O.
pub trait PatientDirectory {
    /// The patient ids a set (already `{sub}`-substituted) names.
    fn resolve(&self, set: &PatientSet) -> Result<Arc<BTreeSet<String>>, String>;
}

/// A directory that knows no data: explicit ids only.
pub struct NoDirectory;

impl PatientDirectory for NoDirectory {
    fn resolve(&self, set: &PatientSet) -> Result<Arc<BTreeSet<String>>, String> {
        if set.is_explicit() {
            Ok(Arc::new(set.ids.iter().cloned().collect()))
        } else {
            Err("patient sets other than explicit ids need the lake's Patient data".into())
        }
    }
}

/// How one rule fared in a decision, for `atlas policy explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleTrace {
    pub rule: String,
    pub applied: bool,
    /// Why it applied (what it did) or why not.
    pub note: String,
}

impl Policy {
    /// The rules that apply to `who` doing `action` on `resource_type`;
    /// with `trace`, a note for every rule.
    pub(crate) fn applicable<'a>(
        &'a self,
        who: &Principal,
        resource_type: &str,
        action: Action,
        trace: &mut Option<Vec<RuleTrace>>,
        purpose_missing: &mut Vec<&'a Rule>,
    ) -> Vec<&'a Rule> {
        let roles = self.roles_of(who);
        let mut out = Vec::new();
        for r in &self.rules {
            let who_listed = !(r.subjects.is_empty() && r.roles.is_empty() && r.clients.is_empty());
            let who_ok = !who_listed
                || r.subjects.contains(&who.subject)
                || r.roles.iter().any(|x| roles.contains(x))
                || who
                    .client_id
                    .as_ref()
                    .is_some_and(|c| r.clients.iter().any(|x| x == c));
            let type_ok = r.types.iter().any(|t| t == "*" || t == resource_type);
            let action_ok = r.actions.contains(&action);
            let purpose_ok = r.purpose.is_empty()
                || who
                    .purpose
                    .as_ref()
                    .is_some_and(|p| r.purpose.iter().any(|x| x == p));
            let why_not = if !who_ok {
                Some("not for this subject, role or client".to_owned())
            } else if !type_ok {
                Some(format!("not about {resource_type}"))
            } else if !action_ok {
                Some(format!("not for {}", action.as_str()))
            } else if !purpose_ok {
                purpose_missing.push(r);
                Some(format!(
                    "needs purpose of use {} (request: {})",
                    r.purpose.join(" or "),
                    who.purpose.as_deref().unwrap_or("none")
                ))
            } else {
                None
            };
            if let Some(t) = trace.as_mut()
                && let Some(n) = &why_not
            {
                t.push(RuleTrace {
                    rule: r.id.clone(),
                    applied: false,
                    note: n.clone(),
                });
            }
            if why_not.is_none() {
                out.push(r);
            }
        }
        out
    }
}

pub(crate) fn describe_set(p: &Option<PatientSet>) -> String {
    match p {
        None => "every patient".into(),
        Some(p) => p.describe(),
    }
}

/// The hidden element paths of a rule for one type (without the type).
pub(crate) fn hidden_for<'a>(
    rule: &'a Rule,
    resource_type: &'a str,
) -> impl Iterator<Item = &'a str> + 'a {
    rule.hide.iter().filter_map(move |h| {
        h.split_once('.')
            .filter(|(t, _)| *t == resource_type)
            .map(|(_, p)| p)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Decision, Denial, PolicyEngine, RowScope};

    /// Patients by organization and general practitioner, as a lake's
    /// directory would resolve them.
    struct Fixture;

    impl PatientDirectory for Fixture {
        fn resolve(&self, set: &PatientSet) -> Result<Arc<BTreeSet<String>>, String> {
            let mut out: BTreeSet<String> = set.ids.iter().cloned().collect();
            if set.organization.as_deref() == Some("Organization/north") {
                out.extend(["p1".into(), "p2".into()]);
            }
            if set.general_practitioner.as_deref() == Some("Practitioner/alice") {
                out.extend(["p2".into(), "p3".into()]);
            }
            if set.criterion.is_some() {
                return Err("criterion failed".into());
            }
            Ok(Arc::new(out))
        }
    }

    const POLICY: &str = r#"
[roles.clinician]
subjects = ["alice"]
[roles.researcher]
clients = ["notebook"]

[[rule]]
id = "north-org"
effect = "allow"
roles = ["clinician"]
patients = { organization = "Organization/north" }

[[rule]]
id = "own-panel"
effect = "allow"
roles = ["clinician"]
patients = { general_practitioner = "Practitioner/{sub}" }
purpose = ["TREAT"]

[[rule]]
id = "vip"
effect = "deny"
patients = { ids = ["p2"] }

[[rule]]
id = "researchers"
effect = "allow"
roles = ["researcher"]
types = ["Observation", "Patient"]
actions = ["search"]

[[rule]]
id = "no-contact"
effect = "deny"
roles = ["researcher"]
hide = ["Patient.telecom", "Patient.address.line"]

[[rule]]
id = "no-meds-for-researchers"
effect = "deny"
roles = ["researcher"]
types = ["MedicationRequest"]

[[rule]]
id = "admins"
effect = "allow"
subjects = ["root"]
"#;

    fn decide(who: &Principal, t: &str, a: Action) -> Decision {
        let e = PolicyEngine::new(Policy::parse(POLICY).expect("parses"));
        e.decide_with(who, t, a, &Fixture)
    }

    fn allowed(d: Decision) -> crate::Grant {
        match d {
            Decision::Allow(g) => g,
            Decision::Deny(d) => panic!("denied: {d}"),
        }
    }

    fn denied(d: Decision) -> crate::Denial {
        match d {
            Decision::Allow(g) => panic!("allowed: {g:?}"),
            Decision::Deny(d) => d,
        }
    }

    fn user(sub: &str) -> Principal {
        Principal::new(sub, "iss").with_scopes("user/*.rs")
    }

    #[test]
    fn allow_rules_unite_deny_rules_subtract_and_purpose_gates() {
        // alice: north (p1, p2) minus vip p2; her panel needs TREAT.
        let g = allowed(decide(&user("alice"), "Observation", Action::Search));
        assert_eq!(g.rows, RowScope::Patients(vec!["p1".into()]));
        assert_eq!(g.rules, ["north-org", "vip"]);
        let g = allowed(decide(
            &user("alice").with_purpose("TREAT"),
            "Condition",
            Action::Read,
        ));
        assert_eq!(g.rows, RowScope::Patients(vec!["p1".into(), "p3".into()]));
        // A patient-bound token inside and outside the policy's patients.
        let g = allowed(decide(
            &user("alice").with_patient("p1"),
            "Condition",
            Action::Read,
        ));
        assert_eq!(g.rows, RowScope::Patients(vec!["p1".into()]));
        let g = allowed(decide(
            &user("alice").with_patient("p2"),
            "Condition",
            Action::Read,
        ));
        assert_eq!(g.rows, RowScope::Patients(vec![]));
        // root: everything but the vip.
        let g = allowed(decide(&user("root"), "Patient", Action::Read));
        assert_eq!(g.rows, RowScope::Except(vec!["p2".into()]));
    }

    #[test]
    fn a_deid_rule_marks_the_grant_and_an_identified_rule_cannot_widen_it() {
        let text = r#"
[[rule]]
id = "registry"
effect = "allow"
roles = ["registry"]
deid = "safe-harbor-minimal"

[[rule]]
id = "own"
effect = "allow"
roles = ["registry"]
patients = { ids = ["p1"] }
"#;
        let e = PolicyEngine::new(Policy::parse(text).expect("parses"));
        let who = user("r").with_roles(["registry"]);
        let g = allowed(e.decide_with(&who, "Observation", Action::Search, &Fixture));
        assert_eq!(g.deid.as_deref(), Some("safe-harbor-minimal"));
        assert_eq!(g.rows, RowScope::All);
        let d = e.decide_with(&who, "Observation", Action::Search, &Fixture);
        assert!(
            d.describe()
                .contains("de-identified with safe-harbor-minimal")
        );
        // Without the deid rule's role: identified, own patient only.
        let other = PolicyEngine::new(
            Policy::parse(&text.replace("roles = [\"registry\"]\ndeid", "roles = [\"x\"]\ndeid"))
                .expect("parses"),
        );
        let g = allowed(other.decide_with(&who, "Observation", Action::Search, &Fixture));
        assert_eq!(g.deid, None);
        for bad in [
            "[[rule]]\nid = \"d\"\neffect = \"deny\"\ndeid = \"safe-harbor-minimal\"\n",
            "[[rule]]\nid = \"d\"\neffect = \"allow\"\ndeid = \" \"\n",
        ] {
            assert!(Policy::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn roles_come_from_claims_subjects_and_clients() {
        let by_client = user("x").with_client("notebook");
        let g = allowed(decide(&by_client, "Patient", Action::Search));
        assert_eq!(g.rows, RowScope::Except(vec!["p2".into()]));
        assert_eq!(g.hidden, ["address.line", "telecom"]);
        assert!(g.hides("telecom.value") && g.hides("address.line") && !g.hides("address"));
        assert!(!g.hides("telecoms"));
        let by_claim = user("y").with_roles(["researcher"]);
        assert_eq!(
            allowed(decide(&by_claim, "Observation", Action::Search)).hidden,
            Vec::<String>::new()
        );
        // Actions and types the rule does not list.
        let d = denied(decide(&by_claim, "Observation", Action::Read));
        assert_eq!(d.rule, None);
        assert!(d.reason.contains("no policy rule allows it"), "{d}");
        let d = denied(decide(&by_claim, "MedicationRequest", Action::Search));
        assert_eq!(d.rule.as_deref(), Some("no-meds-for-researchers"));
        // Nobody's rule: nothing.
        assert!(
            denied(decide(&user("mallory"), "Patient", Action::Read))
                .rule
                .is_none()
        );
    }

    #[test]
    fn purpose_of_use_is_named_when_it_is_what_is_missing() {
        let p = Policy::parse(
            r#"
[[rule]]
id = "treatment-only"
effect = "allow"
purpose = ["TREAT", "ETREAT"]
"#,
        )
        .expect("parses");
        let e = PolicyEngine::new(p);
        let d = denied(e.decide(&user("a"), "Patient", Action::Read));
        assert_eq!(d.rule.as_deref(), Some("treatment-only"));
        assert!(
            d.reason.contains("TREAT or ETREAT") && d.reason.contains("none stated"),
            "{d}"
        );
        assert!(matches!(
            e.decide(&user("a").with_purpose("ETREAT"), "Patient", Action::Read),
            Decision::Allow(_)
        ));
        assert!(matches!(
            e.decide(&user("a").with_purpose("HRESCH"), "Patient", Action::Read),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn scopes_still_bound_what_policy_allows() {
        let narrow = Principal::new("root", "iss").with_scopes("user/Patient.r");
        assert!(matches!(
            decide(&narrow, "Observation", Action::Search),
            Decision::Deny(Denial { rule: None, .. })
        ));
        assert!(matches!(
            decide(&narrow, "Patient", Action::Read),
            Decision::Allow(_)
        ));
    }

    #[test]
    fn unresolvable_sets_fail_closed() {
        let p = Policy::parse(
            r#"
[[rule]]
id = "women"
effect = "allow"
patients = { criterion = "gender = 'female'" }
"#,
        )
        .expect("parses");
        assert_eq!(
            p.criteria().into_iter().collect::<Vec<_>>(),
            ["gender = 'female'"]
        );
        let e = PolicyEngine::new(p);
        let d = denied(e.decide_with(&user("a"), "Patient", Action::Read, &Fixture));
        assert!(d.reason.contains("could not be resolved"), "{d}");
        let d = denied(e.decide(&user("a"), "Patient", Action::Read));
        assert!(d.reason.contains("need the lake"), "{d}");
    }

    #[test]
    fn explain_notes_every_rule() {
        let e = PolicyEngine::new(Policy::parse(POLICY).expect("parses"));
        let (d, trace) = e.explain(&user("alice"), "Patient", Action::Read, &Fixture);
        assert!(
            d.describe().starts_with("ALLOW the compartments of p1"),
            "{}",
            d.describe()
        );
        let notes: Vec<String> = trace
            .iter()
            .map(|t| format!("{} {} {}", t.rule, t.applied, t.note))
            .collect();
        assert!(
            notes
                .contains(&"own-panel false needs purpose of use TREAT (request: none)".to_owned()),
            "{notes:?}"
        );
        assert!(
            notes.contains(
                &"north-org true allows organization Organization/north (2 patients)".to_owned()
            ),
            "{notes:?}"
        );
        assert!(
            notes.contains(&"researchers false not for this subject, role or client".to_owned()),
            "{notes:?}"
        );
        assert_eq!(trace.len(), 7);
    }

    #[test]
    fn bad_policy_files_are_refused_with_the_rule_named() {
        for (text, wanted) in [
            (
                "[[rule]]\nid = \"a\"\neffect = \"permit\"\n",
                "unknown variant",
            ),
            (
                "[[rule]]\nid = \"a\"\neffect = \"allow\"\nwho = [\"x\"]\n",
                "unknown field",
            ),
            (
                "[[rule]]\nid = \"a\"\neffect = \"allow\"\n[[rule]]\nid = \"a\"\neffect = \"deny\"\n",
                "rule a: the id is used",
            ),
            (
                "[[rule]]\nid = \"h\"\neffect = \"deny\"\nhide = [\"telecom\"]\n",
                "rule h: hide entry 'telecom'",
            ),
            (
                "[[rule]]\nid = \"h\"\neffect = \"deny\"\nhide = [\"Observation.subject\"]\n",
                "cannot be hidden",
            ),
            (
                "[[rule]]\nid = \"h\"\neffect = \"deny\"\nhide = [\"Patient.name\"]\npatients = { ids = [\"1\"] }\n",
                "split it",
            ),
            (
                "[[rule]]\nid = \"e\"\neffect = \"allow\"\npatients = {}\n",
                "names no selector",
            ),
            (
                "[[rule]]\nid = \"t\"\neffect = \"allow\"\ntypes = []\n",
                "types is empty",
            ),
        ] {
            let e = Policy::parse(text).expect_err(text).to_string();
            assert!(e.contains(wanted), "{text}: {e}");
        }
    }
}
