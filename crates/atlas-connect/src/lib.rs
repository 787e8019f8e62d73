//! Pulling from FHIR servers: what a hospital exposes instead of files.
//!
//! Owns:
//! * [`smart`]: the SMART Backend Services client: discovery from
//!   `.well-known/smart-configuration`, client keys (PEM or JWK; refused
//!   when others may read them), the client-assertion JWT (RS384 or ES384,
//!   built byte for byte as the spec's worked example), the
//!   `client_credentials` grant, and a [`smart::TokenSource`] that caches the
//!   access token and renews it before expiry or once on a 401;
//! * [`http`]: the one HTTP client of every connector: deadlines, retries of
//!   429 and 5xx with `Retry-After` ([`retry`]), redirects followed by hand
//!   so `Authorization` never reaches another origin;
//! * [`manifest`]: Bulk Data manifests in their STU2, STU3 and STU4 shapes;
//! * [`bulk`]: the Bulk Data `$export` client: kick-off (POST `Parameters`,
//!   falling back to GET), polling, bounded parallel downloads checked line
//!   by line and checkpointed, cancel; and [`bulk::BulkPull`], one resumable
//!   pull driven by the persisted [`state`];
//! * [`rest`]: the REST incremental pull (`_lastUpdated` searches or
//!   `_history?_since=`), resumable page by page;
//! * [`state`]: a connector's state in the lake (`connectors/<name>/state.json`:
//!   status URL, files done, watermarks, last run), written atomically.
//!
//! Everything a connector fetches is written as files to a staging folder;
//! the caller (`atlas pull`) hands those to the one ingest path
//! (`atlas-lake::ingest`), so pulled data gets the same landing, counts,
//! quarantine and idempotence as files.
//!
//! May call: reqwest, jsonwebtoken (and the RustCrypto `rsa`/`p384` key
//! types), object_store (for the state file), tokio. No DataFusion, no
//! Delta: this crate does not touch tables.

pub mod bulk;
pub mod error;
pub mod http;
pub mod manifest;
pub mod rest;
pub mod retry;
pub mod smart;
pub mod state;

pub use error::ConnectError;
