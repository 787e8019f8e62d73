//! Static checking against the FHIR R4 model.
//!
//! The checker infers, for every sub-expression, the set of possible types and
//! whether the result has at most one item, and reports what is certainly
//! wrong: unknown functions, wrong argument counts, unknown types, elements
//! that the (known) input type does not have, choice elements addressed by a
//! typed name (`valueQuantity`), non-Boolean or multi-item `iif` criteria,
//! string functions on non-strings, date arithmetic with plain numbers, and
//! (optionally) order-dependent functions applied to unordered collections.
//! Where types are unknown (`Any`), it stays silent.

use crate::ast::{BinOp, Literal, Node, NodeKind, TypeSpec};
use crate::error::Diagnostic;
use crate::eval::validate_type;
use crate::functions::Func;
use crate::model::Model;
use crate::parser::node_as_type_spec;
use crate::temporal::TemporalKind;

/// Options for [`crate::Expr::check_with`].
#[derive(Debug, Clone, Default)]
pub struct CheckOptions {
    /// Reject order-dependent functions (`skip`, `first`, ...) on unordered input (`children()`).
    pub check_ordered_functions: bool,
    /// Accept choice elements addressed by their JSON name (`Observation.valueQuantity`),
    /// as FHIRPath's lenient mode does. By default only `value`/`value.ofType(Quantity)` pass.
    pub allow_choice_type_names: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SType {
    Fhir(&'static str),
    System(&'static str),
    Any,
}

#[derive(Debug, Clone)]
struct Ty {
    types: Vec<SType>,
    single: bool,
    ordered: bool,
}

impl Ty {
    fn any() -> Ty {
        Ty {
            types: vec![SType::Any],
            single: false,
            ordered: true,
        }
    }
    fn system(name: &'static str) -> Ty {
        Ty {
            types: vec![SType::System(name)],
            single: true,
            ordered: true,
        }
    }
    fn boolean() -> Ty {
        Ty::system("Boolean")
    }
    fn empty() -> Ty {
        Ty {
            types: vec![],
            single: true,
            ordered: true,
        }
    }
    fn is_any(&self) -> bool {
        self.types.contains(&SType::Any)
    }
    fn many(mut self) -> Ty {
        self.single = false;
        self
    }
}

const STRING_LIKE: &[&str] = &[
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

fn system_of(t: SType) -> Option<&'static str> {
    match t {
        SType::System(s) => Some(s),
        SType::Fhir(f) => Some(match f {
            "boolean" => "Boolean",
            "integer" | "positiveInt" | "unsignedInt" => "Integer",
            "decimal" => "Decimal",
            "date" => "Date",
            "dateTime" | "instant" => "DateTime",
            "time" => "Time",
            _ if STRING_LIKE.contains(&f) => "String",
            _ if Model::r4().is_a(f, "Quantity") => "Quantity",
            _ => return None,
        }),
        SType::Any => None,
    }
}

struct Checker<'o> {
    opts: &'o CheckOptions,
    diags: Vec<Diagnostic>,
    root: Ty,
    /// When set, the only user variables in scope (with their types).
    vars: Option<&'o [(String, ExprType)]>,
}

/// The static type of an expression's result, as inferred by the checker
/// (see [`crate::Expr::check_typed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExprType {
    /// Possible item types: FHIR type keys (`string`, `HumanName`,
    /// `Patient.contact`), System types (`System.Boolean`), or `Any` when unknown.
    /// Empty when the expression is certainly empty (`{}`).
    pub types: Vec<String>,
    /// Whether the result has at most one item.
    pub single: bool,
}

impl ExprType {
    /// An unknown type (any number of items).
    pub fn any() -> ExprType {
        ExprType {
            types: vec!["Any".into()],
            single: false,
        }
    }
    /// A FHIR type key (`HumanName`) or System type (`System.Integer`).
    pub fn of(name: &str, single: bool) -> ExprType {
        ExprType {
            types: vec![name.to_string()],
            single,
        }
    }
    /// Whether some possible type is unknown.
    pub fn is_any(&self) -> bool {
        self.types.iter().any(|t| t == "Any")
    }
    /// The System type name (`Boolean`, `String`, `Integer`, ...) each possible type
    /// converts to, `None` for complex or unknown types.
    pub fn system_types(&self) -> Vec<Option<&'static str>> {
        self.types.iter().map(|t| system_of(stype_of(t))).collect()
    }
    fn to_ty(&self) -> Ty {
        Ty {
            types: self.types.iter().map(|t| stype_of(t)).collect(),
            single: self.single,
            ordered: true,
        }
    }
    fn from_ty(t: &Ty) -> ExprType {
        ExprType {
            types: t
                .types
                .iter()
                .map(|s| match s {
                    SType::Fhir(k) => (*k).to_string(),
                    SType::System(n) => format!("System.{n}"),
                    SType::Any => "Any".to_string(),
                })
                .collect(),
            single: t.single,
        }
    }
}

const SYSTEM_TYPES: &[&str] = &[
    "Boolean", "Integer", "Decimal", "String", "Date", "DateTime", "Time", "Quantity", "TypeInfo",
];

fn stype_of(name: &str) -> SType {
    if let Some(n) = name.strip_prefix("System.") {
        return SYSTEM_TYPES
            .iter()
            .find(|s| **s == n)
            .map_or(SType::Any, |s| SType::System(s));
    }
    match Model::r4().type_key(name) {
        Some(k) => SType::Fhir(k),
        None => SType::Any,
    }
}

fn type_of_key(k: &'static str) -> SType {
    match k.strip_prefix("System.") {
        Some("String") => SType::System("String"),
        Some("Boolean") => SType::System("Boolean"),
        Some("Integer") => SType::System("Integer"),
        Some("Decimal") => SType::System("Decimal"),
        Some(_) => SType::Any,
        None => SType::Fhir(k),
    }
}

fn spec_type(spec: &TypeSpec) -> SType {
    let model = Model::r4();
    if spec.namespace.as_deref() != Some("System")
        && let Some(k) = model.type_key(&spec.name)
    {
        return SType::Fhir(k);
    }
    match spec.name.as_str() {
        "Boolean" => SType::System("Boolean"),
        "Integer" => SType::System("Integer"),
        "Decimal" => SType::System("Decimal"),
        "String" => SType::System("String"),
        "Date" => SType::System("Date"),
        "DateTime" => SType::System("DateTime"),
        "Time" => SType::System("Time"),
        "Quantity" => SType::System("Quantity"),
        _ => SType::Any,
    }
}

pub(crate) fn check(root: &Node, root_type: &str, opts: &CheckOptions) -> Vec<Diagnostic> {
    let model = Model::r4();
    let root_ty = match model.type_key(root_type) {
        Some(k) => Ty {
            types: vec![SType::Fhir(k)],
            single: true,
            ordered: true,
        },
        None => Ty::any(),
    };
    let mut c = Checker {
        opts,
        diags: Vec::new(),
        root: root_ty.clone(),
        vars: None,
    };
    c.node(root, &root_ty, &root_ty);
    c.diags
}

/// Check with an explicit focus type and variable environment; returns the result type.
pub(crate) fn check_typed(
    root: &Node,
    root_type: &str,
    focus: Option<&ExprType>,
    vars: Option<&[(String, ExprType)]>,
    opts: &CheckOptions,
) -> (ExprType, Vec<Diagnostic>) {
    let model = Model::r4();
    let root_ty = match model.type_key(root_type) {
        Some(k) => Ty {
            types: vec![SType::Fhir(k)],
            single: true,
            ordered: true,
        },
        None => Ty::any(),
    };
    let focus_ty = focus.map_or_else(|| root_ty.clone(), ExprType::to_ty);
    let mut c = Checker {
        opts,
        diags: Vec::new(),
        root: root_ty,
        vars,
    };
    let out = c.node(root, &focus_ty, &focus_ty);
    (ExprType::from_ty(&out), c.diags)
}

impl Checker<'_> {
    fn err(&mut self, node: &Node, message: impl Into<String>) {
        self.diags.push(Diagnostic {
            line: node.pos.line,
            column: node.pos.column,
            message: message.into(),
        });
    }

    fn member(&mut self, node: &Node, input: &Ty, name: &str, from_focus: bool) -> Ty {
        let model = Model::r4();
        let mut out = Vec::new();
        let mut single = input.single;
        let mut problems = Vec::new();
        let mut ok = false;
        for t in &input.types {
            match *t {
                SType::Any => {
                    out.push(SType::Any);
                    ok = true;
                    single = false;
                }
                SType::System("TypeInfo") => {
                    out.push(SType::System("String"));
                    ok = true;
                }
                SType::System(_) => {
                    problems.push(format!("'{name}' is not an element of a System type"))
                }
                SType::Fhir(k) => {
                    if from_focus && name.starts_with(|c: char| c.is_ascii_uppercase()) {
                        if model.is_a(k, name) {
                            out.push(SType::Fhir(k));
                            ok = true;
                            continue;
                        }
                        if model.type_def(name).is_some() {
                            problems.push(format!(
                                "expression is for type {name}, but the input is {}",
                                model.type_name(k)
                            ));
                            continue;
                        }
                    }
                    if matches!(k, "Resource" | "DomainResource")
                        && model.element(k, name).is_none()
                    {
                        out.push(SType::Any);
                        ok = true;
                        continue;
                    }
                    match model.element(k, name) {
                        Some(e) => {
                            ok = true;
                            if e.repeats {
                                single = false;
                            }
                            out.extend(e.types.iter().map(|t| type_of_key(t)));
                        }
                        None => {
                            if let Some((base, ty)) = model.split_choice(k, name) {
                                if self.opts.allow_choice_type_names {
                                    ok = true;
                                    out.extend(model.type_key(ty).map(SType::Fhir));
                                    continue;
                                }
                                problems.push(format!(
                                    "'{name}' is a choice element: use '{base}' or '{base}.ofType({ty})'"
                                ));
                            } else {
                                problems.push(format!(
                                    "'{name}' is not an element of {}",
                                    model.type_name(k)
                                ));
                            }
                        }
                    }
                }
            }
        }
        if !ok && let Some(p) = problems.first() {
            self.err(node, p.clone());
        }
        out.dedup();
        Ty {
            types: out,
            single,
            ordered: input.ordered,
        }
    }

    fn node(&mut self, node: &Node, focus: &Ty, this: &Ty) -> Ty {
        match &node.kind {
            NodeKind::Literal(l) => match l {
                Literal::Empty => Ty::empty(),
                Literal::Boolean(_) => Ty::boolean(),
                Literal::Integer(_) => Ty::system("Integer"),
                Literal::Decimal(_) => Ty::system("Decimal"),
                Literal::String(_) => Ty::system("String"),
                Literal::Temporal(t) => Ty::system(match t.kind {
                    TemporalKind::Date => "Date",
                    TemporalKind::DateTime => "DateTime",
                    TemporalKind::Time => "Time",
                }),
                Literal::Quantity(_) => Ty::system("Quantity"),
            },
            NodeKind::This => this.clone(),
            NodeKind::Index => Ty::system("Integer"),
            NodeKind::Total => Ty::any(),
            NodeKind::Variable(name) => match name.as_str() {
                "resource" | "rootResource" => self.root.clone(),
                "context" => self.root.clone(),
                "ucum" | "sct" | "loinc" => Ty::system("String"),
                n if n.starts_with("vs-") || n.starts_with("ext-") => Ty::system("String"),
                n => match self.vars {
                    Some(vars) => match vars.iter().find(|(v, _)| v == n) {
                        Some((_, t)) => t.to_ty(),
                        None => {
                            self.err(node, format!("unknown variable '%{n}'"));
                            Ty::any()
                        }
                    },
                    None => Ty::any(),
                },
            },
            NodeKind::Member { base, name } => {
                let input = match base {
                    Some(b) => self.node(b, focus, this),
                    None => focus.clone(),
                };
                self.member(node, &input, name, base.is_none())
            }
            NodeKind::Indexer { base, index } => {
                let input = self.node(base, focus, this);
                self.node(index, focus, this);
                if self.opts.check_ordered_functions && !input.ordered {
                    self.err(node, "indexer used on an unordered collection");
                }
                Ty {
                    single: true,
                    ..input
                }
            }
            NodeKind::Negate(inner) => self.node(inner, focus, this),
            NodeKind::Is { base, ty } => {
                self.node(base, focus, this);
                if validate_type(ty).is_err() {
                    self.err(node, format!("unknown type '{ty}'"));
                }
                Ty::boolean()
            }
            NodeKind::As { base, ty } => {
                let input = self.node(base, focus, this);
                if validate_type(ty).is_err() {
                    self.err(node, format!("unknown type '{ty}'"));
                }
                Ty {
                    types: vec![spec_type(ty)],
                    single: input.single,
                    ordered: input.ordered,
                }
            }
            NodeKind::Binary { op, lhs, rhs } => {
                let l = self.node(lhs, focus, this);
                let r = self.node(rhs, focus, this);
                self.binary(node, *op, &l, &r)
            }
            NodeKind::Call {
                base,
                func,
                name,
                args,
            } => {
                let input = match base {
                    Some(b) => self.node(b, focus, this),
                    None => focus.clone(),
                };
                self.call(node, *func, name, &input, args, focus, this)
            }
        }
    }

    fn binary(&mut self, node: &Node, op: BinOp, l: &Ty, r: &Ty) -> Ty {
        match op {
            BinOp::Union => {
                let mut types = l.types.clone();
                types.extend(r.types.iter().copied());
                types.dedup();
                let single = (l.types.is_empty() && r.single) || (r.types.is_empty() && l.single);
                Ty {
                    types,
                    single,
                    ordered: l.ordered && r.ordered,
                }
            }
            BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::IntDiv | BinOp::Mod => {
                let ls: Vec<_> = l.types.iter().map(|t| system_of(*t)).collect();
                let rs: Vec<_> = r.types.iter().map(|t| system_of(*t)).collect();
                let temporal = |s: &Option<&str>| matches!(s, Some("Date" | "DateTime" | "Time"));
                let number = |s: &Option<&str>| matches!(s, Some("Integer" | "Decimal"));
                if !ls.is_empty()
                    && !rs.is_empty()
                    && ls.iter().all(temporal)
                    && rs.iter().all(number)
                {
                    self.err(
                        node,
                        format!(
                            "operator {} cannot add a number to a date/time (use a quantity)",
                            op.symbol()
                        ),
                    );
                }
                if ls.len() == 1 && ls == rs && ls[0].is_some() {
                    return Ty {
                        types: l.types.clone(),
                        single: true,
                        ordered: true,
                    };
                }
                Ty {
                    types: vec![SType::Any],
                    single: true,
                    ordered: true,
                }
            }
            BinOp::Concat => Ty::system("String"),
            _ => Ty::boolean(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn call(
        &mut self,
        node: &Node,
        func: Func,
        name: &str,
        input: &Ty,
        args: &[Node],
        focus: &Ty,
        this: &Ty,
    ) -> Ty {
        if func == Func::Unknown {
            self.err(node, format!("unknown function '{name}'"));
            for a in args {
                self.node(a, focus, this);
            }
            return Ty::any();
        }
        let (min, max) = func.arity();
        if args.len() < min || args.len() > max {
            let expected = if min == max {
                min.to_string()
            } else {
                format!("{min} to {max}")
            };
            self.err(
                node,
                format!(
                    "function '{name}' takes {expected} argument(s), got {}",
                    args.len()
                ),
            );
        }
        // Per-item (lambda) arguments see each input item as focus and $this.
        let item = Ty {
            single: true,
            ..input.clone()
        };
        let lambda = matches!(
            func,
            Func::Where
                | Func::Select
                | Func::Exists
                | Func::All
                | Func::Repeat
                | Func::Sort
                | Func::Trace
        );
        let type_fn = matches!(func, Func::Is | Func::As | Func::OfType)
            || (func == Func::GetReferenceKey
                && args.first().is_some_and(|a| node_as_type_spec(a).is_some()));
        let mut arg_tys = Vec::with_capacity(args.len());
        for a in args {
            if type_fn {
                match node_as_type_spec(a) {
                    Some(spec) if validate_type(&spec).is_ok() => arg_tys.push(Ty {
                        types: vec![spec_type(&spec)],
                        single: true,
                        ordered: true,
                    }),
                    Some(spec) => {
                        self.err(a, format!("unknown type '{spec}'"));
                        arg_tys.push(Ty::any());
                    }
                    None => {
                        self.err(a, format!("{name}() expects a type name"));
                        arg_tys.push(Ty::any());
                    }
                }
            } else if lambda
                || matches!(func, Func::Aggregate | Func::DefineVariable)
                || (func == Func::Iif && node_has_base(node))
            {
                arg_tys.push(self.node(a, &item, &item));
            } else {
                arg_tys.push(self.node(a, focus, this));
            }
        }
        let ordered_only = matches!(
            func,
            Func::Skip | Func::Take | Func::First | Func::Last | Func::Tail | Func::Single
        );
        if ordered_only && self.opts.check_ordered_functions && !input.ordered {
            self.err(node, format!("{name}() used on an unordered collection"));
        }
        let string_fn = matches!(
            func,
            Func::StartsWith
                | Func::EndsWith
                | Func::Contains
                | Func::IndexOf
                | Func::Substring
                | Func::Upper
                | Func::Lower
                | Func::Replace
                | Func::Matches
                | Func::MatchesFull
                | Func::ReplaceMatches
                | Func::Length
                | Func::ToChars
                | Func::Split
                | Func::Trim
        );
        if string_fn
            && !input.is_any()
            && !input.types.is_empty()
            && input.types.iter().all(|t| system_of(*t) != Some("String"))
        {
            self.err(node, format!("{name}() can only be used on strings"));
        }
        if func == Func::Iif
            && let Some(crit) = arg_tys.first()
        {
            if !crit.single {
                self.err(&args[0], "iif criterion must be a single Boolean");
            } else if !crit.is_any()
                && !crit.types.is_empty()
                && crit.types.iter().all(|t| system_of(*t) != Some("Boolean"))
            {
                self.err(&args[0], "iif criterion must be a Boolean");
            }
        }
        let same = || input.clone();
        match func {
            Func::DefineVariable
            | Func::Where
            | Func::Distinct
            | Func::Skip
            | Func::Take
            | Func::Tail
            | Func::Exclude
            | Func::Intersect
            | Func::Trace => same(),
            Func::First | Func::Last | Func::Single => Ty {
                single: true,
                ..same()
            },
            Func::Select | Func::Repeat => match arg_tys.first() {
                Some(t) => Ty {
                    single: false,
                    ..t.clone()
                },
                None => Ty::any(),
            },
            Func::OfType => match arg_tys.first() {
                Some(t) => Ty {
                    single: input.single,
                    ordered: input.ordered,
                    types: t.types.clone(),
                },
                None => Ty::any(),
            },
            Func::As => match arg_tys.first() {
                Some(t) => Ty {
                    single: true,
                    ordered: true,
                    types: t.types.clone(),
                },
                None => Ty::any(),
            },
            Func::Union | Func::Combine => {
                let mut t = same().many();
                if let Some(a) = arg_tys.first() {
                    t.types.extend(a.types.iter().copied());
                    t.types.dedup();
                }
                t
            }
            Func::Children | Func::Descendants => Ty {
                types: vec![SType::Any],
                single: false,
                ordered: false,
            },
            Func::Extension => Ty {
                types: vec![SType::Fhir("Extension")],
                single: false,
                ordered: true,
            },
            Func::Empty
            | Func::Exists
            | Func::All
            | Func::AllTrue
            | Func::AnyTrue
            | Func::AllFalse
            | Func::AnyFalse
            | Func::SubsetOf
            | Func::SupersetOf
            | Func::IsDistinct
            | Func::Is
            | Func::Not
            | Func::HasValue
            | Func::ConvertsToBoolean
            | Func::ConvertsToInteger
            | Func::ConvertsToDecimal
            | Func::ConvertsToString
            | Func::ConvertsToDate
            | Func::ConvertsToDateTime
            | Func::ConvertsToTime
            | Func::ConvertsToQuantity
            | Func::StartsWith
            | Func::EndsWith
            | Func::Contains
            | Func::Matches
            | Func::MatchesFull
            | Func::Comparable
            | Func::ConformsTo
            | Func::HtmlChecks
            | Func::MemberOf
            | Func::ToBoolean => Ty::boolean(),
            Func::Count | Func::Length | Func::IndexOf | Func::ToInteger | Func::Precision => {
                Ty::system("Integer")
            }
            Func::ToStringFn
            | Func::Substring
            | Func::Upper
            | Func::Lower
            | Func::Replace
            | Func::ReplaceMatches
            | Func::Trim
            | Func::Join
            | Func::Encode
            | Func::Decode
            | Func::Escape
            | Func::Unescape
            | Func::GetResourceKey
            | Func::GetReferenceKey => Ty::system("String"),
            Func::ToChars | Func::Split => Ty::system("String").many(),
            Func::ToDecimal => Ty::system("Decimal"),
            Func::ToDate | Func::Today => Ty::system("Date"),
            Func::ToDateTime | Func::Now => Ty::system("DateTime"),
            Func::ToTime | Func::TimeOfDay => Ty::system("Time"),
            Func::ToQuantity => Ty::system("Quantity"),
            _ => Ty::any(),
        }
    }
}

fn node_has_base(node: &Node) -> bool {
    matches!(&node.kind, NodeKind::Call { base: Some(_), .. })
}
