//! [`ViewSet`]: several compiled views run over resource JSON text, each
//! resource parsed once, on the fast path where possible.
//!
//! For every view whose paths all fall in the fast FHIRPath subset
//! ([`atlas_fhirpath::fast`]), a [`FastPlan`] mirrors the view's plan. A
//! resource is first parsed onto a projected tape that records only the
//! members those plans read (the union over all views, so one parse serves
//! every type); its `resourceType` picks the views. Each fast plan then
//! evaluates on the tape. Views without a fast plan, and any resource a fast
//! plan bails out of (a primitive extension, an unexpected JSON kind, several
//! values where one is allowed, ...), go through the full evaluator on a full
//! tree parsed once on demand — so results, errors and rejections are those
//! of [`CompiledView::append_tree`], only cheaper. `ATLAS_VIEWS_FAST=0`
//! turns the fast path off (for comparisons).

use crate::compile::{CompiledView, Iteration, PlanNode};
use crate::diag::RunError;
use crate::exec::{Cell, RowBuilder, Rows, decimal_cell, decimal_cell_from_text, product};
use crate::types::ColumnKind;
use atlas_fhirpath::ResourceResolver;
use atlas_fhirpath::fast::{Bail, Doc, FastPath, FastValue, PathSet, PathSetState, Scratch};
use atlas_fhirpath::json::tape::{KeyTrie, Tape, TapeKind};
use atlas_fhirpath::json::{self, JsonError, JsonValue};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

struct FastColumn {
    offset: usize,
    /// Output number in the node's [`PathSet`].
    out: usize,
    kind: ColumnKind,
    collection: bool,
}

struct FastNode {
    for_each: Option<FastPath>,
    paths: PathSet,
    columns: Vec<FastColumn>,
    children: Vec<FastNode>,
    union: Vec<FastNode>,
    start: usize,
    width: usize,
}

/// A view's plan over the fast subset.
struct FastPlan {
    wheres: Vec<FastPath>,
    root: FastNode,
}

fn fast_node(n: &PlanNode, focus: &str) -> Option<FastNode> {
    let (for_each, inner) = match &n.iter {
        Iteration::None => (None, focus.to_owned()),
        Iteration::ForEach(e) => {
            let p = FastPath::compile(e, focus)?;
            let ty = p.result_type()?.to_owned();
            (Some(p), ty)
        }
        Iteration::ForEachOrNull(_) | Iteration::Repeat(_) => return None,
    };
    let mut columns = Vec::new();
    let mut paths = PathSet::new();
    for c in &n.columns {
        let path = FastPath::compile(&c.expr, &inner)?;
        columns.push(FastColumn {
            offset: c.offset,
            out: paths.add(&path),
            kind: c.kind,
            collection: c.collection,
        });
    }
    let children = n
        .children
        .iter()
        .map(|c| fast_node(c, &inner))
        .collect::<Option<Vec<_>>>()?;
    let union = n
        .union
        .iter()
        .map(|c| fast_node(c, &inner))
        .collect::<Option<Vec<_>>>()?;
    Some(FastNode {
        for_each,
        paths,
        columns,
        children,
        union,
        start: n.start,
        width: n.width,
    })
}

impl FastPlan {
    fn compile(view: &CompiledView) -> Option<FastPlan> {
        let ty = view.resource_type();
        let wheres = view
            .wheres
            .iter()
            .map(|(e, _)| FastPath::compile(e, ty))
            .collect::<Option<Vec<_>>>()?;
        let root = fast_node(&view.root, ty)?;
        Some(FastPlan { wheres, root })
    }

    fn keys(&mut self, trie: &mut KeyTrie) {
        for w in &mut self.wheres {
            w.keys(trie, &[KeyTrie::ROOT]);
        }
        node_keys(&mut self.root, trie, &[KeyTrie::ROOT]);
    }
}

fn node_keys(n: &mut FastNode, trie: &mut KeyTrie, at: &[u32]) {
    let inner = match &mut n.for_each {
        Some(p) => p.keys(trie, at),
        None => at.to_vec(),
    };
    n.paths.keys(trie, &inner);
    for c in n.children.iter_mut().chain(n.union.iter_mut()) {
        node_keys(c, trie, &inner);
    }
}

/// Per-thread buffers of a [`ViewSet`] run.
#[derive(Default)]
pub struct ViewSetState {
    tape: Tape,
    scratch: Scratch,
    paths: PathSetState,
    /// Resources evaluated by fast plans / by the full evaluator (fallbacks included).
    pub fast_resources: u64,
    pub full_resources: u64,
}

impl ViewSetState {
    pub fn new() -> ViewSetState {
        ViewSetState::default()
    }
}

/// What happened to one resource text.
#[derive(Debug)]
pub enum Appended {
    /// Evaluated by every view of its type (errors went to the callback).
    Done,
    /// Not JSON (the error of [`atlas_fhirpath::json::parse`]).
    NotJson(JsonError),
    /// JSON, but no string `resourceType` at the top.
    NoResourceType,
    /// A resource type no view of the set reads.
    OtherType,
}

/// Several compiled views run together over resource text (see the module doc).
pub struct ViewSet {
    views: Vec<Arc<CompiledView>>,
    fast: Vec<Option<FastPlan>>,
    by_type: HashMap<String, Vec<usize>>,
    trie: KeyTrie,
    /// Whether any view has a fast plan (else every resource takes the full parse).
    any_fast: bool,
    resolver: Option<Arc<dyn ResourceResolver + Send + Sync>>,
}

impl std::fmt::Debug for ViewSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewSet")
            .field("views", &self.views.len())
            .field("fast", &self.fast_views())
            .finish()
    }
}

impl ViewSet {
    /// A set over `views`; builders passed to [`ViewSet::append`] follow this order.
    pub fn new(views: Vec<Arc<CompiledView>>) -> ViewSet {
        let enabled = std::env::var("ATLAS_VIEWS_FAST").map_or(true, |v| v != "0");
        Self::with_fast_path(views, enabled)
    }

    /// Like [`ViewSet::new`], choosing whether to use the fast path.
    pub fn with_fast_path(views: Vec<Arc<CompiledView>>, enabled: bool) -> ViewSet {
        let mut by_type: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, v) in views.iter().enumerate() {
            by_type
                .entry(v.resource_type().to_owned())
                .or_default()
                .push(i);
        }
        let mut fast: Vec<Option<FastPlan>> = views
            .iter()
            .map(|v| if enabled { FastPlan::compile(v) } else { None })
            .collect();
        let any_fast = fast.iter().any(Option::is_some);
        let mut trie = KeyTrie::new();
        trie.add(KeyTrie::ROOT, "resourceType");
        for p in fast.iter_mut().flatten() {
            p.keys(&mut trie);
        }
        ViewSet {
            views,
            fast,
            by_type,
            trie,
            any_fast,
            resolver: None,
        }
    }

    /// Resolve references to other resources (`resolve()`) with `r`, e.g. the
    /// lake's Medications for `medication_request`.
    pub fn with_resolver(mut self, r: Arc<dyn ResourceResolver + Send + Sync>) -> ViewSet {
        self.resolver = Some(r);
        self
    }

    /// Names of the views that have a fast plan (in set order; unnamed views are `?`).
    pub fn fast_views(&self) -> Vec<String> {
        self.views
            .iter()
            .zip(&self.fast)
            .filter(|(_, f)| f.is_some())
            .map(|(v, _)| v.name().unwrap_or("?").to_owned())
            .collect()
    }

    fn resolver(&self) -> Option<&dyn ResourceResolver> {
        self.resolver.as_deref().map(|r| r as &dyn ResourceResolver)
    }

    /// The views, in set order.
    pub fn views(&self) -> &[Arc<CompiledView>] {
        &self.views
    }

    /// One empty builder per view, in set order.
    pub fn row_builders(&self) -> Vec<RowBuilder> {
        self.views.iter().map(|v| v.row_builder()).collect()
    }

    /// Evaluate one resource's JSON text with every view of its type,
    /// appending to `builders` (one per view, set order). A view that fails
    /// on the resource appends nothing and reports `(view index, error)`.
    pub fn append(
        &self,
        text: &str,
        state: &mut ViewSetState,
        builders: &mut [RowBuilder],
        mut on_error: impl FnMut(usize, RunError),
    ) -> Appended {
        if !self.any_fast || state.tape.parse(text, &self.trie, KeyTrie::ROOT).is_err() {
            return self.append_full(text, state, builders, &mut on_error);
        }
        let tape = &state.tape;
        let Some(rt) = root_resource_type(text, tape) else {
            return Appended::NoResourceType;
        };
        let Some(views) = self.by_type.get(rt) else {
            return Appended::OtherType;
        };
        let doc = Doc { text, tape };
        let mut tree: Option<Result<JsonValue<'_>, JsonError>> = None;
        let mut counted_full = false;
        let mut counted_fast = false;
        for &v in views {
            if let Some(plan) = &self.fast[v] {
                // On `Bail`, fall through to the full evaluator below.
                if let Ok(rows) = run_fast(plan, &doc, &mut state.scratch, &mut state.paths) {
                    if let Some(b) = builders.get_mut(v) {
                        b.push_rows(&rows);
                    }
                    counted_fast = true;
                    continue;
                }
            }
            counted_full = true;
            let t = tree.get_or_insert_with(|| json::parse(text));
            match t {
                Ok(t) => {
                    if let Some(b) = builders.get_mut(v)
                        && let Err(e) = self.views[v].append_tree_with(t, b, self.resolver())
                    {
                        on_error(v, e);
                    }
                }
                // The tape accepted what the tree parser refuses: trust the tree parser.
                Err(e) => return Appended::NotJson(e.clone()),
            }
        }
        state.fast_resources += u64::from(counted_fast);
        state.full_resources += u64::from(counted_full);
        Appended::Done
    }

    fn append_full(
        &self,
        text: &str,
        state: &mut ViewSetState,
        builders: &mut [RowBuilder],
        on_error: &mut impl FnMut(usize, RunError),
    ) -> Appended {
        let tree = match json::parse(text) {
            Ok(t) => t,
            Err(e) => return Appended::NotJson(e),
        };
        let Some(rt) = tree.get("resourceType").and_then(JsonValue::as_str) else {
            return Appended::NoResourceType;
        };
        let Some(views) = self.by_type.get(rt) else {
            return Appended::OtherType;
        };
        state.full_resources += 1;
        for &v in views {
            if let Some(b) = builders.get_mut(v)
                && let Err(e) = self.views[v].append_tree_with(&tree, b, self.resolver())
            {
                on_error(v, e);
            }
        }
        Appended::Done
    }
}

/// The root's `resourceType` (the last one, as object lookup does), when a string.
fn root_resource_type<'t>(text: &'t str, tape: &'t Tape) -> Option<&'t str> {
    if tape.kind(0) != Some(TapeKind::Object) {
        return None;
    }
    let mut found = None;
    for c in tape.children(0) {
        if tape.key(text, c) == Some("resourceType") {
            found = Some(c);
        }
    }
    tape.str(text, found?)
}

fn run_fast<'t>(
    plan: &FastPlan,
    doc: &Doc<'t>,
    scratch: &mut Scratch,
    st: &mut PathSetState,
) -> Result<Rows<'t>, Bail> {
    let root = [FastValue::Node(0)];
    let mut vals = Vec::new();
    for w in &plan.wheres {
        vals.clear();
        w.eval(doc, &root, 0, &mut vals, scratch)?;
        match vals.as_slice() {
            [] | [FastValue::Bool(false)] => return Ok(Vec::new()),
            [FastValue::Bool(true)] => {}
            _ => return Err(Bail),
        }
    }
    node(&plan.root, doc, root[0], 0, scratch, st)
}

fn node<'t>(
    n: &FastNode,
    doc: &Doc<'t>,
    focus: FastValue,
    index: i64,
    scratch: &mut Scratch,
    st: &mut PathSetState,
) -> Result<Rows<'t>, Bail> {
    match &n.for_each {
        None => body(n, doc, focus, index, scratch, st),
        Some(p) => {
            let mut items = Vec::new();
            p.eval(doc, &[focus], index, &mut items, scratch)?;
            let mut rows = Vec::new();
            for (i, item) in items.iter().enumerate() {
                rows.extend(body(n, doc, *item, i as i64, scratch, st)?);
            }
            Ok(rows)
        }
    }
}

fn body<'t>(
    n: &FastNode,
    doc: &Doc<'t>,
    focus: FastValue,
    index: i64,
    scratch: &mut Scratch,
    st: &mut PathSetState,
) -> Result<Rows<'t>, Bail> {
    // A select that only wraps one select covering the same slots (the usual
    // `"select": [{"column": [...]}]`): its rows are the child's.
    if let ([child], [], []) = (
        n.children.as_slice(),
        n.columns.as_slice(),
        n.union.as_slice(),
    ) && child.start == n.start
        && child.width == n.width
    {
        return node(child, doc, focus, index, scratch, st);
    }
    let mut base = vec![Cell::Null; n.width];
    let mut vals = Vec::new();
    n.paths.reset(st);
    for c in &n.columns {
        vals.clear();
        n.paths
            .output(c.out, doc, focus, index, st, scratch, &mut vals)?;
        let cell = column_cell(&vals, c, doc)?;
        if let Some(slot) = base.get_mut(c.offset) {
            *slot = cell;
        }
    }
    let mut rows = vec![base];
    for child in &n.children {
        let child_rows = node(child, doc, focus, index, scratch, st)?;
        rows = product(rows, &child_rows, child.start - n.start);
    }
    if !n.union.is_empty() {
        let mut union_rows = Vec::new();
        let mut offset = 0;
        for branch in &n.union {
            union_rows.extend(node(branch, doc, focus, index, scratch, st)?);
            offset = branch.start - n.start;
        }
        rows = product(rows, &union_rows, offset);
    }
    Ok(rows)
}

fn item_cell<'t>(v: &FastValue, kind: ColumnKind, doc: &Doc<'t>) -> Result<Cell<'t>, Bail> {
    match (kind, v) {
        (ColumnKind::Utf8, FastValue::Node(_) | FastValue::Sub { .. }) => v
            .as_str(doc)
            .map(|s| Cell::Str(Cow::Borrowed(s)))
            .ok_or(Bail),
        (ColumnKind::Boolean, FastValue::Bool(b)) => Ok(Cell::Bool(*b)),
        (ColumnKind::Boolean, FastValue::Node(n)) => match doc.tape.kind(*n) {
            Some(TapeKind::True) => Ok(Cell::Bool(true)),
            Some(TapeKind::False) => Ok(Cell::Bool(false)),
            _ => Err(Bail),
        },
        (ColumnKind::Int64, FastValue::Int(i)) => Ok(Cell::Int(*i)),
        (ColumnKind::Decimal, FastValue::Node(n)) => {
            let text = doc.tape.number(doc.text, *n).ok_or(Bail)?;
            decimal_cell_from_text(text)
                .map(Cell::Dec)
                .map_err(|_| Bail)
        }
        (ColumnKind::Decimal, FastValue::Decimal(d)) => {
            decimal_cell(*d).map(Cell::Dec).map_err(|_| Bail)
        }
        _ => Err(Bail),
    }
}

fn column_cell<'t>(vals: &[FastValue], c: &FastColumn, doc: &Doc<'t>) -> Result<Cell<'t>, Bail> {
    if c.collection {
        return vals
            .iter()
            .map(|v| item_cell(v, c.kind, doc))
            .collect::<Result<Vec<_>, _>>()
            .map(Cell::List);
    }
    match vals {
        [] => Ok(Cell::Null),
        [v] => item_cell(v, c.kind, doc),
        _ => Err(Bail),
    }
}
