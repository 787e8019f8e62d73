//! What the server says about itself: the SMART configuration
//! (`.well-known/smart-configuration`), the CapabilityStatement
//! (`metadata`: Bulk Data, `_lastUpdated`, history, the OAuth token URL),
//! and the configured Groups as FHIR resources.

use std::collections::{BTreeSet, HashSet};

use serde_json::{Value, json};

use crate::MockEhr;
use crate::clock::{START_MICROS, format_instant};
use crate::store::Store;

pub(crate) fn smart_configuration(ehr: &MockEhr) -> Value {
    json!({
        "issuer": ehr.origin(),
        "token_endpoint": ehr.token_url(),
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "scopes_supported": ["system/*.read", "system/*.rs", "system/Patient.read", "system/Patient.rs"],
        "capabilities": ["client-confidential-asymmetric", "permission-v1", "permission-v2"]
    })
}

pub(crate) fn capability_statement(ehr: &MockEhr) -> Value {
    let types: BTreeSet<String> = {
        let store = ehr.lock_store();
        store
            .live
            .keys()
            .cloned()
            .chain(["Patient".into(), "Group".into()])
            .collect()
    };
    let history = ehr.config.history;
    let resources: Vec<Value> = types.iter().map(|ty| resource_entry(ty, history)).collect();
    let mut rest = json!({
        "mode": "server",
        "security": {
            "extension": [{
                "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                "extension": [{"url": "token", "valueUri": ehr.token_url()}]
            }],
            "service": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                "code": "SMART-on-FHIR"
            }]}]
        },
        "resource": resources,
        "operation": [{"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"}]
    });
    if history {
        rest["interaction"] = json!([{"code": "history-system"}]);
    }
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": format_instant(START_MICROS),
        "kind": "instance",
        "instantiates": ["http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"],
        "software": {"name": "Atlas mock EHR", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "Atlas mock EHR (deterministic test server)", "url": ehr.fhir_base()},
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [rest]
    })
}

/// One type's `rest.resource` entry.
fn resource_entry(ty: &str, history: bool) -> Value {
    let mut interactions = vec![
        json!({"code": "read"}),
        json!({"code": "vread"}),
        json!({"code": "search-type"}),
    ];
    if history {
        interactions.push(json!({"code": "history-instance"}));
        interactions.push(json!({"code": "history-type"}));
    }
    let mut r = json!({
        "type": ty,
        "interaction": interactions,
        "searchParam": [{"name": "_lastUpdated", "type": "date"}]
    });
    let definition = match ty {
        "Patient" => Some("http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export"),
        "Group" => Some("http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export"),
        _ => None,
    };
    if let Some(def) = definition {
        r["operation"] = json!([{"name": "export", "definition": def}]);
    }
    r
}

impl MockEhr {
    /// The ids of Group `id`'s members (empty for an unknown group).
    pub(crate) fn group_members(&self, store: &Store, id: &str) -> HashSet<String> {
        let Some(def) = self.config.groups.iter().find(|g| g.id == id) else {
            return HashSet::new();
        };
        let mut members: HashSet<String> = def.patients.iter().cloned().collect();
        if let Some(n) = def.every_nth_patient {
            members.extend(
                store
                    .patient_ordinal
                    .iter()
                    .filter(|(_, ordinal)| *ordinal % n == 0)
                    .map(|(pid, _)| pid.clone()),
            );
        }
        members
    }

    /// Group `id` as a FHIR Group, its live members listed.
    pub(crate) fn group_resource(&self, id: &str) -> Option<Value> {
        self.config.groups.iter().find(|g| g.id == id)?;
        let store = self.lock_store();
        let mut members: Vec<String> = self
            .group_members(&store, id)
            .into_iter()
            .filter(|p| store.current("Patient", p).is_some_and(|v| !v.deleted()))
            .collect();
        members.sort();
        Some(json!({
            "resourceType": "Group",
            "id": id,
            "meta": {"versionId": "1", "lastUpdated": format_instant(START_MICROS)},
            "type": "person",
            "actual": true,
            "quantity": members.len(),
            "member": members.iter().map(|p| json!({"entity": {"reference": format!("Patient/{p}")}})).collect::<Vec<_>>()
        }))
    }
}
