//! A `Subscription` (backport profile) checked against the topics Atlas
//! offers and the channel it can serve, into a [`Spec`] the server runs.
//!
//! Accepted: `criteria` naming an offered topic (`url` or `url|version`)
//! with `backport-filter-criteria` filters the topic allows; channel
//! `rest-hook` to an https endpoint (http only to a loopback address,
//! unless the server's rules allow more); payload `application/fhir+json`
//! (or `application/json`) with `backport-payload-content` `empty`,
//! `id-only` or `full-resource`; `backport-heartbeat-period`,
//! `backport-timeout` and `backport-max-count` (adjusted into the server's
//! bounds, and written back so the client sees what is in force);
//! `channel.header` lines sent with every notification.
//!
//! Refused, each as an issue naming its element: another channel type
//! (including the backport's custom channel types), another payload type
//! or content, an unknown topic, an unsupported filter, a modifier
//! extension, an endpoint with credentials in it or an `end` in the past.

use chrono::{DateTime, Utc};
use serde_json::{Value as Json, json};

use super::filter::{FilterSet, MAX_FILTERS};
use super::topic::TopicCatalog;
use super::{
    EXT_CHANNEL_TYPE, EXT_FILTER_CRITERIA, EXT_HEARTBEAT_PERIOD, EXT_MAX_COUNT,
    EXT_PAYLOAD_CONTENT, EXT_TIMEOUT, IssueCode, Issues, PayloadContent, Rejection, Status,
};

/// The server's bounds on what a subscription may ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// Plain http to hosts other than loopback (never in production: the
    /// notifications carry patient data and the channel headers).
    pub allow_http: bool,
    /// Endpoints on this machine or the private network (`localhost`,
    /// loopback, RFC 1918, fc00::/7, link-local, unspecified addresses):
    /// off, they are refused, so subscribing is no way into the network
    /// behind the server.
    pub private_endpoints: bool,
    /// Heartbeat periods are raised to at least this (seconds).
    pub min_heartbeat_secs: u32,
    /// ... and lowered to at most this.
    pub max_heartbeat_secs: u32,
    /// Per-request timeout when the subscription names none (seconds).
    pub default_timeout_secs: u32,
    pub max_timeout_secs: u32,
    /// Events per notification when the subscription names no max-count.
    pub default_max_count: u32,
    pub max_max_count: u32,
    /// `channel.header` lines, and bytes per line, at most.
    pub max_headers: usize,
    pub max_header_bytes: usize,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            allow_http: false,
            private_endpoints: false,
            min_heartbeat_secs: 10,
            max_heartbeat_secs: 86_400,
            default_timeout_secs: 10,
            max_timeout_secs: 60,
            // Large notifications are cheaper per event (one POST, one
            // audit record): a commit of 10,000 changes is ten of them.
            default_max_count: 1000,
            max_max_count: 5000,
            max_headers: 10,
            max_header_bytes: 4096,
        }
    }
}

/// What a valid subscription asks for, with the server's adjustments.
#[derive(Clone, PartialEq)]
pub struct Spec {
    /// The topic's canonical URL (as the catalog has it).
    pub topic: String,
    /// The filters as given (`backport-filter-criteria`).
    pub filter_criteria: Vec<String>,
    pub filters: FilterSet,
    pub endpoint: url::Url,
    /// `channel.header` lines as (name, value): credentials, never shown.
    pub headers: Vec<(String, String)>,
    pub payload: PayloadContent,
    /// Seconds between heartbeats; `None`: no heartbeats.
    pub heartbeat_secs: Option<u32>,
    pub timeout_secs: u32,
    /// Events per notification at most.
    pub max_count: u32,
    /// When the subscription ends (`Subscription.end`).
    pub end: Option<DateTime<Utc>>,
    /// `Requested` (to be handshaken) or `Off`, as the client asked.
    pub status: Status,
}

impl std::fmt::Debug for Spec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Header values are credentials: only their names are shown.
        let names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("Spec")
            .field("topic", &self.topic)
            .field("filter_criteria", &self.filter_criteria)
            .field(
                "endpoint",
                &format_args!("{}", super::resthook::audit_path(&self.endpoint)),
            )
            .field("headers", &names)
            .field("payload", &self.payload)
            .field("heartbeat_secs", &self.heartbeat_secs)
            .field("timeout_secs", &self.timeout_secs)
            .field("max_count", &self.max_count)
            .field("end", &self.end)
            .field("status", &self.status)
            .finish()
    }
}

/// Headers the sender sets itself, or that would change how the request
/// is framed or routed.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-type",
    "content-length",
    "transfer-encoding",
    "connection",
    "te",
    "upgrade",
    "expect",
];

/// Checks `resource` (a Subscription) against `catalog` and `rules` at time `now`.
pub fn validate(
    resource: &Json,
    catalog: &TopicCatalog,
    rules: &Rules,
    now: DateTime<Utc>,
) -> Result<Spec, Rejection> {
    let mut issues = Issues::default();
    if resource.get("resourceType").and_then(Json::as_str) != Some("Subscription") {
        return Err(Rejection::one(
            IssueCode::Structure,
            "Subscription",
            format!(
                "expected a Subscription, got {}",
                resource
                    .get("resourceType")
                    .map_or_else(|| "no resourceType".to_owned(), |t| t.to_string())
            ),
        ));
    }
    for at in ["modifierExtension", "channel.modifierExtension"] {
        let v = at
            .split('.')
            .fold(resource, |v, k| v.get(k).unwrap_or(&Json::Null));
        if v.as_array().is_some_and(|a| !a.is_empty()) {
            issues.push(
                IssueCode::NotSupported,
                &format!("Subscription.{at}"),
                "modifier extensions are not understood",
            );
        }
    }

    // The topic and its filters.
    let topic = match resource.get("criteria").and_then(Json::as_str) {
        None => {
            issues.push(
                IssueCode::Required,
                "Subscription.criteria",
                "a topic-based subscription names its topic's canonical URL in criteria",
            );
            None
        }
        Some(c) => match catalog.get(c.trim()) {
            Some(t) => Some(t),
            None => {
                let offered: Vec<&str> = catalog.iter().map(|t| t.url.as_str()).collect();
                issues.push(
                    IssueCode::NotSupported,
                    "Subscription.criteria",
                    format!(
                        "topic '{c}' is not offered here; offered topics: {}",
                        offered.join(", ")
                    ),
                );
                None
            }
        },
    };
    let mut filter_criteria = Vec::new();
    for (n, e) in extensions(&resource["_criteria"]).enumerate() {
        if e["url"] != EXT_FILTER_CRITERIA {
            continue;
        }
        match e["valueString"].as_str() {
            Some(s) => filter_criteria.push(s.to_owned()),
            None => issues.push(
                IssueCode::Structure,
                &format!("Subscription.criteria.extension[{n}]"),
                "backport-filter-criteria has a valueString",
            ),
        }
    }
    let filters = match topic {
        Some(t) => match FilterSet::parse(t, &filter_criteria, |n| {
            if n >= MAX_FILTERS {
                "Subscription.criteria.extension:filterCriteria".to_owned()
            } else {
                format!("Subscription.criteria.extension:filterCriteria[{n}]")
            }
        }) {
            Ok(f) => f,
            Err(r) => {
                issues.extend(r);
                FilterSet::default()
            }
        },
        None => FilterSet::default(),
    };

    // Status and end.
    let status = match resource.get("status").and_then(Json::as_str) {
        None => Status::Requested,
        Some(s) => match Status::parse(s) {
            Some(Status::Off) => Status::Off,
            // A client asks; the handshake decides whether it is active.
            Some(Status::Requested | Status::Active | Status::Error) => Status::Requested,
            Some(Status::EnteredInError) | None => {
                issues.push(
                    IssueCode::Value,
                    "Subscription.status",
                    format!("status '{s}' cannot be asked for (requested, active or off)"),
                );
                Status::Requested
            }
        },
    };
    let end = match resource.get("end").and_then(Json::as_str) {
        None => None,
        Some(e) => match parse_instant(e) {
            Some(t) if t <= now => {
                issues.push(
                    IssueCode::Value,
                    "Subscription.end",
                    format!("end {e} is in the past"),
                );
                None
            }
            Some(t) => Some(t),
            None => {
                issues.push(
                    IssueCode::Structure,
                    "Subscription.end",
                    format!("end '{e}' is not an instant"),
                );
                None
            }
        },
    };

    // The channel.
    let channel = &resource["channel"];
    if !channel.is_object() {
        issues.push(
            IssueCode::Required,
            "Subscription.channel",
            "a subscription has a channel",
        );
        return Err(Rejection { issues: issues.0 });
    }
    match channel.get("type").and_then(Json::as_str) {
        None => issues.push(
            IssueCode::Required,
            "Subscription.channel.type",
            "channel.type is required (rest-hook)",
        ),
        Some(t) => {
            let custom = extensions(&channel["_type"]).find(|e| e["url"] == EXT_CHANNEL_TYPE);
            if let Some(c) = custom {
                issues.push(
                    IssueCode::NotSupported,
                    "Subscription.channel.type",
                    format!(
                        "custom channel type {} is not supported; the only channel is rest-hook",
                        c["valueCoding"]["code"].as_str().unwrap_or("(no code)")
                    ),
                );
            } else if t != "rest-hook" {
                issues.push(
                    IssueCode::NotSupported,
                    "Subscription.channel.type",
                    format!("channel type '{t}' is not supported; the only channel is rest-hook"),
                );
            }
        }
    }
    let endpoint = match channel.get("endpoint").and_then(Json::as_str) {
        None => {
            issues.push(
                IssueCode::Required,
                "Subscription.channel.endpoint",
                "a rest-hook channel has an endpoint",
            );
            None
        }
        Some(e) => match check_endpoint(e, rules) {
            Ok(u) => Some(u),
            Err(why) => {
                issues.push(IssueCode::Value, "Subscription.channel.endpoint", why);
                None
            }
        },
    };
    match channel.get("payload").and_then(Json::as_str) {
        None => issues.push(
            IssueCode::Required,
            "Subscription.channel.payload",
            "channel.payload is required (application/fhir+json)",
        ),
        Some(p) => {
            let mime = p.split(';').next().unwrap_or_default().trim();
            if mime != "application/fhir+json" && mime != "application/json" {
                issues.push(
                    IssueCode::NotSupported,
                    "Subscription.channel.payload",
                    format!("payload type '{p}' is not supported; notifications are application/fhir+json"),
                );
            }
        }
    }
    let payload = match extensions(&channel["_payload"]).find(|e| e["url"] == EXT_PAYLOAD_CONTENT) {
        None => {
            issues.push(
                IssueCode::Required,
                "Subscription.channel.payload.extension:content",
                "backport-payload-content is required: empty, id-only or full-resource",
            );
            PayloadContent::Empty
        }
        Some(e) => {
            let code = e["valueCode"].as_str().unwrap_or_default();
            PayloadContent::parse(code).unwrap_or_else(|| {
                issues.push(
                    IssueCode::NotSupported,
                    "Subscription.channel.payload.extension:content",
                    format!(
                        "payload content '{code}' is not supported: empty, id-only or full-resource"
                    ),
                );
                PayloadContent::Empty
            })
        }
    };
    let headers = match channel.get("header") {
        None => Vec::new(),
        Some(h) => match check_headers(h, rules) {
            Ok(h) => h,
            Err(why) => {
                issues.push(IssueCode::Value, "Subscription.channel.header", why);
                Vec::new()
            }
        },
    };
    let number = |url: &str, kind: &str, issues: &mut Issues| -> Option<u64> {
        let e = extensions(channel).find(|e| e["url"] == url)?;
        let v = e[kind].as_u64();
        if v.is_none() {
            issues.push(
                IssueCode::Structure,
                "Subscription.channel.extension",
                format!("{url} has a {kind}"),
            );
        }
        v
    };
    let heartbeat_secs = number(EXT_HEARTBEAT_PERIOD, "valueUnsignedInt", &mut issues)
        .filter(|s| *s > 0)
        .map(|s| clamp(s, rules.min_heartbeat_secs, rules.max_heartbeat_secs));
    let timeout_secs = number(EXT_TIMEOUT, "valueUnsignedInt", &mut issues)
        .filter(|s| *s > 0)
        .map_or(rules.default_timeout_secs, |s| {
            clamp(s, 1, rules.max_timeout_secs)
        })
        .min(rules.max_timeout_secs);
    let max_count = number(EXT_MAX_COUNT, "valuePositiveInt", &mut issues)
        .filter(|s| *s > 0)
        .map_or(rules.default_max_count, |s| {
            clamp(s, 1, rules.max_max_count)
        })
        .min(rules.max_max_count);

    let (Some(topic), Some(endpoint)) = (topic, endpoint) else {
        return Err(Rejection { issues: issues.0 });
    };
    issues.into_result(Spec {
        topic: topic.url.clone(),
        filter_criteria,
        filters,
        endpoint,
        headers,
        payload,
        heartbeat_secs,
        timeout_secs,
        max_count,
        end,
        status,
    })
}

impl Spec {
    /// Writes what is in force into `resource`: the heartbeat, timeout and
    /// max-count extensions as adjusted (added when the client left the
    /// server's default to apply).
    pub fn write_back(&self, resource: &mut Json) {
        let Some(channel) = resource.get_mut("channel").and_then(Json::as_object_mut) else {
            return;
        };
        let mut ext: Vec<Json> = channel
            .get("extension")
            .and_then(Json::as_array)
            .cloned()
            .unwrap_or_default();
        ext.retain(|e| {
            e["url"] != EXT_HEARTBEAT_PERIOD && e["url"] != EXT_TIMEOUT && e["url"] != EXT_MAX_COUNT
        });
        if let Some(h) = self.heartbeat_secs {
            ext.push(json!({"url": EXT_HEARTBEAT_PERIOD, "valueUnsignedInt": h}));
        }
        ext.push(json!({"url": EXT_TIMEOUT, "valueUnsignedInt": self.timeout_secs}));
        ext.push(json!({"url": EXT_MAX_COUNT, "valuePositiveInt": self.max_count}));
        channel.insert("extension".into(), Json::Array(ext));
    }
}

fn clamp(v: u64, lo: u32, hi: u32) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX).clamp(lo, hi.max(lo))
}

/// The `extension` list of an element (or of its `_element` sibling).
fn extensions(v: &Json) -> impl Iterator<Item = &Json> {
    v.get("extension")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
}

/// An instant (`2020-12-31T12:00:00Z`), or a date taken as its UTC midnight.
fn parse_instant(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
}

/// Whether `host` is this machine.
pub fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

fn check_endpoint(e: &str, rules: &Rules) -> Result<url::Url, String> {
    let u = url::Url::parse(e.trim()).map_err(|err| format!("'{e}' is not a URL: {err}"))?;
    match u.scheme() {
        "https" => {}
        "http" if is_loopback(&u) || rules.allow_http => {}
        "http" => {
            return Err(format!(
                "endpoint '{}' must be https (http only to a loopback address): notifications carry patient data",
                super::resthook::audit_path(&u)
            ));
        }
        other => return Err(format!("endpoint scheme '{other}' is not http(s)")),
    }
    if u.host().is_none() {
        return Err("the endpoint has no host".into());
    }
    if !rules.private_endpoints && super::resthook::is_private_host(&u) {
        return Err(format!(
            "endpoint '{}' is on this machine or a private network; this server does not \
             send notifications there ([subscriptions] private_endpoints)",
            super::resthook::audit_path(&u)
        ));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(
            "the endpoint URL carries credentials; send them as a channel.header instead".into(),
        );
    }
    Ok(u)
}

fn check_headers(h: &Json, rules: &Rules) -> Result<Vec<(String, String)>, String> {
    let list = h
        .as_array()
        .ok_or("channel.header is a list of 'Name: value' strings")?;
    if list.len() > rules.max_headers {
        return Err(format!("at most {} channel headers", rules.max_headers));
    }
    let mut out = Vec::new();
    for (n, line) in list.iter().enumerate() {
        let line = line
            .as_str()
            .ok_or_else(|| format!("header [{n}] is not a string"))?;
        if line.len() > rules.max_header_bytes {
            return Err(format!(
                "header [{n}] is longer than {} bytes",
                rules.max_header_bytes
            ));
        }
        // Never echo the value: it is usually a credential.
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("header [{n}] is not 'Name: value'"))?;
        let name = name.trim();
        let value = value.trim();
        let token = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token {
            return Err(format!("header [{n}] has no valid name"));
        }
        if RESERVED_HEADERS
            .iter()
            .any(|r| name.eq_ignore_ascii_case(r))
        {
            return Err(format!("header '{name}' is set by the server"));
        }
        if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0)
            || reqwest::header::HeaderValue::from_str(value).is_err()
        {
            return Err(format!(
                "the value of header '{name}' is not a valid header value"
            ));
        }
        out.push((name.to_owned(), value.to_owned()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subscriptions::topic::TopicCatalog;

    fn now() -> DateTime<Utc> {
        parse_instant("2026-01-01T00:00:00Z").unwrap()
    }

    fn sub(payload: &str) -> Json {
        json!({
            "resourceType": "Subscription",
            "status": "requested",
            "reason": "test",
            "criteria": "http://atlas.local/SubscriptionTopic/observation-change",
            "_criteria": {"extension": [{"url": EXT_FILTER_CRITERIA, "valueString": "Observation?patient=Patient/p1"}]},
            "channel": {
                "extension": [{"url": EXT_HEARTBEAT_PERIOD, "valueUnsignedInt": 1},
                              {"url": EXT_MAX_COUNT, "valuePositiveInt": 50000}],
                "type": "rest-hook",
                "endpoint": "https://hooks.example/notify",
                "header": ["Authorization: Bearer secret-value"],
                "payload": "application/fhir+json",
                "_payload": {"extension": [{"url": EXT_PAYLOAD_CONTENT, "valueCode": payload}]}
            }
        })
    }

    fn catalog() -> TopicCatalog {
        TopicCatalog::builtin(&["Observation"]).unwrap()
    }

    #[test]
    fn a_backport_subscription_becomes_a_spec_within_the_servers_bounds() {
        let mut s = sub("id-only");
        let spec = validate(&s, &catalog(), &Rules::default(), now()).unwrap();
        assert_eq!(spec.payload, PayloadContent::IdOnly);
        assert_eq!(spec.heartbeat_secs, Some(10), "raised to the minimum");
        assert_eq!(spec.max_count, 5000, "lowered to the maximum");
        assert_eq!(spec.timeout_secs, 10, "the default");
        assert_eq!(spec.headers[0].0, "Authorization");
        assert!(!format!("{spec:?}").contains("secret-value"), "{spec:?}");
        spec.write_back(&mut s);
        let ext = s["channel"]["extension"].as_array().unwrap();
        assert!(ext.contains(&json!({"url": EXT_HEARTBEAT_PERIOD, "valueUnsignedInt": 10})));
        assert!(ext.contains(&json!({"url": EXT_TIMEOUT, "valueUnsignedInt": 10})));
        assert_eq!(
            validate(&s, &catalog(), &Rules::default(), now()).unwrap(),
            spec
        );
    }

    #[test]
    fn unsupported_channels_payloads_topics_and_endpoints_are_refused() {
        type Edit = Box<dyn Fn(&mut Json)>;
        let cases: Vec<(Edit, &str, u16)> = vec![
            (
                Box::new(|s| s["channel"]["type"] = json!("websocket")),
                "Subscription.channel.type",
                422,
            ),
            (
                Box::new(
                    |s| s["channel"]["_type"] = json!({"extension": [{"url": EXT_CHANNEL_TYPE, "valueCoding": {"code": "zulip"}}]}),
                ),
                "Subscription.channel.type",
                422,
            ),
            (
                Box::new(|s| s["channel"]["payload"] = json!("application/fhir+xml")),
                "Subscription.channel.payload",
                422,
            ),
            (
                Box::new(|s| s["channel"]["_payload"]["extension"][0]["valueCode"] = json!("full")),
                "Subscription.channel.payload.extension:content",
                422,
            ),
            (
                Box::new(|s| s["channel"]["_payload"] = json!({})),
                "Subscription.channel.payload.extension:content",
                400,
            ),
            (
                Box::new(|s| s["criteria"] = json!("http://hl7.org/SubscriptionTopic/admission")),
                "Subscription.criteria",
                422,
            ),
            (
                Box::new(|s| {
                    s["_criteria"]["extension"][0]["valueString"] =
                        json!("Observation?value-quantity=5")
                }),
                "Subscription.criteria.extension:filterCriteria[0]",
                422,
            ),
            (
                Box::new(|s| s["channel"]["endpoint"] = json!("http://hooks.example/notify")),
                "Subscription.channel.endpoint",
                422,
            ),
            (
                Box::new(|s| s["channel"]["endpoint"] = json!("https://u:p@hooks.example/")),
                "Subscription.channel.endpoint",
                422,
            ),
            (
                Box::new(|s| s["channel"]["header"] = json!(["Content-Type: text/plain"])),
                "Subscription.channel.header",
                422,
            ),
            (
                Box::new(|s| s["end"] = json!("2020-12-31T12:00:00Z")),
                "Subscription.end",
                422,
            ),
            (
                Box::new(|s| s["modifierExtension"] = json!([{"url": "x"}])),
                "Subscription.modifierExtension",
                422,
            ),
            (
                Box::new(|s| s["resourceType"] = json!("Patient")),
                "Subscription",
                400,
            ),
        ];
        for (edit, element, status) in cases {
            let mut s = sub("empty");
            edit(&mut s);
            let r = validate(&s, &catalog(), &Rules::default(), now()).unwrap_err();
            assert!(r.names(element), "{element}: {r}");
            assert_eq!(r.status(), status, "{element}: {r}");
            assert!(!r.to_string().contains("secret-value"), "{r}");
        }
        // Loopback http is fine where private endpoints are; so is any
        // http when the rules say so.
        let mut s = sub("empty");
        s["channel"]["endpoint"] = json!("http://127.0.0.1:9/hook");
        let private = Rules {
            private_endpoints: true,
            ..Rules::default()
        };
        assert!(validate(&s, &catalog(), &private, now()).is_ok());
        s["channel"]["endpoint"] = json!("http://hooks.example/hook");
        let lax = Rules {
            allow_http: true,
            ..Rules::default()
        };
        assert!(validate(&s, &catalog(), &lax, now()).is_ok());
    }

    #[test]
    fn private_endpoints_are_refused_unless_allowed() {
        let private = Rules {
            private_endpoints: true,
            ..Rules::default()
        };
        for e in [
            "http://localhost:8080/hook",
            "https://LOCALHOST./hook",
            "https://api.localhost/hook",
            "http://127.0.0.1:6379/",
            "https://127.8.9.10/",
            "https://10.1.2.3/hook",
            "https://172.16.0.1/hook",
            "https://172.31.255.255/hook",
            "https://192.168.1.1/hook",
            "https://169.254.169.254/latest/meta-data",
            "https://0.0.0.0:8443/",
            "https://[::1]/hook",
            "https://[::]/hook",
            "https://[fd00::1]/hook",
            "https://[fc12::1]/hook",
            "https://[fe80::1]/hook",
            "https://[::ffff:127.0.0.1]/hook",
            "https://[::ffff:10.0.0.1]/hook",
        ] {
            let mut s = sub("empty");
            s["channel"]["endpoint"] = json!(e);
            let r = validate(&s, &catalog(), &Rules::default(), now()).unwrap_err();
            assert!(r.names("Subscription.channel.endpoint"), "{e}: {r}");
            assert_eq!(r.status(), 422, "{e}: {r}");
            assert!(validate(&s, &catalog(), &private, now()).is_ok(), "{e}");
        }
        for e in [
            "https://hooks.example/notify",
            "https://8.8.8.8/hook",
            "https://172.32.0.1/hook",
            "https://[2001:db8::1]/hook",
            "https://localhost.example/hook",
        ] {
            let mut s = sub("empty");
            s["channel"]["endpoint"] = json!(e);
            assert!(
                validate(&s, &catalog(), &Rules::default(), now()).is_ok(),
                "{e}"
            );
        }
    }
}
