//! The working core against a real PostgreSQL: the built-in database pack, user packs,
//! NULL values, failing collectors, a server that goes away and comes back.

mod common;

use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn database_pack_matches_what_postgres_says() {
    let pg = cluster(&[]);
    pg.psql("postgres", "CREATE DATABASE app").unwrap();
    pg.psql(
        "app",
        "CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 1234); DELETE FROM t WHERE id <= 34",
    )
    .unwrap();
    let run = start(config(&one_target(&pg.dsn(), "")));

    let max_conn: f64 = pg
        .psql("postgres", "SHOW max_connections")
        .unwrap()
        .parse()
        .unwrap();
    let got = wait_for(&run, WAIT, "pg_settings_max_connections", |s| {
        value(
            s,
            "pg_settings_max_connections",
            &[("target", "t1"), ("env", "test")],
        )
    });
    assert_eq!(got, max_conn);

    let version = pg.psql("postgres", "SHOW server_version").unwrap();
    let info = wait_for(&run, WAIT, "pg_server_info", |s| {
        find(s, "pg_server_info", &[("target", "t1")])
            .first()
            .map(|x| (*x).clone())
    });
    assert_eq!(info.labels["version"], version);

    // `app` is idle now, so its counters and size are stable: pgvigil must converge to
    // exactly what pg_stat_database says.
    let query = |col: &str| -> f64 {
        pg.psql(
            "postgres",
            &format!("SELECT {col} FROM pg_stat_database WHERE datname = 'app'"),
        )
        .unwrap()
        .parse()
        .unwrap()
    };
    for (metric, column) in [
        ("pg_stat_database_tuples_inserted_total", "tup_inserted"),
        ("pg_stat_database_tuples_deleted_total", "tup_deleted"),
        ("pg_stat_database_xact_commit_total", "xact_commit"),
    ] {
        wait_for(&run, WAIT, metric, |s| {
            let want = query(column);
            let have = value(s, metric, &[("datname", "app")])?;
            (have == want).then_some(())
        });
    }
    assert!(query("tup_inserted") >= 1234.0);
    let size: f64 = pg
        .psql("postgres", "SELECT pg_database_size('app')")
        .unwrap()
        .parse()
        .unwrap();
    wait_for(&run, WAIT, "pg_database_size_bytes{app}", |s| {
        (value(s, "pg_database_size_bytes", &[("datname", "app")])? == size).then_some(())
    });
}

const USER_PACK: &str = r#"
collectors:
  - name: custom
    help: A user collector with a NULL value row.
    queries:
      - sql: SELECT 'x' AS kind, 42::numeric AS answer UNION ALL SELECT 'y', NULL
    metrics:
      - name: custom_answer
        type: gauge
        help: The answer.
        value: answer
        labels: [kind]
        static_labels: {source: user}
  - name: broken
    help: A collector whose SQL fails.
    queries:
      - sql: SELECT * FROM no_such_table
    metrics:
      - {name: broken_value, type: gauge, help: Never exported., value: v}
  - name: per_db
    help: Runs in every database.
    scope: database
    queries:
      - sql: SELECT count(*) AS n FROM pg_class WHERE relname = 'only_in_app'
    metrics:
      - {name: custom_tables, type: gauge, help: Tables named only_in_app., value: n}
"#;

#[test]
fn user_pack_adds_metrics_nulls_skip_and_failures_are_isolated() {
    let pg = cluster(&[]);
    pg.psql("postgres", "CREATE DATABASE app").unwrap();
    pg.psql("app", "CREATE TABLE only_in_app (id int)").unwrap();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "mine.yaml", USER_PACK);
    let extra = format!("  paths: [\"{}\"]\n", dir.path().display());
    let run = start(config(
        &one_target(&pg.dsn(), "").replace("collectors:\n", &format!("collectors:\n{extra}")),
    ));

    let s = wait_for(&run, WAIT, "custom_answer and broken errors", |s| {
        let errors = value(
            s,
            "pgvigil_collector_errors_total",
            &[("collector", "broken"), ("kind", "query")],
        )?;
        value(s, "pg_settings_max_connections", &[])?;
        (errors >= 1.0 && value(s, "custom_answer", &[])? > 0.0).then(|| s.to_vec())
    });
    let answers = find(&s, "custom_answer", &[]);
    assert_eq!(
        answers.len(),
        1,
        "the NULL row must not produce a sample: {answers:?}"
    );
    assert_eq!(answers[0].value, 42.0);
    assert_eq!(answers[0].labels["kind"], "x");
    assert_eq!(answers[0].labels["source"], "user");
    assert_eq!(answers[0].labels["target"], "t1");
    assert!(find(&s, "broken_value", &[]).is_empty());
    // Other collectors keep exporting while `broken` fails.
    assert!(value(&s, "pg_settings_max_connections", &[]).is_some());
    assert!(value(
        &s,
        "pgvigil_collector_last_success_timestamp_seconds",
        &[("collector", "custom")]
    )
    .is_some());
    assert!(value(
        &s,
        "pgvigil_collector_last_success_timestamp_seconds",
        &[("collector", "broken")]
    )
    .is_none());

    // scope: database runs in each database and adds `datname`.
    let per_db = wait_for(&run, WAIT, "custom_tables in both databases", |s| {
        let v = find(s, "custom_tables", &[]);
        (v.len() == 2).then(|| v.into_iter().cloned().collect::<Vec<_>>())
    });
    let by_db: std::collections::BTreeMap<_, _> = per_db
        .iter()
        .map(|s| (s.labels["datname"].clone(), s.value))
        .collect();
    assert_eq!(by_db.get("app"), Some(&1.0));
    assert_eq!(by_db.get("postgres"), Some(&0.0));
}

#[test]
fn server_down_flips_pg_up_and_recovers_without_restart() {
    let pg = cluster(&[]);
    let run = start(config(&one_target(&pg.dsn(), "")));
    wait_for(&run, WAIT, "pg_up 1", |s| {
        (value(s, "pg_up", &[("target", "t1")])? == 1.0).then_some(())
    });
    let deadline = std::time::Instant::now() + WAIT;
    while get(&run.url("/readyz")).0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz never became 200"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    pg.stop().unwrap();
    let down = wait_for(&run, WAIT, "pg_up 0", |s| {
        (value(s, "pg_up", &[("target", "t1")])? == 0.0).then(|| s.to_vec())
    });
    // /metrics keeps answering while the database is down, with the error counted.
    assert!(value(&down, "pgvigil_build_info", &[]).is_some());
    let (status, body) = get(&run.url("/metrics"));
    assert_eq!(status, 200);
    assert!(
        body.contains("pg_up{target=\"t1\",env=\"test\"} 0"),
        "{body}"
    );
    assert_eq!(get(&run.url("/healthz")).0, 200);

    pg.restart().unwrap();
    wait_for(&run, Duration::from_secs(60), "pg_up back to 1", |s| {
        (value(s, "pg_up", &[("target", "t1")])? == 1.0).then_some(())
    });
    wait_for(&run, WAIT, "fresh data after reconnect", |s| {
        value(s, "pg_settings_max_connections", &[])
    });
}

#[test]
fn openmetrics_by_accept_header() {
    let pg = cluster(&[]);
    let run = start(config(&one_target(&pg.dsn(), "")));
    wait_for(&run, WAIT, "first poll", |s| {
        value(s, "pg_settings_max_connections", &[])?;
        value(
            s,
            "pg_stat_database_xact_commit_total",
            &[("datname", "postgres")],
        )?;
        (!find(s, "pg_server_info", &[]).is_empty()).then_some(())
    });
    let body = reqwest::blocking::Client::new()
        .get(run.url("/metrics"))
        .header(
            "Accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .send()
        .unwrap();
    assert!(body.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let text = body.text().unwrap();
    assert!(text.ends_with("# EOF\n"));
    assert!(text.contains("# TYPE pg_stat_database_xact_commit counter\n"));
    assert!(text.contains("pg_stat_database_xact_commit_total{target=\"t1\""));
    assert!(text.contains("# TYPE pg_server info\n"));
}

const PREPARED_PACK: &str = r#"
collectors:
  - name: items
    help: A user collector over a table the test alters between polls.
    queries:
      - sql: SELECT * FROM pv_items
    metrics:
      - {name: pv_items_n, type: gauge, help: n per kind., value: n, labels: [kind]}
  - name: prepared_probe
    help: When this collector's own statement was prepared on its session.
    queries:
      - sql: >-
          SELECT extract(epoch FROM min(prepare_time))::float8 AS prepared_at
          FROM pg_prepared_statements WHERE statement LIKE '%pv_prepared_marker%'
    metrics:
      - {name: pv_prepared_at, type: gauge, help: Prepare time., value: prepared_at}
"#;

/// A collector's SQL is prepared once per session and reused by later polls (the server
/// parses it once), and a table altered between polls (the prepared plan's result type
/// changes) neither fails the next poll nor sticks: the statement is prepared again.
#[test]
fn statements_are_prepared_once_per_session_and_survive_an_altered_table() {
    let pg = cluster(&[]);
    pg.psql(
        "postgres",
        "CREATE TABLE pv_items (kind text, n int); INSERT INTO pv_items VALUES ('a', 1)",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "mine.yaml", PREPARED_PACK);
    let extra = format!("  paths: [\"{}\"]\n", dir.path().display());
    // One connection, so every poll of both collectors uses the same session.
    let yaml = one_target(&pg.dsn(), "")
        .replace(
            "labels: {env: test}",
            "labels: {env: test}\n    max_connections: 1",
        )
        .replace("collectors:\n", &format!("collectors:\n{extra}"));
    let poller = ManualPoller::new(&config(&yaml));
    let errors = |s: &[Sample]| {
        find(
            s,
            "pgvigil_collector_errors_total",
            &[("collector", "items")],
        )
        .iter()
        .map(|x| x.value)
        .sum::<f64>()
    };

    let first = poller.poll();
    let prepared_at = value(&first, "pv_prepared_at", &[]).expect("pv_prepared_at");
    assert_eq!(value(&first, "pv_items_n", &[("kind", "a")]), Some(1.0));
    std::thread::sleep(Duration::from_millis(50));
    let second = poller.poll();
    assert_eq!(
        value(&second, "pv_prepared_at", &[]),
        Some(prepared_at),
        "the second poll must reuse the statement prepared by the first"
    );

    // A new column, then a new type: each changes the prepared plan's result type.
    pg.psql("postgres", "ALTER TABLE pv_items ADD COLUMN extra int")
        .unwrap();
    pg.psql("postgres", "UPDATE pv_items SET n = 2").unwrap();
    let third = poller.poll();
    assert_eq!(value(&third, "pv_items_n", &[("kind", "a")]), Some(2.0));
    pg.psql(
        "postgres",
        "ALTER TABLE pv_items ALTER COLUMN n TYPE bigint; UPDATE pv_items SET n = 3",
    )
    .unwrap();
    let fourth = poller.poll();
    assert_eq!(value(&fourth, "pv_items_n", &[("kind", "a")]), Some(3.0));
    assert_eq!(
        errors(&fourth),
        0.0,
        "an altered table must not fail a poll: {:?}",
        find(&fourth, "pgvigil_collector_errors_total", &[])
    );
}
