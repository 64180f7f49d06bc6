//! pgvigil: a PostgreSQL observability exporter.
//!
//! # Layout
//! The modules follow the data flow of the product (DESIGN.md §2), top to bottom:
//!
//! ```text
//! config ──► collector::pack ──► collector::poller ──(postgres::slot)──► PostgreSQL
//!                                      │ rows → collector::steps (computed columns)
//!                                      │      → collector::rows (families, as the pack declares)
//!                                      ▼
//!                                    store ──► exposition (+ health) ──► http (/metrics)
//!
//! trace sampler ──(postgres::slot)──► pg_stat_activity ─┬─► trace::load (DB load) ──► store
//!                                                        └─► trace spans ──► OTLP
//! ```
//!
//! - [`config`]: the YAML config file, environment overrides, file:line errors.
//! - [`collector`]: collector packs (`queries/*.yaml`, compiled in, plus user packs) and
//!   version resolution (`pack`); the background poll loop per target (`poller`); the Rust
//!   steps for what SQL cannot say (`steps`: statements top-N/window/`other`, index-build
//!   ETA), which add columns to a [`collector::table::Table`]; rows → families (`rows`).
//! - [`postgres`]: DSNs and TLS, sessions (`postgres::slot`: pgvigil's session settings,
//!   one query at a time with its own timeouts, reconnect with backoff — for collectors and
//!   the activity sampler alike), server facts, row values → numbers and labels.
//! - [`store`]: the latest snapshot per target × collector × database, and target health.
//! - [`health`]: pgvigil's own metrics, built from that health at each exposition.
//! - [`exposition`]: snapshots → Prometheus text 0.0.4 or OpenMetrics.
//! - [`http`]: `/metrics`, `/healthz`, `/readyz`; never queries PostgreSQL.
//! - [`trace`]: the activity sampler (every `activity.sample_interval`, tracing on or off,
//!   running the query of the `activity` collector in `queries/dbload.yaml`, which the
//!   poller skips), DB load (`trace::load`: the sampler's rows → the pack's
//!   `pg_activity_active_seconds_total`, stored like a collector's snapshot), traceparent
//!   parsing, slow-query spans, OTLP export.
//! - [`metric`]: the metric model every stage passes on (type, family, sample).
//! - [`sql`]: SQL lexing: literal masking for text that leaves the process.
//! - [`yaml`]: YAML → typed values with file, line and field in every error.
//! - [`demo`]: `pgvigil demo` ([`demo::run`]): a throwaway local PostgreSQL
//!   ([`demo::cluster`], which the integration tests use too) with a small workload.

pub mod collector;
pub mod config;
pub mod demo;
pub mod exposition;
pub mod health;
pub mod http;
pub mod metric;
pub mod postgres;
pub mod sql;
pub mod store;
pub mod trace;
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
    let (store, pollers) = pollers(config, catalog)?;
    for p in &pollers {
        p.spawn(shutdown.clone());
    }
    Ok((store, pollers))
}

/// A poller per target, all writing into one new store; nothing started yet.
pub fn pollers(
    config: &Config,
    catalog: &Catalog,
) -> Result<(Arc<Store>, Vec<Arc<TargetPoller>>), StartError> {
    let store = Store::new();
    // The activity sampler's collectors run on the sampler (trace::start), not here.
    let collectors = Arc::new(
        catalog
            .collectors
            .iter()
            .filter(|c| c.run_by == collector::pack::RunBy::Poller)
            .cloned()
            .collect(),
    );
    let pollers = config
        .resolve_targets(&process_env)?
        .into_iter()
        .map(|target| {
            TargetPoller::new(
                target,
                Arc::clone(&collectors),
                config.collectors.defaults,
                config.statements,
                Arc::clone(&store),
            )
        })
        .collect();
    Ok((store, pollers))
}

/// One configuration's running parts: pollers and samplers writing into one store.
/// A reload starts a new generation and then stops the old one.
struct Generation {
    store: Arc<Store>,
    stop: watch::Sender<bool>,
    tracing: Option<trace::Tracing>,
}

impl Generation {
    fn start(config: &Config, catalog: &Catalog) -> Result<Generation, StartError> {
        let (stop, stop_rx) = watch::channel(false);
        let (store, _pollers) = start_pollers(config, catalog, stop_rx.clone())?;
        let targets = config.resolve_targets(&process_env)?;
        let tracing = trace::start(config, catalog, &targets, &store, stop_rx, &process_env)?;
        Ok(Generation {
            store,
            stop,
            tracing,
        })
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.tracing {
            t.finish(std::time::Duration::from_secs(15)).await;
        }
    }
}

/// Reads the configuration again (for `SIGHUP`): file, environment and CLI overrides.
pub type Reload = Box<dyn Fn() -> Result<Config, String> + Send>;

/// Runs pgvigil until `shutdown` resolves: pollers in the background, HTTP in front.
/// `on_listen` is told the bound address (useful with port 0). With `reload`, `SIGHUP`
/// re-reads the configuration: a valid one replaces the running targets and collectors
/// (the listen address needs a restart); an invalid one is logged and ignored.
pub async fn run(
    config: Config,
    reload: Option<Reload>,
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
    let mut current = Generation::start(&config, &catalog)?;
    tracing::info!(
        "pgvigil {} listening on http://{addr}/metrics ({} targets, {} collectors)",
        env!("CARGO_PKG_VERSION"),
        config.targets.len(),
        catalog.collectors.len()
    );
    on_listen(addr);
    let server = http::Server::new(Arc::clone(&current.store));
    let (http_stop, http_stop_rx) = watch::channel(false);
    let serving = tokio::spawn(http::serve(listener, Arc::clone(&server), http_stop_rx));
    let mut hup = hangups(reload.is_some());
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = next_hangup(&mut hup) => {
                let Some(reload) = &reload else { continue };
                match reload_generation(reload, config.listen) {
                    Ok(next) => {
                        server.set_store(Arc::clone(&next.store));
                        let old = std::mem::replace(&mut current, next);
                        old.stop().await;
                        tracing::info!("configuration reloaded");
                    }
                    Err(e) => tracing::error!("configuration reload rejected, the running configuration stays: {e}"),
                }
            }
        }
    }
    tracing::info!("shutting down");
    let _ = http_stop.send(true);
    let _ = serving.await;
    current.stop().await;
    Ok(())
}

fn reload_generation(reload: &Reload, listen: std::net::SocketAddr) -> Result<Generation, String> {
    let config = reload()?;
    if config.listen != listen {
        tracing::warn!(
            "listen address changed to {}; that takes a restart, still serving on {listen}",
            config.listen
        );
    }
    let catalog = Catalog::load(&config.collectors).map_err(|e| e.to_string())?;
    config
        .resolve_targets(&process_env)
        .map_err(|e| e.to_string())?;
    Generation::start(&config, &catalog).map_err(|e| e.to_string())
}

/// A stream of `SIGHUP`s; `None` when reloading is off or the signal is unavailable.
fn hangups(enabled: bool) -> Option<tokio::signal::unix::Signal> {
    if !enabled {
        return None;
    }
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("cannot listen for SIGHUP, reload disabled: {e}");
            None
        }
    }
}

/// The next `SIGHUP`, or never.
async fn next_hangup(hup: &mut Option<tokio::signal::unix::Signal>) {
    match hup {
        Some(s) => {
            if s.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

/// Polls every collector of every target once and returns the metrics text (0.0.4).
pub async fn once(config: &Config) -> Result<String, StartError> {
    let catalog = Catalog::load(&config.collectors)?;
    let (store, pollers) = pollers(config, &catalog)?;
    for p in pollers {
        p.poll_all_once().await;
    }
    Ok(exposition::encode(
        store.snapshots(),
        health::self_metrics(&store),
        exposition::Format::Text,
    ))
}
