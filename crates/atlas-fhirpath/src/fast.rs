//! Fast paths: a subset of FHIRPath compiled against the model and evaluated
//! straight on a projected [`Tape`].
//!
//! View columns are mostly navigation: `code.coding.first().code`,
//! `value.ofType(Quantity).value`, `subject.getReferenceKey(Patient)`,
//! `iif(x.exists(), x, y)`. [`FastPath::compile`] turns such an expression
//! into a short list of `Op`s whose member steps are resolved once (choice
//! elements to their JSON keys); [`FastPath::keys`] says which JSON members it
//! can read, so the tape parser records only those. Everything else —
//! other functions and operators, `_x` primitive extensions, values of an
//! unexpected JSON kind, several items where one is required — is not
//! handled here: compilation returns `None`, or evaluation returns [`Bail`],
//! and the caller evaluates that resource with the full evaluator. The fast
//! path therefore never decides anything the full evaluator would decide
//! differently; it only skips work (tests compare both on real data).

use crate::Expr;
use crate::ast::{Literal, Node, NodeKind};
use crate::eval::{type_matches, validate_type};
use crate::functions::Func;
use crate::json::tape::{KeyTrie, NO_SYMBOL, Tape, TapeKind};
use crate::json::{is_integer_text, number_decimal, number_i64};
use crate::model::Model;
use crate::parser::node_as_type_spec;
use crate::value::{FhirNode, Value};
use rust_decimal::{Decimal, RoundingStrategy};

/// A parsed resource for the fast path: its text and its tape.
#[derive(Clone, Copy)]
pub struct Doc<'t> {
    pub text: &'t str,
    pub tape: &'t Tape,
}

/// One item of a fast-path result. Strings are spans of tape strings, so
/// values carry no lifetime and buffers can be reused across resources.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FastValue {
    /// A tape node (an element of the resource).
    Node(u32),
    /// A System.String: bytes `start..start + len` of string node `node`.
    Sub {
        node: u32,
        start: u32,
        len: u32,
    },
    Bool(bool),
    Int(i64),
    Decimal(Decimal),
}

impl FastValue {
    /// The text of a string node or substring.
    pub fn as_str<'t>(&self, doc: &Doc<'t>) -> Option<&'t str> {
        match *self {
            FastValue::Node(i) => doc.tape.str(doc.text, i),
            FastValue::Sub { node, start, len } => doc
                .tape
                .str(doc.text, node)?
                .get(start as usize..start as usize + len as usize),
            _ => None,
        }
    }
}

/// The fast path cannot decide this resource: use the full evaluator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bail;

/// One step of a fast path.
#[derive(Debug, Clone)]
enum Op {
    /// Children named by `keys` (a plain element: one key; a choice element
    /// after `ofType`: the matching `name + Type` keys), arrays flattened,
    /// nulls dropped. `multi`: collect every matching key in document order
    /// (choice), else the last one (as object lookup does).
    Member {
        keys: Vec<MemberKey>,
        multi: bool,
    },
    First,
    Exists,
    Iif(Box<FastPath>, Box<FastPath>, Option<Box<FastPath>>),
    /// Symbols of `resourceType` and `id`.
    ResourceKey(MemberKey, MemberKey),
    /// The wanted type; the symbol of `reference`.
    ReferenceKey(Option<Box<str>>, MemberKey),
    Round(u32),
    RowIndex,
    /// A sub-expression outside the fast subset in an `iif` branch: the
    /// resource goes to the full evaluator only when the branch is taken.
    Unsupported,
}

/// A member name and its `_`-prefixed twin, with their tape symbols once
/// [`FastPath::keys`] has assigned them.
#[derive(Debug, Clone)]
struct MemberKey {
    key: Box<str>,
    ukey: Box<str>,
    sym: u32,
    usym: u32,
}

impl MemberKey {
    fn new(key: &str) -> MemberKey {
        MemberKey {
            key: key.into(),
            ukey: format!("_{key}").into(),
            sym: NO_SYMBOL,
            usym: NO_SYMBOL,
        }
    }
}

/// Whether tape node `i` has key `key` (`sym` when both sides have one).
#[inline]
fn is_key(doc: &Doc<'_>, i: u32, key: &str, sym: u32) -> bool {
    let s = doc.tape.sym(i);
    if s != NO_SYMBOL && sym != NO_SYMBOL {
        s == sym
    } else {
        doc.tape.key(doc.text, i) == Some(key)
    }
}

/// A compiled fast path (see the module doc).
#[derive(Debug, Clone)]
pub struct FastPath {
    ops: Vec<Op>,
    /// Model type key of the result items, when known.
    ty: Option<&'static str>,
}

/// Reusable buffers for [`FastPath::eval`].
#[derive(Debug, Default)]
pub struct Scratch {
    pool: Vec<Vec<FastValue>>,
    /// The root object's children by key symbol (last one wins), for the
    /// tape generation `root_gen`: the root is where most paths start.
    root_slots: Vec<u32>,
    root_gen: u64,
    root_usable: bool,
}

const NO_NODE: u32 = u32::MAX;

impl Scratch {
    /// Index the root's children of `doc` unless already done for this parse.
    fn root_index(&mut self, doc: &Doc<'_>) -> bool {
        let id = doc.tape.generation();
        if id != 0 && self.root_gen == id {
            return self.root_usable;
        }
        self.root_gen = id;
        self.root_slots.clear();
        self.root_usable = true;
        for c in doc.tape.children(0) {
            let sym = doc.tape.sym(c);
            if sym == NO_SYMBOL || sym > 4096 {
                self.root_usable = false;
                break;
            }
            let sym = sym as usize;
            if self.root_slots.len() <= sym {
                self.root_slots.resize(sym + 1, NO_NODE);
            }
            self.root_slots[sym] = c;
        }
        self.root_usable
    }

    #[inline]
    fn root_child(&self, sym: u32) -> u32 {
        self.root_slots
            .get(sym as usize)
            .copied()
            .unwrap_or(NO_NODE)
    }

    fn take(&mut self) -> Vec<FastValue> {
        self.pool.pop().unwrap_or_default()
    }
    fn give(&mut self, mut v: Vec<FastValue>) {
        v.clear();
        self.pool.push(v);
    }
}

impl FastPath {
    /// Compile `expr` for a focus of model type `focus` (a resource type or
    /// an element type key such as `Observation.component`); `None` when the
    /// expression is outside the fast subset.
    pub fn compile(expr: &Expr, focus: &str) -> Option<FastPath> {
        let model = Model::r4();
        let ty = model.type_key(focus)?;
        compile(&expr.root, Some(ty))
    }

    /// The model type of the result items, when the path knows it.
    pub fn result_type(&self) -> Option<&'static str> {
        self.ty
    }

    /// Add the members this path may read, starting at trie nodes `at`;
    /// returns the trie nodes of the result items. Also takes the trie's key
    /// symbols: evaluate only on tapes parsed with this trie.
    pub fn keys(&mut self, trie: &mut KeyTrie, at: &[u32]) -> Vec<u32> {
        fn sym(trie: &mut KeyTrie, k: &mut MemberKey) {
            k.sym = trie.symbol(&k.key);
            k.usym = trie.symbol(&k.ukey);
        }
        let mut cur = at.to_vec();
        for op in &mut self.ops {
            match op {
                Op::Member { keys, .. } => {
                    let mut next = Vec::new();
                    for k in keys.iter_mut() {
                        sym(trie, k);
                    }
                    for &n in &cur {
                        for k in keys.iter() {
                            trie.add(n, &k.ukey);
                            let c = trie.add(n, &k.key);
                            if !next.contains(&c) {
                                next.push(c);
                            }
                        }
                    }
                    cur = next;
                }
                Op::First | Op::Round(_) => {}
                Op::Exists | Op::RowIndex | Op::Unsupported => cur.clear(),
                Op::ResourceKey(rt, id) => {
                    sym(trie, rt);
                    sym(trie, id);
                    for &n in &cur {
                        trie.add(n, "resourceType");
                        trie.add(n, "id");
                    }
                    cur.clear();
                }
                Op::ReferenceKey(_, r) => {
                    sym(trie, r);
                    for &n in &cur {
                        trie.add(n, "reference");
                    }
                    cur.clear();
                }
                Op::Iif(c, a, b) => {
                    c.keys(trie, &cur);
                    let mut out = a.keys(trie, &cur);
                    if let Some(b) = b {
                        for n in b.keys(trie, &cur) {
                            if !out.contains(&n) {
                                out.push(n);
                            }
                        }
                    }
                    cur = out;
                }
            }
        }
        cur
    }

    /// Evaluate on `focus`, appending the result to `out`. `row_index` is `%rowIndex`.
    pub fn eval(
        &self,
        doc: &Doc<'_>,
        focus: &[FastValue],
        row_index: i64,
        out: &mut Vec<FastValue>,
        scratch: &mut Scratch,
    ) -> Result<(), Bail> {
        let mut cur = scratch.take();
        cur.extend_from_slice(focus);
        let mut next = scratch.take();
        let mut result = Ok(());
        for op in &self.ops {
            next.clear();
            if let Err(b) = apply(op, doc, &cur, row_index, &mut next, scratch) {
                result = Err(b);
                break;
            }
            std::mem::swap(&mut cur, &mut next);
        }
        if result.is_ok() {
            out.extend_from_slice(&cur);
        }
        scratch.give(cur);
        scratch.give(next);
        result
    }
}

fn compile(node: &Node, focus: Option<&'static str>) -> Option<FastPath> {
    let model = Model::r4();
    match &node.kind {
        NodeKind::This => Some(FastPath {
            ops: Vec::new(),
            ty: focus,
        }),
        NodeKind::Variable(name) if name == "rowIndex" => Some(FastPath {
            ops: vec![Op::RowIndex],
            ty: None,
        }),
        NodeKind::Member { base, name } => {
            let mut p = base_path(base.as_deref(), focus)?;
            let ty = p.ty?;
            let e = model.element(ty, name)?;
            if e.choice {
                return None;
            }
            let ety = *e.types.first()?;
            if matches!(model.type_name(ety), "Resource" | "DomainResource")
                || model.is_resource(ety)
            {
                return None;
            }
            p.ops.push(Op::Member {
                keys: vec![MemberKey::new(name)],
                multi: false,
            });
            p.ty = Some(ety);
            Some(p)
        }
        NodeKind::Call {
            base, func, args, ..
        } => match func {
            Func::OfType => {
                let Some(NodeKind::Member { base: mbase, name }) = base.as_ref().map(|b| &b.kind)
                else {
                    return None;
                };
                let spec = args.first().and_then(node_as_type_spec)?;
                validate_type(&spec).ok()?;
                let mut p = base_path(mbase.as_deref(), focus)?;
                let e = model.element(p.ty?, name)?;
                if !e.choice {
                    return None;
                }
                let mut keys = Vec::new();
                let mut tys = Vec::new();
                for (ct, key, _) in &e.choice_keys {
                    let ty = model.type_key(ct);
                    let probe = Value::Node(FhirNode {
                        json: None,
                        element: None,
                        ty,
                    });
                    if type_matches(&probe, &spec, true) {
                        keys.push(MemberKey::new(key));
                        tys.push(ty);
                    }
                }
                p.ty = match tys.as_slice() {
                    [t] => *t,
                    _ => None,
                };
                p.ops.push(Op::Member { keys, multi: true });
                Some(p)
            }
            Func::First | Func::Exists if args.is_empty() => {
                let mut p = base_path(base.as_deref(), focus)?;
                if *func == Func::First {
                    p.ops.push(Op::First);
                } else {
                    p.ops.push(Op::Exists);
                    p.ty = None;
                }
                Some(p)
            }
            Func::GetResourceKey => {
                let mut p = base_path(base.as_deref(), focus)?;
                p.ops.push(Op::ResourceKey(
                    MemberKey::new("resourceType"),
                    MemberKey::new("id"),
                ));
                p.ty = None;
                Some(p)
            }
            Func::GetReferenceKey => {
                let want = match args.as_slice() {
                    [] => None,
                    [a] => Some(match &a.kind {
                        NodeKind::Member { base: None, name } => name.as_str().into(),
                        NodeKind::Literal(Literal::String(s)) => s.as_str().into(),
                        _ => return None,
                    }),
                    _ => return None,
                };
                let mut p = base_path(base.as_deref(), focus)?;
                p.ops
                    .push(Op::ReferenceKey(want, MemberKey::new("reference")));
                p.ty = None;
                Some(p)
            }
            Func::Round => {
                let digits = match args.as_slice() {
                    [] => 0,
                    [a] => match &a.kind {
                        NodeKind::Literal(Literal::Integer(i)) => u32::try_from(*i).ok()?,
                        _ => return None,
                    },
                    _ => return None,
                };
                let mut p = base_path(base.as_deref(), focus)?;
                p.ops.push(Op::Round(digits));
                p.ty = None;
                Some(p)
            }
            Func::Iif if base.is_none() && (2..=3).contains(&args.len()) => {
                let c = compile(&args[0], focus)?;
                let branch = |n: &Node| {
                    compile(n, focus).unwrap_or(FastPath {
                        ops: vec![Op::Unsupported],
                        ty: None,
                    })
                };
                let a = branch(&args[1]);
                let b = args.get(2).map(|n| Box::new(branch(n)));
                let ty = match &b {
                    Some(b) if b.ty == a.ty => a.ty,
                    None => a.ty,
                    _ => None,
                };
                Some(FastPath {
                    ops: vec![Op::Iif(Box::new(c), Box::new(a), b)],
                    ty,
                })
            }
            _ => None,
        },
        _ => None,
    }
}

fn base_path(base: Option<&Node>, focus: Option<&'static str>) -> Option<FastPath> {
    match base {
        None => Some(FastPath {
            ops: Vec::new(),
            ty: focus,
        }),
        Some(b) => compile(b, focus),
    }
}

/// `r` up to `/_history/` (as `split("/_history/").next()`).
#[inline]
fn strip_history(r: &str) -> &str {
    let b = r.as_bytes();
    let mut from = 0;
    while let Some(i) = memchr::memchr(b'_', &b[from..]) {
        let at = from + i;
        if at >= 1 && b[at - 1] == b'/' && b[at..].starts_with(b"_history/") {
            return &r[..at - 1];
        }
        from = at + 1;
    }
    r
}

fn push_member(doc: &Doc<'_>, i: u32, out: &mut Vec<FastValue>) {
    match doc.tape.kind(i) {
        Some(TapeKind::Null) | None => {}
        Some(TapeKind::Array) => {
            for c in doc.tape.children(i) {
                if doc.tape.kind(c) != Some(TapeKind::Null) {
                    out.push(FastValue::Node(c));
                }
            }
        }
        Some(_) => out.push(FastValue::Node(i)),
    }
}

/// An `iif` criterion's value: empty is false, one boolean is itself;
/// anything else (an error for the evaluator) is not decided here.
#[inline]
fn iif_condition(r: Result<(), Bail>, crit: &[FastValue]) -> Result<bool, Bail> {
    r?;
    match crit {
        [] => Ok(false),
        [FastValue::Bool(x)] => Ok(*x),
        _ => Err(Bail),
    }
}

/// The object nodes among `cur` (other nodes have no members); a value that
/// is not a node at all is for the full evaluator.
#[inline]
fn objects<'c>(
    doc: &'c Doc<'_>,
    cur: &'c [FastValue],
) -> Result<impl Iterator<Item = u32> + 'c, Bail> {
    if cur.iter().any(|v| !matches!(v, FastValue::Node(_))) {
        return Err(Bail);
    }
    Ok(cur.iter().filter_map(move |v| match *v {
        FastValue::Node(n) if doc.tape.kind(n) == Some(TapeKind::Object) => Some(n),
        _ => None,
    }))
}

fn apply(
    op: &Op,
    doc: &Doc<'_>,
    cur: &[FastValue],
    row_index: i64,
    out: &mut Vec<FastValue>,
    scratch: &mut Scratch,
) -> Result<(), Bail> {
    match op {
        Op::Member { keys, multi } => {
            for n in objects(doc, cur)? {
                if *multi {
                    for c in doc.tape.children(n) {
                        for k in keys {
                            if is_key(doc, c, &k.ukey, k.usym) {
                                return Err(Bail);
                            }
                            if is_key(doc, c, &k.key, k.sym) {
                                push_member(doc, c, out);
                            }
                        }
                    }
                } else if let Some(k) = keys.first() {
                    let mut found = None;
                    if n == 0
                        && k.sym != NO_SYMBOL
                        && k.usym != NO_SYMBOL
                        && scratch.root_index(doc)
                    {
                        if scratch.root_child(k.usym) != NO_NODE {
                            return Err(Bail);
                        }
                        let c = scratch.root_child(k.sym);
                        if c != NO_NODE {
                            found = Some(c);
                        }
                    } else if k.sym != NO_SYMBOL && k.usym != NO_SYMBOL {
                        // Tight loop over the recorded children by symbol.
                        let nodes = doc.tape.nodes();
                        let end = nodes.get(n as usize).map_or(0, |x| x.end) as usize;
                        let mut c = n as usize + 1;
                        while let Some(x) = nodes.get(c).filter(|_| c < end) {
                            if x.sym == k.sym {
                                found = Some(c as u32);
                            } else if x.sym == k.usym || x.sym == NO_SYMBOL {
                                // A `_x` twin, or a key recorded without a symbol.
                                if x.sym == k.usym || is_key(doc, c as u32, &k.ukey, NO_SYMBOL) {
                                    return Err(Bail);
                                }
                                if is_key(doc, c as u32, &k.key, NO_SYMBOL) {
                                    found = Some(c as u32);
                                }
                            }
                            c = x.end as usize;
                        }
                    } else {
                        for c in doc.tape.children(n) {
                            if is_key(doc, c, &k.key, k.sym) {
                                found = Some(c);
                            } else if is_key(doc, c, &k.ukey, k.usym) {
                                return Err(Bail);
                            }
                        }
                    }
                    if let Some(c) = found {
                        push_member(doc, c, out);
                    }
                }
            }
        }
        Op::First => out.extend(cur.first().copied()),
        Op::Exists => out.push(FastValue::Bool(!cur.is_empty())),
        Op::RowIndex => out.push(FastValue::Int(row_index)),
        Op::Unsupported => return Err(Bail),
        Op::ResourceKey(rt, idk) => {
            for n in objects(doc, cur)? {
                let mut has_rt = false;
                let mut id = None;
                for c in doc.tape.children(n) {
                    if is_key(doc, c, &rt.key, rt.sym) {
                        has_rt = true;
                    } else if is_key(doc, c, &idk.key, idk.sym) {
                        id = Some(c);
                    }
                }
                if let (true, Some(id)) = (has_rt, id)
                    && let Some(s) = doc.tape.str(doc.text, id)
                {
                    out.push(FastValue::Sub {
                        node: id,
                        start: 0,
                        len: s.len() as u32,
                    });
                }
            }
        }
        Op::ReferenceKey(want, rk) => {
            for n in objects(doc, cur)? {
                let mut reference = None;
                for c in doc.tape.children(n) {
                    if is_key(doc, c, &rk.key, rk.sym) {
                        reference = Some(c);
                    }
                }
                let Some(rn) = reference else { continue };
                let Some(r) = doc.tape.str(doc.text, rn) else {
                    continue;
                };
                let r = strip_history(r);
                // `rsplit('/')`: the last segment is the id, the one before the type.
                let Some(slash) = memchr::memrchr(b'/', r.as_bytes()) else {
                    continue;
                };
                let id = &r[slash + 1..];
                let head = &r[..slash];
                let ty = memchr::memrchr(b'/', head.as_bytes()).map_or(head, |i| &head[i + 1..]);
                if want.as_deref().is_none_or(|w| w == ty) {
                    out.push(FastValue::Sub {
                        node: rn,
                        start: (r.len() - id.len()) as u32,
                        len: id.len() as u32,
                    });
                }
            }
        }
        Op::Round(digits) => match cur {
            [] => {}
            [FastValue::Node(n)] => {
                let text = doc.tape.number(doc.text, *n).ok_or(Bail)?;
                // As `Value::to_system` reads a number of unknown type.
                let d = if !is_integer_text(text) {
                    number_decimal(text)
                } else {
                    number_i64(text)
                        .map(Decimal::from)
                        .or_else(|| number_decimal(text))
                }
                .ok_or(Bail)?;
                out.push(FastValue::Decimal(d.round_dp_with_strategy(
                    (*digits).min(28),
                    RoundingStrategy::MidpointAwayFromZero,
                )));
            }
            _ => return Err(Bail),
        },
        Op::Iif(c, a, b) => {
            let mut crit = scratch.take();
            let cond = iif_condition(c.eval(doc, cur, row_index, &mut crit, scratch), &crit);
            scratch.give(crit);
            if cond? {
                a.eval(doc, cur, row_index, out, scratch)?;
            } else if let Some(b) = b {
                b.eval(doc, cur, row_index, out, scratch)?;
            }
        }
    }
    Ok(())
}

/// Several fast paths over one focus, sharing their common prefixes:
/// `code.coding.first().code` and `code.coding.first().display` walk
/// `code.coding.first()` once per focus. Steps are evaluated lazily (an
/// `iif` branch not taken costs nothing) and memoised per focus.
#[derive(Debug, Clone, Default)]
pub struct PathSet {
    /// (parent step, or `None` for the focus; the op). Parents come first.
    steps: Vec<(Option<u32>, Op)>,
    outputs: Vec<Out>,
}

#[derive(Debug, Clone)]
enum Out {
    Focus,
    Step(u32),
    Iif(Box<Out>, Box<Out>, Option<Box<Out>>),
    /// A path the set cannot split into steps (ops after an `iif`).
    Whole(Box<FastPath>),
}

/// Per-focus memo of a [`PathSet`]; reuse it across resources.
#[derive(Debug, Default)]
pub struct PathSetState {
    /// Per step: `start << 32 | len` into `vals`, or `UNSET`.
    memo: Vec<u64>,
    vals: Vec<FastValue>,
}

const UNSET: u64 = u64::MAX;

fn same_op(a: &Op, b: &Op) -> bool {
    match (a, b) {
        (
            Op::Member {
                keys: ka,
                multi: ma,
            },
            Op::Member {
                keys: kb,
                multi: mb,
            },
        ) => ma == mb && ka.len() == kb.len() && ka.iter().zip(kb).all(|(x, y)| x.key == y.key),
        (Op::First, Op::First)
        | (Op::Unsupported, Op::Unsupported)
        | (Op::Exists, Op::Exists)
        | (Op::RowIndex, Op::RowIndex)
        | (Op::ResourceKey(..), Op::ResourceKey(..)) => true,
        (Op::ReferenceKey(wa, _), Op::ReferenceKey(wb, _)) => wa == wb,
        (Op::Round(a), Op::Round(b)) => a == b,
        _ => false,
    }
}

impl PathSet {
    pub fn new() -> PathSet {
        PathSet::default()
    }

    /// Add a path; returns its output number.
    pub fn add(&mut self, path: &FastPath) -> usize {
        let out = self.out_of(path);
        self.outputs.push(out);
        self.outputs.len() - 1
    }

    fn out_of(&mut self, path: &FastPath) -> Out {
        if let [Op::Iif(c, a, b)] = path.ops.as_slice() {
            let c = self.out_of(c);
            let a = self.out_of(a);
            let b = b.as_ref().map(|b| Box::new(self.out_of(b)));
            return Out::Iif(Box::new(c), Box::new(a), b);
        }
        if path.ops.iter().any(|o| matches!(o, Op::Iif(..))) {
            return Out::Whole(Box::new(path.clone()));
        }
        let mut parent: Option<u32> = None;
        for op in &path.ops {
            let found = self
                .steps
                .iter()
                .position(|(p, o)| *p == parent && same_op(o, op));
            parent = Some(match found {
                Some(i) => i as u32,
                None => {
                    self.steps.push((parent, op.clone()));
                    (self.steps.len() - 1) as u32
                }
            });
        }
        match parent {
            Some(s) => Out::Step(s),
            None => Out::Focus,
        }
    }

    /// Number of distinct steps (for tests and tuning).
    pub fn steps(&self) -> usize {
        self.steps.len()
    }

    /// [`FastPath::keys`] for every path of the set.
    pub fn keys(&mut self, trie: &mut KeyTrie, at: &[u32]) {
        let mut positions: Vec<Vec<u32>> = Vec::with_capacity(self.steps.len());
        for i in 0..self.steps.len() {
            let from = match self.steps[i].0 {
                Some(p) => positions.get(p as usize).cloned().unwrap_or_default(),
                None => at.to_vec(),
            };
            let mut one = FastPath {
                ops: vec![self.steps[i].1.clone()],
                ty: None,
            };
            let next = one.keys(trie, &from);
            if let Some(op) = one.ops.pop() {
                self.steps[i].1 = op;
            }
            positions.push(next);
        }
        fn whole(o: &mut Out, trie: &mut KeyTrie, at: &[u32]) {
            match o {
                Out::Whole(p) => {
                    p.keys(trie, at);
                }
                Out::Iif(c, a, b) => {
                    whole(c, trie, at);
                    whole(a, trie, at);
                    if let Some(b) = b {
                        whole(b, trie, at);
                    }
                }
                Out::Focus | Out::Step(_) => {}
            }
        }
        for o in &mut self.outputs {
            whole(o, trie, at);
        }
    }

    /// Start evaluating on a new focus.
    pub fn reset(&self, st: &mut PathSetState) {
        st.memo.clear();
        st.memo.resize(self.steps.len(), UNSET);
        st.vals.clear();
    }

    /// The values of output `i` on `focus`, appended to `out`. Call
    /// [`PathSet::reset`] before the first output of each focus.
    #[allow(clippy::too_many_arguments)]
    pub fn output(
        &self,
        i: usize,
        doc: &Doc<'_>,
        focus: FastValue,
        row_index: i64,
        st: &mut PathSetState,
        scratch: &mut Scratch,
        out: &mut Vec<FastValue>,
    ) -> Result<(), Bail> {
        let o = self.outputs.get(i).ok_or(Bail)?;
        self.out(o, doc, focus, row_index, st, scratch, out)
    }

    #[allow(clippy::too_many_arguments)]
    fn out(
        &self,
        o: &Out,
        doc: &Doc<'_>,
        focus: FastValue,
        row_index: i64,
        st: &mut PathSetState,
        scratch: &mut Scratch,
        out: &mut Vec<FastValue>,
    ) -> Result<(), Bail> {
        match o {
            Out::Focus => out.push(focus),
            Out::Step(s) => {
                let (a, n) = self.step(*s, doc, focus, row_index, st, scratch)?;
                out.extend_from_slice(&st.vals[a..a + n]);
            }
            Out::Whole(p) => p.eval(doc, &[focus], row_index, out, scratch)?,
            Out::Iif(c, a, b) => {
                let mut crit = scratch.take();
                let r = self.out(c, doc, focus, row_index, st, scratch, &mut crit);
                let cond = iif_condition(r, &crit);
                scratch.give(crit);
                if cond? {
                    self.out(a, doc, focus, row_index, st, scratch, out)?;
                } else if let Some(b) = b {
                    self.out(b, doc, focus, row_index, st, scratch, out)?;
                }
            }
        }
        Ok(())
    }

    /// The memoised values of step `s`: (start, len) in `st.vals`.
    fn step(
        &self,
        s: u32,
        doc: &Doc<'_>,
        focus: FastValue,
        row_index: i64,
        st: &mut PathSetState,
        scratch: &mut Scratch,
    ) -> Result<(usize, usize), Bail> {
        let m = *st.memo.get(s as usize).ok_or(Bail)?;
        if m != UNSET {
            return Ok(((m >> 32) as usize, (m & 0xffff_ffff) as usize));
        }
        let (parent, op) = self.steps.get(s as usize).ok_or(Bail)?;
        let (a, n) = match parent {
            Some(p) => self.step(*p, doc, focus, row_index, st, scratch)?,
            None => (usize::MAX, 0),
        };
        let start = st.vals.len();
        if a == usize::MAX {
            apply(op, doc, &[focus], row_index, &mut st.vals, scratch)?;
        } else if n <= 4 {
            // `apply` appends to `vals`, so its input must not borrow it.
            let mut buf = [FastValue::Bool(false); 4];
            buf[..n].copy_from_slice(&st.vals[a..a + n]);
            apply(op, doc, &buf[..n], row_index, &mut st.vals, scratch)?;
        } else {
            let mut input = scratch.take();
            input.extend_from_slice(&st.vals[a..a + n]);
            let r = apply(op, doc, &input, row_index, &mut st.vals, scratch);
            scratch.give(input);
            r?;
        }
        let n = st.vals.len() - start;
        st.memo[s as usize] = ((start as u64) << 32) | n as u64;
        Ok((start, n))
    }
}
