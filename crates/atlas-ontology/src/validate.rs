//! Validation of an [`Ontology`] against itself and its backing views.

use crate::{Ontology, Property};
use atlas_views::{ColumnInfo, ColumnKind, CompiledView};
use std::collections::{HashMap, HashSet};

/// The physical kind as the FHIR types that have it, for messages.
fn kind_text(kind: ColumnKind) -> &'static str {
    match kind {
        ColumnKind::Utf8 => "text (string, code, id, uri, date, dateTime, instant, ...)",
        ColumnKind::Boolean => "boolean",
        ColumnKind::Int64 => "integer",
        ColumnKind::Decimal => "decimal",
    }
}

fn column_names(cols: &[ColumnInfo]) -> String {
    cols.iter()
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Report names that occur more than once; `what` says what they name.
fn duplicates<'a>(names: impl Iterator<Item = &'a str>, what: &str, errs: &mut Vec<String>) {
    let mut seen = HashSet::new();
    let mut reported = HashSet::new();
    for n in names {
        if !seen.insert(n) && reported.insert(n) {
            errs.push(format!("{what}: api name '{n}' is used more than once"));
        }
    }
}

fn check_api_name(name: &str, what: &str, errs: &mut Vec<String>) {
    if !atlas_views::is_valid_name(name) {
        errs.push(format!(
            "{what}: api name '{name}' is not a valid name (a letter, then letters, digits or '_')"
        ));
    }
}

impl Ontology {
    /// Check the ontology against the compiled views it is built on
    /// (`(view name, plan)` pairs). All problems are reported, each naming
    /// the object type, property, link or object set:
    /// * api names are valid and unique: object types, object sets, the
    ///   properties of a type, and the names navigable from a type (its
    ///   properties, its links' `apiName`s and the `reverseApiName`s of links
    ///   into it);
    /// * every backing view exists; every property's column is a column of
    ///   it, single-valued, and the property's declared type is a FHIR type
    ///   of the column's kind (`integer` for an integer column, ...);
    /// * primary key and title property name properties of the type;
    /// * links join existing types on existing properties of the same kind;
    /// * object sets name existing object types.
    pub fn validate(&self, views: &[(&str, &CompiledView)]) -> Result<(), Vec<String>> {
        let mut errs = Vec::new();
        let views: HashMap<&str, &CompiledView> = views.iter().copied().collect();
        // Kinds of properties (by type, then property api name) for link checks.
        let mut kinds: HashMap<&str, HashMap<&str, ColumnKind>> = HashMap::new();

        duplicates(
            self.object_types.iter().map(|t| t.api_name.as_str()),
            "object types",
            &mut errs,
        );
        for t in &self.object_types {
            let what = format!("object type '{}'", t.api_name);
            check_api_name(&t.api_name, &what, &mut errs);
            duplicates(
                t.properties.iter().map(|p| p.api_name.as_str()),
                &format!("{what}, properties"),
                &mut errs,
            );
            let view = views.get(t.backing_view.as_str()).copied();
            if view.is_none() {
                let mut known: Vec<&str> = views.keys().copied().collect();
                known.sort_unstable();
                errs.push(format!(
                    "{what}: backing view '{}' does not exist (views: {})",
                    t.backing_view,
                    known.join(", ")
                ));
            }
            let type_kinds = kinds.entry(t.api_name.as_str()).or_default();
            for p in &t.properties {
                let pwhat = format!("{what}, property '{}'", p.api_name);
                check_api_name(&p.api_name, &pwhat, &mut errs);
                if let Some(k) = check_property(p, &t.backing_view, view, &pwhat, &mut errs) {
                    type_kinds.insert(p.api_name.as_str(), k);
                }
            }
            let optional = [
                ("patient property", t.patient_property.as_ref()),
                ("time property", t.time_property.as_ref()),
            ];
            for (role, name) in [
                ("primary key", Some(&t.primary_key)),
                ("title property", Some(&t.title_property)),
            ]
            .into_iter()
            .chain(optional)
            .filter_map(|(role, name)| Some((role, name?)))
            {
                if t.property(name).is_none() {
                    errs.push(format!(
                        "{what}: {role} '{name}' is not a property of '{}'",
                        t.api_name
                    ));
                }
            }
            if let Some(p) = t.time_property.as_deref().and_then(|n| t.property(n))
                && !matches!(p.r#type.as_str(), "date" | "dateTime" | "instant")
            {
                errs.push(format!(
                    "{what}: time property '{}' has type '{}'; it must be a date, dateTime or instant",
                    p.api_name, p.r#type
                ));
            }
        }

        for (i, l) in self.links.iter().enumerate() {
            let what = format!("link '{}' (links[{i}], {} -> {})", l.api_name, l.from, l.to);
            check_api_name(&l.api_name, &what, &mut errs);
            check_api_name(&l.reverse_api_name, &format!("{what}, reverse"), &mut errs);
            let mut ends = Vec::new();
            for (end, ty, prop) in [
                ("from", &l.from, &l.from_property),
                ("to", &l.to, &l.to_property),
            ] {
                match self.object_type(ty) {
                    None => errs.push(format!("{what}: {end} object type '{ty}' does not exist")),
                    Some(t) => {
                        if t.property(prop).is_none() {
                            errs.push(format!(
                                "{what}: {end}Property '{prop}' is not a property of object type '{ty}'"
                            ));
                        } else if let Some(k) =
                            kinds.get(ty.as_str()).and_then(|m| m.get(prop.as_str()))
                        {
                            ends.push((ty, prop, *k));
                        }
                    }
                }
            }
            if let [(ft, fp, fk), (tt, tp, tk)] = ends.as_slice()
                && fk != tk
            {
                errs.push(format!(
                    "{what}: '{ft}.{fp}' is {} but '{tt}.{tp}' is {}: they cannot be joined",
                    kind_text(*fk),
                    kind_text(*tk)
                ));
            }
        }

        // Names navigable from each object type: properties, outgoing links,
        // reverse names of incoming links.
        for t in &self.object_types {
            let names = t
                .properties
                .iter()
                .map(|p| p.api_name.as_str())
                .collect::<HashSet<_>>();
            let mut nav: Vec<(&str, String)> = Vec::new();
            for l in self.links_from(&t.api_name) {
                nav.push((l.api_name.as_str(), format!("link to '{}'", l.to)));
            }
            for l in self.links_to(&t.api_name) {
                nav.push((
                    l.reverse_api_name.as_str(),
                    format!("reverse of link '{}' from '{}'", l.api_name, l.from),
                ));
            }
            for (i, (n, desc)) in nav.iter().enumerate() {
                if names.contains(n) {
                    errs.push(format!(
                        "object type '{}': '{n}' ({desc}) is also a property name",
                        t.api_name
                    ));
                }
                if let Some((_, other)) = nav[..i].iter().find(|(m, _)| m == n) {
                    errs.push(format!(
                        "object type '{}': '{n}' names two links ({other}; {desc})",
                        t.api_name
                    ));
                }
            }
        }

        duplicates(
            self.object_sets.iter().map(|s| s.api_name.as_str()),
            "object sets",
            &mut errs,
        );
        for s in &self.object_sets {
            let what = format!("object set '{}'", s.api_name);
            check_api_name(&s.api_name, &what, &mut errs);
            if self.object_type(&s.object_type).is_none() {
                errs.push(format!(
                    "{what}: object type '{}' does not exist",
                    s.object_type
                ));
            }
        }

        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }
}

/// Check one property against its view; its kind when the column is usable.
fn check_property(
    p: &Property,
    view_name: &str,
    view: Option<&CompiledView>,
    what: &str,
    errs: &mut Vec<String>,
) -> Option<ColumnKind> {
    let declared = ColumnKind::from_fhir_type(&p.r#type);
    if declared.is_none() {
        errs.push(format!(
            "{what}: type '{}' is not a FHIR primitive type (string, code, id, boolean, integer, decimal, date, dateTime, instant, ...)",
            p.r#type
        ));
    }
    let view = view?;
    let Some(col) = view.columns().iter().find(|c| c.name == p.column) else {
        errs.push(format!(
            "{what}: column '{}' is not a column of view '{view_name}' (columns: {})",
            p.column,
            column_names(view.columns())
        ));
        return None;
    };
    if col.collection {
        errs.push(format!(
            "{what}: column '{}' of view '{view_name}' is a collection; a property has one value",
            p.column
        ));
        return None;
    }
    let declared = declared?;
    if declared != col.kind {
        errs.push(format!(
            "{what}: type '{}' does not match column '{}' of view '{view_name}', which is {}",
            p.r#type,
            p.column,
            kind_text(col.kind)
        ));
        return None;
    }
    Some(col.kind)
}
