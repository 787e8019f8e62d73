//! Integration tests for atlas-fhirpath: the HL7 FHIRPath R4 conformance suite,
//! read from `../shared/conformance/fhirpath` (next to the workspace root).
//!
//! The run must fail exactly the cases listed in `tests/expected-failures.txt`
//! (each with its reason): a new failure and a listed case that now passes
//! both fail the test, which prints the difference.
//!
//! Run with `-- --nocapture` to see the failing tests and the summary line.
//! Set `FHIRPATH_SUITE_REPORT=/path/report.json` to write the JSON report.

use atlas_fhirpath::suite::expected::ExpectedFailures;
use atlas_fhirpath::suite::{RunOptions, Status, run_with};
use std::path::{Path, PathBuf};

fn shared_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

/// Reports missing shared data: a failure under CI, a note otherwise (the
/// same rule as the other real-data tests of the workspace).
fn missing(what: &str) {
    let msg = format!("MISSING: {what}; the test did not run");
    eprintln!("{msg}");
    assert!(std::env::var("CI").is_err(), "{msg}");
}

fn expected_failures() -> ExpectedFailures {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/expected-failures.txt");
    ExpectedFailures::read(&path).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn hl7_fhirpath_r4_suite() {
    run_suite(false);
}

#[test]
fn hl7_fhirpath_r4_suite_with_xml_inputs() {
    run_suite(true);
}

fn run_suite(convert_xml_inputs: bool) {
    let expected = expected_failures();
    let dir = shared_dir().join("conformance/fhirpath");
    let xml = dir.join("tests-fhir-r4.xml");
    if !xml.exists() {
        missing(&format!(
            "{} (the HL7 FHIRPath suite lives in ../shared)",
            xml.display()
        ));
        return;
    }
    let options = RunOptions { convert_xml_inputs };
    let report = match run_with(&xml, &dir.join("r4-input"), &options) {
        Ok(r) => r,
        Err(e) => panic!("cannot run suite: {e}"),
    };
    let mode = if convert_xml_inputs {
        "JSON + converted XML inputs"
    } else {
        "JSON inputs"
    };
    for t in &report.tests {
        let reason = t.reason.as_deref().unwrap_or("");
        match t.status {
            Status::Fail => println!(
                "FAIL [{mode}] {}/{}: {} -- {reason}",
                t.group, t.name, t.expression
            ),
            Status::Skip => {
                println!("SKIP [{mode}] {}/{}: {reason}", t.group, t.name);
                // A skip hides a case from the comparison: only the inputs
                // that exist solely as XML may cause one, and converting
                // them runs every case.
                assert!(
                    !convert_xml_inputs && reason.contains("only available as XML"),
                    "unexpected skip [{mode}] {}/{}: {reason}",
                    t.group,
                    t.name
                );
            }
            Status::Pass => {}
        }
    }
    if !convert_xml_inputs && let Ok(path) = std::env::var("FHIRPATH_SUITE_REPORT") {
        let json = serde_json::to_string_pretty(&report).unwrap_or_default();
        std::fs::write(&path, json).unwrap_or_else(|e| panic!("cannot write {path}: {e}"));
    }
    println!("HL7 FHIRPath R4 suite ({mode}):");
    println!("{}", report.summary());
    let diff = expected.compare(report.verdicts());
    assert!(diff.is_empty(), "HL7 FHIRPath suite [{mode}]: {diff}");
}
