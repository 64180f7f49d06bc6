//! The operational packs against a real PostgreSQL: WAL archiving failing and recovering,
//! long and idle-in-transaction sessions, wraparound ages and xmin holders, the settings
//! rule, and the self-metrics that say a collector was skipped and how many series each
//! collector exports.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Polls every collector until `check` returns Some, or panics after `timeout` with the
/// last exposition.
fn poll_until<T>(
    poller: &ManualPoller,
    timeout: Duration,
    what: &str,
    mut check: impl FnMut(&[Sample]) -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let s = poller.poll();
        if let Some(t) = check(&s) {
            return t;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}; last poll:\n{}",
                poller.text()
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn number(pg: &TempCluster, sql: &str) -> f64 {
    let out = pg.psql("postgres", sql).unwrap();
    out.parse()
        .unwrap_or_else(|_| panic!("{sql}: not a number: {out:?}"))
}

/// Fails the test if any collector failed or was skipped.
fn assert_all_ran(s: &[Sample], who: &str) {
    let errors = find(s, "pgvigil_collector_errors_total", &[]);
    assert!(errors.is_empty(), "{who}: collectors failed: {errors:#?}");
    let skipped = find(s, "pgvigil_collector_skipped", &[]);
    assert!(
        skipped.is_empty(),
        "{who}: collectors skipped: {skipped:#?}"
    );
}

#[test]
fn a_plain_server_exports_every_operational_pack_and_its_series_counts() {
    let pg = cluster(&[]);
    let poller = ManualPoller::new(&config(&one_target(&pg.dsn(), "")));
    let s = poller.poll();
    assert_all_ran(&s, "superuser");
    // archive_mode is off: no failing gauge that would read as "archiving works".
    assert_eq!(value(&s, "pg_archive_mode_enabled", &[]), Some(0.0));
    assert_eq!(value(&s, "pg_stat_archiver_failing", &[]), None);
    assert_eq!(value(&s, "pg_stat_archiver_failed_total", &[]), Some(0.0));
    assert!(value(&s, "pg_wal_segments", &[]).unwrap() >= 1.0);
    assert!(value(&s, "pg_wal_size_bytes", &[]).unwrap() >= 16.0 * 1024.0 * 1024.0);
    for name in [
        "pg_checkpoints_timed_total",
        "pg_checkpoints_requested_total",
        "pg_checkpoint_write_seconds_total",
        "pg_checkpoint_buffers_written_total",
        "pg_bgwriter_buffers_clean_total",
        "pg_wal_bytes_total",
    ] {
        assert!(value(&s, name, &[]).is_some(), "{name} missing");
    }
    // A primary without standbys: the standby-side metrics are absent, pg_in_recovery 0.
    assert_eq!(value(&s, "pg_in_recovery", &[]), Some(0.0));
    assert_eq!(value(&s, "pg_replication_replay_delay_seconds", &[]), None);
    assert!(find(&s, "pg_replication_standby_info", &[]).is_empty());
    // Nothing holds the horizon: every holder is there, at 0 (pgvigil's session is left out).
    for holder in ["prepared_xact", "replication_slot", "standby"] {
        assert_eq!(
            value(&s, "pg_xmin_horizon_age", &[("holder", holder)]),
            Some(0.0),
            "{holder}"
        );
    }
    // Series per collector: what the exposition holds.
    let settings = value(&s, "pgvigil_collector_series", &[("collector", "settings")]).unwrap();
    let exported = s
        .iter()
        .filter(|x| x.name.starts_with("pg_settings_"))
        .count();
    assert_eq!(settings, exported as f64);
    assert!(settings > 100.0, "{settings}");
    assert_eq!(
        value(&s, "pgvigil_collector_series", &[("collector", "archiver")]),
        Some(4.0),
        "archived, failed, enabled, pending: no timestamps yet, no failing gauge with archive_mode off"
    );
    assert_eq!(
        value(
            &s,
            "pgvigil_collector_series",
            &[("collector", "replication")]
        ),
        Some(0.0)
    );
}

#[test]
fn failing_archiving_is_failing_until_a_working_command_archives() {
    let pg = cluster(&[("archive_mode", "on"), ("archive_command", "false")]);
    let poller = ManualPoller::new(&config(&one_target(&pg.dsn(), "")));
    let s = poller.poll();
    assert_all_ran(&s, "start");
    assert_eq!(value(&s, "pg_archive_mode_enabled", &[]), Some(1.0));
    assert_eq!(value(&s, "pg_stat_archiver_failing", &[]), Some(0.0));
    let archived_before = value(&s, "pg_stat_archiver_archived_total", &[]).unwrap();

    pg.psql(
        "postgres",
        "CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g; SELECT pg_switch_wal();",
    )
    .unwrap();
    let s = poll_until(&poller, Duration::from_secs(30), "a failed archive", |s| {
        (value(s, "pg_stat_archiver_failed_total", &[])? >= 1.0).then(|| s.to_vec())
    });
    assert_eq!(value(&s, "pg_stat_archiver_failing", &[]), Some(1.0));
    assert!(value(&s, "pg_stat_archiver_last_failed_timestamp_seconds", &[]).is_some());
    assert!(value(&s, "pg_wal_archive_pending_files", &[]).unwrap() >= 1.0);

    pg.psql(
        "postgres",
        "ALTER SYSTEM SET archive_command = 'true'; SELECT pg_reload_conf();",
    )
    .unwrap();
    let s = poll_until(
        &poller,
        Duration::from_secs(90),
        "archiving to recover",
        |s| {
            let archived = value(s, "pg_stat_archiver_archived_total", &[])?;
            let failing = value(s, "pg_stat_archiver_failing", &[])?;
            (archived > archived_before && failing == 0.0).then(|| s.to_vec())
        },
    );
    assert_all_ran(&s, "recovered");
    assert!(value(&s, "pg_stat_archiver_last_archived_timestamp_seconds", &[]).is_some());
    assert_eq!(value(&s, "pg_wal_archive_pending_files", &[]), Some(0.0));
}

#[test]
fn long_transactions_and_idle_in_transaction_sessions_show_their_age() {
    let pg = cluster(&[]);
    pg.psql("postgres", "CREATE DATABASE app").unwrap();
    let idle = Session::connect(&pg.dsn_for("postgres", "app"));
    idle.run("BEGIN; SELECT 1");
    let busy = Session::connect(&pg.dsn());
    let running = busy.start("SELECT pg_sleep(30)");
    let poller = ManualPoller::new(&config(&one_target(&pg.dsn(), "")));
    std::thread::sleep(Duration::from_secs(5));
    let s = poller.poll();
    assert_all_ran(&s, "superuser");
    let app = [("datname", "app")];
    let idle_age = value(
        &s,
        "pg_stat_activity_oldest_idle_in_transaction_seconds",
        &app,
    );
    assert!(idle_age.unwrap() >= 5.0, "{idle_age:?}");
    assert!(value(&s, "pg_stat_activity_oldest_xact_seconds", &app).unwrap() >= 5.0);
    assert_eq!(
        value(&s, "pg_stat_activity_oldest_query_seconds", &app),
        Some(0.0)
    );
    let postgres = [("datname", "postgres")];
    let query_age = value(&s, "pg_stat_activity_oldest_query_seconds", &postgres);
    assert!(query_age.unwrap() >= 5.0, "{query_age:?}");
    assert_eq!(
        value(
            &s,
            "pg_stat_activity_oldest_idle_in_transaction_seconds",
            &postgres
        ),
        Some(0.0)
    );
    assert_eq!(
        value(
            &s,
            "pg_stat_activity_connections",
            &[("datname", "app"), ("state", "idle in transaction")]
        ),
        Some(1.0)
    );
    // The open transaction holds the horizon once it has an xid and others commit after it.
    idle.run("CREATE TABLE held (id int)");
    pg.psql(
        "postgres",
        "CREATE TABLE a (id int); CREATE TABLE b (id int);",
    )
    .unwrap();
    let s = poller.poll();
    let backend = value(&s, "pg_xmin_horizon_age", &[("holder", "backend")]).unwrap();
    assert!(backend >= 2.0, "{backend}");
    drop(busy);
    drop(running);
}

#[test]
fn xid_ages_match_the_catalog_and_a_prepared_transaction_holds_the_horizon() {
    let pg = cluster(&[("max_prepared_transactions", "5")]);
    pg.psql("postgres", "CREATE TABLE t (id int)").unwrap();
    let poller = ManualPoller::new(&config(&one_target(&pg.dsn(), "")));
    let age = "SELECT age(datfrozenxid) FROM pg_database WHERE datname = 'postgres'";
    let before = number(&pg, age);
    let s = poller.poll();
    let after = number(&pg, age);
    let got = value(&s, "pg_database_xid_age", &[("datname", "postgres")]).unwrap();
    assert!(
        before <= got && got <= after,
        "{before} <= {got} <= {after}"
    );
    let mxid = value(&s, "pg_database_mxid_age", &[("datname", "postgres")]).unwrap();
    assert!(mxid >= 0.0);
    assert!(value(&s, "pg_database_xid_age", &[("datname", "template0")]).is_some());

    pg.psql(
        "postgres",
        "BEGIN; INSERT INTO t VALUES (1); PREPARE TRANSACTION 'held';",
    )
    .unwrap();
    for i in 0..5 {
        pg.psql("postgres", &format!("INSERT INTO t VALUES ({i})"))
            .unwrap();
    }
    std::thread::sleep(Duration::from_secs(1));
    let s = poller.poll();
    assert_all_ran(&s, "superuser");
    let prepared = value(&s, "pg_xmin_horizon_age", &[("holder", "prepared_xact")]).unwrap();
    let truth = number(
        &pg,
        "SELECT age(transaction) FROM pg_prepared_xacts WHERE gid = 'held'",
    );
    assert!(
        prepared >= 5.0 && prepared <= truth,
        "{prepared} vs {truth}"
    );
    let oldest_holder = find(&s, "pg_xmin_horizon_age", &[])
        .into_iter()
        .max_by(|a, b| a.value.total_cmp(&b.value))
        .unwrap();
    assert_eq!(oldest_holder.labels["holder"], "prepared_xact");
    assert!(value(&s, "pg_prepared_xacts_oldest_seconds", &[]).unwrap() >= 1.0);
    pg.psql("postgres", "COMMIT PREPARED 'held'").unwrap();
    let s = poller.poll();
    assert_eq!(
        value(&s, "pg_xmin_horizon_age", &[("holder", "prepared_xact")]),
        Some(0.0)
    );
    assert_eq!(
        value(&s, "pg_prepared_xacts_oldest_seconds", &[]),
        Some(0.0)
    );
}

#[test]
fn every_numeric_setting_is_a_metric_in_base_units() {
    let pg = cluster(&[]);
    let poller = ManualPoller::new(&config(&one_target(&pg.dsn(), "")));
    let s = poller.poll();
    let shared_buffers = number(
        &pg,
        "SELECT pg_size_bytes(current_setting('shared_buffers'))",
    );
    assert_eq!(
        value(&s, "pg_settings_shared_buffers_bytes", &[]),
        Some(shared_buffers)
    );
    assert_eq!(
        value(&s, "pg_settings_max_slot_wal_keep_size_bytes", &[]),
        Some(-1.0),
        "a special value is not scaled"
    );
    // The two settings metrics that existed before the rule, unchanged.
    assert_eq!(value(&s, "pg_settings_max_connections", &[]), Some(100.0));
    assert!(value(&s, "pg_settings_superuser_reserved_connections", &[]).is_some());
    assert_eq!(
        value(&s, "pg_settings_checkpoint_timeout_seconds", &[]),
        Some(300.0)
    );
    assert_eq!(
        value(&s, "pg_settings_log_min_duration_statement_seconds", &[]),
        Some(-1.0)
    );
    // The server's value, not the one pgvigil SETs in its own session.
    assert_eq!(
        value(&s, "pg_settings_statement_timeout_seconds", &[]),
        Some(0.0)
    );
    assert_eq!(
        value(&s, "pg_settings_default_transaction_read_only", &[]),
        Some(0.0)
    );
    // Booleans are 1/0 (the harness turns fsync off); dotted names use _.
    assert_eq!(value(&s, "pg_settings_fsync", &[]), Some(0.0));
    assert_eq!(value(&s, "pg_settings_hot_standby", &[]), Some(1.0));
    assert_eq!(
        value(&s, "pg_settings_pg_stat_statements_max", &[]),
        Some(5000.0)
    );
    assert!(find(&s, "pg_settings_pending_restart", &[]).is_empty());
    let text = poller.text();
    assert!(
        text.contains("# HELP pg_settings_max_connections The max_connections setting.\n"),
        "help unchanged"
    );
    assert!(text.contains(
        "# HELP pg_settings_shared_buffers_bytes The shared_buffers setting, in bytes (set in 8kB).\n"
    ));

    pg.psql(
        "postgres",
        "ALTER SYSTEM SET max_connections = 101; SELECT pg_reload_conf();",
    )
    .unwrap();
    let s = poll_until(&poller, Duration::from_secs(10), "pending restart", |s| {
        value(
            s,
            "pg_settings_pending_restart",
            &[("name", "max_connections")],
        )
    });
    assert_eq!(s, 1.0);
}

#[test]
fn a_role_without_pg_monitor_skips_what_it_may_not_read_without_errors() {
    let pg = cluster(&[]);
    pg.psql("postgres", "CREATE ROLE nobody LOGIN").unwrap();
    let poller = ManualPoller::new(&config(&one_target(&pg.dsn_for("nobody", "postgres"), "")));
    for _ in 0..3 {
        poller.poll();
    }
    let s = poller.poll();
    let errors = find(&s, "pgvigil_collector_errors_total", &[]);
    assert!(errors.is_empty(), "{errors:#?}");
    // pg_ls_waldir() and pg_ls_archive_statusdir() need pg_monitor (or superuser).
    for collector in ["archiver", "wal_directory"] {
        assert_eq!(
            value(
                &s,
                "pgvigil_collector_skipped",
                &[("collector", collector), ("reason", "missing_privilege")]
            ),
            Some(1.0),
            "{collector}"
        );
        assert_eq!(
            value(&s, "pgvigil_collector_series", &[("collector", collector)]),
            Some(0.0)
        );
    }
    assert!(value(&s, "pg_settings_max_connections", &[]).is_some());
    assert_eq!(
        value(
            &s,
            "pgvigil_collector_skipped",
            &[("collector", "settings")]
        ),
        None
    );
}

/// Two clones of one standby (the same `application_name`) streaming from a primary: the
/// primary tells them apart by client port; a standby target reports itself in recovery,
/// streaming, with nothing waiting to be replayed; a slot shows what it retains.
#[test]
fn standbys_are_told_apart_and_an_idle_standby_has_no_replay_delay() {
    let primary = cluster(&[]);
    primary
        .psql(
            "postgres",
            "SELECT pg_create_physical_replication_slot('kept', true)",
        )
        .unwrap();
    let a = primary.start_standby("replica").expect("first standby");
    let b = primary.start_standby("replica").expect("second standby");
    let on_primary = ManualPoller::new(&config(&one_target(&primary.dsn(), "")));
    let s = poll_until(
        &on_primary,
        Duration::from_secs(30),
        "two streaming standbys",
        |s| {
            let streaming = find(
                s,
                "pg_replication_standby_info",
                &[("application_name", "replica"), ("state", "streaming")],
            );
            (streaming.len() == 2).then(|| s.to_vec())
        },
    );
    assert_all_ran(&s, "primary");
    let standbys = find(
        &s,
        "pg_replication_standby_info",
        &[("application_name", "replica")],
    );
    assert_ne!(
        standbys[0].labels["client_port"],
        standbys[1].labels["client_port"]
    );
    for stage in ["sent", "write", "flush", "replay"] {
        let lags = find(&s, "pg_replication_standby_lag_bytes", &[("stage", stage)]);
        assert_eq!(lags.len(), 2, "{stage}");
    }
    // Caught up: 0, not absent.
    let seconds = find(&s, "pg_replication_standby_lag_seconds", &[]);
    assert_eq!(seconds.len(), 6, "write, flush and replay per standby");
    assert!(seconds.iter().all(|x| x.value >= 0.0));
    assert_eq!(
        value(&s, "pg_replication_slot_active", &[("slot_name", "kept")]),
        Some(0.0)
    );
    assert!(
        value(
            &s,
            "pg_replication_slot_retained_bytes",
            &[("slot_name", "kept")]
        )
        .unwrap()
            >= 0.0
    );
    assert_eq!(
        value(
            &s,
            "pg_replication_slot_wal_status_info",
            &[("slot_name", "kept"), ("wal_status", "reserved")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "pg_replication_slot_safe_wal_size_bytes", &[]),
        None,
        "max_slot_wal_keep_size is -1"
    );

    // A write on the primary, then idle: the standby replays it and waits.
    primary
        .psql("postgres", "CREATE TABLE r AS SELECT 1 AS x")
        .unwrap();
    let on_standby = ManualPoller::new(&config(&one_target(&a.dsn(), "")));
    let s = poll_until(
        &on_standby,
        Duration::from_secs(30),
        "the standby to catch up",
        |s| {
            (value(s, "pg_replication_replay_delay_seconds", &[])? == 0.0
                && value(s, "pg_replication_receive_replay_lag_bytes", &[])? == 0.0)
                .then(|| s.to_vec())
        },
    );
    assert_all_ran(&s, "standby");
    assert_eq!(value(&s, "pg_in_recovery", &[]), Some(1.0));
    assert_eq!(value(&s, "pg_replication_replay_paused", &[]), Some(0.0));
    assert_eq!(
        value(&s, "pg_replication_wal_receiver_streaming", &[]),
        Some(1.0)
    );
    let heard = value(
        &s,
        "pg_replication_wal_receiver_last_message_timestamp_seconds",
        &[],
    )
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - heard).abs() < 60.0, "{heard} vs {now}");
    drop(b);
}

/// What goes wrong with replication, as an SRE sees it: a physical slot whose standby is gone
/// retains more WAL after every switch and write (and is inactive); a standby whose replay is
/// paused shows a replay delay > 0 while WAL it received waits; a standby whose primary is
/// stopped shows its WAL receiver not streaming (replay delay alone would read 0 then).
#[test]
fn an_unused_slot_retains_wal_a_paused_standby_lags_and_a_lost_primary_is_not_streamed() {
    let primary = cluster(&[]);
    primary
        .psql(
            "postgres",
            "SELECT pg_create_physical_replication_slot('gone', true)",
        )
        .unwrap();
    let on_primary = ManualPoller::new(&config(&one_target(&primary.dsn(), "")));
    let slot = [("slot_name", "gone")];
    let s = on_primary.poll();
    assert_eq!(value(&s, "pg_replication_slot_active", &slot), Some(0.0));
    let before = value(&s, "pg_replication_slot_retained_bytes", &slot).expect("retained bytes");
    primary
        .psql(
            "postgres",
            "CREATE TABLE w AS SELECT g FROM generate_series(1, 100000) g; SELECT pg_switch_wal()",
        )
        .unwrap();
    let after = poll_until(
        &on_primary,
        Duration::from_secs(30),
        "the slot to retain more WAL",
        |s| value(s, "pg_replication_slot_retained_bytes", &slot).filter(|v| *v > before),
    );
    assert!(after > before, "{after} > {before}");
    assert_eq!(
        value(&on_primary.poll(), "pg_replication_slot_active", &slot),
        Some(0.0)
    );

    let standby = primary.start_standby("replica").expect("a standby");
    let on_standby = ManualPoller::new(&config(&one_target(&standby.dsn(), "")));
    poll_until(&on_standby, Duration::from_secs(30), "streaming", |s| {
        (value(s, "pg_replication_wal_receiver_streaming", &[])? == 1.0).then_some(())
    });
    // A commit replayed first, so the standby knows when it last replayed one. Wait for the
    // standby itself to have replayed it: "caught up" below also holds before the commit's WAL
    // has arrived, and a pause then would leave no replayed commit (delay absent, not > 0).
    primary
        .psql("postgres", "INSERT INTO w VALUES (0)")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while standby
        .psql(
            "postgres",
            "SELECT pg_last_xact_replay_timestamp() IS NOT NULL AND EXISTS (SELECT FROM w WHERE g = 0)",
        )
        .unwrap()
        != "t"
    {
        assert!(Instant::now() < deadline, "the standby never replayed the commit");
        std::thread::sleep(Duration::from_millis(100));
    }
    poll_until(&on_standby, Duration::from_secs(30), "caught up", |s| {
        (value(s, "pg_replication_receive_replay_lag_bytes", &[])? == 0.0
            && value(s, "pg_replication_replay_delay_seconds", &[])? == 0.0)
            .then_some(())
    });
    standby
        .psql("postgres", "SELECT pg_wal_replay_pause()")
        .unwrap();
    primary
        .psql(
            "postgres",
            "INSERT INTO w SELECT g FROM generate_series(1, 1000) g",
        )
        .unwrap();
    let (delay, lag) = poll_until(
        &on_standby,
        Duration::from_secs(30),
        "a replay delay while replay is paused",
        |s| {
            let delay = value(s, "pg_replication_replay_delay_seconds", &[])?;
            let lag = value(s, "pg_replication_receive_replay_lag_bytes", &[])?;
            let paused = value(s, "pg_replication_replay_paused", &[])?;
            (paused == 1.0 && delay > 0.0 && lag > 0.0).then_some((delay, lag))
        },
    );
    println!("paused standby: replay delay {delay:.2} s, {lag} bytes received but not replayed");
    standby
        .psql("postgres", "SELECT pg_wal_replay_resume()")
        .unwrap();

    primary.stop().expect("stop the primary");
    let s = poll_until(
        &on_standby,
        Duration::from_secs(60),
        "the WAL receiver to stop streaming",
        |s| (value(s, "pg_replication_wal_receiver_streaming", &[])? == 0.0).then(|| s.to_vec()),
    );
    assert_eq!(value(&s, "pg_in_recovery", &[]), Some(1.0));
}
