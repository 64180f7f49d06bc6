//! The real `pgvigil` binary: bad input gets a clear, located error (never a panic), a good
//! config prints its plan, and an unreachable target is retried with backoff, without
//! leaking its password.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::binary::{command as pgvigil, Pgvigil};
use common::{free_port, write, Serving};

/// Runs `pgvigil check-config <dir>/pgvigil.yaml` with `yaml` as the file's content.
fn check_config(dir: &Path, yaml: &str) -> (PathBuf, Output) {
    let path = write(dir, "pgvigil.yaml", yaml);
    let out = pgvigil()
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("run pgvigil check-config");
    (path, out)
}

/// Asserts that `out` is a failure whose stderr is located at `file:line:` and mentions
/// every one of `needles` (field names and the gist of the message).
fn assert_error_at(out: &Output, file: &Path, line: usize, needles: &[&str]) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ctx = format!(
        "status: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert_eq!(out.status.code(), Some(1), "exit code must be 1\n{ctx}");
    assert!(!stderr.contains("panicked"), "pgvigil panicked\n{ctx}");
    let at = format!("{}:{line}:", file.display());
    assert!(stderr.contains(&at), "stderr must contain {at:?}\n{ctx}");
    for n in needles {
        assert!(stderr.contains(n), "stderr must mention {n:?}\n{ctx}");
    }
}

/// A user pack with one gauge named `metric` (the `name:` line of the metric is line 7).
fn user_pack(metric: &str) -> String {
    format!(
        "collectors:\n  - name: mine\n    help: Mine.\n    queries:\n      - sql: SELECT 1 AS v\n    metrics:\n      - name: {metric}\n        type: gauge\n        help: A value.\n        value: v\n"
    )
}

/// A valid config whose collectors read the user packs in `packs`.
fn config_with_packs(packs: &Path) -> String {
    format!(
        "targets:\n  - name: a\n    dsn: host=db.example\ncollectors:\n  paths: [\"{}\"]\n",
        packs.display()
    )
}

#[test]
fn yaml_syntax_error_unclosed_bracket() {
    let dir = tempfile::tempdir().unwrap();
    let (file, out) = check_config(
        dir.path(),
        "targets:\n  - name: a\n    dsn: host=h\n    labels: {env: test]\n",
    );
    assert_error_at(
        &out,
        &file,
        4,
        &["did not find expected ',' or '}'", "flow mapping"],
    );
}

#[test]
fn yaml_syntax_error_bad_indentation() {
    let dir = tempfile::tempdir().unwrap();
    let (file, out) = check_config(
        dir.path(),
        "listen: 127.0.0.1:9999\ntargets:\n  - name: a\n    dsn: host=h\n  bad: indentation\n",
    );
    assert_error_at(&out, &file, 5, &["did not find expected '-' indicator"]);
}

#[test]
fn unknown_field_in_target() {
    let dir = tempfile::tempdir().unwrap();
    let (file, out) = check_config(
        dir.path(),
        "listen: 127.0.0.1:9999\ntargets:\n  - name: a\n    dsn: host=h\n    colour: red\n",
    );
    assert_error_at(&out, &file, 5, &["targets[0]", "unknown field `colour`"]);
}

#[test]
fn unknown_top_level_field() {
    let dir = tempfile::tempdir().unwrap();
    let (file, out) = check_config(
        dir.path(),
        "listen: 127.0.0.1:9999\ntargets: []\nbogus: 1\n",
    );
    assert_error_at(&out, &file, 3, &["unknown field `bogus`"]);
}

#[test]
fn wrong_type_listen_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let (file, out) = check_config(
        dir.path(),
        "targets:\n  - name: a\n    dsn: host=h\nlisten: [1, 2]\n",
    );
    assert_error_at(&out, &file, 4, &["listen", "invalid type: sequence"]);
}

#[test]
fn wrong_type_targets_integer() {
    let dir = tempfile::tempdir().unwrap();
    let (file, out) = check_config(dir.path(), "listen: 127.0.0.1:9999\ntargets: 5\n");
    assert_error_at(
        &out,
        &file,
        2,
        &["targets", "invalid type: integer `5`, expected a sequence"],
    );
}

#[test]
fn bad_duration() {
    let dir = tempfile::tempdir().unwrap();
    let (file, out) = check_config(
        dir.path(),
        "targets:\n  - name: a\n    dsn: host=h\ncollectors:\n  defaults:\n    interval: 5 parsecs\n",
    );
    assert_error_at(
        &out,
        &file,
        6,
        &[
            "collectors.defaults.interval",
            "invalid duration \"5 parsecs\"",
        ],
    );
}

#[test]
fn invalid_connection_string() {
    let dir = tempfile::tempdir().unwrap();
    let (file, out) = check_config(
        dir.path(),
        "listen: 127.0.0.1:9999\ntargets:\n  - name: a\n    dsn: \"host=h port=notaport\"\n",
    );
    assert_error_at(
        &out,
        &file,
        4,
        &["targets[0].dsn", "invalid connection string", "port"],
    );
}

#[test]
fn duplicate_metric_name_across_packs_names_the_user_pack() {
    let dir = tempfile::tempdir().unwrap();
    let packs = dir.path().join("packs");
    std::fs::create_dir(&packs).unwrap();
    let pack = write(&packs, "mine.yaml", &user_pack("pg_database_size_bytes"));
    let (_, out) = check_config(dir.path(), &config_with_packs(&packs));
    assert_error_at(
        &out,
        &pack,
        7,
        &[
            "collectors[",
            ".metrics",
            "duplicate metric name pg_database_size_bytes",
            "queries/database.yaml",
        ],
    );
}

#[test]
fn invalid_metric_name_in_user_pack() {
    let dir = tempfile::tempdir().unwrap();
    let packs = dir.path().join("packs");
    std::fs::create_dir(&packs).unwrap();
    let pack = write(&packs, "mine.yaml", &user_pack("my-metric"));
    let (_, out) = check_config(dir.path(), &config_with_packs(&packs));
    assert_error_at(
        &out,
        &pack,
        7,
        &[
            "collectors[0].metrics[0].name",
            "invalid metric name \"my-metric\"",
        ],
    );
}

#[test]
fn unreadable_password_file_and_pack_path_are_located_in_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-secret");
    let (path, out) = check_config(
        dir.path(),
        &format!(
            "targets:\n  - name: a\n    dsn: host=db.example\n  - name: b\n    dsn: host=db2.example\n    password_file: {}\n",
            missing.display()
        ),
    );
    assert_error_at(
        &out,
        &path,
        6,
        &["targets[1].password_file", "no-such-secret", "cannot read"],
    );

    let packs = dir.path().join("no-such-packs");
    let (path, out) = check_config(
        dir.path(),
        &format!(
            "targets:\n  - name: a\n    dsn: host=db.example\ncollectors:\n  paths:\n    - {}\n",
            packs.display()
        ),
    );
    assert_error_at(
        &out,
        &path,
        6,
        &["collectors.paths", "no-such-packs", "cannot read"],
    );
}

#[test]
fn the_reserved_target_label_is_located_in_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let (path, out) = check_config(
        dir.path(),
        "targets:\n  - name: a\n    dsn: host=db.example\n  - name: b\n    dsn: host=db2.example\n    labels:\n      env: prod\n      target: other\n",
    );
    assert_error_at(&out, &path, 8, &["targets[1].labels", "`target`"]);
}

#[test]
fn check_config_takes_a_pack_file_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let pack = write(dir.path(), "mine.yaml", &user_pack("my_value"));
    let out = pgvigil()
        .arg("check-config")
        .arg(&pack)
        .output()
        .expect("run pgvigil check-config");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ctx = format!(
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{:?}\n{ctx}", out.status);
    assert!(
        stdout.contains("collectors (1):"),
        "only the pack's collectors\n{ctx}"
    );
    assert!(stdout.lines().any(|l| l.starts_with("  mine [")), "{ctx}");
    assert!(stdout.contains("my_value (gauge): A value."), "{ctx}");
    assert!(stdout.contains("pack OK"), "{ctx}");

    // A broken pack is located in the pack, and a clash with a built-in name is found.
    let bad = write(dir.path(), "bad.yaml", &user_pack("my-metric"));
    let out = pgvigil().arg("check-config").arg(&bad).output().unwrap();
    assert_error_at(
        &out,
        &bad,
        7,
        &["collectors[0].metrics[0].name", "my-metric"],
    );
    let clash = write(
        dir.path(),
        "clash.yaml",
        &user_pack("pg_database_size_bytes"),
    );
    let out = pgvigil().arg("check-config").arg(&clash).output().unwrap();
    assert_error_at(
        &out,
        &clash,
        7,
        &["duplicate metric name pg_database_size_bytes"],
    );
}

#[test]
fn a_reader_that_goes_away_is_no_panic() {
    // `pgvigil check-config | head -1`: the pipe closes before the plan is written.
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "pgvigil.yaml",
        "targets:\n  - name: a\n    dsn: host=db.example\n",
    );
    let mut child = pgvigil()
        .arg("check-config")
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}

#[test]
fn good_config_prints_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let (_, out) = check_config(
        dir.path(),
        "listen: 127.0.0.1:9999\ntargets:\n  - name: a\n    dsn: postgresql://monitor:hunter2pw@db.example:5433/app\n",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ctx = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(out.status.success(), "{:?}\n{ctx}", out.status);
    assert!(
        stdout.lines().any(|l| l.starts_with("  database ")),
        "the plan lists the database collector\n{ctx}"
    );
    assert!(
        stdout.lines().any(|l| l.trim_start()
            == "PostgreSQL 13: queries[0] (<= 13); 14-16: queries[1] (14 to 16); 17-18: queries[2] (>= 17)"),
        "the plan shows the statements variant per version\n{ctx}"
    );
    assert!(stdout.contains("config OK"), "{ctx}");
    assert!(
        !stdout.contains("hunter2pw") && !stderr.contains("hunter2pw"),
        "the plan must not show the password\n{ctx}"
    );
}

#[test]
fn help_mentions_config() {
    for args in [&["--help"][..], &["check-config", "--help"][..]] {
        let out = pgvigil().args(args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "pgvigil {args:?}: {:?}", out.status);
        assert!(stdout.contains("--config"), "pgvigil {args:?}:\n{stdout}");
    }
}

#[test]
fn unreachable_target_is_retried_with_backoff_and_no_password_leaks() {
    let dir = tempfile::tempdir().unwrap();
    let pg_port = free_port(); // nothing listens there
    let path = write(
        dir.path(),
        "pgvigil.yaml",
        &format!(
            "listen: 127.0.0.1:0\ntargets:\n  - name: down\n    dsn: \"postgresql://monitor:s3cretpw@127.0.0.1:{pg_port}/postgres\"\ncollectors: {{defaults: {{interval: 1s}}}}\n"
        ),
    );
    let started = Instant::now();
    let mut child = Pgvigil::start(
        [OsStr::new("--config"), path.as_os_str()],
        &[("PGVIGIL_LOG", "info")],
    );

    std::thread::sleep(Duration::from_secs(8).saturating_sub(started.elapsed()));
    let still_running = child.is_running();
    let scrape = reqwest::blocking::Client::new()
        .get(child.url("/metrics"))
        .timeout(Duration::from_secs(10))
        .send()
        .map(|r| (r.status().as_u16(), r.text().unwrap_or_default()));

    let log = child.stop();
    let ctx = format!("pgvigil stderr:\n{log}");

    assert!(still_running, "pgvigil exited early\n{ctx}");
    let (status, body) = scrape.unwrap_or_else(|e| panic!("GET /metrics: {e}\n{ctx}"));
    assert_eq!(status, 200, "{body}\n{ctx}");
    assert!(
        body.contains("pg_up{target=\"down\"} 0"),
        "/metrics must say pg_up 0:\n{body}\n{ctx}"
    );
    // The collectors' session and the activity sampler's each back off on their own.
    for sampler in [false, true] {
        let attempts: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("cannot connect") && l.contains("activity sampler") == sampler)
            .collect();
        assert!(
            (2..=6).contains(&attempts.len()),
            "expected 2..=6 'cannot connect' lines in 8 s (backoff 1s, 2s, 4s) from the {}, got {}:\n{}\n{ctx}",
            if sampler { "activity sampler" } else { "collectors" },
            attempts.len(),
            attempts.join("\n")
        );
    }
    assert!(
        !log.contains("s3cretpw"),
        "the password leaked into the log\n{ctx}"
    );
    assert!(
        !body.contains("s3cretpw"),
        "the password leaked into /metrics:\n{body}"
    );
    assert!(!log.contains("panicked"), "{ctx}");
}

/// `pgvigil once` exits 0 when every target answered and every collector ran, and 2 (after
/// printing what it could) when a target is unreachable, naming it on stderr; 1 stays for
/// errors that stop it before polling (a bad config).
#[test]
fn once_exit_code_says_whether_the_poll_was_complete() {
    let port = free_port();
    let out = pgvigil()
        .arg("once")
        .env(
            "DATA_SOURCE_NAME",
            format!("postgresql://u@127.0.0.1:{port}/db"),
        )
        .output()
        .expect("run pgvigil once");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("pg_up{target=\"127.0.0.1:"), "{stdout}");
    assert!(stderr.contains("unreachable"), "{stderr}");

    let pg = common::cluster(&[]);
    let out = pgvigil()
        .arg("once")
        .env("DATA_SOURCE_NAME", pg.dsn())
        .output()
        .expect("run pgvigil once");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr:\n{stderr}");
    assert!(stdout.contains("pg_up{target="), "{stdout}");
    assert!(stdout.contains("} 1\n"), "{stdout}");
}

/// `check-config` shows each target's kind and which collectors run on PgBouncer targets;
/// an unknown kind is an error at its line.
#[test]
fn check_config_shows_target_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let (_, out) = check_config(
        dir.path(),
        "targets:\n  - name: db\n    dsn: host=db.example\n  - name: pool\n    kind: pgbouncer\n    dsn: postgresql://pgvigil@pool.example:6432/pgbouncer\n",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("  db (kind postgres): "), "{stdout}");
    assert!(stdout.contains("  pool (kind pgbouncer): "), "{stdout}");
    assert!(
        stdout.contains("  pgbouncer_pools [cluster, pgbouncer targets] every "),
        "{stdout}"
    );
    let (file, out) = check_config(
        dir.path(),
        "targets:\n  - name: pool\n    kind: pgbouncr\n    dsn: host=h\n",
    );
    assert_error_at(&out, &file, 3, &["kind", "invalid kind \"pgbouncr\""]);
}
