//! Compilation: a [`ViewDefinition`] becomes a [`CompiledView`] plan, once.
//!
//! Every FHIRPath expression is parsed and statically checked against the
//! FHIR R4 model with the type of its focus (the view's resource, or the items
//! of the enclosing `forEach`), and with the view's constants and `%rowIndex`
//! as the only user variables. The checker's inferred result type drives:
//! * collection rules: a column whose path can return several items without
//!   `collection: true` gets a warning ([`CompiledView::warnings`]); returning
//!   several values for a resource is then a run-time error (the suites use
//!   such paths, e.g. `name.family` where each test patient has one name);
//! * column types: untyped columns get the inferred type; a declared type that
//!   cannot hold the inferred one (`boolean` for a string path) is rejected;
//! * `where` paths must be able to return a Boolean.
//!
//! Where the checker cannot know the type (`Any`, e.g. inside `repeat` or after
//! `resolve()`), only the run-time checks apply.

use crate::definition::{Constant, Select, ViewDefinition};
use crate::diag::{Diagnostic, ViewError};
use crate::types::ColumnKind;
use arrow::datatypes::{Field, Schema, SchemaRef};
use atlas_fhirpath::{CheckOptions, Expr, ExprType};
use serde_json::Value as Json;
use std::sync::Arc;

/// Compiles views; holds the checker options.
#[derive(Debug, Clone, Default)]
pub struct ViewCompiler {
    /// Options for the FHIRPath static checker.
    pub check_options: CheckOptions,
}

/// A column of the output, in schema order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnInfo {
    pub name: String,
    pub kind: ColumnKind,
    pub collection: bool,
    /// Where the column is declared in the view (`select[0].column[1]`); for
    /// `unionAll` columns, the first branch.
    pub view_path: String,
}

/// How a select node iterates over its focus.
#[derive(Debug, Clone)]
pub(crate) enum Iteration {
    None,
    ForEach(Expr),
    ForEachOrNull(Expr),
    Repeat(Vec<Expr>),
}

#[derive(Debug, Clone)]
pub(crate) struct PlanColumn {
    /// Index in the node's row slice (`slot - node.start` is precomputed here).
    pub offset: usize,
    /// Whether the path uses `%rowIndex` (such columns keep their value in the
    /// null row of an empty `forEachOrNull`).
    pub uses_row_index: bool,
    pub expr: Expr,
    pub path: String,
    pub kind: ColumnKind,
    pub collection: bool,
}

/// One select node of the plan. Its rows cover the slots `start..start + width`.
#[derive(Debug, Clone)]
pub(crate) struct PlanNode {
    pub iter: Iteration,
    /// View path of the iteration expression (for errors).
    pub iter_path: String,
    pub columns: Vec<PlanColumn>,
    pub children: Vec<PlanNode>,
    pub union: Vec<PlanNode>,
    pub start: usize,
    pub width: usize,
}

/// A constant's run-time value.
#[derive(Debug, Clone)]
pub(crate) enum ConstValue {
    /// A typed FHIR primitive node (the JSON as written, with its model type key).
    Node(Json, Option<&'static str>),
    Integer(i64),
}

/// A compiled view: the plan and the output schema. Compile once, run over
/// any number of resources (see [`crate::RowBuilder`]).
#[derive(Debug, Clone)]
pub struct CompiledView {
    pub(crate) name: Option<String>,
    pub(crate) resource: String,
    pub(crate) resource_key: Option<&'static str>,
    pub(crate) schema: SchemaRef,
    pub(crate) columns: Vec<ColumnInfo>,
    pub(crate) constants: Vec<(String, ConstValue)>,
    pub(crate) wheres: Vec<(Expr, String)>,
    pub(crate) root: PlanNode,
    pub(crate) warnings: Vec<Diagnostic>,
}

impl CompiledView {
    /// Read, validate and compile a ViewDefinition JSON in one step.
    pub fn from_json(json: &Json) -> Result<CompiledView, Vec<Diagnostic>> {
        let view = ViewDefinition::from_json(json)?;
        ViewCompiler::default().compile(&view)
    }

    /// Like [`CompiledView::from_json`], as a [`ViewError`].
    pub fn try_from_json(json: &Json) -> Result<CompiledView, ViewError> {
        Self::from_json(json).map_err(ViewError::Invalid)
    }

    /// The Arrow schema of the rows.
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// The output columns, in schema order.
    pub fn columns(&self) -> &[ColumnInfo] {
        &self.columns
    }

    /// The resource type the view reads; other resources give no rows.
    pub fn resource_type(&self) -> &str {
        &self.resource
    }

    /// Findings that do not stop the view but may fail at run time, e.g. a
    /// column path that can return several values without `collection: true`
    /// (an error only for resources where it does).
    pub fn warnings(&self) -> &[Diagnostic] {
        &self.warnings
    }

    /// The view's `name`, if any.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }
}

struct Ctx<'c> {
    resource: &'c str,
    vars: Vec<(String, ExprType)>,
    opts: &'c CheckOptions,
    diags: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
}

fn type_list(t: &ExprType) -> String {
    if t.types.is_empty() {
        return "nothing".into();
    }
    t.types.join(" | ")
}

impl Ctx<'_> {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.diags.push(Diagnostic::new(path, message));
    }

    /// Parse and check one expression; `None` when it cannot be used.
    fn expr(&mut self, src: &str, path: &str, focus: &ExprType) -> Option<(Expr, ExprType)> {
        let expr = match Expr::parse(src) {
            Ok(e) => e,
            Err(e) => {
                self.err(path, format!("syntax error: {e}"));
                return None;
            }
        };
        let (ty, diags) = expr.check_typed(self.resource, Some(focus), Some(&self.vars), self.opts);
        if diags.is_empty() {
            Some((expr, ty))
        } else {
            for d in diags {
                self.err(path, d.to_string());
            }
            None
        }
    }

    fn node(
        &mut self,
        sel: &Select,
        path: &str,
        focus: &ExprType,
        start: usize,
        out_cols: &mut Vec<ColumnInfo>,
    ) -> PlanNode {
        let mut item_focus = focus.clone();
        let mut iter = Iteration::None;
        let mut iter_path = String::new();
        if let Some(src) = &sel.for_each {
            iter_path = format!("{path}.forEach");
            if let Some((e, t)) = self.expr(src, &iter_path, focus) {
                item_focus = ExprType {
                    types: t.types,
                    single: true,
                };
                iter = Iteration::ForEach(e);
            }
        } else if let Some(src) = &sel.for_each_or_null {
            iter_path = format!("{path}.forEachOrNull");
            if let Some((e, t)) = self.expr(src, &iter_path, focus) {
                item_focus = ExprType {
                    types: t.types,
                    single: true,
                };
                iter = Iteration::ForEachOrNull(e);
            }
        } else if !sel.repeat.is_empty() {
            iter_path = format!("{path}.repeat");
            // Repeated paths apply to items of several types (the focus, then
            // what the paths return, recursively): check them without a known type.
            let any = ExprType::any();
            let mut exprs = Vec::new();
            for (i, src) in sel.repeat.iter().enumerate() {
                if let Some((e, _)) = self.expr(src, &format!("{path}.repeat[{i}]"), &any) {
                    exprs.push(e);
                }
            }
            item_focus = ExprType {
                types: vec!["Any".into()],
                single: true,
            };
            iter = Iteration::Repeat(exprs);
        }

        let mut columns = Vec::new();
        let mut slot = start;
        for (i, c) in sel.column.iter().enumerate() {
            let cpath = format!("{path}.column[{i}]");
            let ppath = format!("{cpath}.path");
            let declared = match &c.ty {
                Some(t) => match ColumnKind::from_fhir_type(t) {
                    Some(k) => Some(k),
                    None => {
                        self.err(
                            format!("{cpath}.type"),
                            format!("'{t}' is not a supported column type (a FHIR primitive type)"),
                        );
                        None
                    }
                },
                None => None,
            };
            let kind = match self.expr(&c.path, &ppath, &item_focus) {
                Some((expr, ty)) => {
                    if !c.collection && !ty.single && !ty.is_any() {
                        self.warnings.push(Diagnostic::new(
                            &ppath,
                            format!(
                                "'{}' can return more than one value ({}); set 'collection: true' or select one item",
                                c.path,
                                type_list(&ty)
                            ),
                        ));
                    }
                    let kind = match declared {
                        Some(k) => {
                            if let Some(why) = incompatible(k, &ty) {
                                self.err(
                                    &ppath,
                                    format!(
                                        "'{}' returns {why}, which cannot be a '{}' column",
                                        c.path,
                                        c.ty.as_deref().unwrap_or("")
                                    ),
                                );
                            }
                            k
                        }
                        None => infer(&ty),
                    };
                    columns.push(PlanColumn {
                        offset: slot - start,
                        uses_row_index: c.path.contains("%rowIndex"),
                        expr,
                        path: ppath,
                        kind,
                        collection: c.collection,
                    });
                    kind
                }
                None => declared.unwrap_or(ColumnKind::Utf8),
            };
            out_cols.push(ColumnInfo {
                name: c.name.clone(),
                kind,
                collection: c.collection,
                view_path: cpath,
            });
            slot += 1;
        }

        let mut children = Vec::new();
        for (i, s) in sel.select.iter().enumerate() {
            let child = self.node(
                s,
                &format!("{path}.select[{i}]"),
                &item_focus,
                slot,
                out_cols,
            );
            slot += child.width;
            children.push(child);
        }

        let mut union = Vec::new();
        if !sel.union_all.is_empty() {
            let mut first: Option<Vec<ColumnInfo>> = None;
            for (i, s) in sel.union_all.iter().enumerate() {
                let upath = format!("{path}.unionAll[{i}]");
                let mut cols = Vec::new();
                let branch = self.node(s, &upath, &item_focus, slot, &mut cols);
                match &first {
                    None => first = Some(cols),
                    Some(f) => {
                        let names = |c: &[ColumnInfo]| {
                            c.iter()
                                .map(|c| c.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        };
                        if f.len() != cols.len()
                            || f.iter().zip(&cols).any(|(a, b)| a.name != b.name)
                        {
                            self.err(
                                &upath,
                                format!(
                                    "unionAll branches must have the same columns in the same order: ({}) here, ({}) in {path}.unionAll[0]",
                                    names(&cols),
                                    names(f)
                                ),
                            );
                        } else {
                            for (a, b) in f.iter().zip(&cols) {
                                if a.kind != b.kind || a.collection != b.collection {
                                    self.err(
                                        &b.view_path,
                                        format!(
                                            "column '{}' has type {} here but {} in {}",
                                            b.name,
                                            kind_text(b),
                                            kind_text(a),
                                            a.view_path
                                        ),
                                    );
                                }
                            }
                        }
                    }
                }
                union.push(branch);
            }
            if let Some(f) = first {
                slot += f.len();
                out_cols.extend(f);
            }
        }

        PlanNode {
            iter,
            iter_path,
            columns,
            children,
            union,
            start,
            width: slot - start,
        }
    }
}

fn kind_text(c: &ColumnInfo) -> String {
    let k = format!("{:?}", c.kind);
    if c.collection {
        format!("List<{k}>")
    } else {
        k
    }
}

/// Why a declared column kind cannot hold values of the inferred type.
fn incompatible(kind: ColumnKind, ty: &ExprType) -> Option<String> {
    if ty.is_any() || ty.types.is_empty() {
        return None;
    }
    let sys = ty.system_types();
    let ok = |s: &Option<&str>| match kind {
        ColumnKind::Utf8 => true,
        ColumnKind::Boolean => *s == Some("Boolean"),
        ColumnKind::Int64 => *s == Some("Integer"),
        ColumnKind::Decimal => matches!(s, Some("Integer" | "Decimal")),
    };
    if sys.iter().any(ok) {
        None
    } else {
        Some(type_list(ty))
    }
}

fn infer(ty: &ExprType) -> ColumnKind {
    if ty.is_any() || ty.types.is_empty() {
        return ColumnKind::Utf8;
    }
    let sys = ty.system_types();
    match sys.first() {
        Some(Some(first)) if sys.iter().all(|s| s.as_ref() == Some(first)) => {
            ColumnKind::from_system_type(first)
        }
        _ => ColumnKind::Utf8,
    }
}

fn constant_value(c: &Constant) -> ConstValue {
    if c.ty == "integer64" {
        let i = c
            .value
            .as_i64()
            .or_else(|| c.value.as_str().and_then(|s| s.parse().ok()))
            .unwrap_or_default();
        return ConstValue::Integer(i);
    }
    ConstValue::Node(
        c.value.clone(),
        atlas_fhirpath::model::Model::r4().type_key(&c.ty),
    )
}

fn constant_type(c: &Constant) -> ExprType {
    if c.ty == "integer64" {
        ExprType::of("System.Integer", true)
    } else {
        ExprType::of(&c.ty, true)
    }
}

impl ViewCompiler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Check and compile a view. All problems are reported, each with its
    /// path inside the view.
    pub fn compile(&self, view: &ViewDefinition) -> Result<CompiledView, Vec<Diagnostic>> {
        let model = atlas_fhirpath::model::Model::r4();
        let mut cx = Ctx {
            resource: &view.resource,
            vars: Vec::new(),
            opts: &self.check_options,
            diags: Vec::new(),
            warnings: Vec::new(),
        };
        if !model.is_resource(&view.resource) {
            cx.err(
                "resource",
                format!("'{}' is not a FHIR R4 resource type", view.resource),
            );
        }
        for (i, c) in view.constants.iter().enumerate() {
            if c.name == "rowIndex" {
                cx.err(
                    format!("constant[{i}].name"),
                    "'rowIndex' is reserved for %rowIndex",
                );
            }
            cx.vars.push((c.name.clone(), constant_type(c)));
        }
        cx.vars
            .push(("rowIndex".into(), ExprType::of("System.Integer", true)));

        let root_ty = ExprType::of(&view.resource, true);
        let mut wheres = Vec::new();
        for (i, w) in view.where_.iter().enumerate() {
            let p = format!("where[{i}].path");
            if let Some((e, t)) = cx.expr(&w.path, &p, &root_ty) {
                let boolean =
                    t.is_any() || t.types.is_empty() || t.system_types().contains(&Some("Boolean"));
                if boolean {
                    wheres.push((e, p));
                } else {
                    cx.err(
                        &p,
                        format!(
                            "'{}' must return a boolean, returns {}",
                            w.path,
                            type_list(&t)
                        ),
                    );
                }
            }
        }

        let mut columns = Vec::new();
        let mut children = Vec::new();
        let mut slot = 0;
        for (i, s) in view.select.iter().enumerate() {
            let n = cx.node(s, &format!("select[{i}]"), &root_ty, slot, &mut columns);
            slot += n.width;
            children.push(n);
        }
        for (i, c) in columns.iter().enumerate() {
            if let Some(prev) = columns[..i].iter().find(|p| p.name == c.name) {
                cx.err(
                    format!("{}.name", c.view_path),
                    format!(
                        "duplicate column name '{}' (also {})",
                        c.name, prev.view_path
                    ),
                );
            }
        }
        if columns.is_empty() && cx.diags.is_empty() {
            cx.err("select", "the view has no columns");
        }
        if !cx.diags.is_empty() {
            return Err(cx.diags);
        }
        let schema = Arc::new(Schema::new(
            columns
                .iter()
                .map(|c| Field::new(&c.name, c.kind.data_type(c.collection), true))
                .collect::<Vec<_>>(),
        ));
        Ok(CompiledView {
            name: view.name.clone(),
            resource: view.resource.clone(),
            resource_key: model.type_key(&view.resource),
            schema,
            columns,
            constants: view
                .constants
                .iter()
                .map(|c| (c.name.clone(), constant_value(c)))
                .collect(),
            wheres,
            warnings: cx.warnings,
            root: PlanNode {
                iter: Iteration::None,
                iter_path: String::new(),
                columns: Vec::new(),
                children,
                union: Vec::new(),
                start: 0,
                width: slot,
            },
        })
    }
}
