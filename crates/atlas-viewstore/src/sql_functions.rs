//! SQL that reads FHIR as FHIR: the functions every Atlas SQL session gets
//! ([`register`]), for `atlas sql` and the server's SQL endpoint alike.
//!
//! * `fhirpath(resource, 'expression')`: the FHIRPath result as JSON text
//!   (`Utf8`). An empty result is SQL `NULL`; a single item is that item's
//!   JSON (`true`, `140.5`, `"abc"`, `{"value":140.5,"unit":"mm[Hg]"}`);
//!   several items are a JSON array of them. So a boolean test reads
//!   `fhirpath(resource, 'value.ofType(Quantity).value > 140') = 'true'`.
//! * `fhirpath_first(resource, 'expression')`: the first item as plain text,
//!   for `CAST`s and comparisons: strings (and codes, dates, ids, …)
//!   unquoted, numbers and booleans as their literal text, complex values
//!   (elements, quantities) as JSON; `NULL` when the result is empty.
//! * The JSON functions of `datafusion-functions-json` (`json_get`,
//!   `json_get_str`, `json_get_int`, `json_as_text`, `json_contains`,
//!   `json_length`, …, and the `->`, `->>`, `?` operators).
//!
//! Rules of the FHIRPath functions (chosen so a query fails loudly rather
//! than answering something subtly different from the engine):
//! * `resource` is JSON text: a `Utf8`, `LargeUtf8` or `Utf8View` column
//!   (the store's `resources.resource` is `Utf8`) or literal. A `NULL`
//!   resource (a deleted row) gives `NULL`.
//! * The expression must be a string literal, at most
//!   [`MAX_EXPRESSION_BYTES`] long. It is checked while the query is
//!   planned, so a syntax error is a planning error naming the expression
//!   and the parser's `line:column`, before any row is read; a column or any
//!   other non-literal argument is refused the same way. Each batch parses
//!   it once (a parse costs microseconds, a batch holds thousands of rows).
//! * Numbers keep their exact source text (Atlas's own JSON tree, not
//!   `f64`): `140.50` stays `140.50`.
//! * An item that has no value (a primitive carrying only an extension,
//!   `_birthDate`) is `null` inside an array and SQL `NULL` alone.
//! * Text that is not JSON, and an evaluation error (e.g. `name.given = 'x'`
//!   on a patient with two given names: FHIRPath requires a single item),
//!   fail the query with an execution error naming the function, the
//!   expression and the resource (`Patient/123`): a `NULL` there would
//!   silently drop rows from a `WHERE`.
//! * `now()`, `today()` and `timeOfDay()` are read once per batch; hence
//!   the functions are `Stable`, not `Immutable`. `resolve()` finds nothing
//!   and `memberOf()` is an error: SQL has no resolver or terminology service.
//!
//! Cost: each row's text is parsed whole into the engine's exact-number
//! tree ([`json::parse`]), then evaluated. On synthetic Observations
//! (~900 bytes) that is about 4.5 µs of parsing and 1.6 µs of evaluation
//! per row on one core, less than DataFusion's own scan of the column.
//! The views' projected tape and fast subset are not used: they need the
//! resource type before compiling and cover navigation only, not the
//! comparisons and functions SQL users write here.

use std::sync::Arc;

use atlas_fhirpath::json::{self, Kind};
use atlas_fhirpath::{EvalContext, Expr, JsonRef, JsonValue, Temporal, Value};
use datafusion::arrow::array::{Array, ArrayRef, AsArray, StringBuilder};
use datafusion::arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::utils::take_function_args;
use datafusion::common::{ScalarValue, exec_datafusion_err, exec_err, plan_err};
use datafusion::error::Result;
use datafusion::execution::FunctionRegistry;
use datafusion::logical_expr::{
    ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
    Volatility,
};
use datafusion::prelude::SessionContext;

/// The longest FHIRPath expression accepted, in bytes: a bound on the work
/// a query text can ask of the parser (view paths are far shorter).
pub const MAX_EXPRESSION_BYTES: usize = 4096;

/// Registers `fhirpath`, `fhirpath_first` and the JSON functions (with
/// their operators) on `ctx`. Every Atlas SQL session calls this.
pub fn register(ctx: &SessionContext) -> Result<()> {
    // One write lock for all of them, so a concurrent planner never sees
    // half the set.
    let state = ctx.state_ref();
    let mut state = state.write();
    for output in [Output::Json, Output::First] {
        state.register_udf(Arc::new(ScalarUDF::from(FhirPathFunction::new(output))))?;
    }
    datafusion_functions_json::register_all(&mut *state)
}

/// What a FHIRPath function returns for the result collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Output {
    /// `fhirpath`: the collection as JSON text.
    Json,
    /// `fhirpath_first`: the first item as plain text.
    First,
}

/// `fhirpath` and `fhirpath_first` (one implementation, two renderings).
#[derive(Debug, PartialEq, Eq, Hash)]
struct FhirPathFunction {
    output: Output,
    signature: Signature,
}

impl FhirPathFunction {
    fn new(output: Output) -> Self {
        FhirPathFunction {
            output,
            // Types are checked in `return_field_from_args`, where the error
            // can say what the argument is for; `now()` makes it Stable.
            signature: Signature::any(2, Volatility::Stable),
        }
    }
}

impl ScalarUDFImpl for FhirPathFunction {
    fn name(&self) -> &str {
        match self.output {
            Output::Json => "fhirpath",
            Output::First => "fhirpath_first",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.check_resource_type(arg_types.first())?;
        Ok(DataType::Utf8)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        self.check_resource_type(args.arg_fields.first().map(|f| f.data_type()))?;
        // The planner passes the value of every literal argument: this is
        // where a non-literal expression is refused and a literal one is
        // parsed, before any row is read.
        match args.scalar_arguments.get(1) {
            Some(Some(expr)) => {
                self.compile(expr)?;
            }
            _ => {
                return plan_err!(
                    "{}: the FHIRPath expression (second argument) must be a string literal, \
                     e.g. {}(resource, 'name.family'); a column or computed value is not accepted",
                    self.name(),
                    self.name()
                );
            }
        }
        Ok(Arc::new(Field::new(self.name(), DataType::Utf8, true)))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let [resource, expr] = take_function_args(self.name(), args.args)?;
        let ColumnarValue::Scalar(expr) = expr else {
            // Planning refuses this already; kept for plans built by hand.
            return exec_err!(
                "{}: the FHIRPath expression (second argument) must be a string literal",
                self.name()
            );
        };
        let expr = self.compile(&expr)?;
        let now = now();
        let run = Run {
            name: self.name(),
            output: self.output,
            expr: &expr,
            now: &now,
        };
        match resource {
            ColumnarValue::Scalar(s) => {
                let text = scalar_text(&s).ok_or_else(|| {
                    exec_datafusion_err!(
                        "{}: the resource must be JSON text, got {}",
                        self.name(),
                        s.data_type()
                    )
                })?;
                let mut buf = String::new();
                let out = match text {
                    Some(t) => run.row(t, &mut buf)?.then_some(buf),
                    None => None,
                };
                Ok(ColumnarValue::Scalar(ScalarValue::Utf8(out)))
            }
            ColumnarValue::Array(a) => run.array(&a).map(ColumnarValue::Array),
        }
    }
}

impl FhirPathFunction {
    fn check_resource_type(&self, ty: Option<&DataType>) -> Result<()> {
        match ty {
            Some(DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Null) => {
                Ok(())
            }
            other => plan_err!(
                "{}: the first argument must be a resource as JSON text (e.g. the `resource` \
                 column of `resources`), got {}",
                self.name(),
                other.map_or_else(|| "nothing".to_string(), |t| t.to_string())
            ),
        }
    }

    /// The parsed expression of a literal argument; errors name the
    /// expression and the parser's position.
    fn compile(&self, expr: &ScalarValue) -> Result<Expr> {
        let text = match scalar_text(expr) {
            Some(Some(t)) => t,
            Some(None) => {
                return plan_err!(
                    "{}: the FHIRPath expression (second argument) is NULL",
                    self.name()
                );
            }
            None => {
                return plan_err!(
                    "{}: the FHIRPath expression (second argument) must be a string literal, got {}",
                    self.name(),
                    expr.data_type()
                );
            }
        };
        if text.len() > MAX_EXPRESSION_BYTES {
            return plan_err!(
                "{}: the FHIRPath expression is {} bytes long; at most {MAX_EXPRESSION_BYTES} are accepted",
                self.name(),
                text.len()
            );
        }
        Expr::parse(text).map_err(|e| {
            datafusion::error::DataFusionError::Plan(format!(
                "{}: invalid FHIRPath expression '{text}': {} at {}:{}",
                self.name(),
                e.message,
                e.line,
                e.column
            ))
        })
    }
}

/// `Some(None)` for a NULL of any string type, `None` for a non-string.
fn scalar_text(s: &ScalarValue) -> Option<Option<&str>> {
    match s {
        ScalarValue::Null => Some(None),
        s => s.try_as_str(),
    }
}

/// The instant `now()` stands for in one batch.
fn now() -> Temporal {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    Temporal::from_epoch_millis_utc(ms)
}

/// One batch's evaluation: the parsed expression and how to render.
struct Run<'r> {
    name: &'r str,
    output: Output,
    expr: &'r Expr,
    now: &'r Temporal,
}

impl Run<'_> {
    fn array(&self, resources: &ArrayRef) -> Result<ArrayRef> {
        let mut out = StringBuilder::with_capacity(resources.len(), resources.len() * 8);
        let mut buf = String::new();
        let mut each = |text: Option<&str>| -> Result<()> {
            buf.clear();
            match text {
                Some(t) if self.row(t, &mut buf)? => out.append_value(&buf),
                _ => out.append_null(),
            }
            Ok(())
        };
        match resources.data_type() {
            DataType::Utf8 => resources
                .as_string::<i32>()
                .iter()
                .try_for_each(&mut each)?,
            DataType::LargeUtf8 => resources
                .as_string::<i64>()
                .iter()
                .try_for_each(&mut each)?,
            DataType::Utf8View => resources.as_string_view().iter().try_for_each(&mut each)?,
            DataType::Null => (0..resources.len()).try_for_each(|_| each(None))?,
            other => {
                return exec_err!("{}: the resource must be JSON text, got {other}", self.name);
            }
        }
        Ok(Arc::new(out.finish()))
    }

    /// Evaluates one resource into `buf`; `false` means SQL NULL.
    fn row(&self, text: &str, buf: &mut String) -> Result<bool> {
        let tree = json::parse(text).map_err(|e| {
            exec_datafusion_err!(
                "{}('{}'): the resource is not valid JSON: {e}",
                self.name,
                self.expr.source()
            )
        })?;
        let ctx = EvalContext::new().with_now(*self.now);
        let items = self.expr.evaluate_tree(&tree, &ctx).map_err(|e| {
            exec_datafusion_err!(
                "{}('{}') on {}: {e}",
                self.name,
                self.expr.source(),
                label(&tree)
            )
        })?;
        Ok(match (self.output, items.as_slice()) {
            (_, []) => false,
            (Output::Json, [one]) => write_json(one, buf),
            (Output::Json, many) => {
                buf.push('[');
                for (i, v) in many.iter().enumerate() {
                    if i > 0 {
                        buf.push(',');
                    }
                    if !write_json(v, buf) {
                        buf.push_str("null");
                    }
                }
                buf.push(']');
                true
            }
            (Output::First, [first, ..]) => write_text(first, buf),
        })
    }
}

/// `Observation/123` for error messages (what a user can look up).
fn label(tree: &JsonValue<'_>) -> String {
    let ty = tree.get("resourceType").and_then(JsonValue::as_str);
    let id = tree.get("id").and_then(JsonValue::as_str);
    match (ty, id) {
        (Some(t), Some(i)) => format!("{t}/{i}"),
        (Some(t), None) => format!("a {t} without an id"),
        _ => "a resource without resourceType".to_string(),
    }
}

/// Appends the item's JSON; `false` when it has no value.
fn write_json(v: &Value<'_>, buf: &mut String) -> bool {
    match v {
        Value::Node(n) => match n.json {
            // Elements keep their source text, numbers exactly.
            Some(j) => buf.push_str(&j.to_json_string()),
            None => return false,
        },
        Value::Boolean(b) => buf.push_str(if *b { "true" } else { "false" }),
        Value::Integer(i) => buf.push_str(&i.to_string()),
        // rust_decimal prints plain digits (no exponent), valid JSON.
        Value::Decimal(d) => buf.push_str(&d.to_string()),
        Value::String(s) => push_json_string(s, buf),
        Value::Temporal(t) => push_json_string(&t.to_string(), buf),
        Value::Quantity(q) => {
            // The engine's FHIR Quantity rendering, with the value written
            // from the decimal (its JSON goes through f64).
            buf.push('{');
            buf.push_str("\"value\":");
            buf.push_str(&q.value.to_string());
            if let serde_json::Value::Object(m) = v.to_json() {
                for (k, val) in m.iter().filter(|(k, _)| k.as_str() != "value") {
                    buf.push(',');
                    push_json_string(k, buf);
                    buf.push(':');
                    buf.push_str(&val.to_string());
                }
            }
            buf.push('}');
        }
        Value::TypeInfo { .. } => buf.push_str(&v.to_json().to_string()),
    }
    true
}

/// Appends the item as plain text; `false` when it has no value.
fn write_text(v: &Value<'_>, buf: &mut String) -> bool {
    match v {
        Value::Node(n) => match n.json.map(JsonRef::kind) {
            None | Some(Kind::Null) => return false,
            Some(Kind::String(s)) => buf.push_str(s),
            Some(Kind::Number(n)) => buf.push_str(&n.text()),
            Some(Kind::Bool(b)) => buf.push_str(if b { "true" } else { "false" }),
            Some(Kind::Array(_) | Kind::Object(_)) => return write_json(v, buf),
        },
        Value::String(s) => buf.push_str(s),
        Value::Temporal(t) => buf.push_str(&t.to_string()),
        Value::Boolean(_) | Value::Integer(_) | Value::Decimal(_) => return write_json(v, buf),
        Value::Quantity(_) | Value::TypeInfo { .. } => return write_json(v, buf),
    }
    true
}

fn push_json_string(s: &str, buf: &mut String) {
    // serde_json's escaping cannot fail on a &str.
    match serde_json::to_string(s) {
        Ok(q) => buf.push_str(&q),
        Err(_) => buf.push_str("null"),
    }
}
