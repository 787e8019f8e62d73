//! Focused tests: each fixture is a view (and resources) with the expected
//! diagnostics or rows as text, rust-analyzer style.

use crate::{CompiledView, RowBuilder, ViewCompiler, ViewDefinition};
use arrow::datatypes::DataType;
use serde_json::{Value as Json, json};

/// Diagnostics of reading + compiling `view`, one per line ("" when valid).
fn diagnostics(view: Json) -> String {
    match ViewDefinition::from_json(&view) {
        Err(d) => crate::render_diagnostics(&d),
        Ok(v) => match ViewCompiler::new().compile(&v) {
            Err(d) => crate::render_diagnostics(&d),
            Ok(_) => String::new(),
        },
    }
}

#[track_caller]
fn check_diagnostics(view: Json, expect: &str) {
    let got = diagnostics(view);
    assert_eq!(got.trim(), expect.trim(), "\n--- got ---\n{got}\n");
}

fn compile(view: Json) -> CompiledView {
    match CompiledView::from_json(&view) {
        Ok(v) => v,
        Err(d) => panic!("invalid view: {}", crate::render_diagnostics(&d)),
    }
}

/// Rows as compact JSON, one per line; or the error.
fn rows(view: Json, resources: &[Json]) -> String {
    let plan = compile(view);
    match plan.run(resources) {
        Ok(batch) => {
            let mut out = Vec::new();
            match crate::json::write_ndjson(&batch, &mut out) {
                Ok(()) => String::from_utf8_lossy(&out).into_owned(),
                Err(e) => format!("io error: {e}"),
            }
        }
        Err(e) => format!("error: {e}"),
    }
}

#[track_caller]
fn check_rows(view: Json, resources: &[Json], expect: &str) {
    let got = rows(view, resources);
    assert_eq!(got.trim(), expect.trim(), "\n--- got ---\n{got}\n");
}

fn patient() -> Json {
    json!({"resourceType": "Patient", "id": "p1", "active": true,
        "name": [{"family": "Doe", "given": ["Jane", "J"]}, {"family": "Roe"}],
        "birthDate": "1974-12"})
}

#[test]
fn unknown_function_points_at_the_column() {
    check_diagnostics(
        json!({"resource": "Patient", "select": [{"column": [
            {"name": "a", "path": "id"},
            {"name": "b", "path": "active"},
            {"name": "c", "path": "name.foo()"}]}]}),
        "select[0].column[2].path: unknown function 'foo' at 1:6",
    );
}

#[test]
fn nested_paths_and_syntax_errors() {
    check_diagnostics(
        json!({"resource": "Patient", "select": [{"forEach": "name", "select": [
            {"forEachOrNull": "given.where(", "column": [{"name": "g", "path": "$this"}]},
            {"unionAll": [{"column": [{"name": "x", "path": "nope"}]}]}]}]}),
        r"
select[0].select[0].forEachOrNull: syntax error: expected expression, found end of expression at 1:13
select[0].select[1].unionAll[0].column[0].path: 'nope' is not an element of HumanName at 1:1
",
    );
}

#[test]
fn structural_problems_are_all_reported() {
    check_diagnostics(
        json!({"resource": "Patientt", "select": [
            {"forEach": 1, "column": [{"name": "1a", "path": "id", "collection": "yes"}]},
            {"forEach": "name", "repeat": ["item"], "column": [{"path": "id"}]}],
            "where": [{"description": "no path"}]}),
        r"
resource: 'Patientt' is not a FHIR R4 resource type
select[0].forEach: must be a string, found a number
select[0].column[0].name: '1a' is not a valid column name (letters, digits and '_', starting with a letter)
select[0].column[0].collection: must be a boolean, found a string
select[1]: forEach, forEachOrNull and repeat are mutually exclusive
select[1].column[0].name: is required
where[0].path: is required
",
    );
    check_diagnostics(json!([]), "must be an object, found an array");
    check_diagnostics(json!({}), "resource: is required\nselect: is required");
}

#[test]
fn constants_are_validated_and_typed() {
    check_diagnostics(
        json!({"resource": "Patient",
            "constant": [{"name": "a"}, {"name": "b", "valueString": "x", "valueCode": "y"},
                {"name": "c", "valueDate": "12/24/1974"}, {"name": "d", "valueQuantity": {}},
                {"name": "e", "valuePositiveInt": 0}],
            "select": [{"column": [{"name": "id", "path": "id"}]}]}),
        r#"
constant[0]: a constant needs a value[x] (valueString, valueInteger, ...)
constant[1]: a constant has exactly one value[x]
constant[2].valueDate: "12/24/1974" is not a valid date
constant[3].valueQuantity: 'valueQuantity' is not a constant type (a FHIR primitive value[x])
constant[4].valuePositiveInt: 0 is not a valid positiveInt
"#,
    );
    check_diagnostics(
        json!({"resource": "Patient", "constant": [{"name": "x", "valueString": "a"}],
            "select": [{"column": [{"name": "id", "path": "name.where(family = %y).family"}]}]}),
        "select[0].column[0].path: unknown variable '%y' at 1:21",
    );
    // A date constant compares as a date, not as a string.
    check_rows(
        json!({"resource": "Patient", "constant": [{"name": "d", "valueDate": "1974-12"},
                {"name": "n", "valueInteger64": "9007199254740993"}],
            "select": [{"column": [{"name": "same", "path": "birthDate = %d", "type": "boolean"},
                {"name": "big", "path": "%n + 1", "type": "integer"}]}]}),
        &[patient()],
        r#"{"same":true,"big":9007199254740994}"#,
    );
}

#[test]
fn column_types_are_checked_and_inferred() {
    check_diagnostics(
        json!({"resource": "Patient", "select": [{"column": [
            {"name": "a", "path": "name.family.first()", "type": "boolean"},
            {"name": "b", "path": "active", "type": "Quantity"},
            {"name": "c", "path": "birthDate", "type": "integer"}]}]}),
        r"
select[0].column[0].path: 'name.family.first()' returns string, which cannot be a 'boolean' column
select[0].column[1].type: 'Quantity' is not a supported column type (a FHIR primitive type)
select[0].column[2].path: 'birthDate' returns date, which cannot be a 'integer' column
",
    );
    let plan = compile(json!({"resource": "Patient", "select": [{"column": [
        {"name": "active", "path": "active"},
        {"name": "n", "path": "name.count()"},
        {"name": "d", "path": "1.5"},
        {"name": "s", "path": "birthDate"},
        {"name": "idx", "path": "%rowIndex"}]}]}));
    let types: Vec<DataType> = plan
        .schema()
        .fields()
        .iter()
        .map(|f| f.data_type().clone())
        .collect();
    assert_eq!(
        types,
        vec![
            DataType::Boolean,
            DataType::Int64,
            DataType::Decimal128(38, 18),
            DataType::Utf8,
            DataType::Int64
        ]
    );
}

#[test]
fn collection_rules() {
    let view = json!({"resource": "Patient", "select": [{"column": [
        {"name": "family", "path": "name.family"},
        {"name": "given", "path": "name.given", "collection": true}]}]});
    // Statically several values: a warning; an error only where it happens.
    let plan = compile(view.clone());
    assert_eq!(
        crate::render_diagnostics(plan.warnings()),
        "select[0].column[0].path: 'name.family' can return more than one value (string); set 'collection: true' or select one item"
    );
    check_rows(
        view.clone(),
        &[patient()],
        "error: Patient/p1: select[0].column[0].path: returned 2 values; a column that is not 'collection: true' takes at most one",
    );
    let one = json!({"resourceType": "Patient", "id": "p2", "name": [{"family": "Solo"}]});
    check_rows(view, &[one], r#"{"family":"Solo","given":[]}"#);
    assert!(matches!(
        compile(json!({"resource": "Patient", "select": [{"column": [
            {"name": "g", "path": "name.given", "collection": true, "type": "string"}]}]}))
        .schema()
        .field(0)
        .data_type(),
        DataType::List(f) if f.data_type() == &DataType::Utf8
    ));
}

#[test]
fn union_all_columns_must_agree() {
    check_diagnostics(
        json!({"resource": "Patient", "select": [{"unionAll": [
            {"column": [{"name": "a", "path": "id"}, {"name": "b", "path": "id"}]},
            {"column": [{"name": "b", "path": "id"}, {"name": "a", "path": "id"}]},
            {"column": [{"name": "a", "path": "id"}]},
            {"column": [{"name": "a", "path": "id"}, {"name": "b", "path": "active"}]}]}]}),
        r"
select[0].unionAll[1]: unionAll branches must have the same columns in the same order: (b, a) here, (a, b) in select[0].unionAll[0]
select[0].unionAll[2]: unionAll branches must have the same columns in the same order: (a) here, (a, b) in select[0].unionAll[0]
select[0].unionAll[3].column[1]: column 'b' has type Boolean here but Utf8 in select[0].unionAll[0].column[1]
",
    );
    check_diagnostics(
        json!({"resource": "Patient", "select": [
            {"column": [{"name": "id", "path": "id"}]},
            {"forEach": "name", "column": [{"name": "id", "path": "family"}]}]}),
        "select[1].column[0].name: duplicate column name 'id' (also select[0].column[0])",
    );
}

#[test]
fn where_must_be_boolean() {
    check_diagnostics(
        json!({"resource": "Patient", "where": [{"path": "name.family"}, {"path": "active"}],
            "select": [{"column": [{"name": "id", "path": "id"}]}]}),
        "where[0].path: 'name.family' must return a boolean, returns string",
    );
}

#[test]
fn decimals_are_exact() {
    let obs = json!({"resourceType": "Observation", "id": "o1", "status": "final",
        "code": {"text": "x"}, "valueQuantity": {"value": 0.1}});
    check_rows(
        json!({"resource": "Observation", "select": [{"column": [
            {"name": "sum", "path": "value.ofType(Quantity).value + 0.2", "type": "decimal"},
            {"name": "fine", "path": "1.123456789012345678", "type": "decimal"},
            {"name": "big", "path": "12345678901234567890.5", "type": "decimal"},
            {"name": "neg", "path": "-0.000000000000000001", "type": "decimal"},
            {"name": "int", "path": "7", "type": "decimal"}]}]}),
        std::slice::from_ref(&obs),
        r#"{"sum":0.3,"fine":1.123456789012345678,"big":12345678901234567890.5,"neg":-0.000000000000000001,"int":7}"#,
    );
    check_rows(
        json!({"resource": "Observation", "select": [{"column": [
            {"name": "d", "path": "1.1234567890123456789", "type": "decimal"}]}]}),
        std::slice::from_ref(&obs),
        "error: Observation/o1: select[0].column[0].path: decimal 1.1234567890123456789 has more than 18 fraction digits (Decimal128(38, 18))",
    );
    assert_eq!(crate::json::decimal_text(-1_500, 3), "-1.5");
    assert_eq!(crate::json::decimal_text(5, 3), "0.005");
    assert_eq!(crate::json::decimal_text(0, 18), "0");
}

#[test]
fn for_each_or_null_keeps_row_index() {
    check_rows(
        json!({"resource": "Patient", "select": [
            {"column": [{"name": "id", "path": "id"}]},
            {"forEachOrNull": "contact", "column": [
                {"name": "i", "path": "%rowIndex"}, {"name": "lit", "path": "'x'"}],
             "select": [{"forEach": "telecom", "column": [{"name": "t", "path": "value"}]}]}]}),
        &[patient()],
        r#"{"id":"p1","i":0,"lit":null,"t":null}"#,
    );
}

#[test]
fn repeat_and_row_index() {
    let qr = json!({"resourceType": "QuestionnaireResponse", "id": "q", "status": "completed",
        "item": [{"linkId": "1", "item": [{"linkId": "1.1"}]}, {"linkId": "2"}]});
    check_rows(
        json!({"resource": "QuestionnaireResponse", "select": [
            {"repeat": ["item"], "column": [{"name": "i", "path": "%rowIndex"},
                {"name": "link", "path": "linkId"}]}]}),
        std::slice::from_ref(&qr),
        r#"
{"i":0,"link":"1"}
{"i":1,"link":"1.1"}
{"i":2,"link":"2"}
"#,
    );
    // A self-repeating path is an error, not a hang or a stack overflow.
    let out = rows(
        json!({"resource": "QuestionnaireResponse", "select": [
            {"repeat": ["$this"], "column": [{"name": "i", "path": "%rowIndex"}]}]}),
        &[qr],
    );
    assert!(out.contains("repeat went deeper than 64 levels"), "{out}");
}

#[test]
fn failed_resource_appends_nothing() {
    let plan = compile(json!({"resource": "Patient", "select": [{"column": [
        {"name": "family", "path": "name.family"}]}]}));
    let mut b = RowBuilder::new(&plan);
    let ok = json!({"resourceType": "Patient", "name": [{"family": "A"}]});
    let other = json!({"resourceType": "Observation", "id": "o"});
    assert_eq!(plan.append(&ok, &mut b), Ok(1));
    assert!(plan.append(&patient(), &mut b).is_err());
    assert_eq!(plan.append(&other, &mut b), Ok(0));
    assert_eq!(b.len(), 1);
    let batch = b.finish().expect("batch");
    assert_eq!(batch.num_rows(), 1);
    // The builder is reusable after finish().
    assert_eq!(plan.append(&ok, &mut b), Ok(1));
    assert_eq!(b.finish().map(|b| b.num_rows()).ok(), Some(1));
}

#[test]
fn odd_views_give_diagnostics_never_panics() {
    let odd = [
        json!(null),
        json!("Patient"),
        json!({"resource": 1, "select": {}}),
        json!({"resource": "Patient", "select": [null, 1, [], {"column": {}}]}),
        json!({"resource": "Patient", "select": [{"column": [null, {"name": "a", "path": 1}]}]}),
        json!({"resource": "Patient", "select": [{"unionAll": []}]}),
        json!({"resource": "Patient", "select": [{"repeat": [], "column": [{"name": "a", "path": "id"}]}]}),
        json!({"resource": "Patient", "constant": {}, "where": "x",
            "select": [{"column": [{"name": "a", "path": "id"}]}]}),
        json!({"resource": "Patient", "select": [{"column": [{"name": "a", "path": ""}]}]}),
    ];
    for v in odd {
        assert!(!diagnostics(v.clone()).is_empty(), "accepted {v}");
    }
}

#[test]
fn misspelled_properties_are_reported() {
    check_diagnostics(
        json!({"resource": "Patient", "select": [{"colum": [{"name": "id", "path": "id"}],
            "column": [{"name": "id", "path": "id", "collections": true}]}]}),
        r"
select[0].colum: unknown property 'colum' (allowed: column, select, forEach, forEachOrNull, repeat, unionAll)
select[0].column[0].collections: unknown property 'collections' (allowed: name, path, type, collection, description, tag)
",
    );
}

#[test]
fn suite_runner_checks_every_kind_of_expectation() {
    let doc = json!({"title": "t", "resources": [patient(),
            {"resourceType": "Patient", "id": "p2"}, {"resourceType": "Observation", "id": "o"}],
        "tests": [
            {"title": "count", "view": {"resource": "Patient",
                "select": [{"column": [{"name": "id", "path": "id"}]}]}, "expectCount": 2},
            {"title": "bad count", "view": {"resource": "Patient",
                "select": [{"column": [{"name": "id", "path": "id"}]}]}, "expectCount": 3},
            {"title": "columns", "view": {"resource": "Patient", "select": [
                {"column": [{"name": "id", "path": "id"}]},
                {"column": [{"name": "n", "path": "name.given.count()"}]}]},
                "expectColumns": ["id", "n"],
                "expect": [{"n": 0, "id": "p2"}, {"id": "p1", "n": 2.0}]},
            {"title": "lists", "view": {"resource": "Patient", "select": [{"column": [
                {"name": "l", "path": "name.given.select(length())", "collection": true}]}]},
                "expect": [{"l": [4, 1]}, {"l": []}]},
            {"title": "error", "view": {"resource": "Patient", "select": []}, "expectError": true},
            {"title": "no error", "view": {"resource": "Patient",
                "select": [{"column": [{"name": "id", "path": "id"}]}]}, "expectError": true}]});
    let outcomes = crate::suite::run_file_json(&doc).unwrap_or_default();
    let got: Vec<String> = outcomes
        .iter()
        .map(|o| {
            format!(
                "{}: {} {}",
                o.name,
                o.passed,
                o.error.as_deref().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(
        got.join("\n"),
        r"count: true 
bad count: false expected 3 rows, got 2
columns: true 
lists: true 
error: true select: must have at least one item
no error: false expected an error, but the view ran"
    );
    let report = crate::suite::SuiteReport {
        files: [("t.json".to_string(), outcomes)].into_iter().collect(),
        passed: 4,
        failed: 2,
    };
    let j = report.to_json();
    assert_eq!(
        j["t.json"]["tests"][0],
        json!({"name": "count", "result": {"passed": true}})
    );
    assert_eq!(
        j["t.json"]["tests"][2]["result"],
        json!({"passed": true, "details": {"rowOrderMatched": false}})
    );
    assert_eq!(
        j["t.json"]["tests"][1]["result"],
        json!({"passed": false, "error": "expected 3 rows, got 2"})
    );
}

/// The single Decimal128 cell (unscaled, scale 18) a decimal column got from `text`.
fn decimal_from_text(resource_text: &str, path: &str) -> Result<Option<i128>, String> {
    use arrow::array::{Array, Decimal128Array};
    let plan = compile(json!({"resource": "Observation", "select": [{"column": [
        {"name": "v", "path": path, "type": "decimal"}]}]}));
    let mut b = plan.row_builder();
    plan.append_json_text(resource_text, &mut b)
        .map_err(|e| e.to_string())?;
    let batch = b.finish().map_err(|e| e.to_string())?;
    let col = batch
        .column(0)
        .as_any()
        .downcast_ref::<Decimal128Array>()
        .ok_or("not a Decimal128 column")?;
    Ok((col.len() == 1 && col.is_valid(0)).then(|| col.value(0)))
}

fn observation_text(value: &str) -> String {
    format!(
        r#"{{"resourceType": "Observation", "id": "o1", "status": "final", "code": {{"text": "x"}},
            "valueQuantity": {{"value": {value}, "unit": "mg"}}}}"#
    )
}

#[test]
fn decimals_from_json_text_are_exact() {
    let path = "value.ofType(Quantity).value";
    let cell = |v: &str| decimal_from_text(&observation_text(v), path);
    // 18 fraction digits: f64 would give 0.12345678901234568.
    assert_eq!(
        cell("0.123456789012345678"),
        Ok(Some(123_456_789_012_345_678))
    );
    // 21 significant digits: beyond f64 (and 20 integer digits, the column's limit).
    assert_eq!(
        cell("12345678901234567890.5"),
        Ok(Some(12_345_678_901_234_567_890_500_000_000_000_000_000))
    );
    assert_eq!(cell("1.50"), Ok(Some(1_500_000_000_000_000_000)));
    assert_eq!(cell("-2"), Ok(Some(-2_000_000_000_000_000_000)));
    assert_eq!(cell("25e-1"), Ok(Some(2_500_000_000_000_000_000)));
    assert_eq!(cell("0.0"), Ok(Some(0)));
    // 30 significant digits: more than rust_decimal holds, still exact here.
    assert_eq!(
        cell("123456789012.123456789012345678"),
        Ok(Some(123_456_789_012_123_456_789_012_345_678))
    );
    // Values that do not fit stay errors, never rounded.
    assert_eq!(
        cell("0.1234567890123456789"),
        Err("Observation/o1: select[0].column[0].path: decimal 0.1234567890123456789 has more than 18 fraction digits (Decimal128(38, 18))".into())
    );
    assert_eq!(
        cell("123456789012345678901.5"),
        Err("Observation/o1: select[0].column[0].path: decimal 123456789012345678901.5 does not fit Decimal128(38, 18)".into())
    );
    assert!(cell("1e400").is_err_and(|e| e.contains("does not fit")));
    assert!(cell("1e-400").is_err_and(|e| e.contains("fraction digits")));
}

#[test]
fn decimal_cells_from_text() {
    use crate::exec::decimal_cell_from_text as d;
    assert_eq!(d("0"), Ok(0));
    assert_eq!(d("-0.000000000000000001"), Ok(-1));
    assert_eq!(
        d("1.000000000000000000000000000"),
        Ok(1_000_000_000_000_000_000)
    );
    assert_eq!(d("1E2"), Ok(100_000_000_000_000_000_000));
    assert_eq!(d("0.00e99999999999999999999"), Ok(0));
    assert_eq!(
        d("99999999999999999999.999999999999999999"),
        Ok(99_999_999_999_999_999_999_999_999_999_999_999_999)
    );
    assert!(d("100000000000000000000").is_err());
    assert!(d("1e99999999999999999999").is_err());
    assert!(d("abc").is_err());
    assert!(d("1e").is_err_and(|e| e.contains("not a JSON number")));
    assert!(d("").is_err());
}

#[test]
fn json_text_errors_and_other_paths() {
    let plan = compile(json!({"resource": "Observation", "select": [{"column": [
        {"name": "v", "path": "value.ofType(Quantity).value", "type": "decimal"},
        {"name": "s", "path": "value.ofType(Quantity).value.toString()"},
        {"name": "q", "path": "value"}]}]}));
    let mut b = plan.row_builder();
    let err = plan.append_json_text(r#"{"resourceType": "Observation",}"#, &mut b);
    assert_eq!(
        err.map_err(|e| e.to_string()),
        Err("(resource JSON): invalid JSON at byte 31: expected a string key".to_string())
    );
    assert_eq!(b.len(), 0);
    assert_eq!(
        plan.append_json_text(r#"{"resourceType": "Patient"}"#, &mut b),
        Ok(0)
    );
    let text = observation_text("1.50");
    assert_eq!(plan.append_json_text(&text, &mut b), Ok(1));
    // The same resource through serde_json: same decimal, but `1.50` became `1.5`.
    let serde: Json = serde_json::from_str(&text).unwrap_or_default();
    assert_eq!(plan.append(&serde, &mut b), Ok(1));
    let tree = atlas_fhirpath::json::parse(&text).unwrap_or(atlas_fhirpath::JsonValue::Null);
    assert_eq!(plan.append_tree(&tree, &mut b), Ok(1));
    let batch = b.finish().unwrap_or_else(|e| panic!("{e}"));
    let rows = crate::batch_to_json_rows(&batch);
    let row = |i: usize| Json::Object(rows[i].clone()).to_string();
    assert_eq!(
        row(0),
        r#"{"q":"{\"value\":1.50,\"unit\":\"mg\"}","s":"1.50","v":1.5}"#
    );
    assert_eq!(
        row(1),
        r#"{"q":"{\"unit\":\"mg\",\"value\":1.5}","s":"1.5","v":1.5}"#
    );
    assert_eq!(row(2), row(0));
}
