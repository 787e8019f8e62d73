//! Running a compiled view: FHIRPath results go straight into Arrow builders.
//!
//! Per resource, the plan is walked once: each select node yields its rows as
//! slices of typed cells (borrowing strings from the resource), sibling nodes
//! are combined by cartesian product, `unionAll` branches by concatenation.
//! Values are converted to the column type while the rows are built, so a
//! failing resource leaves the builders untouched. Resource numbers going to
//! decimal columns are converted from their JSON text straight to the
//! Decimal128 value ([`decimal_cell_from_text`]), never through `f64`.

use crate::compile::{CompiledView, ConstValue, Iteration, PlanColumn, PlanNode};
use crate::diag::{RunError, ViewError};
use crate::types::{ColumnKind, DECIMAL_PRECISION, DECIMAL_SCALE};
use arrow::array::{
    ArrayBuilder, ArrayRef, BooleanBuilder, Decimal128Builder, Int64Builder, ListBuilder,
    StringBuilder,
};
use arrow::datatypes::{Field, SchemaRef};
use arrow::record_batch::RecordBatch;
use atlas_fhirpath::json::{self, JsonRef, JsonValue, Kind, NumberRef};
use atlas_fhirpath::{Collection, EvalContext, FhirNode, ResourceResolver, Value};
use rust_decimal::Decimal;
use serde_json::Value as Json;
use std::borrow::Cow;
use std::sync::Arc;

/// Deepest `repeat` recursion before it is reported as an error.
const MAX_REPEAT_DEPTH: usize = 64;

/// One typed value of a row, before it is appended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Cell<'a> {
    Null,
    Str(Cow<'a, str>),
    Bool(bool),
    Int(i64),
    /// Unscaled Decimal128 value at [`DECIMAL_SCALE`].
    Dec(i128),
    List(Vec<Cell<'a>>),
}

trait ItemBuilder: ArrayBuilder {
    fn push(&mut self, c: &Cell<'_>);
    fn push_null(&mut self);
}

impl ItemBuilder for StringBuilder {
    fn push(&mut self, c: &Cell<'_>) {
        match c {
            Cell::Str(s) => self.append_value(s),
            _ => self.append_null(),
        }
    }
    fn push_null(&mut self) {
        self.append_null()
    }
}

impl ItemBuilder for BooleanBuilder {
    fn push(&mut self, c: &Cell<'_>) {
        match c {
            Cell::Bool(b) => self.append_value(*b),
            _ => self.append_null(),
        }
    }
    fn push_null(&mut self) {
        self.append_null()
    }
}

impl ItemBuilder for Int64Builder {
    fn push(&mut self, c: &Cell<'_>) {
        match c {
            Cell::Int(i) => self.append_value(*i),
            _ => self.append_null(),
        }
    }
    fn push_null(&mut self) {
        self.append_null()
    }
}

impl ItemBuilder for Decimal128Builder {
    fn push(&mut self, c: &Cell<'_>) {
        match c {
            Cell::Dec(d) => self.append_value(*d),
            _ => self.append_null(),
        }
    }
    fn push_null(&mut self) {
        self.append_null()
    }
}

trait ColumnSink: Send {
    fn append(&mut self, cell: &Cell<'_>);
    fn finish(&mut self) -> ArrayRef;
}

struct ScalarSink<B>(B);

impl<B: ItemBuilder> ColumnSink for ScalarSink<B> {
    fn append(&mut self, cell: &Cell<'_>) {
        match cell {
            Cell::Null | Cell::List(_) => self.0.push_null(),
            c => self.0.push(c),
        }
    }
    fn finish(&mut self) -> ArrayRef {
        self.0.finish()
    }
}

struct ListSink<B: ArrayBuilder>(ListBuilder<B>);

impl<B: ItemBuilder> ColumnSink for ListSink<B> {
    fn append(&mut self, cell: &Cell<'_>) {
        match cell {
            Cell::List(items) => {
                for i in items {
                    self.0.values().push(i);
                }
                self.0.append(true);
            }
            _ => self.0.append(false),
        }
    }
    fn finish(&mut self) -> ArrayRef {
        Arc::new(self.0.finish())
    }
}

fn decimal_builder() -> Decimal128Builder {
    Decimal128Builder::new()
        .with_precision_and_scale(DECIMAL_PRECISION, DECIMAL_SCALE)
        .unwrap_or_default()
}

fn sink(kind: ColumnKind, collection: bool) -> Box<dyn ColumnSink> {
    fn list<B: ItemBuilder>(b: B, kind: ColumnKind) -> Box<dyn ColumnSink> {
        Box::new(ListSink(ListBuilder::new(b).with_field(Arc::new(
            Field::new_list_field(kind.item_type(), true),
        ))))
    }
    match (kind, collection) {
        (ColumnKind::Utf8, false) => Box::new(ScalarSink(StringBuilder::new())),
        (ColumnKind::Boolean, false) => Box::new(ScalarSink(BooleanBuilder::new())),
        (ColumnKind::Int64, false) => Box::new(ScalarSink(Int64Builder::new())),
        (ColumnKind::Decimal, false) => Box::new(ScalarSink(decimal_builder())),
        (ColumnKind::Utf8, true) => list(StringBuilder::new(), kind),
        (ColumnKind::Boolean, true) => list(BooleanBuilder::new(), kind),
        (ColumnKind::Int64, true) => list(Int64Builder::new(), kind),
        (ColumnKind::Decimal, true) => list(decimal_builder(), kind),
    }
}

/// Accumulates the rows of one compiled view; [`RowBuilder::finish`] makes a batch.
pub struct RowBuilder {
    schema: SchemaRef,
    sinks: Vec<Box<dyn ColumnSink>>,
    rows: usize,
}

impl std::fmt::Debug for RowBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowBuilder")
            .field("schema", &self.schema)
            .field("rows", &self.rows)
            .finish()
    }
}

impl RowBuilder {
    /// An empty builder for the view's schema.
    pub fn new(view: &CompiledView) -> RowBuilder {
        RowBuilder {
            schema: view.schema(),
            sinks: view
                .columns
                .iter()
                .map(|c| sink(c.kind, c.collection))
                .collect(),
            rows: 0,
        }
    }

    /// Rows appended since the last [`RowBuilder::finish`].
    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// The rows so far as a batch; the builder is empty afterwards and can be reused.
    pub fn finish(&mut self) -> Result<RecordBatch, ViewError> {
        let arrays: Vec<ArrayRef> = self.sinks.iter_mut().map(|s| s.finish()).collect();
        let rows = std::mem::take(&mut self.rows);
        let options = arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(rows));
        RecordBatch::try_new_with_options(self.schema.clone(), arrays, &options)
            .map_err(|e| ViewError::Arrow(e.to_string()))
    }

    pub(crate) fn push_rows(&mut self, rows: &[Vec<Cell<'_>>]) {
        for row in rows {
            for (sink, cell) in self.sinks.iter_mut().zip(row) {
                sink.append(cell);
            }
        }
        self.rows += rows.len();
    }
}

pub(crate) type Rows<'a> = Vec<Vec<Cell<'a>>>;

struct Run<'a> {
    view: &'a CompiledView,
    resource: JsonRef<'a>,
    ctx: EvalContext<'a>,
}

fn resource_label(resource: JsonRef<'_>) -> Option<String> {
    let rt = resource.get("resourceType")?.as_str()?;
    Some(match resource.get("id").and_then(JsonRef::as_str) {
        Some(id) => format!("{rt}/{id}"),
        None => rt.to_string(),
    })
}

/// `10^n` as i128.
fn pow10(n: u32) -> i128 {
    10i128.pow(n)
}

pub(crate) fn decimal_cell(d: Decimal) -> Result<i128, String> {
    let d = d.normalize();
    let scale = d.scale();
    let target = DECIMAL_SCALE as u32;
    if scale > target {
        return Err(format!(
            "decimal {d} has more than {target} fraction digits (Decimal128({DECIMAL_PRECISION}, {DECIMAL_SCALE}))"
        ));
    }
    let v = d
        .mantissa()
        .checked_mul(pow10(target - scale))
        .filter(|v| v.unsigned_abs() < pow10(DECIMAL_PRECISION as u32) as u128)
        .ok_or_else(|| {
            format!("decimal {d} does not fit Decimal128({DECIMAL_PRECISION}, {DECIMAL_SCALE})")
        })?;
    Ok(v)
}

/// Exact Decimal128 cell from a JSON number's text (`-?int(.frac)?(e±exp)?`),
/// without a detour through `Decimal` (which holds only 28 digits). Values
/// with more than [`DECIMAL_SCALE`] significant fraction digits or more than
/// [`DECIMAL_PRECISION`] digits are errors, never rounded.
pub(crate) fn decimal_cell_from_text(text: &str) -> Result<i128, String> {
    let target = DECIMAL_SCALE as i64;
    let bad = || format!("{text} is not a JSON number");
    let (neg, body) = match text.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, text),
    };
    let (mantissa, exp) = match body.split_once(['e', 'E']) {
        Some((m, e)) => {
            let e = e.strip_prefix('+').unwrap_or(e);
            if e.is_empty() || e == "-" {
                return Err(bad());
            }
            // Clamp absurd exponents; they fail the range checks below anyway.
            let e: i64 = match e.parse() {
                Ok(v) => v,
                Err(_) if e.bytes().all(|b| b.is_ascii_digit() || b == b'-') => {
                    if e.starts_with('-') {
                        i64::MIN / 4
                    } else {
                        i64::MAX / 4
                    }
                }
                Err(_) => return Err(bad()),
            };
            (m, e)
        }
        None => (body, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    // value = digits * 10^(exp - frac.len()); the cell is value * 10^target.
    let digits = format!("{int}{frac}");
    let digits = digits.trim_start_matches('0');
    let trimmed = digits.trim_end_matches('0');
    if trimmed.is_empty() {
        return Ok(0);
    }
    let power = exp
        .saturating_sub(frac.len() as i64)
        .saturating_add((digits.len() - trimmed.len()) as i64)
        .saturating_add(target);
    if power < 0 {
        return Err(format!(
            "decimal {text} has more than {DECIMAL_SCALE} fraction digits (Decimal128({DECIMAL_PRECISION}, {DECIMAL_SCALE}))"
        ));
    }
    let too_big =
        || format!("decimal {text} does not fit Decimal128({DECIMAL_PRECISION}, {DECIMAL_SCALE})");
    if trimmed.len() as i64 + power > DECIMAL_PRECISION as i64 {
        return Err(too_big());
    }
    let mut v: i128 = trimmed.parse().map_err(|_| too_big())?;
    v = v.checked_mul(pow10(power as u32)).ok_or_else(too_big)?;
    Ok(if neg { -v } else { v })
}

fn type_text(v: &Value<'_>) -> String {
    let (ns, name) = v.type_name();
    format!("{ns}.{name}")
}

/// Convert one item to a cell of `kind`; `Ok(None)` when the item has no value
/// (a primitive with only an extension).
fn item_cell<'a>(v: &Value<'a>, kind: ColumnKind) -> Result<Option<Cell<'a>>, String> {
    if let Value::Node(FhirNode { json: None, .. }) = v {
        return Ok(None);
    }
    let node_kind = match v {
        Value::Node(FhirNode { json: Some(j), .. }) => Some(j.kind()),
        _ => None,
    };
    match kind {
        ColumnKind::Utf8 => Ok(Some(Cell::Str(match (node_kind, v) {
            (Some(Kind::String(s)), _) => Cow::Borrowed(s),
            (
                Some(Kind::Object(_) | Kind::Array(_)),
                Value::Node(FhirNode { json: Some(j), .. }),
            ) => Cow::Owned(j.to_json_string()),
            (_, v) => match v {
                Value::String(s) => s.clone(),
                other => match other.to_fhirpath_string() {
                    Some(s) => Cow::Owned(s),
                    None => Cow::Owned(other.to_json().to_string()),
                },
            },
        }))),
        ColumnKind::Boolean => match v.to_system() {
            Some(Value::Boolean(b)) => Ok(Some(Cell::Bool(b))),
            _ => Err(format!("expected a boolean, got {}", type_text(v))),
        },
        ColumnKind::Int64 => match v.to_system() {
            Some(Value::Integer(i)) => Ok(Some(Cell::Int(i))),
            _ => Err(format!("expected an integer, got {}", type_text(v))),
        },
        ColumnKind::Decimal if matches!(node_kind, Some(Kind::Number(_))) => {
            let Some(Kind::Number(n)) = node_kind else {
                return Ok(None);
            };
            let text = match n {
                NumberRef::Text(t) => Cow::Borrowed(t),
                NumberRef::Serde(_) => Cow::Owned(n.text().into_owned()),
            };
            decimal_cell_from_text(&text).map(|d| Some(Cell::Dec(d)))
        }
        ColumnKind::Decimal => match v.to_system() {
            Some(Value::Integer(i)) => decimal_cell(Decimal::from(i)).map(|d| Some(Cell::Dec(d))),
            Some(Value::Decimal(d)) => decimal_cell(d).map(|d| Some(Cell::Dec(d))),
            _ => Err(format!("expected a decimal, got {}", type_text(v))),
        },
    }
}

fn column_cell<'a>(values: Collection<'a>, col: &PlanColumn) -> Result<Cell<'a>, String> {
    if col.collection {
        let mut items = Vec::with_capacity(values.len());
        for v in values.iter() {
            if let Some(c) = item_cell(v, col.kind)? {
                items.push(c);
            }
        }
        return Ok(Cell::List(items));
    }
    match values.as_slice() {
        [] => Ok(Cell::Null),
        [v] => Ok(item_cell(v, col.kind)?.unwrap_or(Cell::Null)),
        many => Err(format!(
            "returned {} values; a column that is not 'collection: true' takes at most one",
            many.len()
        )),
    }
}

impl<'a> Run<'a> {
    fn err(&self, path: &str, message: impl Into<String>) -> RunError {
        RunError {
            resource: resource_label(self.resource),
            path: path.to_string(),
            message: message.into(),
        }
    }

    fn eval(
        &self,
        expr: &'a atlas_fhirpath::Expr,
        focus: &Value<'a>,
        path: &str,
    ) -> Result<Collection<'a>, RunError> {
        expr.evaluate_ref_on(
            Collection::from(vec![focus.clone()]),
            self.resource,
            &self.ctx,
        )
        .map_err(|e| self.err(path, e.to_string()))
    }

    fn node(
        &mut self,
        node: &'a PlanNode,
        focus: &Value<'a>,
        index: i64,
    ) -> Result<Rows<'a>, RunError> {
        match &node.iter {
            Iteration::None => self.body(node, focus, index),
            Iteration::ForEach(e) | Iteration::ForEachOrNull(e) => {
                let items = self.eval(e, focus, &node.iter_path)?;
                if items.is_empty() && matches!(node.iter, Iteration::ForEachOrNull(_)) {
                    let mut row = vec![Cell::Null; node.width];
                    self.null_row(node, 0, &mut row, 0)?;
                    return Ok(vec![row]);
                }
                let mut rows = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    rows.extend(self.body(node, item, i as i64)?);
                }
                Ok(rows)
            }
            Iteration::Repeat(paths) => {
                let mut items = Vec::new();
                self.repeat(paths, focus, &mut items, 0, &node.iter_path)?;
                let mut rows = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    rows.extend(self.body(node, item, i as i64)?);
                }
                Ok(rows)
            }
        }
    }

    /// The row of an empty `forEachOrNull`: all columns null, except those
    /// computed from `%rowIndex` alone, evaluated on an empty focus.
    fn null_row(
        &mut self,
        node: &'a PlanNode,
        index: i64,
        row: &mut [Cell<'a>],
        base: usize,
    ) -> Result<(), RunError> {
        self.ctx
            .set_variable("rowIndex", vec![Value::Integer(index)]);
        for col in node.columns.iter().filter(|c| c.uses_row_index) {
            let values = col
                .expr
                .evaluate_ref_on(Collection::empty(), self.resource, &self.ctx)
                .map_err(|e| self.err(&col.path, e.to_string()))?;
            if let Some(slot) = row.get_mut(base + col.offset) {
                *slot = column_cell(values, col).map_err(|m| self.err(&col.path, m))?;
            }
        }
        for child in node.children.iter().chain(node.union.first()) {
            self.null_row(child, index, row, base + child.start - node.start)?;
        }
        Ok(())
    }

    fn repeat(
        &self,
        paths: &'a [atlas_fhirpath::Expr],
        focus: &Value<'a>,
        out: &mut Vec<Value<'a>>,
        depth: usize,
        path: &str,
    ) -> Result<(), RunError> {
        if depth >= MAX_REPEAT_DEPTH {
            return Err(self.err(
                path,
                format!("repeat went deeper than {MAX_REPEAT_DEPTH} levels"),
            ));
        }
        for p in paths {
            for child in self.eval(p, focus, path)? {
                out.push(child.clone());
                self.repeat(paths, &child, out, depth + 1, path)?;
            }
        }
        Ok(())
    }

    fn body(
        &mut self,
        node: &'a PlanNode,
        focus: &Value<'a>,
        index: i64,
    ) -> Result<Rows<'a>, RunError> {
        self.ctx
            .set_variable("rowIndex", vec![Value::Integer(index)]);
        let mut base = vec![Cell::Null; node.width];
        for col in &node.columns {
            let values = self.eval(&col.expr, focus, &col.path)?;
            base[col.offset] = column_cell(values, col).map_err(|m| self.err(&col.path, m))?;
        }
        let mut rows = vec![base];
        for child in &node.children {
            let child_rows = self.node(child, focus, index)?;
            self.ctx
                .set_variable("rowIndex", vec![Value::Integer(index)]);
            rows = product(rows, &child_rows, child.start - node.start);
        }
        if !node.union.is_empty() {
            let mut union_rows = Vec::new();
            let mut offset = 0;
            for branch in &node.union {
                union_rows.extend(self.node(branch, focus, index)?);
                self.ctx
                    .set_variable("rowIndex", vec![Value::Integer(index)]);
                offset = branch.start - node.start;
            }
            // All branches cover the same slots.
            rows = product(rows, &union_rows, offset);
        }
        Ok(rows)
    }
}

/// Every row of `left` combined with every row of `right` (written at `offset`).
pub(crate) fn product<'a>(left: Rows<'a>, right: &Rows<'a>, offset: usize) -> Rows<'a> {
    if right.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(left.len() * right.len());
    for l in left {
        // The last combination takes `l` itself instead of a copy.
        let (last, rest) = match right.split_last() {
            Some(x) => x,
            None => continue,
        };
        let fill = |mut row: Vec<Cell<'a>>, r: &[Cell<'a>]| {
            for (i, c) in r.iter().enumerate() {
                if let Some(slot) = row.get_mut(offset + i) {
                    *slot = c.clone();
                }
            }
            row
        };
        for r in rest {
            out.push(fill(l.clone(), r));
        }
        out.push(fill(l, last));
    }
    out
}

impl CompiledView {
    /// An empty [`RowBuilder`] for this view.
    pub fn row_builder(&self) -> RowBuilder {
        RowBuilder::new(self)
    }

    /// Evaluate the view over one resource and append its rows; returns how
    /// many. Resources of another type give no rows. On error nothing is appended.
    ///
    /// Numbers are what serde_json kept (decimals went through `f64`); prefer
    /// [`CompiledView::append_json_text`] when you have the resource's text.
    pub fn append(&self, resource: &Json, out: &mut RowBuilder) -> Result<usize, RunError> {
        self.append_ref(JsonRef::Serde(resource), out, None)
    }

    /// [`CompiledView::append`] over a [`JsonValue`] tree (exact numbers).
    pub fn append_tree(
        &self,
        resource: &JsonValue<'_>,
        out: &mut RowBuilder,
    ) -> Result<usize, RunError> {
        self.append_ref(JsonRef::Tree(resource), out, None)
    }

    /// [`CompiledView::append_tree`] with a resolver for `resolve()` on
    /// references to other resources (contained ones resolve without it).
    pub fn append_tree_with(
        &self,
        resource: &JsonValue<'_>,
        out: &mut RowBuilder,
        resolver: Option<&dyn ResourceResolver>,
    ) -> Result<usize, RunError> {
        self.append_ref(JsonRef::Tree(resource), out, resolver)
    }

    /// Every FHIRPath expression of the view: `where`s, iterations, columns.
    fn expressions(&self) -> Vec<&atlas_fhirpath::Expr> {
        fn node<'a>(n: &'a PlanNode, out: &mut Vec<&'a atlas_fhirpath::Expr>) {
            match &n.iter {
                Iteration::None => {}
                Iteration::ForEach(e) | Iteration::ForEachOrNull(e) => out.push(e),
                Iteration::Repeat(es) => out.extend(es),
            }
            out.extend(n.columns.iter().map(|c| &c.expr));
            for c in n.children.iter().chain(&n.union) {
                node(c, out);
            }
        }
        let mut out: Vec<&atlas_fhirpath::Expr> = self.wheres.iter().map(|(e, _)| e).collect();
        node(&self.root, &mut out);
        out
    }

    /// The resource types the view resolves references to, from its
    /// `resolve().ofType(T)` paths (e.g. `Medication`).
    pub fn resolved_types(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for t in self.expressions().iter().flat_map(|e| e.resolved_types()) {
            if !out.contains(&t) {
                out.push(t);
            }
        }
        out
    }

    /// Whether any path of the view calls `resolve()`: its rows then may
    /// depend on resources other than their own (of
    /// [`resolved_types`](Self::resolved_types)).
    pub fn uses_resolve(&self) -> bool {
        self.expressions().iter().any(|e| e.calls("resolve"))
    }

    /// Parse one resource's JSON text with [`atlas_fhirpath::json::parse`] and
    /// append its rows (see [`CompiledView::append`]). Decimal columns get the
    /// exact value written in the text. A syntax error is a [`RunError`]
    /// naming the byte offset.
    pub fn append_json_text(&self, text: &str, out: &mut RowBuilder) -> Result<usize, RunError> {
        let tree = json::parse(text).map_err(|e| RunError {
            resource: None,
            path: "(resource JSON)".to_string(),
            message: e.to_string(),
        })?;
        self.append_tree(&tree, out)
    }

    fn append_ref(
        &self,
        resource: JsonRef<'_>,
        out: &mut RowBuilder,
        resolver: Option<&dyn ResourceResolver>,
    ) -> Result<usize, RunError> {
        let rows = self.rows(resource, resolver)?;
        out.push_rows(&rows);
        Ok(rows.len())
    }

    fn rows<'a>(
        &'a self,
        resource: JsonRef<'a>,
        resolver: Option<&'a dyn ResourceResolver>,
    ) -> Result<Rows<'a>, RunError> {
        if resource.get("resourceType").and_then(JsonRef::as_str) != Some(self.resource.as_str()) {
            return Ok(Vec::new());
        }
        let mut ctx = EvalContext::new();
        if let Some(r) = resolver {
            ctx = ctx.with_resolver(r);
        }
        for (name, value) in &self.constants {
            let v = match value {
                ConstValue::Node(json, ty) => Value::Node(FhirNode {
                    json: Some(JsonRef::Serde(json)),
                    element: None,
                    ty: *ty,
                }),
                ConstValue::Integer(i) => Value::Integer(*i),
            };
            ctx.set_variable(name, vec![v]);
        }
        ctx.set_variable("rowIndex", vec![Value::Integer(0)]);
        let mut run = Run {
            view: self,
            resource,
            ctx,
        };
        let root = Value::Node(FhirNode {
            json: Some(resource),
            element: None,
            ty: self.resource_key,
        });
        for (expr, path) in &run.view.wheres {
            let r = run.eval(expr, &root, path)?;
            match r.as_slice() {
                [] => return Ok(Vec::new()),
                [v] => match v.to_system() {
                    Some(Value::Boolean(true)) => {}
                    Some(Value::Boolean(false)) => return Ok(Vec::new()),
                    _ => {
                        return Err(
                            run.err(path, format!("must return a boolean, got {}", type_text(v)))
                        );
                    }
                },
                many => {
                    return Err(run.err(
                        path,
                        format!("must return one boolean, got {} items", many.len()),
                    ));
                }
            }
        }
        run.node(&self.root, &root, 0)
    }

    /// Run the view over resources into one batch. Stops at the first error.
    pub fn run<'r>(
        &self,
        resources: impl IntoIterator<Item = &'r Json>,
    ) -> Result<RecordBatch, ViewError> {
        let mut b = self.row_builder();
        for r in resources {
            self.append(r, &mut b)?;
        }
        b.finish()
    }
}
