use std::io::Write;

use atlas_lake::IngestOptions;

use crate::{ingest, ingest_with, local_lake, rows, write};

const OBS: &str = r#"{"resourceType":"Observation","id":"o1","status":"final","code":{"text":"x"},"subject":{"reference":"Patient/p1"},"valueQuantity":{"value":16942.30,"unit":"kg"},"component":[{"valueQuantity":{"value":176.35499866729558}}]}"#;

fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Every quarantine kind, with exact expected counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_reconciles_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let long = format!(
        r#"{{"resourceType":"Patient","id":"big","text":{{"div":"{}"}}}}"#,
        "x".repeat(2000)
    );
    let mut bad: Vec<u8> = Vec::new();
    for line in [
        r#"{"resourceType":"Patient","id":"p1","birthDate":"1987-04-02"}"#,
        r#"{"resourceType": "Patient", "id": }"#,
        r#"[1,2,3]"#,
        r#"{"id":"x1"}"#,
        r#"{"resourceType":"Patinet","id":"x2"}"#,
        r#"{"resourceType":"Observation","status":"final"}"#,
        r#"{"resourceType":"Observation","id":"bad id!"}"#,
        r#"{"resourceType":"Patient","id":"p3","birthDate":19870402}"#,
    ] {
        bad.extend_from_slice(line.as_bytes());
        bad.push(b'\n');
    }
    bad.extend_from_slice(b"{\"resourceType\":\"Patient\",\"id\":\"\xff\xfe\"}\n");
    bad.extend_from_slice(b"\n   \t \n");
    for line in [
        OBS,
        r#"{"resourceType":"Patient","id":"dup","gender":"male"}"#,
        r#"{"resourceType":"Patient","id":"dup","gender":"female"}"#,
        r#"{"resourceType":"Patient","id":"same"}"#,
        r#"{"resourceType":"Patient","id":"same"}"#,
        long.as_str(),
    ] {
        bad.extend_from_slice(line.as_bytes());
        bad.push(b'\n');
    }
    bad.extend_from_slice(br#"{"resourceType":"Patient","id":"p9","name":[{"fa"#);
    let bad_path = write(dir.path(), "in/bad.ndjson", &bad);

    // A gzip member with three good lines, then garbage where the next member should be.
    let mut corrupt = gz(b"{\"resourceType\":\"Patient\",\"id\":\"c1\"}\n{\"resourceType\":\"Patient\",\"id\":\"c2\"}\n{\"resourceType\":\"Patient\",\"id\":\"c3\"}\n");
    corrupt.extend_from_slice(b"\x1f\x8bthis is not deflate data at all");
    let gz_path = write(dir.path(), "in/corrupt.ndjson.gz", &corrupt);

    let lake = local_lake(dir.path());
    let opts = IngestOptions {
        read: atlas_ingest::ReadOptions {
            max_line_bytes: 1000,
            ..Default::default()
        },
        ..Default::default()
    };
    let r = ingest_with(&lake, &[&bad_path, &gz_path], &opts).await;
    let o = &r.outcomes;
    assert_eq!(
        (
            o.lines_read,
            o.stored,
            o.unchanged,
            o.older_than_stored,
            o.quarantined,
            o.skipped
        ),
        (22, 7, 1, 0, 12, 2),
        "{o:?}"
    );
    // The manifest's SHA-256 is the reader's, over every byte of each file,
    // including what follows the corrupt gzip member.
    for (landed, path) in r.inputs.iter().zip([&bad_path, &gz_path]) {
        let (size, sha) = atlas_ingest::hash_file(path).unwrap();
        assert_eq!(
            (landed.bytes, &landed.sha256),
            (size, &sha),
            "{}",
            landed.name
        );
    }
    let expected = [
        "corrupt_gzip",
        "duplicate_id",
        "invalid_json",
        "invalid_utf8",
        "line_too_long",
        "malformed_id",
        "missing_id",
        "missing_resource_type",
        "not_object",
        "truncated_line",
        "unknown_resource_type",
        "wrong_type",
    ];
    assert_eq!(
        r.quarantine_by_reason
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        expected
    );
    assert!(r.quarantine_by_reason.values().all(|&n| n == 1));

    let q = rows(
        &lake,
        "SELECT reason, file, line, field FROM quarantine ORDER BY file, line",
    )
    .await;
    let bad_name = bad_path.display().to_string();
    assert!(
        q.contains(&format!("wrong_type|{bad_name}|8|birthDate")),
        "{q:#?}"
    );
    assert!(
        q.contains(&format!("duplicate_id|{bad_name}|13|id")),
        "{q:#?}"
    );
    assert!(
        q.contains(&format!("line_too_long|{bad_name}|17|NULL")),
        "{q:#?}"
    );
    assert!(
        q.contains(&format!("truncated_line|{bad_name}|18|NULL")),
        "{q:#?}"
    );
    assert!(
        q.iter()
            .any(|l| l.starts_with(&format!("corrupt_gzip|{}|4|", gz_path.display()))),
        "{q:#?}"
    );

    let s = atlas_lake::stats(&lake).await.unwrap();
    assert_eq!(s.resources["Patient"].live, 6);
    assert_eq!(s.resources["Observation"].live, 1);
    assert_eq!(s.quarantine.values().sum::<i64>(), 12);
    assert_eq!(s.batches.len(), 1);

    // The last duplicate won, and bytes are kept exactly.
    let dup = rows(&lake, "SELECT resource FROM resources WHERE id = 'dup'").await;
    assert_eq!(
        dup,
        vec![r#"{"resourceType":"Patient","id":"dup","gender":"female"}"#.to_owned()]
    );
    let obs = rows(
        &lake,
        "SELECT resource, patient_id, line FROM resources WHERE id = 'o1'",
    )
    .await;
    assert_eq!(obs, vec![format!("{OBS}|p1|12")]);
}

/// Newer versions replace older ones, older ones are kept out, identical ones are no-ops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_order_and_idempotency() {
    let dir = tempfile::tempdir().unwrap();
    let lake = local_lake(dir.path());
    let v = |n: u32, g: &str| {
        format!(
            r#"{{"resourceType":"Patient","id":"a","meta":{{"versionId":"{n}","lastUpdated":"2020-01-0{n}T00:00:00Z"}},"gender":"{g}"}}"#
        )
    };
    let f1 = write(dir.path(), "1.ndjson", format!("{}\n", v(1, "male")));
    let f2 = write(dir.path(), "2.ndjson", format!("{}\n", v(2, "female")));
    let f3 = write(
        dir.path(),
        "3.ndjson",
        format!(
            "{}\n{}\n",
            v(1, "male"),
            r#"{"resourceType":"Patient","id":"b"}"#
        ),
    );
    let f4 = write(
        dir.path(),
        "4.ndjson",
        format!(
            "{}\n{}\n",
            v(2, "female"),
            r#"{"resourceType":"Patient","id":"c"}"#
        ),
    );

    let r1 = ingest(&lake, &[&f1]).await;
    assert_eq!(r1.outcomes.stored, 1);
    let r2 = ingest(&lake, &[&f2]).await;
    assert_eq!(r2.outcomes.stored, 1, "newer version replaces (MERGE)");
    let r3 = ingest(&lake, &[&f3]).await;
    assert_eq!((r3.outcomes.stored, r3.outcomes.older_than_stored), (1, 1));
    let r4 = ingest(&lake, &[&f4]).await;
    assert_eq!((r4.outcomes.stored, r4.outcomes.unchanged), (1, 1));

    let a = rows(
        &lake,
        "SELECT version_id, resource, batch_id FROM resources WHERE id = 'a'",
    )
    .await;
    assert_eq!(a, vec![format!("2|{}|{}", v(2, "female"), r2.batch_id)]);

    // The same inputs again: the batch is recognised and nothing is written.
    let version_before = lake.table("resources").await.unwrap().unwrap().version();
    let again = ingest(&lake, &[&f2]).await;
    assert!(again.already_ingested);
    assert_eq!(again.outcomes, r2.outcomes);
    assert_eq!(
        lake.table("resources").await.unwrap().unwrap().version(),
        version_before
    );
    assert_eq!(atlas_lake::stats(&lake).await.unwrap().batches.len(), 4);
}

/// Bundles: urn:uuid references, conditional references resolved across files
/// of the run, DELETE entries as tombstones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_rewrite_resolve_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let lake = local_lake(dir.path());
    let pre = write(
        dir.path(),
        "0.ndjson",
        "{\"resourceType\":\"Condition\",\"id\":\"c9\",\"subject\":{\"reference\":\"Patient/p1\"}}\n",
    );
    ingest(&lake, &[&pre]).await;

    let tx = r#"{"resourceType":"Bundle","type":"transaction","entry":[
 {"fullUrl":"urn:uuid:11111111-1111-1111-1111-111111111111","resource":{"resourceType":"Patient","id":"11111111-1111-1111-1111-111111111111"},"request":{"method":"POST","url":"Patient"}},
 {"fullUrl":"urn:uuid:22222222-2222-2222-2222-222222222222","resource":{"resourceType":"Encounter","id":"22222222-2222-2222-2222-222222222222","subject":{"reference":"urn:uuid:11111111-1111-1111-1111-111111111111"},"participant":[{"individual":{"reference":"Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|777"}}],"serviceProvider":{"reference":"Organization?identifier=https://github.com/synthetichealth/synthea|nope"}},"request":{"method":"POST","url":"Encounter"}},
 {"request":{"method":"DELETE","url":"Condition/c9"}}
]}"#;
    let practitioners = r#"{"resourceType":"Bundle","type":"batch","entry":[{"fullUrl":"urn:uuid:pr","resource":{"resourceType":"Practitioner","id":"pr7","identifier":[{"system":"http://hl7.org/fhir/sid/us-npi","value":"777"}]}}]}"#;
    let a = write(dir.path(), "b/a.json", tx);
    let z = write(dir.path(), "b/z.json", practitioners);
    // A bare Group naming the patient by the fullUrl of its entry in another file.
    write(
        dir.path(),
        "b/group.json",
        r#"{"resourceType":"Group","id":"g1","type":"person","actual":true,"member":[{"entity":{"reference":"urn:uuid:11111111-1111-1111-1111-111111111111"}},{"entity":{"reference":"urn:uuid:99999999-0000-0000-0000-000000000000"}}]}"#,
    );
    let r = ingest(&lake, &[&dir.path().join("b")]).await;
    assert_eq!(
        (r.outcomes.lines_read, r.outcomes.stored, r.outcomes.deleted),
        (5, 5, 1),
        "{:?}",
        r.outcomes
    );
    assert_eq!(
        r.outcomes.unresolved_references, 2,
        "the Organization and one Group member are nowhere"
    );
    let g = rows(&lake, "SELECT resource FROM resources WHERE id = 'g1'").await;
    assert!(
        g[0].contains(r#"{"entity":{"reference":"Patient/11111111-1111-1111-1111-111111111111"}}"#),
        "{g:?}"
    );
    assert!(
        g[0].contains("urn:uuid:99999999"),
        "unresolved kept as written: {g:?}"
    );
    let enc = rows(
        &lake,
        "SELECT resource, patient_id, line, file FROM resources WHERE resource_type = 'Encounter'",
    )
    .await;
    assert_eq!(enc.len(), 1);
    let e = &enc[0];
    assert!(
        e.contains(r#""subject":{"reference":"Patient/11111111-1111-1111-1111-111111111111"}"#),
        "{e}"
    );
    assert!(e.contains(r#""reference":"Practitioner/pr7""#), "{e}");
    assert!(
        e.contains("Organization?identifier="),
        "unresolved kept as written: {e}"
    );
    assert!(
        e.ends_with(&format!(
            "|11111111-1111-1111-1111-111111111111|3|{}",
            a.display()
        )),
        "{e}"
    );
    let c = rows(
        &lake,
        "SELECT deleted, resource FROM resources WHERE id = 'c9'",
    )
    .await;
    assert_eq!(c, vec!["true|NULL".to_owned()]);
    let s = atlas_lake::stats(&lake).await.unwrap();
    assert_eq!(
        (
            s.resources["Condition"].live,
            s.resources["Condition"].deleted
        ),
        (0, 1)
    );
    let _ = z;
}

/// Many small commits give the same store as one big one, duplicates across
/// chunk boundaries included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_commits_equal_one_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = String::new();
    for i in 0..300 {
        data.push_str(&format!(
            "{{\"resourceType\":\"Observation\",\"id\":\"o{i}\",\"subject\":{{\"reference\":\"Patient/p{}\"}},\"valueQuantity\":{{\"value\":{i}.50}}}}\n",
            i % 17
        ));
    }
    data.push_str(
        "{\"resourceType\":\"Observation\",\"id\":\"o3\",\"valueQuantity\":{\"value\":99.999}}\n",
    );
    data.push_str("{\"resourceType\":\"Observation\",\"id\":\"o4\",\"subject\":{\"reference\":\"Patient/p4\"},\"valueQuantity\":{\"value\":4.50}}\n");
    let f = write(dir.path(), "obs.ndjson", &data);

    let one = local_lake(&dir.path().join("one"));
    let many = local_lake(&dir.path().join("many"));
    let r1 = ingest(&one, &[&f]).await;
    let small = IngestOptions {
        chunk_bytes: 4096,
        ..Default::default()
    };
    let r2 = ingest_with(&many, &[&f], &small).await;
    assert_eq!(r1.outcomes, r2.outcomes);
    assert_eq!(
        (
            r1.outcomes.stored,
            r1.outcomes.unchanged,
            r1.outcomes.quarantined,
            r1.outcomes.duplicates
        ),
        (300, 1, 1, 1)
    );
    let q = "SELECT resource_type, id, patient_id, batch_id, file, line, deleted, content_hash, resource FROM resources ORDER BY id";
    assert_eq!(rows(&one, q).await, rows(&many, q).await);
    let o3 = rows(&many, "SELECT resource FROM resources WHERE id = 'o3'").await;
    assert!(o3[0].contains("99.999"), "last copy wins across chunks");
    let dq = rows(&many, "SELECT reason, line FROM quarantine").await;
    assert_eq!(dq, vec!["duplicate_id|4".to_owned()]);
}

fn patients(dir: &std::path::Path, name: &str, gender: &str, meta: &str) -> std::path::PathBuf {
    let mut data = String::new();
    for n in 0..20 {
        data.push_str(&format!(
            "{{\"resourceType\":\"Patient\",\"id\":\"p{n}\",{meta}\"gender\":\"{gender}\"}}\n"
        ));
    }
    write(dir, name, data)
}

async fn genders(lake: &atlas_lake::Lake) -> Vec<String> {
    rows(
        lake,
        "SELECT DISTINCT CASE WHEN resource LIKE '%\"female\"%' THEN 'female' ELSE 'male' END FROM resources WHERE NOT deleted",
    )
    .await
}

/// Issue 18 part 6: a later batch without versionId or lastUpdated used to
/// lose to the stored copy whenever its content hash was lower (8 stored +
/// 12 "superseded"); the later batch wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_batch_wins_without_version_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let lake = local_lake(dir.path());
    let male = patients(dir.path(), "male.ndjson", "male", "");
    let female = patients(dir.path(), "female.ndjson", "female", "");
    assert_eq!(ingest(&lake, &[&male]).await.outcomes.stored, 20);
    let r = ingest(&lake, &[&female]).await;
    assert_eq!(
        (r.outcomes.stored, r.outcomes.older_than_stored),
        (20, 0),
        "{:?}",
        r.outcomes
    );
    assert_eq!(genders(&lake).await, vec!["female".to_owned()]);
    assert_eq!(
        rows(&lake, "SELECT count(*), count(DISTINCT id) FROM resources").await,
        vec!["20|20".to_owned()]
    );
    // And back again: still the later batch. (Not the first file itself:
    // the same bytes again are the same batch, already ingested.)
    let again = patients(dir.path(), "male-again.ndjson", "male", r#""active":true,"#);
    assert_eq!(ingest(&lake, &[&again]).await.outcomes.stored, 20);
    assert_eq!(genders(&lake).await, vec!["male".to_owned()]);
}

/// The same with `meta.lastUpdated` (and `versionId`) equal on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_batch_wins_when_version_metadata_ties() {
    let dir = tempfile::tempdir().unwrap();
    let lake = local_lake(dir.path());
    let same_time = r#""meta":{"lastUpdated":"2024-05-01T10:00:00Z"},"#;
    let male = patients(dir.path(), "male.ndjson", "male", same_time);
    let female = patients(dir.path(), "female.ndjson", "female", same_time);
    ingest(&lake, &[&male]).await;
    let r = ingest(&lake, &[&female]).await;
    assert_eq!(
        (r.outcomes.stored, r.outcomes.older_than_stored),
        (20, 0),
        "{:?}",
        r.outcomes
    );
    assert_eq!(genders(&lake).await, vec!["female".to_owned()]);

    let same_version = r#""meta":{"versionId":"3","lastUpdated":"2024-05-01T10:00:00Z"},"#;
    let lake = local_lake(&dir.path().join("v"));
    let male = patients(dir.path(), "v-male.ndjson", "male", same_version);
    let female = patients(dir.path(), "v-female.ndjson", "female", same_version);
    ingest(&lake, &[&male]).await;
    assert_eq!(ingest(&lake, &[&female]).await.outcomes.stored, 20);
    assert_eq!(genders(&lake).await, vec!["female".to_owned()]);
}

/// A copy with a lower versionId that arrives later loses, visibly: it is
/// counted as `older_than_stored`, in the report and in `stats`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_version_arriving_later_is_counted_older_than_stored() {
    let dir = tempfile::tempdir().unwrap();
    let lake = local_lake(dir.path());
    let v2 = patients(
        dir.path(),
        "v2.ndjson",
        "female",
        r#""meta":{"versionId":"2"},"#,
    );
    let v1 = patients(
        dir.path(),
        "v1.ndjson",
        "male",
        r#""meta":{"versionId":"1","lastUpdated":"2030-01-01T00:00:00Z"},"#,
    );
    ingest(&lake, &[&v2]).await;
    let r = ingest(&lake, &[&v1]).await;
    assert_eq!(
        (r.outcomes.stored, r.outcomes.older_than_stored),
        (0, 20),
        "{:?}",
        r.outcomes
    );
    assert_eq!(genders(&lake).await, vec!["female".to_owned()]);
    let s = atlas_lake::stats(&lake).await.unwrap();
    let last = s.batches.iter().find(|b| b.batch_id == r.batch_id).unwrap();
    assert_eq!(last.older_than_stored, 20);
    let json = serde_json::to_value(&s).unwrap();
    assert!(
        json["batches"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["older_than_stored"] == 20),
        "{json}"
    );
}

/// Replaying the raw landing area batch by batch, in the order the batches
/// table records, into a fresh lake gives the same store (there is no
/// `rebuild` command yet; this is what one would do).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_raw_batches_in_recorded_order_gives_the_same_store() {
    let dir = tempfile::tempdir().unwrap();
    let lake = local_lake(dir.path());
    let a = patients(dir.path(), "a.ndjson", "male", "");
    let b = patients(dir.path(), "b.ndjson", "female", "");
    let c = write(
        dir.path(),
        "c.ndjson",
        "{\"resourceType\":\"Patient\",\"id\":\"p3\",\"gender\":\"other\"}\n{\"resourceType\":\"Patient\",\"id\":\"p3\",\"gender\":\"unknown\"}\n{\"resourceType\":\"Patient\",\"id\":\"p4\",\"meta\":{\"versionId\":\"0\"},\"gender\":\"other\"}\n",
    );
    for f in [&a, &b, &c] {
        ingest(&lake, &[f.as_path()]).await;
    }
    let raw = rows(
        &lake,
        "SELECT raw_path, inputs FROM batches ORDER BY started_at, batch_id",
    )
    .await;
    assert_eq!(raw.len(), 3);
    let replay = local_lake(&dir.path().join("replay"));
    for r in &raw {
        let (_, inputs) = r.split_once('|').unwrap();
        let inputs: Vec<serde_json::Value> = serde_json::from_str(inputs).unwrap();
        let landed: Vec<std::path::PathBuf> = inputs
            .iter()
            .map(|i| {
                dir.path()
                    .join("lake")
                    .join(i["raw_path"].as_str().unwrap())
            })
            .collect();
        let paths: Vec<&std::path::Path> = landed.iter().map(|p| p.as_path()).collect();
        ingest(&replay, &paths).await;
    }
    let q = "SELECT resource_type, id, version_id, deleted, content_hash, resource FROM resources ORDER BY resource_type, id";
    let original = rows(&lake, q).await;
    assert_eq!(rows(&replay, q).await, original);
    assert!(
        original.iter().any(|r| r.contains("\"unknown\"")),
        "{original:?}"
    );
    assert!(
        original
            .iter()
            .any(|r| r.starts_with("Patient|p0|") && r.contains("female"))
    );
}
