use crate::*;
use serde_json::{Map, json};

fn compiled() -> Vec<(&'static str, CompiledView)> {
    compile_builtin_views().expect("built-in views compile")
}

fn refs<'a>(views: &'a [(&'static str, CompiledView)]) -> Vec<(&'static str, &'a CompiledView)> {
    views.iter().map(|(n, v)| (*n, v)).collect()
}

fn view_plan(name: &str) -> CompiledView {
    builtin_view(name).unwrap().compile().unwrap()
}

fn rows(view: &str, resources: &[Json]) -> Vec<Map<String, Json>> {
    let batch = view_plan(view).run(resources).expect("view runs");
    atlas_views::batch_to_json_rows(&batch)
}

#[test]
fn builtin_views_are_listed_in_order_and_shareable() {
    let names: Vec<&str> = builtin_views().iter().map(|v| v.name).collect();
    assert_eq!(
        names,
        [
            "patient",
            "encounter",
            "observation",
            "observation_component",
            "condition",
            "medication_request"
        ]
    );
    for v in builtin_views() {
        let j = v.json_value();
        assert_eq!(j["resourceType"], "ViewDefinition", "{}", v.name);
        assert_eq!(j["name"], v.name);
        assert_eq!(j["status"], "active", "{}", v.name);
        assert!(j["resource"].is_string(), "{}", v.name);
        let mut names = Vec::new();
        for s in j["select"].as_array().unwrap() {
            for c in s["column"].as_array().unwrap() {
                let n = c["name"].as_str().unwrap();
                assert!(c["type"].is_string(), "{}.{n} has no type", v.name);
                assert!(
                    c["description"].as_str().is_some_and(|d| !d.is_empty()),
                    "{}.{n} has no description",
                    v.name
                );
                names.push(n);
            }
        }
        assert_eq!(&names[..2], ["id", "patient_id"], "{}", v.name);
    }
}

#[test]
fn builtin_views_compile_without_warnings() {
    for v in builtin_views() {
        let plan = CompiledView::from_json(&v.json_value())
            .unwrap_or_else(|d| panic!("{}: {}", v.name, atlas_views::render_diagnostics(&d)));
        assert!(
            plan.warnings().is_empty(),
            "{}: {}",
            v.name,
            atlas_views::render_diagnostics(plan.warnings())
        );
        assert_eq!(plan.name(), Some(v.name));
    }
}

#[test]
fn builtin_ontology_parses_and_validates() {
    let o = Ontology::builtin();
    let views = compiled();
    o.validate(&refs(&views)).unwrap();
    let types: Vec<&str> = o.object_types.iter().map(|t| t.api_name.as_str()).collect();
    assert_eq!(
        types,
        [
            "Patient",
            "Encounter",
            "Observation",
            "Condition",
            "MedicationRequest"
        ]
    );
    let sets: Vec<&str> = o.object_sets.iter().map(|s| s.api_name.as_str()).collect();
    assert_eq!(
        sets,
        [
            "PatientAll",
            "EncounterAll",
            "ObservationAll",
            "ConditionAll",
            "MedicationRequestAll"
        ]
    );
    assert_eq!(o.links.len(), 7);
    assert_eq!(o.links_from("Patient").count(), 4);
    assert_eq!(o.links_from("Encounter").count(), 3);
    assert_eq!(o.links_to("Observation").count(), 2);
    assert!(o.object_set("PatientAll").is_some());
    assert!(o.object_type("Nope").is_none());

    // Every view column is a property, with the view's declared FHIR type.
    for t in &o.object_types {
        let view = builtin_view(&t.backing_view).unwrap().json_value();
        let cols: Vec<&Json> = view["select"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s["column"].as_array().unwrap())
            .collect();
        assert_eq!(cols.len(), t.properties.len(), "{}", t.api_name);
        for (c, p) in cols.iter().zip(&t.properties) {
            assert_eq!(c["name"], p.column.as_str(), "{}", t.api_name);
            assert_eq!(p.api_name, p.column);
            assert_eq!(
                c["type"],
                p.r#type.as_str(),
                "{}.{}",
                t.api_name,
                p.api_name
            );
            assert!(!p.description.is_empty());
        }
    }
    let patient = o.object_type("Patient").unwrap();
    for d in ["age", "is_synthetic", "deceased"] {
        assert!(patient.property(d).unwrap().derived, "{d}");
    }
    assert!(!patient.property("family").unwrap().derived);
    assert!(
        o.object_types
            .iter()
            .all(|t| t.backing_view != "observation_component")
    );
}

#[test]
fn ontology_json_round_trips() {
    let o = Ontology::builtin();
    let again = Ontology::from_json(&o.to_json_pretty()).unwrap();
    assert_eq!(o, again);
    // `derived: false` is not written.
    assert!(!o.to_json_pretty().contains("\"derived\": false"));
}

/// A small valid ontology over the built-in views, as JSON to break.
fn small() -> Json {
    json!({
        "objectTypes": [
            {"apiName": "Patient", "displayName": "Patient", "backingView": "patient",
             "primaryKey": "id", "titleProperty": "family", "properties": [
                {"apiName": "id", "column": "id", "type": "id"},
                {"apiName": "family", "column": "family", "type": "string"},
                {"apiName": "age", "column": "age", "type": "integer", "derived": true}]},
            {"apiName": "Encounter", "displayName": "Encounter", "backingView": "encounter",
             "primaryKey": "id", "titleProperty": "id", "properties": [
                {"apiName": "id", "column": "id", "type": "id"},
                {"apiName": "patient_id", "column": "patient_id", "type": "id"}]}
        ],
        "links": [{"apiName": "encounters", "reverseApiName": "patient", "from": "Patient",
                   "to": "Encounter", "fromProperty": "id", "toProperty": "patient_id",
                   "cardinality": "one-to-many"}],
        "objectSets": [{"apiName": "PatientAll", "objectType": "Patient"}]
    })
}

fn errors_of(j: &Json) -> Vec<String> {
    let views = compiled();
    let o = Ontology::from_value(j).expect("shape is fine");
    o.validate(&refs(&views)).expect_err("must be rejected")
}

fn has(errs: &[String], parts: &[&str]) {
    assert!(
        errs.iter().any(|e| parts.iter().all(|p| e.contains(p))),
        "no error containing {parts:?} in {errs:#?}"
    );
}

#[test]
fn small_ontology_is_valid() {
    let views = compiled();
    let o = Ontology::from_value(&small()).unwrap();
    o.validate(&refs(&views)).unwrap();
    assert!(
        Ontology::load(&small().to_string(), &refs(&views)).is_ok(),
        "load = parse + validate"
    );
}

#[test]
fn unknown_column_is_rejected() {
    let mut j = small();
    j["objectTypes"][0]["properties"][1]["column"] = json!("famly");
    has(
        &errors_of(&j),
        &[
            "object type 'Patient'",
            "property 'family'",
            "column 'famly'",
            "view 'patient'",
        ],
    );
}

#[test]
fn wrong_type_is_rejected() {
    let mut j = small();
    j["objectTypes"][0]["properties"][2]["type"] = json!("string");
    has(
        &errors_of(&j),
        &[
            "object type 'Patient'",
            "property 'age'",
            "type 'string'",
            "integer",
        ],
    );
    let mut j = small();
    j["objectTypes"][0]["properties"][2]["type"] = json!("Quantity");
    has(
        &errors_of(&j),
        &["property 'age'", "'Quantity' is not a FHIR primitive type"],
    );
}

#[test]
fn dangling_link_is_rejected() {
    let mut j = small();
    j["links"][0]["to"] = json!("Encountr");
    has(
        &errors_of(&j),
        &["link 'encounters'", "object type 'Encountr' does not exist"],
    );
    let mut j = small();
    j["links"][0]["toProperty"] = json!("subject");
    has(
        &errors_of(&j),
        &[
            "link 'encounters'",
            "toProperty 'subject'",
            "object type 'Encounter'",
        ],
    );
    let mut j = small();
    j["links"][0]["fromProperty"] = json!("age");
    has(&errors_of(&j), &["link 'encounters'", "cannot be joined"]);
}

#[test]
fn duplicate_api_names_are_rejected() {
    let mut j = small();
    let dup = j["objectTypes"][0]["properties"][1].clone();
    j["objectTypes"][0]["properties"]
        .as_array_mut()
        .unwrap()
        .push(dup);
    has(
        &errors_of(&j),
        &[
            "object type 'Patient'",
            "properties",
            "'family'",
            "more than once",
        ],
    );
    let mut j = small();
    j["objectTypes"][1]["apiName"] = json!("Patient");
    has(
        &errors_of(&j),
        &["object types", "'Patient'", "more than once"],
    );
    let mut j = small();
    let dup = j["objectSets"][0].clone();
    j["objectSets"].as_array_mut().unwrap().push(dup);
    has(
        &errors_of(&j),
        &["object sets", "'PatientAll'", "more than once"],
    );
    let mut j = small();
    j["links"][0]["apiName"] = json!("family");
    has(
        &errors_of(&j),
        &["object type 'Patient'", "'family'", "also a property"],
    );
}

#[test]
fn other_inconsistencies_are_rejected() {
    let mut j = small();
    j["objectTypes"][1]["backingView"] = json!("encounters");
    has(
        &errors_of(&j),
        &["object type 'Encounter'", "backing view 'encounters'"],
    );
    let mut j = small();
    j["objectTypes"][0]["titleProperty"] = json!("given");
    has(
        &errors_of(&j),
        &["object type 'Patient'", "title property 'given'"],
    );
    let mut j = small();
    j["objectSets"][0]["objectType"] = json!("Person");
    has(
        &errors_of(&j),
        &["object set 'PatientAll'", "'Person' does not exist"],
    );
    let mut j = small();
    j["objectTypes"][0]["patientProperty"] = json!("nope");
    has(
        &errors_of(&j),
        &["object type 'Patient'", "patient property 'nope'"],
    );
    let mut j = small();
    j["objectTypes"][0]["timeProperty"] = json!("family");
    has(
        &errors_of(&j),
        &[
            "time property 'family'",
            "must be a date, dateTime or instant",
        ],
    );
}

#[test]
fn shape_errors_say_where() {
    let mut j = small();
    j["objectTypes"][0]["properties"][2]["derivd"] = json!(true);
    let e = Ontology::from_value(&j).unwrap_err().to_string();
    assert!(
        e.contains("objectTypes[0] 'Patient'.properties[2] 'age'") && e.contains("derivd"),
        "{e}"
    );
    let mut j = small();
    j["links"][0]["cardinality"] = json!("many");
    let e = Ontology::from_value(&j).unwrap_err().to_string();
    assert!(
        e.contains("links[0] 'encounters'") && e.contains("many"),
        "{e}"
    );
    let e = Ontology::from_json("{\"objectTypes\": [}").unwrap_err();
    assert!(matches!(e, OntologyError::Syntax { line: 1, .. }), "{e:?}");
    let e = Ontology::from_json("{}").unwrap_err().to_string();
    assert!(e.contains("objectTypes"), "{e}");
}

#[test]
fn render_text_lists_everything() {
    let text = Ontology::builtin().render_text();
    for needle in [
        "Object types (5)",
        "Patient (Patient)",
        "backing view: patient   primary key: id   title: family",
        "age",
        "[derived]",
        "Links (7)",
        "Patient.encounters -> Encounter (one-to-many; Patient.id = Encounter.patient_id; reverse Encounter.patient)",
        "Object sets (5)",
        "PatientAll: Patient (Every patient)",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    assert_eq!(text, Ontology::builtin().render_text());
}

fn patient(id: &str, birth: &str) -> Json {
    json!({"resourceType": "Patient", "id": id, "birthDate": birth})
}

#[test]
fn patient_view_values() {
    let full = json!({
        "resourceType": "Patient", "id": "p1",
        "meta": {"lastUpdated": "2025-03-04T05:06:07Z",
                 "tag": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HTEST"}]},
        "extension": [
            {"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race", "extension": [
                {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": "2054-5", "display": "Black or African American"}},
                {"url": "text", "valueString": "Black"}]},
            {"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity", "extension": [
                {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": "2186-5", "display": "Not Hispanic or Latino"}}]}
        ],
        "name": [{"use": "usual", "family": "Nick", "given": ["Bob"]},
                 {"use": "official", "family": "Smith", "given": ["Robert", "James"]}],
        "gender": "male",
        "birthDate": "1980-06-15",
        "deceasedDateTime": "2024-02-03T10:00:00Z",
        "maritalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "code": "M"}]},
        "address": [{"use": "work", "city": "Work City"},
                    {"use": "home", "city": "Boston", "state": "MA", "postalCode": "02118"}],
        "managingOrganization": {"reference": "Organization/org1"}
    });
    let smart = json!({"resourceType": "Patient", "id": "p2", "birthDate": "2000-01-01",
        "name": [{"family": "Doe", "given": ["Jane"]}], "deceasedBoolean": false,
        "meta": {"tag": [{"system": "https://smarthealthit.org/tags", "code": "synthea-5-2019"}]},
        "extension": [{"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race", "extension": [
            {"url": "ombCategory", "valueCoding": {"code": "2106-3", "display": "White"}}]}]});
    let r = rows(
        "patient",
        &[
            full,
            smart,
            patient("p3", "2000-01-02"),
            patient("p4", "1990"),
            patient("p5", "1990-01"),
            patient("p6", "1990-02"),
            patient("p7", "2000-12-31"),
            json!({"resourceType": "Patient", "id": "p8", "deceasedBoolean": true}),
            json!({"resourceType": "Observation", "id": "not-a-patient"}),
        ],
    );
    assert_eq!(r.len(), 8);
    let p1 = &r[0];
    assert_eq!(p1["id"], "p1");
    assert_eq!(p1["patient_id"], "p1");
    assert_eq!(p1["family"], "Smith", "official name wins");
    assert_eq!(p1["given"], "Robert", "first given of the official name");
    assert_eq!(p1["gender"], "male");
    assert_eq!(p1["birth_date"], "1980-06-15");
    assert_eq!(p1["age"], 45, "birthday after the reference month-day");
    assert_eq!(p1["deceased"], true);
    assert_eq!(p1["deceased_date_time"], "2024-02-03T10:00:00Z");
    assert_eq!(p1["marital_status"], "M");
    assert_eq!(p1["race"], "Black", "text sub-extension first");
    assert_eq!(
        p1["ethnicity"], "Not Hispanic or Latino",
        "ombCategory display without text"
    );
    assert_eq!(p1["city"], "Boston", "home address wins");
    assert_eq!(p1["state"], "MA");
    assert_eq!(p1["postal_code"], "02118");
    assert_eq!(p1["managing_organization"], "org1");
    assert_eq!(p1["is_synthetic"], true, "HTEST tag (atlas synth)");
    assert_eq!(p1["fhir_version"], "R4");
    assert_eq!(p1["last_updated"], "2025-03-04T05:06:07Z");

    let p2 = &r[1];
    assert_eq!(p2["family"], "Doe", "first name without an official one");
    assert_eq!(p2["given"], "Jane");
    assert_eq!(p2["age"], 26, "birthday on the reference date counts");
    assert_eq!(p2["deceased"], false);
    assert_eq!(p2["deceased_date_time"], Json::Null);
    assert_eq!(p2["race"], "White");
    assert_eq!(p2["ethnicity"], Json::Null);
    assert_eq!(p2["is_synthetic"], true, "SMART Synthea tag");
    assert_eq!(p2["last_updated"], Json::Null);

    let ages: Vec<&Json> = r[2..].iter().map(|row| &row["age"]).collect();
    assert_eq!(
        ages,
        [
            &json!(25),  // 2000-01-02: birthday after 01-01
            &json!(36),  // 1990: year only, birthday counted as passed
            &json!(36),  // 1990-01: same month as the reference date
            &json!(35),  // 1990-02: later month
            &json!(25),  // 2000-12-31
            &Json::Null  // no birthDate
        ]
    );
    assert_eq!(r[2]["is_synthetic"], false, "no tag");
    assert_eq!(r[2]["deceased"], false);
    assert_eq!(r[7]["deceased"], true);
}

#[test]
fn observation_views_values() {
    let bp = json!({
        "resourceType": "Observation", "id": "o1", "status": "final",
        "category": [{"coding": [{"code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9", "display": "Blood pressure"}]},
        "subject": {"reference": "Patient/p1"}, "encounter": {"reference": "Encounter/e1"},
        "effectivePeriod": {"start": "2020-01-01T10:00:00Z"},
        "issued": "2020-01-01T10:05:00.000Z",
        "component": [
            {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6", "display": "Systolic"}]},
             "valueQuantity": {"value": 120.5, "unit": "mm[Hg]"}},
            {"code": {"text": "Diastolic"}, "valueQuantity": {"value": 80, "code": "mm[Hg]"}},
            {"code": {"coding": [{"code": "x"}]}, "valueString": "n/a"}
        ]
    });
    let lab = json!({
        "resourceType": "Observation", "id": "o2", "status": "final",
        "code": {"text": "Glucose"}, "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": "2021-05-06",
        "valueQuantity": {"value": 0.0041469869838683445, "unit": "mmol/L"}
    });
    let coded = json!({"resourceType": "Observation", "id": "o3", "status": "final",
        "code": {"coding": [{"code": "c"}]}, "subject": {"reference": "Group/g1"},
        "valueCodeableConcept": {"coding": [{"code": "POS"}]}});
    let flag = json!({"resourceType": "Observation", "id": "o4", "status": "final",
        "code": {"coding": [{"code": "b"}]}, "valueBoolean": true});
    let all = [bp, lab, coded, flag];

    let r = rows("observation", &all);
    assert_eq!(r.len(), 4);
    assert_eq!(r[0]["patient_id"], "p1");
    assert_eq!(r[0]["encounter_id"], "e1");
    assert_eq!(r[0]["category"], "vital-signs");
    assert_eq!(r[0]["code_system"], "http://loinc.org");
    assert_eq!(r[0]["code"], "85354-9");
    assert_eq!(r[0]["code_display"], "Blood pressure");
    assert_eq!(
        r[0]["effective"], "2020-01-01T10:00:00Z",
        "effectivePeriod.start"
    );
    assert_eq!(r[0]["issued"], "2020-01-01T10:05:00.000Z");
    assert_eq!(r[0]["value_quantity"], Json::Null);
    assert_eq!(r[1]["code_display"], "Glucose", "code.text fallback");
    assert_eq!(r[1]["effective"], "2021-05-06");
    assert_eq!(r[1]["value_unit"], "mmol/L");
    let v = r[1]["value_quantity"].as_f64().unwrap();
    assert!((v - 0.004146986983868345).abs() < 1e-15, "{v}");
    assert_eq!(r[2]["patient_id"], Json::Null, "subject is not a Patient");
    assert_eq!(r[2]["value_code"], "POS");
    assert_eq!(r[3]["value_boolean"], true);
    assert_eq!(r[3]["id"], "o4");

    // The exact decimal text, not through f64.
    let batch = view_plan("observation").run(&all[1..2]).unwrap();
    let mut out = Vec::new();
    atlas_views::json::write_ndjson(&batch, &mut out).unwrap();
    let line = String::from_utf8(out).unwrap();
    assert!(
        line.contains("\"value_quantity\":0.004146986983868345"),
        "{line}"
    );

    let c = rows("observation_component", &all);
    assert_eq!(c.len(), 3, "one row per component");
    assert!(
        c.iter()
            .all(|row| row["id"] == "o1" && row["patient_id"] == "p1")
    );
    assert!(c.iter().all(|row| row["encounter_id"] == "e1"));
    let idx: Vec<&Json> = c.iter().map(|row| &row["component_index"]).collect();
    assert_eq!(idx, [&json!(0), &json!(1), &json!(2)]);
    assert_eq!(c[0]["code"], "8480-6");
    assert_eq!(c[0]["code_display"], "Systolic");
    assert_eq!(c[0]["value_quantity"], 120.5);
    assert_eq!(c[0]["value_unit"], "mm[Hg]");
    assert_eq!(c[1]["code_display"], "Diastolic");
    assert_eq!(c[1]["value_quantity"], 80.0);
    assert_eq!(c[1]["value_unit"], "mm[Hg]", "unit falls back to the code");
    assert_eq!(c[2]["value_string"], "n/a");
}

#[test]
fn medication_request_encounter_condition_values() {
    let mr = [
        json!({"resourceType": "MedicationRequest", "id": "m1", "status": "active", "intent": "order",
            "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "197361", "display": "Amlodipine 5 MG"}]},
            "subject": {"reference": "Patient/p1"}, "encounter": {"reference": "Encounter/e1"},
            "authoredOn": "2020-02-03", "requester": {"reference": "Practitioner/dr1"},
            "dosageInstruction": [{"text": "1 tablet daily"}, {"text": "second"}]}),
        json!({"resourceType": "MedicationRequest", "id": "m2", "status": "stopped", "intent": "plan",
            "medicationReference": {"reference": "Medication/med9"},
            "subject": {"reference": "Patient/p2"}, "requester": {"reference": "Organization/o1"}}),
    ];
    let r = rows("medication_request", &mr);
    assert_eq!(r.len(), 2);
    assert_eq!(r[0]["medication_code"], "197361");
    assert_eq!(r[0]["medication_display"], "Amlodipine 5 MG");
    assert_eq!(r[0]["medication_ref"], Json::Null);
    assert_eq!(r[0]["dosage_text"], "1 tablet daily");
    assert_eq!(r[0]["requester"], "dr1");
    assert_eq!(r[0]["encounter_id"], "e1");
    assert_eq!(r[0]["authored_on"], "2020-02-03");
    assert_eq!(r[1]["medication_ref"], "med9");
    assert_eq!(
        r[1]["medication_code"],
        Json::Null,
        "Medication/med9 is not available here"
    );
    assert_eq!(r[1]["requester"], "o1");
    assert_eq!(r[1]["patient_id"], "p2");

    // A contained Medication resolves without the lake; a resolver (the
    // lake's Medications, in atlas-viewstore) resolves a reference.
    let contained = json!({"resourceType": "MedicationRequest", "id": "m3", "status": "active",
        "intent": "order", "subject": {"reference": "Patient/p3"},
        "contained": [{"resourceType": "Medication", "id": "med",
            "code": {"coding": [{"code": "310965", "display": "Ibuprofen 200 MG"}]}}],
        "medicationReference": {"reference": "#med"}});
    let r = rows("medication_request", &[contained]);
    assert_eq!(r[0]["medication_code"], "310965");
    assert_eq!(r[0]["medication_display"], "Ibuprofen 200 MG");

    struct Meds(Json);
    impl atlas_fhirpath::ResourceResolver for Meds {
        fn resolve(&self, reference: &str) -> Option<&Json> {
            (reference == "Medication/med9").then_some(&self.0)
        }
    }
    let meds: std::sync::Arc<dyn atlas_fhirpath::ResourceResolver + Send + Sync> =
        std::sync::Arc::new(Meds(json!({"resourceType": "Medication", "id": "med9",
            "code": {"text": "Some tablets"}})));
    let plan = std::sync::Arc::new(view_plan("medication_request"));
    assert!(plan.uses_resolve());
    assert_eq!(plan.resolved_types(), ["Medication"]);
    for fast in [true, false] {
        let set = atlas_views::ViewSet::with_fast_path(vec![plan.clone()], fast)
            .with_resolver(meds.clone());
        let mut b = set.row_builders();
        let mut st = atlas_views::ViewSetState::new();
        for m in &mr {
            set.append(&m.to_string(), &mut st, &mut b, |_, e| panic!("{e}"));
        }
        let batch = b[0].finish().unwrap();
        let rows = atlas_views::batch_to_json_rows(&batch);
        assert_eq!(
            rows[0]["medication_display"], "Amlodipine 5 MG",
            "fast={fast}"
        );
        assert_eq!(
            rows[1]["medication_display"], "Some tablets",
            "fast={fast}: code.text"
        );
        assert_eq!(rows[1]["medication_code"], Json::Null);
    }

    let enc = json!({"resourceType": "Encounter", "id": "e1", "status": "finished",
        "class": {"code": "AMB"}, "type": [{"text": "Check up"}],
        "subject": {"reference": "Patient/p1"},
        "participant": [{"individual": {"reference": "RelatedPerson/rp"}},
                        {"individual": {"reference": "Practitioner/dr1"}}],
        "period": {"start": "2020-02-03T09:00:00Z", "end": "2020-02-03T09:30:00Z"},
        "reasonCode": [{"coding": [{"code": "R1"}]}],
        "serviceProvider": {"reference": "Organization/o1"}});
    let r = rows("encounter", &[enc]);
    assert_eq!(r[0]["class_code"], "AMB");
    assert_eq!(r[0]["type_display"], "Check up");
    assert_eq!(r[0]["type_code"], Json::Null);
    assert_eq!(r[0]["participant_practitioner"], "dr1");
    assert_eq!(r[0]["service_provider"], "o1");
    assert_eq!(r[0]["reason_code"], "R1");
    assert_eq!(r[0]["period_end"], "2020-02-03T09:30:00Z");

    let cond = json!({"resourceType": "Condition", "id": "c1",
        "clinicalStatus": {"coding": [{"code": "resolved"}]},
        "verificationStatus": {"coding": [{"code": "confirmed"}]},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006", "display": "Diabetes"}]},
        "subject": {"reference": "Patient/p1"}, "encounter": {"reference": "Encounter/e1"},
        "onsetPeriod": {"start": "2010-01-01"}, "abatementDateTime": "2011-01-01",
        "recordedDate": "2010-02-01"});
    let r = rows("condition", &[cond]);
    assert_eq!(r[0]["clinical_status"], "resolved");
    assert_eq!(r[0]["verification_status"], "confirmed");
    assert_eq!(r[0]["onset"], "2010-01-01", "onsetPeriod.start");
    assert_eq!(r[0]["abatement"], "2011-01-01");
    assert_eq!(r[0]["recorded_date"], "2010-02-01");
    assert_eq!(r[0]["code_display"], "Diabetes");
}
