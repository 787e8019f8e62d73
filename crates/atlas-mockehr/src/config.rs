//! The mock's configuration ([`MockConfig`], TOML) and its fault timeline
//! ([`Fault`]): what a test or a demo can script. Every field has a default,
//! so an empty TOML file is a valid configuration.

use serde::{Deserialize, Serialize};

use crate::MockError;

/// Which version of the Bulk Data manifest the status endpoint answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ManifestShape {
    /// STU2 (2.0.0): `request`, `error`, `extension` as an object.
    #[default]
    Stu2,
    /// STU3 (3.0.0): STU2 plus `organizeOutputBy` / `outputOrganizedBy`,
    /// `continuesInFile` and `link[next]` (partial manifests).
    Stu3,
    /// STU4 ballot: `manifestType`, `outcome` instead of `error`, no
    /// `request`, `extension` as an array of FHIR extensions.
    Stu4,
}

/// Which HTTP methods the `$export` kick-off accepts; the other gets 405.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KickoffMode {
    #[default]
    Both,
    GetOnly,
    PostOnly,
}

/// A SMART Backend Services client allowed to ask for tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientRegistration {
    pub client_id: String,
    /// The client's public JWKS (`{"keys":[...]}`). In TOML it may also be
    /// a string: JSON text, or the path of a JWKS file.
    pub jwks: serde_json::Value,
    /// The scopes the client may be granted (`system/*.rs` also grants the
    /// v1 `system/*.read`).
    #[serde(default = "default_client_scopes")]
    pub scopes: Vec<String>,
    /// The one `jku` header value accepted from this client; without it a
    /// `jku` header is refused.
    #[serde(default)]
    pub jku: Option<String>,
}

fn default_client_scopes() -> Vec<String> {
    vec!["system/*.rs".into()]
}

/// A Group the `Group/{id}/$export` kick-off knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupDef {
    pub id: String,
    /// Every n-th patient in creation order (the first, the n+1-th, ...).
    #[serde(default)]
    pub every_nth_patient: Option<usize>,
    /// Explicit patient ids (added to the every-n-th members).
    #[serde(default)]
    pub patients: Vec<String>,
}

/// The endpoints a fault can be attached to. Each has its own call
/// counter; `Any` counts every request on the main listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    Token,
    Kickoff,
    Status,
    File,
    Search,
    History,
    #[default]
    Any,
}

/// One scripted fault: `kind` happens on calls `nth .. nth + times` of
/// endpoint `at` (1-based), or on every call when `nth` is absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    #[serde(default)]
    pub at: Endpoint,
    #[serde(default)]
    pub nth: Option<u32>,
    #[serde(default = "one")]
    pub times: u32,
    #[serde(flatten)]
    pub kind: FaultKind,
}

fn one() -> u32 {
    1
}

impl Fault {
    /// A fault on every call of `at`.
    pub fn every(at: Endpoint, kind: FaultKind) -> Fault {
        Fault {
            at,
            nth: None,
            times: 1,
            kind,
        }
    }

    /// A fault on the `nth` call (1-based) of `at` only.
    pub fn nth(at: Endpoint, nth: u32, kind: FaultKind) -> Fault {
        Fault {
            at,
            nth: Some(nth),
            times: 1,
            kind,
        }
    }
}

/// What a fault does. The first group answers the request itself; the
/// export group shapes the job a kick-off creates (attach them to
/// `kickoff` or `any`); `expire_files` acts on file downloads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FaultKind {
    /// Answer `code` with an OperationOutcome and, when given, this raw
    /// `Retry-After` text (seconds, an HTTP-date, or garbage on purpose).
    Status {
        code: u16,
        #[serde(default)]
        retry_after: Option<String>,
    },
    /// Send the first `bytes` bytes of the body, then abort the connection.
    ResetAfter { bytes: usize },
    /// End the body cleanly after `bytes` bytes.
    Truncate { bytes: usize },
    /// 307 to the same path and query on the other host.
    RedirectOtherHost,
    /// 401 as if the bearer token had expired; the token is revoked.
    ExpireToken,
    /// From this file download on, every file of that job answers 410 Gone.
    ExpireFiles,
    /// This export writes one resource per file.
    TinyFiles,
    /// This export adds one Binary whose NDJSON line is about `bytes` long.
    HugeLine { bytes: usize },
    /// This export puts one resource of another type in the first file.
    WrongType,
    /// This export's manifest says one resource more than the first file holds.
    CountMismatch,
    /// This export writes one key twice, the second copy an older version.
    DuplicateIds,
    /// This export's manifest is split into pages linked by `link[next]`.
    PartialManifest,
    /// This export fails: its status answers 500 with an OperationOutcome.
    FailJob,
}

/// Everything `atlas mock-ehr` and the tests can set; see each field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MockConfig {
    /// Seeds the clock steps, the tick changes and nothing else.
    pub seed: u64,
    pub manifest: ManifestShape,
    pub kickoff: KickoffMode,
    /// Bearer tokens on every data endpoint (not on `metadata` and
    /// `.well-known`), and `requiresAccessToken` in manifests.
    pub require_auth: bool,
    pub clients: Vec<ClientRegistration>,
    /// Lifetime of issued access tokens, on the wall clock.
    pub token_ttl_secs: u64,
    /// Export files hold at most this many resources.
    pub max_lines_per_file: usize,
    /// How many status polls answer 202 before the manifest.
    pub export_delay_polls: u32,
    /// The `Retry-After` seconds of those 202s and of 429s.
    pub retry_after_secs: u64,
    /// Serve and advertise `_history`.
    pub history: bool,
    /// Search `_count` when the request gives none.
    pub page_size: usize,
    pub groups: Vec<GroupDef>,
    pub faults: Vec<Fault>,
    /// Changes (updates, creates, deletes) one tick applies.
    pub changes_per_tick: usize,
    /// Apply one tick every N requests on the main listener.
    pub auto_tick_every: Option<u32>,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            seed: 1,
            manifest: ManifestShape::Stu2,
            kickoff: KickoffMode::Both,
            require_auth: true,
            clients: Vec::new(),
            token_ttl_secs: 300,
            max_lines_per_file: 100_000,
            export_delay_polls: 2,
            retry_after_secs: 1,
            history: true,
            page_size: 50,
            groups: vec![GroupDef {
                id: "cohort".into(),
                every_nth_patient: Some(2),
                patients: Vec::new(),
            }],
            faults: Vec::new(),
            changes_per_tick: 10,
            auto_tick_every: None,
        }
    }
}

impl MockConfig {
    /// Reads a configuration from TOML text; missing fields take their defaults.
    pub fn from_toml(text: &str) -> Result<MockConfig, MockError> {
        toml::from_str(text).map_err(|e| MockError::Config(e.to_string()))
    }

    /// Checks the values a server cannot run with.
    pub(crate) fn check(&self) -> Result<(), MockError> {
        let bad = |what: &str| Err(MockError::Config(what.to_string()));
        if self.max_lines_per_file == 0 {
            return bad("max_lines_per_file must be at least 1");
        }
        if self.page_size == 0 {
            return bad("page_size must be at least 1");
        }
        if self.auto_tick_every == Some(0) {
            return bad("auto_tick_every must be at least 1");
        }
        for g in &self.groups {
            if !atlas_fhir::is_valid_id(&g.id) {
                return Err(MockError::Config(format!(
                    "group id {:?} is not a FHIR id",
                    g.id
                )));
            }
            if g.every_nth_patient == Some(0) {
                return Err(MockError::Config(format!(
                    "group {}: every_nth_patient must be at least 1",
                    g.id
                )));
            }
        }
        Ok(())
    }
}
