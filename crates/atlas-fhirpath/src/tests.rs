//! Behaviour tests: each fixture is a resource, an expression and the expected
//! JSON rendering of the result (`Collection::to_json`).

use crate::{EvalContext, EvalError, Expr, ResourceResolver};
use serde_json::{Value as Json, json};

/// Evaluates over the serde_json value and over its [`crate::json`] tree;
/// both must agree.
fn eval(resource: &Json, expr: &str) -> Result<Json, EvalError> {
    let e = Expr::parse(expr).unwrap_or_else(|err| panic!("{expr}: {err}"));
    let serde = e
        .evaluate(resource, &EvalContext::new())
        .map(|c| c.to_json());
    let tree = crate::json::from_serde(resource);
    let ours = e
        .evaluate_tree(&tree, &EvalContext::new())
        .map(|c| c.to_json());
    assert_eq!(ours, serde, "{expr}: tree and serde_json results differ");
    serde
}

#[track_caller]
fn eval_text(resource: &str, expr: &str) -> Vec<String> {
    let tree = crate::json::parse(resource).unwrap_or_else(|e| panic!("{e}"));
    let e = Expr::parse(expr).unwrap_or_else(|err| panic!("{expr}: {err}"));
    match e.evaluate_tree(&tree, &EvalContext::new()) {
        Ok(c) => c
            .iter()
            .map(|v| v.to_fhirpath_string().unwrap_or_else(|| "?".into()))
            .collect(),
        Err(err) => vec![format!("error: {err}")],
    }
}

#[test]
fn tree_decimals_keep_their_digits() {
    let obs = r#"{"resourceType": "Observation", "id": "o",
        "valueQuantity": {"value": 0.123456789012345678901, "unit": "mg"},
        "component": [{"valueQuantity": {"value": 12345678901234567.5}},
                      {"valueQuantity": {"value": 1.50}},
                      {"valueInteger": 99999999999}]}"#;
    assert_eq!(
        eval_text(obs, "Observation.value.ofType(Quantity).value"),
        ["0.123456789012345678901"]
    );
    assert_eq!(
        eval_text(obs, "Observation.value.ofType(Quantity)"),
        ["0.123456789012345678901 'mg'"]
    );
    assert_eq!(
        eval_text(obs, "Observation.component.value.ofType(Quantity).value"),
        ["12345678901234567.5", "1.50"]
    );
    assert_eq!(
        eval_text(obs, "Observation.component[0].value.value + 0.5"),
        ["12345678901234568.0"]
    );
    assert_eq!(
        eval_text(obs, "Observation.component[1].value.value = 1.5"),
        ["true"]
    );
    assert_eq!(
        eval_text(obs, "Observation.component[2].value + 1"),
        ["100000000000"]
    );
    assert_eq!(
        eval_text(obs, "Observation.value.value = 0.123456789012345678902"),
        ["false"]
    );
    // Structural equality of nodes compares numbers by value.
    assert_eq!(
        eval_text(
            r#"{"resourceType": "Basic", "a": {"value": 1.50}, "b": {"value": 1.5}}"#,
            "Basic.a = Basic.b"
        ),
        ["true"]
    );
}

#[test]
fn tree_and_serde_nodes_mix() {
    let tree =
        crate::json::parse(r#"{"resourceType": "Patient", "id": "p1", "name": [{"family": "A"}]}"#)
            .unwrap_or_else(|e| panic!("{e}"));
    let other = json!([{"family": "A"}]);
    let e = Expr::parse("Patient.name = %other and %other.family = 'A' and %self.id = 'p1'")
        .unwrap_or_else(|e| panic!("{e}"));
    let ctx = EvalContext::new()
        .with_json_variable("other", &other)
        .with_tree_variable("self", &tree);
    assert_eq!(
        e.evaluate_tree(&tree, &ctx).map(|c| c.to_json()),
        Ok(json!([true]))
    );
}

#[track_caller]
fn check(resource: &Json, expr: &str, expected: Json) {
    match eval(resource, expr) {
        Ok(got) => assert_eq!(got, expected, "{expr}"),
        Err(e) => panic!("{expr}: unexpected error {e}"),
    }
}

#[track_caller]
fn parse_error(expr: &str, expected: &str) {
    match Expr::parse(expr) {
        Ok(_) => panic!("{expr}: parsed, expected error {expected}"),
        Err(e) => assert_eq!(e.to_string(), expected, "{expr}"),
    }
}

fn patient() -> Json {
    json!({
        "resourceType": "Patient",
        "id": "p1",
        "active": true,
        "birthDate": "1974-12-25",
        "_birthDate": {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
                                      "valueDateTime": "1974-12-25T14:35:45-05:00"}]},
        "name": [
            {"use": "official", "family": "Chalmers", "given": ["Peter", "James"]},
            {"use": "usual", "given": [null, "Jim"], "_given": [{"extension": [{"url": "http://e/x", "valueString": "x"}]}, null]}
        ],
        "deceasedBoolean": false,
        "managingOrganization": {"reference": "Organization/o1"},
        "contained": [{"resourceType": "Organization", "id": "o1", "name": "Acme"}],
        "generalPractitioner": [{"reference": "#o1"}]
    })
}

fn observation() -> Json {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "valueQuantity": {"value": 185, "unit": "lbs", "system": "http://unitsofmeasure.org", "code": "[lb_av]"},
        "effectiveDateTime": "2016-03-28",
        "subject": {"reference": "Patient/example"}
    })
}

#[test]
fn parse_errors_report_positions() {
    parse_error(
        "Patient.name.where(given = 'x'",
        "expected ')', found end of expression at 1:31",
    );
    parse_error("(1 + 2", "expected ')', found end of expression at 1:7");
    parse_error(
        "1 +\n  (2 * 3",
        "expected ')', found end of expression at 2:9",
    );
    parse_error(
        "name.given[0",
        "expected ']', found end of expression at 1:13",
    );
    parse_error("'abc", "unterminated string, expected ' at 1:1");
    parse_error("2 + 2 /* open", "unterminated comment at 1:7");
    parse_error("name # x", "unexpected character '#' at 1:6");
    parse_error("name given", "unexpected 'given' after expression at 1:6");
    parse_error("@T14:30Z", "a time literal cannot have a timezone at 1:1");
    parse_error("1 +", "expected expression, found end of expression at 1:4");
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    let deep = format!("{}1{}", "(".repeat(5000), ")".repeat(5000));
    assert!(Expr::parse(&deep).is_err());
    let chain = vec!["a"; 5000].join(".");
    assert!(Expr::parse(&chain).is_err());
    let sum = vec!["1"; 150].join(" + ");
    check(&json!({}), &format!("{sum} = 150"), json!([true]));
}

#[test]
fn choice_types() {
    let obs = observation();
    check(&obs, "Observation.value.unit", json!(["lbs"]));
    check(
        &obs,
        "Observation.value.ofType(Quantity).value",
        json!([185]),
    );
    check(&obs, "Observation.value.ofType(string)", json!([]));
    check(&obs, "Observation.value is Quantity", json!([true]));
    check(&obs, "Observation.effective.is(dateTime)", json!([true]));
    check(&obs, "Observation.value > 100 'kg'", json!([false]));
    check(&obs, "Observation.value < 100 'kg'", json!([true]));
    // Lenient evaluation accepts the JSON name; the checker rejects it.
    check(&obs, "Observation.valueQuantity.unit", json!(["lbs"]));
    let diags = Expr::parse("Observation.valueQuantity.unit")
        .map(|e| e.check("Observation"))
        .unwrap_or_default();
    assert_eq!(diags.len(), 1);
    assert!(diags[0].message.contains("choice element"), "{}", diags[0]);
    check(&patient(), "Patient.deceased", json!([false]));
}

#[test]
fn primitive_element_extensions() {
    let p = patient();
    check(
        &p,
        "Patient.birthDate.extension('http://hl7.org/fhir/StructureDefinition/patient-birthTime').value",
        json!(["1974-12-25T14:35:45-05:00"]),
    );
    check(
        &p,
        "Patient.birthDate.extension('http://nope').exists()",
        json!([false]),
    );
    // `given` [null, "Jim"] with `_given` [ext, null]: two items, the first value-less.
    check(&p, "Patient.name[1].given.count()", json!([2]));
    check(
        &p,
        "Patient.name[1].given.select($this.hasValue())",
        json!([false, true]),
    );
    check(
        &p,
        "Patient.name[1].given.extension('http://e/x').value",
        json!(["x"]),
    );
    // A value-less primitive is still an item; its JSON rendering is null.
    check(
        &p,
        "Patient.name.given",
        json!(["Peter", "James", null, "Jim"]),
    );
    check(
        &p,
        "Patient.name.given.where(hasValue())",
        json!(["Peter", "James", "Jim"]),
    );
}

#[test]
fn decimals_keep_precision() {
    let r = json!({});
    check(&r, "0.1 + 0.2 = 0.3", json!([true]));
    check(&r, "1.10 = 1.1", json!([true]));
    check(&r, "1.0.toString()", json!(["1.0"]));
    check(&r, "(1.2 / 1.8).round(2)", json!([0.67]));
    check(&r, "1.2 / 1.8 ~ 0.67", json!([true]));
    check(&r, "1.587.lowBoundary()", json!([1.5865]));
    check(&r, "1.587.highBoundary(2).toString()", json!(["1.59"]));
    check(&r, "1.58700.precision()", json!([5]));
    check(&r, "1 / 0", json!([]));
    check(&r, "7 div 2 + 7 mod 2", json!([4]));
}

#[test]
fn hour_precision_datetime_boundaries_start_from_minutes() {
    let r = json!({});
    check(
        &r,
        "@2014-01-01T08.highBoundary(17).toString()",
        json!(["2014-01-01T08:00:59.999-12:00"]),
    );
    check(
        &r,
        "@2014-01-01T08.lowBoundary(17).toString()",
        json!(["2014-01-01T08:00:00.000+14:00"]),
    );
    check(
        &r,
        "@2014-01-01T08:05-05:00.highBoundary(17).toString()",
        json!(["2014-01-01T08:05:59.999-05:00"]),
    );
}

#[test]
fn date_precision_comparison() {
    let r = json!({});
    check(&r, "@2018-03 < @2018-03-01", json!([]));
    check(&r, "@2018-02 < @2018-03-01", json!([true]));
    check(
        &r,
        "@2012-04-15T15:30:31 = @2012-04-15T15:30:31.0",
        json!([true]),
    );
    check(&r, "@2012-04-15 = @2012-04-15T10:00:00", json!([]));
    check(&r, "@2012-04-15 ~ @2012-04-15T10:00:00", json!([false]));
    check(
        &r,
        "@2017-11-05T01:30:00.0-04:00 = @2017-11-05T00:30:00.0-05:00",
        json!([true]),
    );
    check(&r, "@2019-01-31 + 1 month", json!(["2019-02-28"]));
    check(&r, "@2019-01-01 + 3 'days'", json!(["2019-01-04"]));
    assert!(eval(&r, "@2019-01-01 + 1 'mo'").is_err());
    check(&patient(), "Patient.birthDate < today()", json!([true]));
}

#[test]
fn quantities_convert_units() {
    let r = json!({});
    check(&r, "4.0000 'g' = 4000.0 'mg'", json!([true]));
    check(&r, "1 'm' = 100 'cm'", json!([true]));
    check(&r, "2 'h' > 100 'min'", json!([true]));
    check(&r, "7 days = 1 week", json!([true]));
    check(&r, "1 year = 1 'a'", json!([]));
    check(&r, "2.0 'cm' * 2.0 'm' = 0.040 'm2'", json!([true]));
    check(
        &r,
        "1 'kg' + 500 'g'",
        json!([{"value": 1.5, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"}]),
    );
    assert!(
        eval(&r, "1 'kg' < 1 'm'")
            .map(|j| j == json!([]))
            .unwrap_or(false)
    );
}

#[test]
fn three_valued_logic_and_empty_propagation() {
    let r = json!({});
    check(&r, "(true and {}).empty()", json!([true]));
    check(&r, "false and {}", json!([false]));
    check(&r, "{} or true", json!([true]));
    check(&r, "{} implies false", json!([]));
    check(&r, "false implies {}", json!([true]));
    check(&r, "{} = 1", json!([]));
    check(&r, "{} ~ {}", json!([true]));
    assert!(eval(&r, "(1 | 2).not()").is_err());
}

#[test]
fn references_resolve_in_contained_and_bundles() {
    let p = patient();
    check(
        &p,
        "Patient.generalPractitioner.resolve().name",
        json!(["Acme"]),
    );
    check(&p, "Patient.getResourceKey()", json!(["p1"]));
    check(
        &p,
        "Patient.managingOrganization.getReferenceKey()",
        json!(["o1"]),
    );
    check(
        &p,
        "Patient.managingOrganization.getReferenceKey(Organization)",
        json!(["o1"]),
    );
    check(
        &p,
        "Patient.managingOrganization.getReferenceKey(Patient)",
        json!([]),
    );
    let bundle = json!({"resourceType": "Bundle", "entry": [
        {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Patient", "id": "a", "gender": "male"}},
        {"resource": {"resourceType": "Observation", "subject": {"reference": "urn:uuid:1"},
                      "performer": [{"reference": "Patient/a"}]}}]});
    check(
        &bundle,
        "Bundle.entry.resource.ofType(Observation).subject.resolve().gender",
        json!(["male"]),
    );
    check(
        &bundle,
        "Bundle.entry.resource.ofType(Observation).performer.resolve().id",
        json!(["a"]),
    );

    struct Store(Json);
    impl ResourceResolver for Store {
        fn resolve(&self, reference: &str) -> Option<&Json> {
            (reference == "Patient/example").then_some(&self.0)
        }
    }
    let store = Store(json!({"resourceType": "Patient", "id": "example", "gender": "female"}));
    let obs = observation();
    let e = Expr::parse("Observation.subject.resolve().gender").unwrap_or_else(|e| panic!("{e}"));
    let ctx = EvalContext::new().with_resolver(&store);
    assert_eq!(
        e.evaluate(&obs, &ctx).map(|c| c.to_json()),
        Ok(json!(["female"]))
    );
}

#[test]
fn variables_and_hooks() {
    let p = patient();
    let limit = json!(2);
    let e =
        Expr::parse("Patient.name.given.count() > %limit and %ucum = 'http://unitsofmeasure.org'")
            .unwrap_or_else(|e| panic!("{e}"));
    let ctx = EvalContext::new().with_json_variable("limit", &limit);
    assert_eq!(e.evaluate(&p, &ctx).map(|c| c.to_json()), Ok(json!([true])));
    assert!(matches!(
        eval(&p, "%unknown"),
        Err(EvalError::UnknownVariable(_))
    ));
    assert!(matches!(
        eval(
            &p,
            "Patient.gender.memberOf('http://hl7.org/fhir/ValueSet/administrative-gender')"
        ),
        Err(EvalError::NoTerminologyService(_))
    ));
    check(&p, "%resource.id", json!(["p1"]));
}

#[test]
fn define_variable_scopes_to_the_chain() {
    let p = patient();
    check(
        &p,
        "defineVariable('n1', name.first()).select(%n1.given)",
        json!(["Peter", "James"]),
    );
    check(
        &p,
        "Patient.name.defineVariable('n2', skip(1).first()).select(%n2.use)",
        json!(["usual", "usual"]),
    );
    check(
        &p,
        "defineVariable('a', 1).select(%a) | defineVariable('a', 2).select(%a)",
        json!([1, 2]),
    );
    assert!(eval(&p, "defineVariable('a', 1).active | select(%a)").is_err());
    assert!(eval(&p, "defineVariable('a').defineVariable('a')").is_err());
    assert!(eval(&p, "defineVariable('resource', 1)").is_err());
}

#[test]
fn time_arithmetic_wraps() {
    let r = json!({});
    check(&r, "@T23:00:00 + 2 hours", json!(["01:00:00"]));
    check(&r, "@T00:30:00 - 1 hour", json!(["23:30:00"]));
}

#[test]
fn checker_reports_unknown_functions_arity_and_paths() {
    let diags = |s: &str| {
        Expr::parse(s)
            .map(|e| e.check("Patient"))
            .unwrap_or_default()
    };
    assert_eq!(
        diags("Patient.name.given.frist()")[0].message,
        "unknown function 'frist'"
    );
    assert_eq!(
        diags("Patient.name.where()")[0].message,
        "function 'where' takes 1 argument(s), got 0"
    );
    assert_eq!(
        diags("Patient.name.given1")[0].to_string(),
        "'given1' is not an element of HumanName at 1:14"
    );
    assert!(diags("Patient.name.given.where($this.startsWith('P')).count() > 1").is_empty());
    assert!(diags("Patient.contact.name.family | Patient.name.family").is_empty());
    assert!(diags("Patient.contained.ofType(Organization).name").is_empty());
    assert!(!diags("Patient.name.is(HumanNam)").is_empty());
    let obs = |s: &str| {
        Expr::parse(s)
            .map(|e| e.check("Observation"))
            .unwrap_or_default()
    };
    assert!(obs("Observation.subject.getReferenceKey(Patient)").is_empty());
    assert!(
        obs("Observation.value.unit | Observation.component.value.ofType(Quantity).code")
            .is_empty()
    );
    assert!(obs("Observation.extension('http://x').value.ofType(string).length() > 2").is_empty());
    let lenient = crate::CheckOptions {
        allow_choice_type_names: true,
        ..Default::default()
    };
    let e = Expr::parse("Observation.valueQuantity.unit").unwrap_or_else(|e| panic!("{e}"));
    assert!(e.check_with("Observation", &lenient).is_empty());
}

#[test]
fn odd_json_gives_errors_or_empty_never_panics() {
    for r in [
        json!(null),
        json!(42),
        json!("x"),
        json!([1, 2]),
        json!({"name": {"given": 3}}),
    ] {
        for e in [
            "name.given",
            "children()",
            "descendants().count()",
            "name.given.substring(1)",
            "$this + 1",
        ] {
            let _ = eval(&r, e);
        }
    }
}

/// Throughput smoke check: `cargo test -p atlas-fhirpath --release -- --ignored --nocapture`.
#[test]
#[ignore = "timing, run manually in release mode"]
fn eval_throughput() {
    let p = patient();
    let obs = observation();
    let cases = [
        (&p, "Patient.name.where(use = 'official').given.first()"),
        (&p, "Patient.birthDate < @2000-01-01 and Patient.active"),
        (&obs, "Observation.value.ofType(Quantity).value > 100"),
        (&p, "Patient.name.given.count() + 1"),
    ];
    for (res, src) in cases {
        let e = Expr::parse(src).unwrap_or_else(|e| panic!("{e}"));
        let ctx = EvalContext::new();
        let n = 200_000;
        let start = std::time::Instant::now();
        let mut items = 0;
        for _ in 0..n {
            items += e.evaluate(res, &ctx).map(|c| c.len()).unwrap_or(0);
        }
        let per = start.elapsed().as_nanos() / n;
        println!("{per:>6} ns/eval  ({items} items)  {src}");
    }
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn parser_never_panics(s in "\\PC{0,40}") {
            let _ = Expr::parse(&s);
        }

        #[test]
        fn token_soup_never_panics(parts in proptest::collection::vec(
            prop_oneof![
                Just("name"), Just("given"), Just("."), Just("("), Just(")"), Just("["), Just("]"), Just("0"),
                Just("1.5"), Just("'a'"), Just("+"), Just("-"), Just("*"), Just("/"), Just("|"), Just("and"),
                Just("="), Just("~"), Just("<"), Just("where"), Just("select"), Just("$this"), Just("first()"),
                Just("@2020-01"), Just("@T10:00"), Just("2 'mg'"), Just("3 days"), Just("iif"), Just(","),
                Just("descendants()"), Just("lowBoundary()"), Just("toString()"), Just("{}"), Just("is"), Just("Quantity"),
            ], 1..14)) {
            let src = parts.join(" ");
            if let Ok(e) = Expr::parse(&src) {
                let _ = e.check("Patient");
                let _ = e.evaluate(&patient(), &EvalContext::new());
            }
        }

        #[test]
        fn integer_addition_matches_rust(a in -1_000_000i64..1_000_000, b in -1_000_000i64..1_000_000) {
            let got = eval(&json!({}), &format!("({a}) + ({b})")).ok();
            prop_assert_eq!(got, Some(json!([a + b])));
        }

        #[test]
        fn decimal_round_trips_through_to_string(int in 0u32..100_000, frac in 0u32..1000) {
            let lit = format!("{int}.{frac:03}");
            let got = eval(&json!({}), &format!("{lit}.toString()")).ok();
            prop_assert_eq!(got, Some(json!([lit])));
        }
    }
}

#[test]
fn check_typed_reports_result_types_and_unknown_variables() {
    use crate::{CheckOptions, ExprType};
    let opts = CheckOptions::default();
    let vars = vec![("limit".to_string(), ExprType::of("System.Integer", true))];
    let expr = |s: &str| Expr::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
    let (t, d) = expr("name.family").check_typed("Patient", None, Some(&vars), &opts);
    assert!(d.is_empty(), "{d:?}");
    assert_eq!(t, ExprType::of("string", false));
    assert_eq!(t.system_types(), vec![Some("String")]);
    let focus = ExprType::of("HumanName", true);
    let (t, _) = expr("family").check_typed("Patient", Some(&focus), Some(&vars), &opts);
    assert_eq!(t, ExprType::of("string", true));
    let (t, d) = expr("%limit > 1 and %other").check_typed("Patient", None, Some(&vars), &opts);
    assert_eq!(t.system_types(), vec![Some("Boolean")]);
    assert_eq!(
        d.iter().map(ToString::to_string).collect::<Vec<_>>(),
        vec!["unknown variable '%other' at 1:16"]
    );
    // Without a variable list, user variables are not checked.
    let (_, d) = expr("%other").check_typed("Patient", None, None, &opts);
    assert!(d.is_empty());
}

#[test]
fn set_variable_replaces_in_place_and_join_of_nothing_is_empty() {
    let mut ctx = EvalContext::new();
    let e = Expr::parse("%i + 1").unwrap_or_else(|err| panic!("{err}"));
    let r = json!({});
    for i in 0..3 {
        ctx.set_variable("i", vec![crate::Value::Integer(i)]);
        let out = e.evaluate(&r, &ctx).map(|c| c.to_json()).ok();
        assert_eq!(out, Some(json!([i + 1])));
    }
    assert_eq!(eval(&json!({}), "{}.join(',')").ok(), Some(json!([])));
    assert_eq!(
        eval(&json!({}), "('a' | 'b').join(',')").ok(),
        Some(json!(["a,b"]))
    );
}
