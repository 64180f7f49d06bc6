//! A real Prometheus (and promtool) against pgvigil: the exposition passes
//! `promtool check metrics`, and Prometheus scrapes and stores the same value PostgreSQL
//! reports. Needs `prometheus` and `promtool` on PATH (scripts/test.sh installs them).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::prometheus::{promtool_check_metrics, Prometheus};
use common::*;

const WAIT: Duration = Duration::from_secs(30);
const PROMETHEUS_WAIT: Duration = Duration::from_secs(60);

#[test]
fn promtool_accepts_the_exposition_and_prometheus_scrapes_it() {
    // Fail early, before any server starts, when the tools are missing.
    common::prometheus::tool("prometheus");
    common::prometheus::tool("promtool");

    let pg = cluster(&[]);
    let run = start(config(&one_target(&pg.dsn(), "")));
    let max_connections: f64 = pg
        .psql("postgres", "SHOW max_connections")
        .unwrap()
        .parse()
        .unwrap();
    // A steady workload so statements have windows while Prometheus scrapes.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workload = {
        let stop = stop.clone();
        let (dsn, psql) = (pg.dsn(), pg.psql_program());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = Command::new(&psql)
                    .args(["-X", "-q", "-d", &dsn, "-c", "SELECT pg_sleep(0.01)"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    struct Stop(std::sync::Arc<std::sync::atomic::AtomicBool>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let _stop = Stop(stop);
    // Lint only once every family is there, statements and windows included.
    wait_for(&run, WAIT, "settings, statements and window stddev", |s| {
        value(s, "pg_settings_max_connections", &[("target", "t1")])?;
        (!find(s, "pg_stat_statements_window_exec_seconds_stddev", &[]).is_empty()).then_some(())
    });

    // (a) promtool lints the plain text exposition (0.0.4).
    let (status, text) = get(&run.url("/metrics"));
    assert_eq!(status, 200, "{text}");
    if let Err(report) = promtool_check_metrics(&text) {
        panic!("promtool check metrics: {report}\n--- exposition ---\n{text}");
    }

    // (b) a real Prometheus scrapes pgvigil every second.
    let prom = Prometheus::start(run.addr);

    let deadline = Instant::now() + PROMETHEUS_WAIT;
    let mut last;
    loop {
        let got = prom.query("pg_settings_max_connections{target=\"t1\"}");
        let up = prom.query("up{job=\"pgvigil\"}");
        match (&got, &up) {
            (Ok(got), Ok(up)) if got.len() == 1 && got[0].1 == max_connections && up.len() == 1 => {
                assert_eq!(up[0].1, 1.0, "up{{job=\"pgvigil\"}}: {up:?}");
                assert_eq!(got[0].0["job"], "pgvigil", "{got:?}");
                break;
            }
            _ => last = format!("pg_settings_max_connections: {got:?}\nup: {up:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not store pg_settings_max_connections = {max_connections} \
             within {PROMETHEUS_WAIT:?}\nlast answer:\n{last}\n--- prometheus log ---\n{}",
            prom.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // pg_stat_statements through Prometheus: a rate over the counters, and the window
    // stddev gauge.
    let deadline = Instant::now() + PROMETHEUS_WAIT;
    loop {
        let rate = prom.query("rate(pg_stat_statements_calls_total{target=\"t1\"}[1m])");
        let sd = prom.query("pg_stat_statements_window_exec_seconds_stddev{target=\"t1\"}");
        match (&rate, &sd) {
            // Wait for a positive rate too: the first two scrapes can carry the same
            // counter values (no poll between them), giving rates of 0 for a moment.
            (Ok(r), Ok(sd))
                if !r.is_empty() && !sd.is_empty() && r.iter().any(|(_, v)| *v > 0.0) =>
            {
                assert!(sd.iter().all(|(_, v)| v.is_finite() && *v >= 0.0), "{sd:?}");
                println!(
                    "rate(calls_total[1m]): {} series; window stddev: {} series",
                    r.len(),
                    sd.len()
                );
                break;
            }
            _ => last = format!("rate: {rate:?}\nstddev: {sd:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus has no pg_stat_statements series\nlast answer:\n{last}\n--- prometheus log ---\n{}",
            prom.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(_stop);
    let _ = workload.join();
}
