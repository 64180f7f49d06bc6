//! pgvigil: a PostgreSQL observability exporter.
//!
//! # Layout
//! The modules follow the data flow of the product:
//!
//! ```text
//! config  ──► collector::pack ──► collector::poller ──► postgres ──► PostgreSQL
//!                                        │ rows → families (collector::rows)
//!                                        ▼
//!                                      store  ──► exposition ──► http (/metrics)
//! ```
//!
//! - [`config`]: the YAML config file, environment overrides, file:line errors.
//! - [`yaml`]: YAML → typed values with file, line and field in every error.
//! - [`collector`]: collector packs (`queries/*.yaml`, compiled in, plus user packs), version
//!   resolution, and the background poll loop per target.
//! - [`postgres`]: connecting with pgvigil's session settings, server facts, running one
//!   collector query, row values → numbers and labels.
//! - [`store`]: the latest snapshot per target × collector × database, and target health.
//! - [`exposition`]: snapshots → Prometheus text 0.0.4 or OpenMetrics.
//! - [`http`]: `/metrics`, `/healthz`, `/readyz`; never queries PostgreSQL.
//! - [`cluster`]: a throwaway local PostgreSQL, for `pgvigil demo` and the tests.
//! - [`sql`]: SQL lexing: literal masking for text that leaves the process.
//! - [`statements`], [`window`], [`progress`]: Rust post-processing of collector rows
//!   (pg_stat_statements window stats and top-N; index build ETA).
//! - [`trace`]: the activity sampler, traceparent parsing, slow-query spans, OTLP export.

pub mod cluster;
pub mod collector;
pub mod config;
pub mod demo;
pub mod exposition;
pub mod http;
pub mod postgres;
pub mod progress;
pub mod sql;
pub mod statements;

pub mod store;
pub mod trace;
pub mod window;
pub mod yaml;

use std::sync::Arc;

use tokio::sync::watch;

use collector::pack::Catalog;
use collector::poller::TargetPoller;
use config::Config;
use store::Store;

/// Everything that can stop pgvigil from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] config::ConfigError),
    #[error("{0}")]
    Pack(#[from] collector::pack::PackError),
    #[error("{0}")]
    Trace(#[from] trace::TraceError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// The environment as a lookup function (so tests can pass their own).
pub fn process_env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

/// Loads the packs and starts a poller per target; returns the store they fill.
pub fn start_pollers(
    config: &Config,
    catalog: &Catalog,
    shutdown: watch::Receiver<bool>,
) -> Result<(Arc<Store>, Vec<Arc<TargetPoller>>), StartError> {
    let store = Store::new();
    let collectors = Arc::new(catalog.collectors.clone());
    let mut pollers = Vec::new();
    for target in config.resolve_targets(&process_env)? {
        let p = TargetPoller::new(
            target,
            Arc::clone(&collectors),
            config.collectors.defaults,
            config.statements,
            Arc::clone(&store),
        );
        p.spawn(shutdown.clone());
        pollers.push(p);
    }
    Ok((store, pollers))
}

/// Runs pgvigil until `shutdown` resolves: pollers in the background, HTTP in front.
/// `on_listen` is told the bound address (useful with port 0).
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
    on_listen: impl FnOnce(std::net::SocketAddr),
) -> Result<(), StartError> {
    let catalog = Catalog::load(&config.collectors)?;
    for note in &catalog.notes {
        tracing::info!("{note}");
    }
    let listener = http::bind(config.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().unwrap_or(config.listen);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (store, _pollers) = start_pollers(&config, &catalog, stop_rx.clone())?;
    let targets = config.resolve_targets(&process_env)?;
    let tracing_tasks = trace::start(
        &config.tracing,
        &targets,
        &store,
        stop_rx.clone(),
        &process_env,
    )?;
    tracing::info!(
        "pgvigil {} listening on http://{addr}/metrics ({} targets, {} collectors)",
        env!("CARGO_PKG_VERSION"),
        config.targets.len(),
        catalog.collectors.len()
    );
    on_listen(addr);
    let server = http::Server::new(store);
    let serving = tokio::spawn(http::serve(listener, server, stop_rx));
    shutdown.await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = serving.await;
    if let Some(t) = tracing_tasks {
        t.finish(std::time::Duration::from_secs(15)).await;
    }
    Ok(())
}

/// Polls every collector of every target once and returns the metrics text (0.0.4).
pub async fn once(config: &Config) -> Result<String, StartError> {
    let catalog = Catalog::load(&config.collectors)?;
    let store = Store::new();
    let collectors = Arc::new(catalog.collectors.clone());
    for target in config.resolve_targets(&process_env)? {
        let p = TargetPoller::new(
            target,
            Arc::clone(&collectors),
            config.collectors.defaults,
            config.statements,
            Arc::clone(&store),
        );
        p.poll_all_once().await;
    }
    Ok(exposition::encode(
        &store.snapshots(),
        &store.self_metrics(),
        exposition::Format::Text,
    ))
}
