//! `atlas fhirpath` and `atlas view`: the same answers from files, Bundles and
//! the lake, errors with positions, and the conformance suites through the CLI.

use crate::{atlas, run_ok, shared, synth};
use atlas_fhirpath::suite::expected::{ExpectedFailures, Verdict};
use std::process::Command;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_atlas"));
    c.arg("--quiet");
    c
}

#[test]
fn fhirpath_eval_prints_json_and_positions_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let obs = dir.path().join("obs.json");
    std::fs::write(
        &obs,
        r#"{"resourceType":"Observation","id":"o1","status":"final",
            "code":{"coding":[{"system":"http://loinc.org","code":"29463-7"}]},
            "valueQuantity":{"value":176.35499866729558,"unit":"kg","system":"http://unitsofmeasure.org","code":"kg"}}"#,
    )
    .expect("write");
    let out = run_ok(
        bin()
            .args([
                "fhirpath",
                "eval",
                "Observation.value.ofType(Quantity).unit",
            ])
            .arg(&obs),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v, serde_json::json!(["kg"]));

    let out = run_ok(
        bin()
            .args(["fhirpath", "eval", "value.ofType(Quantity) > 100 'g'"])
            .arg(&obs),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v, serde_json::json!([true]), "176 kg > 100 g");

    let out = bin()
        .args([
            "fhirpath",
            "eval",
            "Observation.code.coding.where(code = '1'",
        ])
        .arg(&obs)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("expected ')'") && err.contains("at 1:"),
        "{err}"
    );

    let out = bin()
        .args(["fhirpath", "eval", "--check", "Observation.vaule"])
        .arg(&obs)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("vaule"));
}

#[test]
fn view_runs_the_same_over_files_and_the_lake() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = synth(dir.path(), 40, 11);
    let lake = dir.path().join("lake");
    run_ok(atlas(&lake).arg("ingest").arg(&data));
    let view = dir.path().join("obs.json");
    std::fs::write(
        &view,
        r#"{"resourceType":"ViewDefinition","resource":"Observation","status":"active",
            "select":[{"column":[
              {"name":"id","path":"getResourceKey()","type":"id"},
              {"name":"patient_id","path":"subject.getReferenceKey(Patient)","type":"id"},
              {"name":"code","path":"code.coding.where(system='http://loinc.org').code.first()","type":"code"},
              {"name":"value","path":"value.ofType(Quantity).value","type":"decimal"}]}]}"#,
    )
    .expect("write");
    let rows = |cmd: &mut Command| -> Vec<String> {
        let out = run_ok(cmd);
        let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        lines.sort();
        lines
    };
    let from_files = rows(
        bin()
            .args(["view", "run"])
            .arg(&view)
            .arg(&data)
            .args(["--format", "ndjson"]),
    );
    let from_lake = rows(
        atlas(&lake)
            .args(["view", "run"])
            .arg(&view)
            .args(["--format", "ndjson"]),
    );
    assert!(from_files.len() > 100, "{} rows", from_files.len());
    assert_eq!(from_files, from_lake);
    let first: serde_json::Value = serde_json::from_str(&from_files[0]).expect("ndjson row");
    for k in ["id", "patient_id", "code", "value"] {
        assert!(
            first.get(k).is_some(),
            "{k} missing (nulls are kept): {first}"
        );
    }

    // Parquet and CSV carry the same number of rows.
    let pq = dir.path().join("obs.parquet");
    run_ok(
        bin()
            .args(["view", "run"])
            .arg(&view)
            .arg(&data)
            .args(["--format", "parquet", "--out"])
            .arg(&pq),
    );
    let file = std::fs::File::open(&pq).expect("parquet written");
    let reader = parquet::file::reader::SerializedFileReader::new(file).expect("parquet");
    use parquet::file::reader::FileReader;
    assert_eq!(
        reader.metadata().file_metadata().num_rows() as usize,
        from_files.len()
    );
    let csv = rows(
        bin()
            .args(["view", "run"])
            .arg(&view)
            .arg(&data)
            .args(["--format", "csv"]),
    );
    assert_eq!(csv.len(), from_files.len() + 1, "header + rows");
}

#[test]
fn invalid_view_is_refused_with_its_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let view = dir.path().join("bad.json");
    std::fs::write(
        &view,
        r#"{"resource":"Patient","select":[{"column":[
            {"name":"id","path":"id"},{"name":"x","path":"name.nosuchfn()"}]}]}"#,
    )
    .expect("write");
    let input = dir.path().join("p.ndjson");
    std::fs::write(&input, "{\"resourceType\":\"Patient\",\"id\":\"p1\"}\n").expect("write");
    let out = bin()
        .args(["view", "run"])
        .arg(&view)
        .arg(&input)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("select[0].column[1].path"), "{err}");
    assert!(err.contains("nosuchfn"), "{err}");
    assert!(out.stdout.is_empty());
}

/// The committed expected-failure list of a suite (kept next to the
/// library test that runs the same suite).
fn expected_failures(relative: &str) -> ExpectedFailures {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative);
    ExpectedFailures::read(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// The suites through `atlas view test` and `atlas fhirpath test`: their
/// reports fail exactly the cases the libraries' lists name.
#[test]
fn conformance_suites_through_the_cli() {
    let Some(shared) = shared() else {
        let msg = "MISSING: ../shared (conformance suites); CLI suite runs skipped";
        eprintln!("{msg}");
        assert!(std::env::var("CI").is_err(), "{msg}");
        return;
    };
    let conf = shared.join("conformance");
    let dir = tempfile::tempdir().expect("tempdir");
    let report = dir.path().join("sof.json");
    let out = run_ok(
        bin()
            .args(["view", "test"])
            .arg(conf.join("sql-on-fhir/sql-on-fhir-js-via-octofhir"))
            .arg("--report")
            .arg(&report),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).expect("report")).expect("json");
    // The report's shape: {"<file>": {"tests": [{"name", "result": {"passed", "error"?}}]}}.
    let mut verdicts = Vec::new();
    for (file, f) in report.as_object().expect("report object") {
        for t in f["tests"].as_array().expect("tests array") {
            let name = format!("{file} / {}", t["name"].as_str().unwrap_or("?"));
            let verdict = if t["result"]["passed"] == true {
                Verdict::Pass
            } else {
                Verdict::Fail(t["result"]["error"].to_string())
            };
            verdicts.push((name, verdict));
        }
    }
    assert!(!verdicts.is_empty(), "{text}");
    let diff = expected_failures("atlas-views/tests/expected-failures/sql-on-fhir-js.txt")
        .compare(verdicts);
    assert!(diff.is_empty(), "atlas view test: {diff}\n{text}");

    let report = dir.path().join("fhirpath.json");
    let out = run_ok(
        bin()
            .args(["fhirpath", "test"])
            .arg(conf.join("fhirpath/tests-fhir-r4.xml"))
            .arg("--inputs")
            .arg(conf.join("fhirpath/r4-input"))
            .arg("--report")
            .arg(&report),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // Skips are only for inputs that exist solely as XML, and are named.
    for line in text.lines().filter(|l| l.starts_with("skipped")) {
        assert!(line.contains("only available as XML"), "{line}");
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).expect("report")).expect("json");
    // The report is the library's `SuiteReport`: tests with group, name, status, reason.
    let verdicts: Vec<_> = report["tests"]
        .as_array()
        .expect("tests array")
        .iter()
        .map(|t| {
            let name = format!(
                "{}/{}",
                t["group"].as_str().unwrap_or("?"),
                t["name"].as_str().unwrap_or("?")
            );
            let verdict = match t["status"].as_str() {
                Some("pass") => Verdict::Pass,
                Some("skip") => Verdict::NotRun,
                _ => Verdict::Fail(t["reason"].to_string()),
            };
            (name, verdict)
        })
        .collect();
    let diff = expected_failures("atlas-fhirpath/tests/expected-failures.txt").compare(verdicts);
    let last = text.lines().last().unwrap_or("");
    assert!(diff.is_empty(), "atlas fhirpath test: {diff}\n{last}");
}

/// `atlas views refresh` builds the ontology's views and refreshes them
/// incrementally (deletion vectors); `atlas sql` queries and joins them (and
/// refuses writes); DuckDB's delta reader sees the same tables, deleted rows
/// and decimals included.
#[test]
fn views_refresh_sql_ontology_and_an_independent_reader() {
    let dir = tempfile::tempdir().unwrap();
    let data = crate::synth(dir.path(), 30, 21);
    let lake = dir.path().join("lake");
    run_ok(crate::atlas(&lake).arg("ingest").arg(&data));
    let out = run_ok(crate::atlas(&lake).args(["views", "refresh", "--json"]));
    let reports: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reports.as_array().unwrap().len(), 6, "{reports}");
    let out = run_ok(crate::atlas(&lake).args(["views", "refresh", "--json"]));
    let again: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        again
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["kind"] == "up_to_date"),
        "{again}"
    );

    // A delta of updates and a delete: the incremental refresh marks the old
    // rows deleted with deletion vectors, which DuckDB must honour below.
    let obs_text = std::fs::read_to_string(data.join("Observation.ndjson")).unwrap();
    let obs_all: Vec<&str> = obs_text.lines().collect();
    let mut delta = String::new();
    for line in obs_all.iter().take(3) {
        let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
        v["meta"] = serde_json::json!({"versionId": "2"});
        v["status"] = "amended".into();
        delta.push_str(&format!("{v}\n"));
    }
    let gone: serde_json::Value = serde_json::from_str(obs_all[5]).unwrap();
    std::fs::create_dir_all(dir.path().join("delta")).unwrap();
    std::fs::write(dir.path().join("delta/changes.ndjson"), delta).unwrap();
    std::fs::write(
        dir.path().join("delta/deletes.json"),
        serde_json::json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"request": {"method": "DELETE", "url": format!("Observation/{}", gone["id"].as_str().unwrap())}}]})
        .to_string(),
    )
    .unwrap();
    run_ok(
        crate::atlas(&lake)
            .arg("ingest")
            .arg(dir.path().join("delta")),
    );
    let out = run_ok(crate::atlas(&lake).args(["views", "refresh", "--json"]));
    let inc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let obs_inc = inc
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "observation")
        .unwrap();
    assert_eq!(obs_inc["kind"], "incremental", "{inc}");
    assert_eq!(obs_inc["deletion_vectors"], 1, "{inc}");

    let status = run_ok(crate::atlas(&lake).args(["views", "status", "--json"]));
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let obs_lines = obs_all.len() - 1;
    let obs = status
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "observation")
        .unwrap();
    assert_eq!(obs["rows"], obs_lines as u64);
    assert_eq!(obs["lag_versions"], 0);

    // Fingerprints through atlas sql, then the same through DuckDB.
    let mut expected = serde_json::Map::new();
    for view in [
        "patient",
        "encounter",
        "observation",
        "observation_component",
        "condition",
        "medication_request",
    ] {
        let decimal = matches!(view, "observation" | "observation_component");
        let q = format!(
            "SELECT count(*) AS rows, count(DISTINCT patient_id) AS patients, count(DISTINCT id) AS keys{} FROM {view}",
            if decimal {
                ", CAST(sum(value_quantity) AS VARCHAR) AS checksum"
            } else {
                ""
            }
        );
        let out = run_ok(crate::atlas(&lake).args(["sql", "--format", "json", &q]));
        let mut row: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap())
                .unwrap();
        if decimal {
            row["decimal_column"] = "value_quantity".into();
        }
        expected.insert(view.into(), row);
    }
    assert_eq!(expected["observation"]["rows"], obs_lines as u64);

    let refused = crate::atlas(&lake)
        .args(["sql", "DROP TABLE patient"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("read-only"));

    let onto = run_ok(crate::atlas(&lake).args(["ontology", "show", "--json"]));
    let onto: serde_json::Value = serde_json::from_slice(&onto.stdout).unwrap();
    let sets: Vec<&str> = onto["objectSets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["apiName"].as_str().unwrap())
        .collect();
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
    for cmd in [
        &["views", "refresh", "--help"][..],
        &["sql", "--help"],
        &["ontology", "show", "--help"],
        &["views", "create", "--help"],
    ] {
        let help = run_ok(bin().args(cmd));
        assert!(
            String::from_utf8_lossy(&help.stdout).contains("Example"),
            "{cmd:?} --help has no example"
        );
    }

    let Some(py) = crate::python() else {
        let msg = "MISSING: no Python with duckdb (run scripts/test.sh or set ATLAS_PYTHON); the DuckDB view check did not run";
        eprintln!("{msg}");
        assert!(std::env::var("CI").is_err(), "{msg}");
        return;
    };
    let expected_path = dir.path().join("expected.json");
    std::fs::write(
        &expected_path,
        serde_json::Value::Object(expected).to_string(),
    )
    .unwrap();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/check_views.py");
    let out = run_ok(Command::new(py).arg(script).arg(&lake).arg(&expected_path));
    let said = String::from_utf8_lossy(&out.stdout);
    eprintln!("{said}");
    assert!(
        said.contains("duckdb delta_scan agrees on 6 views"),
        "{said}"
    );
    assert!(
        said.contains("DECIMAL(38,18)"),
        "decimals stay decimals: {said}"
    );
}
