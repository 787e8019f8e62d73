//! Event protocols, without a server.
//!
//! # What this crate owns
//! * [`fhircast`]: FHIRcast STU3 messages (subscription requests, events,
//!   acknowledgements, context) and the hub's logic (topics, current
//!   context and its `versionId`, subscriptions and leases, SyncError).
//! * [`subscriptions`]: FHIR Subscriptions (R4 backport IG): topics (as R4
//!   `Basic`), Subscription validation with the backport extensions, filter
//!   matching on a change, notification Bundles (handshake, heartbeat,
//!   event-notification; empty, id-only, full-resource), status counters and
//!   the rest-hook sender with retries.
//!
//! # What it may call
//! `atlas-fhir` (ids, instants), serde, tokio, reqwest. No DataFusion, no
//! axum: `atlas-serve` adapts these to HTTP and decides access through
//! `atlas-access`.

pub mod fhircast;
pub mod subscriptions;
