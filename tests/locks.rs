//! Lock contention against a real PostgreSQL (`queries/locks.yaml`): a three-deep chain of
//! row-lock waits, a deadlock cycle, and what pgvigil - connected as a role that has only
//! pg_monitor - reports about them.

mod common;

use std::time::{Duration, Instant};

use common::*;

const WAIT: Duration = Duration::from_secs(30);

/// The value of `name{datname="app"}` (the one series of a per-database metric).
fn app(s: &[Sample], name: &str) -> Option<f64> {
    value(s, name, &[("datname", "app")])
}

/// The lock series of one database are all there and at 0.
fn quiet(s: &[Sample], db: &str) -> bool {
    let zero = |name: &str| value(s, name, &[("datname", db)]) == Some(0.0);
    zero("pg_locks_blocked_sessions")
        && zero("pg_locks_blocking_sessions")
        && zero("pg_locks_blocking_chain_depth_max")
        && zero("pg_locks_wait_seconds_max")
        && find(s, "pg_locks_waiting", &[("datname", db)]).is_empty()
        && find(s, "pg_locks_blocker_info", &[("datname", db)]).is_empty()
}

/// Waits until the counter has just moved, so the returned (time, value) pair is aligned
/// with a poll to within one scrape (250 ms).
fn next_increment(run: &Running, name: &str) -> (Instant, f64) {
    let before = wait_for(run, WAIT, name, |s| app(s, name));
    wait_for(run, WAIT, &format!("{name} to move"), |s| {
        app(s, name)
            .filter(|v| *v != before)
            .map(|v| (Instant::now(), v))
    })
}

#[test]
fn three_deep_lock_chain_is_measured_and_clears() {
    let pg = cluster(&[]);
    pg.psql("postgres", "CREATE DATABASE app").unwrap();
    pg.psql(
        "app",
        "CREATE TABLE accounts (id int PRIMARY KEY, balance int); INSERT INTO accounts VALUES (1, 100), (2, 200)",
    )
    .unwrap();
    let run = start(config(&one_target(&pg_monitor_dsn(&pg, "postgres"), "")));

    // Nothing waits: every per-database series exists, at 0; pgvigil's own session holds
    // no lock worth counting.
    let s = wait_for(&run, WAIT, "lock series at 0 in both databases", |s| {
        (quiet(s, "app") && quiet(s, "postgres")).then(|| s.to_vec())
    });
    for db in ["app", "postgres"] {
        let held = find(&s, "pg_locks_held", &[("datname", db)]);
        assert_eq!(held.len(), 9, "every lock mode, 0 included: {held:?}");
        assert!(held.iter().all(|h| h.value == 0.0), "{held:?}");
        assert_eq!(
            value(&s, "pg_locks_wait_seconds_total", &[("datname", db)]),
            Some(0.0)
        );
    }

    // A holds the row; B waits for A's transaction; C queues behind B for the row.
    let superuser = pg.dsn_for("postgres", "app");
    let a = Session::connect(&superuser);
    let a_began = Instant::now();
    a.run("BEGIN; SELECT * FROM accounts WHERE id = 1 FOR UPDATE");
    let b = Session::connect(&superuser);
    let b_done = b.start("BEGIN; SELECT * FROM accounts WHERE id = 1 FOR UPDATE; COMMIT");
    wait_until(WAIT, "B to wait", || waits_for_lock(&pg, b.pid));
    let b_waits_since = Instant::now();
    let c = Session::connect(&superuser);
    let c_done = c.start("BEGIN; SELECT * FROM accounts WHERE id = 1 FOR UPDATE; COMMIT");
    wait_until(WAIT, "C to wait", || waits_for_lock(&pg, c.pid));

    // The collectors poll independently: wait until each one has seen the whole chain.
    let s = wait_for(&run, WAIT, "the chain A <- B <- C", |s| {
        let ok = app(s, "pg_locks_blocked_sessions")? == 2.0
            && app(s, "pg_locks_blocking_chain_depth_max")? == 2.0
            && !find(s, "pg_locks_blocker_info", &[("datname", "app")]).is_empty()
            && find(s, "pg_locks_waiting", &[("datname", "app")]).len() == 2;
        ok.then(|| s.to_vec())
    });
    assert_eq!(app(&s, "pg_locks_blocking_sessions"), Some(2.0), "A and B");
    // B waits for A's transaction ID; C for the row (a tuple lock B holds).
    assert_eq!(
        value(
            &s,
            "pg_locks_waiting",
            &[
                ("datname", "app"),
                ("relation", ""),
                ("locktype", "transactionid"),
                ("mode", "ShareLock")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &s,
            "pg_locks_waiting",
            &[
                ("datname", "app"),
                ("relation", "public.accounts"),
                ("locktype", "tuple"),
                ("mode", "AccessExclusiveLock")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(find(&s, "pg_locks_waiting", &[("datname", "app")]).len(), 2);
    assert!(
        value(
            &s,
            "pg_locks_held",
            &[("datname", "app"), ("mode", "RowShareLock")]
        )
        .unwrap()
            >= 1.0
    );
    // The other database is not affected.
    assert!(quiet(&s, "postgres"), "postgres database must stay at 0");

    // The root blocker is A: who, in what state, with how old a transaction.
    let roots = find(&s, "pg_locks_blocker_info", &[("datname", "app")]);
    assert_eq!(roots.len(), 1, "{roots:?}");
    assert_eq!(roots[0].labels["pid"], a.pid.to_string());
    assert_eq!(roots[0].labels["usename"], "postgres");
    assert_eq!(roots[0].labels["state"], "idle in transaction");
    let age = value(
        &s,
        "pg_locks_blocker_xact_age_seconds",
        &[("datname", "app"), ("pid", &a.pid.to_string())],
    )
    .expect("xact age of the root blocker");
    assert!(age <= a_began.elapsed().as_secs_f64() + 0.5, "{age}");

    // The longest wait is at least as long as B had waited when it was polled (polls run
    // every second; 2 s of slack for a loaded machine), and never longer than B waited.
    let s = wait_for(&run, WAIT, "3 s of waiting", |s| {
        (app(s, "pg_locks_wait_seconds_max")? >= 3.0).then(|| s.to_vec())
    });
    let waited = b_waits_since.elapsed().as_secs_f64();
    let max = app(&s, "pg_locks_wait_seconds_max").unwrap();
    assert!(
        max >= waited - 2.0 && max <= waited + 0.5,
        "wait max {max} s, B has waited {waited:.2} s"
    );

    // Two sessions wait: the counter grows by ~2 backend-seconds per second.
    let (t1, v1) = next_increment(&run, "pg_locks_wait_seconds_total");
    std::thread::sleep(Duration::from_secs(5));
    let (t2, v2) = next_increment(&run, "pg_locks_wait_seconds_total");
    let rate = (v2 - v1) / (t2 - t1).as_secs_f64();
    eprintln!(
        "wait max {max:.2} s after {waited:.2} s of waiting; pg_locks_wait_seconds_total +{:.2} in {:.2} s = {rate:.3}/s",
        v2 - v1,
        (t2 - t1).as_secs_f64()
    );
    assert!(
        (1.7..=2.3).contains(&rate),
        "pg_locks_wait_seconds_total grew {:.2} in {:.2} s: {rate:.2}/s, want ~2",
        v2 - v1,
        (t2 - t1).as_secs_f64()
    );

    // A commits: B, then C get the row and finish; everything returns to 0.
    a.run("COMMIT");
    b_done.wait(WAIT).expect("B finishes");
    c_done.wait(WAIT).expect("C finishes");
    let s = wait_for(&run, WAIT, "the chain to clear", |s| {
        quiet(s, "app").then(|| s.to_vec())
    });
    // The counter keeps its total and stops growing.
    let total = app(&s, "pg_locks_wait_seconds_total").unwrap();
    assert!(total >= v2, "{total} < {v2}");
    std::thread::sleep(Duration::from_secs(2));
    let later = wait_for(&run, WAIT, "the total", |s| {
        app(s, "pg_locks_wait_seconds_total")
    });
    assert_eq!(later, total, "no waiting: the counter must not grow");
}

#[test]
fn deadlock_cycle_is_bounded_and_has_no_root_blocker() {
    // The deadlock detector only looks after deadlock_timeout: keep the cycle standing.
    let pg = cluster(&[("deadlock_timeout", "10min")]);
    pg.psql("postgres", "CREATE DATABASE app").unwrap();
    pg.psql(
        "app",
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (2)",
    )
    .unwrap();
    let run = start(config(&one_target(&pg_monitor_dsn(&pg, "postgres"), "")));
    let dsn = pg.dsn_for("postgres", "app");
    let a = Session::connect(&dsn);
    let b = Session::connect(&dsn);
    a.run("BEGIN; SELECT * FROM t WHERE id = 1 FOR UPDATE");
    b.run("BEGIN; SELECT * FROM t WHERE id = 2 FOR UPDATE");
    let a_done = a.start("SELECT * FROM t WHERE id = 2 FOR UPDATE");
    wait_until(WAIT, "A to wait", || waits_for_lock(&pg, a.pid));
    let b_done = b.start("SELECT * FROM t WHERE id = 1 FOR UPDATE");
    wait_until(WAIT, "B to wait", || waits_for_lock(&pg, b.pid));

    // A waits on B waits on A: two sessions, so the longest chain without a repeat is one
    // edge; nobody waits on no one, so there is no root blocker.
    let s = wait_for(&run, WAIT, "the cycle", |s| {
        (app(s, "pg_locks_blocked_sessions")? == 2.0).then(|| s.to_vec())
    });
    assert_eq!(app(&s, "pg_locks_blocking_sessions"), Some(2.0));
    assert_eq!(app(&s, "pg_locks_blocking_chain_depth_max"), Some(1.0));
    assert!(find(&s, "pg_locks_blocker_info", &[("datname", "app")]).is_empty());
    let errors = find(&s, "pgvigil_collector_errors_total", &[]);
    assert!(errors.is_empty(), "{errors:?}");

    // Break the cycle by hand.
    pg.psql("postgres", &format!("SELECT pg_cancel_backend({})", b.pid))
        .unwrap();
    assert!(b_done.wait(WAIT).is_err(), "B was canceled");
    b.run("ROLLBACK");
    a_done.wait(WAIT).expect("A gets the row");
    a.run("COMMIT");
    wait_for(&run, WAIT, "no more waits", |s| {
        quiet(s, "app").then_some(())
    });
}
