//! Runner for the HL7 FHIRPath conformance suite (`tests-fhir-r4.xml`).
//!
//! Inputs are read as JSON: a test naming `patient-example.xml` uses
//! `patient-example.json` from the inputs directory; tests whose input exists
//! only as XML are skipped (and named in the report). JSON inputs are read
//! with [`crate::json::parse`] and evaluated over that tree (exact decimals).

pub mod expected;

use crate::json::{self, JsonRef, JsonValue};
use crate::value::{TemporalKind, Value};
use crate::{CheckOptions, EvalContext, Expr};
use serde::Serialize;

type Json = JsonValue<'static>;
use std::collections::HashMap;
use std::path::Path;

/// Outcome of one test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    Skip,
}

/// One test's result.
#[derive(Debug, Clone, Serialize)]
pub struct TestResult {
    pub group: String,
    pub name: String,
    pub expression: String,
    pub status: Status,
    /// Why it failed or was skipped; for invalid-expression tests, the error raised.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The whole run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SuiteReport {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
    pub tests: Vec<TestResult>,
}

impl SuiteReport {
    /// `N passed, N failed, N skipped`.
    pub fn summary(&self) -> String {
        format!(
            "{} passed, {} failed, {} skipped",
            self.passed, self.failed, self.skipped
        )
    }

    /// Each test as `group/name` with its verdict, the form the expected-failure
    /// lists use ([`expected::ExpectedFailures::compare`]).
    pub fn verdicts(&self) -> impl Iterator<Item = (String, expected::Verdict)> + '_ {
        self.tests.iter().map(|t| {
            let verdict = match t.status {
                Status::Pass => expected::Verdict::Pass,
                Status::Skip => expected::Verdict::NotRun,
                Status::Fail => expected::Verdict::Fail(format!(
                    "{} -- {}",
                    t.expression,
                    t.reason.as_deref().unwrap_or("")
                )),
            };
            (format!("{}/{}", t.group, t.name), verdict)
        })
    }
}

/// Failure to read the suite itself.
#[derive(Debug, thiserror::Error)]
pub enum SuiteError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid suite XML: {0}")]
    Xml(String),
}

struct Expected {
    ty: Option<String>,
    text: String,
}

/// How to run the suite.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// For inputs that exist only as XML, convert them to JSON (with the
    /// model-driven converter) instead of skipping their tests.
    pub convert_xml_inputs: bool,
}

/// Run every test of the suite file against the inputs directory, reading
/// inputs as JSON and skipping tests whose input exists only as XML.
pub fn run(xml_path: &Path, inputs_dir: &Path) -> Result<SuiteReport, SuiteError> {
    run_with(xml_path, inputs_dir, &RunOptions::default())
}

/// [`run`] with options.
pub fn run_with(
    xml_path: &Path,
    inputs_dir: &Path,
    options: &RunOptions,
) -> Result<SuiteReport, SuiteError> {
    let text = std::fs::read_to_string(xml_path).map_err(|source| SuiteError::Io {
        path: xml_path.display().to_string(),
        source,
    })?;
    let doc = roxmltree::Document::parse(&text).map_err(|e| SuiteError::Xml(e.to_string()))?;
    let mut inputs: HashMap<String, Result<Json, String>> = HashMap::new();
    let mut report = SuiteReport::default();
    for group in doc
        .root_element()
        .children()
        .filter(|n| n.has_tag_name("group"))
    {
        let gname = group.attribute("name").unwrap_or("").to_string();
        for test in group.children().filter(|n| n.has_tag_name("test")) {
            let result = run_test(&gname, test, inputs_dir, options, &mut inputs);
            match result.status {
                Status::Pass => report.passed += 1,
                Status::Fail => report.failed += 1,
                Status::Skip => report.skipped += 1,
            }
            report.tests.push(result);
        }
    }
    Ok(report)
}

fn load_input<'c>(
    file: &str,
    dir: &Path,
    convert_xml: bool,
    cache: &'c mut HashMap<String, Result<Json, String>>,
) -> &'c Result<Json, String> {
    cache.entry(file.to_string()).or_insert_with(|| {
        let json_name = match file.strip_suffix(".xml") {
            Some(stem) => format!("{stem}.json"),
            None => file.to_string(),
        };
        let path = dir.join(&json_name);
        match std::fs::read_to_string(&path) {
            Ok(t) => json::parse(&t)
                .map(JsonValue::into_owned)
                .map_err(|e| format!("invalid JSON in {json_name}: {e}")),
            Err(_) if convert_xml => match std::fs::read_to_string(dir.join(file)) {
                Ok(x) => crate::fhir_xml::resource_from_xml(&x)
                    .map(|j| json::from_serde(&j))
                    .map_err(|e| format!("invalid XML in {file}: {e}")),
                Err(e) => Err(format!("cannot read {file}: {e}")),
            },
            Err(_) => Err(format!(
                "input {file} is only available as XML (no {json_name})"
            )),
        }
    })
}

fn run_test(
    group: &str,
    test: roxmltree::Node<'_, '_>,
    dir: &Path,
    options: &RunOptions,
    cache: &mut HashMap<String, Result<Json, String>>,
) -> TestResult {
    let name = test.attribute("name").unwrap_or("").to_string();
    let expr_node = test.children().find(|n| n.has_tag_name("expression"));
    let expression = expr_node.and_then(|n| n.text()).unwrap_or("").to_string();
    let invalid = expr_node
        .and_then(|n| n.attribute("invalid"))
        .filter(|v| *v != "false")
        .map(str::to_string);
    let mut result = TestResult {
        group: group.to_string(),
        name,
        expression: expression.clone(),
        status: Status::Fail,
        reason: None,
    };
    let expected: Vec<Expected> = test
        .children()
        .filter(|n| n.has_tag_name("output"))
        .map(|n| Expected {
            ty: n.attribute("type").map(str::to_string),
            text: n.text().unwrap_or("").to_string(),
        })
        .collect();

    let null = JsonValue::Null;
    let input: &Json = match test.attribute("inputfile") {
        Some(file) => match load_input(file, dir, options.convert_xml_inputs, cache) {
            Ok(j) => j,
            Err(e) => {
                result.status = Status::Skip;
                result.reason = Some(e.clone());
                return result;
            }
        },
        None => &null,
    };
    let outcome = evaluate(test, &expression, input, invalid.as_deref());
    match (outcome, invalid) {
        (Err(e), Some(kind)) => {
            result.status = Status::Pass;
            result.reason = Some(format!("expected {kind} error: {e}"));
        }
        (Err(e), None) => result.reason = Some(e),
        (Ok(_), Some(kind)) => {
            result.reason = Some(format!("expected a {kind} error, evaluation succeeded"))
        }
        (Ok(actual), None) => {
            let ordered = test.attribute("ordered") != Some("false");
            match compare_outputs(&actual, &expected, ordered) {
                Ok(()) => result.status = Status::Pass,
                Err(e) => result.reason = Some(e),
            }
        }
    }
    result
}

type Rendered = (String, String);

fn evaluate(
    test: roxmltree::Node<'_, '_>,
    expression: &str,
    input: &Json,
    invalid: Option<&str>,
) -> Result<Vec<Rendered>, String> {
    let expr = Expr::parse(expression).map_err(|e| format!("syntax: {e}"))?;
    if invalid == Some("syntax") {
        return Ok(vec![]);
    }
    let root_type = input
        .get("resourceType")
        .and_then(JsonValue::as_str)
        .unwrap_or("");
    if !root_type.is_empty() {
        let opts = CheckOptions {
            check_ordered_functions: test.attribute("checkOrderedFunctions") == Some("true"),
            allow_choice_type_names: test
                .attribute("mode")
                .is_some_and(|m| m.starts_with("lenient")),
        };
        let diags = expr.check_with(root_type, &opts);
        if let Some(d) = diags.first() {
            return Err(format!("semantic: {d}"));
        }
    }
    let ctx = EvalContext::new();
    let out = expr
        .evaluate_tree(input, &ctx)
        .map_err(|e| format!("execution: {e}"))?;
    if test.attribute("predicate") == Some("true") {
        return Ok(vec![("boolean".into(), (!out.is_empty()).to_string())]);
    }
    Ok(out.iter().map(render).collect())
}

/// (type, text) in the suite's notation (`@2015-02-04`, `1 'mg'`).
fn render(v: &Value<'_>) -> Rendered {
    if let Value::Node(n) = v {
        let ty =
            n.ty.map(|t| crate::model::Model::r4().type_name(t).to_string());
        if let Some(sys) = v.to_system().filter(|s| !matches!(s, Value::Quantity(_))) {
            let (_, text) = render(&sys);
            return (ty.unwrap_or_else(|| render(&sys).0), text);
        }
        return (
            ty.unwrap_or_default(),
            n.json.map(JsonRef::to_json_string).unwrap_or_default(),
        );
    }
    match v {
        Value::Boolean(b) => ("boolean".into(), b.to_string()),
        Value::Integer(i) => ("integer".into(), i.to_string()),
        Value::Decimal(d) => ("decimal".into(), d.to_string()),
        Value::String(s) => ("string".into(), s.to_string()),
        Value::Temporal(t) => match t.kind {
            TemporalKind::Date => ("date".into(), format!("@{t}")),
            TemporalKind::DateTime => ("dateTime".into(), format!("@{t}")),
            TemporalKind::Time => ("time".into(), format!("@T{t}")),
        },
        Value::Quantity(q) => ("Quantity".into(), q.to_string()),
        Value::TypeInfo { namespace, name } => ("TypeInfo".into(), format!("{namespace}.{name}")),
        Value::Node(_) => (String::new(), String::new()),
    }
}

fn matches(actual: &Rendered, expected: &Expected) -> bool {
    if let Some(t) = &expected.ty
        && *t != actual.0
    {
        let string_like =
            t == "string" && matches!(actual.0.as_str(), "string" | "uri" | "markdown");
        if !string_like {
            return false;
        }
    }
    if actual.1 == expected.text {
        return true;
    }
    expected.ty.as_deref() == Some("decimal")
        && matches!((actual.1.parse::<rust_decimal::Decimal>(), expected.text.parse::<rust_decimal::Decimal>()), (Ok(a), Ok(b)) if a == b)
}

fn compare_outputs(
    actual: &[Rendered],
    expected: &[Expected],
    ordered: bool,
) -> Result<(), String> {
    let show = |a: &[Rendered]| {
        a.iter()
            .map(|(t, v)| format!("{t}:{v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let want = expected
        .iter()
        .map(|e| format!("{}:{}", e.ty.as_deref().unwrap_or("?"), e.text))
        .collect::<Vec<_>>()
        .join(", ");
    let fail = || Err(format!("expected [{want}], got [{}]", show(actual)));
    if actual.len() != expected.len() {
        return fail();
    }
    if ordered {
        if actual.iter().zip(expected).all(|(a, e)| matches(a, e)) {
            Ok(())
        } else {
            fail()
        }
    } else {
        let mut used = vec![false; actual.len()];
        for e in expected {
            match (0..actual.len()).find(|i| !used[*i] && matches(&actual[*i], e)) {
                Some(i) => used[i] = true,
                None => return fail(),
            }
        }
        Ok(())
    }
}
