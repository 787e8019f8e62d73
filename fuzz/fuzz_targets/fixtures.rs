//! Small fixed resources shared by the fuzz targets.

use serde_json::{Value as Json, json};

pub fn patient() -> Json {
    json!({
        "resourceType": "Patient",
        "id": "fz1",
        "meta": {"lastUpdated": "2021-06-01T10:00:00.000+02:00"},
        "extension": [
            {"url": "http://example.org/fhir/ext/eye-colour", "valueCode": "green"},
            {"url": "http://example.org/fhir/ext/nested", "extension": [
                {"url": "a", "valueInteger": 7},
                {"url": "b", "valueQuantity": {"value": 1.5, "unit": "m", "system": "http://unitsofmeasure.org", "code": "m"}}
            ]}
        ],
        "active": true,
        "birthDate": "1988-02-29",
        "_birthDate": {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
                                      "valueDateTime": "1988-02-29T06:15:00+01:00"}]},
        "name": [
            {"use": "official", "family": "Okonkwo", "given": ["Ada", "Ngozi"], "period": {"start": "2000-01-01"}},
            {"use": "nickname", "given": [null, "Nene"], "_given": [{"extension": [{"url": "http://example.org/x", "valueString": "y"}]}, null]},
            {"family": "Ribeiro", "prefix": ["Dr."]}
        ],
        "telecom": [{"system": "phone", "value": "+44 20 7946 0000", "rank": 2}],
        "gender": "female",
        "multipleBirthInteger": 2,
        "address": [{"line": ["1 Rue Exemple", "Bât. B"], "city": "Lyon", "postalCode": "69001", "country": "FR"}],
        "managingOrganization": {"reference": "#org1", "display": "Clinique"},
        "generalPractitioner": [{"reference": "Practitioner/pr9"}, {"reference": "#org1"}],
        "contained": [
            {"resourceType": "Organization", "id": "org1", "name": "Clinique Exemple",
             "identifier": [{"system": "urn:oid:1.2.3", "value": "42"}]}
        ]
    })
}

pub fn observation() -> Json {
    json!({
        "resourceType": "Observation",
        "id": "ob1",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8302-2", "display": "Body height"}]},
        "subject": {"reference": "Patient/fz1"},
        "effectiveDateTime": "2022-11-03T08:30:00Z",
        "valueQuantity": {"value": 171.25, "unit": "cm", "system": "http://unitsofmeasure.org", "code": "cm"},
        "component": [
            {"code": {"text": "a"}, "valueString": "x"},
            {"code": {"text": "b"}, "valueBoolean": false}
        ]
    })
}
