//! Byte-preserving rewrite of `reference` values inside raw JSON text.
//!
//! Bundles refer to their own entries by `urn:uuid:` fullUrls, and
//! `atlas synth scale` renames ids; both must change references without
//! re-serializing the resource, because the store keeps every other byte
//! exactly as received (decimals like `176.35499866729558` keep their digits).
//! So this is a small JSON tokenizer that copies the input and replaces only
//! the string values of `"reference"` keys for which the callback returns a
//! replacement.

use std::borrow::Cow;

/// What a reference should become: the callback's answer for one value.
pub type ReferenceTarget = Option<String>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed JSON near byte {0} while rewriting references")]
pub struct RewriteError(pub usize);

/// Scans one JSON string starting at the opening quote `at`; returns the index
/// just past the closing quote and whether it contained escapes.
fn scan_string(s: &[u8], at: usize) -> Result<(usize, bool), RewriteError> {
    let mut i = at + 1;
    let mut escaped = false;
    while i < s.len() {
        match s[i] {
            b'"' => return Ok((i + 1, escaped)),
            b'\\' => {
                escaped = true;
                i += 2;
            }
            _ => i += 1,
        }
    }
    Err(RewriteError(at))
}

fn skip_ws(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && matches!(s[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// Rewrites every `"reference": "<value>"` in `json` for which `map(value)`
/// returns `Some(new)`. Everything else is copied byte for byte. Returns the
/// input unchanged (borrowed) when nothing was rewritten.
pub fn rewrite_references<'a>(
    json: &'a str,
    mut map: impl FnMut(&str) -> ReferenceTarget,
) -> Result<Cow<'a, str>, RewriteError> {
    let s = json.as_bytes();
    let mut out: Option<String> = None;
    let mut copied_to = 0usize;
    let mut i = 0usize;
    while i < s.len() {
        if s[i] != b'"' {
            i += 1;
            continue;
        }
        let (end, _) = scan_string(s, i)?;
        let after = skip_ws(s, end);
        // A string followed by ':' is a key; only `"reference"` keys matter.
        if after < s.len() && s[after] == b':' && &s[i..end] == b"\"reference\"" {
            let v = skip_ws(s, after + 1);
            if v < s.len() && s[v] == b'"' {
                let (vend, escaped) = scan_string(s, v)?;
                let raw = &json[v + 1..vend - 1];
                let decoded: Cow<str> = if escaped {
                    Cow::Owned(
                        serde_json::from_str::<String>(&json[v..vend])
                            .map_err(|_| RewriteError(v))?,
                    )
                } else {
                    Cow::Borrowed(raw)
                };
                if let Some(new) = map(&decoded) {
                    let buf = out.get_or_insert_with(|| String::with_capacity(json.len() + 64));
                    buf.push_str(&json[copied_to..v]);
                    // serde_json escapes exactly what JSON requires.
                    buf.push_str(&serde_json::to_string(&new).map_err(|_| RewriteError(v))?);
                    copied_to = vend;
                }
                i = vend;
                continue;
            }
        }
        i = end;
    }
    Ok(match out {
        None => Cow::Borrowed(json),
        Some(mut buf) => {
            buf.push_str(&json[copied_to..]);
            Cow::Owned(buf)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn urn_map(r: &str) -> ReferenceTarget {
        r.strip_prefix("urn:uuid:")
            .map(|id| format!("Patient/{id}"))
    }

    #[test]
    fn rewrites_only_reference_values() {
        let src = r##"{"resourceType":"Observation","valueQuantity":{"value":176.35499866729558},"subject" : { "reference" : "urn:uuid:abc" },"note":[{"text":"reference"}],"x":{"reference":"#c1"}}"##;
        let out = rewrite_references(src, urn_map).unwrap();
        assert_eq!(
            out,
            r##"{"resourceType":"Observation","valueQuantity":{"value":176.35499866729558},"subject" : { "reference" : "Patient/abc" },"note":[{"text":"reference"}],"x":{"reference":"#c1"}}"##
        );
    }

    #[test]
    fn untouched_input_is_borrowed() {
        let src = r#"{"a":"reference","reference":"Patient/1"}"#;
        assert!(matches!(
            rewrite_references(src, urn_map).unwrap(),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn escaped_values_and_keys_in_strings() {
        let src = r#"{"text":"say \"reference\": \"urn:uuid:no\"","reference":"urn:uuid:a\/b"}"#;
        let out = rewrite_references(src, urn_map).unwrap();
        assert_eq!(
            out,
            r#"{"text":"say \"reference\": \"urn:uuid:no\"","reference":"Patient/a/b"}"#
        );
    }

    #[test]
    fn unterminated_string_is_an_error() {
        assert!(rewrite_references(r#"{"reference":"urn:uuid:a"#, urn_map).is_err());
    }

    proptest! {
        /// Rewriting then parsing equals parsing then replacing in the tree.
        #[test]
        fn agrees_with_tree_rewrite(ids in proptest::collection::vec("[a-f0-9]{1,8}", 1..6), num in "[1-9][0-9]{0,4}\\.[0-9]{1,12}") {
            let entries: Vec<String> = ids.iter().enumerate().map(|(i, id)| {
                format!(r#"{{"k{i}":{num},"ref":{{"reference":"urn:uuid:{id}","display":"reference"}}}}"#)
            }).collect();
            let src = format!(r#"{{"resourceType":"Bundle","items":[{}]}}"#, entries.join(","));
            let out = rewrite_references(&src, urn_map).unwrap();
            // Numbers survive byte for byte.
            prop_assert_eq!(out.matches(num.as_str()).count(), ids.len());
            let mut tree: serde_json::Value = serde_json::from_str(&src).unwrap();
            for item in tree["items"].as_array_mut().unwrap() {
                let r = item["ref"]["reference"].as_str().unwrap().to_owned();
                item["ref"]["reference"] = serde_json::Value::String(urn_map(&r).unwrap());
            }
            let reparsed: serde_json::Value = serde_json::from_str(&out).unwrap();
            prop_assert_eq!(reparsed, tree);
        }
    }
}
