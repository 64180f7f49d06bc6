//! A real Prometheus scraping a test's pgvigil, and `promtool check metrics`. Both need
//! `prometheus` and `promtool` on PATH (scripts/test.sh installs them).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{free_port, tail, write, KillOnDrop};

/// Finds `name` on PATH (or in /usr/bin); fails the test with a hint otherwise.
pub fn tool(name: &str) -> PathBuf {
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

/// Runs `promtool check metrics` on `exposition`; `Err` with its status and report when
/// it fails or has anything to say (a lint warning is a failure too).
pub fn promtool_check_metrics(exposition: &str) -> Result<(), String> {
    let mut child = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("promtool stdin")
        .write_all(exposition.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("wait for promtool");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && report.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("{}\n{report}", out.status))
    }
}

/// A Prometheus server scraping one target every second as job `pgvigil`; killed (by
/// its own handle) and its data deleted on drop.
pub struct Prometheus {
    pub port: u16,
    log_path: PathBuf,
    _child: KillOnDrop,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus on a free port with a fresh data directory, scraping `target`.
    pub fn start(target: SocketAddr) -> Prometheus {
        Prometheus::start_with_rules(target, None)
    }

    /// Like [`Prometheus::start`], and evaluating the alerting/recording `rules` (the text
    /// of a rule file, written next to the config) every second.
    pub fn start_with_rules(target: SocketAddr, rules: Option<&str>) -> Prometheus {
        let prometheus = tool("prometheus");
        let dir = tempfile::tempdir().expect("tempdir");
        let rule_files = match rules {
            Some(text) => {
                let path = write(dir.path(), "rules.yml", text);
                format!("rule_files:\n  - \"{}\"\n", path.display())
            }
            None => String::new(),
        };
        let config_file = write(
            dir.path(),
            "prometheus.yml",
            &format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n{rule_files}scrape_configs:\n  - job_name: pgvigil\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        );
        let data = dir.path().join("data");
        let log_path = dir.path().join("prometheus.log");
        let log = std::fs::File::create(&log_path).expect("create prometheus.log");
        let port = free_port();
        let child = Command::new(&prometheus)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        Prometheus {
            port,
            log_path,
            _child: KillOnDrop(child),
            _dir: dir,
        }
    }

    /// The last `n` lines of Prometheus's log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        tail(
            &std::fs::read_to_string(&self.log_path).unwrap_or_default(),
            n,
        )
    }

    /// Runs an instant query; returns each series' labels and value, or the reason it
    /// could not (Prometheus not up yet, bad response).
    pub fn query(&self, promql: &str) -> Result<Vec<(serde_json::Value, f64)>, String> {
        let url = format!(
            "http://127.0.0.1:{}/api/v1/query?query={}",
            self.port,
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
}

impl Prometheus {
    /// The active alerts (`/api/v1/alerts`): name, state (`pending` or `firing`) and
    /// labels of each; resolved alerts are absent.
    pub fn alerts(&self) -> Result<Vec<(String, String, serde_json::Value)>, String> {
        let url = format!("http://127.0.0.1:{}/api/v1/alerts", self.port);
        let text = reqwest::blocking::Client::new()
            .get(&url)
            .timeout(Duration::from_secs(5))
            .send()
            .and_then(|r| r.text())
            .map_err(|e| format!("GET {url}: {e}"))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
        if json["status"] != "success" {
            return Err(format!("alerts failed: {text}"));
        }
        Ok(json["data"]["alerts"]
            .as_array()
            .ok_or_else(|| format!("no data.alerts: {text}"))?
            .iter()
            .map(|a| {
                (
                    a["labels"]["alertname"].as_str().unwrap_or("").to_owned(),
                    a["state"].as_str().unwrap_or("").to_owned(),
                    a["labels"].clone(),
                )
            })
            .collect())
    }

    /// The rule groups Prometheus loaded (`/api/v1/rules`): how many rules in all.
    pub fn rule_count(&self) -> Result<usize, String> {
        let url = format!("http://127.0.0.1:{}/api/v1/rules", self.port);
        let text = reqwest::blocking::Client::new()
            .get(&url)
            .timeout(Duration::from_secs(5))
            .send()
            .and_then(|r| r.text())
            .map_err(|e| format!("GET {url}: {e}"))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
        Ok(json["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|g| g["rules"].as_array().map_or(0, Vec::len))
            .sum())
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
