use std::path::Path;
use std::sync::Arc;

use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjPath;

use super::*;

fn entry(i: usize) -> AuditEntry {
    AuditEntry {
        time: now_rfc3339(),
        subject: Some(format!("user-{}", i % 3)),
        issuer: Some("https://idp.example".into()),
        client: None,
        purpose: i.is_multiple_of(2).then(|| "TREAT".to_owned()),
        method: "GET".into(),
        path: format!("/fhir/Observation/{i}"),
        query: String::new(),
        query_hash: format!("{i:064x}"),
        status: 200,
        decision: "allow".into(),
        rules: vec!["everyone".into()],
        resource_types: vec!["Observation".into()],
        rows: Some(1),
        patients: vec![],
        patient_count: Some(1),
        fields_removed: vec![],
        duration_us: 250 + i as u64,
        ..Default::default()
    }
}

fn local(dir: &Path) -> AuditStore {
    let store: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new_with_prefix(dir).unwrap());
    AuditStore::new(store, &ObjPath::from(""), Some(dir.to_path_buf()))
}

async fn write(store: &AuditStore, range: std::ops::Range<usize>) {
    // Checkpoint after every group, as a long-running server does within a
    // second.
    let log = Arc::new(
        AuditLog::open_with(store.clone(), std::time::Duration::ZERO)
            .await
            .unwrap(),
    );
    // Concurrent writers: groups form, sequence numbers stay unique.
    let tasks: Vec<_> = range
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move { log.record(entry(i)).await.unwrap() })
        })
        .collect();
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap());
    }
    seqs.sort();
    seqs.dedup();
    assert_eq!(
        seqs.len(),
        seqs.last().copied().unwrap_or(0) as usize - seqs[0] as usize + 1
    );
}

/// Every segment file of every chain, in chain then sequence order.
fn segment_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v = Vec::new();
    let mut chains: Vec<_> = std::fs::read_dir(dir.join(AUDIT_DIR))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    chains.sort();
    for c in chains {
        let mut segs: Vec<_> = std::fs::read_dir(&c)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "ndjson"))
            .collect();
        segs.sort();
        v.extend(segs);
    }
    v
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            copy_dir(&p, &to.join(p.file_name().unwrap()));
        } else {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
}

fn all_lines(dir: &Path) -> Vec<(std::path::PathBuf, usize, String)> {
    let mut out = Vec::new();
    for f in segment_files(dir) {
        for (i, l) in std::fs::read_to_string(&f).unwrap().lines().enumerate() {
            out.push((f.clone(), i, l.to_owned()));
        }
    }
    out
}

fn rewrite(path: &Path, f: impl FnOnce(&mut Vec<String>)) {
    let mut lines: Vec<String> = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    f(&mut lines);
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_grows_across_restarts_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let store = local(dir.path());
    write(&store, 0..40).await;
    write(&store, 40..55).await; // a restart: a second chain
    let report = verify(&store).await.unwrap().unwrap();
    assert_eq!((report.records, report.chains, report.segments), (55, 2, 2));
    let recs = records(&store).await.unwrap();
    let seqs: Vec<u64> = recs.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=40).chain(1..=15).collect::<Vec<_>>());
    assert_ne!(recs[0].chain, recs[40].chain);
    assert_eq!(
        report.heads[1],
        (recs[54].chain.clone(), 15, recs[54].hash.clone())
    );
    // The second chain's header witnessed where the first ended.
    let header: ChainHeader = serde_json::from_slice(
        &std::fs::read(
            dir.path()
                .join(AUDIT_DIR)
                .join(&recs[40].chain)
                .join("chain.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        header.witnesses,
        [Witness {
            chain: recs[0].chain.clone(),
            seq: 40,
            hash: recs[39].hash.clone()
        }]
    );
}

/// Every kind of tampering, at every record of two chains: the first bad
/// record is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_with_any_record_is_detected_and_named() {
    let dir = tempfile::tempdir().unwrap();
    write(&local(dir.path()), 0..12).await;
    write(&local(dir.path()), 12..20).await;
    let pristine = all_lines(dir.path());
    let n = pristine.len();
    assert_eq!(n, 20);
    let last_of_chain = |i: usize| {
        pristine
            .get(i + 1)
            .is_none_or(|(p, _, _)| p.parent() != pristine[i].0.parent())
    };
    let copy = |kind: &str, i: usize| -> (tempfile::TempDir, u64) {
        let t = tempfile::tempdir().unwrap();
        copy_dir(&dir.path().join(AUDIT_DIR), &t.path().join(AUDIT_DIR));
        let moved = |p: &Path| t.path().join(p.strip_prefix(dir.path()).unwrap());
        let (seg, line, text) = &pristine[i];
        let seg = moved(seg);
        let own: AuditRecord = serde_json::from_str(text).unwrap();
        // The sequence number (within its chain) verify must name.
        let expect = match kind {
            "change" => {
                let mut r = own.clone();
                r.entry.status = 403;
                rewrite(&seg, |l| l[*line] = serde_json::to_string(&r).unwrap());
                own.seq
            }
            "change and rehash" => {
                let mut r = own.clone();
                r.entry.subject = Some("someone-else".into());
                r.hash = r.compute_hash();
                rewrite(&seg, |l| l[*line] = serde_json::to_string(&r).unwrap());
                // The next record's link exposes it; a chain's last record,
                // its checkpoint.
                if last_of_chain(i) {
                    own.seq
                } else {
                    own.seq + 1
                }
            }
            "remove" => {
                rewrite(&seg, |l| {
                    l.remove(*line);
                });
                own.seq
            }
            "swap with next" => {
                let (next_seg, next_line, next_text) = &pristine[i + 1];
                let next_seg = moved(next_seg);
                let a = text.clone();
                let b = next_text.clone();
                rewrite(&seg, |l| l[*line] = b);
                rewrite(&next_seg, |l| l[*next_line] = a);
                own.seq
            }
            _ => unreachable!(),
        };
        (t, expect)
    };
    for kind in ["change", "change and rehash", "remove", "swap with next"] {
        for i in 0..n {
            if kind == "swap with next" && last_of_chain(i) {
                continue; // no next record in its chain to swap with
            }
            let (t, expect) = copy(kind, i);
            let got = verify(&local(t.path())).await.unwrap();
            let brk = got.expect_err(&format!("{kind} at {i} went unnoticed"));
            assert_eq!(brk.seq, expect, "{kind} at line {}: {brk}", i + 1);
        }
    }
    // A whole chain deleted: the next chain's header witnessed its end.
    let t = tempfile::tempdir().unwrap();
    copy_dir(&dir.path().join(AUDIT_DIR), &t.path().join(AUDIT_DIR));
    let first_chain = segment_files(dir.path())[0]
        .parent()
        .unwrap()
        .file_name()
        .unwrap()
        .to_owned();
    std::fs::remove_dir_all(t.path().join(AUDIT_DIR).join(&first_chain)).unwrap();
    let brk = verify(&local(t.path())).await.unwrap().unwrap_err();
    assert_eq!(brk.seq, 12);
    assert!(brk.reason.contains("no longer there"), "{brk}");
    // A chain's segment file deleted: its checkpoint notices.
    let t = tempfile::tempdir().unwrap();
    copy_dir(&dir.path().join(AUDIT_DIR), &t.path().join(AUDIT_DIR));
    std::fs::remove_file(&segment_files(t.path())[1]).unwrap();
    let brk = verify(&local(t.path())).await.unwrap().unwrap_err();
    assert!(brk.reason.contains("removed from the end"), "{brk}");
}

/// A crash while a group was being appended leaves a torn line that was
/// never acknowledged: it is reported, never counted as a record, and the
/// next writer's chain witnesses the last complete one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_reported_and_acknowledged_records_survive() {
    let dir = tempfile::tempdir().unwrap();
    let store = local(dir.path());
    write(&store, 0..7).await;
    let seg = segment_files(dir.path()).pop().unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    std::io::Write::write_all(&mut f, br#"{"chain":"x","seq":8,"time":"2026-"#).unwrap();
    drop(f);
    let before = verify(&store).await.unwrap().unwrap();
    assert!(before.torn_tail);
    assert_eq!(before.records, 7);
    write(&store, 7..10).await;
    let report = verify(&store).await.unwrap().unwrap();
    assert_eq!((report.records, report.chains), (10, 2));
    assert_eq!(records(&store).await.unwrap().len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_stores_get_one_object_per_group() {
    let mem: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let store = AuditStore::new(mem.clone(), &ObjPath::from("lake"), None);
    write(&store, 0..30).await;
    write(&store, 30..31).await;
    let report = verify(&store).await.unwrap().unwrap();
    assert_eq!(report.records, 31);
    assert!(report.segments >= 2);
}

#[test]
fn audit_events_carry_who_why_what_and_the_chain() {
    let mut e = entry(2);
    e.fields_removed = vec!["Patient.telecom".into()];
    e.query = "code=8867-4".into();
    e.patients = vec!["p1".into()];
    e.patient_count = Some(1);
    let mut r = AuditRecord {
        chain: "00000000000000000001-ab".into(),
        seq: 7,
        entry: e,
        prev_hash: "0".repeat(64),
        hash: String::new(),
    };
    r.hash = r.compute_hash();
    let ev = audit_event(&r);
    assert_eq!(ev["resourceType"], "AuditEvent");
    assert_eq!(ev["outcome"], "0");
    assert_eq!(ev["agent"][0]["who"]["identifier"]["value"], "user-2");
    assert_eq!(
        ev["agent"][0]["purposeOfUse"][0]["coding"][0]["code"],
        "TREAT"
    );
    assert_eq!(ev["entity"][0]["query"], base64_encode(b"code=8867-4"));
    assert_eq!(base64_encode(b"code=8867-4"), "Y29kZT04ODY3LTQ=");
    assert_eq!(ev["entity"][1]["what"]["reference"], "Patient/p1");
    let details = ev["entity"][0]["detail"].to_string();
    assert!(
        details.contains("Patient.telecom") && details.contains(&r.hash),
        "{details}"
    );
}

/// Records written before the optional fields existed parse and hash as
/// written; new records carry the fields and round-trip.
#[test]
fn optional_fields_keep_older_records_verifiable() {
    let mut r = AuditRecord {
        chain: "00000000000000000001-ab".into(),
        seq: 1,
        entry: entry(1),
        prev_hash: "0".repeat(64),
        hash: String::new(),
    };
    r.hash = r.compute_hash();
    let old = serde_json::to_string(&r).unwrap();
    for field in [
        "request_id",
        "purpose_claim",
        "reason",
        "out_of_scope",
        "scopes",
    ] {
        assert!(!old.contains(field), "{old}");
    }
    let back: AuditRecord = serde_json::from_str(&old).unwrap();
    assert_eq!(back.compute_hash(), r.hash);
    let mut n = r.clone();
    n.entry.request_id = Some("r1".into());
    n.entry.purpose_claim = Some(vec!["HRESCH".into()]);
    n.entry.purpose_header = Some("TREAT".into());
    n.entry.patient_binding = Some("p1".into());
    n.entry.scopes = vec!["patient/*.rs".into()];
    n.entry.roles = vec!["clinician".into()];
    n.entry.reason = Some("expired".into());
    n.entry.out_of_scope = true;
    n.hash = n.compute_hash();
    let text = serde_json::to_string(&n).unwrap();
    let back: AuditRecord = serde_json::from_str(&text).unwrap();
    assert_eq!(back, n);
    assert_eq!(back.compute_hash(), n.hash);
    assert_ne!(n.hash, r.hash);
}
