//! The Bulk Data `$export` client (Bulk Data Access IG STU2, with the STU3
//! and STU4 manifest features) and [`BulkPull`], one resumable pull.
//!
//! The flow: kick-off (`POST` with a `Parameters` body, falling back to
//! `GET` with query parameters when the server refuses POST), status
//! polling (`202` with `X-Progress` and `Retry-After` until `200` and the
//! manifest, its `link[next]` pages merged), then the files: downloaded in
//! parallel (bounded), each streamed to a `.part` file while hashed
//! (SHA-256) and its lines counted, checked complete (no transport error,
//! `Content-Length` met, a whole last line, a gzip stream that ends with its
//! checksum, the manifest's `count` met or the same bytes twice), then
//! renamed into place: a staged file under its final name is complete.
//!
//! What survives a kill ([`crate::state`]): the status URL as soon as the
//! job is kicked off, the manifest as soon as it is read, and the files
//! done (saved at most once a second, so 20,000 tiny files do not rewrite
//! the state 20,000 times; a staged file missing from the state is
//! downloaded again on resume). Files that answer 404/410 after the job completed
//! have expired: the job is started again, with a message.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use url::Url;

use crate::error::{ConnectError, outcome_text};
use crate::http::{HttpClient, Request};
use crate::manifest::{FileKind, Manifest, OutputFile};
use crate::retry::RetryPolicy;
use crate::state::{BulkJob, ConnectorState, FileDone, StateStore};

/// Which data an export asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportLevel {
    /// `[base]/$export`: everything.
    System,
    /// `[base]/Patient/$export`: every patient's compartment.
    Patient,
    /// `[base]/Group/[id]/$export`: the group's members' compartments.
    Group(String),
}

/// One kick-off request's parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRequest {
    pub level: ExportLevel,
    pub types: Vec<String>,
    /// `_since` (a FHIR instant).
    pub since: Option<String>,
    pub type_filters: Vec<String>,
    pub elements: Vec<String>,
    pub include_associated_data: Vec<String>,
    /// `patient` (POST only): `Patient/<id>` references.
    pub patients: Vec<String>,
}

impl ExportRequest {
    pub fn new(level: ExportLevel) -> Self {
        ExportRequest {
            level,
            types: Vec::new(),
            since: None,
            type_filters: Vec::new(),
            elements: Vec::new(),
            include_associated_data: Vec::new(),
            patients: Vec::new(),
        }
    }

    /// The operation's path under the FHIR base.
    pub fn path(&self) -> String {
        match &self.level {
            ExportLevel::System => "$export".into(),
            ExportLevel::Patient => "Patient/$export".into(),
            ExportLevel::Group(id) => format!("Group/{id}/$export"),
        }
    }

    /// Checks what the spec forbids a client to send: `_typeFilter` queries
    /// with search result parameters (`_include`, `_sort`, ...; Bulk Data
    /// STU2 "SHALL NOT"), queries without a `Type?`, malformed types and `_since`.
    pub fn check(&self) -> Result<(), ConnectError> {
        const RESULT_PARAMS: &[&str] = &[
            "_include",
            "_revinclude",
            "_sort",
            "_count",
            "_summary",
            "_elements",
            "_contained",
            "_containedType",
            "_total",
        ];
        for f in &self.type_filters {
            let Some((ty, query)) = f.split_once('?') else {
                return Err(ConnectError::Usage(format!(
                    "_typeFilter {f:?}: write it as Type?query"
                )));
            };
            if !is_type_name(ty) {
                return Err(ConnectError::Usage(format!(
                    "_typeFilter {f:?}: {ty:?} is not a resource type"
                )));
            }
            for (name, _) in url::form_urlencoded::parse(query.as_bytes()) {
                let base = name.split(':').next().unwrap_or(&name);
                if RESULT_PARAMS.contains(&base) {
                    return Err(ConnectError::Usage(format!(
                        "_typeFilter {f:?}: search result parameter {name} is not allowed in a _typeFilter (Bulk Data SHALL NOT)"
                    )));
                }
            }
        }
        if let Some(t) = self.types.iter().find(|t| !is_type_name(t)) {
            return Err(ConnectError::Usage(format!(
                "_type {t:?} is not a resource type"
            )));
        }
        if let Some(s) = &self.since
            && chrono::DateTime::parse_from_rfc3339(s).is_err()
        {
            return Err(ConnectError::Usage(format!(
                "_since {s:?} is not a FHIR instant (e.g. 2026-01-01T00:00:00Z)"
            )));
        }
        Ok(())
    }

    /// The query parameters of a GET kick-off.
    pub fn query(&self) -> Vec<(&'static str, String)> {
        let mut q = vec![("_outputFormat", "application/fhir+ndjson".to_owned())];
        if !self.types.is_empty() {
            q.push(("_type", self.types.join(",")));
        }
        if let Some(s) = &self.since {
            q.push(("_since", s.clone()));
        }
        q.extend(self.type_filters.iter().map(|f| ("_typeFilter", f.clone())));
        if !self.elements.is_empty() {
            q.push(("_elements", self.elements.join(",")));
        }
        if !self.include_associated_data.is_empty() {
            q.push((
                "includeAssociatedData",
                self.include_associated_data.join(","),
            ));
        }
        q
    }

    /// The `Parameters` body of a POST kick-off.
    pub fn parameters(&self) -> Value {
        let mut p =
            vec![json!({"name": "_outputFormat", "valueString": "application/fhir+ndjson"})];
        p.extend(
            self.types
                .iter()
                .map(|t| json!({"name": "_type", "valueString": t})),
        );
        if let Some(s) = &self.since {
            p.push(json!({"name": "_since", "valueInstant": s}));
        }
        p.extend(
            self.type_filters
                .iter()
                .map(|f| json!({"name": "_typeFilter", "valueString": f})),
        );
        p.extend(
            self.elements
                .iter()
                .map(|e| json!({"name": "_elements", "valueString": e})),
        );
        p.extend(
            self.include_associated_data
                .iter()
                .map(|c| json!({"name": "includeAssociatedData", "valueCode": c})),
        );
        p.extend(
            self.patients
                .iter()
                .map(|r| json!({"name": "patient", "valueReference": {"reference": r}})),
        );
        json!({"resourceType": "Parameters", "parameter": p})
    }

    /// What the request asks for, without `_since`: the key of its
    /// watermark (`ConnectorState::bulk_watermarks`).
    pub fn watermark_key(&self) -> String {
        ExportRequest {
            since: None,
            ..self.clone()
        }
        .describe()
    }

    /// One line naming the request, stored with the job so a resumed pull
    /// can tell it is the same export.
    pub fn describe(&self) -> String {
        let mut s = self.path();
        for (k, v) in self.query().iter().skip(1) {
            s.push_str(&format!(" {k}={v}"));
        }
        for p in &self.patients {
            s.push_str(&format!(" patient={p}"));
        }
        s
    }
}

/// Tuning of the Bulk client.
#[derive(Debug, Clone)]
pub struct BulkOptions {
    /// Files downloaded at once.
    pub parallel: usize,
    /// Waits between status polls (`Retry-After` clamped to its bounds).
    pub poll: RetryPolicy,
    /// Downloads of one file before giving up.
    pub file_attempts: u32,
    /// Times an export whose files expired is started again.
    pub max_restarts: u32,
    /// Longest time to wait for an export to complete.
    pub max_export_wait: Duration,
    /// Ask for gzip (`Accept-Encoding: gzip`): less on the wire, more CPU
    /// at both ends; worth it across a WAN, not on loopback.
    pub gzip: bool,
    /// `Prefer: handling=lenient`: the server may ignore parameters it does
    /// not support (reporting them in the error files) instead of refusing.
    pub lenient: bool,
}

impl Default for BulkOptions {
    fn default() -> Self {
        BulkOptions {
            parallel: 5,
            poll: RetryPolicy {
                max_attempts: u32::MAX,
                base: Duration::from_secs(1),
                max_wait: Duration::from_secs(120),
                min_wait: Duration::from_secs(1),
            },
            file_attempts: 5,
            max_restarts: 2,
            max_export_wait: Duration::from_secs(24 * 3600),
            gzip: true,
            lenient: false,
        }
    }
}

/// What a pull is doing, for a progress bar.
#[derive(Debug, Default)]
pub struct PullProgress {
    /// The phase and the server's `X-Progress`.
    pub status: Mutex<String>,
    pub files_total: AtomicU64,
    pub files_done: AtomicU64,
    pub bytes: AtomicU64,
}

impl PullProgress {
    pub fn set_status(&self, s: impl Into<String>) {
        if let Ok(mut g) = self.status.lock() {
            *g = s.into();
        }
    }

    pub fn status(&self) -> String {
        self.status.lock().map(|g| g.clone()).unwrap_or_default()
    }
}

/// A Bulk Data server.
#[derive(Clone)]
pub struct BulkClient {
    http: HttpClient,
    base: Url,
    opts: BulkOptions,
}

/// Why one download attempt failed.
enum Attempt {
    /// Worth another try (transport error, truncated body, bad gzip, count off).
    Retry(String),
    Fatal(ConnectError),
}

impl BulkClient {
    /// `base` is the FHIR base URL (a trailing `/` is added when missing).
    pub fn new(http: HttpClient, base: &str, opts: BulkOptions) -> Result<Self, ConnectError> {
        let base = fhir_base(base)?;
        Ok(BulkClient {
            http: http.with_token_origin(&base),
            base,
            opts,
        })
    }

    fn prefer(&self) -> &'static str {
        if self.opts.lenient {
            "respond-async, handling=lenient"
        } else {
            "respond-async"
        }
    }

    pub fn base(&self) -> &Url {
        &self.base
    }

    pub fn options(&self) -> &BulkOptions {
        &self.opts
    }

    /// Kicks off an export; returns the absolute status URL.
    pub async fn kickoff(&self, req: &ExportRequest) -> Result<String, ConnectError> {
        req.check()?;
        let url = self.base.join(&req.path()).map_err(|e| {
            ConnectError::Usage(format!(
                "export URL from {} and {}: {e}",
                self.base,
                req.path()
            ))
        })?;
        let body = serde_json::to_vec(&req.parameters())
            .map_err(|e| ConnectError::protocol(url.as_str(), e.to_string()))?;
        let post = Request {
            method: Method::POST,
            body: Some(Bytes::from(body)),
            idempotent: false,
            ..Request::get(url.clone())
        }
        .header("content-type", "application/fhir+json")
        .header("prefer", self.prefer());
        let r = self.http.send(&post).await?;
        let refused_post = matches!(r.status().as_u16(), 400 | 404 | 405 | 415 | 501);
        let r = if refused_post && req.patients.is_empty() {
            tracing::info!(%url, status = r.status().as_u16(), "POST kick-off refused: trying GET");
            let mut get_url = url.clone();
            get_url.query_pairs_mut().extend_pairs(req.query());
            self.http
                .send(&Request::get(get_url).header("prefer", self.prefer()))
                .await?
        } else {
            r
        };
        let status = r.status();
        let location = r
            .headers()
            .get("content-location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = r.bytes().await.unwrap_or_default();
        if status != StatusCode::ACCEPTED {
            return Err(ConnectError::Status {
                method: "kick-off".into(),
                url: url.to_string(),
                status: status.as_u16(),
                detail: outcome_text(&body),
            });
        }
        let location = location.ok_or_else(|| {
            ConnectError::protocol(url.as_str(), "202 without a Content-Location status URL")
        })?;
        let status_url = url.join(&location).map_err(|e| {
            ConnectError::protocol(url.as_str(), format!("Content-Location {location:?}: {e}"))
        })?;
        Ok(status_url.to_string())
    }

    /// Polls the status URL until the export completes; returns the whole
    /// manifest (partial manifests' pages merged).
    pub async fn poll(
        &self,
        status_url: &str,
        progress: &PullProgress,
    ) -> Result<Manifest, ConnectError> {
        let url = parse_url(status_url)?;
        let started = Instant::now();
        let mut attempt = 0u32;
        loop {
            let req = Request::get(url.clone()).header("accept", "application/json");
            let r = self.http.send(&req).await?;
            let status = r.status();
            if status == StatusCode::ACCEPTED {
                let header = |n: &str| {
                    r.headers()
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                };
                let (xp, ra) = (header("x-progress"), header("retry-after"));
                progress.set_status(format!(
                    "export running: {}",
                    xp.as_deref().unwrap_or("in progress")
                ));
                if started.elapsed() > self.opts.max_export_wait {
                    return Err(ConnectError::protocol(
                        status_url,
                        format!(
                            "the export did not complete within {:?}",
                            self.opts.max_export_wait
                        ),
                    ));
                }
                tokio::time::sleep(self.opts.poll.wait(ra.as_deref(), attempt)).await;
                attempt = attempt.saturating_add(1);
                continue;
            }
            let body = r.bytes().await.map_err(|source| ConnectError::Http {
                method: "GET".into(),
                url: status_url.into(),
                source,
            })?;
            return match status.as_u16() {
                200 => {
                    self.whole_manifest(Manifest::parse(&body, status_url)?, status_url)
                        .await
                }
                404 | 410 => Err(ConnectError::Expired {
                    url: status_url.into(),
                    status: status.as_u16(),
                }),
                s => Err(ConnectError::Status {
                    method: "status".into(),
                    url: status_url.into(),
                    status: s,
                    detail: outcome_text(&body),
                }),
            };
        }
    }

    /// Follows `link[next]` pages (each resolved against the page that
    /// named it) and merges them; a page named twice is a loop, and a
    /// file listed twice is kept once.
    async fn whole_manifest(&self, mut m: Manifest, url: &str) -> Result<Manifest, ConnectError> {
        let mut page_url = parse_url(url)?;
        let mut seen = std::collections::HashSet::from([page_url.to_string()]);
        while let Some(next) = m.next.take() {
            let next_url = page_url.join(&next).map_err(|e| {
                ConnectError::protocol(page_url.as_str(), format!("link next {next:?}: {e}"))
            })?;
            if !seen.insert(next_url.to_string()) || seen.len() > 10_000 {
                return Err(ConnectError::protocol(
                    url,
                    format!("the manifest's pages loop or never end (at {next_url})"),
                ));
            }
            let req = Request::get(next_url.clone()).header("accept", "application/json");
            let r = self.http.send(&req).await?;
            let status = r.status().as_u16();
            let body = r.bytes().await.map_err(|source| ConnectError::Http {
                method: "GET".into(),
                url: next_url.to_string(),
                source,
            })?;
            match status {
                200..=299 => {}
                404 | 410 => {
                    return Err(ConnectError::Expired {
                        url: next_url.to_string(),
                        status,
                    });
                }
                _ => {
                    return Err(ConnectError::Status {
                        method: "GET".into(),
                        url: next_url.to_string(),
                        status,
                        detail: outcome_text(&body),
                    });
                }
            }
            m.merge(Manifest::parse(&body, next_url.as_str())?);
            page_url = next_url;
        }
        m.dedupe();
        Ok(m)
    }

    /// Cancels the export (`DELETE` on the status URL). A job the server no
    /// longer knows counts as cancelled.
    pub async fn cancel(&self, status_url: &str) -> Result<(), ConnectError> {
        let req = Request {
            method: Method::DELETE,
            ..Request::get(parse_url(status_url)?)
        };
        let r = self.http.send(&req).await?;
        match r.status().as_u16() {
            200..=299 | 404 | 410 => Ok(()),
            s => Err(ConnectError::Status {
                method: "DELETE".into(),
                url: status_url.into(),
                status: s,
                detail: outcome_text(&r.bytes().await.unwrap_or_default()),
            }),
        }
    }

    /// Downloads one file into `dir` as `name` (`.gz` appended when the
    /// server sent gzip), with retries; checks it as the module doc says.
    pub async fn download(
        &self,
        file: &OutputFile,
        kind: FileKind,
        requires_token: bool,
        dir: &Path,
        name: &str,
        progress: &PullProgress,
    ) -> Result<FileDone, ConnectError> {
        let url = parse_url(&file.url)?;
        let mut last = String::new();
        let mut previous: Option<FileDone> = None;
        for attempt in 0..self.opts.file_attempts {
            if attempt > 0 {
                tokio::time::sleep(self.http.retry().backoff(attempt - 1)).await;
            }
            match self
                .download_once(&url, requires_token, dir, name, progress)
                .await
            {
                Ok(mut done) => {
                    done.kind = kind;
                    done.resource_type = file.resource_type.clone();
                    let expected = file.count.filter(|_| kind != FileKind::Error);
                    match expected {
                        Some(c) if c != done.lines => {
                            // The same bytes twice: the server's count is off, not the transfer.
                            if previous.as_ref().is_some_and(|p| p.sha256 == done.sha256) {
                                tracing::warn!(url = %file.url, count = c, lines = done.lines, "the manifest's count disagrees with the file (same bytes twice): kept");
                                done.count_mismatch = Some(c);
                                return Ok(done);
                            }
                            last = format!("{} lines where the manifest says {c}", done.lines);
                            previous = Some(done);
                        }
                        _ => return Ok(done),
                    }
                }
                Err(Attempt::Retry(why)) => {
                    tracing::info!(url = %file.url, attempt, why, "download incomplete: retrying");
                    last = why;
                }
                Err(Attempt::Fatal(e)) => return Err(e),
            }
        }
        // Counts never agreed and the bytes changed each time: something
        // cuts the file short (e.g. at a line boundary, without a
        // Content-Length). Fail, keeping the job for a later resume, rather
        // than ingest a file that may be missing resources.
        Err(ConnectError::GaveUp {
            what: format!("download of {}", file.url),
            attempts: self.opts.file_attempts,
            last,
        })
    }

    async fn download_once(
        &self,
        url: &Url,
        requires_token: bool,
        dir: &Path,
        name: &str,
        progress: &PullProgress,
    ) -> Result<FileDone, Attempt> {
        let mut req = Request {
            auth: requires_token,
            streaming: true,
            ..Request::get(url.clone())
        }
        .header("accept", "application/fhir+ndjson");
        if self.opts.gzip {
            req = req.header("accept-encoding", "gzip");
        }
        let r = self.http.send(&req).await.map_err(|e| match e {
            ConnectError::GaveUp { .. } => Attempt::Fatal(e),
            other => Attempt::Retry(other.to_string()),
        })?;
        let status = r.status();
        // 403 too: an expired pre-signed storage URL answers 403.
        if matches!(status.as_u16(), 403 | 404 | 410) {
            return Err(Attempt::Fatal(ConnectError::Expired {
                url: url.to_string(),
                status: status.as_u16(),
            }));
        }
        if !status.is_success() {
            let detail = outcome_text(&r.bytes().await.unwrap_or_default());
            return Err(Attempt::Fatal(ConnectError::Status {
                method: "GET".into(),
                url: url.to_string(),
                status: status.as_u16(),
                detail,
            }));
        }
        let gz = r
            .headers()
            .get("content-encoding")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
        let length = r.content_length();
        let final_name = if gz {
            format!("{name}.gz")
        } else {
            name.to_owned()
        };
        let path = dir.join(&final_name);
        let part = dir.join(format!("{final_name}.part"));
        let mut sink = FileSink::create(&part, gz).await.map_err(Attempt::Fatal)?;
        let mut stream = r.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| Attempt::Retry(format!("the transfer broke: {e}")))?;
            progress
                .bytes
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            sink.write(&chunk).await.map_err(Attempt::Fatal)?;
        }
        let done = sink.finish(length).await?;
        tokio::fs::rename(&part, &path)
            .await
            .map_err(|e| Attempt::Fatal(ConnectError::io(&path)(e)))?;
        Ok(FileDone {
            kind: FileKind::Output,
            resource_type: None,
            file: final_name,
            ..done
        })
    }
}

/// Writes a download to disk while hashing it and counting its lines.
struct FileSink {
    path: PathBuf,
    file: tokio::io::BufWriter<tokio::fs::File>,
    sha: Sha256,
    bytes: u64,
    /// Plain NDJSON: newlines seen and the last byte.
    newlines: u64,
    last: Option<u8>,
    /// The first gzip error, if any (the download is retried).
    corrupt: Option<String>,
    /// Gzip: the decompressed bytes' line counter.
    gunzip: Option<flate2::write::MultiGzDecoder<LineCounter>>,
}

#[derive(Default)]
struct LineCounter {
    newlines: u64,
    last: Option<u8>,
}

impl std::io::Write for LineCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.newlines += memchr::memchr_iter(b'\n', buf).count() as u64;
        if let Some(&b) = buf.last() {
            self.last = Some(b);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl FileSink {
    async fn create(path: &Path, gz: bool) -> Result<FileSink, ConnectError> {
        let file = tokio::fs::File::create(path)
            .await
            .map_err(ConnectError::io(path))?;
        Ok(FileSink {
            path: path.to_path_buf(),
            // Network chunks are small; the file sees megabyte writes.
            file: tokio::io::BufWriter::with_capacity(4 << 20, file),
            sha: Sha256::new(),
            bytes: 0,
            newlines: 0,
            last: None,
            corrupt: None,
            gunzip: gz.then(|| flate2::write::MultiGzDecoder::new(LineCounter::default())),
        })
    }

    async fn write(&mut self, chunk: &[u8]) -> Result<(), ConnectError> {
        self.sha.update(chunk);
        self.bytes += chunk.len() as u64;
        match &mut self.gunzip {
            Some(d) => {
                use std::io::Write;
                if let Err(e) = d.write_all(chunk) {
                    // Not gzip after all, or corrupt: `finish` retries the download.
                    self.corrupt.get_or_insert(e.to_string());
                }
            }
            None => {
                self.newlines += memchr::memchr_iter(b'\n', chunk).count() as u64;
                self.last = chunk.last().copied().or(self.last);
            }
        }
        self.file
            .write_all(chunk)
            .await
            .map_err(ConnectError::io(&self.path))
    }

    /// Checks the download is whole; syncs it.
    async fn finish(mut self, length: Option<u64>) -> Result<FileDone, Attempt> {
        if let Some(l) = length.filter(|&l| l != self.bytes) {
            return Err(Attempt::Retry(format!(
                "{} bytes of the {l} announced",
                self.bytes
            )));
        }
        if let Some(e) = self.corrupt.take() {
            return Err(Attempt::Retry(format!("the gzip stream is corrupt: {e}")));
        }
        let (newlines, last) = match self.gunzip.take() {
            Some(mut d) => {
                d.try_finish()
                    .map_err(|e| Attempt::Retry(format!("the gzip stream is incomplete: {e}")))?;
                let c = d.get_ref();
                (c.newlines, c.last)
            }
            None => (self.newlines, self.last),
        };
        // No fsync: a killed process loses nothing the kernel has, and
        // after a crash of the machine a resumed pull checks each file's
        // SHA-256 before trusting it (`BulkPull::download_all`).
        self.file
            .flush()
            .await
            .map_err(|e| Attempt::Fatal(ConnectError::io(&self.path)(e)))?;
        let mut lines = newlines;
        if last.is_some_and(|b| !b.is_ascii_whitespace()) {
            if self.gunzip.is_none() && !tail_is_json(&self.path).await {
                return Err(Attempt::Retry("the last line is cut short".into()));
            }
            lines += 1;
        }
        Ok(FileDone {
            kind: FileKind::Output,
            resource_type: None,
            file: String::new(),
            sha256: hex::encode(self.sha.finalize()),
            bytes: self.bytes,
            lines,
            count_mismatch: None,
        })
    }
}

/// A staged file is still what was downloaded (resume after a crash: the
/// files were not synced to disk).
async fn staged_intact(path: &Path, sha256: &str) -> bool {
    let path = path.to_path_buf();
    let want = sha256.to_owned();
    tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
        use std::io::Read;
        let mut f = std::fs::File::open(&path)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(hex::encode(h.finalize()) == want)
    })
    .await
    .ok()
    .and_then(Result::ok)
    .unwrap_or(false)
}

/// Whether the text after the file's last newline is one whole JSON value
/// (or blank): a body cut short mid-line is not.
async fn tail_is_json(path: &Path) -> bool {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(&path)?;
        let len = f.metadata()?.len();
        // Find the start of the last line, reading backwards in blocks.
        let mut end = len;
        let mut start = 0;
        let mut buf = vec![0u8; 1 << 16];
        'scan: while end > 0 {
            let from = end.saturating_sub(buf.len() as u64);
            f.seek(SeekFrom::Start(from))?;
            let n = (end - from) as usize;
            f.read_exact(&mut buf[..n])?;
            if let Some(i) = memchr::memrchr(b'\n', &buf[..n]) {
                start = from + i as u64 + 1;
                break 'scan;
            }
            end = from;
        }
        f.seek(SeekFrom::Start(start))?;
        let reader = std::io::BufReader::new(f.take(len - start));
        let mut de = serde_json::Deserializer::from_reader(reader);
        let whole = <serde::de::IgnoredAny as serde::Deserialize>::deserialize(&mut de).is_ok()
            && de.end().is_ok();
        Ok(whole)
    })
    .await
    .ok()
    .and_then(Result::ok)
    .unwrap_or(false)
}

fn is_type_name(t: &str) -> bool {
    t.len() <= 64
        && t.starts_with(|c: char| c.is_ascii_uppercase())
        && t.chars().all(|c| c.is_ascii_alphabetic())
}

pub(crate) fn parse_url(s: &str) -> Result<Url, ConnectError> {
    Url::parse(s).map_err(|e| ConnectError::protocol(s, format!("not an absolute URL: {e}")))
}

/// The FHIR base as a URL ending in `/`, so `join` appends to it.
pub fn fhir_base(base: &str) -> Result<Url, ConnectError> {
    let with_slash = if base.ends_with('/') {
        base.to_owned()
    } else {
        format!("{base}/")
    };
    let url = Url::parse(&with_slash)
        .map_err(|e| ConnectError::Usage(format!("FHIR base {base:?}: {e}")))?;
    check_transport(&url)?;
    Ok(url)
}

/// Bulk Data and SMART require TLS (1.2 or later; rustls speaks nothing
/// older): plain `http` is accepted only on the loopback interface, for
/// test servers such as `atlas mock-ehr`.
pub fn check_transport(url: &Url) -> Result<(), ConnectError> {
    match url.scheme() {
        "https" => Ok(()),
        "http" if is_loopback(url) => Ok(()),
        "http" => Err(ConnectError::Usage(format!(
            "{url}: plain http is refused outside the loopback interface (Bulk Data and SMART require TLS); use https"
        ))),
        other => Err(ConnectError::Usage(format!(
            "{url}: scheme {other:?}: use https"
        ))),
    }
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// A downloaded file, staged for ingest.
#[derive(Debug, Clone)]
pub struct StagedFile {
    pub path: PathBuf,
    pub url: String,
    pub done: FileDone,
}

/// The result of [`BulkPull::run`]: every file of the export, staged.
#[derive(Debug, Clone)]
pub struct PulledExport {
    pub status_url: String,
    pub manifest: Manifest,
    pub files: Vec<StagedFile>,
    pub job_dir: PathBuf,
    pub restarts: u32,
}

/// One resumable pull: kick-off (or the saved job), poll, download, with
/// the state saved as it goes.
pub struct BulkPull<'a> {
    pub client: &'a BulkClient,
    pub store: &'a StateStore,
    /// Staging root: one folder per job inside it.
    pub staging: PathBuf,
    pub progress: Arc<PullProgress>,
}

impl BulkPull<'_> {
    /// Runs (or resumes) the export `req`; the files are staged when it
    /// returns and `state.bulk_job` still describes them (the caller
    /// clears it once they are ingested).
    pub async fn run(
        &self,
        state: &mut ConnectorState,
        req: &ExportRequest,
    ) -> Result<PulledExport, ConnectError> {
        let desc = req.describe();
        if let Some(job) = &state.bulk_job
            && job.request != desc
        {
            return Err(ConnectError::Usage(format!(
                "connector {:?} has an export under way for `{}`; repeat that pull to resume it, or run `atlas pull cancel --source {}`",
                state.name, job.request, state.name
            )));
        }
        let mut restarts = state.bulk_job.as_ref().map_or(0, |j| j.restarts);
        loop {
            if state.bulk_job.is_none() {
                self.progress.set_status("kick-off");
                let status_url = self.client.kickoff(req).await?;
                tracing::info!(%status_url, "export kicked off");
                state.bulk_job = Some(BulkJob {
                    request: desc.clone(),
                    status_url,
                    kicked_off_at: chrono::Utc::now().to_rfc3339(),
                    restarts,
                    ..BulkJob::default()
                });
                self.store.save(state).await?;
                crash_point("bulk_after_kickoff");
            }
            match self.complete_job(state).await {
                Err(ConnectError::Expired { url, status })
                    if restarts < self.client.opts.max_restarts =>
                {
                    restarts += 1;
                    self.forget_job(state, &url, status).await?;
                }
                other => return other,
            }
        }
    }

    /// The job's files (or the job itself) expired: cancel it on the server,
    /// drop its staged files and state, so the next kick-off starts afresh.
    async fn forget_job(
        &self,
        state: &mut ConnectorState,
        url: &str,
        status: u16,
    ) -> Result<(), ConnectError> {
        let Some(job) = state.bulk_job.take() else {
            return Ok(());
        };
        tracing::warn!(
            url,
            status,
            "the export expired before all its files were downloaded: starting it again"
        );
        self.progress.set_status(format!(
            "export expired (HTTP {status} on {url}): starting it again"
        ));
        if let Err(e) = self.client.cancel(&job.status_url).await {
            tracing::debug!(error = %e, "cancelling the expired job failed (it may be gone already)");
        }
        let dir = self.job_dir(&job.status_url);
        if let Err(e) = tokio::fs::remove_dir_all(&dir).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(ConnectError::io(dir)(e));
        }
        self.store.save(state).await
    }

    /// Polls (unless the manifest is saved) and downloads every file not done yet.
    async fn complete_job(&self, state: &mut ConnectorState) -> Result<PulledExport, ConnectError> {
        let Some(job) = state.bulk_job.as_ref() else {
            return Err(ConnectError::Usage("no export under way".into()));
        };
        let status_url = job.status_url.clone();
        let manifest = match &job.manifest {
            Some(m) => m.clone(),
            None => {
                let m = self.client.poll(&status_url, &self.progress).await?;
                if let Some(job) = state.bulk_job.as_mut() {
                    job.manifest = Some(m.clone());
                }
                self.store.save(state).await?;
                m
            }
        };
        let dir = self.job_dir(&status_url);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(ConnectError::io(&dir))?;
        self.download_all(state, &manifest, &dir).await?;
        let done = state
            .bulk_job
            .as_ref()
            .map(|j| j.files.clone())
            .unwrap_or_default();
        let files = manifest
            .files()
            .filter_map(|(_, f)| {
                done.get(&f.url).map(|d| StagedFile {
                    path: dir.join(&d.file),
                    url: f.url.clone(),
                    done: d.clone(),
                })
            })
            .collect();
        Ok(PulledExport {
            status_url,
            restarts: state.bulk_job.as_ref().map_or(0, |j| j.restarts),
            manifest,
            files,
            job_dir: dir,
        })
    }

    /// Downloads the files the state does not list as done, `parallel` at a
    /// time, saving the state at most once a second and at the end.
    async fn download_all(
        &self,
        state: &mut ConnectorState,
        manifest: &Manifest,
        dir: &Path,
    ) -> Result<(), ConnectError> {
        let files: Vec<(usize, FileKind, OutputFile)> = manifest
            .files()
            .enumerate()
            .map(|(i, (k, f))| (i, k, f.clone()))
            .collect();
        self.progress
            .files_total
            .store(files.len() as u64, Ordering::Relaxed);
        let mut todo = Vec::new();
        for (i, kind, f) in files {
            let name = staged_name(i, kind, f.resource_type.as_deref());
            let known = state
                .bulk_job
                .as_ref()
                .and_then(|j| j.files.get(&f.url))
                .cloned();
            match known {
                Some(d) if staged_intact(&dir.join(&d.file), &d.sha256).await => {
                    self.progress.files_done.fetch_add(1, Ordering::Relaxed);
                }
                _ => todo.push((kind, f, name)),
            }
        }
        self.progress
            .set_status(format!("downloading {} files", todo.len()));
        let requires_token = manifest.requires_access_token;
        let mut results =
            futures::stream::iter(todo.into_iter().map(|(kind, f, name)| async move {
                let r = self
                    .client
                    .download(&f, kind, requires_token, dir, &name, &self.progress)
                    .await;
                (f.url, r)
            }))
            .buffer_unordered(self.client.opts.parallel.max(1));
        let mut saved = Instant::now();
        let mut first_error = None;
        while let Some((url, r)) = results.next().await {
            match r {
                Ok(done) => {
                    if self.progress.files_done.fetch_add(1, Ordering::Relaxed) == 2 {
                        crash_point("bulk_after_file");
                    }
                    if let Some(job) = state.bulk_job.as_mut() {
                        job.files.insert(url, done);
                    }
                    if saved.elapsed() >= Duration::from_secs(1) {
                        self.store.save(state).await?;
                        saved = Instant::now();
                    }
                }
                // Expiry restarts the job at once; other errors let the
                // running downloads finish (and be checkpointed) first.
                Err(e @ ConnectError::Expired { .. }) => return Err(e),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        self.store.save(state).await?;
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn job_dir(&self, status_url: &str) -> PathBuf {
        let h = hex::encode(Sha256::digest(status_url.as_bytes()));
        self.staging.join(format!("job-{}", &h[..16]))
    }
}

/// Test hook: `ATLAS_TEST_CRASH=<point>` aborts the process there, as a
/// `kill -9` would, so the crash tests can stop a pull exactly there.
pub fn crash_point(point: &str) {
    if std::env::var("ATLAS_TEST_CRASH").is_ok_and(|p| p == point) {
        std::process::abort();
    }
}

/// `00042-output-Patient.ndjson`: manifest position, kind, type.
fn staged_name(i: usize, kind: FileKind, ty: Option<&str>) -> String {
    let kind = match kind {
        FileKind::Output => "output",
        FileKind::Deleted => "deleted",
        FileKind::Error => "error",
    };
    let ty: String = ty
        .unwrap_or("mixed")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(64)
        .collect();
    format!("{i:05}-{kind}-{ty}.ndjson")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kickoff_forms() {
        let mut r = ExportRequest::new(ExportLevel::Group("g 1".into()));
        r.types = vec!["Patient".into(), "Observation".into()];
        r.since = Some("2026-01-01T00:00:00Z".into());
        r.type_filters = vec!["Observation?code=1,2".into()];
        assert_eq!(r.path(), "Group/g 1/$export");
        let p = r.parameters();
        assert_eq!(p["parameter"].as_array().unwrap().len(), 5);
        assert!(r.describe().contains("_type=Patient,Observation"));
        assert_eq!(
            staged_name(3, FileKind::Deleted, None),
            "00003-deleted-mixed.ndjson"
        );
        assert!(r.check().is_ok());
        r.type_filters = vec!["Observation?code=1&_sort=date".into()];
        assert!(r.check().unwrap_err().to_string().contains("_sort"));
        r.type_filters = vec!["Observation?_include=Observation:subject".into()];
        assert!(r.check().is_err());
        r.type_filters = vec!["code=1".into()];
        assert!(r.check().is_err());
    }

    #[test]
    fn tls_outside_loopback() {
        assert!(fhir_base("http://127.0.0.1:8090/fhir").is_ok());
        assert!(fhir_base("http://localhost/fhir").is_ok());
        assert!(fhir_base("http://[::1]:80/fhir").is_ok());
        assert!(fhir_base("https://ehr.example/fhir").is_ok());
        let e = fhir_base("http://ehr.example/fhir")
            .unwrap_err()
            .to_string();
        assert!(e.contains("TLS"), "{e}");
        assert!(fhir_base("ftp://x/").is_err());
    }
}
