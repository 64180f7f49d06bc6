//! PostgreSQL SQL text handling: one small, allocation-light, panic-free lexer
//! and the three consumers built on it.
//!
//! This module owns:
//!
//! * [`tokenize`] — a lossless tokenizer for PostgreSQL SQL text (the
//!   concatenation of all token texts is exactly the input). It knows
//!   PostgreSQL's lexical rules for nested `/* */` comments, `--` comments,
//!   `'...'`, `E'...'`, `U&'...'`, `B'...'`, `X'...'`, `N'...'` strings,
//!   dollar quotes (`$$...$$`, `$tag$...$tag$`), quoted identifiers,
//!   positional parameters (`$1`), numeric literals (including `0x1F`, `1_000`,
//!   `.5`, `1e10`), operators (which never swallow `--` / `/*`) and `::`.
//!   `standard_conforming_strings = on` is assumed.
//! * [`mask_literals`] — masking of query text that leaves the process
//!   (Prometheus `query` label, OpenTelemetry `db.query.text`): literals become
//!   `?`, literal-only lists collapse to `(...)` / `[...]`, comments are
//!   removed, whitespace is collapsed and the result is truncated on a `char`
//!   boundary.
//! * [`sql_comments`] — the contents of real comments (not ones that only look
//!   like comments inside strings), e.g. to find a sqlcommenter `traceparent`.
//! * [`first_keyword_and_table`] — operation and single target table for span
//!   naming per the OpenTelemetry database conventions.
//!
//! Nothing here panics on any input: all indexing is bounds-checked or guarded,
//! unterminated strings/comments simply run to the end of the input, and the
//! list-collapsing parser has a bounded recursion depth.

/// Kind of a lexical token produced by [`tokenize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// A run of ASCII whitespace (space, tab, newline, carriage return,
    /// vertical tab, form feed).
    Whitespace,
    /// `-- ...` up to (not including) the end of line.
    LineComment,
    /// `/* ... */`, nesting like PostgreSQL does.
    BlockComment,
    /// Unquoted identifier or keyword (may contain digits and `$` after the
    /// first character; any non-ASCII character counts as a letter).
    Ident,
    /// `"..."` or `U&"..."` quoted identifier.
    QuotedIdent,
    /// Any string constant: `'...'`, `E'...'`, `U&'...'`, `B'...'`, `X'...'`,
    /// `N'...'` or a dollar-quoted string.
    String,
    /// Numeric constant.
    Number,
    /// Positional parameter `$n`.
    Param,
    /// `(`, `)`, `[`, `]`, `,`, `;`, `.`, `..`, `:` or `::`.
    Punct,
    /// A run of operator characters (`+-*/<>=~!@#%^&|`?`).
    Operator,
    /// Any other single (ASCII) character, e.g. `\`, `{`, a lone `$`.
    Other,
}

/// One token: its kind and the exact input text it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token<'a> {
    /// What kind of token this is.
    pub kind: TokenKind,
    /// The exact slice of the input, including quotes / comment markers.
    pub text: &'a str,
    /// `false` for a string, quoted identifier or block comment that runs to
    /// the end of the input without its closing delimiter; `true` otherwise.
    pub terminated: bool,
}

impl Token<'_> {
    /// Whitespace or a comment.
    pub fn is_trivia(&self) -> bool {
        matches!(
            self.kind,
            TokenKind::Whitespace | TokenKind::LineComment | TokenKind::BlockComment
        )
    }

    /// An unquoted identifier equal to `kw`, ignoring ASCII case.
    pub fn is_keyword(&self, kw: &str) -> bool {
        self.kind == TokenKind::Ident && self.text.eq_ignore_ascii_case(kw)
    }

    fn is_punct(&self, p: &str) -> bool {
        matches!(self.kind, TokenKind::Punct | TokenKind::Operator) && self.text == p
    }

    fn is_any_keyword(&self, kws: &[&str]) -> bool {
        kws.iter().any(|kw| self.is_keyword(kw))
    }
}

/// Iterator over the tokens of a SQL text; see [`tokenize`].
#[derive(Debug, Clone)]
pub struct Tokens<'a> {
    src: &'a str,
    pos: usize,
}

/// Tokenize PostgreSQL SQL text. Lossless: concatenating the `text` of every
/// token yields `sql` exactly. Never panics; every token is non-empty.
pub fn tokenize(sql: &str) -> Tokens<'_> {
    Tokens { src: sql, pos: 0 }
}

/// Byte at `i`, or 0 past the end (0 never matches any byte we look for).
fn at(b: &[u8], i: usize) -> u8 {
    b.get(i).copied().unwrap_or(0)
}

fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_ident_cont(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit() || c == b'$'
}

/// Characters allowed in a dollar-quote tag after the first one (no `$`).
fn is_dolq_cont(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit()
}

fn is_op_char(c: u8) -> bool {
    b"+-*/<>=~!@#%^&|`?".contains(&c)
}

fn skip_while(b: &[u8], mut i: usize, f: impl Fn(u8) -> bool) -> usize {
    while i < b.len() && f(b[i]) {
        i += 1;
    }
    i
}

/// `/* ... */` starting at `start`, nesting. Returns (end, terminated).
fn scan_block_comment(b: &[u8], start: usize) -> (usize, bool) {
    let mut depth = 0usize;
    let mut i = start;
    while i < b.len() {
        if b[i] == b'/' && at(b, i + 1) == b'*' {
            depth += 1;
            i += 2;
        } else if b[i] == b'*' && at(b, i + 1) == b'/' {
            depth = depth.saturating_sub(1);
            i += 2;
            if depth == 0 {
                return (i, true);
            }
        } else {
            i += 1;
        }
    }
    (b.len(), false)
}

/// Quoted text starting at the opening `quote` at `q`, where a doubled quote
/// is an escaped quote. Returns (end, terminated).
fn scan_quoted(b: &[u8], q: usize, quote: u8) -> (usize, bool) {
    let mut i = q + 1;
    while i < b.len() {
        if b[i] == quote {
            if at(b, i + 1) == quote {
                i += 2;
                continue;
            }
            return (i + 1, true);
        }
        i += 1;
    }
    (b.len(), false)
}

/// `E'...'` body starting at the opening quote at `q`: backslash escapes the
/// next byte, `''` is an escaped quote. Returns (end, terminated).
fn scan_escape_string(b: &[u8], q: usize) -> (usize, bool) {
    let mut i = q + 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'\'' if at(b, i + 1) == b'\'' => i += 2,
            b'\'' => return (i + 1, true),
            _ => i += 1,
        }
    }
    (b.len(), false)
}

/// Token starting with `$`: parameter, dollar-quoted string or a lone `$`.
fn scan_dollar(src: &str, start: usize) -> (TokenKind, usize, bool) {
    let b = src.as_bytes();
    let c1 = at(b, start + 1);
    if c1.is_ascii_digit() {
        return (
            TokenKind::Param,
            skip_while(b, start + 1, |c| c.is_ascii_digit()),
            true,
        );
    }
    let tag_end = if c1 == b'$' {
        start + 1
    } else if is_ident_start(c1) {
        let j = skip_while(b, start + 1, is_dolq_cont);
        if at(b, j) != b'$' {
            return (TokenKind::Other, start + 1, true);
        }
        j
    } else {
        return (TokenKind::Other, start + 1, true);
    };
    let Some(delim) = src.get(start..tag_end + 1) else {
        return (TokenKind::Other, start + 1, true);
    };
    let body = tag_end + 1;
    match src.get(body..).and_then(|rest| rest.find(delim)) {
        Some(p) => (TokenKind::String, body + p + delim.len(), true),
        None => (TokenKind::String, b.len(), false),
    }
}

/// Decimal digits with single `_` separators between digits.
fn scan_decimal(b: &[u8], mut i: usize) -> usize {
    while at(b, i).is_ascii_digit() {
        i += 1;
        if at(b, i) == b'_' && at(b, i + 1).is_ascii_digit() {
            i += 1;
        }
    }
    i
}

/// Numeric constant starting at `start` (a digit, or `.` followed by a digit).
fn scan_number(b: &[u8], start: usize) -> usize {
    if at(b, start) == b'0' {
        let radix_digit: Option<fn(u8) -> bool> = match at(b, start + 1) {
            b'x' | b'X' => Some(|c: u8| c.is_ascii_hexdigit()),
            b'o' | b'O' => Some(|c: u8| (b'0'..=b'7').contains(&c)),
            b'b' | b'B' => Some(|c: u8| c == b'0' || c == b'1'),
            _ => None,
        };
        if let Some(digit) = radix_digit {
            let c2 = at(b, start + 2);
            if digit(c2) || (c2 == b'_' && digit(at(b, start + 3))) {
                return skip_while(b, start + 2, |c| digit(c) || c == b'_');
            }
        }
    }
    let mut i = scan_decimal(b, start);
    // `1..10` (PL/pgSQL ranges) is an integer followed by `..`.
    if at(b, i) == b'.' && at(b, i + 1) != b'.' {
        i = scan_decimal(b, i + 1);
    }
    if matches!(at(b, i), b'e' | b'E') {
        let mut j = i + 1;
        if matches!(at(b, j), b'+' | b'-') {
            j += 1;
        }
        if at(b, j).is_ascii_digit() {
            i = scan_decimal(b, j);
        }
    }
    i
}

/// Operator characters from `start`, stopping before `--` or `/*`.
fn scan_operator(b: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while i < b.len() && is_op_char(b[i]) {
        let n = at(b, i + 1);
        if (b[i] == b'-' && n == b'-') || (b[i] == b'/' && n == b'*') {
            break;
        }
        i += 1;
    }
    i
}

impl<'a> Iterator for Tokens<'a> {
    type Item = Token<'a>;

    fn next(&mut self) -> Option<Token<'a>> {
        use TokenKind::*;
        let src = self.src;
        let b = src.as_bytes();
        let start = self.pos;
        let c = *b.get(start)?;
        let c1 = at(b, start + 1);
        let (kind, end, terminated) = match c {
            _ if is_space(c) => (Whitespace, skip_while(b, start, is_space), true),
            b'-' if c1 == b'-' => (
                LineComment,
                skip_while(b, start + 2, |c| c != b'\n' && c != b'\r'),
                true,
            ),
            b'/' if c1 == b'*' => {
                let (end, t) = scan_block_comment(b, start);
                (BlockComment, end, t)
            }
            b'\'' => {
                let (end, t) = scan_quoted(b, start, b'\'');
                (String, end, t)
            }
            b'"' => {
                let (end, t) = scan_quoted(b, start, b'"');
                (QuotedIdent, end, t)
            }
            b'$' => scan_dollar(src, start),
            b'0'..=b'9' => (Number, scan_number(b, start), true),
            b'.' if c1.is_ascii_digit() => (Number, scan_number(b, start), true),
            b':' if c1 == b':' => (Punct, start + 2, true),
            b'.' if c1 == b'.' => (Punct, start + 2, true),
            b'(' | b')' | b'[' | b']' | b',' | b';' | b'.' | b':' => (Punct, start + 1, true),
            _ if is_op_char(c) => (Operator, scan_operator(b, start), true),
            _ if is_ident_start(c) => {
                let c2 = at(b, start + 2);
                match (c.to_ascii_lowercase(), c1) {
                    (b'e', b'\'') => {
                        let (end, t) = scan_escape_string(b, start + 1);
                        (String, end, t)
                    }
                    (b'b' | b'x' | b'n', b'\'') => {
                        let (end, t) = scan_quoted(b, start + 1, b'\'');
                        (String, end, t)
                    }
                    (b'u', b'&') if c2 == b'\'' => {
                        let (end, t) = scan_quoted(b, start + 2, b'\'');
                        (String, end, t)
                    }
                    (b'u', b'&') if c2 == b'"' => {
                        let (end, t) = scan_quoted(b, start + 2, b'"');
                        (QuotedIdent, end, t)
                    }
                    _ => (Ident, skip_while(b, start, is_ident_cont), true),
                }
            }
            _ => (Other, start + 1, true),
        };
        // Token ends are always just after an ASCII byte or at the end of the
        // input, hence on char boundaries; stay panic-free regardless.
        let (end, text) = match src.get(start..end) {
            Some(text) if end > start => (end, text),
            _ => (b.len(), src.get(start..).unwrap_or_default()),
        };
        self.pos = end;
        Some(Token {
            kind,
            text,
            terminated,
        })
    }
}

// ---------------------------------------------------------------------------
// mask_literals
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutKind {
    /// Unquoted identifier / keyword, emitted verbatim.
    Word,
    /// Quoted identifier, emitted verbatim.
    QuotedIdent,
    /// A masked literal, emitted as `?`.
    Lit,
    /// Positional parameter, emitted verbatim.
    Param,
    /// Punctuation, operators and anything else, emitted verbatim.
    Punct,
}

#[derive(Debug, Clone, Copy)]
struct Out<'a> {
    kind: OutKind,
    text: &'a str,
    /// Whitespace or a comment preceded this token.
    space_before: bool,
}

impl Out<'_> {
    fn is_punct(&self, p: &str) -> bool {
        self.kind == OutKind::Punct && self.text == p
    }

    fn is_word(&self, w: &str) -> bool {
        self.kind == OutKind::Word && self.text.eq_ignore_ascii_case(w)
    }
}

/// Maximum nesting of `(`/`[` considered when collapsing lists.
const MAX_LIST_NESTING: usize = 32;

fn out_is(toks: &[Out<'_>], i: usize, p: &str) -> bool {
    toks.get(i).is_some_and(|t| t.is_punct(p))
}

/// `toks[open]` is an opening bracket; parses `elem (, elem)* close` and
/// returns the index just past `close`, if every element is literal-only.
fn literal_list_end(toks: &[Out<'_>], open: usize, close: &str, depth: usize) -> Option<usize> {
    if depth > MAX_LIST_NESTING {
        return None;
    }
    let mut i = open + 1;
    loop {
        i = literal_elem_end(toks, i, depth + 1)?;
        let t = toks.get(i)?;
        if t.is_punct(",") {
            i += 1;
        } else if t.is_punct(close) {
            return Some(i + 1);
        } else {
            return None;
        }
    }
}

/// One literal-only list element starting at `i`:
/// `[+-]* (? | $n | NULL | DEFAULT | type ? | (list) | [list] | ARRAY[list]) (::type)*`.
fn literal_elem_end(toks: &[Out<'_>], mut i: usize, depth: usize) -> Option<usize> {
    while out_is(toks, i, "-") || out_is(toks, i, "+") {
        i += 1;
    }
    let t = toks.get(i)?;
    i = match t.kind {
        OutKind::Lit | OutKind::Param => i + 1,
        // An already-masked `?` (masking is idempotent).
        OutKind::Punct if t.text == "?" => i + 1,
        OutKind::Punct if t.text == "(" => literal_list_end(toks, i, ")", depth)?,
        OutKind::Punct if t.text == "[" => literal_list_end(toks, i, "]", depth)?,
        OutKind::Word if t.is_word("null") || t.is_word("default") => i + 1,
        OutKind::Word if t.is_word("array") && out_is(toks, i + 1, "[") => {
            literal_list_end(toks, i + 1, "]", depth)?
        }
        // Type-prefixed literal: `date ?`, `interval ?`.
        OutKind::Word if toks.get(i + 1).is_some_and(|n| n.kind == OutKind::Lit) => i + 2,
        _ => return None,
    };
    while out_is(toks, i, "::") {
        i = cast_type_end(toks, i + 1)?;
    }
    Some(i)
}

/// A type name after `::`: words (`double precision`), dotted names, an
/// optional `(?, ?)` modifier list and `[]` / `[?]` array suffixes.
fn cast_type_end(toks: &[Out<'_>], mut i: usize) -> Option<usize> {
    let is_name = |t: &Out<'_>| matches!(t.kind, OutKind::Word | OutKind::QuotedIdent);
    if !toks.get(i).is_some_and(is_name) {
        return None;
    }
    i += 1;
    loop {
        if toks.get(i).is_some_and(is_name) {
            i += 1;
        } else if out_is(toks, i, ".") && toks.get(i + 1).is_some_and(is_name) {
            i += 2;
        } else {
            break;
        }
    }
    if out_is(toks, i, "(") {
        i += 1;
        loop {
            if !toks.get(i).is_some_and(|t| t.kind == OutKind::Lit) {
                return None;
            }
            i += 1;
            if out_is(toks, i, ",") {
                i += 1;
            } else if out_is(toks, i, ")") {
                i += 1;
                break;
            } else {
                return None;
            }
        }
    }
    loop {
        if out_is(toks, i, "[") && out_is(toks, i + 1, "]") {
            i += 2;
        } else if out_is(toks, i, "[")
            && toks.get(i + 1).is_some_and(|t| t.kind == OutKind::Lit)
            && out_is(toks, i + 2, "]")
        {
            i += 3;
        } else {
            return Some(i);
        }
    }
}

/// Output buffer that counts chars and stops once past the limit.
struct Writer {
    out: String,
    chars: usize,
    max_len: usize,
}

impl Writer {
    /// Appends `text` (preceded by one space if `space` and not at the
    /// start). Returns `false` once the output exceeds `max_len`.
    fn push(&mut self, space: bool, text: &str) -> bool {
        if space && !self.out.is_empty() {
            self.out.push(' ');
            self.chars += 1;
        }
        self.out.push_str(text);
        self.chars += text.chars().count();
        self.max_len == 0 || self.chars <= self.max_len
    }

    fn finish(mut self) -> String {
        if self.max_len == 0 || self.chars <= self.max_len {
            return self.out;
        }
        const ELLIPSIS: &str = "...";
        if self.max_len <= ELLIPSIS.len() {
            return ELLIPSIS[..self.max_len].to_string();
        }
        let keep = self.max_len - ELLIPSIS.len();
        let cut = self
            .out
            .char_indices()
            .nth(keep)
            .map_or(self.out.len(), |(i, _)| i);
        self.out.truncate(cut);
        let trimmed = self.out.trim_end().len();
        self.out.truncate(trimmed);
        self.out.push_str(ELLIPSIS);
        self.out
    }
}

/// Mask query text for export.
///
/// * String constants of every flavour (`'...'`, `E'...'`, `U&'...'`,
///   `B'...'`, `X'...'`, `N'...'`, `$$...$$`, `$tag$...$tag$`), numeric
///   constants and the keywords `true` / `false` become `?`. Type words stay
///   (`interval '1 day'` → `interval ?`, `'a'::text` → `?::text`).
/// * Positional parameters (`$1`), identifiers (also `table1`, `a$b`) and
///   quoted identifiers are kept verbatim.
/// * Lists made only of literals/parameters collapse: `IN (...)`,
///   `ARRAY[...]`, and a leading run of tuples after `VALUES` → `VALUES (...)`.
/// * Comments are removed; whitespace runs (and removed comments) become a
///   single space; the result is trimmed.
/// * With `max_len > 0` the result has at most `max_len` chars; if it had to
///   be cut it ends with `...` (counted within `max_len`).
pub fn mask_literals(sql: &str, max_len: usize) -> String {
    let mut toks: Vec<Out<'_>> = Vec::new();
    let mut space = false;
    for t in tokenize(sql) {
        let kind = match t.kind {
            TokenKind::Whitespace | TokenKind::LineComment | TokenKind::BlockComment => {
                space = true;
                continue;
            }
            TokenKind::Ident if t.is_keyword("true") || t.is_keyword("false") => OutKind::Lit,
            TokenKind::Ident => OutKind::Word,
            TokenKind::QuotedIdent => OutKind::QuotedIdent,
            TokenKind::String | TokenKind::Number => OutKind::Lit,
            TokenKind::Param => OutKind::Param,
            TokenKind::Punct | TokenKind::Operator | TokenKind::Other => OutKind::Punct,
        };
        let text = if kind == OutKind::Lit { "?" } else { t.text };
        toks.push(Out {
            kind,
            text,
            space_before: space,
        });
        space = false;
    }

    let cap = if max_len == 0 {
        sql.len()
    } else {
        sql.len().min(max_len.saturating_mul(4))
    };
    let mut w = Writer {
        out: String::with_capacity(cap),
        chars: 0,
        max_len,
    };
    let mut i = 0;
    while let Some(t) = toks.get(i) {
        if t.kind == OutKind::Word {
            let collapsed = if t.is_word("in") && out_is(&toks, i + 1, "(") {
                literal_list_end(&toks, i + 1, ")", 0).map(|end| (end, "(...)"))
            } else if t.is_word("array") && out_is(&toks, i + 1, "[") {
                literal_list_end(&toks, i + 1, "]", 0).map(|end| (end, "[...]"))
            } else if t.is_word("values") && out_is(&toks, i + 1, "(") {
                literal_list_end(&toks, i + 1, ")", 0).map(|mut end| {
                    while out_is(&toks, end, ",") && out_is(&toks, end + 1, "(") {
                        match literal_list_end(&toks, end + 1, ")", 0) {
                            Some(next) => end = next,
                            None => break,
                        }
                    }
                    (end, "(...)")
                })
            } else {
                None
            };
            if let Some((end, list)) = collapsed {
                let open_space = toks.get(i + 1).is_some_and(|o| o.space_before);
                if !w.push(t.space_before, t.text) || !w.push(open_space, list) {
                    break;
                }
                i = end;
                continue;
            }
        }
        if !w.push(t.space_before, t.text) {
            break;
        }
        i += 1;
    }
    w.finish()
}

// ---------------------------------------------------------------------------
// sql_comments
// ---------------------------------------------------------------------------

/// Inner text of every comment in `sql` (without `--`, `/*`, `*/`), in order.
///
/// Comment-like text inside string constants, dollar quotes and quoted
/// identifiers is not a comment and is not returned. A nested block comment
/// is returned once, as the whole inner text of the outermost comment. An
/// unterminated block comment yields everything up to the end of the input.
pub fn sql_comments(sql: &str) -> Vec<&str> {
    tokenize(sql)
        .filter_map(|t| match t.kind {
            TokenKind::LineComment => t.text.get(2..),
            TokenKind::BlockComment if t.terminated => {
                t.text.get(2..t.text.len().saturating_sub(2))
            }
            TokenKind::BlockComment => t.text.get(2..),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------
// first_keyword_and_table
// ---------------------------------------------------------------------------

/// Tokens without whitespace and comments.
#[derive(Debug, Clone)]
struct Significant<'a>(Tokens<'a>);

impl<'a> Iterator for Significant<'a> {
    type Item = Token<'a>;

    fn next(&mut self) -> Option<Token<'a>> {
        self.0.by_ref().find(|t| !t.is_trivia())
    }
}

/// Statement keywords that may follow the CTE list of a `WITH`.
const WITH_MAIN_KEYWORDS: &[&str] = &[
    "SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "VALUES", "TABLE",
];

/// Words that cannot be (the start of) an unquoted table name here.
const NOT_A_NAME: &[&str] = &[
    "SELECT", "FROM", "WHERE", "LATERAL", "VALUES", "ONLY", "SET", "WITH", "JOIN", "ON", "AS",
    "TABLE", "INTO", "BINARY", "ROWS",
];

const JOIN_WORDS: &[&str] = &[
    "JOIN", "INNER", "LEFT", "RIGHT", "FULL", "CROSS", "NATURAL", "LATERAL",
];

/// Words that may directly follow a table in `FROM` and are not an alias.
const CLAUSE_WORDS: &[&str] = &[
    "WHERE",
    "GROUP",
    "HAVING",
    "WINDOW",
    "ORDER",
    "LIMIT",
    "OFFSET",
    "FETCH",
    "FOR",
    "UNION",
    "INTERSECT",
    "EXCEPT",
    "RETURNING",
    "INTO",
    "ON",
    "USING",
    "FROM",
    "TABLESAMPLE",
];

/// Operation name and target table for span naming.
///
/// The operation is the first keyword, uppercased (after leading whitespace,
/// comments and `(`). For `WITH ...` the main statement keyword after the CTE
/// list is returned when it is easy to find (`WITH x AS (...) SELECT` →
/// `SELECT`), otherwise `WITH`.
///
/// The table is returned only for simple statements: `SELECT ... FROM t` (the
/// first `FROM` outside parentheses, a single table without joins, commas,
/// function calls or set operations, and not a CTE name), `INSERT INTO t`,
/// `UPDATE [ONLY] t`, `DELETE FROM [ONLY] t` and `COPY t`. It is written as in
/// the query (schema-qualified parts joined with `.`, quoted identifiers
/// keep their quotes). `None` whenever unsure.
pub fn first_keyword_and_table(sql: &str) -> (Option<String>, Option<String>) {
    let mut it = Significant(tokenize(sql));
    let mut parens = 0usize;
    let first = loop {
        match it.next() {
            Some(t) if t.is_punct("(") => parens += 1,
            Some(t) => break t,
            None => return (None, None),
        }
    };
    if first.kind != TokenKind::Ident || !first.text.bytes().all(|c| c.is_ascii_alphabetic()) {
        return (None, None);
    }
    let mut op = first.text.to_ascii_uppercase();
    let mut ctes: Vec<&str> = Vec::new();
    if op == "WITH" {
        match main_statement_after_with(it.clone(), &mut ctes) {
            Some((kw, rest)) => {
                op = kw.to_ascii_uppercase();
                it = rest;
            }
            None => return (Some(op), None),
        }
    }
    if parens > 0 {
        return (Some(op), None);
    }
    let table = match op.as_str() {
        "SELECT" => select_table(it),
        "INSERT" => match it.next() {
            Some(t) if t.is_keyword("into") => parse_name(&mut it),
            _ => None,
        },
        "UPDATE" => {
            skip_keyword(&mut it, "only");
            parse_name(&mut it)
        }
        "DELETE" => match it.next() {
            Some(t) if t.is_keyword("from") => {
                skip_keyword(&mut it, "only");
                parse_name(&mut it)
            }
            _ => None,
        },
        "COPY" => parse_name(&mut it),
        _ => None,
    };
    let table = table.filter(|name| !ctes.iter().any(|cte| same_name(name, cte)));
    (Some(op), table)
}

/// Compares a table name with a CTE name loosely (ignoring quotes and ASCII
/// case), so that a possible CTE reference is never reported as a table.
fn same_name(a: &str, b: &str) -> bool {
    let strip = |s: &str| -> String { s.chars().filter(|&c| c != '"').collect() };
    strip(a).eq_ignore_ascii_case(&strip(b))
}

fn skip_keyword(it: &mut Significant<'_>, kw: &str) {
    let mut look = it.clone();
    if look.next().is_some_and(|t| t.is_keyword(kw)) {
        *it = look;
    }
}

/// Scans the CTE list after `WITH`, collecting CTE names, and returns the
/// main statement keyword (the first statement keyword right after a CTE
/// body's closing parenthesis) and the iterator positioned after it.
fn main_statement_after_with<'a>(
    mut it: Significant<'a>,
    ctes: &mut Vec<&'a str>,
) -> Option<(&'a str, Significant<'a>)> {
    let mut depth = 0usize;
    let mut after_close = false;
    let mut expect_name = true;
    while let Some(t) = it.next() {
        if t.is_punct("(") {
            depth += 1;
            after_close = false;
            continue;
        }
        if t.is_punct(")") {
            depth = depth.checked_sub(1)?;
            after_close = depth == 0;
            continue;
        }
        if depth == 0 {
            if expect_name {
                if t.is_keyword("recursive") {
                    continue;
                }
                if !matches!(t.kind, TokenKind::Ident | TokenKind::QuotedIdent) {
                    return None;
                }
                ctes.push(t.text);
                expect_name = false;
            } else if t.is_punct(",") {
                expect_name = true;
            } else if after_close && t.is_any_keyword(WITH_MAIN_KEYWORDS) {
                return Some((t.text, it));
            }
        }
        after_close = false;
    }
    None
}

/// `name` or `schema.name` (up to three parts), quoted parts kept verbatim.
fn parse_name(it: &mut Significant<'_>) -> Option<String> {
    let mut name = String::new();
    for part in 0..3 {
        let t = it.next()?;
        let ok = match t.kind {
            TokenKind::Ident => !t.is_any_keyword(NOT_A_NAME),
            TokenKind::QuotedIdent => t.terminated && !t.text.starts_with(['U', 'u']),
            _ => false,
        };
        if !ok {
            return None;
        }
        name.push_str(t.text);
        let mut look = it.clone();
        if part < 2 && look.next().is_some_and(|t| t.is_punct(".")) {
            *it = look;
            name.push('.');
        } else {
            break;
        }
    }
    Some(name)
}

/// Table of a `SELECT` (iterator positioned after the `SELECT` keyword).
fn select_table(mut it: Significant<'_>) -> Option<String> {
    let mut depth = 0usize;
    let mut table = None;
    let mut seen_from = false;
    let mut prev_distinct = false;
    while let Some(t) = it.next() {
        if t.is_punct("(") {
            depth += 1;
        } else if t.is_punct(")") {
            if depth == 0 {
                break;
            }
            depth -= 1;
        } else if depth == 0 {
            if t.is_punct(";") {
                break;
            }
            if t.is_any_keyword(&["UNION", "INTERSECT", "EXCEPT"]) {
                return None;
            }
            // `a IS DISTINCT FROM b` is not a FROM clause.
            if !seen_from && !prev_distinct && t.is_keyword("from") {
                seen_from = true;
                table = Some(single_from_table(it.clone())?);
            }
        }
        prev_distinct = t.is_keyword("distinct");
    }
    table
}

/// The single table of a FROM clause (iterator positioned after `FROM`).
fn single_from_table(mut it: Significant<'_>) -> Option<String> {
    skip_keyword(&mut it, "only");
    let name = parse_name(&mut it)?;
    let breaks_single =
        |t: &Token<'_>| t.is_punct(",") || t.is_punct("(") || t.is_any_keyword(JOIN_WORDS);
    let mut next = it.next();
    if next.is_some_and(|t| t.is_punct("*")) {
        next = it.next();
    }
    let after_alias = match next {
        None => return Some(name),
        Some(t) if breaks_single(&t) => return None,
        Some(t) if t.is_keyword("as") => {
            let alias = it.next()?;
            if !matches!(alias.kind, TokenKind::Ident | TokenKind::QuotedIdent) {
                return None;
            }
            it.next()
        }
        Some(t) if t.kind == TokenKind::QuotedIdent => it.next(),
        Some(t) if t.kind == TokenKind::Ident && !t.is_any_keyword(CLAUSE_WORDS) => it.next(),
        Some(_) => return Some(name),
    };
    match after_alias {
        Some(t) if breaks_single(&t) => None,
        _ => Some(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(sql: &str) -> Vec<(TokenKind, &str)> {
        tokenize(sql).map(|t| (t.kind, t.text)).collect()
    }

    fn m(sql: &str) -> String {
        mask_literals(sql, 0)
    }

    fn kt(sql: &str) -> (Option<String>, Option<String>) {
        first_keyword_and_table(sql)
    }

    fn op_table(op: &str, table: Option<&str>) -> (Option<String>, Option<String>) {
        (Some(op.to_string()), table.map(str::to_string))
    }

    // ----- tokenizer -----

    #[test]
    fn tokenizer_basic_kinds() {
        use TokenKind::*;
        assert_eq!(
            kinds("SELECT a$b, $1::int FROM t1 -- c\n"),
            vec![
                (Ident, "SELECT"),
                (Whitespace, " "),
                (Ident, "a$b"),
                (Punct, ","),
                (Whitespace, " "),
                (Param, "$1"),
                (Punct, "::"),
                (Ident, "int"),
                (Whitespace, " "),
                (Ident, "FROM"),
                (Whitespace, " "),
                (Ident, "t1"),
                (Whitespace, " "),
                (LineComment, "-- c"),
                (Whitespace, "\n"),
            ]
        );
    }

    #[test]
    fn tokenizer_operators_do_not_swallow_comments() {
        use TokenKind::*;
        assert_eq!(
            kinds("a-b"),
            vec![(Ident, "a"), (Operator, "-"), (Ident, "b")]
        );
        assert_eq!(
            kinds("a*/b"),
            vec![(Ident, "a"), (Operator, "*/"), (Ident, "b")]
        );
        assert_eq!(
            kinds("a+-- x"),
            vec![(Ident, "a"), (Operator, "+"), (LineComment, "-- x")]
        );
        assert_eq!(
            kinds("a</*x*/b"),
            vec![
                (Ident, "a"),
                (Operator, "<"),
                (BlockComment, "/*x*/"),
                (Ident, "b")
            ]
        );
        assert_eq!(
            kinds("x->>'k'"),
            vec![(Ident, "x"), (Operator, "->>"), (String, "'k'")]
        );
    }

    #[test]
    fn tokenizer_strings_and_prefixes() {
        use TokenKind::*;
        assert_eq!(kinds("'it''s'"), vec![(String, "'it''s'")]);
        assert_eq!(kinds(r"'a\'"), vec![(String, r"'a\'")]); // standard strings
        assert_eq!(kinds(r"E'a\'b'"), vec![(String, r"E'a\'b'")]);
        assert_eq!(kinds(r"e'a\\'x"), vec![(String, r"e'a\\'"), (Ident, "x")]);
        assert_eq!(kinds("U&'d\\0061t'"), vec![(String, "U&'d\\0061t'")]);
        assert_eq!(
            kinds("u&\"d\\0061t\""),
            vec![(QuotedIdent, "u&\"d\\0061t\"")]
        );
        assert_eq!(kinds("B'0101'"), vec![(String, "B'0101'")]);
        assert_eq!(kinds("x'ff'"), vec![(String, "x'ff'")]);
        assert_eq!(kinds("N'abc'"), vec![(String, "N'abc'")]);
        assert_eq!(
            kinds("\"My \"\"T\"\"\""),
            vec![(QuotedIdent, "\"My \"\"T\"\"\"")]
        );
        assert_eq!(kinds("ex'1'"), vec![(Ident, "ex"), (String, "'1'")]);
    }

    #[test]
    fn tokenizer_dollar() {
        use TokenKind::*;
        assert_eq!(kinds("$$a'b$$"), vec![(String, "$$a'b$$")]);
        assert_eq!(
            kinds("$fn$ $$ inner $$ $fn$;"),
            vec![(String, "$fn$ $$ inner $$ $fn$"), (Punct, ";")]
        );
        assert_eq!(kinds("$12"), vec![(Param, "$12")]);
        // A tag cannot start with a digit: `$1$` is a parameter then `$`.
        assert_eq!(kinds("$1$"), vec![(Param, "$1"), (Other, "$")]);
        assert_eq!(kinds("$a"), vec![(Other, "$"), (Ident, "a")]);
        assert_eq!(kinds("$ä$x$ä$"), vec![(String, "$ä$x$ä$")]);
        let t: Vec<_> = tokenize("$q$ never closed").collect();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].kind, String);
        assert!(!t[0].terminated);
    }

    #[test]
    fn tokenizer_numbers() {
        use TokenKind::*;
        for n in [
            "42",
            "3.14",
            ".5",
            "1.",
            "1e10",
            "1E-3",
            "2.5e+7",
            "0x1F",
            "0o17",
            "0b101",
            "1_000",
            "1_000.000_1",
        ] {
            assert_eq!(kinds(n), vec![(Number, n)], "{n}");
        }
        assert_eq!(
            kinds("1..10"),
            vec![(Number, "1"), (Punct, ".."), (Number, "10")]
        );
        assert_eq!(kinds("1e"), vec![(Number, "1"), (Ident, "e")]);
        assert_eq!(kinds("c2"), vec![(Ident, "c2")]);
        assert_eq!(
            kinds("t.c2"),
            vec![(Ident, "t"), (Punct, "."), (Ident, "c2")]
        );
    }

    #[test]
    fn tokenizer_nested_and_unterminated_comments() {
        use TokenKind::*;
        assert_eq!(
            kinds("/* a /* b */ c */x"),
            vec![(BlockComment, "/* a /* b */ c */"), (Ident, "x")]
        );
        let t: Vec<_> = tokenize("/* a /* b */").collect();
        assert_eq!(t.len(), 1);
        assert!(!t[0].terminated);
        let t: Vec<_> = tokenize("/*/").collect();
        assert_eq!((t.len(), t[0].terminated), (1, false));
        assert_eq!(kinds("/**/"), vec![(BlockComment, "/**/")]);
    }

    #[test]
    fn tokenizer_is_lossless_on_samples() {
        for s in [
            "",
            "SELECT 'unterminated",
            "E'\\",
            "U&",
            "u&'",
            "\"open",
            "$",
            "$$",
            "$a$",
            "0x",
            "0x_",
            ".",
            "-",
            "/",
            "日本語 'テスト' \"名前\" $タグ$x$タグ$",
            "😀1😀",
        ] {
            let joined: String = tokenize(s).map(|t| t.text).collect();
            assert_eq!(joined, s);
            assert!(tokenize(s).all(|t| !t.text.is_empty()));
        }
    }

    // ----- mask_literals -----

    #[test]
    fn masks_strings() {
        assert_eq!(m("SELECT 'secret'"), "SELECT ?");
        assert_eq!(m("SELECT 'it''s'"), "SELECT ?");
        assert_eq!(m(r"SELECT E'it\'s', e'x'"), "SELECT ?, ?");
        assert_eq!(
            m("SELECT U&'d\\0061t', B'0101', X'ff', N'x'"),
            "SELECT ?, ?, ?, ?"
        );
        assert_eq!(m("SELECT $$sec'ret$$"), "SELECT ?");
        assert_eq!(m("SELECT $body$ a $$ b $body$ AS x"), "SELECT ? AS x");
        assert_eq!(m("SELECT interval '1 day'"), "SELECT interval ?");
        assert_eq!(m("SELECT 'abc'::text"), "SELECT ?::text");
        assert_eq!(m("WHERE d > date '2024-01-01'"), "WHERE d > date ?");
    }

    #[test]
    fn masks_numbers_not_identifiers_or_params() {
        assert_eq!(
            m("SELECT 42, 3.14, .5, 1e10, 0x1F, 1_000, -7"),
            "SELECT ?, ?, ?, ?, ?, ?, -?"
        );
        assert_eq!(
            m("SELECT c2 FROM table1 WHERE id = $1"),
            "SELECT c2 FROM table1 WHERE id = $1"
        );
        assert_eq!(m("SELECT a$b, x1y2 FROM t"), "SELECT a$b, x1y2 FROM t");
        assert_eq!(m("SELECT a+1, a-1, a/2, 2*3"), "SELECT a+?, a-?, a/?, ?*?");
        assert_eq!(m("LIMIT 10 OFFSET 20"), "LIMIT ? OFFSET ?");
        assert_eq!(m("SELECT $1::int"), "SELECT $1::int");
    }

    #[test]
    fn masks_booleans() {
        assert_eq!(
            m("UPDATE t SET a = TRUE, b = false WHERE c IS True"),
            "UPDATE t SET a = ?, b = ? WHERE c IS ?"
        );
        assert_eq!(m("SELECT \"true\", trueish"), "SELECT \"true\", trueish");
    }

    #[test]
    fn keeps_quoted_identifiers() {
        assert_eq!(
            m("SELECT \"My  Col\" FROM \"My \"\"Table\"\"\" WHERE \"x1\" = 5"),
            "SELECT \"My  Col\" FROM \"My \"\"Table\"\"\" WHERE \"x1\" = ?"
        );
    }

    #[test]
    fn collapses_in_lists() {
        assert_eq!(m("WHERE a IN (1, 2, 3)"), "WHERE a IN (...)");
        assert_eq!(m("WHERE a IN ($1, $2, $3)"), "WHERE a IN (...)");
        assert_eq!(m("WHERE a in('x','y')"), "WHERE a in(...)");
        assert_eq!(m("WHERE a NOT IN (1)"), "WHERE a NOT IN (...)");
        assert_eq!(
            m("WHERE a IN (-1, +2, 3::int, 'x'::text)"),
            "WHERE a IN (...)"
        );
        assert_eq!(
            m("WHERE (a, b) IN ((1, 2), (3, 4))"),
            "WHERE (a, b) IN (...)"
        );
        assert_eq!(m("WHERE a IN (1, NULL)"), "WHERE a IN (...)");
        // PostgreSQL 18 pg_stat_statements squashed lists.
        assert_eq!(m("WHERE a IN ($1 /*, ... */)"), "WHERE a IN (...)");
        // Not literal-only: kept, literals masked individually.
        assert_eq!(
            m("WHERE a IN (SELECT b FROM t WHERE c = 1)"),
            "WHERE a IN (SELECT b FROM t WHERE c = ?)"
        );
        assert_eq!(m("WHERE a IN (1, b)"), "WHERE a IN (?, b)");
        assert_eq!(m("WHERE a IN (f(1), 2)"), "WHERE a IN (f(?), ?)");
    }

    #[test]
    fn collapses_arrays() {
        assert_eq!(m("SELECT ARRAY[1,2,3]"), "SELECT ARRAY[...]");
        assert_eq!(m("SELECT array[[1,2],[3,4]]"), "SELECT array[...]");
        assert_eq!(
            m("WHERE id = ANY(ARRAY[$1, $2])"),
            "WHERE id = ANY(ARRAY[...])"
        );
        assert_eq!(
            m("SELECT ARRAY['a', 'b']::text[]"),
            "SELECT ARRAY[...]::text[]"
        );
        assert_eq!(m("SELECT ARRAY[a, 1]"), "SELECT ARRAY[a, ?]");
        assert_eq!(m("SELECT ARRAY[]::int[]"), "SELECT ARRAY[]::int[]");
    }

    #[test]
    fn collapses_values() {
        assert_eq!(
            m("INSERT INTO t (a, b) VALUES (1, 'x'), (2, 'y'), (3, NULL)"),
            "INSERT INTO t (a, b) VALUES (...)"
        );
        assert_eq!(
            m("INSERT INTO t VALUES ($1, $2) ON CONFLICT DO NOTHING"),
            "INSERT INTO t VALUES (...) ON CONFLICT DO NOTHING"
        );
        assert_eq!(
            m("INSERT INTO t VALUES (1, DEFAULT, true, '{}'::jsonb)"),
            "INSERT INTO t VALUES (...)"
        );
        // Only the leading run of literal-only tuples collapses.
        assert_eq!(
            m("INSERT INTO t VALUES (1, 2), (3, now())"),
            "INSERT INTO t VALUES (...), (?, now())"
        );
        assert_eq!(
            m("INSERT INTO t VALUES (now(), 1), (2, 3)"),
            "INSERT INTO t VALUES (now(), ?), (?, ?)"
        );
    }

    #[test]
    fn removes_comments_and_collapses_whitespace() {
        assert_eq!(
            m("  SELECT /* user=alice */ a,\n\t\tb -- password=x\nFROM t  "),
            "SELECT a, b FROM t"
        );
        assert_eq!(m("SELECT a/*x*/FROM t"), "SELECT a FROM t");
        assert_eq!(
            m("SELECT 1 /* a /* nested */ still */ FROM t"),
            "SELECT ? FROM t"
        );
        assert_eq!(m("/* only a comment */"), "");
        assert_eq!(m("SELECT 1 -- trailing"), "SELECT ?");
        assert_eq!(m("SELECT a-b, c/d FROM t"), "SELECT a-b, c/d FROM t");
    }

    #[test]
    fn unterminated_input() {
        assert_eq!(m("SELECT 'abc"), "SELECT ?");
        assert_eq!(m("SELECT E'abc\\"), "SELECT ?");
        assert_eq!(m("SELECT $$abc"), "SELECT ?");
        assert_eq!(m("SELECT $t$abc $t"), "SELECT ?");
        assert_eq!(m("SELECT 1 /* abc /* def */"), "SELECT ?");
        assert_eq!(m("SELECT \"abc"), "SELECT \"abc");
        assert_eq!(m("SELECT a IN (1, 2"), "SELECT a IN (?, ?");
    }

    #[test]
    fn truncation() {
        let q = "SELECT a, b, c FROM some_table WHERE x = 1";
        assert_eq!(
            mask_literals(q, 0),
            "SELECT a, b, c FROM some_table WHERE x = ?"
        );
        assert_eq!(
            mask_literals(q, 42),
            "SELECT a, b, c FROM some_table WHERE x = ?"
        );
        assert_eq!(
            mask_literals(q, 41),
            "SELECT a, b, c FROM some_table WHERE x..."
        );
        assert_eq!(
            mask_literals(q, 40),
            "SELECT a, b, c FROM some_table WHERE..."
        );
        assert_eq!(mask_literals(q, 11), "SELECT a...");
        assert_eq!(mask_literals(q, 10), "SELECT...");
        assert_eq!(mask_literals(q, 9), "SELECT...");
        assert_eq!(mask_literals(q, 3), "...");
        assert_eq!(mask_literals(q, 2), "..");
        assert_eq!(mask_literals(q, 1), ".");
    }

    #[test]
    fn truncation_respects_utf8_boundaries() {
        let q = "SELECT \"ÄÖÜ日本語😀\" FROM t";
        for max in 1..40 {
            let out = mask_literals(q, max);
            assert!(out.chars().count() <= max, "{max}: {out}");
        }
        assert_eq!(mask_literals(q, 12), "SELECT \"Ä...");
        assert_eq!(mask_literals(q, 16), "SELECT \"ÄÖÜ日本...");
        assert_eq!(mask_literals(q, 17), "SELECT \"ÄÖÜ日本語...");
        assert_eq!(mask_literals(q, 25), "SELECT \"ÄÖÜ日本語😀\" FROM t");
        assert_eq!(mask_literals("SELECT '日本'", 0), "SELECT ?");
    }

    #[test]
    fn masking_is_idempotent_on_samples() {
        for q in [
            "SELECT a IN (1,2) AND b = 'x'::text",
            "INSERT INTO t VALUES (1, 2), (3, 4)",
            "SELECT ARRAY[1,2], x=-1, y->>'k'",
            "SELECT \"a b\" FROM t WHERE c < 3 /* x */",
        ] {
            let once = m(q);
            assert_eq!(m(&once), once, "{q}");
        }
    }

    #[test]
    fn deep_nesting_does_not_overflow() {
        let q = format!("SELECT x IN {}1{}", "(".repeat(10_000), ")".repeat(10_000));
        let out = m(&q);
        assert!(out.starts_with("SELECT x IN ((("));
        let q = format!("SELECT ARRAY{}1{}", "[".repeat(10_000), "]".repeat(10_000));
        let _ = m(&q);
    }

    // ----- sql_comments -----

    #[test]
    fn comments_are_found() {
        assert_eq!(
            sql_comments(
                "SELECT 1 /*traceparent='00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'*/"
            ),
            vec!["traceparent='00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'"]
        );
        assert_eq!(
            sql_comments("-- one\nSELECT 1 -- two\r\n/* three */"),
            vec![" one", " two", " three "]
        );
        assert_eq!(sql_comments("/* a /* b */ c */"), vec![" a /* b */ c "]);
        assert_eq!(sql_comments("SELECT /* open"), vec![" open"]);
        assert_eq!(sql_comments("SELECT /*/"), vec!["/"]);
        assert_eq!(sql_comments("/**/--"), vec!["", ""]);
    }

    #[test]
    fn comment_lookalikes_in_strings_are_ignored() {
        assert!(sql_comments("SELECT '/*traceparent=x*/', '-- no'").is_empty());
        assert!(sql_comments("SELECT $$ /* no */ $$, $t$ -- no $t$").is_empty());
        assert!(sql_comments("SELECT \"/* no */\", E'\\' /* no */'").is_empty());
        assert_eq!(sql_comments("SELECT a-b, c/d, e*/f"), Vec::<&str>::new());
        assert_eq!(sql_comments("SELECT '/*x*/' /*y*/"), vec!["y"]);
    }

    // ----- first_keyword_and_table -----

    #[test]
    fn operation_names() {
        assert_eq!(kt("select 1"), op_table("SELECT", None));
        assert_eq!(
            kt("  /* c */ -- x\n ((SELECT 1))"),
            op_table("SELECT", None)
        );
        assert_eq!(kt("begin"), op_table("BEGIN", None));
        assert_eq!(kt("CREATE TABLE t (a int)"), op_table("CREATE", None));
        assert_eq!(kt("ALTER TABLE t ADD b int"), op_table("ALTER", None));
        assert_eq!(kt("CALL p($1)"), op_table("CALL", None));
        assert_eq!(kt("EXPLAIN SELECT * FROM t"), op_table("EXPLAIN", None));
        assert_eq!(kt(""), (None, None));
        assert_eq!(kt("/* only */"), (None, None));
        assert_eq!(kt("'x'"), (None, None));
        assert_eq!(kt("\"quoted\""), (None, None));
        assert_eq!(kt("ä"), (None, None));
    }

    #[test]
    fn select_tables() {
        assert_eq!(
            kt("SELECT a FROM users WHERE id = $1"),
            op_table("SELECT", Some("users"))
        );
        assert_eq!(
            kt("SELECT * FROM public.users u"),
            op_table("SELECT", Some("public.users"))
        );
        assert_eq!(
            kt("SELECT * FROM \"My Schema\" . \"My Table\" AS t WHERE 1=1"),
            op_table("SELECT", Some("\"My Schema\".\"My Table\""))
        );
        assert_eq!(kt("SELECT * FROM ONLY t"), op_table("SELECT", Some("t")));
        assert_eq!(kt("SELECT * FROM t;"), op_table("SELECT", Some("t")));
        assert_eq!(
            kt("SELECT (SELECT max(x) FROM u), extract(year FROM ts) FROM t ORDER BY 1"),
            op_table("SELECT", Some("t"))
        );
        assert_eq!(
            kt("SELECT a IS DISTINCT FROM b FROM t"),
            op_table("SELECT", Some("t"))
        );
        assert_eq!(
            kt("SELECT * FROM t WHERE x IN (SELECT y FROM u JOIN v ON true)"),
            op_table("SELECT", Some("t"))
        );
        // Unsure cases.
        assert_eq!(kt("SELECT * FROM a, b"), op_table("SELECT", None));
        assert_eq!(kt("SELECT * FROM a x, b y"), op_table("SELECT", None));
        assert_eq!(
            kt("SELECT * FROM a JOIN b ON a.id = b.id"),
            op_table("SELECT", None)
        );
        assert_eq!(
            kt("SELECT * FROM a AS x LEFT JOIN b USING (id)"),
            op_table("SELECT", None)
        );
        assert_eq!(kt("SELECT * FROM (SELECT 1) s"), op_table("SELECT", None));
        assert_eq!(
            kt("SELECT * FROM generate_series(1, 3)"),
            op_table("SELECT", None)
        );
        assert_eq!(kt("SELECT * FROM LATERAL f()"), op_table("SELECT", None));
        assert_eq!(
            kt("SELECT a FROM t UNION SELECT a FROM u"),
            op_table("SELECT", None)
        );
        assert_eq!(kt("SELECT now()"), op_table("SELECT", None));
        assert_eq!(kt("(SELECT a FROM t)"), op_table("SELECT", None));
    }

    #[test]
    fn dml_tables() {
        assert_eq!(
            kt("INSERT INTO app.events (a, b) VALUES ($1, $2)"),
            op_table("INSERT", Some("app.events"))
        );
        assert_eq!(
            kt("insert into \"Events\" select * from x"),
            op_table("INSERT", Some("\"Events\""))
        );
        assert_eq!(kt("UPDATE ONLY t SET a = 1"), op_table("UPDATE", Some("t")));
        assert_eq!(
            kt("UPDATE t AS x SET a = 1 FROM u"),
            op_table("UPDATE", Some("t"))
        );
        assert_eq!(
            kt("DELETE FROM s.t WHERE id = 1"),
            op_table("DELETE", Some("s.t"))
        );
        assert_eq!(kt("COPY t (a, b) FROM STDIN"), op_table("COPY", Some("t")));
        assert_eq!(kt("COPY (SELECT 1) TO STDOUT"), op_table("COPY", None));
        assert_eq!(kt("INSERT t VALUES (1)"), op_table("INSERT", None));
        assert_eq!(kt("DELETE t"), op_table("DELETE", None));
        assert_eq!(kt("UPDATE"), op_table("UPDATE", None));
    }

    #[test]
    fn with_statements() {
        assert_eq!(
            kt("WITH x AS (SELECT 1) SELECT * FROM x"),
            op_table("SELECT", None)
        );
        assert_eq!(
            kt("WITH x AS (SELECT 1) SELECT * FROM \"X\""),
            op_table("SELECT", None)
        );
        assert_eq!(
            kt("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM r), y AS MATERIALIZED (SELECT 2) SELECT * FROM items"),
            op_table("SELECT", Some("items"))
        );
        assert_eq!(
            kt("WITH d AS (DELETE FROM a RETURNING *) INSERT INTO b SELECT * FROM d"),
            op_table("INSERT", Some("b"))
        );
        assert_eq!(
            kt("WITH x AS (SELECT 1) UPDATE t SET a = 1"),
            op_table("UPDATE", Some("t"))
        );
        assert_eq!(kt("WITH x"), op_table("WITH", None));
        assert_eq!(
            kt("WITH r AS (SELECT 1) SEARCH DEPTH FIRST BY a SET o SELECT 1"),
            op_table("WITH", None)
        );
    }

    // ----- robustness -----

    fn check_invariants(s: &str) {
        let joined: String = tokenize(s).map(|t| t.text).collect();
        assert_eq!(joined, s);
        for max in [0usize, 1, 2, 3, 4, 5, 17, 64] {
            let out = mask_literals(s, max);
            if max > 0 {
                assert!(out.chars().count() <= max);
            }
            assert!(!out.starts_with(' '));
        }
        for c in sql_comments(s) {
            assert!(s.contains(c));
        }
        let _ = first_keyword_and_table(s);
    }

    #[test]
    fn regression_samples() {
        // PostgreSQL treats non-ASCII whitespace as identifier characters, and
        // an unterminated quoted identifier is kept verbatim (trailing space).
        check_invariants("\u{2000}");
        assert_eq!(m("\u{2007}x"), "\u{2007}x");
        check_invariants("\" ");
        assert_eq!(m("a \" "), "a \" ");
    }

    #[test]
    fn random_bytes_never_panic() {
        // Deterministic xorshift so this runs without extra dependencies.
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let alphabet: &[u8] =
            b"'\"$-/*\\\nEeUuBbXx&0123456789._aZ(),[]:;+ \t\xc3\xa4\xf0\x9f\x98\x80\xff";
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 40) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|k| {
                    let r = state.rotate_left(k as u32 * 5) ^ (k as u64).wrapping_mul(0x2545_F491);
                    alphabet[(r % alphabet.len() as u64) as usize]
                })
                .collect();
            check_invariants(&String::from_utf8_lossy(&bytes));
        }
    }

    mod prop {
        use super::super::*;
        use super::check_invariants;
        use proptest::prelude::*;

        /// SQL fragments; none of them contributes a digit to the masked
        /// output (identifiers are digit-free, no `$n` parameters).
        fn fragment() -> impl Strategy<Value = String> {
            prop_oneof![
                "[a-z_]{1,8}",
                "[0-9]{1,6}",
                "[0-9]{1,3}\\.[0-9]{1,3}",
                "\\.[0-9]{1,3}",
                "[0-9]{1,3}[eE][+-]?[0-9]{1,2}",
                "0[xX][0-9a-fA-F]{1,4}",
                "[1-9](_[0-9]{3}){1,2}",
                "'([^']|'')*'",
                "[eE]'([^'\\\\]|\\\\.|'')*'",
                "\\$\\$[^$]*\\$\\$",
                "\\$tg\\$[^$]*\\$tg\\$",
                "/\\*[^*/]*\\*/",
                "--[^\n\r]*\n",
                "\"[a-z ]{1,5}\"",
                prop::sample::select(vec![
                    "+", "-", "*", "/", "<", "=", "||", "::", "(", ")", ",", "[", "]", ";", "IN (",
                    "ARRAY[", "VALUES (", "true", "FALSE"
                ])
                .prop_map(str::to_string),
            ]
        }

        proptest! {
            #[test]
            fn arbitrary_text_never_panics(s in "\\PC*", max in 0usize..80) {
                check_invariants(&s);
                let out = mask_literals(&s, max);
                prop_assert!(max == 0 || out.chars().count() <= max);
            }

            #[test]
            fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
                check_invariants(&String::from_utf8_lossy(&bytes));
            }

            #[test]
            fn numeric_and_string_literals_leave_no_digits(
                frags in prop::collection::vec(fragment(), 0..24),
                max in 0usize..200,
            ) {
                let sql = frags.join(" ");
                let out = mask_literals(&sql, max);
                prop_assert!(!out.bytes().any(|c| c.is_ascii_digit()), "{sql:?} -> {out:?}");
                prop_assert!(max == 0 || out.chars().count() <= max);
                let full = mask_literals(&sql, 0);
                prop_assert_eq!(mask_literals(&full, 0), full.clone(), "not idempotent: {:?}", sql);
            }
        }
    }
}
