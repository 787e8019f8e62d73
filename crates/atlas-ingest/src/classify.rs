//! The quarantine classifier: one line of text in, a parsed resource or a
//! rejection with a reason code out.
//!
//! Pure and allocation-light: the top level is read into borrowed raw values
//! (serde_json still validates every byte), and only the fields Atlas needs
//! (`meta`, compartment references, identifiers) are parsed further.

use std::borrow::Cow;
use std::sync::Arc;

use atlas_fhir::{
    VersionStamp, content_hash, is_fhir_date, is_resource_type, is_valid_id, parse_instant_micros,
};
use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// Why a line was not stored. The string form is the `reason` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    InvalidJson,
    NotObject,
    MissingResourceType,
    UnknownResourceType,
    MissingId,
    MalformedId,
    WrongType,
    InvalidUtf8,
    TruncatedLine,
    LineTooLong,
    CorruptGzip,
    DuplicateId,
    UnreadableInput,
    UnsupportedEntry,
    /// A conditional DELETE (`Type?identifier=...`) that matches no live
    /// resource of the batch or the store.
    UnresolvedConditionalDelete,
    /// A conditional DELETE that matches several resources: FHIR's
    /// single-match conditional delete refuses those, so Atlas does too.
    AmbiguousConditionalDelete,
}

impl Reason {
    pub const ALL: [Reason; 16] = [
        Reason::InvalidJson,
        Reason::NotObject,
        Reason::MissingResourceType,
        Reason::UnknownResourceType,
        Reason::MissingId,
        Reason::MalformedId,
        Reason::WrongType,
        Reason::InvalidUtf8,
        Reason::TruncatedLine,
        Reason::LineTooLong,
        Reason::CorruptGzip,
        Reason::DuplicateId,
        Reason::UnreadableInput,
        Reason::UnsupportedEntry,
        Reason::UnresolvedConditionalDelete,
        Reason::AmbiguousConditionalDelete,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Reason::InvalidJson => "invalid_json",
            Reason::NotObject => "not_object",
            Reason::MissingResourceType => "missing_resource_type",
            Reason::UnknownResourceType => "unknown_resource_type",
            Reason::MissingId => "missing_id",
            Reason::MalformedId => "malformed_id",
            Reason::WrongType => "wrong_type",
            Reason::InvalidUtf8 => "invalid_utf8",
            Reason::TruncatedLine => "truncated_line",
            Reason::LineTooLong => "line_too_long",
            Reason::CorruptGzip => "corrupt_gzip",
            Reason::DuplicateId => "duplicate_id",
            Reason::UnreadableInput => "unreadable_input",
            Reason::UnsupportedEntry => "unsupported_entry",
            Reason::UnresolvedConditionalDelete => "unresolved_conditional_delete",
            Reason::AmbiguousConditionalDelete => "ambiguous_conditional_delete",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

/// Where a row came from: the input's display name and the 1-based line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: Arc<str>,
    pub line: u64,
}

/// A resource that passed the classifier, ready for the store.
#[derive(Debug, Clone)]
pub struct ParsedResource {
    pub resource_type: String,
    pub id: String,
    /// The resource JSON as stored: the input bytes, except rewritten references.
    pub json: String,
    pub version: VersionStamp,
    pub patient_id: Option<String>,
    /// `system|value` of each `identifier`, for conditional reference lookups.
    pub identifiers: Vec<String>,
    pub is_synthetic: bool,
    pub unresolved_refs: u32,
    /// The Bundle entry's `fullUrl`, for entries of Bundles.
    pub full_url: Option<String>,
    pub origin: Origin,
}

/// A deletion (a Bundle entry with `request.method = DELETE`).
#[derive(Debug, Clone)]
pub struct Deletion {
    pub resource_type: String,
    pub target: DeleteTarget,
    /// The entry's `response.etag` (`W/"3"`: versionId `3`) and
    /// `response.lastModified`, as far as they are there and readable;
    /// `content_hash` is 0. Without either, the deletion has no version and
    /// only its position (within a batch) or arrival decides.
    pub version: VersionStamp,
    pub origin: Origin,
}

/// What a [`Deletion`] deletes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeleteTarget {
    /// The resource `resource_type/id`.
    Id(String),
    /// A conditional delete (`Type?identifier=...`) that no resource the
    /// reader knew of (the run's, and the store's identifiers it was given)
    /// matched: the store resolves it when the deletion is applied, since
    /// only the store sees what the batch's earlier commits wrote.
    Identifier {
        /// `system|value`, or a bare `value` (any system), URL-decoded.
        identifier: String,
        /// The entry's `request.url` as written, for messages.
        url: String,
        /// The entry's index in its Bundle, for messages.
        entry: usize,
    },
}

impl Deletion {
    /// The id it deletes, once known.
    pub fn id(&self) -> Option<&str> {
        match &self.target {
            DeleteTarget::Id(id) => Some(id),
            DeleteTarget::Identifier { .. } => None,
        }
    }
}

/// A line that goes to quarantine.
#[derive(Debug, Clone)]
pub struct Rejection {
    pub reason: Reason,
    pub message: String,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub field: Option<String>,
    /// The first 4 KiB of the offending line.
    pub prefix: Vec<u8>,
    pub byte_len: u64,
    pub origin: Origin,
}

/// The outcome of reading one unit of input (a line, or a Bundle entry).
#[derive(Debug, Clone)]
pub enum Event {
    Resource(Box<ParsedResource>),
    Delete(Deletion),
    Reject(Box<Rejection>),
    /// An empty or whitespace-only line: skipped and counted.
    Skip(Origin),
}

pub const PREFIX_BYTES: usize = 4096;

impl Rejection {
    pub fn new(reason: Reason, message: impl Into<String>, bytes: &[u8], origin: Origin) -> Self {
        Rejection {
            reason,
            message: message.into(),
            resource_type: None,
            resource_id: None,
            field: None,
            prefix: bytes[..bytes.len().min(PREFIX_BYTES)].to_vec(),
            byte_len: bytes.len() as u64,
            origin,
        }
    }
}

/// Top-level members of a JSON object, borrowed from the input.
struct TopLevel<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for TopLevel<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TopLevel<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::with_capacity(24);
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    let value: &'de RawValue = map.next_value()?;
                    if members.iter().any(|(k, _): &(Cow<str>, _)| *k == key) {
                        return Err(serde::de::Error::custom(format_args!(
                            "duplicate key `{key}`"
                        )));
                    }
                    members.push((key, value));
                }
                Ok(TopLevel(members))
            }
        }
        d.deserialize_map(V)
    }
}

impl<'a> TopLevel<'a> {
    fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    String,
    Object,
    Array,
    Bool,
    Number,
    Date,
    DateTime,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::String => "a string",
            Kind::Object => "an object",
            Kind::Array => "an array",
            Kind::Bool => "a boolean",
            Kind::Number => "a number",
            Kind::Date => "a date string (YYYY[-MM[-DD]])",
            Kind::DateTime => "a dateTime string",
        }
    }

    fn check(self, raw: &RawValue) -> bool {
        let text = raw.get();
        let first = text.as_bytes().first().copied().unwrap_or(b' ');
        match self {
            Kind::String => first == b'"',
            Kind::Object => first == b'{',
            Kind::Array => first == b'[',
            Kind::Bool => text == "true" || text == "false",
            Kind::Number => first == b'-' || first.is_ascii_digit(),
            Kind::Date => serde_json::from_str::<&str>(text).is_ok_and(is_fhir_date),
            Kind::DateTime => {
                serde_json::from_str::<&str>(text).is_ok_and(|s| parse_instant_micros(s).is_ok())
            }
        }
    }
}

/// Core fields checked on every resource: a wrong JSON type here means the
/// resource cannot be shaped later, so it is quarantined now.
const COMMON_FIELDS: &[(&str, Kind)] = &[
    ("meta", Kind::Object),
    ("text", Kind::Object),
    ("implicitRules", Kind::String),
    ("language", Kind::String),
    ("contained", Kind::Array),
    ("extension", Kind::Array),
    ("modifierExtension", Kind::Array),
    ("subject", Kind::Object),
    ("patient", Kind::Object),
    ("encounter", Kind::Object),
    ("beneficiary", Kind::Object),
];

/// Core fields of the types Atlas shapes into its ontology.
fn type_fields(resource_type: &str) -> &'static [(&'static str, Kind)] {
    match resource_type {
        "Patient" => &[
            ("active", Kind::Bool),
            ("birthDate", Kind::Date),
            ("gender", Kind::String),
            ("name", Kind::Array),
            ("telecom", Kind::Array),
            ("address", Kind::Array),
            ("identifier", Kind::Array),
            ("deceasedBoolean", Kind::Bool),
            ("deceasedDateTime", Kind::DateTime),
            ("multipleBirthBoolean", Kind::Bool),
            ("multipleBirthInteger", Kind::Number),
            ("maritalStatus", Kind::Object),
        ],
        "Observation" => &[
            ("status", Kind::String),
            ("code", Kind::Object),
            ("category", Kind::Array),
            ("identifier", Kind::Array),
            ("effectiveDateTime", Kind::DateTime),
            ("effectivePeriod", Kind::Object),
            ("issued", Kind::DateTime),
            ("valueQuantity", Kind::Object),
            ("valueCodeableConcept", Kind::Object),
            ("valueString", Kind::String),
            ("valueBoolean", Kind::Bool),
            ("component", Kind::Array),
        ],
        "Encounter" => &[
            ("status", Kind::String),
            ("class", Kind::Object),
            ("type", Kind::Array),
            ("identifier", Kind::Array),
            ("period", Kind::Object),
            ("participant", Kind::Array),
            ("reasonCode", Kind::Array),
            ("serviceProvider", Kind::Object),
        ],
        "Condition" => &[
            ("code", Kind::Object),
            ("clinicalStatus", Kind::Object),
            ("verificationStatus", Kind::Object),
            ("category", Kind::Array),
            ("identifier", Kind::Array),
            ("onsetDateTime", Kind::DateTime),
            ("abatementDateTime", Kind::DateTime),
            ("recordedDate", Kind::DateTime),
        ],
        "MedicationRequest" => &[
            ("status", Kind::String),
            ("intent", Kind::String),
            ("identifier", Kind::Array),
            ("medicationCodeableConcept", Kind::Object),
            ("medicationReference", Kind::Object),
            ("authoredOn", Kind::DateTime),
            ("dosageInstruction", Kind::Array),
            ("requester", Kind::Object),
        ],
        "Practitioner"
        | "Organization"
        | "Procedure"
        | "Immunization"
        | "Claim"
        | "ExplanationOfBenefit"
        | "DiagnosticReport"
        | "CarePlan"
        | "Goal"
        | "AllergyIntolerance"
        | "ImagingStudy"
        | "Location"
        | "Device" => &[("identifier", Kind::Array), ("status", Kind::String)],
        _ => &[],
    }
}

#[derive(Deserialize)]
struct MetaHead<'a> {
    #[serde(rename = "versionId", borrow)]
    version_id: Option<&'a RawValue>,
    #[serde(rename = "lastUpdated", borrow)]
    last_updated: Option<&'a RawValue>,
    #[serde(borrow)]
    tag: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Coding {
    system: Option<String>,
    code: Option<String>,
}

#[derive(Deserialize)]
struct ReferenceHead {
    reference: Option<String>,
}

#[derive(Deserialize)]
struct IdentifierHead {
    system: Option<String>,
    value: Option<String>,
}

/// HL7's tag for test data (`v3-ActReason#HTEST`) or any tag with code `synthetic`.
fn is_synthetic_tag(c: &Coding) -> bool {
    matches!(
        (c.system.as_deref(), c.code.as_deref()),
        (
            Some("http://terminology.hl7.org/CodeSystem/v3-ActReason"),
            Some("HTEST")
        ) | (_, Some("synthetic"))
    )
}

struct Reject {
    reason: Reason,
    message: String,
    field: Option<String>,
    /// The JSON ended before the value did (the mark of a cut-off line).
    ends_early: bool,
}

fn wrong_type(field: &str, kind: Kind, raw: &RawValue) -> Reject {
    let got: String = raw.get().chars().take(40).collect();
    Reject {
        reason: Reason::WrongType,
        message: format!("`{field}` must be {}, found {got}", kind.name()),
        field: Some(field.to_owned()),
        ends_early: false,
    }
}

/// Options that change classification.
#[derive(Debug, Clone, Default)]
pub struct ClassifyOptions {
    /// Mark every resource of this run synthetic (as well as tagged ones).
    pub synthetic: bool,
}

/// Classifies the text of one resource. `bytes` is the raw line (for the
/// quarantine prefix); `is_final_unterminated` marks a file's last line that
/// had no newline, which turns an early end of input into `truncated_line`.
pub fn classify_line(
    bytes: &[u8],
    origin: Origin,
    is_final_unterminated: bool,
    opts: &ClassifyOptions,
) -> Event {
    let trimmed = &bytes[..trimmed_len(bytes)];
    if trimmed.iter().all(|b| b.is_ascii_whitespace()) {
        return Event::Skip(origin);
    }
    let text = match std::str::from_utf8(trimmed) {
        Ok(t) => t,
        Err(e) => return invalid_utf8(e.valid_up_to(), bytes, origin),
    };
    classify_text(text, bytes, origin, is_final_unterminated, opts, None)
}

/// The length of `bytes` without trailing line ends, spaces and tabs.
fn trimmed_len(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .rposition(|b| !matches!(b, b'\r' | b'\n' | b' ' | b'\t'))
        .map_or(0, |i| i + 1)
}

fn invalid_utf8(valid_up_to: usize, bytes: &[u8], origin: Origin) -> Event {
    Event::Reject(Box::new(Rejection::new(
        Reason::InvalidUtf8,
        format!("invalid UTF-8 at byte {valid_up_to}"),
        bytes,
        origin,
    )))
}

/// What [`classify_owned`] made of a line.
pub(crate) enum Classified {
    Done(Event),
    /// A Bundle with entries: the caller unpacks it (or, when it is not of
    /// an unpackable type, classifies it again with `detect_bundle` off).
    Bundle(String, Origin),
}

/// [`classify_line`] for a line the caller owns: the line is validated as
/// UTF-8 once and becomes the stored JSON without a copy (the hot path of
/// NDJSON ingest).
pub(crate) fn classify_owned(
    bytes: Vec<u8>,
    origin: Origin,
    is_final_unterminated: bool,
    opts: &ClassifyOptions,
    detect_bundle: bool,
) -> Classified {
    let end = trimmed_len(&bytes);
    if bytes[..end].iter().all(|b| b.is_ascii_whitespace()) {
        return Classified::Done(Event::Skip(origin));
    }
    let mut text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let at = e.utf8_error().valid_up_to();
            return Classified::Done(invalid_utf8(at, e.as_bytes(), origin));
        }
    };
    let body = text[..end].trim_start_matches('\u{feff}');
    let start = end - body.len();
    match parse_resource(body, &origin, opts, detect_bundle) {
        Ok(Parsed::Resource(mut r)) => {
            if start == 0 {
                text.truncate(end);
                r.json = text;
            } else {
                r.json = body.to_owned();
            }
            Classified::Done(Event::Resource(r))
        }
        Ok(Parsed::Bundle) => Classified::Bundle(text, origin),
        Err(failure) => Classified::Done(rejection(
            failure,
            text.as_bytes(),
            origin,
            is_final_unterminated,
        )),
    }
}

/// Classifies a resource's JSON text. `rewritten` is set when the text is a
/// Bundle entry whose references were rewritten.
pub(crate) fn classify_text(
    text: &str,
    raw_line: &[u8],
    origin: Origin,
    is_final_unterminated: bool,
    opts: &ClassifyOptions,
    unresolved_refs: Option<u32>,
) -> Event {
    let text = text.trim_start_matches('\u{feff}');
    match parse_resource(text, &origin, opts, false) {
        Ok(Parsed::Resource(mut r)) => {
            r.unresolved_refs = unresolved_refs.unwrap_or(0);
            r.json = text.to_owned();
            Event::Resource(r)
        }
        // Not produced with `detect_bundle` off.
        Ok(Parsed::Bundle) => Event::Skip(origin),
        Err(failure) => rejection(failure, raw_line, origin, is_final_unterminated),
    }
}

fn rejection(
    (reject, ty, id): ParseFailure,
    raw_line: &[u8],
    origin: Origin,
    is_final_unterminated: bool,
) -> Event {
    let mut rej = Rejection::new(reject.reason, reject.message, raw_line, origin);
    if is_final_unterminated && rej.reason == Reason::InvalidJson && reject.ends_early {
        rej.reason = Reason::TruncatedLine;
        rej.message = format!("last line has no newline and ends early: {}", rej.message);
    }
    rej.field = reject.field;
    rej.resource_type = ty;
    rej.resource_id = id;
    Event::Reject(Box::new(rej))
}

/// A parsed line: a resource (its `json` still empty; the caller fills it
/// from the text it owns), or a Bundle to unpack.
enum Parsed {
    Resource(Box<ParsedResource>),
    Bundle,
}

type ParseFailure = (Reject, Option<String>, Option<String>);

fn parse_resource(
    text: &str,
    origin: &Origin,
    opts: &ClassifyOptions,
    detect_bundle: bool,
) -> Result<Parsed, ParseFailure> {
    let fail = |reason, message: String, field: Option<&str>| Reject {
        reason,
        message,
        field: field.map(str::to_owned),
        ends_early: false,
    };
    let top: TopLevel = match serde_json::from_str(text) {
        Ok(t) => t,
        Err(e) => {
            use serde_json::error::Category;
            let first = text.trim_start().as_bytes().first().copied();
            let reason = match e.classify() {
                Category::Data if first != Some(b'{') => Reason::NotObject,
                Category::Data if e.to_string().contains("duplicate key") => Reason::InvalidJson,
                Category::Data => Reason::NotObject,
                Category::Syntax | Category::Eof | Category::Io => {
                    // A scalar or array that is valid JSON is still "not an object".
                    if first != Some(b'{')
                        && serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
                    {
                        Reason::NotObject
                    } else {
                        Reason::InvalidJson
                    }
                }
            };
            let msg = if reason == Reason::NotObject {
                "a resource must be a JSON object".to_owned()
            } else {
                e.to_string()
            };
            // Single-line text: an error at or past the last column means the value was cut off.
            let ends_early = e.classify() == Category::Eof
                || (e.line() == 1 && e.column() >= text.trim_end().len());
            let reject = Reject {
                ends_early,
                ..fail(reason, msg, None)
            };
            return Err((reject, None, None));
        }
    };
    let Some(rt_raw) = top.get("resourceType") else {
        return Err((
            fail(
                Reason::MissingResourceType,
                "no `resourceType`".into(),
                Some("resourceType"),
            ),
            None,
            None,
        ));
    };
    let Ok(resource_type) = serde_json::from_str::<Cow<str>>(rt_raw.get()) else {
        return Err((wrong_type("resourceType", Kind::String, rt_raw), None, None));
    };
    if detect_bundle && resource_type == "Bundle" && top.get("entry").is_some() {
        return Ok(Parsed::Bundle);
    }
    let ty = Some(resource_type.to_string());
    if !is_resource_type(&resource_type) {
        return Err((
            fail(
                Reason::UnknownResourceType,
                format!("`{resource_type}` is not an R4 resource type"),
                Some("resourceType"),
            ),
            ty,
            None,
        ));
    }
    let Some(id_raw) = top.get("id") else {
        return Err((
            fail(
                Reason::MissingId,
                format!("{resource_type} has no `id`"),
                Some("id"),
            ),
            ty,
            None,
        ));
    };
    let Ok(id) = serde_json::from_str::<Cow<str>>(id_raw.get()) else {
        return Err((
            fail(
                Reason::MalformedId,
                format!("`id` must be a string, found {}", id_raw.get()),
                Some("id"),
            ),
            ty,
            None,
        ));
    };
    if !is_valid_id(&id) {
        return Err((
            fail(
                Reason::MalformedId,
                format!("`{id}` is not a FHIR id (1-64 of [A-Za-z0-9-.])"),
                Some("id"),
            ),
            ty,
            Some(id.into_owned()),
        ));
    }
    let id_owned = Some(id.to_string());
    let fail_t = |r: Reject| (r, ty.clone(), id_owned.clone());
    for &(field, kind) in COMMON_FIELDS.iter().chain(type_fields(&resource_type)) {
        if let Some(raw) = top.get(field)
            && !kind.check(raw)
        {
            return Err(fail_t(wrong_type(field, kind, raw)));
        }
    }

    let mut version_id = None;
    let mut last_updated = None;
    let mut is_synthetic = opts.synthetic;
    if let Some(meta_raw) = top.get("meta") {
        let meta: MetaHead = serde_json::from_str(meta_raw.get()).map_err(|e| {
            fail_t(fail(
                Reason::WrongType,
                format!("`meta`: {e}"),
                Some("meta"),
            ))
        })?;
        if let Some(v) = meta.version_id {
            version_id = Some(
                serde_json::from_str::<String>(v.get())
                    .map_err(|_| fail_t(wrong_type("meta.versionId", Kind::String, v)))?,
            );
        }
        if let Some(v) = meta.last_updated {
            let s = serde_json::from_str::<Cow<str>>(v.get())
                .map_err(|_| fail_t(wrong_type("meta.lastUpdated", Kind::DateTime, v)))?;
            last_updated = Some(
                parse_instant_micros(&s)
                    .map_err(|_| fail_t(wrong_type("meta.lastUpdated", Kind::DateTime, v)))?,
            );
        }
        if let Some(tags) = meta.tag {
            let tags: Vec<Coding> = serde_json::from_str(tags.get()).map_err(|e| {
                fail_t(fail(
                    Reason::WrongType,
                    format!("`meta.tag`: {e}"),
                    Some("meta.tag"),
                ))
            })?;
            is_synthetic |= tags.iter().any(is_synthetic_tag);
        }
    }

    let patient_id = if &*resource_type == "Patient" {
        Some(id.to_string())
    } else {
        let mut found = None;
        for field in ["subject", "patient", "beneficiary"] {
            if let Some(raw) = top.get(field) {
                let r: ReferenceHead = serde_json::from_str(raw.get()).map_err(|e| {
                    fail_t(fail(
                        Reason::WrongType,
                        format!("`{field}`: {e}"),
                        Some(field),
                    ))
                })?;
                if let Some(("Patient", pid)) = r
                    .reference
                    .as_deref()
                    .and_then(atlas_fhir::split_relative_reference)
                {
                    found = Some(pid.to_owned());
                    break;
                }
            }
        }
        found
    };

    let mut identifiers = Vec::new();
    if let Some(raw) = top.get("identifier") {
        let parsed: Result<Vec<IdentifierHead>, _> = if raw.get().starts_with('[') {
            serde_json::from_str(raw.get())
        } else {
            serde_json::from_str::<IdentifierHead>(raw.get()).map(|i| vec![i])
        };
        let parsed = parsed.map_err(|e| {
            fail_t(fail(
                Reason::WrongType,
                format!("`identifier`: {e}"),
                Some("identifier"),
            ))
        })?;
        for ident in parsed {
            if let Some(value) = ident.value {
                identifiers.push(format!("{}|{}", ident.system.unwrap_or_default(), value));
            }
        }
    }

    Ok(Parsed::Resource(Box::new(ParsedResource {
        resource_type: resource_type.into_owned(),
        id: id.into_owned(),
        version: VersionStamp {
            version_id,
            last_updated,
            content_hash: content_hash(text.as_bytes()),
        },
        json: String::new(),
        patient_id,
        identifiers,
        is_synthetic,
        unresolved_refs: 0,
        full_url: None,
        origin: origin.clone(),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> Origin {
        Origin {
            file: Arc::from("t.ndjson"),
            line: 7,
        }
    }

    fn reason(line: &str) -> Option<Reason> {
        match classify_line(
            line.as_bytes(),
            origin(),
            false,
            &ClassifyOptions::default(),
        ) {
            Event::Reject(r) => Some(r.reason),
            Event::Resource(_) => None,
            Event::Skip(_) => Some(Reason::UnsupportedEntry),
            Event::Delete(_) => None,
        }
    }

    #[test]
    fn reasons() {
        assert_eq!(reason(r#"{"resourceType":"Patient","id":"p1"}"#), None);
        assert_eq!(
            reason(r#"{"resourceType":"Patient","id":"p1""#),
            Some(Reason::InvalidJson)
        );
        assert_eq!(reason(r#"[1,2]"#), Some(Reason::NotObject));
        assert_eq!(reason(r#""hello""#), Some(Reason::NotObject));
        assert_eq!(reason(r#"42"#), Some(Reason::NotObject));
        assert_eq!(reason(r#"{"id":"x"}"#), Some(Reason::MissingResourceType));
        assert_eq!(
            reason(r#"{"resourceType":"Patinet","id":"x"}"#),
            Some(Reason::UnknownResourceType)
        );
        assert_eq!(
            reason(r#"{"resourceType":"Patient"}"#),
            Some(Reason::MissingId)
        );
        assert_eq!(
            reason(r#"{"resourceType":"Patient","id":5}"#),
            Some(Reason::MalformedId)
        );
        assert_eq!(
            reason(r#"{"resourceType":"Patient","id":"a b"}"#),
            Some(Reason::MalformedId)
        );
        assert_eq!(
            reason(r#"{"resourceType":"Patient","id":"p","birthDate":19870402}"#),
            Some(Reason::WrongType)
        );
        assert_eq!(
            reason(r#"{"resourceType":"Patient","id":"p","birthDate":"02/04/1987"}"#),
            Some(Reason::WrongType)
        );
        assert_eq!(
            reason(r#"{"resourceType":"Observation","id":"o","subject":"Patient/1"}"#),
            Some(Reason::WrongType)
        );
        assert_eq!(
            reason(r#"{"resourceType":"Patient","id":"p","meta":{"lastUpdated":"yesterday"}}"#),
            Some(Reason::WrongType)
        );
        assert_eq!(
            reason(r#"{"resourceType":"Patient","id":"p","id":"q"}"#),
            Some(Reason::InvalidJson)
        );
        assert_eq!(reason("   "), Some(Reason::UnsupportedEntry));
    }

    #[test]
    fn reason_codes_are_listed_once() {
        let mut codes: Vec<&str> = Reason::ALL.iter().map(|r| r.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), Reason::ALL.len());
        assert!(codes.contains(&"unresolved_conditional_delete"));
        assert!(codes.contains(&"ambiguous_conditional_delete"));
    }

    #[test]
    fn invalid_utf8_and_truncation() {
        let ev = classify_line(
            b"{\"resourceType\":\"Patient\",\"id\":\"\xff\"}",
            origin(),
            false,
            &ClassifyOptions::default(),
        );
        assert!(matches!(ev, Event::Reject(r) if r.reason == Reason::InvalidUtf8));
        let ev = classify_line(
            br#"{"resourceType":"Patient","id":"p1","name":[{"fam"#,
            origin(),
            true,
            &ClassifyOptions::default(),
        );
        assert!(matches!(ev, Event::Reject(r) if r.reason == Reason::TruncatedLine));
    }

    #[test]
    fn extracts_keys_versions_and_compartment() {
        let line = r#"{"resourceType":"Observation","id":"o1","meta":{"versionId":"3","lastUpdated":"2020-01-01T00:00:00Z","tag":[{"system":"http://terminology.hl7.org/CodeSystem/v3-ActReason","code":"HTEST"}]},"subject":{"reference":"Patient/p9"},"valueQuantity":{"value":16942.30},"identifier":[{"system":"s","value":"v"}]}"#;
        let Event::Resource(r) = classify_line(
            line.as_bytes(),
            origin(),
            false,
            &ClassifyOptions::default(),
        ) else {
            panic!("expected a resource")
        };
        assert_eq!(
            (r.resource_type.as_str(), r.id.as_str()),
            ("Observation", "o1")
        );
        assert_eq!(r.version.version_id.as_deref(), Some("3"));
        assert_eq!(r.version.last_updated, Some(1_577_836_800_000_000));
        assert_eq!(r.patient_id.as_deref(), Some("p9"));
        assert_eq!(r.identifiers, vec!["s|v".to_owned()]);
        assert!(r.is_synthetic);
        assert_eq!(r.json, line, "stored bytes are the input bytes");
        assert_eq!(r.origin.line, 7);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn resource_json() -> impl Strategy<Value = String> {
            (
                prop::sample::select(vec!["Patient", "Observation", "Encounter", "Condition", "Claim"]),
                "[A-Za-z0-9.-]{1,64}",
                proptest::option::of("[0-9]{1,3}"),
                "-?(0|[1-9][0-9]{0,5})\\.[0-9]{1,14}",
                proptest::option::of("[A-Za-z0-9]{1,12}"),
            )
                .prop_map(|(ty, id, ver, num, pid)| {
                    let meta = ver.map(|v| format!(r#","meta":{{"versionId":"{v}"}}"#)).unwrap_or_default();
                    let subject = pid.map(|p| format!(r#","subject":{{"reference":"Patient/{p}"}}"#)).unwrap_or_default();
                    format!(r#"{{"resourceType":"{ty}","id":"{id}"{meta}{subject},"extension":[{{"valueDecimal":{num}}}]}}"#)
                })
        }

        proptest! {
            /// Any bytes at all: one event, never a panic.
            #[test]
            fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), last in any::<bool>()) {
                let ev = classify_line(&bytes, origin(), last, &ClassifyOptions::default());
                if let Event::Reject(r) = ev {
                    prop_assert!(r.prefix.len() <= PREFIX_BYTES);
                    prop_assert_eq!(r.byte_len as usize, bytes.len());
                }
            }

            /// Valid resources are stored byte for byte with their key and compartment.
            #[test]
            fn valid_resources_are_kept_exactly(json in resource_json()) {
                let Event::Resource(r) = classify_line(json.as_bytes(), origin(), false, &ClassifyOptions::default()) else {
                    return Err(TestCaseError::fail(format!("rejected: {json}")));
                };
                prop_assert_eq!(&r.json, &json);
                let v: serde_json::Value = serde_json::from_str(&json).unwrap();
                prop_assert_eq!(r.id.as_str(), v["id"].as_str().unwrap());
                let compartment = if r.resource_type == "Patient" {
                    Some(r.id.as_str())
                } else {
                    v["subject"]["reference"].as_str().map(|s| &s[8..])
                };
                prop_assert_eq!(r.patient_id.as_deref(), compartment);
            }

            /// Cutting a valid resource short is never stored: a truncated final
            /// line is `truncated_line`, elsewhere `invalid_json`.
            #[test]
            fn truncation_is_rejected(json in resource_json(), cut in 1usize..40, last in any::<bool>()) {
                let cut = json.len().saturating_sub(cut).max(1);
                let ev = classify_line(&json.as_bytes()[..cut], origin(), last, &ClassifyOptions::default());
                let Event::Reject(r) = ev else { return Err(TestCaseError::fail("a truncated resource was accepted")) };
                let want = if last { Reason::TruncatedLine } else { Reason::InvalidJson };
                prop_assert_eq!(r.reason, want);
            }
        }
    }
}
