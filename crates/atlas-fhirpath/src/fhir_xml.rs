//! Minimal FHIR XML → FHIR JSON conversion, driven by the model table.
//!
//! Used by the suite runner for inputs that only exist as XML. It handles what
//! resources need: primitives (`value` attribute, typed by the model), their
//! `id`/`extension` (→ `_name`), repeating elements (→ arrays), choice
//! elements, contained/inline resources and the XHTML narrative (kept as text).

use crate::model::Model;
use serde_json::{Map, Value as Json};

/// Convert a FHIR XML resource document to FHIR JSON.
pub fn resource_from_xml(text: &str) -> Result<Json, String> {
    let doc = roxmltree::Document::parse(text).map_err(|e| e.to_string())?;
    Ok(resource(doc.root_element(), text))
}

fn resource(el: roxmltree::Node<'_, '_>, text: &str) -> Json {
    let rt = el.tag_name().name();
    let mut obj = Map::new();
    obj.insert("resourceType".into(), Json::String(rt.to_string()));
    fill(el, Model::r4().type_key(rt), &mut obj, text);
    Json::Object(obj)
}

fn primitive(value: &str, ty: Option<&str>) -> Json {
    match ty {
        Some("boolean") => Json::Bool(value == "true"),
        Some("integer" | "positiveInt" | "unsignedInt" | "decimal") => {
            serde_json::from_str::<serde_json::Number>(value)
                .map(Json::Number)
                .unwrap_or_else(|_| Json::String(value.into()))
        }
        _ => Json::String(value.to_string()),
    }
}

type Slot = (Option<Json>, Option<Json>);

fn fill(
    el: roxmltree::Node<'_, '_>,
    ty: Option<&'static str>,
    obj: &mut Map<String, Json>,
    text: &str,
) {
    let model = Model::r4();
    for attr in ["id", "url"] {
        if let Some(v) = el.attribute(attr) {
            obj.insert(attr.into(), Json::String(v.into()));
        }
    }
    let mut slots: Vec<(String, bool, Vec<Slot>)> = Vec::new();
    for child in el.children().filter(roxmltree::Node::is_element) {
        let name = child.tag_name().name();
        if name == "div" {
            obj.insert("div".into(), Json::String(text[child.range()].to_string()));
            continue;
        }
        let (cty, repeats) = match ty {
            Some(t) => match model.element(t, name) {
                Some(e) => (e.types.first().copied(), e.repeats),
                None => (
                    model
                        .split_choice(t, name)
                        .and_then(|(_, ct)| model.type_key(ct)),
                    false,
                ),
            },
            None => (None, false),
        };
        let slot: Slot = if cty.is_some_and(|t| model.is_a(t, "Resource"))
            || cty.is_none() && is_resource_wrapper(child)
        {
            match child.children().find(roxmltree::Node::is_element) {
                Some(inner) if model.is_resource(inner.tag_name().name()) => {
                    (Some(resource(inner, text)), None)
                }
                _ => (Some(complex(child, cty, text)), None),
            }
        } else if let Some(v) = child.attribute("value") {
            let has_ext =
                child.attribute("id").is_some() || child.children().any(|c| c.is_element());
            let ext = has_ext.then(|| complex(child, Some("Element"), text));
            (Some(primitive(v, cty)), ext)
        } else if cty.is_some_and(|t| model.is_primitive(t)) {
            (None, Some(complex(child, Some("Element"), text)))
        } else {
            (Some(complex(child, cty, text)), None)
        };
        match slots.iter_mut().find(|(n, _, _)| n == name) {
            Some((_, rep, v)) => {
                *rep = true;
                v.push(slot);
            }
            None => slots.push((name.to_string(), repeats, vec![slot])),
        }
    }
    for (name, repeats, values) in slots {
        let any_ext = values.iter().any(|(_, e)| e.is_some());
        let any_val = values.iter().any(|(v, _)| v.is_some());
        if repeats {
            if any_val {
                obj.insert(
                    name.clone(),
                    Json::Array(
                        values
                            .iter()
                            .map(|(v, _)| v.clone().unwrap_or(Json::Null))
                            .collect(),
                    ),
                );
            }
            if any_ext {
                obj.insert(
                    format!("_{name}"),
                    Json::Array(
                        values
                            .iter()
                            .map(|(_, e)| e.clone().unwrap_or(Json::Null))
                            .collect(),
                    ),
                );
            }
        } else if let Some((v, e)) = values.into_iter().next() {
            if let Some(v) = v {
                obj.insert(name.clone(), v);
            }
            if let Some(e) = e {
                obj.insert(format!("_{name}"), e);
            }
        }
    }
}

fn is_resource_wrapper(el: roxmltree::Node<'_, '_>) -> bool {
    let mut kids = el.children().filter(roxmltree::Node::is_element);
    matches!((kids.next(), kids.next()), (Some(k), None) if Model::r4().is_resource(k.tag_name().name()))
}

fn complex(el: roxmltree::Node<'_, '_>, ty: Option<&'static str>, text: &str) -> Json {
    let mut obj = Map::new();
    fill(el, ty, &mut obj, text);
    Json::Object(obj)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn converts_primitives_arrays_and_extensions() {
        let xml = r#"<Patient xmlns="http://hl7.org/fhir"><id value="x"/><active value="true"/>
            <name><given value="A"/><given value="B"/></name>
            <birthDate value="1974-12-25"><extension url="u"><valueString value="s"/></extension></birthDate>
            <multipleBirthInteger value="2"/></Patient>"#;
        let j = resource_from_xml(xml).unwrap_or_default();
        assert_eq!(
            j,
            json!({"resourceType": "Patient", "id": "x", "active": true, "name": [{"given": ["A", "B"]}],
                   "birthDate": "1974-12-25", "_birthDate": {"extension": [{"url": "u", "valueString": "s"}]},
                   "multipleBirthInteger": 2})
        );
    }
}
