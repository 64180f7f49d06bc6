//! Per-table statistics against a real PostgreSQL: the union of the top N by size, xid age
//! and dead tuples, the `table="other"` row (sums that add up, counters that never
//! decrease), partitioned parents left out, and the series bound with 2,000 tables.

mod common;

use common::*;
use std::collections::BTreeSet;

const TABLE_METRICS: &[&str] = &[
    "pg_table_size_bytes",
    "pg_table_live_tuples",
    "pg_table_dead_tuples",
    "pg_table_seq_scans_total",
    "pg_table_index_scans_total",
    "pg_table_xid_age",
    "pg_table_last_autovacuum_timestamp_seconds",
    "pg_table_last_autoanalyze_timestamp_seconds",
];

/// Config with only the `tables` collector (and `extra` YAML).
fn tables_only(dsn: &str, extra: &str) -> pgvigil::config::Config {
    let all = pgvigil::collector::pack::Catalog::load(&Default::default()).unwrap();
    let others: Vec<String> = all
        .collectors
        .iter()
        .map(|c| c.name.0.clone())
        .filter(|n| n != "tables")
        .collect();
    config(&format!(
        "targets:\n  - name: t1\n    dsn: \"{dsn}\"\ncollectors:\n  disable: [{}]\n{extra}",
        others.join(", ")
    ))
}

/// The distinct `table` labels of every `pg_table_*` series of database `db`.
fn tables_of(samples: &[Sample], db: &str) -> BTreeSet<String> {
    samples
        .iter()
        .filter(|s| TABLE_METRICS.contains(&s.name.as_str()))
        .filter(|s| s.labels.get("datname").map(String::as_str) == Some(db))
        .map(|s| s.labels["table"].clone())
        .collect()
}

fn other(samples: &[Sample], name: &str) -> f64 {
    value(samples, name, &[("datname", "app"), ("table", "other")])
        .unwrap_or_else(|| panic!("{name}{{table=\"other\"}} missing"))
}

#[test]
fn top_n_keeps_the_largest_oldest_and_deadest_tables_and_other_adds_up() {
    let pg = cluster(&[]);
    pg.psql("postgres", "CREATE DATABASE app").unwrap();
    // The oldest table first, then xids burnt, then everything else frozen.
    pg.psql(
        "app",
        "CREATE TABLE old_one (id int) WITH (autovacuum_enabled = off);
         INSERT INTO old_one VALUES (1);",
    )
    .unwrap();
    pg.psql("app", &"SELECT txid_current();\n".repeat(300))
        .unwrap();
    pg.psql(
        "app",
        "DO $$ BEGIN FOR i IN 0..199 LOOP
           EXECUTE format('CREATE TABLE small_%s (id int) WITH (autovacuum_enabled = off)', i);
           EXECUTE format('INSERT INTO small_%s VALUES (1)', i);
         END LOOP; END $$;
         CREATE TABLE big_1 (id int, t text);
         CREATE TABLE big_2 (id int, t text);
         CREATE TABLE big_3 (id int, t text);
         INSERT INTO big_1 SELECT g, md5(g::text) FROM generate_series(1, 60000) g;
         INSERT INTO big_2 SELECT g, md5(g::text) FROM generate_series(1, 50000) g;
         INSERT INTO big_3 SELECT g, md5(g::text) FROM generate_series(1, 40000) g;
         CREATE TABLE dead_one (id int) WITH (autovacuum_enabled = off);
         INSERT INTO dead_one SELECT generate_series(1, 20000);
         DELETE FROM dead_one;
         CREATE TABLE parted (id int) PARTITION BY RANGE (id);
         CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (100);
         INSERT INTO parted VALUES (1);",
    )
    .unwrap();
    let others = pg
        .psql(
            "app",
            "SELECT string_agg(format('%I.%I', n.nspname, c.relname), ', ')
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'm') AND c.relname NOT IN ('old_one', 'dead_one')",
        )
        .unwrap();
    pg.psql("app", &format!("VACUUM FREEZE {others}")).unwrap();
    wait_until(
        std::time::Duration::from_secs(10),
        "dead tuples counted",
        || {
            pg.psql(
                "app",
                "SELECT n_dead_tup FROM pg_stat_all_tables WHERE relname = 'dead_one'",
            )
            .unwrap()
                == "20000"
        },
    );

    let poller = ManualPoller::new(&tables_only(&pg.dsn(), "tables: {top_n: 5}\n"));
    let s = poller.poll();
    let want_size: f64 = pg
        .psql(
            "app",
            "SELECT sum(pg_table_size(oid)) FROM pg_class
             WHERE relkind IN ('r', 'm') AND relpersistence <> 't' AND oid >= 16384",
        )
        .unwrap()
        .parse()
        .unwrap();
    let names = tables_of(&s, "app");
    println!("app: {} tables with series: {names:?}", names.len());
    if names.is_empty() {
        println!("{}", poller.text());
    }
    assert!(names.len() <= 5 * 3 + 1, "{} > 16: {names:?}", names.len());
    for t in ["big_1", "old_one", "dead_one", "other"] {
        assert!(names.contains(t), "{t} has no series: {names:?}");
    }
    let l = |t: &'static str| [("datname", "app"), ("table", t)];
    assert!(value(&s, "pg_table_size_bytes", &l("big_1")).is_some());
    assert!(value(&s, "pg_table_xid_age", &l("old_one")).unwrap() >= 300.0);
    assert_eq!(
        value(&s, "pg_table_dead_tuples", &l("dead_one")),
        Some(20000.0)
    );
    assert!(
        find(&s, "pg_table_xid_age", &[("table", "parted")]).is_empty(),
        "a partitioned parent has no xid age"
    );
    for x in find(&s, "pg_table_xid_age", &[]) {
        assert!(x.value < 1e9, "{x:?}");
    }
    assert!(find(
        &s,
        "pg_table_last_autovacuum_timestamp_seconds",
        &[("table", "other")]
    )
    .is_empty());
    let got_size: f64 = find(&s, "pg_table_size_bytes", &[("datname", "app")])
        .iter()
        .map(|x| x.value)
        .sum();
    println!("app: sum of pg_table_size_bytes {got_size}, pg_table_size() sum {want_size}");
    assert!(
        (got_size - want_size).abs() <= want_size * 0.01,
        "sum {got_size} vs {want_size}"
    );
    let seq0 = other(&s, "pg_table_seq_scans_total");

    // small_7 grows bigger than every table, and small tables are scanned.
    assert!(!names.contains("small_7"));
    pg.psql(
        "app",
        "INSERT INTO small_7 SELECT generate_series(1, 300000);
         SELECT count(*) FROM small_7; SELECT count(*) FROM small_8; SELECT count(*) FROM small_9;",
    )
    .unwrap();
    // The scans reach pg_stat_user_tables when psql's backend flushes its statistics on
    // exit, which can come a moment after psql returned: poll until they are there.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let s = loop {
        let s = poller.poll();
        if other(&s, "pg_table_seq_scans_total") >= seq0 + 2.0
            || std::time::Instant::now() > deadline
        {
            break s;
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    let names2 = tables_of(&s, "app");
    assert!(names2.contains("small_7"), "{names2:?}");
    let seq1 = other(&s, "pg_table_seq_scans_total");
    println!("other seq scans: {seq0} -> {seq1}");
    assert!(
        seq1 >= seq0 + 2.0,
        "small_8, small_9 scans: {seq0} -> {seq1}"
    );
    // It is truncated, two members of other are dropped, one is scanned.
    pg.psql(
        "app",
        "TRUNCATE small_7; DROP TABLE small_8, small_9; SELECT count(*) FROM small_10;",
    )
    .unwrap();
    let s = poller.poll();
    let seq2 = other(&s, "pg_table_seq_scans_total");
    println!("other seq scans: {seq1} -> {seq2}");
    assert!(seq2 >= seq1, "other decreased: {seq1} -> {seq2}");
    let idx2 = other(&s, "pg_table_index_scans_total");
    let s = poller.poll();
    assert!(other(&s, "pg_table_seq_scans_total") >= seq2);
    assert!(other(&s, "pg_table_index_scans_total") >= idx2);
}

#[test]
fn two_thousand_tables_keep_at_most_three_top_n_plus_one_series_per_database() {
    let pg = cluster(&[]);
    pg.psql("postgres", "CREATE DATABASE app").unwrap();
    let count =
        |s: &[Sample], prefix: &str| s.iter().filter(|x| x.name.starts_with(prefix)).count();
    let all = |extra: &str| {
        config(&format!(
            "targets:\n  - name: t1\n    dsn: \"{}\"\n{extra}",
            pg.dsn()
        ))
    };
    let without = ManualPoller::new(&all("collectors:\n  disable: [tables, unused_indexes]\n"));
    let with = ManualPoller::new(&all(""));
    let (a, b) = (without.poll(), with.poll());
    println!(
        "fresh cluster: {} series without the tables pack, {} with it ({} pg_table_*)",
        a.len(),
        b.len(),
        count(&b, "pg_table_")
    );
    pg.psql(
        "app",
        "DO $$ BEGIN FOR i IN 0..1999 LOOP
           EXECUTE format('CREATE TABLE t_%s (id int PRIMARY KEY, n int)', i);
           EXECUTE format('INSERT INTO t_%s VALUES (1, 1)', i);
           EXECUTE format('DELETE FROM t_%s', i);
         END LOOP; END $$;",
    )
    .unwrap();
    let s = with.poll();
    println!(
        "2,000 tables: {} series ({} pg_table_*, {} pg_index_unused_bytes)",
        s.len(),
        count(&s, "pg_table_"),
        count(&s, "pg_index_unused_bytes")
    );
    for db in ["app", "postgres"] {
        let names = tables_of(&s, db);
        println!("{db}: {} tables with series", names.len());
        assert!(names.len() <= 3 * 50 + 1, "{db}: {}", names.len());
        for m in TABLE_METRICS {
            let n = find(&s, m, &[("datname", db)]).len();
            assert!(n <= 3 * 50 + 1, "{m} {db}: {n} series");
        }
    }
}

#[test]
fn a_dropped_database_loses_its_series_and_the_others_keep_theirs() {
    let pg = cluster(&[]);
    for db in ["app", "gone"] {
        pg.psql("postgres", &format!("CREATE DATABASE {db}"))
            .unwrap();
        pg.psql(db, "CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
            .unwrap();
    }
    let run = start(tables_only(
        &pg.dsn(),
        "  defaults: {interval: 1s, timeout: 5s}\n",
    ));
    wait_for(
        &run,
        std::time::Duration::from_secs(30),
        "tables of app and gone",
        |s| (tables_of(s, "app").contains("t") && tables_of(s, "gone").contains("t")).then_some(()),
    );
    pg.psql("postgres", "DROP DATABASE gone WITH (FORCE)")
        .unwrap();
    // The next round of visits finds `gone` missing and drops its snapshot.
    let left = wait_for(
        &run,
        std::time::Duration::from_secs(30),
        "no series of gone",
        |s| tables_of(s, "gone").is_empty().then(|| tables_of(s, "app")),
    );
    assert!(left.contains("t"), "app keeps its tables: {left:?}");
}
