use std::io::Write;
use std::process::{Command, Stdio};

use crate::{atlas, python, run_ok, stats_json, synth};

#[test]
fn demo_generates_ingests_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let out = run_ok(atlas(&lake).args(["demo", "--patients", "20"]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Try next"), "{stdout}");
    let s = stats_json(&lake);
    assert!(
        s["resources"]["Patient"]["live"].as_i64().unwrap() == 20,
        "{s}"
    );
    assert!(
        s["resources"]["Observation"]["live"].as_i64().unwrap() > 100,
        "{s}"
    );
    assert_eq!(s["batches"].as_array().unwrap().len(), 1);
    assert_eq!(s["quarantine"], serde_json::json!({}));
}

#[test]
fn ingest_twice_changes_nothing_and_stats_shape_is_stable() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path(), 30, 7);
    let lake = dir.path().join("lake");
    let first = run_ok(atlas(&lake).args(["ingest", "--json"]).arg(&data));
    let report: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    let o = &report["outcomes"];
    assert_eq!(o["lines_read"], o["stored"], "{report}");
    let before = stats_json(&lake);
    let second = run_ok(atlas(&lake).arg("ingest").arg(&data));
    assert!(String::from_utf8_lossy(&second.stderr).contains("already ingested"));
    assert_eq!(stats_json(&lake), before);

    // The same resources under another batch (a folder with one more file) are all unchanged.
    let extra = dir.path().join("extra");
    std::fs::create_dir_all(&extra).unwrap();
    std::fs::write(
        extra.join("x.ndjson"),
        "{\"resourceType\":\"Patient\",\"id\":\"extra\"}\n",
    )
    .unwrap();
    let third = run_ok(
        atlas(&lake)
            .args(["ingest", "--json"])
            .arg(&data)
            .arg(&extra),
    );
    let r: serde_json::Value = serde_json::from_slice(&third.stdout).unwrap();
    assert_eq!(r["outcomes"]["stored"], 1, "{r}");
    assert_eq!(r["outcomes"]["unchanged"], o["stored"], "{r}");

    // Stable keys only.
    let s = stats_json(&lake);
    let keys: Vec<_> = s.as_object().unwrap().keys().cloned().collect();
    assert_eq!(keys, ["batches", "quarantine", "resources"]);
    for b in s["batches"].as_array().unwrap() {
        for k in [
            "batch_id",
            "source",
            "started_at",
            "finished_at",
            "lines_read",
            "stored",
            "unchanged",
            "older_than_stored",
            "superseded",
            "quarantined",
            "skipped",
            "deleted",
            "outcome",
        ] {
            assert!(b.get(k).is_some(), "batch lacks {k}: {b}");
        }
    }
}

#[test]
fn stdin_gzip_and_tar_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path(), 5, 3);
    let patients = std::fs::read(data.join("Patient.ndjson")).unwrap();
    let n_patients = patients
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .count();

    // stdin
    let lake = dir.path().join("lake-stdin");
    let mut child = atlas(&lake)
        .args(["ingest", "--json", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&patients).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stats_json(&lake)["resources"]["Patient"]["live"],
        n_patients as i64
    );

    // tar.gz of the whole folder, with one file gzipped inside
    let tar_path = dir.path().join("data.tar.gz");
    {
        let f = std::fs::File::create(&tar_path).unwrap();
        let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        let mut t = tar::Builder::new(gz);
        for entry in std::fs::read_dir(&data).unwrap() {
            let p = entry.unwrap().path();
            let name = p.file_name().unwrap().to_str().unwrap().to_owned();
            if name == "Observation.ndjson" {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(&std::fs::read(&p).unwrap()).unwrap();
                let bytes = e.finish().unwrap();
                let mut h = tar::Header::new_gnu();
                h.set_size(bytes.len() as u64);
                h.set_mode(0o644);
                h.set_cksum();
                t.append_data(&mut h, format!("inner/{name}.gz"), &bytes[..])
                    .unwrap();
            } else {
                t.append_path_with_name(&p, format!("inner/{name}"))
                    .unwrap();
            }
        }
        t.into_inner().unwrap().finish().unwrap();
    }
    let lake_tar = dir.path().join("lake-tar");
    let lake_dir = dir.path().join("lake-dir");
    run_ok(atlas(&lake_tar).arg("ingest").arg(&tar_path));
    run_ok(atlas(&lake_dir).arg("ingest").arg(&data));
    assert_eq!(
        stats_json(&lake_tar)["resources"],
        stats_json(&lake_dir)["resources"]
    );
}

#[test]
fn errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let out = atlas(&lake)
        .args(["ingest", "/nonexistent/file.ndjson"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/file.ndjson"), "{err}");
    let help = run_ok(Command::new(env!("CARGO_BIN_EXE_atlas")).args(["ingest", "--help"]));
    assert!(String::from_utf8_lossy(&help.stdout).contains("Examples:"));
    for cmd in ["stats", "synth", "demo"] {
        let help = run_ok(Command::new(env!("CARGO_BIN_EXE_atlas")).args([cmd, "--help"]));
        assert!(
            String::from_utf8_lossy(&help.stdout).contains("Example"),
            "{cmd} --help has no example"
        );
    }
}

/// DuckDB's delta extension (delta-kernel-rs, an independent reader) sees what `stats` says.
#[test]
fn duckdb_reads_the_tables() {
    let Some(py) = python() else {
        let msg = "MISSING: no Python with duckdb (run scripts/test.sh or set ATLAS_PYTHON); the DuckDB reader check did not run";
        eprintln!("{msg}");
        assert!(std::env::var("CI").is_err(), "{msg}");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path(), 25, 11);
    std::fs::write(data.join("bad.ndjson"), "{\"resourceType\":\"Patient\"}\nnot json\n{\"resourceType\":\"Condition\",\"id\":\"gone\"}\n").unwrap();
    let lake = dir.path().join("lake");
    run_ok(atlas(&lake).arg("ingest").arg(&data));
    let bundle = dir.path().join("delete.json");
    std::fs::write(&bundle, r#"{"resourceType":"Bundle","type":"transaction","entry":[{"request":{"method":"DELETE","url":"Condition/gone"}}]}"#).unwrap();
    run_ok(atlas(&lake).arg("ingest").arg(&bundle));
    let stats_path = dir.path().join("stats.json");
    std::fs::write(
        &stats_path,
        run_ok(atlas(&lake).args(["stats", "--json"])).stdout,
    )
    .unwrap();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/check_lake.py");
    let out = run_ok(Command::new(py).arg(script).arg(&lake).arg(&stats_path));
    let said = String::from_utf8_lossy(&out.stdout);
    eprintln!("{said}");
    assert!(said.contains("duckdb delta_scan agrees"), "{said}");
    assert!(!said.contains(" 0 rows byte-exact"), "{said}");
}
