//! The object-set query model of the serving API.
//!
//! # What this crate owns
//! * [`ObjectSet`]: which objects a request reads, in the shape of Foundry's
//!   ontology API v2 (`base`, `static`, `reference` to a saved set, `filter`,
//!   `union`, `intersect`, `subtract`, `searchAround` over a link).
//! * [`Where`]: the filter language (`eq`, `gt`, `gte`, `lt`, `lte`,
//!   `isNull`, `in`, `contains`, `startsWith`, `containsAnyTerm`,
//!   `containsAllTerms`, `and`, `or`, `not`).
//! * [`Decoder`]: JSON to those types, checked against the ontology: every
//!   object type, saved set, link and property must exist, every value must
//!   have the property's type, sets combined must be of one type. Errors
//!   name the JSON path (`objectSet.where.value[1].field`) and the reason;
//!   nesting and size are bounded, so no input panics or runs away.
//! * [`ObjectSet::to_json`]: the normalised form (what a page token binds).
//!
//! # What it may call
//! `atlas-ontology` for the metadata. Nothing here reads data: executing a
//! set against the view tables (after the policy scope) is the server's job.

use atlas_ontology::{ObjectType, Ontology};
use serde_json::{Map, Value as Json, json};

/// Objects of one type.
#[derive(Debug, Clone, PartialEq)]
pub enum ObjectSet {
    /// Every object of the type.
    Base {
        object_type: String,
    },
    /// The objects with these primary keys.
    Static {
        object_type: String,
        primary_keys: Vec<String>,
    },
    /// A saved object set (`PatientAll`), by name.
    Reference {
        name: String,
        object_type: String,
    },
    Filter {
        set: Box<ObjectSet>,
        filter: Where,
    },
    Union(Vec<ObjectSet>),
    Intersect(Vec<ObjectSet>),
    Subtract(Vec<ObjectSet>),
    /// The objects linked to the set's objects through `link`.
    SearchAround {
        set: Box<ObjectSet>,
        link: String,
        object_type: String,
    },
}

/// A filter over one object type's properties.
#[derive(Debug, Clone, PartialEq)]
pub enum Where {
    Compare {
        op: CompareOp,
        field: String,
        value: Value,
    },
    IsNull {
        field: String,
        is_null: bool,
    },
    In {
        field: String,
        values: Vec<Value>,
    },
    /// The property's text contains the value.
    Contains {
        field: String,
        value: String,
    },
    StartsWith {
        field: String,
        value: String,
    },
    /// Whitespace-separated terms of the property's text, case-insensitive.
    ContainsTerms {
        all: bool,
        field: String,
        terms: Vec<String>,
    },
    And(Vec<Where>),
    Or(Vec<Where>),
    Not(Box<Where>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    Eq,
    Gt,
    Gte,
    Lt,
    Lte,
}

impl CompareOp {
    pub fn as_str(self) -> &'static str {
        match self {
            CompareOp::Eq => "eq",
            CompareOp::Gt => "gt",
            CompareOp::Gte => "gte",
            CompareOp::Lt => "lt",
            CompareOp::Lte => "lte",
        }
    }
}

/// A typed value from a filter, already checked against its property.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Bool(bool),
    Int(i64),
    /// Decimal text exactly as given (`12.30`), never through f64.
    Decimal(String),
    /// `YYYY`, `YYYY-MM` or `YYYY-MM-DD`.
    Date(String),
    /// An ISO 8601 date-time (a date alone is accepted as its start).
    Timestamp(String),
}

impl Value {
    pub fn to_json(&self) -> Json {
        match self {
            Value::Str(s) | Value::Date(s) | Value::Timestamp(s) | Value::Decimal(s) => {
                Json::String(s.clone())
            }
            Value::Bool(b) => Json::Bool(*b),
            Value::Int(i) => json!(i),
        }
    }
}

/// Why a request's object set or filter was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct DecodeError {
    /// Where in the request body (`objectSet.objectSets[1].link`).
    pub path: String,
    pub message: String,
}

/// The kind of value a property holds, from its FHIR type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PropertyKind {
    Text,
    Bool,
    Int,
    Decimal,
    Date,
    Timestamp,
}

impl PropertyKind {
    pub fn of_fhir_type(t: &str) -> PropertyKind {
        match t {
            "boolean" => PropertyKind::Bool,
            "integer" | "positiveInt" | "unsignedInt" | "integer64" => PropertyKind::Int,
            "decimal" => PropertyKind::Decimal,
            "date" => PropertyKind::Date,
            "dateTime" | "instant" => PropertyKind::Timestamp,
            _ => PropertyKind::Text,
        }
    }
}

/// Limits that keep a hostile request small.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Deepest nesting of sets and filters.
    pub max_depth: usize,
    /// Most set and filter nodes in one request.
    pub max_nodes: usize,
    /// Most values in one `in` or `static` list, or terms in one query.
    pub max_list: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_depth: 32,
            max_nodes: 1_000,
            max_list: 10_000,
        }
    }
}

/// Decodes object sets and filters against an ontology.
pub struct Decoder<'o> {
    ontology: &'o Ontology,
    limits: Limits,
    nodes: std::cell::Cell<usize>,
}

type R<T> = Result<T, DecodeError>;

fn err<T>(path: &str, message: impl Into<String>) -> R<T> {
    Err(DecodeError {
        path: path.to_owned(),
        message: message.into(),
    })
}

use atlas_views::describe_json_kind as kind_name;

impl<'o> Decoder<'o> {
    pub fn new(ontology: &'o Ontology) -> Decoder<'o> {
        Decoder::with_limits(ontology, Limits::default())
    }

    pub fn with_limits(ontology: &'o Ontology, limits: Limits) -> Decoder<'o> {
        Decoder {
            ontology,
            limits,
            nodes: std::cell::Cell::new(0),
        }
    }

    /// Decodes an object set; `path` names it in errors (`objectSet`).
    pub fn object_set(&self, v: &Json, path: &str) -> R<ObjectSet> {
        self.nodes.set(0);
        self.set(v, path, 0)
    }

    /// Decodes a filter over `object_type`; `path` names it in errors.
    pub fn where_clause(&self, v: &Json, object_type: &str, path: &str) -> R<Where> {
        self.nodes.set(0);
        let t = self.object_type(object_type, path)?;
        self.filter(v, t, path, 0)
    }

    fn object_type(&self, name: &str, path: &str) -> R<&'o ObjectType> {
        match self.ontology.object_type(name) {
            Some(t) => Ok(t),
            None => err(
                path,
                format!(
                    "unknown object type '{name}'; known: {}",
                    self.ontology
                        .object_types
                        .iter()
                        .map(|t| t.api_name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
        }
    }

    fn enter(&self, path: &str, depth: usize) -> R<()> {
        if depth >= self.limits.max_depth {
            return err(
                path,
                format!("nested deeper than {} levels", self.limits.max_depth),
            );
        }
        self.nodes.set(self.nodes.get() + 1);
        if self.nodes.get() > self.limits.max_nodes {
            return err(
                path,
                format!(
                    "more than {} object-set and filter nodes",
                    self.limits.max_nodes
                ),
            );
        }
        Ok(())
    }

    fn set(&self, v: &Json, path: &str, depth: usize) -> R<ObjectSet> {
        self.enter(path, depth)?;
        let obj = object(v, path)?;
        let ty = type_tag(obj, path)?;
        let at = |k: &str| format!("{path}.{k}");
        match ty {
            "base" => {
                only_keys(obj, path, &["type", "objectType"])?;
                let name = string_field(obj, path, "objectType")?;
                let t = self.object_type(name, &at("objectType"))?;
                Ok(ObjectSet::Base {
                    object_type: t.api_name.clone(),
                })
            }
            "static" => {
                only_keys(obj, path, &["type", "objectType", "objects"])?;
                let name = string_field(obj, path, "objectType")?;
                let t = self.object_type(name, &at("objectType"))?;
                let list = array_field(obj, path, "objects")?;
                if list.len() > self.limits.max_list {
                    return err(
                        &at("objects"),
                        format!("more than {} objects", self.limits.max_list),
                    );
                }
                let mut keys = Vec::with_capacity(list.len());
                for (i, k) in list.iter().enumerate() {
                    match k {
                        Json::String(s) => keys.push(s.clone()),
                        other => {
                            return err(
                                &format!("{path}.objects[{i}]"),
                                format!("a primary key must be a string, not {}", kind_name(other)),
                            );
                        }
                    }
                }
                Ok(ObjectSet::Static {
                    object_type: t.api_name.clone(),
                    primary_keys: keys,
                })
            }
            "reference" => {
                only_keys(obj, path, &["type", "reference"])?;
                let name = string_field(obj, path, "reference")?;
                match self.ontology.object_set(name) {
                    Some(s) => Ok(ObjectSet::Reference {
                        name: s.api_name.clone(),
                        object_type: s.object_type.clone(),
                    }),
                    None => err(
                        &at("reference"),
                        format!(
                            "unknown saved object set '{name}'; known: {}",
                            self.ontology
                                .object_sets
                                .iter()
                                .map(|s| s.api_name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ),
                }
            }
            "filter" => {
                only_keys(obj, path, &["type", "objectSet", "where"])?;
                let inner = self.set(
                    required(obj, path, "objectSet")?,
                    &at("objectSet"),
                    depth + 1,
                )?;
                let t = self.object_type(inner.object_type(), path)?;
                let filter =
                    self.filter(required(obj, path, "where")?, t, &at("where"), depth + 1)?;
                Ok(ObjectSet::Filter {
                    set: Box::new(inner),
                    filter,
                })
            }
            "union" | "intersect" | "subtract" => {
                only_keys(obj, path, &["type", "objectSets"])?;
                let list = array_field(obj, path, "objectSets")?;
                if list.is_empty() {
                    return err(&at("objectSets"), "needs at least one object set");
                }
                let mut sets = Vec::with_capacity(list.len());
                for (i, s) in list.iter().enumerate() {
                    let p = format!("{path}.objectSets[{i}]");
                    let s = self.set(s, &p, depth + 1)?;
                    if let Some(first) = sets.first().map(ObjectSet::object_type)
                        && first != s.object_type()
                    {
                        return err(
                            &p,
                            format!(
                                "is of object type '{}', but objectSets[0] is '{first}': {ty} needs one type",
                                s.object_type()
                            ),
                        );
                    }
                    sets.push(s);
                }
                Ok(match ty {
                    "union" => ObjectSet::Union(sets),
                    "intersect" => ObjectSet::Intersect(sets),
                    _ => ObjectSet::Subtract(sets),
                })
            }
            "searchAround" => {
                only_keys(obj, path, &["type", "objectSet", "link"])?;
                let inner = self.set(
                    required(obj, path, "objectSet")?,
                    &at("objectSet"),
                    depth + 1,
                )?;
                let link = string_field(obj, path, "link")?;
                let from = inner.object_type().to_owned();
                let target = self
                    .ontology
                    .links_from(&from)
                    .find(|l| l.api_name == link)
                    .map(|l| l.to.clone())
                    .or_else(|| {
                        self.ontology
                            .links_to(&from)
                            .find(|l| l.reverse_api_name == link)
                            .map(|l| l.from.clone())
                    });
                match target {
                    Some(object_type) => Ok(ObjectSet::SearchAround {
                        set: Box::new(inner),
                        link: link.to_owned(),
                        object_type,
                    }),
                    None => {
                        let mut known: Vec<&str> = self
                            .ontology
                            .links_from(&from)
                            .map(|l| l.api_name.as_str())
                            .collect();
                        known.extend(
                            self.ontology
                                .links_to(&from)
                                .map(|l| l.reverse_api_name.as_str()),
                        );
                        err(
                            &at("link"),
                            format!(
                                "object type '{from}' has no link '{link}'; it has: {}",
                                known.join(", ")
                            ),
                        )
                    }
                }
            }
            other => err(
                &at("type"),
                format!(
                    "unknown object set type '{other}'; expected base, static, reference, filter, union, intersect, subtract or searchAround"
                ),
            ),
        }
    }

    fn property<'t>(
        &self,
        t: &'t ObjectType,
        obj: &Map<String, Json>,
        path: &str,
    ) -> R<(&'t str, PropertyKind)> {
        let name = string_field(obj, path, "field")?;
        match t.properties.iter().find(|p| p.api_name == name) {
            Some(p) => Ok((p.api_name.as_str(), PropertyKind::of_fhir_type(&p.r#type))),
            None => err(
                &format!("{path}.field"),
                format!(
                    "object type '{}' has no property '{name}'; it has: {}",
                    t.api_name,
                    t.properties
                        .iter()
                        .map(|p| p.api_name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
        }
    }

    /// The `field` of a `{type, field, value}` filter that only applies to
    /// text properties.
    fn text_property<'t>(
        &self,
        t: &'t ObjectType,
        obj: &Map<String, Json>,
        path: &str,
        ty: &str,
    ) -> R<&'t str> {
        only_keys(obj, path, &["type", "field", "value"])?;
        let (field, kind) = self.property(t, obj, path)?;
        if kind != PropertyKind::Text {
            return err(
                &format!("{path}.type"),
                format!("'{ty}' applies to text properties; '{field}' is not text"),
            );
        }
        Ok(field)
    }

    fn filter(&self, v: &Json, t: &ObjectType, path: &str, depth: usize) -> R<Where> {
        self.enter(path, depth)?;
        let obj = object(v, path)?;
        let ty = type_tag(obj, path)?;
        let at = |k: &str| format!("{path}.{k}");
        let op = match ty {
            "eq" => Some(CompareOp::Eq),
            "gt" => Some(CompareOp::Gt),
            "gte" => Some(CompareOp::Gte),
            "lt" => Some(CompareOp::Lt),
            "lte" => Some(CompareOp::Lte),
            _ => None,
        };
        if let Some(op) = op {
            only_keys(obj, path, &["type", "field", "value"])?;
            let (field, kind) = self.property(t, obj, path)?;
            if op != CompareOp::Eq && kind == PropertyKind::Bool {
                return err(
                    &at("type"),
                    format!("'{ty}' does not apply to the boolean property '{field}'"),
                );
            }
            let value = typed_value(required(obj, path, "value")?, kind, &at("value"))?;
            return Ok(Where::Compare {
                op,
                field: field.to_owned(),
                value,
            });
        }
        match ty {
            "isNull" => {
                only_keys(obj, path, &["type", "field", "value"])?;
                let (field, _) = self.property(t, obj, path)?;
                match required(obj, path, "value")? {
                    Json::Bool(b) => Ok(Where::IsNull {
                        field: field.to_owned(),
                        is_null: *b,
                    }),
                    other => err(
                        &at("value"),
                        format!("must be true or false, not {}", kind_name(other)),
                    ),
                }
            }
            "in" => {
                only_keys(obj, path, &["type", "field", "value"])?;
                let (field, kind) = self.property(t, obj, path)?;
                let list = array_field(obj, path, "value")?;
                if list.len() > self.limits.max_list {
                    return err(
                        &at("value"),
                        format!("more than {} values", self.limits.max_list),
                    );
                }
                let values = list
                    .iter()
                    .enumerate()
                    .map(|(i, x)| typed_value(x, kind, &format!("{path}.value[{i}]")))
                    .collect::<R<Vec<_>>>()?;
                Ok(Where::In {
                    field: field.to_owned(),
                    values,
                })
            }
            "contains" | "startsWith" => {
                let field = self.text_property(t, obj, path, ty)?;
                let value = string_field(obj, path, "value")?.to_owned();
                Ok(if ty == "contains" {
                    Where::Contains {
                        field: field.to_owned(),
                        value,
                    }
                } else {
                    Where::StartsWith {
                        field: field.to_owned(),
                        value,
                    }
                })
            }
            "containsAnyTerm" | "containsAllTerms" => {
                let field = self.text_property(t, obj, path, ty)?;
                let terms: Vec<String> = string_field(obj, path, "value")?
                    .split_whitespace()
                    .map(str::to_lowercase)
                    .collect();
                if terms.is_empty() {
                    return err(&at("value"), "needs at least one term");
                }
                if terms.len() > self.limits.max_list {
                    return err(
                        &at("value"),
                        format!("more than {} terms", self.limits.max_list),
                    );
                }
                Ok(Where::ContainsTerms {
                    all: ty == "containsAllTerms",
                    field: field.to_owned(),
                    terms,
                })
            }
            "and" | "or" => {
                only_keys(obj, path, &["type", "value"])?;
                let list = array_field(obj, path, "value")?;
                let parts = list
                    .iter()
                    .enumerate()
                    .map(|(i, x)| self.filter(x, t, &format!("{path}.value[{i}]"), depth + 1))
                    .collect::<R<Vec<_>>>()?;
                Ok(if ty == "and" {
                    Where::And(parts)
                } else {
                    Where::Or(parts)
                })
            }
            "not" => {
                only_keys(obj, path, &["type", "value"])?;
                let inner =
                    self.filter(required(obj, path, "value")?, t, &at("value"), depth + 1)?;
                Ok(Where::Not(Box::new(inner)))
            }
            other => err(
                &at("type"),
                format!(
                    "unknown filter type '{other}'; expected eq, gt, gte, lt, lte, isNull, in, contains, startsWith, containsAnyTerm, containsAllTerms, and, or or not"
                ),
            ),
        }
    }
}

fn object<'a>(v: &'a Json, path: &str) -> R<&'a Map<String, Json>> {
    match v {
        Json::Object(m) => Ok(m),
        other => err(path, format!("must be an object, not {}", kind_name(other))),
    }
}

fn type_tag<'a>(obj: &'a Map<String, Json>, path: &str) -> R<&'a str> {
    string_field(obj, path, "type")
}

fn required<'a>(obj: &'a Map<String, Json>, path: &str, key: &str) -> R<&'a Json> {
    match obj.get(key) {
        Some(v) => Ok(v),
        None => err(&format!("{path}.{key}"), "is required"),
    }
}

fn string_field<'a>(obj: &'a Map<String, Json>, path: &str, key: &str) -> R<&'a str> {
    match required(obj, path, key)? {
        Json::String(s) => Ok(s),
        other => err(
            &format!("{path}.{key}"),
            format!("must be a string, not {}", kind_name(other)),
        ),
    }
}

fn array_field<'a>(obj: &'a Map<String, Json>, path: &str, key: &str) -> R<&'a Vec<Json>> {
    match required(obj, path, key)? {
        Json::Array(a) => Ok(a),
        other => err(
            &format!("{path}.{key}"),
            format!("must be an array, not {}", kind_name(other)),
        ),
    }
}

fn only_keys(obj: &Map<String, Json>, path: &str, allowed: &[&str]) -> R<()> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => err(
            &format!("{path}.{k}"),
            format!("unknown field; allowed here: {}", allowed.join(", ")),
        ),
        None => Ok(()),
    }
}

/// A JSON value as the property's kind, or an error saying what was expected.
fn typed_value(v: &Json, kind: PropertyKind, path: &str) -> R<Value> {
    let bad = |want: &str| err(path, format!("must be {want}, not {}", kind_name(v)));
    match (kind, v) {
        (PropertyKind::Text, Json::String(s)) => Ok(Value::Str(s.clone())),
        (PropertyKind::Text, _) => bad("a string"),
        (PropertyKind::Bool, Json::Bool(b)) => Ok(Value::Bool(*b)),
        (PropertyKind::Bool, _) => bad("true or false"),
        (PropertyKind::Int, Json::Number(n)) => match n.as_i64() {
            Some(i) => Ok(Value::Int(i)),
            None => err(path, format!("must be a whole number, not {n}")),
        },
        (PropertyKind::Int, _) => bad("a whole number"),
        (PropertyKind::Decimal, Json::Number(n)) if is_decimal(&n.to_string()) => {
            Ok(Value::Decimal(n.to_string()))
        }
        (PropertyKind::Decimal, Json::Number(n)) => err(
            path,
            format!("{n} is not a plain decimal (give it as a string, like \"0.00012\")"),
        ),
        (PropertyKind::Decimal, Json::String(s)) if is_decimal(s) => Ok(Value::Decimal(s.clone())),
        (PropertyKind::Decimal, Json::String(s)) => {
            err(path, format!("'{s}' is not a decimal number"))
        }
        (PropertyKind::Decimal, _) => bad("a number"),
        (PropertyKind::Date, Json::String(s)) if is_date(s) => Ok(Value::Date(s.clone())),
        (PropertyKind::Timestamp, Json::String(s)) if is_date(s) || is_date_time(s) => {
            Ok(Value::Timestamp(s.clone()))
        }
        (PropertyKind::Date | PropertyKind::Timestamp, Json::String(s)) => err(
            path,
            format!(
                "'{s}' is not an ISO 8601 date or date-time (like 2024-05-01 or 2024-05-01T10:00:00Z)"
            ),
        ),
        (PropertyKind::Date | PropertyKind::Timestamp, _) => bad("a date string"),
    }
}

fn digits(s: &str, n: usize) -> bool {
    s.len() == n && s.bytes().all(|b| b.is_ascii_digit())
}

fn is_decimal(s: &str) -> bool {
    let s = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (s, None),
    };
    !int.is_empty()
        && int.len() <= 38
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac
            .is_none_or(|f| !f.is_empty() && f.len() <= 38 && f.bytes().all(|b| b.is_ascii_digit()))
}

/// `YYYY`, `YYYY-MM` or `YYYY-MM-DD` with a real month and day.
fn is_date(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    match parts.as_slice() {
        [y] => digits(y, 4),
        [y, m] => digits(y, 4) && digits(m, 2) && (1..=12).contains(&m.parse::<u32>().unwrap_or(0)),
        [y, m, d] => {
            digits(y, 4)
                && digits(m, 2)
                && digits(d, 2)
                && (1..=12).contains(&m.parse::<u32>().unwrap_or(0))
                && (1..=31).contains(&d.parse::<u32>().unwrap_or(0))
        }
        _ => false,
    }
}

/// `YYYY-MM-DDThh:mm[:ss[.f+]][Z|±hh:mm]`.
fn is_date_time(s: &str) -> bool {
    let Some((date, time)) = s.split_once('T') else {
        return false;
    };
    if date.len() != 10 || !is_date(date) {
        return false;
    }
    let (clock, zone) = match time.find(['Z', '+', '-']) {
        Some(i) => time.split_at(i),
        None => (time, ""),
    };
    let zone_ok = zone.is_empty()
        || zone == "Z"
        || (zone.len() == 6
            && digits(&zone[1..3], 2)
            && &zone[3..4] == ":"
            && digits(&zone[4..6], 2));
    let mut parts = clock.split(':');
    let (Some(h), Some(m)) = (parts.next(), parts.next()) else {
        return false;
    };
    let sec_ok = match parts.next() {
        None => true,
        Some(sec) => {
            let (whole, frac) = sec.split_once('.').unwrap_or((sec, "0"));
            digits(whole, 2)
                && whole.parse::<u32>().is_ok_and(|v| v < 61)
                && !frac.is_empty()
                && frac.bytes().all(|b| b.is_ascii_digit())
        }
    };
    parts.next().is_none()
        && digits(h, 2)
        && h.parse::<u32>().is_ok_and(|v| v < 24)
        && digits(m, 2)
        && m.parse::<u32>().is_ok_and(|v| v < 60)
        && sec_ok
        && zone_ok
}

impl ObjectSet {
    /// The object type of the set's objects.
    pub fn object_type(&self) -> &str {
        match self {
            ObjectSet::Base { object_type }
            | ObjectSet::Static { object_type, .. }
            | ObjectSet::Reference { object_type, .. }
            | ObjectSet::SearchAround { object_type, .. } => object_type,
            ObjectSet::Filter { set, .. } => set.object_type(),
            ObjectSet::Union(s) | ObjectSet::Intersect(s) | ObjectSet::Subtract(s) => {
                s.first().map_or("", ObjectSet::object_type)
            }
        }
    }

    /// The normalised JSON form: decoding it gives the same set back.
    pub fn to_json(&self) -> Json {
        match self {
            ObjectSet::Base { object_type } => json!({"type": "base", "objectType": object_type}),
            ObjectSet::Static {
                object_type,
                primary_keys,
            } => json!({"type": "static", "objectType": object_type, "objects": primary_keys}),
            ObjectSet::Reference { name, .. } => json!({"type": "reference", "reference": name}),
            ObjectSet::Filter { set, filter } => {
                json!({"type": "filter", "objectSet": set.to_json(), "where": filter.to_json()})
            }
            ObjectSet::Union(s) => {
                json!({"type": "union", "objectSets": s.iter().map(ObjectSet::to_json).collect::<Vec<_>>()})
            }
            ObjectSet::Intersect(s) => {
                json!({"type": "intersect", "objectSets": s.iter().map(ObjectSet::to_json).collect::<Vec<_>>()})
            }
            ObjectSet::Subtract(s) => {
                json!({"type": "subtract", "objectSets": s.iter().map(ObjectSet::to_json).collect::<Vec<_>>()})
            }
            ObjectSet::SearchAround { set, link, .. } => {
                json!({"type": "searchAround", "objectSet": set.to_json(), "link": link})
            }
        }
    }
}

impl Where {
    /// The normalised JSON form: decoding it gives the same filter back.
    pub fn to_json(&self) -> Json {
        match self {
            Where::Compare { op, field, value } => {
                json!({"type": op.as_str(), "field": field, "value": value.to_json()})
            }
            Where::IsNull { field, is_null } => {
                json!({"type": "isNull", "field": field, "value": is_null})
            }
            Where::In { field, values } => {
                json!({"type": "in", "field": field, "value": values.iter().map(Value::to_json).collect::<Vec<_>>()})
            }
            Where::Contains { field, value } => {
                json!({"type": "contains", "field": field, "value": value})
            }
            Where::StartsWith { field, value } => {
                json!({"type": "startsWith", "field": field, "value": value})
            }
            Where::ContainsTerms { all, field, terms } => json!({
                "type": if *all { "containsAllTerms" } else { "containsAnyTerm" },
                "field": field,
                "value": terms.join(" "),
            }),
            Where::And(w) => {
                json!({"type": "and", "value": w.iter().map(Where::to_json).collect::<Vec<_>>()})
            }
            Where::Or(w) => {
                json!({"type": "or", "value": w.iter().map(Where::to_json).collect::<Vec<_>>()})
            }
            Where::Not(w) => json!({"type": "not", "value": w.to_json()}),
        }
    }
}

#[cfg(test)]
mod tests;
