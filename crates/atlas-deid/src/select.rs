//! Rule paths: the FHIRPath subset anonymizer rules use to *select nodes*.
//!
//! The FHIRPath engine in `atlas-fhirpath` evaluates to values; a rule needs
//! the nodes themselves, to change them in place. A rule path is a chain of
//! steps — element names, `nodesByType('T')`, `nodesByName('n')`,
//! `where(criterion)`, `ofType(T)`, `first()`, `last()`, `children()`,
//! `descendants()` and `[n]` — walked here over the typed tree. Criteria inside
//! `where(...)` are full FHIRPath, evaluated by `atlas-fhirpath` on each
//! candidate node. Anything else is refused when the configuration is read.

use crate::tree::{NodeId, Tree};
use atlas_fhirpath::{EvalContext, EvalError, Expr, FhirNode, JsonRef, Value};

#[derive(Debug, Clone)]
pub(crate) enum Step {
    Member(String),
    NodesByType(String),
    NodesByName(String),
    Where(Box<Expr>),
    OfType(String),
    Index(usize),
    First,
    Last,
    Children,
    Descendants,
}

#[derive(Debug, Clone)]
pub(crate) struct Selector {
    steps: Vec<Step>,
}

/// The nodes of one resource by type, in document order (nested resources
/// excluded), built once per resource so that the many `nodesByType`
/// rules of a profile do not each walk the whole tree.
pub(crate) struct TypeIndex {
    root: NodeId,
    by_type: std::collections::HashMap<&'static str, Vec<NodeId>>,
}

impl TypeIndex {
    pub(crate) fn build(tree: &Tree, root: NodeId) -> TypeIndex {
        let mut by_type: std::collections::HashMap<&'static str, Vec<NodeId>> =
            std::collections::HashMap::new();
        self_and_descendants(tree, root, &mut |id| {
            let n = tree.node(id);
            by_type.entry(n.tname).or_default().push(id);
            if n.ty != n.tname {
                by_type.entry(n.ty).or_default().push(id);
            }
        });
        TypeIndex { root, by_type }
    }
}

/// Splits at top-level `sep` (outside quotes, parentheses and brackets).
fn split_top(s: &str, sep: char) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut quote: Option<char> = None;
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '\'' | '"' | '`' => quote = Some(c),
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            _ if c == sep && depth == 0 => {
                parts.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
        if depth < 0 {
            return Err(format!("unbalanced brackets in '{s}'"));
        }
    }
    if quote.is_some() || depth != 0 {
        return Err(format!("unbalanced quotes or brackets in '{s}'"));
    }
    parts.push(&s[start..]);
    Ok(parts)
}

fn unquote(arg: &str) -> Result<String, String> {
    let a = arg.trim();
    for q in ['\'', '"'] {
        if a.len() >= 2 && a.starts_with(q) && a.ends_with(q) {
            return Ok(a[1..a.len() - 1].to_string());
        }
    }
    Err(format!("expected a quoted name, found '{a}'"))
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl Selector {
    pub(crate) fn parse(path: &str) -> Result<Selector, String> {
        let mut steps = Vec::new();
        for segment in split_top(path.trim(), '.')? {
            let mut seg = segment.trim();
            if seg.is_empty() {
                return Err(format!("empty step in '{path}'"));
            }
            // Trailing indexers: `name[0]`.
            let mut indexes = Vec::new();
            while seg.ends_with(']') {
                let open = seg
                    .rfind('[')
                    .ok_or_else(|| format!("unbalanced ']' in '{path}'"))?;
                let n = seg[open + 1..seg.len() - 1]
                    .trim()
                    .parse::<usize>()
                    .map_err(|_| format!("an index must be a number in '{seg}'"))?;
                indexes.push(n);
                seg = &seg[..open];
            }
            if let Some(open) = seg.find('(') {
                if !seg.ends_with(')') {
                    return Err(format!("malformed call '{seg}'"));
                }
                let name = &seg[..open];
                let arg = &seg[open + 1..seg.len() - 1];
                let step = match name {
                    "nodesByType" => Step::NodesByType(unquote(arg)?),
                    "nodesByName" => Step::NodesByName(unquote(arg)?),
                    "where" => Step::Where(Box::new(
                        Expr::parse(arg).map_err(|e| format!("where({arg}): {e}"))?,
                    )),
                    "ofType" => Step::OfType(arg.trim().trim_start_matches("FHIR.").to_string()),
                    "first" if arg.trim().is_empty() => Step::First,
                    "last" if arg.trim().is_empty() => Step::Last,
                    "children" if arg.trim().is_empty() => Step::Children,
                    "descendants" if arg.trim().is_empty() => Step::Descendants,
                    _ => {
                        return Err(format!(
                            "'{seg}' is not supported in a rule path (supported: element names, nodesByType, nodesByName, where, ofType, first, last, children, descendants, [n])"
                        ));
                    }
                };
                steps.push(step);
            } else {
                let name = seg.trim_matches('`');
                if !is_identifier(name) {
                    return Err(format!("'{seg}' is not an element name"));
                }
                steps.push(Step::Member(name.to_string()));
            }
            steps.extend(indexes.into_iter().rev().map(Step::Index));
        }
        Ok(Selector { steps })
    }

    /// The nodes the path selects from `start`.
    pub(crate) fn select(
        &self,
        tree: &Tree,
        start: NodeId,
        index: Option<&TypeIndex>,
    ) -> Result<Vec<NodeId>, EvalError> {
        let mut cur = vec![start];
        for (i, step) in self.steps.iter().enumerate() {
            let mut next = Vec::new();
            if let (0, Step::NodesByType(t), Some(ix)) = (i, step, index)
                && ix.root == start
            {
                cur = ix.by_type.get(t.as_str()).cloned().unwrap_or_default();
                continue;
            }
            match step {
                Step::Member(name) => {
                    for n in &cur {
                        next.extend(tree.children_named(*n, name));
                    }
                }
                Step::NodesByType(t) => {
                    for n in &cur {
                        self_and_descendants(tree, *n, &mut |id| {
                            let node = tree.node(id);
                            if node.tname == t || node.ty == t {
                                next.push(id);
                            }
                        });
                    }
                }
                Step::NodesByName(name) => {
                    for n in &cur {
                        self_and_descendants(tree, *n, &mut |id| {
                            if tree.node(id).name == *name {
                                next.push(id);
                            }
                        });
                    }
                }
                Step::Where(expr) => {
                    for n in &cur {
                        if criterion(tree, *n, expr)? {
                            next.push(*n);
                        }
                    }
                }
                Step::OfType(t) => {
                    next.extend(cur.iter().copied().filter(|n| tree.type_name(*n) == t));
                }
                Step::Index(i) => next.extend(cur.get(*i).copied()),
                Step::First => next.extend(cur.first().copied()),
                Step::Last => next.extend(cur.last().copied()),
                Step::Children => {
                    for n in &cur {
                        next.extend(tree.node(*n).children.iter().copied());
                    }
                }
                Step::Descendants => {
                    for n in &cur {
                        for c in tree.node(*n).children.clone() {
                            self_and_descendants(tree, c, &mut |id| next.push(id));
                        }
                    }
                }
            }
            cur = next;
        }
        Ok(cur)
    }
}

/// `n` and every node below it, not entering resources nested below `n`.
fn self_and_descendants(tree: &Tree, n: NodeId, f: &mut dyn FnMut(NodeId)) {
    f(n);
    for c in &tree.node(n).children {
        if !tree.node(*c).resource {
            self_and_descendants(tree, *c, f);
        }
    }
}

/// Evaluates `expr` with `n` as the focus; true when it yields `true`.
pub(crate) fn criterion(tree: &Tree, n: NodeId, expr: &Expr) -> Result<bool, EvalError> {
    let json = tree.node_json(n);
    let element = tree.element_json(n);
    let result = eval_on(tree, n, &json, element.as_ref(), expr, |c| {
        Ok(c.as_boolean() == Some(true))
    })?;
    Ok(result)
}

/// Evaluates `expr` with node `n` (its JSON `json`) as `$this` and hands the result to `f`.
pub(crate) fn eval_on<T>(
    tree: &Tree,
    n: NodeId,
    json: &atlas_fhirpath::JsonValue<'static>,
    element: Option<&atlas_fhirpath::JsonValue<'static>>,
    expr: &Expr,
    f: impl FnOnce(&atlas_fhirpath::Collection<'_>) -> Result<T, EvalError>,
) -> Result<T, EvalError> {
    let ty = Some(tree.node(n).ty);
    let focus = atlas_fhirpath::Collection::from(vec![Value::Node(FhirNode {
        json: Some(JsonRef::Tree(json)),
        element: element.map(JsonRef::Tree),
        ty,
    })]);
    let ctx = EvalContext::new();
    let out = expr.evaluate_tree_on(focus, json, &ctx)?;
    f(&out)
}
