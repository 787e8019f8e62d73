use super::*;
use proptest::prelude::*;

fn onto() -> Ontology {
    Ontology::builtin()
}

fn decode(v: Json) -> R<ObjectSet> {
    let o = onto();
    Decoder::new(&o).object_set(&v, "objectSet")
}

#[test]
fn every_set_type_decodes_and_knows_its_object_type() {
    let set = decode(json!({
        "type": "subtract",
        "objectSets": [
            {"type": "searchAround", "link": "observations", "objectSet": {
                "type": "filter",
                "objectSet": {"type": "reference", "reference": "PatientAll"},
                "where": {"type": "and", "value": [
                    {"type": "eq", "field": "gender", "value": "female"},
                    {"type": "not", "value": {"type": "isNull", "field": "birth_date", "value": true}},
                    {"type": "gte", "field": "birth_date", "value": "1960-01-01"}
                ]}
            }},
            {"type": "filter", "objectSet": {"type": "base", "objectType": "Observation"},
             "where": {"type": "or", "value": [
                {"type": "lt", "field": "value_quantity", "value": "120.50"},
                {"type": "in", "field": "code", "value": ["8867-4", "8480-6"]},
                {"type": "containsAnyTerm", "field": "code_display", "value": "Heart RATE"},
                {"type": "startsWith", "field": "code_system", "value": "http://loinc"},
                {"type": "gt", "field": "effective", "value": "2020-01-01T00:00:00Z"}
             ]}},
            {"type": "static", "objectType": "Observation", "objects": ["o1", "o2"]}
        ]
    }))
    .unwrap();
    assert_eq!(set.object_type(), "Observation");
    let ObjectSet::Subtract(parts) = &set else {
        panic!("{set:?}")
    };
    assert!(
        matches!(&parts[0], ObjectSet::SearchAround { object_type, .. } if object_type == "Observation")
    );
    // Terms are lower-cased; decimals keep their text.
    let text = set.to_json().to_string();
    assert!(text.contains("\"heart rate\""), "{text}");
    assert!(text.contains("\"120.50\""), "{text}");
    // The reverse side of a link: an observation's patient.
    let p = decode(json!({"type": "searchAround", "link": "patient",
        "objectSet": {"type": "base", "objectType": "Observation"}}))
    .unwrap();
    assert_eq!(p.object_type(), "Patient");
}

#[test]
fn errors_name_the_path_and_the_reason() {
    for (body, path, words) in [
        (
            json!({"type": "base", "objectType": "Pateint"}),
            "objectSet.objectType",
            "unknown object type 'Pateint'",
        ),
        (
            json!({"type": "bogus"}),
            "objectSet.type",
            "unknown object set type",
        ),
        (
            json!({"objectType": "Patient"}),
            "objectSet.type",
            "is required",
        ),
        (
            json!({"type": "base", "objectType": "Patient", "extra": 1}),
            "objectSet.extra",
            "unknown field",
        ),
        (
            json!({"type": "reference", "reference": "Everyone"}),
            "objectSet.reference",
            "PatientAll",
        ),
        (
            json!({"type": "union", "objectSets": [
            {"type": "base", "objectType": "Patient"}, {"type": "base", "objectType": "Condition"}]}),
            "objectSet.objectSets[1]",
            "needs one type",
        ),
        (
            json!({"type": "union", "objectSets": []}),
            "objectSet.objectSets",
            "at least one",
        ),
        (
            json!({"type": "searchAround", "link": "friends", "objectSet": {"type": "base", "objectType": "Patient"}}),
            "objectSet.link",
            "has no link 'friends'",
        ),
        (
            json!({"type": "filter", "objectSet": {"type": "base", "objectType": "Patient"},
            "where": {"type": "eq", "field": "gendr", "value": "x"}}),
            "objectSet.where.field",
            "no property 'gendr'",
        ),
        (
            json!({"type": "filter", "objectSet": {"type": "base", "objectType": "Patient"},
            "where": {"type": "and", "value": [{"type": "eq", "field": "gender", "value": 3}]}}),
            "objectSet.where.value[0].value",
            "must be a string, not a number",
        ),
        (
            json!({"type": "filter", "objectSet": {"type": "base", "objectType": "Patient"},
            "where": {"type": "gt", "field": "birth_date", "value": "1999-13-01"}}),
            "objectSet.where.value",
            "not an ISO 8601 date",
        ),
        (
            json!({"type": "filter", "objectSet": {"type": "base", "objectType": "Observation"},
            "where": {"type": "eq", "field": "value_quantity", "value": "12,5"}}),
            "objectSet.where.value",
            "not a decimal",
        ),
        (
            json!({"type": "filter", "objectSet": {"type": "base", "objectType": "Patient"},
            "where": {"type": "gt", "field": "is_synthetic", "value": true}}),
            "objectSet.where.type",
            "boolean property",
        ),
        (
            json!({"type": "filter", "objectSet": {"type": "base", "objectType": "Patient"},
            "where": {"type": "startsWith", "field": "birth_date", "value": "19"}}),
            "objectSet.where.type",
            "not text",
        ),
        (
            json!({"type": "filter", "objectSet": {"type": "base", "objectType": "Patient"},
            "where": {"type": "isNull", "field": "gender", "value": "yes"}}),
            "objectSet.where.value",
            "true or false",
        ),
        (
            json!([1, 2]),
            "objectSet",
            "must be an object, not an array",
        ),
    ] {
        let e = decode(body.clone()).unwrap_err();
        assert_eq!(e.path, path, "{body}: {e}");
        assert!(e.message.contains(words), "{body}: {e}");
    }
}

#[test]
fn nesting_and_size_are_bounded() {
    let mut w = json!({"type": "eq", "field": "gender", "value": "female"});
    for _ in 0..100 {
        w = json!({"type": "not", "value": w});
    }
    let e = decode(json!({"type": "filter", "objectSet": {"type": "base", "objectType": "Patient"}, "where": w}))
        .unwrap_err();
    assert!(e.message.contains("deeper than 32"), "{e}");
    let many: Vec<Json> = (0..2000)
        .map(|_| json!({"type": "base", "objectType": "Patient"}))
        .collect();
    let e = decode(json!({"type": "union", "objectSets": many})).unwrap_err();
    assert!(e.message.contains("more than 1000"), "{e}");
    let keys: Vec<String> = (0..10_001).map(|i| i.to_string()).collect();
    let e =
        decode(json!({"type": "static", "objectType": "Patient", "objects": keys})).unwrap_err();
    assert_eq!(e.path, "objectSet.objects");
}

#[test]
fn dates_and_times_are_checked_not_guessed() {
    for ok in [
        "2024",
        "2024-02",
        "2024-02-29",
        "2024-02-29T10:00",
        "2024-02-29T10:00:05.123+02:00",
        "2024-02-29T10:00:05Z",
    ] {
        assert!(is_date(ok) || is_date_time(ok), "{ok}");
    }
    for bad in [
        "24",
        "2024-2",
        "2024-00-10",
        "2024-01-32",
        "2024-01-01T25:00",
        "2024-01-01T10:00+2",
        "2024-01-01T10:00:00.",
        "2024-01-01 10:00",
        "",
    ] {
        assert!(!is_date(bad) && !is_date_time(bad), "{bad}");
    }
    for ok in ["0", "-1.5", "120.50", "00012"] {
        assert!(is_decimal(ok), "{ok}");
    }
    for bad in ["", ".5", "1.", "1e5", "+1", "1.2.3", "NaN"] {
        assert!(!is_decimal(bad), "{bad}");
    }
}

/// Arbitrary JSON of bounded size.
fn arb_json() -> impl Strategy<Value = Json> {
    let leaf = prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::Bool),
        any::<i32>().prop_map(|i| json!(i)),
        prop::sample::select(vec![
            "base",
            "static",
            "reference",
            "filter",
            "union",
            "intersect",
            "subtract",
            "searchAround",
            "eq",
            "gt",
            "lt",
            "in",
            "and",
            "or",
            "not",
            "isNull",
            "Patient",
            "Observation",
            "PatientAll",
            "gender",
            "code",
            "effective",
            "observations",
            "patient",
            "2024-01-01",
            "type",
            "objectType",
            "objectSets",
            "objectSet",
            "where",
            "field",
            "value",
            "link",
            "reference",
            "objects",
        ])
        .prop_map(|s| Json::String(s.to_owned())),
    ];
    leaf.prop_recursive(6, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Json::Array),
            prop::collection::vec(
                (
                    prop::sample::select(vec![
                        "type",
                        "objectType",
                        "objectSets",
                        "objectSet",
                        "where",
                        "field",
                        "value",
                        "link",
                        "reference",
                        "objects",
                    ]),
                    inner
                ),
                0..5
            )
            .prop_map(|kv| Json::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]
    /// Any JSON decodes or is refused with a path inside the request, and
    /// whatever decodes round-trips through its normalised form.
    #[test]
    fn any_json_decodes_or_is_refused_and_round_trips(v in arb_json()) {
        match decode(v) {
            Ok(set) => {
                let again = decode(set.to_json()).unwrap();
                prop_assert_eq!(again, set);
            }
            Err(e) => prop_assert!(e.path.starts_with("objectSet"), "{}", e),
        }
    }
}
