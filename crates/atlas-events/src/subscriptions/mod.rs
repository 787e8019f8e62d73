//! FHIR Subscriptions, R4 backport IG (topic-based), without a server.
//!
//! # What this module owns
//! * Topics ([`topic`]): the SubscriptionTopics Atlas offers (one per
//!   supported resource type, for create, update and delete), their R4
//!   form (`Basic` with the cross-version extensions, as the IG's
//!   `r4-encounter-complete` example), and the parse of a client's `Basic`
//!   topic with the refusal of what Atlas cannot evaluate (query and
//!   FHIRPath criteria, includes, filters on unsupported parameters).
//! * Filters ([`filter`]): `backport-filter-criteria` (for example
//!   `Observation?patient=Patient/1&code=…`) parsed against a topic's
//!   `canFilterBy`, and matched against one change (its type, id,
//!   interaction, patient compartment and stored JSON).
//! * Subscriptions ([`subscription`]): the validation of a `Subscription`
//!   with the backport extensions (`rest-hook` only; payload `empty`,
//!   `id-only`, `full-resource`; heartbeat, timeout, max-count; the
//!   endpoint https or loopback http; channel headers), every refusal an
//!   OperationOutcome issue naming the element.
//! * Notifications ([`notification`]): the notification Bundle (`history`,
//!   first entry the `backport-subscription-status-r4` Parameters:
//!   handshake, heartbeat, event-notification, query-status, query-event),
//!   built and parsed.
//! * The rest-hook sender ([`resthook`]): one POST per notification,
//!   per-request timeout, retries with exponential backoff and jitter on
//!   connection errors, 408, 429 and 5xx; channel headers sent but never
//!   shown (`Debug` and errors name the endpoint's host and path only).
//!
//! Access decisions, persistence and delivery tasks belong to the server
//! (`atlas-serve`'s `subscriptions` module): nothing here sees a
//! principal or the lake.

pub mod filter;
pub mod notification;
pub mod resthook;
pub mod subscription;
pub mod topic;

use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};

pub use filter::{Change, FilterSet};
pub use notification::{Entry, Notification, NotificationEvent, StatusInfo};
pub use resthook::{DeliveryError, Endpoint, RestHook, Retry, is_private_host, is_private_ip};
pub use subscription::{Rules, Spec, validate};
pub use topic::{Topic, TopicCatalog};

/// The backport IG's StructureDefinitions.
pub const IG_BASE: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/";
pub const EXT_FILTER_CRITERIA: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-filter-criteria";
pub const EXT_HEARTBEAT_PERIOD: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-heartbeat-period";
pub const EXT_TIMEOUT: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-timeout";
pub const EXT_MAX_COUNT: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-max-count";
pub const EXT_PAYLOAD_CONTENT: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-payload-content";
pub const EXT_CHANNEL_TYPE: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-channel-type";
pub const PROFILE_SUBSCRIPTION: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription";
pub const PROFILE_NOTIFICATION: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-notification-r4";
pub const PROFILE_STATUS: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-status-r4";
/// The `$status` and `$events` OperationDefinitions.
pub const OP_STATUS: &str = "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/backport-subscription-status";
pub const OP_EVENTS: &str = "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/backport-subscription-events";
/// How a CapabilityStatement lists the topics a server offers.
pub const EXT_CAPABILITY_TOPIC: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/capabilitystatement-subscriptiontopic-canonical";

/// How much of a changed resource a notification carries
/// (`backport-payload-content`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PayloadContent {
    /// The status Parameters only: no focus, no entries.
    Empty,
    /// The focus reference in each event, and an entry per focus without
    /// its resource.
    IdOnly,
    /// The focus resources themselves.
    FullResource,
}

impl PayloadContent {
    pub fn code(self) -> &'static str {
        match self {
            PayloadContent::Empty => "empty",
            PayloadContent::IdOnly => "id-only",
            PayloadContent::FullResource => "full-resource",
        }
    }

    pub fn parse(code: &str) -> Option<PayloadContent> {
        match code {
            "empty" => Some(PayloadContent::Empty),
            "id-only" => Some(PayloadContent::IdOnly),
            "full-resource" => Some(PayloadContent::FullResource),
            _ => None,
        }
    }
}

/// `Subscription.status` (R4 `subscription-status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Requested,
    Active,
    Error,
    Off,
    EnteredInError,
}

impl Status {
    pub fn code(self) -> &'static str {
        match self {
            Status::Requested => "requested",
            Status::Active => "active",
            Status::Error => "error",
            Status::Off => "off",
            Status::EnteredInError => "entered-in-error",
        }
    }

    pub fn parse(code: &str) -> Option<Status> {
        match code {
            "requested" => Some(Status::Requested),
            "active" => Some(Status::Active),
            "error" => Some(Status::Error),
            "off" => Some(Status::Off),
            "entered-in-error" => Some(Status::EnteredInError),
            _ => None,
        }
    }
}

/// What a notification is (`subscription-notification-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NotificationType {
    Handshake,
    Heartbeat,
    EventNotification,
    QueryStatus,
    QueryEvent,
}

impl NotificationType {
    pub fn code(self) -> &'static str {
        match self {
            NotificationType::Handshake => "handshake",
            NotificationType::Heartbeat => "heartbeat",
            NotificationType::EventNotification => "event-notification",
            NotificationType::QueryStatus => "query-status",
            NotificationType::QueryEvent => "query-event",
        }
    }

    pub fn parse(code: &str) -> Option<NotificationType> {
        match code {
            "handshake" => Some(NotificationType::Handshake),
            "heartbeat" => Some(NotificationType::Heartbeat),
            "event-notification" => Some(NotificationType::EventNotification),
            "query-status" => Some(NotificationType::QueryStatus),
            "query-event" => Some(NotificationType::QueryEvent),
            _ => None,
        }
    }
}

/// What a change did (a topic trigger's `supportedInteraction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interaction {
    Create,
    Update,
    Delete,
}

impl Interaction {
    pub fn code(self) -> &'static str {
        match self {
            Interaction::Create => "create",
            Interaction::Update => "update",
            Interaction::Delete => "delete",
        }
    }

    pub fn parse(code: &str) -> Option<Interaction> {
        match code {
            "create" => Some(Interaction::Create),
            "update" => Some(Interaction::Update),
            "delete" => Some(Interaction::Delete),
            _ => None,
        }
    }
}

/// The kind of an OperationOutcome issue (`issue-type` codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueCode {
    /// Not a Subscription, or an element of the wrong shape.
    Structure,
    /// A required element is missing.
    Required,
    /// A value Atlas understands but refuses (a bad URL, a number out of range).
    Value,
    /// Something valid FHIR that Atlas does not do (a topic, filter,
    /// channel or payload).
    NotSupported,
}

impl IssueCode {
    pub fn code(self) -> &'static str {
        match self {
            IssueCode::Structure => "structure",
            IssueCode::Required => "required",
            IssueCode::Value => "value",
            IssueCode::NotSupported => "not-supported",
        }
    }
}

/// One reason a resource was refused, naming the element at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub code: IssueCode,
    /// The FHIRPath of the element (`Subscription.channel.type`).
    pub expression: String,
    pub diagnostics: String,
}

/// Why a Subscription (or topic) was refused: every issue found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub issues: Vec<Issue>,
}

impl Rejection {
    pub fn one(
        code: IssueCode,
        expression: impl Into<String>,
        diagnostics: impl Into<String>,
    ) -> Self {
        Rejection {
            issues: vec![Issue {
                code,
                expression: expression.into(),
                diagnostics: diagnostics.into(),
            }],
        }
    }

    /// The HTTP status: 400 for a resource that is malformed, 422 for one
    /// that is well-formed but asks for what Atlas does not do.
    pub fn status(&self) -> u16 {
        let malformed = self
            .issues
            .iter()
            .any(|i| matches!(i.code, IssueCode::Structure | IssueCode::Required));
        if malformed { 400 } else { 422 }
    }

    /// Whether some issue names `expression` (exactly, or an element under it).
    pub fn names(&self, expression: &str) -> bool {
        self.issues
            .iter()
            .any(|i| i.expression.starts_with(expression))
    }

    /// The refusal as a FHIR OperationOutcome, one issue each.
    pub fn operation_outcome(&self) -> Json {
        let issues: Vec<Json> = self
            .issues
            .iter()
            .map(|i| {
                json!({
                    "severity": "error",
                    "code": i.code.code(),
                    "diagnostics": i.diagnostics,
                    "expression": [i.expression],
                })
            })
            .collect();
        json!({"resourceType": "OperationOutcome", "issue": issues})
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (n, i) in self.issues.iter().enumerate() {
            if n > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", i.expression, i.diagnostics)?;
        }
        Ok(())
    }
}

impl std::error::Error for Rejection {}

/// Collects issues while a resource is checked, so one answer lists them all.
#[derive(Debug, Default)]
pub(crate) struct Issues(pub(crate) Vec<Issue>);

impl Issues {
    pub(crate) fn push(
        &mut self,
        code: IssueCode,
        expression: &str,
        diagnostics: impl Into<String>,
    ) {
        self.0.push(Issue {
            code,
            expression: expression.to_owned(),
            diagnostics: diagnostics.into(),
        });
    }

    pub(crate) fn extend(&mut self, r: Rejection) {
        self.0.extend(r.issues);
    }

    pub(crate) fn into_result<T>(self, ok: T) -> Result<T, Rejection> {
        if self.0.is_empty() {
            Ok(ok)
        } else {
            Err(Rejection { issues: self.0 })
        }
    }
}

/// A reference reduced to `Type/id` (absolute URLs and `_history` suffixes
/// dropped); a bare id stays as it is.
pub fn normal_reference(r: &str) -> &str {
    let r = r.split("/_history/").next().unwrap_or(r);
    let mut parts = r.rsplitn(3, '/');
    let (Some(id), Some(ty)) = (parts.next(), parts.next()) else {
        return r;
    };
    let start = r.len() - id.len() - ty.len() - 1;
    &r[start..]
}

/// `text` as a kebab-case name (`MedicationRequest` → `medication-request`).
pub fn kebab(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 4);
    for (i, c) in text.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('-');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_reduce_to_type_and_id() {
        assert_eq!(normal_reference("Patient/1"), "Patient/1");
        assert_eq!(
            normal_reference("https://example.org/fhir/Patient/1/_history/3"),
            "Patient/1"
        );
        assert_eq!(normal_reference("1"), "1");
        assert_eq!(kebab("MedicationRequest"), "medication-request");
        assert_eq!(kebab("Observation"), "observation");
    }

    #[test]
    fn rejections_are_operation_outcomes_naming_the_element() {
        let r = Rejection::one(
            IssueCode::NotSupported,
            "Subscription.channel.type",
            "only rest-hook",
        );
        assert_eq!(r.status(), 422);
        let oo = r.operation_outcome();
        assert_eq!(oo["resourceType"], "OperationOutcome");
        assert_eq!(oo["issue"][0]["code"], "not-supported");
        assert_eq!(oo["issue"][0]["expression"][0], "Subscription.channel.type");
        let r = Rejection::one(IssueCode::Required, "Subscription.criteria", "missing");
        assert_eq!(r.status(), 400);
        assert!(r.names("Subscription.criteria"));
    }
}
