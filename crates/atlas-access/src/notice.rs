//! Change notices: what the events paths (`GET /events`, FHIR
//! Subscriptions, the FHIRcast hub's data) may tell a principal about a
//! change to the lake, released through [`Egress`].
//!
//! A notice goes out only when the principal may search the changed
//! resource's type and the resource's patient is inside the grant's row
//! scope, decided at the time of the notice (a policy reloaded since the
//! connection opened applies to the next event). What leaves is what the
//! other paths would let out: the patient is noted for the audit, the
//! notice is counted, hidden elements are removed and a de-identifying
//! grant de-identifies the resource (and hashes its id; the id of a deleted
//! resource cannot be hashed without it, so such a notice carries none).

use atlas_policy::{Action, Decision, Principal};

use crate::{Access, Egress};

/// How much of the changed resource a notice carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// The type (and the patient's existence) only.
    Empty,
    /// Type and id.
    IdOnly,
    /// The resource as the grant lets it out.
    FullResource,
}

/// One change as the seam needs it.
#[derive(Debug, Clone, Copy)]
pub struct ChangeRef<'a> {
    pub resource_type: &'a str,
    pub id: &'a str,
    pub patient: Option<&'a str>,
    /// The stored JSON; `None` for a delete.
    pub resource: Option<&'a str>,
}

/// A notice as it may leave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub resource_type: String,
    /// The id as it leaves (hashed by a de-identifying grant); `None` for
    /// [`Payload::Empty`] or when it cannot leave.
    pub id: Option<String>,
    /// The patient as the grant lets it out (`None` under de-identification).
    pub patient: Option<String>,
    /// The resource JSON, for [`Payload::FullResource`] (absent for deletes).
    pub resource: Option<String>,
    /// The grant de-identifies: whatever else the path would add about
    /// the resource (versions, instants) must not go out either.
    pub deidentified: bool,
}

/// Releases notices to one principal, through one [`Egress`] (one audit
/// record: a connection, a subscription's delivery).
pub struct NoticeGate {
    access: Access,
    who: Principal,
    egress: Egress,
}

impl Access {
    /// The gate every events path releases change notices through.
    pub fn notices(&self, who: Principal, egress: Egress) -> NoticeGate {
        NoticeGate {
            access: self.clone(),
            who,
            egress,
        }
    }
}

impl NoticeGate {
    pub fn principal(&self) -> &Principal {
        &self.who
    }

    pub fn egress(&self) -> &Egress {
        &self.egress
    }

    /// Whether the principal may learn of changes to `resource_type` of
    /// `patient` (no audit note: for filtering before any release).
    pub fn admits(&self, resource_type: &str, patient: Option<&str>) -> bool {
        match self
            .access
            .decide_unnoted(&self.who, resource_type, Action::Search)
        {
            Decision::Allow(g) => g.rows.admits(patient),
            Decision::Deny(_) => false,
        }
    }

    /// Whether the principal's grant for `resource_type` de-identifies
    /// (filters on real ids must then match nothing).
    pub fn deidentifies(&self, resource_type: &str) -> bool {
        matches!(
            self.access.decide_unnoted(&self.who, resource_type, Action::Search),
            Decision::Allow(g) if g.deid.is_some()
        )
    }

    /// The notice of `change` as it may leave, or `None` when the principal
    /// may not learn of it. A released notice is noted and counted.
    pub fn release(&self, change: &ChangeRef<'_>, payload: Payload) -> Option<Notice> {
        let d = self
            .access
            .decide_unnoted(&self.who, change.resource_type, Action::Search);
        let Decision::Allow(grant) = d else {
            return None;
        };
        if !grant.rows.admits(change.patient) {
            return None;
        }
        let mut release = self.egress.resources();
        if release
            .admit(&self.access, change.resource_type, &grant)
            .is_err()
        {
            return None;
        }
        let deid = grant.deid.is_some();
        let (id, resource) = match change.resource {
            Some(json) => {
                let out = release.release(change.resource_type, change.id, json, change.patient);
                let id = out.id.map(|s| s.into_owned());
                let body = (payload == Payload::FullResource).then(|| out.json.into_owned());
                (id, body)
            }
            None => {
                self.egress.notice(change.patient);
                ((!deid).then(|| change.id.to_owned()), None)
            }
        };
        Some(Notice {
            deidentified: deid,
            resource_type: change.resource_type.to_owned(),
            id: if payload == Payload::Empty { None } else { id },
            patient: if deid {
                None
            } else {
                change.patient.map(str::to_owned)
            },
            resource,
        })
    }
}

impl NoticeGate {
    /// A message carrying FHIR resources (a FHIRcast notification's
    /// `event.context[].resource`, a current context's `context[]`, Bundles
    /// in them entry by entry) as this principal may receive it: `None`
    /// when one of them may not go out at all (its type denied, or its
    /// patient outside the grant's rows: `patients` are the patients the
    /// message is about, and a Patient resource is its own); otherwise the
    /// message, rewritten only where a grant hides elements or
    /// de-identifies (the publisher's copy is not the lake's, but it leaves
    /// under the same rules).
    pub fn release_message(&self, text: &str, patients: &[String]) -> Option<String> {
        if !patients.iter().all(|p| self.admits("Patient", Some(p))) {
            return None;
        }
        let mut v: serde_json::Value = serde_json::from_str(text).ok()?;
        let patient = patients.first().map(String::as_str);
        let mut changed = false;
        let context = if v.pointer("/event/context").is_some() {
            v.pointer_mut("/event/context")
        } else {
            v.get_mut("context")
        };
        if let Some(serde_json::Value::Array(entries)) = context {
            for e in entries {
                if let Some(r) = e.get_mut("resource") {
                    changed |= self.release_value(r, patient)?;
                } else if let Some(r) = e.get("reference").and_then(|r| r.as_str()) {
                    // A bare reference names a resource and its id: it
                    // leaves only where that id may (not hashed: refused
                    // under a de-identifying grant).
                    let ty = r.split('/').rev().nth(1).unwrap_or("");
                    match self.access.decide_unnoted(&self.who, ty, Action::Search) {
                        Decision::Allow(g) if g.deid.is_none() && g.rows.admits(patient) => {}
                        _ => return None,
                    }
                }
            }
        }
        Some(if changed {
            v.to_string()
        } else {
            text.to_owned()
        })
    }

    /// Releases one embedded resource in place; `Some(true)` when it was
    /// rewritten, `None` when it may not go out.
    fn release_value(&self, r: &mut serde_json::Value, patient: Option<&str>) -> Option<bool> {
        let ty = r.get("resourceType")?.as_str()?.to_owned();
        if ty == "Bundle" {
            let mut changed = false;
            if let Some(serde_json::Value::Array(entries)) = r.get_mut("entry") {
                for e in entries {
                    if let Some(inner) = e.get_mut("resource") {
                        changed |= self.release_value(inner, patient)?;
                    }
                }
            }
            return Some(changed);
        }
        let id = r
            .get("id")
            .and_then(|i| i.as_str())
            .unwrap_or("")
            .to_owned();
        // Whose the resource is: a Patient is its own; another names its
        // patient in `subject` or `patient` (a publisher's Encounter about
        // someone else than the event's patient is that someone's).
        let named = ["subject", "patient"].iter().find_map(|k| {
            r.get(*k)?
                .get("reference")?
                .as_str()?
                .rsplit_once("Patient/")
                .map(|(_, p)| p.trim_end_matches('/').to_owned())
        });
        let owner = if ty == "Patient" && !id.is_empty() {
            Some(id.as_str())
        } else {
            named.as_deref().or(patient)
        };
        let Decision::Allow(grant) = self.access.decide_unnoted(&self.who, &ty, Action::Search)
        else {
            return None;
        };
        if !grant.rows.admits(owner) {
            return None;
        }
        if grant.hidden.is_empty() && grant.deid.is_none() {
            self.egress.notice(owner);
            return Some(false);
        }
        let mut release = self.egress.resources();
        release.admit(&self.access, &ty, &grant).ok()?;
        let json = r.to_string();
        let out = release.release(&ty, &id, &json, owner);
        *r = serde_json::from_str(&out.json).ok()?;
        Some(true)
    }
}
