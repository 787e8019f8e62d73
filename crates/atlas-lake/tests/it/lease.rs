//! The writer lease (issue 18, part 5): one writer per lake, a second one
//! fails naming the holder or waits; expired and dead holders are taken
//! over by exactly one taker; concurrent ingests never duplicate a key.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use atlas_ingest::collect_inputs;
use atlas_lake::lease::{LEASE_DIR, current_holder};
use atlas_lake::{
    IngestOptions, Lake, LakeError, LeaseHolder, LeaseOptions, Progress, WriterLease,
};
use object_store::{ObjectStoreExt, PutPayload};

use crate::{local_lake, rows, write};

/// A short lease, so the heartbeat (every quarter of it) runs in the test.
fn opts(command: &str) -> LeaseOptions {
    LeaseOptions {
        command: command.into(),
        ttl: Duration::from_secs(4),
        ..LeaseOptions::default()
    }
}

/// Writes a lease record as another writer would have.
async fn put_record(lake: &Lake, h: &LeaseHolder) {
    let rel = format!("{LEASE_DIR}/{:020}.json", h.generation);
    lake.object_store()
        .put(
            &lake.path(&rel),
            PutPayload::from(serde_json::to_vec(h).unwrap()),
        )
        .await
        .unwrap();
}

fn foreign(generation: u64, expires_in_secs: i64) -> LeaseHolder {
    let expires = chrono::Utc::now().timestamp_micros() + expires_in_secs * 1_000_000;
    LeaseHolder {
        generation,
        host: "elsewhere.example".into(),
        pid: 4242,
        process_space: "other".into(),
        pid_start: None,
        command: "atlas ingest /mnt/feed".into(),
        started: "2026-01-01T00:00:00Z".into(),
        expires: chrono::DateTime::from_timestamp_micros(expires)
            .unwrap()
            .to_rfc3339(),
        expires_micros: expires,
        released: false,
    }
}

pub async fn lease_checks(lake: &Lake) {
    let a = WriterLease::acquire(lake, &opts("atlas ingest a/"))
        .await
        .unwrap();
    match WriterLease::acquire(lake, &opts("atlas ingest b/")).await {
        Err(LakeError::Busy { holder, .. }) => {
            assert_eq!(holder.command, "atlas ingest a/");
            assert_eq!(holder.pid, std::process::id());
            assert_eq!(holder.generation, a.generation());
        }
        other => panic!("expected Busy, got {other:?}"),
    }
    let msg = WriterLease::acquire(lake, &opts("b"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("atlas ingest a/") && msg.contains("--wait"),
        "{msg}"
    );

    // A waiting writer is told who holds the lease, and gets it on release.
    let seen = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    let waiter = {
        let lake = lake.clone();
        tokio::spawn(async move {
            let o = LeaseOptions {
                wait: true,
                on_wait: Some(Arc::new(move |h: &LeaseHolder| {
                    assert_eq!(h.command, "atlas ingest a/");
                    s.fetch_add(1, Ordering::SeqCst);
                })),
                ..opts("atlas views refresh")
            };
            WriterLease::acquire(&lake, &o).await
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!waiter.is_finished());
    let first = a.generation();
    a.release().await.unwrap();
    let b = waiter.await.unwrap().unwrap();
    assert!(seen.load(Ordering::SeqCst) >= 1);
    assert_eq!(b.generation(), first + 1);
    b.release().await.unwrap();

    // A live lease of another machine blocks; an expired one is taken over
    // by exactly one of many takers.
    let top = current_holder(lake).await.unwrap().unwrap().generation;
    put_record(lake, &foreign(top + 1, 300)).await;
    assert!(matches!(
        WriterLease::acquire(lake, &opts("x")).await,
        Err(LakeError::Busy { .. })
    ));
    put_record(lake, &foreign(top + 2, -5)).await;
    let takers: Vec<_> = (0..6)
        .map(|i| {
            let lake = lake.clone();
            tokio::spawn(
                async move { WriterLease::acquire(&lake, &opts(&format!("taker {i}"))).await },
            )
        })
        .collect();
    let mut won = Vec::new();
    for t in takers {
        match t.await.unwrap() {
            Ok(l) => won.push(l),
            Err(LakeError::Busy { holder, .. }) => {
                assert!(holder.command.starts_with("taker "), "{holder}")
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(won.len(), 1, "exactly one taker wins an expired lease");
    let winner = won.pop().unwrap();
    assert_eq!(winner.generation(), top + 3);
    winner.check().unwrap();

    // A holder whose lease was taken over fails its checks.
    put_record(lake, &foreign(top + 4, 300)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..40 {
        if winner.check().is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(matches!(winner.check(), Err(LakeError::LeaseLost { .. })));
    drop(winner);
    // That foreign writer is done (its lease expired): the lake is free.
    put_record(lake, &foreign(top + 5, -1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_writer_at_a_time_on_a_local_lake() {
    let dir = tempfile::tempdir().unwrap();
    let lake = local_lake(dir.path());
    lease_checks(&lake).await;

    // A holder of this machine that no longer runs (a killed writer) is
    // taken over at once, without waiting for its expiry.
    let live = WriterLease::acquire(&lake, &opts("me")).await.unwrap();
    let mut dead = live.holder();
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let gone = child.id();
    child.wait().unwrap();
    dead.pid = gone;
    dead.generation += 1;
    dead.command = "atlas ingest (killed)".into();
    drop(live);
    put_record(&lake, &dead).await;
    let next = WriterLease::acquire(&lake, &opts("after the crash"))
        .await
        .unwrap();
    assert_eq!(next.generation(), dead.generation + 1);
    next.release().await.unwrap();
}

/// 300 and 400 patients over the same ids (the first 300 identical), as the
/// issue's two `atlas ingest` runs had.
pub fn overlapping(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let make = |n: usize| {
        let mut s = String::new();
        for i in 0..n {
            s.push_str(&format!(
                "{{\"resourceType\":\"Patient\",\"id\":\"p{i}\",\"gender\":\"{}\"}}\n",
                if i % 2 == 0 { "male" } else { "female" }
            ));
            s.push_str(&format!(
                "{{\"resourceType\":\"Observation\",\"id\":\"o{i}\",\"status\":\"final\",\"code\":{{\"text\":\"hr\"}},\"subject\":{{\"reference\":\"Patient/p{i}\"}},\"valueQuantity\":{{\"value\":{i}.0}}}}\n"
            ));
        }
        s
    };
    (
        write(dir, "a/300.ndjson", make(300)),
        write(dir, "b/400.ndjson", make(400)),
    )
}

async fn run(
    lake: Lake,
    path: std::path::PathBuf,
    wait: bool,
) -> Result<atlas_lake::BatchReport, LakeError> {
    let set = collect_inputs(&[path.display().to_string()], &mut std::io::empty()).unwrap();
    let mut o = IngestOptions {
        // Several commits per run, so the two runs overlap.
        chunk_bytes: 8 << 10,
        ..IngestOptions::default()
    };
    if wait {
        let lease = WriterLease::acquire(
            &lake,
            &LeaseOptions {
                wait: true,
                ..opts(&format!("ingest {}", path.display()))
            },
        )
        .await?;
        o.lease = Some(lease.clone());
        let r = atlas_lake::ingest(&lake, &set.inputs, &o, &Progress::default()).await;
        lease.release().await?;
        return r;
    }
    atlas_lake::ingest(&lake, &set.inputs, &o, &Progress::default()).await
}

/// Two ingests started together on one lake: one fails naming the holder
/// (or, waiting, runs after the other), never both append; after a re-run
/// every live key has exactly one row and the counts reconcile.
pub async fn concurrent_ingests(dir: &Path, open: impl Fn(usize) -> Lake) {
    let (a, b) = overlapping(dir);
    for (round, wait) in [false, true].into_iter().enumerate() {
        let lake = open(round);
        let (ra, rb) = tokio::join!(
            tokio::spawn(run(open(round), a.clone(), wait)),
            tokio::spawn(run(open(round), b.clone(), wait))
        );
        let mut reports = Vec::new();
        for (r, path) in [(ra.unwrap(), &a), (rb.unwrap(), &b)] {
            match r {
                Ok(r) => reports.push(r),
                Err(LakeError::Busy { holder, .. }) if !wait => {
                    assert!(holder.command.starts_with("ingest ("), "{holder}");
                    // The loser runs again once the winner is done.
                    reports.push(run(open(round), path.clone(), true).await.unwrap());
                }
                Err(e) => panic!("wait={wait}: {e}"),
            }
        }
        for r in &reports {
            assert!(r.outcomes.reconciles(), "{:?}", r.outcomes);
        }
        let live = rows(
            &lake,
            "SELECT resource_type, count(*), count(DISTINCT id) FROM resources WHERE NOT deleted GROUP BY 1 ORDER BY 1",
        )
        .await;
        assert_eq!(
            live,
            vec![
                "Observation|400|400".to_owned(),
                "Patient|400|400".to_owned()
            ],
            "wait={wait}"
        );
        let fresh: Vec<_> = reports.iter().filter(|r| !r.already_ingested).collect();
        let stored: i64 = fresh.iter().map(|r| r.outcomes.stored).sum();
        let unchanged: i64 = fresh.iter().map(|r| r.outcomes.unchanged).sum();
        let lines: i64 = fresh.iter().map(|r| r.outcomes.lines_read).sum();
        if fresh.len() == 2 {
            assert_eq!((lines, stored, unchanged), (1400, 800, 600), "wait={wait}");
        }
        let s = atlas_lake::stats(&lake).await.unwrap();
        assert_eq!(s.resources["Patient"].live, 400);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_ingests_on_a_local_lake_never_duplicate_keys() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_owned();
    concurrent_ingests(dir.path(), move |round| {
        local_lake(&d.join(format!("round-{round}")))
    })
    .await;
}

/// The second line of defence: two writers that both believe they hold the
/// lease (as a process paused past its lease's expiry would) still never
/// add two live rows for a key: every `resources` commit carries the
/// `atlas-writer` txn, so Delta refuses the commit that races the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delta_refuses_a_commit_racing_another_writer() {
    let dir = tempfile::tempdir().unwrap();
    let lake = local_lake(dir.path());
    let (a, b) = overlapping(dir.path());
    let seed = write(
        dir.path(),
        "seed.ndjson",
        "{\"resourceType\":\"Patient\",\"id\":\"seed\"}\n",
    );
    crate::ingest(&lake, &[&seed]).await;
    // A long lease, so no heartbeat notices the forgery during the test.
    let long = |c: &str| LeaseOptions {
        ttl: Duration::from_secs(600),
        ..opts(c)
    };
    let zombie = WriterLease::acquire(&lake, &long("zombie")).await.unwrap();
    let mut h = zombie.holder();
    h.released = true;
    put_record(&lake, &h).await;
    let legit = WriterLease::acquire(&lake, &long("legit")).await.unwrap();
    zombie.check().unwrap();
    legit.check().unwrap();

    let go = |lease: WriterLease, path: std::path::PathBuf| {
        let lake = lake.clone();
        async move {
            let set = collect_inputs(&[path.display().to_string()], &mut std::io::empty()).unwrap();
            let o = IngestOptions {
                chunk_bytes: 8 << 10,
                lease: Some(lease),
                ..IngestOptions::default()
            };
            atlas_lake::ingest(&lake, &set.inputs, &o, &Progress::default()).await
        }
    };
    let (ra, rb) = tokio::join!(
        tokio::spawn(go(zombie.clone(), a.clone())),
        tokio::spawn(go(legit.clone(), b.clone()))
    );
    let mut refused = Vec::new();
    for (r, path) in [(ra.unwrap(), a), (rb.unwrap(), b)] {
        match r {
            Ok(r) => assert!(r.outcomes.reconciles()),
            Err(e @ LakeError::ConcurrentWriter { .. }) => {
                assert!(e.to_string().contains("tables/resources"), "{e}");
                refused.push(path);
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(refused.len(), 1, "the two runs overlapped: one is refused");
    zombie.release().await.unwrap();
    legit.release().await.unwrap();
    for path in refused {
        go(
            WriterLease::acquire(&lake, &opts("again")).await.unwrap(),
            path,
        )
        .await
        .unwrap();
    }
    let live = rows(
        &lake,
        "SELECT resource_type, count(*), count(DISTINCT id) FROM resources WHERE NOT deleted GROUP BY 1 ORDER BY 1",
    )
    .await;
    assert_eq!(
        live,
        vec![
            "Observation|400|400".to_owned(),
            "Patient|401|401".to_owned()
        ]
    );
}
