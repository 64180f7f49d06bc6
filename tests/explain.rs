//! Plans on slow spans (`tracing.explain: generic`) against real PostgreSQL servers and a
//! real OTLP gRPC receiver: the generic plan on a PostgreSQL 16+ span, once per query per
//! hour (cached), skipped with a reason for a utility statement, for a role with only
//! pg_monitor (EXPLAIN needs SELECT on the tables) and on PostgreSQL 15. Server binaries:
//! `PGVIGIL_TEST_PG_BINDIRS` (colon-separated, from `scripts/fetch-pg.sh`) plus the local
//! installation.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use common::otlp::{attr, attr_str, hex, OtlpReceiver, ReceivedSpan, Value};
use common::*;

const T: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const S: &str = "00f067aa0ba902b7";

/// The slow query of these tests: a literal in the WHERE clause (it must not reach the
/// plan) and a sqlcommenter comment (it must not reach EXPLAIN).
fn slow_select(secs: f64) -> String {
    format!("SELECT pg_sleep({secs}), x FROM t WHERE id = 1 AND x <> 'secret-literal' /*traceparent='00-{T}-{S}-01'*/")
}

fn explain_config(dsn: &str, otlp: SocketAddr, explain: &str) -> String {
    format!(
        "{}activity:\n  sample_interval: 200ms\ntracing:\n  otlp_endpoint: http://{otlp}\n  slow_query_threshold: 500ms\n  explain: {explain}\n",
        one_target(dsn, "")
    )
}

/// The major version of the server in `bindir` (`postgres --version`).
fn major(bindir: &std::path::Path) -> Option<u32> {
    let out = Command::new(bindir.join("postgres"))
        .arg("--version")
        .env("LD_LIBRARY_PATH", bindir.join("../lib"))
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text.rsplit(' ').next()?.trim();
    v.split('.').next()?.parse().ok()
}

/// A server binary directory whose major version satisfies `want`.
fn bindir(want: impl Fn(u32) -> bool, what: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var("PGVIGIL_TEST_PG_BINDIRS")
        .unwrap_or_default()
        .split(':')
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .collect();
    if let Ok(local) = pgvigil::demo::cluster::find_bindir() {
        dirs.push(local);
    }
    dirs.into_iter()
        .find(|d| major(d).is_some_and(&want))
        .unwrap_or_else(|| {
            panic!("no PostgreSQL {what} server; set PGVIGIL_TEST_PG_BINDIRS=$(scripts/fetch-pg.sh | paste -sd: -)")
        })
}

fn cluster_in(bindir: &std::path::Path) -> TempCluster {
    let opts = ClusterOptions::default()
        .with_bindir(bindir)
        .with_setting("log_statement", "all")
        .with_setting("log_line_prefix", "[%p] ");
    let pg = TempCluster::start(opts).unwrap_or_else(|e| panic!("{}: {e}", bindir.display()));
    pg.psql(
        "postgres",
        "CREATE TABLE t (id int PRIMARY KEY, x text); INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 1000) g; ANALYZE t;",
    )
    .unwrap();
    pg
}

fn spans_named<'a>(spans: &'a [ReceivedSpan], name: &str) -> Vec<&'a ReceivedSpan> {
    spans.iter().filter(|s| s.span.name == name).collect()
}

fn skipped(s: &ReceivedSpan) -> Option<String> {
    match attr(&s.span.attributes, "db.postgresql.plan.skipped") {
        Some(Value::StringValue(r)) => Some(r),
        _ => None,
    }
}

#[test]
fn generic_plan_on_a_slow_select_once_per_query_and_a_reason_for_a_utility() {
    let pg = cluster_in(&bindir(|v| v >= 16, "16+"));
    println!("PostgreSQL {}", pg.major_version());
    let addr = free_addr();
    let recv = OtlpReceiver::start(addr);
    let run = start(config(&explain_config(&pg.dsn(), addr, "generic")));
    std::thread::sleep(std::time::Duration::from_millis(600));

    pg.psql("postgres", &slow_select(0.8)).unwrap();
    pg.psql("postgres", &slow_select(0.8)).unwrap();
    pg.psql("postgres", "DO $$ BEGIN PERFORM pg_sleep(0.8); END $$")
        .unwrap();
    // A data-modifying statement is planned too, never run (pgvigil's session is read-only).
    pg.psql(
        "postgres",
        "UPDATE t SET x = x || 'u' || pg_sleep(0.8)::text WHERE id = 2",
    )
    .unwrap();
    let spans = recv.wait_for("two SELECT spans, the DO and the UPDATE span", |s| {
        spans_named(s, "SELECT t").len() == 2
            && s.iter().any(|g| g.span.name == "DO")
            && s.iter().any(|g| g.span.name == "UPDATE t")
    });

    let selects = spans_named(&spans, "SELECT t");
    for s in &selects {
        assert_eq!(hex(&s.span.trace_id), T, "still in the application's trace");
        assert_eq!(skipped(s), None, "{:#?}", s.span.attributes);
    }
    let plan = attr_str(&selects[0].span.attributes, "db.postgresql.plan");
    println!("plan: {plan}");
    let json: serde_json::Value = serde_json::from_str(&plan).expect("the plan is JSON");
    let top = &json[0]["Plan"];
    assert!(top["Node Type"].is_string(), "{json:#}");
    assert!(
        plan.contains("\"t\"") && plan.contains("$3"),
        "a generic plan over t, the literals parameters: {plan}"
    );
    assert!(!plan.contains("secret"), "no literal in the plan: {plan}");
    assert!(!plan.contains("traceparent"), "{plan}");
    // The second execution of the same query reuses the first one's plan.
    assert_eq!(
        attr_str(&selects[1].span.attributes, "db.postgresql.plan"),
        plan
    );
    assert_eq!(
        attr(&selects[1].span.attributes, "db.postgresql.plan.cached"),
        Some(Value::BoolValue(true))
    );

    let update = spans.iter().find(|g| g.span.name == "UPDATE t").unwrap();
    let update_plan = attr_str(&update.span.attributes, "db.postgresql.plan");
    assert!(update_plan.contains("ModifyTable"), "{update_plan}");
    assert_eq!(
        pg.psql("postgres", "SELECT x FROM t WHERE id = 2").unwrap(),
        "v2u",
        "the UPDATE ran once, by the client, not by EXPLAIN"
    );

    // The EXPLAIN ran on a read-only session under a 2 s statement_timeout.
    let log = std::fs::read_to_string(pg.log_path()).unwrap();
    let pid_of = |needle: &str| {
        log.lines()
            .find(|l| l.contains(needle))
            .and_then(|l| l.strip_prefix('['))
            .and_then(|l| l.split_once(']'))
            .map(|(pid, _)| pid.to_string())
    };
    let explainer =
        pid_of("EXPLAIN (GENERIC_PLAN, FORMAT JSON) SELECT").expect("EXPLAIN in the log");
    let own = |needle: &str| {
        log.lines()
            .any(|l| l.starts_with(&format!("[{explainer}]")) && l.contains(needle))
    };
    assert!(
        own("SET default_transaction_read_only = on"),
        "{}",
        pg.log_tail(80)
    );
    assert!(own("SET statement_timeout = 2000"), "{}", pg.log_tail(80));
    assert!(!log.contains("EXPLAIN (ANALYZE"));

    let utility = spans.iter().find(|g| g.span.name == "DO").unwrap();
    assert_eq!(skipped(utility).as_deref(), Some("not_plannable"));
    assert!(attr(&utility.span.attributes, "db.postgresql.plan").is_none());

    let samples = wait_for(&run, std::time::Duration::from_secs(10), "counters", |s| {
        value(
            s,
            "pgvigil_explain_skipped_total",
            &[("reason", "not_plannable")],
        )
        .filter(|v| *v >= 1.0)
        .map(|_| s.to_vec())
    });
    assert_eq!(
        value(&samples, "pgvigil_explain_total", &[]),
        Some(2.0),
        "one EXPLAIN for two executions of the SELECT, one for the UPDATE"
    );
    assert_eq!(
        value(
            &samples,
            "pgvigil_explain_skipped_total",
            &[("reason", "not_plannable")]
        ),
        Some(1.0)
    );
    // The server agrees: two EXPLAINs ran (pgvigil's sessions are the only ones to run it;
    // the statement it explains is recorded again as a nested, not top-level, entry).
    let explains = pg
        .psql(
            "postgres",
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE toplevel AND query LIKE 'EXPLAIN (GENERIC_PLAN%'",
        )
        .unwrap();
    assert_eq!(explains, "2", "EXPLAINs seen by pg_stat_statements");
}

/// EXPLAIN needs SELECT on the tables: `pg_monitor` sees the query but cannot plan it.
#[test]
fn a_pg_monitor_role_gets_no_plan_reason_permission() {
    let pg = cluster_in(&bindir(|v| v >= 16, "16+"));
    pg.psql(
        "postgres",
        "CREATE ROLE monitor LOGIN; GRANT pg_monitor TO monitor;",
    )
    .unwrap();
    let addr = free_addr();
    let recv = OtlpReceiver::start(addr);
    let dsn = pg.dsn_for("monitor", "postgres");
    let run = start(config(&explain_config(&dsn, addr, "generic")));
    std::thread::sleep(std::time::Duration::from_millis(600));
    pg.psql("postgres", &slow_select(0.8)).unwrap();
    let spans = recv.wait_for("the SELECT span", |s| {
        !spans_named(s, "SELECT t").is_empty()
    });
    let s = spans_named(&spans, "SELECT t")[0];
    assert_eq!(
        skipped(s).as_deref(),
        Some("permission"),
        "{:#?}",
        s.span.attributes
    );
    let error = attr_str(&s.span.attributes, "db.postgresql.plan.error");
    assert!(error.contains("permission denied"), "{error}");
    let n = wait_for(
        &run,
        std::time::Duration::from_secs(10),
        "the skip count",
        |s| {
            value(
                s,
                "pgvigil_explain_skipped_total",
                &[("reason", "permission")],
            )
            .filter(|v| *v >= 1.0)
        },
    );
    assert_eq!(n, 1.0);
}

/// Before PostgreSQL 16 there is no `GENERIC_PLAN`: no EXPLAIN runs, the span says why.
#[test]
fn postgresql_15_gets_no_plan_reason_version() {
    let pg = cluster_in(&bindir(|v| v == 15, "15"));
    println!("PostgreSQL {}", pg.major_version());
    let addr = free_addr();
    let recv = OtlpReceiver::start(addr);
    let run = start(config(&explain_config(&pg.dsn(), addr, "generic")));
    std::thread::sleep(std::time::Duration::from_millis(600));
    pg.psql("postgres", &slow_select(0.8)).unwrap();
    let spans = recv.wait_for("the SELECT span", |s| {
        !spans_named(s, "SELECT t").is_empty()
    });
    let s = spans_named(&spans, "SELECT t")[0];
    assert_eq!(skipped(s).as_deref(), Some("version"));
    let samples = wait_for(
        &run,
        std::time::Duration::from_secs(10),
        "the skip count",
        |s| {
            value(s, "pgvigil_explain_skipped_total", &[("reason", "version")])
                .filter(|v| *v >= 1.0)
                .map(|_| s.to_vec())
        },
    );
    assert_eq!(value(&samples, "pgvigil_explain_total", &[]), Some(0.0));
}

/// Off by default: no plan attribute, no EXPLAIN counters.
#[test]
fn off_by_default() {
    let pg = cluster_in(&bindir(|v| v >= 16, "16+"));
    let addr = free_addr();
    let recv = OtlpReceiver::start(addr);
    let yaml = format!(
        "{}activity:\n  sample_interval: 200ms\ntracing:\n  otlp_endpoint: http://{addr}\n  slow_query_threshold: 500ms\n",
        one_target(&pg.dsn(), "")
    );
    let run = start(config(&yaml));
    std::thread::sleep(std::time::Duration::from_millis(600));
    pg.psql("postgres", &slow_select(0.8)).unwrap();
    let spans = recv.wait_for("the SELECT span", |s| {
        !spans_named(s, "SELECT t").is_empty()
    });
    let s = spans_named(&spans, "SELECT t")[0];
    assert!(attr(&s.span.attributes, "db.postgresql.plan").is_none());
    assert_eq!(skipped(s), None);
    let (_, body) = get(&run.url("/metrics"));
    assert!(!body.contains("pgvigil_explain_"), "{body}");
}
