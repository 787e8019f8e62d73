//! FHIRcast event names, the patterns a subscription asks for, and the
//! `fhircast/` OAuth scopes.
//!
//! Event names are case-insensitive (STU3 2-3, 2-6): `patient-OPEN` is
//! `Patient-open`. The hub supports a fixed catalog ([`SUPPORTED`]): the
//! context events of Patient, Encounter and ImagingStudy (open, close),
//! DiagnosticReport (open, close, update, select), and the infrastructure
//! events SyncError, UserLogout, UserHibernate and Home-open. A name
//! outside it is refused rather than forwarded, because the hub must know
//! an event's anchor and patient to decide who may receive it.
//!
//! Subscriptions may use the wildcards of STU3 2-3 (`*`, `*-*`,
//! `Patient-*`, `*-update`); scopes follow STU3 2-2:
//! `fhircast/<event or pattern>.<read|write|*>`.

use std::fmt;

/// The suffix of a context event name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Open,
    Close,
    Update,
    Select,
}

impl Action {
    fn parse(s: &str) -> Option<Action> {
        match s.to_ascii_lowercase().as_str() {
            "open" => Some(Action::Open),
            "close" => Some(Action::Close),
            "update" => Some(Action::Update),
            "select" => Some(Action::Select),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Open => "open",
            Action::Close => "close",
            Action::Update => "update",
            Action::Select => "select",
        }
    }
}

/// The anchor types the hub knows: resource type, the context key that
/// holds the anchor resource, and the actions the catalog defines for it.
const ANCHORS: &[(&str, &str, &[Action])] = &[
    ("Patient", "patient", &[Action::Open, Action::Close]),
    ("Encounter", "encounter", &[Action::Open, Action::Close]),
    ("ImagingStudy", "study", &[Action::Open, Action::Close]),
    (
        "DiagnosticReport",
        "report",
        &[Action::Open, Action::Close, Action::Update, Action::Select],
    ),
];

/// The events this hub accepts, as `/.well-known/fhircast-configuration`
/// lists them.
pub const SUPPORTED: &[&str] = &[
    "Patient-open",
    "Patient-close",
    "Encounter-open",
    "Encounter-close",
    "ImagingStudy-open",
    "ImagingStudy-close",
    "DiagnosticReport-open",
    "DiagnosticReport-close",
    "DiagnosticReport-update",
    "DiagnosticReport-select",
    "SyncError",
    "UserLogout",
    "UserHibernate",
    "Home-open",
];

/// A supported event, its name normalised (case-insensitive input,
/// canonical output).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventName {
    /// `<Anchor>-<action>`: `resource` is the canonical resource type.
    Context {
        resource: &'static str,
        action: Action,
    },
    SyncError,
    UserLogout,
    UserHibernate,
    HomeOpen,
}

/// Why an event name or pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("{0:?} is not a FHIRcast event name (Resource-open, Resource-close, ...)")]
    Malformed(String),
    #[error("event {0:?} is not supported by this hub (supported: {list})", list = SUPPORTED.join(", "))]
    Unsupported(String),
}

fn anchor_of(resource: &str) -> Option<&'static (&'static str, &'static str, &'static [Action])> {
    ANCHORS
        .iter()
        .find(|(t, _, _)| t.eq_ignore_ascii_case(resource))
}

/// A FHIR resource type as the event grammar allows it (letters and
/// digits, starting with a letter).
fn resource_like(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars().all(|c| c.is_ascii_alphanumeric())
}

impl EventName {
    /// Parses a name, case-insensitively.
    pub fn parse(name: &str) -> Result<EventName, EventError> {
        let n = name.trim();
        match n.to_ascii_lowercase().as_str() {
            "syncerror" => return Ok(EventName::SyncError),
            "userlogout" => return Ok(EventName::UserLogout),
            "userhibernate" => return Ok(EventName::UserHibernate),
            "home-open" => return Ok(EventName::HomeOpen),
            _ => {}
        }
        // Proprietary events (reverse domain notation) are well formed,
        // but the hub cannot know their anchor or patient.
        if n.contains('.')
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(EventError::Unsupported(n.to_owned()));
        }
        let Some((res, act)) = n.split_once('-') else {
            return Err(EventError::Malformed(n.to_owned()));
        };
        let Some(action) = Action::parse(act) else {
            return Err(EventError::Malformed(n.to_owned()));
        };
        if !resource_like(res) {
            return Err(EventError::Malformed(n.to_owned()));
        }
        match anchor_of(res) {
            Some((t, _, actions)) if actions.contains(&action) => Ok(EventName::Context {
                resource: t,
                action,
            }),
            _ => Err(EventError::Unsupported(n.to_owned())),
        }
    }

    /// Every supported event.
    pub fn all() -> Vec<EventName> {
        SUPPORTED
            .iter()
            .filter_map(|n| EventName::parse(n).ok())
            .collect()
    }

    /// The anchor resource type of a context event.
    pub fn resource(&self) -> Option<&'static str> {
        match self {
            EventName::Context { resource, .. } => Some(resource),
            _ => None,
        }
    }

    pub fn action(&self) -> Option<Action> {
        match self {
            EventName::Context { action, .. } => Some(*action),
            _ => None,
        }
    }

    /// The context key holding the anchor resource (`patient`, `study`,
    /// `report`, ...).
    pub fn anchor_key(&self) -> Option<&'static str> {
        self.resource().and_then(anchor_of).map(|(_, k, _)| *k)
    }

    /// The context keys the event must carry (the catalog's 1..1 and 1..*
    /// keys, as the STU3 event pages and their examples give them).
    pub fn required_keys(&self) -> &'static [&'static str] {
        use Action::*;
        match self {
            EventName::Context { resource, action } => match (*resource, action) {
                ("Patient", _) => &["patient"],
                ("Encounter", Open | Close) => &["encounter", "patient"],
                ("ImagingStudy", _) => &["study"],
                ("DiagnosticReport", Open | Close) => &["report", "patient"],
                ("DiagnosticReport", Update) => &["report", "updates"],
                ("DiagnosticReport", Select) => &["report"],
                _ => &[],
            },
            EventName::SyncError => &["operationoutcome"],
            EventName::UserLogout | EventName::UserHibernate | EventName::HomeOpen => &[],
        }
    }
}

impl fmt::Display for EventName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventName::Context { resource, action } => write!(f, "{resource}-{}", action.as_str()),
            EventName::SyncError => f.write_str("SyncError"),
            EventName::UserLogout => f.write_str("UserLogout"),
            EventName::UserHibernate => f.write_str("UserHibernate"),
            EventName::HomeOpen => f.write_str("Home-open"),
        }
    }
}

/// What a subscription (or a scope) names: one event or a wildcard.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EventPattern {
    /// `*`: every event.
    Any,
    /// `*-*`, `Patient-*`, `*-update`: context events by resource and
    /// action (`None` is the wildcard).
    Context {
        resource: Option<&'static str>,
        action: Option<Action>,
    },
    /// One event.
    Exact(EventName),
}

impl EventPattern {
    /// Parses one pattern, case-insensitively.
    pub fn parse(text: &str) -> Result<EventPattern, EventError> {
        let t = text.trim();
        if t == "*" {
            return Ok(EventPattern::Any);
        }
        if !t.contains('*') {
            return EventName::parse(t).map(EventPattern::Exact);
        }
        let Some((res, act)) = t.split_once('-') else {
            return Err(EventError::Malformed(t.to_owned()));
        };
        let action = match act {
            "*" => None,
            a => Some(Action::parse(a).ok_or_else(|| EventError::Malformed(t.to_owned()))?),
        };
        let resource = match res {
            "*" => None,
            r if resource_like(r) => Some(
                anchor_of(r)
                    .map(|(t, _, _)| *t)
                    .ok_or_else(|| EventError::Unsupported(t.to_owned()))?,
            ),
            _ => return Err(EventError::Malformed(t.to_owned())),
        };
        Ok(EventPattern::Context { resource, action })
    }

    /// Parses `hub.events`: a comma-separated list (empty items refused).
    pub fn parse_list(text: &str) -> Result<Vec<EventPattern>, EventError> {
        let mut out: Vec<EventPattern> = Vec::new();
        for item in text.split(',') {
            let p = EventPattern::parse(item)?;
            if !out.contains(&p) {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// Whether `event` is one this pattern names.
    pub fn matches(&self, event: &EventName) -> bool {
        match self {
            EventPattern::Any => true,
            EventPattern::Exact(e) => e == event,
            EventPattern::Context { resource, action } => match event {
                EventName::Context {
                    resource: r,
                    action: a,
                } => resource.is_none_or(|x| x == *r) && action.is_none_or(|x| x == *a),
                _ => false,
            },
        }
    }

    /// Whether every event `other` names is one this pattern names.
    pub fn covers(&self, other: &EventPattern) -> bool {
        match (self, other) {
            (EventPattern::Any, _) => true,
            (_, EventPattern::Exact(e)) => self.matches(e),
            (
                EventPattern::Context {
                    resource: r1,
                    action: a1,
                },
                EventPattern::Context {
                    resource: r2,
                    action: a2,
                },
            ) => (r1.is_none() || r1 == r2) && (a1.is_none() || a1 == a2),
            _ => false,
        }
    }
}

impl fmt::Display for EventPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventPattern::Any => f.write_str("*"),
            EventPattern::Exact(e) => e.fmt(f),
            EventPattern::Context { resource, action } => write!(
                f,
                "{}-{}",
                resource.unwrap_or("*"),
                action.map_or("*", Action::as_str)
            ),
        }
    }
}

/// A list of patterns as `hub.events` writes it.
pub fn events_text(patterns: &[EventPattern]) -> String {
    patterns
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The `fhircast/` scopes of a token (STU3 2-2): which events its holder
/// may receive (`read`) and request (`write`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FhircastScopes {
    read: Vec<EventPattern>,
    write: Vec<EventPattern>,
}

impl FhircastScopes {
    /// Reads the `fhircast/...` scopes among a token's scopes; others, and
    /// malformed ones, are ignored (they grant nothing).
    pub fn from_scopes<S: AsRef<str>>(scopes: &[S]) -> FhircastScopes {
        let mut s = FhircastScopes::default();
        for scope in scopes {
            let Some(rest) = scope.as_ref().strip_prefix("fhircast/") else {
                continue;
            };
            let Some((event, perm)) = rest.rsplit_once('.') else {
                continue;
            };
            let Ok(p) = EventPattern::parse(event) else {
                continue;
            };
            let (read, write) = match perm.to_ascii_lowercase().as_str() {
                "read" => (true, false),
                "write" => (false, true),
                "*" => (true, true),
                _ => continue,
            };
            if read {
                s.read.push(p.clone());
            }
            if write {
                s.write.push(p);
            }
        }
        s
    }

    /// Whether any `fhircast/` scope grants reading.
    pub fn reads_any(&self) -> bool {
        !self.read.is_empty()
    }

    pub fn can_read(&self, e: &EventName) -> bool {
        self.read.iter().any(|p| p.matches(e))
    }

    pub fn can_write(&self, e: &EventName) -> bool {
        self.write.iter().any(|p| p.matches(e))
    }

    /// The part of `requested` these scopes allow reading: a requested
    /// pattern a scope covers is kept as asked; a wildcard no scope covers
    /// is narrowed to the supported events it names that a scope allows.
    pub fn grant_read(&self, requested: &[EventPattern]) -> Vec<EventPattern> {
        let mut out: Vec<EventPattern> = Vec::new();
        let push = |p: EventPattern, out: &mut Vec<EventPattern>| {
            if !out.iter().any(|q| q.covers(&p)) {
                out.retain(|q| !p.covers(q));
                out.push(p);
            }
        };
        for r in requested {
            if self.read.iter().any(|s| s.covers(r)) {
                push(r.clone(), &mut out);
                continue;
            }
            for e in EventName::all() {
                if r.matches(&e) && self.can_read(&e) {
                    push(EventPattern::Exact(e), &mut out);
                }
            }
        }
        out
    }
}
