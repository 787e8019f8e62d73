//! The real Synthea data in `../shared/data/fhir` (CI always has it).

use std::collections::BTreeMap;
use std::path::Path;

use crate::{atlas, run_ok, shared, stats_json};

fn expected_counts(source_md: &str) -> BTreeMap<String, i64> {
    // "189,111 resources: Observation 88,674; Claim 22,810; ... Practitioner 102."
    let start = source_md
        .find("resources:")
        .expect("SOURCE.md lists counts")
        + "resources:".len();
    let end = source_md[start..]
        .find("(249")
        .map(|e| start + e)
        .unwrap_or(source_md.len());
    source_md[start..end]
        .split(';')
        .filter_map(|part| {
            let part = part.trim().trim_end_matches('.');
            let (name, n) = part.rsplit_once(' ')?;
            Some((
                name.trim().to_owned(),
                n.replace(',', "").trim_end_matches('.').parse().ok()?,
            ))
        })
        .collect()
}

fn live_counts(lake: &Path) -> BTreeMap<String, i64> {
    let s = stats_json(lake);
    s["resources"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v["live"].as_i64().unwrap()))
        .collect()
}

fn keys(lake: &Path) -> Vec<String> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let lake = atlas_lake::Lake::open(lake.to_str().unwrap(), Default::default()).unwrap();
    let batches =
        rt.block_on(lake.query(
            "SELECT resource_type || '/' || id FROM resources WHERE NOT deleted ORDER BY 1",
        ))
        .unwrap();
    let mut out = Vec::new();
    for b in &batches {
        let a = atlas_lake::lake::text_column(b, 0).unwrap();
        out.extend(a.iter().flatten().map(str::to_owned));
    }
    out
}

#[test]
fn smart_sample_ndjson_and_bundles_agree() {
    let Some(shared) = shared() else {
        let msg = "MISSING: ../shared is not present; the real-data ingest test did not run";
        eprintln!("{msg}");
        assert!(std::env::var("CI").is_err(), "{msg}");
        return;
    };
    let set = shared.join("data/fhir/large/smart-generated-sample-data-R4");
    let source_md = std::fs::read_to_string(set.join("SOURCE.md")).unwrap();
    let expected = expected_counts(&source_md);
    assert_eq!(expected.values().sum::<i64>(), 189_111, "{expected:?}");

    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("ndjson");
    let out = run_ok(
        atlas(&lake)
            .args(["ingest", "--json"])
            .arg(set.join("ndjson")),
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["outcomes"]["stored"], 189_111,
        "{}",
        report["outcomes"]
    );
    assert_eq!(report["outcomes"]["quarantined"], 0);
    assert_eq!(live_counts(&lake), expected);

    // Twice: nothing changes.
    let before = stats_json(&lake);
    run_ok(atlas(&lake).arg("ingest").arg(set.join("ndjson")));
    assert_eq!(stats_json(&lake), before);

    // The same data from its transaction Bundles gives the same (type, id) set.
    let lake_b = dir.path().join("bundles");
    let out = run_ok(
        atlas(&lake_b)
            .args(["ingest", "--json"])
            .arg(set.join("bundles-R4.tar.gz")),
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let o = &report["outcomes"];
    assert_eq!(o["stored"], 189_111, "{o}");
    // Patient bundles repeat some Practitioners and Organizations, with other
    // content than the information bundles: every such line is a duplicate_id
    // (the later line wins); identical repeats are unchanged.
    assert_eq!(o["quarantined"], o["duplicates"], "{o}");
    assert_eq!(
        report["quarantine_by_reason"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["duplicate_id"],
        "{report}"
    );
    assert_eq!(
        o["unresolved_references"], 0,
        "every conditional reference resolves: {o}"
    );
    assert_eq!(live_counts(&lake_b), expected);
    assert_eq!(keys(&lake), keys(&lake_b));
}
