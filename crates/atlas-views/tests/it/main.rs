//! Integration tests for atlas-views: the SQL-on-FHIR v2 conformance suites,
//! read from `../shared/conformance/sql-on-fhir` (next to the workspace root).
//!
//! Each suite must fail exactly the cases listed in
//! `tests/expected-failures/<suite>.txt` (each with its reason): a new
//! failure and a listed case that now passes both fail the test, which
//! prints the difference.
//!
//! Run with `-- --nocapture` to see failing cases and the summary lines.
//! Set `SOF_SUITE_REPORT_DIR=/some/dir` to write one JSON report per suite
//! (in the suite's `test-report.schema.json` format).

use atlas_fhirpath::suite::expected::ExpectedFailures;
use atlas_views::suite::{SuiteReport, run_dir};
use std::path::{Path, PathBuf};

fn suite_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/conformance/sql-on-fhir")
}

/// Reports missing shared data: a failure under CI, a note otherwise (the
/// same rule as the other real-data tests of the workspace).
fn missing(what: &str) {
    let msg = format!("MISSING: {what}; the test did not run");
    eprintln!("{msg}");
    assert!(std::env::var("CI").is_err(), "{msg}");
}

/// Run one suite folder and compare its failures with
/// `tests/expected-failures/<label>.txt`; a note (a failure under CI) when
/// ../shared is not there.
fn run_and_compare(sub: &str, label: &str) {
    let list = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/expected-failures")
        .join(format!("{label}.txt"));
    let expected = ExpectedFailures::read(&list).unwrap_or_else(|e| panic!("{e}"));
    let Some(report) = run(sub, label) else {
        return;
    };
    let diff = expected.compare(report.verdicts());
    assert!(
        diff.is_empty(),
        "SQL-on-FHIR suite {label} ({}): {diff}",
        report.summary()
    );
}

/// Run one suite folder; `None` when ../shared is not there.
fn run(sub: &str, label: &str) -> Option<SuiteReport> {
    let dir = if sub.is_empty() {
        suite_root()
    } else {
        suite_root().join(sub)
    };
    if !dir.is_dir() {
        missing(&dir.display().to_string());
        return None;
    }
    let report = match run_dir(&dir) {
        Ok(r) => r,
        Err(e) => panic!("cannot read {}: {e}", dir.display()),
    };
    for (file, tests) in &report.files {
        for t in tests.iter().filter(|t| t.passed) {
            if let Some(e) = &t.error {
                println!("REJECTED as expected [{label}] {file} / {}: {e}", t.name);
            }
            if t.details.is_some() {
                println!("ROW ORDER differs [{label}] {file} / {}", t.name);
            }
        }
    }
    for (file, t) in report.failures() {
        println!(
            "FAIL [{label}] {file} / {}: {}",
            t.name,
            t.error.as_deref().unwrap_or("")
        );
    }
    if let Ok(out) = std::env::var("SOF_SUITE_REPORT_DIR") {
        let path = Path::new(&out).join(format!("{label}.json"));
        let text = serde_json::to_string_pretty(&report.to_json()).unwrap_or_default();
        std::fs::write(&path, text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }
    println!("SQL-on-FHIR suite {label}: {}", report.summary());
    Some(report)
}

/// v2 (134 cases).
#[test]
fn sql_on_fhir_v2_suite() {
    run_and_compare("", "v2");
}

/// sql-on-fhir.js edition (144 cases), experimental cases included.
#[test]
fn sql_on_fhir_js_suite() {
    run_and_compare("sql-on-fhir-js-via-octofhir", "sql-on-fhir-js");
}

/// fhir-test-cases copy (118 cases, 2.0.0 era).
#[test]
fn fhir_test_cases_suite() {
    run_and_compare("fhir-test-cases-copy", "fhir-test-cases");
}

/// The JSON test files of the three suites (absent folders: `missing`).
fn suite_files() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for sub in ["", "sql-on-fhir-js-via-octofhir", "fhir-test-cases-copy"] {
        let dir = suite_root().join(sub);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            missing(&dir.display().to_string());
            continue;
        };
        out.extend(
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "json")),
        );
    }
    out
}

/// Every suite file gives the same outcomes with its resources as
/// `serde_json::Value`s (`CompiledView::append`) and as `atlas_fhirpath::json`
/// trees (`CompiledView::append_tree`, what `run_dir` uses).
#[test]
fn serde_and_tree_resources_agree() {
    use atlas_views::suite::{run_file_json, run_file_tree};
    let mut files = 0;
    for path in suite_files() {
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let Ok(doc) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        let tree = atlas_fhirpath::json::parse(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let serde = run_file_json(&doc);
        let ours = run_file_tree(&doc, &tree);
        assert_eq!(serde, ours, "{}", path.display());
        files += usize::from(ours.is_some());
    }
    println!("serde_json and tree resources agree on {files} suite files");
}

/// Runs `views` over resource texts with the fast path on and off and
/// asserts identical batches, errors and outcomes; returns how many
/// resources the fast path decided alone.
fn fast_and_full_agree(
    label: &str,
    views: Vec<std::sync::Arc<CompiledView>>,
    texts: &[String],
) -> u64 {
    use atlas_views::{ViewSet, ViewSetState};
    let fast = ViewSet::with_fast_path(views.clone(), true);
    let full = ViewSet::with_fast_path(views, false);
    let (mut bf, mut bs) = (fast.row_builders(), full.row_builders());
    let (mut sf, mut ss) = (ViewSetState::new(), ViewSetState::new());
    for (i, t) in texts.iter().enumerate() {
        let mut ef = Vec::new();
        let mut es = Vec::new();
        let of = fast.append(t, &mut sf, &mut bf, |v, e| ef.push((v, e.to_string())));
        let os = full.append(t, &mut ss, &mut bs, |v, e| es.push((v, e.to_string())));
        assert_eq!(
            format!("{of:?}"),
            format!("{os:?}"),
            "{label} resource {i}: outcome"
        );
        assert_eq!(ef, es, "{label} resource {i}: errors");
    }
    for (v, (a, b)) in bf.iter_mut().zip(bs.iter_mut()).enumerate() {
        let (a, b) = (a.finish(), b.finish());
        match (a, b) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{label}: view {v} rows differ"),
            (a, b) => assert_eq!(a.is_ok(), b.is_ok(), "{label}: view {v}"),
        }
    }
    sf.fast_resources
}

use atlas_views::CompiledView;

/// The fast path (projected tape + compiled paths, `ViewSet`) gives exactly
/// what the full evaluator gives, on every view and resource of the suites.
#[test]
fn fast_path_agrees_with_full_evaluator_on_the_suites() {
    let mut views_total = 0;
    let mut fast_views = 0;
    let mut fast_resources = 0;
    for path in suite_files() {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let (Ok(doc), Ok(tree)) = (
            serde_json::from_str::<serde_json::Value>(&text),
            atlas_fhirpath::json::parse(&text),
        ) else {
            continue;
        };
        let texts: Vec<String> = tree
            .get("resources")
            .and_then(|r| r.as_array())
            .unwrap_or(&[])
            .iter()
            .map(|r| r.to_json_string())
            .collect();
        let tests = doc
            .get("tests")
            .and_then(|t| t.as_array())
            .cloned()
            .unwrap_or_default();
        for t in tests {
            let Some(view) = t.get("view") else { continue };
            let Ok(plan) = CompiledView::from_json(view) else {
                continue;
            };
            let views = vec![std::sync::Arc::new(plan)];
            views_total += 1;
            fast_views += atlas_views::ViewSet::with_fast_path(views.clone(), true)
                .fast_views()
                .len();
            let label = format!(
                "{} / {}",
                path.display(),
                t.get("title").and_then(|x| x.as_str()).unwrap_or("?")
            );
            fast_resources += fast_and_full_agree(&label, views, &texts);
        }
    }
    println!(
        "fast path: {fast_views} of {views_total} suite views compiled, {fast_resources} resources decided on it; all agree"
    );
    if views_total > 0 {
        assert!(
            fast_views >= 20,
            "the fast path should cover many suite views, got {fast_views}"
        );
        assert!(fast_resources > 0);
    }
}

fn builtin_views() -> Vec<std::sync::Arc<CompiledView>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../atlas-ontology/builtin/views");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| {
            let text =
                std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            let json: serde_json::Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            std::sync::Arc::new(
                CompiledView::from_json(&json).unwrap_or_else(|e| panic!("{}: {e:?}", p.display())),
            )
        })
        .collect()
}

/// Edits that push resources off the fast path (primitive extensions,
/// duplicate keys, escapes, nulls, wrong kinds, odd references, long
/// decimals, bad JSON): every one must still give the full evaluator's answer.
fn mutations(text: &str) -> Vec<String> {
    let subs: &[(&str, &str)] = &[
        (
            r#""status":"#,
            r#""_status":{"extension":[{"url":"x","valueString":"y"}]},"status":"#,
        ),
        (r#""status":"#, r#""status":"dup","status":"#),
        (r#""code":""#, r#""code":"\u0041\/\n"#),
        (r#""coding":["#, r#""coding":[null,"#),
        (
            r#""coding":["#,
            r#""coding":[],"_coding":[{"id":"1"}],"x":["#,
        ),
        (r#""display":""#, r#""_display":{"id":"d"},"display":""#),
        (
            r#""reference":""#,
            r#""reference":"https://h/fhir/Patient/9/_history/2","r":""#,
        ),
        (r#""reference":""#, r#""reference":"x"#),
        (r#""value":"#, r#""value":1.1234567890123456789012345,"v":"#),
        (r#""value":"#, r#""value":"12","v":"#),
        (r#""value":"#, r#""value":1e400,"v":"#),
        (
            r#""subject":"#,
            r#""subject":[{"reference":"Patient/a"},{"reference":"Patient/b"}],"s":"#,
        ),
        (
            r#""valueQuantity":"#,
            r#""valueString":"s","valueQuantity":"#,
        ),
        (
            r#""valueQuantity":"#,
            r#""_valueQuantity":{},"valueQuantity":"#,
        ),
        (
            r#""effectiveDateTime":"#,
            r#""effectiveInstant":"2020-01-01T00:00:00Z","effectiveDateTime":"#,
        ),
        (r#""id":"#, r#""id":7,"i":"#),
        (
            r#""resourceType":"#,
            r#""resourceType":"Patient","resourceType":"#,
        ),
        (r#""code":{"#, r#""code":{"text":"t\ud83d\ude00","#),
        (
            r#""category":["#,
            r#""category":[{"coding":[{"code":true}]},"#,
        ),
        (
            r#""component":["#,
            r#""component":[{"code":{"coding":[{"code":"c"}]},"valueBoolean":true},"#,
        ),
        (r#"{"#, r#"{"resourceType":"#),
        (r#"}"#, r#"},"#),
        (r#""issued":""#, "\"issued\":\"\u{1}"),
        (r#""encounter":"#, r#""encounter":null,"e":"#),
        (
            r#""medicationCodeableConcept":"#,
            r##""contained":[{"resourceType":"Medication","id":"m1","code":{"coding":[{"code":"c1","display":"Contained"}]}}],"medicationReference":{"reference":"#m1"},"x":"##,
        ),
        (
            r#""medicationCodeableConcept":"#,
            r#""medicationReference":{"reference":"Medication/m2"},"x":"#,
        ),
    ];
    let mut out = Vec::new();
    for (from, to) in subs {
        if let Some(i) = text.find(from) {
            out.push(format!("{}{}{}", &text[..i], to, &text[i + from.len()..]));
        }
    }
    out
}

/// The built-in views over real data (the 615-patient sample in ../shared,
/// the first lines of each type) and mutated copies: fast = full.
#[test]
fn fast_path_agrees_with_full_evaluator_on_real_data() {
    use std::io::BufRead;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/fhir/large/smart-generated-sample-data-R4/ndjson");
    let mut texts = Vec::new();
    for ty in [
        "Patient",
        "Encounter",
        "Observation",
        "Condition",
        "MedicationRequest",
        "Procedure",
    ] {
        let path = dir.join(format!("{ty}.ndjson.gz"));
        let Ok(file) = std::fs::File::open(&path) else {
            missing(&path.display().to_string());
            continue;
        };
        let reader = std::io::BufReader::new(flate2::read::MultiGzDecoder::new(file));
        for line in reader.lines().take(1500) {
            let line = line.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            texts.extend(mutations(&line).into_iter().take(if texts.len() % 7 == 0 {
                30
            } else {
                2
            }));
            texts.push(line);
        }
    }
    if texts.is_empty() {
        return;
    }
    let n = texts.len();
    let fast = fast_and_full_agree("615-patient sample", builtin_views(), &texts);
    println!("fast path on real data: {fast} of {n} resources decided on it; all agree");
    assert!(
        fast * 3 > n as u64,
        "many resources should take the fast path: {fast} of {n}"
    );
}
