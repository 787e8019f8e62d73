//! Runner for the SQL-on-FHIR v2 conformance suite (the `tests/*.json` format).
//!
//! [`run_dir`] reads every `*.json` file with a `tests` array in ONE folder
//! (not its subfolders) and produces a [`SuiteReport`], which renders in the
//! suite's `test-report.schema.json` format with [`SuiteReport::to_json`].
//!
//! Each test's view is read, compiled and run over all the file's resources
//! (a view only produces rows for its own resource type):
//! * `expectError: true` passes when any of these steps fails;
//! * `expect` compares the rows, converted back from Arrow to JSON, with the
//!   expected objects: same keys, equal values (numbers by decimal value,
//!   lists in order). Rows are matched as a multiset, as the reference runner
//!   (sql-on-fhir.js) does, since some cases list rows in an order no
//!   resource-at-a-time runner produces; when the order differs the result
//!   carries `details: {"rowOrderMatched": false}`;
//! * `expectColumns` compares the schema's column names, in order;
//! * `expectCount` compares the number of rows.

use crate::{CompiledView, ViewCompiler, ViewDefinition, batch_to_json_rows, diag};
use atlas_fhirpath::json::JsonValue;
use atlas_fhirpath::suite::expected::Verdict;
use serde_json::{Map, Value as Json, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;

/// The result of one test case.
#[derive(Debug, Clone, PartialEq)]
pub struct TestOutcome {
    /// The test's `title`.
    pub name: String,
    pub passed: bool,
    /// Why it failed (or, for passing `expectError` tests, the error raised).
    pub error: Option<String>,
    /// Extra facts for the report's `details` (e.g. `rowOrderMatched`).
    pub details: Option<Map<String, Json>>,
}

/// Results of a suite folder, per file (file name → outcomes in file order).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SuiteReport {
    pub files: BTreeMap<String, Vec<TestOutcome>>,
    pub passed: usize,
    pub failed: usize,
}

impl SuiteReport {
    /// The report in the suite's `test-report.schema.json` format:
    /// `{"<file>.json": {"tests": [{"name", "result": {"passed", "error"?}}]}}`.
    /// For passing tests, `error` is omitted.
    pub fn to_json(&self) -> Json {
        let mut out = Map::new();
        for (file, tests) in &self.files {
            let tests: Vec<Json> = tests
                .iter()
                .map(|t| {
                    let mut result = Map::new();
                    result.insert("passed".into(), Json::Bool(t.passed));
                    if !t.passed
                        && let Some(e) = &t.error
                    {
                        result.insert("error".into(), Json::String(e.clone()));
                    }
                    if let Some(d) = &t.details {
                        result.insert("details".into(), Json::Object(d.clone()));
                    }
                    json!({"name": t.name, "result": result})
                })
                .collect();
            out.insert(file.clone(), json!({ "tests": tests }));
        }
        Json::Object(out)
    }

    /// `N passed, N failed`.
    pub fn summary(&self) -> String {
        format!("{} passed, {} failed", self.passed, self.failed)
    }

    /// Failing tests as `(file, outcome)`.
    pub fn failures(&self) -> impl Iterator<Item = (&str, &TestOutcome)> {
        self.files
            .iter()
            .flat_map(|(f, ts)| ts.iter().map(move |t| (f.as_str(), t)))
            .filter(|(_, t)| !t.passed)
    }

    /// Each test as `<file> / <title>` with its verdict, the form the
    /// expected-failure lists use
    /// ([`atlas_fhirpath::suite::expected::ExpectedFailures::compare`]).
    pub fn verdicts(&self) -> impl Iterator<Item = (String, Verdict)> + '_ {
        self.files.iter().flat_map(|(file, tests)| {
            tests.iter().map(move |t| {
                let verdict = if t.passed {
                    Verdict::Pass
                } else {
                    Verdict::Fail(t.error.clone().unwrap_or_default())
                };
                (format!("{file} / {}", t.name), verdict)
            })
        })
    }
}

/// Run every `*.json` file with a `tests` array in `dir` (not subfolders).
/// Files that cannot be read or parsed count as one failed test named after the file.
pub fn run_dir(dir: impl AsRef<Path>) -> std::io::Result<SuiteReport> {
    let mut paths: Vec<_> = std::fs::read_dir(dir.as_ref())?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    let mut report = SuiteReport::default();
    for path in paths {
        let file = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = std::fs::read_to_string(&path).map_err(|e| e.to_string());
        let parsed = text.as_deref().map_err(Clone::clone).and_then(|s| {
            let doc = serde_json::from_str::<Json>(s).map_err(|e| e.to_string())?;
            let tree = atlas_fhirpath::json::parse(s).map_err(|e| e.to_string())?;
            Ok((doc, tree))
        });
        let outcomes = match parsed {
            Ok((doc, tree)) => match run_file_tree(&doc, &tree) {
                Some(o) => o,
                None => continue, // not a test file
            },
            Err(e) => vec![TestOutcome {
                name: file.clone(),
                passed: false,
                error: Some(format!("cannot read test file: {e}")),
                details: None,
            }],
        };
        for o in &outcomes {
            if o.passed {
                report.passed += 1;
            } else {
                report.failed += 1;
            }
        }
        report.files.insert(file, outcomes);
    }
    Ok(report)
}

/// Run the tests of one parsed test file; `None` if it has no `tests` array.
pub fn run_file_json(doc: &Json) -> Option<Vec<TestOutcome>> {
    let tests = doc.get("tests")?.as_array()?;
    let empty = Vec::new();
    let resources = doc
        .get("resources")
        .and_then(Json::as_array)
        .unwrap_or(&empty);
    Some(tests.iter().map(|t| run_test(resources, t)).collect())
}

/// [`run_file_json`] with the resources taken from `tree` (the same file
/// parsed with [`atlas_fhirpath::json::parse`]), so numbers keep their exact text.
pub fn run_file_tree(doc: &Json, tree: &JsonValue<'_>) -> Option<Vec<TestOutcome>> {
    let tests = doc.get("tests")?.as_array()?;
    let resources = tree
        .get("resources")
        .and_then(JsonValue::as_array)
        .unwrap_or(&[]);
    Some(
        tests
            .iter()
            .map(|t| outcome(Resources::Tree(resources), t))
            .collect(),
    )
}

/// The resources of a test file, in either representation.
#[derive(Clone, Copy)]
enum Resources<'r> {
    Serde(&'r [Json]),
    Tree(&'r [JsonValue<'r>]),
}

/// Run one test case over the file's resources.
pub fn run_test(resources: &[Json], test: &Json) -> TestOutcome {
    outcome(Resources::Serde(resources), test)
}

fn outcome(resources: Resources<'_>, test: &Json) -> TestOutcome {
    let name = test
        .get("title")
        .and_then(Json::as_str)
        .unwrap_or("<untitled>")
        .to_string();
    let expect_error = test.get("expectError").and_then(Json::as_bool) == Some(true);
    let result = evaluate(resources, test);
    let (passed, error, details) = match (expect_error, result) {
        (true, Err(e)) => (true, Some(e), None),
        (true, Ok(_)) => (
            false,
            Some("expected an error, but the view ran".to_string()),
            None,
        ),
        (false, Err(e)) => (false, Some(e), None),
        (false, Ok((columns, rows))) => match compare(test, &columns, &rows) {
            Ok(details) => (true, None, details),
            Err(e) => (false, Some(e), None),
        },
    };
    TestOutcome {
        name,
        passed,
        error,
        details,
    }
}

type Rows = Vec<Map<String, Json>>;

fn evaluate(resources: Resources<'_>, test: &Json) -> Result<(Vec<String>, Rows), String> {
    let view_json = test.get("view").ok_or("test has no view")?;
    let view = ViewDefinition::from_json(view_json).map_err(|d| diag::render(&d))?;
    let compiled: CompiledView = ViewCompiler::default()
        .compile(&view)
        .map_err(|d| diag::render(&d))?;
    let batch = match resources {
        Resources::Serde(r) => compiled.run(r.iter()),
        Resources::Tree(r) => {
            let mut b = compiled.row_builder();
            for res in r {
                compiled
                    .append_tree(res, &mut b)
                    .map_err(|e| e.to_string())?;
            }
            b.finish()
        }
    }
    .map_err(|e| e.to_string())?;
    let columns = batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    Ok((columns, batch_to_json_rows(&batch)))
}

fn compare(
    test: &Json,
    columns: &[String],
    rows: &Rows,
) -> Result<Option<Map<String, Json>>, String> {
    if let Some(cols) = test.get("expectColumns").and_then(Json::as_array) {
        let want: Vec<&str> = cols.iter().filter_map(Json::as_str).collect();
        if want != columns.iter().map(String::as_str).collect::<Vec<_>>() {
            return Err(format!("expected columns {want:?}, got {columns:?}"));
        }
    }
    if let Some(n) = test.get("expectCount") {
        let want = n.as_u64().ok_or("expectCount is not a count")?;
        if rows.len() as u64 != want {
            return Err(format!("expected {want} rows, got {}", rows.len()));
        }
    }
    let Some(expect) = test.get("expect") else {
        return Ok(None);
    };
    let expect = expect.as_array().ok_or("expect is not an array")?;
    if expect.len() != rows.len() {
        return Err(format!(
            "expected {} rows, got {}: {}",
            expect.len(),
            rows.len(),
            rows_text(rows)
        ));
    }
    let in_order = expect.iter().zip(rows).all(|(e, r)| row_equal(e, r));
    if in_order {
        return Ok(None);
    }
    let mut used = vec![false; rows.len()];
    for e in expect {
        let found = rows
            .iter()
            .enumerate()
            .find(|(i, r)| !used[*i] && row_equal(e, r));
        match found {
            Some((i, _)) => used[i] = true,
            None => {
                return Err(format!("expected row {e} not found in {}", rows_text(rows)));
            }
        }
    }
    let mut d = Map::new();
    d.insert("rowOrderMatched".into(), Json::Bool(false));
    Ok(Some(d))
}

fn rows_text(rows: &Rows) -> String {
    let s = Json::Array(rows.iter().cloned().map(Json::Object).collect()).to_string();
    if s.len() > 2000 {
        format!("{}...", s.chars().take(2000).collect::<String>())
    } else {
        s
    }
}

fn row_equal(expected: &Json, actual: &Map<String, Json>) -> bool {
    let Some(e) = expected.as_object() else {
        return false;
    };
    e.len() == actual.len()
        && e.iter()
            .all(|(k, v)| actual.get(k).is_some_and(|a| value_equal(v, a)))
}

/// JSON equality with numbers compared by decimal value (`1.0` = `1`).
pub fn value_equal(a: &Json, b: &Json) -> bool {
    match (a, b) {
        (Json::Number(x), Json::Number(y)) => {
            match (
                rust_decimal::Decimal::from_str(&x.to_string()),
                rust_decimal::Decimal::from_str(&y.to_string()),
            ) {
                (Ok(x), Ok(y)) => x == y,
                _ => x == y,
            }
        }
        (Json::Array(x), Json::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| value_equal(a, b))
        }
        (Json::Object(x), Json::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| value_equal(v, w)))
        }
        _ => a == b,
    }
}
