//! One ingest run: land the inputs, classify every line, upsert the store,
//! quarantine the rest, and record the batch, so that a killed run re-run
//! with the same inputs converges to the state of an uninterrupted one.
//!
//! How that holds:
//! * The batch id is a hash of the source name and the inputs' SHA-256, and
//!   the batch's start time is saved in the landing folder on first start, so
//!   a re-run computes the same ids, timestamps and chunk boundaries.
//! * Input is cut into chunks (by stored bytes). Each chunk is one Delta commit
//!   to `quarantine` and one to `resources`, each carrying a Delta
//!   `txn` action (app id = batch, version = chunk number); a re-run skips the
//!   chunks whose `txn` is already committed and reads their counts from the
//!   landing folder, where they were written before the commits.
//! * The `batches` row is the last commit: a batch is complete when it exists.
//!   Parquet files from a killed write are never referenced by the log, so
//!   readers never see them.
//!
//! One writer at a time: a run holds the lake's writer lease
//! ([`crate::lease`]) from start to end, checks it before each commit, and
//! every commit to `resources` carries the lease's generation as a Delta
//! `txn` (`atlas-writer`) and is built on the table as this run last saw
//! it, so a commit racing another Atlas writer fails in Delta's conflict
//! check instead of adding a second live row for a key.
//!
//! Which copy wins ([`atlas_fhir::VersionStamp`]): the higher
//! `meta.versionId`, then `meta.lastUpdated`; when those tie or are missing,
//! the later batch (by start instant, kept across re-runs) and within a
//! batch the later line. Within a batch too the newest version wins, not the
//! last line: a REST `_history` Bundle lists the newest version first. A copy
//! that loses within its batch is quarantined as `duplicate_id` (whichever
//! chunk it is in); one that loses to the store is counted
//! `older_than_stored`.
//!
//! Deletions take part with the version their server reported
//! (`response.etag`, `response.lastModified`), which the tombstone row keeps
//! in `version_id` and `last_updated`. A deletion is compared on the facts
//! both sides carry ([`atlas_fhir::VersionStamp::newer_on_shared_fields`]:
//! servers often report only one of the two): a deletion older than the
//! stored version is counted `older_than_stored` and not written, and a
//! stored deletion keeps out a later-arriving copy older than it. A deletion
//! without a version is ordered by position alone (it beats the earlier lines
//! of its batch and loses to the later ones), always applies to the store,
//! and its row's `last_updated` is its batch's start, as before versions
//! were read.
//!
//! Conditional deletes (`Type?identifier=...`) the reader could not resolve
//! from the run's identifiers are resolved against the store's live rows
//! when their chunk is prepared (after the commit in flight): exactly one
//! match is deleted, none or several are quarantined
//! (`unresolved_conditional_delete`, `ambiguous_conditional_delete`).

use std::cmp::Ordering as Cmp;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Int64Builder, ListBuilder, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow::record_batch::RecordBatch;
use atlas_fhir::{Decision, FHIR_VERSION_R4, VersionStamp};
use atlas_ingest::{
    DeleteTarget, Deletion, Event, IdentifierIndex, Input, ParsedResource, ReadOptions, Reason,
    Rejection, prescan_identifiers, read_events,
};
use datafusion::prelude::{SessionContext, col, lit};
use deltalake::DeltaTable;
use deltalake::kernel::engine::arrow_conversion::TryFromArrow;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties, TableReference};
use deltalake::kernel::{Action, Add, StructType, Transaction};
use deltalake::operations::create::CreateBuilder;
use deltalake::parquet::basic::{Compression, ZstdLevel};
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::protocol::{DeltaOperation, SaveMode};
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::lake::{BATCHES, Lake, LakeError, QUARANTINE, RESOURCES};
use crate::lease::{LeaseOptions, WRITER_APP_ID, WriterLease};
use crate::schema;

/// What happened to the lines of a batch. `lines_read` always equals
/// `stored + unchanged + older_than_stored + quarantined + skipped`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcomes {
    pub lines_read: i64,
    /// New or newer resources written (deletions included).
    pub stored: i64,
    /// Identical to what the store already had (or to an earlier line of the batch).
    pub unchanged: i64,
    /// Older than the stored copy (a lower `meta.versionId` or
    /// `meta.lastUpdated`, or from an earlier batch when those tie): counted
    /// and kept out. Called `superseded` before; old manifests and the
    /// `batches` table's column keep that name.
    #[serde(alias = "superseded")]
    pub older_than_stored: i64,
    pub quarantined: i64,
    /// Empty or whitespace-only lines.
    pub skipped: i64,
    /// Of `stored`: deletions (tombstones).
    pub deleted: i64,
    /// References kept as written because they could not be resolved.
    pub unresolved_references: i64,
    /// Of `quarantined`: copies that lost to another copy of the same key in
    /// the same batch (an older version, or an earlier line when versions
    /// do not decide).
    pub duplicates: i64,
}

impl Outcomes {
    fn add(&mut self, o: &Outcomes) {
        self.lines_read += o.lines_read;
        self.stored += o.stored;
        self.unchanged += o.unchanged;
        self.older_than_stored += o.older_than_stored;
        self.quarantined += o.quarantined;
        self.skipped += o.skipped;
        self.deleted += o.deleted;
        self.unresolved_references += o.unresolved_references;
        self.duplicates += o.duplicates;
    }

    /// True when every line has exactly one outcome.
    pub fn reconciles(&self) -> bool {
        self.lines_read
            == self.stored
                + self.unchanged
                + self.older_than_stored
                + self.quarantined
                + self.skipped
    }
}

/// Live counters a caller may watch (e.g. for a progress bar).
#[derive(Debug, Default)]
pub struct Progress {
    /// Raw input bytes read.
    pub bytes: Arc<AtomicU64>,
    pub total_bytes: AtomicU64,
    /// Lines (and Bundle entries) classified.
    pub lines: Arc<AtomicU64>,
    /// 0 landing, 1 prescan, 2 ingest, 3 done.
    pub phase: AtomicU64,
}

/// Options of one ingest run.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// Names the source in `raw/<source>/...` and in every row.
    pub source: String,
    pub read: ReadOptions,
    /// Stored bytes per commit; bounds memory.
    pub chunk_bytes: usize,
    /// The inputs are the caller's private files, never changed again (a
    /// connector's staged downloads): on a local lake they are landed by a
    /// hard link instead of a copy when they sit on the same file system.
    pub link_inputs: bool,
    /// The lake's writer lease, when the caller holds it already (e.g. to
    /// wait for it, or to ingest and refresh views under one lease). Without
    /// it, `ingest` takes the lease itself and fails at once if another
    /// writer holds it.
    pub lease: Option<WriterLease>,
}

impl Default for IngestOptions {
    fn default() -> Self {
        IngestOptions {
            source: "files".into(),
            read: ReadOptions::default(),
            chunk_bytes: 48 << 20,
            link_inputs: false,
            lease: None,
        }
    }
}

/// One landed input, as recorded in the manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LandedInput {
    pub name: String,
    pub raw_path: String,
    pub sha256: String,
    pub bytes: u64,
}

/// The manifest of a batch, also written as `manifest.json` in its landing folder.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchReport {
    pub batch_id: String,
    pub source: String,
    pub raw_path: String,
    pub started_at: String,
    pub finished_at: String,
    pub inputs: Vec<LandedInput>,
    pub bytes: u64,
    pub outcomes: Outcomes,
    /// Lines (and Bundle entries) read per file (`archive!member` inside archives).
    pub lines_by_file: BTreeMap<String, i64>,
    pub quarantine_by_reason: BTreeMap<String, i64>,
    /// True when this exact batch had already been ingested: nothing was changed.
    #[serde(default)]
    pub already_ingested: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ChunkRecord {
    outcomes: Outcomes,
    lines_by_file: BTreeMap<String, i64>,
    quarantine_by_reason: BTreeMap<String, i64>,
}

#[derive(Serialize, Deserialize)]
struct Started {
    started_at_micros: i64,
    date: String,
}

fn ctx_err(what: &str) -> impl FnOnce(datafusion::error::DataFusionError) -> LakeError + '_ {
    move |source| LakeError::Query {
        table: what.into(),
        source,
    }
}

fn delta_err(table: &str) -> impl FnOnce(deltalake::DeltaTableError) -> LakeError + '_ {
    move |source| LakeError::Delta {
        table: table.into(),
        source,
    }
}

fn store_err(url: String) -> impl FnOnce(object_store::Error) -> LakeError {
    move |source| LakeError::Store { url, source }
}

fn micros_to_rfc3339(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|d| d.to_rfc3339())
        .unwrap_or_default()
}

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// The deterministic id of a batch: same source and same input bytes, same id.
/// The inputs must be hashed (`atlas_ingest::hash_inputs`); `ingest` does it.
pub fn batch_id(source: &str, inputs: &[Input]) -> String {
    let mut h = Sha256::new();
    h.update(source.as_bytes());
    for i in inputs {
        h.update([0u8]);
        h.update(i.sha256.as_bytes());
    }
    format!("b{}", &hex::encode(h.finalize())[..19])
}

fn sanitize(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    let s: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() { "stdin".into() } else { s }
}

/// Test hook: `ATLAS_TEST_CRASH=<point>` aborts the process at that point, as a
/// `kill -9` would, so crash tests can stop a run exactly there.
fn crash_point(point: &str) {
    if std::env::var("ATLAS_TEST_CRASH").is_ok_and(|p| p == point) {
        std::process::abort();
    }
}

struct Batch<'a> {
    lake: &'a Lake,
    opts: &'a IngestOptions,
    id: String,
    app_id: String,
    raw_dir: String,
    started_at: i64,
    totals: ChunkRecord,
    resources_txn: Option<i64>,
    quarantine_txn: Option<i64>,
    /// Keys this run has written; a chunk looks up only the keys that may be
    /// in the store (all of them when the store had rows before the run).
    written: KeyFilter,
    store_had_rows: bool,
    lease: WriterLease,
}

/// A fixed-size Bloom filter over (type, id) key hashes. Memory stays fixed
/// whatever the input size; as it fills, more keys are looked up in the store
/// (exactly), so it only ever costs time, never correctness.
struct KeyFilter {
    bits: Vec<u64>,
}

impl KeyFilter {
    /// 2^27 bits (16 MiB): under 1e-6 false positives at 2 million keys.
    const BITS_LOG2: u32 = 27;
    const PROBES: u64 = 7;

    fn new() -> Self {
        KeyFilter {
            bits: vec![0; 1 << (Self::BITS_LOG2 - 6)],
        }
    }

    fn probes(key: u128) -> impl Iterator<Item = usize> {
        let (h1, h2) = (key as u64, ((key >> 64) as u64) | 1);
        let mask = (1u64 << Self::BITS_LOG2) - 1;
        (0..Self::PROBES).map(move |i| (h1.wrapping_add(i.wrapping_mul(h2)) & mask) as usize)
    }

    fn insert(&mut self, key: u128) {
        for b in Self::probes(key) {
            self.bits[b >> 6] |= 1 << (b & 63);
        }
    }

    fn may_contain(&self, key: u128) -> bool {
        Self::probes(key).all(|b| self.bits[b >> 6] & (1 << (b & 63)) != 0)
    }
}

fn key_hash(ty: &str, id: &str) -> u128 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(ty.as_bytes());
    h.update(&[0]);
    h.update(id.as_bytes());
    h.digest128()
}

/// What one chunk writes, built on the main thread and committed on a task
/// while the next chunk is prepared.
struct ChunkWrite {
    batch_id: String,
    chunk_no: i64,
    quarantine: Option<RecordBatch>,
    replaces: Option<RecordBatch>,
    /// New rows, sorted, in one or more consecutive batches.
    appends: Option<Vec<RecordBatch>>,
    props: CommitProperties,
    quarantine_props: CommitProperties,
    /// Batch metadata without the `txn`: a MERGE followed by an append in the
    /// same chunk must not claim the chunk before the append lands, but view
    /// refresh still needs to know which batch wrote the MERGE's files.
    merge_props: CommitProperties,
    /// Checked before each commit.
    lease: WriterLease,
}

/// Ingests `inputs` into the lake as one batch, under the lake's writer
/// lease (`opts.lease`, or one taken here that fails at once when another
/// writer holds it).
pub async fn ingest(
    lake: &Lake,
    inputs: &[Input],
    opts: &IngestOptions,
    progress: &Progress,
) -> Result<BatchReport, LakeError> {
    if let Some(lease) = &opts.lease {
        return ingest_leased(lake, inputs, opts, progress, lease).await;
    }
    let lease = WriterLease::acquire(
        lake,
        &LeaseOptions {
            command: format!(
                "ingest ({})",
                std::env::args().collect::<Vec<_>>().join(" ")
            ),
            ..LeaseOptions::default()
        },
    )
    .await?;
    let result = ingest_leased(lake, inputs, opts, progress, &lease).await;
    let released = lease.release().await;
    let report = result?;
    released?;
    Ok(report)
}

async fn ingest_leased(
    lake: &Lake,
    inputs: &[Input],
    opts: &IngestOptions,
    progress: &Progress,
    lease: &WriterLease,
) -> Result<BatchReport, LakeError> {
    lease.check()?;
    // Without Bundles (whose conditional references need a prescan first),
    // the reader starts at once: it decompresses and classifies while the
    // inputs are hashed for the batch id and landed. Nothing is committed
    // before the landing is done.
    let may_hold_bundles = inputs.iter().any(|i| i.kind.may_hold_bundles());
    let early_reader = if may_hold_bundles {
        None
    } else {
        Some(
            read_events(
                inputs.to_vec(),
                opts.read.clone(),
                Arc::new(IdentifierIndex::default()),
                progress.bytes.clone(),
            )
            .map_err(|source| LakeError::Spawn {
                what: "the readers",
                source,
            })?,
        )
    };
    let mut hashed = inputs.to_vec();
    let hashed = tokio::task::spawn_blocking(move || {
        atlas_ingest::hash_inputs(&mut hashed).map(|()| hashed)
    })
    .await
    .map_err(|source| LakeError::Task {
        what: "hashing",
        source,
    })?
    .map_err(|source| LakeError::Inputs { source })?;
    let inputs = &hashed[..];
    let id = batch_id(&opts.source, inputs);
    if let Some(report) = completed_batch(lake, &id).await? {
        progress.phase.store(3, Ordering::Relaxed);
        return Ok(BatchReport {
            already_ingested: true,
            ..report
        });
    }
    let total: u64 = inputs.iter().map(|i| i.size).sum();
    progress.total_bytes.store(total, Ordering::Relaxed);

    // Landing: a re-run finds the first run's folder and start time.
    let source = sanitize(&opts.source);
    let started = find_or_start(lake, &source, &id).await?;
    let raw_dir = format!("raw/{source}/{}/{id}", started.date);
    let mut landed = Vec::with_capacity(inputs.len());
    for (n, input) in inputs.iter().enumerate() {
        let rel = format!("{raw_dir}/{n:04}-{}", sanitize(&input.name));
        land_file(lake, input, &rel, opts.link_inputs).await?;
        landed.push(LandedInput {
            name: input.name.clone(),
            raw_path: rel,
            sha256: input.sha256.clone(),
            bytes: input.size,
        });
    }
    crash_point("after_landing");

    // Conditional references may point anywhere in the run or the store.
    progress.phase.store(1, Ordering::Relaxed);
    let mut index = IdentifierIndex::default();
    if may_hold_bundles {
        prescan_identifiers(inputs, &opts.read, &mut index)
            .map_err(|source| LakeError::Prescan { source })?;
        load_store_identifiers(lake, &mut index).await?;
    }

    let resources_table = lake.table(RESOURCES).await?;
    let quarantine_table = lake.table(QUARANTINE).await?;
    let app_id = format!("atlas-ingest-{id}");
    let resources_txn = txn_version(resources_table.as_ref(), &app_id).await?;
    let store_had_rows = match &resources_table {
        Some(t) => {
            t.snapshot()
                .map_err(delta_err(RESOURCES))?
                .log_data()
                .num_files()
                > 0
        }
        None => false,
    };
    let quarantine_txn = txn_version(quarantine_table.as_ref(), &app_id).await?;
    let mut batch = Batch {
        lake,
        opts,
        id: id.clone(),
        app_id,
        raw_dir: raw_dir.clone(),
        started_at: started.started_at_micros,
        totals: ChunkRecord::default(),
        resources_txn,
        quarantine_txn,
        written: KeyFilter::new(),
        store_had_rows,
        lease: lease.clone(),
    };

    progress.phase.store(2, Ordering::Relaxed);
    let rx = match early_reader {
        Some(rx) => rx,
        None => read_events(
            inputs.to_vec(),
            opts.read.clone(),
            Arc::new(index),
            progress.bytes.clone(),
        )
        .map_err(|source| LakeError::Spawn {
            what: "the readers",
            source,
        })?,
    };
    // Chunks are cut on their own thread, so reading and classifying go on
    // while the previous chunk is being committed.
    let chunks = cut_chunks(rx, opts.chunk_bytes, progress.lines.clone())?;
    // Commits run one at a time and in chunk order, each on a task, so the
    // next chunk is prepared while the previous one is encoded and committed.
    let mut chunk_no = 0i64;
    // The resources table as of this run's start, then as of its last
    // commit: every commit is built on it, so a commit of another writer in
    // between is checked for conflicts (and refused: see `commit_props`),
    // and loading the table again for every chunk would re-read the log.
    let resources_cache = Arc::new(tokio::sync::Mutex::new(resources_table));
    let mut in_flight: Option<tokio::task::JoinHandle<Result<(), LakeError>>> = None;
    while let Ok(chunk) = tokio::task::block_in_place(|| chunks.recv()) {
        let write = batch.prepare_chunk(chunk_no, chunk, &mut in_flight).await?;
        finish(&mut in_flight).await?;
        if let Some(write) = write {
            in_flight = Some(tokio::spawn(write_chunk(
                lake.clone(),
                write,
                resources_cache.clone(),
            )));
        }
        chunk_no += 1;
    }
    finish(&mut in_flight).await?;
    crash_point("before_batch_commit");
    lease.check()?;

    let finished = now_micros();
    let report = BatchReport {
        batch_id: id.clone(),
        source: opts.source.clone(),
        raw_path: lake
            .root()
            .join(&format!("{raw_dir}/"))
            .map(|u| u.to_string())
            .unwrap_or(raw_dir.clone()),
        started_at: micros_to_rfc3339(batch.started_at),
        finished_at: micros_to_rfc3339(finished),
        inputs: landed,
        bytes: total,
        outcomes: batch.totals.outcomes.clone(),
        lines_by_file: batch.totals.lines_by_file.clone(),
        quarantine_by_reason: batch.totals.quarantine_by_reason.clone(),
        already_ingested: false,
    };
    let manifest_path = format!("{raw_dir}/manifest.json");
    let manifest = serde_json::to_vec_pretty(&report).map_err(|source| LakeError::Json {
        path: manifest_path.clone(),
        source,
    })?;
    put(lake, &manifest_path, manifest).await?;
    write_batch_row(lake, &report, batch.started_at, finished).await?;
    progress.phase.store(3, Ordering::Relaxed);
    Ok(report)
}

/// Waits for the commit in flight, if any.
async fn finish(
    in_flight: &mut Option<tokio::task::JoinHandle<Result<(), LakeError>>>,
) -> Result<(), LakeError> {
    match in_flight.take() {
        Some(h) => h.await.map_err(|source| LakeError::Task {
            what: "commit",
            source,
        })?,
        None => Ok(()),
    }
}

/// Groups classified events into chunks of at most about `chunk_bytes`
/// stored bytes. Boundaries depend only on the events and `chunk_bytes`, so
/// a re-run with the same `--chunk-mb` cuts the same chunks.
/// Always yields at least one (possibly empty) chunk.
fn cut_chunks(
    blocks: std::sync::mpsc::Receiver<atlas_ingest::Block>,
    chunk_bytes: usize,
    lines: Arc<AtomicU64>,
) -> Result<std::sync::mpsc::Receiver<Vec<Event>>, LakeError> {
    // A rendezvous: the next chunk is cut while this one is prepared, and no
    // finished chunk waits in between (memory).
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Event>>(0);
    std::thread::Builder::new()
        .name("atlas-chunks".into())
        .spawn(move || {
            let mut pending: Vec<Event> = Vec::new();
            let mut pending_bytes = 0usize;
            let mut sent = false;
            // The first chunks are smaller and grow to `chunk_bytes`: the
            // store writer starts after 16 MiB instead of a whole chunk.
            // (4 MiB started sooner but cost more commits; 16 was fastest
            // on the 615-patient data, and 10x does not notice.)
            let mut limit = chunk_bytes.min(16 << 20);
            for block in blocks {
                lines.fetch_add(block.events.len() as u64, Ordering::Relaxed);
                for ev in block.events {
                    pending_bytes += match &ev {
                        Event::Resource(r) => r.json.len(),
                        Event::Reject(r) => r.prefix.len(),
                        _ => 0,
                    } + 64;
                    pending.push(ev);
                    if pending_bytes >= limit {
                        if tx.send(std::mem::take(&mut pending)).is_err() {
                            return;
                        }
                        sent = true;
                        pending_bytes = 0;
                        limit = (limit * 2).min(chunk_bytes);
                    }
                }
            }
            if !pending.is_empty() || !sent {
                let _ = tx.send(pending);
            }
        })
        .map_err(|source| LakeError::Spawn {
            what: "the chunking thread",
            source,
        })?;
    Ok(rx)
}

async fn put(lake: &Lake, rel: &str, bytes: Vec<u8>) -> Result<(), LakeError> {
    lake.object_store()
        .put(&lake.path(rel), PutPayload::from(bytes))
        .await
        .map(|_| ())
        .map_err(store_err(rel.to_owned()))
}

async fn get(lake: &Lake, rel: &str) -> Result<Option<Vec<u8>>, LakeError> {
    match lake.object_store().get(&lake.path(rel)).await {
        Ok(r) => Ok(Some(
            r.bytes().await.map_err(store_err(rel.to_owned()))?.to_vec(),
        )),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(store_err(rel.to_owned())(e)),
    }
}

/// The newest recorded batch start (UTC microseconds), 0 for a lake
/// without batches.
async fn last_batch_start(lake: &Lake) -> Result<i64, LakeError> {
    if !lake.has_table(crate::lake::BATCHES).await? {
        return Ok(0);
    }
    let rows = lake
        .query_text("SELECT CAST(CAST(MAX(started_at) AS BIGINT) AS VARCHAR) FROM batches")
        .await?;
    Ok(rows
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(0))
}

async fn find_or_start(lake: &Lake, source: &str, id: &str) -> Result<Started, LakeError> {
    let prefix = lake.path(&format!("raw/{source}"));
    let listing = lake.object_store().list_with_delimiter(Some(&prefix)).await;
    if let Ok(listing) = listing {
        for dir in listing.common_prefixes {
            let Some(date) = dir.filename().map(str::to_owned) else {
                continue;
            };
            let rel = format!("raw/{source}/{date}/{id}/started.json");
            if let Some(bytes) = get(lake, &rel).await?
                && let Ok(s) = serde_json::from_slice::<Started>(&bytes)
            {
                return Ok(s);
            }
        }
    }
    // Later batches win ties, so a batch must start after every batch
    // before it even when this host's clock is behind the last writer's
    // (the writer lease makes batches follow one another).
    let started_at_micros = now_micros().max(last_batch_start(lake).await? + 1);
    let date = chrono::DateTime::from_timestamp_micros(started_at_micros)
        .map(|d| d.format("%Y-%m-%d").to_string())
        .unwrap_or_else(|| "1970-01-01".into());
    let s = Started {
        started_at_micros,
        date,
    };
    let path = format!("raw/{source}/{}/{id}/started.json", s.date);
    let bytes = serde_json::to_vec(&s).map_err(|source| LakeError::Json {
        path: path.clone(),
        source,
    })?;
    put(lake, &path, bytes).await?;
    Ok(s)
}

async fn land_file(lake: &Lake, input: &Input, rel: &str, link: bool) -> Result<(), LakeError> {
    let path = lake.path(rel);
    if let Ok(meta) = lake.object_store().head(&path).await
        && meta.size == input.size
    {
        return Ok(());
    }
    let fail = |source: std::io::Error| LakeError::Land {
        input: input.name.clone(),
        path: rel.to_owned(),
        source,
    };
    // A local lake: a kernel-side copy (copy_file_range) to a temporary name,
    // then a rename, so a landed file is always whole. Streaming it through
    // the object-store writer took a tenth of a small ingest's time.
    if lake.is_local()
        && let Ok(dst) = lake.root().join(rel).and_then(|u| {
            u.to_file_path()
                .map_err(|()| url::ParseError::RelativeUrlWithoutBase)
        })
    {
        let tmp = dst.with_extension(format!("landing-{}", std::process::id()));
        if let Some(dir) = dst.parent() {
            tokio::fs::create_dir_all(dir).await.map_err(fail)?;
        }
        // A stale temporary name from a killed run would make the link fail.
        let _ = tokio::fs::remove_file(&tmp).await;
        let linked = link && tokio::fs::hard_link(&input.path, &tmp).await.is_ok();
        if !linked {
            tokio::fs::copy(&input.path, &tmp).await.map_err(fail)?;
        }
        tokio::fs::rename(&tmp, &dst).await.map_err(fail)?;
        return Ok(());
    }
    let mut writer = object_store::buffered::BufWriter::new(lake.object_store().clone(), path);
    let file = tokio::fs::File::open(&input.path).await.map_err(fail)?;
    let mut file = tokio::io::BufReader::with_capacity(4 << 20, file);
    tokio::io::copy_buf(&mut file, &mut writer)
        .await
        .map_err(fail)?;
    tokio::io::AsyncWriteExt::shutdown(&mut writer)
        .await
        .map_err(fail)?;
    Ok(())
}

async fn txn_version(table: Option<&DeltaTable>, app_id: &str) -> Result<Option<i64>, LakeError> {
    let Some(t) = table else { return Ok(None) };
    let snapshot = t.snapshot().map_err(delta_err("txn"))?;
    snapshot
        .transaction_version(t.log_store().as_ref(), app_id)
        .await
        .map_err(delta_err("txn"))
}

async fn completed_batch(lake: &Lake, id: &str) -> Result<Option<BatchReport>, LakeError> {
    if !lake.has_table(BATCHES).await? {
        return Ok(None);
    }
    let rows = lake
        .query(&format!(
            "SELECT raw_path FROM batches WHERE batch_id = '{id}'"
        ))
        .await?;
    let Some(raw) = rows.iter().find(|b| b.num_rows() > 0) else {
        return Ok(None);
    };
    let raw_path = crate::lake::text_column(raw, 0)?.value(0).to_owned();
    // raw_path is a URL; the manifest sits beside the landed files.
    let rel = raw_path
        .strip_prefix(lake.root().as_str())
        .unwrap_or(&raw_path)
        .trim_end_matches('/')
        .to_owned();
    match get(lake, &format!("{rel}/manifest.json")).await? {
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| LakeError::Json {
                path: format!("{rel}/manifest.json"),
                source,
            }),
        None => Err(LakeError::ManifestMissing {
            batch: id.to_owned(),
            path: rel,
        }),
    }
}

/// Fills `index` with the identifiers of stored, live resources.
async fn load_store_identifiers(lake: &Lake, index: &mut IdentifierIndex) -> Result<(), LakeError> {
    if !lake.has_table(RESOURCES).await? {
        return Ok(());
    }
    let batches = lake
        .query("SELECT resource_type, id, identifiers FROM resources WHERE NOT deleted AND identifiers IS NOT NULL AND cardinality(identifiers) > 0")
        .await?;
    for b in batches {
        let (ty, id) = (
            crate::lake::text_column(&b, 0)?,
            crate::lake::text_column(&b, 1)?,
        );
        let list = arrow::compute::cast(
            b.column(2),
            &arrow::datatypes::DataType::List(Arc::new(arrow::datatypes::Field::new(
                "item",
                arrow::datatypes::DataType::Utf8,
                true,
            ))),
        )
        .map_err(|source| LakeError::ColumnCast {
            column: format!("identifiers of tables/{RESOURCES}"),
            source,
        })?;
        let Some(list) = list.as_any().downcast_ref::<arrow::array::ListArray>() else {
            continue;
        };
        for row in 0..b.num_rows() {
            let values = list.value(row);
            if let Some(values) = values.as_any().downcast_ref::<arrow::array::StringArray>() {
                for v in values.iter().flatten() {
                    index.insert(ty.value(row), id.value(row), v);
                }
            }
        }
    }
    Ok(())
}

/// A row headed for the store.
enum Candidate {
    Resource(Box<ParsedResource>),
    Tombstone {
        resource_type: String,
        id: String,
        /// As the server reported it (content hash 0); maybe empty.
        version: VersionStamp,
        file: Arc<str>,
        line: u64,
    },
    Dropped,
}

impl Candidate {
    fn key(&self) -> Option<(&str, &str)> {
        match self {
            Candidate::Resource(r) => Some((&r.resource_type, &r.id)),
            Candidate::Tombstone {
                resource_type, id, ..
            } => Some((resource_type, id)),
            Candidate::Dropped => None,
        }
    }

    fn order(&self) -> Order<'_> {
        match self {
            Candidate::Resource(r) => Order::Resource(&r.version),
            Candidate::Tombstone { version, .. } => Order::deletion(version),
            Candidate::Dropped => Order::Unstamped,
        }
    }

    /// Where the candidate was read: file and line.
    fn place(&self) -> (&str, u64) {
        match self {
            Candidate::Resource(r) => (&r.origin.file, r.origin.line),
            Candidate::Tombstone { file, line, .. } => (file, *line),
            Candidate::Dropped => ("", 0),
        }
    }
}

/// What a copy of a key is ordered by (the module doc's "Which copy wins").
#[derive(Clone, Copy)]
enum Order<'a> {
    Resource(&'a VersionStamp),
    /// A deletion with the version its server reported.
    Deletion(&'a VersionStamp),
    /// A deletion without a version: position or arrival decides.
    Unstamped,
}

impl<'a> Order<'a> {
    fn deletion(version: &'a VersionStamp) -> Self {
        if version.has_version_facts() {
            Order::Deletion(version)
        } else {
            Order::Unstamped
        }
    }

    /// `self` against `other`: `Greater` when `self` is the newer copy,
    /// `Equal` when the versions do not decide (position or arrival does).
    fn newer_than(self, other: Order) -> Cmp {
        match (self, other) {
            (Order::Resource(a), Order::Resource(b)) => a.newer_than(b),
            (Order::Unstamped, _) | (_, Order::Unstamped) => Cmp::Equal,
            (Order::Resource(a) | Order::Deletion(a), Order::Resource(b) | Order::Deletion(b)) => {
                a.newer_on_shared_fields(b)
            }
        }
    }

    /// For messages: `versionId 3, lastUpdated 2024-05-01T10:00:00+00:00`.
    fn describe(self) -> String {
        let (what, v) = match self {
            Order::Resource(v) => ("", v),
            Order::Deletion(v) => ("deletion, ", v),
            Order::Unstamped => return "deletion without a version".into(),
        };
        let mut facts = Vec::new();
        if let Some(id) = &v.version_id {
            facts.push(format!("versionId {id}"));
        }
        if let Some(t) = v.last_updated {
            facts.push(format!("lastUpdated {}", micros_to_rfc3339(t)));
        }
        if facts.is_empty() {
            facts.push("no version".into());
        }
        format!("{what}{}", facts.join(", "))
    }
}

/// Whether the later of two copies of a key in one batch (by line order)
/// replaces the earlier: unless it is older; ties go to the later line.
fn later_wins(earlier: Order, later: Order) -> bool {
    later.newer_than(earlier) != Cmp::Less
}

/// Why `winner` beat `loser` in their batch, for the duplicate's message.
fn why_wins(winner: Order, loser: Order) -> String {
    if winner.newer_than(loser) == Cmp::Greater {
        format!(
            "it is newer ({} over {})",
            winner.describe(),
            loser.describe()
        )
    } else {
        "it is the later line (the versions do not decide)".into()
    }
}

struct Existing {
    version: VersionStamp,
    deleted: bool,
    batch_id: String,
    file: String,
    line: i64,
    /// The start instant of the batch that stored it: the batch order.
    ingested_at: i64,
}

impl Existing {
    fn order(&self) -> Order<'_> {
        if !self.deleted {
            return Order::Resource(&self.version);
        }
        // A deletion without a version is stored with no versionId and its
        // batch's start as `last_updated`: not a version a server reported.
        if self.version.version_id.is_none() && self.version.last_updated == Some(self.ingested_at)
        {
            return Order::Unstamped;
        }
        Order::deletion(&self.version)
    }
}

/// A 128-bit content hash as 32 lowercase hex digits, without a `String`
/// per row.
struct Hex128([u8; 32]);

impl Hex128 {
    fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever written.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// `'Patient','Observation'` for an `IN (...)` list: resource types are
/// validated names (letters only) by the time they reach a chunk, so they
/// are safe to splice; ids and identifiers are always joined from a batch.
fn sql_type_list(types: &[&str]) -> String {
    types
        .iter()
        .map(|t| format!("'{t}'"))
        .collect::<Vec<_>>()
        .join(",")
}

fn hex128(h: u128) -> Hex128 {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = DIGITS[((h >> (124 - 4 * i)) & 0xf) as usize];
    }
    Hex128(out)
}

fn parse_hash(s: &str) -> u128 {
    u128::from_str_radix(s, 16).unwrap_or(0)
}

/// A chunk's events before the store is consulted: the counts so far, the
/// rejected lines, and one candidate per key (duplicates within the chunk
/// resolved: the newest version, or the later line when versions do not
/// decide).
struct Classified {
    rec: ChunkRecord,
    rejects: Vec<Rejection>,
    candidates: Vec<Candidate>,
    /// `key_hash` of each candidate, in the same order.
    keys: Vec<u128>,
}

/// What a chunk writes to `resources`, borrowed from its candidates.
#[derive(Default)]
struct Writes<'c> {
    /// New keys, appended.
    appends: Vec<&'c Candidate>,
    /// Keys the store has, replaced by MERGE.
    replaces: Vec<&'c Candidate>,
    /// Earlier copies stored by an earlier chunk of this batch, quarantined.
    late_duplicates: Vec<Rejection>,
}

/// Counts the chunk's events and turns them into candidates, one per key.
fn classify_events(events: Vec<Event>) -> Classified {
    let mut out = Classified {
        rec: ChunkRecord::default(),
        rejects: Vec::new(),
        candidates: Vec::with_capacity(events.len()),
        keys: Vec::with_capacity(events.len()),
    };
    let mut latest: HashMap<u128, usize> = HashMap::with_capacity(events.len());
    let mut runs = LineRuns::default();
    for ev in events {
        out.rec.outcomes.lines_read += 1;
        runs.count(event_file(&ev), &mut out.rec.lines_by_file);
        let Some(mut cand) = out.candidate(ev) else {
            continue;
        };
        let Some((ty, id)) = cand.key() else { continue };
        let key = key_hash(ty, id);
        if let Some(&prev) = latest.get(&key) {
            match out.supersede(prev, cand) {
                Some(later) => cand = later,
                None => continue,
            }
        }
        latest.insert(key, out.candidates.len());
        out.keys.push(key);
        out.candidates.push(cand);
    }
    runs.finish(&mut out.rec.lines_by_file);
    out
}

impl Classified {
    /// The candidate an event stands for; skips and rejections are counted
    /// and kept here instead.
    fn candidate(&mut self, ev: Event) -> Option<Candidate> {
        match ev {
            Event::Skip(_) => {
                self.rec.outcomes.skipped += 1;
                None
            }
            Event::Reject(r) => {
                self.rejects.push(*r);
                None
            }
            Event::Resource(r) => {
                self.rec.outcomes.unresolved_references += i64::from(r.unresolved_refs);
                Some(Candidate::Resource(r))
            }
            Event::Delete(d) => match d.target {
                DeleteTarget::Id(id) => Some(Candidate::Tombstone {
                    resource_type: d.resource_type,
                    id,
                    version: d.version,
                    file: d.origin.file,
                    line: d.origin.line,
                }),
                // `prepare_chunk` resolves these first; one left over (a
                // caller that skipped it) must still get an outcome.
                DeleteTarget::Identifier { .. } => {
                    self.rejects.push(conditional_delete_rejection(
                        &d,
                        Reason::UnresolvedConditionalDelete,
                        "was not resolved against the store",
                    ));
                    None
                }
            },
        }
    }

    /// `cand` repeats the key of candidate `prev`, an earlier line of the
    /// chunk. The same content is counted unchanged and dropped (`None`).
    /// Otherwise the copy that loses ([`later_wins`]) is quarantined as a
    /// duplicate, and `Some(cand)` means `cand` takes `prev`'s place.
    fn supersede(&mut self, prev: usize, cand: Candidate) -> Option<Candidate> {
        let same = match (&self.candidates[prev], &cand) {
            (Candidate::Resource(a), Candidate::Resource(b)) => {
                a.version.content_hash == b.version.content_hash
            }
            (Candidate::Tombstone { .. }, Candidate::Tombstone { .. }) => true,
            _ => false,
        };
        if same {
            self.rec.outcomes.unchanged += 1;
            // Two deletions: the row keeps the newer one's version.
            if cand.order().newer_than(self.candidates[prev].order()) == Cmp::Greater {
                self.candidates[prev] = cand;
            }
            return None;
        }
        self.rec.outcomes.duplicates += 1;
        if later_wins(self.candidates[prev].order(), cand.order()) {
            let earlier = std::mem::replace(&mut self.candidates[prev], Candidate::Dropped);
            self.rejects.push(duplicate_rejection(earlier, &cand));
            Some(cand)
        } else {
            let rejection = duplicate_rejection(cand, &self.candidates[prev]);
            self.rejects.push(rejection);
            None
        }
    }
}

/// The quarantine row of a conditional delete that deletes nothing.
fn conditional_delete_rejection(d: &Deletion, reason: Reason, why: &str) -> Rejection {
    let (url, entry, identifier) = match &d.target {
        DeleteTarget::Identifier {
            url,
            entry,
            identifier,
        } => (url.as_str(), *entry, identifier.as_str()),
        DeleteTarget::Id(id) => (id.as_str(), 0, ""),
    };
    let mut r = Rejection::new(
        reason,
        format!(
            "entry {entry}: conditional DELETE `{url}` (identifier `{identifier}`) {why}; nothing was deleted"
        ),
        url.as_bytes(),
        d.origin.clone(),
    );
    r.resource_type = Some(d.resource_type.clone());
    r.field = Some("request.url".into());
    r
}

fn event_file(ev: &Event) -> &Arc<str> {
    match ev {
        Event::Resource(r) => &r.origin.file,
        Event::Delete(d) => &d.origin.file,
        Event::Reject(r) => &r.origin.file,
        Event::Skip(o) => &o.file,
    }
}

/// Lines per file. Events arrive file by file, so runs of lines are counted
/// and the map is touched once per run, not once per line.
#[derive(Default)]
struct LineRuns(Option<(Arc<str>, i64)>);

impl LineRuns {
    fn count(&mut self, file: &Arc<str>, lines_by_file: &mut BTreeMap<String, i64>) {
        match &mut self.0 {
            Some((f, n)) if Arc::ptr_eq(f, file) || **f == **file => *n += 1,
            _ => {
                if let Some((f, n)) = self.0.replace((file.clone(), 1)) {
                    *lines_by_file.entry(f.to_string()).or_default() += n;
                }
            }
        }
    }

    fn finish(self, lines_by_file: &mut BTreeMap<String, i64>) {
        if let Some((f, n)) = self.0 {
            *lines_by_file.entry(f.to_string()).or_default() += n;
        }
    }
}

/// Counts the chunk's quarantined lines, in total and by reason.
fn count_quarantined(rec: &mut ChunkRecord, rejects: &[Rejection]) {
    rec.outcomes.quarantined += rejects.len() as i64;
    for r in rejects {
        *rec.quarantine_by_reason
            .entry(r.reason.code().to_owned())
            .or_default() += 1;
    }
}

/// The quarantine row for a copy an earlier chunk of this batch stored,
/// beaten by `cand` (its bytes are in the store's row, not at hand).
fn late_duplicate_rejection(cand: &Candidate, ex: &Existing) -> Rejection {
    let (ty, id) = cand.key().unwrap_or_default();
    let (file, line) = cand.place();
    duplicate(
        ty,
        id,
        b"",
        atlas_ingest::Origin {
            file: Arc::from(ex.file.as_str()),
            line: ex.line as u64,
        },
        (file, line),
        &why_wins(cand.order(), ex.order()),
    )
}

/// `cand` repeats a key an earlier chunk of this batch stored (`ex`, an
/// earlier line): decided as within a chunk ([`Classified::supersede`]),
/// and the losing copy is quarantined as a duplicate. Returns whether `cand`
/// replaces the stored row; counts the outcome when it does not.
fn replaces_earlier_chunk(
    cand: &Candidate,
    ex: &Existing,
    rec: &mut ChunkRecord,
    late_duplicates: &mut Vec<Rejection>,
) -> bool {
    let same = match cand {
        Candidate::Resource(r) => !ex.deleted && ex.version.content_hash == r.version.content_hash,
        Candidate::Tombstone { .. } => ex.deleted,
        Candidate::Dropped => return false,
    };
    if same {
        rec.outcomes.unchanged += 1;
        return false;
    }
    rec.outcomes.duplicates += 1;
    if later_wins(ex.order(), cand.order()) {
        // The earlier chunk counted its copy stored; now it is quarantined.
        rec.outcomes.stored -= 1;
        if ex.deleted {
            rec.outcomes.deleted -= 1;
        }
        late_duplicates.push(late_duplicate_rejection(cand, ex));
        true
    } else {
        late_duplicates.push(losing_candidate_rejection(cand, ex));
        false
    }
}

/// The quarantine row for `cand`, beaten by the copy an earlier chunk of
/// this batch stored.
fn losing_candidate_rejection(cand: &Candidate, ex: &Existing) -> Rejection {
    let (ty, id) = cand.key().unwrap_or_default();
    let (file, line) = cand.place();
    let json = match cand {
        Candidate::Resource(r) => r.json.as_bytes(),
        _ => b"",
    };
    duplicate(
        ty,
        id,
        json,
        atlas_ingest::Origin {
            file: Arc::from(file),
            line,
        },
        (&ex.file, ex.line as u64),
        &why_wins(ex.order(), cand.order()),
    )
}

/// A `duplicate_id` quarantine row: the copy of `ty/id` read at `origin`
/// (whose first bytes are `bytes`) lost to the copy at `winner`.
fn duplicate(
    ty: &str,
    id: &str,
    bytes: &[u8],
    origin: atlas_ingest::Origin,
    winner: (&str, u64),
    why: &str,
) -> Rejection {
    let mut r = Rejection::new(
        Reason::DuplicateId,
        format!(
            "{ty}/{id} has another copy in the same batch, at {}:{}, which wins: {why}",
            winner.0, winner.1
        ),
        bytes,
        origin,
    );
    r.resource_type = Some(ty.to_owned());
    r.resource_id = Some(id.to_owned());
    r.field = Some("id".into());
    r
}

impl Batch<'_> {
    fn chunk_path(&self, chunk_no: i64) -> String {
        format!("{}/chunks/{chunk_no:06}.json", self.raw_dir)
    }

    /// Classifies a chunk's events against the store and builds what it
    /// writes. Returns `None` when a previous run already committed it.
    /// Waits for `in_flight` only when it must look keys up in the store.
    async fn prepare_chunk(
        &mut self,
        chunk_no: i64,
        events: Vec<Event>,
        in_flight: &mut Option<tokio::task::JoinHandle<Result<(), LakeError>>>,
    ) -> Result<Option<ChunkWrite>, LakeError> {
        if let Some(rec) = self.committed_chunk(chunk_no).await? {
            self.add_totals(&rec);
            return Ok(None);
        }
        let events = self.resolve_conditional_deletes(events, in_flight).await?;
        let Classified {
            mut rec,
            mut rejects,
            candidates,
            keys,
        } = classify_events(events);
        let lookup_started = std::time::Instant::now();
        let existing = self.lookup_existing(&candidates, &keys, in_flight).await?;
        let lookup_ms = lookup_started.elapsed().as_millis();
        let writes = self.decide_writes(&candidates, &keys, &existing, &mut rec);
        rejects.extend(writes.late_duplicates);
        count_quarantined(&mut rec, &rejects);

        // Counts first: once a commit below lands, a re-run reads them from here.
        let bytes = serde_json::to_vec(&rec).map_err(|source| LakeError::Json {
            path: self.chunk_path(chunk_no),
            source,
        })?;
        put(self.lake, &self.chunk_path(chunk_no), bytes).await?;

        let quarantine = if !rejects.is_empty() && self.quarantine_txn.is_none_or(|v| v < chunk_no)
        {
            Some(self.quarantine_batch(&rejects)?)
        } else {
            None
        };
        drop(rejects);
        let build_started = std::time::Instant::now();
        let (replaces, appends) = self.row_batches(writes.replaces, writes.appends)?;
        // The JSON now lives in the Arrow batches: free the events before encoding.
        drop(candidates);
        tracing::info!(
            batch = %self.id,
            chunk = chunk_no,
            lookup_ms,
            build_ms = build_started.elapsed().as_millis() as u64,
            "chunk prepared"
        );
        self.add_totals(&rec);
        Ok(Some(
            self.chunk_write(chunk_no, quarantine, replaces, appends),
        ))
    }

    /// The counts of a chunk a previous run of this batch committed (its
    /// `txn` reached the chunk and its record is in the landing folder).
    async fn committed_chunk(&self, chunk_no: i64) -> Result<Option<ChunkRecord>, LakeError> {
        if self.resources_txn.is_none_or(|v| v < chunk_no) {
            return Ok(None);
        }
        let Some(bytes) = get(self.lake, &self.chunk_path(chunk_no)).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| LakeError::Json {
                path: self.chunk_path(chunk_no),
                source,
            })
    }

    /// The store's current rows for the candidates it may hold: all of them
    /// when it had rows before this run, else those this run may have
    /// written already (the Bloom filter). Nothing is read, and the commit in
    /// flight is not waited for, when no candidate qualifies.
    async fn lookup_existing(
        &self,
        candidates: &[Candidate],
        keys: &[u128],
        in_flight: &mut Option<tokio::task::JoinHandle<Result<(), LakeError>>>,
    ) -> Result<HashMap<(String, String), Existing>, LakeError> {
        let maybe_stored: Vec<&Candidate> = candidates
            .iter()
            .zip(keys)
            .filter(|(c, k)| {
                !matches!(c, Candidate::Dropped)
                    && (self.store_had_rows || self.written.may_contain(**k))
            })
            .map(|(c, _)| c)
            .collect();
        if maybe_stored.is_empty() {
            return Ok(HashMap::new());
        }
        // The lookup must see every earlier chunk's commit.
        finish(in_flight).await?;
        self.existing_rows(&maybe_stored).await
    }

    /// Decides, per candidate, whether it is written and how: appended when
    /// the store lacks its key, merged (replacing the stored row) when it has
    /// it. Counts the outcomes in `rec` and remembers every key in the Bloom
    /// filter of written keys.
    fn decide_writes<'c>(
        &mut self,
        candidates: &'c [Candidate],
        keys: &[u128],
        existing: &HashMap<(String, String), Existing>,
        rec: &mut ChunkRecord,
    ) -> Writes<'c> {
        let mut out = Writes::default();
        for (cand, key) in candidates.iter().zip(keys) {
            let Some((ty, id)) = cand.key() else { continue };
            self.written.insert(*key);
            let ex = existing.get(&(ty.to_owned(), id.to_owned()));
            let write = match ex {
                None => true,
                Some(ex) => self.replaces_stored(cand, ex, rec, &mut out.late_duplicates),
            };
            if write {
                rec.outcomes.stored += 1;
                if matches!(cand, Candidate::Tombstone { .. }) {
                    rec.outcomes.deleted += 1;
                }
                if ex.is_some() {
                    out.replaces.push(cand)
                } else {
                    out.appends.push(cand)
                }
            }
        }
        out
    }

    /// Whether `cand` replaces the stored row `ex` of its key, counting
    /// the outcome when it does not.
    fn replaces_stored(
        &self,
        cand: &Candidate,
        ex: &Existing,
        rec: &mut ChunkRecord,
        late_duplicates: &mut Vec<Rejection>,
    ) -> bool {
        if self.stored_by_this_batch(cand, ex) {
            rec.outcomes.stored += 1;
            if matches!(cand, Candidate::Tombstone { .. }) {
                rec.outcomes.deleted += 1;
            }
            return false;
        }
        if ex.batch_id == self.id {
            return replaces_earlier_chunk(cand, ex, rec, late_duplicates);
        }
        // When the versions tie, the later batch wins; a re-run keeps its
        // batch's first start instant.
        let later = self.started_at >= ex.ingested_at;
        match cand {
            Candidate::Tombstone { version, .. } => {
                if ex.deleted {
                    rec.outcomes.unchanged += 1;
                    return false;
                }
                // Only a deletion with a version can be older; one without
                // applies, as it always did.
                if Order::deletion(version).newer_than(ex.order()) == Cmp::Less {
                    rec.outcomes.older_than_stored += 1;
                    return false;
                }
                true
            }
            Candidate::Resource(r) => {
                let decision = match ex.order() {
                    // A stored deletion with a reported version: compared as
                    // deletions are (the facts both carry), so a copy older
                    // than the deletion does not come back to life.
                    stored @ Order::Deletion(_) => {
                        match Order::Resource(&r.version).newer_than(stored) {
                            Cmp::Greater => Decision::Replace,
                            Cmp::Equal if later => Decision::Replace,
                            Cmp::Equal | Cmp::Less => Decision::OlderThanStored,
                        }
                    }
                    Order::Resource(_) | Order::Unstamped => r.version.decide(&ex.version, later),
                };
                match decision {
                    Decision::Replace => true,
                    Decision::Unchanged if ex.deleted => true,
                    Decision::Unchanged => {
                        rec.outcomes.unchanged += 1;
                        false
                    }
                    Decision::OlderThanStored => {
                        rec.outcomes.older_than_stored += 1;
                        false
                    }
                }
            }
            Candidate::Dropped => false,
        }
    }

    /// This very line was stored by an interrupted run of this batch.
    fn stored_by_this_batch(&self, cand: &Candidate, ex: &Existing) -> bool {
        let (file, line) = cand.place();
        ex.batch_id == self.id && ex.file == file && ex.line == line as i64
    }

    /// Resolves the chunk's conditional deletes the reader could not (its
    /// index lacked the identifier: NDJSON inputs, such as Bulk `deleted`
    /// files, are not pre-scanned) against the store's live rows as
    /// committed now (earlier chunks of this batch included) and the
    /// resources on earlier lines of this chunk, which are not committed
    /// yet: exactly one match becomes a deletion of that id, none or several
    /// are quarantined in place.
    async fn resolve_conditional_deletes(
        &self,
        mut events: Vec<Event>,
        in_flight: &mut Option<tokio::task::JoinHandle<Result<(), LakeError>>>,
    ) -> Result<Vec<Event>, LakeError> {
        let mut wanted: Vec<(String, String)> = events
            .iter()
            .filter_map(|ev| match ev {
                Event::Delete(Deletion {
                    resource_type,
                    target: DeleteTarget::Identifier { identifier, .. },
                    ..
                }) => Some((resource_type.clone(), identifier.clone())),
                _ => None,
            })
            .collect();
        if wanted.is_empty() {
            return Ok(events);
        }
        wanted.sort_unstable();
        wanted.dedup();
        // The lookup must see every earlier chunk's commit.
        finish(in_flight).await?;
        let mut found = self.identifier_matches(&wanted).await?;
        let wanted: std::collections::HashSet<(String, String)> = wanted.into_iter().collect();
        for ev in &mut events {
            let d = match ev {
                Event::Resource(r) => {
                    // Matched by the deletes on later lines of the chunk.
                    for ident in &r.identifiers {
                        let value = ident.split_once('|').map(|(_, v)| v);
                        for key in std::iter::once(ident.as_str()).chain(value) {
                            let key = (r.resource_type.clone(), key.to_owned());
                            if wanted.contains(&key) {
                                let ids = found.entry(key).or_default();
                                if !ids.contains(&r.id) {
                                    ids.push(r.id.clone());
                                }
                            }
                        }
                    }
                    continue;
                }
                Event::Delete(d) => d,
                Event::Reject(_) | Event::Skip(_) => continue,
            };
            let DeleteTarget::Identifier { identifier, .. } = &d.target else {
                continue;
            };
            let ids = found
                .get(&(d.resource_type.clone(), identifier.clone()))
                .map_or(&[][..], Vec::as_slice);
            let rejection = match ids {
                [one] => {
                    d.target = DeleteTarget::Id(one.clone());
                    continue;
                }
                [] => conditional_delete_rejection(
                    d,
                    Reason::UnresolvedConditionalDelete,
                    &format!(
                        "matches no live {} in this batch or the store",
                        d.resource_type
                    ),
                ),
                many => conditional_delete_rejection(
                    d,
                    Reason::AmbiguousConditionalDelete,
                    &format!(
                        "matches {} live {} resources in this batch and the store ({}), and a conditional delete must match exactly one",
                        many.len(),
                        d.resource_type,
                        atlas_ingest::bundle::list_ids(&d.resource_type, many)
                    ),
                ),
            };
            *ev = Event::Reject(Box::new(rejection));
        }
        Ok(events)
    }

    /// The `resources` rows of the chunk: those replacing stored rows (one
    /// batch, for the MERGE) and new ones (batches to append), each sorted by
    /// type, patient and id so one patient's rows sit together.
    fn row_batches(
        &self,
        mut replaces: Vec<&Candidate>,
        mut appends: Vec<&Candidate>,
    ) -> Result<(Option<RecordBatch>, Option<Vec<RecordBatch>>), LakeError> {
        sort_rows(&mut replaces);
        sort_rows(&mut appends);
        let replaces = if replaces.is_empty() {
            None
        } else {
            Some(self.resource_batch(&replaces)?)
        };
        let appends = if appends.is_empty() {
            None
        } else {
            Some(self.resource_batches(&appends)?)
        };
        Ok((replaces, appends))
    }

    /// The commits of a prepared chunk, with their Delta properties.
    fn chunk_write(
        &self,
        chunk_no: i64,
        quarantine: Option<RecordBatch>,
        replaces: Option<RecordBatch>,
        appends: Option<Vec<RecordBatch>>,
    ) -> ChunkWrite {
        ChunkWrite {
            batch_id: self.id.clone(),
            chunk_no,
            quarantine,
            replaces,
            appends,
            props: self
                .commit_props(chunk_no)
                .with_application_transaction(self.fence()),
            quarantine_props: self.commit_props(chunk_no),
            merge_props: CommitProperties::default()
                .with_metadata(self.commit_metadata(chunk_no))
                .with_application_transaction(self.fence()),
            lease: self.lease.clone(),
        }
    }

    fn add_totals(&mut self, rec: &ChunkRecord) {
        self.totals.outcomes.add(&rec.outcomes);
        for (k, v) in &rec.lines_by_file {
            *self.totals.lines_by_file.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &rec.quarantine_by_reason {
            *self
                .totals
                .quarantine_by_reason
                .entry(k.clone())
                .or_default() += v;
        }
    }

    /// `atlas.batch_id` and `atlas.chunk` in every commit's `commitInfo`:
    /// incremental view refresh reads them to tell changed rows from rows a
    /// MERGE merely copied.
    fn commit_metadata(&self, chunk_no: i64) -> serde_json::Map<String, serde_json::Value> {
        let mut meta = serde_json::Map::new();
        meta.insert("atlas.batch_id".into(), self.id.clone().into());
        meta.insert("atlas.chunk".into(), chunk_no.into());
        meta
    }

    fn commit_props(&self, chunk_no: i64) -> CommitProperties {
        CommitProperties::default()
            .with_application_transaction(Transaction::new(&self.app_id, chunk_no))
            .with_metadata(self.commit_metadata(chunk_no))
    }

    /// The writer fence every `resources` commit carries: Delta refuses a
    /// commit when a commit it has not seen carries the same app id, so two
    /// Atlas writers racing on the store conflict instead of both appending.
    fn fence(&self) -> Transaction {
        Transaction::new(WRITER_APP_ID, self.lease.generation() as i64)
    }
}

/// Commits one prepared chunk: quarantine, then MERGE, then append. The last
/// commit carries the chunk's `txn`, and rows a killed run already wrote are
/// recognised by batch, file and line when the chunk is prepared again.
async fn write_chunk(
    lake: Lake,
    w: ChunkWrite,
    resources: Arc<tokio::sync::Mutex<Option<DeltaTable>>>,
) -> Result<(), LakeError> {
    let started = std::time::Instant::now();
    if let Some(batch) = w.quarantine {
        w.lease.check()?;
        let table = lake.table_handle(QUARANTINE).await?;
        table
            .write(vec![batch])
            .with_save_mode(SaveMode::Append)
            .with_commit_properties(w.quarantine_props)
            .await
            .map_err(delta_err(QUARANTINE))?;
    }
    crash_point("after_quarantine_commit");
    let (appended, replaced) = (
        w.appends
            .as_ref()
            .map_or(0, |b| b.iter().map(RecordBatch::num_rows).sum()),
        w.replaces.as_ref().map_or(0, |b| b.num_rows()),
    );
    let mut props = Some(w.props);
    // Commits are one at a time, so this lock is never contended; it carries
    // the table from one chunk's commit to the next.
    let mut resources = resources.lock().await;
    if let Some(batch) = w.replaces {
        // The MERGE is built on the table as this run last saw it, and its
        // result is the table for the next commit.
        let table = match resources.take() {
            Some(t) => t,
            // There was no store when this run started and it has not
            // created one yet, so the rows it found were another writer's.
            None => {
                return Err(LakeError::CreatedConcurrently {
                    table: format!("tables/{RESOURCES}"),
                    batch: w.batch_id.clone(),
                });
            }
        };
        let p = if w.appends.is_none() {
            props.take()
        } else {
            Some(w.merge_props)
        };
        w.lease.check()?;
        *resources = Some(merge(table, batch, p).await?);
    }
    if let Some(batches) = w.appends {
        w.lease.check()?;
        append_files(
            &lake,
            &mut resources,
            batches,
            &w.batch_id,
            w.chunk_no,
            props.take(),
        )
        .await?;
    }
    tracing::info!(
        chunk = w.chunk_no,
        appended,
        replaced,
        write_ms = started.elapsed().as_millis() as u64,
        "chunk committed"
    );
    crash_point("after_chunk");
    Ok(())
}

/// Appends new rows: one Parquet file per resource type, encoded on every
/// core straight from the chunk's Arrow batch, then one commit of their Add
/// actions (with the chunk's `txn` when `props` has it).
///
/// This is what the Delta writer does, minus its copies: it re-partitions
/// every batch (a `take` of all the JSON) and buffers the file through
/// multipart upload parts. File names are fixed by batch, chunk and type, so
/// a re-run after a crash overwrites the same files instead of leaving
/// orphans, and only the commit makes them part of the table.
async fn append_files(
    lake: &Lake,
    cached: &mut Option<DeltaTable>,
    batches: Vec<RecordBatch>,
    batch_id: &str,
    chunk_no: i64,
    props: Option<CommitProperties>,
) -> Result<(), LakeError> {
    let mut parts = Vec::new();
    for batch in batches {
        parts.extend(split_by_size(split_by_type(batch)?, FILE_JSON_BYTES));
    }
    let encoded = tokio::task::spawn_blocking(move || {
        use rayon::prelude::*;
        parts
            .into_par_iter()
            .map(|(ty, part)| encode_part(&ty, &part))
            .collect::<Result<Vec<_>, LakeError>>()
    })
    .await
    .map_err(|source| LakeError::Task {
        what: "encoding",
        source,
    })??;
    let mut adds = Vec::with_capacity(encoded.len());
    for (n, file) in encoded.into_iter().enumerate() {
        let rel = format!(
            "resource_type={}/part-{batch_id}-{chunk_no:06}-{n:03}.zstd.parquet",
            file.resource_type
        );
        let partition = ("resource_type".to_owned(), Some(file.resource_type));
        adds.push(
            put_file(
                lake,
                RESOURCES,
                rel,
                file.bytes,
                file.stats,
                Some(partition),
            )
            .await?,
        );
    }
    crash_point("before_append_commit");
    let table = NewTable {
        name: RESOURCES,
        schema: &schema::RESOURCES,
        partition_by: &["resource_type"],
    };
    commit_adds(lake, &table, cached, false, adds, props).await
}

/// Writes one data file of a lake table and returns its Add action. The
/// file is not part of the table until the Add is committed.
async fn put_file(
    lake: &Lake,
    table: &str,
    rel: String,
    bytes: Vec<u8>,
    stats: String,
    partition: Option<(String, Option<String>)>,
) -> Result<Action, LakeError> {
    let size = bytes.len() as i64;
    put(lake, &format!("tables/{table}/{rel}"), bytes).await?;
    Ok(Action::Add(Add {
        path: rel,
        partition_values: partition.into_iter().collect(),
        size,
        modification_time: now_micros() / 1000,
        data_change: true,
        stats: Some(stats),
        tags: None,
        deletion_vector: None,
        base_row_id: None,
        default_row_commit_version: None,
        clustering_provider: None,
    }))
}

/// A lake table as [`commit_adds`] creates it on first use.
struct NewTable<'a> {
    name: &'a str,
    schema: &'a arrow::datatypes::SchemaRef,
    partition_by: &'a [&'a str],
}

/// Commits `adds` to a lake table as one append (creating the table with
/// its schema on first use); `cached` is the table as of the last commit
/// and is updated to the new version. With `load`, a missing `cached` is
/// loaded first; without, `None` means the table must not exist yet (the
/// writer saw none), so creating it fails if another writer created it.
async fn commit_adds(
    lake: &Lake,
    t: &NewTable<'_>,
    cached: &mut Option<DeltaTable>,
    load: bool,
    adds: Vec<Action>,
    props: Option<CommitProperties>,
) -> Result<(), LakeError> {
    let name = t.name;
    let props = props.unwrap_or_default();
    let partition_by: Vec<String> = t.partition_by.iter().map(|c| (*c).to_owned()).collect();
    if load && cached.is_none() {
        *cached = lake.table(name).await?;
    }
    match cached {
        Some(table) => {
            let snapshot = table.snapshot().map_err(delta_err(name))?;
            let done = CommitBuilder::from(props)
                .with_actions(adds)
                .build(
                    Some(snapshot as &dyn TableReference),
                    table.log_store(),
                    DeltaOperation::Write {
                        mode: SaveMode::Append,
                        partition_by: (!partition_by.is_empty()).then_some(partition_by),
                        predicate: None,
                    },
                )
                .await
                .map_err(commit_err(name))?;
            table.state = Some(done.snapshot());
        }
        None => {
            let table = CreateBuilder::new()
                .with_location(lake.table_url(name).to_string())
                .with_storage_options(lake.storage_options().clone())
                .with_table_name(name)
                .with_columns(
                    StructType::try_from_arrow(t.schema.as_ref())
                        .map_err(|source| LakeError::Arrow {
                            table: format!("tables/{name}"),
                            source,
                        })?
                        .fields()
                        .cloned(),
                )
                .with_partition_columns(partition_by)
                .with_save_mode(SaveMode::ErrorIfExists)
                .with_actions(adds)
                .with_commit_properties(props)
                .await
                .map_err(commit_err(name))?;
            *cached = Some(table);
        }
    }
    Ok(())
}

/// One encoded Parquet file of the resource table.
struct EncodedPart {
    resource_type: String,
    bytes: Vec<u8>,
    /// The Add action's `stats` JSON.
    stats: String,
}

/// Encodes one type's rows without the partition column (Delta keeps it in
/// the path and the Add action), and computes the file's statistics.
fn encode_part(resource_type: &str, part: &RecordBatch) -> Result<EncodedPart, LakeError> {
    let columns: Vec<usize> = (1..part.num_columns()).collect();
    let data = part.project(&columns).map_err(|source| LakeError::Arrow {
        table: format!("tables/{RESOURCES}"),
        source,
    })?;
    let (bytes, stats) = encode_file(&data, RESOURCES)?;
    Ok(EncodedPart {
        resource_type: resource_type.to_owned(),
        bytes,
        stats,
    })
}

/// One Parquet file of `table` (with the lake's writer properties) and its
/// Delta stats.
fn encode_file(data: &RecordBatch, table: &str) -> Result<(Vec<u8>, String), LakeError> {
    use deltalake::parquet::arrow::ArrowWriter;
    let parquet_err = |source| LakeError::Parquet {
        table: format!("tables/{table}"),
        source,
    };
    // Compressed JSON is a fraction of the text; this avoids regrowing the buffer.
    let mut writer = ArrowWriter::try_new(
        Vec::with_capacity(json_bytes(data) / 4 + (1 << 20)),
        data.schema(),
        Some(writer_properties()),
    )
    .map_err(parquet_err)?;
    writer.write(data).map_err(parquet_err)?;
    let bytes = writer.into_inner().map_err(parquet_err)?;
    Ok((bytes, file_stats(data)?))
}

/// Delta `stats` for a file: row count, null counts of the flat columns, and
/// min/max of the columns readers filter on (ids, batch, line, deleted).
/// Timestamps are left out: Delta writes them at millisecond precision, and
/// a truncated maximum would make readers skip files that match.
fn file_stats(data: &RecordBatch) -> Result<String, LakeError> {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{DataType, Int64Type};
    let mut min = serde_json::Map::new();
    let mut max = serde_json::Map::new();
    let mut nulls = serde_json::Map::new();
    for (field, col) in data.schema().fields().iter().zip(data.columns()) {
        let name = field.name().as_str();
        if matches!(field.data_type(), DataType::List(_)) {
            continue;
        }
        nulls.insert(name.into(), col.null_count().into());
        let ranged = matches!(name, "id" | "patient_id" | "batch_id" | "line" | "deleted");
        if !ranged || col.null_count() == col.len() {
            continue;
        }
        match field.data_type() {
            DataType::Utf8 => {
                let a = col.as_string::<i32>();
                if let (Some(lo), Some(hi)) =
                    (arrow::compute::min_string(a), arrow::compute::max_string(a))
                {
                    min.insert(name.into(), lo.into());
                    max.insert(name.into(), hi.into());
                }
            }
            DataType::Int64 => {
                let a = col.as_primitive::<Int64Type>();
                if let (Some(lo), Some(hi)) = (arrow::compute::min(a), arrow::compute::max(a)) {
                    min.insert(name.into(), lo.into());
                    max.insert(name.into(), hi.into());
                }
            }
            DataType::Boolean => {
                let a = col.as_boolean();
                if let (Some(lo), Some(hi)) = (
                    arrow::compute::min_boolean(a),
                    arrow::compute::max_boolean(a),
                ) {
                    min.insert(name.into(), lo.into());
                    max.insert(name.into(), hi.into());
                }
            }
            _ => {}
        }
    }
    let stats = serde_json::json!({
        "numRecords": data.num_rows(),
        "minValues": min,
        "maxValues": max,
        "nullCount": nulls,
    });
    Ok(stats.to_string())
}

/// About how much JSON one Parquet file of a chunk holds. A chunk of one
/// big type becomes several files, so every core encodes (most of all for
/// the last chunk, which nothing else overlaps).
const FILE_JSON_BYTES: usize = 16 << 20;

/// The bytes of JSON text in a (possibly sliced) batch's `resource` column.
fn json_bytes(batch: &RecordBatch) -> usize {
    use arrow::array::AsArray;
    batch
        .column_by_name("resource")
        .and_then(|c| c.as_string_opt::<i32>())
        .map_or(0, |a| {
            let o = a.value_offsets();
            (o[o.len() - 1] - o[0]).max(0) as usize
        })
}

/// Slices parts whose JSON is over `max_bytes` into about equal zero-copy
/// pieces.
fn split_by_size(
    parts: Vec<(String, RecordBatch)>,
    max_bytes: usize,
) -> Vec<(String, RecordBatch)> {
    let mut out = Vec::with_capacity(parts.len());
    for (ty, part) in parts {
        let bytes = json_bytes(&part);
        let pieces = bytes
            .div_ceil(max_bytes.max(1))
            .clamp(1, part.num_rows().max(1));
        let rows = part.num_rows().div_ceil(pieces);
        let mut start = 0;
        while start < part.num_rows() || (start == 0 && part.num_rows() == 0) {
            let len = rows.min(part.num_rows() - start);
            out.push((ty.clone(), part.slice(start, len)));
            start += len;
            if len == 0 {
                break;
            }
        }
    }
    out
}

/// Slices a batch sorted by resource type into one zero-copy batch per type.
fn split_by_type(batch: RecordBatch) -> Result<Vec<(String, RecordBatch)>, LakeError> {
    let types = batch
        .column(0)
        .as_any()
        .downcast_ref::<arrow::array::StringArray>()
        .ok_or_else(|| LakeError::ColumnType {
            column: format!("resource_type of the {RESOURCES} chunk"),
            expected: "Utf8 text",
        })?;
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=batch.num_rows() {
        if i == batch.num_rows() || types.value(i) != types.value(start) {
            out.push((types.value(start).to_owned(), batch.slice(start, i - start)));
            start = i;
        }
    }
    Ok(out)
}

async fn merge(
    table: DeltaTable,
    batch: RecordBatch,
    props: Option<CommitProperties>,
) -> Result<DeltaTable, LakeError> {
    let ctx = SessionContext::new();
    let types: Vec<_> = {
        let col = batch
            .column(0)
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .ok_or_else(|| LakeError::ColumnType {
                column: format!("resource_type of the {RESOURCES} chunk"),
                expected: "Utf8 text",
            })?;
        let mut t: Vec<String> = col.iter().flatten().map(str::to_owned).collect();
        t.sort();
        t.dedup();
        t.into_iter().map(lit).collect()
    };
    let source = ctx.read_batch(batch).map_err(ctx_err("merge source"))?;
    let predicate = col("target.resource_type")
        .in_list(types, false)
        .and(col("target.resource_type").eq(col("source.resource_type")))
        .and(col("target.id").eq(col("source.id")));
    let names: Vec<String> = schema::RESOURCES
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let upd_names = names.clone();
    let mut merge = table
        .merge(source, predicate)
        .with_source_alias("source")
        .with_target_alias("target")
        .with_writer_properties(writer_properties());
    if let Some(props) = props {
        merge = merge.with_commit_properties(props);
    }
    let (table, _metrics) = merge
        .when_matched_update(move |mut u| {
            for n in &upd_names {
                u = u.update(n.as_str(), col(format!("source.{n}")));
            }
            u
        })
        .map_err(delta_err(RESOURCES))?
        .when_not_matched_insert(move |mut i| {
            for n in &names {
                i = i.set(n.as_str(), col(format!("source.{n}")));
            }
            i
        })
        .map_err(delta_err(RESOURCES))?
        .await
        .map_err(commit_err(RESOURCES))?;
    Ok(table)
}

/// A commit's error; a conflict with another writer's commit is told apart.
fn commit_err(table: &str) -> impl FnOnce(deltalake::DeltaTableError) -> LakeError + '_ {
    move |source| match source {
        deltalake::DeltaTableError::Transaction {
            source: deltalake::kernel::transaction::TransactionError::CommitConflict(_),
        } => LakeError::ConcurrentWriter {
            table: format!("tables/{table}"),
            source,
        },
        source => LakeError::Delta {
            table: table.into(),
            source,
        },
    }
}

/// A session over the store as `table` is now, with `resources` registered.
async fn store_session(table: &DeltaTable) -> Result<SessionContext, LakeError> {
    let ctx = crate::lake::new_session();
    table
        .update_datafusion_session(&ctx.state())
        .map_err(delta_err(RESOURCES))?;
    let provider = table.table_provider().await.map_err(ctx_err(RESOURCES))?;
    ctx.register_table("resources", provider)
        .map_err(ctx_err(RESOURCES))?;
    Ok(ctx)
}

impl Batch<'_> {
    /// The ids of the live store rows carrying each wanted identifier, by
    /// `(type, identifier)`: `system|value` matches a stored identifier
    /// exactly, a bare `value` the value of one in any system (the stored
    /// `identifiers` column holds `system|value` strings, see
    /// [`crate::schema::RESOURCES`]), as the reader's `IdentifierIndex`
    /// matches them.
    async fn identifier_matches(
        &self,
        wanted: &[(String, String)],
    ) -> Result<HashMap<(String, String), Vec<String>>, LakeError> {
        let mut out: HashMap<(String, String), Vec<String>> = HashMap::new();
        let Some(table) = self.lake.table(RESOURCES).await? else {
            return Ok(out);
        };
        // The reader checked the types; they go into the SQL text (for
        // partition pruning), so only R4 type names ever do.
        let mut types: Vec<&str> = wanted
            .iter()
            .map(|(t, _)| t.as_str())
            .filter(|t| atlas_fhir::is_resource_type(t))
            .collect();
        types.sort_unstable();
        types.dedup();
        if types.is_empty() {
            return Ok(out);
        }
        let ctx = store_session(&table).await?;
        // The identifiers themselves come from the input: they are joined
        // from a registered batch, never spliced into the SQL.
        let keys = RecordBatch::try_from_iter(vec![
            (
                "k_type",
                Arc::new(arrow::array::StringArray::from_iter_values(
                    wanted.iter().map(|(t, _)| t.as_str()),
                )) as ArrayRef,
            ),
            (
                "k_ident",
                Arc::new(arrow::array::StringArray::from_iter_values(
                    wanted.iter().map(|(_, i)| i.as_str()),
                )) as ArrayRef,
            ),
            (
                "k_by_value",
                Arc::new(arrow::array::BooleanArray::from_iter(
                    wanted.iter().map(|(_, i)| Some(!i.contains('|'))),
                )) as ArrayRef,
            ),
        ])
        .map_err(|source| LakeError::Arrow {
            table: "conditional delete keys".into(),
            source,
        })?;
        ctx.register_batch("cond_keys", keys)
            .map_err(ctx_err("conditional delete keys"))?;
        let list = sql_type_list(&types);
        let sql = format!(
            "WITH u AS ( \
               SELECT resource_type, id, ident, substr(ident, strpos(ident, '|') + 1) AS val \
               FROM (SELECT resource_type, id, unnest(identifiers) AS ident FROM resources \
                     WHERE resource_type IN ({list}) AND NOT deleted AND identifiers IS NOT NULL) \
             ) \
             SELECT k.k_type, k.k_ident, u.id FROM u JOIN cond_keys k \
               ON u.resource_type = k.k_type AND u.ident = k.k_ident WHERE NOT k.k_by_value \
             UNION ALL \
             SELECT k.k_type, k.k_ident, u.id FROM u JOIN cond_keys k \
               ON u.resource_type = k.k_type AND u.val = k.k_ident WHERE k.k_by_value"
        );
        let batches = ctx
            .sql(&sql)
            .await
            .map_err(ctx_err(RESOURCES))?
            .collect()
            .await
            .map_err(ctx_err(RESOURCES))?;
        for b in &batches {
            let (ty, ident, id) = (
                crate::lake::text_column(b, 0)?,
                crate::lake::text_column(b, 1)?,
                crate::lake::text_column(b, 2)?,
            );
            for r in 0..b.num_rows() {
                let ids = out
                    .entry((ty.value(r).to_owned(), ident.value(r).to_owned()))
                    .or_default();
                if !ids.iter().any(|x| x == id.value(r)) {
                    ids.push(id.value(r).to_owned());
                }
            }
        }
        for ids in out.values_mut() {
            ids.sort_unstable();
        }
        Ok(out)
    }

    /// Current store rows for the chunk's keys.
    async fn existing_rows(
        &self,
        candidates: &[&Candidate],
    ) -> Result<HashMap<(String, String), Existing>, LakeError> {
        let mut out = HashMap::new();
        let Some(table) = self.lake.table(RESOURCES).await? else {
            return Ok(out);
        };
        let mut types: Vec<&str> = candidates
            .iter()
            .filter_map(|c| c.key().map(|k| k.0))
            .collect();
        types.sort_unstable();
        types.dedup();
        if types.is_empty() {
            return Ok(out);
        }
        let wanted: std::collections::HashSet<(&str, &str)> =
            candidates.iter().filter_map(|c| c.key()).collect();
        let ctx = store_session(&table).await?;
        // A semi-join against the chunk's keys: memory follows the chunk, not the store.
        let (key_types, key_ids): (Vec<&str>, Vec<&str>) = wanted.iter().copied().unzip();
        let keys = RecordBatch::try_from_iter(vec![
            (
                "k_type",
                Arc::new(arrow::array::StringArray::from(key_types)) as ArrayRef,
            ),
            (
                "k_id",
                Arc::new(arrow::array::StringArray::from(key_ids)) as ArrayRef,
            ),
        ])
        .map_err(|source| LakeError::Arrow {
            table: "chunk_keys".into(),
            source,
        })?;
        ctx.register_batch("chunk_keys", keys)
            .map_err(ctx_err("chunk keys"))?;
        let list = sql_type_list(&types);
        let sql = format!(
            "SELECT r.resource_type, r.id, r.version_id, r.last_updated, r.content_hash, r.deleted, r.batch_id, r.file, r.line, r.ingested_at \
             FROM resources r JOIN chunk_keys k ON r.resource_type = k.k_type AND r.id = k.k_id \
             WHERE r.resource_type IN ({list})"
        );
        let batches = ctx
            .sql(&sql)
            .await
            .map_err(ctx_err(RESOURCES))?
            .collect()
            .await
            .map_err(ctx_err(RESOURCES))?;
        use arrow::array::{Array, BooleanArray, Int64Array, TimestampMicrosecondArray};
        for b in &batches {
            let s = |i: usize| crate::lake::text_column(b, i);
            let (ty, id, ver, hash, bid, file) = (s(0)?, s(1)?, s(2)?, s(4)?, s(6)?, s(7)?);
            let lu = b
                .column(3)
                .as_any()
                .downcast_ref::<TimestampMicrosecondArray>();
            let del = b.column(5).as_any().downcast_ref::<BooleanArray>();
            let line = b.column(8).as_any().downcast_ref::<Int64Array>();
            let at = b
                .column(9)
                .as_any()
                .downcast_ref::<TimestampMicrosecondArray>();
            let (Some(lu), Some(del), Some(line), Some(at)) = (lu, del, line, at) else {
                return Err(LakeError::ColumnType {
                    column: format!(
                        "last_updated, deleted, line or ingested_at of tables/{RESOURCES}"
                    ),
                    expected: "timestamp, boolean, integer, timestamp",
                });
            };
            for r in 0..b.num_rows() {
                if !wanted.contains(&(ty.value(r), id.value(r))) {
                    continue;
                }
                out.insert(
                    (ty.value(r).to_owned(), id.value(r).to_owned()),
                    Existing {
                        version: VersionStamp {
                            version_id: (!ver.is_null(r)).then(|| ver.value(r).to_owned()),
                            last_updated: (!lu.is_null(r)).then(|| lu.value(r)),
                            content_hash: parse_hash(hash.value(r)),
                        },
                        deleted: del.value(r),
                        batch_id: bid.value(r).to_owned(),
                        file: file.value(r).to_owned(),
                        line: line.value(r),
                        ingested_at: at.value(r),
                    },
                );
            }
        }
        Ok(out)
    }

    /// [`Batch::resource_batch`] for a chunk's new rows, built in two halves
    /// on two cores: copying the JSON into Arrow is the longest step the
    /// main task does per chunk, and nothing else overlaps it at the end.
    fn resource_batches(&self, rows: &[&Candidate]) -> Result<Vec<RecordBatch>, LakeError> {
        if rows.len() < 4096 {
            return Ok(vec![self.resource_batch(rows)?]);
        }
        let (first, second) = rows.split_at(rows.len() / 2);
        let (a, b) = rayon::join(
            || self.resource_batch(first),
            || self.resource_batch(second),
        );
        Ok(vec![a?, b?])
    }

    fn resource_batch(&self, rows: &[&Candidate]) -> Result<RecordBatch, LakeError> {
        let n = rows.len();
        let mut ty = StringBuilder::with_capacity(n, n * 12);
        let mut id = StringBuilder::with_capacity(n, n * 36);
        let mut ver = StringBuilder::new();
        let mut lu = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
        let mut pid = StringBuilder::with_capacity(n, n * 36);
        let mut fv = StringBuilder::with_capacity(n, n * 2);
        let mut syn = BooleanBuilder::with_capacity(n);
        let mut src = StringBuilder::new();
        let mut bid = StringBuilder::new();
        let mut file = StringBuilder::new();
        let mut line = Int64Builder::with_capacity(n);
        let mut ing = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
        let mut del = BooleanBuilder::with_capacity(n);
        let mut hash = StringBuilder::with_capacity(n, n * 32);
        let mut idents = ListBuilder::new(StringBuilder::new());
        let json_bytes: usize = rows
            .iter()
            .map(|c| {
                if let Candidate::Resource(r) = c {
                    r.json.len()
                } else {
                    0
                }
            })
            .sum();
        let mut res = StringBuilder::with_capacity(n, json_bytes);
        for c in rows {
            match c {
                Candidate::Resource(r) => {
                    ty.append_value(&r.resource_type);
                    id.append_value(&r.id);
                    ver.append_option(r.version.version_id.as_deref());
                    lu.append_option(r.version.last_updated);
                    pid.append_option(r.patient_id.as_deref());
                    syn.append_value(r.is_synthetic);
                    file.append_value(&*r.origin.file);
                    line.append_value(r.origin.line as i64);
                    del.append_value(false);
                    hash.append_value(hex128(r.version.content_hash).as_str());
                    for i in &r.identifiers {
                        idents.values().append_value(i);
                    }
                    idents.append(true);
                    res.append_value(&r.json);
                }
                Candidate::Tombstone {
                    resource_type,
                    id: rid,
                    version,
                    file: f,
                    line: l,
                } => {
                    ty.append_value(resource_type);
                    id.append_value(rid);
                    // The version the server reported, so later copies are
                    // ordered against it; a deletion without one is as new
                    // as the batch that carried it.
                    ver.append_option(version.version_id.as_deref());
                    if version.has_version_facts() {
                        lu.append_option(version.last_updated);
                    } else {
                        lu.append_value(self.started_at);
                    }
                    pid.append_option((resource_type == "Patient").then_some(rid.as_str()));
                    syn.append_value(false);
                    file.append_value(&**f);
                    line.append_value(*l as i64);
                    del.append_value(true);
                    hash.append_value(format!("{:032x}", 0u128));
                    idents.append(true);
                    res.append_null();
                }
                Candidate::Dropped => continue,
            }
            fv.append_value(FHIR_VERSION_R4);
            src.append_value(&self.opts.source);
            bid.append_value(&self.id);
            ing.append_value(self.started_at);
        }
        let cols: Vec<ArrayRef> = vec![
            Arc::new(ty.finish()),
            Arc::new(id.finish()),
            Arc::new(ver.finish()),
            Arc::new(lu.finish()),
            Arc::new(pid.finish()),
            Arc::new(fv.finish()),
            Arc::new(syn.finish()),
            Arc::new(src.finish()),
            Arc::new(bid.finish()),
            Arc::new(file.finish()),
            Arc::new(line.finish()),
            Arc::new(ing.finish()),
            Arc::new(del.finish()),
            Arc::new(hash.finish()),
            Arc::new(idents.finish()),
            Arc::new(res.finish()),
        ];
        RecordBatch::try_new(schema::RESOURCES.clone(), cols).map_err(|source| LakeError::Arrow {
            table: format!("tables/{RESOURCES}"),
            source,
        })
    }

    fn quarantine_batch(&self, rejects: &[Rejection]) -> Result<RecordBatch, LakeError> {
        let mut bid = StringBuilder::new();
        let mut src = StringBuilder::new();
        let mut file = StringBuilder::new();
        let mut line = Int64Builder::new();
        let mut reason = StringBuilder::new();
        let mut msg = StringBuilder::new();
        let mut ty = StringBuilder::new();
        let mut rid = StringBuilder::new();
        let mut field = StringBuilder::new();
        let mut len = Int64Builder::new();
        let mut prefix = BinaryBuilder::new();
        let mut at = TimestampMicrosecondBuilder::new().with_timezone("UTC");
        for r in rejects {
            bid.append_value(&self.id);
            src.append_value(&self.opts.source);
            file.append_value(&*r.origin.file);
            line.append_value(r.origin.line as i64);
            reason.append_value(r.reason.code());
            msg.append_value(&r.message);
            ty.append_option(r.resource_type.as_deref());
            rid.append_option(r.resource_id.as_deref());
            field.append_option(r.field.as_deref());
            len.append_value(r.byte_len as i64);
            prefix.append_value(&r.prefix);
            at.append_value(self.started_at);
        }
        let cols: Vec<ArrayRef> = vec![
            Arc::new(bid.finish()),
            Arc::new(src.finish()),
            Arc::new(file.finish()),
            Arc::new(line.finish()),
            Arc::new(reason.finish()),
            Arc::new(msg.finish()),
            Arc::new(ty.finish()),
            Arc::new(rid.finish()),
            Arc::new(field.finish()),
            Arc::new(len.finish()),
            Arc::new(prefix.finish()),
            Arc::new(at.finish()),
        ];
        RecordBatch::try_new(schema::QUARANTINE.clone(), cols).map_err(|source| LakeError::Arrow {
            table: format!("tables/{QUARANTINE}"),
            source,
        })
    }
}

/// Sorts rows by (type, patient, id), the order of [`sort_key`].
///
/// String comparisons dominated a chunk's sort: types and patients are few
/// per chunk, so each gets an exact rank once, and ids (unique) compare by
/// a 16-byte prefix first, with the whole id only on a tie.
fn sort_rows(rows: &mut [&Candidate]) {
    fn ranks<'a>(values: impl Iterator<Item = &'a str>) -> HashMap<&'a str, u32> {
        let mut distinct: Vec<&str> = values.collect();
        distinct.sort_unstable();
        distinct.dedup();
        distinct.into_iter().zip(0u32..).collect()
    }
    fn prefix(s: &str) -> u128 {
        let mut b = [0u8; 16];
        let n = s.len().min(16);
        b[..n].copy_from_slice(&s.as_bytes()[..n]);
        u128::from_be_bytes(b)
    }
    let types = ranks(rows.iter().map(|c| sort_key(c).0));
    let patients = ranks(rows.iter().map(|c| sort_key(c).1));
    let mut keyed: Vec<(u32, u32, u128, &Candidate)> = rows
        .iter()
        .map(|c| {
            let (t, p, i) = sort_key(c);
            (types[t], patients[p], prefix(i), *c)
        })
        .collect();
    keyed.sort_unstable_by(|a, b| {
        (a.0, a.1, a.2)
            .cmp(&(b.0, b.1, b.2))
            .then_with(|| sort_key(a.3).2.cmp(sort_key(b.3).2))
    });
    for (slot, k) in rows.iter_mut().zip(keyed) {
        *slot = k.3;
    }
}

fn sort_key(c: &Candidate) -> (&str, &str, &str) {
    match c {
        Candidate::Resource(r) => (
            &r.resource_type,
            r.patient_id.as_deref().unwrap_or(""),
            &r.id,
        ),
        Candidate::Tombstone {
            resource_type, id, ..
        } => (resource_type, "", id),
        Candidate::Dropped => ("", "", ""),
    }
}

/// The quarantine row of `loser`, a copy of a key that lost to `winner`, a
/// copy of the same chunk.
fn duplicate_rejection(loser: Candidate, winner: &Candidate) -> Rejection {
    let why = why_wins(winner.order(), loser.order());
    let (ty, id) = loser.key().unwrap_or_default();
    let (file, line) = loser.place();
    let json = match &loser {
        Candidate::Resource(r) => r.json.as_bytes(),
        _ => b"",
    };
    duplicate(
        ty,
        id,
        json,
        atlas_ingest::Origin {
            file: Arc::from(file),
            line,
        },
        winner.place(),
        &why,
    )
}

fn writer_properties() -> WriterProperties {
    use deltalake::parquet::file::properties::EnabledStatistics;
    use deltalake::parquet::schema::types::ColumnPath;
    let json = ColumnPath::from("resource");
    let hash = ColumnPath::from("content_hash");
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).unwrap_or_default()))
        // Pages of at most ~128 KiB and 1,024 rows: the JSON column (most of
        // a file) then holds a few hundred rows per page, so a reader after a
        // few rows (a view refresh picking one batch's rows out of a file a
        // MERGE rewrote) decompresses only the pages holding them (page
        // index).
        .set_write_batch_size(128)
        .set_data_page_size_limit(128 * 1024)
        .set_data_page_row_count_limit(1024)
        // The JSON and the hashes are unique per row: a dictionary attempt
        // hashes every byte for nothing, and min/max of JSON text is useless.
        .set_column_dictionary_enabled(json.clone(), false)
        .set_column_statistics_enabled(json, EnabledStatistics::None)
        .set_column_dictionary_enabled(hash, false)
        .set_column_dictionary_enabled("id".into(), false)
        .set_column_bloom_filter_enabled("id".into(), true)
        .set_column_bloom_filter_enabled("patient_id".into(), true)
        .build()
}

async fn write_batch_row(
    lake: &Lake,
    r: &BatchReport,
    started: i64,
    finished: i64,
) -> Result<(), LakeError> {
    let o = &r.outcomes;
    let inputs = serde_json::to_string(&r.inputs).map_err(|source| LakeError::Json {
        path: format!("tables/{BATCHES} (inputs of batch {})", r.batch_id),
        source,
    })?;
    let s = |v: &str| -> ArrayRef { Arc::new(arrow::array::StringArray::from(vec![v.to_owned()])) };
    let i = |v: i64| -> ArrayRef { Arc::new(arrow::array::Int64Array::from(vec![v])) };
    let t = |v: i64| -> ArrayRef {
        Arc::new(arrow::array::TimestampMicrosecondArray::from(vec![v]).with_timezone("UTC"))
    };
    let cols = vec![
        s(&r.batch_id),
        s(&r.source),
        s(&r.raw_path),
        t(started),
        t(finished),
        s(&inputs),
        i(r.bytes as i64),
        i(o.lines_read),
        i(o.stored),
        i(o.unchanged),
        // The column keeps its old name `superseded` (readers of old lakes).
        i(o.older_than_stored),
        i(o.quarantined),
        i(o.skipped),
        i(o.deleted),
        i(o.unresolved_references),
        s(if o.reconciles() {
            "complete"
        } else {
            "complete_unreconciled"
        }),
    ];
    let batch =
        RecordBatch::try_new(schema::BATCHES.clone(), cols).map_err(|source| LakeError::Arrow {
            table: format!("tables/{BATCHES}"),
            source,
        })?;
    let commit = CommitProperties::default()
        .with_application_transaction(Transaction::new(format!("atlas-ingest-{}", r.batch_id), 0));
    let (bytes, stats) = encode_file(&batch, BATCHES)?;
    let rel = format!("part-{}.zstd.parquet", r.batch_id);
    let add = put_file(lake, BATCHES, rel, bytes, stats, None).await?;
    let table = NewTable {
        name: BATCHES,
        schema: &schema::BATCHES,
        partition_by: &[],
    };
    commit_adds(lake, &table, &mut None, true, vec![add], Some(commit)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex128_matches_format() {
        for h in [
            0u128,
            1,
            u128::MAX,
            0x0123_4567_89ab_cdef_0011_2233_4455_6677,
        ] {
            assert_eq!(hex128(h).as_str(), format!("{h:032x}"));
        }
    }

    fn resource(ty: &str, patient: Option<&str>, id: &str) -> Candidate {
        Candidate::Resource(Box::new(ParsedResource {
            resource_type: ty.into(),
            id: id.into(),
            json: String::new(),
            version: VersionStamp {
                version_id: None,
                last_updated: None,
                content_hash: 0,
            },
            patient_id: patient.map(str::to_owned),
            identifiers: Vec::new(),
            is_synthetic: false,
            unresolved_refs: 0,
            full_url: None,
            origin: atlas_ingest::Origin {
                file: Arc::from("f"),
                line: 1,
            },
        }))
    }

    #[test]
    fn big_parts_are_split_into_zero_copy_pieces_that_cover_every_row() {
        let json: Vec<String> = (0..100).map(|i| format!("{{\"n\":{i:0>94}}}")).collect();
        let resource: ArrayRef = Arc::new(arrow::array::StringArray::from(json.clone()));
        let schema = Arc::new(arrow::datatypes::Schema::new(vec![
            arrow::datatypes::Field::new("resource", arrow::datatypes::DataType::Utf8, false),
        ]));
        let batch = RecordBatch::try_new(schema, vec![resource]).unwrap();
        // 100 rows of 100 bytes, sliced like a type's part of a chunk.
        let part = batch.slice(10, 80);
        assert_eq!(json_bytes(&part), 8_000);
        let pieces = split_by_size(vec![("Observation".into(), part)], 3_000);
        assert_eq!(pieces.len(), 3);
        let mut rows = Vec::new();
        for (ty, p) in &pieces {
            assert_eq!(ty, "Observation");
            assert!(json_bytes(p) <= 3_000, "{}", json_bytes(p));
            let a = p
                .column(0)
                .as_any()
                .downcast_ref::<arrow::array::StringArray>()
                .unwrap();
            rows.extend(a.iter().flatten().map(str::to_owned));
        }
        assert_eq!(rows, json[10..90]);
        // Small parts stay whole; empty ones stay one (empty) piece.
        assert_eq!(
            split_by_size(vec![("P".into(), batch.slice(0, 5))], 3_000).len(),
            1
        );
        assert_eq!(
            split_by_size(vec![("P".into(), batch.slice(0, 0))], 3_000).len(),
            1
        );
    }

    #[test]
    fn sort_rows_equals_sorting_by_the_string_key() {
        // Types sharing prefixes, ids sharing 16-byte prefixes, missing patients.
        let mut rows = Vec::new();
        for (i, ty) in ["ObservationDefinition", "Observation", "Patient", "Obs"]
            .iter()
            .enumerate()
        {
            for p in [
                None,
                Some("p-0000000000000000-b"),
                Some("p-0000000000000000-a"),
                Some("q"),
            ] {
                for id in [
                    "0123456789abcdef-2",
                    "0123456789abcdef-1",
                    "z",
                    "0123456789abcdef",
                ] {
                    rows.push(resource(ty, p, &format!("{id}{i}")));
                }
            }
        }
        rows.push(Candidate::Tombstone {
            resource_type: "Observation".into(),
            id: "0123456789abcdef-0".into(),
            version: VersionStamp {
                version_id: None,
                last_updated: None,
                content_hash: 0,
            },
            file: Arc::from("f"),
            line: 2,
        });
        let mut fast: Vec<&Candidate> = rows.iter().rev().collect();
        sort_rows(&mut fast);
        let mut slow: Vec<&Candidate> = rows.iter().collect();
        slow.sort_by(|a, b| sort_key(a).cmp(&sort_key(b)));
        let keys = |v: &[&Candidate]| {
            v.iter()
                .map(|c| sort_key(c))
                .map(|(a, b, c)| format!("{a}|{b}|{c}"))
                .collect::<Vec<_>>()
        };
        assert_eq!(keys(&fast), keys(&slow));
    }
}
