//! The 615-patient SMART sample from `../shared`: view row counts equal
//! independent counts over the raw NDJSON, and a sample of rows equals what
//! the view runner (`CompiledView::run`, the oracle) gives for the same view.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::PathBuf;

use atlas_viewstore::{RefreshKind, RefreshOptions, ViewStore};

fn smart_ndjson() -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/fhir/large/smart-generated-sample-data-R4/ndjson");
    if root.is_dir() {
        Some(root)
    } else {
        eprintln!(
            "SKIPPED: {} is missing (the shared data lives next to the repository)",
            root.display()
        );
        None
    }
}

fn read_gz(p: &std::path::Path) -> String {
    let mut s = String::new();
    flate2::read::MultiGzDecoder::new(std::fs::File::open(p).unwrap())
        .read_to_string(&mut s)
        .unwrap();
    s
}

fn render(b: &arrow::array::RecordBatch, r: usize) -> String {
    (0..b.num_columns())
        .map(|c| arrow::util::display::array_value_to_string(b.column(c), r).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("|")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smart_sample_views_match_raw_counts_and_the_view_runner() {
    let Some(root) = smart_ndjson() else { return };
    let types = [
        "Patient",
        "Encounter",
        "Observation",
        "Condition",
        "MedicationRequest",
    ];
    let dir = tempfile::tempdir().unwrap();
    let lake = super::local_lake(dir.path());
    let files: Vec<PathBuf> = types
        .iter()
        .map(|t| root.join(format!("{t}.ndjson.gz")))
        .collect();
    let refs: Vec<&std::path::Path> = files.iter().map(PathBuf::as_path).collect();
    super::ingest(&lake, &refs).await;
    let store = ViewStore::new(lake);
    let reports = store
        .refresh(&[], &RefreshOptions::default())
        .await
        .unwrap();
    assert!(
        reports
            .iter()
            .all(|r| r.kind == RefreshKind::Full && r.errors == 0),
        "{reports:?}"
    );

    // Independent counts over the raw NDJSON.
    let mut raw: BTreeMap<&str, Vec<serde_json::Value>> = BTreeMap::new();
    let mut texts: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (t, f) in types.iter().zip(&files) {
        let lines: Vec<String> = read_gz(f)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect();
        raw.insert(
            t,
            lines
                .iter()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect(),
        );
        texts.insert(t, lines);
    }
    let components: usize = raw["Observation"]
        .iter()
        .map(|o| {
            o.get("component")
                .and_then(|c| c.as_array())
                .map_or(0, Vec::len)
        })
        .sum();
    let expected = [
        ("patient", raw["Patient"].len()),
        ("encounter", raw["Encounter"].len()),
        ("observation", raw["Observation"].len()),
        ("observation_component", components),
        ("condition", raw["Condition"].len()),
        ("medication_request", raw["MedicationRequest"].len()),
    ];
    assert_eq!(expected[2].1, 88_674, "SOURCE.md's Observation count");
    let status = store.status().await.unwrap();
    for (view, n) in expected {
        let s = status.iter().find(|s| s.name == view).unwrap();
        assert_eq!(s.rows, n as u64, "{view}: rows in the table vs raw count");
    }

    // A sample of rows per view equals the view runner over the raw resources.
    for b in atlas_ontology::builtin_views() {
        let entry = store.get(b.name).await.unwrap();
        let ty = entry.resource_type.clone();
        // Every 17th resource (by sorted id) until 1,000 rows.
        let mut ids: Vec<&str> = raw[ty.as_str()]
            .iter()
            .filter_map(|r| r["id"].as_str())
            .collect();
        ids.sort_unstable();
        let sample: BTreeSet<&str> = ids.iter().step_by(17).copied().collect();
        // The oracle parses the raw line text (exact decimals), as `atlas view run` does.
        let mut builder = entry.plan.row_builder();
        for (r, line) in raw[ty.as_str()].iter().zip(&texts[ty.as_str()]) {
            if r["id"].as_str().is_some_and(|id| sample.contains(id)) {
                entry.plan.append_json_text(line, &mut builder).unwrap();
            }
        }
        let oracle = builder.finish().unwrap();
        let mut want: Vec<String> = (0..oracle.num_rows()).map(|r| render(&oracle, r)).collect();
        want.truncate(1000);
        let key = entry.key_column.clone().unwrap();
        let wanted_ids: BTreeSet<String> = want
            .iter()
            .map(|r| r.split('|').next().unwrap().to_owned())
            .collect();
        let list = wanted_ids
            .iter()
            .map(|i| format!("'{i}'"))
            .collect::<Vec<_>>()
            .join(",");
        let df = store
            .sql(&format!("SELECT * FROM {} WHERE {key} IN ({list})", b.name))
            .await
            .unwrap();
        let mut got: Vec<String> = Vec::new();
        for batch in df.collect().await.unwrap() {
            got.extend((0..batch.num_rows()).map(|r| render(&batch, r)));
        }
        let mut want_all: Vec<String> = (0..oracle.num_rows())
            .map(|r| render(&oracle, r))
            .filter(|r| wanted_ids.contains(r.split('|').next().unwrap()))
            .collect();
        want_all.sort();
        got.sort();
        assert!(!got.is_empty(), "{}", b.name);
        assert_eq!(got.len(), want_all.len(), "{}: sampled row count", b.name);
        assert!(
            got == want_all,
            "{}: table rows differ from the view runner",
            b.name
        );
    }
}
