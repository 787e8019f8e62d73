//! A readable, stable text listing of an ontology (`atlas ontology show`).

use crate::Ontology;
use std::fmt::Write;

impl Ontology {
    /// The ontology as text: object types (backing view, primary key, title,
    /// then one line per property with its type and description, `derived`
    /// marked), links, object sets. Items keep their declared order, so the
    /// text is stable for a given ontology.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "Object types ({})", self.object_types.len());
        for t in &self.object_types {
            let _ = writeln!(out);
            let _ = writeln!(out, "{} ({})", t.api_name, t.display_name);
            if !t.description.is_empty() {
                let _ = writeln!(out, "  {}", t.description);
            }
            let _ = writeln!(
                out,
                "  backing view: {}   primary key: {}   title: {}",
                t.backing_view, t.primary_key, t.title_property
            );
            if let Some(p) = &t.patient_property {
                let _ = writeln!(out, "  patient: {p}");
            }
            if let Some(p) = &t.time_property {
                let _ = writeln!(out, "  time: {p}");
            }
            let _ = writeln!(out, "  properties ({}):", t.properties.len());
            let name_w = t
                .properties
                .iter()
                .map(|p| p.api_name.len())
                .max()
                .unwrap_or(0);
            let type_w = t
                .properties
                .iter()
                .map(|p| p.r#type.len())
                .max()
                .unwrap_or(0);
            for p in &t.properties {
                let mut line = format!(
                    "    {:name_w$}  {:type_w$}",
                    p.api_name,
                    p.r#type,
                    name_w = name_w,
                    type_w = type_w
                );
                if p.derived {
                    line.push_str("  [derived]");
                }
                if p.column != p.api_name {
                    let _ = write!(line, "  (column {})", p.column);
                }
                if !p.description.is_empty() {
                    line.push_str("  ");
                    line.push_str(&p.description);
                }
                let _ = writeln!(out, "{}", line.trim_end());
            }
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "Links ({})", self.links.len());
        for l in &self.links {
            let _ = writeln!(
                out,
                "  {}.{} -> {} ({}; {}.{} = {}.{}; reverse {}.{})",
                l.from,
                l.api_name,
                l.to,
                l.cardinality.as_str(),
                l.from,
                l.from_property,
                l.to,
                l.to_property,
                l.to,
                l.reverse_api_name
            );
            if !l.description.is_empty() {
                let _ = writeln!(out, "    {}", l.description);
            }
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "Object sets ({})", self.object_sets.len());
        for s in &self.object_sets {
            let mut line = format!("  {}: {}", s.api_name, s.object_type);
            if !s.description.is_empty() {
                let _ = write!(line, " ({})", s.description);
            }
            let _ = writeln!(out, "{line}");
        }
        out
    }
}
