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
