//! SQL-on-FHIR v2 ViewDefinitions for Atlas: validation, compilation, and
//! evaluation into Arrow record batches.
//!
//! # What this crate owns
//! * The ViewDefinition model and its structural validation
//!   ([`ViewDefinition::from_json`]).
//! * The compiler ([`ViewCompiler::compile`]): FHIRPath parsing and static
//!   checking of every path (unknown functions, elements and constants),
//!   collection rules, column types, `unionAll` column agreement. Problems are
//!   [`Diagnostic`]s that point inside the view:
//!   `select[0].column[2].path: unknown function 'foo' at 1:5`.
//! * The plan ([`CompiledView`]): compiled once, run over many resources,
//!   appending straight into Arrow builders ([`RowBuilder`]); no per-row maps.
//!   Resources come in as JSON text ([`CompiledView::append_json_text`], parsed
//!   with `atlas_fhirpath::json`: exact decimals, borrowed strings), as such a
//!   tree ([`CompiledView::append_tree`]) or as `serde_json::Value`s
//!   ([`CompiledView::append`], [`CompiledView::run`]).
//!   Supports `column` (name, path, type, collection), nested `select`,
//!   `forEach`, `forEachOrNull`, `repeat`, `unionAll`, view `where`,
//!   `constant` (every primitive `value[x]`) and `%rowIndex`.
//! * [`ViewSet`]: several views over resource JSON text, one projected parse
//!   per resource and compiled fast paths where the views allow, the full
//!   evaluator per resource otherwise (identical results; see `fast.rs`).
//! * The FHIR → Arrow type mapping ([`types`]) and Arrow → JSON rows ([`json`]).
//! * The conformance suite runner ([`suite::run_dir`]) and its report format.
//!
//! # What it may call
//! Only `atlas-fhirpath` (parsing, static checking, evaluation, the R4
//! model; functions such as `getResourceKey()`, `getReferenceKey()`, `join()`,
//! `lowBoundary()`, `highBoundary()`, `ofType()`, `extension()` come from
//! there) and the `arrow`, `serde_json`, `rust_decimal` and `thiserror`
//! crates. No I/O except in [`suite`] (reading test files), no async, no
//! query engine: callers (the CLI, the lake) own files and formats.
//!
//! ```
//! use atlas_views::CompiledView;
//! let view = serde_json::json!({"resource": "Patient", "select": [{"column": [
//!     {"name": "id", "path": "getResourceKey()", "type": "id"},
//!     {"name": "family", "path": "name.family.first()", "type": "string"}]}]});
//! let plan = CompiledView::from_json(&view).expect("valid view");
//! let patient = serde_json::json!({"resourceType": "Patient", "id": "p1",
//!     "name": [{"family": "Doe"}]});
//! let batch = plan.run([&patient]).expect("runs");
//! assert_eq!(batch.num_rows(), 1);
//! ```

mod compile;
mod definition;
mod diag;
mod exec;
mod fast;
pub mod json;
pub mod suite;
#[cfg(test)]
mod tests;
pub mod types;

pub use compile::{ColumnInfo, CompiledView, ViewCompiler};
pub use definition::describe as describe_json_kind;
pub use definition::{Column, Constant, Select, ViewDefinition, WhereClause, is_valid_name};
pub use diag::{Diagnostic, RunError, ViewError, render as render_diagnostics};
pub use exec::RowBuilder;
pub use fast::{Appended, ViewSet, ViewSetState};
pub use json::batch_to_json_rows;
pub use types::ColumnKind;
