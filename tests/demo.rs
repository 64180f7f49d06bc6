//! `pgvigil demo` as a user runs it: the real binary, its timeline compressed by the
//! hidden `--timeline-scale` knob (PGVIGIL_DEMO_TIMELINE_SCALE), watched through its
//! /metrics and its stderr. The standby is a second target in recovery; archiving fails
//! (failures counted, `failing` 1) and recovers (a segment archived after the last
//! failure); a session idles in its transaction; a slot retains WAL, then is dropped; the
//! erratic query's slow executions are printed as spans; a real Prometheus loading the
//! shipped rules has the archiving alert pending while archiving fails; Ctrl-C removes
//! everything.
//! `--no-standby` has one target; `--print-prometheus-config` is a config promtool accepts,
//! with the shipped rules. Needs `promtool` on PATH (scripts/test.sh installs it).

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::binary::{self, Pgvigil};
use common::prometheus::Prometheus;
use common::*;

/// 30 min of timeline in 90 s: archiving fails from 3 s to 42 s, the idle transaction
/// from 6 s to 30 s, the slot from 9 s to 54 s, the erratic query from 12 s to 87 s, the
/// standby pauses from 15 s to 51 s. The demo polls every 5 s.
const SCALE: &str = "0.05";

/// The demo creates its servers (initdb, a 1.5M-row table, a base backup) before it listens.
const DEMO_START: Duration = Duration::from_secs(180);

/// The whole compressed timeline, with room for a slow machine.
const TIMELINE_WAIT: Duration = Duration::from_secs(180);

fn start_demo(extra: &[&str]) -> Pgvigil {
    let mut args = vec!["--listen", "127.0.0.1:0", "demo"];
    args.extend_from_slice(extra);
    Pgvigil::start_within(
        args,
        &[
            ("PGVIGIL_DEMO_TIMELINE_SCALE", SCALE),
            ("PGVIGIL_LOG", "info"),
        ],
        DEMO_START,
    )
}

/// The data directories the demo announced ("... (data in DIR) ...").
fn data_dirs(log: &str) -> Vec<PathBuf> {
    log.lines()
        .filter_map(|l| l.split("(data in ").nth(1))
        .filter_map(|rest| rest.split(')').next())
        .map(PathBuf::from)
        .collect()
}

/// Ctrl-C: the demo exits by itself, says so, and its temp directories are gone.
fn interrupt_and_check_cleanup(mut demo: Pgvigil, expect_dirs: usize) {
    let dirs = data_dirs(&demo.log());
    assert_eq!(dirs.len(), expect_dirs, "data dirs announced: {dirs:?}");
    for d in &dirs {
        assert!(d.exists(), "{} exists while the demo runs", d.display());
    }
    demo.signal("INT");
    let interrupted = Instant::now();
    let deadline = interrupted + Duration::from_secs(120);
    while demo.is_running() {
        assert!(
            Instant::now() < deadline,
            "demo still running 120 s after SIGINT:\n{}",
            tail(&demo.log(), 30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("the demo exited {:?} after SIGINT", interrupted.elapsed());
    let log = demo.stop();
    assert!(
        log.contains("pgvigil demo: stopped and cleaned up"),
        "{}",
        tail(&log, 30)
    );
    for d in &dirs {
        let root = d.parent().expect("data dir has a parent");
        assert!(!root.exists(), "{} removed on Ctrl-C", root.display());
    }
}

/// What the test has seen so far; each is asserted at the end.
#[derive(Debug, Default)]
struct Seen {
    standby_in_recovery: bool,
    standby_streaming: bool,
    /// `failed_total` at the first scrape where archiving was failing.
    first_failing: Option<f64>,
    /// `archived_total` once failures increased while failing.
    failures_grew: Option<f64>,
    archived_after_recovery: bool,
    idle_in_transaction_seconds: f64,
    slot_retained_bytes: f64,
    slot_gone_after_drop: bool,
    replay_paused: bool,
    /// The checkout lookup's queryids (one: every duration is the same statement).
    checkout_queryids: std::collections::BTreeSet<String>,
    /// Its largest window stddev / mean (PostgresQueryErratic wants > 2).
    checkout_cv: f64,
    /// A real Prometheus with the shipped rules had PostgresWalArchivingFailing pending
    /// (its `for:` is 10 min) for target demo while archiving failed.
    archiving_alert_pending: bool,
}

impl Seen {
    fn all(&self) -> bool {
        self.standby_in_recovery
            && self.standby_streaming
            && self.failures_grew.is_some()
            && self.archived_after_recovery
            && self.idle_in_transaction_seconds > 0.0
            && self.slot_retained_bytes > 0.0
            && self.slot_gone_after_drop
            && self.replay_paused
            && self.checkout_cv > 2.0
            && self.archiving_alert_pending
    }

    /// `slot_dropped_a_poll_ago`: the drop was announced more than a poll interval ago, so
    /// this scrape comes from a poll after it.
    fn look(&mut self, s: &[Sample], log: &str, slot_dropped_a_poll_ago: bool) {
        let v = |name: &str, labels: &[(&str, &str)]| value(s, name, labels);
        let demo = [("target", "demo")];
        let standby = [("target", "demo-standby")];
        if v("pg_up", &standby) == Some(1.0)
            && v("pg_in_recovery", &standby) == Some(1.0)
            && v("pg_in_recovery", &demo) == Some(0.0)
        {
            self.standby_in_recovery = true;
        }
        if !find(
            s,
            "pg_replication_standby_info",
            &[
                ("target", "demo"),
                ("application_name", "demo_standby"),
                ("state", "streaming"),
            ],
        )
        .is_empty()
        {
            self.standby_streaming = true;
        }
        let failing = v("pg_stat_archiver_failing", &demo);
        let failed = v("pg_stat_archiver_failed_total", &demo).unwrap_or(0.0);
        let archived = v("pg_stat_archiver_archived_total", &demo).unwrap_or(0.0);
        let recovered = log.contains("now: archiving recovered");
        if failing == Some(1.0) && !recovered {
            match self.first_failing {
                None => self.first_failing = Some(failed),
                Some(first) if failed > first && self.failures_grew.is_none() => {
                    self.failures_grew = Some(archived)
                }
                Some(_) => {}
            }
        }
        if let (true, Some(archived_while_failing)) = (recovered, self.failures_grew) {
            let last_ok = v("pg_stat_archiver_last_archived_timestamp_seconds", &demo);
            let last_failed = v("pg_stat_archiver_last_failed_timestamp_seconds", &demo);
            if failing == Some(0.0)
                && archived > archived_while_failing
                && last_ok > last_failed
                && last_failed.is_some()
            {
                self.archived_after_recovery = true;
            }
        }
        if let Some(idle) = v(
            "pg_stat_activity_oldest_idle_in_transaction_seconds",
            &[("target", "demo"), ("datname", "shop")],
        ) {
            self.idle_in_transaction_seconds = self.idle_in_transaction_seconds.max(idle);
        }
        let slot = [("target", "demo"), ("slot_name", "demo_forgotten_standby")];
        let retained = v("pg_replication_slot_retained_bytes", &slot);
        if let Some(bytes) = retained {
            assert_eq!(
                v("pg_replication_slot_active", &slot),
                Some(0.0),
                "nobody consumes the forgotten slot"
            );
            self.slot_retained_bytes = self.slot_retained_bytes.max(bytes);
        }
        if slot_dropped_a_poll_ago && self.slot_retained_bytes > 0.0 && retained.is_none() {
            self.slot_gone_after_drop = true;
        }
        if v("pg_replication_replay_paused", &standby) == Some(1.0) {
            self.replay_paused = true;
        }
        for info in find(s, "pg_stat_statements_query_info", &demo) {
            let query = info.labels.get("query").map(String::as_str).unwrap_or("");
            let Some(id) = info.labels.get("queryid") else {
                continue;
            };
            if !query.starts_with("SELECT o.id, o.total, pg_sleep(") {
                continue;
            }
            self.checkout_queryids.insert(id.clone());
            let q = [("target", "demo"), ("queryid", id.as_str())];
            let stddev = v("pg_stat_statements_window_exec_seconds_stddev", &q);
            let mean = v("pg_stat_statements_window_exec_seconds_mean", &q);
            if let (Some(sd), Some(m)) = (stddev, mean) {
                if m > 0.0 {
                    self.checkout_cv = self.checkout_cv.max(sd / m);
                }
            }
        }
    }
}

#[test]
fn demo_reproduces_the_outages_on_its_timeline() {
    let demo = start_demo(&[]);
    let prom = Prometheus::start_with_rules(
        demo.addr(),
        Some(include_str!("../alerts/pgvigil.rules.yml")),
    );
    let deadline = Instant::now() + TIMELINE_WAIT;
    let mut seen = Seen::default();
    let mut slot_drop_seen_at: Option<Instant> = None;
    while !seen.all() {
        let log = demo.log();
        let (_, body) = get(&demo.url("/metrics"));
        if log.contains("now: the forgotten slot dropped") && slot_drop_seen_at.is_none() {
            slot_drop_seen_at = Some(Instant::now());
        }
        // The slot's series is gone only from the first poll after the drop (5 s).
        let after_drop = slot_drop_seen_at.is_some_and(|t| t.elapsed() > Duration::from_secs(6));
        seen.look(&parse(&body), &log, after_drop);
        if log.contains("now: archiving fails") && !log.contains("now: archiving recovered") {
            let alerts = prom.alerts().unwrap_or_default();
            seen.archiving_alert_pending |= alerts.iter().any(|(name, state, labels)| {
                name == "PostgresWalArchivingFailing"
                    && state == "pending"
                    && labels["target"] == "demo"
            });
        }
        assert!(
            Instant::now() < deadline,
            "not everything seen within {TIMELINE_WAIT:?}: {seen:?}\nprometheus:\n{}\nstderr:\n{}\nlast scrape (archiver, slots, activity):\n{}",
            prom.log_tail(10),
            tail(&log, 40),
            body.lines()
                .filter(|l| l.starts_with("pg_stat_archiver")
                    || l.starts_with("pg_replication_slot")
                    || l.starts_with("pg_stat_activity_oldest_idle"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    println!("seen: {seen:?}");
    assert_eq!(
        seen.checkout_queryids.len(),
        1,
        "the checkout lookup is one statement whatever its duration: {:?}",
        seen.checkout_queryids
    );
    // The idle session really idled: at least one poll saw it idle for a few seconds.
    assert!(
        seen.idle_in_transaction_seconds >= 2.0,
        "idle in transaction for {} s",
        seen.idle_in_transaction_seconds
    );
    // The slot retained at least a segment (1 MiB in the demo) of WAL.
    assert!(
        seen.slot_retained_bytes >= 1_048_576.0,
        "slot retained {} bytes",
        seen.slot_retained_bytes
    );

    let log = demo.log();
    for line in [
        "pgvigil demo: timeline (repeats every 1 min 30 s",
        "now: archiving fails for 39 s (alert PostgresWalArchivingFailing",
        "now: archiving recovered",
        "now: a session idles in its transaction for 24 s (alert PostgresIdleInTransaction",
        "now: the idle-in-transaction session rolled back",
        "now: a forgotten replication slot retains WAL for 45 s",
        "now: the forgotten slot dropped",
        "now: a query's latency turns erratic for 1 min 15 s",
        "now: the standby stops replaying for 36 s",
        "now: the standby replays again",
    ] {
        assert!(
            log.contains(line),
            "{line:?} on stderr:\n{}",
            tail(&log, 60)
        );
    }
    // Slow-query spans on the console (no OTLP endpoint): trace id, duration, query.
    let span_line = |l: &&str| {
        let mut words = l.split(' ');
        words.next() == Some("span")
            && words
                .next()
                .is_some_and(|id| id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()))
            && words.next().is_some_and(|d| {
                d.strip_suffix('s')
                    .and_then(|n| n.parse::<f64>().ok())
                    .is_some_and(|n| n >= 0.5)
            })
    };
    let spans: Vec<&str> = log.lines().filter(span_line).collect();
    assert!(
        spans
            .iter()
            .any(|l| l.contains(" demo/shop: SELECT o.id, o.total, pg_sleep(")),
        "a console span of the erratic checkout lookup; spans: {spans:#?}"
    );
    interrupt_and_check_cleanup(demo, 2);
}

#[test]
fn demo_without_standby_monitors_one_target() {
    let demo = start_demo(&["--no-standby"]);
    let s = wait_for(&demo, Duration::from_secs(60), "a poll of the demo", |s| {
        (value(s, "pg_up", &[("target", "demo")]) == Some(1.0)
            && value(s, "pg_in_recovery", &[("target", "demo")]).is_some())
        .then(|| s.to_vec())
    });
    let targets: std::collections::BTreeSet<&str> = s
        .iter()
        .filter_map(|x| x.labels.get("target").map(String::as_str))
        .collect();
    assert_eq!(
        targets.into_iter().collect::<Vec<_>>(),
        vec!["demo"],
        "one target"
    );
    assert_eq!(
        value(&s, "pg_in_recovery", &[("target", "demo")]),
        Some(0.0)
    );
    assert!(find(&s, "pg_replication_standby_info", &[]).is_empty());
    let log = demo.log();
    assert!(
        log.contains("pgvigil demo: timeline (repeats every"),
        "{log}"
    );
    assert!(!log.contains("standby stops replaying"), "{log}");
    assert!(!log.contains("pgvigil demo: standby on"), "{log}");
    interrupt_and_check_cleanup(demo, 1);
}

#[test]
fn print_prometheus_config_scrapes_the_demo_and_loads_the_rules() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = binary::command()
        .args([
            "--listen",
            "127.0.0.1:19999",
            "demo",
            "--print-prometheus-config",
        ])
        .current_dir(root)
        .output()
        .expect("run pgvigil");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("YAML");
    let rules = yaml["rule_files"][0].as_str().expect("a rule file");
    assert_eq!(
        PathBuf::from(rules),
        PathBuf::from(root).join("alerts/pgvigil.rules.yml")
    );
    assert_eq!(
        yaml["scrape_configs"][0]["static_configs"][0]["targets"][0].as_str(),
        Some("127.0.0.1:19999"),
        "{text}"
    );
    assert_eq!(
        yaml["scrape_configs"][0]["job_name"].as_str(),
        Some("pgvigil")
    );
    assert_eq!(yaml["global"]["scrape_interval"].as_str(), Some("5s"));

    // promtool checks the config and loads the rules file it names.
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "prometheus.yml", &text);
    let check = std::process::Command::new(prometheus::tool("promtool"))
        .args(["check", "config"])
        .arg(&path)
        .output()
        .expect("run promtool");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(check.status.success(), "promtool check config:\n{report}");
    assert!(report.contains("pgvigil.rules.yml"), "{report}");
    assert!(report.contains("SUCCESS"), "{report}");

    // Away from a checkout: the path Prometheus resolves next to its config, with a note.
    let out = binary::command()
        .args(["demo", "--print-prometheus-config"])
        .current_dir(dir.path())
        .output()
        .expect("run pgvigil");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("YAML");
    assert_eq!(
        yaml["rule_files"][0].as_str(),
        Some("alerts/pgvigil.rules.yml")
    );
    assert!(text.contains("copy alerts/pgvigil.rules.yml"), "{text}");
    assert_eq!(
        yaml["scrape_configs"][0]["static_configs"][0]["targets"][0].as_str(),
        Some("127.0.0.1:9187"),
        "the default listen address: {text}"
    );
}

#[test]
fn a_bad_timeline_scale_is_a_clear_error() {
    for bad in ["0", "-1", "fast", "1000"] {
        let out = binary::command()
            .args(["demo", &format!("--timeline-scale={bad}")])
            .output()
            .expect("run pgvigil");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad}: {err}");
        assert!(err.contains("is not a timeline scale"), "{bad}: {err}");
        assert!(!err.contains("panicked"), "{bad}: {err}");
    }
}
