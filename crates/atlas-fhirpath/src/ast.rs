//! The compiled expression tree: names of functions and operators are resolved
//! once at parse time, so evaluation never looks at strings except JSON keys.

use crate::functions::Func;
use crate::lexer::Pos;
use crate::value::{Quantity, Temporal};
use rust_decimal::Decimal;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BinOp {
    Mul,
    Div,
    IntDiv,
    Mod,
    Add,
    Sub,
    Concat,
    Union,
    Lt,
    Gt,
    Le,
    Ge,
    Eq,
    Ne,
    Equiv,
    NotEquiv,
    In,
    Contains,
    And,
    Or,
    Xor,
    Implies,
}

impl BinOp {
    pub(crate) fn symbol(self) -> &'static str {
        match self {
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::IntDiv => "div",
            BinOp::Mod => "mod",
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Concat => "&",
            BinOp::Union => "|",
            BinOp::Lt => "<",
            BinOp::Gt => ">",
            BinOp::Le => "<=",
            BinOp::Ge => ">=",
            BinOp::Eq => "=",
            BinOp::Ne => "!=",
            BinOp::Equiv => "~",
            BinOp::NotEquiv => "!~",
            BinOp::In => "in",
            BinOp::Contains => "contains",
            BinOp::And => "and",
            BinOp::Or => "or",
            BinOp::Xor => "xor",
            BinOp::Implies => "implies",
        }
    }
}

/// A type name as written in `is`, `as`, `ofType` (`FHIR.Patient`, `System.String`, `Quantity`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeSpec {
    pub namespace: Option<String>,
    pub name: String,
}

impl std::fmt::Display for TypeSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{ns}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) enum Literal {
    Empty,
    Boolean(bool),
    Integer(i64),
    Decimal(Decimal),
    String(String),
    Temporal(Temporal),
    Quantity(Quantity),
}

#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub kind: NodeKind,
    pub pos: Pos,
}

#[derive(Debug, Clone)]
pub(crate) enum NodeKind {
    Literal(Literal),
    This,
    Index,
    Total,
    /// `%name` environment or user variable.
    Variable(String),
    /// Navigation to a child element; `base: None` means "from the focus".
    Member {
        base: Option<Box<Node>>,
        name: String,
    },
    Call {
        base: Option<Box<Node>>,
        func: Func,
        name: String,
        args: Vec<Node>,
    },
    Indexer {
        base: Box<Node>,
        index: Box<Node>,
    },
    Negate(Box<Node>),
    Binary {
        op: BinOp,
        lhs: Box<Node>,
        rhs: Box<Node>,
    },
    Is {
        base: Box<Node>,
        ty: TypeSpec,
    },
    As {
        base: Box<Node>,
        ty: TypeSpec,
    },
}
