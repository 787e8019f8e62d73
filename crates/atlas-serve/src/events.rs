//! Events of `atlas serve`: the change-feed watcher, live views and
//! `GET /events` (Server-Sent Events).
//!
//! The watcher follows the resource store's Delta log
//! ([`atlas_lake::ChangeFeed`]) and broadcasts each new commit's changes as
//! a [`ChangeBatch`]: SSE connections, FHIR Subscriptions and live views
//! all consume that one broadcast.

use std::sync::Arc;

use serde::Deserialize;
use tokio::sync::broadcast;
use utoipa_axum::router::OpenApiRouter;

use atlas_lake::{ChangeEvent, Lake};

use crate::{AppState, ServeConfig};

/// `[events]` settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Follow the store's log and push changes (SSE, subscriptions).
    pub enabled: bool,
    /// How often the store's log is looked at, in milliseconds.
    pub poll_ms: u64,
    /// SSE heartbeat interval, in seconds.
    pub heartbeat_secs: u64,
    /// How long a `POST /events/ticket` ticket stays valid, in seconds.
    pub ticket_ttl_secs: u64,
    /// How long one SSE connection may stay open, in seconds (clients
    /// reconnect with `Last-Event-ID` and lose nothing).
    pub max_connection_secs: u64,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            enabled: true,
            poll_ms: 500,
            heartbeat_secs: 15,
            ticket_ttl_secs: 60,
            max_connection_secs: 3600,
        }
    }
}

/// `[views]` settings.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ViewsConfig {
    /// Refresh the materialized views when the store changes, and pin
    /// queries to a set of view versions that reflect one store version.
    pub auto_refresh: bool,
}

/// The changes of one store commit, in event order, each with its stored
/// JSON (`resource`, absent for deletes).
#[derive(Debug)]
pub struct ChangeBatch {
    pub store_version: i64,
    pub events: Vec<ChangeEvent>,
}

/// What the events paths share.
pub struct Events {
    changes: broadcast::Sender<Arc<ChangeBatch>>,
}

impl Events {
    pub(crate) async fn open(_lake: &Lake, _config: &ServeConfig) -> Result<Arc<Events>, String> {
        let (changes, _) = broadcast::channel(1024);
        Ok(Arc::new(Events { changes }))
    }

    /// Every store commit's changes from now on, in order. A receiver that
    /// falls more than 1,024 commits behind gets `Lagged` and must re-read
    /// the feed from its last version ([`atlas_lake::ChangeFeed::read`]).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<ChangeBatch>> {
        self.changes.subscribe()
    }
}

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
}
