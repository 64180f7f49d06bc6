//! Slow-query spans against a real PostgreSQL and a real OTLP gRPC receiver (tonic, from
//! the opentelemetry-proto definitions): parent from sqlcommenter `traceparent`, wait
//! events, and a receiver that is down.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::binary::Pgvigil;
use common::otlp::{attr, attr_str, hex, OtlpReceiver, Value};
use common::*;

fn tracing_config(dsn: &str, otlp: SocketAddr, extra: &str) -> String {
    format!(
        "{}activity:\n  sample_interval: 200ms\ntracing:\n  otlp_endpoint: http://{otlp}\n  slow_query_threshold: 500ms\n{extra}",
        one_target(dsn, "")
    )
}

const T: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const S: &str = "00f067aa0ba902b7";

#[test]
fn slow_query_span_joins_the_application_trace() {
    let pg = cluster(&[]);
    let addr = free_addr();
    let recv = OtlpReceiver::start(addr);
    let _run = start(config(&tracing_config(&pg.dsn(), addr, "")));
    std::thread::sleep(Duration::from_millis(600));

    pg.psql("postgres", "SELECT pg_sleep(0.05) /* fast, no span */")
        .unwrap();
    let started = Instant::now();
    pg.psql(
        "postgres",
        &format!("SELECT pg_sleep(1.2) /*traceparent='00-{T}-{S}-01'*/"),
    )
    .unwrap();
    println!("client saw the query take {:?}", started.elapsed());
    recv.wait_for("the slow span", |s| !s.is_empty());
    std::thread::sleep(Duration::from_secs(2));
    let spans = recv.spans();
    assert_eq!(
        spans.len(),
        1,
        "exactly one span (the 50 ms query makes none): {spans:#?}"
    );
    let got = &spans[0];
    let s = &got.span;
    assert_eq!(hex(&s.trace_id), T);
    assert_eq!(hex(&s.parent_span_id), S);
    assert_eq!(s.kind, 3, "SPAN_KIND_CLIENT");
    let secs = (s.end_time_unix_nano - s.start_time_unix_nano) as f64 / 1e9;
    println!("span {:?} duration {secs:.3} s", s.name);
    assert!((1.2..=1.2 + 0.2 + 0.3).contains(&secs), "duration {secs}");
    let text = attr_str(&s.attributes, "db.query.text");
    assert!(text.contains("pg_sleep(?)"), "{text}");
    assert!(!text.contains("1.2"), "literals masked: {text}");
    assert_eq!(attr_str(&s.attributes, "db.system.name"), "postgresql");
    assert_eq!(attr_str(&s.attributes, "db.namespace"), "postgres");
    assert_eq!(attr_str(&s.attributes, "db.operation.name"), "SELECT");
    assert_eq!(attr_str(&s.attributes, "db.user"), "postgres");
    assert_eq!(attr_str(&s.attributes, "server.address"), "127.0.0.1");
    assert!(
        matches!(attr(&s.attributes, "server.port"), Some(Value::IntValue(p)) if p == pg.port() as i64)
    );
    assert!(matches!(attr(&s.attributes, "db.postgresql.pid"), Some(Value::IntValue(p)) if p > 0));
    assert!(attr(&s.attributes, "client.address").is_some());
    assert!(attr(&s.attributes, "application_name").is_some());
    assert_eq!(attr_str(&got.resource, "service.name"), "pgvigil");
    assert_eq!(attr_str(&got.resource, "pgvigil.target"), "t1");
    assert_eq!(attr_str(&got.resource, "pgvigil.label.env"), "test");
}

/// The sampler's session is a collector-like one: read-only, and its `pg_stat_activity`
/// read runs under a server-side `statement_timeout` (sample interval 200 ms → the 1 s
/// floor; the collectors here use 5 s, so `= 1000` can only be the sampler's).
#[test]
fn sampler_reads_activity_read_only_with_a_statement_timeout() {
    let pg = cluster(&[("log_statement", "all"), ("log_line_prefix", "[%p] ")]);
    let addr = free_addr();
    let _recv = OtlpReceiver::start(addr);
    let _run = start(config(&tracing_config(&pg.dsn(), addr, "")));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = std::fs::read_to_string(pg.log_path()).unwrap_or_default();
        // Each entry starts with `[pid] `; a multi-line statement continues unprefixed.
        let mut entries: Vec<(&str, String)> = Vec::new();
        for line in log.lines() {
            match line.strip_prefix('[').and_then(|l| l.split_once("] ")) {
                Some((pid, text)) => entries.push((pid, text.to_string())),
                None => {
                    if let Some((_, text)) = entries.last_mut() {
                        text.push('\n');
                        text.push_str(line);
                    }
                }
            }
        }
        // The sampler's backend: the one that set the 1 s timeout.
        let sampler = entries
            .iter()
            .find(|(_, t)| t.contains("SET statement_timeout = 1000; SET lock_timeout = 1000"))
            .map(|(pid, _)| *pid);
        if let Some(pid) = sampler {
            let own = || entries.iter().filter(|(p, _)| *p == pid);
            let read_only =
                own().any(|(_, t)| t.contains("SET default_transaction_read_only = on"));
            let samples = own().any(|(_, t)| {
                t.contains(
                    "AND coalesce(application_name, '') <> current_setting('application_name')",
                )
            });
            if read_only && samples {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no read-only, time-limited sampler session in the server log:\n{}",
            pg.log_tail(60)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn lock_wait_shows_as_span_event_with_the_blocker() {
    let pg = cluster(&[]);
    pg.psql("postgres", "CREATE TABLE t (id int)").unwrap();
    let addr = free_addr();
    let recv = OtlpReceiver::start(addr);
    let _run = start(config(&tracing_config(&pg.dsn(), addr, "")));

    let holder = Command::new(pg.psql_program())
        .args(["-X", "-q", "-A", "-t", "-d", &pg.dsn(), "-c"])
        .arg("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE; SELECT pg_backend_pid(); SELECT pg_sleep(2); COMMIT;")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    pg.psql(
        "postgres",
        "SELECT count(*) FROM t /* waits for the lock */",
    )
    .unwrap();
    let out = holder.wait_with_output().unwrap();
    let holder_pid: i64 = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.trim().parse().ok())
        .expect("holder pid");
    let spans = recv.wait_for("the blocked SELECT", |s| {
        s.iter().any(|g| g.span.name == "SELECT t")
    });
    let blocked = spans.iter().find(|g| g.span.name == "SELECT t").unwrap();
    println!("events: {:#?}", blocked.span.events);
    let lock = blocked
        .span
        .events
        .iter()
        .find(|e| attr_str(&e.attributes, "db.postgresql.wait_event_type") == "Lock")
        .expect("a Lock wait event");
    assert_eq!(lock.name, "wait Lock: relation");
    match attr(&lock.attributes, "db.postgresql.blocking_pids") {
        Some(Value::ArrayValue(a)) => {
            let pids: Vec<_> = a.values.iter().filter_map(|v| v.value.clone()).collect();
            assert!(
                pids.contains(&Value::IntValue(holder_pid)),
                "{pids:?} vs {holder_pid}"
            );
        }
        other => panic!("blocking pids: {other:?}"),
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// RSS ceiling for pgvigil with 500 undeliverable spans (measured ~20 MiB; see README).
const RSS_LIMIT_KIB: u64 = 64 * 1024;

#[test]
fn receiver_down_drops_and_counts_spans_with_bounded_memory() {
    let pg = cluster(&[]);
    let otlp = free_addr();
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "listen: 127.0.0.1:0\n{}tracing:\n  otlp_endpoint: http://{otlp}\n  sample_interval: 50ms\n  slow_query_threshold: 50ms\n  queue_size: 64\n",
        one_target(&pg.dsn(), "")
    );
    let path = write(dir.path(), "pgvigil.yaml", &cfg);
    let pgvigil = Pgvigil::start(["--config", path.to_str().unwrap()], &[]);
    let (pgvigil_pid, listen) = (pgvigil.pid(), pgvigil.addr());

    // 500 slow queries (10 sessions × 50 × 150 ms) while nothing listens on the OTLP port.
    let mut workers = Vec::new();
    for _ in 0..10 {
        let sql = "SELECT pg_sleep(0.15);\n".repeat(50);
        let dsn = pg.dsn();
        let psql = pg.psql_program();
        workers.push(std::thread::spawn(move || {
            // On stdin, psql sends one statement at a time (with -c it would be one query).
            let mut child = Command::new(psql)
                .args(["-X", "-q", "-d", &dsn])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(sql.as_bytes())
                .unwrap();
            assert!(child.wait().unwrap().success());
        }));
    }
    let mut max_rss = 0;
    while workers.iter().any(|w| !w.is_finished()) {
        max_rss = max_rss.max(rss_kib(pgvigil_pid));
        let (status, _) = get(&format!("http://{listen}/metrics"));
        assert_eq!(status, 200, "/metrics keeps answering");
        std::thread::sleep(Duration::from_millis(200));
    }
    for w in workers {
        w.join().unwrap();
    }
    std::thread::sleep(Duration::from_secs(2));
    max_rss = max_rss.max(rss_kib(pgvigil_pid));
    let s = parse(&get(&format!("http://{listen}/metrics")).1);
    let dropped: f64 = find(&s, "pgvigil_spans_dropped_total", &[])
        .iter()
        .filter(|x| x.labels["reason"] != "not_sampled")
        .map(|x| x.value)
        .sum();
    let exported = value(&s, "pgvigil_spans_exported_total", &[]).unwrap();
    println!("500 slow queries, receiver down: dropped {dropped}, exported {exported}, max RSS {max_rss} KiB");
    assert!(dropped >= 450.0, "dropped {dropped}");
    assert_eq!(exported, 0.0);
    assert!(max_rss < RSS_LIMIT_KIB, "RSS {max_rss} KiB");

    // Receiver back: new spans arrive.
    let recv = OtlpReceiver::start(otlp);
    pg.psql("postgres", "SELECT pg_sleep(0.3) /* after recovery */")
        .unwrap();
    recv.wait_for("a span after the receiver came back", |s| !s.is_empty());
    let s = wait_for_exported(listen);
    assert!(s >= 1.0);
}

fn wait_for_exported(listen: SocketAddr) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = parse(&get(&format!("http://{listen}/metrics")).1);
        let v = value(&s, "pgvigil_spans_exported_total", &[]).unwrap_or(0.0);
        if v >= 1.0 || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A long query whose `traceparent` comment falls beyond `track_activity_query_size`: the
/// span comes without a parent, and the loss is counted per target.
#[test]
fn context_cut_at_track_activity_query_size_is_counted() {
    let pg = cluster(&[("track_activity_query_size", "100")]);
    let addr = free_addr();
    let recv = OtlpReceiver::start(addr);
    let run = start(config(&tracing_config(&pg.dsn(), addr, "")));
    std::thread::sleep(Duration::from_millis(600));
    let padding = "x".repeat(120);
    pg.psql(
        "postgres",
        &format!("SELECT pg_sleep(0.8), '{padding}' /*traceparent='00-{T}-{S}-01'*/"),
    )
    .unwrap();
    let spans = recv.wait_for("the slow span", |s| !s.is_empty());
    assert_eq!(
        hex(&spans[0].span.parent_span_id),
        "",
        "the context was cut off"
    );
    let n = wait_for(&run, Duration::from_secs(10), "the truncation count", |s| {
        value(s, "pgvigil_spans_context_truncated_total", &[]).filter(|v| *v >= 1.0)
    });
    assert_eq!(n, 1.0);
}
