//! Loading YAML documents (the config file and collector packs) into typed values.
//!
//! Owns one thing: turning a YAML parse or type error into a [`YamlError`] that names the
//! file, line, column and field, as in `pgvigil.yaml:12:5: targets[0].dsn: invalid …`.
//! Semantic checks live in the `Deserialize` impls of the types themselves (parse, don't
//! validate), so their errors get the same location for free.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A problem in a YAML file, located as precisely as the parser allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YamlError {
    pub file: PathBuf,
    /// 1-based; 0 when unknown.
    pub line: usize,
    /// 1-based; 0 when unknown.
    pub column: usize,
    /// The field path (`targets[0].dsn`) followed by the message.
    pub message: String,
}

impl YamlError {
    /// An error found after parsing, located by [`locate`].
    pub fn at(file: &Path, (line, column): (usize, usize), message: impl Into<String>) -> Self {
        YamlError {
            file: file.to_path_buf(),
            line,
            column,
            message: message.into(),
        }
    }
}

impl fmt::Display for YamlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                self.line,
                self.column,
                self.message
            )
        }
    }
}

impl std::error::Error for YamlError {}

/// Parses `text` (read from `file`) into `T`.
pub fn parse<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, YamlError> {
    serde_yaml_ng::from_str(text).map_err(|e| {
        let (line, column) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        YamlError {
            file: file.to_path_buf(),
            line,
            column,
            message: strip_location(&e.to_string()),
        }
    })
}

/// serde_yaml_ng puts " at line N column M" into its messages (at the end, or before
/// ", while parsing …"); we print the location first, so it is taken out.
fn strip_location(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find(" at line ") {
        out.push_str(&rest[..i]);
        let after = &rest[i + " at line ".len()..];
        let digits = |s: &str| s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let n = digits(after);
        match after[n..].strip_prefix(" column ") {
            Some(col) if n > 0 && digits(col) > 0 => rest = &col[digits(col)..],
            _ => {
                out.push_str(" at line ");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Finds the line and column of `key: value` in `text` (the first match), for errors that are only detectable across documents, such as a metric name
/// defined in two packs. Falls back to (0, 0), which prints as "file: message".
pub fn locate(text: &str, key: &str, value: &str) -> (usize, usize) {
    locate_after(text, key, value, 0)
}

/// Like [`locate`], searching from line `after` (1-based) on.
pub fn locate_after(text: &str, key: &str, value: &str, after: usize) -> (usize, usize) {
    for (i, line) in text.lines().enumerate().skip(after.saturating_sub(1)) {
        let trimmed = line.trim_start().trim_start_matches("- ").trim_start();
        let Some(rest) = trimmed.strip_prefix(key) else {
            continue;
        };
        let Some(rest) = rest.trim_start().strip_prefix(':') else {
            continue;
        };
        let found = rest.trim().trim_matches(|c| c == '"' || c == '\'');
        if found == value {
            let column = line.len() - trimmed.len() + 1;
            return (i + 1, column);
        }
    }
    (0, 0)
}

/// The line and column of the first `key:` (any value) from line `after` (1-based) on.
pub fn locate_key_after(text: &str, key: &str, after: usize) -> (usize, usize) {
    for (i, line) in text.lines().enumerate().skip(after.saturating_sub(1)) {
        let trimmed = line.trim_start().trim_start_matches("- ").trim_start();
        if trimmed
            .strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with(':'))
        {
            return (i + 1, line.len() - trimmed.len() + 1);
        }
    }
    (0, 0)
}

/// The line and column of the first `word` (a whole word) after the first line containing
/// `anchor`, e.g. a name inside `disable: [a, b]`.
pub fn locate_word(text: &str, anchor: &str, word: &str) -> (usize, usize) {
    let Some(start) = text.lines().position(|l| l.contains(anchor)) else {
        return (0, 0);
    };
    for (i, line) in text.lines().enumerate().skip(start) {
        let mut from = 0;
        while let Some(at) = line[from..].find(word) {
            let s = from + at;
            let e = s + word.len();
            let is_word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
            if !is_word(line[..s].chars().last()) && !is_word(line[e..].chars().next()) {
                return (i + 1, s + 1);
            }
            from = e;
        }
    }
    (0, 0)
}

/// Deserializes any `FromStr` type from a YAML scalar. The error is raised inside the
/// deserializer's visitor, so serde_yaml_ng locates it at the scalar itself (an error
/// raised after `String::deserialize` would point at the enclosing mapping).
pub fn from_str_de<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr<Err = String>,
{
    struct V<T>(std::marker::PhantomData<T>);
    impl<T: std::str::FromStr<Err = String>> serde::de::Visitor<'_> for V<T> {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
            v.parse().map_err(E::custom)
        }
    }
    d.deserialize_str(V(std::marker::PhantomData))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_trailing_location() {
        assert_eq!(
            strip_location("targets[0].dsn: bad at line 3 column 5"),
            "targets[0].dsn: bad"
        );
        assert_eq!(strip_location("no location"), "no location");
        assert_eq!(
            strip_location("did not find expected '-' indicator at line 5 column 3, while parsing a block collection"),
            "did not find expected '-' indicator, while parsing a block collection"
        );
        assert_eq!(strip_location("at line x"), "at line x");
    }

    #[test]
    fn locate_finds_list_items_and_quoted_values() {
        let text = "collectors:\n  - name: a\n    metrics:\n      - name: \"pg_x\"\n";
        assert_eq!(locate(text, "name", "pg_x"), (4, 9));
        assert_eq!(locate(text, "name", "a"), (2, 5));
        assert_eq!(locate(text, "name", "zzz"), (0, 0));
    }
}
