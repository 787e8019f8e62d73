//! `backport-filter-criteria`: search-style filters narrowing a topic, and
//! their evaluation on one change.
//!
//! A filter is `Type?param=value&param=value` (the IG's form). Parameters
//! are ANDed, and so are several filter extensions; comma-separated values
//! of one parameter are ORed. A filter constrains only the changes of its
//! own type (a topic may fire for several). Two other spellings are taken:
//! `param=value` when the topic fires for one type only, and
//! `Type.param=value`, the form the Inferno test kit's samples send.
//!
//! What cannot be evaluated is refused when the subscription is made,
//! naming the filter: a type the topic does not fire for, a parameter the
//! topic does not list in `canFilterBy`, any modifier (`:not`, `:in`, ...).
//!
//! A delete carries no resource, so filters that read the resource's
//! content (`code`, `status`, `subject` beyond its patient) never match a
//! delete; `_id` and `patient` (the store's patient compartment, the key
//! access decisions use as well) do.

use serde_json::Value as Json;

use super::topic::{ParamKind, Topic, param_kind, params};
use super::{Interaction, IssueCode, Issues, Rejection, normal_reference};

/// Values per parameter, and characters per value, at most.
const MAX_VALUES: usize = 100;
const MAX_VALUE_LEN: usize = 256;
/// Filter extensions, and parameters per filter, at most.
pub const MAX_FILTERS: usize = 16;

/// One change, as filters see it.
#[derive(Debug, Clone, Copy)]
pub struct Change<'a> {
    pub resource_type: &'a str,
    pub id: &'a str,
    pub interaction: Interaction,
    /// The patient compartment the store files the resource under.
    pub patient: Option<&'a str>,
    /// The stored JSON; `None` for a delete.
    pub resource: Option<&'a str>,
}

/// One parameter of one filter: the change matches when any value does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Criterion {
    pub resource_type: String,
    pub param: String,
    pub kind: ParamKind,
    pub values: Vec<String>,
}

/// A subscription's filters: a change matches when every criterion of its
/// type does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilterSet {
    pub criteria: Vec<Criterion>,
}

impl FilterSet {
    /// Parses the filter strings of a subscription to `topic`; `at(n)`
    /// names the n-th filter's element in refusals.
    pub fn parse<S: AsRef<str>>(
        topic: &Topic,
        raw: &[S],
        at: impl Fn(usize) -> String,
    ) -> Result<FilterSet, Rejection> {
        let mut issues = Issues::default();
        let mut set = FilterSet::default();
        if raw.len() > MAX_FILTERS {
            issues.push(
                IssueCode::Value,
                &at(MAX_FILTERS),
                format!("at most {MAX_FILTERS} filter criteria"),
            );
            return issues.into_result(set);
        }
        for (n, f) in raw.iter().enumerate() {
            match parse_one(topic, f.as_ref(), &at(n)) {
                Ok(mut c) => set.criteria.append(&mut c),
                Err(r) => issues.extend(r),
            }
        }
        issues.into_result(set)
    }

    pub fn is_empty(&self) -> bool {
        self.criteria.is_empty()
    }

    /// The elements of `resource_type`'s JSON the filters read (a grant
    /// that hides one of them must not be probed through a filter).
    pub fn elements<'s>(
        &'s self,
        resource_type: &'s str,
    ) -> impl Iterator<Item = &'static str> + 's {
        self.criteria
            .iter()
            .filter(move |c| c.resource_type == resource_type)
            .filter_map(|c| c.kind.element())
    }

    /// Whether `change` passes every criterion of its type.
    pub fn matches(&self, change: &Change<'_>) -> bool {
        let mut doc: Option<Option<Json>> = None;
        for c in self
            .criteria
            .iter()
            .filter(|c| c.resource_type == change.resource_type)
        {
            let needs_doc = c.kind.reads_content() && change.resource.is_some();
            if needs_doc && doc.is_none() {
                doc = Some(change.resource.and_then(|r| serde_json::from_str(r).ok()));
            }
            let json = doc.as_ref().and_then(Option::as_ref);
            if !c.matches(change, json) {
                return false;
            }
        }
        true
    }
}

impl Criterion {
    fn matches(&self, change: &Change<'_>, doc: Option<&Json>) -> bool {
        match self.kind {
            ParamKind::Id => self.values.iter().any(|v| v == change.id),
            ParamKind::Patient => change
                .patient
                .is_some_and(|p| self.values.iter().any(|v| patient_id(v) == Some(p))),
            ParamKind::Reference(e) => match (change.resource, doc) {
                // A delete: only a patient reference can still be told,
                // through the compartment.
                (None, _) => change.patient.is_some_and(|p| {
                    self.values
                        .iter()
                        .any(|v| v.contains('/') && patient_id(v) == Some(p))
                }),
                (Some(_), Some(d)) => d[e]["reference"]
                    .as_str()
                    .map(normal_reference)
                    .is_some_and(|r| self.values.iter().any(|v| reference_matches(v, r))),
                (Some(_), None) => false,
            },
            ParamKind::Token(e) => doc.is_some_and(|d| {
                let mut codings = Vec::new();
                collect_codings(&d[e], &mut codings);
                self.values
                    .iter()
                    .any(|v| codings.iter().any(|c| token_matches(v, c)))
            }),
            ParamKind::Code(e) => doc.is_some_and(|d| {
                d[e].as_str()
                    .is_some_and(|s| self.values.iter().any(|v| v == s))
            }),
        }
    }
}

/// The patient id of `Patient/<id>`, an absolute URL to it, or a bare id.
fn patient_id(v: &str) -> Option<&str> {
    let r = normal_reference(v);
    match r.split_once('/') {
        Some(("Patient", id)) => Some(id),
        Some(_) => None,
        None => Some(r),
    }
}

/// A filter value against a stored reference (both `Type/id`); a bare id
/// matches that id of any type.
fn reference_matches(value: &str, stored: &str) -> bool {
    let v = normal_reference(value);
    if v.contains('/') {
        v == stored
    } else {
        stored.rsplit('/').next() == Some(v)
    }
}

/// The Codings of a CodeableConcept, a Coding, or a list of either.
fn collect_codings<'j>(v: &'j Json, out: &mut Vec<&'j Json>) {
    match v {
        Json::Array(items) => items.iter().for_each(|i| collect_codings(i, out)),
        Json::Object(o) => match o.get("coding") {
            Some(Json::Array(c)) => out.extend(c.iter()),
            _ => out.push(v),
        },
        _ => {}
    }
}

/// `code`, `system|code`, `|code` (no system) or `system|` (any code).
fn token_matches(value: &str, coding: &Json) -> bool {
    let system = coding["system"].as_str();
    let code = coding["code"].as_str();
    match value.split_once('|') {
        None => code == Some(value),
        Some(("", c)) => system.is_none() && code == Some(c),
        Some((s, "")) => system == Some(s),
        Some((s, c)) => system == Some(s) && code == Some(c),
    }
}

fn parse_one(topic: &Topic, raw: &str, at: &str) -> Result<Vec<Criterion>, Rejection> {
    let mut issues = Issues::default();
    let raw = raw.trim();
    let only_type = match topic.triggers.as_slice() {
        [one] => Some(one.resource_type.as_str()),
        _ => None,
    };
    // `Type?query`, the Inferno spelling `Type.param=value`, or `param=value`.
    let (ty, query) = match raw.split_once('?') {
        Some((t, q)) => (Some(t), q.to_owned()),
        None => match raw.split_once('=') {
            Some((lhs, v)) if lhs.contains('.') => {
                let (t, p) = lhs.split_once('.').unwrap_or((lhs, ""));
                (Some(t), format!("{p}={v}"))
            }
            _ => (None, raw.to_owned()),
        },
    };
    let Some(ty) = ty.or(only_type) else {
        return Err(Rejection::one(
            IssueCode::Value,
            at,
            format!(
                "'{raw}': name the resource type (Type?param=value); the topic fires for {}",
                trigger_types(topic)
            ),
        ));
    };
    if topic.trigger(ty).is_none() {
        return Err(Rejection::one(
            IssueCode::NotSupported,
            at,
            format!(
                "'{raw}': topic {} does not fire for {ty} (it fires for {})",
                topic.url,
                trigger_types(topic)
            ),
        ));
    }
    let mut out: Vec<Criterion> = Vec::new();
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if pairs.is_empty() {
        issues.push(
            IssueCode::Value,
            at,
            format!("'{raw}' has no parameter (Type?param=value)"),
        );
    }
    if pairs.len() > MAX_FILTERS {
        issues.push(
            IssueCode::Value,
            at,
            format!("'{raw}': at most {MAX_FILTERS} parameters per filter"),
        );
        return issues.into_result(out);
    }
    for (k, v) in pairs {
        if let Some((name, modifier)) = k.split_once(':') {
            issues.push(
                IssueCode::NotSupported,
                at,
                format!("'{raw}': the modifier ':{modifier}' of '{name}' is not supported"),
            );
            continue;
        }
        let kind = match param_kind(ty, &k) {
            Some(kind) if topic.can_filter(ty, &k) => kind,
            _ => {
                let allowed: Vec<&str> = params(ty)
                    .into_iter()
                    .flatten()
                    .map(|(n, _)| *n)
                    .filter(|n| topic.can_filter(ty, n))
                    .collect();
                issues.push(
                    IssueCode::NotSupported,
                    at,
                    format!(
                        "'{raw}': filtering {ty} on '{k}' is not supported; supported: {}",
                        if allowed.is_empty() {
                            "none".to_owned()
                        } else {
                            allowed.join(", ")
                        }
                    ),
                );
                continue;
            }
        };
        let values: Vec<String> = v
            .split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(str::to_owned)
            .collect();
        if values.is_empty() {
            issues.push(IssueCode::Value, at, format!("'{raw}': '{k}' has no value"));
            continue;
        }
        if values.len() > MAX_VALUES || values.iter().any(|x| x.len() > MAX_VALUE_LEN) {
            issues.push(
                IssueCode::Value,
                at,
                format!(
                    "'{raw}': '{k}' takes at most {MAX_VALUES} values of at most {MAX_VALUE_LEN} characters"
                ),
            );
            continue;
        }
        if kind == ParamKind::Patient
            && let Some(bad) = values.iter().find(|x| patient_id(x).is_none())
        {
            issues.push(
                IssueCode::Value,
                at,
                format!("'{raw}': '{k}' takes Patient references (Patient/<id>), not '{bad}'"),
            );
            continue;
        }
        out.push(Criterion {
            resource_type: ty.to_owned(),
            param: k,
            kind,
            values,
        });
    }
    issues.into_result(out)
}

fn trigger_types(topic: &Topic) -> String {
    topic
        .triggers
        .iter()
        .map(|t| t.resource_type.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(ty: &str) -> Topic {
        Topic::builtin(ty).unwrap()
    }

    fn parse(ty: &str, raw: &[&str]) -> Result<FilterSet, Rejection> {
        FilterSet::parse(&topic(ty), raw, |n| format!("f[{n}]"))
    }

    fn change<'a>(
        ty: &'a str,
        id: &'a str,
        patient: Option<&'a str>,
        json: Option<&'a str>,
    ) -> Change<'a> {
        Change {
            resource_type: ty,
            id,
            interaction: if json.is_some() {
                Interaction::Update
            } else {
                Interaction::Delete
            },
            patient,
            resource: json,
        }
    }

    const OBS: &str = r#"{"resourceType":"Observation","id":"o1","status":"final",
        "code":{"coding":[{"system":"http://loinc.org","code":"8867-4"}]},
        "category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"vital-signs"}]}],
        "subject":{"reference":"Patient/p1"}}"#;

    #[test]
    fn parameters_and_values_combine_as_search_does() {
        let f = parse(
            "Observation",
            &["Observation?patient=Patient/p1&code=http://loinc.org|8867-4"],
        )
        .unwrap();
        assert!(f.matches(&change("Observation", "o1", Some("p1"), Some(OBS))));
        assert!(!f.matches(&change("Observation", "o1", Some("p2"), Some(OBS))));
        let f = parse(
            "Observation",
            &["Observation?code=1234-5,8867-4", "Observation?status=final"],
        )
        .unwrap();
        assert!(f.matches(&change("Observation", "o1", Some("p1"), Some(OBS))));
        let f = parse("Observation", &["Observation?status=amended"]).unwrap();
        assert!(!f.matches(&change("Observation", "o1", Some("p1"), Some(OBS))));
        for token in ["8867-4", "http://loinc.org|8867-4", "http://loinc.org|"] {
            let f = parse("Observation", &[&format!("Observation?code={token}")]).unwrap();
            assert!(
                f.matches(&change("Observation", "o1", None, Some(OBS))),
                "{token}"
            );
        }
        let f = parse("Observation", &["Observation?code=|8867-4"]).unwrap();
        assert!(
            !f.matches(&change("Observation", "o1", None, Some(OBS))),
            "|code needs no system"
        );
        let f = parse("Observation", &["Observation?category=vital-signs"]).unwrap();
        assert!(f.matches(&change("Observation", "o1", None, Some(OBS))));
        let f = parse(
            "Observation",
            &["Observation?subject=Patient/p1", "Observation?_id=o1"],
        )
        .unwrap();
        assert!(f.matches(&change("Observation", "o1", None, Some(OBS))));
        let f = parse(
            "Observation",
            &["Observation?subject=https://ehr.example/fhir/Patient/p1"],
        )
        .unwrap();
        assert!(f.matches(&change("Observation", "o1", None, Some(OBS))));
    }

    #[test]
    fn deletes_match_only_on_id_and_patient() {
        let del = change("Observation", "o1", Some("p1"), None);
        assert!(
            parse("Observation", &["Observation?patient=p1"])
                .unwrap()
                .matches(&del)
        );
        assert!(
            parse("Observation", &["Observation?subject=Patient/p1"])
                .unwrap()
                .matches(&del)
        );
        assert!(
            !parse("Observation", &["Observation?code=8867-4"])
                .unwrap()
                .matches(&del)
        );
        assert!(
            !parse("Observation", &["Observation?status=final"])
                .unwrap()
                .matches(&del)
        );
    }

    #[test]
    fn other_spellings_are_taken() {
        let f = parse("Encounter", &["Encounter.patient=Patient/123"]).unwrap();
        assert_eq!(f.criteria[0].param, "patient");
        let f = parse("Encounter", &["patient=Patient/123"]).unwrap();
        assert_eq!(f.criteria[0].resource_type, "Encounter");
        assert_eq!(f.elements("Encounter").count(), 0);
        let f = parse("Observation", &["Observation?code=x"]).unwrap();
        assert_eq!(f.elements("Observation").collect::<Vec<_>>(), ["code"]);
    }

    #[test]
    fn unsupported_filters_are_refused_naming_them() {
        for (raw, why) in [
            ("Observation?value-quantity=gt5", "value-quantity"),
            ("Observation?code:in=http://vs", ":in"),
            ("Condition?patient=Patient/1", "does not fire for Condition"),
            ("Observation?patient=Group/1", "Patient references"),
            ("Observation?", "no parameter"),
            ("Observation?code=", "no value"),
        ] {
            let r = parse("Observation", &[raw]).unwrap_err();
            assert!(r.to_string().contains(why), "{raw}: {r}");
            assert!(r.names("f[0]"), "{raw}: {r}");
            assert_eq!(r.status(), 422, "{raw}");
        }
    }
}
