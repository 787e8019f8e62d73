//! `atlas deid` and `atlas ingest --deid` on generated data: counts that
//! reconcile, the same bytes on every run with the same key, an interrupted
//! run's leftovers replaced, a missing key refused, and a de-identified lake
//! whose landed bytes hold no name from the source.

use crate::{atlas, run_ok, stats_json, synth};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

fn deid(key: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_atlas"));
    c.arg("--quiet").arg("deid").env("ATLAS_DEID_KEY", key);
    c
}

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

/// Family and given names of the generated patients.
fn names(data: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(data.join("Patient.ndjson")).unwrap();
    let mut out = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        for n in v["name"].as_array().unwrap() {
            out.push(n["family"].as_str().unwrap().to_string());
            for g in n["given"].as_array().into_iter().flatten() {
                out.push(g.as_str().unwrap().to_string());
            }
        }
    }
    assert!(out.len() >= 20);
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[test]
fn deid_profile_is_deterministic_reconciled_and_atomic() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth(tmp.path(), 10, 3);
    let out = tmp.path().join("deid");
    let run = |key: &str| {
        let o = run_ok(
            deid(key)
                .args(["--profile", "safe-harbor-minimal", "--changes", "--out"])
                .arg(&out)
                .arg(&data),
        );
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let report = run("key-one");
    assert!(report.contains("(reconciled)"), "{report}");
    let first = files(&out);
    for f in [
        "Patient.ndjson",
        "Observation.ndjson",
        "summary.json",
        "changes.ndjson",
    ] {
        assert!(first.contains_key(f), "{f} missing: {:?}", first.keys());
    }
    let summary: serde_json::Value = serde_json::from_slice(&first["summary.json"]).unwrap();
    let input_lines: usize = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| {
            std::fs::read_to_string(e.unwrap().path())
                .unwrap()
                .lines()
                .count()
        })
        .sum();
    assert_eq!(summary["read"], input_lines);
    assert_eq!(summary["written"], input_lines);
    let all: Vec<u8> = first.values().flatten().copied().collect();
    for n in names(&data) {
        assert!(!contains(&all, &n), "name {n} survived de-identification");
    }

    // A killed run leaves a staging folder behind; the next run replaces it.
    std::fs::create_dir_all(tmp.path().join(".deid.partial")).unwrap();
    std::fs::write(tmp.path().join(".deid.partial/Patient.ndjson"), "junk").unwrap();
    run("key-one");
    assert_eq!(files(&out), first, "same inputs and key, same bytes");
    assert!(!tmp.path().join(".deid.partial").exists());

    // Another key, other hashes.
    run("key-two");
    assert_ne!(files(&out)["Patient.ndjson"], first["Patient.ndjson"]);

    // No key: refused with a hint, nothing written.
    let o = Command::new(env!("CARGO_BIN_EXE_atlas"))
        .args([
            "--quiet",
            "deid",
            "--profile",
            "safe-harbor-minimal",
            "--out",
        ])
        .arg(tmp.path().join("nokey"))
        .arg(&data)
        .env_remove("ATLAS_DEID_KEY")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("ATLAS_DEID_KEY"));
    assert!(!tmp.path().join("nokey").exists());

    // A folder it did not write is never replaced.
    let foreign = tmp.path().join("documents");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("thesis.txt"), "keep me").unwrap();
    let o = deid("key-one")
        .args(["--profile", "safe-harbor-minimal", "--out"])
        .arg(&foreign)
        .arg(&data)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("refusing to replace"));
    assert_eq!(
        std::fs::read_to_string(foreign.join("thesis.txt")).unwrap(),
        "keep me"
    );

    // --print-config prints rules that load back as a configuration.
    let o = run_ok(deid("key-one").args(["--profile", "safe-harbor-minimal", "--print-config"]));
    let cfg = tmp.path().join("profile.json");
    std::fs::write(&cfg, &o.stdout).unwrap();
    let out2 = tmp.path().join("deid-from-config");
    run_ok(
        deid("unused")
            .arg("--config")
            .arg(&cfg)
            .arg("--out")
            .arg(&out2)
            .arg(&data),
    );
    assert_eq!(
        files(&out2)["Patient.ndjson"],
        first["Patient.ndjson"],
        "the printed profile is the profile"
    );
}

#[test]
fn ingest_deid_builds_a_zone_without_identified_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth(tmp.path(), 10, 4);
    let lake = tmp.path().join("deid-lake");
    let ingest = || {
        let o = run_ok(
            atlas(&lake)
                .args(["ingest", "--deid", "safe-harbor-minimal"])
                .arg(&data)
                .env("ATLAS_DEID_KEY", "zone-key"),
        );
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let first = ingest();
    assert!(first.contains("de-identified:"), "{first}");
    let stats = stats_json(&lake);
    assert_eq!(stats["resources"]["Patient"]["live"], 10, "{stats}");
    // Nothing the lake landed or stored carries a source name.
    let mut stack = vec![lake.clone()];
    let mut bytes = 0usize;
    let names = names(&data);
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if !p.to_string_lossy().ends_with(".parquet") {
                let b = std::fs::read(&p).unwrap();
                bytes += b.len();
                for n in &names {
                    assert!(!contains(&b, n), "{n} in {}", p.display());
                }
            }
        }
    }
    assert!(bytes > 10_000);
    let stored =
        run_ok(atlas(&lake).args(["sql", "SELECT resource FROM resources", "--format", "csv"]));
    assert!(stored.stdout.len() > 10_000);
    for n in &names {
        assert!(!contains(&stored.stdout, n), "{n} stored");
    }
    // Same inputs, same key: the same batch, nothing changes.
    let second = ingest();
    assert!(second.contains("already ingested"), "{second}");
}
