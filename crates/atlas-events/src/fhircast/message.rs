//! The FHIRcast STU3 messages, as JSON (serde) and form bodies: the
//! subscription request and its 202 answer, the confirmation and denial
//! sent over the WebSocket, event notifications (also the body of a
//! request-context-change), acknowledgements, the get-current-context
//! answer, `/.well-known/fhircast-configuration`, the SMART launch
//! response's `hub.url`/`hub.topic`, and the SyncError the hub generates.
//!
//! Parsing is strict where the spec is (unknown members of a notification,
//! a parameter given twice, a subscribe without `hub.events`), and treats
//! what the spec leaves open as opaque (`timestamp`: the published examples
//! carry invalid instants, so the hub neither parses nor rewrites it).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A request or message that breaks the protocol, naming the parameter or
/// member at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{param}: {message}")]
pub struct ProtocolError {
    pub param: String,
    pub message: String,
}

impl ProtocolError {
    pub fn new(param: impl Into<String>, message: impl Into<String>) -> ProtocolError {
        ProtocolError {
            param: param.into(),
            message: message.into(),
        }
    }
}

/// `hub.mode` of a subscription request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Subscribe,
    Unsubscribe,
}

/// The form-encoded subscription request (STU3 2-4), WebSocket channel only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionRequest {
    /// `hub.channel.type`: always `websocket` once parsed.
    pub channel_type: String,
    pub mode: Mode,
    pub topic: String,
    /// `hub.events` as sent (comma-separated); `None` on unsubscribe.
    pub events: Option<String>,
    pub lease_seconds: Option<u64>,
    /// `hub.channel.endpoint`: required to unsubscribe; on subscribe, it
    /// names an existing subscription to change.
    pub channel_endpoint: Option<String>,
    /// `subscriber.name`, used in SyncError notifications.
    pub subscriber_name: Option<String>,
}

/// The largest value of any one form parameter.
const MAX_PARAM: usize = 4096;

impl SubscriptionRequest {
    /// Parses an `application/x-www-form-urlencoded` body. Each parameter
    /// may appear once; values are trimmed (the spec's own unsubscribe
    /// example ends its endpoint URL with an encoded newline).
    pub fn from_form(body: &[u8]) -> Result<SubscriptionRequest, ProtocolError> {
        let mut seen: Map<String, Value> = Map::new();
        for (k, v) in url::form_urlencoded::parse(body) {
            if v.len() > MAX_PARAM {
                return Err(ProtocolError::new(
                    k.as_ref(),
                    format!("longer than {MAX_PARAM} bytes"),
                ));
            }
            if seen.contains_key(k.as_ref()) {
                return Err(ProtocolError::new(
                    k.as_ref(),
                    "given more than once (each parameter may appear at most once)",
                ));
            }
            seen.insert(k.into_owned(), Value::String(v.trim().to_owned()));
        }
        let get = |k: &str| {
            seen.get(k)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        if seen.contains_key("hub.callback") {
            return Err(ProtocolError::new(
                "hub.callback",
                "webhook subscriptions are not supported (FHIRcast STU3 uses hub.channel.type=websocket)",
            ));
        }
        let channel_type = get("hub.channel.type")
            .ok_or_else(|| ProtocolError::new("hub.channel.type", "required; give websocket"))?;
        if !channel_type.eq_ignore_ascii_case("websocket") {
            return Err(ProtocolError::new(
                "hub.channel.type",
                format!("{channel_type:?} is not supported; give websocket"),
            ));
        }
        let mode = match get("hub.mode").as_deref() {
            Some("subscribe") => Mode::Subscribe,
            Some("unsubscribe") => Mode::Unsubscribe,
            Some(other) => {
                return Err(ProtocolError::new(
                    "hub.mode",
                    format!("{other:?}: give subscribe or unsubscribe"),
                ));
            }
            None => {
                return Err(ProtocolError::new(
                    "hub.mode",
                    "required: subscribe or unsubscribe",
                ));
            }
        };
        let topic = get("hub.topic").ok_or_else(|| ProtocolError::new("hub.topic", "required"))?;
        check_topic(&topic)?;
        let events = get("hub.events");
        match (mode, &events) {
            (Mode::Subscribe, None) => {
                return Err(ProtocolError::new(
                    "hub.events",
                    "required to subscribe (a comma-separated list of events)",
                ));
            }
            (Mode::Unsubscribe, Some(_)) => {
                return Err(ProtocolError::new(
                    "hub.events",
                    "must not be sent to unsubscribe (partial unsubscribes are not supported)",
                ));
            }
            _ => {}
        }
        let lease_seconds = match get("hub.lease_seconds") {
            None => None,
            Some(s) => Some(s.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| {
                ProtocolError::new("hub.lease_seconds", "give a positive whole number")
            })?),
        };
        let channel_endpoint = get("hub.channel.endpoint");
        if mode == Mode::Unsubscribe && channel_endpoint.is_none() {
            return Err(ProtocolError::new(
                "hub.channel.endpoint",
                "required to unsubscribe: the WebSocket URL the subscription was given",
            ));
        }
        Ok(SubscriptionRequest {
            channel_type: "websocket".to_owned(),
            mode,
            topic,
            events,
            lease_seconds,
            channel_endpoint,
            subscriber_name: get("subscriber.name"),
        })
    }

    /// The form body (parameters in the spec's order).
    pub fn to_form(&self) -> String {
        let mut s = url::form_urlencoded::Serializer::new(String::new());
        s.append_pair("hub.channel.type", &self.channel_type);
        if let Some(e) = &self.channel_endpoint {
            s.append_pair("hub.channel.endpoint", e);
        }
        s.append_pair(
            "hub.mode",
            match self.mode {
                Mode::Subscribe => "subscribe",
                Mode::Unsubscribe => "unsubscribe",
            },
        );
        s.append_pair("hub.topic", &self.topic);
        if let Some(e) = &self.events {
            s.append_pair("hub.events", e);
        }
        if let Some(l) = self.lease_seconds {
            s.append_pair("hub.lease_seconds", &l.to_string());
        }
        if let Some(n) = &self.subscriber_name {
            s.append_pair("subscriber.name", n);
        }
        s.finish()
    }
}

/// A topic as the hub accepts it: 1 to 256 visible characters, no `/`
/// (topics are path segments of `GET [hub]/{topic}`).
pub fn check_topic(topic: &str) -> Result<(), ProtocolError> {
    if topic.is_empty() || topic.len() > 256 {
        return Err(ProtocolError::new("hub.topic", "give 1 to 256 characters"));
    }
    if topic
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || c == '/')
    {
        return Err(ProtocolError::new(
            "hub.topic",
            "may not hold spaces, control characters or '/'",
        ));
    }
    Ok(())
}

/// `{"hub.channel.endpoint": "wss://..."}`: the answer to a subscribe (and
/// to an unsubscribe).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelEndpoint {
    #[serde(rename = "hub.channel.endpoint")]
    pub endpoint: String,
}

/// What the hub sends first over a new WebSocket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionConfirmation {
    /// Always `subscribe`.
    #[serde(rename = "hub.mode")]
    pub mode: String,
    #[serde(rename = "hub.topic")]
    pub topic: String,
    #[serde(rename = "hub.events")]
    pub events: String,
    #[serde(rename = "hub.lease_seconds")]
    pub lease_seconds: u64,
}

/// What the hub sends when a subscription is refused or ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionDenial {
    /// Always `denied`.
    #[serde(rename = "hub.mode")]
    pub mode: String,
    #[serde(rename = "hub.topic")]
    pub topic: String,
    #[serde(rename = "hub.events")]
    pub events: String,
    #[serde(
        rename = "hub.reason",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub reason: Option<String>,
}

impl SubscriptionDenial {
    pub fn new(topic: &str, events: &str, reason: &str) -> SubscriptionDenial {
        SubscriptionDenial {
            mode: "denied".to_owned(),
            topic: topic.to_owned(),
            events: events.to_owned(),
            reason: Some(reason.to_owned()),
        }
    }
}

/// One member of an event's `context`: a resource, a reference (an object
/// or a list of them, as the DiagnosticReport-select examples differ), or
/// extension `data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextItem {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl ContextItem {
    pub fn resource(key: &str, resource: Value) -> ContextItem {
        ContextItem {
            key: key.to_owned(),
            resource: Some(resource),
            reference: None,
            data: None,
        }
    }

    /// The `Type/id` references the item holds: its resource's type and
    /// id, or its reference(s).
    pub fn references(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some(r) = &self.resource
            && let (Some(t), Some(id)) = (
                r.get("resourceType").and_then(Value::as_str),
                r.get("id").and_then(Value::as_str),
            )
        {
            out.push((t.to_owned(), id.to_owned()));
        }
        let refs: Vec<&Value> = match &self.reference {
            Some(Value::Array(a)) => a.iter().collect(),
            Some(v) => vec![v],
            None => Vec::new(),
        };
        for r in refs {
            if let Some((t, id)) = r
                .get("reference")
                .and_then(Value::as_str)
                .and_then(split_reference)
            {
                out.push((t, id));
            }
        }
        out
    }
}

/// `Patient/123`, `https://x/fhir/Patient/123/_history/2` → (`Patient`,
/// `123`).
pub fn split_reference(r: &str) -> Option<(String, String)> {
    let r = r.split("/_history/").next().unwrap_or(r);
    let mut parts = r.rsplit('/');
    let id = parts.next()?;
    let t = parts.next()?;
    (!id.is_empty() && t.starts_with(|c: char| c.is_ascii_uppercase()))
        .then(|| (t.to_owned(), id.to_owned()))
}

/// The `event` of a notification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    #[serde(rename = "hub.topic")]
    pub topic: String,
    #[serde(rename = "hub.event")]
    pub event: String,
    #[serde(
        rename = "context.versionId",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub version_id: Option<String>,
    #[serde(
        rename = "context.priorVersionId",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub prior_version_id: Option<String>,
    pub context: Vec<ContextItem>,
}

impl Event {
    /// The items under `key`.
    pub fn items<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a ContextItem> + 'a {
        self.context.iter().filter(move |c| c.key == key)
    }
}

/// An event notification (hub → subscriber), which is also the body of a
/// request-context-change (subscriber → hub).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Notification {
    /// Opaque: kept as sent.
    pub timestamp: String,
    pub id: String,
    pub event: Event,
}

impl Notification {
    /// Parses a notification or request-context-change body and checks
    /// the members the spec requires.
    pub fn from_json(bytes: &[u8]) -> Result<Notification, ProtocolError> {
        let n: Notification = serde_json::from_slice(bytes)
            .map_err(|e| ProtocolError::new("body", format!("not a FHIRcast event: {e}")))?;
        n.check()?;
        Ok(n)
    }

    /// Required members present and within bounds.
    pub fn check(&self) -> Result<(), ProtocolError> {
        if self.id.is_empty() || self.id.len() > 256 {
            return Err(ProtocolError::new("id", "give 1 to 256 characters"));
        }
        if self.timestamp.is_empty() || self.timestamp.len() > 64 {
            return Err(ProtocolError::new("timestamp", "give an ISO 8601 instant"));
        }
        check_topic(&self.event.topic)?;
        if self.event.event.is_empty() {
            return Err(ProtocolError::new("hub.event", "required"));
        }
        for (i, item) in self.event.context.iter().enumerate() {
            let n = [&item.resource, &item.reference, &item.data]
                .iter()
                .filter(|v| v.is_some())
                .count();
            if n != 1 {
                return Err(ProtocolError::new(
                    format!("context[{i}]"),
                    "give exactly one of resource, reference and data",
                ));
            }
        }
        Ok(())
    }

    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// A subscriber's acknowledgement `{id, status}`; the status as the
/// subscriber wrote it (the spec's example has the string `"200"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    pub id: String,
    pub status: AckStatus,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AckStatus {
    Code(u16),
    Text(String),
}

impl AckStatus {
    /// The HTTP status, when it is one.
    pub fn code(&self) -> Option<u16> {
        match self {
            AckStatus::Code(c) => Some(*c),
            AckStatus::Text(t) => t.trim().parse().ok(),
        }
    }

    /// Any 2xx is success; anything else (or no number at all) is failure.
    pub fn is_success(&self) -> bool {
        self.code().is_some_and(|c| (200..300).contains(&c))
    }
}

impl Ack {
    pub fn new(id: &str, status: u16) -> Ack {
        Ack {
            id: id.to_owned(),
            status: AckStatus::Text(status.to_string()),
        }
    }
}

/// The answer to `GET [hub]/{topic}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CurrentContext {
    /// The anchor's resource type; `""` when no context is open.
    #[serde(rename = "context.type")]
    pub context_type: String,
    #[serde(
        rename = "context.versionId",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub version_id: Option<String>,
    pub context: Vec<ContextItem>,
}

impl CurrentContext {
    pub fn empty() -> CurrentContext {
        CurrentContext {
            context_type: String::new(),
            version_id: None,
            context: Vec::new(),
        }
    }
}

/// Just a `context` list (the spec's extension example).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextList {
    pub context: Vec<ContextItem>,
}

/// `capabilities` of the well-known document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    #[serde(
        rename = "supportsGetCurrentContext",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub supports_get_current_context: Option<bool>,
    #[serde(
        rename = "supportsNonCurrentContextUpdates",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub supports_non_current_context_updates: Option<bool>,
}

/// `/.well-known/fhircast-configuration` (STU3 2-7). A `webhookSupport`
/// member is ignored, as the spec says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubConfiguration {
    #[serde(rename = "eventsSupported")]
    pub events_supported: Vec<String>,
    #[serde(rename = "websocketSupport")]
    pub websocket_support: bool,
    #[serde(
        rename = "fhircastVersion",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub fhircast_version: Option<String>,
    #[serde(
        rename = "getCurrentSupport",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub get_current_support: Option<bool>,
    #[serde(
        rename = "fhirVersion",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub fhir_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Capabilities>,
}

impl HubConfiguration {
    /// This hub's document.
    pub fn atlas() -> HubConfiguration {
        HubConfiguration {
            events_supported: super::event::SUPPORTED
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            websocket_support: true,
            fhircast_version: Some("3.0.0".to_owned()),
            get_current_support: Some(true),
            fhir_version: Some("R4".to_owned()),
            capabilities: Some(Capabilities {
                supports_get_current_context: Some(true),
                supports_non_current_context_updates: Some(false),
            }),
        }
    }
}

/// The FHIRcast members of an OAuth token response (SMART launch): where
/// the hub is and which session to join; everything else kept as sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaunchContext {
    #[serde(rename = "hub.url", default, skip_serializing_if = "Option::is_none")]
    pub hub_url: Option<String>,
    #[serde(rename = "hub.topic", default, skip_serializing_if = "Option::is_none")]
    pub hub_topic: Option<String>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// What a subscriber receives over the WebSocket.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    Confirmation(SubscriptionConfirmation),
    Denial(SubscriptionDenial),
    Notification(Notification),
}

impl Inbound {
    /// Tells the hub's messages apart by their members.
    pub fn parse(text: &str) -> Result<Inbound, ProtocolError> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| ProtocolError::new("message", format!("not JSON: {e}")))?;
        let bad = |e: serde_json::Error| ProtocolError::new("message", e.to_string());
        match v.get("hub.mode").and_then(Value::as_str) {
            Some("subscribe") => serde_json::from_value(v)
                .map(Inbound::Confirmation)
                .map_err(bad),
            Some("denied") => serde_json::from_value(v).map(Inbound::Denial).map_err(bad),
            Some(other) => Err(ProtocolError::new(
                "hub.mode",
                format!("unexpected {other:?}"),
            )),
            None => serde_json::from_value(v)
                .map(Inbound::Notification)
                .map_err(bad),
        }
    }
}

/// Coding systems of a SyncError's `OperationOutcome.issue.details`.
pub const SYNCERROR_EVENT_ID: &str = "https://fhircast.hl7.org/events/syncerror/eventid";
pub const SYNCERROR_EVENT_NAME: &str = "https://fhircast.hl7.org/events/syncerror/eventname";
pub const SYNCERROR_SUBSCRIBER: &str = "https://fhircast.hl7.org/events/syncerror/subscriber";

/// What a SyncError is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncErrorInfo {
    pub topic: String,
    /// The event that could not be followed or delivered.
    pub event_id: Option<String>,
    pub event_name: Option<String>,
    /// The subscriber that failed (its `subscriber.name`, or what the hub
    /// knows it by).
    pub subscriber: String,
    pub diagnostics: String,
    /// More codings (`(system, code)`) after the three the spec defines.
    pub codes: Vec<(String, String)>,
}

/// A SyncError notification (STU3 3-2-1): one `OperationOutcome` whose
/// issue is a warning naming the event id, event name and subscriber.
pub fn sync_error(info: &SyncErrorInfo, id: &str, timestamp: &str) -> Notification {
    let mut coding = Vec::new();
    if let Some(e) = &info.event_id {
        coding.push(serde_json::json!({"system": SYNCERROR_EVENT_ID, "code": e}));
    }
    if let Some(e) = &info.event_name {
        coding.push(serde_json::json!({"system": SYNCERROR_EVENT_NAME, "code": e}));
    }
    coding.push(serde_json::json!({"system": SYNCERROR_SUBSCRIBER, "code": info.subscriber}));
    for (s, c) in &info.codes {
        coding.push(serde_json::json!({"system": s, "code": c}));
    }
    Notification {
        timestamp: timestamp.to_owned(),
        id: id.to_owned(),
        event: Event {
            topic: info.topic.clone(),
            event: "SyncError".to_owned(),
            version_id: None,
            prior_version_id: None,
            context: vec![ContextItem::resource(
                "operationoutcome",
                serde_json::json!({
                    "resourceType": "OperationOutcome",
                    "issue": [{
                        "severity": "warning",
                        "code": "processing",
                        "diagnostics": info.diagnostics,
                        "details": {"coding": coding}
                    }]
                }),
            )],
        },
    }
}
