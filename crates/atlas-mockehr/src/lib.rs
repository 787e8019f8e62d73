//! A deterministic FHIR R4 server on loopback: `atlas mock-ehr` for demos
//! and offline pipeline tests, and the server the Bulk Data / REST
//! connector's tests run against.
//!
//! Owns: [`MockEhr`] (a versioned resource store on a logical clock that
//! starts at 2026-01-01T00:00:00Z and moves only on writes, changed by
//! seeded [`MockEhr::tick`]s), its HTTP endpoints ([`MockEhr::start`]):
//! SMART Backend Services tokens (RS384/ES384 `private_key_jwt`,
//! `jti` replay, v1/v2 system scopes), Bulk Data `$export` (system,
//! Patient, Group; STU2, STU3 and STU4-ballot manifests; `_since` with
//! deleted Bundles, `_type`, `_typeFilter`, `_elements`), REST
//! `_lastUpdated` search with keyset paging and `_history`; the scripted
//! fault timeline ([`Fault`]); and the request log tests assert on.
//!
//! | module | owns |
//! |---|---|
//! | `config` | [`MockConfig`] (TOML), [`Fault`], [`FaultKind`], [`Endpoint`] |
//! | `store`, `load`, `json`, `clock` | versions, ticks, loading NDJSON, byte-keeping meta rewrite, instants |
//! | `auth` | the token endpoint and the bearer check |
//! | `export`, `filter`, `jobs` | kick-off, filters, job files, status/manifest, downloads |
//! | `rest`, `capability` | search, read, history; CapabilityStatement, SMART configuration |
//! | `server`, `faults`, `respond` | router, fault layer, request log, listeners |
//!
//! May call: `atlas-fhir` (instants, ids, resource types) among Atlas
//! crates, plus axum/tokio, serde_json, jsonwebtoken, rand. No lake, no
//! DataFusion: a test that depends on this crate stays quick to build.

// Checks return the HTTP answer to give on failure (`Result<_, Response>`):
// a cold path, once per request, where boxing would only add noise.
#![allow(clippy::result_large_err)]

mod auth;
mod capability;
mod clock;
mod config;
mod error;
mod export;
mod faults;
mod filter;
mod jobs;
mod json;
mod load;
mod respond;
mod rest;
mod server;
mod store;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use axum::http::{HeaderMap, Method, StatusCode, Uri};

pub use config::{
    ClientRegistration, Endpoint, Fault, FaultKind, GroupDef, KickoffMode, ManifestShape,
    MockConfig,
};
pub use error::MockError;
pub use load::LoadStats;
pub use server::RunningMock;
pub use store::{Change, ChangeKind, ChangeSet, VersionInfo};

/// One request as the mock saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLog {
    pub method: String,
    /// Path and query, as sent.
    pub path: String,
    /// The `Host` header.
    pub host: String,
    /// Whether an `Authorization` header came with it.
    pub had_authorization: bool,
    pub status: u16,
    /// The endpoint it counted as for faults (`None`: metadata, discovery,
    /// unknown paths).
    pub endpoint: Option<Endpoint>,
    /// It arrived on the other host (after a redirect).
    pub other_host: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Urls {
    origin: String,
    fhir_base: String,
    token_url: String,
    other_origin: String,
}

/// The mock EHR's state, shared by its endpoints and the test that runs it.
pub struct MockEhr {
    config: MockConfig,
    clients: Vec<auth::Client>,
    stats: LoadStats,
    store: Mutex<store::Store>,
    auth: Mutex<auth::AuthState>,
    jobs: Mutex<jobs::Jobs>,
    faults: Mutex<faults::FaultTimeline>,
    log: Mutex<Vec<RequestLog>>,
    urls: OnceLock<Urls>,
    /// Requests on the main listener, for `auto_tick_every`.
    seen: AtomicU64,
}

/// A poisoned lock still holds consistent data here (every critical
/// section finishes its writes before anything can panic), so recover it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MockEhr {
    /// Loads every `*.ndjson` / `*.ndjson.gz` below `dir` (recursively,
    /// mixed types allowed) as version 1 of each resource.
    pub fn from_ndjson_dir(dir: &Path, config: MockConfig) -> Result<Arc<MockEhr>, MockError> {
        let mut store = store::Store::new(config.seed);
        let stats = load::load_dir(dir, &mut store)?;
        MockEhr::build(store, stats, config)
    }

    /// The same from JSON values (non-resources are counted as skipped).
    pub fn from_resources(
        resources: Vec<serde_json::Value>,
        config: MockConfig,
    ) -> Result<Arc<MockEhr>, MockError> {
        let mut store = store::Store::new(config.seed);
        let mut stats = LoadStats::default();
        for r in resources {
            stats.add_line(&mut store, &r.to_string());
        }
        MockEhr::build(store, stats, config)
    }

    fn build(
        store: store::Store,
        stats: LoadStats,
        config: MockConfig,
    ) -> Result<Arc<MockEhr>, MockError> {
        config.check()?;
        let clients = config
            .clients
            .iter()
            .map(auth::Client::from_registration)
            .collect::<Result<_, _>>()?;
        tracing::debug!(?stats, "mock EHR loaded");
        Ok(Arc::new(MockEhr {
            faults: Mutex::new(faults::FaultTimeline::new(config.faults.clone())),
            config,
            clients,
            stats,
            store: Mutex::new(store),
            auth: Mutex::default(),
            jobs: Mutex::default(),
            log: Mutex::default(),
            urls: OnceLock::new(),
            seen: AtomicU64::new(0),
        }))
    }

    /// Binds `addr` (port 0 picks one) and a second listener on
    /// 127.0.0.1:0, the "other host" redirects point at, and serves both
    /// until the returned handle is shut down or dropped. Once per mock.
    pub async fn start(self: &Arc<Self>, addr: SocketAddr) -> Result<RunningMock, MockError> {
        server::start(self, addr).await
    }

    /// Applies one deterministic batch of `changes_per_tick` changes now.
    pub fn tick(&self) -> ChangeSet {
        let set = lock(&self.store).tick(self.config.changes_per_tick);
        tracing::debug!(changes = set.changes.len(), "mock EHR tick");
        set
    }

    /// The mock's clock: the instant of the last write (FHIR instant).
    pub fn now(&self) -> String {
        clock::format_instant(lock(&self.store).clock)
    }

    /// Every key's version as of `at` (a FHIR instant; `None`, or text that
    /// is not an instant, means now), deleted ones included.
    pub fn snapshot(&self, at: Option<&str>) -> BTreeMap<(String, String), VersionInfo> {
        let store = lock(&self.store);
        let at = at.and_then(clock::parse_instant).unwrap_or(store.clock);
        store.snapshot(at)
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<RequestLog> {
        lock(&self.log).clone()
    }

    /// Replaces the fault timeline; call counters restart at zero, so `nth`
    /// counts from now.
    pub fn set_faults(&self, faults: Vec<Fault>) {
        *lock(&self.faults) = faults::FaultTimeline::new(faults);
    }

    /// What loading found.
    pub fn stats(&self) -> &LoadStats {
        &self.stats
    }

    pub fn config(&self) -> &MockConfig {
        &self.config
    }

    pub(crate) fn lock_store(&self) -> MutexGuard<'_, store::Store> {
        lock(&self.store)
    }
    pub(crate) fn lock_auth(&self) -> MutexGuard<'_, auth::AuthState> {
        lock(&self.auth)
    }
    pub(crate) fn lock_jobs(&self) -> MutexGuard<'_, jobs::Jobs> {
        lock(&self.jobs)
    }
    pub(crate) fn lock_faults(&self) -> MutexGuard<'_, faults::FaultTimeline> {
        lock(&self.faults)
    }

    pub(crate) fn urls(&self) -> Option<&Urls> {
        self.urls.get()
    }
    pub(crate) fn origin(&self) -> String {
        self.urls().map(|u| u.origin.clone()).unwrap_or_default()
    }
    pub(crate) fn fhir_base(&self) -> String {
        self.urls().map(|u| u.fhir_base.clone()).unwrap_or_default()
    }
    pub(crate) fn token_url(&self) -> String {
        self.urls().map(|u| u.token_url.clone()).unwrap_or_default()
    }
    pub(crate) fn other_origin(&self) -> String {
        self.urls()
            .map(|u| u.other_origin.clone())
            .unwrap_or_default()
    }

    /// One tick every `auto_tick_every` main-listener requests.
    fn maybe_auto_tick(&self) {
        let n = self.seen.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(every) = self.config.auto_tick_every
            && n.is_multiple_of(u64::from(every))
        {
            self.tick();
        }
    }

    fn log_request(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        status: StatusCode,
        endpoint: Option<Endpoint>,
        other_host: bool,
    ) {
        let entry = server::log_entry(method, uri, headers, status, endpoint, other_host);
        tracing::debug!(method = %entry.method, path = %entry.path, status = entry.status, other_host, "mock EHR request");
        lock(&self.log).push(entry);
    }
}
