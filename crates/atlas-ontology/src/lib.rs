//! The Atlas ontology: object types, their typed properties, links between
//! them and saved object sets, each object type backed by a SQL-on-FHIR view.
//!
//! # What this crate owns
//! * The built-in SQL-on-FHIR v2 ViewDefinitions ([`builtin_views`]): plain
//!   JSON files under `builtin/views/` (`patient`, `encounter`, `observation`,
//!   `observation_component`, `condition`, `medication_request`) that users
//!   can read, copy and run with `atlas view run`. Every view has an `id`
//!   column (the resource key) and a `patient_id` column (the patient key);
//!   the patient view has the derived columns `age` (whole years at the
//!   reference date 2026-01-01, view constants `%ref_year` and `%ref_mmdd`),
//!   `deceased`, `is_synthetic` and `fhir_version`.
//! * The ontology metadata model ([`Ontology`], [`ObjectType`], [`Property`],
//!   [`Link`], [`ObjectSetDef`]), its JSON form (`builtin/ontology.json`,
//!   camelCase field names, unknown fields rejected), reading with errors
//!   that say where ([`Ontology::from_json`]), validation against the
//!   compiled backing views ([`Ontology::validate`]) and a stable text
//!   listing ([`Ontology::render_text`], for `atlas ontology show`).
//!
//! Names: `primaryKey`, `titleProperty`, `fromProperty` and `toProperty`
//! name *properties* (by `apiName`); each property names a view *column*.
//! In the built-in ontology a property's `apiName` is its column name.
//!
//! # What it may call
//! Only `atlas-views` (to compile the views and read their column types),
//! plus `serde`, `serde_json` and `thiserror`. No I/O (the built-in files are
//! compiled in with `include_str!`), no query engine, no async: serving,
//! storage and SQL belong to other crates.
//!
//! ```
//! use atlas_ontology::{Ontology, compile_builtin_views};
//! let ontology = Ontology::builtin();
//! let views = compile_builtin_views().expect("built-in views compile");
//! let refs: Vec<(&str, &atlas_views::CompiledView)> =
//!     views.iter().map(|(n, v)| (*n, v)).collect();
//! assert!(ontology.validate(&refs).is_ok());
//! assert_eq!(ontology.object_type("Patient").unwrap().backing_view, "patient");
//! assert_eq!(ontology.links_from("Patient").count(), 4);
//! ```

mod render;
#[cfg(test)]
mod tests;
mod validate;

use atlas_views::CompiledView;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

/// A built-in ViewDefinition: its name (also its file name without `.json`)
/// and its JSON text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuiltinView {
    pub name: &'static str,
    pub json: &'static str,
}

impl BuiltinView {
    /// The view's JSON as a value.
    pub fn json_value(&self) -> Json {
        serde_json::from_str(self.json).expect("built-in views are valid JSON (tested)")
    }

    /// Validate and compile the view.
    pub fn compile(&self) -> Result<CompiledView, Vec<atlas_views::Diagnostic>> {
        CompiledView::from_json(&self.json_value())
    }
}

static BUILTIN_VIEWS: [BuiltinView; 6] = [
    BuiltinView {
        name: "patient",
        json: include_str!("../builtin/views/patient.json"),
    },
    BuiltinView {
        name: "encounter",
        json: include_str!("../builtin/views/encounter.json"),
    },
    BuiltinView {
        name: "observation",
        json: include_str!("../builtin/views/observation.json"),
    },
    BuiltinView {
        name: "observation_component",
        json: include_str!("../builtin/views/observation_component.json"),
    },
    BuiltinView {
        name: "condition",
        json: include_str!("../builtin/views/condition.json"),
    },
    BuiltinView {
        name: "medication_request",
        json: include_str!("../builtin/views/medication_request.json"),
    },
];

/// The built-in views, in a fixed order: patient, encounter, observation,
/// observation_component, condition, medication_request.
pub fn builtin_views() -> &'static [BuiltinView] {
    &BUILTIN_VIEWS
}

/// The built-in view with this name.
pub fn builtin_view(name: &str) -> Option<&'static BuiltinView> {
    BUILTIN_VIEWS.iter().find(|v| v.name == name)
}

/// Compile every built-in view, in [`builtin_views`] order.
pub fn compile_builtin_views() -> Result<Vec<(&'static str, CompiledView)>, OntologyError> {
    builtin_views()
        .iter()
        .map(|v| {
            v.compile()
                .map(|c| (v.name, c))
                .map_err(|d| OntologyError::View {
                    name: v.name.to_string(),
                    message: atlas_views::render_diagnostics(&d),
                })
        })
        .collect()
}

/// The JSON text of the built-in ontology (`builtin/ontology.json`).
pub const BUILTIN_ONTOLOGY_JSON: &str = include_str!("../builtin/ontology.json");

/// Errors reading or checking an ontology.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OntologyError {
    /// The text is not JSON.
    #[error("ontology is not valid JSON: {message} at line {line}, column {column}")]
    Syntax {
        line: usize,
        column: usize,
        message: String,
    },
    /// The JSON does not have the ontology's shape; `path` says where
    /// (`objectTypes[0] 'Patient'.properties[3] 'age'`).
    #[error("ontology {path}: {message}")]
    Shape { path: String, message: String },
    /// The ontology does not agree with itself or with its views.
    #[error("invalid ontology:\n{}", .0.join("\n"))]
    Invalid(Vec<String>),
    /// A view does not compile.
    #[error("view '{name}' does not compile:\n{message}")]
    View { name: String, message: String },
}

/// Object types, links and saved object sets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Ontology {
    pub object_types: Vec<ObjectType>,
    #[serde(default)]
    pub links: Vec<Link>,
    #[serde(default)]
    pub object_sets: Vec<ObjectSetDef>,
}

/// A kind of object (Patient, Encounter, ...), one per row of its backing view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectType {
    pub api_name: String,
    pub display_name: String,
    #[serde(default)]
    pub description: String,
    /// Name of the view whose rows are the objects.
    pub backing_view: String,
    /// The property (by `apiName`) that identifies an object.
    pub primary_key: String,
    /// The property (by `apiName`) shown as the object's title.
    pub title_property: String,
    /// The property holding the key of the patient the object belongs to
    /// (its patient compartment). Access scoped to patients filters on it;
    /// a type without one is not readable under a patient scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient_property: Option<String>,
    /// The property placing the object on the patient's timeline (a date or
    /// dateTime): what `dateFrom`/`dateTo` filters and timelines use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_property: Option<String>,
    pub properties: Vec<Property>,
}

/// A typed property of an object type: one column of the backing view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Property {
    pub api_name: String,
    /// The backing view's column.
    pub column: String,
    /// The FHIR type of the column (`string`, `code`, `id`, `boolean`,
    /// `integer`, `decimal`, `date`, `dateTime`, `instant`, ...).
    #[serde(rename = "type")]
    pub r#type: String,
    #[serde(default)]
    pub description: String,
    /// Computed from other data rather than read from one element (the
    /// description says how).
    #[serde(default, skip_serializing_if = "is_false")]
    pub derived: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// How many objects a link relates on each side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cardinality {
    OneToOne,
    OneToMany,
    ManyToOne,
}

impl Cardinality {
    /// The JSON spelling (`one-to-many`).
    pub fn as_str(self) -> &'static str {
        match self {
            Cardinality::OneToOne => "one-to-one",
            Cardinality::OneToMany => "one-to-many",
            Cardinality::ManyToOne => "many-to-one",
        }
    }
}

/// A link between two object types: objects of `from` whose `fromProperty`
/// equals `toProperty` of objects of `to`. Navigable as `apiName` from `from`
/// and as `reverseApiName` from `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Link {
    pub api_name: String,
    pub reverse_api_name: String,
    pub from: String,
    pub to: String,
    pub from_property: String,
    pub to_property: String,
    pub cardinality: Cardinality,
    #[serde(default)]
    pub description: String,
}

/// A saved object set: all objects of a type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectSetDef {
    pub api_name: String,
    pub object_type: String,
    #[serde(default)]
    pub description: String,
}

impl Ontology {
    /// Read an ontology from its JSON text. Errors say what is wrong and
    /// where: a line and column for JSON syntax, else a path such as
    /// `objectTypes[0] 'Patient'.properties[3] 'age'`. Only the shape is
    /// checked here; see [`Ontology::validate`] for names and types.
    pub fn from_json(text: &str) -> Result<Ontology, OntologyError> {
        let value: Json = serde_json::from_str(text).map_err(|e| OntologyError::Syntax {
            line: e.line(),
            column: e.column(),
            message: strip_position(&e),
        })?;
        Self::from_value(&value)
    }

    /// Like [`Ontology::from_json`], from a parsed JSON value.
    pub fn from_value(value: &Json) -> Result<Ontology, OntologyError> {
        match Ontology::deserialize(value) {
            Ok(o) => Ok(o),
            Err(whole) => Err(locate_shape_error(value).unwrap_or(OntologyError::Shape {
                path: "(top level)".into(),
                message: whole.to_string(),
            })),
        }
    }

    /// The built-in ontology (`builtin/ontology.json`); a unit test
    /// guarantees it parses and validates against the built-in views.
    pub fn builtin() -> Ontology {
        Ontology::from_json(BUILTIN_ONTOLOGY_JSON).expect("the built-in ontology parses (tested)")
    }

    /// Read and validate in one step.
    pub fn load(text: &str, views: &[(&str, &CompiledView)]) -> Result<Ontology, OntologyError> {
        let o = Ontology::from_json(text)?;
        o.validate(views).map_err(OntologyError::Invalid)?;
        Ok(o)
    }

    /// The JSON text of the ontology (pretty, in the `ontology.json` shape).
    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).expect("ontology serializes")
    }

    /// The object type with this API name.
    pub fn object_type(&self, api_name: &str) -> Option<&ObjectType> {
        self.object_types.iter().find(|t| t.api_name == api_name)
    }

    /// Links whose `from` is this object type.
    pub fn links_from<'a>(&'a self, api_name: &'a str) -> impl Iterator<Item = &'a Link> + 'a {
        self.links.iter().filter(move |l| l.from == api_name)
    }

    /// Links whose `to` is this object type (navigable by `reverseApiName`).
    pub fn links_to<'a>(&'a self, api_name: &'a str) -> impl Iterator<Item = &'a Link> + 'a {
        self.links.iter().filter(move |l| l.to == api_name)
    }

    /// The saved object set with this API name.
    pub fn object_set(&self, api_name: &str) -> Option<&ObjectSetDef> {
        self.object_sets.iter().find(|s| s.api_name == api_name)
    }
}

impl ObjectType {
    /// The property with this API name.
    pub fn property(&self, api_name: &str) -> Option<&Property> {
        self.properties.iter().find(|p| p.api_name == api_name)
    }
}

/// serde_json's message without its " at line L column C" suffix.
fn strip_position(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// `objectTypes[0] 'Patient'`: an item's path with its apiName when it has one.
fn item_label(list: &str, i: usize, item: &Json) -> String {
    match item.get("apiName").and_then(Json::as_str) {
        Some(name) => format!("{list}[{i}] '{name}'"),
        None => format!("{list}[{i}]"),
    }
}

/// Find the innermost item that does not deserialize, for an error with a path.
fn locate_shape_error(value: &Json) -> Option<OntologyError> {
    let shape = |path: String, e: serde_json::Error| OntologyError::Shape {
        path,
        message: e.to_string(),
    };
    let obj = value.as_object()?;
    if let Some(Json::Array(types)) = obj.get("objectTypes") {
        for (i, t) in types.iter().enumerate() {
            let label = item_label("objectTypes", i, t);
            if let Some(Json::Array(props)) = t.get("properties") {
                for (j, p) in props.iter().enumerate() {
                    if let Err(e) = Property::deserialize(p) {
                        return Some(shape(
                            format!("{label}.{}", item_label("properties", j, p)),
                            e,
                        ));
                    }
                }
            }
            if let Err(e) = ObjectType::deserialize(t) {
                return Some(shape(label, e));
            }
        }
    }
    if let Some(Json::Array(links)) = obj.get("links") {
        for (i, l) in links.iter().enumerate() {
            if let Err(e) = Link::deserialize(l) {
                return Some(shape(item_label("links", i, l), e));
            }
        }
    }
    if let Some(Json::Array(sets)) = obj.get("objectSets") {
        for (i, s) in sets.iter().enumerate() {
            if let Err(e) = ObjectSetDef::deserialize(s) {
                return Some(shape(item_label("objectSets", i, s), e));
            }
        }
    }
    None
}
