//! Finds the value of the top-level `"id"` key in one JSON object, by bytes.
//!
//! Only depth 1 counts: ids of `contained` resources, of elements, or of
//! Bundle entries are deeper and are left alone. Strings are skipped with
//! their escapes (`\"`, `\\`), so text that merely looks like `"id":"x"`
//! inside a string is never matched. A key spelled with escapes (`"\u0069d"`)
//! is decoded before comparing, as a JSON parser would.

use std::ops::Range;

/// Index just past the string whose opening quote is at `at`.
fn skip_string(s: &[u8], at: usize) -> Option<usize> {
    let mut i = at + 1;
    while i < s.len() {
        match s[i] {
            b'"' => return Some(i + 1),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    None
}

fn skip_ws(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && matches!(s[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// True when the string literal `lit` (with its quotes) decodes to `id`.
fn is_id_key(lit: &[u8]) -> bool {
    if lit == b"\"id\"" {
        return true;
    }
    lit.contains(&b'\\') && serde_json::from_slice::<String>(lit).is_ok_and(|k| k == "id")
}

/// The byte ranges (quotes included) of every string value of a top-level
/// `"id"` key in `json` — normally one; several if the key is repeated.
/// `None` when `json` does not start as an object or ends early; an id whose
/// value is not a string is not reported.
pub(crate) fn top_level_id_spans(json: &[u8]) -> Option<Vec<Range<usize>>> {
    let s = json;
    let mut i = skip_ws(s, 0);
    if s.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    let mut depth = 1usize;
    let mut expect_key = true;
    let mut spans = Vec::new();
    while i < s.len() {
        match s[i] {
            b'"' => {
                let end = skip_string(s, i)?;
                if depth == 1 && expect_key {
                    expect_key = false;
                    let colon = skip_ws(s, end);
                    if s.get(colon) != Some(&b':') {
                        return None;
                    }
                    let value = skip_ws(s, colon + 1);
                    if is_id_key(&s[i..end]) && s.get(value) == Some(&b'"') {
                        let value_end = skip_string(s, value)?;
                        spans.push(value..value_end);
                        i = value_end;
                    } else {
                        i = value;
                    }
                } else {
                    i = end;
                }
            }
            b'{' | b'[' => {
                depth += 1;
                i += 1;
            }
            b'}' | b']' => {
                depth -= 1;
                if depth == 0 {
                    return Some(spans);
                }
                i += 1;
            }
            b',' => {
                expect_key = depth == 1;
                i += 1;
            }
            _ => i += 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    fn ids(json: &str) -> Option<Vec<&str>> {
        top_level_id_spans(json.as_bytes()).map(|v| v.into_iter().map(|r| &json[r]).collect())
    }

    #[test]
    fn contained_ids_are_not_top_level() {
        assert_eq!(
            ids(r#"{"contained":[{"id":"x"}],"id":"y"}"#),
            Some(vec![r#""y""#])
        );
        assert_eq!(
            ids(r#"{"id":"y","contained":[{"id":"x"}]}"#),
            Some(vec![r#""y""#])
        );
        assert_eq!(
            ids(r#"{"meta":{"id":"m"},"entry":[{"resource":{"id":"e"}}]}"#),
            Some(vec![])
        );
    }

    #[test]
    fn strings_with_escapes() {
        assert_eq!(
            ids(r#"{"a":"\"id\":\"no\"","id":"y"}"#),
            Some(vec![r#""y""#])
        );
        assert_eq!(ids(r#"{"a":"\\","id":"y"}"#), Some(vec![r#""y""#]));
        assert_eq!(ids(r#"{"a":"x\\\"}","id":"y"}"#), Some(vec![r#""y""#]));
        assert_eq!(ids(r#"{"a":"{[","id":"y"}"#), Some(vec![r#""y""#]));
        assert_eq!(ids(r#"{"\u0069d":"z"}"#), Some(vec![r#""z""#]));
        assert_eq!(ids(r#"{"id":"a\/b"}"#), Some(vec![r#""a\/b""#]));
    }

    #[test]
    fn whitespace_values_and_oddities() {
        assert_eq!(ids(" {\r\n \"id\" :\t\"y\" }\r"), Some(vec![r#""y""#]));
        assert_eq!(ids(r#"{"id":5,"x":"id"}"#), Some(vec![]));
        assert_eq!(ids(r#"{"x":"id","id":null}"#), Some(vec![]));
        assert_eq!(
            ids(r#"{"id":"a","id":"b"}"#),
            Some(vec![r#""a""#, r#""b""#])
        );
        assert_eq!(ids(r#"{"idx":"a","xid":"b"}"#), Some(vec![]));
        assert_eq!(ids(r#"[{"id":"a"}]"#), None);
        assert_eq!(ids(r#"{"id":"a"#), None);
        assert_eq!(ids(r#"{"id":"a","b":[1,2"#), None);
        assert_eq!(ids(""), None);
        assert_eq!(ids("{"), None);
        assert_eq!(ids(r#"{"a" "b"}"#), None);
        assert_eq!(ids(r#"{"a":"\"#), None);
    }

    /// Random JSON with ids at every depth.
    fn arb_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i32>().prop_map(Value::from),
            "[a-z\"\\\\{}\\[\\]:, ]{0,6}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 32, 5, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(
                    prop_oneof![Just("id".to_owned()), "[a-z\"\\\\]{1,4}"],
                    inner,
                    0..4
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn finds_exactly_the_top_level_id(
            body in proptest::collection::btree_map("[a-z\"\\\\]{1,4}", arb_value(), 0..5),
            id in proptest::option::of("[A-Za-z0-9.\\-]{1,20}"),
            pretty in any::<bool>(),
        ) {
            let mut obj: serde_json::Map<String, Value> = body.into_iter().filter(|(k, _)| k != "id").collect();
            if let Some(id) = &id {
                obj.insert("id".into(), json!(id));
            }
            let value = Value::Object(obj);
            let text = if pretty { serde_json::to_string_pretty(&value).unwrap() } else { value.to_string() };
            let spans = top_level_id_spans(text.as_bytes()).unwrap();
            let found: Vec<String> = spans.iter().map(|r| serde_json::from_str(&text[r.clone()]).unwrap()).collect();
            prop_assert_eq!(found, id.into_iter().collect::<Vec<_>>());
        }
    }
}
