//! The activity sampler: per target, it reads `pg_stat_activity` every
//! `activity.sample_interval` on its own session (a [`Slot`], with the same read-only,
//! time-limited settings and reconnect backoff as the collectors'), whether or not tracing
//! is on. Each sample feeds two things:
//! - DB load ([`load`]): `pg_activity_active_seconds_total`, declared by the `activity`
//!   collector of `queries/dbload.yaml` (whose query is the sampler's read) and stored
//!   under (target, `activity`, "") like a collector's snapshot, with its errors and
//!   duration in the collector self-metrics;
//! - slow-query spans, when tracing is on: it follows each execution ([`activity`]),
//!   turns the slow ones into spans ([`span`]) parented by the application's
//!   `traceparent` ([`context`]), optionally with the query's generic plan
//!   ([`explain`], `tracing.explain`), and queues them for OTLP export ([`export`]).
//!
//! Sampling never waits on the exporter; nothing here touches the pollers. pgvigil's own
//! work as spans (`tracing.self`) is [`selfspans`].

pub mod activity;
pub mod context;
pub mod explain;
pub mod export;
pub mod load;
pub mod selfspans;
pub mod span;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::KeyValue;
use opentelemetry_sdk::Resource;
use tokio::sync::watch;

use crate::collector::pack::{Catalog, CollectorDef, RunBy};
use crate::collector::poller::{jittered_start, observe_lag};
use crate::config::{CollectorDefaults, Config, ExplainMode, OtlpProtocol, Target, TracingConfig};
use crate::health::LagScope;
use crate::postgres::slot::Slot;
use crate::postgres::{dsn, ErrorKind, PgError};
use crate::store::{Snapshot, Store};
use activity::{Observation, Tracker};
use load::{Active, Load, TopN};

/// Errors that stop tracing from starting (the rest of pgvigil would still run).
#[derive(Debug, thiserror::Error)]
#[error("tracing: {0}")]
pub struct TraceError(String);

/// The running samplers and exporters; [`Tracing::finish`] waits for the last spans.
/// Empty when there is nothing to sample.
pub struct Tracing {
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl Tracing {
    /// Waits (bounded) for samplers to flush still-running executions and exporters to
    /// send what is queued. Call after the shutdown signal.
    pub async fn finish(self, limit: Duration) {
        let all = futures_util::future::join_all(self.handles);
        if tokio::time::timeout(limit, all).await.is_err() {
            tracing::warn!("tracing: gave up waiting for the last span export after {limit:?}");
        }
    }
}

/// The endpoint from the config, else the standard environment; `None` = tracing off.
pub fn endpoint(
    cfg: &TracingConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<export::Endpoint>, TraceError> {
    if cfg.otlp_endpoint.is_none() && crate::config::env_endpoint(env).is_none() {
        return Ok(None);
    }
    let protocol = match cfg.protocol {
        Some(p) => p,
        None => match env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .as_deref()
        {
            None | Some("grpc") => OtlpProtocol::Grpc,
            Some("http/protobuf") => OtlpProtocol::HttpProtobuf,
            Some(other) => {
                return Err(TraceError(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL={other:?} is not supported; use grpc or http/protobuf"
            )))
            }
        },
    };
    export::Endpoint::resolve(cfg, protocol, env)
        .map(Some)
        .map_err(TraceError)
}

/// The name under which the sampler's health and snapshot are kept: the collector of
/// `queries/dbload.yaml` whose query it runs.
pub const COLLECTOR: &str = "activity";

/// The activity sampler as configured: its query (the `activity` collector), whether it
/// feeds DB load, and where spans go when tracing is on. [`Plan::start`] starts one
/// target's sampler (and exporter), so a reload can keep the samplers of unchanged targets
/// running.
pub struct Plan {
    /// Where spans go; `None` = tracing off.
    sink: Option<export::Sink>,
    service: String,
    cfg: TracingConfig,
    collectors: CollectorDefaults,
    every: Duration,
    def: Arc<CollectorDef>,
    load_on: bool,
    /// EXPLAINs per minute, all targets together; `None` when `tracing.explain` is off.
    explain_budget: Option<Arc<explain::Budget>>,
}

/// The sampler's plan, or `None` when it has nothing to feed: neither DB load (the
/// `activity` collector disabled) nor spans (no OTLP endpoint, and no console sink asked
/// for by `tracing.console`). Its query is bounded like a collector's (see
/// [`sample_timeout`]).
pub fn plan(
    config: &Config,
    catalog: &Catalog,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Plan>, TraceError> {
    let cfg = &config.tracing;
    let sink = match endpoint(cfg, env)? {
        Some(e) => Some(export::Sink::Otlp(e)),
        None if cfg.console => Some(export::Sink::Console),
        None => None,
    };
    let def = catalog
        .collectors
        .iter()
        .find(|c| c.run_by == RunBy::ActivitySampler)
        .cloned()
        .or_else(|| builtin_activity().cloned());
    let load_on = catalog
        .collectors
        .iter()
        .any(|c| c.run_by == RunBy::ActivitySampler);
    if sink.is_none() && !load_on {
        return Ok(None);
    }
    let Some(def) = def else {
        return Err(TraceError(
            "no collector with run_by: activity_sampler holds the sampler's query".into(),
        ));
    };
    let service = cfg
        .service_name
        .clone()
        .or_else(|| env("OTEL_SERVICE_NAME"))
        .unwrap_or_else(|| "pgvigil".to_string());
    // Spans need the shorter default interval (capture); DB load alone, one a second.
    let every = config.activity.interval(sink.is_some()).0;
    Ok(Some(Plan {
        sink,
        service,
        cfg: cfg.clone(),
        collectors: config.collectors.defaults,
        every,
        def: Arc::new(def),
        load_on,
        explain_budget: (cfg.explain == ExplainMode::Generic)
            .then(|| explain::Budget::new(cfg.explain_per_minute)),
    }))
}

impl Plan {
    /// What this plan does, for the log.
    pub fn describe(&self) -> String {
        let load = if self.load_on {
            "on"
        } else {
            "off: collector activity disabled"
        };
        let mut text = format!(
            "activity sampler every {:?} per target (DB load {load})",
            self.every
        );
        match &self.sink {
            Some(export::Sink::Otlp(endpoint)) => text.push_str(&format!(
                "; tracing: slow-query spans (>= {}) to {} over {:?} ({})",
                self.cfg.slow_query_threshold,
                endpoint
                    .url
                    .as_deref()
                    .unwrap_or("the OTEL_EXPORTER_OTLP_* endpoint"),
                endpoint.protocol,
                endpoint.describe_transport()
            )),
            Some(export::Sink::Console) => text.push_str(&format!(
                "; tracing: slow-query spans (>= {}) printed on stderr (no OTLP endpoint)",
                self.cfg.slow_query_threshold
            )),
            None => {}
        }
        if self.sink.is_some() && self.explain_budget.is_some() {
            text.push_str(&format!(
                ", with generic plans (PostgreSQL 16+, at most {} EXPLAINs a minute)",
                self.cfg.explain_per_minute
            ));
        }
        text
    }

    /// What, beyond the config, a running exporter depends on: the contents of its
    /// certificate files. A reload restarts the sampler when it changes.
    pub fn files_key(&self) -> String {
        match &self.sink {
            Some(export::Sink::Otlp(e)) => format!("{:x}", e.fingerprint()),
            _ => String::new(),
        }
    }

    /// Starts a sampler (and, with tracing on, an exporter) for `t`; they stop when
    /// `shutdown` turns true. `connections` is the target's connection budget, which
    /// the EXPLAINs of `tracing.explain` take their sessions from.
    pub fn start(
        &self,
        t: &Target,
        store: &Arc<Store>,
        connections: Option<Arc<tokio::sync::Semaphore>>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Tracing, TraceError> {
        let cfg = &self.cfg;
        let every = self.every;
        let mut handles = Vec::new();
        let queue = match &self.sink {
            Some(export::Sink::Console) => {
                let (queue, drain) =
                    export::start_console(cfg.queue_size, Arc::clone(store), t.name.clone());
                handles.push(drain);
                Some(queue)
            }
            Some(export::Sink::Otlp(endpoint)) => {
                // Resource::builder() applies OTEL_RESOURCE_ATTRIBUTES; the target is added.
                let resource = Resource::builder()
                    .with_service_name(self.service.clone())
                    .with_attributes(
                        std::iter::once(KeyValue::new("pgvigil.target", t.name.clone())).chain(
                            t.labels.iter().skip(1).map(|(k, v)| {
                                KeyValue::new(format!("pgvigil.label.{k}"), v.clone())
                            }),
                        ),
                    )
                    .build();
                let exporter = export::build_exporter(endpoint, &resource).map_err(TraceError)?;
                let (queue, drain) =
                    export::start(exporter, cfg.queue_size, Arc::clone(store), t.name.clone());
                handles.push(drain);
                Some(queue)
            }
            None => None,
        };
        let explainer = match (&queue, &self.explain_budget) {
            (Some(queue), Some(budget)) => {
                let (explainer, task) = explain::Explainer::start(
                    t,
                    connections,
                    Arc::clone(budget),
                    queue.clone(),
                    Arc::clone(store),
                );
                handles.push(task);
                Some(explainer)
            }
            _ => None,
        };
        let (address, port) = dsn::server(&t.pg.0);
        let sampler = Sampler {
            target: t.clone(),
            slot: Slot::new(t.pg.clone(), every.max(Duration::from_secs(5)))
                .log_as(&t.name, Some("activity sampler")),
            timeout: sample_timeout(every, self.collectors.timeout.0),
            lock_timeout: self.collectors.lock_timeout.0,
            threshold: cfg.slow_query_threshold.0.as_secs_f64(),
            every,
            queue,
            explainer,
            server: span::Server { address, port },
            def: Arc::clone(&self.def),
            load_on: self.load_on,
            store: Arc::clone(store),
            base_labels: t
                .labels
                .iter()
                .map(|(k, v)| (Arc::from(k.as_str()), v.clone()))
                .collect(),
        };
        handles.push(tokio::spawn(sampler.run(shutdown)));
        Ok(Tracing { handles })
    }
}

/// The built-in `activity` collector, for its query when DB load is disabled but spans
/// are on.
fn builtin_activity() -> Option<&'static CollectorDef> {
    static BUILTIN: std::sync::OnceLock<Option<CollectorDef>> = std::sync::OnceLock::new();
    BUILTIN
        .get_or_init(|| {
            Catalog::load(&Default::default())
                .ok()?
                .collectors
                .into_iter()
                .find(|c| c.run_by == RunBy::ActivitySampler)
        })
        .as_ref()
}

/// The `statement_timeout` of the sampler's `pg_stat_activity` read: the sample interval,
/// but no more than the collectors' default `timeout` and at least 1 s. A sample slower
/// than the interval only delays the next one (ticks are delayed, not bunched), so a
/// longer budget buys nothing, and the sampler never gets more than a collector would; the
/// 1 s floor keeps a very short interval (e.g. 50 ms) from cancelling reads that are
/// merely slow on a busy server.
fn sample_timeout(every: Duration, collector_timeout: Duration) -> Duration {
    every.min(collector_timeout).max(Duration::from_secs(1))
}

/// Follows one target's activity.
struct Sampler {
    target: Target,
    /// The sampler's own session, read-only and time-limited like a collector's.
    slot: Slot,
    /// `statement_timeout` of each sample ([`sample_timeout`]).
    timeout: Duration,
    /// `lock_timeout` of each sample: the collectors' default.
    lock_timeout: Duration,
    threshold: f64,
    every: Duration,
    /// Where slow executions go; `None` when tracing is off.
    queue: Option<export::Queue>,
    /// Adds plans to spans on their way to `queue` (`tracing.explain`).
    explainer: Option<explain::Explainer>,
    server: span::Server,
    /// The `activity` collector: the query (by server version) and the load metric.
    def: Arc<CollectorDef>,
    /// DB load is exported (the collector is not disabled).
    load_on: bool,
    store: Arc<Store>,
    base_labels: Vec<(Arc<str>, String)>,
}

/// One sample's rows, decoded.
struct Sample {
    observations: Vec<Observation>,
    active: Vec<Active>,
    /// Server time of the sample, when any row carried it.
    now: Option<f64>,
    /// `server_version_num` of the sampler's session.
    version: u32,
}

impl Sampler {
    async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut tracker = Tracker::default();
        let mut load = Load::default();
        let mut top = TopN::default();
        // The last failure logged, and when: the same one is logged again after 5 minutes.
        let mut logged: Option<(String, Instant)> = None;
        let mut version = 0;
        // A jittered first sample, as the poll loops have: 1,000 targets' samplers started
        // together would otherwise hit their servers in one burst every interval.
        let mut tick = tokio::time::interval_at(jittered_start(self.every), self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let statements = (
            self.target.name.clone(),
            "statements".to_string(),
            String::new(),
        );
        loop {
            tokio::select! {
                due = tick.tick() => observe_lag(LagScope::Activity, due),
                _ = shutdown.changed() => break,
            }
            let started = Instant::now();
            let sample = match self.sample().await {
                Ok(s) => {
                    version = s.version;
                    s
                }
                Err(e) => {
                    self.record(Some(&e), started.elapsed(), &mut logged);
                    continue;
                }
            };
            if self.load_on {
                top.update(self.store.get(&statements));
                load.sample(&sample.active, Instant::now(), self.every, &top);
                match load.families(&self.def, &self.base_labels) {
                    Ok(families) => self.store.put(self.key(), Snapshot { families }),
                    Err(e) => {
                        self.record(Some(&e), started.elapsed(), &mut logged);
                        continue;
                    }
                }
            }
            self.record(None, started.elapsed(), &mut logged);
            if self.queue.is_none() {
                continue;
            }
            // With no other backend there is no row to read the server clock from; local
            // time is as good for ending executions that vanished.
            let now = sample
                .now
                .unwrap_or_else(|| crate::store::unix_seconds(SystemTime::now()));
            for ended in tracker.observe(&sample.observations, now) {
                self.emit(&ended, version);
            }
        }
        for ended in tracker.flush() {
            self.emit(&ended, version);
        }
    }

    fn key(&self) -> (String, String, String) {
        (
            self.target.name.clone(),
            COLLECTOR.to_string(),
            String::new(),
        )
    }

    /// Reads `pg_stat_activity` once with the collector's query for this server.
    async fn sample(&self) -> Result<Sample, PgError> {
        // The slot logs connection failures and backs off; a sample fails fast meanwhile.
        let mut session = self.slot.acquire().await?;
        let version = session.info().version_num;
        let Some(variant) = self.def.queries.resolve(version) else {
            return Err(PgError::new(
                ErrorKind::Query,
                format!("collector {COLLECTOR}: no query variant for server version {version}"),
            ));
        };
        // A broken connection is marked by the slot; the next tick reconnects.
        let rows = session
            .query(&variant.sql, self.timeout, self.lock_timeout)
            .await?;
        drop(session);
        let mut sample = decode(&rows)?;
        sample.version = version;
        Ok(sample)
    }

    /// The sampler's health, as a collector's: duration, errors by kind, last success;
    /// a failure is logged when it changes or every 5 minutes (connection failures are
    /// logged by the slot).
    fn record(
        &self,
        error: Option<&PgError>,
        took: Duration,
        logged: &mut Option<(String, Instant)>,
    ) {
        match error {
            Some(e) if e.kind != ErrorKind::Connect => {
                let repeat = logged.as_ref().is_some_and(|(m, at)| {
                    *m == e.message && at.elapsed() < Duration::from_secs(300)
                });
                if !repeat {
                    tracing::warn!(target = %self.target.name, collector = COLLECTOR, kind = e.kind.as_str(), "activity sample failed: {}", e.message);
                    *logged = Some((e.message.clone(), Instant::now()));
                }
            }
            Some(_) => {}
            None => {
                if logged.take().is_some() {
                    tracing::info!(target = %self.target.name, collector = COLLECTOR, "activity sampler recovered");
                }
            }
        }
        self.store.update_target(&self.target.name, |h| {
            let c = h.collectors.entry(COLLECTOR.to_string()).or_default();
            c.last_duration = Some(took);
            match error {
                Some(e) => *c.errors.entry(e.kind).or_default() += 1,
                None => c.last_success = Some(SystemTime::now()),
            }
        });
    }

    fn emit(&self, ended: &activity::Ended, version: u32) {
        let Some(queue) = &self.queue else { return };
        // Still-running executions at shutdown count from their start to their last
        // sighting, like any other.
        if ended.duration() < self.threshold {
            return;
        }
        let x = &ended.execution;
        if x.query_cut && context::parent_of(&x.query, &x.application_name).is_none() {
            self.context_cut();
        }
        match span::build(ended, &self.server) {
            Some(s) => match &self.explainer {
                Some(explainer) => explainer.submit(explain::Job {
                    span: s,
                    query: x.query.clone(),
                    query_cut: x.query_cut,
                    queryid: x.queryid.clone(),
                    datname: x.datname.clone(),
                    version,
                }),
                None => queue.push(s),
            },
            None => queue.drop_spans("not_sampled", 1),
        }
    }

    /// A slow execution whose text was cut at `track_activity_query_size`, leaving no
    /// trace context: a `traceparent` comment at the end of a long query is lost. Counted
    /// (`pgvigil_spans_context_truncated_total`); the first one per target is logged with
    /// the fix.
    fn context_cut(&self) {
        let mut first = false;
        self.store.update_target(&self.target.name, |h| {
            let counts = h.spans.get_or_insert_with(Default::default);
            first = counts.context_truncated == 0;
            counts.context_truncated += 1;
        });
        if first {
            tracing::warn!(
                target = %self.target.name,
                "a slow query's text was cut at track_activity_query_size and carried no trace \
                 context: sqlcommenter puts traceparent at the end of the SQL, so long queries \
                 lose their parent span. Raise track_activity_query_size (e.g. to 4096 or more; \
                 needs a server restart). Counted in pgvigil_spans_context_truncated_total; \
                 logged once per target"
            );
        }
    }
}

/// The sampler's rows → observations (client backends, for spans) and active sessions
/// (client backends and parallel workers, for DB load). Columns are read by name, as the
/// `activity` collector's query names them.
fn decode(rows: &[tokio_postgres::Row]) -> Result<Sample, PgError> {
    let bad = |e: tokio_postgres::Error| {
        PgError::new(ErrorKind::Decode, format!("collector {COLLECTOR}: {e}"))
    };
    let mut sample = Sample {
        observations: Vec::with_capacity(rows.len()),
        active: Vec::with_capacity(rows.len()),
        now: None,
        version: 0,
    };
    for r in rows {
        sample.now = r
            .try_get::<_, Option<f64>>("now")
            .map_err(bad)?
            .or(sample.now);
        let pid: i32 = r.try_get("pid").map_err(bad)?;
        let state: String = r.try_get("state").map_err(bad)?;
        let leader_pid: Option<i32> = r.try_get("leader_pid").map_err(bad)?;
        let datname: String = r.try_get("datname").map_err(bad)?;
        let usename: String = r.try_get("usename").map_err(bad)?;
        let wait_event_type: String = r.try_get("wait_event_type").map_err(bad)?;
        let wait_event: String = r.try_get("wait_event").map_err(bad)?;
        let backend_type: String = r.try_get("backend_type").map_err(bad)?;
        sample.active.push(Active {
            pid,
            leader_pid,
            datname: datname.clone(),
            usename: usename.clone(),
            state: state.clone(),
            wait_event_type: wait_event_type.clone(),
            wait_event: wait_event.clone(),
            queryid: r.try_get("queryid").map_err(bad)?,
        });
        let queryid: Option<String> = r.try_get("queryid").map_err(bad)?;
        if backend_type != "client backend" {
            continue;
        }
        let query: String = r.try_get("query").map_err(bad)?;
        let size = activity::query_size_bytes(r.try_get("query_size").map_err(bad)?);
        sample.observations.push(Observation {
            pid,
            datname,
            usename,
            application_name: r.try_get("application_name").map_err(bad)?,
            client_addr: r.try_get("client_addr").map_err(bad)?,
            query_start: r.try_get("query_start").map_err(bad)?,
            state,
            state_change: r.try_get("state_change").map_err(bad)?,
            wait_event_type,
            wait_event,
            blocking_pids: r
                .try_get::<_, Vec<i32>>("blocking_pids")
                .unwrap_or_default(),
            query_cut: activity::is_cut(&query, size),
            query,
            queryid,
        });
    }
    Ok(sample)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_timeout_follows_the_interval_within_bounds() {
        let s = Duration::from_secs;
        assert_eq!(sample_timeout(s(2), s(5)), s(2));
        assert_eq!(sample_timeout(s(60), s(5)), s(5));
        assert_eq!(sample_timeout(Duration::from_millis(50), s(5)), s(1));
        assert_eq!(sample_timeout(s(1), Duration::from_millis(200)), s(1));
    }
}
