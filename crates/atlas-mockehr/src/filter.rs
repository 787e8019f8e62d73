//! The export's per-resource filters: `_typeFilter` (the `_lastUpdated`,
//! `status` and `code` search parameters; anything else is refused by
//! name) and `_elements` (top-level elements, the result tagged SUBSETTED).

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

use crate::clock::parse_instant;
use crate::export::Item;
use crate::json::Members;

#[derive(Debug, Clone, PartialEq)]
enum Cond {
    /// `_lastUpdated=gt..`: the comparison's prefix and instant.
    LastUpdated(String, i64),
    /// `status=a,b`: any of these.
    Status(Vec<String>),
    /// `code=system|code,...`: any of these codings.
    Code(Vec<(Option<String>, Option<String>)>),
}

/// `_typeFilter`s per type; a type's filters are alternatives.
#[derive(Default)]
pub(crate) struct TypeFilters {
    by_type: HashMap<String, Vec<Vec<Cond>>>,
}

impl TypeFilters {
    /// Adds one `_typeFilter` value (several filters, comma-separated).
    pub fn add(&mut self, value: &str) -> Result<(), String> {
        for filter in split_filters(value) {
            let (ty, query) = filter
                .split_once('?')
                .ok_or_else(|| format!("_typeFilter {filter:?} is not Type?query"))?;
            if !atlas_fhir::is_resource_type(ty) {
                return Err(format!(
                    "_typeFilter {filter:?}: {ty:?} is not an R4 resource type"
                ));
            }
            let conds = url::form_urlencoded::parse(query.as_bytes())
                .map(|(name, v)| {
                    cond(&name, &v).map_err(|why| format!("_typeFilter {filter:?}: {why}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            self.by_type.entry(ty.to_string()).or_default().push(conds);
        }
        Ok(())
    }

    /// True when `item`'s type has no filter or one of its filters matches.
    pub fn keep(&self, item: &Item) -> bool {
        let Some(filters) = self.by_type.get(&item.ty) else {
            return true;
        };
        let json: Option<Value> = serde_json::from_str(&item.body).ok();
        filters.iter().any(|conds| {
            conds
                .iter()
                .all(|c| holds(c, item.last_updated, json.as_ref()))
        })
    }
}

/// Splits on the commas that start another `Type?` filter, so a comma in a
/// value (`code=a,b`) stays inside its filter.
fn split_filters(value: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for part in value.split(',') {
        let starts_filter = part
            .split_once('?')
            .is_some_and(|(ty, _)| atlas_fhir::is_resource_type(ty.trim()));
        match out.last_mut() {
            Some(last) if !starts_filter => {
                last.push(',');
                last.push_str(part);
            }
            _ => out.push(part.trim().to_string()),
        }
    }
    out
}

fn cond(name: &str, value: &str) -> Result<Cond, String> {
    match name {
        "_lastUpdated" => {
            let (prefix, instant) = match value.get(..2) {
                Some(p @ ("gt" | "ge" | "lt" | "le" | "eq")) => (p, &value[2..]),
                _ => ("eq", value),
            };
            let at = parse_instant(instant)
                .ok_or_else(|| format!("_lastUpdated {value:?} is not an instant"))?;
            Ok(Cond::LastUpdated(prefix.to_string(), at))
        }
        "status" => Ok(Cond::Status(value.split(',').map(str::to_string).collect())),
        "code" => Ok(Cond::Code(
            value
                .split(',')
                .map(|t| match t.split_once('|') {
                    Some((s, c)) => (
                        (!s.is_empty()).then(|| s.to_string()),
                        (!c.is_empty()).then(|| c.to_string()),
                    ),
                    None => (None, Some(t.to_string())),
                })
                .collect(),
        )),
        other => Err(format!(
            "search parameter {other:?} is not supported (supported: _lastUpdated, status, code)"
        )),
    }
}

fn holds(c: &Cond, last_updated: i64, json: Option<&Value>) -> bool {
    match c {
        Cond::LastUpdated(p, at) => match p.as_str() {
            "gt" => last_updated > *at,
            "ge" => last_updated >= *at,
            "lt" => last_updated < *at,
            "le" => last_updated <= *at,
            _ => last_updated == *at,
        },
        Cond::Status(any) => json
            .and_then(|j| j.get("status"))
            .and_then(Value::as_str)
            .is_some_and(|s| any.iter().any(|a| a == s)),
        Cond::Code(any) => {
            let codings = json
                .and_then(|j| j.pointer("/code/coding"))
                .and_then(Value::as_array);
            codings.into_iter().flatten().any(|coding| {
                let system = coding.get("system").and_then(Value::as_str);
                let code = coding.get("code").and_then(Value::as_str);
                any.iter().any(|(s, c)| {
                    s.as_deref().is_none_or(|s| Some(s) == system)
                        && c.as_deref().is_none_or(|c| Some(c) == code)
                })
            })
        }
    }
}

/// `_elements`: `(type or None for every type, element)`.
#[derive(Default)]
pub(crate) struct Elements {
    list: Vec<(Option<String>, String)>,
}

impl Elements {
    pub fn add(&mut self, value: &str) -> Result<(), String> {
        for e in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (ty, name) = match e.split_once('.') {
                Some((ty, name)) => (Some(ty.to_string()), name),
                None => (None, e),
            };
            if ty
                .as_deref()
                .is_some_and(|t| !atlas_fhir::is_resource_type(t))
            {
                return Err(format!("_elements {e:?}: not an R4 resource type"));
            }
            let simple = name.trim_end_matches("[x]");
            if simple.is_empty() || !simple.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err(format!(
                    "_elements {e:?}: only top-level elements are supported"
                ));
            }
            self.list.push((ty, name.to_string()));
        }
        Ok(())
    }

    fn wanted(&self, ty: &str, member: &str) -> bool {
        let member = member.strip_prefix('_').unwrap_or(member);
        matches!(member, "resourceType" | "id" | "meta")
            || self.list.iter().any(|(t, name)| {
                t.as_deref().is_none_or(|t| t == ty)
                    && match name.strip_suffix("[x]") {
                        Some(stem) => member
                            .strip_prefix(stem)
                            .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_uppercase())),
                        None => member == name,
                    }
            })
    }

    /// The resource with only the wanted elements, tagged SUBSETTED; the
    /// body itself when no `_elements` applies to its type.
    pub fn apply(&self, ty: &str, body: &Arc<str>) -> Arc<str> {
        if !self
            .list
            .iter()
            .any(|(t, _)| t.as_deref().is_none_or(|t| t == ty))
        {
            return body.clone();
        }
        let Some(mut members) = Members::parse(body) else {
            return body.clone();
        };
        members.0.retain(|(k, _)| self.wanted(ty, k));
        let mut meta = members.meta();
        let mut tags = match meta.remove("tag") {
            Some(Value::Array(t)) => t,
            _ => Vec::new(),
        };
        tags.push(serde_json::json!({
            "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
            "code": "SUBSETTED"
        }));
        meta.insert("tag".into(), Value::Array(tags));
        Arc::from(members.render(&meta))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(ty: &str, body: &str) -> Item {
        Item {
            ty: ty.into(),
            last_updated: 10,
            body: Arc::from(body),
            patients: Arc::from(vec![]),
        }
    }

    #[test]
    fn type_filters() {
        let mut f = TypeFilters::default();
        f.add("MedicationRequest?status=active,completed&code=http://x|1,Observation?_lastUpdated=gt2000-01-01T00:00:00Z")
            .unwrap();
        let mr = |status: &str| {
            item(
                "MedicationRequest",
                &format!(
                    r#"{{"resourceType":"MedicationRequest","id":"a","status":"{status}","code":{{"coding":[{{"system":"http://x","code":"1"}}]}}}}"#
                ),
            )
        };
        assert!(f.keep(&mr("active")) && f.keep(&mr("completed")) && !f.keep(&mr("stopped")));
        assert!(!f.keep(&item("Observation", "{}")));
        assert!(f.keep(&item("Patient", "{}")));
        let err = TypeFilters::default()
            .add("MedicationRequest?date=gt2018")
            .unwrap_err();
        assert!(err.contains("\"date\""), "{err}");
    }

    #[test]
    fn elements() {
        let mut e = Elements::default();
        e.add("Patient.gender,value[x]").unwrap();
        let body: Arc<str> = Arc::from(
            r#"{"resourceType":"Patient","id":"p","meta":{"versionId":"1"},"gender":"male","name":[{"family":"X"}]}"#,
        );
        let out = e.apply("Patient", &body);
        assert_eq!(
            &*out,
            r#"{"resourceType":"Patient","id":"p","meta":{"tag":[{"code":"SUBSETTED","system":"http://terminology.hl7.org/CodeSystem/v3-ObservationValue"}],"versionId":"1"},"gender":"male"}"#
        );
        let obs: Arc<str> = Arc::from(
            r#"{"resourceType":"Observation","id":"o","valueQuantity":{"value":1.50},"status":"final"}"#,
        );
        assert!(
            e.apply("Observation", &obs)
                .contains(r#""valueQuantity":{"value":1.50}"#)
        );
        assert!(Elements::default().add("Patient.name.given").is_err());
    }
}
