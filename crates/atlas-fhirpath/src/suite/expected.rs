//! Expected-failure lists for conformance suites.
//!
//! A suite's test commits the exact set of cases it is known to fail, one per
//! line with the reason (`<case> # <reason>`), and compares the run against
//! it. Unlike a minimum pass count, the comparison sees both directions: a
//! case that starts failing, and a case that starts passing and should leave
//! the list (otherwise it could silently fail again later). Blank lines and
//! lines starting with `#` are comments.
//!
//! Used by this crate's HL7 suite test, by `atlas-views`' SQL-on-FHIR suite
//! tests and by the CLI's suite tests, which all read the same list files.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::fmt;
use std::path::{Path, PathBuf};

/// What the separator between a case name and its reason looks like.
const SEPARATOR: &str = " # ";

/// A list file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {problem}")]
    Line {
        path: PathBuf,
        line: usize,
        problem: String,
    },
}

/// One case's outcome in a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Failed, with the runner's message (printed when the failure is new).
    Fail(String),
    /// Present in the suite but not run (e.g. its input exists only as XML):
    /// no verdict, so its list entry is neither confirmed nor contradicted.
    NotRun,
}

/// The committed list: case name → reason.
#[derive(Debug, Clone)]
pub struct ExpectedFailures {
    path: PathBuf,
    cases: BTreeMap<String, String>,
}

impl ExpectedFailures {
    /// Reads and parses a list file.
    pub fn read(path: &Path) -> Result<Self, ListError> {
        let text = std::fs::read_to_string(path).map_err(|source| ListError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses list text; `path` only names the source in errors and reports.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ListError> {
        let mut cases = BTreeMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let problem = |problem: String| ListError::Line {
                path: path.to_path_buf(),
                line: i + 1,
                problem,
            };
            // A reason is required: an entry nobody can explain is a case
            // nobody will ever look at again.
            let Some((case, reason)) = line.split_once(SEPARATOR) else {
                return Err(problem(format!(
                    "`{line}` has no reason (write `<case>{SEPARATOR}<reason>`)"
                )));
            };
            let (case, reason) = (case.trim(), reason.trim());
            if case.is_empty() || reason.is_empty() {
                return Err(problem(format!(
                    "`{line}`: both the case and the reason are required"
                )));
            }
            if cases.insert(case.to_owned(), reason.to_owned()).is_some() {
                return Err(problem(format!("`{case}` is listed twice")));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            cases,
        })
    }

    /// The listed cases and their reasons.
    pub fn cases(&self) -> &BTreeMap<String, String> {
        &self.cases
    }

    /// Compares a run with the list. A name that occurs several times in a
    /// suite (the HL7 suite has one) fails when any of its runs fails.
    pub fn compare<I>(&self, outcomes: I) -> Difference
    where
        I: IntoIterator<Item = (String, Verdict)>,
    {
        // For a repeated name the strongest verdict stands: a failure over a
        // pass over not run.
        fn rank(v: &Verdict) -> u8 {
            match v {
                Verdict::NotRun => 0,
                Verdict::Pass => 1,
                Verdict::Fail(_) => 2,
            }
        }
        let mut seen: BTreeMap<String, Verdict> = BTreeMap::new();
        for (name, verdict) in outcomes {
            match seen.entry(name) {
                Entry::Vacant(e) => {
                    e.insert(verdict);
                }
                Entry::Occupied(mut e) => {
                    if rank(&verdict) > rank(e.get()) {
                        e.insert(verdict);
                    }
                }
            }
        }
        let mut diff = Difference {
            list: self.path.clone(),
            ..Difference::default()
        };
        for (name, verdict) in &seen {
            match (verdict, self.cases.contains_key(name)) {
                (Verdict::Fail(message), false) => {
                    diff.new_failures.push((name.clone(), message.clone()))
                }
                (Verdict::Pass, true) => diff.now_passing.push(name.clone()),
                _ => {}
            }
        }
        diff.unknown = self
            .cases
            .keys()
            .filter(|c| !seen.contains_key(*c))
            .cloned()
            .collect();
        diff
    }
}

/// How a run differs from its list; empty when they agree.
#[derive(Debug, Clone, Default)]
pub struct Difference {
    /// The list file compared against (named in the report).
    pub list: PathBuf,
    /// Failing cases that are not listed, with the runner's message.
    pub new_failures: Vec<(String, String)>,
    /// Listed cases that passed.
    pub now_passing: Vec<String>,
    /// Listed cases the suite does not have (renamed or removed upstream).
    pub unknown: Vec<String>,
}

impl Difference {
    pub fn is_empty(&self) -> bool {
        self.new_failures.is_empty() && self.now_passing.is_empty() && self.unknown.is_empty()
    }
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "the run differs from {} (expected failures):",
            self.list.display()
        )?;
        if !self.new_failures.is_empty() {
            writeln!(
                f,
                "  {} new failure(s), not in the list (fix them, or add them with a reason):",
                self.new_failures.len()
            )?;
            for (name, message) in &self.new_failures {
                writeln!(f, "    - {name}: {message}")?;
            }
        }
        if !self.now_passing.is_empty() {
            writeln!(
                f,
                "  {} listed case(s) now pass (remove them from the list):",
                self.now_passing.len()
            )?;
            for name in &self.now_passing {
                writeln!(f, "    + {name}")?;
            }
        }
        if !self.unknown.is_empty() {
            writeln!(
                f,
                "  {} listed case(s) are not in the suite (remove or rename them):",
                self.unknown.len()
            )?;
            for name in &self.unknown {
                writeln!(f, "    ? {name}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(text: &str) -> ExpectedFailures {
        match ExpectedFailures::parse(text, Path::new("list.txt")) {
            Ok(l) => l,
            Err(e) => panic!("{e}"),
        }
    }

    fn fail(m: &str) -> Verdict {
        Verdict::Fail(m.to_owned())
    }

    #[test]
    fn parses_entries_and_comments() {
        let l = list("# header\n\ng/a # the input lacks the extension\n  g/b #  spaces  \n");
        assert_eq!(l.cases().len(), 2);
        assert_eq!(l.cases()["g/a"], "the input lacks the extension");
        assert_eq!(l.cases()["g/b"], "spaces");
    }

    #[test]
    fn refuses_entries_without_reason_or_twice() {
        for (text, needle) in [
            ("g/a\n", "list.txt:1: `g/a` has no reason"),
            ("g/a # x\n\ng/a # y\n", "list.txt:3: `g/a` is listed twice"),
            ("g/a # \n", "has no reason"),
        ] {
            match ExpectedFailures::parse(text, Path::new("list.txt")) {
                Ok(_) => panic!("accepted {text:?}"),
                Err(e) => assert!(e.to_string().contains(needle), "{e}"),
            }
        }
    }

    #[test]
    fn reports_both_directions_and_stale_entries() {
        let l = list("a # known\nb # known\ngone # renamed upstream\nskipped # xml only\n");
        let diff = l.compare([
            ("a".to_owned(), fail("still")),
            ("b".to_owned(), Verdict::Pass),
            ("c".to_owned(), fail("boom")),
            ("d".to_owned(), Verdict::Pass),
            ("skipped".to_owned(), Verdict::NotRun),
        ]);
        assert_eq!(diff.new_failures, vec![("c".to_owned(), "boom".to_owned())]);
        assert_eq!(diff.now_passing, vec!["b".to_owned()]);
        assert_eq!(diff.unknown, vec!["gone".to_owned()]);
        let text = diff.to_string();
        for needle in ["- c: boom", "+ b", "? gone", "list.txt"] {
            assert!(text.contains(needle), "{text}");
        }
    }

    #[test]
    fn agrees_when_the_run_matches_and_repeated_names_fail_if_any_run_fails() {
        let l = list("dup # one of its two runs fails\n");
        let diff = l.compare([
            ("dup".to_owned(), Verdict::Pass),
            ("dup".to_owned(), fail("x")),
            ("ok".to_owned(), Verdict::Pass),
        ]);
        assert!(diff.is_empty(), "{diff}");
    }
}
