//! Slow-query spans: per target, an activity sampler reads `pg_stat_activity` every
//! `tracing.sample_interval` on its own session (a [`Slot`], with the same read-only,
//! time-limited settings and reconnect backoff as the collectors'), follows each execution
//! ([`activity`]), turns the slow ones into spans ([`span`]) parented by the
//! application's `traceparent` ([`context`]), and queues them for OTLP export ([`export`]).
//! Sampling never waits on the exporter; nothing here touches the collectors.

pub mod activity;
pub mod context;
pub mod export;
pub mod span;

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry_sdk::Resource;
use tokio::sync::watch;

use crate::config::{CollectorDefaults, OtlpProtocol, Target, TracingConfig};
use crate::postgres::dsn;
use crate::postgres::slot::Slot;
use crate::store::Store;
use activity::{Observation, Tracker};

/// Errors that stop tracing from starting (the rest of pgvigil would still run).
#[derive(Debug, thiserror::Error)]
#[error("tracing: {0}")]
pub struct TraceError(String);

/// The running samplers and exporters; [`Tracing::finish`] waits for the last spans.
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
    let from_env =
        env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"));
    if cfg.otlp_endpoint.is_none() && from_env.is_none() {
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
    Ok(Some(export::Endpoint {
        url: cfg.otlp_endpoint.clone(),
        protocol,
    }))
}

/// Tracing as configured: where spans go, under which service name, how activity is
/// sampled. [`Plan::start`] starts one target's sampler and exporter, so a reload can
/// keep the samplers of unchanged targets running.
pub struct Plan {
    endpoint: export::Endpoint,
    service: String,
    cfg: TracingConfig,
    collectors: CollectorDefaults,
}

/// The tracing plan, or `None` when tracing is off.
/// `collectors` bounds the sampler's query like a collector's (see [`sample_timeout`]).
pub fn plan(
    cfg: &TracingConfig,
    collectors: &CollectorDefaults,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Plan>, TraceError> {
    let Some(endpoint) = endpoint(cfg, env)? else {
        return Ok(None);
    };
    let service = cfg
        .service_name
        .clone()
        .or_else(|| env("OTEL_SERVICE_NAME"))
        .unwrap_or_else(|| "pgvigil".to_string());
    Ok(Some(Plan {
        endpoint,
        service,
        cfg: cfg.clone(),
        collectors: *collectors,
    }))
}

impl Plan {
    /// What this plan does, for the log.
    pub fn describe(&self) -> String {
        format!(
            "tracing: slow-query spans (>= {}) to {} over {:?}",
            self.cfg.slow_query_threshold,
            self.endpoint
                .url
                .as_deref()
                .unwrap_or("the OTEL_EXPORTER_OTLP_* endpoint"),
            self.endpoint.protocol
        )
    }

    /// Starts a sampler and an exporter for `t`; they stop when `shutdown` turns true.
    pub fn start(
        &self,
        t: &Target,
        store: &Arc<Store>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Tracing, TraceError> {
        let cfg = &self.cfg;
        // Resource::builder() applies OTEL_RESOURCE_ATTRIBUTES; the target is added.
        let resource = Resource::builder()
            .with_service_name(self.service.clone())
            .with_attributes(
                std::iter::once(KeyValue::new("pgvigil.target", t.name.clone())).chain(
                    t.labels
                        .iter()
                        .skip(1)
                        .map(|(k, v)| KeyValue::new(format!("pgvigil.label.{k}"), v.clone())),
                ),
            )
            .build();
        let exporter = export::build_exporter(&self.endpoint, &resource).map_err(TraceError)?;
        let (queue, drain) =
            export::start(exporter, cfg.queue_size, Arc::clone(store), t.name.clone());
        let every = cfg.sample_interval.0;
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
            server: span::Server { address, port },
        };
        let sampling = tokio::spawn(sampler.run(shutdown));
        Ok(Tracing {
            handles: vec![drain, sampling],
        })
    }
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
    queue: export::Queue,
    server: span::Server,
}

/// Client backends other than pgvigil's own sessions. `pg_blocking_pids` only for lock
/// waits: it is not free.
const ACTIVITY_SQL: &str = "\
SELECT pid, coalesce(datname::text, ''), coalesce(usename::text, ''),
       coalesce(application_name, ''), coalesce(host(client_addr), ''),
       extract(epoch FROM query_start)::float8, coalesce(state, ''),
       extract(epoch FROM state_change)::float8,
       coalesce(wait_event_type, ''), coalesce(wait_event, ''),
       CASE WHEN wait_event_type = 'Lock' THEN pg_blocking_pids(pid) ELSE '{}'::int4[] END,
       coalesce(query, ''), extract(epoch FROM clock_timestamp())::float8
FROM pg_stat_activity
WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
  AND coalesce(application_name, '') <> $1";

impl Sampler {
    async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut tracker = Tracker::default();
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let own_app = self
            .target
            .pg
            .0
            .get_application_name()
            .unwrap_or("pgvigil")
            .to_string();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => break,
            }
            // The slot logs connection failures and backs off; a sample is skipped meanwhile.
            let Ok(mut session) = self.slot.acquire().await else {
                continue;
            };
            let rows = session
                .query_params(ACTIVITY_SQL, &[&own_app], self.timeout, self.lock_timeout)
                .await;
            drop(session);
            let rows = match rows {
                Ok(rows) => rows,
                Err(e) => {
                    // A broken connection is already marked; the next tick reconnects.
                    tracing::debug!(target = %self.target.name, "activity sample failed: {e}");
                    continue;
                }
            };
            let mut now = None;
            let observations: Vec<Observation> = rows
                .iter()
                .filter_map(|r| {
                    now = r.try_get::<_, Option<f64>>(12).ok().flatten().or(now);
                    Some(Observation {
                        pid: r.try_get(0).ok()?,
                        datname: r.try_get(1).ok()?,
                        usename: r.try_get(2).ok()?,
                        application_name: r.try_get(3).ok()?,
                        client_addr: r.try_get(4).ok()?,
                        query_start: r.try_get(5).ok()?,
                        state: r.try_get(6).ok()?,
                        state_change: r.try_get(7).ok()?,
                        wait_event_type: r.try_get(8).ok()?,
                        wait_event: r.try_get(9).ok()?,
                        blocking_pids: r.try_get::<_, Vec<i32>>(10).unwrap_or_default(),
                        query: r.try_get(11).ok()?,
                    })
                })
                .collect();
            // With no other backend there is no row to read the server clock from; local
            // time is as good for ending executions that vanished.
            let now =
                now.unwrap_or_else(|| crate::store::unix_seconds(std::time::SystemTime::now()));
            for ended in tracker.observe(&observations, now) {
                self.emit(&ended);
            }
        }
        for ended in tracker.flush() {
            self.emit(&ended);
        }
    }

    fn emit(&self, ended: &activity::Ended) {
        // Still-running executions at shutdown count from their start to their last
        // sighting, like any other.
        if ended.duration() < self.threshold {
            return;
        }
        match span::build(ended, &self.server) {
            Some(s) => self.queue.push(s),
            None => self.queue.drop_spans("not_sampled", 1),
        }
    }
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
