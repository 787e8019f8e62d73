//! The ViewDefinition model and its reading from JSON (structural validation).
//!
//! [`ViewDefinition::from_json`] checks the shape of the document: required
//! fields, JSON types, names, `value[x]` of constants, mutually exclusive
//! iteration keywords. FHIRPath syntax, types and collection rules are checked
//! by [`crate::ViewCompiler`].

use crate::diag::Diagnostic;
use serde_json::{Map, Value as Json};

/// A SQL-on-FHIR v2 ViewDefinition (the parts that shape its rows).
#[derive(Debug, Clone, PartialEq)]
pub struct ViewDefinition {
    pub name: Option<String>,
    pub status: Option<String>,
    /// The FHIR resource type the view reads (`Patient`).
    pub resource: String,
    pub constants: Vec<Constant>,
    pub select: Vec<Select>,
    pub where_: Vec<WhereClause>,
}

/// A `constant`: `%name` in every expression of the view.
#[derive(Debug, Clone, PartialEq)]
pub struct Constant {
    pub name: String,
    /// FHIR primitive type from the `value[x]` suffix (`dateTime`, `base64Binary`).
    pub ty: String,
    /// The JSON value as written.
    pub value: Json,
}

/// One node of the `select` tree.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Select {
    pub column: Vec<Column>,
    pub select: Vec<Select>,
    pub for_each: Option<String>,
    pub for_each_or_null: Option<String>,
    pub repeat: Vec<String>,
    pub union_all: Vec<Select>,
}

/// A `column`.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    pub path: String,
    /// Declared FHIR type (`string`, `integer`, ...); inferred when absent.
    pub ty: Option<String>,
    pub collection: bool,
    pub description: Option<String>,
}

/// A view-level `where`: only resources for which every path is `true` have rows.
#[derive(Debug, Clone, PartialEq)]
pub struct WhereClause {
    pub path: String,
    pub description: Option<String>,
}

/// The FHIR primitive types a constant may hold (`value[x]`).
pub const CONSTANT_TYPES: &[&str] = &[
    "base64Binary",
    "boolean",
    "canonical",
    "code",
    "date",
    "dateTime",
    "decimal",
    "id",
    "instant",
    "integer",
    "integer64",
    "oid",
    "positiveInt",
    "string",
    "time",
    "unsignedInt",
    "uri",
    "url",
    "uuid",
];

/// Whether `name` is a valid column or constant name (`^[A-Za-z][A-Za-z0-9_]*$`).
pub fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Properties any element may have.
const COMMON_KEYS: &[&str] = &["id", "extension", "modifierExtension"];
const SELECT_KEYS: &[&str] = &[
    "column",
    "select",
    "forEach",
    "forEachOrNull",
    "repeat",
    "unionAll",
];
const COLUMN_KEYS: &[&str] = &["name", "path", "type", "collection", "description", "tag"];

struct Reader {
    diags: Vec<Diagnostic>,
}

/// What kind of JSON value `v` is, for error messages ("a string", ...).
pub fn describe(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

impl Reader {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.diags.push(Diagnostic::new(path, message));
    }

    fn opt_string(&mut self, obj: &Map<String, Json>, key: &str, path: &str) -> Option<String> {
        match obj.get(key) {
            None | Some(Json::Null) => None,
            Some(Json::String(s)) => Some(s.clone()),
            Some(other) => {
                self.err(
                    join(path, key),
                    format!("must be a string, found {}", describe(other)),
                );
                None
            }
        }
    }

    fn req_string(&mut self, obj: &Map<String, Json>, key: &str, path: &str) -> Option<String> {
        if !obj.contains_key(key) || obj.get(key).is_some_and(Json::is_null) {
            self.err(join(path, key), "is required");
            return None;
        }
        let s = self.opt_string(obj, key, path)?;
        if s.trim().is_empty() {
            self.err(join(path, key), "must not be empty");
            return None;
        }
        Some(s)
    }

    fn array<'j>(
        &mut self,
        obj: &'j Map<String, Json>,
        key: &str,
        path: &str,
    ) -> Option<&'j Vec<Json>> {
        match obj.get(key) {
            None | Some(Json::Null) => None,
            Some(Json::Array(a)) => Some(a),
            Some(other) => {
                self.err(
                    join(path, key),
                    format!("must be an array, found {}", describe(other)),
                );
                None
            }
        }
    }

    fn object<'j>(&mut self, v: &'j Json, path: &str) -> Option<&'j Map<String, Json>> {
        match v {
            Json::Object(o) => Some(o),
            other => {
                self.err(
                    path,
                    format!("must be an object, found {}", describe(other)),
                );
                None
            }
        }
    }

    fn view(&mut self, json: &Json) -> Option<ViewDefinition> {
        let obj = self.object(json, "")?;
        if let Some(rt) = obj.get("resourceType").and_then(Json::as_str)
            && rt != "ViewDefinition"
        {
            self.err(
                "resourceType",
                format!("expected 'ViewDefinition', found '{rt}'"),
            );
        }
        let resource = self.req_string(obj, "resource", "");
        if let Some(r) = &resource
            && !atlas_fhirpath::model::Model::r4().is_resource(r)
        {
            self.err("resource", format!("'{r}' is not a FHIR R4 resource type"));
        }
        let name = self.opt_string(obj, "name", "");
        let status = self.opt_string(obj, "status", "");
        let mut constants = Vec::new();
        if let Some(items) = self.array(obj, "constant", "") {
            for (i, c) in items.iter().enumerate() {
                if let Some(c) = self.constant(c, &format!("constant[{i}]")) {
                    if constants.iter().any(|k: &Constant| k.name == c.name) {
                        self.err(
                            format!("constant[{i}].name"),
                            format!("duplicate constant '{}'", c.name),
                        );
                    }
                    constants.push(c);
                }
            }
        }
        let mut select = Vec::new();
        match self.array(obj, "select", "") {
            Some(items) if !items.is_empty() => {
                for (i, s) in items.iter().enumerate() {
                    if let Some(s) = self.select(s, &format!("select[{i}]")) {
                        select.push(s);
                    }
                }
            }
            Some(_) => self.err("select", "must have at least one item"),
            None if !obj.contains_key("select") => self.err("select", "is required"),
            None => {}
        }
        let mut where_ = Vec::new();
        if let Some(items) = self.array(obj, "where", "") {
            for (i, w) in items.iter().enumerate() {
                let p = format!("where[{i}]");
                let Some(o) = self.object(w, &p) else {
                    continue;
                };
                let path = self.req_string(o, "path", &p);
                let description = self.opt_string(o, "description", &p);
                if let Some(path) = path {
                    where_.push(WhereClause { path, description });
                }
            }
        }
        Some(ViewDefinition {
            name,
            status,
            resource: resource?,
            constants,
            select,
            where_,
        })
    }

    fn constant(&mut self, json: &Json, path: &str) -> Option<Constant> {
        let obj = self.object(json, path)?;
        let name = self.req_string(obj, "name", path);
        if let Some(n) = &name
            && !is_valid_name(n)
        {
            self.err(
                join(path, "name"),
                format!(
                    "'{n}' is not a valid name (letters, digits and '_', starting with a letter)"
                ),
            );
        }
        let values: Vec<(&String, &Json)> =
            obj.iter().filter(|(k, _)| k.starts_with("value")).collect();
        let (key, value) = match values.as_slice() {
            [one] => *one,
            [] => {
                self.err(
                    path,
                    "a constant needs a value[x] (valueString, valueInteger, ...)",
                );
                return None;
            }
            _ => {
                self.err(path, "a constant has exactly one value[x]");
                return None;
            }
        };
        let suffix = &key["value".len()..];
        let ty = CONSTANT_TYPES
            .iter()
            .find(|t| upper_first(t) == suffix)
            .copied();
        let Some(ty) = ty else {
            self.err(
                join(path, key),
                format!("'{key}' is not a constant type (a FHIR primitive value[x])"),
            );
            return None;
        };
        let ok = match ty {
            "boolean" => value.is_boolean(),
            "decimal" => value.is_number(),
            "integer" | "positiveInt" | "unsignedInt" => value.as_i64().is_some_and(|i| {
                i32::try_from(i).is_ok()
                    && match ty {
                        "positiveInt" => i > 0,
                        "unsignedInt" => i >= 0,
                        _ => true,
                    }
            }),
            "integer64" => {
                value.as_i64().is_some() || value.as_str().is_some_and(|s| s.parse::<i64>().is_ok())
            }
            "date" => value
                .as_str()
                .is_some_and(|s| atlas_fhirpath::Temporal::parse_date(s).is_some()),
            "dateTime" | "instant" => value
                .as_str()
                .is_some_and(|s| atlas_fhirpath::Temporal::parse_datetime(s).is_some()),
            "time" => value
                .as_str()
                .is_some_and(|s| atlas_fhirpath::Temporal::parse_time(s).is_some()),
            _ => value.is_string(),
        };
        if !ok {
            self.err(
                join(path, key),
                format!("{} is not a valid {ty}", compact(value)),
            );
            return None;
        }
        Some(Constant {
            name: name?,
            ty: ty.to_string(),
            value: value.clone(),
        })
    }

    fn unknown_keys(&mut self, obj: &Map<String, Json>, known: &[&str], path: &str) {
        for k in obj.keys() {
            if !known.contains(&k.as_str()) && !COMMON_KEYS.contains(&k.as_str()) {
                self.err(
                    join(path, k),
                    format!("unknown property '{k}' (allowed: {})", known.join(", ")),
                );
            }
        }
    }

    fn select(&mut self, json: &Json, path: &str) -> Option<Select> {
        let obj = self.object(json, path)?;
        self.unknown_keys(obj, SELECT_KEYS, path);
        let mut out = Select {
            for_each: self.opt_string(obj, "forEach", path),
            for_each_or_null: self.opt_string(obj, "forEachOrNull", path),
            ..Select::default()
        };
        if let Some(items) = self.array(obj, "repeat", path) {
            if items.is_empty() {
                self.err(join(path, "repeat"), "must have at least one path");
            }
            for (i, p) in items.iter().enumerate() {
                match p.as_str() {
                    Some(s) => out.repeat.push(s.to_string()),
                    None => self.err(
                        format!("{path}.repeat[{i}]"),
                        format!("must be a string, found {}", describe(p)),
                    ),
                }
            }
        }
        let iterations = usize::from(obj.contains_key("forEach"))
            + usize::from(obj.contains_key("forEachOrNull"))
            + usize::from(obj.contains_key("repeat"));
        if iterations > 1 {
            self.err(
                path,
                "forEach, forEachOrNull and repeat are mutually exclusive",
            );
        }
        if let Some(items) = self.array(obj, "column", path) {
            if items.is_empty() {
                self.err(join(path, "column"), "must have at least one column");
            }
            for (i, c) in items.iter().enumerate() {
                if let Some(c) = self.column(c, &format!("{path}.column[{i}]")) {
                    out.column.push(c);
                }
            }
        }
        if let Some(items) = self.array(obj, "select", path) {
            for (i, s) in items.iter().enumerate() {
                if let Some(s) = self.select(s, &format!("{path}.select[{i}]")) {
                    out.select.push(s);
                }
            }
        }
        if let Some(items) = self.array(obj, "unionAll", path) {
            if items.is_empty() {
                self.err(join(path, "unionAll"), "must have at least one item");
            }
            for (i, s) in items.iter().enumerate() {
                if let Some(s) = self.select(s, &format!("{path}.unionAll[{i}]")) {
                    out.union_all.push(s);
                }
            }
        }
        Some(out)
    }

    fn column(&mut self, json: &Json, path: &str) -> Option<Column> {
        let obj = self.object(json, path)?;
        self.unknown_keys(obj, COLUMN_KEYS, path);
        let name = self.req_string(obj, "name", path);
        if let Some(n) = &name
            && !is_valid_name(n)
        {
            self.err(
                join(path, "name"),
                format!("'{n}' is not a valid column name (letters, digits and '_', starting with a letter)"),
            );
        }
        let col_path = self.req_string(obj, "path", path);
        let ty = self.opt_string(obj, "type", path);
        let description = self.opt_string(obj, "description", path);
        let collection = match obj.get("collection") {
            None | Some(Json::Null) => false,
            Some(Json::Bool(b)) => *b,
            Some(other) => {
                self.err(
                    join(path, "collection"),
                    format!("must be a boolean, found {}", describe(other)),
                );
                false
            }
        };
        Some(Column {
            name: name?,
            path: col_path?,
            ty,
            collection,
            description,
        })
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn upper_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_ascii_uppercase().to_string() + c.as_str(),
        None => String::new(),
    }
}

fn compact(v: &Json) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!("{}...", s.chars().take(57).collect::<String>())
    } else {
        s
    }
}

impl ViewDefinition {
    /// Read a ViewDefinition, checking its structure. All problems are reported,
    /// each with its path inside the view.
    pub fn from_json(json: &Json) -> Result<ViewDefinition, Vec<Diagnostic>> {
        let mut r = Reader { diags: Vec::new() };
        let view = r.view(json);
        match view {
            Some(v) if r.diags.is_empty() => Ok(v),
            _ => {
                if r.diags.is_empty() {
                    r.err("", "not a valid ViewDefinition");
                }
                Err(r.diags)
            }
        }
    }
}
