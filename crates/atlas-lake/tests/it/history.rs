//! What a connector pulling from a FHIR server needs from ingest: the
//! newest version of a key wins within a batch (REST `_history` Bundles list
//! the newest first), deletions carry the version their server reported and
//! are ordered by it, and conditional deletes resolve against the store.

use std::path::{Path, PathBuf};

use atlas_lake::{BatchReport, IngestOptions, Lake};

use crate::{ingest, ingest_with, local_lake, rows, write};

/// Patient `id` at version `v` (versionId and a lastUpdated growing with it).
fn patient(id: &str, v: u32, gender: &str) -> String {
    format!(
        r#"{{"resourceType":"Patient","id":"{id}","meta":{{"versionId":"{v}","lastUpdated":"2024-05-0{v}T10:00:00Z"}},"gender":"{gender}"}}"#
    )
}

/// A Bundle of type `ty`, one entry per line (entry `n` is on line `n + 2`).
fn bundle(ty: &str, entries: &[String]) -> String {
    format!(
        "{{\"resourceType\":\"Bundle\",\"type\":\"{ty}\",\"entry\":[\n{}\n]}}\n",
        entries.join(",\n")
    )
}

/// A `_history` entry: the resource, the PUT that made it, the server's answer.
fn history_entry(resource: &str, v: u32) -> String {
    let id = serde_json::from_str::<serde_json::Value>(resource).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    format!(
        r#"{{"fullUrl":"https://ehr.example.org/fhir/Patient/{id}","resource":{resource},"request":{{"method":"PUT","url":"Patient/{id}"}},"response":{{"status":"200","etag":"W/\"{v}\""}}}}"#
    )
}

/// A DELETE entry; `response` is the entry's `response` object, if any.
fn delete_entry(url: &str, response: Option<&str>) -> String {
    let response = response
        .map(|r| format!(r#","response":{r}"#))
        .unwrap_or_default();
    format!(r#"{{"request":{{"method":"DELETE","url":"{url}"}}{response}}}"#)
}

/// Ingests in one chunk and, in another lake, one event per chunk (so every
/// repeated key meets the copy an earlier chunk of the batch stored); both
/// must reconcile and give the same outcomes and store.
async fn ingest_both_ways(dir: &Path, name: &str, files: &[&Path]) -> (Lake, BatchReport) {
    let one = local_lake(&dir.join(format!("{name}-one")));
    let many = local_lake(&dir.join(format!("{name}-many")));
    let r1 = ingest(&one, files).await;
    let tiny = IngestOptions {
        chunk_bytes: 1,
        ..Default::default()
    };
    let r2 = ingest_with(&many, files, &tiny).await;
    assert_eq!(r1.outcomes, r2.outcomes, "{name}");
    assert_eq!(r1.quarantine_by_reason, r2.quarantine_by_reason, "{name}");
    let q = "SELECT resource_type, id, version_id, deleted, file, line, resource FROM resources ORDER BY resource_type, id";
    assert_eq!(rows(&one, q).await, rows(&many, q).await, "{name}");
    let q = "SELECT reason, line, resource_id FROM quarantine ORDER BY line";
    assert_eq!(rows(&one, q).await, rows(&many, q).await, "{name}");
    (one, r1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_bundle_keeps_the_newest_version_in_either_order() {
    let dir = tempfile::tempdir().unwrap();
    let versions = [
        patient("a", 1, "male"),
        patient("a", 2, "female"),
        patient("a", 3, "other"),
    ];
    let newest_first: Vec<String> = (0..3)
        .rev()
        .map(|i| history_entry(&versions[i], i as u32 + 1))
        .collect();
    let oldest_first: Vec<String> = (0..3)
        .map(|i| history_entry(&versions[i], i as u32 + 1))
        .collect();
    let desc = write(dir.path(), "desc.json", bundle("history", &newest_first));
    let asc = write(dir.path(), "asc.json", bundle("history", &oldest_first));
    for (name, file, older_lines) in [("desc", &desc, "3,4"), ("asc", &asc, "2,3")] {
        let (lake, r) = ingest_both_ways(dir.path(), name, &[file]).await;
        let o = &r.outcomes;
        assert_eq!(
            (
                o.lines_read,
                o.stored,
                o.quarantined,
                o.duplicates,
                o.older_than_stored
            ),
            (3, 1, 2, 2, 0),
            "{name}: {o:?}"
        );
        assert_eq!(
            rows(&lake, "SELECT version_id, deleted, resource FROM resources").await,
            vec![format!("3|false|{}", versions[2])],
            "{name}"
        );
        // The older copies are quarantined as duplicates, on their own lines.
        let q = rows(
            &lake,
            "SELECT reason, line, field, message FROM quarantine ORDER BY line",
        )
        .await;
        let lines: Vec<&str> = q.iter().map(|r| r.split('|').nth(1).unwrap()).collect();
        assert_eq!(lines.join(","), older_lines, "{name}: {q:#?}");
        for row in &q {
            assert!(row.starts_with("duplicate_id|"), "{name}: {row}");
            assert!(
                row.contains("|id|Patient/a has another copy"),
                "{name}: {row}"
            );
            assert!(
                row.contains("which wins: it is newer (versionId"),
                "{name}: {row}"
            );
        }
    }
}

/// Within a batch a deletion is ordered by its reported version like any
/// copy: it beats an older version whatever their lines, loses to a newer
/// one, and without versions the later line wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletions_take_part_in_the_batch_order() {
    let dir = tempfile::tempdir().unwrap();
    let etag = |v: u32| format!(r#"{{"etag":"W/\"{v}\""}}"#);
    let entry = |r: String| format!(r#"{{"resource":{r},"request":{{"method":"PUT","url":"x"}}}}"#);
    let plain = |id: &str| format!(r#"{{"resourceType":"Patient","id":"{id}"}}"#);
    let entries = [
        // c: version 2, then its deletion as version 3: deleted.
        entry(patient("c", 2, "male")),
        delete_entry("Patient/c", Some(&etag(3))),
        // d: deleted as version 3, then version 4: live.
        delete_entry("Patient/d", Some(&etag(3))),
        entry(patient("d", 4, "male")),
        // e: deleted as version 5, then (older) version 4: deleted.
        delete_entry("Patient/e", Some(&etag(5))),
        entry(patient("e", 4, "male")),
        // f and g: no versions anywhere, the later line wins.
        entry(plain("f")),
        delete_entry("Patient/f", None),
        delete_entry("Patient/g", None),
        entry(plain("g")),
        // k: a deletion without a version, then a copy with a lastUpdated
        // (before this batch started): the later line still wins.
        delete_entry("Patient/k", None),
        entry(patient("k", 1, "male")),
    ];
    let f = write(dir.path(), "tx.json", bundle("transaction", &entries));
    let (lake, r) = ingest_both_ways(dir.path(), "tx", &[&f]).await;
    let o = &r.outcomes;
    assert_eq!(
        (
            o.lines_read,
            o.stored,
            o.deleted,
            o.quarantined,
            o.duplicates
        ),
        (12, 6, 3, 6, 6),
        "{o:?}"
    );
    assert_eq!(
        rows(
            &lake,
            "SELECT id, deleted, version_id, line FROM resources ORDER BY id"
        )
        .await,
        vec![
            "c|true|3|3",
            "d|false|4|5",
            "e|true|5|6",
            "f|true|NULL|9",
            "g|false|NULL|11",
            "k|false|1|13",
        ]
    );
    assert_eq!(
        rows(&lake, "SELECT line FROM quarantine ORDER BY line").await,
        vec!["2", "4", "7", "8", "10", "12"]
    );
}

/// Against the store: a deletion older than the stored version is counted
/// `older_than_stored` and changes nothing; a newer one deletes, and its
/// tombstone keeps the reported version, so an older copy arriving later
/// stays out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletions_older_than_the_stored_version_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let lake = local_lake(dir.path());
    let v3 = write(
        dir.path(),
        "v3.ndjson",
        format!("{}\n{}\n", patient("a", 3, "male"), patient("b", 3, "male")),
    );
    ingest(&lake, &[&v3]).await;
    let state = |id: &'static str| {
        let lake = lake.clone();
        async move {
            rows(
                &lake,
                &format!(
                    "SELECT deleted, version_id, CAST(last_updated AS VARCHAR) FROM resources WHERE id = '{id}'"
                ),
            )
            .await
        }
    };

    let del2 = write(
        dir.path(),
        "del2.json",
        bundle(
            "history",
            &[delete_entry("Patient/a", Some(r#"{"etag":"W/\"2\""}"#))],
        ),
    );
    let r = ingest(&lake, &[&del2]).await;
    assert_eq!(
        (
            r.outcomes.lines_read,
            r.outcomes.stored,
            r.outcomes.deleted,
            r.outcomes.older_than_stored
        ),
        (1, 0, 0, 1),
        "{:?}",
        r.outcomes
    );
    assert_eq!(state("a").await, vec!["false|3|2024-05-03T10:00:00Z"]);

    let del4 = write(
        dir.path(),
        "del4.ndjson",
        // A Bulk `deleted` file: NDJSON, one Bundle per line; the absolute
        // URL of a REST server.
        bundle(
            "transaction",
            &[delete_entry(
                "https://ehr.example.org/fhir/Patient/a/_history/4",
                Some(r#"{"etag":"W/\"4\"","lastModified":"2024-05-04T12:00:00Z"}"#),
            )],
        )
        .replace('\n', "")
            + "\n",
    );
    let r = ingest(&lake, &[&del4]).await;
    assert_eq!(
        (
            r.outcomes.stored,
            r.outcomes.deleted,
            r.outcomes.older_than_stored
        ),
        (1, 1, 0),
        "{:?}",
        r.outcomes
    );
    assert_eq!(state("a").await, vec!["true|4|2024-05-04T12:00:00Z"]);

    // A deletion reporting only lastModified is ordered by time, not made
    // older than every versioned copy (b is at version 3 of May 3rd).
    let del_b = write(
        dir.path(),
        "del-b.json",
        bundle(
            "transaction",
            &[delete_entry(
                "Patient/b",
                Some(r#"{"lastModified":"2024-06-01T00:00:00Z"}"#),
            )],
        ),
    );
    let r = ingest(&lake, &[&del_b]).await;
    assert_eq!((r.outcomes.stored, r.outcomes.deleted), (1, 1));
    assert_eq!(state("b").await, vec!["true|NULL|2024-06-01T00:00:00Z"]);

    // An older copy replayed later (an overlapping `_since` window) stays
    // out; a newer one comes back.
    let replay = write(
        dir.path(),
        "replay.ndjson",
        format!(
            "{}\n{}\n",
            patient("a", 3, "female"),
            patient("b", 3, "female")
        ),
    );
    let r = ingest(&lake, &[&replay]).await;
    assert_eq!(
        (r.outcomes.stored, r.outcomes.older_than_stored),
        (0, 2),
        "{:?}",
        r.outcomes
    );
    let newer = write(
        dir.path(),
        "v5.ndjson",
        format!("{}\n", patient("a", 5, "female")),
    );
    assert_eq!(ingest(&lake, &[&newer]).await.outcomes.stored, 1);
    assert_eq!(state("a").await, vec!["false|5|2024-05-05T10:00:00Z"]);

    // Without a version a deletion applies, whatever is stored.
    let plain = write(
        dir.path(),
        "plain.json",
        bundle("transaction", &[delete_entry("/Patient/a", None)]),
    );
    let r = ingest(&lake, &[&plain]).await;
    assert_eq!((r.outcomes.stored, r.outcomes.deleted), (1, 1));
    assert_eq!(
        rows(
            &lake,
            "SELECT deleted, version_id FROM resources WHERE id = 'a'"
        )
        .await,
        vec!["true|NULL"]
    );
    // And as before versions were read, any later copy with a versionId
    // comes back after it (its lastUpdated, May 2024, is older than the
    // deletion's batch).
    let back = write(
        dir.path(),
        "v6.ndjson",
        format!("{}\n", patient("a", 6, "female")),
    );
    assert_eq!(ingest(&lake, &[&back]).await.outcomes.stored, 1);
    assert_eq!(state("a").await, vec!["false|6|2024-05-06T10:00:00Z"]);
}

fn patients_with_identifiers(dir: &Path, name: &str) -> PathBuf {
    let p = |id: &str, system: &str, value: &str| {
        format!(
            r#"{{"resourceType":"Patient","id":"{id}","identifier":[{{"system":"{system}","value":"{value}"}}]}}"#
        )
    };
    write(
        dir,
        name,
        [
            p("p1", "http://mrn", "123"),
            p("p2", "urn:a", "dup"),
            p("p3", "urn:b", "dup"),
            p("p4", "http://mrn", "456"),
        ]
        .join("\n")
            + "\n",
    )
}

/// Conditional deletes, from a Bundle file (the reader's identifier index,
/// which holds the store's identifiers, resolves them) and from Bulk-style
/// NDJSON (not pre-scanned: the store resolves them when the chunk is
/// prepared): the same outcomes either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_deletes_resolve_against_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let entries = [
        delete_entry("Patient?identifier=http%3A%2F%2Fmrn%7C123", None),
        delete_entry("Patient?identifier=http://mrn|nope", None),
        delete_entry("Patient?identifier=dup", None),
        delete_entry("Patient?name=smith", None),
        delete_entry("https://ehr.example.org/fhir/Patient?identifier=456", None),
    ];
    let json = bundle("transaction", &entries);
    let ndjson: String = entries
        .iter()
        .map(|e| bundle("transaction", std::slice::from_ref(e)).replace('\n', "") + "\n")
        .collect();
    for (name, content) in [("deleted.json", json), ("deleted.ndjson", ndjson)] {
        let lake = local_lake(&dir.path().join(format!("lake-{name}")));
        let pats = patients_with_identifiers(dir.path(), "patients.ndjson");
        ingest(&lake, &[&pats]).await;
        let f = write(dir.path(), name, &content);
        let r = ingest(&lake, &[&f]).await;
        let o = &r.outcomes;
        assert_eq!(
            (o.lines_read, o.stored, o.deleted, o.quarantined),
            (5, 2, 2, 3),
            "{name}: {o:?}"
        );
        assert_eq!(
            r.quarantine_by_reason
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>(),
            [
                "ambiguous_conditional_delete=1",
                "unresolved_conditional_delete=1",
                "unsupported_entry=1"
            ],
            "{name}"
        );
        assert_eq!(
            rows(&lake, "SELECT id, deleted FROM resources ORDER BY id").await,
            ["p1|true", "p2|false", "p3|false", "p4|true"],
            "{name}"
        );
        let q = rows(
            &lake,
            "SELECT reason, resource_type, field, message FROM quarantine ORDER BY reason",
        )
        .await;
        let unresolved = q
            .iter()
            .find(|r| r.starts_with("unresolved_conditional_delete|Patient|request.url|"))
            .unwrap_or_else(|| panic!("{name}: {q:#?}"));
        assert!(
            unresolved.contains("entry ")
                && unresolved.contains("`Patient?identifier=http://mrn|nope`"),
            "{name}: {unresolved}"
        );
        let ambiguous = q
            .iter()
            .find(|r| r.starts_with("ambiguous_conditional_delete|Patient|request.url|"))
            .unwrap_or_else(|| panic!("{name}: {q:#?}"));
        assert!(
            ambiguous.contains("matches 2 ") && ambiguous.contains("Patient?identifier=dup"),
            "{name}: {ambiguous}"
        );
        assert!(
            q.iter()
                .any(|r| r.starts_with("unsupported_entry|") && r.contains("`name`")),
            "{name}: {q:#?}"
        );
    }
}

/// A conditional delete whose target arrives earlier in the same batch (and
/// chunk), from an input that is not pre-scanned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_delete_of_a_resource_of_the_same_batch() {
    let dir = tempfile::tempdir().unwrap();
    let pats = patients_with_identifiers(dir.path(), "a-patients.ndjson");
    let del = write(
        dir.path(),
        "b-deleted.ndjson",
        bundle(
            "transaction",
            &[delete_entry("Patient?identifier=http://mrn|456", None)],
        )
        .replace('\n', "")
            + "\n",
    );
    let (lake, r) = ingest_both_ways(dir.path(), "same", &[&pats, &del]).await;
    assert_eq!(
        (
            r.outcomes.stored,
            r.outcomes.deleted,
            r.outcomes.quarantined
        ),
        // p4's copy loses to its deletion on a later line: a duplicate.
        (4, 1, 1),
        "{:?}",
        r.outcomes
    );
    assert_eq!(
        rows(&lake, "SELECT id FROM resources WHERE deleted").await,
        ["p4"]
    );
}
