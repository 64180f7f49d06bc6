//! A real Prometheus (and promtool) against pgvigil: the exposition passes
//! `promtool check metrics`, and Prometheus scrapes and stores the same value PostgreSQL
//! reports. Needs `prometheus` and `promtool` on PATH (scripts/test.sh installs them).

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const WAIT: Duration = Duration::from_secs(30);
const PROMETHEUS_WAIT: Duration = Duration::from_secs(60);

/// Finds `name` on PATH (or in /usr/bin); fails the test with a hint otherwise.
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not installed; run scripts/test.sh (it installs the Debian \
                 package `prometheus`, which provides prometheus and promtool)"
            )
        })
}

/// Kills the child by its own handle when the test ends (pass or fail).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Percent-encodes a query-string value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Runs an instant query; returns each series' labels and value, or the reason it could
/// not (Prometheus not up yet, bad response).
fn query(port: u16, promql: &str) -> Result<Vec<(serde_json::Value, f64)>, String> {
    let url = format!(
        "http://127.0.0.1:{port}/api/v1/query?query={}",
        encode(promql)
    );
    let resp = reqwest::blocking::Client::new()
        .get(&url)
        .timeout(Duration::from_secs(5))
        .send()
        .map_err(|e| format!("GET {url}: {e}"))?;
    let text = resp.text().map_err(|e| format!("GET {url}: {e}"))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
    if json["status"] != "success" {
        return Err(format!("query failed: {text}"));
    }
    let result = json["data"]["result"]
        .as_array()
        .ok_or_else(|| format!("no data.result: {text}"))?;
    result
        .iter()
        .map(|series| {
            let v = series["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
                .ok_or_else(|| format!("bad value in {series}"))?;
            Ok((series["metric"].clone(), v))
        })
        .collect()
}

#[test]
fn promtool_accepts_the_exposition_and_prometheus_scrapes_it() {
    let prometheus = tool("prometheus");
    let promtool = tool("promtool");

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
        let dsn = pg.dsn();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = Command::new("psql")
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
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics: {:?}\n{report}\n--- exposition ---\n{text}",
        out.status
    );

    // (b) a real Prometheus scrapes pgvigil every second.
    let dir = tempfile::tempdir().unwrap();
    let config_file = write(
        dir.path(),
        "prometheus.yml",
        &format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: pgvigil\n    static_configs:\n      - targets: [\"{}\"]\n",
            run.addr
        ),
    );
    let data = dir.path().join("data");
    let log_path = dir.path().join("prometheus.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let port = free_port();
    let _prom = KillOnDrop(
        Command::new(&prometheus)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start prometheus"),
    );
    let prom_log = || tail(&std::fs::read_to_string(&log_path).unwrap_or_default(), 30);

    let deadline = Instant::now() + PROMETHEUS_WAIT;
    let mut last;
    loop {
        let got = query(port, "pg_settings_max_connections{target=\"t1\"}");
        let up = query(port, "up{job=\"pgvigil\"}");
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
            prom_log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // pg_stat_statements through Prometheus: a rate over the counters, and the window
    // stddev gauge.
    let deadline = Instant::now() + PROMETHEUS_WAIT;
    loop {
        let rate = query(
            port,
            "rate(pg_stat_statements_calls_total{target=\"t1\"}[1m])",
        );
        let sd = query(
            port,
            "pg_stat_statements_window_exec_seconds_stddev{target=\"t1\"}",
        );
        match (&rate, &sd) {
            (Ok(r), Ok(sd)) if !r.is_empty() && !sd.is_empty() => {
                assert!(
                    r.iter().any(|(_, v)| *v > 0.0),
                    "some statement has a rate: {r:?}"
                );
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
            prom_log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(_stop);
    let _ = workload.join();
}
