//! The change feed: what every commit to the resource store changed.
//!
//! A store commit (an ingest chunk's MERGE or append) carries its batch id
//! in `commitInfo` (`atlas.batch_id`). The rows a commit changed are the rows
//! of the files it added whose `batch_id` is that batch; a MERGE also copies
//! rows it did not change into its new files, and those are told apart by
//! their batch (and, inside one batch, by key and content hash: a later
//! chunk's MERGE may copy a row an earlier chunk of the same batch wrote).
//! A MERGE replaces stored keys (update, or delete when the new row is a
//! tombstone); an append adds keys the store did not hold (create).
//!
//! The feed is read from the Delta log and the data files, so it survives
//! restarts and works on object storage. When the log no longer reaches
//! back to the asked version (log cleanup), [`ChangeFeed::read`] answers
//! with every live row of the current snapshot instead, and says so in
//! [`ChangePage::fallback`].

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// What a change did to its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeOp {
    Create,
    Update,
    Delete,
}

impl ChangeOp {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeOp::Create => "create",
            ChangeOp::Update => "update",
            ChangeOp::Delete => "delete",
        }
    }
}

/// One changed resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChangeEvent {
    /// The store's Delta version whose commit made the change.
    pub store_version: i64,
    /// The event's place among its commit's events (ordered by type, id):
    /// `(store_version, seq)` is the event's id, `"<version>.<seq>"`.
    pub seq: u32,
    #[serde(rename = "type")]
    pub resource_type: String,
    pub id: String,
    /// `meta.versionId` as stored (absent when the source had none).
    #[serde(rename = "version", skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
    pub op: ChangeOp,
    #[serde(rename = "batch")]
    pub batch_id: String,
    /// The patient whose compartment the resource is in (what access
    /// decisions filter on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_updated: Option<String>,
    pub content_hash: String,
    /// The stored JSON (not for deletes), when the reader asked for it.
    /// Never serialized: it leaves only through the access seam.
    #[serde(skip)]
    pub resource: Option<Arc<str>>,
}

impl ChangeEvent {
    /// `"<storeVersion>.<seq>"`: the SSE `id:` and `Last-Event-ID`.
    pub fn event_id(&self) -> String {
        format!("{}.{}", self.store_version, self.seq)
    }
}

/// Parses an event id (`"<storeVersion>.<seq>"`, or a bare store version
/// meaning "after that whole version"; `-1`: before the first commit).
/// Versions below -1 are not ids.
pub fn parse_event_id(s: &str) -> Option<(i64, Option<u32>)> {
    let s = s.trim();
    let (v, seq) = match s.split_once('.') {
        Some((v, q)) => (v.parse().ok()?, Some(q.parse().ok()?)),
        None => (s.parse().ok()?, None),
    };
    (v >= -1 && (seq.is_none() || v >= 0)).then_some((v, seq))
}

use std::collections::{HashMap, HashSet};

use arrow::array::{Array, BooleanArray, RecordBatch, TimestampMicrosecondArray};
use datafusion::parquet::arrow::ProjectionMask;
#[allow(deprecated)]
use datafusion::parquet::arrow::async_reader::{
    ParquetObjectReader, ParquetRecordBatchStreamBuilder,
};
use futures::StreamExt;
use object_store::ObjectStoreExt as _;
use object_store::path::Path;

use crate::lake::{Lake, LakeError, RESOURCES, for_each_text};

/// Commits read per call at most unless the caller says otherwise (a
/// reader catching up pages through the log).
const DEFAULT_MAX_COMMITS: usize = 256;

/// What [`ChangeFeed::read`] returns.
#[derive(Debug, Clone, Default)]
pub struct ChangePage {
    /// The events of commits `since + 1 ..= until`, in commit order, then by
    /// type and id.
    pub events: Vec<ChangeEvent>,
    /// The last store version covered: read on from here.
    pub until: i64,
    /// The store's newest version when the read started.
    pub latest: i64,
    /// Set when the log no longer reached back to the asked version: the
    /// events are then the live rows of store version `until` (a scan, not
    /// the changes), and this says why.
    pub fallback: Option<String>,
}

/// How to read the feed.
#[derive(Debug, Clone, Default)]
pub struct ReadOptions {
    /// Fill [`ChangeEvent::resource`] with the stored JSON.
    pub with_resources: bool,
    /// Read at most this many commits (default 256).
    pub max_commits: Option<usize>,
    /// Stop at this store version (default: the newest).
    pub until: Option<i64>,
    /// When the log no longer reaches back to the asked version, answer
    /// with every live row of the newest version (a scan: memory in
    /// proportion to the store). Off: the page carries no events, only
    /// [`ChangePage::fallback`] and `until` (what a follower needs to say
    /// so and go on).
    pub scan_when_gone: bool,
}

/// The resource store's change feed.
pub struct ChangeFeed {
    lake: Lake,
}

/// One store commit, as its log entry says.
#[derive(Debug, Default)]
struct Commit {
    batch: Option<String>,
    merge: bool,
    added: Vec<(String, String)>,
    removed: Vec<(String, String)>,
}

/// The columns a change is made of, per row of one file.
struct Row {
    id: String,
    version_id: Option<String>,
    last_updated: Option<String>,
    patient: Option<String>,
    batch: String,
    deleted: bool,
    content_hash: String,
    resource: Option<Arc<str>>,
}

impl ChangeFeed {
    pub fn new(lake: Lake) -> ChangeFeed {
        ChangeFeed { lake }
    }

    /// The store's newest version, from a listing of its log (no table
    /// load): `None` when the lake has no store yet.
    pub async fn latest_version(&self) -> Result<Option<i64>, LakeError> {
        let prefix = self.log_dir();
        let mut newest = None;
        let mut list = self.lake.object_store().list(Some(&prefix));
        while let Some(meta) = list.next().await {
            let meta = meta.map_err(|e| self.store_err(e))?;
            let name = meta.location.filename().unwrap_or_default();
            if let Some(v) = name
                .strip_suffix(".json")
                .filter(|n| n.len() == 20)
                .and_then(|n| n.parse::<i64>().ok())
            {
                newest = newest.max(Some(v));
            }
        }
        Ok(newest)
    }

    /// Whether the store has commit `v` (one `HEAD` of its log entry: what
    /// a watcher asks between reads).
    pub async fn has_version(&self, v: i64) -> Result<bool, LakeError> {
        let log = self
            .lake
            .path(&format!("tables/{RESOURCES}/_delta_log/{v:020}.json"));
        match self.lake.object_store().head(&log).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.store_err(e)),
        }
    }

    /// The changes of store commits after `since` (exclusive; `-1` for the
    /// first commit on). When the log no longer holds commit `since + 1`,
    /// the page holds the live rows of the newest version instead, with
    /// [`ChangePage::fallback`] saying so.
    pub async fn read(&self, since: i64, opts: &ReadOptions) -> Result<ChangePage, LakeError> {
        let since = since.max(-1);
        let Some(latest) = self.latest_version().await? else {
            return Ok(ChangePage {
                until: since,
                latest: -1,
                ..ChangePage::default()
            });
        };
        let until = opts.until.unwrap_or(latest).min(latest);
        let max = opts.max_commits.unwrap_or(DEFAULT_MAX_COMMITS).max(1) as i64;
        let until = until.min(since.saturating_add(max));
        let mut page = ChangePage {
            until: since.max(until),
            latest,
            ..ChangePage::default()
        };
        for v in (since + 1).max(0)..=until {
            match self.commit_events(v, opts.with_resources).await? {
                Some(events) => page.events.extend(events),
                None if opts.scan_when_gone => {
                    return self.scan(since, latest, opts.with_resources).await;
                }
                None => {
                    return Ok(ChangePage {
                        events: Vec::new(),
                        until: latest,
                        latest,
                        fallback: Some(gone(since, latest)),
                    });
                }
            }
        }
        Ok(page)
    }

    /// The events of commit `v`; `None` when its log entry is gone.
    pub async fn commit_events(
        &self,
        v: i64,
        with_resources: bool,
    ) -> Result<Option<Vec<ChangeEvent>>, LakeError> {
        let Some(commit) = self.commit(v).await? else {
            return Ok(None);
        };
        let Some(batch) = commit.batch.clone() else {
            // Not an ingest commit (table creation, compaction): no data changed.
            return Ok(Some(Vec::new()));
        };
        // Rows a MERGE merely copied are in a file it removed, unchanged;
        // the rows it replaced say whose a deleted resource was (a
        // tombstone names no patient).
        let mut copied = HashSet::new();
        let mut owner: HashMap<(String, String), String> = HashMap::new();
        if commit.merge {
            for (ty, path) in &commit.removed {
                for r in self.rows(path, None, false).await? {
                    if let Some(p) = r.patient {
                        owner.insert((ty.clone(), r.id.clone()), p);
                    }
                    if r.batch == batch {
                        copied.insert((ty.clone(), r.id, r.content_hash));
                    }
                }
            }
        }
        let mut events = Vec::new();
        for (ty, path) in &commit.added {
            for r in self.rows(path, Some(&batch), with_resources).await? {
                if copied.contains(&(ty.clone(), r.id.clone(), r.content_hash.clone())) {
                    continue;
                }
                let mut r = r;
                if r.patient.is_none() {
                    r.patient = owner.get(&(ty.clone(), r.id.clone())).cloned();
                }
                let op = match (r.deleted, commit.merge) {
                    (true, _) => ChangeOp::Delete,
                    (false, true) => ChangeOp::Update,
                    (false, false) => ChangeOp::Create,
                };
                events.push(event(v, ty, r, op));
            }
        }
        Ok(Some(number(events)))
    }

    /// Every live row of version `latest` (the fallback after log cleanup).
    async fn scan(
        &self,
        since: i64,
        latest: i64,
        with_resources: bool,
    ) -> Result<ChangePage, LakeError> {
        let table = self.lake.table_handle(RESOURCES).await?;
        let snapshot = table.snapshot().map_err(|source| LakeError::Delta {
            table: RESOURCES.into(),
            source,
        })?;
        let files: Vec<(String, String)> = snapshot
            .log_data()
            .iter()
            .map(|f| {
                let ty = f
                    .partition_values_map()
                    .get("resource_type")
                    .cloned()
                    .flatten()
                    .unwrap_or_default();
                (ty, f.object_store_path().to_string())
            })
            .collect();
        let version = table.version().unwrap_or(latest as u64) as i64;
        let mut events = Vec::new();
        for (ty, path) in &files {
            for r in self.rows(path, None, with_resources).await? {
                let op = if r.deleted {
                    ChangeOp::Delete
                } else {
                    ChangeOp::Update
                };
                events.push(event(version, ty, r, op));
            }
        }
        let n = events.len();
        Ok(ChangePage {
            events: number(events),
            until: version,
            latest,
            fallback: Some(format!(
                "{}: these are the {n} rows of store version {version} (a scan), not the changes",
                gone(since, latest)
            )),
        })
    }

    fn log_dir(&self) -> Path {
        self.lake.path(&format!("tables/{RESOURCES}/_delta_log/"))
    }

    fn store_err(&self, source: object_store::Error) -> LakeError {
        LakeError::Store {
            url: self.lake.table_url(RESOURCES).to_string(),
            source,
        }
    }

    /// Commit `v`'s log entry; `None` when it is gone (or not written yet).
    async fn commit(&self, v: i64) -> Result<Option<Commit>, LakeError> {
        let log = self
            .lake
            .path(&format!("tables/{RESOURCES}/_delta_log/{v:020}.json"));
        let bytes = match self.lake.object_store().get(&log).await {
            Ok(r) => r.bytes().await.map_err(|e| self.store_err(e))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.store_err(e)),
        };
        let mut c = Commit::default();
        for line in bytes.split(|b| *b == b'\n') {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let action: serde_json::Value =
                serde_json::from_slice(line).map_err(|source| LakeError::Json {
                    path: log.to_string(),
                    source,
                })?;
            if let Some(info) = action.get("commitInfo") {
                c.batch = info
                    .get("atlas.batch_id")
                    .and_then(|b| b.as_str())
                    .map(str::to_owned);
                c.merge = info.get("operation").and_then(|o| o.as_str()) == Some("MERGE");
            } else if let Some(add) = action.get("add") {
                if add.get("dataChange").and_then(|d| d.as_bool()) != Some(false) {
                    c.added.extend(file_of(add));
                }
            } else if let Some(rm) = action.get("remove")
                && rm.get("dataChange").and_then(|d| d.as_bool()) != Some(false)
            {
                c.removed.extend(file_of(rm));
            }
        }
        Ok(Some(c))
    }

    /// The rows of one store file (of `batch` only, when given).
    async fn rows(
        &self,
        rel: &str,
        batch: Option<&str>,
        with_resources: bool,
    ) -> Result<Vec<Row>, LakeError> {
        let path = self.lake.path(&format!("tables/{RESOURCES}/{rel}"));
        #[allow(deprecated)]
        let reader = ParquetObjectReader::new(self.lake.object_store().clone(), path.clone());
        let read_err = |e: datafusion::parquet::errors::ParquetError| LakeError::Io {
            path: path.to_string(),
            source: std::io::Error::other(e.to_string()),
        };
        let builder = ParquetRecordBatchStreamBuilder::new(reader)
            .await
            .map_err(read_err)?;
        let mut cols = vec![
            "id",
            "version_id",
            "last_updated",
            "patient_id",
            "batch_id",
            "deleted",
            "content_hash",
        ];
        if with_resources {
            cols.push("resource");
        }
        let mask = ProjectionMask::columns(builder.parquet_schema(), cols.iter().copied());
        let mut stream = builder.with_projection(mask).build().map_err(read_err)?;
        let mut out = Vec::new();
        while let Some(b) = stream.next().await {
            let b = b.map_err(read_err)?;
            rows_of(&b, batch, &mut out)?;
        }
        Ok(out)
    }
}

fn gone(since: i64, latest: i64) -> String {
    format!(
        "the store's log no longer holds commit {} (log cleanup); the feed goes on after version {latest}",
        since + 1
    )
}

/// `(resource_type, path)` of an add or remove action.
fn file_of(action: &serde_json::Value) -> Option<(String, String)> {
    let ty = action
        .get("partitionValues")
        .and_then(|p| p.get("resource_type"))
        .and_then(|t| t.as_str())?;
    let p = action.get("path").and_then(|p| p.as_str())?;
    let decoded = Path::from_url_path(p)
        .map(|p| p.to_string())
        .unwrap_or_else(|_| p.to_owned());
    Some((ty.to_owned(), decoded))
}

fn column<'b>(b: &'b RecordBatch, name: &str) -> Result<&'b dyn Array, LakeError> {
    b.column_by_name(name)
        .map(|c| c.as_ref())
        .ok_or_else(|| LakeError::ColumnType {
            column: name.to_owned(),
            expected: "a column of the resource store",
        })
}

fn texts(b: &RecordBatch, name: &str) -> Result<Vec<Option<String>>, LakeError> {
    let mut v = Vec::with_capacity(b.num_rows());
    for_each_text(column(b, name)?, |_, s| v.push(s.map(str::to_owned)))?;
    Ok(v)
}

fn rows_of(b: &RecordBatch, batch: Option<&str>, out: &mut Vec<Row>) -> Result<(), LakeError> {
    let batches = texts(b, "batch_id")?;
    let keep: Vec<bool> = batches
        .iter()
        .map(|x| batch.is_none_or(|want| x.as_deref() == Some(want)))
        .collect();
    if !keep.iter().any(|k| *k) {
        return Ok(());
    }
    let ids = texts(b, "id")?;
    let versions = texts(b, "version_id")?;
    let patients = texts(b, "patient_id")?;
    let hashes = texts(b, "content_hash")?;
    let resources = match b.column_by_name("resource") {
        Some(_) => Some(texts(b, "resource")?),
        None => None,
    };
    let deleted = column(b, "deleted")?
        .as_any()
        .downcast_ref::<BooleanArray>()
        .ok_or_else(|| LakeError::ColumnType {
            column: "deleted".into(),
            expected: "boolean",
        })?;
    let updated = column(b, "last_updated")?
        .as_any()
        .downcast_ref::<TimestampMicrosecondArray>();
    for (i, k) in keep.iter().enumerate() {
        if !k {
            continue;
        }
        let last_updated = updated
            .filter(|u| u.is_valid(i))
            .and_then(|u| chrono::DateTime::from_timestamp_micros(u.value(i)))
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true));
        let is_deleted = deleted.is_valid(i) && deleted.value(i);
        out.push(Row {
            id: ids[i].clone().unwrap_or_default(),
            version_id: versions[i].clone(),
            last_updated,
            patient: patients[i].clone(),
            batch: batches[i].clone().unwrap_or_default(),
            deleted: is_deleted,
            content_hash: hashes[i].clone().unwrap_or_default(),
            resource: resources
                .as_ref()
                .and_then(|r| r[i].as_deref())
                .filter(|_| !is_deleted)
                .map(Arc::from),
        });
    }
    Ok(())
}

fn event(v: i64, ty: &str, r: Row, op: ChangeOp) -> ChangeEvent {
    ChangeEvent {
        store_version: v,
        seq: 0,
        resource_type: ty.to_owned(),
        id: r.id,
        version_id: r.version_id,
        op,
        batch_id: r.batch,
        patient: r.patient,
        last_updated: r.last_updated,
        content_hash: r.content_hash,
        resource: r.resource,
    }
}

/// Orders a commit's events by type and id and numbers them.
fn number(mut events: Vec<ChangeEvent>) -> Vec<ChangeEvent> {
    events.sort_by(|a, b| {
        (a.store_version, &a.resource_type, &a.id).cmp(&(b.store_version, &b.resource_type, &b.id))
    });
    for (i, e) in events.iter_mut().enumerate() {
        e.seq = i as u32;
    }
    events
}
