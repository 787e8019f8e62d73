//! The audit trail: one record per request, hash-chained, durable before
//! the response completes.
//!
//! # What this crate owns
//! * [`AuditEntry`]: what happened (who, purpose, what was asked, the
//!   decision and its rules, rows returned, fields removed, status, time).
//! * [`AuditRecord`]: an entry with its place in the chain: a sequence
//!   number, the previous record's hash and its own,
//!   `sha256(prev_hash ‖ canonical JSON of the record with hash = "")`.
//! * [`AuditLog`]: the writer. Each server process writes its own chain
//!   (`audit/log/<chain>/`, the chain named by its start time and a random
//!   suffix), so several servers can share a lake. A chain begins with a
//!   header (`chain.json`) that records the end of every other chain at
//!   that moment (its *witnesses*); the header's hash is the first
//!   record's `prev_hash`. Entries are chained and written in groups
//!   (every request waiting at that moment) by one task; `record` returns
//!   once the group is on disk (`fdatasync`) or in the object store (one
//!   object per group), as NDJSON segments named by their first sequence
//!   number.
//! * [`verify`]: re-reads every chain and names the first record that was
//!   changed, removed, reordered or inserted; a chain deleted whole is
//!   caught by the witnesses of the chains started after it.
//! * [`audit_event`]: a record as a FHIR R4 AuditEvent.
//!
//! # What it may call
//! `object_store` (the lake's store, given by the caller), `tokio`, serde,
//! sha2. No query engine: the server and the CLI depend on this crate, not
//! the other way round.
//!

use std::path::PathBuf;
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

/// Where the segments live, relative to the lake root.
pub const AUDIT_DIR: &str = "audit/log";

/// What happened in one request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    /// When the request arrived (RFC 3339, UTC, microseconds).
    pub time: String,
    /// The token's subject and issuer; `None` when no valid token came.
    pub subject: Option<String>,
    pub issuer: Option<String>,
    pub client: Option<String>,
    /// The purpose of use the request stated.
    pub purpose: Option<String>,
    pub method: String,
    pub path: String,
    /// The query string with its parameters sorted, plus the body's
    /// SHA-256 for requests with one (`body=sha256:...`).
    pub query: String,
    /// SHA-256 of method, path and normalised query: equal requests share it.
    pub query_hash: String,
    pub status: u16,
    /// `allow`, `deny` (a policy or scope refused), `unauthenticated`,
    /// `invalid` (another 4xx) or `error` (5xx).
    pub decision: String,
    /// The policy rules behind the decisions the request needed.
    pub rules: Vec<String>,
    /// The resource types the request was decided for.
    pub resource_types: Vec<String>,
    /// Rows (objects, resources, view rows) in the answer; `None` in a
    /// stream's first record, written before its rows are known (its
    /// second record, decision `stream complete` or `stream aborted`, has them).
    pub rows: Option<u64>,
    /// The patients whose rows the answer holds, when there are at most 20
    /// (else only `patient_count`).
    pub patients: Vec<String>,
    /// How many distinct patients the answer holds; `None` when not known
    /// (a stream's first record, aggregates, more than 100,000).
    pub patient_count: Option<u64>,
    /// Element paths hidden from the answer by policy (`Patient.telecom`).
    pub fields_removed: Vec<String>,
    /// Microseconds from the request's arrival to its record (an integer:
    /// the record must serialise identically after a round trip, and JSON
    /// floats need not).
    pub duration_us: u64,
    // Fields added later are optional and left out when empty, so records
    // written before them re-serialise (and hash) exactly as written.
    /// One id per request: a slow request's `started` record and its final
    /// record share it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The token's `purpose_of_use` claim, as a list; `None` when the token
    /// has no such claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose_claim: Option<Vec<String>>,
    /// The `X-Purpose-Of-Use` header as the request sent it (`purpose` is
    /// the one in force).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose_header: Option<String>,
    /// The token's SMART `patient` claim: the patient it is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient_binding: Option<String>,
    /// The token's scopes, as it stated them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// The roles the token's `roles` claim asserts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    /// Why the request was refused (the token check, the policy's denial),
    /// in full; the client's answer says less.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A read by key of a resource outside the principal's rows: answered
    /// like a missing id (404), marked here.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub out_of_scope: bool,
}

/// An entry in the chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    /// The writer's chain.
    pub chain: String,
    pub seq: u64,
    #[serde(flatten)]
    pub entry: AuditEntry,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditRecord {
    /// The hash this record must carry.
    pub fn compute_hash(&self) -> String {
        let mut unhashed = self.clone();
        unhashed.hash = String::new();
        let body = serde_json::to_vec(&unhashed).unwrap_or_default();
        let mut h = Sha256::new();
        h.update(self.prev_hash.as_bytes());
        h.update(b"\n");
        h.update(&body);
        hex::encode(h.finalize())
    }
}

/// Why the trail could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit trail {path}: {message}")]
    Io { path: String, message: String },
    #[error("the audit writer has stopped")]
    Stopped,
}

fn io_err(path: &str, e: impl std::fmt::Display) -> AuditError {
    AuditError::Io {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// The first record that breaks the chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{segment} line {line} (record {seq}): {reason}")]
pub struct ChainBreak {
    /// `<chain>/<segment file>`.
    pub segment: String,
    pub line: usize,
    /// The sequence number expected at that place.
    pub seq: u64,
    pub reason: String,
}

/// What a sound trail holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub chains: usize,
    pub segments: usize,
    pub records: u64,
    /// The last segment ends in a partial line: a write cut short by a
    /// crash. It was never acknowledged, so no response carried it; the
    /// next `atlas serve` start removes it.
    pub torn_tail: bool,
    /// Each chain's end (`chain`, last `seq`, its hash): keep them
    /// elsewhere to detect later that a newest chain was cut or deleted
    /// (nothing after it witnesses it yet).
    pub heads: Vec<(String, u64, String)>,
}

/// The first line of a chain: who started it, when, and where every other
/// chain ended at that moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainHeader {
    pub chain: String,
    pub started: String,
    pub witnesses: Vec<Witness>,
}

/// Another chain's end, as seen by a chain's header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Witness {
    pub chain: String,
    pub seq: u64,
    pub hash: String,
}

/// Where the segments are.
#[derive(Clone)]
pub struct AuditStore {
    store: Arc<dyn ObjectStore>,
    /// `<lake>/audit/log` in the store.
    prefix: ObjPath,
    /// The same directory on local disk, when the lake is local: segments
    /// are then appended and `fdatasync`ed instead of put per group.
    local: Option<PathBuf>,
}

impl AuditStore {
    /// `lake_prefix` is the lake root in `store`; `local_root` the lake's
    /// directory when it is on local disk.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        lake_prefix: &ObjPath,
        local_root: Option<PathBuf>,
    ) -> AuditStore {
        let mut prefix = lake_prefix.clone();
        for part in AUDIT_DIR.split('/') {
            prefix = prefix.clone().join(part);
        }
        AuditStore {
            store,
            prefix,
            local: local_root.map(|r| r.join(AUDIT_DIR)),
        }
    }

    /// The store of one chain.
    fn chain(&self, name: &str) -> AuditStore {
        AuditStore {
            store: self.store.clone(),
            prefix: self.prefix.clone().join(name),
            local: self.local.as_ref().map(|l| l.join(name)),
        }
    }

    /// The chains, oldest first (names start with the start time).
    async fn chains(&self) -> Result<Vec<String>, AuditError> {
        let listed = self
            .store
            .list_with_delimiter(Some(&self.prefix))
            .await
            .map_err(|e| io_err(self.prefix.as_ref(), e))?;
        let mut names: Vec<String> = listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_owned))
            .collect();
        names.sort();
        Ok(names)
    }

    fn header_path(&self) -> ObjPath {
        self.prefix.clone().join("chain.json")
    }

    fn segment_name(first_seq: u64) -> String {
        format!("{first_seq:020}.ndjson")
    }

    /// The segments, in chain order (by name: the first sequence number).
    async fn segments(&self) -> Result<Vec<ObjPath>, AuditError> {
        let mut list: Vec<ObjPath> = self
            .store
            .list(Some(&self.prefix))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(|e| io_err(self.prefix.as_ref(), e))?;
        list.retain(|p| p.filename().is_some_and(|f| f.ends_with(".ndjson")));
        list.sort();
        Ok(list)
    }

    async fn read(&self, p: &ObjPath) -> Result<String, AuditError> {
        let bytes = self
            .store
            .get(p)
            .await
            .map_err(|e| io_err(p.as_ref(), e))?
            .bytes()
            .await
            .map_err(|e| io_err(p.as_ref(), e))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// The chain's end as the writer last saw it, kept next to the segments
/// (`audit/checkpoint.json`) so that records cut off the end are noticed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: u64,
    pub hash: String,
    pub time: String,
}

impl AuditStore {
    fn checkpoint_path(&self) -> ObjPath {
        self.prefix.clone().join("checkpoint.json")
    }

    async fn checkpoint(&self) -> Result<Option<Checkpoint>, AuditError> {
        let p = self.checkpoint_path();
        match self.store.get(&p).await {
            Ok(r) => {
                let b = r.bytes().await.map_err(|e| io_err(p.as_ref(), e))?;
                serde_json::from_slice(&b)
                    .map(Some)
                    .map_err(|e| io_err(p.as_ref(), e))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(io_err(p.as_ref(), e)),
        }
    }

    async fn write_checkpoint(&self, head: &Head) -> Result<(), String> {
        let c = Checkpoint {
            seq: head.seq,
            hash: head.hash.clone(),
            time: now_rfc3339(),
        };
        let bytes = serde_json::to_vec(&c).map_err(|e| e.to_string())?;
        self.store
            .put(&self.checkpoint_path(), PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// One chain checked: what it holds, or where it breaks.
struct ChainCheck {
    segments: usize,
    torn_tail: bool,
    /// The hash of record `i + 1`.
    hashes: Vec<String>,
}

async fn verify_chain(
    store: &AuditStore,
    name: &str,
    genesis: &str,
) -> Result<Result<ChainCheck, ChainBreak>, AuditError> {
    let segments = store.segments().await?;
    let mut hashes = Vec::new();
    let checkpoint = store.checkpoint().await?;
    let mut at_checkpoint: Option<String> = None;
    let mut expected = 1u64;
    let mut prev = genesis.to_owned();
    let mut torn_tail = false;
    for (k, seg) in segments.iter().enumerate() {
        let seg_name = format!("{name}/{}", seg.filename().unwrap_or_default());
        let mut text = store.read(seg).await?;
        if k + 1 == segments.len() && !text.is_empty() && !text.ends_with('\n') {
            let cut = text.rfind('\n').map_or(0, |i| i + 1);
            if serde_json::from_str::<AuditRecord>(&text[cut..]).is_err() {
                torn_tail = true;
                text.truncate(cut);
            }
        }
        let brk = |line: usize, seq: u64, reason: String| ChainBreak {
            segment: seg_name.clone(),
            line,
            seq,
            reason,
        };
        if seg.filename() != Some(AuditStore::segment_name(expected).as_str()) {
            return Ok(Err(brk(
                1,
                expected,
                format!(
                    "the segment should start at record {expected}: records are missing, reordered or inserted"
                ),
            )));
        }
        for (i, line) in text.lines().enumerate() {
            let rec: AuditRecord = match serde_json::from_str(line) {
                Ok(r) => r,
                Err(e) => return Ok(Err(brk(i + 1, expected, format!("not a record: {e}")))),
            };
            if rec.seq != expected || rec.chain != name {
                return Ok(Err(brk(
                    i + 1,
                    expected,
                    format!(
                        "found record {} of chain {} here: records are missing, reordered or inserted",
                        rec.seq, rec.chain
                    ),
                )));
            }
            if rec.prev_hash != prev {
                return Ok(Err(brk(
                    i + 1,
                    expected,
                    "its prev_hash is not the previous record's hash: the record before it was changed, removed or reordered".into(),
                )));
            }
            if rec.compute_hash() != rec.hash {
                return Ok(Err(brk(
                    i + 1,
                    expected,
                    "its content does not match its hash: the record was changed".into(),
                )));
            }
            if checkpoint.as_ref().is_some_and(|c| c.seq == rec.seq) {
                at_checkpoint = Some(rec.hash.clone());
            }
            hashes.push(rec.hash.clone());
            prev = rec.hash;
            expected += 1;
        }
    }
    if let Some(c) = checkpoint.as_ref().filter(|c| c.seq > 0) {
        let last = format!(
            "{name}/{}",
            segments
                .last()
                .and_then(|s| s.filename())
                .unwrap_or("(no segment)")
        );
        if c.seq >= expected {
            return Ok(Err(ChainBreak {
                segment: last,
                line: 0,
                seq: expected,
                reason: format!(
                    "the trail ends at record {} but the writer's checkpoint ({}) says it reached record {}: records were removed from the end",
                    expected - 1,
                    c.time,
                    c.seq
                ),
            }));
        }
        if at_checkpoint.as_deref() != Some(c.hash.as_str()) {
            return Ok(Err(ChainBreak {
                segment: last,
                line: 0,
                seq: c.seq,
                reason: "the record at the writer's checkpoint has another hash: the trail was rewritten".into(),
            }));
        }
    }
    Ok(Ok(ChainCheck {
        segments: segments.len(),
        torn_tail,
        hashes,
    }))
}

/// The SHA-256 of a chain's header bytes: its first record's `prev_hash`.
fn genesis_of(header: &[u8]) -> String {
    hex::encode(Sha256::digest(header))
}

/// Re-reads the whole trail. In each chain: the header is there and its
/// hash is the first record's `prev_hash`; sequence numbers run on without
/// gaps from 1; each record names the previous one's hash; each hash
/// matches its record; the chain reaches its writer's last checkpoint with
/// the same hash. Across chains: every witness in a header names a chain
/// that exists and holds that record with that hash. The first thing that
/// does not hold is named.
pub async fn verify(root: &AuditStore) -> Result<Result<VerifyReport, ChainBreak>, AuditError> {
    let mut checked: Vec<(String, ChainHeader, ChainCheck)> = Vec::new();
    for name in root.chains().await? {
        let chain = root.chain(&name);
        let header_bytes = match chain.store.get(&chain.header_path()).await {
            Ok(r) => r
                .bytes()
                .await
                .map_err(|e| io_err(chain.header_path().as_ref(), e))?,
            Err(object_store::Error::NotFound { .. }) => {
                return Ok(Err(ChainBreak {
                    segment: format!("{name}/chain.json"),
                    line: 0,
                    seq: 0,
                    reason: "the chain's header is missing".into(),
                }));
            }
            Err(e) => return Err(io_err(chain.header_path().as_ref(), e)),
        };
        let header: ChainHeader = match serde_json::from_slice(&header_bytes) {
            Ok(h) => h,
            Err(e) => {
                return Ok(Err(ChainBreak {
                    segment: format!("{name}/chain.json"),
                    line: 0,
                    seq: 0,
                    reason: format!("the chain's header is not a header: {e}"),
                }));
            }
        };
        match verify_chain(&chain, &name, &genesis_of(&header_bytes)).await? {
            Ok(c) => checked.push((name, header, c)),
            Err(b) => return Ok(Err(b)),
        }
    }
    for (name, header, _) in &checked {
        for w in &header.witnesses {
            let seen = checked
                .iter()
                .find(|(n, _, _)| *n == w.chain)
                .map(|(_, _, c)| c.hashes.get(w.seq.wrapping_sub(1) as usize).cloned());
            let ok = match seen {
                None => false,
                Some(h) => w.seq == 0 || h.as_deref() == Some(w.hash.as_str()),
            };
            if !ok {
                return Ok(Err(ChainBreak {
                    segment: format!("{}/chain.json", name),
                    line: 0,
                    seq: w.seq,
                    reason: format!(
                        "chain {name} saw chain {} reach record {} with hash {}, and that record is no longer there: the chain was deleted, cut or rewritten",
                        w.chain, w.seq, w.hash
                    ),
                }));
            }
        }
    }
    Ok(Ok(VerifyReport {
        chains: checked.len(),
        segments: checked.iter().map(|c| c.2.segments).sum(),
        records: checked.iter().map(|c| c.2.hashes.len() as u64).sum(),
        torn_tail: checked.iter().any(|c| c.2.torn_tail),
        heads: checked
            .iter()
            .map(|(n, h, c)| {
                (
                    n.clone(),
                    c.hashes.len() as u64,
                    c.hashes.last().cloned().unwrap_or_else(|| h.chain.clone()),
                )
            })
            .collect(),
    }))
}

/// Every record, in chain order (for export).
pub async fn records(root: &AuditStore) -> Result<Vec<AuditRecord>, AuditError> {
    let mut out = Vec::new();
    for name in root.chains().await? {
        let chain = root.chain(&name);
        for seg in chain.segments().await? {
            let text = chain.read(&seg).await?;
            for line in text.lines() {
                match serde_json::from_str(line) {
                    Ok(r) => out.push(r),
                    // A torn last line (a crash mid-write) was never
                    // acknowledged; anything else is an error.
                    Err(_) if !text.ends_with('\n') && text.ends_with(line) => {}
                    Err(e) => return Err(io_err(seg.as_ref(), e)),
                }
            }
        }
    }
    Ok(out)
}

type Pending = (AuditEntry, oneshot::Sender<Result<u64, String>>);

/// Where a chain ends now: its last complete record (a torn last line was
/// never acknowledged).
async fn chain_end(chain: &AuditStore) -> Result<(u64, String), AuditError> {
    let Some(last) = chain.segments().await?.last().cloned() else {
        return Ok((0, String::new()));
    };
    let text = chain.read(&last).await?;
    for line in text.lines().rev() {
        if let Ok(r) = serde_json::from_str::<AuditRecord>(line) {
            return Ok((r.seq, r.hash));
        }
    }
    Ok((0, String::new()))
}

/// The writer: chains entries and writes them before acknowledging. The
/// writing happens on a thread of its own (on a local lake the appends and
/// `fdatasync`s then cost no hop through tokio's blocking pool).
pub struct AuditLog {
    tx: std::sync::mpsc::Sender<Pending>,
}

/// The chain's end.
struct Head {
    seq: u64,
    hash: String,
}

impl AuditLog {
    /// Starts this process's chain (its header witnessing where every
    /// other chain ends now) and the writer task.
    pub async fn open(store: AuditStore) -> Result<AuditLog, AuditError> {
        Self::open_with(store, std::time::Duration::from_secs(1)).await
    }

    /// [`AuditLog::open`], writing the checkpoint at most every `every`
    /// (and whenever the log falls idle for that long).
    pub async fn open_with(
        root: AuditStore,
        every: std::time::Duration,
    ) -> Result<AuditLog, AuditError> {
        use std::hash::{BuildHasher, Hasher};
        let micros = chrono::Utc::now().timestamp_micros().max(0);
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let name = format!("{micros:020}-{random:016x}");
        let mut witnesses = Vec::new();
        for other in root.chains().await? {
            let (seq, hash) = chain_end(&root.chain(&other)).await?;
            witnesses.push(Witness {
                chain: other,
                seq,
                hash,
            });
        }
        let header = ChainHeader {
            chain: name.clone(),
            started: now_rfc3339(),
            witnesses,
        };
        let bytes = serde_json::to_vec(&header).map_err(|e| io_err(&name, e))?;
        let chain = root.chain(&name);
        match &chain.local {
            Some(dir) => {
                let dir = dir.clone();
                let b = bytes.clone();
                tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                    use std::io::Write;
                    std::fs::create_dir_all(&dir)?;
                    let mut f = std::fs::OpenOptions::new()
                        .create_new(true)
                        .write(true)
                        .open(dir.join("chain.json"))?;
                    f.write_all(&b)?;
                    f.sync_all()?;
                    std::fs::File::open(&dir)?.sync_all()?;
                    if let Some(parent) = dir.parent() {
                        std::fs::File::open(parent)?.sync_all()?;
                    }
                    Ok(())
                })
                .await
                .map_err(|e| io_err(&name, e))?
                .map_err(|e| io_err(&name, e))?;
            }
            None => {
                let opts = PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                };
                chain
                    .store
                    .put_opts(&chain.header_path(), PutPayload::from(bytes.clone()), opts)
                    .await
                    .map_err(|e| io_err(chain.header_path().as_ref(), e))?;
            }
        }
        let head = Head {
            seq: 0,
            hash: genesis_of(&bytes),
        };
        let sink = match chain.local.clone() {
            Some(dir) => Sink::Local { dir, file: None },
            None => Sink::Objects {
                chain,
                runtime: tokio::runtime::Handle::current(),
            },
        };
        let (tx, rx) = std::sync::mpsc::channel::<Pending>();
        std::thread::Builder::new()
            .name("atlas-audit".into())
            .spawn(move || write_loop(sink, name, head, rx, every))
            .map_err(|e| io_err(AUDIT_DIR, e))?;
        Ok(AuditLog { tx })
    }

    /// Chains and writes one entry; returns its sequence number once it is
    /// durable.
    pub async fn record(&self, entry: AuditEntry) -> Result<u64, AuditError> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send((entry, ack))
            .map_err(|_| AuditError::Stopped)?;
        match done.await {
            Ok(Ok(seq)) => Ok(seq),
            Ok(Err(message)) => Err(AuditError::Io {
                path: AUDIT_DIR.into(),
                message,
            }),
            Err(_) => Err(AuditError::Stopped),
        }
    }
}

/// Chains a group after `head`: (last seq, last hash, the NDJSON lines).
fn chain_group(chain: &str, head: &Head, group: &[Pending]) -> (u64, String, Vec<u8>) {
    let mut seq = head.seq;
    let mut prev = head.hash.clone();
    let mut bytes = Vec::with_capacity(group.len() * 1024);
    for (entry, _) in group {
        seq += 1;
        let mut rec = AuditRecord {
            chain: chain.to_owned(),
            seq,
            entry: entry.clone(),
            prev_hash: prev,
            hash: String::new(),
        };
        rec.hash = rec.compute_hash();
        if let Ok(line) = serde_json::to_vec(&rec) {
            bytes.extend_from_slice(&line);
            bytes.push(b'\n');
        }
        prev = rec.hash;
    }
    (seq, prev, bytes)
}

/// Where a chain's groups and checkpoints are written.
enum Sink {
    /// A local lake: this process's segment, appended and `fdatasync`ed.
    Local {
        dir: PathBuf,
        file: Option<std::fs::File>,
    },
    /// An object store: one object per group.
    Objects {
        chain: AuditStore,
        runtime: tokio::runtime::Handle,
    },
}

impl Sink {
    /// Writes a group durably; `start` is its first sequence number.
    fn append(&mut self, start: u64, bytes: Vec<u8>) -> Result<(), String> {
        use std::io::Write;
        match self {
            Sink::Local { dir, file } => {
                if file.is_none() {
                    let path = dir.join(AuditStore::segment_name(start));
                    let f = std::fs::OpenOptions::new()
                        .create_new(true)
                        .append(true)
                        .open(&path)
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    // The new name must survive a crash too.
                    std::fs::File::open(&*dir)
                        .and_then(|d| d.sync_all())
                        .map_err(|e| format!("{}: {e}", dir.display()))?;
                    *file = Some(f);
                }
                let f = file.as_mut().ok_or("no open segment")?;
                let r = f
                    .write_all(&bytes)
                    .and_then(|_| f.sync_data())
                    .map_err(|e| e.to_string());
                if r.is_err() {
                    // A failed append may have left part of the group: the
                    // next group starts a new segment (a partial line left
                    // behind is reported by verify).
                    *file = None;
                }
                r
            }
            Sink::Objects { chain, runtime } => {
                let path = chain.prefix.clone().join(AuditStore::segment_name(start));
                let opts = PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                };
                runtime
                    .block_on(chain.store.put_opts(&path, PutPayload::from(bytes), opts))
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        }
    }

    fn checkpoint(&mut self, head: &Head) -> Result<(), String> {
        match self {
            Sink::Local { dir, .. } => {
                let c = Checkpoint {
                    seq: head.seq,
                    hash: head.hash.clone(),
                    time: now_rfc3339(),
                };
                let tmp = dir.join("checkpoint.json.tmp");
                std::fs::write(&tmp, serde_json::to_vec(&c).map_err(|e| e.to_string())?)
                    .and_then(|_| std::fs::rename(&tmp, dir.join("checkpoint.json")))
                    .map_err(|e| e.to_string())
            }
            Sink::Objects { chain, runtime } => runtime.block_on(chain.write_checkpoint(head)),
        }
    }
}

/// The writer thread: takes every entry waiting, chains them as a group,
/// writes the group, then acknowledges; keeps the checkpoint current (after
/// a group when `every` has passed, and when idle for `every`).
fn write_loop(
    mut sink: Sink,
    chain: String,
    mut head: Head,
    rx: std::sync::mpsc::Receiver<Pending>,
    every: std::time::Duration,
) {
    use std::sync::mpsc::RecvTimeoutError;
    let mut checkpointed = head.seq;
    let mut last_checkpoint = std::time::Instant::now();
    let checkpoint =
        |sink: &mut Sink, head: &Head, checkpointed: &mut u64| match sink.checkpoint(head) {
            Ok(()) => *checkpointed = head.seq,
            Err(e) => tracing::warn!("audit checkpoint not written: {e}"),
        };
    loop {
        let first = match rx.recv_timeout(every.max(std::time::Duration::from_millis(10))) {
            Ok(p) => p,
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                if checkpointed != head.seq {
                    checkpoint(&mut sink, &head, &mut checkpointed);
                    last_checkpoint = std::time::Instant::now();
                }
                continue;
            }
        };
        let mut group = vec![first];
        while group.len() < 4096 {
            match rx.try_recv() {
                Ok(p) => group.push(p),
                Err(_) => break,
            }
        }
        let start = head.seq + 1;
        let (seq, prev, bytes) = chain_group(&chain, &head, &group);
        match sink.append(start, bytes) {
            Ok(()) => {
                head = Head { seq, hash: prev };
                if last_checkpoint.elapsed() >= every {
                    checkpoint(&mut sink, &head, &mut checkpointed);
                    last_checkpoint = std::time::Instant::now();
                }
                for (i, (_, ack)) in group.into_iter().enumerate() {
                    let _ = ack.send(Ok(start + i as u64));
                }
            }
            Err(e) => {
                tracing::error!("audit records {start}..={seq} not written: {e}");
                for (_, ack) in group {
                    let _ = ack.send(Err(e.clone()));
                }
            }
        }
    }
    if checkpointed != head.seq {
        checkpoint(&mut sink, &head, &mut checkpointed);
    }
}

/// The record as a FHIR R4 AuditEvent (DICOM audit vocabulary, as the
/// AuditEvent resource uses it): a RESTful query or read, its outcome, the
/// agent with its purpose of use, and the query as an entity.
pub fn audit_event(r: &AuditRecord) -> serde_json::Value {
    use serde_json::json;
    let e = &r.entry;
    let read = e.method == "GET" && !e.query.contains('=') && e.path.matches('/').count() >= 3;
    let outcome = match e.status {
        200..=399 => "0",
        400..=499 => "4",
        _ => "8",
    };
    let mut agent = json!({
        "requestor": true,
        "who": {"identifier": {"system": e.issuer.clone().unwrap_or_default(),
                               "value": e.subject.clone().unwrap_or_else(|| "anonymous".into())}},
    });
    if let Some(c) = &e.client {
        agent["altId"] = json!(c);
    }
    if let Some(p) = &e.purpose {
        agent["purposeOfUse"] = json!([{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": p}]}]);
    }
    let mut event = json!({
        "resourceType": "AuditEvent",
        "id": format!("atlas-audit-{}-{}", r.chain.rsplit('-').next().unwrap_or(""), r.seq),
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
                 "code": "rest", "display": "RESTful Operation"},
        "subtype": [if read {
            json!({"system": "http://hl7.org/fhir/restful-interaction", "code": "read"})
        } else {
            json!({"system": "http://hl7.org/fhir/restful-interaction", "code": "search-type"})
        }],
        "action": if e.method == "GET" || e.method == "POST" && e.path.ends_with("/graphql") { "E" } else { "R" },
        "recorded": e.time,
        "outcome": outcome,
        "outcomeDesc": format!("HTTP {} ({}{})", e.status, e.decision,
            if e.rules.is_empty() { String::new() } else { format!("; rules {}", e.rules.join(", ")) }),
        "agent": [agent],
        "source": {"observer": {"display": "atlas serve"},
                   "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4"}]},
        "entity": [{
            "what": {"display": format!("{} {}", e.method, e.path)},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2"},
            "query": base64_encode(e.query.as_bytes()),
            "detail": [
                {"type": "query_hash", "valueString": e.query_hash},
                {"type": "rows", "valueString": e.rows.map_or("streamed".into(), |n| n.to_string())},
                {"type": "chain", "valueString": format!("chain {} seq {} hash {} prev {}", r.chain, r.seq, r.hash, r.prev_hash)},
            ],
        }],
    });
    if let Some(list) = event["entity"].as_array_mut() {
        for p in &e.patients {
            list.push(json!({
                "what": {"reference": format!("Patient/{p}")},
                "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1"},
                "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1"},
            }));
        }
    }
    if let Some(d) = event["entity"][0]["detail"].as_array_mut()
        && let Some(n) = e.patient_count
    {
        d.push(json!({"type": "patient_count", "valueString": n.to_string()}));
    }
    if !e.fields_removed.is_empty()
        && let Some(d) = event["entity"][0]["detail"].as_array_mut()
    {
        d.push(json!({"type": "fields_removed", "valueString": e.fields_removed.join(", ")}));
    }
    if let Some(d) = event["entity"][0]["detail"].as_array_mut() {
        let mut extra = |k: &str, v: String| d.push(json!({"type": k, "valueString": v}));
        if let Some(v) = &e.reason {
            extra("reason", v.clone());
        }
        if let Some(v) = &e.purpose_header {
            extra("purpose_header", v.clone());
        }
        if let Some(v) = &e.purpose_claim {
            extra("purpose_claim", v.join(" "));
        }
        if let Some(v) = &e.patient_binding {
            extra("patient_binding", v.clone());
        }
        if !e.scopes.is_empty() {
            extra("scopes", e.scopes.join(" "));
        }
        if !e.roles.is_empty() {
            extra("roles", e.roles.join(" "));
        }
        if e.out_of_scope {
            extra("out_of_scope", "true".into());
        }
        if let Some(v) = &e.request_id {
            extra("request_id", v.clone());
        }
    }
    event
}

fn base64_encode(b: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if c.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

/// The request's time as the trail writes it.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

#[cfg(test)]
mod tests;
