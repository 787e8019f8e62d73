//! Notification Bundles (`backport-subscription-notification-r4`): built
//! for delivery and `$events`, parsed for the receiver and the tests.
//!
//! A notification is a `history` Bundle whose first entry is the status
//! `Parameters` (`backport-subscription-status-r4`: subscription, topic,
//! status, type, events-since-subscription-start, one `notification-event`
//! per event with its number, timestamp and focus, errors). A history
//! Bundle's entries need `request` and `response` (bdl-3, bdl-4): the
//! status entry's request is a `GET` of the subscription's `$status`,
//! an event's is what happened to its focus (`POST Type` for a create,
//! `PUT Type/id` for an update, `DELETE Type/id` for a delete).
//!
//! Resources go into the Bundle as the raw JSON the access seam released
//! (never re-parsed or re-ordered here), so a full-resource notification
//! of 10,000 events costs one copy of each resource.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value as Json, json};

use super::{Interaction, NotificationType, PROFILE_NOTIFICATION, PROFILE_STATUS, Status};

/// One event of a notification (`notification-event`).
#[derive(Debug, Clone, PartialEq)]
pub struct NotificationEvent {
    /// `event-number`: the event's place among all of the subscription's events.
    pub number: u64,
    /// `timestamp`: when the event happened on the server.
    pub timestamp: Option<String>,
    /// `focus`: the changed resource's URL (none for empty payloads).
    pub focus: Option<String>,
    /// `additional-context` references.
    pub additional_context: Vec<String>,
    /// Parts Atlas does not produce (`authorization-type`,
    /// `related-query`, ...), kept as they came.
    pub other_parts: Vec<Json>,
}

/// The status Parameters of a notification (or of a `$status` answer).
#[derive(Debug, Clone, PartialEq)]
pub struct StatusInfo {
    /// `Parameters.id`; the status entry's fullUrl is `urn:uuid:<id>`.
    pub id: String,
    /// The subscription's URL (`<base>/Subscription/<id>`).
    pub subscription: String,
    /// The topic's canonical URL (the IG: should not be sent with empty
    /// payloads, may with id-only, should with full-resource).
    pub topic: Option<String>,
    pub status: Status,
    pub kind: NotificationType,
    /// `events-since-subscription-start` (not counting handshakes and heartbeats).
    pub events_since_start: Option<u64>,
    pub events: Vec<NotificationEvent>,
    /// `error` CodeableConcepts, as they are.
    pub errors: Vec<Json>,
}

impl StatusInfo {
    /// A status with a fresh id.
    pub fn new(
        subscription: impl Into<String>,
        topic: Option<String>,
        status: Status,
        kind: NotificationType,
        events_since_start: u64,
    ) -> StatusInfo {
        StatusInfo {
            id: uuid::Uuid::new_v4().to_string(),
            subscription: subscription.into(),
            topic,
            status,
            kind,
            events_since_start: Some(events_since_start),
            events: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// The `Parameters` resource.
    pub fn to_parameters(&self) -> Json {
        let mut p = vec![
            json!({"name": "subscription", "valueReference": {"reference": self.subscription}}),
        ];
        if let Some(t) = &self.topic {
            p.push(json!({"name": "topic", "valueCanonical": t}));
        }
        p.push(json!({"name": "status", "valueCode": self.status.code()}));
        p.push(json!({"name": "type", "valueCode": self.kind.code()}));
        if let Some(n) = self.events_since_start {
            p.push(
                json!({"name": "events-since-subscription-start", "valueString": n.to_string()}),
            );
        }
        for e in &self.events {
            let mut parts =
                vec![json!({"name": "event-number", "valueString": e.number.to_string()})];
            if let Some(t) = &e.timestamp {
                parts.push(json!({"name": "timestamp", "valueInstant": t}));
            }
            if let Some(f) = &e.focus {
                parts.push(json!({"name": "focus", "valueReference": {"reference": f}}));
            }
            for c in &e.additional_context {
                parts.push(
                    json!({"name": "additional-context", "valueReference": {"reference": c}}),
                );
            }
            parts.extend(e.other_parts.iter().cloned());
            p.push(json!({"name": "notification-event", "part": parts}));
        }
        for e in &self.errors {
            p.push(json!({"name": "error", "valueCodeableConcept": e}));
        }
        json!({
            "resourceType": "Parameters",
            "id": self.id,
            "meta": {"profile": [PROFILE_STATUS]},
            "parameter": p,
        })
    }

    /// Reads status Parameters; unknown parameters are ignored (a newer
    /// server may send more), missing or malformed required ones are errors.
    pub fn from_parameters(p: &Json) -> Result<StatusInfo, String> {
        if p["resourceType"] != "Parameters" {
            return Err("the status resource is not a Parameters".into());
        }
        let params = p["parameter"]
            .as_array()
            .ok_or("the status Parameters has no parameter")?;
        let mut subscription = None;
        let mut topic = None;
        let mut status = None;
        let mut kind = None;
        let mut events_since_start = None;
        let mut events = Vec::new();
        let mut errors = Vec::new();
        for x in params {
            match x["name"].as_str().unwrap_or_default() {
                "subscription" => {
                    subscription = x["valueReference"]["reference"].as_str().map(str::to_owned);
                }
                "topic" => topic = x["valueCanonical"].as_str().map(str::to_owned),
                "status" => {
                    let c = x["valueCode"].as_str().unwrap_or_default();
                    status = Some(
                        Status::parse(c)
                            .ok_or_else(|| format!("status '{c}' is not a subscription status"))?,
                    );
                }
                "type" => {
                    let c = x["valueCode"].as_str().unwrap_or_default();
                    kind = Some(
                        NotificationType::parse(c)
                            .ok_or_else(|| format!("type '{c}' is not a notification type"))?,
                    );
                }
                "events-since-subscription-start" => {
                    events_since_start = Some(number(
                        &x["valueString"],
                        "events-since-subscription-start",
                    )?);
                }
                "notification-event" => events.push(event(x)?),
                "error" => errors.push(x["valueCodeableConcept"].clone()),
                _ => {}
            }
        }
        Ok(StatusInfo {
            id: p["id"].as_str().unwrap_or_default().to_owned(),
            subscription: subscription.ok_or("the status names no subscription")?,
            topic,
            status: status.ok_or("the status has no status")?,
            kind: kind.ok_or("the status has no type")?,
            events_since_start,
            events,
            errors,
        })
    }

    /// The subscription's id (the last segment of its URL).
    pub fn subscription_id(&self) -> &str {
        super::normal_reference(&self.subscription)
            .rsplit('/')
            .next()
            .unwrap_or_default()
    }
}

fn number(v: &Json, what: &str) -> Result<u64, String> {
    v.as_str()
        .and_then(|s| s.parse::<u64>().ok())
        .or_else(|| v.as_u64())
        .ok_or_else(|| format!("{what} is not a number in a string"))
}

fn event(x: &Json) -> Result<NotificationEvent, String> {
    let mut e = NotificationEvent {
        number: 0,
        timestamp: None,
        focus: None,
        additional_context: Vec::new(),
        other_parts: Vec::new(),
    };
    let mut numbered = false;
    for p in x["part"].as_array().into_iter().flatten() {
        match p["name"].as_str().unwrap_or_default() {
            "event-number" => {
                e.number = number(&p["valueString"], "event-number")?;
                numbered = true;
            }
            "timestamp" => e.timestamp = p["valueInstant"].as_str().map(str::to_owned),
            "focus" => e.focus = p["valueReference"]["reference"].as_str().map(str::to_owned),
            "additional-context" => {
                if let Some(r) = p["valueReference"]["reference"].as_str() {
                    e.additional_context.push(r.to_owned());
                }
            }
            _ => e.other_parts.push(p.clone()),
        }
    }
    if !numbered {
        return Err("a notification-event has no event-number".into());
    }
    Ok(e)
}

/// One entry after the status: an event's focus (with its resource for
/// full-resource payloads) or additional context.
#[derive(Debug, Clone)]
pub struct Entry {
    pub full_url: String,
    /// The resource JSON as released; `None` for id-only payloads and deletes.
    pub resource: Option<Box<RawValue>>,
    pub method: String,
    pub url: String,
    /// `response.status`.
    pub status: String,
}

impl Entry {
    /// The entry of a change to `resource_type/id`: `POST Type` (201) for
    /// a create, `PUT Type/id` (200) for an update, `DELETE Type/id` (204).
    pub fn for_change(
        base: &str,
        interaction: Interaction,
        resource_type: &str,
        id: &str,
        resource: Option<Box<RawValue>>,
    ) -> Entry {
        let (method, url, status) = match interaction {
            Interaction::Create => ("POST", resource_type.to_owned(), "201"),
            Interaction::Update => ("PUT", format!("{resource_type}/{id}"), "200"),
            Interaction::Delete => ("DELETE", format!("{resource_type}/{id}"), "204"),
        };
        Entry {
            full_url: resource_url(base, resource_type, id),
            resource,
            method: method.into(),
            url,
            status: status.into(),
        }
    }

    /// The resource, parsed.
    pub fn resource_json(&self) -> Option<Json> {
        self.resource
            .as_ref()
            .and_then(|r| serde_json::from_str(r.get()).ok())
    }
}

/// `<base>/<Type>/<id>`.
pub fn resource_url(base: &str, resource_type: &str, id: &str) -> String {
    format!("{}/{resource_type}/{id}", base.trim_end_matches('/'))
}

/// A notification Bundle.
#[derive(Debug, Clone)]
pub struct Notification {
    /// `Bundle.id`.
    pub id: Option<String>,
    pub timestamp: Option<String>,
    pub status: StatusInfo,
    pub entries: Vec<Entry>,
}

#[derive(Serialize)]
struct Meta {
    profile: [&'static str; 1],
}

#[derive(Serialize)]
struct BundleOut<'a> {
    #[serde(rename = "resourceType")]
    resource_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    meta: Meta,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    timestamp: Option<&'a str>,
    entry: Vec<EntryOut<'a>>,
}

#[derive(Serialize)]
struct EntryOut<'a> {
    #[serde(rename = "fullUrl")]
    full_url: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    resource: Option<&'a RawValue>,
    request: RequestOut<'a>,
    response: ResponseOut<'a>,
}

#[derive(Serialize)]
struct RequestOut<'a> {
    method: &'a str,
    url: &'a str,
}

#[derive(Serialize)]
struct ResponseOut<'a> {
    status: &'a str,
}

#[derive(Deserialize)]
struct BundleIn {
    #[serde(rename = "resourceType")]
    resource_type: Option<String>,
    id: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    timestamp: Option<String>,
    #[serde(default)]
    entry: Vec<EntryIn>,
}

#[derive(Deserialize)]
struct EntryIn {
    #[serde(rename = "fullUrl")]
    full_url: Option<String>,
    resource: Option<Box<RawValue>>,
    request: Option<RequestIn>,
    response: Option<ResponseIn>,
}

#[derive(Deserialize)]
struct RequestIn {
    method: Option<String>,
    url: Option<String>,
}

#[derive(Deserialize)]
struct ResponseIn {
    status: Option<String>,
}

impl Notification {
    /// The Bundle's JSON.
    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        let status = serde_json::value::to_raw_value(&self.status.to_parameters())?;
        let status_url = format!("urn:uuid:{}", self.status.id);
        let status_request = format!("{}/$status", self.status.subscription);
        let mut entry = Vec::with_capacity(self.entries.len() + 1);
        entry.push(EntryOut {
            full_url: &status_url,
            resource: Some(&status),
            request: RequestOut {
                method: "GET",
                url: &status_request,
            },
            response: ResponseOut { status: "200" },
        });
        for e in &self.entries {
            entry.push(EntryOut {
                full_url: &e.full_url,
                resource: e.resource.as_deref(),
                request: RequestOut {
                    method: &e.method,
                    url: &e.url,
                },
                response: ResponseOut { status: &e.status },
            });
        }
        serde_json::to_vec(&BundleOut {
            resource_type: "Bundle",
            id: self.id.as_deref(),
            meta: Meta {
                profile: [PROFILE_NOTIFICATION],
            },
            kind: "history",
            timestamp: self.timestamp.as_deref(),
            entry,
        })
    }

    /// Reads a notification, checking what the profile and a history
    /// Bundle require: type `history`, the status Parameters first, its
    /// request a `$status` read, every entry with a request and a response.
    pub fn parse(bytes: &[u8]) -> Result<Notification, String> {
        let b: BundleIn =
            serde_json::from_slice(bytes).map_err(|e| format!("not a FHIR Bundle: {e}"))?;
        if b.resource_type.as_deref() != Some("Bundle") {
            return Err("not a Bundle".into());
        }
        if b.kind.as_deref() != Some("history") {
            return Err(format!(
                "a notification is a history Bundle, not {}",
                b.kind.as_deref().unwrap_or("(no type)")
            ));
        }
        let mut entries = b.entry.into_iter();
        let first = entries
            .next()
            .ok_or("the notification Bundle has no entry")?;
        let status_json: Json = match &first.resource {
            Some(r) => serde_json::from_str(r.get()).map_err(|e| e.to_string())?,
            None => return Err("the first entry has no resource".into()),
        };
        let status = StatusInfo::from_parameters(&status_json)?;
        let request_url = first
            .request
            .as_ref()
            .and_then(|r| r.url.as_deref())
            .ok_or("the status entry has no request (a history Bundle's entries need one)")?;
        if !request_url.ends_with("/$status") {
            return Err(format!(
                "the status entry's request is {request_url}, not the subscription's $status"
            ));
        }
        if first.response.is_none() {
            return Err(
                "the status entry has no response (a history Bundle's entries need one)".into(),
            );
        }
        let mut out = Vec::new();
        for (n, e) in entries.enumerate() {
            let (Some(req), Some(resp)) = (e.request, e.response) else {
                return Err(format!("entry {} has no request or response", n + 2));
            };
            out.push(Entry {
                full_url: e
                    .full_url
                    .ok_or_else(|| format!("entry {} has no fullUrl", n + 2))?,
                resource: e.resource,
                method: req.method.unwrap_or_default(),
                url: req.url.unwrap_or_default(),
                status: resp.status.unwrap_or_default(),
            });
        }
        Ok(Notification {
            id: b.id,
            timestamp: b.timestamp,
            status,
            entries: out,
        })
    }

    /// The resource types the notification's events are about (their
    /// focus references and entries): what a receiver pulls.
    pub fn focus_types(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut add = |r: &str| {
            let r = super::normal_reference(r);
            if let Some((t, _)) = r.split_once('/') {
                out.insert(t.to_owned());
            }
        };
        for e in &self.status.events {
            if let Some(f) = &e.focus {
                add(f);
            }
        }
        for e in &self.entries {
            add(&e.full_url);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_notification_round_trips() {
        let mut s = StatusInfo::new(
            "https://atlas.example/fhir/Subscription/s1",
            Some("http://atlas.local/SubscriptionTopic/observation-change".into()),
            Status::Active,
            NotificationType::EventNotification,
            7,
        );
        s.events.push(NotificationEvent {
            number: 7,
            timestamp: Some("2026-01-01T00:00:00Z".into()),
            focus: Some("https://atlas.example/fhir/Observation/o1".into()),
            additional_context: Vec::new(),
            other_parts: Vec::new(),
        });
        let raw =
            RawValue::from_string(r#"{"resourceType":"Observation","id":"o1"}"#.into()).unwrap();
        let n = Notification {
            id: None,
            timestamp: Some("2026-01-01T00:00:01Z".into()),
            status: s.clone(),
            entries: vec![Entry::for_change(
                "https://atlas.example/fhir",
                Interaction::Update,
                "Observation",
                "o1",
                Some(raw),
            )],
        };
        let bytes = n.to_json().unwrap();
        let back = Notification::parse(&bytes).unwrap();
        assert_eq!(back.status, s);
        assert_eq!(back.entries[0].method, "PUT");
        assert_eq!(back.entries[0].url, "Observation/o1");
        assert_eq!(back.entries[0].resource_json().unwrap()["id"], "o1");
        assert_eq!(
            back.focus_types().into_iter().collect::<Vec<_>>(),
            ["Observation"]
        );
        assert_eq!(back.status.subscription_id(), "s1");
        let j: Json = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(j["type"], "history");
        assert_eq!(
            j["entry"][0]["request"]["url"],
            "https://atlas.example/fhir/Subscription/s1/$status"
        );
        assert_eq!(j["entry"][0]["fullUrl"], format!("urn:uuid:{}", s.id));
    }

    #[test]
    fn malformed_notifications_are_refused() {
        for (body, why) in [
            (
                r#"{"resourceType":"Bundle","type":"searchset","entry":[]}"#,
                "history",
            ),
            (
                r#"{"resourceType":"Bundle","type":"history","entry":[]}"#,
                "no entry",
            ),
            (
                r#"{"resourceType":"Bundle","type":"history","entry":[{"resource":{"resourceType":"Patient"}}]}"#,
                "Parameters",
            ),
            (r#"[1]"#, "not a FHIR Bundle"),
        ] {
            let e = Notification::parse(body.as_bytes()).unwrap_err();
            assert!(e.contains(why), "{body}: {e}");
        }
    }
}
