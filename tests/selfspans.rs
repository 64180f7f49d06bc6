//! `tracing.self`: pgvigil's own poll cycles and collector queries as spans, sent by the
//! real binary to a real OTLP gRPC receiver; with it off, none.

mod common;

use std::time::Duration;

use common::binary::Pgvigil;
use common::otlp::{attr, attr_str, OtlpReceiver, Value};
use common::*;

fn run_pgvigil(pg: &TempCluster, otlp: std::net::SocketAddr, self_spans: bool) -> Pgvigil {
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "listen: 127.0.0.1:0\n{}tracing:\n  otlp_endpoint: http://{otlp}\n  self: {self_spans}\n",
        one_target(&pg.dsn(), "")
    );
    let path = write(dir.path(), "pgvigil.yaml", &cfg);
    // The binary reads the file at start; the directory may go afterwards.
    let run = Pgvigil::start(["--config", path.to_str().unwrap()], &[]);
    std::mem::forget(dir);
    run
}

#[test]
fn poll_and_collector_spans_reach_the_receiver() {
    let pg = cluster(&[]);
    let addr = free_addr();
    let recv = OtlpReceiver::start(addr);
    let _run = run_pgvigil(&pg, addr, true);
    // A collector span and the poll span it sits in (they may come in different batches).
    let spans = recv.wait_for("a collector span inside its poll span", |s| {
        s.iter().any(|c| {
            c.span.name.starts_with("collector ")
                && s.iter()
                    .any(|p| p.span.name == "poll t1" && p.span.span_id == c.span.parent_span_id)
        })
    });
    let poll = spans.iter().find(|g| g.span.name == "poll t1").unwrap();
    assert_eq!(attr_str(&poll.span.attributes, "target"), "t1");
    assert_eq!(attr_str(&poll.resource, "service.name"), "pgvigil");

    let collectors: Vec<_> = spans
        .iter()
        .filter(|g| g.span.name.starts_with("collector "))
        .collect();
    println!(
        "{} poll spans, {} collector spans: {:?}",
        spans.iter().filter(|g| g.span.name == "poll t1").count(),
        collectors.len(),
        collectors
            .iter()
            .map(|g| g.span.name.as_str())
            .collect::<std::collections::BTreeSet<_>>()
    );
    for c in &collectors {
        let name = attr_str(&c.span.attributes, "collector");
        assert_eq!(c.span.name, format!("collector {name}"));
        assert_eq!(attr_str(&c.span.attributes, "target"), "t1");
        assert!(!attr_str(&c.span.attributes, "database").is_empty());
        // Each collector query sits inside its poll.
        let parent = spans
            .iter()
            .find(|g| g.span.span_id == c.span.parent_span_id)
            .map(|g| g.span.name.as_str());
        assert!(
            parent.is_none() || parent == Some("poll t1"),
            "{} under {parent:?}",
            c.span.name
        );
        assert!(c.span.end_time_unix_nano >= c.span.start_time_unix_nano);
    }
    let with_parent = collectors
        .iter()
        .filter(|c| {
            spans
                .iter()
                .any(|g| g.span.span_id == c.span.parent_span_id)
        })
        .count();
    assert!(with_parent > 0, "collector spans have their poll as parent");
    assert!(
        collectors
            .iter()
            .any(|c| matches!(attr(&c.span.attributes, "rows"), Some(Value::IntValue(n)) if n > 0)),
        "rows recorded"
    );
}

#[test]
fn off_sends_no_spans_of_its_own() {
    let pg = cluster(&[]);
    let addr = free_addr();
    let recv = OtlpReceiver::start(addr);
    let _run = run_pgvigil(&pg, addr, false);
    // Collectors poll every second: several polls in this time.
    std::thread::sleep(Duration::from_secs(5));
    let spans = recv.spans();
    assert!(
        !spans
            .iter()
            .any(|g| g.span.name.starts_with("poll ") || g.span.name.starts_with("collector ")),
        "{spans:#?}"
    );
}
