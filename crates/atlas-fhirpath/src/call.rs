//! Function implementations: [`Evaluator::call`] routes each function to
//! the method for its family, grouped as in the FHIRPath specification.

use crate::ast::{Node, NodeKind};
use crate::error::EvalError;
use crate::eval::{
    Evaluator, Frame, Items, R, bool_items, child, children, compare, dedup, push_json, singleton,
    to_bool, type_matches,
};
use crate::functions::Func;
use crate::json::JsonRef;
use crate::model::Model;
use crate::temporal::TemporalKind;
use crate::value::{FhirNode, Quantity, Temporal, Value, equals, is_decimal_text};
use regex::Regex;
use rust_decimal::prelude::{FromPrimitive, ToPrimitive};
use rust_decimal::{Decimal, RoundingStrategy};
use std::borrow::Cow;
use std::cell::RefCell;
use std::cmp::Ordering;
use std::collections::HashMap;
use std::str::FromStr;

thread_local! {
    static REGEX_CACHE: RefCell<HashMap<String, Regex>> = RefCell::new(HashMap::new());
}

fn regex(pattern: &str) -> R<Regex> {
    REGEX_CACHE.with(|c| {
        if let Some(r) = c.borrow().get(pattern) {
            return Ok(r.clone());
        }
        let r = Regex::new(pattern).map_err(|e| EvalError::Regex(e.to_string()))?;
        let mut m = c.borrow_mut();
        if m.len() > 256 {
            m.clear();
        }
        m.insert(pattern.to_string(), r.clone());
        Ok(r)
    })
}

fn dec_from_f64(f: f64) -> Option<Decimal> {
    if !f.is_finite() {
        return None;
    }
    Decimal::from_str(&format!("{f}"))
        .ok()
        .or_else(|| Decimal::from_f64(f))
}

fn str_arg<'v>(items: &'v [Value<'_>], what: &str) -> R<Option<&'v str>> {
    match singleton(items, what)? {
        None => Ok(None),
        Some(v) => v
            .as_str()
            .map(Some)
            .ok_or_else(|| EvalError::ty(format!("{what} expects a string argument"))),
    }
}

fn int_arg(items: &[Value<'_>], what: &str) -> R<Option<i64>> {
    match singleton(items, what)? {
        None => Ok(None),
        Some(v) => match v.to_system() {
            Some(Value::Integer(i)) => Ok(Some(i)),
            _ => Err(EvalError::ty(format!("{what} expects an integer argument"))),
        },
    }
}

fn to_boolean(v: &Value<'_>) -> Option<bool> {
    match v.to_system()? {
        Value::Boolean(b) => Some(b),
        Value::Integer(1) => Some(true),
        Value::Integer(0) => Some(false),
        Value::Decimal(d) if d == Decimal::ONE => Some(true),
        Value::Decimal(d) if d.is_zero() => Some(false),
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "true" | "t" | "yes" | "y" | "1" | "1.0" => Some(true),
            "false" | "f" | "no" | "n" | "0" | "0.0" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

fn to_integer(v: &Value<'_>) -> Option<i64> {
    match v.to_system()? {
        Value::Integer(i) => Some(i),
        Value::Boolean(b) => Some(i64::from(b)),
        Value::String(s) => {
            let t = s.strip_prefix('+').unwrap_or(&s);
            if t.bytes()
                .enumerate()
                .all(|(i, b)| b.is_ascii_digit() || (i == 0 && b == b'-'))
            {
                t.parse().ok()
            } else {
                None
            }
        }
        _ => None,
    }
}

fn to_decimal(v: &Value<'_>) -> Option<Decimal> {
    match v.to_system()? {
        Value::Integer(i) => Some(Decimal::from(i)),
        Value::Decimal(d) => Some(d),
        Value::Boolean(b) => Some(if b {
            Decimal::new(10, 1)
        } else {
            Decimal::new(0, 1)
        }),
        Value::String(s) if is_decimal_text(&s) => Decimal::from_str(&s).ok(),
        _ => None,
    }
}

fn to_quantity(v: &Value<'_>) -> Option<Quantity> {
    match v.to_system()? {
        Value::Integer(i) => Some(Quantity::new(Decimal::from(i), "1")),
        Value::Decimal(d) => Some(Quantity::new(d, "1")),
        Value::Boolean(b) => Some(Quantity::new(
            if b {
                Decimal::new(10, 1)
            } else {
                Decimal::new(0, 1)
            },
            "1",
        )),
        Value::Quantity(q) => Some(q),
        Value::String(s) => Quantity::parse(&s),
        _ => None,
    }
}

fn to_temporal(v: &Value<'_>, kind: TemporalKind) -> Option<Temporal> {
    match v.to_system()? {
        Value::Temporal(t) => match (t.kind, kind) {
            (a, b) if a == b => Some(t),
            (TemporalKind::DateTime, TemporalKind::Date) => {
                let mut d = t;
                d.kind = TemporalKind::Date;
                d.precision = d.precision.min(crate::temporal::Precision::Day);
                d.tz = None;
                Some(d)
            }
            (TemporalKind::Date, TemporalKind::DateTime) => {
                let mut d = t;
                d.kind = TemporalKind::DateTime;
                Some(d)
            }
            _ => None,
        },
        Value::String(s) => match kind {
            TemporalKind::Date => Temporal::parse_date(&s),
            TemporalKind::DateTime => Temporal::parse_datetime(&s),
            TemporalKind::Time => Temporal::parse_time(&s),
        },
        _ => None,
    }
}

fn base64_encode(bytes: &[u8], url: bool) -> String {
    let table: &[u8; 64] = if url {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    };
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(table[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut bits = 0u32;
    let mut nbits = 0;
    let mut out = Vec::new();
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' => break,
            _ => return None,
        };
        bits = (bits << 6) | u32::from(v);
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            out.push((bits >> nbits) as u8);
            bits &= (1 << nbits) - 1;
        }
    }
    Some(out)
}

fn json_unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('t') => out.push('\t'),
            Some('b') => out.push('\u{8}'),
            Some('f') => out.push('\u{c}'),
            Some('u') => {
                let hex: String = chars.by_ref().take(4).collect();
                match u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32) {
                    Some(ch) => out.push(ch),
                    None => {
                        out.push_str("\\u");
                        out.push_str(&hex);
                    }
                }
            }
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

fn decimal_boundary(d: Decimal, digits: Option<i64>, high: bool) -> Option<Decimal> {
    let p = digits.unwrap_or(8);
    if !(0..=28).contains(&p) {
        return None;
    }
    let p = p as u32;
    let scale = d.scale();
    // Half a unit in the last written digit.
    let half = Decimal::try_new(5, scale + 1).ok()?;
    let b = if high {
        d.checked_add(half)?
    } else {
        d.checked_sub(half)?
    };
    let unit = Decimal::new(1, p);
    let r = if (high && b.is_sign_negative()) || (!high && !b.is_sign_negative()) {
        b.round_dp_with_strategy(p, RoundingStrategy::ToZero)
    } else {
        let t = b.round_dp_with_strategy(p, RoundingStrategy::ToZero);
        if t == b || d.abs() < unit {
            t
        } else if high {
            t.checked_add(unit)?
        } else {
            t.checked_sub(unit)?
        }
    };
    let mut r = r;
    if r.scale() < p {
        r.rescale(p);
    }
    if r.is_zero() && b.is_sign_negative() {
        r.set_sign_negative(true);
    }
    Some(r)
}

/// `lowBoundary()` / `highBoundary()` of one value to `digits` of precision.
fn boundary<'a>(v: &Value<'a>, digits: Option<i64>, high: bool) -> R<Option<Value<'a>>> {
    Ok(match v.to_system() {
        Some(Value::Integer(i)) => {
            decimal_boundary(Decimal::from(i), digits, high).map(Value::Decimal)
        }
        Some(Value::Decimal(d)) => decimal_boundary(d, digits, high).map(Value::Decimal),
        Some(Value::Quantity(q)) => decimal_boundary(q.value, digits, high)
            .map(|d| Value::Quantity(Quantity::new(d, q.unit))),
        Some(Value::Temporal(t)) => {
            let d = match digits {
                Some(d) => Some(
                    u32::try_from(d)
                        .ok()
                        .ok_or_else(|| EvalError::ty("bad precision"))?,
                ),
                None => None,
            };
            t.boundary(d, high).map(Value::Temporal)
        }
        _ => None,
    })
}

/// The FHIR type a `conformsTo()` profile names: only the base definitions
/// of the R4 model are known.
fn conformance_type(url: &str) -> R<crate::ast::TypeSpec> {
    let Some(ty) = url.strip_prefix("http://hl7.org/fhir/StructureDefinition/") else {
        return Err(EvalError::Other(format!(
            "cannot check conformance to '{url}'"
        )));
    };
    if Model::r4().type_def(ty).is_none() {
        return Err(EvalError::Other(format!("unknown profile '{url}'")));
    }
    Ok(crate::ast::TypeSpec {
        namespace: Some("FHIR".into()),
        name: ty.to_string(),
    })
}

/// The id a `Reference` element points at (`Type/id`, any `_history` cut
/// off), when the type is `want` or no type is asked for.
fn reference_key<'a>(j: JsonRef<'a>, want: Option<&str>) -> Option<&'a str> {
    let r = j.get("reference").and_then(JsonRef::as_str)?;
    let r = r.split("/_history/").next().unwrap_or(r);
    let mut parts = r.rsplit('/');
    let (Some(id), Some(ty)) = (parts.next(), parts.next()) else {
        return None;
    };
    want.is_none_or(|w| w == ty).then_some(id)
}

/// `encode(format)` and `decode(format)` of one string; `None` when the input
/// does not decode.
fn encode_decode(func: Func, fmt: &str, s: &str) -> R<Option<String>> {
    Ok(match (func, fmt) {
        (Func::Encode, "base64") => Some(base64_encode(s.as_bytes(), false)),
        (Func::Encode, "urlbase64") => Some(base64_encode(s.as_bytes(), true)),
        (Func::Encode, "hex") => Some(s.bytes().map(|x| format!("{x:02x}")).collect()),
        (Func::Decode, "base64" | "urlbase64") => {
            base64_decode(s).and_then(|v| String::from_utf8(v).ok())
        }
        (Func::Decode, "hex") => {
            if !s.len().is_multiple_of(2) || !s.is_ascii() {
                None
            } else {
                (0..s.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
                    .collect::<Option<Vec<u8>>>()
                    .and_then(|v| String::from_utf8(v).ok())
            }
        }
        _ => return Err(EvalError::ty(format!("unknown encoding '{fmt}'"))),
    })
}

/// `escape(format)` and `unescape(format)` of one string.
fn escape_unescape(func: Func, fmt: &str, s: &str) -> R<String> {
    Ok(match (func, fmt) {
        (Func::Escape, "html") => s
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
            .replace('\'', "&#39;"),
        (Func::Unescape, "html") => s
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&#39;", "'")
            .replace("&amp;", "&"),
        (Func::Escape, "json") => {
            let q = serde_json::to_string(s).map_err(|e| EvalError::Other(e.to_string()))?;
            q[1..q.len() - 1].to_string()
        }
        (Func::Unescape, "json") => json_unescape(s),
        _ => return Err(EvalError::ty(format!("unknown escape format '{fmt}'"))),
    })
}

/// `children()` and `descendants()`.
fn tree_navigation<'a>(func: Func, input: &[Value<'a>]) -> Items<'a> {
    let mut out = Vec::new();
    if func == Func::Children {
        for v in input {
            children(v, &mut out);
        }
        return out;
    }
    let mut level = Vec::new();
    for v in input {
        children(v, &mut level);
    }
    let mut depth = 0;
    while !level.is_empty() && depth < 512 {
        let mut next = Vec::new();
        for v in &level {
            children(v, &mut next);
        }
        out.append(&mut level);
        level = next;
        depth += 1;
    }
    out
}

/// The single input item, owned; an error for more than one.
fn single<'a>(items: &[Value<'a>], fname: &str) -> R<Option<Value<'a>>> {
    Ok(singleton(items, fname)?.cloned())
}

/// The single input item of a string function: `None` for no input, an error
/// for more than one item or one that is not a string.
fn string_input<'v>(input: &'v [Value<'_>], fname: &str) -> R<Option<&'v str>> {
    let Some(v) = singleton(input, fname)? else {
        return Ok(None);
    };
    v.as_str()
        .map(Some)
        .ok_or_else(|| EvalError::ty(format!("{fname} can only be used on strings")))
}

fn boolean<'a>(v: bool) -> R<Items<'a>> {
    Ok(vec![Value::Boolean(v)])
}

#[cold]
fn arity_error(site: CallSite<'_>) -> EvalError {
    let (min, max) = site.func.arity();
    let expected = if min == max {
        min.to_string()
    } else {
        format!("{min}..{max}")
    };
    EvalError::Arity {
        name: site.name.to_string(),
        expected,
        got: site.args.len(),
    }
}

/// A function call as written: the resolved function, its name, whether it has
/// an explicit input (`x.f()` rather than `f()`), and its argument expressions.
#[derive(Clone, Copy)]
pub(crate) struct CallSite<'a> {
    pub func: Func,
    pub name: &'a str,
    pub has_base: bool,
    pub args: &'a [Node],
}

/// The dispatcher and one method per family of functions, in the order of the
/// FHIRPath specification's sections (existence, filtering and projection,
/// subsetting, combining, conversion, strings, math, tree navigation,
/// utilities, aggregates, types), then the FHIR additions.
impl<'e, 'a> Evaluator<'e, 'a> {
    /// Evaluates a call: checks the number of arguments, then hands the call
    /// to the method of the function's family. A new function goes into the
    /// arm of its family here and into that method.
    pub(crate) fn call(
        &self,
        site: CallSite<'a>,
        input: Items<'a>,
        focus: &[Value<'a>],
        frame: Frame<'_, 'a>,
    ) -> R<Items<'a>> {
        let (min, max) = site.func.arity();
        if site.args.len() < min || site.args.len() > max {
            return Err(arity_error(site));
        }
        use Func::*;
        match site.func {
            Empty | Exists | All | AllTrue | AnyTrue | AllFalse | AnyFalse | SubsetOf
            | SupersetOf | Count | Distinct | IsDistinct => {
                self.existence(site, input, focus, frame)
            }
            Where | Select | Repeat | OfType => self.filtering(site, input),
            Single | First | Last | Tail | Skip | Take | Intersect | Exclude => {
                self.subsetting(site, input, focus, frame)
            }
            Union | Combine => self.combining(site, input, focus, frame),
            Iif => self.iif(site, input, focus, frame),
            ToBoolean | ConvertsToBoolean | ToInteger | ConvertsToInteger | ToDecimal
            | ConvertsToDecimal | ToStringFn | ConvertsToString | ToDate | ConvertsToDate
            | ToDateTime | ConvertsToDateTime | ToTime | ConvertsToTime | ToQuantity
            | ConvertsToQuantity => self.conversion(site, input, focus, frame),
            IndexOf | Substring | StartsWith | EndsWith | Contains | Upper | Lower | Replace
            | Length | ToChars => self.string_fn(site, input, focus, frame),
            Matches | MatchesFull | ReplaceMatches => self.regex_fn(site, input, focus, frame),
            Split | Trim | Encode | Decode | Escape | Unescape => {
                self.string_extra_fn(site, input, focus, frame)
            }
            Join => self.join(site, input, focus, frame),
            Abs | Ceiling | Floor | Truncate | Exp | Ln | Sqrt | Round | Log | Power => {
                self.math_fn(site, input, focus, frame)
            }
            Children | Descendants => Ok(tree_navigation(site.func, &input)),
            Trace | Now | Today | TimeOfDay | DefineVariable => {
                self.utility(site, input, focus, frame)
            }
            LowBoundary | HighBoundary | Precision | Comparable => {
                self.precision_fn(site, input, focus, frame)
            }
            Aggregate => self.aggregate(site, input, focus, frame),
            Sort => self.sort(input, site.args),
            Not | Is | As | Type => self.type_and_logic(site, input),
            Extension | HasValue | GetValue | MemberOf | ConformsTo | HtmlChecks => {
                self.fhir_additions(site, input, focus, frame)
            }
            Resolve | GetResourceKey | GetReferenceKey => {
                self.references(site, input, focus, frame)
            }
            Unknown => Err(EvalError::UnknownFunction {
                name: site.name.to_string(),
            }),
        }
    }

    /// Existence: `empty`, `exists`, `all`, `allTrue` and the other boolean
    /// tests, `subsetOf`, `supersetOf`, `count`, `distinct`, `isDistinct`.
    fn existence(
        &self,
        site: CallSite<'a>,
        input: Items<'a>,
        focus: &[Value<'a>],
        frame: Frame<'_, 'a>,
    ) -> R<Items<'a>> {
        let CallSite { func, args, .. } = site;
        let fname = func.name();
        match func {
            Func::Empty => boolean(input.is_empty()),
            Func::Exists => {
                if args.is_empty() {
                    return boolean(!input.is_empty());
                }
                for (i, v) in input.iter().enumerate() {
                    if to_bool(&self.eval_item(&args[0], v, i, None)?, fname)? == Some(true) {
                        return boolean(true);
                    }
                }
                boolean(false)
            }
            Func::All => {
                for (i, v) in input.iter().enumerate() {
                    if to_bool(&self.eval_item(&args[0], v, i, None)?, fname)? != Some(true) {
                        return boolean(false);
                    }
                }
                boolean(true)
            }
            Func::AllTrue | Func::AnyTrue | Func::AllFalse | Func::AnyFalse => {
                let mut bools = Vec::with_capacity(input.len());
                for v in &input {
                    match v.to_system() {
                        Some(Value::Boolean(x)) => bools.push(x),
                        _ => return Err(EvalError::ty(format!("{fname} expects booleans"))),
                    }
                }
                boolean(match func {
                    Func::AllTrue => bools.iter().all(|x| *x),
                    Func::AnyTrue => bools.iter().any(|x| *x),
                    Func::AllFalse => bools.iter().all(|x| !*x),
                    _ => bools.iter().any(|x| !*x),
                })
            }
            Func::SubsetOf | Func::SupersetOf => {
                let other = self.arg(args, 0, focus, frame)?;
                let (small, big) = if func == Func::SubsetOf {
                    (&input, &other)
                } else {
                    (&other, &input)
                };
                boolean(
                    small
                        .iter()
                        .all(|v| big.iter().any(|w| equals(v, w) == Some(true))),
                )
            }
            Func::Count => Ok(vec![Value::Integer(input.len() as i64)]),
            Func::Distinct => Ok(dedup(input)),
            // isDistinct (the only one left)
            _ => {
                let n = input.len();
                boolean(dedup(input).len() == n)
            }
        }
    }

    /// Filtering and projection: `where`, `select`, `repeat`, `ofType`.
    fn filtering(&self, site: CallSite<'a>, input: Items<'a>) -> R<Items<'a>> {
        let CallSite { func, args, .. } = site;
        let fname = func.name();
        match func {
            Func::Where => {
                let mut out = Vec::new();
                for (i, v) in input.iter().enumerate() {
                    if to_bool(&self.eval_item(&args[0], v, i, None)?, fname)? == Some(true) {
                        out.push(v.clone());
                    }
                }
                Ok(out)
            }
            Func::Select => {
                let mut out = Vec::new();
                for (i, v) in input.iter().enumerate() {
                    out.extend(self.eval_item(&args[0], v, i, None)?);
                }
                Ok(out)
            }
            Func::Repeat => self.repeat(&args[0], input),
            // ofType (the only one left)
            _ => {
                let spec = self.type_arg(args)?;
                Ok(input
                    .into_iter()
                    .filter(|v| type_matches(v, &spec, true))
                    .collect())
            }
        }
    }

    /// `repeat(projection)`: the projection applied again to what it answers
    /// until nothing new turns up.
    fn repeat(&self, projection: &'a Node, input: Items<'a>) -> R<Items<'a>> {
        let mut out: Items<'a> = Vec::new();
        let mut queue = input;
        let mut rounds = 0;
        while !queue.is_empty() {
            rounds += 1;
            if rounds > 10_000 {
                return Err(EvalError::Other("repeat() did not terminate".into()));
            }
            let mut next = Vec::new();
            for (i, v) in queue.iter().enumerate() {
                for r in self.eval_item(projection, v, i, None)? {
                    let seen = match Self::ptr_key(&r) {
                        Some(k) => out.iter().any(|o| Self::ptr_key(o) == Some(k)),
                        None => out.iter().any(|o| equals(o, &r) == Some(true)),
                    };
                    if !seen {
                        out.push(r.clone());
                        next.push(r);
                    }
                }
            }
            queue = next;
        }
        Ok(out)
    }

    /// Subsetting: `single`, `first`, `last`, `tail`, `skip`, `take`,
    /// `intersect`, `exclude`.
    fn subsetting(
        &self,
        site: CallSite<'a>,
        input: Items<'a>,
        focus: &[Value<'a>],
        frame: Frame<'_, 'a>,
    ) -> R<Items<'a>> {
        let CallSite { func, args, .. } = site;
        let fname = func.name();
        match func {
            Func::Single => Ok(single(&input, fname)?.into_iter().collect()),
            Func::First => Ok(input.into_iter().take(1).collect()),
            Func::Last => Ok(input.into_iter().last().into_iter().collect()),
            Func::Tail => Ok(input.into_iter().skip(1).collect()),
            Func::Skip | Func::Take => {
                let Some(n) = int_arg(&self.arg(args, 0, focus, frame)?, fname)? else {
                    return Ok(vec![]);
                };
                let n = usize::try_from(n.max(0)).unwrap_or(0);
                Ok(if func == Func::Skip {
                    input.into_iter().skip(n).collect()
                } else {
                    input.into_iter().take(n).collect()
                })
            }
            Func::Intersect => {
                let other = self.arg(args, 0, focus, frame)?;
                Ok(dedup(
                    input
                        .into_iter()
                        .filter(|v| other.iter().any(|w| equals(v, w) == Some(true)))
                        .collect(),
                ))
            }
            // exclude (the only one left)
            _ => {
                let other = self.arg(args, 0, focus, frame)?;
                Ok(input
                    .into_iter()
                    .filter(|v| !other.iter().any(|w| equals(v, w) == Some(true)))
                    .collect())
            }
        }
    }

    /// Combining: `union` (without duplicates) and `combine` (with them).
    fn combining(
        &self,
        site: CallSite<'a>,
        input: Items<'a>,
        focus: &[Value<'a>],
        frame: Frame<'_, 'a>,
    ) -> R<Items<'a>> {
        let mut all = input;
        all.extend(self.arg(site.args, 0, focus, frame)?);
        Ok(if site.func == Func::Union {
            dedup(all)
        } else {
            all
        })
    }

    /// `iif(criterion, true-result [, otherwise-result])`: only the branch
    /// taken is evaluated.
    fn iif(
        &self,
        site: CallSite<'a>,
        input: Items<'a>,
        focus: &[Value<'a>],
        frame: Frame<'_, 'a>,
    ) -> R<Items<'a>> {
        let CallSite { args, has_base, .. } = site;
        let fname = site.func.name();
        // With an explicit input, the arguments see it as `$this`.
        let this = if has_base {
            singleton(&input, fname)?.cloned()
        } else {
            None
        };
        let eval_arg = |i: usize| -> R<Items<'a>> {
            match &this {
                Some(t) => self.scoped(|| {
                    self.eval(&args[i], std::slice::from_ref(t), Self::with_this(t, frame))
                }),
                None if has_base => self.scoped(|| self.eval(&args[i], &[], frame)),
                None => self.arg(args, i, focus, frame),
            }
        };
        let crit = eval_arg(0)?;
        let c = match singleton(&crit, fname)? {
            None => false,
            Some(v) => match v.to_system() {
                Some(Value::Boolean(x)) => x,
                _ => return Err(EvalError::ty("iif criterion must be a boolean")),
            },
        };
        if c {
            eval_arg(1)
        } else if args.len() > 2 {
            eval_arg(2)
        } else {
            Ok(vec![])
        }
    }

    /// Conversion: `toBoolean`, `toInteger`, `toDecimal`, `toString`,
    /// `toDate`, `toDateTime`, `toTime`, `toQuantity` and their `convertsTo`
    /// tests.
    fn conversion(
        &self,
        site: CallSite<'a>,
        input: Items<'a>,
        focus: &[Value<'a>],
        frame: Frame<'_, 'a>,
    ) -> R<Items<'a>> {
        let func = site.func;
        let fname = func.name();
        let Some(v) = single(&input, fname)? else {
            return Ok(vec![]);
        };
        let temporal = |kind| to_temporal(&v, kind);
        let out = match func {
            Func::ToBoolean => to_boolean(&v).map(Value::Boolean),
            Func::ConvertsToBoolean => Some(Value::Boolean(to_boolean(&v).is_some())),
            Func::ToInteger => to_integer(&v).map(Value::Integer),
            Func::ConvertsToInteger => Some(Value::Boolean(to_integer(&v).is_some())),
            Func::ToDecimal => to_decimal(&v).map(Value::Decimal),
            Func::ConvertsToDecimal => Some(Value::Boolean(to_decimal(&v).is_some())),
            Func::ToStringFn => v.to_fhirpath_string().map(|s| Value::String(Cow::Owned(s))),
            Func::ConvertsToString => Some(Value::Boolean(v.to_fhirpath_string().is_some())),
            Func::ToDate => temporal(TemporalKind::Date).map(Value::Temporal),
            Func::ConvertsToDate => Some(Value::Boolean(temporal(TemporalKind::Date).is_some())),
            Func::ToDateTime => temporal(TemporalKind::DateTime).map(Value::Temporal),
            Func::ConvertsToDateTime => {
                Some(Value::Boolean(temporal(TemporalKind::DateTime).is_some()))
            }
            Func::ToTime => temporal(TemporalKind::Time).map(Value::Temporal),
            Func::ConvertsToTime => Some(Value::Boolean(temporal(TemporalKind::Time).is_some())),
            // toQuantity, convertsToQuantity (the only ones left)
            _ => {
                let unit = match site.args.first() {
                    Some(_) => {
                        str_arg(&self.arg(site.args, 0, focus, frame)?, fname)?.map(str::to_string)
                    }
                    None => None,
                };
                let q = to_quantity(&v).and_then(|q| match &unit {
                    Some(u) => q.convert_to(u),
                    None => Some(q),
                });
                if func == Func::ToQuantity {
                    q.map(Value::Quantity)
                } else {
                    Some(Value::Boolean(q.is_some()))
                }
            }
        };
        Ok(out.into_iter().collect())
    }

    /// String manipulation: `indexOf`, `substring`, `startsWith`, `endsWith`,
    /// `contains`, `upper`, `lower`, `replace`, `length`, `toChars`.
    fn string_fn(
        &self,
        site: CallSite<'a>,
        input: Items<'a>,
        focus: &[Value<'a>],
        frame: Frame<'_, 'a>,
    ) -> R<Items<'a>> {
        let CallSite { func, args, .. } = site;
        let fname = func.name();
        let Some(s) = string_input(&input, fname)? else {
            return Ok(vec![]);
        };
        let arg_s = |i: usize| -> R<Option<String>> {
            Ok(str_arg(&self.arg(args, i, focus, frame)?, fname)?.map(str::to_string))
        };
        let owned = |x: String| Ok(vec![Value::String(Cow::Owned(x))]);
        match func {
            Func::IndexOf => {
                let Some(sub) = arg_s(0)? else {
                    return Ok(vec![]);
                };
                Ok(vec![Value::Integer(match s.find(&sub) {
                    Some(byte) => s[..byte].chars().count() as i64,
                    None => -1,
                })])
            }
            Func::Substring => {
                let Some(start) = int_arg(&self.arg(args, 0, focus, frame)?, fname)? else {
                    return Ok(vec![]);
                };
                let len = if args.len() > 1 {
                    int_arg(&self.arg(args, 1, focus, frame)?, fname)?
                } else {
                    None
                };
                let n = s.chars().count() as i64;
                if start < 0 || start >= n {
                    return Ok(vec![]);
                }
                let take = len.unwrap_or(n).max(0);
                owned(s.chars().skip(start as usize).take(take as usize).collect())
            }
            Func::StartsWith | Func::EndsWith | Func::Contains => match arg_s(0)? {
                Some(p) if func == Func::StartsWith => boolean(s.starts_with(&p)),
                Some(p) if func == Func::EndsWith => boolean(s.ends_with(&p)),
                Some(p) => boolean(s.contains(&p)),
                None => Ok(vec![]),
            },
            Func::Upper => owned(s.to_uppercase()),
            Func::Lower => owned(s.to_lowercase()),
            Func::Replace => match (arg_s(0)?, arg_s(1)?) {
                (Some(p), Some(r)) => owned(s.replace(&p, &r)),
                _ => Ok(vec![]),
            },
            Func::Length => Ok(vec![Value::Integer(s.chars().count() as i64)]),
            // toChars (the only one left)
            _ => Ok(s
                .chars()
                .map(|c| Value::String(Cow::Owned(c.to_string())))
                .collect()),
        }
    }

    /// Regular expressions: `matches`, `matchesFull`, `replaceMatches`.
    fn regex_fn(
        &self,
        site: CallSite<'a>,
        input: Items<'a>,
        focus: &[Value<'a>],
        frame: Frame<'_, 'a>,
    ) -> R<Items<'a>> {
        let CallSite { func, args, .. } = site;
        let fname = func.name();
        let Some(s) = string_input(&input, fname)? else {
            return Ok(vec![]);
        };
        let arg_s = |i: usize| -> R<Option<String>> {
            Ok(str_arg(&self.arg(args, i, focus, frame)?, fname)?.map(str::to_string))
        };
        if func != Func::ReplaceMatches {
            let Some(p) = arg_s(0)? else {
                return Ok(vec![]);
            };
            let pattern = if func == Func::MatchesFull {
                format!("(?s)^(?:{p})$")
            } else {
                format!("(?s){p}")
            };
            return boolean(regex(&pattern)?.is_match(s));
        }
        let (Some(p), Some(r)) = (arg_s(0)?, arg_s(1)?) else {
            return Ok(vec![]);
        };
        let replaced = if p.is_empty() {
            s.to_string()
        } else {
            regex(&format!("(?s){p}"))?
                .replace_all(s, r.as_str())
                .into_owned()
        };
        Ok(vec![Value::String(Cow::Owned(replaced))])
    }

    /// The further string functions: `split`, `trim`, `encode`, `decode`,
    /// `escape`, `unescape`.
    fn string_extra_fn(
        &self,
        site: CallSite<'a>,
        input: Items<'a>,
        focus: &[Value<'a>],
        frame: Frame<'_, 'a>,
    ) -> R<Items<'a>> {
        let CallSite { func, args, .. } = site;
        let fname = func.name();
        let Some(s) = string_input(&input, fname)? else {
            return Ok(vec![]);
        };
        let owned = |x: String| Ok(vec![Value::String(Cow::Owned(x))]);
        if func == Func::Trim {
            return owned(s.trim().to_string());
        }
        // The separator for `split`, the format for the others.
        let Some(arg) = str_arg(&self.arg(args, 0, focus, frame)?, fname)?.map(str::to_string)
        else {
            return Ok(vec![]);
        };
        match func {
            Func::Split if arg.is_empty() => Ok(s
                .chars()
                .map(|c| Value::String(Cow::Owned(c.to_string())))
                .collect()),
            Func::Split => Ok(s
                .split(arg.as_str())
                .map(|p| Value::String(Cow::Owned(p.to_string())))
                .collect()),
            Func::Encode | Func::Decode => Ok(encode_decode(func, &arg, s)?
                .map(|o| Value::String(Cow::Owned(o)))
                .into_iter()
                .collect()),
            // escape, unescape (the only ones left)
            _ => owned(escape_unescape(func, &arg, s)?),
        }
    }

    /// `join([separator])`: the input strings joined into one.
    fn join(
        &self,
        site: CallSite<'a>,
        input: Items<'a>,
        focus: &[Value<'a>],
        frame: Frame<'_, 'a>,
    ) -> R<Items<'a>> {
        if input.is_empty() {
            return Ok(vec![]);
        }
        let sep = match site.args.first() {
            Some(_) => str_arg(&self.arg(site.args, 0, focus, frame)?, site.func.name())?
                .unwrap_or("")
                .to_string(),
            None => String::new(),
        };
        let mut parts = Vec::with_capacity(input.len());
        for v in &input {
            parts.push(
                v.as_str()
                    .ok_or_else(|| EvalError::ty("join expects strings"))?
                    .to_string(),
            );
        }
        Ok(vec![Value::String(Cow::Owned(parts.join(&sep)))])
    }

    /// Math: `abs`, `ceiling`, `floor`, `truncate`, `exp`, `ln`, `sqrt`,
    /// `round`, `log`, `power`.
    fn math_fn(
        &self,
        site: CallSite<'a>,
        input: Items<'a>,
        focus: &[Value<'a>],
        frame: Frame<'_, 'a>,
    ) -> R<Items<'a>> {
        let CallSite { func, args, .. } = site;
        let fname = func.name();
        let Some(v) = single(&input, fname)? else {
            return Ok(vec![]);
        };
        let v = v.to_system().unwrap_or(v);
        let num = match &v {
            Value::Integer(i) => Decimal::from(*i),
            Value::Decimal(d) => *d,
            Value::Quantity(q) if func == Func::Abs => {
                return Ok(vec![Value::Quantity(Quantity::new(
                    q.value.abs(),
                    q.unit.clone(),
                ))]);
            }
            _ => return Err(EvalError::ty(format!("{fname} expects a number"))),
        };
        let f = num.to_f64().unwrap_or(f64::NAN);
        let dec = |d: Option<Decimal>| Ok(d.map(Value::Decimal).into_iter().collect());
        let int = |d: Decimal| -> R<Items<'a>> {
            Ok(vec![Value::Integer(
                d.to_i64().ok_or(EvalError::Overflow("rounding"))?,
            )])
        };
        match func {
            Func::Abs => Ok(vec![match v {
                Value::Integer(i) => {
                    Value::Integer(i.checked_abs().ok_or(EvalError::Overflow("abs"))?)
                }
                _ => Value::Decimal(num.abs()),
            }]),
            Func::Ceiling => int(num.ceil()),
            Func::Floor => int(num.floor()),
            Func::Truncate => int(num.trunc()),
            Func::Exp => dec(dec_from_f64(f.exp())),
            Func::Ln => dec(dec_from_f64(f.ln())),
            Func::Sqrt => dec(dec_from_f64(f.sqrt())),
            Func::Round => {
                let p = if args.is_empty() {
                    Some(0)
                } else {
                    int_arg(&self.arg(args, 0, focus, frame)?, fname)?
                };
                let Some(p) = p else { return Ok(vec![]) };
                if p < 0 {
                    return Err(EvalError::ty("round() precision must be >= 0"));
                }
                dec(Some(num.round_dp_with_strategy(
                    p.min(28) as u32,
                    RoundingStrategy::MidpointAwayFromZero,
                )))
            }
            Func::Log => {
                let base = self.arg(args, 0, focus, frame)?;
                let Some(bv) = singleton(&base, fname)?.and_then(Self::decimal_of) else {
                    return Ok(vec![]);
                };
                let b = bv.to_f64().unwrap_or(f64::NAN);
                dec(dec_from_f64(f.ln() / b.ln()))
            }
            // power (the only one left)
            _ => {
                let e = self.arg(args, 0, focus, frame)?;
                let Some(ev) = singleton(&e, fname)?.and_then(|x| x.to_system()) else {
                    return Ok(vec![]);
                };
                Self::power(&v, num, f, &ev)
            }
        }
    }

    /// `power(exponent)` of `v` (`num` as a decimal, `f` as a float): integer
    /// powers of integers stay integers, a whole exponent up to 64 is exact.
    fn power(v: &Value<'a>, num: Decimal, f: f64, ev: &Value<'a>) -> R<Items<'a>> {
        let dec = |d: Option<Decimal>| Ok(d.map(Value::Decimal).into_iter().collect());
        match (v, ev) {
            (Value::Integer(base), Value::Integer(exp)) if *exp >= 0 => {
                let r = u32::try_from(*exp).ok().and_then(|e| base.checked_pow(e));
                Ok(vec![Value::Integer(r.ok_or(EvalError::Overflow("power"))?)])
            }
            (_, Value::Integer(exp)) if (0..=64).contains(exp) => {
                let mut r = Decimal::ONE;
                for _ in 0..*exp {
                    r = r.checked_mul(num).ok_or(EvalError::Overflow("power"))?;
                }
                dec(Some(r))
            }
            (_, Value::Integer(_) | Value::Decimal(_)) => {
                let x = Self::decimal_of(ev)
                    .and_then(|d| d.to_f64())
                    .unwrap_or(f64::NAN);
                dec(dec_from_f64(f.powf(x)))
            }
            _ => Err(EvalError::ty("power() expects a number")),
        }
    }

    /// Utility functions: `trace`, `now`, `today`, `timeOfDay`,
    /// `defineVariable`.
    fn utility(
        &self,
        site: CallSite<'a>,
        input: Items<'a>,
        focus: &[Value<'a>],
        frame: Frame<'_, 'a>,
    ) -> R<Items<'a>> {
        let CallSite { func, args, .. } = site;
        let fname = func.name();
        match func {
            Func::Trace => {
                if let Some(sink) = self.ctx.trace {
                    let label = str_arg(&self.arg(args, 0, focus, frame)?, fname)?
                        .unwrap_or("")
                        .to_string();
                    if args.len() > 1 {
                        let mut projected = Vec::new();
                        for (i, v) in input.iter().enumerate() {
                            projected.extend(self.eval_item(&args[1], v, i, None)?);
                        }
                        sink.trace(&label, &projected);
                    } else {
                        sink.trace(&label, &input);
                    }
                }
                Ok(input)
            }
            Func::DefineVariable => {
                // Name and value are evaluated on the input, each in its own scope.
                let on_input = |i: usize| self.scoped(|| self.eval(&args[i], &input, frame));
                let name_items = on_input(0)?;
                let var = str_arg(&name_items, fname)?
                    .ok_or_else(|| EvalError::ty("defineVariable() needs a name"))?
                    .to_string();
                if self.variable_defined(&var) {
                    return Err(EvalError::Other(format!(
                        "variable '%{var}' is already defined"
                    )));
                }
                let value = if args.len() > 1 {
                    on_input(1)?
                } else {
                    input.clone()
                };
                self.scope.borrow_mut().push((var, value));
                Ok(input)
            }
            // now, today, timeOfDay (the only ones left)
            _ => {
                let now = self.ctx.now.unwrap_or_else(crate::clock_now);
                Ok(vec![Value::Temporal(match func {
                    Func::Now => now,
                    Func::Today => {
                        to_temporal(&Value::Temporal(now), TemporalKind::Date).unwrap_or(now)
                    }
                    _ => {
                        let mut t = now;
                        t.kind = TemporalKind::Time;
                        t.tz = None;
                        t
                    }
                })])
            }
        }
    }

    /// Precision: `lowBoundary`, `highBoundary`, `precision`, `comparable`.
    fn precision_fn(
        &self,
        site: CallSite<'a>,
        input: Items<'a>,
        focus: &[Value<'a>],
        frame: Frame<'_, 'a>,
    ) -> R<Items<'a>> {
        let CallSite { func, args, .. } = site;
        let fname = func.name();
        match func {
            Func::Precision => Ok(match single(&input, fname)?.and_then(|v| v.to_system()) {
                Some(Value::Decimal(d)) => vec![Value::Integer(i64::from(d.scale()))],
                Some(Value::Integer(_)) => vec![Value::Integer(0)],
                Some(Value::Temporal(t)) => vec![Value::Integer(i64::from(t.digits()))],
                _ => vec![],
            }),
            Func::Comparable => {
                let other = self.arg(args, 0, focus, frame)?;
                match (
                    single(&input, fname)?.and_then(|v| v.to_system()),
                    singleton(&other, fname)?.and_then(Value::to_system),
                ) {
                    (Some(Value::Quantity(a)), Some(Value::Quantity(b))) => {
                        Ok(vec![Value::Boolean(a.comparable(&b))])
                    }
                    (None, _) | (_, None) => Ok(vec![]),
                    _ => Err(EvalError::ty("comparable() expects quantities")),
                }
            }
            // lowBoundary, highBoundary (the only ones left)
            _ => {
                let Some(v) = single(&input, fname)? else {
                    return Ok(vec![]);
                };
                let digits = if args.is_empty() {
                    None
                } else {
                    int_arg(&self.arg(args, 0, focus, frame)?, fname)?
                };
                if !args.is_empty() && digits.is_none() {
                    return Ok(vec![]);
                }
                Ok(boundary(&v, digits, func == Func::HighBoundary)?
                    .into_iter()
                    .collect())
            }
        }
    }

    /// `aggregate(aggregator [, init])`: the aggregator runs once per item,
    /// its answer is `$total` for the next.
    fn aggregate(
        &self,
        site: CallSite<'a>,
        input: Items<'a>,
        focus: &[Value<'a>],
        frame: Frame<'_, 'a>,
    ) -> R<Items<'a>> {
        let args = site.args;
        let mut total = match args.get(1) {
            Some(_) => self.arg(args, 1, focus, frame)?,
            None => vec![],
        };
        for (i, v) in input.iter().enumerate() {
            total = self.eval_item(&args[0], v, i, Some(&total))?;
        }
        Ok(total)
    }

    /// The operators that can also be called as functions (`not`, `is`, `as`)
    /// and reflection's `type`.
    fn type_and_logic(&self, site: CallSite<'a>, input: Items<'a>) -> R<Items<'a>> {
        let fname = site.func.name();
        match site.func {
            Func::Not => Ok(bool_items(to_bool(&input, fname)?.map(|x| !x))),
            Func::Is => {
                let spec = self.type_arg(site.args)?;
                Ok(single(&input, fname)?
                    .map(|v| Value::Boolean(type_matches(&v, &spec, false)))
                    .into_iter()
                    .collect())
            }
            Func::As => {
                let spec = self.type_arg(site.args)?;
                Ok(single(&input, fname)?
                    .filter(|v| type_matches(v, &spec, true))
                    .into_iter()
                    .collect())
            }
            // type (the only one left)
            _ => Ok(input
                .iter()
                .map(|v| {
                    let (namespace, name) = v.type_name();
                    Value::TypeInfo { namespace, name }
                })
                .collect()),
        }
    }

    /// The FHIR additions: `extension`, `hasValue`, `getValue`, `memberOf`,
    /// `conformsTo`, `htmlChecks`.
    fn fhir_additions(
        &self,
        site: CallSite<'a>,
        input: Items<'a>,
        focus: &[Value<'a>],
        frame: Frame<'_, 'a>,
    ) -> R<Items<'a>> {
        let CallSite { func, args, .. } = site;
        let fname = func.name();
        let arg_s = |i: usize| -> R<String> {
            Ok(str_arg(&self.arg(args, i, focus, frame)?, fname)?
                .unwrap_or("")
                .to_string())
        };
        match func {
            Func::Extension => {
                let Some(url) =
                    str_arg(&self.arg(args, 0, focus, frame)?, fname)?.map(str::to_string)
                else {
                    return Ok(vec![]);
                };
                let mut exts = Vec::new();
                for v in &input {
                    child(v, "extension", &mut exts);
                }
                Ok(exts
                    .into_iter()
                    .filter(|e| {
                        matches!(e, Value::Node(FhirNode { json: Some(j), .. })
                            if j.get("url").and_then(JsonRef::as_str) == Some(url.as_str()))
                    })
                    .collect())
            }
            Func::HasValue => boolean(
                matches!(
                    input.as_slice(),
                    [Value::Node(FhirNode { json: Some(j), .. })] if !j.is_object() && !j.is_array()
                ) || matches!(input.as_slice(), [v] if !matches!(v, Value::Node(_))),
            ),
            Func::GetValue => Ok(match input.as_slice() {
                [v @ Value::Node(FhirNode { json: Some(j), .. })] if !j.is_object() => {
                    v.to_system().into_iter().collect()
                }
                _ => vec![],
            }),
            Func::MemberOf => {
                let vs = arg_s(0)?;
                let Some(ts) = self.ctx.terminology else {
                    return Err(EvalError::NoTerminologyService(format!("memberOf('{vs}')")));
                };
                let Some(v) = single(&input, fname)? else {
                    return Ok(vec![]);
                };
                ts.member_of(&v.to_json(), &vs)
                    .map(bool_items)
                    .map_err(EvalError::Other)
            }
            Func::ConformsTo => {
                let spec = conformance_type(&arg_s(0)?)?;
                Ok(single(&input, fname)?
                    .map(|v| Value::Boolean(type_matches(&v, &spec, false)))
                    .into_iter()
                    .collect())
            }
            // htmlChecks (the only one left)
            _ => boolean(true),
        }
    }

    /// References: `resolve`, and SQL on FHIR's `getResourceKey` and
    /// `getReferenceKey([type])`.
    fn references(
        &self,
        site: CallSite<'a>,
        input: Items<'a>,
        focus: &[Value<'a>],
        frame: Frame<'_, 'a>,
    ) -> R<Items<'a>> {
        let mut out = Vec::new();
        match site.func {
            Func::Resolve => {
                for v in &input {
                    let reference = match v {
                        Value::Node(FhirNode { json: Some(j), .. }) if j.is_object() => j
                            .get("reference")
                            .and_then(JsonRef::as_str)
                            .map(str::to_string),
                        other => other.as_str().map(str::to_string),
                    };
                    if let Some(r) = reference
                        && let Some(j) = self.resolve_reference(&r)
                    {
                        push_json(Some(j), None, None, &mut out);
                    }
                }
            }
            Func::GetResourceKey => {
                for v in &input {
                    if let Value::Node(FhirNode { json: Some(j), .. }) = v
                        && let Some(o) = j.as_object()
                        && o.contains_key("resourceType")
                        && let Some(id) = o.get_str("id")
                    {
                        out.push(Value::String(Cow::Borrowed(id)));
                    }
                }
            }
            // getReferenceKey (the only one left)
            _ => {
                let want = match site.args.first() {
                    Some(n) => Some(match &n.kind {
                        NodeKind::Member { base: None, name } => name.clone(),
                        _ => str_arg(&self.arg(site.args, 0, focus, frame)?, site.func.name())?
                            .unwrap_or("")
                            .to_string(),
                    }),
                    None => None,
                };
                for v in &input {
                    if let Value::Node(FhirNode { json: Some(j), .. }) = v
                        && let Some(id) = reference_key(*j, want.as_deref())
                    {
                        out.push(Value::String(Cow::Borrowed(id)));
                    }
                }
            }
        }
        Ok(out)
    }

    fn resolve_reference(&self, r: &str) -> Option<JsonRef<'a>> {
        let root = match self.root.first() {
            Some(Value::Node(FhirNode { json: Some(j), .. })) => Some(*j),
            _ => None,
        };
        let str_of = |j: JsonRef<'a>, k: &str| j.get(k).and_then(JsonRef::as_str);
        if let Some(id) = r.strip_prefix('#') {
            let contained = root?.get("contained")?.as_array()?;
            return contained.iter().find(|c| str_of(*c, "id") == Some(id));
        }
        if let Some(root) = root
            && str_of(root, "resourceType") == Some("Bundle")
            && let Some(entries) = root.get("entry").and_then(JsonRef::as_array)
        {
            let mut parts = r.rsplit('/');
            let (id, ty) = (parts.next(), parts.next());
            for e in entries.iter() {
                if str_of(e, "fullUrl") == Some(r) {
                    return e.get("resource");
                }
                if let Some(res) = e.get("resource")
                    && str_of(res, "id") == id
                    && str_of(res, "resourceType") == ty
                {
                    return Some(res);
                }
            }
        }
        self.ctx
            .resolver
            .and_then(|res| res.resolve(r))
            .map(JsonRef::Serde)
    }

    fn sort(&self, input: Items<'a>, args: &'a [Node]) -> R<Items<'a>> {
        let mut keyed: Vec<(Vec<Items<'a>>, Value<'a>)> = Vec::with_capacity(input.len());
        let keys: Vec<(&'a Node, bool)> = args
            .iter()
            .map(|a| match &a.kind {
                NodeKind::Negate(inner) => (&**inner, true),
                _ => (a, false),
            })
            .collect();
        for (i, v) in input.into_iter().enumerate() {
            let mut ks = Vec::with_capacity(keys.len().max(1));
            if keys.is_empty() {
                ks.push(vec![v.clone()]);
            }
            for (k, _) in &keys {
                ks.push(self.eval_item(k, &v, i, None)?);
            }
            keyed.push((ks, v));
        }
        let mut err = None;
        keyed.sort_by(|(a, _), (b, _)| {
            for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
                let desc = keys.get(i).is_some_and(|k| k.1);
                // Empty keys sort first in either direction.
                let o = match (x.first(), y.first()) {
                    (None, None) => Ordering::Equal,
                    (None, _) => Ordering::Less,
                    (_, None) => Ordering::Greater,
                    (Some(x), Some(y)) => {
                        let o = match compare(x, y) {
                            Ok(o) => o.unwrap_or(Ordering::Equal),
                            Err(e) => {
                                err = Some(e);
                                Ordering::Equal
                            }
                        };
                        if desc { o.reverse() } else { o }
                    }
                };
                if o != Ordering::Equal {
                    return o;
                }
            }
            Ordering::Equal
        });
        if let Some(e) = err {
            return Err(e);
        }
        Ok(keyed.into_iter().map(|(_, v)| v).collect())
    }
}
