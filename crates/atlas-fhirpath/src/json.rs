//! Atlas's own JSON tree for evaluation.
//!
//! This module owns the borrowed JSON representation the evaluator walks:
//! [`JsonValue`] (parsed by [`parse`], a strict RFC 8259 parser), the
//! order-preserving [`JsonObject`], the conversions to and from
//! `serde_json::Value` ([`from_serde`], [`JsonValue::to_serde`]) and
//! [`JsonRef`], the borrowed handle the evaluator uses so that it can walk
//! either this tree or a caller's `serde_json::Value`.
//!
//! Why not `serde_json::Value`: without serde_json's `arbitrary_precision`
//! feature its numbers pass through `f64`, so FHIR decimals such as
//! `0.123456789012345678901` lose digits and `1.50` becomes `1.5`. Here a
//! number keeps its exact source text ([`JsonValue::Number`]) and is converted
//! to `rust_decimal::Decimal` or `i64` from that text only when needed
//! ([`number_decimal`], [`number_i64`]). Strings borrow from the input unless
//! they contain escapes, and objects are a `Vec` of entries in document order
//! (FHIR objects are small, so a linear lookup beats hashing).

pub mod tape;

use rust_decimal::Decimal;
use std::borrow::Cow;
use std::fmt;

/// Deepest nesting of arrays and objects [`parse`] accepts.
pub const MAX_DEPTH: usize = 512;

/// A JSON value borrowing from the text it was parsed from.
///
/// The derived `PartialEq` is textual (`1.50` and `1.5` differ, key order
/// matters); [`json_equal`] compares by value.
#[derive(Debug, Clone, PartialEq)]
pub enum JsonValue<'a> {
    Null,
    Bool(bool),
    /// The number's exact text, as written (RFC 8259 grammar, already validated).
    Number(Cow<'a, str>),
    /// Borrowed unless the source used escapes.
    String(Cow<'a, str>),
    Array(Vec<JsonValue<'a>>),
    Object(JsonObject<'a>),
}

/// A JSON object: entries in document order. With duplicate keys,
/// [`JsonObject::get`] returns the last one (as serde_json keeps the last).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JsonObject<'a> {
    entries: Vec<(Cow<'a, str>, JsonValue<'a>)>,
}

impl<'a> JsonObject<'a> {
    pub fn new() -> Self {
        JsonObject {
            entries: Vec::new(),
        }
    }
    pub fn with_capacity(n: usize) -> Self {
        JsonObject {
            entries: Vec::with_capacity(n),
        }
    }
    /// Append an entry (no check for an existing key).
    pub fn push(&mut self, key: impl Into<Cow<'a, str>>, value: JsonValue<'a>) {
        self.entries.push((key.into(), value));
    }
    /// The value of `key` (the last one when the key is repeated).
    pub fn get(&self, key: &str) -> Option<&JsonValue<'a>> {
        self.entries
            .iter()
            .rev()
            .find(|(k, _)| k.as_ref() == key)
            .map(|(_, v)| v)
    }
    pub fn contains_key(&self, key: &str) -> bool {
        self.entries.iter().any(|(k, _)| k.as_ref() == key)
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// Entries in document order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &JsonValue<'a>)> {
        self.entries.iter().map(|(k, v)| (k.as_ref(), v))
    }
    /// A copy that borrows nothing.
    pub fn into_owned(self) -> JsonObject<'static> {
        JsonObject {
            entries: self
                .entries
                .into_iter()
                .map(|(k, v)| (Cow::Owned(k.into_owned()), v.into_owned()))
                .collect(),
        }
    }
}

impl<'a> JsonValue<'a> {
    pub fn is_null(&self) -> bool {
        matches!(self, JsonValue::Null)
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            JsonValue::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            JsonValue::Bool(b) => Some(*b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[JsonValue<'a>]> {
        match self {
            JsonValue::Array(a) => Some(a),
            _ => None,
        }
    }
    pub fn as_object(&self) -> Option<&JsonObject<'a>> {
        match self {
            JsonValue::Object(o) => Some(o),
            _ => None,
        }
    }
    /// The member `key` of an object; `None` for other values.
    pub fn get(&self, key: &str) -> Option<&JsonValue<'a>> {
        self.as_object().and_then(|o| o.get(key))
    }
    /// The exact text of a number.
    pub fn as_number_text(&self) -> Option<&str> {
        match self {
            JsonValue::Number(n) => Some(n),
            _ => None,
        }
    }
    /// A number as `i64`, when it is written as an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        self.as_number_text().and_then(number_i64)
    }
    /// A number as an exact `Decimal`; `None` when it cannot be represented exactly.
    pub fn as_decimal(&self) -> Option<Decimal> {
        self.as_number_text().and_then(number_decimal)
    }

    /// A copy that borrows nothing.
    pub fn into_owned(self) -> JsonValue<'static> {
        match self {
            JsonValue::Null => JsonValue::Null,
            JsonValue::Bool(b) => JsonValue::Bool(b),
            JsonValue::Number(n) => JsonValue::Number(Cow::Owned(n.into_owned())),
            JsonValue::String(s) => JsonValue::String(Cow::Owned(s.into_owned())),
            JsonValue::Array(a) => JsonValue::Array(a.into_iter().map(Self::into_owned).collect()),
            JsonValue::Object(o) => JsonValue::Object(o.into_owned()),
        }
    }

    /// Convert to `serde_json::Value`, e.g. for rendering. Numbers go through
    /// serde_json's number parsing (so decimals become `f64`); a number
    /// serde_json cannot hold (`1e400`) becomes a string of its text.
    pub fn to_serde(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            JsonValue::Null => J::Null,
            JsonValue::Bool(b) => J::Bool(*b),
            JsonValue::Number(n) => number_to_serde(n),
            JsonValue::String(s) => J::String(s.to_string()),
            JsonValue::Array(a) => J::Array(a.iter().map(Self::to_serde).collect()),
            JsonValue::Object(o) => {
                let mut m = serde_json::Map::new();
                for (k, v) in o.iter() {
                    m.insert(k.to_string(), v.to_serde());
                }
                J::Object(m)
            }
        }
    }

    /// Compact JSON text. Numbers and strings keep their exact values.
    pub fn to_json_string(&self) -> String {
        let mut out = String::new();
        self.write_json(&mut out);
        out
    }

    fn write_json(&self, out: &mut String) {
        match self {
            JsonValue::Null => out.push_str("null"),
            JsonValue::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            JsonValue::Number(n) => out.push_str(n),
            JsonValue::String(s) => write_json_string(s, out),
            JsonValue::Array(a) => {
                out.push('[');
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    v.write_json(out);
                }
                out.push(']');
            }
            JsonValue::Object(o) => {
                out.push('{');
                for (i, (k, v)) in o.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_json_string(k, out);
                    out.push(':');
                    v.write_json(out);
                }
                out.push('}');
            }
        }
    }
}

impl fmt::Display for JsonValue<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_json_string())
    }
}

fn write_json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn number_to_serde(text: &str) -> serde_json::Value {
    match serde_json::from_str::<serde_json::Number>(text) {
        Ok(n) => serde_json::Value::Number(n),
        Err(_) => serde_json::Value::String(text.to_string()),
    }
}

/// Whether number text is written as an integer (no fraction, no exponent).
pub fn is_integer_text(text: &str) -> bool {
    !text.bytes().any(|b| matches!(b, b'.' | b'e' | b'E'))
}

/// Number text as `i64`, when written as an integer that fits.
pub fn number_i64(text: &str) -> Option<i64> {
    if is_integer_text(text) {
        text.parse().ok()
    } else {
        None
    }
}

/// Number text as an exact `Decimal` (scale kept: `1.50` has scale 2). `None`
/// when the value has more digits than `Decimal` holds (it is never rounded).
pub fn number_decimal(text: &str) -> Option<Decimal> {
    if text.bytes().any(|b| matches!(b, b'e' | b'E')) {
        let d = Decimal::from_scientific(text).ok()?;
        // `from_scientific` may round; accept it only when it is exact.
        return scientific_is_exact(text, d).then_some(d);
    }
    Decimal::from_str_exact(text).ok()
}

/// Check a decimal made from `m e x` text by comparing significant digits.
fn scientific_is_exact(text: &str, d: Decimal) -> bool {
    let mantissa = text.split(['e', 'E']).next().unwrap_or("");
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let want = digits.trim_start_matches('0').trim_end_matches('0');
    let got_s = d.mantissa().unsigned_abs().to_string();
    let got = got_s.trim_start_matches('0').trim_end_matches('0');
    want == got
}

/// Convert a `serde_json::Value` to an owned tree (numbers as serde_json prints them).
pub fn from_serde(v: &serde_json::Value) -> JsonValue<'static> {
    use serde_json::Value as J;
    match v {
        J::Null => JsonValue::Null,
        J::Bool(b) => JsonValue::Bool(*b),
        J::Number(n) => JsonValue::Number(Cow::Owned(n.to_string())),
        J::String(s) => JsonValue::String(Cow::Owned(s.clone())),
        J::Array(a) => JsonValue::Array(a.iter().map(from_serde).collect()),
        J::Object(o) => {
            let mut obj = JsonObject::with_capacity(o.len());
            for (k, v) in o {
                obj.push(k.clone(), from_serde(v));
            }
            JsonValue::Object(obj)
        }
    }
}

/// A syntax error: what was wrong and the byte offset where it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError {
    pub offset: usize,
    pub message: &'static str,
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid JSON at byte {}: {}", self.offset, self.message)
    }
}

impl std::error::Error for JsonError {}

/// Parse one JSON text (RFC 8259, strict: no trailing commas, comments,
/// NaN, leading zeros, unescaped control characters or lone surrogates;
/// only whitespace may follow the value). Nesting deeper than
/// [`MAX_DEPTH`] is an error.
pub fn parse(text: &str) -> Result<JsonValue<'_>, JsonError> {
    let mut p = Parser {
        src: text,
        bytes: text.as_bytes(),
        pos: 0,
        depth: 0,
    };
    p.skip_ws();
    let v = p.value()?;
    p.skip_ws();
    if p.pos != p.bytes.len() {
        return Err(p.err("trailing characters after the value"));
    }
    Ok(v)
}

struct Parser<'a> {
    src: &'a str,
    bytes: &'a [u8],
    pos: usize,
    depth: usize,
}

impl<'a> Parser<'a> {
    fn err(&self, message: &'static str) -> JsonError {
        JsonError {
            offset: self.pos,
            message,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.pos += 1;
        }
    }

    fn value(&mut self) -> Result<JsonValue<'a>, JsonError> {
        match self.peek() {
            None => Err(self.err("unexpected end of input")),
            Some(b'{') => self.object(),
            Some(b'[') => self.array(),
            Some(b'"') => Ok(JsonValue::String(self.string()?)),
            Some(b't') => self.literal("true", JsonValue::Bool(true)),
            Some(b'f') => self.literal("false", JsonValue::Bool(false)),
            Some(b'n') => self.literal("null", JsonValue::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => Err(self.err("expected a value")),
        }
    }

    fn literal(&mut self, word: &str, v: JsonValue<'a>) -> Result<JsonValue<'a>, JsonError> {
        if self.bytes[self.pos..].starts_with(word.as_bytes()) {
            self.pos += word.len();
            Ok(v)
        } else {
            Err(self.err("invalid literal"))
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self) -> Result<JsonValue<'a>, JsonError> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => {
                self.pos += 1;
                if let Some(b'0'..=b'9') = self.peek() {
                    return Err(self.err("leading zero in a number"));
                }
            }
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(self.err("expected a digit")),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if self.digits() == 0 {
                return Err(self.err("expected a digit after the decimal point"));
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(self.err("expected a digit in the exponent"));
            }
        }
        // All bytes consumed are ASCII, so these are char boundaries.
        Ok(JsonValue::Number(Cow::Borrowed(&self.src[start..self.pos])))
    }

    /// A string starting at the opening quote.
    fn string(&mut self) -> Result<Cow<'a, str>, JsonError> {
        self.pos += 1;
        let start = self.pos;
        loop {
            match self.peek() {
                None => return Err(self.err("unterminated string")),
                Some(b'"') => {
                    let s = &self.src[start..self.pos];
                    self.pos += 1;
                    return Ok(Cow::Borrowed(s));
                }
                Some(b'\\') => break,
                Some(b) if b < 0x20 => return Err(self.err("control character in a string")),
                Some(_) => self.pos += 1,
            }
        }
        // Slow path: the string has escapes.
        let mut out = String::with_capacity(self.pos - start + 16);
        out.push_str(&self.src[start..self.pos]);
        let mut run = self.pos;
        loop {
            match self.peek() {
                None => return Err(self.err("unterminated string")),
                Some(b'"') => {
                    out.push_str(&self.src[run..self.pos]);
                    self.pos += 1;
                    return Ok(Cow::Owned(out));
                }
                Some(b'\\') => {
                    out.push_str(&self.src[run..self.pos]);
                    self.escape(&mut out)?;
                    run = self.pos;
                }
                Some(b) if b < 0x20 => return Err(self.err("control character in a string")),
                Some(_) => self.pos += 1,
            }
        }
    }

    /// One escape sequence starting at the backslash.
    fn escape(&mut self, out: &mut String) -> Result<(), JsonError> {
        self.pos += 1;
        let c = match self.peek() {
            Some(b'"') => '"',
            Some(b'\\') => '\\',
            Some(b'/') => '/',
            Some(b'b') => '\u{8}',
            Some(b'f') => '\u{c}',
            Some(b'n') => '\n',
            Some(b'r') => '\r',
            Some(b't') => '\t',
            Some(b'u') => {
                let at = self.pos - 1;
                self.pos += 1;
                let hi = self.hex4()?;
                let code = if (0xD800..0xDC00).contains(&hi) {
                    if !self.bytes[self.pos..].starts_with(b"\\u") {
                        return Err(JsonError {
                            offset: at,
                            message: "lone leading surrogate in a \\u escape",
                        });
                    }
                    self.pos += 2;
                    let lo = self.hex4()?;
                    if !(0xDC00..0xE000).contains(&lo) {
                        return Err(JsonError {
                            offset: at,
                            message: "invalid surrogate pair in a \\u escape",
                        });
                    }
                    0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                } else if (0xDC00..0xE000).contains(&hi) {
                    return Err(JsonError {
                        offset: at,
                        message: "lone trailing surrogate in a \\u escape",
                    });
                } else {
                    hi
                };
                let c = char::from_u32(code).ok_or(JsonError {
                    offset: at,
                    message: "invalid \\u escape",
                })?;
                out.push(c);
                return Ok(());
            }
            None => return Err(self.err("unterminated string")),
            Some(_) => return Err(self.err("invalid escape")),
        };
        self.pos += 1;
        out.push(c);
        Ok(())
    }

    fn hex4(&mut self) -> Result<u32, JsonError> {
        let mut v = 0u32;
        for _ in 0..4 {
            let d = match self.peek() {
                Some(b @ b'0'..=b'9') => b - b'0',
                Some(b @ b'a'..=b'f') => b - b'a' + 10,
                Some(b @ b'A'..=b'F') => b - b'A' + 10,
                _ => return Err(self.err("expected 4 hex digits in a \\u escape")),
            };
            v = v * 16 + u32::from(d);
            self.pos += 1;
        }
        Ok(v)
    }

    fn enter(&mut self) -> Result<(), JsonError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.err("nesting too deep"));
        }
        self.pos += 1;
        Ok(())
    }

    fn array(&mut self) -> Result<JsonValue<'a>, JsonError> {
        self.enter()?;
        let mut items = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.pos += 1;
            self.depth -= 1;
            return Ok(JsonValue::Array(items));
        }
        loop {
            self.skip_ws();
            items.push(self.value()?);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    self.depth -= 1;
                    return Ok(JsonValue::Array(items));
                }
                None => return Err(self.err("unterminated array")),
                Some(_) => return Err(self.err("expected ',' or ']'")),
            }
        }
    }

    fn object(&mut self) -> Result<JsonValue<'a>, JsonError> {
        self.enter()?;
        let mut obj = JsonObject::new();
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            self.depth -= 1;
            return Ok(JsonValue::Object(obj));
        }
        loop {
            self.skip_ws();
            if self.peek() != Some(b'"') {
                return Err(self.err("expected a string key"));
            }
            let key = self.string()?;
            self.skip_ws();
            if self.peek() != Some(b':') {
                return Err(self.err("expected ':'"));
            }
            self.pos += 1;
            self.skip_ws();
            let v = self.value()?;
            obj.entries.push((key, v));
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    self.depth -= 1;
                    return Ok(JsonValue::Object(obj));
                }
                None => return Err(self.err("unterminated object")),
                Some(_) => return Err(self.err("expected ',' or '}'")),
            }
        }
    }
}

/// A borrowed JSON node for the evaluator: our tree or a caller's
/// `serde_json::Value` (kept so the `serde_json` entry points still work
/// without copying). Cheap to copy.
#[derive(Debug, Clone, Copy)]
pub enum JsonRef<'a> {
    Tree(&'a JsonValue<'a>),
    Serde(&'a serde_json::Value),
}

impl<'a> From<&'a JsonValue<'a>> for JsonRef<'a> {
    fn from(v: &'a JsonValue<'a>) -> Self {
        JsonRef::Tree(v)
    }
}

impl<'a> From<&'a serde_json::Value> for JsonRef<'a> {
    fn from(v: &'a serde_json::Value) -> Self {
        JsonRef::Serde(v)
    }
}

/// A number of either representation.
#[derive(Debug, Clone, Copy)]
pub enum NumberRef<'a> {
    Text(&'a str),
    Serde(&'a serde_json::Number),
}

impl NumberRef<'_> {
    /// Written as an integer (serde: held as an integer).
    pub fn is_integer(&self) -> bool {
        match self {
            NumberRef::Text(t) => is_integer_text(t),
            NumberRef::Serde(n) => n.is_i64() || n.is_u64(),
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            NumberRef::Text(t) => number_i64(t),
            NumberRef::Serde(n) => n.as_i64(),
        }
    }
    /// Exact decimal for text; for serde numbers, the digits serde_json kept.
    pub fn as_decimal(&self) -> Option<Decimal> {
        match self {
            NumberRef::Text(t) => number_decimal(t),
            NumberRef::Serde(n) => crate::value::json_number_decimal(n),
        }
    }
    /// The number's text (exact for the tree; as serde_json prints it otherwise).
    pub fn text(&self) -> Cow<'_, str> {
        match self {
            NumberRef::Text(t) => Cow::Borrowed(t),
            NumberRef::Serde(n) => Cow::Owned(n.to_string()),
        }
    }
}

/// An object of either representation.
#[derive(Debug, Clone, Copy)]
pub enum ObjectRef<'a> {
    Tree(&'a JsonObject<'a>),
    Serde(&'a serde_json::Map<String, serde_json::Value>),
}

impl<'a> ObjectRef<'a> {
    pub fn get(&self, key: &str) -> Option<JsonRef<'a>> {
        match self {
            ObjectRef::Tree(o) => o.get(key).map(JsonRef::Tree),
            ObjectRef::Serde(o) => o.get(key).map(JsonRef::Serde),
        }
    }
    pub fn get_str(&self, key: &str) -> Option<&'a str> {
        self.get(key).and_then(|v| v.as_str())
    }
    pub fn contains_key(&self, key: &str) -> bool {
        match self {
            ObjectRef::Tree(o) => o.contains_key(key),
            ObjectRef::Serde(o) => o.contains_key(key),
        }
    }
    pub fn len(&self) -> usize {
        match self {
            ObjectRef::Tree(o) => o.len(),
            ObjectRef::Serde(o) => o.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Entries in document order (serde: the map's order).
    pub fn iter(&self) -> ObjectIter<'a> {
        match self {
            ObjectRef::Tree(o) => ObjectIter::Tree(o.entries.iter()),
            ObjectRef::Serde(o) => ObjectIter::Serde(o.iter()),
        }
    }
}

/// Iterator over an [`ObjectRef`].
pub enum ObjectIter<'a> {
    Tree(std::slice::Iter<'a, (Cow<'a, str>, JsonValue<'a>)>),
    Serde(serde_json::map::Iter<'a>),
}

impl<'a> Iterator for ObjectIter<'a> {
    type Item = (&'a str, JsonRef<'a>);
    fn next(&mut self) -> Option<Self::Item> {
        match self {
            ObjectIter::Tree(it) => it.next().map(|(k, v)| (k.as_ref(), JsonRef::Tree(v))),
            ObjectIter::Serde(it) => it.next().map(|(k, v)| (k.as_str(), JsonRef::Serde(v))),
        }
    }
}

/// An array of either representation.
#[derive(Debug, Clone, Copy)]
pub enum ArrayRef<'a> {
    Tree(&'a [JsonValue<'a>]),
    Serde(&'a [serde_json::Value]),
}

impl<'a> ArrayRef<'a> {
    pub fn len(&self) -> usize {
        match self {
            ArrayRef::Tree(a) => a.len(),
            ArrayRef::Serde(a) => a.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn get(&self, i: usize) -> Option<JsonRef<'a>> {
        match self {
            ArrayRef::Tree(a) => a.get(i).map(JsonRef::Tree),
            ArrayRef::Serde(a) => a.get(i).map(JsonRef::Serde),
        }
    }
    pub fn iter(&self) -> impl Iterator<Item = JsonRef<'a>> + use<'a> {
        let a = *self;
        (0..a.len()).filter_map(move |i| a.get(i))
    }
}

/// What a [`JsonRef`] holds.
#[derive(Debug, Clone, Copy)]
pub enum Kind<'a> {
    Null,
    Bool(bool),
    Number(NumberRef<'a>),
    String(&'a str),
    Array(ArrayRef<'a>),
    Object(ObjectRef<'a>),
}

impl<'a> JsonRef<'a> {
    pub fn kind(self) -> Kind<'a> {
        use serde_json::Value as J;
        match self {
            JsonRef::Tree(v) => match v {
                JsonValue::Null => Kind::Null,
                JsonValue::Bool(b) => Kind::Bool(*b),
                JsonValue::Number(n) => Kind::Number(NumberRef::Text(n)),
                JsonValue::String(s) => Kind::String(s),
                JsonValue::Array(a) => Kind::Array(ArrayRef::Tree(a)),
                JsonValue::Object(o) => Kind::Object(ObjectRef::Tree(o)),
            },
            JsonRef::Serde(v) => match v {
                J::Null => Kind::Null,
                J::Bool(b) => Kind::Bool(*b),
                J::Number(n) => Kind::Number(NumberRef::Serde(n)),
                J::String(s) => Kind::String(s),
                J::Array(a) => Kind::Array(ArrayRef::Serde(a)),
                J::Object(o) => Kind::Object(ObjectRef::Serde(o)),
            },
        }
    }
    pub fn is_null(self) -> bool {
        matches!(self.kind(), Kind::Null)
    }
    pub fn is_object(self) -> bool {
        matches!(self.kind(), Kind::Object(_))
    }
    pub fn is_array(self) -> bool {
        matches!(self.kind(), Kind::Array(_))
    }
    pub fn as_str(self) -> Option<&'a str> {
        match self.kind() {
            Kind::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_object(self) -> Option<ObjectRef<'a>> {
        match self.kind() {
            Kind::Object(o) => Some(o),
            _ => None,
        }
    }
    pub fn as_array(self) -> Option<ArrayRef<'a>> {
        match self.kind() {
            Kind::Array(a) => Some(a),
            _ => None,
        }
    }
    pub fn as_number(self) -> Option<NumberRef<'a>> {
        match self.kind() {
            Kind::Number(n) => Some(n),
            _ => None,
        }
    }
    /// Member `key` of an object.
    pub fn get(self, key: &str) -> Option<JsonRef<'a>> {
        self.as_object().and_then(|o| o.get(key))
    }
    /// Address of the node, for identity (dedup of the same node).
    pub fn addr(self) -> usize {
        match self {
            JsonRef::Tree(v) => v as *const JsonValue<'_> as usize,
            JsonRef::Serde(v) => v as *const serde_json::Value as usize,
        }
    }
    /// Convert to `serde_json::Value` (see [`JsonValue::to_serde`]).
    pub fn to_serde(self) -> serde_json::Value {
        match self {
            JsonRef::Tree(v) => v.to_serde(),
            JsonRef::Serde(v) => v.clone(),
        }
    }
    /// Compact JSON text (tree numbers keep their exact text).
    pub fn to_json_string(self) -> String {
        match self {
            JsonRef::Tree(v) => v.to_json_string(),
            JsonRef::Serde(v) => v.to_string(),
        }
    }
}

/// Structural equality: objects by key set (order ignored), arrays in order,
/// numbers by value (`1.50` equals `1.5`).
pub fn json_equal(a: JsonRef<'_>, b: JsonRef<'_>) -> bool {
    match (a.kind(), b.kind()) {
        (Kind::Null, Kind::Null) => true,
        (Kind::Bool(x), Kind::Bool(y)) => x == y,
        (Kind::String(x), Kind::String(y)) => x == y,
        (Kind::Number(x), Kind::Number(y)) => match (x.as_decimal(), y.as_decimal()) {
            (Some(p), Some(q)) => p == q,
            _ => x.text() == y.text(),
        },
        (Kind::Array(x), Kind::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y.iter()).all(|(p, q)| json_equal(p, q))
        }
        (Kind::Object(x), Kind::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_equal(v, w)))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests;
