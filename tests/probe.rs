//! `GET /probe?target=NAME` on a real PostgreSQL: only that target's series (and its own
//! `pg_up` and self-metrics), 404 with a message for an unknown name, 400 without one.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn probe_returns_one_targets_series_only() {
    let pg = cluster(&[]);
    let dsn = pg.dsn();
    let run = start(config(&format!(
        "targets:\n  - name: t1\n    dsn: \"{dsn}\"\n  - name: t2\n    dsn: \"{dsn}\"\n    labels: {{env: other}}\n  - name: down\n    dsn: \"host=127.0.0.1 port={} user=x connect_timeout=1\"\ncollectors:\n  defaults: {{interval: 1s}}\n",
        free_port()
    )));
    wait_for(&run, Duration::from_secs(30), "both targets polled", |s| {
        (value(s, "pg_up", &[("target", "t1")]) == Some(1.0)
            && value(s, "pg_up", &[("target", "t2")]) == Some(1.0)
            && !find(s, "pg_database_size_bytes", &[("target", "t2")]).is_empty())
        .then_some(())
    });

    let (status, body) = get(&run.url("/probe?target=t2"));
    assert_eq!(status, 200, "{body}");
    let samples = parse(&body);
    assert!(samples.len() > 20, "{body}");
    for s in &samples {
        assert_eq!(
            s.labels.get("target").map(String::as_str),
            Some("t2"),
            "a sample of another target in /probe?target=t2: {s:?}"
        );
    }
    assert_eq!(
        value(&samples, "pg_up", &[("target", "t2"), ("env", "other")]),
        Some(1.0)
    );
    assert!(!find(&samples, "pg_database_size_bytes", &[]).is_empty());
    assert!(!find(
        &samples,
        "pgvigil_collector_last_success_timestamp_seconds",
        &[]
    )
    .is_empty());
    // Everything of t2 in /metrics is in the probe (process-wide metrics aside).
    let (_, all) = get(&run.url("/metrics"));
    let of_t2 = parse(&all)
        .into_iter()
        .filter(|s| s.labels.get("target").map(String::as_str) == Some("t2"))
        .map(|s| (s.name, s.labels))
        .collect::<std::collections::BTreeSet<_>>();
    let probed = samples
        .into_iter()
        .map(|s| (s.name, s.labels))
        .collect::<std::collections::BTreeSet<_>>();
    let missing: Vec<_> = of_t2.difference(&probed).collect();
    // Series come and go between two scrapes (window gauges); allow a few.
    assert!(
        missing.len() <= 5,
        "in /metrics but not in the probe: {missing:?}"
    );

    // An unreachable target answers with its pg_up 0.
    let (status, body) = get(&run.url("/probe?target=down"));
    assert_eq!(status, 200);
    assert_eq!(
        value(&parse(&body), "pg_up", &[("target", "down")]),
        Some(0.0)
    );

    let (status, body) = get(&run.url("/probe?target=nope"));
    assert_eq!(status, 404);
    assert!(body.contains("unknown target \"nope\""), "{body}");
    let (status, body) = get(&run.url("/probe"));
    assert_eq!(status, 400);
    assert!(body.contains("?target="), "{body}");
}
