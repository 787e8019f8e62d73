//! FHIR R4 model metadata (element types, choice elements, cardinality, type
//! hierarchy), loaded once from the generated table `r4.json`.
//!
//! The table is produced by `scripts/gen_fhir_model.py`; see `MODEL.md`.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::OnceLock;

/// FNV-1a: the model maps are keyed by short static strings and looked up on
/// every navigation step, where SipHash's DoS resistance buys nothing.
#[derive(Default)]
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<Fnv>>;

const R4_TABLE: &str = include_str!("r4.json");

/// What kind of type a model type is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeKind {
    Resource,
    Complex,
    Primitive,
    /// A backbone element, keyed by its defining path (`Patient.contact`).
    Backbone,
}

/// A type of the model.
#[derive(Debug, Clone)]
pub struct TypeDef {
    pub key: &'static str,
    pub kind: TypeKind,
    pub base: Option<&'static str>,
}

/// An element of a type.
#[derive(Debug, Clone)]
pub struct ElementDef {
    /// Type keys: type names (`HumanName`), `System.String`, or backbone paths (`Patient.contact`).
    pub types: Vec<&'static str>,
    pub repeats: bool,
    /// A choice element (`value[x]`): the JSON name is the name plus the type name.
    pub choice: bool,
    /// For choice elements: (type key, JSON name, `_`-prefixed JSON name), precomputed.
    pub choice_keys: Vec<(&'static str, String, String)>,
}

/// The FHIR model used for navigation, typing and checking.
#[derive(Debug, Default)]
pub struct Model {
    types: FastMap<&'static str, TypeDef>,
    elements: FastMap<&'static str, FastMap<&'static str, ElementDef>>,
}

#[derive(serde::Deserialize)]
struct RawTable {
    #[serde(borrow)]
    types: HashMap<&'static str, (&'static str, Option<&'static str>)>,
    #[serde(borrow)]
    elements: HashMap<&'static str, HashMap<&'static str, &'static str>>,
}

/// Upper-case the first letter (`quantity` → `Quantity`) as choice element names do.
pub(crate) fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

impl Model {
    /// The FHIR R4 model (generated from the R4B 4.3.0 definitions restricted to R4).
    pub fn r4() -> &'static Model {
        static MODEL: OnceLock<Model> = OnceLock::new();
        MODEL.get_or_init(|| Model::from_table(R4_TABLE).unwrap_or_default())
    }

    fn from_table(text: &'static str) -> Result<Model, serde_json::Error> {
        let raw: RawTable = serde_json::from_str(text)?;
        let mut types = FastMap::default();
        for (key, (kind, base)) in raw.types {
            let kind = match kind {
                "resource" => TypeKind::Resource,
                "primitive" => TypeKind::Primitive,
                "backbone" => TypeKind::Backbone,
                _ => TypeKind::Complex,
            };
            types.insert(key, TypeDef { key, kind, base });
        }
        let mut elements = FastMap::default();
        for (owner, els) in raw.elements {
            let mut map = FastMap::default();
            for (name, spec) in els {
                let mut s = spec;
                let repeats = s.starts_with('*');
                s = s.trim_start_matches('*');
                let choice = s.starts_with('?');
                s = s.trim_start_matches('?');
                let types: Vec<&'static str> =
                    s.split('|').map(|t| t.trim_start_matches('#')).collect();
                let choice_keys = if choice {
                    types
                        .iter()
                        .map(|t| {
                            let key = format!("{name}{}", capitalize(t));
                            let ukey = format!("_{key}");
                            (*t, key, ukey)
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                map.insert(
                    name,
                    ElementDef {
                        types,
                        repeats,
                        choice,
                        choice_keys,
                    },
                );
            }
            elements.insert(owner, map);
        }
        Ok(Model { types, elements })
    }

    /// The type with this key (type name or backbone path).
    pub fn type_def(&self, key: &str) -> Option<&TypeDef> {
        self.types.get(key)
    }

    /// The interned key of a type name, if the model knows it.
    pub fn type_key(&self, name: &str) -> Option<&'static str> {
        self.types.get(name).map(|t| t.key)
    }

    /// Whether `name` is a resource type.
    pub fn is_resource(&self, name: &str) -> bool {
        self.types
            .get(name)
            .is_some_and(|t| t.kind == TypeKind::Resource)
    }

    pub fn is_primitive(&self, key: &str) -> bool {
        self.types
            .get(key)
            .is_some_and(|t| t.kind == TypeKind::Primitive)
    }

    /// The FHIR type name of a key: backbone paths report their base type (`BackboneElement`).
    pub fn type_name<'k>(&self, key: &'k str) -> &'k str {
        match self.types.get(key) {
            Some(t) if t.kind == TypeKind::Backbone => t.base.unwrap_or("BackboneElement"),
            _ => key,
        }
    }

    /// The element `name` of type `key`, looking through base types.
    pub fn element(&self, key: &str, name: &str) -> Option<&ElementDef> {
        let mut cur = Some(key);
        let mut guard = 0;
        while let Some(k) = cur {
            if let Some(e) = self.elements.get(k).and_then(|m| m.get(name)) {
                return Some(e);
            }
            cur = self.types.get(k).and_then(|t| t.base);
            guard += 1;
            if guard > 16 {
                break;
            }
        }
        None
    }

    /// All elements of a type, including inherited ones.
    pub fn elements_of(&self, key: &str) -> Vec<(&'static str, &ElementDef)> {
        let mut out = Vec::new();
        let mut cur = Some(key);
        let mut guard = 0;
        while let Some(k) = cur {
            if let Some(m) = self.elements.get(k) {
                for (n, e) in m {
                    if !out.iter().any(|(o, _)| o == n) {
                        out.push((*n, e));
                    }
                }
            }
            cur = self.types.get(k).and_then(|t| t.base);
            guard += 1;
            if guard > 16 {
                break;
            }
        }
        out
    }

    /// For a choice-suffixed JSON name (`valueQuantity`), the choice element and the type.
    pub fn split_choice(&self, key: &str, json_name: &str) -> Option<(&'static str, &'static str)> {
        for (i, c) in json_name.char_indices().skip(1) {
            if !c.is_ascii_uppercase() {
                continue;
            }
            let (base, suffix) = json_name.split_at(i);
            if let Some(e) = self.element(key, base)
                && e.choice
            {
                let static_base = self.element_name(key, base)?;
                return e
                    .types
                    .iter()
                    .find(|t| capitalize(t) == suffix)
                    .map(|t| (static_base, *t));
            }
        }
        None
    }

    /// The interned name of element `name` of type `key` (looking through base types).
    pub fn element_name(&self, key: &str, name: &str) -> Option<&'static str> {
        let mut cur = Some(key);
        let mut guard = 0;
        while let Some(k) = cur {
            if let Some((n, _)) = self.elements.get(k).and_then(|m| m.get_key_value(name)) {
                return Some(*n);
            }
            cur = self.types.get(k).and_then(|t| t.base);
            guard += 1;
            if guard > 16 {
                break;
            }
        }
        None
    }

    /// Whether type `key` is `ancestor` or derives from it.
    pub fn is_a(&self, key: &str, ancestor: &str) -> bool {
        let mut cur = Some(key);
        let mut guard = 0;
        while let Some(k) = cur {
            if self.type_name(k) == ancestor || k == ancestor {
                return true;
            }
            cur = self.types.get(k).and_then(|t| t.base);
            guard += 1;
            if guard > 16 {
                break;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_loads() {
        let m = Model::r4();
        assert!(m.types.len() > 500, "model table did not load");
        assert!(m.is_resource("Patient"));
        let name = m.element("Patient", "name").expect("Patient.name");
        assert!(name.repeats);
        assert_eq!(name.types, vec!["HumanName"]);
        let deceased = m.element("Patient", "deceased").expect("Patient.deceased");
        assert!(deceased.choice);
        assert_eq!(deceased.types, vec!["boolean", "dateTime"]);
        assert_eq!(
            m.element("Patient", "id").map(|e| e.types.clone()),
            Some(vec!["id"])
        );
        assert_eq!(
            m.element("HumanName", "id").map(|e| e.types.clone()),
            Some(vec!["string"])
        );
        assert_eq!(
            m.split_choice("Observation", "valueQuantity"),
            Some(("value", "Quantity"))
        );
        assert!(m.is_a("code", "string"));
        assert!(m.is_a("Age", "Quantity"));
        assert!(!m.is_a("string", "code"));
        assert_eq!(
            m.element("Questionnaire.item", "item")
                .map(|e| e.types.clone()),
            Some(vec!["Questionnaire.item"])
        );
    }
}
