//! Bounds a GraphQL document before anything walks it.
//!
//! async-graphql's own depth and complexity checks expand every fragment
//! spread where it is used, without memoization: a chain of fragments that
//! each spread the next one twice costs 2^n, so 30 levels kept a core busy
//! for minutes before it said "too complex". Everything here is linear in
//! the size of the text:
//!
//! 1. [`scan_text`]: size and bracket nesting, counted over the raw text
//!    (the pest grammar recurses per nesting level before the parser's own
//!    depth limit applies);
//! 2. [`DocumentLimits::check`] on the parsed document: fragment spreads,
//!    aliases and root fields counted as written; the expanded field count
//!    (what the executor would visit) computed once per fragment and
//!    reused, with cycles refused; and every root field's `first` reserved
//!    against the request's row budget before any of them runs.
//!
//! Only a document that passes reaches async-graphql's validation, whose
//! cost is then bounded by `max_fields`.

use serde::Deserialize;
use std::collections::HashMap;

use async_graphql::Variables;
use async_graphql::parser::types::{
    ExecutableDocument, FragmentDefinition, OperationDefinition, Selection, SelectionSet,
};
use async_graphql::{Name, Positioned, Value};

/// The limits one GraphQL document must keep: the `[graphql]` settings
/// and the page size a root connection gets without `first`.
#[derive(Debug, Clone)]
pub struct DocumentLimits<'a> {
    pub graphql: &'a GraphqlConfig,
    pub default_page_size: usize,
}

/// Why a document was refused: a short message for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitError(pub String);

impl std::fmt::Display for LimitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn refuse(msg: impl Into<String>) -> Result<(), LimitError> {
    Err(LimitError(msg.into()))
}

/// Checks the raw text: its size, how deep `{`, `[` and `(` nest, and
/// how many aliases it has (strings, block strings and comments skipped).
pub fn scan_text(query: &str, limits: &DocumentLimits) -> Result<(), LimitError> {
    if query.len() > limits.graphql.max_query_bytes {
        return refuse(format!(
            "the query is {} bytes; at most {} are accepted",
            query.len(),
            limits.graphql.max_query_bytes
        ));
    }
    let b = query.as_bytes();
    let (mut i, mut depth, mut deepest) = (0usize, 0usize, 0usize);
    // Outside `(…)` (arguments, variable definitions, directive arguments)
    // a colon only ever follows an alias, so aliases are counted here,
    // before the grammar runs over a document that has too many.
    let (mut parens, mut aliases) = (0usize, 0usize);
    while i < b.len() {
        match b[i] {
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'"' if b[i..].starts_with(b"\"\"\"") => {
                i += 3;
                while i < b.len() && !b[i..].starts_with(b"\"\"\"") {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 2;
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' && b[i] != b'\n' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
            }
            b':' if parens == 0 => {
                aliases += 1;
                if aliases > limits.graphql.max_aliases {
                    return refuse(format!(
                        "the query has more than {} aliases",
                        limits.graphql.max_aliases
                    ));
                }
            }
            b'{' | b'[' | b'(' => {
                parens += usize::from(b[i] == b'(');
                depth += 1;
                deepest = deepest.max(depth);
                if deepest > limits.graphql.max_nesting {
                    return refuse(format!(
                        "the query nests deeper than {} levels",
                        limits.graphql.max_nesting
                    ));
                }
            }
            b'}' | b']' | b')' => {
                if b[i] == b')' {
                    parens = parens.saturating_sub(1);
                }
                depth = depth.saturating_sub(1);
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// The counts of one document, as written and as expanded.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DocumentSize {
    pub fragment_spreads: usize,
    pub aliases: usize,
    pub root_fields: usize,
    pub fields: usize,
    /// Rows the root fields may return, reserved before any runs.
    pub reserved_rows: usize,
}

impl DocumentLimits<'_> {
    /// Checks a parsed document for the operation that will run.
    pub fn check(
        &self,
        doc: &ExecutableDocument,
        operation: Option<&str>,
        variables: &Variables,
    ) -> Result<DocumentSize, LimitError> {
        let mut size = DocumentSize::default();
        let sets = doc
            .operations
            .iter()
            .map(|(_, op)| &op.node.selection_set.node)
            .chain(doc.fragments.values().map(|f| &f.node.selection_set.node));
        for set in sets {
            count_written(set, &mut size);
        }
        if size.fragment_spreads > self.graphql.max_fragment_spreads {
            refuse(format!(
                "the query spreads fragments {} times; at most {} are accepted",
                size.fragment_spreads, self.graphql.max_fragment_spreads
            ))?;
        }
        if size.aliases > self.graphql.max_aliases {
            refuse(format!(
                "the query has {} aliases; at most {} are accepted",
                size.aliases, self.graphql.max_aliases
            ))?;
        }
        // async-graphql checks every operation of the document before it
        // picks one, expanding fragments without memoization: every
        // operation counts, and a document whose operation cannot be
        // picked is refused here rather than there.
        let Some(op) = pick_operation(doc, operation) else {
            return refuse(match operation {
                Some(name) => format!("the document has no operation named {name}"),
                None => "the document has several operations: name one with operationName".into(),
            })
            .map(|_| size);
        };
        let mut expand = Expander {
            fragments: &doc.fragments,
            memo: HashMap::new(),
            cap: self.graphql.max_fields,
            depth: 0,
            max_depth: MAX_EXPANSION_DEPTH,
        };
        for (_, each) in doc.operations.iter() {
            let n = expand.set(&each.node.selection_set.node)?;
            size.fields = size.fields.saturating_add(n);
            if size.fields > self.graphql.max_fields {
                break;
            }
        }
        if size.fields > self.graphql.max_fields {
            refuse(format!(
                "the query selects {} fields once its fragments are expanded; at most {} are accepted",
                size.fields, self.graphql.max_fields
            ))?;
        }
        let mut roots = Vec::new();
        expand.roots(&op.selection_set.node, &mut roots);
        size.root_fields = roots.len();
        if size.root_fields > self.graphql.max_root_fields {
            refuse(format!(
                "the query has {} root fields; at most {} are accepted",
                size.root_fields, self.graphql.max_root_fields
            ))?;
        }
        for f in roots {
            size.reserved_rows = size
                .reserved_rows
                .saturating_add(self.root_rows(f, variables));
        }
        if size.reserved_rows > self.graphql.max_rows {
            refuse(format!(
                "the root fields ask for up to {} objects together; at most {} are answered per request (ask for fewer with first:)",
                size.reserved_rows, self.graphql.max_rows
            ))?;
        }
        Ok(size)
    }

    /// Rows one root field may return: a lookup by id one, a connection
    /// its `first` (or the default page size), introspection nothing.
    fn root_rows(&self, f: &async_graphql::parser::types::Field, variables: &Variables) -> usize {
        let name = f.name.node.as_str();
        if name.starts_with("__") {
            return 0;
        }
        let first = f
            .arguments
            .iter()
            .find(|(n, _)| n.node.as_str() == "first")
            .map(|(_, v)| {
                v.node
                    .clone()
                    .into_const_with(|var| {
                        Ok::<_, ()>(variables.get(&var).cloned().unwrap_or(Value::Null))
                    })
                    .unwrap_or(Value::Null)
            });
        let is_connection = name.chars().next().is_some_and(char::is_uppercase);
        match first {
            Some(Value::Number(n)) => n
                .as_u64()
                .map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX)),
            _ if is_connection => self.default_page_size,
            _ => 1,
        }
    }
}

fn pick_operation<'a>(
    doc: &'a ExecutableDocument,
    name: Option<&str>,
) -> Option<&'a OperationDefinition> {
    let mut ops = doc.operations.iter();
    match name {
        Some(n) => ops
            .find(|(op_name, _)| op_name.is_some_and(|o| o.as_str() == n))
            .map(|(_, op)| &op.node),
        None => {
            let first = ops.next()?;
            ops.next().is_none().then_some(&first.1.node)
        }
    }
}

/// Spreads and aliases as written (each selection set visited once).
fn count_written(set: &SelectionSet, size: &mut DocumentSize) {
    for item in &set.items {
        match &item.node {
            Selection::Field(f) => {
                if f.node.alias.is_some() {
                    size.aliases += 1;
                }
                count_written(&f.node.selection_set.node, size);
            }
            Selection::FragmentSpread(_) => size.fragment_spreads += 1,
            Selection::InlineFragment(i) => count_written(&i.node.selection_set.node, size),
        }
    }
}

/// Counts expanded fields, each fragment once.
struct Expander<'a> {
    fragments: &'a HashMap<Name, Positioned<FragmentDefinition>>,
    /// `None` while a fragment is being expanded: seeing it again is a cycle.
    memo: HashMap<&'a str, Option<usize>>,
    cap: usize,
    depth: usize,
    max_depth: usize,
}

/// How deep selection sets may nest with fragments expanded (async-graphql
/// refuses past 64 anyway; this bounds the walk that runs before it).
const MAX_EXPANSION_DEPTH: usize = 128;

impl<'a> Expander<'a> {
    fn set(&mut self, set: &'a SelectionSet) -> Result<usize, LimitError> {
        // Text nesting is bounded per definition, but fragments chain
        // definitions: the walk's own depth is bounded so that it can never
        // exhaust the stack.
        self.depth += 1;
        if self.depth > self.max_depth {
            return Err(LimitError(format!(
                "the query nests deeper than {} levels once its fragments are expanded",
                self.max_depth
            )));
        }
        let mut n = 0usize;
        for item in &set.items {
            let add = match &item.node {
                Selection::Field(f) => 1usize.saturating_add(self.set(&f.node.selection_set.node)?),
                Selection::InlineFragment(i) => self.set(&i.node.selection_set.node)?,
                Selection::FragmentSpread(s) => {
                    self.fragment(s.node.fragment_name.node.as_str())?
                }
            };
            n = n.saturating_add(add);
            // Past the cap the exact number no longer matters.
            if n > self.cap {
                break;
            }
        }
        self.depth -= 1;
        Ok(n)
    }

    fn fragment(&mut self, name: &'a str) -> Result<usize, LimitError> {
        match self.memo.get(name) {
            Some(Some(n)) => return Ok(*n),
            Some(None) => {
                return Err(LimitError(format!(
                    "fragment {name} spreads itself (directly or through others)"
                )));
            }
            None => {}
        }
        let Some(def) = self.fragments.get(name) else {
            return Err(LimitError(format!("unknown fragment {name}")));
        };
        self.memo.insert(name, None);
        let n = self.set(&def.node.selection_set.node)?;
        self.memo.insert(name, Some(n));
        Ok(n)
    }

    /// The root fields with fragments expanded. Only called once `set`
    /// passed: every fragment is in `memo`, none is cyclic, and those
    /// that add no field are skipped, so each step yields a field and
    /// the walk stops past the cap.
    fn roots(&self, set: &'a SelectionSet, out: &mut Vec<&'a async_graphql::parser::types::Field>) {
        for item in &set.items {
            if out.len() > self.cap {
                return;
            }
            match &item.node {
                Selection::Field(f) => out.push(&f.node),
                Selection::InlineFragment(i) => self.roots(&i.node.selection_set.node, out),
                Selection::FragmentSpread(s) => {
                    let name = s.node.fragment_name.node.as_str();
                    if matches!(self.memo.get(name), Some(Some(n)) if *n > 0)
                        && let Some(def) = self.fragments.get(name)
                    {
                        self.roots(&def.node.selection_set.node, out);
                    }
                }
            }
        }
    }
}

/// `[graphql]` in `atlas.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GraphqlConfig {
    pub max_depth: usize,
    pub max_complexity: usize,
    /// Objects one request may return in total (all levels).
    pub max_rows: usize,
    /// Objects one link field returns per parent when `first` is not given.
    pub default_link_size: usize,
    /// Schema introspection; unset means on exactly when dev auth is on.
    pub introspection: Option<bool>,
    /// The largest query text accepted (bytes).
    pub max_query_bytes: usize,
    /// How deep `{`, `[` and `(` may nest in the query text.
    pub max_nesting: usize,
    /// Fragment spreads per document, as written.
    pub max_fragment_spreads: usize,
    /// Aliases per document, as written.
    pub max_aliases: usize,
    /// Root fields of the operation, fragments expanded.
    pub max_root_fields: usize,
    /// Fields of the operation with every fragment expanded (computed once
    /// per fragment, so a chain of doubling fragments costs its length).
    pub max_fields: usize,
    /// Batched link queries one request may run.
    pub max_link_queries: usize,
}

impl Default for GraphqlConfig {
    fn default() -> Self {
        GraphqlConfig {
            max_depth: 12,
            max_complexity: 5_000,
            max_rows: 100_000,
            default_link_size: 1_000,
            introspection: None,
            max_query_bytes: 64 << 10,
            max_nesting: 64,
            max_fragment_spreads: 256,
            max_aliases: 128,
            max_root_fields: 16,
            max_fields: 5_000,
            max_link_queries: 256,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tighter than the defaults where a test needs a small document.
    fn config() -> GraphqlConfig {
        GraphqlConfig {
            max_nesting: 32,
            max_fragment_spreads: 100,
            max_aliases: 64,
            ..Default::default()
        }
    }

    fn limits(g: &GraphqlConfig) -> DocumentLimits<'_> {
        DocumentLimits {
            graphql: g,
            default_page_size: 250,
        }
    }

    fn check(q: &str) -> Result<DocumentSize, LimitError> {
        let g = config();
        let l = limits(&g);
        scan_text(q, &l)?;
        let doc = async_graphql::parser::parse_query(q).map_err(|e| LimitError(e.to_string()))?;
        l.check(&doc, None, &Variables::default())
    }

    fn chain(levels: usize) -> String {
        let mut q = String::from("{ patient(id: \"x\") { ...F0 } }\n");
        for i in 0..levels {
            q.push_str(&format!(
                "fragment F{i} on Patient {{ id ...F{n} ...F{n} }}\n",
                n = i + 1
            ));
        }
        q.push_str(&format!("fragment F{levels} on Patient {{ id }}\n"));
        q
    }

    #[test]
    fn a_doubling_fragment_chain_is_counted_in_linear_time() {
        let started = std::time::Instant::now();
        let e = check(&chain(40)).unwrap_err();
        assert!(
            e.0.contains("fields once its fragments are expanded"),
            "{e}"
        );
        assert!(
            started.elapsed().as_millis() < 100,
            "{:?}",
            started.elapsed()
        );
        // 8 levels: 2^9 - 1 ids plus `patient` = 512 fields, accepted.
        let size = check(&chain(8)).unwrap();
        assert_eq!(size.fields, 512);
        assert_eq!(size.fragment_spreads, 17);
    }

    #[test]
    fn cycles_aliases_roots_and_nesting_are_refused() {
        let e = check("{ patient(id: \"x\") { ...A } } fragment A on Patient { ...B } fragment B on Patient { ...A }").unwrap_err();
        assert!(e.0.contains("spreads itself"), "{e}");
        let many: String = (0..1000)
            .map(|i| format!("a{i}: ObservationAll(first: 10000) {{ nodes {{ id }} }} "))
            .collect();
        let e = check(&format!("{{ {many} }}")).unwrap_err();
        assert!(e.0.contains("aliases"), "{e}");
        let roots: String = (0..17)
            .map(|i| format!("p{i}: patient(id: \"{i}\") {{ id }} "))
            .collect();
        let e = check(&format!("{{ {roots} }}")).unwrap_err();
        assert!(e.0.contains("17 root fields"), "{e}");
        let deep = format!("{{ {}x{} }}", "a { ".repeat(40), " }".repeat(40));
        let e = check(&deep).unwrap_err();
        assert!(e.0.contains("nests deeper"), "{e}");
        // Brackets inside strings and comments do not count.
        let s = format!(
            "# {}\n{{ patient(id: \"{}\") {{ id }} }}",
            "{".repeat(99),
            "[".repeat(99)
        );
        assert!(check(&s).is_ok());
    }

    #[test]
    fn every_operation_counts_and_the_one_to_run_must_exist() {
        let g = config();
        let l = limits(&g);
        let bomb = chain(40);
        let parse = |q: &str| async_graphql::parser::parse_query(q).unwrap();
        // An operationName that names nothing: refused, not skipped.
        let doc = parse(&bomb);
        let e = l.check(&doc, Some("x"), &Variables::default()).unwrap_err();
        assert!(e.0.contains("no operation named x"), "{e}");
        // A decoy operation picked by name; the bomb in another operation
        // still counts (async-graphql validates every operation).
        let decoy = format!("query A {{ __typename }}\nquery B {}", &bomb[..]);
        let doc = parse(&decoy);
        let e = l.check(&doc, Some("A"), &Variables::default()).unwrap_err();
        assert!(
            e.0.contains("fields once its fragments are expanded"),
            "{e}"
        );
        // Several operations and no name.
        let doc = parse("query A { __typename } query B { __typename }");
        let e = l.check(&doc, None, &Variables::default()).unwrap_err();
        assert!(e.0.contains("several operations"), "{e}");
        assert!(l.check(&doc, Some("B"), &Variables::default()).is_ok());
    }

    #[test]
    fn a_chain_of_deep_fragments_cannot_exhaust_the_stack() {
        // Each fragment nests 30 levels and spreads the next at the bottom:
        // shallow per definition, 30 × 100 levels once expanded.
        let mut q = String::from("{ patient(id: \"x\") { ...D0 } }\n");
        for i in 0..100 {
            q.push_str(&format!(
                "fragment D{i} on Patient {{ {}...D{} {} }}\n",
                "e { ".repeat(30),
                i + 1,
                "} ".repeat(30)
            ));
        }
        q.push_str("fragment D100 on Patient { id }\n");
        let mut g = config();
        g.max_fragment_spreads = 1_000;
        let l = limits(&g);
        scan_text(&q, &l).unwrap();
        let doc = async_graphql::parser::parse_query(&q).unwrap();
        let e = l.check(&doc, None, &Variables::default()).unwrap_err();
        assert!(e.0.contains("nests deeper than 128"), "{e}");
    }

    #[test]
    fn root_fields_reserve_their_rows_before_running() {
        let q = "{ a: ObservationAll(first: 10000) { nodes { id } } b: ObservationAll(first: 10000) { nodes { id } } }";
        assert_eq!(check(q).unwrap().reserved_rows, 20_000);
        let q: String = (0..11)
            .map(|i| format!("a{i}: ObservationAll(first: 10000) {{ nodes {{ id }} }} "))
            .collect();
        let e = check(&format!("{{ {q} }}")).unwrap_err();
        assert!(e.0.contains("110000"), "{e}");
        // Variables are resolved; a lookup reserves one row, a bare
        // connection the default page size.
        let g = config();
        let l = limits(&g);
        let doc = async_graphql::parser::parse_query(
            "query($n: Int) { ObservationAll(first: $n) { nodes { id } } PatientAll { nodes { id } } patient(id: \"p\") { id } }",
        )
        .unwrap();
        let vars = Variables::from_json(serde_json::json!({"n": 7}));
        assert_eq!(
            l.check(&doc, None, &vars).unwrap().reserved_rows,
            7 + 250 + 1
        );
    }
}
