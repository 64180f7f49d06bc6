//! PgBouncer targets (`kind: pgbouncer`) against a real PgBouncer in front of a real
//! PostgreSQL: pool waits show and clear, `SHOW STATS` counts the queries run, a stopped
//! PgBouncer turns its `pg_up` to 0 and back without touching the PostgreSQL target, and
//! the exposition passes `promtool check metrics`.

mod common;

use std::time::{Duration, Instant};

use common::prometheus::promtool_check_metrics;
use common::{find, get, parse, value, wait_for, Serving, TempCluster};
use pgvigil::demo::cluster::{PgBouncerOptions, TempPgBouncer};

const BOUNCER: &str = "bouncer";
const POSTGRES: &str = "pg";
/// Clients that each hold a transaction open, against a pool of 2.
const CLIENTS: usize = 6;

fn setup() -> (TempCluster, TempPgBouncer, common::Running) {
    let pg = common::cluster(&[]);
    let bouncer = TempPgBouncer::start(&pg, &PgBouncerOptions::default())
        .unwrap_or_else(|e| panic!("start PgBouncer: {e}"));
    let yaml = format!(
        "targets:\n  \
           - name: {POSTGRES}\n    dsn: \"{}\"\n  \
           - name: {BOUNCER}\n    kind: pgbouncer\n    dsn: \"{}\"\n\
         collectors:\n  defaults: {{interval: 1s, timeout: 5s}}\n",
        pg.dsn(),
        bouncer.dsn_for("pgvigil", "pgvigil-secret", "pgbouncer"),
    );
    let run = common::start(common::config(&yaml));
    wait_for(&run, Duration::from_secs(30), "both targets up", |s| {
        let up = |t| value(s, "pg_up", &[("target", t)]) == Some(1.0);
        let polled = [
            "pgbouncer_pools",
            "pgbouncer_stats",
            "pgbouncer_databases",
            "pgbouncer_config",
        ]
        .iter()
        .all(|c| {
            value(
                s,
                "pgvigil_collector_last_success_timestamp_seconds",
                &[("target", BOUNCER), ("collector", c)],
            )
            .is_some()
        });
        (up(BOUNCER) && up(POSTGRES) && polled).then_some(())
    });
    (pg, bouncer, run)
}

fn pool(s: &[common::Sample], name: &str) -> Option<f64> {
    value(
        s,
        name,
        &[
            ("target", BOUNCER),
            ("database", "postgres"),
            ("user", "postgres"),
        ],
    )
}

fn queries_pooled(s: &[common::Sample]) -> Option<f64> {
    value(
        s,
        "pgbouncer_stats_queries_pooled_total",
        &[("target", BOUNCER), ("database", "postgres")],
    )
}

/// 6 clients each hold a transaction through a pool of 2: 4 wait, the oldest for a
/// measurable time; once they commit nobody waits, and `SHOW STATS` counted exactly the
/// queries they ran.
#[test]
fn pool_waits_show_and_clear_and_queries_are_counted() {
    let (_pg, bouncer, run) = setup();
    // SHOW STATS totals move every stats_period (1 s here): wait for a settled baseline.
    // The database has no row before its pool is first used: 0 queries.
    let mut last = None;
    let before = wait_for(&run, Duration::from_secs(20), "settled stats", |s| {
        let now = queries_pooled(s).unwrap_or(0.0);
        let settled = last.is_some_and(|(v, at): (f64, Instant)| {
            v == now && at.elapsed() > Duration::from_millis(2500)
        });
        if last.is_none_or(|(v, _)| v != now) {
            last = Some((now, Instant::now()));
        }
        settled.then_some(now)
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (release, released) = tokio::sync::watch::channel(false);
    let dsn = bouncer.dsn_for("app", "app-secret", "postgres");
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let dsn = dsn.clone();
            let mut released = released.clone();
            rt.spawn(async move {
                let (client, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                tokio::spawn(conn);
                // One statement per Query message: three queries per client. BEGIN
                // takes a server connection and keeps it until COMMIT; clients beyond
                // the pool's 2 wait for one here.
                client
                    .simple_query("BEGIN")
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = released.wait_for(|r| *r).await;
                client
                    .simple_query("SELECT 1")
                    .await
                    .map_err(|e| e.to_string())?;
                client
                    .simple_query("COMMIT")
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(())
            })
        })
        .collect();

    let (waiting, maxwait) = wait_for(&run, Duration::from_secs(30), "clients waiting", |s| {
        let waiting = pool(s, "pgbouncer_pools_client_waiting_connections")?;
        let maxwait = pool(s, "pgbouncer_pools_client_maxwait_seconds")?;
        // Clients log in and queue one by one, and PgBouncer opens its second server
        // connection while they do (a client waits meanwhile): wait until the pool of 2
        // serves 2 and all the others wait. A pool stuck at 1 never gets there.
        (waiting == (CLIENTS - 2) as f64 && maxwait > 0.0).then_some((waiting, maxwait))
    });
    assert!(waiting >= 3.0, "the must-show: at least 3 clients waiting");
    assert_eq!(
        waiting,
        (CLIENTS - 2) as f64,
        "a pool of 2 serves 2 of {CLIENTS}"
    );
    assert!(
        maxwait < 60.0,
        "maxwait in seconds, not microseconds: {maxwait}"
    );
    let s = parse(&get(&run.url("/metrics")).1);
    assert_eq!(
        pool(&s, "pgbouncer_pools_server_active_connections"),
        Some(2.0)
    );
    assert_eq!(
        value(
            &s,
            "pgbouncer_databases_pool_size",
            &[("target", BOUNCER), ("name", "postgres")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            &s,
            "pgbouncer_config_default_pool_size",
            &[("target", BOUNCER)]
        ),
        Some(2.0)
    );

    release.send(true).unwrap();
    rt.block_on(async {
        for c in clients {
            match tokio::time::timeout(Duration::from_secs(30), c).await {
                Ok(Ok(Ok(()))) => {}
                other => panic!("client: {other:?}"),
            }
        }
    });

    wait_for(&run, Duration::from_secs(30), "nobody waiting", |s| {
        let waiting = pool(s, "pgbouncer_pools_client_waiting_connections")?;
        let maxwait = pool(s, "pgbouncer_pools_client_maxwait_seconds")?;
        (waiting == 0.0 && maxwait == 0.0).then_some(())
    });
    let ran = (CLIENTS * 3) as f64;
    let after = wait_for(&run, Duration::from_secs(30), "queries counted", |s| {
        queries_pooled(s).filter(|v| *v - before >= ran)
    });
    // A few more stats periods: the count stays exact (nothing else runs through it).
    std::thread::sleep(Duration::from_secs(3));
    let s = parse(&get(&run.url("/metrics")).1);
    assert_eq!(after - before, ran, "queries pooled: {before} → {after}");
    assert_eq!(queries_pooled(&s), Some(after));
    let duration = value(
        &s,
        "pgbouncer_stats_queries_duration_seconds_total",
        &[("target", BOUNCER), ("database", "postgres")],
    )
    .expect("query duration");
    assert!(
        duration > 0.0 && duration < 60.0,
        "seconds, not microseconds: {duration}"
    );
    // Every PgBouncer family, with the pools and stats of a used database, passes promtool.
    let text = get(&run.url("/metrics")).1;
    if let Err(report) = promtool_check_metrics(&text) {
        panic!("promtool check metrics: {report}\n--- exposition ---\n{text}");
    }
}

/// PgBouncer stopped: its `pg_up` turns 0 while the PostgreSQL target stays up and its
/// collectors keep succeeding; restarted on the same port: `pg_up` 1 and its collectors
/// succeed again. The exposition passes promtool throughout.
#[test]
fn bouncer_restart_turns_its_pg_up_and_leaves_postgres_alone() {
    let (_pg, bouncer, run) = setup();
    let text = get(&run.url("/metrics")).1;
    if let Err(report) = promtool_check_metrics(&text) {
        panic!("promtool check metrics: {report}\n--- exposition ---\n{text}");
    }
    let last_success = |s: &[common::Sample], target: &str, collector: &str| {
        value(
            s,
            "pgvigil_collector_last_success_timestamp_seconds",
            &[("target", target), ("collector", collector)],
        )
    };
    // Each kind runs its own packs only.
    let s = parse(&text);
    assert!(find(
        &s,
        "pgvigil_collector_duration_seconds",
        &[("target", BOUNCER), ("collector", "database")]
    )
    .is_empty());
    assert!(find(
        &s,
        "pgvigil_collector_duration_seconds",
        &[("target", POSTGRES), ("collector", "pgbouncer_pools")]
    )
    .is_empty());

    // /probe?target= serves the PgBouncer target alone, like any target.
    let (status, probe) = get(&run.url(&format!("/probe?target={BOUNCER}")));
    assert_eq!(status, 200, "{probe}");
    let p = parse(&probe);
    assert_eq!(value(&p, "pg_up", &[("target", BOUNCER)]), Some(1.0));
    assert!(!find(&p, "pgbouncer_pools_client_active_connections", &[]).is_empty());
    assert!(p
        .iter()
        .all(|s| s.labels.get("target").is_none_or(|t| t == BOUNCER)));

    bouncer.stop().unwrap();
    let down_at = wait_for(&run, Duration::from_secs(30), "bouncer down", |s| {
        (value(s, "pg_up", &[("target", BOUNCER)]) == Some(0.0))
            .then(|| last_success(s, POSTGRES, "database"))
            .flatten()
    });
    // While it is down, the PostgreSQL target polls on.
    wait_for(&run, Duration::from_secs(30), "postgres polled on", |s| {
        assert_eq!(value(s, "pg_up", &[("target", POSTGRES)]), Some(1.0));
        assert_eq!(value(s, "pg_up", &[("target", BOUNCER)]), Some(0.0));
        last_success(s, POSTGRES, "database")
            .filter(|t| *t > down_at + 1.5)
            .map(|_| ())
    });
    let text = get(&run.url("/metrics")).1;
    if let Err(report) = promtool_check_metrics(&text) {
        panic!("promtool check metrics (bouncer down): {report}\n--- exposition ---\n{text}");
    }

    bouncer.restart().unwrap();
    let restarted = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    // Reconnects follow the slot's backoff (up to 30 s after many failures).
    wait_for(&run, Duration::from_secs(60), "bouncer up again", |s| {
        let up = value(s, "pg_up", &[("target", BOUNCER)]) == Some(1.0);
        let fresh = last_success(s, BOUNCER, "pgbouncer_pools").is_some_and(|t| t > restarted);
        assert_eq!(value(s, "pg_up", &[("target", POSTGRES)]), Some(1.0));
        (up && fresh).then_some(())
    });
}

/// `check-config --connect` runs each kind's own collectors: the PgBouncer packs on the
/// bouncer (all ok), the PostgreSQL packs on PostgreSQL, never one on the other.
#[test]
fn check_connect_runs_each_kinds_collectors_on_it() {
    let pg = common::cluster(&[]);
    let bouncer = TempPgBouncer::start(&pg, &PgBouncerOptions::default())
        .unwrap_or_else(|e| panic!("start PgBouncer: {e}"));
    let dir = tempfile::tempdir().unwrap();
    let config = common::write(
        dir.path(),
        "pgvigil.yaml",
        &format!(
            "targets:\n  - name: {POSTGRES}\n    dsn: \"{}\"\n  - name: {BOUNCER}\n    kind: pgbouncer\n    dsn: \"{}\"\n",
            pg.dsn(),
            bouncer.dsn_for("pgvigil", "pgvigil-secret", "pgbouncer"),
        ),
    );
    let out = common::binary::command()
        .arg("check-config")
        .arg(&config)
        .arg("--connect")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ctx = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{ctx}");
    let section = |name: &str| {
        let start = stdout
            .find(&format!("target {name} ("))
            .unwrap_or_else(|| panic!("no section for {name}\n{ctx}"));
        let rest = &stdout[start..];
        let end = rest[1..].find("\ntarget ").map_or(rest.len(), |e| e + 1);
        rest[..end].to_string()
    };
    let b = section(BOUNCER);
    for c in [
        "pgbouncer_pools",
        "pgbouncer_stats",
        "pgbouncer_databases",
        "pgbouncer_config",
    ] {
        assert!(
            b.lines()
                .any(|l| l.trim_start().starts_with(c) && l.contains(" ok")),
            "{c} ok on the bouncer\n{ctx}"
        );
    }
    assert!(
        !b.contains("pg_stat_statements") && !b.contains("\n  database "),
        "{ctx}"
    );
    let p = section(POSTGRES);
    assert!(
        !p.contains("pgbouncer_"),
        "no PgBouncer collector on PostgreSQL\n{ctx}"
    );
}
