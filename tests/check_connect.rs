//! `pgvigil check-config --connect` against a real server: per target and collector what
//! works and what an operator must fix, and an exit code that says whether anything must.

mod common;

use std::path::Path;
use std::process::Output;

use common::binary::command as pgvigil;
use common::{free_port, pg_monitor_dsn, write};

/// Runs `check-config --connect` on a config with one target per `(name, dsn)`.
fn check_connect(dir: &Path, targets: &[(&str, &str)]) -> (String, Output) {
    let mut yaml = String::from("targets:\n");
    for (name, dsn) in targets {
        yaml.push_str(&format!("  - name: {name}\n    dsn: \"{dsn}\"\n"));
    }
    let path = write(dir, "pgvigil.yaml", &yaml);
    let out = pgvigil()
        .arg("check-config")
        .arg("--connect")
        .arg(&path)
        .output()
        .expect("run pgvigil check-config --connect");
    let text = format!(
        "status: {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (text, out)
}

/// The verdict line of `collector` in the section of `target`.
fn verdict<'a>(text: &'a str, target: &str, collector: &str) -> &'a str {
    let section = text
        .split("\ntarget ")
        .find(|s| s.starts_with(&format!("{target} ")))
        .unwrap_or_else(|| panic!("no section for target {target}\n{text}"));
    section
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{collector} ")))
        .unwrap_or_else(|| panic!("no line for {collector} in target {target}\n{text}"))
        .trim()
}

#[test]
fn connect_reports_per_target_and_collector_with_exit_codes() {
    let pg = common::cluster(&[]);
    let dir = tempfile::tempdir().unwrap();

    // A superuser: every collector runs.
    let (text, out) = check_connect(dir.path(), &[("su", &pg.dsn())]);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("target su (127.0.0.1:"), "{text}");
    assert!(text.contains(": connected, PostgreSQL "), "{text}");
    for c in ["database", "statements", "hba_file_rules", "locks"] {
        assert!(verdict(&text, "su", c).ends_with(" ok"), "{c}\n{text}");
    }
    assert!(!text.contains("<- fix"), "{text}");
    // The default track_activity_query_size (1kB) is too small for trace context.
    assert!(
        text.contains("warning: track_activity_query_size is 1kB"),
        "{text}"
    );

    // Only pg_monitor: the HBA rules are skipped with their grant, which is acceptable.
    let monitor = pg_monitor_dsn(&pg, "postgres");
    let (text, out) = check_connect(dir.path(), &[("mon", &monitor)]);
    eprintln!("{text}");
    assert_eq!(out.status.code(), Some(0), "{text}");
    let hba = verdict(&text, "mon", "hba_file_rules");
    assert!(
        hba.contains("missing privilege (GRANT SELECT ON pg_hba_file_rules TO <role>"),
        "{text}"
    );
    assert!(!hba.contains("<- fix"), "{text}");
    assert!(
        verdict(&text, "mon", "statements").ends_with(" ok"),
        "{text}"
    );

    // Without pg_monitor: what it lacks is named, with the grant, and the exit code is 2.
    pg.psql("postgres", "CREATE ROLE plain LOGIN")
        .expect("create role plain");
    let plain = pg.dsn_for("plain", "postgres");
    let (text, out) = check_connect(dir.path(), &[("plain", &plain)]);
    eprintln!("{text}");
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("missing privilege (GRANT pg_monitor TO <role>)  <- fix"),
        "{text}"
    );
    assert!(text.contains("problem(s) found"), "{text}");

    // A closed port, beside a good target: unreachable, exit 2, the good one still checked.
    let closed = format!(
        "postgresql://postgres:hunter2secret@127.0.0.1:{}/postgres?sslmode=disable",
        free_port()
    );
    let (text, out) = check_connect(dir.path(), &[("su", &pg.dsn()), ("gone", &closed)]);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("target gone (127.0.0.1:"), "{text}");
    assert!(text.contains("): unreachable: "), "{text}");
    assert!(verdict(&text, "su", "database").ends_with(" ok"), "{text}");
    assert!(!text.contains("panicked"), "{text}");
    assert!(
        !text.contains("hunter2secret"),
        "the password leaked\n{text}"
    );
}
