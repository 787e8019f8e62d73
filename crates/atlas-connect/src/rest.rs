//! The REST incremental pull: what changed since the last pull, type by type.
//!
//! The server's CapabilityStatement (`[base]/metadata`, read once per run)
//! says what it offers. For each resource type:
//! * the first pull (no watermark) searches `Type?_count=N&_sort=_lastUpdated`;
//! * later pulls use `Type/_history?_since=<watermark>` where the server has
//!   `history-type` (the only way to see deletes: they are history entries
//!   with `request.method = DELETE`), else `Type?_lastUpdated=gt<watermark>`;
//! * `Bundle.link[next]` is followed page by page; each page is staged as a
//!   file (a history page whole, as one Bundle line, so the ingest path sees
//!   its DELETE entries and their versions; a search page as its resources'
//!   lines) and the cursor (next URL, pages, newest `meta.lastUpdated`) is
//!   saved after each, so a killed pull resumes at the page it stopped on.
//!
//! Types are pulled `parallel` at a time; 429 and 5xx are retried by
//! [`crate::http`]. The watermark moves to the newest `lastUpdated` seen
//! only after the caller has ingested the staged pages ([`RestPull::finish`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use url::Url;

use crate::bulk::{PullProgress, fhir_base, parse_url};
use crate::error::ConnectError;
use crate::http::HttpClient;
use crate::state::{ConnectorState, RestCursor, StateStore};

/// What the server's CapabilityStatement offers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    pub history_system: bool,
    /// Per resource type: searchable, and with `history-type`.
    pub types: BTreeMap<String, TypeCaps>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeCaps {
    pub search: bool,
    pub history: bool,
}

impl Capabilities {
    /// Reads `rest[mode=server]` of a CapabilityStatement.
    pub fn from_statement(cs: &Value) -> Capabilities {
        let mut caps = Capabilities::default();
        let rests = cs["rest"].as_array().cloned().unwrap_or_default();
        let Some(rest) = rests
            .iter()
            .find(|r| r["mode"] == "server")
            .or(rests.first())
        else {
            return caps;
        };
        let codes = |v: &Value| -> Vec<String> {
            v["interaction"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|i| i["code"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        caps.history_system = codes(rest).iter().any(|c| c == "history-system");
        for r in rest["resource"].as_array().into_iter().flatten() {
            let Some(ty) = r["type"].as_str() else {
                continue;
            };
            let c = codes(r);
            caps.types.insert(
                ty.to_owned(),
                TypeCaps {
                    search: c.iter().any(|c| c == "search-type"),
                    history: c.iter().any(|c| c == "history-type"),
                },
            );
        }
        caps
    }
}

/// How a type is pulled this time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Search,
    History,
}

/// Tuning of the REST pull.
#[derive(Debug, Clone)]
pub struct RestOptions {
    /// `_count` per page.
    pub page_size: u32,
    /// Types pulled at once.
    pub parallel: usize,
    /// Use `_history` where offered (to see deletes).
    pub history: bool,
    /// Pages per type per run, a bound against a server whose `next` never ends.
    pub max_pages: u64,
    /// How far before the pull's start the next one begins: changes a
    /// server commits late with an earlier `lastUpdated` are read again
    /// (and found unchanged) instead of missed.
    pub overlap: std::time::Duration,
}

impl Default for RestOptions {
    fn default() -> Self {
        RestOptions {
            page_size: 500,
            parallel: 4,
            history: true,
            max_pages: 100_000,
            overlap: std::time::Duration::from_secs(60),
        }
    }
}

/// What one run staged.
#[derive(Debug, Clone, Default)]
pub struct RestPulled {
    pub files: Vec<PathBuf>,
    pub pages: u64,
    pub entries: u64,
    pub modes: BTreeMap<String, Mode>,
}

/// One REST pull of one connector.
pub struct RestPull<'a> {
    pub http: HttpClient,
    pub base: Url,
    pub store: &'a StateStore,
    /// This connector's staging folder (`rest/<Type>/` inside it).
    pub staging: PathBuf,
    pub progress: Arc<PullProgress>,
    pub opts: RestOptions,
}

impl<'a> RestPull<'a> {
    pub fn new(
        http: HttpClient,
        base: &str,
        store: &'a StateStore,
        staging: PathBuf,
        progress: Arc<PullProgress>,
        opts: RestOptions,
    ) -> Result<Self, ConnectError> {
        let base = fhir_base(base)?;
        Ok(RestPull {
            http: http.with_token_origin(&base),
            base,
            store,
            staging,
            progress,
            opts,
        })
    }

    /// The server's CapabilityStatement, read.
    pub async fn capabilities(&self) -> Result<Capabilities, ConnectError> {
        let url = self.join("metadata")?;
        Ok(Capabilities::from_statement(
            &self.http.get_json(url).await?,
        ))
    }

    fn join(&self, path: &str) -> Result<Url, ConnectError> {
        self.base
            .join(path)
            .map_err(|e| ConnectError::Usage(format!("{}{path}: {e}", self.base)))
    }

    /// Stages every page changed since each type's watermark (or resumes the
    /// pages of a killed run). `types` empty = every searchable type.
    ///
    /// Types whose pull a killed run left under way are finished too,
    /// whatever `types` says, so no staged page waits for a later run.
    /// `since` replaces the watermark of the types starting afresh.
    pub async fn run(
        &self,
        state: &mut ConnectorState,
        types: &[String],
        caps: &Capabilities,
        since: Option<&str>,
    ) -> Result<RestPulled, ConnectError> {
        let mut types: Vec<String> = if types.is_empty() {
            caps.types
                .iter()
                .filter(|(_, c)| c.search)
                .map(|(t, _)| t.clone())
                .collect()
        } else {
            types.to_vec()
        };
        for (ty, c) in &state.rest {
            if c.in_progress && !types.contains(ty) {
                types.push(ty.clone());
            }
        }
        let shared = Arc::new(tokio::sync::Mutex::new(std::mem::take(state)));
        let mut modes = BTreeMap::new();
        for ty in &types {
            let history = self.opts.history && caps.types.get(ty).is_some_and(|c| c.history);
            let mut s = shared.lock().await;
            let cursor = s.rest.entry(ty.clone()).or_default();
            if cursor.in_progress {
                // Resumed: the mode its first page chose.
                let was_history = cursor
                    .first_url
                    .as_deref()
                    .or(cursor.next_url.as_deref())
                    .is_some_and(|u| u.contains("/_history"));
                modes.insert(
                    ty.clone(),
                    if was_history {
                        Mode::History
                    } else {
                        Mode::Search
                    },
                );
                continue;
            }
            if let Some(s) = since {
                cursor.watermark = Some(s.to_owned());
            }
            let mode = if history && cursor.watermark.is_some() {
                Mode::History
            } else {
                Mode::Search
            };
            let first = self
                .first_page(ty, mode, cursor.watermark.as_deref())?
                .to_string();
            *cursor = RestCursor {
                watermark: cursor.watermark.take(),
                next_url: Some(first.clone()),
                first_url: Some(first),
                in_progress: true,
                ..RestCursor::default()
            };
            modes.insert(ty.clone(), mode);
        }
        self.store.save(&*shared.lock().await).await?;
        self.progress
            .files_total
            .store(types.len() as u64, Ordering::Relaxed);
        let results: Vec<Result<(u64, u64), ConnectError>> =
            futures::stream::iter(types.iter().map(|ty| {
                let shared = shared.clone();
                async move { self.pull_type(ty, &shared).await }
            }))
            .buffer_unordered(self.opts.parallel.max(1))
            .collect()
            .await;
        *state = std::mem::take(&mut *shared.lock().await);
        let mut out = RestPulled {
            modes,
            ..RestPulled::default()
        };
        for r in results {
            let (pages, entries) = r?;
            out.pages += pages;
            out.entries += entries;
        }
        out.files = staged_pages(&self.staging.join("rest"))?;
        Ok(out)
    }

    fn first_page(&self, ty: &str, mode: Mode, since: Option<&str>) -> Result<Url, ConnectError> {
        let count = self.opts.page_size.to_string();
        let mut url = match mode {
            Mode::History => self.join(&format!("{ty}/_history"))?,
            Mode::Search => self.join(ty)?,
        };
        {
            let mut q = url.query_pairs_mut();
            match (mode, since) {
                (Mode::History, Some(s)) => {
                    q.append_pair("_since", s);
                }
                (Mode::Search, Some(s)) => {
                    // `ge`: the watermark is already an instant before
                    // the last pull began (overlap); copies read twice are
                    // found unchanged by the ingest path.
                    q.append_pair("_lastUpdated", &format!("ge{s}"));
                    q.append_pair("_sort", "_lastUpdated");
                }
                (_, None) => {
                    q.append_pair("_sort", "_lastUpdated");
                }
            }
            q.append_pair("_count", &count);
        }
        Ok(url)
    }

    /// Follows one type's pages from its saved cursor; returns (pages, entries).
    async fn pull_type(
        &self,
        ty: &str,
        shared: &tokio::sync::Mutex<ConnectorState>,
    ) -> Result<(u64, u64), ConnectError> {
        let dir = self.staging.join("rest").join(ty);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(ConnectError::io(&dir))?;
        let (mut pages, mut entries) = (0u64, 0u64);
        let mut followed = std::collections::HashSet::new();
        let mut restarted = false;
        loop {
            let (next, page_no, first) = {
                let s = shared.lock().await;
                let c = s.rest.get(ty).cloned().unwrap_or_default();
                (c.next_url, c.pages, c.first_url)
            };
            let Some(next) = next else { break };
            if page_no >= self.opts.max_pages {
                return Err(ConnectError::protocol(
                    next,
                    format!("more than {} pages of {ty}", self.opts.max_pages),
                ));
            }
            if !followed.insert(next.clone()) {
                return Err(ConnectError::protocol(
                    next,
                    format!("the server sent the same `next` page of {ty} twice (a paging loop)"),
                ));
            }
            self.progress
                .set_status(format!("{ty}: page {}", page_no + 1));
            let url = parse_url(&next)?;
            let bundle = match self.http.get_json(url.clone()).await {
                // A saved page the server has forgotten (its search expired):
                // start this type's pull again from its first page, once.
                Err(ConnectError::Status {
                    status: 404 | 410, ..
                }) if page_no > 0 && pages == 0 && !restarted && first.is_some() => {
                    tracing::warn!(%next, "the saved page is gone: starting {ty} again from its first page");
                    restarted = true;
                    let _ = tokio::fs::remove_dir_all(&dir).await;
                    tokio::fs::create_dir_all(&dir)
                        .await
                        .map_err(ConnectError::io(&dir))?;
                    let mut s = shared.lock().await;
                    let c = s.rest.entry(ty.to_owned()).or_default();
                    c.next_url = c.first_url.clone();
                    c.pages = 0;
                    c.newest_seen = None;
                    c.started_at = None;
                    followed.clear();
                    self.store.save(&s).await?;
                    continue;
                }
                other => other?,
            };
            if bundle["resourceType"] != "Bundle" {
                return Err(ConnectError::protocol(next, "the answer is not a Bundle"));
            }
            let page = Page::read(&bundle);
            let path = dir.join(format!("{page_no:08}.ndjson"));
            write_atomic(&path, &page.staged_text(&bundle)?).await?;
            pages += 1;
            entries += page.entries;
            self.progress
                .bytes
                .fetch_add(page.entries, Ordering::Relaxed);
            let next_url = page
                .next
                .map(|n| url.join(&n).map(|u| u.to_string()))
                .transpose()
                .map_err(|e| ConnectError::protocol(&next, format!("link next: {e}")))?;
            let mut s = shared.lock().await;
            let c = s.rest.entry(ty.to_owned()).or_default();
            c.pages = page_no + 1;
            c.next_url = next_url;
            if page_no == 0 {
                c.started_at = Some(page.server_time.clone().unwrap_or_else(|| {
                    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                }));
            }
            if let Some(n) = page.newest
                && c.newest_seen.as_deref().is_none_or(|old| newer(&n, old))
            {
                c.newest_seen = Some(n);
            }
            self.store.save(&s).await?;
        }
        self.progress.files_done.fetch_add(1, Ordering::Relaxed);
        Ok((pages, entries))
    }

    /// After the staged pages are ingested: moves the watermark of each
    /// type whose pull completed and removes the pages.
    ///
    /// The new watermark is the earlier of the newest `lastUpdated` seen and
    /// the server's time when the pull began (so one resource stamped in
    /// the future cannot push it ahead of changes not yet read), minus the
    /// overlap; it never moves back.
    pub async fn finish(&self, state: &mut ConnectorState) -> Result<(), ConnectError> {
        for c in state
            .rest
            .values_mut()
            .filter(|c| c.in_progress && c.next_url.is_none())
        {
            let watermark = next_watermark(c, self.opts.overlap);
            *c = RestCursor {
                watermark,
                ..RestCursor::default()
            };
        }
        self.store.save(state).await?;
        let dir = self.staging.join("rest");
        match tokio::fs::remove_dir_all(&dir).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(ConnectError::io(dir)(e)),
            _ => Ok(()),
        }
    }
}

/// The watermark after a completed pull of one type: the earlier of the
/// newest change seen and the server's time at the start, minus `overlap`;
/// never earlier than the old watermark.
fn next_watermark(c: &RestCursor, overlap: std::time::Duration) -> Option<String> {
    let overlap = chrono::Duration::from_std(overlap).unwrap_or_default();
    let bound = match (&c.newest_seen, &c.started_at) {
        (Some(n), Some(s)) => Some(if newer(n, s) { s } else { n }),
        (n, s) => n.as_ref().or(s.as_ref()),
    };
    let moved = bound
        .and_then(|b| chrono::DateTime::parse_from_rfc3339(b).ok())
        .map(|b| {
            (b - overlap)
                .to_utc()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        });
    match (moved, c.watermark.clone()) {
        (Some(m), Some(old)) => Some(if newer(&m, &old) { m } else { old }),
        (m, old) => m.or(old),
    }
}

/// One Bundle page: its entries, the newest change in it and the next link.
struct Page {
    entries: u64,
    newest: Option<String>,
    next: Option<String>,
    history: bool,
    /// `Bundle.meta.lastUpdated`: the server's time of the answer.
    server_time: Option<String>,
}

impl Page {
    fn read(bundle: &Value) -> Page {
        let entries = bundle["entry"].as_array().cloned().unwrap_or_default();
        let mut newest: Option<String> = None;
        for e in &entries {
            let t = e["resource"]["meta"]["lastUpdated"]
                .as_str()
                .or(e["response"]["lastModified"].as_str());
            if let Some(t) = t
                && newest.as_deref().is_none_or(|n| newer(t, n))
            {
                newest = Some(t.to_owned());
            }
        }
        Page {
            entries: entries.len() as u64,
            newest,
            next: bundle["link"].as_array().and_then(|links| {
                links
                    .iter()
                    .find(|l| l["relation"] == "next")
                    .and_then(|l| l["url"].as_str())
                    .map(str::to_owned)
            }),
            history: bundle["type"] == "history",
            server_time: bundle["meta"]["lastUpdated"]
                .as_str()
                .filter(|t| chrono::DateTime::parse_from_rfc3339(t).is_ok())
                .map(str::to_owned),
        }
    }

    /// What is staged, one entry per line (so no line outgrows the
    /// ingest's line limit): each resource (not a search page's `outcome`
    /// entries), and each history DELETE as a one-entry transaction Bundle
    /// keeping its `request` and `response` (the version it deletes).
    fn staged_text(&self, bundle: &Value) -> Result<String, ConnectError> {
        let to_line =
            |v: &Value| serde_json::to_string(v).map_err(|e| ConnectError::Usage(e.to_string()));
        let mut out = String::new();
        for e in bundle["entry"].as_array().into_iter().flatten() {
            if self.history && e["request"]["method"] == "DELETE" {
                let one = serde_json::json!({"resourceType": "Bundle", "type": "transaction", "entry": [e]});
                out.push_str(&to_line(&one)?);
                out.push('\n');
                continue;
            }
            if e["search"]["mode"] == "outcome" || !e["resource"].is_object() {
                continue;
            }
            out.push_str(&to_line(&e["resource"])?);
            out.push('\n');
        }
        Ok(out)
    }
}

/// `a` is a later instant than `b` (FHIR instants, any offsets).
fn newer(a: &str, b: &str) -> bool {
    match (
        chrono::DateTime::parse_from_rfc3339(a),
        chrono::DateTime::parse_from_rfc3339(b),
    ) {
        (Ok(x), Ok(y)) => x > y,
        (Ok(_), Err(_)) => true,
        _ => false,
    }
}

async fn write_atomic(path: &Path, text: &str) -> Result<(), ConnectError> {
    let tmp = path.with_extension("part");
    tokio::fs::write(&tmp, text)
        .await
        .map_err(ConnectError::io(&tmp))?;
    tokio::fs::rename(&tmp, path)
        .await
        .map_err(ConnectError::io(path))
}

/// Every staged page file under `dir`, in type then page order.
fn staged_pages(dir: &Path) -> Result<Vec<PathBuf>, ConnectError> {
    let mut out = Vec::new();
    let Ok(types) = std::fs::read_dir(dir) else {
        return Ok(out);
    };
    for t in types {
        let t = t.map_err(ConnectError::io(dir))?.path();
        for f in std::fs::read_dir(&t).map_err(ConnectError::io(&t))? {
            let f = f.map_err(ConnectError::io(&t))?.path();
            if f.extension().is_some_and(|e| e == "ndjson") {
                out.push(f);
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn watermarks_never_run_ahead_of_the_server_or_back() {
        let minute = std::time::Duration::from_secs(60);
        let c = |newest: Option<&str>, started: Option<&str>, old: Option<&str>| RestCursor {
            newest_seen: newest.map(str::to_owned),
            started_at: started.map(str::to_owned),
            watermark: old.map(str::to_owned),
            ..RestCursor::default()
        };
        // The newest change, minus the overlap.
        let w = next_watermark(
            &c(
                Some("2026-01-01T10:00:00Z"),
                Some("2026-01-01T12:00:00Z"),
                None,
            ),
            minute,
        );
        assert_eq!(w.as_deref(), Some("2026-01-01T09:59:00.000Z"));
        // A resource stamped in the future: the server's start time bounds it.
        let w = next_watermark(
            &c(
                Some("2030-01-01T00:00:00Z"),
                Some("2026-01-01T12:00:00+02:00"),
                None,
            ),
            minute,
        );
        assert_eq!(w.as_deref(), Some("2026-01-01T09:59:00.000Z"));
        // Nothing changed: the start time; never back past the old watermark.
        let w = next_watermark(
            &c(
                None,
                Some("2026-01-01T12:00:00Z"),
                Some("2026-01-01T11:59:30Z"),
            ),
            minute,
        );
        assert_eq!(w.as_deref(), Some("2026-01-01T11:59:30Z"));
        assert_eq!(next_watermark(&c(None, None, None), minute), None);
    }

    #[test]
    fn capabilities() {
        let cs = json!({"rest":[{"mode":"server","interaction":[{"code":"history-system"}],
            "resource":[{"type":"Patient","interaction":[{"code":"search-type"},{"code":"history-type"}]},
                        {"type":"Observation","interaction":[{"code":"search-type"}]}]}]});
        let c = Capabilities::from_statement(&cs);
        assert!(c.history_system);
        assert_eq!(
            c.types["Patient"],
            TypeCaps {
                search: true,
                history: true
            }
        );
        assert_eq!(
            c.types["Observation"],
            TypeCaps {
                search: true,
                history: false
            }
        );
    }

    #[test]
    fn pages() {
        let b = json!({"resourceType":"Bundle","type":"searchset","link":[{"relation":"next","url":"p2"}],
            "entry":[{"resource":{"resourceType":"Patient","id":"a","meta":{"lastUpdated":"2026-01-01T00:00:01Z"}}},
                     {"resource":{"resourceType":"OperationOutcome"},"search":{"mode":"outcome"}},
                     {"resource":{"resourceType":"Patient","id":"b","meta":{"lastUpdated":"2026-01-01T00:00:03+01:00"}}}]});
        let p = Page::read(&b);
        assert_eq!(p.next.as_deref(), Some("p2"));
        assert_eq!(
            p.newest.as_deref(),
            Some("2026-01-01T00:00:01Z"),
            "+01:00 is earlier"
        );
        assert_eq!(p.staged_text(&b).unwrap().lines().count(), 2);
        let h = json!({"resourceType":"Bundle","type":"history","meta":{"lastUpdated":"2026-01-02T00:00:00Z"},
            "entry":[{"resource":{"resourceType":"Patient","id":"a","meta":{"versionId":"2"}}},
                     {"request":{"method":"DELETE","url":"Patient/b"},"response":{"status":"204","etag":"W/\"3\""}}]});
        let p = Page::read(&h);
        assert_eq!(p.server_time.as_deref(), Some("2026-01-02T00:00:00Z"));
        let text = p.staged_text(&h).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["resourceType"], "Patient");
        assert_eq!(lines[1]["type"], "transaction");
        assert_eq!(lines[1]["entry"][0]["response"]["etag"], "W/\"3\"");
    }
}
