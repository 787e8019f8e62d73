//! `atlas pull` end to end: the binary against `atlas-mockehr` (in this
//! process, on loopback) into a lake, through the one ingest path. The
//! lake's live rows are compared with the mock's own snapshot.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use atlas_connect::smart::ClientKey;
use atlas_mockehr::{
    ClientRegistration, Endpoint, Fault, FaultKind, MockConfig, MockEhr, RunningMock,
};

use crate::{atlas, synth};

type Key = (String, String);

struct Ehr {
    mock: RunningMock,
    dir: tempfile::TempDir,
    key: PathBuf,
}

async fn ehr(patients: usize, configure: impl FnOnce(&mut MockConfig)) -> Ehr {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path(), patients, 11);
    let (key, pem) = ClientKey::generate(jsonwebtoken::Algorithm::RS384).unwrap();
    let key_path = dir.path().join("client.pem");
    std::fs::write(&key_path, pem).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut config = MockConfig {
        retry_after_secs: 0,
        max_lines_per_file: 250,
        clients: vec![ClientRegistration {
            client_id: "atlas".into(),
            jwks: key.public_jwks(),
            scopes: vec!["system/*.rs".into()],
            jku: None,
        }],
        ..MockConfig::default()
    };
    configure(&mut config);
    let mock = MockEhr::from_ndjson_dir(&data, config)
        .unwrap()
        .start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    Ehr {
        mock,
        dir,
        key: key_path,
    }
}

impl Ehr {
    fn lake(&self) -> PathBuf {
        self.dir.path().join("lake")
    }

    fn pull(&self, lake: &Path, kind: &str, extra: &[&str]) -> Command {
        let mut c = atlas(lake);
        c.args([
            "pull",
            kind,
            &self.mock.fhir_base,
            "--client-id",
            "atlas",
            "--key",
        ])
        .arg(&self.key)
        .args(["--max-wait-secs", "0.05"])
        .args(extra);
        c
    }

    /// The mock's live keys and versions at `at` (`None`: now).
    fn snapshot(&self, at: Option<&str>, types: Option<&[&str]>) -> BTreeMap<Key, String> {
        self.mock
            .ehr
            .snapshot(at)
            .into_iter()
            .filter(|((t, _), v)| !v.deleted && types.is_none_or(|ts| ts.contains(&t.as_str())))
            .map(|(k, v)| (k, v.version_id.to_string()))
            .collect()
    }
}

/// Runs a command off the async runtime (the mock serves on it).
async fn output(mut c: Command) -> Output {
    tokio::task::spawn_blocking(move || c.output().expect("atlas runs"))
        .await
        .unwrap()
}

async fn ok(c: Command) -> Output {
    let dbg = format!("{c:?}");
    let out = output(c).await;
    assert!(
        out.status.success(),
        "{dbg} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    out
}

/// The lake's live resources: key → versionId.
async fn live(lake: &Path) -> BTreeMap<Key, String> {
    let mut c = atlas(lake);
    c.args([
        "sql",
        "--format",
        "csv",
        "SELECT resource_type, id, version_id FROM resources WHERE NOT deleted",
    ]);
    let out = ok(c).await;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut p = l.split(',');
            Some((
                (p.next()?.to_owned(), p.next()?.to_owned()),
                p.next()?.to_owned(),
            ))
        })
        .collect()
}

fn state(lake: &Path, source: &str) -> serde_json::Value {
    let text =
        std::fs::read_to_string(lake.join("connectors").join(source).join("state.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A Bulk pull lands and stores the export (the snapshot at its
/// transactionTime, exactly), saves the watermark; `--since auto` then
/// brings the changes and deletes since, and the lake equals the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_pull_lands_ingests_and_moves_the_watermark() {
    let e = ehr(5, |c| c.changes_per_tick = 20).await;
    let lake = e.lake();
    let out = ok(e.pull(&lake, "bulk", &["--source", "ehr-a"])).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("(reconciled)"), "{stderr}");
    let s = state(&lake, "ehr-a");
    let t0 = s["bulk_watermark"]
        .as_str()
        .expect("the watermark is saved")
        .to_owned();
    assert!(s.get("bulk_job").is_none(), "the job is cleared");
    assert_eq!(
        live(&lake).await,
        e.snapshot(Some(&t0), None),
        "the lake holds the export"
    );
    assert!(
        lake.join("raw/ehr-a").is_dir(),
        "raw bytes landed under the connector's name"
    );
    assert!(
        !lake
            .join("connectors/ehr-a/staging")
            .read_dir()
            .map(|mut d| d
                .any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("job-"))))
            .unwrap_or(false),
        "staging cleaned"
    );

    for _ in 0..3 {
        e.mock.ehr.tick();
    }
    let out = ok(e.pull(&lake, "bulk", &["--source", "ehr-a", "--since", "auto"])).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("since {t0}")), "{stderr}");
    let t1 = state(&lake, "ehr-a")["bulk_watermark"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(t1 > t0);
    assert_eq!(
        live(&lake).await,
        e.snapshot(Some(&t1), None),
        "changes and deletes applied"
    );
    let deleted = e
        .mock
        .ehr
        .snapshot(Some(&t1))
        .values()
        .filter(|v| v.deleted)
        .count();
    assert!(deleted > 0, "the ticks deleted something");
    // The kick-off asked for `_since=t0` (discovery ran: the token came from the SMART configuration).
    let reqs = e.mock.ehr.requests();
    assert!(
        reqs.iter()
            .any(|r| r.path.contains(".well-known/smart-configuration"))
    );
    assert!(
        reqs.iter()
            .any(|r| r.method == "POST" && r.path.contains("$export"))
    );

    // `--since auto` for another request (other types) has no watermark
    // of its own yet: it exports everything of those types.
    let out = ok(e.pull(
        &lake,
        "bulk",
        &[
            "--source",
            "ehr-a",
            "--since",
            "auto",
            "--type",
            "Condition",
        ],
    ))
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("exporting changes since"), "{stderr}");
    let s = state(&lake, "ehr-a");
    assert_eq!(
        s["bulk_watermarks"].as_object().map(|m| m.len()),
        Some(2),
        "{s}"
    );

    // Running the same pull again with nothing changed changes nothing.
    ok(e.pull(&lake, "bulk", &["--source", "ehr-a", "--since", "auto"])).await;
    assert_eq!(live(&lake).await, e.snapshot(Some(&t1), None));
}

/// Killed at each point of a pull (right after kick-off, part-way
/// through the downloads, before ingest, in the middle of ingest, after
/// ingest) and run again: the same lake as an uninterrupted pull, from the
/// same export (one kick-off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_pull_resumes_and_converges() {
    let e = ehr(4, |_| {}).await;
    let clean = e.dir.path().join("clean");
    ok(e.pull(&clean, "bulk", &[])).await;
    let want = live(&clean).await;
    for point in [
        "bulk_after_kickoff",
        "bulk_after_file",
        "pull_before_ingest",
        "after_chunk",
        "before_batch_commit",
        "pull_after_ingest",
    ] {
        let lake = e.dir.path().join(format!("lake-{point}"));
        let kickoffs_before = e
            .mock
            .ehr
            .requests()
            .iter()
            .filter(|r| r.path.contains("$export"))
            .count();
        let mut c = e.pull(&lake, "bulk", &[]);
        c.env("ATLAS_TEST_CRASH", point);
        let out = output(c).await;
        assert!(!out.status.success(), "{point}: the run was killed");
        ok(e.pull(&lake, "bulk", &[])).await;
        assert_eq!(live(&lake).await, want, "{point}: converged");
        let kickoffs = e
            .mock
            .ehr
            .requests()
            .iter()
            .filter(|r| r.path.contains("$export"))
            .count()
            - kickoffs_before;
        assert_eq!(
            kickoffs, 1,
            "{point}: the killed run's export was resumed, not started again"
        );
        assert!(state(&lake, "ehr").get("bulk_job").is_none(), "{point}");
    }
}

/// REST: a first pull, then changes (updates, creates, deletes) read from
/// `_history` pages, newest first: the lake keeps the newest version of
/// each key and applies the deletes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_pull_keeps_the_newest_version_and_applies_deletes() {
    let e = ehr(3, |c| {
        c.changes_per_tick = 25;
        c.page_size = 20;
    })
    .await;
    let lake = e.lake();
    let types = ["Patient", "Encounter", "Condition", "Observation"];
    let rest = |extra: &[&str]| {
        let mut args = vec![
            "--source",
            "ehr-rest",
            "--type",
            "Patient,Encounter,Condition,Observation",
            "--page-size",
            "20",
        ];
        args.extend_from_slice(extra);
        e.pull(&lake, "rest", &args)
    };
    ok(rest(&[])).await;
    assert_eq!(
        live(&lake).await,
        e.snapshot(None, Some(&types)),
        "the first pull"
    );
    // Several ticks: some keys change twice, so one history page holds
    // more than one version of them.
    for _ in 0..4 {
        e.mock.ehr.tick();
    }
    let out = ok(rest(&[])).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("History"), "{stderr}");
    assert_eq!(
        live(&lake).await,
        e.snapshot(None, Some(&types)),
        "after the delta: the server's state"
    );
    let s = state(&lake, "ehr-rest");
    assert!(
        types.iter().all(|t| s["rest"][t]["watermark"].is_string()),
        "{s}"
    );
}

/// A fault-ridden Bulk pull (429s with garbage Retry-After, a reset, a
/// truncated file, a 307 to another host, an expired token, duplicate ids,
/// a count mismatch) still lands the snapshot exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_through_every_fault_lands_the_snapshot() {
    let st = |code: u16, ra: &str| FaultKind::Status {
        code,
        retry_after: Some(ra.into()),
    };
    let e = ehr(4, |c| {
        c.faults = vec![
            Fault::nth(Endpoint::Kickoff, 1, st(429, "soon")),
            Fault::nth(Endpoint::Status, 1, st(503, "-3")),
            Fault::nth(Endpoint::File, 1, FaultKind::ResetAfter { bytes: 999 }),
            Fault::nth(Endpoint::File, 3, FaultKind::Truncate { bytes: 1234 }),
            Fault::nth(Endpoint::File, 4, FaultKind::RedirectOtherHost),
            Fault::nth(Endpoint::File, 5, FaultKind::ExpireToken),
            Fault::nth(Endpoint::Kickoff, 2, FaultKind::DuplicateIds),
            Fault::nth(Endpoint::Kickoff, 2, FaultKind::CountMismatch),
            Fault::nth(Endpoint::Kickoff, 2, FaultKind::WrongType),
        ];
    })
    .await;
    let lake = e.lake();
    let out = ok(e.pull(&lake, "bulk", &[])).await;
    let t0 = state(&lake, "ehr")["bulk_watermark"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        live(&lake).await,
        e.snapshot(Some(&t0), None),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        e.mock
            .ehr
            .requests()
            .iter()
            .filter(|r| r.other_host)
            .all(|r| !r.had_authorization)
    );
}
