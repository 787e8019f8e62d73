//! The change feed: every store commit's creates, updates and deletes,
//! told apart from rows a MERGE merely copied, resumable from any event,
//! and a scan (said so) once the log is cleaned up.

use std::path::Path;

use atlas_lake::changes::{ReadOptions, parse_event_id};
use atlas_lake::{ChangeEvent, ChangeFeed, ChangeOp, IngestOptions, Lake};

use crate::{ingest, ingest_with, local_lake, write};

fn patient(id: &str, v: u32, gender: &str) -> String {
    format!(
        r#"{{"resourceType":"Patient","id":"{id}","meta":{{"versionId":"{v}","lastUpdated":"2024-05-0{v}T10:00:00Z"}},"gender":"{gender}"}}"#
    )
}

fn observation(id: &str, patient: &str, value: u32) -> String {
    format!(
        r#"{{"resourceType":"Observation","id":"{id}","status":"final","code":{{"text":"hr"}},"subject":{{"reference":"Patient/{patient}"}},"valueQuantity":{{"value":{value}}}}}"#
    )
}

async fn all(lake: &Lake, since: i64) -> Vec<ChangeEvent> {
    let feed = ChangeFeed::new(lake.clone());
    let page = feed
        .read(
            since,
            &ReadOptions {
                with_resources: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(page.fallback.is_none(), "{:?}", page.fallback);
    assert_eq!(page.until, page.latest);
    page.events
}

/// `(type, id, op, patient)` of each event.
fn summary(events: &[ChangeEvent]) -> Vec<(String, String, ChangeOp, Option<String>)> {
    events
        .iter()
        .map(|e| {
            (
                e.resource_type.clone(),
                e.id.clone(),
                e.op,
                e.patient.clone(),
            )
        })
        .collect()
}

fn key(
    t: &str,
    id: &str,
    op: ChangeOp,
    p: Option<&str>,
) -> (String, String, ChangeOp, Option<String>) {
    (t.into(), id.into(), op, p.map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_updates_and_deletes_are_told_apart() {
    let dir = tempfile::tempdir().unwrap();
    let lake = local_lake(dir.path());
    let first = write(
        dir.path(),
        "a.ndjson",
        [
            patient("p1", 1, "male"),
            patient("p2", 1, "female"),
            observation("o1", "p1", 60),
            observation("o2", "p2", 70),
        ]
        .join("\n"),
    );
    ingest(&lake, &[&first]).await;
    let feed = ChangeFeed::new(lake.clone());
    let after_first = feed.latest_version().await.unwrap().unwrap();
    let created = all(&lake, -1).await;
    let mut got = summary(&created);
    got.sort();
    assert_eq!(
        got,
        vec![
            key("Observation", "o1", ChangeOp::Create, Some("p1")),
            key("Observation", "o2", ChangeOp::Create, Some("p2")),
            key("Patient", "p1", ChangeOp::Create, Some("p1")),
            key("Patient", "p2", ChangeOp::Create, Some("p2")),
        ]
    );
    // Every event carries its stored JSON, its batch and a unique id.
    let ids: std::collections::BTreeSet<String> = created.iter().map(|e| e.event_id()).collect();
    assert_eq!(ids.len(), created.len());
    assert!(
        created
            .iter()
            .all(|e| e.resource.is_some() && !e.batch_id.is_empty())
    );

    // p1 changes, o2 is deleted (a transaction Bundle), p2 and o1 are
    // untouched although a MERGE rewrites the files that hold them.
    let bundle = format!(
        r#"{{"resourceType":"Bundle","type":"transaction","entry":[{{"resource":{},"request":{{"method":"PUT","url":"Patient/p1"}}}},{{"request":{{"method":"DELETE","url":"Observation/o2"}}}}]}}"#,
        patient("p1", 2, "other")
    );
    let second = write(dir.path(), "b.json", bundle);
    ingest(&lake, &[&second]).await;
    let changed = all(&lake, after_first).await;
    let mut got = summary(&changed);
    got.sort();
    assert_eq!(
        got,
        vec![
            key("Observation", "o2", ChangeOp::Delete, Some("p2")),
            key("Patient", "p1", ChangeOp::Update, Some("p1")),
        ],
        "{changed:#?}"
    );
    let p1 = changed.iter().find(|e| e.id == "p1").unwrap();
    assert_eq!(p1.version_id.as_deref(), Some("2"));
    assert!(p1.resource.as_deref().unwrap().contains("other"));
    let o2 = changed.iter().find(|e| e.id == "o2").unwrap();
    assert!(o2.resource.is_none(), "a delete carries no resource");
    assert!(changed.iter().all(|e| e.store_version > after_first));

    // The same feed from the start holds both batches, in commit order.
    let everything = all(&lake, -1).await;
    assert_eq!(everything.len(), 6);
    assert!(
        everything
            .windows(2)
            .all(|w| (w[0].store_version, w[0].seq) < (w[1].store_version, w[1].seq))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_a_later_chunk_of_the_same_batch_merely_copies_are_not_changes() {
    let dir = tempfile::tempdir().unwrap();
    let lake = local_lake(dir.path());
    // Chunk one holds p5 and p6 in one file; chunk two updates p6, and its
    // MERGE rewrites that file, copying p5 (same batch, same content).
    let lines = [
        patient("p5", 1, "male"),
        patient("p6", 1, "female"),
        patient("p6", 2, "other"),
    ];
    let input = write(dir.path(), "c.ndjson", lines.join("\n"));
    let opts = IngestOptions {
        chunk_bytes: lines[0].len() + lines[1].len(),
        ..Default::default()
    };
    ingest_with(&lake, &[&input], &opts).await;
    let events = all(&lake, -1).await;
    let got = summary(&events);
    assert_eq!(
        got,
        vec![
            key("Patient", "p5", ChangeOp::Create, Some("p5")),
            key("Patient", "p6", ChangeOp::Create, Some("p6")),
            key("Patient", "p6", ChangeOp::Update, Some("p6")),
        ],
        "{events:#?}"
    );
    assert!(
        events[0].store_version < events[2].store_version,
        "two commits"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_on_from_any_event_id_loses_nothing_and_repeats_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let lake = local_lake(dir.path());
    for n in 0..3 {
        let lines: Vec<String> = (0..4)
            .map(|i| observation(&format!("o{n}-{i}"), &format!("p{i}"), n * 10 + i))
            .collect();
        let f = write(dir.path(), &format!("{n}.ndjson"), lines.join("\n"));
        ingest(&lake, &[&f]).await;
    }
    let whole = all(&lake, -1).await;
    assert_eq!(whole.len(), 12);
    for (i, cut) in whole.iter().enumerate() {
        let (v, seq) = parse_event_id(&cut.event_id()).unwrap();
        let seq = seq.unwrap();
        let rest: Vec<String> = all(&lake, v - 1)
            .await
            .into_iter()
            .filter(|e| (e.store_version, e.seq) > (v, seq))
            .map(|e| e.event_id())
            .collect();
        let expected: Vec<String> = whole[i + 1..].iter().map(|e| e.event_id()).collect();
        assert_eq!(rest, expected, "after {}", cut.event_id());
    }
    // A bare version means "after that whole version".
    assert_eq!(parse_event_id("7"), Some((7, None)));
    assert_eq!(parse_event_id("x.1"), None);
    // Versions below -1 are not ids (a huge negative one must not walk the log).
    assert_eq!(parse_event_id("-1"), Some((-1, None)));
    assert_eq!(parse_event_id("-2"), None);
    assert_eq!(parse_event_id("-9223372036854775808.0"), None);
    assert_eq!(parse_event_id("-1.0"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_log_cleanup_the_feed_answers_with_a_scan_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let lake = local_lake(dir.path());
    for n in 0..2 {
        let f = write(
            dir.path(),
            &format!("{n}.ndjson"),
            [
                patient(&format!("q{n}"), 1, "male"),
                observation(&format!("r{n}"), &format!("q{n}"), 1),
            ]
            .join("\n"),
        );
        ingest(&lake, &[&f]).await;
    }
    let table = lake.table_handle("resources").await.unwrap();
    deltalake::checkpoints::create_checkpoint(&table, None)
        .await
        .unwrap();
    let log = dir.path().join("lake/tables/resources/_delta_log");
    let first = log.join(format!("{:020}.json", 0));
    std::fs::remove_file(&first).unwrap();
    let feed = ChangeFeed::new(lake.clone());
    // A follower is told, and gets no scan it did not ask for.
    let told = feed.read(-1, &ReadOptions::default()).await.unwrap();
    assert!(told.events.is_empty());
    assert!(told.fallback.as_deref().unwrap().contains("log cleanup"));
    assert_eq!(told.until, told.latest);
    let scan = ReadOptions {
        scan_when_gone: true,
        ..Default::default()
    };
    let page = feed.read(-1, &scan).await.unwrap();
    let why = page.fallback.expect("a fallback");
    assert!(why.contains("log cleanup") && why.contains("scan"), "{why}");
    assert_eq!(page.events.len(), 4, "the live rows");
    assert_eq!(page.until, page.latest);
    // The newest commits are still there: reading from them needs no scan.
    let recent = feed
        .read(page.latest - 1, &ReadOptions::default())
        .await
        .unwrap();
    assert!(recent.fallback.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_lake_has_no_changes() {
    let dir = tempfile::tempdir().unwrap();
    let lake = local_lake(dir.path());
    let feed = ChangeFeed::new(lake);
    assert_eq!(feed.latest_version().await.unwrap(), None);
    let page = feed.read(-1, &ReadOptions::default()).await.unwrap();
    assert!(page.events.is_empty());
    assert!(!feed.has_version(0).await.unwrap());
    let _ = Path::new(".");
}
