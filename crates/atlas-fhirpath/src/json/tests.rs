use super::*;
use proptest::prelude::*;
use serde_json::json;

fn ok(s: &str) -> JsonValue<'_> {
    match parse(s) {
        Ok(v) => v,
        Err(e) => panic!("{s:?}: {e}"),
    }
}

fn bad(s: &str) -> JsonError {
    match parse(s) {
        Ok(v) => panic!("{s:?} parsed as {v:?}"),
        Err(e) => e,
    }
}

#[test]
fn scalars() {
    assert_eq!(ok("null"), JsonValue::Null);
    assert_eq!(ok(" true "), JsonValue::Bool(true));
    assert_eq!(ok("false"), JsonValue::Bool(false));
    assert_eq!(ok("\"hi\""), JsonValue::String("hi".into()));
    assert_eq!(ok("-0"), JsonValue::Number("-0".into()));
    assert_eq!(ok("1.50"), JsonValue::Number("1.50".into()));
    assert_eq!(ok("1E+2"), JsonValue::Number("1E+2".into()));
}

#[test]
fn numbers_keep_their_text_and_convert_exactly() {
    let v = ok(r#"{"a": 0.123456789012345678901, "b": 12345678901234567.5, "c": 1.50}"#);
    let d = |k: &str| {
        v.get(k)
            .and_then(JsonValue::as_decimal)
            .map(|d| d.to_string())
    };
    assert_eq!(d("a").as_deref(), Some("0.123456789012345678901"));
    assert_eq!(d("b").as_deref(), Some("12345678901234567.5"));
    assert_eq!(d("c").as_deref(), Some("1.50"));
    assert_eq!(ok("-42").as_i64(), Some(-42));
    assert_eq!(ok("1.0").as_i64(), None);
    assert_eq!(ok("99999999999999999999").as_i64(), None);
    assert_eq!(
        ok("99999999999999999999")
            .as_decimal()
            .map(|d| d.to_string()),
        Some("99999999999999999999".to_string())
    );
    assert_eq!(
        ok("1e2").as_decimal().map(|d| d.to_string()),
        Some("100".into())
    );
    assert_eq!(
        ok("25e-1").as_decimal().map(|d| d.to_string()),
        Some("2.5".into())
    );
    // More digits than Decimal holds: no silent rounding.
    assert_eq!(
        ok("0.1234567890123456789012345678901234").as_decimal(),
        None
    );
    assert_eq!(ok("1e400").as_decimal(), None);
}

#[test]
fn strings_borrow_unless_escaped() {
    let v = ok(r#"["plain", "a\"b\\c\/d\b\f\n\r\t", "\u00e9\u20AC", "\ud83d\ude00", "ünï"]"#);
    let a = v.as_array().unwrap_or_default();
    assert!(matches!(&a[0], JsonValue::String(Cow::Borrowed("plain"))));
    assert_eq!(a[1].as_str(), Some("a\"b\\c/d\u{8}\u{c}\n\r\t"));
    assert!(matches!(&a[1], JsonValue::String(Cow::Owned(_))));
    assert_eq!(a[2].as_str(), Some("é€"));
    assert_eq!(a[3].as_str(), Some("😀"));
    assert!(matches!(&a[4], JsonValue::String(Cow::Borrowed("ünï"))));
}

#[test]
fn objects_keep_order() {
    let v = ok(r#"{"z": 1, "a": {"y": [], "b": {}}, "m": null}"#);
    let o = v.as_object().expect("object");
    let keys: Vec<&str> = o.iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["z", "a", "m"]);
    assert!(o.contains_key("m"));
    assert!(o.get("m").is_some_and(JsonValue::is_null));
    assert!(o.get("nope").is_none());
    assert_eq!(
        ok(r#"{"k":1,"k":2}"#).get("k").and_then(JsonValue::as_i64),
        Some(2)
    );
}

#[test]
fn rejects_malformed_input_with_offsets() {
    for (s, offset) in [
        ("", 0),
        ("   ", 3),
        ("[1,]", 3),
        ("[1 2]", 3),
        ("{\"a\":1,}", 7),
        ("{\"a\" 1}", 5),
        ("{a:1}", 1),
        ("01", 1),
        ("-", 1),
        ("1.", 2),
        ("1e", 2),
        ("1e+", 3),
        (".5", 0),
        ("+1", 0),
        ("NaN", 0),
        ("tru", 0),
        ("nul", 0),
        ("\"abc", 4),
        ("\"a\\x\"", 3),
        ("\"a\\u12G4\"", 6),
        ("\"\\ud800\"", 1),
        ("\"\\ud800\\u0041\"", 1),
        ("\"\\udc00\"", 1),
        ("\"tab\there\"", 4),
        ("[1] x", 4),
        ("{} {}", 3),
        ("[", 1),
        ("{", 1),
        ("{\"a\":", 5),
        ("// c\n1", 0),
    ] {
        assert_eq!(bad(s).offset, offset, "{s:?}: {}", bad(s));
    }
    assert!(bad("[1] x").to_string().contains("byte 4"));
}

#[test]
fn depth_limit() {
    let deep_ok = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
    assert!(parse(&deep_ok).is_ok());
    let too_deep = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
    assert_eq!(bad(&too_deep).message, "nesting too deep");
    let very_deep = "{\"a\":".repeat(100_000);
    assert!(parse(&very_deep).is_err());
}

#[test]
fn serde_conversions() {
    let s = json!({"resourceType": "Observation", "valueQuantity": {"value": 1.5, "unit": "mg"},
        "list": [1, -2, 3.25, "x", null, true, {"k": []}]});
    let tree = from_serde(&s);
    assert_eq!(tree.to_serde(), s);
    let text = tree.to_json_string();
    assert_eq!(ok(&text).to_serde(), s);
    assert_eq!(ok("1e400").to_serde(), json!("1e400"));
    assert_eq!(ok("\"a\\u0001\\\"\"").to_json_string(), "\"a\\u0001\\\"\"");
}

#[test]
fn json_ref_equality() {
    let a = ok(r#"{"a": 1.50, "b": [1, {"c": "x"}]}"#);
    let b = ok(r#"{"b": [1, {"c": "x"}], "a": 1.5}"#);
    let c = json!({"a": 1.5, "b": [1, {"c": "x"}]});
    let d = json!({"a": 1.5, "b": [1, {"c": "y"}]});
    assert!(json_equal(JsonRef::Tree(&a), JsonRef::Tree(&b)));
    assert!(json_equal(JsonRef::Tree(&a), JsonRef::Serde(&c)));
    assert!(!json_equal(JsonRef::Tree(&a), JsonRef::Serde(&d)));
}

fn arb_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        any::<u64>().prop_map(|i| json!(i)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        any::<String>().prop_map(serde_json::Value::String),
        "[\\\\\"\u{0}-\u{1f}a-z\u{e9}\u{1F600}]{0,8}".prop_map(serde_json::Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..8)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn round_trips_serde_values(v in arb_json(), pretty in any::<bool>()) {
        let text = if pretty {
            serde_json::to_string_pretty(&v)
        } else {
            serde_json::to_string(&v)
        };
        let text = text.map_err(|e| TestCaseError::fail(e.to_string()))?;
        let tree = parse(&text).map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
        // serde_json's own float reading is not always the exact inverse of its
        // printing (no `float_roundtrip`), so compare with what it reads back.
        let reread: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(tree.to_serde(), reread.clone());
        prop_assert_eq!(from_serde(&v), tree.clone().into_owned());
        let again = tree.to_json_string();
        prop_assert_eq!(&again, &serde_json::to_string(&v).unwrap_or_default());
        prop_assert_eq!(parse(&again).map(|t| t.to_serde()), Ok(reread));
    }

    #[test]
    fn arbitrary_text_never_panics(s in any::<String>()) {
        let ours = parse(&s);
        if let Err(e) = &ours {
            prop_assert!(e.offset <= s.len());
        }
    }

    #[test]
    fn json_like_text_never_panics_and_agrees_with_serde(
        s in "[\\[\\]{}\",:0-9.eE+\\-tfnrula\\\\ ]{0,40}"
    ) {
        let ours = parse(&s);
        if let Err(e) = &ours {
            prop_assert!(e.offset <= s.len());
        }
        // Short inputs cannot hit serde_json's depth limit; its range limit
        // (`1e999`) is the one allowed difference: we keep the number's text.
        let theirs = serde_json::from_str::<serde_json::Value>(&s);
        if theirs.is_ok() {
            prop_assert!(ours.is_ok(), "{:?}", s);
        } else if ours.is_ok() {
            prop_assert!(s.contains(['e', 'E']), "{:?}", s);
        }
    }

    #[test]
    fn truncated_and_mutated_valid_json_never_panics(
        v in arb_json(), cut in any::<prop::sample::Index>(), byte in any::<u8>()
    ) {
        let text = serde_json::to_string(&v).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let i = cut.index(text.len() + 1);
        if text.is_char_boundary(i) {
            let _ = parse(&text[..i]);
            if byte.is_ascii() {
                let mut m = text.clone();
                m.insert(i, byte as char);
                let _ = parse(&m);
            }
        }
    }
}
