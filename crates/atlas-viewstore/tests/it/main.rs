//! Integration tests for materialized views (one test binary for the crate):
//! full builds, incremental refresh after inserts, updates and deletes (must
//! equal a full rebuild), user views, read-only SQL, and the 615-patient
//! SMART data from `../shared` checked against independent counts and the
//! view runner.

mod shared_data;
mod sql_functions;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

use atlas_ingest::collect_inputs;
use atlas_lake::{IngestOptions, Lake, Progress};
use atlas_viewstore::{RefreshKind, RefreshOptions, ViewStore};

pub fn local_lake(dir: &Path) -> Lake {
    Lake::open(dir.join("lake").to_str().unwrap(), Default::default()).unwrap()
}

pub async fn ingest(lake: &Lake, paths: &[&Path]) {
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    let set = collect_inputs(&names, &mut std::io::empty()).unwrap();
    let report = atlas_lake::ingest(
        lake,
        &set.inputs,
        &IngestOptions::default(),
        &Progress::default(),
    )
    .await
    .unwrap();
    assert!(report.outcomes.reconciles(), "{:?}", report.outcomes);
}

fn synth(dir: &Path, patients: usize, seed: u64) -> PathBuf {
    let out = dir.join(format!("synth-{seed}"));
    let opts = atlas_synth::SynthOptions {
        patients,
        seed,
        ..Default::default()
    };
    atlas_synth::generate(&opts, &out, &AtomicU64::new(0)).unwrap();
    out
}

/// Every row of a view, each rendered `a|b|c`, sorted: tables compare as multisets.
pub async fn view_rows(store: &ViewStore, view: &str) -> Vec<String> {
    let df = store.sql(&format!("SELECT * FROM {view}")).await.unwrap();
    let batches = df.collect().await.unwrap();
    let mut out = Vec::new();
    for b in &batches {
        for r in 0..b.num_rows() {
            out.push(
                (0..b.num_columns())
                    .map(|c| {
                        arrow::util::display::array_value_to_string(b.column(c), r)
                            .unwrap_or_default()
                    })
                    .collect::<Vec<_>>()
                    .join("|"),
            );
        }
    }
    out.sort();
    out
}

fn lines_of(dir: &Path, ty: &str) -> Vec<String> {
    std::fs::read_to_string(dir.join(format!("{ty}.ndjson")))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

const VIEWS: [&str; 6] = [
    "patient",
    "encounter",
    "observation",
    "observation_component",
    "condition",
    "medication_request",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_refresh_equals_full_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path(), 40, 7);
    let lake = local_lake(dir.path());
    ingest(&lake, &[&data]).await;
    let store = ViewStore::new(lake.clone());
    let first = store
        .refresh(&[], &RefreshOptions::default())
        .await
        .unwrap();
    assert_eq!(first.len(), 6);
    assert!(
        first.iter().all(|r| r.kind == RefreshKind::Full),
        "{first:?}"
    );
    let obs_before = view_rows(&store, "observation").await.len();
    assert_eq!(obs_before, lines_of(&data, "Observation").len());

    // Nothing changed: every view is up to date.
    let again = store
        .refresh(&[], &RefreshOptions::default())
        .await
        .unwrap();
    assert!(
        again.iter().all(|r| r.kind == RefreshKind::UpToDate),
        "{again:?}"
    );

    // A delta: updated observations (a newer versionId, a new value), new
    // observations and patients, deleted observations and conditions.
    let obs = lines_of(&data, "Observation");
    let cond = lines_of(&data, "Condition");
    let mut delta = String::new();
    let mut updated = Vec::new();
    for line in obs.iter().take(5) {
        let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
        v["meta"]["versionId"] = "99".into();
        v["meta"]["lastUpdated"] = "2030-01-01T00:00:00Z".into();
        v["status"] = "amended".into();
        updated.push(v["id"].as_str().unwrap().to_owned());
        delta.push_str(&serde_json::to_string(&v).unwrap());
        delta.push('\n');
    }
    for (i, line) in obs.iter().skip(5).take(3).enumerate() {
        let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
        v["id"] = format!("new-obs-{i}").into();
        delta.push_str(&serde_json::to_string(&v).unwrap());
        delta.push('\n');
    }
    delta.push_str(
        r#"{"resourceType":"Patient","id":"new-patient-1","gender":"other","birthDate":"2001-07-04"}"#,
    );
    delta.push('\n');
    let delta_file = dir.path().join("delta/changes.ndjson");
    std::fs::create_dir_all(delta_file.parent().unwrap()).unwrap();
    std::fs::write(&delta_file, delta).unwrap();
    let deleted_obs: serde_json::Value = serde_json::from_str(&obs[10]).unwrap();
    let deleted_cond: serde_json::Value = serde_json::from_str(&cond[0]).unwrap();
    let bundle = serde_json::json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "DELETE", "url": format!("Observation/{}", deleted_obs["id"].as_str().unwrap())}},
        {"request": {"method": "DELETE", "url": format!("Condition/{}", deleted_cond["id"].as_str().unwrap())}}]});
    std::fs::write(dir.path().join("delta/deletes.json"), bundle.to_string()).unwrap();
    ingest(&lake, &[&dir.path().join("delta")]).await;

    let inc = store
        .refresh(&[], &RefreshOptions::default())
        .await
        .unwrap();
    let by_name = |n: &str| inc.iter().find(|r| r.name == n).unwrap().clone();
    for v in [
        "observation",
        "observation_component",
        "patient",
        "condition",
    ] {
        assert_eq!(by_name(v).kind, RefreshKind::Incremental, "{v}: {inc:?}");
    }
    let o = by_name("observation");
    assert_eq!(o.resources_read, 9, "5 updated + 3 new + 1 deleted: {o:?}");
    assert_eq!(o.rows_removed, 6, "5 updated + 1 deleted: {o:?}");
    // Six rows of thousands: marked deleted by a deletion vector, no file
    // rewritten; only the 8 new rows are written.
    assert_eq!(o.deletion_vectors, 1, "{o:?}");
    assert_eq!(o.files_removed, 0, "{o:?}");
    assert_eq!(o.rows_written, 5 + 3, "{o:?}");
    assert_eq!(by_name("condition").deletion_vectors, 1, "{inc:?}");
    assert_eq!(
        store
            .status()
            .await
            .unwrap()
            .iter()
            .find(|s| s.name == "observation")
            .unwrap()
            .rows,
        obs_before as u64 + 3 - 1,
        "status counts live rows"
    );
    let incremental: Vec<Vec<String>> = {
        let mut all = Vec::new();
        for v in VIEWS {
            all.push(view_rows(&store, v).await);
        }
        all
    };
    assert_eq!(incremental[2].len(), obs_before + 3 - 1);
    assert!(
        incremental[2]
            .iter()
            .filter(|r| r.contains("amended"))
            .count()
            >= 5
    );
    assert!(
        !incremental[2]
            .iter()
            .any(|r| r.starts_with(&format!("{}|", deleted_obs["id"].as_str().unwrap())))
    );

    // A second delta over rows that already have a deletion vector: two of
    // the updated observations change again (their rows now sit in the
    // first refresh's file) and a third of the original observations go,
    // so the original file is past the compaction threshold and rewritten.
    let mut delta = String::new();
    for line in obs.iter().take(2) {
        let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
        v["meta"]["versionId"] = "100".into();
        v["status"] = "corrected".into();
        delta.push_str(&serde_json::to_string(&v).unwrap());
        delta.push('\n');
    }
    std::fs::create_dir_all(dir.path().join("delta2")).unwrap();
    std::fs::write(dir.path().join("delta2/changes.ndjson"), delta).unwrap();
    let gone: Vec<serde_json::Value> = obs
        .iter()
        .skip(20)
        .step_by(3)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            serde_json::json!({"request": {"method": "DELETE", "url": format!("Observation/{}", v["id"].as_str().unwrap())}})
        })
        .collect();
    let bundle =
        serde_json::json!({"resourceType": "Bundle", "type": "transaction", "entry": gone});
    std::fs::write(dir.path().join("delta2/deletes.json"), bundle.to_string()).unwrap();
    ingest(&lake, &[&dir.path().join("delta2")]).await;
    let inc2 = store
        .refresh(&[], &RefreshOptions::default())
        .await
        .unwrap();
    let o = inc2.iter().find(|r| r.name == "observation").unwrap();
    assert_eq!(o.kind, RefreshKind::Incremental, "{inc2:?}");
    assert_eq!(o.rows_removed, 2 + gone.len() as u64, "{o:?}");
    assert!(o.files_removed >= 1, "compacted: {o:?}");
    let incremental: Vec<Vec<String>> = {
        let mut all = Vec::new();
        for v in VIEWS {
            all.push(view_rows(&store, v).await);
        }
        all
    };
    assert_eq!(incremental[2].len(), obs_before + 3 - 1 - gone.len());
    assert_eq!(
        incremental[2]
            .iter()
            .filter(|r| r.contains("corrected"))
            .count(),
        2
    );

    let full = store
        .refresh(
            &[],
            &RefreshOptions {
                full: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(full.iter().all(|r| r.kind == RefreshKind::Full));
    for (i, v) in VIEWS.iter().enumerate() {
        let rebuilt = view_rows(&store, v).await;
        assert_eq!(
            incremental[i].len(),
            rebuilt.len(),
            "{v}: incremental and full row counts differ"
        );
        assert!(
            incremental[i] == rebuilt,
            "{v}: incremental != full rebuild"
        );
    }
    let status = store.status().await.unwrap();
    assert!(
        status.iter().all(|s| s.lag_versions == Some(0)),
        "{status:?}"
    );

    // A build that spills to several chunk files merges them: the same
    // rows, in files whose patient ranges do not overlap, each sorted.
    let small = store
        .refresh(
            &[],
            &RefreshOptions {
                full: true,
                file_rows: 300,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let o = small.iter().find(|r| r.name == "observation").unwrap();
    assert!(o.files_added >= 3, "{o:?}");
    assert_eq!(view_rows(&store, "observation").await, incremental[2]);
    let table = deltalake::open_table(
        url::Url::from_directory_path(dir.path().join("lake/views/observation")).unwrap(),
    )
    .await
    .unwrap();
    let mut files: Vec<Vec<String>> = Vec::new();
    for f in table.snapshot().unwrap().log_data().iter() {
        let path = dir
            .path()
            .join("lake/views/observation")
            .join(f.object_store_path().as_ref());
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            std::fs::File::open(&path).unwrap(),
        )
        .unwrap()
        .build()
        .unwrap();
        let mut patients = Vec::new();
        for b in reader {
            let b = b.unwrap();
            let col = b.column(b.schema().index_of("patient_id").unwrap()).clone();
            for r in 0..b.num_rows() {
                patients.push(arrow::util::display::array_value_to_string(&col, r).unwrap());
            }
        }
        assert!(patients.is_sorted(), "{path:?} is not sorted by patient");
        files.push(patients);
    }
    assert_eq!(files.len() as u64, o.files_added);
    files.sort();
    for w in files.windows(2) {
        assert!(
            w[0].last() <= w[1].first(),
            "patient ranges of two files overlap"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_views_create_refresh_change_and_drop() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path(), 10, 3);
    let lake = local_lake(dir.path());
    ingest(&lake, &[&data]).await;
    let store = ViewStore::new(lake.clone());

    let bad = r#"{"resourceType": "ViewDefinition", "name": "hr", "resource": "Observation",
        "select": [{"column": [{"name": "id", "path": "getResourceKey()"},
                               {"name": "v", "path": "value.ofType(Quantity).valuee"}]}]}"#;
    let err = store
        .create(bad, None, false)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("select[0].column[1].path"), "{err}");
    assert!(store.list().await.unwrap().iter().all(|v| v.name != "hr"));

    let hr = r#"{"resourceType": "ViewDefinition", "name": "hr", "resource": "Observation",
        "where": [{"path": "code.coding.where(code = '8867-4').exists()"}],
        "select": [{"column": [{"name": "id", "path": "getResourceKey()"},
                               {"name": "patient_id", "path": "subject.getReferenceKey(Patient)"},
                               {"name": "bpm", "path": "value.ofType(Quantity).value", "type": "decimal"}]}]}"#;
    let v = store.create(hr, None, false).await.unwrap();
    assert_eq!(v.key_column.as_deref(), Some("id"));
    assert!(
        store.create(hr, None, false).await.is_err(),
        "exists without --replace"
    );
    let r = store
        .refresh(&["hr".into()], &RefreshOptions::default())
        .await
        .unwrap();
    assert_eq!(r[0].kind, RefreshKind::Full);
    let n = r[0].rows_written;
    assert!(n > 0);
    assert!(store.create(r#"{"name": "patient", "resource": "Patient", "select": [{"column": [{"name": "id", "path": "id"}]}]}"#, None, true).await.is_err(), "built-in names are reserved");

    // A changed definition forces a full rebuild with the new columns.
    let hr2 = hr.replace(r#""name": "bpm""#, r#""name": "beats_per_minute""#);
    store.create(&hr2, None, true).await.unwrap();
    let status = store.status().await.unwrap();
    let s = status.iter().find(|s| s.name == "hr").unwrap();
    assert_eq!(
        s.store_version, None,
        "old definition's state does not count"
    );
    let r = store
        .refresh(&["hr".into()], &RefreshOptions::default())
        .await
        .unwrap();
    assert_eq!((r[0].kind, r[0].rows_written), (RefreshKind::Full, n));
    let df = store
        .sql("SELECT count(*) AS n, min(beats_per_minute) > 0 AS positive FROM hr")
        .await
        .unwrap();
    let rows = df.collect().await.unwrap();
    assert_eq!(
        arrow::util::display::array_value_to_string(rows[0].column(0), 0).unwrap(),
        n.to_string()
    );

    store.drop_view("hr").await.unwrap();
    assert!(store.list().await.unwrap().iter().all(|v| v.name != "hr"));
    assert!(!dir.path().join("lake/views/hr").exists());
    assert!(store.drop_view("patient").await.is_err(), "built-ins stay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_is_read_only_and_joins_views() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path(), 10, 5);
    let lake = local_lake(dir.path());
    ingest(&lake, &[&data]).await;
    let store = ViewStore::new(lake.clone());
    store
        .refresh(&[], &RefreshOptions::default())
        .await
        .unwrap();
    for q in [
        "DELETE FROM patient",
        "INSERT INTO patient SELECT * FROM patient",
        "CREATE TABLE x AS SELECT 1",
        "DROP TABLE patient",
        "COPY patient TO '/tmp/x.parquet'",
        "SET datafusion.execution.batch_size = 1",
    ] {
        let err = store
            .sql(q)
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("read-only"), "{q}: {err}");
    }
    let df = store
        .sql(
            "SELECT count(*) FROM observation o JOIN patient p ON o.patient_id = p.id \
             JOIN encounter e ON o.encounter_id = e.id AND e.patient_id = p.id",
        )
        .await
        .unwrap();
    let joined = df.collect().await.unwrap();
    let n = arrow::util::display::array_value_to_string(joined[0].column(0), 0).unwrap();
    assert_eq!(
        n,
        lines_of(&data, "Observation").len().to_string(),
        "every observation joins its patient and encounter"
    );
    // The store itself is queryable next to the views.
    let df = store
        .sql("SELECT count(*) FROM resources r JOIN patient p ON r.patient_id = p.id WHERE r.resource_type = 'Condition'")
        .await
        .unwrap();
    let n =
        arrow::util::display::array_value_to_string(df.collect().await.unwrap()[0].column(0), 0)
            .unwrap();
    assert_eq!(n, lines_of(&data, "Condition").len().to_string());
}

async fn medication_display(store: &ViewStore, id: &str) -> String {
    let df = store
        .sql(&format!(
            "SELECT coalesce(medication_code, '-') || '|' || coalesce(medication_display, '-') \
             FROM medication_request WHERE id = '{id}'"
        ))
        .await
        .unwrap();
    let b = df.collect().await.unwrap();
    assert_eq!(b.iter().map(|b| b.num_rows()).sum::<usize>(), 1, "{id}");
    arrow::util::display::array_value_to_string(b[0].column(0), 0).unwrap()
}

/// `medication_request` takes the code and display from the referenced
/// Medication in the lake, and a changed Medication refreshes the rows that
/// point to it (views that resolve references are rebuilt in full).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn medication_request_resolves_medications_in_the_lake() {
    let dir = tempfile::tempdir().unwrap();
    let lake = local_lake(dir.path());
    let data = dir.path().join("in/batch1.ndjson");
    std::fs::create_dir_all(data.parent().unwrap()).unwrap();
    std::fs::write(
        &data,
        concat!(
            r#"{"resourceType":"Patient","id":"p1"}"#,
            "\n",
            r#"{"resourceType":"Medication","id":"med1","code":{"coding":[{"system":"http://www.nlm.nih.gov/research/umls/rxnorm","code":"197361","display":"Amlodipine 5 MG"}]}}"#,
            "\n",
            r#"{"resourceType":"MedicationRequest","id":"mr1","status":"active","intent":"order","subject":{"reference":"Patient/p1"},"medicationReference":{"reference":"Medication/med1"}}"#,
            "\n",
            r#"{"resourceType":"MedicationRequest","id":"mr2","status":"active","intent":"order","subject":{"reference":"Patient/p1"},"medicationCodeableConcept":{"text":"Aspirin"}}"#,
            "\n",
            r#"{"resourceType":"MedicationRequest","id":"mr3","status":"active","intent":"order","subject":{"reference":"Patient/p1"},"medicationReference":{"reference":"Medication/missing"}}"#,
            "\n",
        ),
    )
    .unwrap();
    ingest(&lake, &[&data]).await;
    let store = ViewStore::new(lake.clone());
    store
        .refresh(&[], &RefreshOptions::default())
        .await
        .unwrap();
    assert_eq!(
        medication_display(&store, "mr1").await,
        "197361|Amlodipine 5 MG"
    );
    assert_eq!(medication_display(&store, "mr2").await, "-|Aspirin");
    assert_eq!(medication_display(&store, "mr3").await, "-|-");

    // One line ingested as its own batch, then medication_request refreshed.
    let change = |batch: &'static str, line: &'static str| {
        let (lake, store, dir) = (&lake, &store, dir.path());
        async move {
            let delta = dir.join(batch).join("batch.ndjson");
            std::fs::create_dir_all(delta.parent().unwrap()).unwrap();
            std::fs::write(&delta, line).unwrap();
            ingest(lake, &[&delta]).await;
            store
                .refresh(
                    &["medication_request".to_string()],
                    &RefreshOptions::default(),
                )
                .await
                .unwrap()
        }
    };

    // Only the Medication changes; the request pointing to it follows.
    let reports = change(
        "in2",
        r#"{"resourceType":"Medication","id":"med1","meta":{"versionId":"2"},"code":{"coding":[{"code":"197361","display":"Amlodipine 5 MG Oral Tablet"}]}}"#,
    )
    .await;
    assert_eq!(reports[0].kind, RefreshKind::Full, "{reports:?}");
    assert_eq!(
        medication_display(&store, "mr1").await,
        "197361|Amlodipine 5 MG Oral Tablet"
    );

    // Only a request changes (no Medication did): an incremental refresh,
    // still resolving against the lake's Medications.
    let reports = change(
        "in3",
        r#"{"resourceType":"MedicationRequest","id":"mr2","meta":{"versionId":"2"},"status":"stopped","intent":"order","subject":{"reference":"Patient/p1"},"medicationReference":{"reference":"Medication/med1"}}"#,
    )
    .await;
    assert_eq!(reports[0].kind, RefreshKind::Incremental, "{reports:?}");
    assert_eq!(
        medication_display(&store, "mr2").await,
        "197361|Amlodipine 5 MG Oral Tablet"
    );
    assert_eq!(
        medication_display(&store, "mr1").await,
        "197361|Amlodipine 5 MG Oral Tablet"
    );
}
