//! Fuzzing with a fixed budget, run by the test command: every parser that reads outside
//! input — the config file (and the DSNs in it), collector packs, the SQL masker, trace
//! context in SQL, `web.yml`, DSNs and libpq password files — on arbitrary text and on
//! mutations of a seed corpus (`tests/fuzz/corpus/<parser>/`, replayed as is by
//! `corpus_replays`). No input may panic; config and pack errors must name the file.
//!
//! Budget: `PGVIGIL_FUZZ_CASES` cases per property (default 1,000). A failure is shrunk
//! and its seed saved in `proptest-regressions/fuzz.txt`, which proptest replays first on
//! every later run: commit it with the fix.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, FileFailurePersistence};

use pgvigil::collector::pack::Catalog;
use pgvigil::config::Config;
use pgvigil::postgres::{dsn, password};
use pgvigil::trace::context;

fn cases() -> u32 {
    std::env::var("PGVIGIL_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

fn budget() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/fuzz.txt",
        ))),
        ..ProptestConfig::default()
    }
}

/// The seed files of `parser`, as text.
fn corpus(parser: &str) -> Vec<(PathBuf, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/corpus")
        .join(parser);
    let mut files: Vec<(PathBuf, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty corpus {}", dir.display());
    files
}

/// Tokens worth inserting: the structure of YAML, SQL, DSNs and trace context.
const TOKENS: &[&str] = &[
    ":",
    "\n",
    "\n  ",
    "- ",
    "{",
    "}",
    "[",
    "]",
    "'",
    "\"",
    "&a ",
    "*a",
    "<<: ",
    "!!str ",
    "~",
    "#",
    "|\n",
    ">-\n",
    "\\",
    "$$",
    "$t$",
    "/*",
    "*/",
    "--",
    "E'",
    "U&'",
    "-",
    "00-",
    "%",
    "%zz",
    "@",
    "?",
    "&",
    "=",
    "[::1]",
    "\u{0}",
    "é",
    "\u{feff}",
    "\r",
    "\t",
    "9999999999999",
];

/// One edit of a seed: (kind, position, token index, char).
type Edit = (u8, usize, usize, char);

fn apply(seed: &str, edits: &[Edit]) -> String {
    let mut chars: Vec<char> = seed.chars().collect();
    for &(kind, pos, tok, c) in edits {
        let at = if chars.is_empty() {
            0
        } else {
            pos % (chars.len() + 1)
        };
        match kind % 5 {
            0 if at < chars.len() => {
                chars.remove(at);
            }
            1 => chars.insert(at, c),
            2 if at < chars.len() => chars[at] = c,
            3 => {
                let t: Vec<char> = TOKENS[tok % TOKENS.len()].chars().collect();
                chars.splice(at..at, t);
            }
            _ => {
                // Cut the rest: truncated input.
                chars.truncate(at);
            }
        }
    }
    chars.into_iter().collect()
}

/// Mutations of the corpus of `parser`, and arbitrary text.
fn inputs(parser: &str) -> BoxedStrategy<String> {
    let seeds: Vec<String> = corpus(parser).into_iter().map(|(_, t)| t).collect();
    let mutated = (
        proptest::sample::select(seeds),
        proptest::collection::vec(
            (any::<u8>(), any::<usize>(), any::<usize>(), any::<char>()),
            0..12,
        ),
    )
        .prop_map(|(seed, edits)| apply(&seed, &edits));
    prop_oneof![4 => mutated, 1 => "\\PC{0,200}", 1 => any::<String>()].boxed()
}

/// A config: must not panic; an error names the file; the targets resolve or fail cleanly.
fn config(text: &str) -> Result<(), String> {
    let path = Path::new("fuzz.yaml");
    match Config::parse(path, text) {
        Ok(config) => {
            let _ = config.resolve_targets(&|_| None);
            Ok(())
        }
        Err(e) => {
            let msg = e.to_string();
            if msg.contains("fuzz.yaml") {
                Ok(())
            } else {
                Err(format!("config error without its file: {msg}"))
            }
        }
    }
}

fn pack(text: &str) -> Result<(), String> {
    match Catalog::from_pack_text(Path::new("fuzz-pack.yaml"), text) {
        Ok(_) => Ok(()),
        Err(e) => {
            let msg = e.to_string();
            if msg.contains("fuzz-pack.yaml") {
                Ok(())
            } else {
                Err(format!("pack error without its file: {msg}"))
            }
        }
    }
}

fn sql(text: &str, max: usize) -> Result<(), String> {
    let masked = pgvigil::sql::mask_literals(text, max);
    if max > 0 && masked.chars().count() > max {
        return Err(format!("masked text longer than {max}: {masked:?}"));
    }
    let _ = pgvigil::sql::sql_comments(text);
    let _ = pgvigil::sql::first_keyword_and_table(text);
    let _ = pgvigil::sql::tokenize(text).count();
    Ok(())
}

fn traceparent(text: &str) {
    let _ = context::parse_traceparent(text);
    let _ = context::from_sql(text);
    let _ = context::from_application_name(text);
    let _ = context::parent_of(text, text);
}

/// Every bcrypt cost in a fuzzed `web.yml` is lowered to 04: loading computes a decoy hash
/// at the highest cost in use, and the costs it accepts (up to 16; higher ones are a load
/// error) still take seconds each in a debug build.
fn cheap_bcrypt(text: &str) -> String {
    let mut out = text.to_string();
    for prefix in ["$2a$", "$2b$", "$2x$", "$2y$"] {
        let mut from = 0;
        while let Some(i) = out[from..].find(prefix) {
            let at = from + i + prefix.len();
            if out
                .get(at..at + 2)
                .is_some_and(|c| c.chars().all(|c| c.is_ascii_digit()))
            {
                out.replace_range(at..at + 2, "04");
            }
            from = at;
        }
    }
    out
}

fn web(dir: &Path, text: &str) -> Result<(), String> {
    let path = dir.join("web.yml");
    std::fs::write(&path, cheap_bcrypt(text)).unwrap();
    match pgvigil::web::Web::load(&path) {
        Ok(_) => Ok(()),
        Err(e) => {
            let msg = e.to_string();
            if msg.contains("web.yml") {
                Ok(())
            } else {
                Err(format!("web.yml error without its file: {msg}"))
            }
        }
    }
}

fn dsn_text(text: &str) {
    let _ = dsn::split_tls_params(text);
    if let Ok((rest, _)) = dsn::split_tls_params(text) {
        if let Ok(config) = rest.parse::<tokio_postgres::Config>() {
            let _ = dsn::describe(&config);
            let _ = dsn::server(&config);
            let _ = dsn::database(&config);
        }
    }
    // Through the config file too (quoted so it stays one YAML scalar).
    let yaml = format!(
        "targets:\n  - name: a\n    dsn: '{}'\n",
        text.replace('\'', "''").replace('\n', " ")
    );
    if let Ok(c) = Config::parse(Path::new("fuzz.yaml"), &yaml) {
        let _ = c.resolve_targets(&|_| None);
    }
}

fn passfile(text: &str) {
    for dsn in [
        "host=localhost port=5432 user=pgvigil dbname=postgres",
        "host=db1.example.com user=pgvigil dbname=postgres",
        "host=/tmp user=x",
    ] {
        let config: tokio_postgres::Config = dsn.parse().unwrap();
        let _ = password::lookup(text, &config);
    }
}

/// Every corpus file through its parser, as is: what the CI run replays.
#[test]
fn corpus_replays() {
    let dir = tempfile::tempdir().unwrap();
    for (p, t) in corpus("config") {
        config(&t).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    for (p, t) in corpus("pack") {
        pack(&t).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    for (p, t) in corpus("sql") {
        for max in [0, 1, 10, 200] {
            sql(&t, max).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        }
    }
    for (_, t) in corpus("traceparent") {
        traceparent(&t);
    }
    let valid = corpus("traceparent")
        .into_iter()
        .find(|(p, _)| p.ends_with("valid.txt"))
        .unwrap();
    assert!(context::parse_traceparent(valid.1.trim()).is_some());
    for (p, t) in corpus("web") {
        web(dir.path(), &t).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    for (_, t) in corpus("dsn") {
        dsn_text(&t);
    }
    for (_, t) in corpus("passfile") {
        passfile(&t);
    }
}

proptest! {
    #![proptest_config(budget())]

    #[test]
    fn config_parser(text in inputs("config")) {
        config(&text).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn pack_parser(text in inputs("pack")) {
        pack(&text).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn sql_masker(text in inputs("sql"), max in 0usize..120) {
        sql(&text, max).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn traceparent_parser(text in inputs("traceparent")) {
        traceparent(&text);
    }

    #[test]
    fn web_yml_parser(text in inputs("web")) {
        let dir = tempfile::tempdir().unwrap();
        web(dir.path(), &text).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn dsn_parser(text in inputs("dsn")) {
        dsn_text(&text);
    }

    #[test]
    fn password_file_lines(text in inputs("passfile")) {
        passfile(&text);
    }
}
