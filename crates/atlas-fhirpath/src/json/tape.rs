//! A flat, reusable JSON tape with projection: the fast path of view flattening.
//!
//! [`Tape::parse`] validates one JSON text with exactly the grammar of
//! [`super::parse`] (same accepted set, same depth limit) but records only the
//! members a [`KeyTrie`] asks for: every other value is checked and skipped
//! without being stored. The tape is a `Vec` of fixed-size [`TapeNode`]s in
//! document order, reused from one resource to the next, so a steady-state
//! parse allocates nothing. Strings and numbers are byte ranges of the text;
//! only strings with escapes are decoded, into a side buffer.
//!
//! Why: building a [`super::JsonValue`] tree of the whole resource (a `Vec`
//! per object, then dropping it) costs more than evaluating a view over it;
//! most of a FHIR resource is never read by a given set of views.
//!
//! Error messages are not the tree parser's: callers that need the canonical
//! error re-parse the rejected text with [`super::parse`].

use super::MAX_DEPTH;

/// What a tape node holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TapeKind {
    Null,
    True,
    False,
    /// Number text: `text[start..start + len]`.
    Number,
    /// String content without escapes: `text[start..start + len]`.
    Str,
    /// String decoded from escapes: `escaped[start..start + len]`.
    EscapedStr,
    /// Children follow in document order (recorded ones only); `end` is the
    /// index after the last descendant.
    Object,
    Array,
}

/// One value on the tape.
#[derive(Debug, Clone, Copy)]
pub struct TapeNode {
    pub kind: TapeKind,
    /// Whether the member key is in the escaped buffer (else in the text).
    pub key_escaped: bool,
    /// The member key of a value inside an object (`key_len == 0` and
    /// `key_start == u32::MAX` for array items and the root).
    pub key_start: u32,
    pub key_len: u32,
    /// The key's [`KeyTrie::symbol`], or [`NO_SYMBOL`].
    pub sym: u32,
    pub start: u32,
    pub len: u32,
    /// Index of the node after this one's subtree (its next sibling).
    pub end: u32,
}

/// Which members to record, as a tree of keys. Node 0 is the root object.
/// [`KeyTrie::ALL`] records a whole subtree.
#[derive(Debug, Clone, Default)]
pub struct KeyTrie {
    /// Per trie node, its edges.
    nodes: Vec<Vec<Edge>>,
    /// Per trie node, an open-addressing table over its edges (edge index
    /// + 1, 0 = empty), so a key costs one probe instead of a scan.
    tables: Vec<[u8; TABLE]>,
    /// Key symbols: every distinct key gets one number, recorded on the tape.
    symbols: Vec<Box<[u8]>>,
}

impl KeyTrie {
    /// Record everything below.
    pub const ALL: u32 = u32::MAX;
    /// The root object.
    pub const ROOT: u32 = 0;

    /// A trie recording nothing but what is added.
    pub fn new() -> KeyTrie {
        KeyTrie {
            nodes: vec![Vec::new()],
            tables: vec![[0; TABLE]],
            symbols: Vec::new(),
        }
    }

    /// The symbol of `key` (the same for the key anywhere in the trie),
    /// assigned on first use. Tape nodes recorded through the trie carry it
    /// ([`TapeNode::sym`]), so lookups compare numbers, not strings.
    pub fn symbol(&mut self, key: &str) -> u32 {
        match self.symbols.iter().position(|k| &**k == key.as_bytes()) {
            Some(i) => i as u32,
            None => {
                self.symbols.push(key.as_bytes().into());
                (self.symbols.len() - 1) as u32
            }
        }
    }

    /// The child of `node` for `key`, added when missing. Below
    /// [`KeyTrie::ALL`] everything stays `ALL`.
    pub fn add(&mut self, node: u32, key: &str) -> u32 {
        if node == Self::ALL {
            return Self::ALL;
        }
        if let Some((c, _)) = self.child(node, key.as_bytes()) {
            return c;
        }
        let sym = self.symbol(key);
        let id = self.nodes.len() as u32;
        self.nodes.push(Vec::new());
        self.tables.push([0; TABLE]);
        if let Some(n) = self.nodes.get_mut(node as usize) {
            n.push(Edge {
                prefix: prefix8(key.as_bytes()),
                suffix: suffix8(key.as_bytes()),
                key: key.as_bytes().into(),
                child: id,
                sym,
            });
        }
        self.rebuild(node);
        id
    }

    fn rebuild(&mut self, node: u32) {
        let (Some(edges), Some(table)) = (
            self.nodes.get(node as usize),
            self.tables.get_mut(node as usize),
        ) else {
            return;
        };
        *table = [0; TABLE];
        if edges.len() > MAX_TABLE_EDGES {
            return;
        }
        for (i, e) in edges.iter().enumerate() {
            let mut h = slot(e.prefix, e.key.len());
            while table[h] != 0 {
                h = (h + 1) % TABLE;
            }
            table[h] = (i + 1) as u8;
        }
    }

    /// (child node, key symbol); below `ALL` the symbol is [`NO_SYMBOL`].
    #[inline(always)]
    fn child(&self, node: u32, key: &[u8]) -> Option<(u32, u32)> {
        if node == Self::ALL {
            return Some((Self::ALL, NO_SYMBOL));
        }
        let p = prefix8(key);
        let sfx = suffix8(key);
        let edges = self.nodes.get(node as usize)?;
        let hit = |e: &Edge| {
            e.prefix == p
                && e.suffix == sfx
                && e.key.len() == key.len()
                && (key.len() <= 16 || *e.key == *key)
        };
        if edges.len() > MAX_TABLE_EDGES {
            return edges.iter().find(|e| hit(e)).map(|e| (e.child, e.sym));
        }
        let table = self.tables.get(node as usize)?;
        let mut h = slot(p, key.len());
        loop {
            let e = *table.get(h)?;
            if e == 0 {
                return None;
            }
            let edge = edges.get(e as usize - 1)?;
            if hit(edge) {
                return Some((edge.child, edge.sym));
            }
            h = (h + 1) % TABLE;
        }
    }
}

#[derive(Debug, Clone)]
struct Edge {
    /// The first 8 key bytes (zero-padded) and the length: most keys are
    /// told apart by these alone.
    prefix: u64,
    /// The last 8 key bytes (zero-padded): with `prefix`, exact up to 16 bytes.
    suffix: u64,
    key: Box<[u8]>,
    child: u32,
    sym: u32,
}

const TABLE: usize = 256;
/// Above this many edges a node is scanned (the table stays at most 3/4 full;
/// entries are `u8` edge numbers + 1).
const MAX_TABLE_EDGES: usize = 192;

#[inline]
fn slot(prefix: u64, len: usize) -> usize {
    let h = (prefix ^ (len as u64).wrapping_mul(0x9E37_79B9)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (h >> 56) as usize
}

#[inline]
fn suffix8(key: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    let n = key.len().min(8);
    w[..n].copy_from_slice(&key[key.len() - n..]);
    u64::from_le_bytes(w)
}

#[inline]
fn prefix8(key: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    let n = key.len().min(8);
    w[..n].copy_from_slice(&key[..n]);
    u64::from_le_bytes(w)
}

/// A parse failure (the offset only; see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapeError {
    pub offset: usize,
}

/// The reusable tape. See the module doc.
#[derive(Debug, Default)]
pub struct Tape {
    nodes: Vec<TapeNode>,
    escaped: String,
    /// Counts parses, so caches over a tape know when it changed.
    generation: u64,
}

const NO_KEY: u32 = u32::MAX;
/// The symbol of keys recorded without one (array items, the root, members below [`KeyTrie::ALL`]).
pub const NO_SYMBOL: u32 = u32::MAX;

impl Tape {
    pub fn new() -> Tape {
        Tape::default()
    }

    /// Unique to each parse (0 before the first).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The nodes of the last parse; node 0 is the root value.
    pub fn nodes(&self) -> &[TapeNode] {
        &self.nodes
    }

    /// Parse `text`, recording the members `trie` selects below the root
    /// (`root` is a trie node, e.g. [`KeyTrie::ROOT`] or [`KeyTrie::ALL`]).
    /// Texts over 4 GiB are refused.
    pub fn parse(&mut self, text: &str, trie: &KeyTrie, root: u32) -> Result<(), TapeError> {
        self.nodes.clear();
        self.escaped.clear();
        // Unique across tapes, so a cache can key on it alone.
        static PARSES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        self.generation = PARSES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if text.len() >= u32::MAX as usize {
            return Err(TapeError { offset: 0 });
        }
        let mut p = Scan {
            b: text.as_bytes(),
            pos: 0,
            depth: 0,
            trie,
            tape: self,
        };
        p.ws();
        p.value(root, Key::NONE)?;
        p.ws();
        if p.pos != p.b.len() {
            return Err(TapeError { offset: p.pos });
        }
        Ok(())
    }

    /// The text of a string node (borrowed from `text` or the escape buffer).
    #[inline]
    pub fn str<'t>(&'t self, text: &'t str, i: u32) -> Option<&'t str> {
        let n = self.nodes.get(i as usize)?;
        let (s, e) = (n.start as usize, n.start as usize + n.len as usize);
        match n.kind {
            TapeKind::Str => text.get(s..e),
            TapeKind::EscapedStr => self.escaped.get(s..e),
            _ => None,
        }
    }

    /// The text of a number node.
    #[inline]
    pub fn number<'t>(&self, text: &'t str, i: u32) -> Option<&'t str> {
        let n = self.nodes.get(i as usize)?;
        match n.kind {
            TapeKind::Number => text.get(n.start as usize..n.start as usize + n.len as usize),
            _ => None,
        }
    }

    /// The member key of node `i` (`None` for array items and the root).
    #[inline]
    pub fn key<'t>(&'t self, text: &'t str, i: u32) -> Option<&'t str> {
        let n = self.nodes.get(i as usize)?;
        if n.key_start == NO_KEY {
            return None;
        }
        let (s, e) = (
            n.key_start as usize,
            n.key_start as usize + n.key_len as usize,
        );
        if n.key_escaped {
            self.escaped.get(s..e)
        } else {
            text.get(s..e)
        }
    }

    /// The key symbol of node `i` ([`NO_SYMBOL`] when it has none).
    #[inline]
    pub fn sym(&self, i: u32) -> u32 {
        self.nodes.get(i as usize).map_or(NO_SYMBOL, |n| n.sym)
    }

    #[inline]
    pub fn kind(&self, i: u32) -> Option<TapeKind> {
        self.nodes.get(i as usize).map(|n| n.kind)
    }

    /// The children of container node `i` (recorded ones), in document order.
    #[inline]
    pub fn children(&self, i: u32) -> Children<'_> {
        match self.nodes.get(i as usize) {
            Some(n) if matches!(n.kind, TapeKind::Object | TapeKind::Array) => Children {
                tape: self,
                next: i + 1,
                end: n.end,
            },
            _ => Children {
                tape: self,
                next: 0,
                end: 0,
            },
        }
    }
}

/// Iterator over a container's child node indices.
pub struct Children<'t> {
    tape: &'t Tape,
    next: u32,
    end: u32,
}

impl Iterator for Children<'_> {
    type Item = u32;
    #[inline]
    fn next(&mut self) -> Option<u32> {
        if self.next >= self.end {
            return None;
        }
        let i = self.next;
        self.next = self.tape.nodes.get(i as usize).map_or(self.end, |n| n.end);
        Some(i)
    }
}

/// A member key as recorded on the tape.
#[derive(Clone, Copy)]
struct Key {
    start: u32,
    len: u32,
    escaped: bool,
    sym: u32,
}

impl Key {
    const NONE: Key = Key {
        start: NO_KEY,
        len: 0,
        escaped: false,
        sym: NO_SYMBOL,
    };
}

struct Scan<'s> {
    b: &'s [u8],
    pos: usize,
    depth: usize,
    trie: &'s KeyTrie,
    tape: &'s mut Tape,
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Bit 7 of each byte of the result is set where the byte is `"`, `\` or a
/// control character; the lowest set bit is exact (higher ones may be false).
#[inline]
fn special_mask(w: u64) -> u64 {
    let q = w ^ (ONES * u64::from(b'"'));
    let s = w ^ (ONES * u64::from(b'\\'));
    let zq = q.wrapping_sub(ONES) & !q;
    let zs = s.wrapping_sub(ONES) & !s;
    let ctl = w.wrapping_sub(ONES * 0x20) & !w;
    (zq | zs | ctl) & HIGHS
}

impl Scan<'_> {
    #[inline]
    fn err<T>(&self) -> Result<T, TapeError> {
        Err(TapeError { offset: self.pos })
    }

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    #[inline]
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.pos += 1;
        }
    }

    /// Advance past plain string bytes to the next `"`, `\` or control byte.
    #[inline]
    fn run(&mut self) {
        let b = self.b;
        while self.pos + 8 <= b.len() {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[self.pos..self.pos + 8]);
            let m = special_mask(u64::from_le_bytes(w));
            if m != 0 {
                self.pos += (m.trailing_zeros() / 8) as usize;
                return;
            }
            self.pos += 8;
        }
        while let Some(c) = self.peek() {
            if c == b'"' || c == b'\\' || c < 0x20 {
                return;
            }
            self.pos += 1;
        }
    }

    /// A string at its opening quote. Returns (start, len, escaped): the span
    /// in the text, or in the escape buffer when `decode` and it had escapes.
    fn string(&mut self, decode: bool) -> Result<(u32, u32, bool), TapeError> {
        self.pos += 1;
        let start = self.pos;
        self.run();
        match self.peek() {
            Some(b'"') => {
                let len = self.pos - start;
                self.pos += 1;
                return Ok((start as u32, len as u32, false));
            }
            Some(b'\\') => {}
            _ => return self.err(),
        }
        // Escapes: validate (and decode when asked).
        let out_start = self.tape.escaped.len();
        if decode {
            let s = std::str::from_utf8(&self.b[start..self.pos])
                .map_err(|_| TapeError { offset: self.pos })?;
            self.tape.escaped.push_str(s);
        }
        loop {
            match self.peek() {
                Some(b'"') => {
                    self.pos += 1;
                    let len = self.tape.escaped.len() - out_start;
                    return Ok((out_start as u32, len as u32, decode));
                }
                Some(b'\\') => self.escape(decode)?,
                _ => return self.err(),
            }
            let seg = self.pos;
            self.run();
            if decode && self.pos > seg {
                let s = std::str::from_utf8(&self.b[seg..self.pos])
                    .map_err(|_| TapeError { offset: self.pos })?;
                self.tape.escaped.push_str(s);
            }
        }
    }

    fn escape(&mut self, decode: bool) -> Result<(), TapeError> {
        self.pos += 1;
        let c = match self.peek() {
            Some(b'"') => '"',
            Some(b'\\') => '\\',
            Some(b'/') => '/',
            Some(b'b') => '\u{8}',
            Some(b'f') => '\u{c}',
            Some(b'n') => '\n',
            Some(b'r') => '\r',
            Some(b't') => '\t',
            Some(b'u') => {
                self.pos += 1;
                let hi = self.hex4()?;
                let code = if (0xD800..0xDC00).contains(&hi) {
                    if !self.b[self.pos..].starts_with(b"\\u") {
                        return self.err();
                    }
                    self.pos += 2;
                    let lo = self.hex4()?;
                    if !(0xDC00..0xE000).contains(&lo) {
                        return self.err();
                    }
                    0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                } else if (0xDC00..0xE000).contains(&hi) {
                    return self.err();
                } else {
                    hi
                };
                let Some(c) = char::from_u32(code) else {
                    return self.err();
                };
                if decode {
                    self.tape.escaped.push(c);
                }
                return Ok(());
            }
            _ => return self.err(),
        };
        self.pos += 1;
        if decode {
            self.tape.escaped.push(c);
        }
        Ok(())
    }

    fn hex4(&mut self) -> Result<u32, TapeError> {
        let mut v = 0u32;
        for _ in 0..4 {
            let d = match self.peek() {
                Some(b @ b'0'..=b'9') => b - b'0',
                Some(b @ b'a'..=b'f') => b - b'a' + 10,
                Some(b @ b'A'..=b'F') => b - b'A' + 10,
                _ => return self.err(),
            };
            v = v * 16 + u32::from(d);
            self.pos += 1;
        }
        Ok(v)
    }

    #[inline]
    fn digits(&mut self) -> usize {
        let start = self.pos;
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self) -> Result<(u32, u32), TapeError> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => {
                self.pos += 1;
                if let Some(b'0'..=b'9') = self.peek() {
                    return self.err();
                }
            }
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return self.err(),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if self.digits() == 0 {
                return self.err();
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return self.err();
            }
        }
        Ok((start as u32, (self.pos - start) as u32))
    }

    #[inline]
    fn literal(&mut self, word: &[u8]) -> Result<(), TapeError> {
        if self.b[self.pos..].starts_with(word) {
            self.pos += word.len();
            Ok(())
        } else {
            self.err()
        }
    }

    #[inline]
    fn push(&mut self, kind: TapeKind, key: Key, start: u32, len: u32) -> u32 {
        let i = self.tape.nodes.len() as u32;
        self.tape.nodes.push(TapeNode {
            kind,
            key_escaped: key.escaped,
            key_start: key.start,
            key_len: key.len,
            sym: key.sym,
            start,
            len,
            end: i + 1,
        });
        i
    }

    fn enter(&mut self) -> Result<(), TapeError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return self.err();
        }
        self.pos += 1;
        Ok(())
    }

    /// A value that is recorded (with the member key span given).
    fn value(&mut self, trie: u32, key: Key) -> Result<(), TapeError> {
        match self.peek() {
            Some(b'{') => {
                let i = self.push(TapeKind::Object, key, 0, 0);
                self.object(trie)?;
                self.close(i);
            }
            Some(b'[') => {
                let i = self.push(TapeKind::Array, key, 0, 0);
                self.array(trie)?;
                self.close(i);
            }
            Some(b'"') => {
                let (s, l, esc) = self.string(true)?;
                let kind = if esc {
                    TapeKind::EscapedStr
                } else {
                    TapeKind::Str
                };
                self.push(kind, key, s, l);
            }
            Some(b't') => {
                self.literal(b"true")?;
                self.push(TapeKind::True, key, 0, 0);
            }
            Some(b'f') => {
                self.literal(b"false")?;
                self.push(TapeKind::False, key, 0, 0);
            }
            Some(b'n') => {
                self.literal(b"null")?;
                self.push(TapeKind::Null, key, 0, 0);
            }
            Some(b'-' | b'0'..=b'9') => {
                let (s, l) = self.number()?;
                self.push(TapeKind::Number, key, s, l);
            }
            _ => return self.err(),
        }
        Ok(())
    }

    #[inline]
    fn close(&mut self, i: u32) {
        let end = self.tape.nodes.len() as u32;
        if let Some(n) = self.tape.nodes.get_mut(i as usize) {
            n.end = end;
        }
    }

    fn array(&mut self, trie: u32) -> Result<(), TapeError> {
        self.enter()?;
        self.ws();
        if self.peek() == Some(b']') {
            self.pos += 1;
            self.depth -= 1;
            return Ok(());
        }
        loop {
            self.ws();
            self.value(trie, Key::NONE)?;
            self.ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    self.depth -= 1;
                    return Ok(());
                }
                _ => return self.err(),
            }
        }
    }

    fn object(&mut self, trie: u32) -> Result<(), TapeError> {
        self.enter()?;
        self.ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            self.depth -= 1;
            return Ok(());
        }
        loop {
            self.ws();
            if self.peek() != Some(b'"') {
                return self.err();
            }
            let (ks, kl, kesc) = self.string(true)?;
            self.ws();
            if self.peek() != Some(b':') {
                return self.err();
            }
            self.pos += 1;
            self.ws();
            let child = if kesc {
                let (s, e) = (ks as usize, ks as usize + kl as usize);
                let key = self.tape.escaped.as_bytes().get(s..e).unwrap_or(&[]);
                self.trie.child(trie, key)
            } else {
                let (s, e) = (ks as usize, ks as usize + kl as usize);
                self.trie.child(trie, &self.b[s..e])
            };
            match child {
                Some((c, sym)) => self.value(
                    c,
                    Key {
                        start: ks,
                        len: kl,
                        escaped: kesc,
                        sym,
                    },
                )?,
                None => self.skip()?,
            }
            self.ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    self.depth -= 1;
                    return Ok(());
                }
                _ => return self.err(),
            }
        }
    }

    /// Validate a value without recording it.
    fn skip(&mut self) -> Result<(), TapeError> {
        match self.peek() {
            Some(b'{') => {
                self.enter()?;
                self.ws();
                if self.peek() == Some(b'}') {
                    self.pos += 1;
                    self.depth -= 1;
                    return Ok(());
                }
                loop {
                    self.ws();
                    if self.peek() != Some(b'"') {
                        return self.err();
                    }
                    self.string(false)?;
                    self.ws();
                    if self.peek() != Some(b':') {
                        return self.err();
                    }
                    self.pos += 1;
                    self.ws();
                    self.skip()?;
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.pos += 1,
                        Some(b'}') => {
                            self.pos += 1;
                            self.depth -= 1;
                            return Ok(());
                        }
                        _ => return self.err(),
                    }
                }
            }
            Some(b'[') => {
                self.enter()?;
                self.ws();
                if self.peek() == Some(b']') {
                    self.pos += 1;
                    self.depth -= 1;
                    return Ok(());
                }
                loop {
                    self.ws();
                    self.skip()?;
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.pos += 1,
                        Some(b']') => {
                            self.pos += 1;
                            self.depth -= 1;
                            return Ok(());
                        }
                        _ => return self.err(),
                    }
                }
            }
            Some(b'"') => self.string(false).map(|_| ()),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'-' | b'0'..=b'9') => self.number().map(|_| ()),
            _ => self.err(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(text: &str) -> Result<Tape, TapeError> {
        let mut t = Tape::new();
        t.parse(text, &KeyTrie::new(), KeyTrie::ALL)?;
        Ok(t)
    }

    #[test]
    fn accepts_exactly_what_the_tree_parser_accepts() {
        let cases = [
            r#"{"a":1}"#,
            r#"{"a":[1,2,{"b":null}],"c":"x\"y","d":true,"e":false}"#,
            r#" { "a" : -0.5e+3 } "#,
            r#"{"a":01}"#,
            r#"{"a":1.}"#,
            r#"{"a":1e}"#,
            r#"{"a":"\ud800"}"#,
            r#"{"a":"\udc00"}"#,
            r#"{"a":"\ud83d\ude00"}"#,
            r#"{"a":"\x"}"#,
            "{\"a\":\"\u{1}\"}",
            r#"{"a":[1,]}"#,
            r#"{"a":1,}"#,
            r#"{"a":1} x"#,
            r#"{"a" 1}"#,
            r#"{"a":tru}"#,
            r#"{"a":nul}"#,
            r#"[]"#,
            r#""#,
            r#"{"a":"unterminated"#,
            r#"{"a":"\u12"}"#,
            r#"{"a":"ok\/\b\f\n\r\t\\"}"#,
            r#"{"verylongkey_abcdefghijklmnop":"0123456789abcdefghijklmnopqrstuvwxyz\u00e9"}"#,
        ];
        for c in cases {
            let tree = super::super::parse(c).is_ok();
            let tape = all(c).is_ok();
            let mut t = Tape::new();
            let pruned = t.parse(c, &KeyTrie::new(), KeyTrie::ROOT).is_ok();
            assert_eq!(tree, tape, "{c}");
            assert_eq!(tree, pruned, "pruned {c}");
        }
        let deep = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert!(all(&deep).is_err());
        let mut t = Tape::new();
        assert!(t.parse(&deep, &KeyTrie::new(), KeyTrie::ROOT).is_err());
        let ok = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        assert!(all(&ok).is_ok());
    }

    #[test]
    fn records_only_selected_members() {
        let text = r#"{"resourceType":"Observation","meta":{"x":[1,2]},"code":{"coding":[{"system":"s","code":"c"}],"text":"t\u00e9"},"k\u0065y":1}"#;
        let mut trie = KeyTrie::new();
        let code = trie.add(KeyTrie::ROOT, "code");
        let coding = trie.add(code, "coding");
        trie.add(coding, "code");
        trie.add(code, "text");
        trie.add(KeyTrie::ROOT, "key");
        let mut t = Tape::new();
        t.parse(text, &trie, KeyTrie::ROOT).expect("valid");
        let keys: Vec<_> = t
            .children(0)
            .map(|i| t.key(text, i).unwrap_or("").to_string())
            .collect();
        assert_eq!(keys, ["code", "key"]);
        let code_i = t.children(0).next().unwrap_or(0);
        let inner: Vec<_> = t.children(code_i).collect();
        assert_eq!(inner.len(), 2);
        assert_eq!(t.str(text, inner[1]), Some("té"));
        let coding_item = t.children(inner[0]).next().unwrap_or(0);
        let item: Vec<_> = t.children(coding_item).collect();
        assert_eq!(item.len(), 1);
        assert_eq!(t.key(text, item[0]), Some("code"));
        assert_eq!(t.str(text, item[0]), Some("c"));
    }

    /// Tape and tree parser accept exactly the same texts, whatever is
    /// recorded: random edits of a FHIR resource with JSON's special bytes.
    mod prop {
        use super::*;
        use proptest::prelude::*;

        const BASE: &str = r#"{"resourceType":"Observation","id":"o1","code":{"coding":[{"system":"http:\/\/loinc.org","code":"8302-2","display":"Body \"Height\""}],"text":"h\u00e9"},"valueQuantity":{"value":176.35e-1,"unit":"cm"},"n":[true,false,null,-0,12]}"#;
        const BYTES: &[u8] = br#"{}[],:"\ 0123456789eE.+-tfnul/bx"#;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]
            #[test]
            fn same_accepted_set(edits in proptest::collection::vec((0usize..400, 0usize..BYTES.len(), 0u8..3), 1..4)) {
                let mut b = BASE.as_bytes().to_vec();
                for (at, byte, kind) in edits {
                    let at = at % (b.len() + 1);
                    match kind {
                        0 => b.insert(at, BYTES[byte]),
                        1 if at < b.len() => { b.remove(at); }
                        _ if at < b.len() => b[at] = BYTES[byte],
                        _ => {}
                    }
                }
                let text = String::from_utf8_lossy(&b).into_owned();
                let tree = crate::json::parse(&text).is_ok();
                let mut trie = KeyTrie::new();
                let code = trie.add(KeyTrie::ROOT, "code");
                trie.add(code, "text");
                for root in [KeyTrie::ALL, KeyTrie::ROOT] {
                    let mut t = Tape::new();
                    prop_assert_eq!(tree, t.parse(&text, &trie, root).is_ok(), "{}", text);
                }
            }
        }
    }
}
