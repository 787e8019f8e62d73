//! The evaluator: walks the compiled tree over borrowed JSON.

use crate::ast::{BinOp, Literal, Node, NodeKind, TypeSpec};
use crate::error::EvalError;
use crate::json::{JsonRef, JsonValue};
use crate::model::{Model, TypeKind};
use crate::parser::node_as_type_spec;
use crate::value::{FhirNode, Quantity, Temporal, Value, equals, equivalent, numeric};
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use serde_json::Value as Json;
use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::HashMap;

pub(crate) type Items<'a> = Vec<Value<'a>>;
pub(crate) type R<T> = Result<T, EvalError>;

/// Resolves references for `resolve()` beyond the built-in lookup in
/// contained resources and the enclosing Bundle.
pub trait ResourceResolver {
    /// The resource a reference (`Patient/123`, an absolute URL, ...) points to.
    fn resolve(&self, reference: &str) -> Option<&Json>;
}

/// Terminology hook for `memberOf()`.
pub trait TerminologyService {
    /// Whether the code (a string, Coding or CodeableConcept as JSON) is in the value set;
    /// `Ok(None)` when unknown.
    fn member_of(&self, code: &Json, value_set: &str) -> Result<Option<bool>, String>;
}

/// Receives `trace()` output.
pub trait TraceSink {
    fn trace(&self, name: &str, items: &[Value<'_>]);
}

/// Environment for one or many evaluations: user variables, hooks, a fixed clock.
#[derive(Default)]
pub struct EvalContext<'a> {
    pub(crate) vars: HashMap<String, Items<'a>>,
    pub(crate) resolver: Option<&'a dyn ResourceResolver>,
    pub(crate) terminology: Option<&'a dyn TerminologyService>,
    pub(crate) trace: Option<&'a dyn TraceSink>,
    pub(crate) now: Option<Temporal>,
}

impl<'a> EvalContext<'a> {
    pub fn new() -> Self {
        Self::default()
    }
    /// Define `%name` as a collection of values.
    pub fn with_variable(
        mut self,
        name: impl Into<String>,
        value: impl Into<crate::Collection<'a>>,
    ) -> Self {
        self.vars.insert(name.into(), value.into().into_vec());
        self
    }
    /// Set (or replace) `%name` in place, e.g. a per-row variable between evaluations.
    pub fn set_variable(&mut self, name: &str, value: impl Into<crate::Collection<'a>>) {
        let value = value.into().into_vec();
        match self.vars.get_mut(name) {
            Some(slot) => *slot = value,
            None => {
                self.vars.insert(name.to_string(), value);
            }
        }
    }
    /// Define `%name` as a JSON value (a FHIR resource or element; arrays become collections).
    pub fn with_json_variable(mut self, name: impl Into<String>, json: &'a Json) -> Self {
        let mut out = Vec::new();
        push_json(Some(JsonRef::Serde(json)), None, None, &mut out);
        self.vars.insert(name.into(), out);
        self
    }
    /// [`EvalContext::with_json_variable`] for a [`crate::json`] tree.
    pub fn with_tree_variable(mut self, name: impl Into<String>, json: &'a JsonValue<'a>) -> Self {
        let mut out = Vec::new();
        push_json(Some(JsonRef::Tree(json)), None, None, &mut out);
        self.vars.insert(name.into(), out);
        self
    }
    pub fn with_resolver(mut self, r: &'a dyn ResourceResolver) -> Self {
        self.resolver = Some(r);
        self
    }
    pub fn with_terminology(mut self, t: &'a dyn TerminologyService) -> Self {
        self.terminology = Some(t);
        self
    }
    pub fn with_trace(mut self, t: &'a dyn TraceSink) -> Self {
        self.trace = Some(t);
        self
    }
    /// Fix the value of `now()` (and so `today()`/`timeOfDay()`), for reproducible results.
    pub fn with_now(mut self, now: Temporal) -> Self {
        self.now = Some(now);
        self
    }
}

/// Per-iteration bindings: `$this`, `$index`, `$total`.
#[derive(Clone, Copy)]
pub(crate) struct Frame<'f, 'a> {
    this: Option<&'f Value<'a>>,
    index: Option<usize>,
    total: Option<&'f [Value<'a>]>,
}

pub(crate) struct Evaluator<'e, 'a> {
    pub ctx: &'e EvalContext<'a>,
    pub root: Items<'a>,
    pub context: Items<'a>,
    /// Variables from `defineVariable()`, innermost last. Scopes end where an
    /// invocation chain ends (operands, arguments), see [`Evaluator::scoped`].
    pub scope: std::cell::RefCell<Vec<(String, Items<'a>)>>,
}

fn ptr_key(v: &Value<'_>) -> Option<usize> {
    match v {
        Value::Node(FhirNode { json: Some(j), .. }) => Some(j.addr()),
        Value::Node(FhirNode {
            element: Some(e), ..
        }) => Some(e.addr()),
        _ => None,
    }
}

/// Push the node(s) of a JSON property (array or single), pairing `_name` elements.
pub(crate) fn push_json<'a>(
    json: Option<JsonRef<'a>>,
    element: Option<JsonRef<'a>>,
    ty: Option<&'static str>,
    out: &mut Items<'a>,
) {
    let node = |j: Option<JsonRef<'a>>, e: Option<JsonRef<'a>>| {
        let j = j.filter(|j| !j.is_null());
        let e = e.filter(|e| !e.is_null());
        if j.is_none() && e.is_none() {
            return None;
        }
        // Only resource-typed positions (contained, Bundle.entry.resource, roots) need the
        // concrete type from `resourceType`.
        let needs_rt = ty.is_none_or(|t| matches!(t, "Resource" | "DomainResource"));
        let ty = match j.and_then(JsonRef::as_object) {
            Some(o) if needs_rt => match o.get_str("resourceType") {
                Some(rt) => Model::r4().type_key(rt).or(ty),
                None => ty,
            },
            _ => ty,
        };
        Some(Value::Node(FhirNode {
            json: j,
            element: e,
            ty,
        }))
    };
    match (json.and_then(JsonRef::as_array), element) {
        (Some(items), el) => {
            let els = el.and_then(JsonRef::as_array);
            let n = items.len().max(els.map_or(0, |e| e.len()));
            for i in 0..n {
                if let Some(v) = node(items.get(i), els.and_then(|e| e.get(i))) {
                    out.push(v);
                }
            }
            return;
        }
        (None, Some(e)) if json.is_none() && e.is_array() => {
            for e in e.as_array().into_iter().flat_map(|a| a.iter()) {
                if let Some(v) = node(None, Some(e)) {
                    out.push(v);
                }
            }
            return;
        }
        _ => {}
    }
    if let Some(v) = node(json, element) {
        out.push(v);
    }
}

fn underscore<'b>(name: &str, buf: &'b mut [u8; 96]) -> Option<&'b str> {
    let n = name.len();
    if n + 1 > buf.len() {
        return None;
    }
    buf[0] = b'_';
    buf[1..=n].copy_from_slice(name.as_bytes());
    std::str::from_utf8(&buf[..=n]).ok()
}

/// Navigate to child `name` of one item.
pub(crate) fn child<'a>(v: &Value<'a>, name: &str, out: &mut Items<'a>) {
    let model = Model::r4();
    match v {
        Value::Node(n) => match n.json.and_then(JsonRef::as_object) {
            Some(obj) => {
                let mut buf = [0u8; 96];
                if let Some(t) = n.ty {
                    if let Some(e) = model.element(t, name) {
                        if e.choice {
                            // One pass over the (few) keys of the object beats probing
                            // every possible `name + Type` key.
                            for (k, v) in obj.iter() {
                                let (bare, is_ext) = match k.strip_prefix('_') {
                                    Some(b) => (b, true),
                                    None => (k, false),
                                };
                                if !bare.starts_with(name) || (is_ext && obj.contains_key(bare)) {
                                    continue;
                                }
                                let Some((ct, _, ukey)) =
                                    e.choice_keys.iter().find(|(_, key, _)| key == bare)
                                else {
                                    continue;
                                };
                                if is_ext {
                                    push_json(None, Some(v), model.type_key(ct), out);
                                } else {
                                    push_json(Some(v), obj.get(ukey), model.type_key(ct), out);
                                }
                            }
                        } else {
                            let ty = e.types.first().copied();
                            push_json(
                                obj.get(name),
                                underscore(name, &mut buf).and_then(|k| obj.get(k)),
                                ty,
                                out,
                            );
                        }
                        return;
                    }
                    if let Some((_, ct)) = model.split_choice(t, name) {
                        push_json(
                            obj.get(name),
                            underscore(name, &mut buf).and_then(|k| obj.get(k)),
                            model.type_key(ct),
                            out,
                        );
                        return;
                    }
                }
                push_json(
                    obj.get(name),
                    underscore(name, &mut buf).and_then(|k| obj.get(k)),
                    None,
                    out,
                );
            }
            _ => {
                if let Some(el) = n.element.and_then(JsonRef::as_object) {
                    let ty = match name {
                        "extension" => Some("Extension"),
                        "id" => Some("string"),
                        _ => return,
                    };
                    push_json(el.get(name), None, ty, out);
                }
            }
        },
        Value::TypeInfo {
            namespace,
            name: tn,
        } => match name {
            "namespace" => out.push(Value::String(Cow::Borrowed(namespace))),
            "name" => out.push(Value::String(tn.clone())),
            _ => {}
        },
        _ => {}
    }
}

/// All children of one item, in document order.
pub(crate) fn children<'a>(v: &Value<'a>, out: &mut Items<'a>) {
    let Value::Node(n) = v else { return };
    let model = Model::r4();
    match n.json.and_then(JsonRef::as_object) {
        Some(obj) => {
            for (k, j) in obj.iter() {
                if k == "resourceType" {
                    continue;
                }
                if let Some(base) = k.strip_prefix('_') {
                    if !obj.contains_key(base) {
                        push_json(None, Some(j), None, out);
                    }
                    continue;
                }
                let ty = n.ty.and_then(|t| match model.element(t, k) {
                    Some(e) if !e.choice => e.types.first().copied(),
                    Some(_) => None,
                    None => model
                        .split_choice(t, k)
                        .and_then(|(_, ct)| model.type_key(ct)),
                });
                let mut buf = [0u8; 96];
                push_json(
                    Some(j),
                    underscore(k, &mut buf).and_then(|u| obj.get(u)),
                    ty,
                    out,
                );
            }
        }
        _ => {
            if let Some(el) = n.element.and_then(JsonRef::as_object) {
                push_json(el.get("extension"), None, Some("Extension"), out);
            }
        }
    }
}

pub(crate) fn singleton<'v, 'a>(items: &'v [Value<'a>], what: &str) -> R<Option<&'v Value<'a>>> {
    match items {
        [] => Ok(None),
        [v] => Ok(Some(v)),
        _ => Err(EvalError::NotSingleton {
            what: what.to_string(),
            count: items.len(),
        }),
    }
}

/// Singleton evaluation of collections as a boolean.
pub(crate) fn to_bool(items: &[Value<'_>], what: &str) -> R<Option<bool>> {
    match singleton(items, what)? {
        None => Ok(None),
        Some(v) => match v.to_system() {
            Some(Value::Boolean(b)) => Ok(Some(b)),
            _ => Ok(Some(true)),
        },
    }
}

pub(crate) fn bool_items<'a>(b: Option<bool>) -> Items<'a> {
    b.map(|b| vec![Value::Boolean(b)]).unwrap_or_default()
}

fn contains_value(haystack: &[Value<'_>], v: &Value<'_>) -> bool {
    haystack.iter().any(|h| equals(h, v) == Some(true))
}

pub(crate) fn dedup<'a>(items: Items<'a>) -> Items<'a> {
    let mut out: Items<'a> = Vec::with_capacity(items.len());
    for v in items {
        if !contains_value(&out, &v) {
            out.push(v);
        }
    }
    out
}

const SYSTEM_TYPES: &[&str] = &[
    "Boolean", "Integer", "Decimal", "String", "Date", "DateTime", "Time", "Quantity", "Any",
];

/// Check that a type specifier names a known type.
pub(crate) fn validate_type(spec: &TypeSpec) -> R<()> {
    let model = Model::r4();
    let fhir_ok = || {
        model
            .type_def(&spec.name)
            .is_some_and(|t| t.kind != TypeKind::Backbone)
    };
    let ok = match spec.namespace.as_deref() {
        None => fhir_ok() || SYSTEM_TYPES.contains(&spec.name.as_str()),
        Some("FHIR") => fhir_ok(),
        Some("System") => {
            SYSTEM_TYPES.contains(&spec.name.as_str()) || model.type_def(&spec.name).is_some()
        }
        Some(_) => false,
    };
    if ok {
        Ok(())
    } else {
        Err(EvalError::UnknownType(spec.to_string()))
    }
}

/// Whether an item is of the type (`exact` for `as`/`ofType`: no primitive subtyping).
pub(crate) fn type_matches(v: &Value<'_>, spec: &TypeSpec, exact: bool) -> bool {
    let model = Model::r4();
    let (ns, name) = v.type_name();
    if ns == "System" && !matches!(v, Value::Node(_)) {
        return spec.namespace.as_deref() != Some("FHIR")
            && (spec.name == name || spec.name == "Any");
    }
    if spec.namespace.as_deref() == Some("System") {
        return false;
    }
    match v {
        Value::Node(FhirNode { ty: Some(t), .. }) => {
            if exact && model.is_primitive(t) {
                model.type_name(t) == spec.name
            } else {
                model.is_a(t, &spec.name)
            }
        }
        _ => name == spec.name.as_str() || (ns == "FHIR" && model.is_a(&name, &spec.name)),
    }
}

impl<'e, 'a> Evaluator<'e, 'a> {
    pub(crate) fn eval(
        &self,
        node: &'a Node,
        focus: &[Value<'a>],
        frame: Frame<'_, 'a>,
    ) -> R<Items<'a>> {
        match &node.kind {
            NodeKind::Literal(l) => Ok(match l {
                Literal::Empty => vec![],
                Literal::Boolean(b) => vec![Value::Boolean(*b)],
                Literal::Integer(i) => vec![Value::Integer(*i)],
                Literal::Decimal(d) => vec![Value::Decimal(*d)],
                Literal::String(s) => vec![Value::String(Cow::Borrowed(s.as_str()))],
                Literal::Temporal(t) => vec![Value::Temporal(*t)],
                Literal::Quantity(q) => vec![Value::Quantity(q.clone())],
            }),
            NodeKind::This => Ok(match frame.this {
                Some(v) => vec![v.clone()],
                None => focus.to_vec(),
            }),
            NodeKind::Index => Ok(frame
                .index
                .map(|i| vec![Value::Integer(i as i64)])
                .unwrap_or_default()),
            NodeKind::Total => Ok(frame.total.map(<[Value<'a>]>::to_vec).unwrap_or_default()),
            NodeKind::Variable(name) => self.variable(name),
            NodeKind::Member { base, name } => {
                let input;
                let src: &[Value<'a>] = match base {
                    Some(b) => {
                        input = self.eval(b, focus, frame)?;
                        &input
                    }
                    None => focus,
                };
                let model = Model::r4();
                let mut out = Vec::new();
                let type_filter =
                    base.is_none() && name.starts_with(|c: char| c.is_ascii_uppercase());
                for v in src {
                    if type_filter {
                        if let Value::Node(FhirNode { ty: Some(t), .. }) = v
                            && model.is_a(t, name)
                        {
                            out.push(v.clone());
                            continue;
                        }
                        if let Value::Node(FhirNode {
                            ty: None,
                            json: Some(j),
                            ..
                        }) = v
                            && j.get("resourceType").and_then(JsonRef::as_str)
                                == Some(name.as_str())
                        {
                            out.push(v.clone());
                            continue;
                        }
                    }
                    child(v, name, &mut out);
                }
                Ok(out)
            }
            NodeKind::Call {
                base,
                func,
                name,
                args,
            } => {
                let input = match base {
                    Some(b) => self.eval(b, focus, frame)?,
                    None => focus.to_vec(),
                };
                let site = crate::call::CallSite {
                    func: *func,
                    name,
                    has_base: base.is_some(),
                    args,
                };
                self.call(site, input, focus, frame)
            }
            NodeKind::Indexer { base, index } => {
                let input = self.eval(base, focus, frame)?;
                let idx = self.scoped(|| self.eval(index, focus, frame))?;
                let Some(i) = singleton(&idx, "indexer")? else {
                    return Ok(vec![]);
                };
                match i.to_system() {
                    Some(Value::Integer(i)) => Ok(usize::try_from(i)
                        .ok()
                        .and_then(|i| input.into_iter().nth(i))
                        .into_iter()
                        .collect()),
                    _ => Err(EvalError::ty("index must be an integer")),
                }
            }
            NodeKind::Negate(inner) => {
                let v = self.eval(inner, focus, frame)?;
                let Some(v) = singleton(&v, "unary -")? else {
                    return Ok(vec![]);
                };
                Ok(vec![match v.to_system() {
                    Some(Value::Integer(i)) => {
                        Value::Integer(i.checked_neg().ok_or(EvalError::Overflow("negation"))?)
                    }
                    Some(Value::Decimal(d)) => {
                        Value::Decimal(if d.is_zero() { d.abs() } else { -d })
                    }
                    Some(Value::Quantity(q)) => Value::Quantity(Quantity::new(-q.value, q.unit)),
                    _ => return Err(EvalError::ty("unary - needs a number or quantity")),
                }])
            }
            NodeKind::Binary { op, lhs, rhs } => self.binary(*op, lhs, rhs, focus, frame),
            NodeKind::Is { base, ty } => {
                validate_type(ty)?;
                let v = self.eval(base, focus, frame)?;
                Ok(match singleton(&v, "is")? {
                    None => vec![],
                    Some(v) => vec![Value::Boolean(type_matches(v, ty, false))],
                })
            }
            NodeKind::As { base, ty } => {
                validate_type(ty)?;
                let v = self.eval(base, focus, frame)?;
                Ok(match singleton(&v, "as")? {
                    Some(v) if type_matches(v, ty, true) => vec![v.clone()],
                    _ => vec![],
                })
            }
        }
    }

    /// Whether `%name` is already defined (a built-in, a caller's or a `defineVariable`).
    pub(crate) fn variable_defined(&self, name: &str) -> bool {
        self.variable(name).is_ok()
    }

    fn variable(&self, name: &str) -> R<Items<'a>> {
        if let Some((_, v)) = self.scope.borrow().iter().rev().find(|(n, _)| n == name) {
            return Ok(v.clone());
        }
        if let Some(v) = self.ctx.vars.get(name) {
            return Ok(v.clone());
        }
        let s = |s: &'static str| Ok(vec![Value::String(Cow::Borrowed(s))]);
        match name {
            "resource" | "rootResource" => Ok(self.root.clone()),
            "context" => Ok(self.context.clone()),
            "ucum" => s("http://unitsofmeasure.org"),
            "sct" => s("http://snomed.info/sct"),
            "loinc" => s("http://loinc.org"),
            _ => {
                if let Some(vs) = name.strip_prefix("vs-") {
                    return Ok(vec![Value::String(Cow::Owned(format!(
                        "http://hl7.org/fhir/ValueSet/{vs}"
                    )))]);
                }
                if let Some(ext) = name.strip_prefix("ext-") {
                    return Ok(vec![Value::String(Cow::Owned(format!(
                        "http://hl7.org/fhir/StructureDefinition/{ext}"
                    )))]);
                }
                Err(EvalError::UnknownVariable(name.to_string()))
            }
        }
    }

    fn binary(
        &self,
        op: BinOp,
        lhs: &'a Node,
        rhs: &'a Node,
        focus: &[Value<'a>],
        frame: Frame<'_, 'a>,
    ) -> R<Items<'a>> {
        let l = self.scoped(|| self.eval(lhs, focus, frame))?;
        // Short-circuit the boolean operators where the result is already known.
        match op {
            BinOp::And if to_bool(&l, "and")? == Some(false) => return Ok(bool_items(Some(false))),
            BinOp::Or if to_bool(&l, "or")? == Some(true) => return Ok(bool_items(Some(true))),
            BinOp::Implies if to_bool(&l, "implies")? == Some(false) => {
                return Ok(bool_items(Some(true)));
            }
            _ => {}
        }
        let r = self.scoped(|| self.eval(rhs, focus, frame))?;
        binary_values(op, l, r)
    }
}

pub(crate) fn binary_values<'a>(op: BinOp, l: Items<'a>, r: Items<'a>) -> R<Items<'a>> {
    let sym = op.symbol();
    match op {
        BinOp::And => {
            let (a, b) = (to_bool(&l, sym)?, to_bool(&r, sym)?);
            Ok(bool_items(match (a, b) {
                (Some(false), _) | (_, Some(false)) => Some(false),
                (Some(true), Some(true)) => Some(true),
                _ => None,
            }))
        }
        BinOp::Or => {
            let (a, b) = (to_bool(&l, sym)?, to_bool(&r, sym)?);
            Ok(bool_items(match (a, b) {
                (Some(true), _) | (_, Some(true)) => Some(true),
                (Some(false), Some(false)) => Some(false),
                _ => None,
            }))
        }
        BinOp::Xor => {
            let (a, b) = (to_bool(&l, sym)?, to_bool(&r, sym)?);
            Ok(bool_items(match (a, b) {
                (Some(a), Some(b)) => Some(a != b),
                _ => None,
            }))
        }
        BinOp::Implies => {
            let (a, b) = (to_bool(&l, sym)?, to_bool(&r, sym)?);
            Ok(bool_items(match (a, b) {
                (Some(false), _) => Some(true),
                (_, Some(true)) => Some(true),
                (Some(true), Some(false)) => Some(false),
                _ => None,
            }))
        }
        BinOp::Union => {
            let mut all = l;
            all.extend(r);
            Ok(dedup(all))
        }
        BinOp::Eq | BinOp::Ne => {
            if l.is_empty() || r.is_empty() {
                return Ok(vec![]);
            }
            let eq = if l.len() != r.len() {
                Some(false)
            } else {
                let mut res = Some(true);
                for (a, b) in l.iter().zip(r.iter()) {
                    match equals(a, b) {
                        Some(true) => {}
                        Some(false) => {
                            res = Some(false);
                            break;
                        }
                        None => res = None,
                    }
                }
                res
            };
            Ok(bool_items(if op == BinOp::Eq {
                eq
            } else {
                eq.map(|b| !b)
            }))
        }
        BinOp::Equiv | BinOp::NotEquiv => {
            let eq = if l.is_empty() && r.is_empty() {
                true
            } else if l.len() != r.len() {
                false
            } else {
                let mut used = vec![false; r.len()];
                l.iter().all(|a| {
                    for (i, b) in r.iter().enumerate() {
                        if !used[i] && equivalent(a, b) {
                            used[i] = true;
                            return true;
                        }
                    }
                    false
                })
            };
            Ok(vec![Value::Boolean(if op == BinOp::Equiv {
                eq
            } else {
                !eq
            })])
        }
        BinOp::Lt | BinOp::Gt | BinOp::Le | BinOp::Ge => {
            let (Some(a), Some(b)) = (singleton(&l, sym)?, singleton(&r, sym)?) else {
                return Ok(vec![]);
            };
            let Some(ord) = compare(a, b)? else {
                return Ok(vec![]);
            };
            Ok(vec![Value::Boolean(match op {
                BinOp::Lt => ord == Ordering::Less,
                BinOp::Gt => ord == Ordering::Greater,
                BinOp::Le => ord != Ordering::Greater,
                _ => ord != Ordering::Less,
            })])
        }
        BinOp::In | BinOp::Contains => {
            let (item, coll) = if op == BinOp::In { (l, r) } else { (r, l) };
            let Some(v) = singleton(&item, sym)? else {
                return Ok(vec![]);
            };
            Ok(vec![Value::Boolean(contains_value(&coll, v))])
        }
        BinOp::Concat => {
            let a = singleton(&l, sym)?
                .map(|v| v.to_fhirpath_string().unwrap_or_default())
                .unwrap_or_default();
            let b = singleton(&r, sym)?
                .map(|v| v.to_fhirpath_string().unwrap_or_default())
                .unwrap_or_default();
            Ok(vec![Value::String(Cow::Owned(a + &b))])
        }
        BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::IntDiv | BinOp::Mod => {
            let (Some(a), Some(b)) = (singleton(&l, sym)?, singleton(&r, sym)?) else {
                return Ok(vec![]);
            };
            let (Some(a), Some(b)) = (a.to_system(), b.to_system()) else {
                return Err(EvalError::ty(format!(
                    "operator {sym} is not defined for these operands"
                )));
            };
            arithmetic(op, a, b).map(|v| v.into_iter().collect())
        }
    }
}

/// Ordering of two single items; `Ok(None)` when uncertain (date precision).
pub(crate) fn compare(a: &Value<'_>, b: &Value<'_>) -> R<Option<Ordering>> {
    let (Some(a), Some(b)) = (a.to_system(), b.to_system()) else {
        return Err(EvalError::ty("values are not comparable"));
    };
    match (&a, &b) {
        (Value::Integer(x), Value::Integer(y)) => Ok(Some(x.cmp(y))),
        (Value::Integer(_) | Value::Decimal(_), Value::Integer(_) | Value::Decimal(_)) => Ok(Some(
            numeric(&a)
                .unwrap_or_default()
                .cmp(&numeric(&b).unwrap_or_default()),
        )),
        (Value::String(x), Value::String(y)) => Ok(Some(x.cmp(y))),
        (Value::Temporal(x), Value::Temporal(y)) if x.comparable_kind(y) => Ok(x.compare(y)),
        (Value::Quantity(x), Value::Quantity(y)) => Ok(x.compare(y)),
        _ => Err(EvalError::ty(format!(
            "cannot compare {} with {}",
            a.type_name().1,
            b.type_name().1
        ))),
    }
}

fn arithmetic<'a>(op: BinOp, a: Value<'a>, b: Value<'a>) -> R<Option<Value<'a>>> {
    use Value as V;
    let sym = op.symbol();
    let overflow = || EvalError::Overflow(sym);
    Ok(match (op, &a, &b) {
        (BinOp::Add, V::String(x), V::String(y)) => Some(V::String(Cow::Owned(format!("{x}{y}")))),
        (BinOp::Add | BinOp::Sub, V::Temporal(t), V::Quantity(q)) => {
            let unit = q.calendar_unit().ok_or_else(|| {
                EvalError::ty(format!(
                    "'{}' is not a calendar duration usable with dates",
                    q.unit
                ))
            })?;
            let mut n = q.value.trunc().to_i64().ok_or_else(overflow)?;
            if op == BinOp::Sub {
                n = -n;
            }
            Some(V::Temporal(t.add(n, unit).ok_or_else(overflow)?))
        }
        (BinOp::Add, V::Integer(x), V::Integer(y)) => {
            Some(V::Integer(x.checked_add(*y).ok_or_else(overflow)?))
        }
        (BinOp::Sub, V::Integer(x), V::Integer(y)) => {
            Some(V::Integer(x.checked_sub(*y).ok_or_else(overflow)?))
        }
        (BinOp::Mul, V::Integer(x), V::Integer(y)) => {
            Some(V::Integer(x.checked_mul(*y).ok_or_else(overflow)?))
        }
        (BinOp::IntDiv, V::Integer(x), V::Integer(y)) => x.checked_div(*y).map(V::Integer),
        (BinOp::Mod, V::Integer(x), V::Integer(y)) => x.checked_rem(*y).map(V::Integer),
        (_, V::Integer(_) | V::Decimal(_), V::Integer(_) | V::Decimal(_)) => {
            let x = numeric(&a).unwrap_or_default();
            let y = numeric(&b).unwrap_or_default();
            match op {
                BinOp::Add => Some(V::Decimal(x.checked_add(y).ok_or_else(overflow)?)),
                BinOp::Sub => Some(V::Decimal(x.checked_sub(y).ok_or_else(overflow)?)),
                BinOp::Mul => Some(V::Decimal(x.checked_mul(y).ok_or_else(overflow)?)),
                BinOp::Div => {
                    if y.is_zero() {
                        None
                    } else {
                        Some(V::Decimal(x.checked_div(y).ok_or_else(overflow)?))
                    }
                }
                BinOp::IntDiv => {
                    if y.is_zero() {
                        None
                    } else {
                        let q = x.checked_div(y).ok_or_else(overflow)?.trunc();
                        Some(V::Integer(q.to_i64().ok_or_else(overflow)?))
                    }
                }
                BinOp::Mod => {
                    if y.is_zero() {
                        None
                    } else {
                        Some(V::Decimal(x.checked_rem(y).ok_or_else(overflow)?))
                    }
                }
                _ => {
                    return Err(EvalError::ty(format!(
                        "operator {sym} is not defined for numbers"
                    )));
                }
            }
        }
        (BinOp::Add | BinOp::Sub, V::Quantity(x), V::Quantity(y)) => {
            Some(V::Quantity(x.add(y, op == BinOp::Sub).ok_or_else(
                || EvalError::ty(format!("cannot {sym} '{}' and '{}'", x.unit, y.unit)),
            )?))
        }
        (BinOp::Mul | BinOp::Div, V::Quantity(x), V::Quantity(y)) => {
            if op == BinOp::Div && y.value.is_zero() {
                None
            } else {
                Some(V::Quantity(x.mul(y, op == BinOp::Div).ok_or_else(
                    || EvalError::ty(format!("cannot {sym} '{}' and '{}'", x.unit, y.unit)),
                )?))
            }
        }
        (BinOp::Mul | BinOp::Div, V::Quantity(x), V::Integer(_) | V::Decimal(_)) => {
            let n = numeric(&b).unwrap_or_default();
            if op == BinOp::Div && n.is_zero() {
                None
            } else {
                let v = if op == BinOp::Mul {
                    x.value.checked_mul(n)
                } else {
                    x.value.checked_div(n)
                };
                Some(V::Quantity(Quantity::new(
                    v.ok_or_else(overflow)?,
                    x.unit.clone(),
                )))
            }
        }
        (BinOp::Mul, V::Integer(_) | V::Decimal(_), V::Quantity(y)) => {
            let n = numeric(&a).unwrap_or_default();
            Some(V::Quantity(Quantity::new(
                y.value.checked_mul(n).ok_or_else(overflow)?,
                y.unit.clone(),
            )))
        }
        _ => {
            return Err(EvalError::ty(format!(
                "operator {sym} is not defined for {} and {}",
                a.type_name().1,
                b.type_name().1
            )));
        }
    })
}

/// Arguments helpers used by the function implementations.
impl<'e, 'a> Evaluator<'e, 'a> {
    pub(crate) fn arg(
        &self,
        args: &'a [Node],
        i: usize,
        focus: &[Value<'a>],
        frame: Frame<'_, 'a>,
    ) -> R<Items<'a>> {
        match args.get(i) {
            Some(n) => self.scoped(|| self.eval(n, focus, frame)),
            None => Ok(vec![]),
        }
    }

    /// Run `f` as its own variable scope: variables it defines end with it.
    pub(crate) fn scoped<T>(&self, f: impl FnOnce() -> T) -> T {
        let mark = self.scope.borrow().len();
        let out = f();
        let mut scope = self.scope.borrow_mut();
        if scope.len() > mark {
            scope.truncate(mark);
        }
        out
    }

    /// Evaluate a lambda argument for one item.
    pub(crate) fn eval_item(
        &self,
        node: &'a Node,
        item: &Value<'a>,
        index: usize,
        total: Option<&[Value<'a>]>,
    ) -> R<Items<'a>> {
        let focus = std::slice::from_ref(item);
        let frame = Frame {
            this: Some(item),
            index: Some(index),
            total,
        };
        self.scoped(|| self.eval(node, focus, frame))
    }

    pub(crate) fn type_arg(&self, args: &'a [Node]) -> R<TypeSpec> {
        let spec = args
            .first()
            .and_then(node_as_type_spec)
            .ok_or_else(|| EvalError::ty("expected a type name argument"))?;
        validate_type(&spec)?;
        Ok(spec)
    }

    pub(crate) fn root_frame() -> Frame<'static, 'a> {
        Frame {
            this: None,
            index: None,
            total: None,
        }
    }

    pub(crate) fn with_this<'f>(this: &'f Value<'a>, outer: Frame<'f, 'a>) -> Frame<'f, 'a> {
        Frame {
            this: Some(this),
            index: outer.index,
            total: outer.total,
        }
    }

    pub(crate) fn ptr_key(v: &Value<'_>) -> Option<usize> {
        ptr_key(v)
    }

    pub(crate) fn decimal_of(v: &Value<'_>) -> Option<Decimal> {
        numeric(&v.to_system()?)
    }
}
