//! Resource JSON that keeps its bytes: a resource is read as its top-level
//! members in order, each value kept raw, so that rewriting `meta` (or
//! dropping members for `_elements`) leaves every other value byte for byte
//! as it arrived (decimals keep their digits).

use std::fmt;

use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

/// A resource's top-level members, in order, values raw.
pub(crate) struct Members(pub Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut out = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    out.push((key, map.next_value::<Box<RawValue>>()?));
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// A parsed resource line: its type, id and raw members.
pub(crate) struct Parsed {
    pub ty: String,
    pub id: String,
    pub members: Members,
}

impl Members {
    pub fn parse(text: &str) -> Option<Members> {
        serde_json::from_str(text).ok()
    }

    pub fn get(&self, name: &str) -> Option<&RawValue> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_ref())
    }

    /// A member that is a JSON string, decoded.
    pub fn string(&self, name: &str) -> Option<String> {
        serde_json::from_str::<String>(self.get(name)?.get()).ok()
    }

    /// `meta` as a JSON object (an empty one when absent or not an object).
    pub fn meta(&self) -> serde_json::Map<String, Value> {
        self.get("meta")
            .and_then(|raw| serde_json::from_str::<Value>(raw.get()).ok())
            .and_then(|v| match v {
                Value::Object(m) => Some(m),
                _ => None,
            })
            .unwrap_or_default()
    }

    /// The resource text with `meta` replaced by `meta`: in place when the
    /// resource had one, else right after `id`.
    pub fn render(&self, meta: &serde_json::Map<String, Value>) -> String {
        let meta_text = Value::Object(meta.clone()).to_string();
        let mut out = String::with_capacity(self.0.iter().map(|(_, v)| v.get().len() + 16).sum());
        out.push('{');
        let has_meta = self.get("meta").is_some();
        let mut first = true;
        let mut push = |out: &mut String, key: &str, value: &str| {
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(&quote(key));
            out.push(':');
            out.push_str(value);
        };
        for (key, value) in &self.0 {
            if key == "meta" {
                push(&mut out, key, &meta_text);
                continue;
            }
            push(&mut out, key, value.get());
            if key == "id" && !has_meta {
                push(&mut out, "meta", &meta_text);
            }
        }
        out.push('}');
        out
    }
}

impl Parsed {
    /// A resource line as the store keeps it: a JSON object with a known
    /// R4 `resourceType` and a valid `id`; `None` for anything else.
    pub fn from_line(line: &str) -> Option<Parsed> {
        let members = Members::parse(line)?;
        let ty = members.string("resourceType")?;
        let id = members.string("id")?;
        (atlas_fhir::is_resource_type(&ty) && atlas_fhir::is_valid_id(&id)).then_some(Parsed {
            ty,
            id,
            members,
        })
    }
}

/// `s` as a JSON string literal.
pub(crate) fn quote(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// Sets `meta.versionId` and `meta.lastUpdated`, keeping the other meta members.
pub(crate) fn stamp_meta(
    meta: &mut serde_json::Map<String, Value>,
    version_id: u64,
    last_updated: &str,
) {
    meta.insert("versionId".into(), Value::String(version_id.to_string()));
    meta.insert("lastUpdated".into(), Value::String(last_updated.into()));
}

/// An OperationOutcome with one issue.
pub(crate) fn outcome(severity: &str, code: &str, text: &str) -> Value {
    serde_json::json!({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": text}]
    })
}

/// The patient ids a resource belongs to (its Patient compartment): the
/// Patient itself, or the patients its compartment fields reference.
pub(crate) fn compartment_patients(ty: &str, id: &str, members: &Members) -> Vec<String> {
    if ty == "Patient" {
        return vec![id.to_string()];
    }
    // A small fixed table: the fields through which the common clinical
    // types join the Patient compartment.
    let fields: &[&str] = match ty {
        "Provenance" => &["patient", "target"],
        "Group" | "Organization" | "Practitioner" | "PractitionerRole" | "Location"
        | "Medication" | "Binary" => &[],
        _ => &["subject", "patient", "beneficiary"],
    };
    let mut out = Vec::new();
    for field in fields {
        let Some(raw) = members.get(field) else {
            continue;
        };
        let Ok(value) = serde_json::from_str::<Value>(raw.get()) else {
            continue;
        };
        let refs: Vec<&Value> = match &value {
            Value::Array(items) => items.iter().collect(),
            other => vec![other],
        };
        for r in refs {
            if let Some(pid) = r
                .get("reference")
                .and_then(Value::as_str)
                .and_then(patient_id_of)
                && !out.iter().any(|p| p == pid)
            {
                out.push(pid.to_string());
            }
        }
    }
    out
}

/// The patient id a reference points at: `Patient/x`, `.../Patient/x`,
/// `Patient/x/_history/n`, or `urn:uuid:x` (Synthea bundles use the
/// patient's id as its uuid).
pub(crate) fn patient_id_of(reference: &str) -> Option<&str> {
    if let Some(uuid) = reference.strip_prefix("urn:uuid:") {
        return atlas_fhir::is_valid_id(uuid).then_some(uuid);
    }
    let path = reference.split("/_history/").next()?;
    let at = path.rfind("Patient/")?;
    if at > 0 && !path[..at].ends_with('/') {
        return None;
    }
    let id = &path[at + "Patient/".len()..];
    atlas_fhir::is_valid_id(id).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_keeps_bytes_and_places_meta() {
        let line = r#"{"resourceType":"Observation","id":"o1","valueQuantity":{"value":16942.30},"subject":{"reference":"Patient/p1"}}"#;
        let p = Parsed::from_line(line).unwrap();
        let mut meta = p.members.meta();
        stamp_meta(&mut meta, 1, "2026-01-01T00:00:00.000Z");
        let out = p.members.render(&meta);
        assert_eq!(
            out,
            r#"{"resourceType":"Observation","id":"o1","meta":{"lastUpdated":"2026-01-01T00:00:00.000Z","versionId":"1"},"valueQuantity":{"value":16942.30},"subject":{"reference":"Patient/p1"}}"#
        );
        assert_eq!(compartment_patients(&p.ty, &p.id, &p.members), vec!["p1"]);
    }

    #[test]
    fn references() {
        assert_eq!(patient_id_of("Patient/a"), Some("a"));
        assert_eq!(patient_id_of("http://x/fhir/Patient/a"), Some("a"));
        assert_eq!(patient_id_of("Patient/a/_history/2"), Some("a"));
        assert_eq!(patient_id_of("RelatedPatient/a"), None);
        assert_eq!(patient_id_of("Practitioner/a"), None);
        assert!(Parsed::from_line("[1]").is_none());
        assert!(Parsed::from_line(r#"{"resourceType":"Nope","id":"x"}"#).is_none());
    }
}
