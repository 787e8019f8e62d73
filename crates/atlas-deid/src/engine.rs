//! The engine: rules applied in order to each resource (and each resource
//! nested in it), each node changed by the first rule that reaches it.
//!
//! The order of events follows the upstream tool, so its test pairs match:
//! a resource is processed before the resources inside it (contained,
//! Bundle entries); each rule selects nodes and processes every node below
//! them that no earlier rule touched; a resource (unless contained) gets a
//! `meta.security` label per kind of change made in it or below it; empty
//! elements are removed last.

use crate::config::{DateShiftScope, DeidConfig, Method, ProcessingErrors};
use crate::dates;
use crate::select::{TypeIndex, criterion, eval_on};
use crate::tree::{InvalidInput, NodeId, Prim, Tree};
use atlas_fhirpath::json::JsonValue;
use atlas_fhirpath::model::Model;
use chrono::NaiveDate;
use std::borrow::Cow;
use std::sync::OnceLock;

/// What a rule did to an element. The order is the order of the security labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operation {
    Redact,
    /// Generalised in place by a redact rule (ZIP3).
    Abstract,
    CryptoHash,
    Encrypt,
    /// A date moved by the date-shift offset (labelled PERTURBED, as upstream does).
    DateShift,
    /// A number moved by random noise.
    Perturb,
    Substitute,
    Generalize,
}

impl Operation {
    const ALL: [Operation; 8] = [
        Operation::Redact,
        Operation::Abstract,
        Operation::CryptoHash,
        Operation::Encrypt,
        Operation::DateShift,
        Operation::Perturb,
        Operation::Substitute,
        Operation::Generalize,
    ];

    fn bit(self) -> u8 {
        1 << (self as u8)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Redact => "redact",
            Operation::Abstract => "abstract",
            Operation::CryptoHash => "cryptoHash",
            Operation::Encrypt => "encrypt",
            Operation::DateShift => "dateShift",
            Operation::Perturb => "perturb",
            Operation::Substitute => "substitute",
            Operation::Generalize => "generalize",
        }
    }

    /// The `meta.security` coding: (system, code, display).
    fn label(self) -> (Option<&'static str>, &'static str, &'static str) {
        const V3: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";
        match self {
            Operation::Redact => (Some(V3), "REDACTED", "redacted"),
            Operation::Abstract => (Some(V3), "ABSTRED", "abstracted"),
            Operation::CryptoHash => (Some(V3), "CRYTOHASH", "cryptographic hash function"),
            Operation::Encrypt => (
                None,
                "ENCRYPT",
                "exact value is transformed into ciphertext",
            ),
            Operation::Perturb | Operation::DateShift => (
                None,
                "PERTURBED",
                "exact value is replaced with another exact value",
            ),
            Operation::Substitute => (
                None,
                "SUBSTITUTED",
                "exact value is replaced with a predefined value",
            ),
            Operation::Generalize => (
                None,
                "GENERALIZED",
                "exact value is replaced with a general value",
            ),
        }
    }
}

/// One changed element of a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Where, in the input's terms (`Patient.name[0].family`).
    pub path: String,
    pub operation: Operation,
    /// The index of the rule in the configuration.
    pub rule: usize,
}

/// Why a resource could not be de-identified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeidError {
    #[error("not a valid FHIR R4 resource: {0}")]
    Invalid(#[from] InvalidInput),
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("rule {rule} ({path}) failed at {location}: {message}")]
    Processing {
        rule: usize,
        path: String,
        location: String,
        message: String,
    },
}

/// Facts about where a resource came from that some date-shift scopes use.
#[derive(Debug, Clone, Copy, Default)]
pub struct ResourceContext<'a> {
    /// The input file's name (`dateShiftScope: file`).
    pub file_name: Option<&'a str>,
    /// The input folder's name (`dateShiftScope: folder`).
    pub folder_name: Option<&'a str>,
    /// The id of the patient the resource belongs to, before de-identification
    /// (`dateShiftScope: patient`).
    pub patient_id: Option<&'a str>,
}

/// A de-identified resource.
#[derive(Debug, Clone)]
pub struct Deidentified {
    pub resource_type: String,
    /// The output id (after hashing, when ids are hashed).
    pub id: Option<String>,
    pub json: JsonValue<'static>,
    pub changes: Vec<Change>,
    /// The resource failed a rule and `processingErrors: skip` emptied it.
    pub emptied: bool,
}

impl Deidentified {
    pub fn to_json_string(&self) -> String {
        self.json.to_json_string()
    }

    /// The resource `processingErrors: skip` leaves: only a REDACTED label.
    pub fn emptied(resource_type: &str) -> Deidentified {
        empty_resource(resource_type)
    }
}

/// A configured de-identifier; cheap to share across threads.
pub struct Deidentifier {
    config: DeidConfig,
    hash_key: ring::hmac::Key,
    shift_key: ring::hmac::Key,
    record_changes: bool,
}

fn reference_regex() -> &'static regex::Regex {
    static RE: OnceLock<regex::Regex> = OnceLock::new();
    RE.get_or_init(|| {
        let types = atlas_fhir::R4_RESOURCE_TYPES.join("|");
        regex::Regex::new(&format!(
            r"^(?P<prefix>((http|https)://([A-Za-z0-9\\/.:%$])*)?({types})/)(?P<id>[A-Za-z0-9\-.]{{1,64}})(?P<suffix>/_history/[A-Za-z0-9\-.]{{1,64}})?$"
        ))
        .unwrap_or_else(|_| regex::Regex::new("^$").unwrap_or_else(|_| unreachable!()))
    })
}

fn oid_regex() -> &'static regex::Regex {
    static RE: OnceLock<regex::Regex> = OnceLock::new();
    RE.get_or_init(|| {
        regex::Regex::new(r"^(?P<prefix>urn:oid:)(?P<id>[0-2](\.(0|[1-9][0-9]*))+)$")
            .unwrap_or_else(|_| unreachable!())
    })
}

fn uuid_regex() -> &'static regex::Regex {
    static RE: OnceLock<regex::Regex> = OnceLock::new();
    RE.get_or_init(|| {
        regex::Regex::new(
            r"^(?P<prefix>urn:uuid:)(?P<id>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$",
        )
        .unwrap_or_else(|_| unreachable!())
    })
}

impl Deidentifier {
    pub fn new(config: DeidConfig) -> Deidentifier {
        let hash_key = ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            config.parameters.crypto_hash_key.as_bytes(),
        );
        let shift_key = ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            config.parameters.date_shift_key.as_bytes(),
        );
        Deidentifier {
            config,
            hash_key,
            shift_key,
            record_changes: true,
        }
    }

    /// Whether [`Deidentified::changes`] lists each changed element (on by
    /// default; off saves building a path per change when nobody reads them).
    pub fn with_change_records(mut self, on: bool) -> Deidentifier {
        self.record_changes = on;
        self
    }

    pub fn config(&self) -> &DeidConfig {
        &self.config
    }

    /// HMAC-SHA256 of `input` under `cryptoHashKey`, lower-case hex (as upstream).
    pub fn hash(&self, input: &str) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let tag = ring::hmac::sign(&self.hash_key, input.as_bytes());
        let mut out = String::with_capacity(64);
        for b in tag.as_ref() {
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
        out
    }

    /// A reference with only its id part hashed (`Patient/<hash>`,
    /// `urn:uuid:<hash>`, `#<hash>`); anything else is hashed whole.
    pub fn hash_reference(&self, reference: &str) -> String {
        if reference.is_empty() {
            return String::new();
        }
        if let Some(local) = reference.strip_prefix('#') {
            return format!("#{}", self.hash(local));
        }
        // The common relative form `Type/id` without the regex.
        if let Some((ty, id)) = reference.split_once('/')
            && !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            && atlas_fhir::is_resource_type(ty)
        {
            return format!("{ty}/{}", self.hash(id));
        }
        for re in [reference_regex(), oid_regex(), uuid_regex()] {
            if let Some(c) = re.captures(reference) {
                let prefix = c.name("prefix").map_or("", |m| m.as_str());
                let id = c.name("id").map_or("", |m| m.as_str());
                let suffix = c.name("suffix").map_or("", |m| m.as_str());
                return format!("{prefix}{}{suffix}", self.hash(id));
            }
        }
        self.hash(reference)
    }

    /// The patient-scope date offset in days, base included (for tests and
    /// audits of the profile).
    pub fn patient_date_offset(&self, patient_id: &str) -> i64 {
        self.config.parameters.date_shift_base_days
            + dates::patient_offset(patient_id, &self.shift_key)
    }

    /// De-identifies one resource given as JSON text.
    pub fn deidentify_str(
        &self,
        text: &str,
        ctx: &ResourceContext<'_>,
    ) -> Result<Deidentified, DeidError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let v = atlas_fhirpath::json::parse(text).map_err(|e| DeidError::NotJson(e.to_string()))?;
        self.deidentify(&v, ctx)
    }

    /// De-identifies one resource (a Bundle with its entries, contained resources included).
    pub fn deidentify(
        &self,
        resource: &JsonValue<'_>,
        ctx: &ResourceContext<'_>,
    ) -> Result<Deidentified, DeidError> {
        let tree = Tree::from_json(resource)?;
        let resource_type = tree.node(0).ty.to_string();
        let mut run = Run {
            engine: self,
            ctx,
            visited: vec![false; tree.nodes.len()],
            tree,
            changes: Vec::new(),
            today: chrono::Utc::now().date_naive(),
            index: None,
            patient_offset: None,
        };
        match run.visit(0) {
            Ok(_) => {
                run.tree.remove_empty(0);
                let id = Some(run.tree.resource_id(0)).filter(|s| !s.is_empty());
                Ok(Deidentified {
                    resource_type,
                    id,
                    json: JsonValue::Object(run.tree.object_json(0)),
                    changes: run.changes,
                    emptied: false,
                })
            }
            Err(e @ DeidError::Processing { .. })
                if self.config.processing_errors == ProcessingErrors::Skip =>
            {
                let _ = e;
                Ok(empty_resource(&resource_type))
            }
            Err(e) => Err(e),
        }
    }
}

/// The resource `processingErrors: skip` leaves: only a REDACTED label.
fn empty_resource(resource_type: &str) -> Deidentified {
    let (system, code, display) = Operation::Redact.label();
    let mut coding = atlas_fhirpath::json::JsonObject::new();
    if let Some(s) = system {
        coding.push("system", JsonValue::String(Cow::Borrowed(s)));
    }
    coding.push("code", JsonValue::String(Cow::Borrowed(code)));
    coding.push("display", JsonValue::String(Cow::Borrowed(display)));
    let mut meta = atlas_fhirpath::json::JsonObject::new();
    meta.push(
        "security",
        JsonValue::Array(vec![JsonValue::Object(coding)]),
    );
    let mut root = atlas_fhirpath::json::JsonObject::new();
    root.push(
        "resourceType",
        JsonValue::String(Cow::Owned(resource_type.to_string())),
    );
    root.push("meta", JsonValue::Object(meta));
    Deidentified {
        resource_type: resource_type.to_string(),
        id: None,
        json: JsonValue::Object(root),
        changes: vec![Change {
            path: resource_type.to_string(),
            operation: Operation::Redact,
            rule: usize::MAX,
        }],
        emptied: true,
    }
}

struct Run<'e, 'c> {
    engine: &'e Deidentifier,
    ctx: &'e ResourceContext<'c>,
    tree: Tree,
    visited: Vec<bool>,
    changes: Vec<Change>,
    today: NaiveDate,
    /// The current resource's nodes by type; dropped when a substitution
    /// changes the tree.
    index: Option<TypeIndex>,
    /// The patient-scope date offset, computed once per call.
    patient_offset: Option<i64>,
}

const QUANTITY_TYPES: &[&str] = &[
    "Quantity",
    "SimpleQuantity",
    "MoneyQuantity",
    "Age",
    "Count",
    "Distance",
    "Duration",
    "Money",
];

impl Run<'_, '_> {
    fn is_visited(&self, id: NodeId) -> bool {
        self.visited.get(id).copied().unwrap_or(false)
    }

    fn mark(&mut self, id: NodeId) {
        if self.visited.len() <= id {
            self.visited
                .resize(self.tree.nodes.len().max(id + 1), false);
        }
        self.visited[id] = true;
    }

    fn mark_subtree(&mut self, id: NodeId) {
        self.mark(id);
        for c in self.tree.node(id).children.clone() {
            self.mark_subtree(c);
        }
    }

    fn fail(&self, rule: usize, at: NodeId, message: impl Into<String>) -> DeidError {
        DeidError::Processing {
            rule,
            path: self.engine.config.rules[rule].path.clone(),
            location: self.tree.location(at),
            message: message.into(),
        }
    }

    fn record(&mut self, id: NodeId, op: Operation, rule: usize) -> u8 {
        if !self.engine.record_changes {
            return op.bit();
        }
        self.changes.push(Change {
            path: self.tree.location(id),
            operation: op,
            rule,
        });
        op.bit()
    }

    /// Visits `id`: a resource is processed, then what is below it.
    fn visit(&mut self, id: NodeId) -> Result<u8, DeidError> {
        if !self.tree.node(id).resource {
            return self.visit_below(id);
        }
        let mut ops = self.process_resource(id)?;
        ops |= self.visit_below(id)?;
        if self.tree.node(id).name != "contained" {
            self.add_security_labels(id, ops);
        }
        Ok(ops)
    }

    fn visit_below(&mut self, id: NodeId) -> Result<u8, DeidError> {
        let mut ops = 0;
        for c in self.tree.node(id).children.clone() {
            ops |= self.visit(c)?;
        }
        Ok(ops)
    }

    fn process_resource(&mut self, res: NodeId) -> Result<u8, DeidError> {
        let rtype = self.tree.node(res).ty;
        let engine = self.engine;
        let mut ops = 0;
        self.index = None;
        for (ri, rule) in engine.config.rules.iter().enumerate() {
            if !rule.applies_to(rtype) {
                continue;
            }
            let matches = match &rule.selector {
                None => vec![res],
                Some(sel) => {
                    if self.index.is_none() {
                        self.index = Some(TypeIndex::build(&self.tree, res));
                    }
                    sel.select(&self.tree, res, self.index.as_ref())
                        .map_err(|e| self.fail(ri, res, e.to_string()))?
                }
            };
            for m in matches {
                ops |= self.process_recursive(m, ri)?;
            }
        }
        Ok(ops)
    }

    fn process_recursive(&mut self, id: NodeId, rule: usize) -> Result<u8, DeidError> {
        if self.is_visited(id) {
            return Ok(0);
        }
        let mut ops = self.process(id, rule)?;
        self.mark(id);
        for c in self.tree.node(id).children.clone() {
            if self.tree.node(c).resource {
                continue;
            }
            ops |= self.process_recursive(c, rule)?;
        }
        Ok(ops)
    }

    fn value_text(&self, id: NodeId) -> Option<String> {
        self.tree
            .node(id)
            .value
            .as_ref()
            .map(|v| v.text().into_owned())
            .filter(|s| !s.is_empty())
    }

    fn process(&mut self, id: NodeId, rule: usize) -> Result<u8, DeidError> {
        let engine = self.engine;
        match &engine.config.rules[rule].method {
            Method::Keep => Ok(0),
            Method::Redact => Ok(self.redact(id, rule)),
            Method::DateShift => self.date_shift(id, rule),
            Method::CryptoHash => {
                let Some(v) = self.value_text(id) else {
                    return Ok(0);
                };
                let hashed = if self.is_reference_like(id) {
                    engine.hash_reference(&v)
                } else {
                    engine.hash(&v)
                };
                self.tree.node_mut(id).value = Some(Prim::Str(hashed));
                Ok(self.record(id, Operation::CryptoHash, rule))
            }
            Method::Encrypt => {
                let Some(v) = self.value_text(id) else {
                    return Ok(0);
                };
                let key = engine.config.parameters.encrypt_key.as_bytes();
                let cipher = crate::encrypt::encrypt(v.as_bytes(), key)
                    .map_err(|m| self.fail(rule, id, m))?;
                self.tree.node_mut(id).value = Some(Prim::Str(cipher));
                Ok(self.record(id, Operation::Encrypt, rule))
            }
            Method::Substitute { replace_with } => self.substitute(id, rule, replace_with.as_ref()),
            Method::Perturb {
                span,
                proportional,
                round_to,
            } => self.perturb(id, rule, *span, *proportional, *round_to),
            Method::Generalize {
                cases,
                redact_others,
            } => {
                if !Model::r4().is_primitive(self.tree.node(id).ty) {
                    return Err(self.fail(
                        rule,
                        id,
                        format!(
                            "generalize applies only to primitive values, not {}",
                            self.tree.type_name(id)
                        ),
                    ));
                }
                if self.tree.node(id).value.is_none() {
                    return Ok(0);
                }
                for case in cases {
                    let hit = criterion(&self.tree, id, &case.condition)
                        .map_err(|e| self.fail(rule, id, format!("case condition: {e}")))?;
                    if hit {
                        let json = self.tree.node_json(id);
                        let element = self.tree.element_json(id);
                        let value =
                            eval_on(&self.tree, id, &json, element.as_ref(), &case.value, |c| {
                                Ok(c.iter().next().and_then(|v| v.to_fhirpath_string()))
                            })
                            .map_err(|e| self.fail(rule, id, format!("case value: {e}")))?;
                        self.tree.set_text(id, value);
                        return Ok(self.record(id, Operation::Generalize, rule));
                    }
                }
                if *redact_others {
                    self.tree.node_mut(id).value = None;
                }
                Ok(self.record(id, Operation::Generalize, rule))
            }
        }
    }

    /// `reference` of a Reference (upstream), and Bundle `fullUrl`s (Atlas, so
    /// that hashed references still resolve inside a Bundle).
    fn is_reference_like(&self, id: NodeId) -> bool {
        let n = self.tree.node(id);
        let parent_ty = n.parent.map(|p| self.tree.node(p).ty);
        (n.name == "reference" && parent_ty == Some("Reference"))
            || (n.name == "fullUrl" && parent_ty == Some("Bundle.entry"))
    }

    fn redact(&mut self, id: NodeId, rule: usize) -> u8 {
        let Some(v) = self.value_text(id) else {
            return 0;
        };
        let params = &self.engine.config.parameters;
        let ty = self.tree.node(id).ty;
        let parent_ty = self.tree.node(id).parent.map(|p| self.tree.node(p).ty);
        match ty {
            "date" | "dateTime" | "instant" => {
                self.redact_date(id, &v, ty != "date");
                self.record(id, Operation::Redact, rule)
            }
            "decimal" if parent_ty == Some("Age") => {
                let over = v.parse::<f64>().map_or(true, |a| a > 89.0);
                if !params.enable_partial_ages_for_redact || over {
                    self.tree.node_mut(id).value = None;
                }
                self.record(id, Operation::Redact, rule)
            }
            _ if self.tree.node(id).name == "postalCode"
                && params.enable_partial_zip_codes_for_redact =>
            {
                let zeroed = |s: &str| -> String {
                    s.chars()
                        .map(|c| if c.is_ascii_digit() { '0' } else { c })
                        .collect()
                };
                let restricted = params
                    .restricted_zip_code_tabulation_areas
                    .iter()
                    .any(|z| v.starts_with(z.as_str()));
                let new = if restricted {
                    zeroed(&v)
                } else if v.chars().count() >= 3 {
                    let cut = v.char_indices().nth(3).map_or(v.len(), |(i, _)| i);
                    format!("{}{}", &v[..cut], zeroed(&v[cut..]))
                } else {
                    v.clone()
                };
                self.tree.node_mut(id).value = Some(Prim::Str(new));
                self.record(id, Operation::Abstract, rule)
            }
            _ => {
                self.tree.node_mut(id).value = None;
                self.record(id, Operation::Redact, rule)
            }
        }
    }

    /// Partial redaction of a date: the year survives unless it is over 89 years ago.
    fn redact_date(&mut self, id: NodeId, v: &str, with_time: bool) {
        let params = &self.engine.config.parameters;
        if !params.enable_partial_dates_for_redact {
            self.tree.node_mut(id).value = None;
            return;
        }
        if let Some(p) = dates::parse(v, with_time) {
            let new = if dates::over_89(&p, self.today) {
                None
            } else {
                Some(Prim::Str(p.year.to_string()))
            };
            self.tree.node_mut(id).value = new;
        }
    }

    fn date_shift(&mut self, id: NodeId, rule: usize) -> Result<u8, DeidError> {
        let ty = self.tree.node(id).ty;
        if !matches!(ty, "date" | "dateTime" | "instant") {
            return Ok(0);
        }
        let Some(v) = self.value_text(id) else {
            return Ok(0);
        };
        let with_time = ty != "date";
        let parts = dates::parse(&v, with_time);
        let patient_scope =
            self.engine.config.parameters.date_shift_scope == DateShiftScope::Patient;
        match parts {
            Some(p) if p.day.is_some() && !dates::over_89(&p, self.today) => {
                let offset = self.offset(id);
                let shifted = dates::shift(&p, offset).ok_or_else(|| {
                    self.fail(rule, id, "the date does not exist on the calendar")
                })?;
                self.tree.node_mut(id).value = Some(Prim::Str(shifted));
                Ok(self.record(id, Operation::DateShift, rule))
            }
            // Atlas's patient scope moves a year or year-month too (its first
            // day, kept at its precision), so it stays on the patient's timeline.
            Some(p) if patient_scope && !dates::over_89(&p, self.today) => {
                let offset = self.offset(id);
                let Some(shifted) = dates::shift_partial(&p, offset) else {
                    return Err(self.fail(rule, id, "the date does not exist on the calendar"));
                };
                self.tree.node_mut(id).value = Some(Prim::Str(shifted));
                Ok(self.record(id, Operation::DateShift, rule))
            }
            _ => {
                self.redact_date(id, &v, with_time);
                Ok(self.record(id, Operation::Redact, rule))
            }
        }
    }

    fn offset(&mut self, id: NodeId) -> i64 {
        if let Some(o) = self.patient_offset {
            return o;
        }
        let o = self.compute_offset(id);
        if self.engine.config.parameters.date_shift_scope == DateShiftScope::Patient {
            self.patient_offset = Some(o);
        }
        o
    }

    fn compute_offset(&self, id: NodeId) -> i64 {
        self.engine.config.parameters.date_shift_base_days + self.scope_offset(id)
    }

    fn scope_offset(&self, id: NodeId) -> i64 {
        let params = &self.engine.config.parameters;
        let upstream = |prefix: &str| dates::upstream_offset(prefix, &params.date_shift_key);
        let resource_prefix = || self.tree.resource_id(self.tree.top(id));
        match params.date_shift_scope {
            DateShiftScope::Resource => upstream(&resource_prefix()),
            DateShiftScope::File => match self.ctx.file_name {
                Some(f) if !f.is_empty() => upstream(f),
                _ => upstream(&resource_prefix()),
            },
            DateShiftScope::Folder => match self.ctx.folder_name {
                Some(f) if !f.is_empty() => upstream(f),
                _ => upstream(&resource_prefix()),
            },
            DateShiftScope::Patient => match self.ctx.patient_id {
                Some(p) if !p.is_empty() => dates::patient_offset(p, &self.engine.shift_key),
                _ => dates::patient_offset(
                    &format!("resource:{}", resource_prefix()),
                    &self.engine.shift_key,
                ),
            },
        }
    }

    fn perturb(
        &mut self,
        id: NodeId,
        rule: usize,
        span: f64,
        proportional: bool,
        round_to: u32,
    ) -> Result<u8, DeidError> {
        use rand::Rng;
        use rust_decimal::Decimal;
        use rust_decimal::prelude::{FromPrimitive, ToPrimitive};
        let ty = self.tree.node(id).ty;
        let type_name = self.tree.type_name(id);
        let value_node = if matches!(ty, "decimal" | "integer" | "positiveInt" | "unsignedInt") {
            Some(id)
        } else if QUANTITY_TYPES.contains(&type_name) {
            self.tree.children_named(id, "value").first().copied()
        } else {
            None
        };
        let Some(vn) = value_node else {
            return Ok(0);
        };
        if self.is_visited(vn) {
            return Ok(0);
        }
        let Some(text) = self.value_text(vn) else {
            return Ok(0);
        };
        let original: Decimal = text
            .parse()
            .map_err(|_| self.fail(rule, vn, "the value is not a number"))?;
        let vty = self.tree.node(vn).ty;
        let integer = matches!(vty, "integer" | "positiveInt" | "unsignedInt");
        let span = if proportional {
            original.to_f64().unwrap_or(0.0) * span
        } else {
            span
        };
        let noise = if span > 0.0 {
            rand::thread_rng().gen_range(-span / 2.0..=span / 2.0)
        } else {
            0.0
        };
        let mut out = (original + Decimal::from_f64(noise).unwrap_or_default())
            .round_dp(if integer { 0 } else { round_to });
        if vty == "positiveInt" && out <= Decimal::ZERO {
            out = Decimal::ONE;
        }
        if vty == "unsignedInt" && out < Decimal::ZERO {
            out = Decimal::ZERO;
        }
        self.tree.node_mut(vn).value = Some(Prim::Num(out.normalize().to_string()));
        for c in self.tree.node(id).children.clone() {
            self.mark_subtree(c);
        }
        Ok(self.record(id, Operation::Perturb, rule))
    }

    fn substitute(
        &mut self,
        id: NodeId,
        rule: usize,
        replace_with: Option<&JsonValue<'static>>,
    ) -> Result<u8, DeidError> {
        let ty = self.tree.node(id).ty;
        let name = self.tree.node(id).name;
        let replacement = if Model::r4().is_primitive(ty) {
            let text = match replace_with {
                None => None,
                Some(JsonValue::String(s)) => Some(s.to_string()),
                Some(JsonValue::Number(n)) => Some(n.to_string()),
                Some(JsonValue::Bool(b)) => Some(b.to_string()),
                Some(_) => {
                    return Err(self.fail(
                        rule,
                        id,
                        format!("a {ty} value is replaced by text, not an object"),
                    ));
                }
            };
            let mut t = Tree::single(name, ty);
            t.set_text(0, text);
            t
        } else {
            let empty = JsonValue::Object(atlas_fhirpath::json::JsonObject::new());
            let obj = replace_with.unwrap_or(&empty);
            Tree::fragment(ty, name, obj).map_err(|e| self.fail(rule, id, e.to_string()))?
        };
        let mut keep = vec![false; self.tree.nodes.len()];
        self.keep_set(id, &mut keep);
        self.substitute_node(id, &replacement, Some(0), &keep);
        self.mark_subtree(id);
        self.index = None;
        Ok(self.record(id, Operation::Substitute, rule))
    }

    /// Marks nodes that an earlier rule changed, or that hold such a node.
    fn keep_set(&self, id: NodeId, keep: &mut Vec<bool>) -> bool {
        let mut any = false;
        for c in &self.tree.node(id).children {
            any |= self.keep_set(*c, keep);
        }
        if any || self.is_visited(id) {
            keep[id] = true;
            return true;
        }
        false
    }

    /// Replaces `id`'s content with `rep` (a node of `from`; `None` is an empty node),
    /// keeping what earlier rules changed.
    fn substitute_node(&mut self, id: NodeId, from: &Tree, rep: Option<NodeId>, keep: &[bool]) {
        if self.is_visited(id) {
            return;
        }
        let kept = |n: NodeId| keep.get(n).copied().unwrap_or(false);
        let mut names: Vec<&'static str> = Vec::new();
        if let Some(r) = rep {
            for c in &from.node(r).children {
                let n = from.node(*c).name;
                if !names.contains(&n) {
                    names.push(n);
                }
            }
        }
        for name in &names {
            let children = self.tree.children_named(id, name);
            let targets = rep
                .map(|r| from.children_named(r, name))
                .unwrap_or_default();
            let mut i = 0;
            for child in children {
                if self.is_visited(child) {
                    i += 1;
                } else if i < targets.len() {
                    self.substitute_node(child, from, Some(targets[i]), keep);
                    i += 1;
                } else if kept(child) {
                    self.substitute_node(child, from, None, keep);
                } else {
                    self.tree.remove_child(id, child);
                }
            }
            while i < targets.len() {
                self.tree.graft(from, targets[i], id);
                i += 1;
            }
        }
        for child in self.tree.node(id).children.clone() {
            if names.contains(&self.tree.node(child).name) || self.is_visited(child) {
                continue;
            }
            if kept(child) {
                self.substitute_node(child, from, None, keep);
            } else {
                self.tree.remove_child(id, child);
            }
        }
        self.tree.node_mut(id).value = rep.and_then(|r| from.node(r).value.clone());
    }

    /// Adds a `meta.security` coding per kind of change, unless one with that code is there.
    fn add_security_labels(&mut self, res: NodeId, ops: u8) {
        if ops == 0 {
            return;
        }
        let meta = match self.tree.children_named(res, "meta").first() {
            Some(m) => *m,
            None => {
                let at = self
                    .tree
                    .node(res)
                    .children
                    .iter()
                    .position(|c| self.tree.node(*c).name == "id")
                    .map_or(0, |i| i + 1);
                self.tree.insert_child(res, at, "meta", "Meta", None, false)
            }
        };
        for op in Operation::ALL {
            if ops & op.bit() == 0 {
                continue;
            }
            let (system, code, display) = op.label();
            let present = self.tree.children_named(meta, "security").iter().any(|s| {
                self.tree.children_named(*s, "code").iter().any(|c| {
                    self.tree
                        .node(*c)
                        .value
                        .as_ref()
                        .is_some_and(|v| v.text().eq_ignore_ascii_case(code))
                })
            });
            if present {
                continue;
            }
            let at = self.tree.node(meta).children.len();
            let coding = self
                .tree
                .insert_child(meta, at, "security", "Coding", None, true);
            if let Some(s) = system {
                self.tree.insert_child(
                    coding,
                    0,
                    "system",
                    "uri",
                    Some(Prim::Str(s.into())),
                    false,
                );
            }
            let n = self.tree.node(coding).children.len();
            self.tree.insert_child(
                coding,
                n,
                "code",
                "code",
                Some(Prim::Str(code.into())),
                false,
            );
            self.tree.insert_child(
                coding,
                n + 1,
                "display",
                "string",
                Some(Prim::Str(display.into())),
                false,
            );
        }
    }
}
