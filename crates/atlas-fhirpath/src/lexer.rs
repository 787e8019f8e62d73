//! Tokenizer for FHIRPath source text, with 1-based line/column positions.

use crate::error::ParseError;

/// A position in the source text (1-based line and column, counted in chars).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: u32,
    pub column: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Tok {
    Ident(String),
    /// A back-tick delimited identifier (never a keyword).
    DelimIdent(String),
    Str(String),
    Number(String),
    /// `@...` date, date-time or time literal text, without the `@`.
    DateTime(String),
    Time(String),
    Dollar(String),
    Percent,
    Punct(&'static str),
    Eof,
}

impl Tok {
    pub(crate) fn describe(&self) -> String {
        match self {
            Tok::Ident(s) => format!("'{s}'"),
            Tok::DelimIdent(s) => format!("`{s}`"),
            Tok::Str(_) => "string literal".to_string(),
            Tok::Number(n) => format!("number {n}"),
            Tok::DateTime(s) => format!("'@{s}'"),
            Tok::Time(s) => format!("'@T{s}'"),
            Tok::Dollar(s) => format!("'${s}'"),
            Tok::Percent => "'%'".to_string(),
            Tok::Punct(p) => format!("'{p}'"),
            Tok::Eof => "end of expression".to_string(),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Token {
    pub tok: Tok,
    pub pos: Pos,
}

struct Lexer<'s> {
    chars: Vec<char>,
    i: usize,
    line: u32,
    col: u32,
    _src: &'s str,
}

const PUNCTS: &[&str] = &[
    "<=", ">=", "!=", "!~", "(", ")", "[", "]", "{", "}", ".", ",", "+", "-", "*", "/", "&", "|",
    "<", ">", "=", "~",
];

pub(crate) fn tokenize(src: &str) -> Result<Vec<Token>, ParseError> {
    let mut lx = Lexer {
        chars: src.chars().collect(),
        i: 0,
        line: 1,
        col: 1,
        _src: src,
    };
    let mut out = Vec::new();
    loop {
        lx.skip_trivia()?;
        let pos = lx.pos();
        let Some(c) = lx.peek(0) else {
            out.push(Token { tok: Tok::Eof, pos });
            return Ok(out);
        };
        let tok = if c.is_ascii_alphabetic() || c == '_' {
            Tok::Ident(lx.take_while(|c| c.is_ascii_alphanumeric() || c == '_'))
        } else if c.is_ascii_digit() {
            lx.number()
        } else if c == '\'' || c == '`' {
            let s = lx.quoted(c)?;
            if c == '`' {
                Tok::DelimIdent(s)
            } else {
                Tok::Str(s)
            }
        } else if c == '@' {
            lx.bump();
            lx.datetime(pos)?
        } else if c == '$' {
            lx.bump();
            let name = lx.take_while(|c| c.is_ascii_alphanumeric() || c == '_');
            if name.is_empty() {
                return Err(ParseError::new("expected identifier after '$'", pos));
            }
            Tok::Dollar(name)
        } else if c == '%' {
            lx.bump();
            Tok::Percent
        } else {
            let mut found = None;
            for p in PUNCTS {
                if p.chars().enumerate().all(|(k, pc)| lx.peek(k) == Some(pc)) {
                    found = Some(*p);
                    break;
                }
            }
            match found {
                Some(p) => {
                    for _ in 0..p.chars().count() {
                        lx.bump();
                    }
                    Tok::Punct(p)
                }
                None => return Err(ParseError::new(format!("unexpected character '{c}'"), pos)),
            }
        };
        out.push(Token { tok, pos });
    }
}

impl Lexer<'_> {
    fn pos(&self) -> Pos {
        Pos {
            line: self.line,
            column: self.col,
        }
    }
    fn peek(&self, k: usize) -> Option<char> {
        self.chars.get(self.i + k).copied()
    }
    fn bump(&mut self) -> Option<char> {
        let c = self.peek(0)?;
        self.i += 1;
        if c == '\n' {
            self.line += 1;
            self.col = 1;
        } else {
            self.col += 1;
        }
        Some(c)
    }
    fn take_while(&mut self, f: impl Fn(char) -> bool) -> String {
        let mut s = String::new();
        while let Some(c) = self.peek(0) {
            if !f(c) {
                break;
            }
            s.push(c);
            self.bump();
        }
        s
    }
    fn digits(&mut self) -> String {
        self.take_while(|c| c.is_ascii_digit())
    }
    fn skip_trivia(&mut self) -> Result<(), ParseError> {
        loop {
            match (self.peek(0), self.peek(1)) {
                (Some(c), _) if c.is_whitespace() => {
                    self.bump();
                }
                (Some('/'), Some('/')) => {
                    while let Some(c) = self.peek(0) {
                        if c == '\n' {
                            break;
                        }
                        self.bump();
                    }
                }
                (Some('/'), Some('*')) => {
                    let start = self.pos();
                    self.bump();
                    self.bump();
                    loop {
                        match (self.peek(0), self.peek(1)) {
                            (Some('*'), Some('/')) => {
                                self.bump();
                                self.bump();
                                break;
                            }
                            (Some(_), _) => {
                                self.bump();
                            }
                            (None, _) => {
                                return Err(ParseError::new("unterminated comment", start));
                            }
                        }
                    }
                }
                _ => return Ok(()),
            }
        }
    }
    fn number(&mut self) -> Tok {
        let mut s = self.digits();
        if self.peek(0) == Some('.') && self.peek(1).is_some_and(|c| c.is_ascii_digit()) {
            self.bump();
            s.push('.');
            s.push_str(&self.digits());
        }
        Tok::Number(s)
    }
    fn quoted(&mut self, q: char) -> Result<String, ParseError> {
        let start = self.pos();
        self.bump();
        let mut s = String::new();
        loop {
            let Some(c) = self.bump() else {
                let what = if q == '`' { "identifier" } else { "string" };
                return Err(ParseError::new(
                    format!("unterminated {what}, expected {q}"),
                    start,
                ));
            };
            if c == q {
                return Ok(s);
            }
            if c != '\\' {
                s.push(c);
                continue;
            }
            let epos = self.pos();
            match self.bump() {
                Some('n') => s.push('\n'),
                Some('r') => s.push('\r'),
                Some('t') => s.push('\t'),
                Some('f') => s.push('\u{c}'),
                Some('u') => {
                    let mut hex = String::new();
                    for _ in 0..4 {
                        match self.bump() {
                            Some(h) if h.is_ascii_hexdigit() => hex.push(h),
                            _ => return Err(ParseError::new("invalid \\u escape", epos)),
                        }
                    }
                    let code = u32::from_str_radix(&hex, 16)
                        .ok()
                        .and_then(char::from_u32)
                        .ok_or_else(|| ParseError::new("invalid \\u escape", epos))?;
                    s.push(code);
                }
                Some(c @ ('\\' | '/' | '\'' | '"' | '`')) => s.push(c),
                Some(c) => return Err(ParseError::new(format!("invalid escape '\\{c}'"), epos)),
                None => return Err(ParseError::new("unterminated string", start)),
            }
        }
    }
    fn fixed_digits(&mut self, n: usize, out: &mut String) -> bool {
        if (0..n).all(|k| self.peek(k).is_some_and(|c| c.is_ascii_digit())) {
            for _ in 0..n {
                if let Some(c) = self.bump() {
                    out.push(c);
                }
            }
            true
        } else {
            false
        }
    }
    /// `hh(:mm(:ss(.fff)?)?)?`
    fn time_part(&mut self, out: &mut String) -> bool {
        if !self.fixed_digits(2, out) {
            return false;
        }
        if self.peek(0) == Some(':') && self.peek(1).is_some_and(|c| c.is_ascii_digit()) {
            self.bump();
            out.push(':');
            self.fixed_digits(2, out);
            if self.peek(0) == Some(':') && self.peek(1).is_some_and(|c| c.is_ascii_digit()) {
                self.bump();
                out.push(':');
                self.fixed_digits(2, out);
                if self.peek(0) == Some('.') && self.peek(1).is_some_and(|c| c.is_ascii_digit()) {
                    self.bump();
                    out.push('.');
                    out.push_str(&self.digits());
                }
            }
        }
        true
    }
    fn tz_part(&mut self, out: &mut String) {
        match self.peek(0) {
            Some('Z') => {
                self.bump();
                out.push('Z');
            }
            Some(c @ ('+' | '-')) => {
                let ok = [1, 2, 4, 5]
                    .iter()
                    .all(|k| self.peek(*k).is_some_and(|d| d.is_ascii_digit()))
                    && self.peek(3) == Some(':');
                if ok {
                    out.push(c);
                    self.bump();
                    for _ in 0..5 {
                        if let Some(d) = self.bump() {
                            out.push(d);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    fn datetime(&mut self, pos: Pos) -> Result<Tok, ParseError> {
        let mut s = String::new();
        if self.peek(0) == Some('T') {
            self.bump();
            if !self.time_part(&mut s) {
                return Err(ParseError::new("invalid time literal", pos));
            }
            let mut tz = String::new();
            self.tz_part(&mut tz);
            if !tz.is_empty() {
                return Err(ParseError::new(
                    "a time literal cannot have a timezone",
                    pos,
                ));
            }
            return Ok(Tok::Time(s));
        }
        if !self.fixed_digits(4, &mut s) {
            return Err(ParseError::new("invalid date literal", pos));
        }
        if self.peek(0) == Some('-') && self.peek(1).is_some_and(|c| c.is_ascii_digit()) {
            self.bump();
            s.push('-');
            self.fixed_digits(2, &mut s);
            if self.peek(0) == Some('-') && self.peek(1).is_some_and(|c| c.is_ascii_digit()) {
                self.bump();
                s.push('-');
                self.fixed_digits(2, &mut s);
            }
        }
        if self.peek(0) == Some('T') {
            self.bump();
            s.push('T');
            if self.time_part(&mut s) {
                self.tz_part(&mut s);
            }
        } else if matches!(self.peek(0), Some('Z')) {
            return Err(ParseError::new(
                "a date literal cannot have a timezone",
                pos,
            ));
        }
        Ok(Tok::DateTime(s))
    }
}
