//! Values and collections produced by evaluation.

use crate::json::{JsonRef, Kind, json_equal};
use crate::model::Model;
pub use crate::quantity::{Quantity, is_calendar_unit};
pub use crate::temporal::{Temporal, TemporalKind};
use rust_decimal::Decimal;
use serde_json::Value as Json;
use std::borrow::Cow;
use std::cmp::Ordering;
use std::str::FromStr;

/// A node of the input JSON (our [`crate::json`] tree or a `serde_json::Value`)
/// together with its FHIR type.
///
/// For primitives, `json` is the value (`"1974-12-25"`) and `element` is the
/// `_birthDate` sibling that carries `id` and `extension`; either may be absent.
#[derive(Debug, Clone, Copy)]
pub struct FhirNode<'a> {
    pub json: Option<JsonRef<'a>>,
    pub element: Option<JsonRef<'a>>,
    /// Model type key (`HumanName`, `code`, `Patient.contact`), when known.
    pub ty: Option<&'static str>,
}

/// One item of a collection.
#[derive(Debug, Clone)]
pub enum Value<'a> {
    /// A node of the input resource (borrowed).
    Node(FhirNode<'a>),
    Boolean(bool),
    Integer(i64),
    Decimal(Decimal),
    String(Cow<'a, str>),
    /// Date, DateTime or Time (see [`Temporal::kind`]).
    Temporal(Temporal),
    Quantity(Quantity),
    /// The result of `type()`.
    TypeInfo {
        namespace: &'static str,
        name: Cow<'a, str>,
    },
}

/// The result of evaluating an expression: an ordered collection of items.
#[derive(Debug, Clone, Default)]
pub struct Collection<'a>(pub(crate) Vec<Value<'a>>);

impl<'a> Collection<'a> {
    pub fn empty() -> Self {
        Collection(Vec::new())
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn iter(&self) -> std::slice::Iter<'_, Value<'a>> {
        self.0.iter()
    }
    pub fn as_slice(&self) -> &[Value<'a>] {
        &self.0
    }
    pub fn into_vec(self) -> Vec<Value<'a>> {
        self.0
    }
    /// The single boolean this collection holds, if it is exactly `[true]` or `[false]`.
    pub fn as_boolean(&self) -> Option<bool> {
        match self.0.as_slice() {
            [v] => v.to_system().and_then(|v| {
                if let Value::Boolean(b) = v {
                    Some(b)
                } else {
                    None
                }
            }),
            _ => None,
        }
    }
    /// JSON rendering: nodes as their JSON, system values as JSON scalars,
    /// dates as FHIR strings, quantities as FHIR Quantity objects.
    pub fn to_json(&self) -> Json {
        Json::Array(self.0.iter().map(Value::to_json).collect())
    }
}

impl<'a> From<Vec<Value<'a>>> for Collection<'a> {
    fn from(v: Vec<Value<'a>>) -> Self {
        Collection(v)
    }
}

impl<'a> IntoIterator for Collection<'a> {
    type Item = Value<'a>;
    type IntoIter = std::vec::IntoIter<Value<'a>>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// `[+-]?digits(.digits)?`
pub(crate) fn is_decimal_text(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (s, None),
    };
    !int.is_empty()
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
}

/// Decimal from a JSON number, keeping the digits serde_json preserved.
pub(crate) fn json_number_decimal(n: &serde_json::Number) -> Option<Decimal> {
    if let Some(i) = n.as_i64() {
        return Some(Decimal::from(i));
    }
    if let Some(u) = n.as_u64() {
        return Some(Decimal::from(u));
    }
    Decimal::from_str(&n.to_string())
        .ok()
        .or_else(|| n.as_f64().and_then(|f| Decimal::try_from(f).ok()))
}

/// FHIRPath decimal equivalence: equal when rounded to the precision of the less precise.
pub(crate) fn decimal_equivalent(a: Decimal, b: Decimal) -> bool {
    let sa = a.scale();
    let sb = b.scale();
    let s = sa.min(sb);
    a.round_dp(s) == b.round_dp(s)
}

const STRING_TYPES: &[&str] = &[
    "string",
    "code",
    "id",
    "uri",
    "url",
    "canonical",
    "oid",
    "uuid",
    "markdown",
    "base64Binary",
    "xhtml",
];

impl<'a> Value<'a> {
    /// Convert a FHIR primitive node to its System value; system values return themselves.
    /// Quantity-typed nodes become System.Quantity. Other complex nodes give `None`.
    pub fn to_system(&self) -> Option<Value<'a>> {
        let Value::Node(n) = self else {
            return Some(self.clone());
        };
        let json = n.json?;
        let model = Model::r4();
        let ty = n.ty.unwrap_or("");
        match json.kind() {
            Kind::Bool(b) => Some(Value::Boolean(b)),
            Kind::Number(num) => {
                if ty == "decimal" || !num.is_integer() {
                    num.as_decimal().map(Value::Decimal)
                } else {
                    num.as_i64()
                        .map(Value::Integer)
                        .or_else(|| num.as_decimal().map(Value::Decimal))
                }
            }
            Kind::String(s) => match ty {
                "date" => Temporal::parse_date(s).map(Value::Temporal),
                "dateTime" | "instant" => Temporal::parse_datetime(s).map(Value::Temporal),
                "time" => Temporal::parse_time(s).map(Value::Temporal),
                "decimal" => Decimal::from_str(s).ok().map(Value::Decimal),
                "integer" | "positiveInt" | "unsignedInt" => s.parse().ok().map(Value::Integer),
                "boolean" => s.parse().ok().map(Value::Boolean),
                _ => Some(Value::String(Cow::Borrowed(s))),
            },
            Kind::Object(o) if !ty.is_empty() && model.is_a(ty, "Quantity") => {
                let value = o
                    .get("value")
                    .and_then(|v| v.as_number())
                    .and_then(|n| n.as_decimal())?;
                let ucum = o.get_str("system") == Some("http://unitsofmeasure.org");
                let unit = if ucum { o.get_str("code") } else { None }
                    .or_else(|| o.get_str("unit"))
                    .or_else(|| o.get_str("code"))
                    .unwrap_or("1");
                Some(Value::Quantity(Quantity::new(value, unit)))
            }
            _ => None,
        }
    }

    /// The FHIR or System type of this item, as (namespace, name).
    pub fn type_name(&self) -> (&'static str, Cow<'a, str>) {
        match self {
            Value::Node(n) => match n.ty {
                Some(t) => ("FHIR", Cow::Borrowed(Model::r4().type_name(t))),
                None => match n.json.map(JsonRef::kind) {
                    Some(Kind::Bool(_)) => ("System", "Boolean".into()),
                    Some(Kind::Number(x)) if x.is_integer() => ("System", "Integer".into()),
                    Some(Kind::Number(_)) => ("System", "Decimal".into()),
                    Some(Kind::String(_)) => ("System", "String".into()),
                    Some(Kind::Object(o)) => match o.get_str("resourceType") {
                        Some(rt) => ("FHIR", Cow::Borrowed(rt)),
                        None => ("FHIR", "Element".into()),
                    },
                    _ => ("System", "Any".into()),
                },
            },
            Value::Boolean(_) => ("System", "Boolean".into()),
            Value::Integer(_) => ("System", "Integer".into()),
            Value::Decimal(_) => ("System", "Decimal".into()),
            Value::String(_) => ("System", "String".into()),
            Value::Temporal(t) => (
                "System",
                match t.kind {
                    TemporalKind::Date => "Date".into(),
                    TemporalKind::DateTime => "DateTime".into(),
                    TemporalKind::Time => "Time".into(),
                },
            ),
            Value::Quantity(_) => ("System", "Quantity".into()),
            Value::TypeInfo { .. } => ("System", "TypeInfo".into()),
        }
    }

    /// Whether the node is a string-like FHIR primitive or a System.String.
    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            Value::Node(n) => match (n.json.and_then(JsonRef::as_str), n.ty) {
                (Some(s), Some(t)) if STRING_TYPES.contains(&t) => Some(s),
                (Some(s), None) => Some(s),
                _ => None,
            },
            _ => None,
        }
    }

    /// String form used by `toString()`, `&`, `join()`.
    pub fn to_fhirpath_string(&self) -> Option<String> {
        match self.to_system()? {
            Value::Boolean(b) => Some(b.to_string()),
            Value::Integer(i) => Some(i.to_string()),
            Value::Decimal(d) => Some(d.to_string()),
            Value::String(s) => Some(s.into_owned()),
            Value::Temporal(t) => Some(t.to_string()),
            Value::Quantity(q) => Some(q.to_string()),
            _ => None,
        }
    }

    pub fn to_json(&self) -> Json {
        match self {
            Value::Node(n) => match n.json {
                Some(j) => j.to_serde(),
                None => Json::Null,
            },
            Value::Boolean(b) => Json::Bool(*b),
            Value::Integer(i) => Json::from(*i),
            Value::Decimal(d) => decimal_json(*d),
            Value::String(s) => Json::String(s.to_string()),
            Value::Temporal(t) => Json::String(t.to_string()),
            Value::Quantity(q) => {
                let mut m = serde_json::Map::new();
                m.insert("value".into(), decimal_json(q.value));
                if is_calendar_unit(&q.unit) {
                    m.insert("unit".into(), Json::String(q.unit.clone()));
                } else {
                    m.insert("unit".into(), Json::String(q.unit.clone()));
                    m.insert(
                        "system".into(),
                        Json::String("http://unitsofmeasure.org".into()),
                    );
                    m.insert("code".into(), Json::String(q.unit.clone()));
                }
                Json::Object(m)
            }
            Value::TypeInfo { namespace, name } => {
                serde_json::json!({ "namespace": namespace, "name": name.as_ref() })
            }
        }
    }
}

fn decimal_json(d: Decimal) -> Json {
    serde_json::from_str::<serde_json::Number>(&d.to_string())
        .map(Json::Number)
        .unwrap_or_else(|_| Json::String(d.to_string()))
}

/// FHIRPath `=` on two items: `None` means empty (uncertain).
pub(crate) fn equals(a: &Value<'_>, b: &Value<'_>) -> Option<bool> {
    if let (Value::Node(x), Value::Node(y)) = (a, b)
        && let (Some(xj), Some(yj)) = (x.json, y.json)
        && xj.is_object()
        && yj.is_object()
    {
        if let (Some(qa @ Value::Quantity(_)), Some(qb @ Value::Quantity(_))) =
            (a.to_system(), b.to_system())
        {
            return equals(&qa, &qb);
        }
        return Some(json_equal(xj, yj));
    }
    let (Some(a), Some(b)) = (a.to_system(), b.to_system()) else {
        return Some(false);
    };
    match (&a, &b) {
        (Value::Boolean(x), Value::Boolean(y)) => Some(x == y),
        (Value::Integer(x), Value::Integer(y)) => Some(x == y),
        (Value::Integer(x), Value::Decimal(y)) => Some(Decimal::from(*x) == *y),
        (Value::Decimal(x), Value::Integer(y)) => Some(*x == Decimal::from(*y)),
        (Value::Decimal(x), Value::Decimal(y)) => Some(x == y),
        (Value::String(x), Value::String(y)) => Some(x == y),
        (Value::Temporal(x), Value::Temporal(y)) => {
            if !x.comparable_kind(y) {
                return Some(false);
            }
            x.compare(y).map(|o| o == Ordering::Equal)
        }
        (Value::Quantity(x), Value::Quantity(y)) => x.equals(y),
        (Value::Quantity(q), Value::Integer(_) | Value::Decimal(_))
        | (Value::Integer(_) | Value::Decimal(_), Value::Quantity(q))
            if q.unit == "1" =>
        {
            let n = if let Value::Quantity(_) = a { &b } else { &a };
            let v = match n {
                Value::Integer(i) => Decimal::from(*i),
                Value::Decimal(d) => *d,
                _ => return Some(false),
            };
            Some(q.value == v)
        }
        (
            Value::TypeInfo {
                namespace: n1,
                name: a1,
            },
            Value::TypeInfo {
                namespace: n2,
                name: a2,
            },
        ) => Some(n1 == n2 && a1 == a2),
        _ => Some(false),
    }
}

fn normalize_ws(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// FHIRPath `~` on two items.
pub(crate) fn equivalent(a: &Value<'_>, b: &Value<'_>) -> bool {
    if let (Value::Node(x), Value::Node(y)) = (a, b)
        && let (Some(xj), Some(yj)) = (x.json, y.json)
        && xj.is_object()
        && yj.is_object()
    {
        if let (Some(qa @ Value::Quantity(_)), Some(qb @ Value::Quantity(_))) =
            (a.to_system(), b.to_system())
        {
            return equivalent(&qa, &qb);
        }
        return json_equal(xj, yj);
    }
    let (Some(a), Some(b)) = (a.to_system(), b.to_system()) else {
        return false;
    };
    match (&a, &b) {
        (Value::Integer(_) | Value::Decimal(_), Value::Integer(_) | Value::Decimal(_)) => {
            let x = numeric(&a).unwrap_or_default();
            let y = numeric(&b).unwrap_or_default();
            decimal_equivalent(x, y)
        }
        (Value::String(x), Value::String(y)) => normalize_ws(x) == normalize_ws(y),
        (Value::Temporal(x), Value::Temporal(y)) => x.equivalent(y),
        (Value::Quantity(x), Value::Quantity(y)) => x.equivalent(y),
        _ => equals(&a, &b) == Some(true),
    }
}

pub(crate) fn numeric(v: &Value<'_>) -> Option<Decimal> {
    match v {
        Value::Integer(i) => Some(Decimal::from(*i)),
        Value::Decimal(d) => Some(*d),
        _ => None,
    }
}
