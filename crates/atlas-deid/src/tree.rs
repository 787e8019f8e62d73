//! The typed, mutable resource tree the engine works on.
//!
//! Anonymizer rules select *nodes* (an element, with its FHIR type), and
//! processors change, remove or replace them; later rules skip nodes earlier
//! rules touched. So a resource is read once into an arena of typed nodes
//! (the R4 model from `atlas-fhirpath` gives every element its type, which
//! `nodesByType` and the date, postal-code and reference rules need), worked
//! on in place, and written back as JSON in its original element order with
//! numbers kept as written.
//!
//! Reading is strict like the upstream tool's: an unknown resource type or an
//! element the R4 model does not have is an error naming its path, never a
//! silently dropped field.

use atlas_fhirpath::json::{JsonObject, JsonValue};
use atlas_fhirpath::model::{Model, TypeKind};
use std::borrow::Cow;

pub(crate) type NodeId = usize;

/// A primitive value as it appears in JSON.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Prim {
    Str(String),
    /// The number's text, as written.
    Num(String),
    Bool(bool),
}

impl Prim {
    pub(crate) fn text(&self) -> Cow<'_, str> {
        match self {
            Prim::Str(s) | Prim::Num(s) => Cow::Borrowed(s),
            Prim::Bool(b) => Cow::Owned(b.to_string()),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Node {
    /// The element name (the choice element's base name: `value` for `valueQuantity`).
    pub name: &'static str,
    /// The model type key (`HumanName`, `date`, `Patient.contact`, `Patient`).
    pub ty: &'static str,
    /// The FHIR type name (`BackboneElement` for backbone keys), looked up once.
    pub tname: &'static str,
    pub choice: bool,
    pub value: Option<Prim>,
    pub children: Vec<NodeId>,
    pub parent: Option<NodeId>,
    /// Written as a JSON array.
    pub array: bool,
    pub resource: bool,
}

/// Why a resource could not be read as FHIR R4.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct InvalidInput {
    /// Where (`Patient.name[0].foo`).
    pub path: String,
    pub message: String,
}

fn invalid(path: &str, message: impl Into<String>) -> InvalidInput {
    InvalidInput {
        path: path.to_string(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Tree {
    pub nodes: Vec<Node>,
}

fn is_numeric_type(ty: &str) -> bool {
    matches!(
        ty,
        "integer" | "decimal" | "positiveInt" | "unsignedInt" | "integer64"
    )
}

impl Tree {
    pub(crate) fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id]
    }

    pub(crate) fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[id]
    }

    fn push(&mut self, node: Node) -> NodeId {
        let id = self.nodes.len();
        if let Some(p) = node.parent {
            self.nodes[p].children.push(id);
        }
        self.nodes.push(node);
        id
    }

    /// Reads a resource. The root is node 0.
    pub(crate) fn from_json(v: &JsonValue<'_>) -> Result<Tree, InvalidInput> {
        let mut tree = Tree::default();
        let obj = v
            .as_object()
            .ok_or_else(|| invalid("$", "a resource must be a JSON object"))?;
        tree.read_resource(obj, None, "resource", false)?;
        Ok(tree)
    }

    /// Where an error at `key` (item `i` of an array) below `owner` is.
    fn at(&self, owner: Option<NodeId>, key: &str, i: Option<usize>) -> String {
        let mut p = match owner {
            Some(o) => format!("{}.{key}", self.location(o)),
            None => "$".to_string(),
        };
        if let Some(i) = i {
            p.push_str(&format!("[{i}]"));
        }
        p
    }

    fn read_resource(
        &mut self,
        obj: &JsonObject<'_>,
        parent: Option<NodeId>,
        name: &'static str,
        array: bool,
    ) -> Result<NodeId, InvalidInput> {
        let model = Model::r4();
        let rt = obj
            .get("resourceType")
            .and_then(JsonValue::as_str)
            .ok_or_else(|| invalid(&self.at(parent, name, None), "resourceType is missing"))?;
        let ty = model
            .type_key(rt)
            .filter(|k| model.is_resource(k))
            .ok_or_else(|| {
                let why = if atlas_fhir::is_resource_type(rt) {
                    format!(
                        "'{rt}' is an R4 resource type that Atlas's model (R4 as kept in R4B) does not describe"
                    )
                } else {
                    format!("'{rt}' is not a FHIR R4 resource type")
                };
                invalid(&self.at(parent, name, None), why)
            })?;
        let id = self.push(Node {
            name: if parent.is_none() { ty } else { name },
            ty,
            tname: model.type_name(ty),
            choice: false,
            value: None,
            children: Vec::new(),
            parent,
            array,
            resource: true,
        });
        self.read_members(id, ty, obj, true)?;
        Ok(id)
    }

    /// Reads the members of a complex value (or a primitive's `_x` part) into `owner`.
    /// Paths are built only for errors: this runs for every element of every resource.
    fn read_members(
        &mut self,
        owner: NodeId,
        ty: &'static str,
        obj: &JsonObject<'_>,
        is_resource: bool,
    ) -> Result<(), InvalidInput> {
        let model = Model::r4();
        let mut underscore_key = String::new();
        for (key, value) in obj.iter() {
            if is_resource && key == "resourceType" {
                continue;
            }
            if let Some(base) = key.strip_prefix('_') {
                // Handled with its value; alone it is a primitive with only extensions.
                if obj.contains_key(base) {
                    continue;
                }
                let (name, elem_ty, choice, repeats) = resolve_element(model, ty, base)
                    .map_err(|m| invalid(&self.at(Some(owner), key, None), m))?;
                if !model.is_primitive(elem_ty) {
                    return Err(invalid(
                        &self.at(Some(owner), key, None),
                        "a '_' property belongs only to primitive elements",
                    ));
                }
                self.read_primitive(owner, name, elem_ty, choice, repeats, None, Some(value))?;
                continue;
            }
            let (name, elem_ty, choice, repeats) = resolve_element(model, ty, key)
                .map_err(|m| invalid(&self.at(Some(owner), key, None), m))?;
            if model.is_primitive(elem_ty) {
                underscore_key.clear();
                underscore_key.push('_');
                underscore_key.push_str(key);
                let underscore = obj.get(&underscore_key);
                self.read_primitive(
                    owner,
                    name,
                    elem_ty,
                    choice,
                    repeats,
                    Some(value),
                    underscore,
                )?;
            } else {
                let items: Vec<&JsonValue<'_>> = match value {
                    JsonValue::Array(items) => items.iter().collect(),
                    other => vec![other],
                };
                let array = matches!(value, JsonValue::Array(_)) || repeats;
                let kind = model.type_def(elem_ty).map(|t| t.kind);
                for (i, item) in items.into_iter().enumerate() {
                    let o = item.as_object().ok_or_else(|| {
                        invalid(
                            &self.at(Some(owner), key, array.then_some(i)),
                            format!("expected an object of type {elem_ty}"),
                        )
                    })?;
                    if elem_ty == "Resource" || kind == Some(TypeKind::Resource) {
                        self.read_resource(o, Some(owner), name, array)?;
                    } else {
                        let id = self.push(Node {
                            name,
                            ty: elem_ty,
                            tname: model.type_name(elem_ty),
                            choice,
                            value: None,
                            children: Vec::new(),
                            parent: Some(owner),
                            array,
                            resource: false,
                        });
                        self.read_members(id, elem_ty, o, false)?;
                    }
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn read_primitive(
        &mut self,
        owner: NodeId,
        name: &'static str,
        ty: &'static str,
        choice: bool,
        repeats: bool,
        value: Option<&JsonValue<'_>>,
        element: Option<&JsonValue<'_>>,
    ) -> Result<(), InvalidInput> {
        let array = matches!(value, Some(JsonValue::Array(_)))
            || matches!(element, Some(JsonValue::Array(_)))
            || repeats;
        let one = |v: Option<&JsonValue<'_>>| -> usize {
            match v {
                Some(JsonValue::Array(items)) => items.len(),
                Some(_) => 1,
                None => 0,
            }
        };
        fn nth<'v, 'j>(v: Option<&'v JsonValue<'j>>, i: usize) -> Option<&'v JsonValue<'j>> {
            match v {
                Some(JsonValue::Array(items)) => items.get(i),
                Some(x) if i == 0 => Some(x),
                _ => None,
            }
        }
        let tname = Model::r4().type_name(ty);
        let n = one(value).max(one(element));
        for i in 0..n {
            let prim = match nth(value, i) {
                None | Some(JsonValue::Null) => None,
                Some(JsonValue::String(s)) => Some(Prim::Str(s.to_string())),
                Some(JsonValue::Number(t)) => Some(Prim::Num(t.to_string())),
                Some(JsonValue::Bool(b)) => Some(Prim::Bool(*b)),
                Some(_) => {
                    return Err(invalid(
                        &self.at(Some(owner), name, array.then_some(i)),
                        format!("expected a primitive value of type {ty}"),
                    ));
                }
            };
            let id = self.push(Node {
                name,
                ty,
                tname,
                choice,
                value: prim,
                children: Vec::new(),
                parent: Some(owner),
                array,
                resource: false,
            });
            match nth(element, i) {
                None | Some(JsonValue::Null) => {}
                Some(JsonValue::Object(o)) => self.read_members(id, ty, o, false)?,
                Some(_) => {
                    return Err(invalid(
                        &self.at(Some(owner), name, array.then_some(i)),
                        "the '_' part of a primitive must be an object",
                    ));
                }
            }
        }
        Ok(())
    }

    /// A tree of one empty node (the root of a replacement value).
    pub(crate) fn single(name: &'static str, ty: &'static str) -> Tree {
        Tree {
            nodes: vec![Node {
                name,
                ty,
                tname: Model::r4().type_name(ty),
                choice: false,
                value: None,
                children: Vec::new(),
                parent: None,
                array: false,
                resource: false,
            }],
        }
    }

    /// Reads `obj` as a value of type `ty` (a substitute rule's replacement).
    pub(crate) fn fragment(
        ty: &'static str,
        name: &'static str,
        obj: &JsonValue<'_>,
    ) -> Result<Tree, InvalidInput> {
        let o = obj
            .as_object()
            .ok_or_else(|| invalid(name, format!("expected an object of type {ty}")))?;
        let mut tree = Tree::single(name, ty);
        tree.read_members(0, ty, o, false)?;
        Ok(tree)
    }

    /// Adds a node under `parent` at position `at` of its children.
    pub(crate) fn insert_child(
        &mut self,
        parent: NodeId,
        at: usize,
        name: &'static str,
        ty: &'static str,
        value: Option<Prim>,
        array: bool,
    ) -> NodeId {
        let id = self.nodes.len();
        self.nodes.push(Node {
            name,
            ty,
            tname: Model::r4().type_name(ty),
            choice: false,
            value,
            children: Vec::new(),
            parent: Some(parent),
            array,
            resource: false,
        });
        let children = &mut self.nodes[parent].children;
        let at = at.min(children.len());
        children.insert(at, id);
        id
    }

    /// The child nodes named `name`.
    pub(crate) fn children_named(&self, id: NodeId, name: &str) -> Vec<NodeId> {
        self.nodes[id]
            .children
            .iter()
            .copied()
            .filter(|c| self.nodes[*c].name == name)
            .collect()
    }

    pub(crate) fn remove_child(&mut self, parent: NodeId, child: NodeId) {
        self.nodes[parent].children.retain(|c| *c != child);
        self.nodes[child].parent = None;
    }

    /// Copies the subtree `src` of `from` into this tree under `parent`.
    pub(crate) fn graft(&mut self, from: &Tree, src: NodeId, parent: NodeId) -> NodeId {
        let mut node = from.nodes[src].clone();
        node.children = Vec::new();
        node.parent = Some(parent);
        let id = self.push(node);
        for c in from.nodes[src].children.clone() {
            self.graft(from, c, id);
        }
        id
    }

    /// The root of the whole tree above `id` (the top Bundle for an entry).
    pub(crate) fn top(&self, mut id: NodeId) -> NodeId {
        while let Some(p) = self.nodes[id].parent {
            id = p;
        }
        id
    }

    /// The `id` of a resource node.
    pub(crate) fn resource_id(&self, id: NodeId) -> String {
        self.children_named(id, "id")
            .first()
            .and_then(|c| self.nodes[*c].value.as_ref())
            .map(|v| v.text().into_owned())
            .unwrap_or_default()
    }

    /// The FHIR type name of a node (`BackboneElement` for backbone elements).
    pub(crate) fn type_name(&self, id: NodeId) -> &'static str {
        self.nodes[id].tname
    }

    /// A FHIRPath-like location: `Patient.name[0].given[1]`.
    pub(crate) fn location(&self, id: NodeId) -> String {
        let mut parts = Vec::new();
        let mut cur = id;
        while let Some(p) = self.nodes[cur].parent {
            let n = &self.nodes[cur];
            if n.array {
                let idx = self.nodes[p]
                    .children
                    .iter()
                    .filter(|c| self.nodes[**c].name == n.name)
                    .position(|c| *c == cur)
                    .unwrap_or(0);
                parts.push(format!("{}[{idx}]", n.name));
            } else {
                parts.push(n.name.to_string());
            }
            cur = p;
        }
        parts.push(self.nodes[cur].name.to_string());
        parts.reverse();
        parts.join(".")
    }

    /// Removes nodes with neither a value nor children (resources stay), bottom-up.
    pub(crate) fn remove_empty(&mut self, id: NodeId) {
        for c in self.nodes[id].children.clone() {
            self.remove_empty(c);
            let n = &self.nodes[c];
            if n.value.is_none() && n.children.is_empty() && !n.resource {
                self.remove_child(id, c);
            }
        }
    }

    /// Sets a primitive's value from text, as a number, boolean or string by its type.
    pub(crate) fn set_text(&mut self, id: NodeId, text: Option<String>) {
        let ty = self.nodes[id].ty;
        self.nodes[id].value = text.map(|t| {
            if is_numeric_type(ty) && atlas_fhirpath::json::number_decimal(&t).is_some() {
                Prim::Num(t)
            } else if ty == "boolean" && (t == "true" || t == "false") {
                Prim::Bool(t == "true")
            } else {
                Prim::Str(t)
            }
        });
    }

    /// The JSON of one node: a primitive's value, or a complex node's object.
    pub(crate) fn node_json(&self, id: NodeId) -> JsonValue<'static> {
        let n = &self.nodes[id];
        if Model::r4().is_primitive(n.ty) {
            return prim_json(n.value.as_ref());
        }
        JsonValue::Object(self.object_json(id))
    }

    /// The `_x` part of a primitive node, if it has id or extensions.
    pub(crate) fn element_json(&self, id: NodeId) -> Option<JsonValue<'static>> {
        let n = &self.nodes[id];
        if n.children.is_empty() || !Model::r4().is_primitive(n.ty) {
            return None;
        }
        Some(JsonValue::Object(self.object_json(id)))
    }

    /// The object for a complex node or resource (members in first-seen order).
    pub(crate) fn object_json(&self, id: NodeId) -> JsonObject<'static> {
        let model = Model::r4();
        let n = &self.nodes[id];
        let mut out = JsonObject::with_capacity(n.children.len() + 1);
        if n.resource {
            out.push("resourceType", JsonValue::String(Cow::Borrowed(n.ty)));
        }
        // Group children by JSON key, keeping the order keys first appear in.
        let mut keys: Vec<(Cow<'static, str>, Vec<NodeId>)> = Vec::new();
        for c in &n.children {
            let cn = &self.nodes[*c];
            let key: Cow<'static, str> = if cn.choice {
                Cow::Owned(format!("{}{}", cn.name, capitalize(cn.tname)))
            } else {
                Cow::Borrowed(cn.name)
            };
            match keys.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) => v.push(*c),
                None => keys.push((key, vec![*c])),
            }
        }
        for (key, ids) in keys {
            let first = &self.nodes[ids[0]];
            let array = first.array || ids.len() > 1;
            if first.resource {
                let items: Vec<JsonValue<'static>> = ids
                    .iter()
                    .map(|c| JsonValue::Object(self.object_json(*c)))
                    .collect();
                out.push(key, wrap(items, array));
            } else if model.is_primitive(first.ty) {
                let values: Vec<JsonValue<'static>> = ids
                    .iter()
                    .map(|c| prim_json(self.nodes[*c].value.as_ref()))
                    .collect();
                let elements: Vec<JsonValue<'static>> = ids
                    .iter()
                    .map(|c| self.element_json(*c).unwrap_or(JsonValue::Null))
                    .collect();
                if elements.iter().any(|v| !v.is_null()) {
                    if values.iter().any(|v| !v.is_null()) {
                        out.push(key.clone(), wrap(values, array));
                    }
                    out.push(format!("_{key}"), wrap(elements, array));
                    continue;
                }
                if values.iter().any(|v| !v.is_null()) {
                    out.push(key, wrap(values, array));
                }
            } else {
                let items: Vec<JsonValue<'static>> = ids
                    .iter()
                    .map(|c| JsonValue::Object(self.object_json(*c)))
                    .collect();
                out.push(key, wrap(items, array));
            }
        }
        out
    }
}

fn wrap(mut items: Vec<JsonValue<'static>>, array: bool) -> JsonValue<'static> {
    if array || items.len() != 1 {
        JsonValue::Array(items)
    } else {
        items.pop().unwrap_or(JsonValue::Null)
    }
}

fn prim_json(p: Option<&Prim>) -> JsonValue<'static> {
    match p {
        None => JsonValue::Null,
        Some(Prim::Str(s)) => JsonValue::String(Cow::Owned(s.clone())),
        Some(Prim::Num(s)) => JsonValue::Number(Cow::Owned(s.clone())),
        Some(Prim::Bool(b)) => JsonValue::Bool(*b),
    }
}

pub(crate) fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// The element a JSON key names on type `ty`: (name, type key, choice, repeats).
fn resolve_element(
    model: &Model,
    ty: &'static str,
    key: &str,
) -> Result<(&'static str, &'static str, bool, bool), String> {
    if let Some(def) = model.element(ty, key)
        && !def.choice
    {
        let name = model.element_name(ty, key).unwrap_or("");
        let elem_ty = def.types.first().copied().unwrap_or("string");
        return Ok((name, elem_ty, false, def.repeats));
    }
    if let Some((base, choice_ty)) = model.split_choice(ty, key) {
        let repeats = model.element(ty, base).is_some_and(|d| d.repeats);
        return Ok((base, choice_ty, true, repeats));
    }
    Err(format!(
        "unknown element '{key}' on {}",
        model.type_name(ty)
    ))
}
