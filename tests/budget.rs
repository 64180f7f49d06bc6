//! The connection budget (`targets[].max_connections`) against a real PostgreSQL with 120
//! databases: pgvigil never holds more collector connections than the budget, still visits
//! every database within two intervals, and names the relations of a lock wait in a
//! database that is not the main one from its relation-name cache.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;

const DATABASES: usize = 120;
/// Every collector's interval here; database visits are due this often.
const INTERVAL_SECS: f64 = 10.0;

/// The activity sampler's own session (DB load; always on), counted apart from the
/// collectors' budget, as the README says.
const SAMPLER: u32 = 1;

/// pgvigil's sessions, as the server sees them (`application_name` defaults to `pgvigil`).
const PGVIGIL_SESSIONS: &str =
    "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pgvigil%'";

/// Sessions ever opened to the databases other than `postgres` (pg_stat_database.sessions,
/// PostgreSQL 14+): with the main database's session kept open, these are the visits.
const VISIT_SESSIONS: &str =
    "SELECT coalesce(sum(sessions), 0) FROM pg_stat_database WHERE datname LIKE 'db%'";

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A cluster with `n` databases `db1`..`dbn`, each with a table `t`, and room for the
/// test's own sessions on top of pgvigil's.
fn cluster_with_databases(n: usize) -> TempCluster {
    let pg = cluster(&[("max_connections", "200")]);
    let started = Instant::now();
    let create: String = (1..=n)
        .map(|i| format!("CREATE DATABASE db{i};\n"))
        .collect();
    pg.psql("postgres", &create).expect("create the databases");
    for i in 1..=n {
        pg.psql(&format!("db{i}"), "CREATE TABLE t (id int)")
            .expect("create a table");
    }
    eprintln!(
        "created {n} databases in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    pg
}

fn config_for(pg: &TempCluster, max_connections: Option<usize>) -> String {
    let budget = max_connections
        .map(|n| format!("    max_connections: {n}\n"))
        .unwrap_or_default();
    format!(
        "targets:\n  - name: t1\n    dsn: \"{}\"\n{budget}collectors:\n  defaults: {{interval: {INTERVAL_SECS}s, timeout: 5s}}\n",
        pg_monitor_dsn(pg, "postgres")
    )
}

/// Every database's own series is there: `pg_index_invalid_indexes{datname}` (the
/// `index_invalid` collector visits each database).
fn all_databases_present(s: &[Sample], n: usize) -> bool {
    (1..=n).all(|i| {
        value(
            s,
            "pg_index_invalid_indexes",
            &[("datname", format!("db{i}").as_str())],
        )
        .is_some()
    }) && value(s, "pg_index_invalid_indexes", &[("datname", "postgres")]).is_some()
}

#[test]
fn a_hundred_and_twenty_databases_stay_within_the_default_budget() {
    let pg = cluster_with_databases(DATABASES);
    // Default budget (3); tracing off, so no activity sampler connection either.
    let run = start(config(&config_for(&pg, None)));
    wait_for(
        &run,
        Duration::from_secs(90),
        "every database visited once",
        |s| all_databases_present(s, DATABASES).then_some(()),
    );

    // ~60 s sampled every 0.5 s: pgvigil's sessions, and every database's freshness.
    let sessions_before: f64 = pg
        .psql("postgres", VISIT_SESSIONS)
        .unwrap()
        .parse()
        .unwrap();
    let window = Instant::now();
    let (mut max_sessions, mut samples, mut max_behind) = (0u32, 0u32, 0.0f64);
    let mut max_staleness = 0.0f64;
    let mut rounds: Vec<f64> = Vec::new();
    while window.elapsed() < Duration::from_secs(60) {
        let tick = Instant::now();
        let n: u32 = pg
            .psql("postgres", PGVIGIL_SESSIONS)
            .unwrap()
            .parse()
            .unwrap();
        max_sessions = max_sessions.max(n);
        samples += 1;
        let (_, body) = get(&run.url("/metrics"));
        let s = parse(&body);
        assert!(
            all_databases_present(&s, DATABASES),
            "a database's series went missing"
        );
        for c in ["index_invalid", "relation_names"] {
            let behind = value(
                &s,
                "pgvigil_collector_databases_behind",
                &[("collector", c)],
            )
            .expect("databases_behind of a database-scope collector");
            max_behind = max_behind.max(behind);
            let oldest = value(
                &s,
                "pgvigil_collector_oldest_visit_timestamp_seconds",
                &[("collector", c)],
            )
            .expect("oldest visit, once every database was visited");
            max_staleness = max_staleness.max(now_unix() - oldest);
        }
        if let Some(d) = value(
            &s,
            "pgvigil_collector_duration_seconds",
            &[("collector", "index_invalid")],
        ) {
            if rounds.last() != Some(&d) {
                rounds.push(d);
            }
        }
        std::thread::sleep(Duration::from_millis(500).saturating_sub(tick.elapsed()));
    }
    let minute = window.elapsed().as_secs_f64() / 60.0;
    let sessions_after: f64 = pg
        .psql("postgres", VISIT_SESSIONS)
        .unwrap()
        .parse()
        .unwrap();
    let connects_per_minute = (sessions_after - sessions_before) / minute;
    let mean_round = rounds.iter().sum::<f64>() / rounds.len().max(1) as f64;
    eprintln!(
        "{DATABASES} databases, max_connections 3, interval {INTERVAL_SECS} s: \
         at most {max_sessions} pgvigil sessions in {samples} samples over 60 s; \
         {connects_per_minute:.0} connects/min; rounds of visits took {mean_round:.2} s on average \
         (max {:.2} s); stalest database visited {max_staleness:.1} s before a scrape; \
         databases behind at most {max_behind}",
        rounds.iter().cloned().fold(0.0, f64::max)
    );
    assert!(
        max_sessions <= 3 + SAMPLER,
        "pgvigil held {max_sessions} sessions, over its budget of 3 (+ the sampler)"
    );
    assert!(samples >= 40, "only {samples} samples");
    assert!(
        max_staleness <= 2.0 * INTERVAL_SECS,
        "a database was last visited {max_staleness:.1} s before a scrape, over two intervals"
    );
    assert_eq!(max_behind, 0.0, "databases fell behind");

    // A lock wait in db57, which is not the main database: the cluster-wide lock collector
    // sees it on `postgres`, and the name of db57's table comes from the cache.
    let dsn = pg.dsn_for("postgres", "db57");
    let holder = Session::connect(&dsn);
    holder.run("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE");
    let waiter = Session::connect(&dsn);
    let waiting = waiter.start("SELECT count(*) FROM t");
    wait_until(Duration::from_secs(30), "the wait", || {
        waits_for_lock(&pg, waiter.pid)
    });
    let want = [
        ("datname", "db57"),
        ("relation", "public.t"),
        ("locktype", "relation"),
        ("mode", "AccessShareLock"),
    ];
    wait_for(&run, Duration::from_secs(30), "the wait in db57", |s| {
        (value(s, "pg_locks_waiting", &want) == Some(1.0)).then_some(())
    });
    holder.run("COMMIT");
    waiting.wait(Duration::from_secs(30)).expect("the reader");
    let n: u32 = pg
        .psql("postgres", PGVIGIL_SESSIONS)
        .unwrap()
        .parse()
        .unwrap();
    assert!(n <= 3 + SAMPLER, "{n} sessions");
}

#[test]
fn a_budget_of_one_connection_still_visits_every_database() {
    let pg = cluster_with_databases(5);
    let run = start(config(&config_for(&pg, Some(1))));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut max_sessions = 0u32;
    // The main database's session is closed after each use too: the one permit goes round.
    loop {
        let n: u32 = pg
            .psql("postgres", PGVIGIL_SESSIONS)
            .unwrap()
            .parse()
            .unwrap();
        max_sessions = max_sessions.max(n);
        let (_, body) = get(&run.url("/metrics"));
        let s = parse(&body);
        let cluster_ok = value(&s, "pg_locks_blocked_sessions", &[("datname", "db3")]).is_some();
        if all_databases_present(&s, 5) && cluster_ok && value(&s, "pg_up", &[]) == Some(1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every database visited:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for _ in 0..20 {
        let n: u32 = pg
            .psql("postgres", PGVIGIL_SESSIONS)
            .unwrap()
            .parse()
            .unwrap();
        max_sessions = max_sessions.max(n);
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        max_sessions <= 1 + SAMPLER,
        "{max_sessions} sessions with a budget of 1 (+ the sampler)"
    );
}
