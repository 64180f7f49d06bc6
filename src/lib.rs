//! pgvigil: a PostgreSQL observability exporter.
//!
//! # Layout
//! The modules follow the data flow of the product (DESIGN.md §2), top to bottom:
//!
//! ```text
//! config ──► collector::pack ──► collector::poller ──(postgres::slot)──► PostgreSQL / PgBouncer
//!                                      │ rows → collector::steps (computed columns)
//!                                      │      → collector::rows (families, as the pack declares)
//!                                      ▼
//!                                    store ──► exposition (+ health) ──► http (/metrics)
//!
//! trace sampler ──(postgres::slot)──► pg_stat_activity ─┬─► trace::load (DB load) ──► store
//!                                                        └─► trace spans ──(trace::explain)──► OTLP
//! ```
//!
//! - [`config`]: the YAML config file, environment overrides, file:line errors; fleet mode
//!   (`config::fleet`: which targets this instance's shard owns, targets files and their
//!   watcher).
//! - [`collector`]: collector packs (`queries/*.yaml`, compiled in, plus user packs) and
//!   version resolution (`pack`); the background poll loop per target (`poller`: cluster
//!   collectors on the main database, visits of the other databases within the target's
//!   connection budget); relation names of every database for cluster-wide views (`names`);
//!   the Rust
//!   steps for what SQL cannot say (`steps`: statements top-N/window/`other`, per-table
//!   top-N by size, xid age and dead tuples with `table="other"`, the delta rule both
//!   `other` buckets share (`steps::other`), index-build ETA), which add columns to a
//!   [`collector::table::Table`]; rows → families (`rows`).
//! - [`postgres`]: DSNs and TLS, sessions (`postgres::slot`: pgvigil's session settings,
//!   one query at a time with its own timeouts, reconnect with backoff — for collectors and
//!   the activity sampler alike; a PgBouncer console flavour: no settings, simple query
//!   protocol), server facts, row values (typed or text) → numbers and labels.
//! - [`reload`]: what runs per target (poller, activity sampler) and what a `SIGHUP`
//!   changes: unchanged targets keep running, changed ones are replaced in place.
//! - [`store`]: the latest snapshot per target × collector × database, and target health;
//!   one store for the life of the process.
//! - [`health`]: pgvigil's own metrics, built from that health at each exposition.
//! - [`exposition`]: snapshots → Prometheus text 0.0.4 or OpenMetrics.
//! - [`http`]: `/metrics`, `/healthz`, `/readyz`; never queries PostgreSQL; bounds slow
//!   and idle connections and their number.
//! - [`trace`]: the activity sampler (every `activity.sample_interval`, tracing on or off,
//!   running the query of the `activity` collector in `queries/dbload.yaml`, which the
//!   poller skips), DB load (`trace::load`: the sampler's rows → the pack's
//!   `pg_activity_active_seconds_total`, stored like a collector's snapshot), traceparent
//!   parsing, slow-query spans, their generic plans (`trace::explain`, opt-in), OTLP
//!   export (or the console, for the demo); pgvigil's own poll and collector spans
//!   (`trace::selfspans`, opt-in).
//! - [`metric`]: the metric model every stage passes on (type, family, sample).
//! - [`sql`]: SQL lexing: literal masking for text that leaves the process.
//! - [`yaml`]: YAML → typed values with file, line and field in every error.
//! - [`demo`]: `pgvigil demo` ([`demo::run`]): a throwaway local PostgreSQL and a standby
//!   ([`demo::cluster`], which the integration tests use too, with a throwaway PgBouncer in
//!   front of a cluster when they need one) with a small workload and a timeline of
//!   outages (`demo::timeline`, one schedule table).

pub mod collector;
pub mod config;
pub mod deflate;
pub mod demo;
pub mod exposition;
pub mod health;
pub mod http;
pub mod metric;
pub mod postgres;
pub mod probe;
pub mod reload;
pub mod sql;
pub mod store;
pub mod trace;
pub mod web;
pub mod yaml;

use std::sync::Arc;
use std::time::Duration;

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
    #[error("{0}")]
    Web(#[from] web::WebError),
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

/// A poller per target, all writing into one new store; nothing started yet.
pub fn pollers(
    config: &Config,
    catalog: &Catalog,
) -> Result<(Arc<Store>, Vec<Arc<TargetPoller>>), StartError> {
    let store = Store::new();
    let by_kind = collector::poller::ByKind::pollers(catalog);
    let pollers = config
        .resolve_targets(&process_env)?
        .into_iter()
        .map(|target| {
            let collectors = by_kind.of(target.kind);
            TargetPoller::new(
                target,
                collectors,
                config.collectors.defaults,
                config.statements,
                config.tables,
                Arc::clone(&store),
            )
        })
        .collect();
    Ok((store, pollers))
}

/// How often the modification times of the targets files are compared with what they
/// were when last read.
const TARGETS_FILES_CHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// How long stopping may take after the shutdown signal, before the cancel requests of
/// aborted queries (≤ 1 s) and the runtime's own shutdown (≤ 1 s, `main.rs`): together the
/// process exits within 5 s of SIGTERM or SIGINT, however slow a target or the OTLP
/// receiver.
pub const SHUTDOWN_LIMIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Reads the configuration again (for `SIGHUP`): file, environment and CLI overrides.
pub type Reload = Box<dyn Fn() -> Result<Config, String> + Send>;

/// Runs pgvigil until `shutdown` resolves: pollers in the background, HTTP in front.
/// `on_listen` is told the bound address (useful with port 0). With `reload`, `SIGHUP`
/// re-reads the configuration: a valid one is applied target by target (see [`reload`]:
/// unchanged targets keep running untouched; the listen address needs a restart); an
/// invalid one is logged and ignored. Either way `pgvigil_config_last_reload_successful`
/// says which. A change of the config's targets files (looked at every 2 s)
/// reloads the same way, without a `SIGHUP`.
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
    let web = match &config.web_config_file {
        Some(path) => Some(Arc::new(web::Web::load(path)?)),
        None => None,
    };
    let scheme = if web.as_ref().is_some_and(|w| w.tls()) {
        "https"
    } else {
        "http"
    };
    let store = Store::new();
    let mut running = reload::Running::new(Arc::clone(&store));
    running.apply(&config, &catalog).await?;
    if config.tracing.self_spans {
        start_self_spans(&config)?;
    }
    store.record_reload(true, std::time::SystemTime::now());
    let shard = match config.shard {
        Some(shard) => format!(
            ", shard {shard}: {} of {} targets polled here",
            config
                .targets
                .iter()
                .filter(|t| config.owns(&t.name))
                .count(),
            config.targets.len()
        ),
        None => String::new(),
    };
    tracing::info!(
        "pgvigil {} listening on {scheme}://{addr}/metrics ({} targets, {} collectors{shard})",
        env!("CARGO_PKG_VERSION"),
        config.targets.len(),
        catalog.collectors.len()
    );
    on_listen(addr);
    let server = http::Server::new(Arc::clone(&store));
    let registry = server.registry();
    registry.set_modules(config.auth_modules.clone());
    // The configuration in force (without the targets /probe registered) and its packs.
    let mut current = (config.clone(), catalog);
    let mut expiry = tokio::time::interval(std::time::Duration::from_secs(5));
    let (http_stop, http_stop_rx) = watch::channel(false);
    let serving = http::serve_apart(
        listener,
        Arc::clone(&server),
        http::Limits::default(),
        web,
        http_stop_rx,
    )
    .map_err(|source| StartError::Listen { addr, source })?;
    let mut hup = hangups(reload.is_some());
    // The targets files of the running configuration, compared every few seconds with
    // what they were when read; a change reloads as a SIGHUP does.
    let mut watch = reload
        .as_ref()
        .and_then(|_| config::fleet::TargetsWatch::of(&config));
    let mut ticks = tokio::time::interval(TARGETS_FILES_CHECK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        let why = tokio::select! {
            _ = &mut shutdown => break,
            _ = registry.changed() => {
                let (base, catalog) = &current;
                if let Err(e) = running.apply(&with_probed(base, &registry), catalog).await {
                    tracing::error!("cannot start a target registered by /probe: {e}");
                }
                continue;
            }
            _ = expiry.tick() => {
                if registry.expire(current.0.probe.forget_after.0) {
                    let (base, catalog) = &current;
                    if let Err(e) = running.apply(&with_probed(base, &registry), catalog).await {
                        tracing::error!("cannot drop a target registered by /probe: {e}");
                    }
                }
                continue;
            }
            _ = next_hangup(&mut hup) => "SIGHUP",
            _ = ticks.tick(), if watch.is_some() => {
                if !watch.as_mut().is_some_and(|w| w.changed()) {
                    continue;
                }
                "a change of the targets files"
            }
        };
        let Some(reload) = &reload else { continue };
        let applied = match reread(reload, config.listen) {
            Ok((next, catalog)) => {
                let r = running
                    .apply(&with_probed(&next, &registry), &catalog)
                    .await
                    .map_err(|e| e.to_string());
                if r.is_ok() {
                    registry.set_modules(next.auth_modules.clone());
                    // Watch what the new configuration names (its patterns may differ).
                    watch = config::fleet::TargetsWatch::of(&next);
                    current = (next, catalog);
                }
                r
            }
            Err(e) => Err(e),
        };
        match applied {
            Ok(summary) => {
                store.record_reload(true, std::time::SystemTime::now());
                tracing::info!("configuration reloaded: {summary} (after {why})");
            }
            Err(e) => {
                store.record_reload(false, std::time::SystemTime::now());
                tracing::error!(
                    "configuration reload rejected (after {why}), the running configuration stays: {e}"
                );
            }
        }
    }
    tracing::info!("shutting down");
    let _ = http_stop.send(true);
    let stopping = async {
        let _ = serving.await;
        // Aborts the polls in flight (their queries are cancelled on the server), then
        // flushes the spans (at most 3 s: an unreachable receiver does not hold us).
        running.stop().await;
    };
    if tokio::time::timeout(SHUTDOWN_LIMIT, stopping)
        .await
        .is_err()
    {
        tracing::warn!("shutdown: gave up waiting after {SHUTDOWN_LIMIT:?}");
    }
    postgres::slot::finish_cancels(Duration::from_secs(1)).await;
    tracing::info!("stopped");
    Ok(())
}

/// `config` plus the targets `/probe` registered (those whose name the configuration does not
/// already use).
fn with_probed(config: &Config, registry: &probe::Registry) -> Config {
    let mut c = config.clone();
    for t in registry.targets() {
        if !c.targets.iter().any(|o| o.name == t.name) {
            c.targets.push(t);
        }
    }
    c
}

/// `tracing.self`: sends pgvigil's own spans to the tracing endpoint, when the binary
/// installed their layer at start (see `trace::selfspans`).
fn start_self_spans(config: &Config) -> Result<(), StartError> {
    let Some(endpoint) = trace::endpoint(&config.tracing, &process_env)? else {
        tracing::warn!(
            "tracing.self is on but no OTLP endpoint is set: pgvigil's own spans are not sent"
        );
        return Ok(());
    };
    let service = config
        .tracing
        .service_name
        .clone()
        .or_else(|| process_env("OTEL_SERVICE_NAME"))
        .unwrap_or_else(|| "pgvigil".to_string());
    match trace::selfspans::export(&endpoint, &service) {
        Ok(true) => tracing::info!(
            "tracing.self: pgvigil's poll and collector spans go to the tracing endpoint"
        ),
        Ok(false) => tracing::warn!(
            "tracing.self: no span layer was installed at start (turning it on takes a restart)"
        ),
        Err(e) => tracing::warn!("tracing.self: {e}"),
    }
    Ok(())
}

/// The configuration and packs as they are now on disk, checked; nothing applied yet.
fn reread(reload: &Reload, listen: std::net::SocketAddr) -> Result<(Config, Catalog), String> {
    let config = reload()?;
    if config.listen != listen {
        tracing::warn!(
            "listen address changed to {}; that takes a restart, still serving on {listen}",
            config.listen
        );
    }
    let catalog = Catalog::load(&config.collectors).map_err(|e| e.to_string())?;
    for note in &catalog.notes {
        tracing::info!("{note}");
    }
    Ok((config, catalog))
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

/// What `pgvigil once` found: the metrics text (0.0.4), and what did not work.
pub struct OnceReport {
    pub text: String,
    /// One line per unreachable target or failed collector run.
    pub problems: Vec<String>,
}

/// Polls every collector of every target once.
pub async fn once(config: &Config) -> Result<OnceReport, StartError> {
    let catalog = Catalog::load(&config.collectors)?;
    let (store, pollers) = pollers(config, &catalog)?;
    for p in pollers {
        p.poll_all_once().await;
    }
    let mut problems = Vec::new();
    for (name, health) in store.targets() {
        if !health.up {
            problems.push(format!("target {name}: unreachable (pg_up 0)"));
        }
        for (collector, c) in &health.collectors {
            for (kind, n) in &c.errors {
                problems.push(format!(
                    "target {name}: collector {collector} failed ({}, {n}x)",
                    kind.as_str()
                ));
            }
        }
    }
    Ok(OnceReport {
        text: exposition::encode(
            store.snapshots(),
            health::self_metrics(&store),
            exposition::Format::Text,
        ),
        problems,
    })
}
