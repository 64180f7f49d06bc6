//! pg_stat_statements against a real PostgreSQL: window mean/stddev from a known
//! workload, resets and evictions, the top-N bound with exact totals, a missing extension.

mod common;

use common::*;
use std::time::{Duration, Instant};

/// Config with only the statements collector (and `extra` YAML): every other built-in
/// collector is disabled, so no other query lands in pg_stat_statements.
fn statements_only(dsn: &str, extra: &str) -> pgvigil::config::Config {
    let all = pgvigil::collector::pack::Catalog::load(&Default::default()).unwrap();
    let others: Vec<String> = all
        .collectors
        .iter()
        .map(|c| c.name.0.clone())
        .filter(|n| n != "statements")
        .collect();
    config(&format!(
        "targets:\n  - name: t1\n    dsn: \"{dsn}\"\ncollectors:\n  disable: [{}]\n{extra}",
        others.join(", ")
    ))
}

fn sleep_queryid(samples: &[Sample], pattern: &str) -> String {
    let info = find(samples, "pg_stat_statements_query_info", &[]);
    let hit: Vec<_> = info
        .iter()
        .filter(|s| s.labels["query"].contains(pattern))
        .collect();
    assert_eq!(hit.len(), 1, "one query_info matching {pattern}: {info:?}");
    hit[0].labels["queryid"].clone()
}

fn sleeps(pg: &TempCluster, list: &[(usize, f64)]) {
    let mut sql = String::new();
    for (n, secs) in list {
        for _ in 0..*n {
            sql.push_str(&format!("SELECT pg_sleep({secs});\n"));
        }
    }
    pg.psql("postgres", &sql).unwrap();
}

fn population(samples: &[f64]) -> (f64, f64) {
    let n = samples.len() as f64;
    let mean = samples.iter().sum::<f64>() / n;
    let var = samples.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

#[test]
fn window_stddev_matches_the_workload_and_forgets_old_spikes() {
    let pg = cluster(&[]);
    let poller = ManualPoller::new(&statements_only(&pg.dsn(), ""));
    // History before the first poll, so the window is not the whole entry.
    sleeps(&pg, &[(5, 0.03)]);
    poller.poll();

    // 40 × 10 ms + 10 × 60 ms between two polls.
    sleeps(&pg, &[(40, 0.01), (10, 0.06)]);
    let s = poller.poll();
    let qid = sleep_queryid(&s, "pg_sleep");
    let want: Vec<f64> = std::iter::repeat_n(0.010, 40)
        .chain(std::iter::repeat_n(0.060, 10))
        .collect();
    let (want_mean, want_sd) = population(&want);
    let l = [("queryid", qid.as_str())];
    let calls = value(&s, "pg_stat_statements_window_calls", &l).unwrap();
    let mean = value(&s, "pg_stat_statements_window_exec_seconds_mean", &l).unwrap();
    let sd = value(&s, "pg_stat_statements_window_exec_seconds_stddev", &l).unwrap();
    println!("window 1: calls {calls} (want 50), mean {mean:.6} s (want {want_mean:.6}), stddev {sd:.6} s (want {want_sd:.6})");
    assert_eq!(calls, 50.0);
    // pg_sleep overshoots by a fraction of a millisecond per call: 1 ms tolerance.
    assert!(
        (mean - want_mean).abs() < 0.001,
        "mean {mean} vs {want_mean}"
    );
    assert!((sd - want_sd).abs() < 0.001, "stddev {sd} vs {want_sd}");

    // A steady window: 30 × 20 ms. Low window stddev, while since-reset stddev keeps
    // the earlier spread.
    sleeps(&pg, &[(30, 0.02)]);
    let s = poller.poll();
    let calls = value(&s, "pg_stat_statements_window_calls", &l).unwrap();
    let mean = value(&s, "pg_stat_statements_window_exec_seconds_mean", &l).unwrap();
    let sd = value(&s, "pg_stat_statements_window_exec_seconds_stddev", &l).unwrap();
    let since_reset = value(&s, "pg_stat_statements_exec_seconds_stddev", &l).unwrap();
    println!("window 2: calls {calls} (want 30), mean {mean:.6} s (want 0.020), stddev {sd:.6} s (want ~0), since-reset stddev {since_reset:.6} s");
    assert_eq!(calls, 30.0);
    assert!((mean - 0.020).abs() < 0.001, "mean {mean}");
    assert!(sd < 0.001, "steady window stddev {sd}");
    assert!(
        since_reset > 0.010,
        "since-reset stddev keeps the spike: {since_reset}"
    );
}

fn assert_sane(s: &[Sample]) {
    for x in s
        .iter()
        .filter(|x| x.name.starts_with("pg_stat_statements"))
    {
        assert!(x.value.is_finite(), "non-finite {x:?}");
        assert!(x.value >= 0.0, "negative {x:?}");
    }
}

/// Statements with distinct query ids: `SELECT 1 op 1 op … 1` where the 13 operators
/// spell `i` in binary (`+` for 0, `*` for 1).
fn distinct_statements(pg: &TempCluster, from: usize, to: usize) {
    let mut sql = String::new();
    for i in from..to {
        sql.push_str("SELECT 1");
        for bit in 0..13 {
            sql.push_str(if i >> bit & 1 == 1 { "*1" } else { "+1" });
        }
        sql.push_str(";\n");
    }
    pg.psql("postgres", &sql).unwrap();
}

#[test]
fn reset_and_eviction_give_no_negative_or_nan_values() {
    let pg = cluster(&[("pg_stat_statements.max", "100")]);
    let poller = ManualPoller::new(&statements_only(&pg.dsn(), ""));
    sleeps(&pg, &[(3, 0.01)]);
    poller.poll();
    sleeps(&pg, &[(3, 0.01)]);
    let s = poller.poll();
    assert_sane(&s);
    assert!(!find(&s, "pg_stat_statements_window_calls", &[]).is_empty());

    // Reset between polls: calls go down, nothing negative, no window for the entry.
    pg.psql("postgres", "SELECT pg_stat_statements_reset()")
        .unwrap();
    sleeps(&pg, &[(2, 0.01)]);
    let s = poller.poll();
    assert_sane(&s);
    assert!(
        value(&s, "pg_stat_statements_stats_reset_timestamp_seconds", &[]).is_some(),
        "reset time exported"
    );

    // Eviction: far more distinct statements than pg_stat_statements.max.
    distinct_statements(&pg, 0, 400);
    let s = poller.poll();
    assert_sane(&s);
    let dealloc = value(&s, "pg_stat_statements_dealloc_total", &[]).unwrap();
    assert!(dealloc >= 1.0, "evictions counted: {dealloc}");
    distinct_statements(&pg, 400, 700);
    let s = poller.poll();
    assert_sane(&s);
    distinct_statements(&pg, 0, 50);
    let s = poller.poll();
    assert_sane(&s);
}

#[test]
fn five_thousand_statements_keep_top_n_and_exact_totals() {
    let pg = cluster(&[
        ("pg_stat_statements.max", "10000"),
        ("pg_stat_statements.track_utility", "off"),
    ]);
    distinct_statements(&pg, 0, 5000);
    let poller = ManualPoller::new(&statements_only(&pg.dsn(), "statements: {top_n: 100}\n"));
    let mut previous: Option<(std::collections::HashMap<String, f64>, f64)> = None;
    for round in 0..2 {
        let texts_before = texts_calls(&pg);
        let s = poller.poll();
        // pgvigil's own statements query finished (and was counted) after it read the
        // view, and so did its texts query if queries entered the top N; nothing else ran
        // since.
        let sum: f64 = pg
            .psql("postgres", "SELECT sum(calls) FROM pg_stat_statements")
            .unwrap()
            .parse()
            .unwrap();
        let after = sum - (texts_calls(&pg) - texts_before);
        let calls = find(&s, "pg_stat_statements_calls_total", &[]);
        let ids: std::collections::HashSet<_> =
            calls.iter().map(|c| c.labels["queryid"].clone()).collect();
        let exported: f64 = calls.iter().map(|c| c.value).sum();
        println!(
            "round {round}: {} queryids incl. other, sum(calls_total) {exported}, SELECT sum(calls) {after} (minus pgvigil's own read = {})",
            ids.len(),
            after - 1.0
        );
        assert_eq!(ids.len(), 101, "100 queries + other");
        assert!(ids.contains("other"));
        let values: std::collections::HashMap<String, f64> = calls
            .iter()
            .map(|c| (c.labels["queryid"].clone(), c.value))
            .collect();
        match &previous {
            // At the first poll the series add up to the view's total.
            None => assert_eq!(exported, after - 1.0),
            // Later, what adds up is the increase (what rate() reads): the series present at
            // both polls grew by exactly what the view grew by, even if the top N changed
            // (`other` is accumulated from deltas, a new member's first sample counts nothing).
            Some((before, before_total)) => {
                let increase: f64 = values
                    .iter()
                    .filter_map(|(q, v)| before.get(q).map(|b| v - b))
                    .sum();
                assert_eq!(increase, (after - 1.0) - before_total);
            }
        }
        previous = Some((values, after - 1.0));
        assert_eq!(find(&s, "pg_stat_statements_query_info", &[]).len(), 100);
        // Gauges exist only for the top N.
        let means = find(&s, "pg_stat_statements_exec_seconds_mean", &[]);
        assert_eq!(means.len(), 100);
        distinct_statements(&pg, 0, 50);
    }
}

/// Rows pgvigil's statements query has returned so far (14+: the variant that leaves
/// unchanged entries out; the pattern is not in the text the view keeps of this query).
fn statements_rows(pg: &TempCluster) -> f64 {
    own_query_sum(pg, "rows", "NOT IN (SELECT unnest($1::int8[]))")
}

/// `sum(column)` over the pg_stat_statements entries whose text contains `pattern` (a
/// text of one of pgvigil's own queries, not found in this query's own kept text).
fn own_query_sum(pg: &TempCluster, column: &str, pattern: &str) -> f64 {
    pg.psql(
        "postgres",
        &format!(
            "SELECT coalesce(sum({column}), 0) FROM pg_stat_statements WHERE query LIKE '%{pattern}%'"
        ),
    )
    .unwrap()
    .parse()
    .unwrap()
}

#[test]
fn a_poll_ships_only_the_entries_that_changed_and_loses_none() {
    let pg = cluster(&[
        ("pg_stat_statements.max", "10000"),
        ("pg_stat_statements.track_utility", "off"),
    ]);
    distinct_statements(&pg, 0, 2000);
    // The first 100 ran ten times more: clearly the top N, so a statement outside it that
    // runs once more cannot displace one of them by a timing hair (on a loaded machine
    // the tie between single executions went either way).
    for _ in 0..10 {
        distinct_statements(&pg, 0, 100);
    }
    let poller = ManualPoller::new(&statements_only(&pg.dsn(), "statements: {top_n: 100}\n"));
    let first = poller.poll();
    let shipped_first = statements_rows(&pg);
    assert!(
        shipped_first >= 2000.0,
        "the first poll reads every entry: {shipped_first}"
    );
    // 30 queries outside the top N run again, then nothing.
    distinct_statements(&pg, 1970, 2000);
    let second = poller.poll();
    let shipped = statements_rows(&pg) - shipped_first;
    println!("first poll: {shipped_first} rows; second: {shipped}");
    // The members (always read), the 30 that ran, and the few statements this test and
    // pgvigil ran themselves (the view count, the rows count, pgvigil's own query).
    assert!(
        (30.0..=100.0 + 30.0 + 10.0).contains(&shipped),
        "the second poll shipped {shipped} rows of 2,000"
    );
    // The 30 that ran reached the series, in `other`: nothing left out is lost. `other`
    // takes the calls of the queries outside the top N at both polls: the 30, and a few
    // of this test's and pgvigil's own. (The sum over all series is not the measure:
    // pgvigil's own queries, milliseconds each, can enter the top N, and a series that
    // leaves takes its value with it.) The exact totals through this path are checked by
    // five_thousand_statements_keep_top_n_and_exact_totals, whose second poll leaves
    // unchanged entries out too.
    let other = |s: &[Sample]| {
        value(
            s,
            "pg_stat_statements_calls_total",
            &[("queryid", "other"), ("datname", "postgres")],
        )
        .expect("an other series")
    };
    let grown = other(&second) - other(&first);
    assert!(
        (30.0..=40.0).contains(&grown),
        "other's calls grew by {grown}: the 30 statements and a few of pgvigil's and this test's own"
    );
    assert_eq!(
        find(&second, "pg_stat_statements_calls_total", &[]).len(),
        101,
        "100 members and other"
    );
}

/// Calls of pgvigil's `texts` query so far (the pattern, a constant, is not in the text
/// pg_stat_statements keeps of this query itself).
fn texts_calls(pg: &TempCluster) -> f64 {
    own_query_sum(pg, "calls", "= ANY($1::text[]::bigint[])")
}

/// `SELECT pg_sleep(secs)` with `k` extra columns: a queryid of its own per `k`.
fn sleeper(k: usize, n: usize, secs: f64) -> String {
    format!("SELECT pg_sleep({secs}){};\n", ", 1".repeat(k)).repeat(n)
}

/// query_info texts of the members, by queryid.
fn texts(s: &[Sample]) -> std::collections::BTreeMap<String, String> {
    find(s, "pg_stat_statements_query_info", &[])
        .iter()
        .map(|i| (i.labels["queryid"].clone(), i.labels["query"].clone()))
        .collect()
}

#[test]
fn query_texts_are_read_once_when_a_query_enters_the_top_n() {
    let pg = cluster(&[("pg_stat_statements.track_utility", "off")]);
    let poller = ManualPoller::new(&statements_only(&pg.dsn(), "statements: {top_n: 2}\n"));
    let sql = format!(
        "{}{}{}",
        sleeper(1, 3, 0.02),
        sleeper(2, 3, 0.02),
        sleeper(3, 1, 0.001)
    );
    pg.psql("postgres", &sql).unwrap();

    // First poll: both members' texts, in one texts query.
    let before = texts_calls(&pg);
    let s = poller.poll();
    assert_eq!(
        texts_calls(&pg) - before,
        1.0,
        "one texts query for the new members"
    );
    let first = texts(&s);
    let mut want: Vec<&str> = vec!["SELECT pg_sleep($1), $2", "SELECT pg_sleep($1), $2, $3"];
    let mut got: Vec<&str> = first.values().map(String::as_str).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "{first:?}");

    // Steady membership: the texts are kept, not read again.
    for _ in 0..2 {
        let before = texts_calls(&pg);
        let s = poller.poll();
        assert_eq!(
            texts_calls(&pg) - before,
            0.0,
            "no texts query while members stay"
        );
        assert_eq!(texts(&s), first);
    }

    // A much busier query enters the top N: its text alone is read, right away.
    pg.psql("postgres", &sleeper(3, 10, 0.05)).unwrap();
    let before = texts_calls(&pg);
    let s = poller.poll();
    assert_eq!(
        texts_calls(&pg) - before,
        1.0,
        "one texts query for the newcomer"
    );
    let now = texts(&s);
    assert_eq!(now.len(), 2, "{now:?}");
    let newcomer: Vec<_> = now
        .iter()
        .filter(|(q, _)| !first.contains_key(*q))
        .collect();
    assert_eq!(newcomer.len(), 1, "{now:?}");
    assert_eq!(newcomer[0].1, "SELECT pg_sleep($1), $2, $3, $4");
    for (q, text) in &now {
        if let Some(old) = first.get(q) {
            assert_eq!(old, text, "a remaining member keeps its text");
        }
    }
    let before = texts_calls(&pg);
    let s = poller.poll();
    assert_eq!(texts_calls(&pg) - before, 0.0);
    assert_eq!(texts(&s), now);
}

#[test]
fn missing_extension_is_skipped_not_failing_and_the_rest_goes_on() {
    // Not preloaded and not created.
    let pg = TempCluster::start(
        ClusterOptions::default()
            .with_setting("shared_preload_libraries", "")
            .with_extensions(Vec::<String>::new()),
    )
    .unwrap();
    // Skipped by plan, not failing: a gauge, never a growing error count.
    let skipped = [("collector", "statements"), ("reason", "missing_extension")];
    let poller = ManualPoller::new(&config(&one_target(&pg.dsn(), "")));
    for _ in 0..3 {
        poller.poll();
    }
    let s = poller.poll();
    assert_eq!(value(&s, "pgvigil_collector_skipped", &skipped), Some(1.0));
    assert!(find(&s, "pgvigil_collector_errors_total", &[]).is_empty());
    assert_eq!(
        value(
            &s,
            "pgvigil_collector_series",
            &[("collector", "statements")]
        ),
        Some(0.0)
    );
    assert!(find(&s, "pg_stat_statements_calls_total", &[]).is_empty());
    assert!(value(&s, "pg_settings_max_connections", &[]).is_some());

    // Created but not preloaded: PostgreSQL refuses to read it.
    pg.psql("postgres", "CREATE EXTENSION pg_stat_statements")
        .unwrap();
    let poller = ManualPoller::new(&config(&one_target(&pg.dsn(), "")));
    poller.poll();
    let s = poller.poll();
    assert_eq!(value(&s, "pgvigil_collector_skipped", &skipped), Some(1.0));
    assert!(find(&s, "pgvigil_collector_errors_total", &[]).is_empty());
    assert!(value(&s, "pg_settings_max_connections", &[]).is_some());
}

/// Statement `i` of a family of distinct queries (a different operator pattern each, so a
/// different queryid).
fn statement(i: usize) -> String {
    let mut sql = String::from("SELECT 1");
    for bit in 0..8 {
        sql.push_str(if i >> bit & 1 == 1 { "*1" } else { "+1" });
    }
    sql
}

/// `queryid="other"` is a true counter (issue: no resets when a query enters or leaves the
/// top N). A workload whose hot queries move every poll or two, top N = 3, 60 polls 1 s
/// apart: `other` never decreases, and the increase Prometheus would compute over the run —
/// per series, resets included, summed over all series — equals the increase of
/// `SELECT sum(calls)` for the workload's role.
#[test]
fn other_never_decreases_and_rates_add_up_under_a_shifting_workload() {
    // 12 queries, so every hot set comes back every 8 polls: queries leave the top N and
    // re-enter it, many times.
    const QUERIES: usize = 12;
    const POLLS: usize = 60;
    let pg = cluster(&[("pg_stat_statements.track_utility", "off")]);
    pg.psql("postgres", "CREATE ROLE app LOGIN").unwrap();
    let app = Session::connect(&pg.dsn_for("app", "postgres"));
    let truth = || -> f64 {
        pg.psql(
            "postgres",
            "SELECT coalesce(sum(s.calls), 0) FROM pg_stat_statements s \
             JOIN pg_roles r ON r.oid = s.userid WHERE r.rolname = 'app'",
        )
        .unwrap()
        .parse()
        .unwrap()
    };
    // Every query once, the hot three `hot_calls` times more.
    let run = |round: usize, hot_calls: usize| {
        let hot_start = 3 * (round / 2) % QUERIES;
        let mut sql = String::new();
        for i in 0..QUERIES {
            let hot = (hot_start..hot_start + 3).contains(&i);
            for _ in 0..(1 + if hot { hot_calls } else { 0 }) {
                sql.push_str(&statement(i));
                sql.push_str(";\n");
            }
        }
        app.run(&sql);
    };
    run(0, 30);
    let poller = ManualPoller::new(&statements_only(&pg.dsn(), "statements: {top_n: 3}\n"));

    let app_calls = |s: &[Sample]| -> Vec<(String, f64)> {
        find(s, "pg_stat_statements_calls_total", &[("user", "app")])
            .iter()
            .map(|c| (c.labels["queryid"].clone(), c.value))
            .collect()
    };
    let mut last: std::collections::HashMap<String, f64> = Default::default();
    let mut increase = 0.0;
    let mut members_before: Option<std::collections::BTreeSet<String>> = None;
    let mut changes = 0;
    let mut start_truth = 0.0;
    let started = Instant::now();
    for round in 0..POLLS {
        if round > 0 {
            run(round, 30);
        }
        let s = poller.poll();
        if round == 0 {
            start_truth = truth();
        }
        let calls = app_calls(&s);
        for (queryid, v) in &calls {
            if let Some(prev) = last.get(queryid) {
                if queryid == "other" {
                    assert!(
                        v >= prev,
                        "poll {round}: other went down from {prev} to {v}"
                    );
                }
                // Prometheus: a decrease is a reset, and the new value is the increase.
                increase += if v >= prev { v - prev } else { *v };
            }
            last.insert(queryid.clone(), *v);
        }
        let members: std::collections::BTreeSet<String> = calls
            .iter()
            .map(|(q, _)| q.clone())
            .filter(|q| q != "other")
            .collect();
        // pgvigil's own statements query (as another role) may hold one of the places.
        assert!(members.len() <= 3, "poll {round}: top N = 3: {members:?}");
        if members_before.as_ref().is_some_and(|b| *b != members) {
            changes += 1;
        }
        members_before = Some(members);
        // 1 s scrapes.
        let next = started + Duration::from_secs(round as u64 + 1);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let real = truth() - start_truth;
    println!(
        "{changes} membership changes; increase over all series {increase}, SELECT sum(calls) grew by {real}"
    );
    assert!(changes >= 5, "only {changes} membership changes");
    assert!(
        (increase - real).abs() <= 0.02 * real,
        "sum of per-series increases {increase} vs the real increase {real}"
    );
}
