//! The writer lease: at most one writer per lake at a time.
//!
//! Two `atlas ingest` runs over one lake used to commit blind appends side by
//! side and leave two live rows per key (issue 18, part 5). Every command
//! that writes the lake's tables (`ingest`, `views refresh`, `views create`,
//! `views drop`, `demo`) first takes this lease; a second writer fails at
//! once naming the holder, or waits (`--wait`).
//!
//! The lease is a sequence of small objects `_locks/writer/<generation>.json`
//! (20 digits). The object with the highest generation names the holder
//! (host, pid, command, start, expiry). Taking the lease means creating the
//! next generation with `PutMode::Create`, which is atomic on a local disk
//! (a hard link) and on S3 (`If-None-Match: *`, honoured by AWS, MinIO,
//! R2 and moto 5.2.5), so of two takers exactly one wins; the other sees
//! the winner on its next look. Only creation needs to be atomic: nothing
//! ever updates another writer's object, so no `If-Match` is needed (the
//! local store does not offer it).
//!
//! The next generation may be created only when the current holder
//! released it, its expiry (renewed by a heartbeat every quarter of the
//! lease's time to live) has passed, or it is a process of this machine
//! that no longer exists (a killed run). A holder whose heartbeat finds a
//! higher generation, or that could not renew before its expiry, has lost
//! the lease: [`WriterLease::check`] fails from then on, and writers call it
//! before each commit. The lease's generation also goes into every commit
//! to the resource store as a Delta `txn` action (`atlas-writer`), so that
//! Delta's own conflict check refuses a commit racing another Atlas writer
//! even if a lease were ever broken (a paused process outliving its lease).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use crate::lake::{Lake, LakeError};

/// Where the lease objects live, relative to the lake root.
pub const LEASE_DIR: &str = "_locks/writer";

/// The Delta `txn` application id every resource-store commit carries, with
/// the writer's lease generation as its version.
pub const WRITER_APP_ID: &str = "atlas-writer";

/// Who holds (or held) a lake's writer lease.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseHolder {
    pub generation: u64,
    pub host: String,
    pub pid: u32,
    /// Tells processes of different machines or containers apart when the
    /// host names agree: boot id and pid namespace (Linux), else empty.
    #[serde(default)]
    pub process_space: String,
    /// The process's start time (clock ticks after boot, Linux), so a
    /// reused pid is not mistaken for the holder.
    #[serde(default)]
    pub pid_start: Option<u64>,
    pub command: String,
    /// RFC 3339.
    pub started: String,
    /// RFC 3339, renewed by the heartbeat.
    pub expires: String,
    pub expires_micros: i64,
    #[serde(default)]
    pub released: bool,
}

impl std::fmt::Display for LeaseHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` (pid {} on {}, since {}, lease {} until {})",
            self.command, self.pid, self.host, self.started, self.generation, self.expires
        )
    }
}

/// A callback told who holds the lease while [`WriterLease::acquire`] waits.
pub type WaitCallback = Arc<dyn Fn(&LeaseHolder) + Send + Sync>;

/// How to take the lease.
#[derive(Clone)]
pub struct LeaseOptions {
    /// What the holder is doing, shown to other writers (`atlas ingest data/`).
    pub command: String,
    /// How long the lease lasts without a heartbeat (default 60 s, or
    /// `ATLAS_LEASE_TTL_SECS`).
    pub ttl: Duration,
    /// Wait for the holder instead of failing at once.
    pub wait: bool,
    /// Called on every poll while waiting.
    pub on_wait: Option<WaitCallback>,
}

impl std::fmt::Debug for LeaseOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseOptions")
            .field("command", &self.command)
            .field("ttl", &self.ttl)
            .field("wait", &self.wait)
            .finish()
    }
}

impl Default for LeaseOptions {
    fn default() -> Self {
        let ttl = std::env::var("ATLAS_LEASE_TTL_SECS")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|&s| s > 0)
            .unwrap_or(60);
        LeaseOptions {
            command: std::env::args().collect::<Vec<_>>().join(" "),
            ttl: Duration::from_secs(ttl),
            wait: false,
            on_wait: None,
        }
    }
}

/// A held writer lease. Clones share it; it is released by
/// [`WriterLease::release`] or, at the latest, when the last clone drops.
#[derive(Clone)]
pub struct WriterLease {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for WriterLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterLease")
            .field("generation", &self.generation())
            .finish()
    }
}

struct Inner {
    lake: Lake,
    holder: Mutex<LeaseHolder>,
    lost: AtomicBool,
    released: AtomicBool,
    heartbeat: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Serialises the heartbeat's renewals with the release, so a renewal
    /// in flight never overwrites the released record.
    io: tokio::sync::Mutex<()>,
}

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

fn rfc3339(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

fn object_name(generation: u64) -> String {
    format!("{LEASE_DIR}/{generation:020}.json")
}

fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into())
}

fn this_process_space() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let ns = std::fs::read_link("/proc/self/ns/pid")
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    if boot.is_empty() && ns.is_empty() {
        String::new()
    } else {
        format!("{boot}/{ns}")
    }
}

/// Field 22 of `/proc/<pid>/stat`: when the process started.
fn pid_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count from its `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the holder is a process of this machine that is gone (a killed
/// run); `false` when that cannot be told.
fn holder_is_dead(h: &LeaseHolder) -> bool {
    let space = this_process_space();
    if h.host != this_host() || space.is_empty() || h.process_space != space {
        return false;
    }
    if !std::path::Path::new("/proc/self/stat").exists() {
        return false;
    }
    match pid_start(h.pid) {
        None => true,
        Some(start) => h.pid_start.is_some_and(|s| s != start),
    }
}

/// Why the current holder does not block a new one, if it does not.
fn is_free(h: &LeaseHolder, now: i64) -> bool {
    h.released || h.expires_micros <= now || holder_is_dead(h)
}

fn store_err(what: String) -> impl FnOnce(object_store::Error) -> LakeError {
    move |source| LakeError::Store { url: what, source }
}

/// The generations present, in ascending order.
async fn generations(lake: &Lake) -> Result<Vec<u64>, LakeError> {
    let prefix = lake.path(LEASE_DIR);
    let mut listing = lake.object_store().list(Some(&prefix));
    let mut out = Vec::new();
    while let Some(item) = listing.next().await {
        let meta = match item {
            Ok(m) => m,
            Err(object_store::Error::NotFound { .. }) => break,
            Err(e) => return Err(store_err(LEASE_DIR.into())(e)),
        };
        if let Some(n) = meta
            .location
            .filename()
            .and_then(|f| f.strip_suffix(".json"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

async fn read_holder(lake: &Lake, generation: u64) -> Result<Option<LeaseHolder>, LakeError> {
    let rel = object_name(generation);
    match lake.object_store().get(&lake.path(&rel)).await {
        Ok(r) => {
            let bytes = r.bytes().await.map_err(store_err(rel.clone()))?;
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| LakeError::Json { path: rel, source })
        }
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(store_err(rel)(e)),
    }
}

/// The current holder of the lake's writer lease, if any object names one
/// (released and expired ones included: check [`LeaseHolder::released`] and
/// the expiry).
pub async fn current_holder(lake: &Lake) -> Result<Option<LeaseHolder>, LakeError> {
    match generations(lake).await?.last() {
        Some(&g) => read_holder(lake, g).await,
        None => Ok(None),
    }
}

fn encode(h: &LeaseHolder) -> Result<PutPayload, LakeError> {
    serde_json::to_vec_pretty(h)
        .map(PutPayload::from)
        .map_err(|source| LakeError::Json {
            path: object_name(h.generation),
            source,
        })
}

impl WriterLease {
    /// Takes the lake's writer lease: at once when it is free, else fails
    /// with [`LakeError::Busy`] naming the holder, or with `opts.wait` polls
    /// until the holder releases it or its lease expires.
    pub async fn acquire(lake: &Lake, opts: &LeaseOptions) -> Result<WriterLease, LakeError> {
        let ttl = opts.ttl.max(Duration::from_secs(2));
        let started = now_micros();
        let pid = std::process::id();
        loop {
            let gens = generations(lake).await?;
            let top = gens.last().copied().unwrap_or(0);
            if top > 0 {
                match read_holder(lake, top).await? {
                    Some(h) if !is_free(&h, now_micros()) => {
                        if !opts.wait {
                            return Err(LakeError::Busy {
                                lake: lake.root().to_string(),
                                holder: Box::new(h),
                            });
                        }
                        if let Some(cb) = &opts.on_wait {
                            cb(&h);
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                        continue;
                    }
                    // Free, or removed under us (then look again).
                    Some(_) => {}
                    None => continue,
                }
            }
            let generation = top + 1;
            let now = now_micros();
            let expires = now + ttl.as_micros() as i64;
            let holder = LeaseHolder {
                generation,
                host: this_host(),
                pid,
                process_space: this_process_space(),
                pid_start: pid_start(pid),
                command: opts.command.clone(),
                started: rfc3339(started),
                expires: rfc3339(expires),
                expires_micros: expires,
                released: false,
            };
            let rel = object_name(generation);
            let put = lake
                .object_store()
                .put_opts(
                    &lake.path(&rel),
                    encode(&holder)?,
                    PutOptions::from(PutMode::Create),
                )
                .await;
            match put {
                Ok(_) => {}
                // Another writer took this generation first: look again.
                Err(object_store::Error::AlreadyExists { .. }) => continue,
                Err(e) => return Err(store_err(rel)(e)),
            }
            // A slot below the top that was cleaned up can be created again
            // by a taker that looked long ago: the top must still be ours.
            if generations(lake).await?.last().copied() != Some(generation) {
                let _ = lake.object_store().delete(&lake.path(&rel)).await;
                continue;
            }
            // Older records are of no use beyond the previous holder's.
            for g in gens.iter().filter(|&&g| g + 1 < top) {
                let _ = lake
                    .object_store()
                    .delete(&lake.path(&object_name(*g)))
                    .await;
            }
            let lease = WriterLease {
                inner: Arc::new(Inner {
                    lake: lake.clone(),
                    holder: Mutex::new(holder),
                    lost: AtomicBool::new(false),
                    released: AtomicBool::new(false),
                    heartbeat: Mutex::new(None),
                    io: tokio::sync::Mutex::new(()),
                }),
            };
            let beat = tokio::spawn(heartbeat(Arc::downgrade(&lease.inner), ttl));
            if let Ok(mut h) = lease.inner.heartbeat.lock() {
                *h = Some(beat);
            }
            return Ok(lease);
        }
    }

    /// The lease's generation: increases with every new holder of the lake.
    pub fn generation(&self) -> u64 {
        self.holder().generation
    }

    /// The holder record as last written.
    pub fn holder(&self) -> LeaseHolder {
        match self.inner.holder.lock() {
            Ok(h) => h.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Fails when the lease is no longer held (another writer took it over
    /// after it expired, or it was released): call before every commit.
    pub fn check(&self) -> Result<(), LakeError> {
        let h = self.holder();
        if self.inner.lost.load(Ordering::SeqCst)
            || self.inner.released.load(Ordering::SeqCst)
            || h.expires_micros <= now_micros()
        {
            return Err(LakeError::LeaseLost {
                lake: self.inner.lake.root().to_string(),
                generation: h.generation,
            });
        }
        Ok(())
    }

    /// Releases the lease so the next writer need not wait for it to expire.
    pub async fn release(self) -> Result<(), LakeError> {
        self.inner.release().await
    }
}

impl Inner {
    fn stop_heartbeat(&self) {
        if let Ok(mut h) = self.heartbeat.lock()
            && let Some(h) = h.take()
        {
            h.abort();
        }
    }

    fn released_record(&self) -> Option<LeaseHolder> {
        if self.released.swap(true, Ordering::SeqCst) {
            return None;
        }
        let mut h = match self.holder.lock() {
            Ok(h) => h.clone(),
            Err(p) => p.into_inner().clone(),
        };
        h.released = true;
        let now = now_micros();
        h.expires_micros = now;
        h.expires = rfc3339(now);
        Some(h)
    }

    async fn release(&self) -> Result<(), LakeError> {
        let Some(h) = self.released_record() else {
            return Ok(());
        };
        // Waits for a renewal in flight; the heartbeat stops after it.
        let _io = self.io.lock().await;
        self.stop_heartbeat();
        let rel = object_name(h.generation);
        self.lake
            .object_store()
            .put(&self.lake.path(&rel), encode(&h)?)
            .await
            .map(|_| ())
            .map_err(store_err(rel))
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop_heartbeat();
        let Some(h) = self.released_record() else {
            return;
        };
        let Ok(payload) = encode(&h) else { return };
        let rel = object_name(h.generation);
        // A local lake: write the release now, whatever the runtime is doing.
        if self.lake.is_local()
            && let Ok(path) = self.lake.root().join(&rel).map(|u| u.to_file_path())
            && let Ok(path) = path
        {
            let tmp = path.with_extension(format!("release-{}", std::process::id()));
            let bytes: Vec<u8> = payload.into_iter().flat_map(|b| b.to_vec()).collect();
            if std::fs::write(&tmp, bytes).is_ok() {
                let _ = std::fs::rename(&tmp, &path);
            }
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let store = self.lake.object_store().clone();
            let path = self.lake.path(&rel);
            rt.spawn(async move {
                let _ = store.put(&path, payload).await;
            });
        }
    }
}

/// Renews the lease every quarter of its time to live until it is lost,
/// released or dropped.
async fn heartbeat(inner: std::sync::Weak<Inner>, ttl: Duration) {
    let period = (ttl / 4).max(Duration::from_millis(500));
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.released.load(Ordering::SeqCst) {
            return;
        }
        let mut h = match inner.holder.lock() {
            Ok(h) => h.clone(),
            Err(p) => p.into_inner().clone(),
        };
        match generations(&inner.lake).await {
            Ok(gens) if gens.last().is_some_and(|&g| g > h.generation) => {
                tracing::error!(
                    generation = h.generation,
                    "the lake's writer lease was taken over by another writer"
                );
                inner.lost.store(true, Ordering::SeqCst);
                return;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "writer lease heartbeat: cannot list the lease"),
        }
        let now = now_micros();
        if h.expires_micros <= now {
            // Not renewed in time: another writer may have taken over.
            inner.lost.store(true, Ordering::SeqCst);
            return;
        }
        h.expires_micros = now + ttl.as_micros() as i64;
        h.expires = rfc3339(h.expires_micros);
        let rel = object_name(h.generation);
        let Ok(payload) = encode(&h) else { return };
        let _io = inner.io.lock().await;
        if inner.released.load(Ordering::SeqCst) {
            return;
        }
        match inner
            .lake
            .object_store()
            .put(&inner.lake.path(&rel), payload)
            .await
        {
            Ok(_) => {
                if let Ok(mut cur) = inner.holder.lock() {
                    *cur = h;
                }
            }
            Err(e) => tracing::warn!(error = %e, "writer lease heartbeat: cannot renew"),
        }
    }
}
