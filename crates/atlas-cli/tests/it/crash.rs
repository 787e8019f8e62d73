//! Kill the ingest at chosen points (and at random moments), run it again,
//! and check that the lake ends exactly where an uninterrupted run ends.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::{atlas, run_ok, stats_json, synth};

/// Everything the lake holds except wall-clock timestamps, in a stable order.
fn snapshot(lake: &Path) -> (serde_json::Value, Vec<String>, Vec<String>) {
    let mut stats = stats_json(lake);
    for b in stats["batches"].as_array_mut().unwrap() {
        let b = b.as_object_mut().unwrap();
        b.remove("started_at");
        b.remove("finished_at");
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let lake = atlas_lake::Lake::open(lake.to_str().unwrap(), Default::default()).unwrap();
    let q = |sql: &str| {
        let rows = rt.block_on(lake.query_text(sql)).unwrap();
        rows.into_iter()
            .map(|r| {
                r.into_iter()
                    .map(|v| v.unwrap_or_else(|| "∅".into()))
                    .collect::<Vec<_>>()
                    .join("|")
            })
            .collect::<Vec<_>>()
    };
    let resources = q(
        "SELECT resource_type, id, version_id, CAST(last_updated AS VARCHAR) AS lu, patient_id, fhir_version, \
        is_synthetic, source, batch_id, file, line, deleted, content_hash, array_to_string(identifiers, ','), resource \
        FROM resources ORDER BY resource_type, id",
    );
    let quarantine = q(
        "SELECT batch_id, source, file, line, reason, message, resource_type, resource_id, field, byte_len, \
        encode(prefix, 'hex') FROM quarantine ORDER BY file, line, reason",
    );
    // Every row of a batch carries the batch's one start time, even across re-runs.
    let per_batch =
        q("SELECT batch_id, count(DISTINCT ingested_at) FROM resources GROUP BY batch_id");
    assert!(per_batch.iter().all(|r| r.ends_with("|1")), "{per_batch:?}");
    (stats, resources, quarantine)
}

fn dataset(dir: &Path) -> std::path::PathBuf {
    let data = synth(dir, 60, 5);
    std::fs::write(
        data.join("00-bad.ndjson"),
        "{\"resourceType\":\"Patient\",\"id\":\"x\",\"birthDate\":5}\n{oops\n",
    )
    .unwrap();
    std::fs::write(
        data.join("zz-bad.ndjson"),
        "[]\n{\"resourceType\":\"Nope\",\"id\":\"n\"}\n",
    )
    .unwrap();
    data
}

fn ingest_cmd(lake: &Path, data: &Path) -> Command {
    let mut c = atlas(lake);
    c.args(["ingest", "--chunk-mb", "1"]).arg(data);
    c
}

#[test]
fn killed_at_each_point_then_rerun_converges() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let clean = dir.path().join("clean");
    run_ok(&mut ingest_cmd(&clean, &data));
    let expected = snapshot(&clean);
    assert!(expected.1.len() > 1000, "enough rows for several chunks");

    for point in [
        "after_landing",
        "after_quarantine_commit",
        "before_append_commit",
        "after_chunk",
        "before_batch_commit",
    ] {
        let lake = dir.path().join(format!("crash-{point}"));
        let out = ingest_cmd(&lake, &data)
            .env("ATLAS_TEST_CRASH", point)
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "{point}: the run should have been killed"
        );
        run_ok(&mut ingest_cmd(&lake, &data));
        assert_eq!(
            snapshot(&lake),
            expected,
            "after a crash {point} and a re-run"
        );
        // And a third run is a no-op.
        let again = run_ok(&mut ingest_cmd(&lake, &data));
        assert!(String::from_utf8_lossy(&again.stderr).contains("already ingested"));
    }
}

#[test]
fn killed_at_random_moments_then_rerun_converges() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let clean = dir.path().join("clean");
    run_ok(&mut ingest_cmd(&clean, &data));
    let expected = snapshot(&clean);

    let lake = dir.path().join("killed");
    for delay_ms in [150u64, 600, 1200, 2500] {
        let mut child = ingest_cmd(&lake, &data)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        // Whatever state it left must be readable.
        stats_json(&lake);
    }
    run_ok(&mut ingest_cmd(&lake, &data));
    assert_eq!(snapshot(&lake), expected);
}
