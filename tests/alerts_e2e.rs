//! The alert rules and the dashboards end to end: a throwaway PostgreSQL whose
//! archive_command fails, pgvigil in-process polling every second, and a real Prometheus
//! scraping it every second and evaluating `alerts/pgvigil.rules.yml`. The archiving alert
//! goes pending, fires, and resolves once a working archive_command archives; every panel
//! expression of every dashboard in `dashboards/` is valid PromQL on the stored series, and
//! the panels left without data are the ones the workload cannot feed (each with a reason).
//! Needs `prometheus` and `promtool` on PATH (scripts/test.sh installs them).

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::prometheus::Prometheus;
use common::*;
use pgvigil::demo::cluster::{PgBouncerOptions, TempPgBouncer};

/// The shipped rules, loaded whole so Prometheus checks every rule of the file.
const RULES: &str = include_str!("../alerts/pgvigil.rules.yml");

/// The alert under test. Its shipped `for:` (10m) is far longer than a test; the copy
/// Prometheus loads has it shortened to [`SHORT_FOR`] (see [`with_short_for`]).
const ARCHIVING_FAILING: &str = "PostgresWalArchivingFailing";
const SHORT_FOR: &str = "5s";

const PROMETHEUS_WAIT: Duration = Duration::from_secs(60);

/// `rules` with the `for:` of each alert in `alerts` replaced by `for_`: the first `for:`
/// line after the rule's `- alert: NAME` line. Every other rule keeps its duration. This is
/// a test copy only; the shipped file is unchanged.
fn with_short_for(rules: &str, alerts: &[&str], for_: &str) -> String {
    let mut out = String::with_capacity(rules.len());
    let mut in_rule = false;
    let mut replaced = 0;
    for line in rules.lines() {
        let t = line.trim_start();
        if let Some(name) = t.strip_prefix("- alert:") {
            in_rule = alerts.contains(&name.trim());
        }
        if in_rule && t.starts_with("for:") {
            let indent = &line[..line.len() - t.len()];
            out.push_str(&format!("{indent}for: {for_}\n"));
            in_rule = false;
            replaced += 1;
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    assert_eq!(replaced, alerts.len(), "a `for:` for each of {alerts:?}");
    out
}

/// States of the alert `name` now: e.g. `["pending"]`, `["firing"]`, `[]` once resolved.
fn alert_states(prom: &Prometheus, name: &str) -> Result<Vec<String>, String> {
    Ok(prom
        .alerts()?
        .into_iter()
        .filter(|(n, _, _)| n == name)
        .map(|(_, state, _)| state)
        .collect())
}

/// Polls Prometheus until `check` is true, or panics after `timeout` with the log.
fn prom_wait(prom: &Prometheus, timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}\n--- prometheus log ---\n{}",
            prom.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Every `dashboards/*.json`, parsed, by file name.
fn dashboards() -> Vec<(String, serde_json::Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).expect("read dashboard");
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            (name, serde_json::from_str(&text).expect("dashboard JSON"))
        })
        .collect()
}

/// A panel's expressions with the Grafana variables substituted as "All" would:
/// `$__rate_interval` 30s (1 s scrapes), `$__range` 10m (longer than the test),
/// `$__interval` 15s, every template variable (`$target`, `${datname}`, `$user`) `.*`.
fn substitute(expr: &str) -> String {
    let re =
        regex::Regex::new(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::[^}]*)?\}|\$([A-Za-z_][A-Za-z0-9_]*)")
            .expect("regex");
    re.replace_all(expr, |c: &regex::Captures| {
        let name = c.get(1).or(c.get(2)).expect("a group").as_str();
        match name {
            "__rate_interval" => "30s",
            "__range" => "10m",
            "__interval" => "15s",
            _ => ".*",
        }
        .to_owned()
    })
    .into_owned()
}

/// (dashboard, panel id, panel title) -> series per target expression, for every non-row
/// panel (titles repeat within a dashboard: a stat and a table of the same thing).
type Evaluation = BTreeMap<(String, u64, String), Vec<usize>>;

/// Runs every panel expression as an instant query; panics on the first invalid one.
fn evaluate_dashboards(prom: &Prometheus) -> Evaluation {
    let mut out = Evaluation::new();
    for (file, dash) in dashboards() {
        let mut panels = Vec::new();
        for p in dash["panels"].as_array().into_iter().flatten() {
            panels.push(p);
            panels.extend(p["panels"].as_array().into_iter().flatten());
        }
        for p in panels.into_iter().filter(|p| p["type"] != "row") {
            let title = p["title"].as_str().unwrap_or("?").to_owned();
            let id = p["id"].as_u64().unwrap_or_default();
            let mut counts = Vec::new();
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = substitute(t["expr"].as_str().unwrap_or(""));
                match prom.query(&expr) {
                    Ok(series) => counts.push(series.len()),
                    Err(e) => panic!("{file}: panel {title}: invalid expression {expr}\n{e}"),
                }
            }
            out.insert((file.clone(), id, title), counts);
        }
    }
    out
}

/// Why a panel has no data in this test: what the workload does not (cheaply) produce.
/// A panel without data and without a reason here fails the test.
const NO_DATA_REASONS: [(&str, &str, &str); 7] = [
    (
        "pgvigil-overview.json",
        "Collector errors/s",
        "no collector failed (pgvigil_collector_errors_total appears with the first error)",
    ),
    (
        "pgvigil-operations.json",
        "Standby lag (bytes)",
        "needs a standby streaming from the server (pg_receivewal not in the bindir)",
    ),
    (
        "pgvigil-operations.json",
        "Standby lag (seconds)",
        "needs a standby streaming from the server (pg_receivewal not in the bindir)",
    ),
    (
        "pgvigil-operations.json",
        "Replay delay (standby)",
        "standby-only metric; the test server is a primary",
    ),
    (
        "pgvigil-operations.json",
        "WAL receiver streaming",
        "standby-only metric; the test server is a primary",
    ),
    (
        "pgvigil-overview.json",
        "Slow-query spans/s",
        "tracing is off: no OTLP endpoint configured",
    ),
    (
        "pgvigil-locks-indexes.json",
        "Build ETA",
        "a build waiting for lockers has no rate to extrapolate from",
    ),
];

/// Stops the psql workload thread on drop, pass or fail.
struct Stop(Arc<AtomicBool>);

impl Drop for Stop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[test]
fn archiving_alert_fires_and_resolves_and_every_dashboard_panel_evaluates() {
    common::prometheus::tool("prometheus");

    let pg = cluster(&[
        ("archive_mode", "on"),
        ("archive_command", "false"),
        // For the planning-time panel.
        ("pg_stat_statements.track_planning", "on"),
    ]);
    // For the security panels: a password that expires, a policy with RLS off.
    pg.psql(
        "postgres",
        "CREATE ROLE expiring LOGIN VALID UNTIL '2099-01-01 00:00:00+00';
         CREATE TABLE guarded (id int, owner text);
         CREATE POLICY own_rows ON guarded USING (owner = current_user);",
    )
    .unwrap();
    // A PgBouncer in front of it, for the PgBouncer panels (target b1).
    let bouncer = TempPgBouncer::start(&pg, &PgBouncerOptions::default())
        .unwrap_or_else(|e| panic!("start PgBouncer: {e}"));
    let run = start(config(&format!(
        "targets:\n  - name: t1\n    dsn: \"{}\"\n    labels: {{env: test}}\n  \
         - name: b1\n    kind: pgbouncer\n    dsn: \"{}\"\n\
         collectors:\n  defaults: {{interval: 1s, timeout: 5s}}\n",
        pg.dsn(),
        bouncer.dsn_for("pgvigil", "pgvigil-secret", "pgbouncer")
    )));
    let rules = with_short_for(RULES, &[ARCHIVING_FAILING], SHORT_FOR);
    let prom = Prometheus::start_with_rules(run.addr, Some(&rules));
    let shipped = RULES.matches("- alert:").count();
    prom_wait(
        &prom,
        PROMETHEUS_WAIT,
        "the rules and a first scrape",
        || {
            prom.rule_count() == Ok(shipped)
                && prom
                    .query("pg_archive_mode_enabled{job=\"pgvigil\"}")
                    .is_ok_and(|r| r.len() == 1 && r[0].1 == 1.0)
        },
    );
    assert_eq!(alert_states(&prom, ARCHIVING_FAILING), Ok(vec![]));

    // (1) Archiving fails: a completed segment the archiver cannot archive.
    pg.psql(
        "postgres",
        "CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g; SELECT pg_switch_wal();",
    )
    .unwrap();
    let failed_at = Instant::now();
    let (mut pending, mut firing) = (None, None);
    prom_wait(
        &prom,
        PROMETHEUS_WAIT,
        "the archiving alert to fire",
        || {
            let states = alert_states(&prom, ARCHIVING_FAILING).unwrap_or_default();
            if states.iter().any(|s| s == "pending") && pending.is_none() {
                pending = Some(failed_at.elapsed());
            }
            if states.iter().any(|s| s == "firing") {
                firing = Some(failed_at.elapsed());
            }
            firing.is_some()
        },
    );
    let firing = firing.expect("firing");
    println!(
        "{ARCHIVING_FAILING} (for: {SHORT_FOR} in the test copy): pending after {pending:?}, \
         firing after {firing:?} from the failed segment"
    );
    let labels = prom.alerts().unwrap();
    let (_, _, alert) = labels
        .iter()
        .find(|(n, _, _)| n == ARCHIVING_FAILING)
        .expect("the alert");
    assert_eq!(alert["target"], "t1", "{alert}");
    assert_eq!(alert["severity"], "critical", "{alert}");

    // (2) A workload that gives the dashboards something to show, while the alert fires.
    let workload = Workload::start(&pg);
    let (stop, statements) =
        workload_thread(&pg, &bouncer.dsn_for("app", "app-secret", "postgres"));
    wait_for_panels(&prom);
    let during = evaluate_dashboards(&prom);

    // (3) A working archive_command: the pending segments are archived, the alert resolves.
    pg.psql(
        "postgres",
        "ALTER SYSTEM SET archive_command = 'true'; SELECT pg_reload_conf();",
    )
    .unwrap();
    pg.psql(
        "postgres",
        "INSERT INTO t SELECT g FROM generate_series(1, 1000) g; SELECT pg_switch_wal();",
    )
    .unwrap();
    let fixed_at = Instant::now();
    prom_wait(
        &prom,
        Duration::from_secs(120),
        "the archiving alert to resolve",
        || alert_states(&prom, ARCHIVING_FAILING).is_ok_and(|s| s.is_empty()),
    );
    let resolved = fixed_at.elapsed();
    println!(
        "{ARCHIVING_FAILING}: resolved (absent from /api/v1/alerts) {resolved:?} after the fix"
    );
    prom_wait(&prom, PROMETHEUS_WAIT, "a last archived time", || {
        prom.query("pg_stat_archiver_last_archived_timestamp_seconds")
            .is_ok_and(|r| r.len() == 1)
    });
    let after = evaluate_dashboards(&prom);

    // (4) Every expression was valid (evaluate_dashboards panics otherwise); list the data.
    let reasons: BTreeMap<(&str, &str), &str> = NO_DATA_REASONS
        .iter()
        .map(|(f, t, r)| ((*f, *t), *r))
        .collect();
    let mut empty = Vec::new();
    let mut with_data = 0;
    println!("panel -> series (while firing / after the fix), per target expression:");
    for ((file, id, title), counts) in &during {
        let later = &after[&(file.clone(), *id, title.clone())];
        let has_data = counts.iter().chain(later).any(|n| *n > 0);
        println!(
            "  {file} | {title}: {counts:?} / {later:?}{}",
            if has_data { "" } else { "  NO DATA" }
        );
        if has_data {
            with_data += 1;
        } else {
            empty.push((file.as_str(), title.as_str()));
        }
    }
    println!(
        "{} panels, {with_data} with data, {} without:",
        during.len(),
        empty.len()
    );
    let mut unexplained = Vec::new();
    for (file, title) in &empty {
        match reasons.get(&(*file, *title)) {
            Some(r) => println!("  {file} | {title}: {r}"),
            None => unexplained.push(format!("{file} | {title}")),
        }
    }
    assert!(
        unexplained.is_empty(),
        "panels without data and without a reason in NO_DATA_REASONS:\n{}",
        unexplained.join("\n")
    );
    drop(stop);
    let _ = statements.join();
    drop(workload);
}

/// Sessions that hold the server in the states the dashboards show: an idle-in-transaction
/// writer holding an exclusive lock, a query waiting for that lock, a CREATE INDEX
/// CONCURRENTLY waiting for the writer, a VACUUM (FREEZE) waiting for a page a cursor pins,
/// a physical replication slot, a setting pending restart, and an invalid index left by a
/// unique CREATE INDEX CONCURRENTLY that failed on duplicates.
struct Workload {
    _sessions: Vec<Session>,
    _pending: Vec<Pending>,
    /// `pg_receivewal` streaming through the slot: a walsender in pg_stat_replication
    /// for the standby lag panels (absent if the bindir has no pg_receivewal).
    _receiver: Option<(KillOnDrop, tempfile::TempDir)>,
}

impl Workload {
    fn start(pg: &TempCluster) -> Workload {
        let max: i64 = pg
            .psql("postgres", "SHOW max_connections")
            .unwrap()
            .parse()
            .unwrap();
        pg.psql(
            "postgres",
            &format!(
                "CREATE TABLE lk (id int); CREATE TABLE ix (id int); \
                 CREATE TABLE v AS SELECT g FROM generate_series(1, 20000) g; \
                 SELECT pg_create_physical_replication_slot('ops_slot', true); \
                 ALTER SYSTEM SET max_connections = {}; SELECT pg_reload_conf();",
                max + 1
            ),
        )
        .unwrap();
        // Before the holder's transaction opens: a concurrent build waits for older ones.
        pg.psql(
            "postgres",
            "CREATE TABLE dup AS SELECT 1 AS id FROM generate_series(1, 2)",
        )
        .unwrap();
        let failed = pg.psql(
            "postgres",
            "CREATE UNIQUE INDEX CONCURRENTLY dup_id ON dup (id)",
        );
        assert!(failed.is_err(), "a unique index on duplicates: {failed:?}");
        let holder = Session::connect(&pg.dsn());
        holder.run("BEGIN; LOCK TABLE lk IN ACCESS EXCLUSIVE MODE; INSERT INTO ix VALUES (1)");
        let waiter = Session::connect(&pg.dsn());
        let waiting = waiter.start("SELECT * FROM lk");
        let builder = Session::connect(&pg.dsn());
        let building = builder.start("CREATE INDEX CONCURRENTLY ix_id ON ix (id)");
        let cursor = Session::connect(&pg.dsn());
        cursor.run("BEGIN; DECLARE c CURSOR FOR SELECT * FROM v; FETCH 1 FROM c");
        let vacuumer = Session::connect(&pg.dsn());
        let vacuuming = vacuumer.start("VACUUM (FREEZE) v");
        let receivewal = pg.bindir().join("pg_receivewal");
        let receiver = receivewal.is_file().then(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            let child = Command::new(&receivewal)
                .arg("-D")
                .arg(dir.path())
                .args(["-d", &pg.dsn(), "--slot=ops_slot", "--no-loop", "-s", "1"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start pg_receivewal");
            (KillOnDrop(child), dir)
        });
        Workload {
            _sessions: vec![holder, waiter, builder, cursor, vacuumer],
            _pending: vec![waiting, building, vacuuming],
            _receiver: receiver,
        }
    }
}

/// A steady stream of statements (commits, a rollback, a sort spilling to a temp file)
/// from psql, so rates and pg_stat_statements windows have data; every fourth one goes
/// through PgBouncer (`via`), for its pools and stats.
fn workload_thread(pg: &TempCluster, via: &str) -> (Stop, std::thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let (direct, via, psql) = (pg.dsn(), via.to_string(), pg.psql_program());
    let flag = stop.clone();
    let handle = std::thread::spawn(move || {
        let mut i = 0u64;
        while !flag.load(Ordering::Relaxed) {
            let sql = match i % 4 {
                // Long enough that the activity sampler (every second) often sees it running,
                // so a top-N query has DB load for the "queries by load" panels.
                0 => "SELECT pg_sleep(0.2)",
                1 => "BEGIN; INSERT INTO t VALUES (1); ROLLBACK",
                2 => {
                    "SET work_mem = '64kB'; \
                     SELECT count(*) FROM (SELECT g FROM generate_series(1, 50000) g ORDER BY g DESC) s"
                }
                _ => "UPDATE t SET g = g WHERE g < 10",
            };
            let dsn = if i % 4 == 0 { &via } else { &direct };
            let _ = Command::new(&psql)
                .args(["-X", "-q", "-d", dsn.as_str(), "-c", sql])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            i += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    (Stop(stop), handle)
}

/// Waits (bounded) until the series the slow panels need are in Prometheus: lock waits,
/// the index build, the vacuum, statement windows, and 30 s of rates. Missing ones are not
/// an error here: the listing says which panels stayed empty.
fn wait_for_panels(prom: &Prometheus) {
    let deadline = Instant::now() + PROMETHEUS_WAIT;
    let started = Instant::now();
    let want = [
        "pg_locks_blocked_sessions > 0",
        "pg_create_index_phase_info",
        "pg_vacuum_progress_ratio",
        "pg_stat_statements_window_exec_seconds_stddev",
        "pg_settings_pending_restart",
        "pg_replication_slot_retained_bytes",
        "rate(pg_activity_active_seconds_total[30s])",
        // A top-N query with DB load and its text: the join of the "queries by load" panels.
        "sum by (target, queryid) (rate(pg_activity_active_seconds_total{queryid!~\"other|\"}[10m])) \
         * on (target, queryid) group_left (query) \
         max by (target, queryid, query) (pg_stat_statements_query_info{queryid!=\"other\"})",
    ];
    let mut missing: Vec<&str> = want.to_vec();
    while Instant::now() < deadline {
        missing.retain(|q| !prom.query(q).is_ok_and(|r| !r.is_empty()));
        if missing.is_empty() && started.elapsed() > Duration::from_secs(30) {
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    println!("still without series after {PROMETHEUS_WAIT:?}: {missing:?}");
}

#[test]
fn the_test_copy_shortens_only_the_alert_under_test() {
    let copy = with_short_for(RULES, &[ARCHIVING_FAILING], SHORT_FOR);
    assert_eq!(copy.lines().count(), RULES.lines().count());
    let changed: Vec<(&str, &str)> = RULES
        .lines()
        .zip(copy.lines())
        .filter(|(a, b)| a != b)
        .collect();
    assert_eq!(changed, [("        for: 10m", "        for: 5s")]);
    assert_eq!(
        substitute(r#"rate(x{a=~"$target", b=~"${datname:regex}"}[$__rate_interval])"#),
        r#"rate(x{a=~".*", b=~".*"}[30s])"#
    );
}
