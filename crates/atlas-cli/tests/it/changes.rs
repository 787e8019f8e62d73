//! `atlas changes`: the change feed as NDJSON, from any store version, with
//! type filters; reconciled against `atlas stats`.

use serde_json::Value as Json;

use crate::{atlas, run_ok, stats_json, synth};

fn changes(lake: &std::path::Path, args: &[&str]) -> Vec<Json> {
    let out = run_ok(atlas(lake).arg("changes").args(args));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn atlas_changes_lists_every_commit_s_creates_updates_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let data = synth(dir.path(), 5, 21);
    run_ok(atlas(&lake).arg("ingest").arg(&data));
    let stats = stats_json(&lake);
    let live: u64 = stats["resources"]
        .as_object()
        .unwrap()
        .values()
        .map(|t| t["live"].as_u64().unwrap())
        .sum();
    let first = changes(&lake, &["--since", "-1"]);
    assert_eq!(first.len() as u64, live, "one create per stored resource");
    assert!(first.iter().all(|e| e["op"] == "create"));
    let newest = first
        .iter()
        .map(|e| e["storeVersion"].as_i64().unwrap())
        .max()
        .unwrap();
    // The default start is the newest version: nothing new yet.
    assert!(changes(&lake, &[]).is_empty());

    // One patient changes, one observation goes.
    let patients = std::fs::read_to_string(data.join("Patient.ndjson")).unwrap();
    let mut p: Json = serde_json::from_str(patients.lines().next().unwrap()).unwrap();
    p["gender"] = "unknown".into();
    let pid = p["id"].as_str().unwrap().to_owned();
    let obs = std::fs::read_to_string(data.join("Observation.ndjson")).unwrap();
    let o: Json = serde_json::from_str(obs.lines().next().unwrap()).unwrap();
    let oid = o["id"].as_str().unwrap().to_owned();
    let bundle = serde_json::json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": p, "request": {"method": "PUT", "url": format!("Patient/{pid}")}},
        {"request": {"method": "DELETE", "url": format!("Observation/{oid}")}}]});
    let second = dir.path().join("second.json");
    std::fs::write(&second, bundle.to_string()).unwrap();
    run_ok(atlas(&lake).arg("ingest").arg(&second));
    let since = newest.to_string();
    let got = changes(&lake, &["--since", &since]);
    let mut ops: Vec<(String, String, String)> = got
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_owned(),
                e["id"].as_str().unwrap().to_owned(),
                e["op"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    ops.sort();
    assert_eq!(
        ops,
        vec![
            ("Observation".to_owned(), oid.clone(), "delete".to_owned()),
            ("Patient".to_owned(), pid.clone(), "update".to_owned()),
        ]
    );
    let only = changes(&lake, &["--since", &since, "--types", "Patient"]);
    assert_eq!(only.len(), 1);
    // --until stops at a version: the first ingest alone.
    let upto = changes(&lake, &["--since", "-1", "--until", &since]);
    assert_eq!(upto.len(), first.len());
    // --help carries a working example.
    let help = run_ok(atlas(&lake).args(["changes", "--help"]));
    assert!(String::from_utf8_lossy(&help.stdout).contains("atlas changes --since 0"));
}
