//! Error types: parse errors with positions, evaluation errors, diagnostics.

use crate::lexer::Pos;

/// A syntax error, with the 1-based position it was found at.
///
/// Displays as `expected ')' at 1:17`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} at {line}:{column}")]
pub struct ParseError {
    pub message: String,
    pub line: u32,
    pub column: u32,
}

impl ParseError {
    pub(crate) fn new(message: impl Into<String>, pos: Pos) -> Self {
        ParseError {
            message: message.into(),
            line: pos.line,
            column: pos.column,
        }
    }
}

/// An error raised while evaluating an expression.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EvalError {
    /// A function or operator that needs at most one item got several.
    #[error("{what} expects a single item, got {count}")]
    NotSingleton { what: String, count: usize },
    /// Operand or argument types the operation is not defined for.
    #[error("{0}")]
    Type(String),
    #[error("unknown function '{name}'")]
    UnknownFunction { name: String },
    #[error("function '{name}' takes {expected} argument(s), got {got}")]
    Arity {
        name: String,
        expected: String,
        got: usize,
    },
    #[error("unknown variable '%{0}'")]
    UnknownVariable(String),
    #[error("unknown type '{0}'")]
    UnknownType(String),
    #[error("invalid regular expression: {0}")]
    Regex(String),
    #[error("arithmetic overflow in {0}")]
    Overflow(&'static str),
    #[error("no terminology service: cannot evaluate {0}")]
    NoTerminologyService(String),
    #[error("{0}")]
    Other(String),
}

impl EvalError {
    pub(crate) fn ty(msg: impl Into<String>) -> Self {
        EvalError::Type(msg.into())
    }
}

/// A static (type checker) finding.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    pub line: u32,
    pub column: u32,
    pub message: String,
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at {}:{}", self.message, self.line, self.column)
    }
}
