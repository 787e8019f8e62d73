//! The clients against `atlas-mockehr`: a deterministic EHR on loopback
//! with a scripted fault timeline. Each test compares what the client
//! staged with the mock's own snapshot at the export's `transactionTime`:
//! nothing lost, nothing duplicated, nothing corrupted.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use atlas_connect::ConnectError;
use atlas_connect::bulk::{
    BulkClient, BulkOptions, BulkPull, ExportLevel, ExportRequest, PullProgress, PulledExport,
};
use atlas_connect::http::{HttpClient, HttpOptions};
use atlas_connect::manifest::FileKind;
use atlas_connect::rest::{Mode, RestOptions, RestPull};
use atlas_connect::retry::RetryPolicy;
use atlas_connect::smart::{ClientKey, TokenSource};
use atlas_connect::state::{ConnectorState, StateStore};
use atlas_mockehr::{
    ClientRegistration, Endpoint, Fault, FaultKind, KickoffMode, ManifestShape, MockConfig,
    MockEhr, RunningMock,
};
use object_store::local::LocalFileSystem;
use serde_json::Value;

pub type Key = (String, String);

/// A mock EHR over a small synthetic population, a registered ES384
/// client, and a lake folder for the connector state.
pub struct Harness {
    pub mock: RunningMock,
    pub dir: tempfile::TempDir,
    pub key: PathBuf,
    pub client_id: String,
}

fn synth(dir: &Path, patients: usize) {
    let opts = atlas_synth::SynthOptions {
        patients,
        seed: 7,
        ..atlas_synth::SynthOptions::default()
    };
    atlas_synth::generate(&opts, dir, &std::sync::atomic::AtomicU64::new(0)).unwrap();
}

pub async fn harness(patients: usize, configure: impl FnOnce(&mut MockConfig)) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    synth(&data, patients);
    let (key, pem) = ClientKey::generate(jsonwebtoken::Algorithm::ES384).unwrap();
    let key_path = dir.path().join("client.pem");
    std::fs::write(&key_path, pem).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut config = MockConfig {
        retry_after_secs: 0,
        export_delay_polls: 2,
        clients: vec![ClientRegistration {
            client_id: "atlas-test".into(),
            jwks: key.public_jwks(),
            scopes: vec!["system/*.rs".into()],
            jku: None,
        }],
        ..MockConfig::default()
    };
    configure(&mut config);
    let ehr = MockEhr::from_ndjson_dir(&data, config).unwrap();
    let mock = ehr.start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    Harness {
        mock,
        dir,
        key: key_path,
        client_id: "atlas-test".into(),
    }
}

/// Retries and polls that wait milliseconds, not seconds.
pub fn fast_http() -> HttpOptions {
    HttpOptions {
        retry: RetryPolicy {
            max_attempts: 6,
            base: Duration::from_millis(5),
            max_wait: Duration::from_millis(30),
            min_wait: Duration::ZERO,
        },
        ..HttpOptions::default()
    }
}

pub fn fast_bulk() -> BulkOptions {
    BulkOptions {
        poll: RetryPolicy {
            max_attempts: u32::MAX,
            base: Duration::from_millis(5),
            max_wait: Duration::from_millis(20),
            min_wait: Duration::ZERO,
        },
        parallel: 4,
        ..BulkOptions::default()
    }
}

impl Harness {
    pub async fn http(&self) -> HttpClient {
        let key = ClientKey::from_file(&self.key, None).unwrap();
        let tokens = TokenSource::new(
            atlas_connect::http::build_reqwest(&fast_http()).unwrap(),
            self.mock.token_url.clone(),
            self.client_id.clone(),
            "system/*.rs".into(),
            None,
            key,
        );
        HttpClient::new(fast_http(), Some(Arc::new(tokens))).unwrap()
    }

    pub fn store(&self) -> StateStore {
        let lake = self.dir.path().join("lake");
        std::fs::create_dir_all(&lake).unwrap();
        let fs = LocalFileSystem::new_with_prefix(&lake).unwrap();
        StateStore::new(Arc::new(fs), &object_store::path::Path::from(""), "ehr").unwrap()
    }

    pub fn staging(&self) -> PathBuf {
        self.dir.path().join("staging")
    }

    pub async fn bulk_client(&self) -> BulkClient {
        BulkClient::new(self.http().await, &self.mock.fhir_base, fast_bulk()).unwrap()
    }

    /// One pull with state loaded and saved like `atlas pull bulk` does.
    pub async fn pull(&self, req: &ExportRequest) -> Result<PulledExport, ConnectError> {
        let client = self.bulk_client().await;
        let store = self.store();
        let mut state = store.load().await?.unwrap_or_else(|| ConnectorState {
            name: "ehr".into(),
            ..ConnectorState::default()
        });
        let pull = BulkPull {
            client: &client,
            store: &store,
            staging: self.staging(),
            progress: Arc::new(PullProgress::default()),
        };
        let r = pull.run(&mut state, req).await;
        if let Ok(p) = &r {
            state.bulk_watermark = Some(p.manifest.transaction_time.clone());
            state.bulk_job = None;
            store.save(&state).await?;
        }
        r
    }

    /// The mock's live keys and versions at `at`.
    pub fn snapshot(&self, at: &str) -> BTreeMap<Key, u64> {
        self.mock
            .ehr
            .snapshot(Some(at))
            .into_iter()
            .filter(|(_, v)| !v.deleted)
            .map(|(k, v)| (k, v.version_id))
            .collect()
    }
}

/// What staged files hold: every resource line's key and version (each
/// occurrence), and the keys of the DELETE entries.
#[derive(Debug, Default)]
pub struct Staged {
    pub resources: Vec<(Key, u64)>,
    pub deletes: Vec<Key>,
    pub errors: u64,
}

impl Staged {
    pub fn read(pulled: &PulledExport) -> Staged {
        let mut s = Staged::default();
        for f in &pulled.files {
            let text = read_text(&f.path);
            let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            assert_eq!(
                lines.len() as u64,
                f.done.lines,
                "{}: the line count recorded",
                f.path.display()
            );
            for line in lines {
                let v: Value = serde_json::from_str(line).unwrap_or_else(|e| {
                    panic!("{}: a corrupt line ({e}): {:.200}", f.path.display(), line)
                });
                match f.done.kind {
                    FileKind::Error => s.errors += 1,
                    FileKind::Deleted => s.deletes.extend(delete_keys(&v)),
                    FileKind::Output => s.resources.push(key_version(&v)),
                }
            }
        }
        s
    }

    /// The newest version staged per key.
    pub fn newest(&self) -> BTreeMap<Key, u64> {
        let mut m = BTreeMap::new();
        for (k, v) in &self.resources {
            let e = m.entry(k.clone()).or_insert(*v);
            *e = (*e).max(*v);
        }
        m
    }

    pub fn duplicates(&self) -> usize {
        self.resources.len() - self.newest().len()
    }
}

pub fn read_text(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    if path.extension().is_some_and(|e| e == "gz") {
        let mut s = String::new();
        flate2::read::MultiGzDecoder::new(&bytes[..])
            .read_to_string(&mut s)
            .unwrap();
        s
    } else {
        String::from_utf8(bytes).unwrap()
    }
}

pub fn key_version(v: &Value) -> (Key, u64) {
    let ty = v["resourceType"].as_str().unwrap_or_default().to_owned();
    let id = v["id"].as_str().unwrap_or_default().to_owned();
    let version = v["meta"]["versionId"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    ((ty, id), version)
}

pub fn delete_keys(bundle: &Value) -> Vec<Key> {
    bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["request"]["method"] == "DELETE")
        .filter_map(|e| {
            let url = e["request"]["url"].as_str()?;
            let mut parts = url.trim_start_matches('/').split('/');
            Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
        })
        .collect()
}

fn system() -> ExportRequest {
    ExportRequest::new(ExportLevel::System)
}

/// A whole export staged: exactly the snapshot at transactionTime.
async fn assert_exact(h: &Harness, req: &ExportRequest) -> PulledExport {
    let pulled = h
        .pull(req)
        .await
        .unwrap_or_else(|e| panic!("pull failed: {e}"));
    let staged = Staged::read(&pulled);
    let want = h.snapshot(&pulled.manifest.transaction_time);
    assert_eq!(staged.duplicates(), 0, "no resource staged twice");
    assert_eq!(
        staged.newest().len(),
        want.len(),
        "as many resources as the server had"
    );
    assert_eq!(staged.newest(), want, "the same keys and versions");
    pulled
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_export_matches_the_snapshot_in_every_manifest_shape_and_kickoff_mode() {
    for (shape, kickoff) in [
        (ManifestShape::Stu2, KickoffMode::Both),
        (ManifestShape::Stu3, KickoffMode::GetOnly),
        (ManifestShape::Stu4, KickoffMode::PostOnly),
    ] {
        let h = harness(6, |c| {
            c.manifest = shape;
            c.kickoff = kickoff;
            c.max_lines_per_file = 200;
        })
        .await;
        let pulled = assert_exact(&h, &system()).await;
        assert!(pulled.files.len() > 3, "{shape:?}: several files");
        let reqs = h.mock.ehr.requests();
        let file_gets: Vec<_> = reqs.iter().filter(|r| r.path.contains("/files/")).collect();
        assert!(
            file_gets.iter().all(|r| r.had_authorization),
            "requiresAccessToken honoured"
        );
        let kickoffs: Vec<_> = reqs.iter().filter(|r| r.path.contains("$export")).collect();
        assert!(
            kickoffs.last().is_some_and(|r| r.status == 202),
            "{shape:?}/{kickoff:?}: kicked off"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_and_patient_exports_with_types() {
    let h = harness(6, |_| {}).await;
    let mut req = ExportRequest::new(ExportLevel::Group("cohort".into()));
    req.types = vec!["Patient".into(), "Condition".into()];
    let pulled = h.pull(&req).await.unwrap();
    let staged = Staged::read(&pulled).newest();
    assert!(!staged.is_empty());
    assert!(
        staged
            .keys()
            .all(|(t, _)| t == "Patient" || t == "Condition"),
        "only the asked types"
    );
    let all_patients = h
        .snapshot(&pulled.manifest.transaction_time)
        .keys()
        .filter(|(t, _)| t == "Patient")
        .count();
    let group_patients = staged.keys().filter(|(t, _)| t == "Patient").count();
    assert!(
        group_patients > 0 && group_patients < all_patients,
        "the group's members only: {group_patients} of {all_patients}"
    );
}

/// Every fault of the timeline, one at a time: the export staged is still
/// exactly the server's snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_fault_loses_duplicates_or_corrupts_a_resource() {
    let status = |code: u16, ra: Option<&str>| FaultKind::Status {
        code,
        retry_after: ra.map(str::to_owned),
    };
    let cases: Vec<(&str, Vec<Fault>)> = vec![
        (
            "429 on kick-off, Retry-After seconds",
            vec![Fault {
                times: 2,
                ..Fault::nth(Endpoint::Kickoff, 1, status(429, Some("0")))
            }],
        ),
        (
            "429 on kick-off, Retry-After HTTP-date",
            vec![Fault::nth(
                Endpoint::Kickoff,
                1,
                status(429, Some("Wed, 21 Oct 2015 07:28:00 GMT")),
            )],
        ),
        (
            "429 on status, huge Retry-After",
            vec![Fault::nth(Endpoint::Status, 1, status(429, Some("999999")))],
        ),
        (
            "503 on status, negative Retry-After",
            vec![Fault::nth(Endpoint::Status, 2, status(503, Some("-5")))],
        ),
        (
            "503 on status, garbage Retry-After",
            vec![Fault::nth(Endpoint::Status, 1, status(503, Some("soon")))],
        ),
        (
            "500 on a file",
            vec![Fault::nth(Endpoint::File, 2, status(500, None))],
        ),
        (
            "connection reset mid-file",
            vec![Fault::nth(
                Endpoint::File,
                1,
                FaultKind::ResetAfter { bytes: 700 },
            )],
        ),
        (
            "truncated NDJSON",
            vec![Fault::nth(
                Endpoint::File,
                1,
                FaultKind::Truncate { bytes: 501 },
            )],
        ),
        (
            "307 to another host",
            vec![Fault::every(Endpoint::File, FaultKind::RedirectOtherHost)],
        ),
        (
            "token expires mid-download",
            vec![Fault::nth(Endpoint::File, 3, FaultKind::ExpireToken)],
        ),
        (
            "files expire: the job restarts",
            vec![Fault::nth(Endpoint::File, 2, FaultKind::ExpireFiles)],
        ),
        (
            "a partial manifest",
            vec![Fault::nth(Endpoint::Kickoff, 1, FaultKind::PartialManifest)],
        ),
        (
            "count mismatch",
            vec![Fault::nth(Endpoint::Kickoff, 1, FaultKind::CountMismatch)],
        ),
    ];
    for (name, faults) in cases {
        let h = harness(4, |c| {
            c.max_lines_per_file = 300;
            c.faults = faults.clone();
        })
        .await;
        let pulled = h
            .pull(&system())
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let staged = Staged::read(&pulled);
        let want = h.snapshot(&pulled.manifest.transaction_time);
        assert_eq!(staged.duplicates(), 0, "{name}: nothing twice");
        assert_eq!(staged.newest(), want, "{name}: the snapshot, exactly");
        let reqs = h.mock.ehr.requests();
        let other: Vec<_> = reqs.iter().filter(|r| r.other_host).collect();
        assert!(
            other.iter().all(|r| !r.had_authorization),
            "{name}: no token sent to another host"
        );
        if name.starts_with("307") {
            assert!(!other.is_empty(), "the redirect was followed");
        }
        if name.starts_with("files expire") {
            assert_eq!(pulled.restarts, 1, "{name}: one restart");
        }
        if name.starts_with("token expires") {
            let tokens = reqs.iter().filter(|r| r.path.contains("/token")).count();
            assert_eq!(tokens, 2, "{name}: renewed exactly once");
        }
        if name.starts_with("count mismatch") {
            assert!(
                pulled.files.iter().any(|f| f.done.count_mismatch.is_some()),
                "{name}: reported"
            );
        }
    }
}

/// Faults that change what the export holds: the client keeps everything
/// the server sent (the ingest path decides what wins).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_exports_are_staged_whole() {
    // Duplicate ids: both copies staged, the newest is the snapshot's.
    let h = harness(4, |c| {
        c.faults = vec![Fault::nth(Endpoint::Kickoff, 1, FaultKind::DuplicateIds)]
    })
    .await;
    let pulled = h.pull(&system()).await.unwrap();
    let staged = Staged::read(&pulled);
    assert_eq!(
        staged.duplicates(),
        1,
        "the duplicate is kept for the ingest path to decide"
    );
    assert_eq!(
        staged.newest(),
        h.snapshot(&pulled.manifest.transaction_time)
    );

    // A resource of another type in a file: staged as it is.
    let h = harness(4, |c| {
        c.faults = vec![Fault::nth(Endpoint::Kickoff, 1, FaultKind::WrongType)]
    })
    .await;
    let pulled = h.pull(&system()).await.unwrap();
    let staged = Staged::read(&pulled);
    assert_eq!(
        staged.newest(),
        h.snapshot(&pulled.manifest.transaction_time)
    );

    // One resource per file: thousands of files, each checkpointed.
    let h = harness(2, |c| {
        c.faults = vec![Fault::nth(Endpoint::Kickoff, 1, FaultKind::TinyFiles)]
    })
    .await;
    let pulled = assert_exact(&h, &system()).await;
    let resources = h.snapshot(&pulled.manifest.transaction_time).len();
    assert!(resources > 100);
    assert_eq!(pulled.files.len(), resources, "one file per resource");

    // One line of 8 MB.
    let h = harness(2, |c| {
        c.faults = vec![Fault::nth(
            Endpoint::Kickoff,
            1,
            FaultKind::HugeLine { bytes: 8 << 20 },
        )]
    })
    .await;
    let pulled = h.pull(&system()).await.unwrap();
    let staged = Staged::read(&pulled);
    let longest = pulled
        .files
        .iter()
        .flat_map(|f| read_text(&f.path).lines().map(str::len).collect::<Vec<_>>())
        .max()
        .unwrap_or(0);
    assert!(
        longest > 8 << 20,
        "the huge line arrived whole ({longest} bytes)"
    );
    let want = h.snapshot(&pulled.manifest.transaction_time);
    for (k, v) in &want {
        assert_eq!(staged.newest().get(k), Some(v), "{k:?}");
    }
}

/// A pull that fails part-way resumes from the saved status URL and the
/// files already done: no second kick-off, no file downloaded twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_pull_resumes_from_its_checkpoint() {
    let h = harness(4, |c| {
        c.max_lines_per_file = 100;
        // The 6th file download is refused for good (400 is not retried).
        c.faults = vec![Fault {
            times: 1,
            ..Fault::nth(
                Endpoint::File,
                6,
                FaultKind::Status {
                    code: 400,
                    retry_after: None,
                },
            )
        }];
    })
    .await;
    let first = h.pull(&system()).await;
    assert!(first.is_err(), "the first run fails");
    let saved = h.store().load().await.unwrap().unwrap();
    let job = saved.bulk_job.clone().expect("the job is saved");
    assert!(job.manifest.is_some(), "with its manifest");
    let done_before = job.files.len();
    assert!(
        done_before >= 4,
        "files done before the failure are checkpointed: {done_before}"
    );
    let pulled = h.pull(&system()).await.unwrap();
    assert_eq!(pulled.status_url, job.status_url, "the same export");
    let reqs = h.mock.ehr.requests();
    assert_eq!(
        reqs.iter().filter(|r| r.path.contains("$export")).count(),
        1,
        "one kick-off"
    );
    let file_gets = reqs.iter().filter(|r| r.path.contains("/files/")).count();
    assert_eq!(
        file_gets,
        pulled.files.len() + 1,
        "each file fetched once (plus the refused one)"
    );
    let staged = Staged::read(&pulled);
    assert_eq!(
        staged.newest(),
        h.snapshot(&pulled.manifest.transaction_time)
    );
}

/// The `_since` invariant: with writes during the export, every version
/// current at either transactionTime lands exactly once across
/// `pull(t0)` and `pull(since = transactionTime)`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_catches_every_change_exactly_once() {
    let h = harness(6, |c| {
        c.changes_per_tick = 15;
        // Data changes while the export runs and between the pulls.
        c.auto_tick_every = Some(3);
        c.export_delay_polls = 4;
    })
    .await;
    let first = h.pull(&system()).await.unwrap();
    let t0 = first.manifest.transaction_time.clone();
    let s1 = Staged::read(&first);
    assert_eq!(
        s1.newest(),
        h.snapshot(&t0),
        "pull(t0) is the snapshot at t0"
    );
    h.mock.ehr.tick();
    let mut req = system();
    req.since = Some(t0.clone());
    let second = h.pull(&req).await.unwrap();
    let t1 = second.manifest.transaction_time.clone();
    assert!(t1 > t0);
    let s2 = Staged::read(&second);
    // Apply pull 2 over pull 1: the snapshot at t1.
    let mut merged = s1.newest();
    for (k, v) in s2.newest() {
        merged.insert(k, v);
    }
    for k in &s2.deletes {
        merged.remove(k);
    }
    assert_eq!(
        merged,
        h.snapshot(&t1),
        "pull(t0) + pull(since t0) = the snapshot at t1"
    );
    // Exactly once: no version is in both pulls.
    let v1: std::collections::BTreeSet<_> = s1.resources.iter().collect();
    assert!(
        s2.resources.iter().all(|kv| !v1.contains(kv)),
        "no version landed twice"
    );
    assert!(
        !s2.resources.is_empty() && !s2.deletes.is_empty(),
        "changes and deletes were exported"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_deletes_the_job() {
    let h = harness(2, |c| c.export_delay_polls = 1000).await;
    let client = h.bulk_client().await;
    let status = client.kickoff(&system()).await.unwrap();
    client.cancel(&status).await.unwrap();
    let e = client
        .poll(&status, &PullProgress::default())
        .await
        .unwrap_err();
    assert!(
        matches!(e, ConnectError::Expired { status: 404, .. }),
        "{e}"
    );
}

/// REST: the first pull searches, the next reads `_history` and sees
/// changes and deletes; within each pull the newest version of a key is
/// the one the server has now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_pull_searches_first_then_reads_history_with_deletes() {
    let h = harness(3, |c| c.page_size = 10).await;
    let http = h.http().await;
    let store = h.store();
    let mut state = ConnectorState {
        name: "ehr".into(),
        ..ConnectorState::default()
    };
    let types = vec![
        "Patient".to_owned(),
        "Condition".to_owned(),
        "Encounter".to_owned(),
    ];
    let opts = RestOptions {
        page_size: 10,
        ..RestOptions::default()
    };
    let pull = RestPull::new(
        http,
        &h.mock.fhir_base,
        &store,
        h.staging(),
        Arc::new(PullProgress::default()),
        opts.clone(),
    )
    .unwrap();
    let caps = pull.capabilities().await.unwrap();
    let first = pull.run(&mut state, &types, &caps, None).await.unwrap();
    assert!(first.modes.values().all(|m| *m == Mode::Search));
    assert!(first.pages > 3, "several pages followed: {}", first.pages);
    let mut have: BTreeMap<Key, u64> = BTreeMap::new();
    read_rest(&first.files, &mut have);
    let now = h.mock.ehr.now();
    let want: BTreeMap<Key, u64> = h
        .snapshot(&now)
        .into_iter()
        .filter(|((t, _), _)| types.contains(t))
        .collect();
    assert_eq!(have, want, "the first pull is the server's state");
    pull.finish(&mut state).await.unwrap();
    assert!(
        state
            .rest
            .values()
            .all(|c| c.watermark.is_some() && !c.in_progress)
    );

    for _ in 0..3 {
        h.mock.ehr.tick();
    }
    let second = pull.run(&mut state, &types, &caps, None).await.unwrap();
    assert!(second.modes.values().all(|m| *m == Mode::History));
    read_rest(&second.files, &mut have);
    let now = h.mock.ehr.now();
    let want: BTreeMap<Key, u64> = h
        .snapshot(&now)
        .into_iter()
        .filter(|((t, _), _)| types.contains(t))
        .collect();
    assert_eq!(
        have, want,
        "after the delta: the server's state, deletes included"
    );
    pull.finish(&mut state).await.unwrap();
}

/// Applies staged REST pages in order: history Bundles newest first (the
/// newest version of a key wins), deletes remove.
fn read_rest(files: &[PathBuf], have: &mut BTreeMap<Key, u64>) {
    // Per key: the newest (version, deleted) seen in this pull.
    let mut newest: BTreeMap<Key, (u64, bool)> = BTreeMap::new();
    let mut note = |k: Key, v: u64, deleted: bool| {
        let e = newest.entry(k).or_insert((v, deleted));
        if v > e.0 {
            *e = (v, deleted);
        }
    };
    for f in files {
        for line in read_text(f).lines().filter(|l| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line).unwrap();
            if v["resourceType"] == "Bundle" {
                for e in v["entry"].as_array().into_iter().flatten() {
                    if e["request"]["method"] == "DELETE" {
                        let etag = e["response"]["etag"].as_str().unwrap_or("");
                        let ver = etag
                            .trim_start_matches("W/")
                            .trim_matches('"')
                            .parse()
                            .unwrap_or(u64::MAX);
                        for k in delete_keys(&serde_json::json!({"entry": [e]})) {
                            note(k, ver, true);
                        }
                    } else {
                        let (k, ver) = key_version(&e["resource"]);
                        note(k, ver, false);
                    }
                }
            } else {
                let (k, ver) = key_version(&v);
                note(k, ver, false);
            }
        }
    }
    for (k, (v, deleted)) in newest {
        if deleted {
            have.remove(&k);
        } else {
            have.insert(k, v);
        }
    }
}
