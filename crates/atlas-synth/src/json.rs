//! Small helpers that append compact JSON to a `String`.
//!
//! Resources are written by hand rather than through `serde_json::Value`
//! because the generator emits hundreds of millions of them. Constant
//! strings from the code tables are plain ASCII without quotes or
//! backslashes and are pushed as they are; anything else goes through
//! [`push_str`], which escapes with serde_json when needed.

use std::fmt::Write;

/// Appends `s` as a JSON string literal, escaping as JSON requires.
pub(crate) fn push_str(buf: &mut String, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        buf.push('"');
        buf.push_str(s);
        buf.push('"');
    } else {
        // `Value`'s Display is serde_json's serializer, which cannot fail for a string.
        let _ = write!(buf, "{}", serde_json::Value::from(s));
    }
}

/// Appends a Coding: `{"system":..,"code":..,"display":..}`.
pub(crate) fn push_coding(buf: &mut String, system: &str, code: &str, display: &str) {
    buf.push_str("{\"system\":");
    push_str(buf, system);
    buf.push_str(",\"code\":");
    push_str(buf, code);
    if !display.is_empty() {
        buf.push_str(",\"display\":");
        push_str(buf, display);
    }
    buf.push('}');
}

/// Appends a CodeableConcept with one coding and `text` equal to the display.
pub(crate) fn push_concept(buf: &mut String, system: &str, code: &str, display: &str) {
    buf.push_str("{\"coding\":[");
    push_coding(buf, system, code, display);
    buf.push_str("],\"text\":");
    push_str(buf, display);
    buf.push('}');
}

/// Appends a Reference `{"reference":"Type/id"}`, with a display when not empty.
pub(crate) fn push_reference(buf: &mut String, ty: &str, id: &str, display: &str) {
    buf.push_str("{\"reference\":\"");
    buf.push_str(ty);
    buf.push('/');
    buf.push_str(id);
    buf.push('"');
    if !display.is_empty() {
        buf.push_str(",\"display\":");
        push_str(buf, display);
    }
    buf.push('}');
}

/// Appends a finite decimal with `places` digits after the point, or with
/// every digit of the shortest round-trip form when `places` is `None`.
pub(crate) fn push_decimal(buf: &mut String, value: f64, places: Option<usize>) {
    let value = if value.is_finite() { value } else { 0.0 };
    let _ = match places {
        Some(p) => write!(buf, "{value:.p$}"),
        None => write!(buf, "{value}"),
    };
}

/// Appends an integer.
pub(crate) fn push_int(buf: &mut String, value: i64) {
    let _ = write!(buf, "{value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_only_when_needed() {
        let mut buf = String::new();
        push_str(&mut buf, "O'Brien Zoë");
        push_str(&mut buf, "say \"hi\"\\\n");
        assert_eq!(buf, r#""O'Brien Zoë""say \"hi\"\\\n""#);
    }

    #[test]
    fn decimals() {
        let mut buf = String::new();
        push_decimal(&mut buf, 176.35499866729558, None);
        buf.push(' ');
        push_decimal(&mut buf, 72.04, Some(1));
        buf.push(' ');
        push_decimal(&mut buf, f64::NAN, Some(2));
        assert_eq!(buf, "176.35499866729558 72.0 0.00");
    }
}
