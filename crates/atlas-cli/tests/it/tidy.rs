//! Architecture tidy checks, after rust-analyzer's `xtask/src/tidy.rs`:
//! `docs/architecture.md` must describe the workspace as it is, so a
//! reader can trust it without reading every `Cargo.toml`.
//!
//! * The "## Crates" table has one row per crate directory with a
//!   `Cargo.toml`, and no row for a crate that does not exist.
//! * A row's "may call" column names exactly the `atlas-*` crates in the
//!   crate's `[dependencies]` (the `atlas-cli` row may say "all of the
//!   above", meaning every other crate).
//! * A row's "builds with DataFusion?" column says yes exactly when the
//!   crate depends on DataFusion or deltalake, directly or through
//!   `atlas-*` crates.
//! * Every crate's `src/lib.rs` / `src/main.rs` begins with a `//!` doc
//!   (what it owns and may call).
//! * Every file path in backticks in "## Entry points" and "## Where a
//!   change goes" exists.
//!
//! Parsed with plain string handling: the files are ours and regular, and
//! a TOML or Markdown parser would be a dependency for five checks.
//! Each check prints every difference it finds, not just the first.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn architecture() -> String {
    read(&workspace_root().join("docs/architecture.md"))
}

/// Fails with every problem, one per line.
fn assert_none(what: &str, problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{what}: {} difference(s):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

// ---------------------------------------------------------------------------
// The crate table.

/// One row of the "## Crates" table.
#[derive(Debug)]
struct Row {
    name: String,
    /// The `atlas-*` crates the "may call" column names.
    may_call: BTreeSet<String>,
    /// The column says "all of the above".
    all_others: bool,
    /// The "builds with DataFusion?" column: `Some(yes)`, or `None` when it
    /// says neither yes nor no.
    datafusion: Option<bool>,
    datafusion_text: String,
}

/// The lines of the section under `heading` (up to the next `## `).
fn section<'a>(doc: &'a str, heading: &str) -> Vec<&'a str> {
    doc.lines()
        .skip_while(|l| l.trim_end() != heading)
        .skip(1)
        .take_while(|l| !l.starts_with("## "))
        .collect()
}

/// Splits a Markdown table line into trimmed cells; a `|` inside a code
/// span does not end a cell.
fn cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|');
    let inner = inner.strip_suffix('|').unwrap_or(inner);
    let (mut out, mut cell, mut in_code) = (Vec::new(), String::new(), false);
    for c in inner.chars() {
        match c {
            '`' => {
                in_code = !in_code;
                cell.push(c);
            }
            '|' if !in_code => out.push(std::mem::take(&mut cell).trim().to_owned()),
            _ => cell.push(c),
        }
    }
    out.push(cell.trim().to_owned());
    out
}

/// The `atlas-*` names in `text` (`atlas-fhirpath (policy criteria)`
/// names `atlas-fhirpath`).
fn atlas_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("atlas-") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'))
            .unwrap_or(tail.len());
        let name = tail[..end].trim_end_matches('-');
        // `preatlas-x` is not a crate name: only whole words count.
        let whole = rest[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        if whole && name.len() > "atlas-".len() {
            names.insert(name.to_owned());
        }
        rest = &tail[end.max(1)..];
    }
    names
}

fn crate_table(doc: &str) -> Result<Vec<Row>, String> {
    let lines = section(doc, "## Crates");
    let mut table = lines
        .iter()
        .skip_while(|l| !l.trim_start().starts_with('|'))
        .take_while(|l| l.trim_start().starts_with('|'));
    let header = cells(table.next().ok_or("no table under \"## Crates\"")?);
    let column = |label: &str| {
        header
            .iter()
            .position(|h| h.to_lowercase().starts_with(label))
            .ok_or(format!(
                "the crate table has no {label:?} column: {header:?}"
            ))
    };
    let (name_col, call_col, df_col) = (
        column("crate")?,
        column("may call")?,
        column("builds with datafusion")?,
    );
    let mut rows = Vec::new();
    for line in table {
        let c = cells(line);
        if c.iter()
            .all(|c| c.chars().all(|ch| matches!(ch, '-' | ':')))
        {
            continue; // the |---|---| separator
        }
        let cell = |i: usize| c.get(i).map(String::as_str).unwrap_or("");
        let df = cell(df_col).to_lowercase();
        rows.push(Row {
            name: cell(name_col).trim_matches('`').trim().to_owned(),
            may_call: atlas_names(cell(call_col)),
            all_others: cell(call_col).to_lowercase().contains("all of the above"),
            datafusion: if df.starts_with("yes") {
                Some(true)
            } else if df.starts_with("no") {
                Some(false)
            } else {
                None
            },
            datafusion_text: cell(df_col).to_owned(),
        });
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------
// The manifests.

/// What the checks need from a crate's `Cargo.toml`.
#[derive(Debug)]
struct Manifest {
    dir: PathBuf,
    /// `atlas-*` crates in `[dependencies]` (not dev or build).
    atlas_deps: BTreeSet<String>,
    /// Depends on DataFusion or deltalake itself.
    datafusion: bool,
}

/// Drops a `#` comment, unless the `#` is inside a string.
fn strip_comment(line: &str) -> &str {
    let mut in_str = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => in_str = !in_str,
            '#' if !in_str => return &line[..i],
            _ => {}
        }
    }
    line
}

/// How many `[`/`{` a line leaves open (outside strings): a dependency's
/// inline table or feature list may continue on the next lines.
fn open_brackets(line: &str) -> i32 {
    let mut in_str = false;
    let mut depth = 0;
    for c in line.chars() {
        match c {
            '"' => in_str = !in_str,
            '[' | '{' if !in_str => depth += 1,
            ']' | '}' if !in_str => depth -= 1,
            _ => {}
        }
    }
    depth
}

/// The value of `key = "..."` inside an inline table, if any.
fn inline_string(entry: &str, key: &str) -> Option<String> {
    let at = entry.find(&format!("{key} ="))?;
    let rest = &entry[at..];
    let start = rest.find('"')? + 1;
    let len = rest[start..].find('"')?;
    Some(rest[start..start + len].to_owned())
}

/// The package name and the normal dependencies (each under the name of
/// the package it pulls in, so `package = "..."` renames count).
fn parse_manifest(text: &str) -> (Option<String>, BTreeSet<String>) {
    let (mut section, mut name, mut deps) = (String::new(), None, BTreeSet::new());
    let mut entry = String::new();
    let mut depth = 0;
    for raw in text.lines() {
        let line = strip_comment(raw).trim();
        if depth > 0 {
            entry.push(' ');
            entry.push_str(line);
            depth += open_brackets(line);
        } else if line.starts_with('[') && !line.contains('=') {
            section = line
                .trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_owned();
            // `[dependencies.foo]` and `[target.'cfg(..)'.dependencies.foo]`
            if let Some((table, dep)) = section.rsplit_once('.')
                && (table == "dependencies" || table.ends_with(".dependencies"))
            {
                deps.insert(dep.trim_matches('"').to_owned());
            }
            continue;
        } else if line.is_empty() {
            continue;
        } else {
            entry = line.to_owned();
            depth = open_brackets(line);
        }
        if depth > 0 {
            continue; // the entry goes on
        }
        let key = entry
            .split(['=', '.'])
            .next()
            .unwrap_or("")
            .trim()
            .trim_matches('"');
        // `[dependencies]` or `[target.'cfg(..)'.dependencies]`; not dev,
        // not build: those never reach the crates that call this one.
        let is_deps = section == "dependencies"
            || section.starts_with("target.") && section.ends_with(".dependencies");
        if section == "package" && key == "name" {
            name = inline_string(&entry, "name");
        } else if is_deps {
            deps.insert(inline_string(&entry, "package").unwrap_or_else(|| key.to_owned()));
        } else if section.starts_with("dependencies.") && key == "package" {
            // `[dependencies.alias] package = "real"`: the alias was noted
            // at the header; the real name is what matters.
            if let (Some((_, alias)), Some(real)) =
                (section.rsplit_once('.'), inline_string(&entry, "package"))
            {
                deps.remove(alias);
                deps.insert(real);
            }
        }
    }
    (name, deps)
}

fn is_datafusion(dep: &str) -> bool {
    ["datafusion", "deltalake"]
        .iter()
        .any(|d| dep == *d || dep.starts_with(&format!("{d}-")))
}

/// Every crate under `crates/` that has a `Cargo.toml`, by package name.
fn manifests() -> BTreeMap<String, Manifest> {
    let crates = workspace_root().join("crates");
    let mut out = BTreeMap::new();
    let entries =
        std::fs::read_dir(&crates).unwrap_or_else(|e| panic!("listing {}: {e}", crates.display()));
    for entry in entries.flatten() {
        let dir = entry.path();
        let toml = dir.join("Cargo.toml");
        if !toml.is_file() {
            continue;
        }
        let (name, deps) = parse_manifest(&read(&toml));
        let name = name.unwrap_or_else(|| panic!("{}: no [package] name", toml.display()));
        out.insert(
            name,
            Manifest {
                dir,
                atlas_deps: deps
                    .iter()
                    .filter(|d| d.starts_with("atlas-"))
                    .cloned()
                    .collect(),
                datafusion: deps.iter().any(|d| is_datafusion(d)),
            },
        );
    }
    out
}

/// Whether `name` builds DataFusion: itself or through its `atlas-*`
/// dependencies (a dependency that is not a workspace crate adds nothing).
fn builds_datafusion(name: &str, all: &BTreeMap<String, Manifest>) -> bool {
    let (mut seen, mut todo) = (BTreeSet::new(), vec![name.to_owned()]);
    while let Some(n) = todo.pop() {
        if !seen.insert(n.clone()) {
            continue;
        }
        if let Some(m) = all.get(&n) {
            if m.datafusion {
                return true;
            }
            todo.extend(m.atlas_deps.iter().cloned());
        }
    }
    false
}

// ---------------------------------------------------------------------------
// The checks.

/// (a) a row per crate, a crate per row.
fn rows_vs_crates(rows: &[Row], all: &BTreeMap<String, Manifest>) -> Vec<String> {
    let mut problems = Vec::new();
    let mut named = BTreeSet::new();
    for r in rows {
        if !named.insert(r.name.as_str()) {
            problems.push(format!("`{}` has two rows", r.name));
        }
        if !all.contains_key(&r.name) {
            problems.push(format!(
                "`{}` has a row but there is no crates/*/Cargo.toml with that name",
                r.name
            ));
        }
    }
    for (name, m) in all {
        if !named.contains(name.as_str()) {
            let dir = m.dir.file_name().unwrap_or_default().to_string_lossy();
            problems.push(format!(
                "`{name}` (crates/{dir}) has no row in the crate table"
            ));
        }
    }
    problems
}

/// (b) "may call" names exactly the `atlas-*` dependencies.
fn may_call_vs_dependencies(rows: &[Row], all: &BTreeMap<String, Manifest>) -> Vec<String> {
    let mut problems = Vec::new();
    for r in rows {
        let Some(m) = all.get(&r.name) else { continue };
        let mut named = r.may_call.clone();
        if r.all_others {
            named.extend(all.keys().cloned());
        }
        named.remove(&r.name);
        for dep in m.atlas_deps.difference(&named) {
            problems.push(format!(
                "`{}` depends on {dep} but its \"may call\" does not name it",
                r.name
            ));
        }
        for extra in named.difference(&m.atlas_deps) {
            problems.push(format!(
                "`{}`'s \"may call\" names {extra}{} but it is not in its [dependencies]",
                r.name,
                if r.all_others && !r.may_call.contains(extra) {
                    " (through \"all of the above\")"
                } else {
                    ""
                }
            ));
        }
    }
    problems
}

/// (c) "builds with DataFusion?" agrees with the dependency graph.
fn datafusion_column(rows: &[Row], all: &BTreeMap<String, Manifest>) -> Vec<String> {
    let mut problems = Vec::new();
    for r in rows.iter().filter(|r| all.contains_key(&r.name)) {
        let actual = builds_datafusion(&r.name, all);
        match r.datafusion {
            None => problems.push(format!(
                "`{}`: \"builds with DataFusion?\" says {:?}, neither yes nor no",
                r.name, r.datafusion_text
            )),
            Some(says) if says != actual => problems.push(format!(
                "`{}`: \"builds with DataFusion?\" says {:?} but it {} on datafusion/deltalake",
                r.name,
                r.datafusion_text,
                if actual {
                    "depends (directly or through atlas-* crates)"
                } else {
                    "does not depend"
                }
            )),
            Some(_) => {}
        }
    }
    problems
}

/// (d) every crate root begins with a `//!` module doc.
fn crate_docs(all: &BTreeMap<String, Manifest>) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, m) in all {
        let roots: Vec<PathBuf> = ["src/lib.rs", "src/main.rs"]
            .iter()
            .map(|p| m.dir.join(p))
            .filter(|p| p.is_file())
            .collect();
        if roots.is_empty() {
            problems.push(format!("`{name}`: neither src/lib.rs nor src/main.rs"));
        }
        for root in roots {
            let text = read(&root);
            let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            if !first.starts_with("//!") {
                problems.push(format!(
                    "{}: does not begin with a `//!` doc saying what the crate owns and may call",
                    root.display()
                ));
            }
        }
    }
    problems
}

/// The code spans (`` `...` ``) of `lines`.
fn code_spans<'a>(lines: &[&'a str]) -> Vec<&'a str> {
    let mut spans = Vec::new();
    for line in lines {
        let mut parts = line.split('`');
        parts.next(); // text before the first span
        while let (Some(span), Some(_)) = (parts.next(), parts.next()) {
            spans.push(span);
        }
    }
    spans
}

/// A code span that names a file of the repository: it has a `/` and a
/// source, data or doc extension, and no `<placeholder>` or `*` glob.
fn is_checked_path(span: &str) -> bool {
    span.contains('/')
        && [".rs", ".json", ".toml", ".md"]
            .iter()
            .any(|e| span.ends_with(e))
        && !span.contains(['<', '*', ' '])
}

#[test]
fn tidy_crate_table_has_a_row_per_crate() {
    let rows = crate_table(&architecture()).unwrap_or_else(|e| panic!("{e}"));
    assert_none(
        "docs/architecture.md \"## Crates\" vs crates/*/Cargo.toml",
        &rows_vs_crates(&rows, &manifests()),
    );
}

#[test]
fn tidy_may_call_matches_dependencies() {
    let rows = crate_table(&architecture()).unwrap_or_else(|e| panic!("{e}"));
    assert_none(
        "the crate table's \"may call\" vs [dependencies]",
        &may_call_vs_dependencies(&rows, &manifests()),
    );
}

#[test]
fn tidy_datafusion_column_matches_dependencies() {
    let rows = crate_table(&architecture()).unwrap_or_else(|e| panic!("{e}"));
    assert_none(
        "the crate table's \"builds with DataFusion?\" vs the dependency graph",
        &datafusion_column(&rows, &manifests()),
    );
}

#[test]
fn tidy_every_crate_root_has_a_module_doc() {
    assert_none("crate module docs", &crate_docs(&manifests()));
}

#[test]
fn tidy_paths_in_entry_points_and_where_a_change_goes_exist() {
    let doc = architecture();
    let root = workspace_root();
    let mut problems = Vec::new();
    for heading in ["## Entry points", "## Where a change goes"] {
        let lines = section(&doc, heading);
        if lines.is_empty() {
            problems.push(format!("no section {heading:?}"));
        }
        for span in code_spans(&lines) {
            if is_checked_path(span) && !root.join(span).exists() {
                problems.push(format!("{heading}: `{span}` does not exist"));
            }
        }
    }
    assert_none("docs/architecture.md paths", &problems);
}

// The parsers themselves, on inputs shaped like the edge cases above.

#[test]
fn tidy_parsers_read_tables_manifests_and_spans() {
    let doc = "x\n## Crates\n\n| crate | owns | may call | builds with DataFusion? |\n\
               |---|---|---|---|\n\
               | `atlas-a` | a `x|y` | atlas-b (read), serde | yes (slow) |\n\
               | `atlas-b` | b | all of the above | no |\n\n## Next\n| `atlas-c` | | | |\n";
    let rows = crate_table(doc).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0].name, "atlas-a");
    assert_eq!(
        rows[0].may_call,
        BTreeSet::from(["atlas-b".to_owned()]),
        "{rows:?}"
    );
    assert_eq!(
        (rows[0].datafusion, rows[1].datafusion),
        (Some(true), Some(false))
    );
    assert!(rows[1].all_others && !rows[0].all_others);

    let (name, deps) = parse_manifest(
        "[package]\nname = \"atlas-a\" # the name\n\n[dependencies]\n\
         atlas-b = { workspace = true }\nserde.workspace = true\n\
         deltalake = { version = \"1\", features = [\n  \"s3\",\n  \"gcs\",\n] }\n\
         fhir = { package = \"atlas-fhir\", path = \"../x\" }\n\
         [dependencies.atlas-c]\npath = \"../c\"\n\
         [dev-dependencies]\natlas-d = { workspace = true }\n\
         [target.'cfg(unix)'.dependencies]\natlas-e = { workspace = true }\n",
    );
    assert_eq!(name.as_deref(), Some("atlas-a"));
    let expected: BTreeSet<String> = [
        "atlas-b",
        "serde",
        "deltalake",
        "atlas-fhir",
        "atlas-c",
        "atlas-e",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(deps, expected);

    let lines = ["see `crates/a/src/lib.rs` and `crates/<x>/y.rs`, `Egress`, `a/*.json`"];
    let checked: Vec<_> = code_spans(&lines)
        .into_iter()
        .filter(|s| is_checked_path(s))
        .collect();
    assert_eq!(checked, ["crates/a/src/lib.rs"]);
}
