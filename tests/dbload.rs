//! DB load (`pg_activity_active_seconds_total`) and slow-query capture against a real
//! PostgreSQL, with default sampler settings: the rate of the counter is the number of
//! sessions active on each wait event, pgvigil's own sessions never count, top-N queries
//! keep their query id; and with the default `activity.sample_interval`, slow executions
//! become spans whether the connection goes idle between queries or not.

mod common;

use std::time::{Duration, Instant};

use common::otlp::{hex, OtlpReceiver};
use common::*;

const LOAD: &str = "pg_activity_active_seconds_total";

/// pgvigil as the `pg_monitor`-only role `monitor`, default sampler settings.
fn start_as_monitor(pg: &TempCluster, extra: &str) -> Running {
    let dsn = pg_monitor_dsn(pg, "postgres");
    start(config(&one_target(&dsn, extra)))
}

/// The sum of the load counter over the series matching `want`.
fn load(samples: &[Sample], want: &[(&str, &str)]) -> f64 {
    find(samples, LOAD, want).iter().map(|s| s.value).sum()
}

fn scrape(run: &Running) -> (Instant, Vec<Sample>) {
    let at = Instant::now();
    (at, parse(&get(&run.url("/metrics")).1))
}

/// The load's rate over `secs` seconds from now: two scrapes of the counter.
fn rate_over(run: &Running, secs: u64, want: &[(&str, &str)]) -> (f64, Vec<Sample>) {
    let (t0, a) = scrape(run);
    std::thread::sleep(Duration::from_secs(secs));
    let (t1, b) = scrape(run);
    let rate = (load(&b, want) - load(&a, want)) / (t1 - t0).as_secs_f64();
    (rate, b)
}

fn wait_for_sampler(run: &Running) {
    wait_for(run, Duration::from_secs(30), "the activity sampler", |s| {
        value(
            s,
            "pgvigil_collector_last_success_timestamp_seconds",
            &[("collector", "activity")],
        )
    });
}

#[test]
fn three_sleeping_sessions_are_a_load_of_three_and_pgvigil_is_not_counted() {
    let pg = cluster(&[]);
    let run = start_as_monitor(&pg, "");
    wait_for_sampler(&run);
    // One short pg_sleep first, so the statements collector makes its query id a top-N
    // member before the long ones start (same normalized query, same id: an integer
    // constant, as in pg_sleep(14)).
    let warm = Session::connect(&pg.dsn());
    warm.run("SELECT pg_sleep(0)");
    let queryid = wait_for(
        &run,
        Duration::from_secs(30),
        "pg_sleep in the top N",
        |s| {
            find(s, "pg_stat_statements_query_info", &[])
                .iter()
                .find(|x| x.labels["query"].contains("pg_sleep"))
                .map(|x| x.labels["queryid"].clone())
        },
    );
    std::thread::sleep(Duration::from_secs(2));

    let sessions: Vec<Session> = (0..3).map(|_| Session::connect(&pg.dsn())).collect();
    let running: Vec<Pending> = sessions
        .iter()
        .map(|s| s.start("SELECT pg_sleep(14)"))
        .collect();
    std::thread::sleep(Duration::from_millis(2500));
    let (rate, samples) = rate_over(&run, 9, &[("wait_event", "PgSleep")]);
    println!("PgSleep load over 9 s: {rate:.3}");
    for p in running {
        p.wait(Duration::from_secs(30)).unwrap();
    }
    assert!(
        (rate - 3.0).abs() <= 0.5,
        "PgSleep load {rate}, want 3 ± 0.5"
    );
    let sleeping = find(&samples, LOAD, &[("wait_event", "PgSleep")]);
    assert!(
        sleeping
            .iter()
            .all(|s| s.labels["wait_event_type"] == "Timeout"
                && s.labels["datname"] == "postgres"
                && s.labels["user"] == "postgres"
                && s.labels["queryid"] == queryid),
        "a top-N query keeps its id {queryid}: {sleeping:#?}"
    );
    // pgvigil ran its collectors every second as `monitor` all along.
    let own = find(&samples, LOAD, &[("user", "monitor")]);
    assert!(own.is_empty(), "pgvigil's own sessions counted: {own:#?}");
    assert!(
        samples
            .iter()
            .any(|s| s.name == "pgvigil_collector_duration_seconds"
                && s.labels["collector"] == "activity"),
        "the sampler reports like a collector"
    );
}

#[test]
fn two_sessions_blocked_on_a_row_lock_are_a_lock_load_of_two() {
    let pg = cluster(&[]);
    pg.psql(
        "postgres",
        "CREATE TABLE accounts (id int PRIMARY KEY, balance int); INSERT INTO accounts VALUES (1, 0)",
    )
    .unwrap();
    let run = start_as_monitor(&pg, "");
    wait_for_sampler(&run);
    let holder = Session::connect(&pg.dsn());
    holder.run("BEGIN; UPDATE accounts SET balance = 1 WHERE id = 1");
    let w1 = Session::connect(&pg.dsn());
    let w2 = Session::connect(&pg.dsn());
    let p1 = w1.start("UPDATE accounts SET balance = 2 WHERE id = 1");
    let p2 = w2.start("UPDATE accounts SET balance = 3 WHERE id = 1");
    let blocked = Instant::now();
    wait_until(Duration::from_secs(10), "two lock waits", || {
        waits_for_lock(&pg, w1.pid) && waits_for_lock(&pg, w2.pid)
    });
    std::thread::sleep(Duration::from_secs(2));
    let (rate, samples) = rate_over(&run, 8, &[("wait_event_type", "Lock")]);
    std::thread::sleep(Duration::from_secs(12).saturating_sub(blocked.elapsed()));
    holder.run("ROLLBACK");
    p1.wait(Duration::from_secs(10)).unwrap();
    p2.wait(Duration::from_secs(10)).unwrap();
    println!(
        "Lock load over 8 s: {rate:.3}; series: {:?}",
        find(&samples, LOAD, &[("wait_event_type", "Lock")])
    );
    assert!((rate - 2.0).abs() <= 0.5, "Lock load {rate}, want 2 ± 0.5");
    assert!(
        !find(&samples, LOAD, &[("wait_event", "transactionid")]).is_empty(),
        "row locks wait on the holder's transaction id"
    );
}

#[test]
fn a_cpu_bound_query_is_a_cpu_load_of_one() {
    let pg = cluster(&[]);
    let run = start_as_monitor(&pg, "");
    wait_for_sampler(&run);
    let s = Session::connect(&pg.dsn());
    // Pure CPU for 12 s whatever the machine's speed: no I/O, no lock, no parallel worker.
    let p = s.start(
        "SET max_parallel_workers_per_gather = 0;
         DO $$ BEGIN WHILE clock_timestamp() < now() + interval '12 s' LOOP END LOOP; END $$",
    );
    std::thread::sleep(Duration::from_secs(2));
    let (rate, samples) = rate_over(&run, 8, &[("wait_event_type", "CPU")]);
    p.wait(Duration::from_secs(30)).unwrap();
    let cpu = find(&samples, LOAD, &[("wait_event_type", "CPU")]);
    println!("CPU load over 8 s: {rate:.3}; series: {cpu:?}");
    assert!(
        (rate - 1.0).abs() <= 0.5,
        "CPU load {rate}, want 1 ± 0.5; {:#?}",
        samples
            .iter()
            .filter(|s| s.name.starts_with("pg_activity")
                || s.labels.get("collector").is_some_and(|c| c == "activity"))
            .collect::<Vec<_>>()
    );
    assert!(cpu.iter().all(|s| s.labels["wait_event"] == "CPU"));
}

/// A parallel query: its workers count too, under the leader's query id, so one client
/// session with two workers is a load of about three.
#[test]
fn parallel_workers_count_under_the_leaders_query() {
    let pg = cluster(&[]);
    pg.psql(
        "postgres",
        "CREATE TABLE t AS SELECT g FROM generate_series(1, 15000) g; ANALYZE t;
         ALTER TABLE t SET (parallel_workers = 2)",
    )
    .unwrap();
    let run = start_as_monitor(&pg, "");
    wait_for_sampler(&run);
    let s = Session::connect(&pg.dsn());
    // 15000 rows × 2 ms of pg_sleep (parallel safe) over the leader and two workers: ~10 s,
    // so the 6 s window holds six samples at the default (tracing off) interval of 1 s.
    let p = s.start(
        "SET max_parallel_workers_per_gather = 2; SET parallel_setup_cost = 0;
         SET parallel_tuple_cost = 0; SET min_parallel_table_scan_size = 0;
         SELECT count(*) FROM t WHERE pg_sleep(0.002) IS NOT NULL",
    );
    std::thread::sleep(Duration::from_millis(1500));
    let (rate, samples) = rate_over(&run, 6, &[("wait_event", "PgSleep")]);
    p.wait(Duration::from_secs(60)).unwrap();
    let sleeping = find(&samples, LOAD, &[("wait_event", "PgSleep")]);
    println!("PgSleep load of one parallel query over 6 s: {rate:.3}; {sleeping:?}");
    assert!(
        (2.0..=3.5).contains(&rate),
        "leader and two workers: PgSleep load {rate}, want about 3"
    );
    assert_eq!(
        sleeping.len(),
        1,
        "one series: workers under the leader's query"
    );
}

/// With default settings (`activity.sample_interval` and `slow_query_threshold`), 40
/// executions of 750 ms, each with its own `traceparent`: at least 38 become spans with the
/// right trace and parent ids, whether the connection goes idle between them or runs them
/// back to back; a span whose end was seen (the backend idle afterwards) is within 50 ms of
/// the real duration.
#[test]
fn slow_queries_become_spans_idle_between_and_back_to_back() {
    let pg = cluster(&[]);
    let addr = free_addr();
    let recv = OtlpReceiver::start(addr);
    let run = start(config(&one_target(
        &pg.dsn(),
        &format!("tracing:\n  otlp_endpoint: http://{addr}\n"),
    )));
    wait_for_sampler(&run);
    let ids = |pattern: usize, i: usize| {
        (
            format!(
                "{:032x}",
                0x4bf9_0000_0000_0000_0000_u128 + (pattern * 1000 + i) as u128
            ),
            format!("{:016x}", 0x00f0_0000_u64 + (pattern * 1000 + i) as u64),
        )
    };
    let sql = |pattern: usize, i: usize| {
        let (t, s) = ids(pattern, i);
        format!("SELECT pg_sleep(0.75) /*traceparent='00-{t}-{s}-01'*/")
    };
    let s = Session::connect(&pg.dsn());
    // Pattern 0: idle between queries (100 ms, a client thinking).
    for i in 0..40 {
        s.run(&sql(0, i));
        std::thread::sleep(Duration::from_millis(100));
    }
    // Pattern 1: back to back on one connection, one statement after the other.
    let all: String = (0..40).map(|i| format!("{};\n", sql(1, i))).collect();
    // Simple-query batches run statement by statement; each gets its own query_start.
    let mut psql = std::process::Command::new(pg.psql_program())
        .args(["-X", "-q", "-d", &pg.dsn()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        psql.stdin
            .take()
            .unwrap()
            .write_all(all.as_bytes())
            .unwrap();
    }
    assert!(psql.wait().unwrap().success());
    std::thread::sleep(Duration::from_secs(3));
    let spans = recv.spans();
    for pattern in 0..2 {
        let mut found = 0;
        let mut worst_exact: f64 = 0.0;
        for i in 0..40 {
            let (t, s) = ids(pattern, i);
            let hit: Vec<_> = spans
                .iter()
                .filter(|g| hex(&g.span.trace_id) == t && hex(&g.span.parent_span_id) == s)
                .collect();
            assert!(hit.len() <= 1, "one span per execution: {hit:#?}");
            let Some(g) = hit.first() else { continue };
            found += 1;
            let secs = (g.span.end_time_unix_nano - g.span.start_time_unix_nano) as f64 / 1e9;
            let exact = g.span.attributes.iter().any(|a| {
                a.key == "db.postgresql.end_exact"
                    && matches!(
                        a.value.as_ref().and_then(|v| v.value.clone()),
                        Some(common::otlp::Value::BoolValue(true))
                    )
            });
            if exact {
                worst_exact = worst_exact.max((secs - 0.75).abs());
            }
            assert!(
                (0.74..2.0).contains(&secs),
                "span {i} of pattern {pattern}: {secs} s"
            );
        }
        println!(
            "pattern {}: {found}/40 spans, worst exact-end error {:.1} ms",
            ["idle between", "back to back"][pattern],
            worst_exact * 1e3
        );
        assert!(found >= 38, "pattern {pattern}: only {found} of 40 spans");
        assert!(worst_exact <= 0.05, "exact end off by {worst_exact} s");
    }
}

/// Measurement behind the default `activity.sample_interval` (README, "Slow queries as
/// spans"): for each interval in `PGVIGIL_MEASURE_INTERVALS` (default 250ms,500ms,750ms,1s),
/// the share of 750 ms executions that become spans, idle between (100 ms) and back to
/// back; and the sampler's own cost at that interval from pg_stat_statements (its query's
/// calls and execution time per second). Run on purpose:
/// `cargo nextest run --test dbload --run-ignored only --no-capture -E 'test(measure)'`.
#[test]
#[ignore = "measurement, minutes long; run on purpose"]
fn measure_capture_rate_and_sampler_cost() {
    let intervals = std::env::var("PGVIGIL_MEASURE_INTERVALS")
        .unwrap_or_else(|_| "250ms,500ms,750ms,1s".into());
    let n: usize = std::env::var("PGVIGIL_MEASURE_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let pg = cluster(&[]);
    let monitor = pg_monitor_dsn(&pg, "postgres");
    for interval in intervals.split(',') {
        let addr = free_addr();
        let recv = OtlpReceiver::start(addr);
        let run = start(config(&one_target(
            &monitor,
            &format!(
                "activity:\n  sample_interval: {interval}\ntracing:\n  otlp_endpoint: http://{addr}\n"
            ),
        )));
        wait_for_sampler(&run);
        pg.psql("postgres", "SELECT pg_stat_statements_reset()")
            .unwrap();
        let t0 = Instant::now();
        let tag = |p: usize, i: usize| format!("{:032x}", (p * 100_000 + i + 1) as u128);
        let sql = |p: usize, i: usize| {
            format!(
                "SELECT pg_sleep(0.75) /*traceparent='00-{}-00f067aa0ba902b7-01'*/",
                tag(p, i)
            )
        };
        let s = Session::connect(&pg.dsn());
        for i in 0..n {
            s.run(&sql(0, i));
            std::thread::sleep(Duration::from_millis(100));
        }
        let all: String = (0..n).map(|i| format!("{};\n", sql(1, i))).collect();
        let mut psql = std::process::Command::new(pg.psql_program())
            .args(["-X", "-q", "-d", &pg.dsn()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            psql.stdin
                .take()
                .unwrap()
                .write_all(all.as_bytes())
                .unwrap();
        }
        assert!(psql.wait().unwrap().success());
        let secs = t0.elapsed().as_secs_f64();
        let cost = pg
            .psql(
                "postgres",
                "SELECT coalesce(sum(calls), 0) || ' ' || coalesce(sum(total_exec_time), 0)
                 FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid
                 WHERE r.rolname = 'monitor' AND s.query LIKE '%FROM pg_stat_activity%leader_pid IS NOT NULL%'",
            )
            .unwrap();
        let mut parts = cost.split_whitespace();
        let calls: f64 = parts.next().unwrap().parse().unwrap();
        let exec_ms: f64 = parts.next().unwrap().parse().unwrap();
        std::thread::sleep(Duration::from_secs(3));
        let spans = recv.spans();
        let rate = |p: usize| {
            (0..n)
                .filter(|i| spans.iter().any(|g| hex(&g.span.trace_id) == tag(p, *i)))
                .count()
        };
        println!(
            "MEASURE interval {interval}: idle-between {}/{n}, back-to-back {}/{n}; sampler {:.2} calls/s, {:.3} exec ms/s ({:.3} ms per call)",
            rate(0),
            rate(1),
            calls / secs,
            exec_ms / secs,
            exec_ms / calls.max(1.0)
        );
        drop(run);
    }
}
