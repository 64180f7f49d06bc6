//! `pgvigil demo`: a throwaway local PostgreSQL (and a streaming standby of it) with a
//! workload and a timeline of outages, monitored by pgvigil, for a first look. Everything
//! it starts is stopped and deleted on Ctrl-C.
//!
//! - [`cluster`]: the throwaway servers (the integration tests use it too);
//! - `workload`: the schema and the sessions that give pgvigil something to watch all the
//!   time (queries, lock pile-ups, index builds);
//! - `timeline`: the outages, one after the other, as a schedule table (archiving that
//!   fails, a session idle in its transaction, a slot retaining WAL, an erratic query, a
//!   standby that stops replaying).
//!
//! This file wires them together: start the primary (archiving on), a monitoring role,
//! the standby, the workload and the timeline, point pgvigil at both servers and run it
//! until shutdown ([`run`]); and print a Prometheus config for it
//! ([`prometheus_config`]).

pub mod cluster;
mod timeline;
mod workload;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;

use cluster::{ClusterError, ClusterOptions, TempCluster};
use timeline::{Servers, Timeline};
use workload::Workload;

use crate::config::{Config, Interval, TargetConfig};
use crate::StartError;

/// The role pgvigil connects as in the demo: only `pg_monitor`, as recommended.
pub const DEMO_ROLE: &str = "pgvigil";

/// How often the demo polls: short-lived demo events (lock pile-ups, index builds)
/// need a faster poll than the default 15 s.
const DEMO_INTERVAL_SECS: u64 = 5;

/// Target names of the two servers.
pub const PRIMARY_TARGET: &str = "demo";
pub const STANDBY_TARGET: &str = "demo-standby";

/// `application_name` of the standby's WAL receiver, as the primary lists it.
const STANDBY_APP: &str = "demo_standby";

/// WAL segment size of the demo's cluster: the timeline switches segments every 20 s, and
/// archiving or a slot keeps them; 1 MiB instead of 16 keeps that to megabytes.
const WAL_SEGMENT_MB: u32 = 1;

/// The alert rules shipped with pgvigil, relative to a checkout or release tree.
pub const RULES_FILE: &str = "alerts/pgvigil.rules.yml";

/// How `pgvigil demo` runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DemoOptions {
    /// Where to serve /metrics (default: the config default).
    pub listen: Option<SocketAddr>,
    /// Start and monitor a streaming standby (`--no-standby` turns it off).
    pub standby: bool,
    /// Multiplies every time of the timeline (a hidden knob: tests use e.g. 0.05).
    pub timeline_scale: f64,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            listen: None,
            standby: true,
            timeline_scale: 1.0,
        }
    }
}

/// Parses `--timeline-scale`: a number above 0 and at most 100.
pub fn parse_timeline_scale(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if x > 0.0 && x <= 100.0 => Ok(x),
        _ => Err(format!(
            "{s:?} is not a timeline scale: use a number above 0 and at most 100 (e.g. 0.05)"
        )),
    }
}

/// Everything that can stop the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Cluster(#[from] ClusterError),
    #[error("{0}")]
    Dsn(String),
    #[error("{0}")]
    Run(#[from] StartError),
}

/// The demo's database servers, workload and timeline. Fields are dropped in order: the
/// timeline and the workload end their sessions before the servers they talk to stop.
pub struct Demo {
    /// Held for its `Drop`: ends the running outage scenario. Started last
    /// ([`Demo::start_timeline`]), so that its clock starts when pgvigil is about to watch.
    timeline: Option<Timeline>,
    /// What the timeline needs; taken when it starts.
    servers: Option<Servers>,
    /// Held for its `Drop`.
    _workload: Workload,
    pub standby: Option<TempCluster>,
    pub cluster: TempCluster,
}

impl Demo {
    /// Starts the cluster (archiving on, through an `archive_command` the timeline can
    /// make fail), creates the monitoring role, the standby (unless `standby` is false)
    /// and the workload. Blocks for a while (initdb, loading the schema, the base backup).
    pub fn start(standby: bool) -> Result<Demo, ClusterError> {
        let cluster = TempCluster::start(
            ClusterOptions::default()
                .with_setting("track_io_timing", "on")
                .with_setting("archive_mode", "on")
                .with_wal_segment_mb(WAL_SEGMENT_MB),
        )?;
        // The temp directory holding the data directory: the server's OS user owns it.
        let root = cluster.data_dir().parent().unwrap_or(cluster.data_dir());
        let archive_flag = root.join("archive-fails");
        let command = timeline::archive_command(&archive_flag, &root.join("archive"));
        cluster.psql(
            "postgres",
            &format!(
                "CREATE ROLE {DEMO_ROLE} LOGIN; GRANT pg_monitor TO {DEMO_ROLE};
                 ALTER SYSTEM SET archive_command = {};
                 SELECT pg_reload_conf();",
                sql_literal(&command)
            ),
        )?;
        let workload = Workload::start(&cluster)?;
        let standby = if standby {
            Some(cluster.start_standby(STANDBY_APP)?)
        } else {
            None
        };
        let servers = Servers {
            psql: cluster.psql_program(),
            primary: cluster.dsn_for(cluster::SUPERUSER, "shop"),
            standby: standby.as_ref().map(|s| s.dsn()),
            archive_flag,
        };
        Ok(Demo {
            timeline: None,
            servers: Some(servers),
            _workload: workload,
            standby,
            cluster,
        })
    }

    /// Prints the timeline of outages and starts it, its times multiplied by `scale`
    /// (once; later calls do nothing).
    pub fn start_timeline(&mut self, scale: f64) {
        if let Some(servers) = self.servers.take() {
            self.timeline = Some(Timeline::start(servers, scale));
        }
    }

    /// The DSN pgvigil should use.
    pub fn dsn(&self) -> String {
        self.cluster.dsn_for(DEMO_ROLE, "postgres")
    }

    /// pgvigil's configuration for the demo: the primary and the standby, polled every
    /// 5 s; slow-query spans on the console unless an OTLP endpoint is set in the
    /// environment.
    fn config(&self, listen: Option<SocketAddr>) -> Result<Config, DemoError> {
        let mut config = Config::default();
        if let Some(l) = listen {
            config.listen = l;
        }
        config.collectors.defaults.interval = Interval::from_secs(DEMO_INTERVAL_SECS);
        config.tracing.console = true;
        let servers = std::iter::once((PRIMARY_TARGET, &self.cluster))
            .chain(self.standby.iter().map(|s| (STANDBY_TARGET, s)));
        for (name, server) in servers {
            config.targets.push(TargetConfig {
                name: name.into(),
                kind: Default::default(),
                dsn: server
                    .dsn_for(DEMO_ROLE, "postgres")
                    .parse()
                    .map_err(DemoError::Dsn)?,
                password_file: None,
                labels: Default::default(),
                databases: Default::default(),
                max_connections: Default::default(),
                file: None,
                probed: false,
            });
        }
        Ok(config)
    }
}

/// A single-quoted SQL string literal.
fn sql_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A Prometheus configuration that scrapes the demo at `listen` every 5 s (its poll
/// interval) and loads the shipped alert rules: `rules` if given, else
/// [`RULES_FILE`] under the current directory when it exists there (a checkout), else
/// that relative path, which Prometheus resolves next to its config file.
pub fn prometheus_config(listen: SocketAddr, rules: Option<&Path>) -> String {
    let found = std::path::absolute(RULES_FILE).ok().filter(|p| p.is_file());
    let rules = match (rules, &found) {
        (Some(r), _) => r.to_string_lossy().into_owned(),
        (None, Some(p)) => p.to_string_lossy().into_owned(),
        (None, None) => RULES_FILE.to_string(),
    };
    let note = if found.is_none() && rules == RULES_FILE {
        "\n  # Not found here: copy alerts/pgvigil.rules.yml from pgvigil's repository next to this file."
    } else {
        ""
    };
    // A scraped address of 0.0.0.0 or [::] means "every interface": scrape the loopback.
    let scrape = match listen.ip() {
        ip if ip.is_unspecified() && listen.is_ipv4() => {
            SocketAddr::from(([127, 0, 0, 1], listen.port()))
        }
        ip if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, listen.port()))
        }
        _ => listen,
    };
    format!(
        "# Prometheus configuration for `pgvigil demo` (pgvigil demo --print-prometheus-config).
# Save it as prometheus.yml and run: prometheus --config.file=prometheus.yml
# Then open http://localhost:9090/alerts and follow the demo's timeline.
global:
  scrape_interval: {DEMO_INTERVAL_SECS}s
  evaluation_interval: {DEMO_INTERVAL_SECS}s
rule_files:{note}
  - {rules}
scrape_configs:
  - job_name: pgvigil
    static_configs:
      - targets: [{scrape}]
",
        rules = yaml_string(&rules),
        scrape = yaml_string(&scrape.to_string()),
    )
}

/// A double-quoted YAML scalar (JSON string escaping is valid YAML).
fn yaml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Runs `pgvigil demo` until `shutdown` resolves: starts the demo, serves its metrics
/// on `listen` (default: the config default), then stops and deletes everything. Tells
/// the user what is happening on stderr, as the command's own output.
pub async fn run(opts: DemoOptions, shutdown: impl Future<Output = ()>) -> Result<(), DemoError> {
    eprintln!(
        "pgvigil demo: starting a throwaway PostgreSQL server{}...",
        if opts.standby { " and a standby" } else { "" }
    );
    let (mut demo, config) = blocking(move || {
        let demo = Demo::start(opts.standby)?;
        let config = demo.config(opts.listen)?;
        Ok::<_, DemoError>((demo, config))
    })
    .await?;
    eprintln!(
        "pgvigil demo: PostgreSQL {} on 127.0.0.1:{} (data in {}), target {PRIMARY_TARGET}; monitoring as role {}",
        demo.cluster.major_version(),
        demo.cluster.port(),
        demo.cluster.data_dir().display(),
        DEMO_ROLE
    );
    if let Some(standby) = &demo.standby {
        eprintln!(
            "pgvigil demo: standby on 127.0.0.1:{} (data in {}), target {STANDBY_TARGET}",
            standby.port(),
            standby.data_dir().display(),
        );
    }
    demo.start_timeline(opts.timeline_scale);
    let result = crate::run(config, None, shutdown, |addr| {
        eprintln!(
            "pgvigil demo: metrics at http://{addr}/metrics  (Ctrl-C stops and deletes everything)"
        );
    })
    .await;
    blocking(move || drop(demo)).await;
    eprintln!("pgvigil demo: stopped and cleaned up");
    Ok(result?)
}

/// Runs `f` (starting or stopping processes, waiting for them) off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(t) => t,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_config_scrapes_the_listen_address_and_names_the_rules() {
        let addr: SocketAddr = "0.0.0.0:9187".parse().unwrap();
        let text = prometheus_config(addr, Some(Path::new("/opt/pg\"vigil/rules.yml")));
        assert!(
            text.contains("\n  - \"/opt/pg\\\"vigil/rules.yml\"\n"),
            "{text}"
        );
        assert!(text.contains("- targets: [\"127.0.0.1:9187\"]"), "{text}");
        assert!(text.contains("scrape_interval: 5s"), "{text}");
        let v6: SocketAddr = "[::]:9187".parse().unwrap();
        assert!(prometheus_config(v6, None).contains("[\"[::1]:9187\"]"));
        let local: SocketAddr = "127.0.0.2:1234".parse().unwrap();
        assert!(prometheus_config(local, None).contains("[\"127.0.0.2:1234\"]"));
    }

    #[test]
    fn timeline_scale_is_a_positive_number() {
        assert_eq!(parse_timeline_scale("0.05"), Ok(0.05));
        assert_eq!(parse_timeline_scale("1"), Ok(1.0));
        for bad in ["0", "-1", "x", "", "101", "NaN", "inf"] {
            let e = parse_timeline_scale(bad).expect_err(bad);
            assert!(e.contains("is not a timeline scale"), "{e}");
        }
    }

    #[test]
    fn sql_literals_double_quotes() {
        assert_eq!(sql_literal("it's"), "'it''s'");
    }
}
