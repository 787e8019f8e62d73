//! FHIRcast STU3 (3.0.0), WebSocket channel only: the protocol without a
//! server.
//!
//! # What this module owns
//! * [`event`]: event names (case-insensitive), the supported catalog,
//!   each event's anchor and required context keys, subscription
//!   wildcards, and the `fhircast/<event>.<read|write>` scopes.
//! * [`message`]: every message as serde types and form bodies: the
//!   subscription request and its 202 answer, confirmation and denial,
//!   event notifications and request-context-change bodies, `{id, status}`
//!   acknowledgements, the current-context answer, the well-known
//!   configuration, the SMART launch members, SyncError.
//! * [`hub`]: the hub's logic: topics and their open contexts
//!   (`context.versionId` and `context.priorVersionId`, content sharing),
//!   subscriptions and leases, fan-out over bounded per-connection queues,
//!   acknowledgements with a timeout, SyncError, close codes, replay.
//!
//! `atlas-serve` adapts the hub to HTTP and WebSocket and decides, through
//! the access seam, who may subscribe, publish and receive; `atlas-cli`'s
//! `fhircast listen` is a subscriber built on [`message`].

pub mod event;
pub mod hub;
pub mod message;

pub use event::{Action, EventError, EventName, EventPattern, FhircastScopes, SUPPORTED};
pub use hub::{
    Admit, Closing, Connection, Emitted, EndReason, Hub, HubError, HubObserver, HubSettings,
    NewSubscription, Owner, Published, Subscribed, SubscriptionNote, patients_of,
};
pub use message::{
    Ack, AckStatus, ChannelEndpoint, ContextItem, ContextList, CurrentContext, Event,
    HubConfiguration, Inbound, LaunchContext, Mode, Notification, ProtocolError,
    SubscriptionConfirmation, SubscriptionDenial, SubscriptionRequest, SyncErrorInfo, sync_error,
};

#[cfg(test)]
mod tests;
