//! Shutdown is bounded: on SIGTERM or SIGINT the real binary stops polling, cancels the
//! query it was running, flushes spans (giving up on a receiver that never answers) and
//! exits 0 within 5 s, leaving no pgvigil session on the server.

mod common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::binary::Pgvigil;
use common::{write, Session, TempCluster};

/// The bound the README states for SIGTERM/SIGINT → exit.
const BOUND: Duration = Duration::from_secs(5);

/// pgvigil sessions on the server (any application_name starting with `pgvigil`).
fn pgvigil_sessions(pg: &TempCluster) -> String {
    pg.psql(
        "postgres",
        "SELECT count(*) || ' ' || coalesce(string_agg(left(query, 40), ' | '), '') \
         FROM pg_stat_activity WHERE application_name LIKE 'pgvigil%' AND pid <> pg_backend_pid()",
    )
    .expect("read pg_stat_activity")
}

/// Starts pgvigil with a collector that sleeps 30 s (timeout 60 s) and tracing to a
/// receiver that accepts connections and never answers; waits until the sleep runs.
fn start(pg: &TempCluster, dir: &std::path::Path, otlp: &TcpListener) -> Pgvigil {
    let packs = dir.join("packs");
    std::fs::create_dir_all(&packs).unwrap();
    write(
        &packs,
        "sleepy.yaml",
        "collectors:\n  - name: sleepy\n    help: Sleeps.\n    interval: 1s\n    timeout: 60s\n    queries:\n      - sql: SELECT 1 AS v FROM pg_sleep(30)\n    metrics:\n      - name: test_sleepy\n        type: gauge\n        help: Slept.\n        value: v\n",
    );
    let config = write(
        dir,
        "pgvigil.yaml",
        &format!(
            "listen: 127.0.0.1:0\ntargets:\n  - name: db\n    dsn: \"{}\"\ncollectors:\n  paths: [\"{}\"]\nactivity:\n  sample_interval: 200ms\ntracing:\n  otlp_endpoint: http://{}\n  slow_query_threshold: 100ms\n",
            pg.dsn(),
            packs.display(),
            otlp.local_addr().unwrap()
        ),
    );
    let mut p = Pgvigil::start(["--config".as_ref(), config.as_os_str()], &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pgvigil_sessions(pg).contains("SELECT 1 AS v FROM pg_sleep(30)") {
        assert!(
            Instant::now() < deadline,
            "the sleepy collector never ran\n{}",
            p.log()
        );
        assert!(p.is_running(), "pgvigil exited\n{}", p.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    p
}

/// Sends `signal`, asserts exit 0 within [`BOUND`] and no pgvigil session left.
fn stops_within_bound(pg: &TempCluster, mut p: Pgvigil, signal: &str) {
    let sent = Instant::now();
    p.signal(signal);
    let status = p.wait_exit(Duration::from_secs(30));
    let took = sent.elapsed();
    let log = p.log();
    let status = status.unwrap_or_else(|| panic!("still running 30 s after SIG{signal}\n{log}"));
    assert_eq!(status.code(), Some(0), "SIG{signal}: exit status\n{log}");
    assert!(
        took <= BOUND,
        "SIG{signal}: exit took {took:?} (bound {BOUND:?})\n{log}"
    );
    assert!(log.contains("shutting down"), "{log}");
    eprintln!("SIG{signal}: exited 0 after {took:?}");
    // The backends see the cancel (or the closed socket) and go away.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let left = pgvigil_sessions(pg);
        if left.starts_with("0 ") || left == "0" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SIG{signal}: pgvigil sessions still on the server 3 s after exit: {left}\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigterm_and_sigint_exit_zero_within_bound_with_a_long_query_and_a_dead_receiver() {
    let pg = common::cluster(&[]);
    // Accepts (the kernel completes the handshake) and never answers: the worst receiver.
    let otlp = TcpListener::bind("127.0.0.1:0").unwrap();
    // A client's slow query, still running at shutdown: a span to flush.
    let client = Session::connect(&pg.dsn());
    let _slow = client.start("SELECT pg_sleep(120)");
    let dir = tempfile::tempdir().unwrap();

    let p = start(&pg, dir.path(), &otlp);
    std::thread::sleep(Duration::from_secs(1));
    stops_within_bound(&pg, p, "TERM");

    let p = start(&pg, dir.path(), &otlp);
    stops_within_bound(&pg, p, "INT");
}

/// With a receiver that answers, SIGTERM flushes the spans: a slow query still running at
/// shutdown arrives marked `db.postgresql.still_running`.
#[test]
fn sigterm_flushes_the_spans_of_queries_still_running() {
    use common::otlp::{attr, OtlpReceiver, Value};
    let pg = common::cluster(&[]);
    let addr = common::free_addr();
    let receiver = OtlpReceiver::start(addr);
    let client = Session::connect(&pg.dsn());
    let _slow = client.start("SELECT pg_sleep(120)");
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "pgvigil.yaml",
        &format!(
            "listen: 127.0.0.1:0\ntargets:\n  - name: db\n    dsn: \"{}\"\nactivity:\n  sample_interval: 200ms\ntracing:\n  otlp_endpoint: http://{}\n  slow_query_threshold: 100ms\n",
            pg.dsn(),
            addr
        ),
    );
    let mut p = Pgvigil::start(["--config".as_ref(), config.as_os_str()], &[]);
    // Let the sampler see the query running.
    std::thread::sleep(Duration::from_secs(2));
    let sent = Instant::now();
    p.signal("TERM");
    let status = p.wait_exit(Duration::from_secs(30));
    let took = sent.elapsed();
    let log = p.log();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{log}");
    assert!(took <= BOUND, "exit took {took:?}\n{log}");
    eprintln!("SIGTERM with a live receiver: exited 0 after {took:?}");
    let spans = receiver.spans();
    assert!(
        spans.iter().any(|s| {
            matches!(
                attr(&s.span.attributes, "db.postgresql.still_running"),
                Some(Value::BoolValue(true))
            )
        }),
        "no still-running span flushed at shutdown: {spans:#?}\n{log}"
    );
}
