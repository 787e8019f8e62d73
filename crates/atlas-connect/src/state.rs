//! A connector's state, kept in the lake at `connectors/<name>/state.json`:
//! the Bulk job in progress (its request, status URL, manifest and the files
//! already downloaded, with their SHA-256), the watermark for the next
//! `--since auto` (the last complete export's `transactionTime`), the REST
//! cursors per type, and the last run.
//!
//! Written whole with one object-store `put` after every change that must
//! survive a kill: a put is atomic on every store (a rename on local disk),
//! so a reader sees the old state or the new one, never half of one.

use std::collections::BTreeMap;
use std::sync::Arc;

use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::error::ConnectError;
use crate::manifest::{FileKind, Manifest};

/// The state file's format version.
pub const STATE_VERSION: u32 = 1;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectorState {
    pub version: u32,
    pub name: String,
    /// The FHIR base the connector pulls from.
    pub base_url: String,
    /// A Bulk export under way (cleared when its files are ingested).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bulk_job: Option<BulkJob>,
    /// `transactionTime` of the last export ingested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bulk_watermark: Option<String>,
    /// `transactionTime` of the last export ingested per request (its
    /// level, types and filters, without `_since`): `--since auto` starts
    /// there, so an export of other types or another group never inherits
    /// a watermark it did not earn.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub bulk_watermarks: BTreeMap<String, String>,
    /// REST pull: per resource type.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rest: BTreeMap<String, RestCursor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<RunRecord>,
}

/// A Bulk export between kick-off and ingest.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BulkJob {
    /// The kick-off request (normalised), so a resumed pull knows it is the same one.
    pub request: String,
    pub status_url: String,
    pub kicked_off_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<Manifest>,
    /// Files downloaded and checked, by URL.
    #[serde(default)]
    pub files: BTreeMap<String, FileDone>,
    /// Times the job was started again because its files expired.
    #[serde(default)]
    pub restarts: u32,
}

/// One downloaded file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDone {
    pub kind: FileKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_type: Option<String>,
    /// The staged file's name inside the job's staging folder.
    pub file: String,
    pub sha256: String,
    pub bytes: u64,
    /// NDJSON lines (after decompression).
    pub lines: u64,
    /// The manifest's `count`, when it disagreed with `lines` (the server's count was off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count_mismatch: Option<u64>,
}

/// The REST pull of one resource type.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestCursor {
    /// Resources changed after this instant are pulled next time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark: Option<String>,
    /// A pull under way: the next page to fetch (absent when all pages are staged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_url: Option<String>,
    /// Pages staged by the pull under way.
    #[serde(default)]
    pub pages: u64,
    /// The newest `meta.lastUpdated` seen by the pull under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newest_seen: Option<String>,
    /// `true` while a pull of this type is under way.
    #[serde(default)]
    pub in_progress: bool,
    /// The server's time when the pull under way began (its first page's
    /// `Bundle.meta.lastUpdated`, else this machine's clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// The first page of the pull under way, to start it again when the
    /// server has forgotten a saved `next` page (404/410).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_url: Option<String>,
}

/// What the last completed run did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub kind: String,
    pub finished_at: String,
    pub files: u64,
    pub bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<String>,
    #[serde(default)]
    pub stored: i64,
    #[serde(default)]
    pub quarantined: i64,
    #[serde(default)]
    pub deleted: i64,
}

/// Where a connector's state lives.
#[derive(Clone)]
pub struct StateStore {
    store: Arc<dyn ObjectStore>,
    path: ObjPath,
}

/// Connector names become folder names: letters, digits, `-`, `_`, `.`.
pub fn check_name(name: &str) -> Result<(), ConnectError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(ConnectError::Usage(format!(
            "connector name {name:?}: use 1 to 64 letters, digits, '-', '_' or '.'"
        )))
    }
}

impl StateStore {
    /// The state of connector `name` under `prefix` (the lake root) in `store`.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        prefix: &ObjPath,
        name: &str,
    ) -> Result<Self, ConnectError> {
        check_name(name)?;
        let path =
            ObjPath::from(format!("{prefix}/connectors/{name}/state.json").trim_start_matches('/'));
        Ok(StateStore { store, path })
    }

    pub fn path(&self) -> &ObjPath {
        &self.path
    }

    /// The saved state, or `None` for a connector that never ran.
    pub async fn load(&self) -> Result<Option<ConnectorState>, ConnectError> {
        let err = |message: String| ConnectError::State {
            path: self.path.to_string(),
            message,
        };
        let bytes = match self.store.get(&self.path).await {
            Ok(r) => r.bytes().await.map_err(|e| err(e.to_string()))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(err(e.to_string())),
        };
        let state: ConnectorState =
            serde_json::from_slice(&bytes).map_err(|e| err(format!("not valid: {e}")))?;
        if state.version > STATE_VERSION {
            return Err(err(format!(
                "written by a newer Atlas (format {}, this one reads {STATE_VERSION})",
                state.version
            )));
        }
        Ok(Some(state))
    }

    /// Replaces the saved state atomically.
    pub async fn save(&self, state: &ConnectorState) -> Result<(), ConnectError> {
        let mut state = state.clone();
        state.version = STATE_VERSION;
        let bytes = serde_json::to_vec_pretty(&state).map_err(|e| ConnectError::State {
            path: self.path.to_string(),
            message: e.to_string(),
        })?;
        self.store
            .put(&self.path, PutPayload::from(bytes))
            .await
            .map_err(|e| ConnectError::State {
                path: self.path.to_string(),
                message: e.to_string(),
            })?;
        Ok(())
    }
}
