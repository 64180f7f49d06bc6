//! `pgvigil demo`: a throwaway local PostgreSQL with a small workload, monitored by
//! pgvigil, for a first look. Everything it starts is stopped and deleted on Ctrl-C.
//!
//! - [`cluster`]: the throwaway server (the integration tests use it too);
//! - `workload`: the schema and the sessions that give pgvigil something to watch.
//!
//! This file wires them together: start the cluster, a monitoring role and the
//! workload, point pgvigil at the cluster and run it until shutdown ([`run`]).

pub mod cluster;
mod workload;

use std::future::Future;
use std::net::SocketAddr;

use cluster::{ClusterError, ClusterOptions, TempCluster};
use workload::Workload;

use crate::config::{Config, Interval, TargetConfig};
use crate::StartError;

/// The role pgvigil connects as in the demo: only `pg_monitor`, as recommended.
pub const DEMO_ROLE: &str = "pgvigil";

/// How often the demo polls: short-lived demo events (lock pile-ups, index builds)
/// need a faster poll than the default 15 s.
const DEMO_INTERVAL_SECS: u64 = 5;

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

/// The demo's database server plus its workload.
pub struct Demo {
    /// Held for its `Drop`, and declared first so that it is dropped first: the
    /// workload's sessions end before the server they talk to stops.
    _workload: Workload,
    pub cluster: TempCluster,
}

impl Demo {
    /// Starts the cluster, creates the monitoring role, and starts the workload.
    /// Blocks for a while (initdb, loading the schema).
    pub fn start() -> Result<Demo, ClusterError> {
        let cluster =
            TempCluster::start(ClusterOptions::default().with_setting("track_io_timing", "on"))?;
        cluster.psql(
            "postgres",
            &format!("CREATE ROLE {DEMO_ROLE} LOGIN; GRANT pg_monitor TO {DEMO_ROLE};"),
        )?;
        let workload = Workload::start(&cluster)?;
        Ok(Demo {
            _workload: workload,
            cluster,
        })
    }

    /// The DSN pgvigil should use.
    pub fn dsn(&self) -> String {
        self.cluster.dsn_for(DEMO_ROLE, "postgres")
    }

    /// pgvigil's configuration for the demo: one target, the cluster, polled every 5 s.
    fn config(&self, listen: Option<SocketAddr>) -> Result<Config, DemoError> {
        let mut config = Config::default();
        if let Some(l) = listen {
            config.listen = l;
        }
        config.collectors.defaults.interval = Interval::from_secs(DEMO_INTERVAL_SECS);
        config.targets.push(TargetConfig {
            name: "demo".into(),
            kind: Default::default(),
            dsn: self.dsn().parse().map_err(DemoError::Dsn)?,
            password_file: None,
            labels: Default::default(),
            databases: Default::default(),
            max_connections: Default::default(),
        });
        Ok(config)
    }
}

/// Runs `pgvigil demo` until `shutdown` resolves: starts the demo, serves its metrics
/// on `listen` (default: the config default), then stops and deletes everything. Tells
/// the user what is happening on stderr, as the command's own output.
pub async fn run(
    listen: Option<SocketAddr>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DemoError> {
    eprintln!("pgvigil demo: starting a throwaway PostgreSQL server...");
    let (demo, config) = blocking(move || {
        let demo = Demo::start()?;
        let config = demo.config(listen)?;
        Ok::<_, DemoError>((demo, config))
    })
    .await?;
    eprintln!(
        "pgvigil demo: PostgreSQL {} on 127.0.0.1:{} (data in {}); monitoring as role {}",
        demo.cluster.major_version(),
        demo.cluster.port(),
        demo.cluster.data_dir().display(),
        DEMO_ROLE
    );
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
