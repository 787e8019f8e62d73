//! Pratt parser producing the compiled [`Node`] tree.

use crate::ast::{BinOp, Literal, Node, NodeKind, TypeSpec};
use crate::error::ParseError;
use crate::functions::Func;
use crate::lexer::{Pos, Tok, Token, tokenize};
use crate::value::{Quantity, Temporal, is_calendar_unit};
use rust_decimal::Decimal;
use std::str::FromStr;

pub(crate) fn parse(src: &str) -> Result<Node, ParseError> {
    let tokens = tokenize(src)?;
    let mut p = Parser {
        tokens,
        i: 0,
        depth: 0,
    };
    let node = p.expr(0)?;
    let t = p.peek();
    if t.tok != Tok::Eof {
        return Err(ParseError::new(
            format!("unexpected {} after expression", t.tok.describe()),
            t.pos,
        ));
    }
    if let Some(pos) = too_deep(&node) {
        return Err(ParseError::new("expression nested too deeply", pos));
    }
    Ok(node)
}

struct Parser {
    tokens: Vec<Token>,
    i: usize,
    depth: usize,
}

const UNARY_BP: u8 = 11;
/// Bound on tree depth, so evaluation and checking cannot exhaust the stack.
const MAX_DEPTH: usize = 200;

fn subnodes(n: &Node) -> Vec<&Node> {
    match &n.kind {
        NodeKind::Member { base, .. } => base.iter().map(|b| &**b).collect(),
        NodeKind::Call { base, args, .. } => base.iter().map(|b| &**b).chain(args.iter()).collect(),
        NodeKind::Indexer { base, index } => vec![base, index],
        NodeKind::Negate(b) | NodeKind::Is { base: b, .. } | NodeKind::As { base: b, .. } => {
            vec![b]
        }
        NodeKind::Binary { lhs, rhs, .. } => vec![lhs, rhs],
        _ => vec![],
    }
}

/// The position of a node deeper than `MAX_DEPTH`, computed without recursion.
fn too_deep(root: &Node) -> Option<Pos> {
    let mut stack = vec![(root, 1usize)];
    while let Some((n, d)) = stack.pop() {
        if d > MAX_DEPTH {
            return Some(n.pos);
        }
        stack.extend(subnodes(n).into_iter().map(|c| (c, d + 1)));
    }
    None
}

fn infix(tok: &Tok) -> Option<(u8, Infix)> {
    let op = |o| Some(Infix::Bin(o));
    let (bp, kind) = match tok {
        Tok::Ident(s) => match s.as_str() {
            "implies" => (1, op(BinOp::Implies)),
            "or" => (2, op(BinOp::Or)),
            "xor" => (2, op(BinOp::Xor)),
            "and" => (3, op(BinOp::And)),
            "in" => (4, op(BinOp::In)),
            "contains" => (4, op(BinOp::Contains)),
            "is" => (8, Some(Infix::Is)),
            "as" => (8, Some(Infix::As)),
            "div" => (10, op(BinOp::IntDiv)),
            "mod" => (10, op(BinOp::Mod)),
            _ => return None,
        },
        Tok::Punct(p) => match *p {
            "=" => (5, op(BinOp::Eq)),
            "!=" => (5, op(BinOp::Ne)),
            "~" => (5, op(BinOp::Equiv)),
            "!~" => (5, op(BinOp::NotEquiv)),
            "<" => (6, op(BinOp::Lt)),
            ">" => (6, op(BinOp::Gt)),
            "<=" => (6, op(BinOp::Le)),
            ">=" => (6, op(BinOp::Ge)),
            "|" => (7, op(BinOp::Union)),
            "+" => (9, op(BinOp::Add)),
            "-" => (9, op(BinOp::Sub)),
            "&" => (9, op(BinOp::Concat)),
            "*" => (10, op(BinOp::Mul)),
            "/" => (10, op(BinOp::Div)),
            "." => (12, Some(Infix::Dot)),
            "[" => (12, Some(Infix::Index)),
            _ => return None,
        },
        _ => return None,
    };
    kind.map(|k| (bp, k))
}

enum Infix {
    Bin(BinOp),
    Is,
    As,
    Dot,
    Index,
}

impl Parser {
    fn peek(&self) -> &Token {
        // The token list always ends with Eof and `i` never passes it.
        &self.tokens[self.i.min(self.tokens.len() - 1)]
    }
    fn peek_at(&self, k: usize) -> &Tok {
        &self.tokens[(self.i + k).min(self.tokens.len() - 1)].tok
    }
    fn next(&mut self) -> Token {
        let t = self.peek().clone();
        if self.i < self.tokens.len() - 1 {
            self.i += 1;
        }
        t
    }
    fn expect(&mut self, p: &'static str) -> Result<Pos, ParseError> {
        let t = self.peek();
        if t.tok == Tok::Punct(p) {
            let pos = t.pos;
            self.next();
            Ok(pos)
        } else {
            Err(ParseError::new(
                format!("expected '{p}', found {}", t.tok.describe()),
                t.pos,
            ))
        }
    }

    fn expr(&mut self, min_bp: u8) -> Result<Node, ParseError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(ParseError::new(
                "expression nested too deeply",
                self.peek().pos,
            ));
        }
        let r = self.expr_inner(min_bp);
        self.depth -= 1;
        r
    }

    fn expr_inner(&mut self, min_bp: u8) -> Result<Node, ParseError> {
        let mut lhs = self.prefix()?;
        loop {
            let t = self.peek().clone();
            let Some((bp, kind)) = infix(&t.tok) else {
                break;
            };
            if bp <= min_bp {
                break;
            }
            self.next();
            lhs = match kind {
                Infix::Bin(op) => {
                    let rhs = self.expr(bp)?;
                    Node {
                        kind: NodeKind::Binary {
                            op,
                            lhs: Box::new(lhs),
                            rhs: Box::new(rhs),
                        },
                        pos: t.pos,
                    }
                }
                Infix::Is => {
                    let ty = self.type_spec()?;
                    Node {
                        kind: NodeKind::Is {
                            base: Box::new(lhs),
                            ty,
                        },
                        pos: t.pos,
                    }
                }
                Infix::As => {
                    let ty = self.type_spec()?;
                    Node {
                        kind: NodeKind::As {
                            base: Box::new(lhs),
                            ty,
                        },
                        pos: t.pos,
                    }
                }
                Infix::Dot => self.invocation(Some(Box::new(lhs)))?,
                Infix::Index => {
                    let index = self.expr(0)?;
                    self.expect("]")?;
                    Node {
                        kind: NodeKind::Indexer {
                            base: Box::new(lhs),
                            index: Box::new(index),
                        },
                        pos: t.pos,
                    }
                }
            };
        }
        Ok(lhs)
    }

    fn prefix(&mut self) -> Result<Node, ParseError> {
        let t = self.next();
        let pos = t.pos;
        let lit = |l| {
            Ok(Node {
                kind: NodeKind::Literal(l),
                pos,
            })
        };
        match t.tok {
            Tok::Punct("(") => {
                let e = self.expr(0)?;
                self.expect(")")?;
                Ok(e)
            }
            Tok::Punct("{") => {
                self.expect("}")?;
                lit(Literal::Empty)
            }
            Tok::Punct("-") => {
                let e = self.expr(UNARY_BP)?;
                Ok(Node {
                    kind: NodeKind::Negate(Box::new(e)),
                    pos,
                })
            }
            Tok::Punct("+") => self.expr(UNARY_BP),
            Tok::Str(s) => lit(Literal::String(s)),
            Tok::Number(n) => self.number(n, pos),
            Tok::DateTime(s) => match Temporal::parse_literal(&s) {
                Some(v) => lit(Literal::Temporal(v)),
                None => Err(ParseError::new(
                    format!("invalid date/time literal '@{s}'"),
                    pos,
                )),
            },
            Tok::Time(s) => match Temporal::parse_time(&s) {
                Some(v) => lit(Literal::Temporal(v)),
                None => Err(ParseError::new(
                    format!("invalid time literal '@T{s}'"),
                    pos,
                )),
            },
            Tok::Dollar(name) => match name.as_str() {
                "this" => Ok(Node {
                    kind: NodeKind::This,
                    pos,
                }),
                "index" => Ok(Node {
                    kind: NodeKind::Index,
                    pos,
                }),
                "total" => Ok(Node {
                    kind: NodeKind::Total,
                    pos,
                }),
                _ => Err(ParseError::new(
                    format!("unknown special variable '${name}'"),
                    pos,
                )),
            },
            Tok::Percent => {
                let t = self.next();
                match t.tok {
                    Tok::Ident(s) | Tok::DelimIdent(s) | Tok::Str(s) => Ok(Node {
                        kind: NodeKind::Variable(s),
                        pos,
                    }),
                    other => Err(ParseError::new(
                        format!(
                            "expected variable name after '%', found {}",
                            other.describe()
                        ),
                        t.pos,
                    )),
                }
            }
            Tok::Ident(ref s) if s == "true" => lit(Literal::Boolean(true)),
            Tok::Ident(ref s) if s == "false" => lit(Literal::Boolean(false)),
            Tok::Ident(_) | Tok::DelimIdent(_) => {
                self.i -= 1;
                self.invocation(None)
            }
            Tok::Eof => Err(ParseError::new(
                "expected expression, found end of expression",
                pos,
            )),
            other => Err(ParseError::new(
                format!("expected expression, found {}", other.describe()),
                pos,
            )),
        }
    }

    fn number(&mut self, n: String, pos: Pos) -> Result<Node, ParseError> {
        let value: Result<Literal, ParseError> = if n.contains('.') {
            Decimal::from_str(&n)
                .map(Literal::Decimal)
                .map_err(|_| ParseError::new(format!("decimal literal {n} out of range"), pos))
        } else {
            n.parse::<i64>()
                .map(Literal::Integer)
                .map_err(|_| ParseError::new(format!("integer literal {n} out of range"), pos))
        };
        let value = value?;
        // Quantity literal: number followed by a unit string or a calendar duration keyword.
        let unit = match self.peek_at(0) {
            Tok::Str(u) => Some(u.clone()),
            Tok::Ident(u) if is_calendar_unit(u) => Some(u.clone()),
            _ => None,
        };
        if let Some(unit) = unit {
            self.next();
            let v = match value {
                Literal::Integer(i) => Decimal::from(i),
                Literal::Decimal(d) => d,
                _ => Decimal::ZERO,
            };
            return Ok(Node {
                kind: NodeKind::Literal(Literal::Quantity(Quantity::new(v, unit))),
                pos,
            });
        }
        Ok(Node {
            kind: NodeKind::Literal(value),
            pos,
        })
    }

    fn identifier(&mut self) -> Result<(String, Pos), ParseError> {
        let t = self.next();
        match t.tok {
            Tok::Ident(s) | Tok::DelimIdent(s) => Ok((s, t.pos)),
            other => Err(ParseError::new(
                format!("expected identifier, found {}", other.describe()),
                t.pos,
            )),
        }
    }

    fn invocation(&mut self, base: Option<Box<Node>>) -> Result<Node, ParseError> {
        let t = self.peek().clone();
        let (name, pos) = match t.tok {
            Tok::Dollar(ref d)
                if base.is_some() && (d == "this" || d == "index" || d == "total") =>
            {
                self.next();
                let kind = match d.as_str() {
                    "this" => NodeKind::This,
                    "index" => NodeKind::Index,
                    _ => NodeKind::Total,
                };
                return Ok(Node { kind, pos: t.pos });
            }
            _ => self.identifier()?,
        };
        let delimited = matches!(t.tok, Tok::DelimIdent(_));
        if !delimited && self.peek().tok == Tok::Punct("(") {
            self.next();
            let mut args = Vec::new();
            if self.peek().tok != Tok::Punct(")") {
                loop {
                    args.push(self.expr(0)?);
                    if self.peek().tok == Tok::Punct(",") {
                        self.next();
                        continue;
                    }
                    break;
                }
            }
            self.expect(")")?;
            let func = Func::from_name(&name);
            // Type-name arguments of is/as/ofType are parsed as expressions; keep them as
            // member nodes and interpret them as type specifiers at evaluation.
            return Ok(Node {
                kind: NodeKind::Call {
                    base,
                    func,
                    name,
                    args,
                },
                pos,
            });
        }
        Ok(Node {
            kind: NodeKind::Member { base, name },
            pos,
        })
    }

    fn type_spec(&mut self) -> Result<TypeSpec, ParseError> {
        let (first, _) = self.identifier()?;
        if self.peek().tok == Tok::Punct(".")
            && matches!(self.peek_at(1), Tok::Ident(_) | Tok::DelimIdent(_))
        {
            self.next();
            let (second, _) = self.identifier()?;
            return Ok(TypeSpec {
                namespace: Some(first),
                name: second,
            });
        }
        Ok(TypeSpec {
            namespace: None,
            name: first,
        })
    }
}

/// Interpret an argument expression of `is()`, `as()`, `ofType()` as a type name.
pub(crate) fn node_as_type_spec(node: &Node) -> Option<TypeSpec> {
    match &node.kind {
        NodeKind::Member { base: None, name } => Some(TypeSpec {
            namespace: None,
            name: name.clone(),
        }),
        NodeKind::Member {
            base: Some(b),
            name,
        } => match &b.kind {
            NodeKind::Member {
                base: None,
                name: ns,
            } => Some(TypeSpec {
                namespace: Some(ns.clone()),
                name: name.clone(),
            }),
            _ => None,
        },
        _ => None,
    }
}
