//! Diagnostics (problems found before a view runs) and run-time errors.

use std::fmt;

/// A problem with a ViewDefinition, found while reading or compiling it.
///
/// `path` points inside the view JSON (`select[0].column[2].path`); `message`
/// says what is wrong, with a `line:column` position inside a FHIRPath
/// expression when there is one. Displays as
/// `select[0].column[2].path: unknown function 'foo' at 1:5`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub path: String,
    pub message: String,
}

impl Diagnostic {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Diagnostic {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Render a list of diagnostics, one per line.
pub fn render(diags: &[Diagnostic]) -> String {
    diags
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// An error while running a compiled view over one resource.
///
/// The resource's rows are not appended when this happens (the builder is left
/// as it was before the resource).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}{path}: {message}", resource.as_deref().map(|r| format!("{r}: ")).unwrap_or_default())]
pub struct RunError {
    /// `ResourceType/id` of the input resource, when it has an id.
    pub resource: Option<String>,
    /// Where in the view (`select[0].column[1].path`, `where[0].path`).
    pub path: String,
    pub message: String,
}

/// Anything that can go wrong between a view's JSON and its record batch.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ViewError {
    /// The view is invalid (structure, FHIRPath, types, collection rules).
    #[error("invalid view:\n{}", render(.0))]
    Invalid(Vec<Diagnostic>),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("arrow: {0}")]
    Arrow(String),
}
