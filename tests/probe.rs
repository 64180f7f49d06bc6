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
    // Every family of t2 in /metrics is in the probe. Once every collector has run (ready),
    // /metrics is read first and the probe after, so nothing can appear in between that
    // the probe lacks; a few families exist only while something happens (the window
    // gauges of queries run in the last interval, DB load) and may vanish in between.
    wait_until(Duration::from_secs(30), "ready", || {
        get(&run.url("/readyz")).0 == 200
    });
    let (_, all) = get(&run.url("/metrics"));
    let (_, body) = get(&run.url("/probe?target=t2"));
    let names = |samples: Vec<Sample>| {
        samples
            .into_iter()
            .filter(|s| s.labels.get("target").map(String::as_str) == Some("t2"))
            .map(|s| s.name)
            .collect::<std::collections::BTreeSet<_>>()
    };
    let probed = names(parse(&body));
    let missing: Vec<_> = names(parse(&all))
        .into_iter()
        .filter(|n| !probed.contains(n))
        .filter(|n| {
            !n.starts_with("pg_stat_statements_window_") && n != "pg_activity_active_seconds_total"
        })
        .collect();
    assert!(
        missing.is_empty(),
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

#[test]
fn a_probe_with_an_auth_module_registers_polls_and_forgets_a_target() {
    let configured = cluster(&[]);
    let discovered = cluster(&[]);
    discovered
        .psql(
            "postgres",
            "CREATE ROLE discovery_mon LOGIN; GRANT pg_monitor TO discovery_mon",
        )
        .unwrap();
    let run = start(config(&format!(
        "targets:\n  - name: t1\n    dsn: \"{}\"\n\
         auth_modules:\n  mon:\n    type: userpass\n    userpass: {{username: discovery_mon}}\n    options: {{sslmode: disable, connect_timeout: \"2\"}}\n\
         probe: {{forget_after: 3s}}\n\
         collectors:\n  defaults: {{interval: 1s}}\n",
        configured.dsn()
    )));
    let name = format!("127.0.0.1:{}/postgres", discovered.port());
    let url = run.url(&format!("/probe?target={name}&auth_module=mon"));

    // The first probe waits for the first poll cycle (bounded by the scrape timeout).
    let (status, body) = get(&url);
    assert_eq!(status, 200, "{body}");
    let s = parse(&body);
    assert_eq!(
        value(&s, "pg_up", &[("target", &name)]),
        Some(1.0),
        "{body}"
    );
    assert!(
        !find(&s, "pg_database_size_bytes", &[("target", &name)]).is_empty(),
        "{body}"
    );
    assert!(s.iter().all(|x| x.labels.get("target") == Some(&name)));
    // Polled in the background from then on: its series are in /metrics too, and its
    // sessions are the module's role.
    wait_for(
        &run,
        Duration::from_secs(10),
        "the probed target in /metrics",
        |s| (value(s, "pg_up", &[("target", &name)]) == Some(1.0)).then_some(()),
    );
    assert!(discovered
        .psql(
            "postgres",
            "SELECT count(*) > 0 FROM pg_stat_activity WHERE usename = 'discovery_mon'"
        )
        .unwrap()
        .contains('t'));
    // Probed again and again, it stays.
    for _ in 0..5 {
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(get(&url).0, 200);
    }
    // Not probed for longer than forget_after: dropped, and its sessions closed.
    wait_for(
        &run,
        Duration::from_secs(20),
        "the probed target dropped",
        |s| {
            find(s, "pg_up", &[("target", &name)])
                .is_empty()
                .then_some(())
        },
    );
    wait_until(Duration::from_secs(10), "its sessions closed", || {
        discovered
            .psql(
                "postgres",
                "SELECT count(*) FROM pg_stat_activity WHERE usename = 'discovery_mon'",
            )
            .unwrap()
            == "0"
    });
    // The configured target was never disturbed.
    let (_, all) = get(&run.url("/metrics"));
    assert_eq!(value(&parse(&all), "pg_up", &[("target", "t1")]), Some(1.0));

    // Credentials only from a configured module.
    let (status, body) = get(&run.url(&format!("/probe?target={name}&auth_module=nope")));
    assert_eq!(status, 400);
    assert!(body.contains("unknown auth_module \"nope\""), "{body}");
    let (status, body) = get(&run.url("/probe?target=host:notaport/x&auth_module=mon"));
    assert_eq!(status, 400, "{body}");
}
