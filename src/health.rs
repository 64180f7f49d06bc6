//! pgvigil's own metrics (`pg_up`, `pgvigil_collector_*` including `…_skipped`,
//! `…_series` and how database visits keep up, `pgvigil_spans_*`, `pgvigil_explain_*`,
//! `pgvigil_config_last_reload_*`, `pgvigil_shard_targets`,
//! `pgvigil_build_info`), built for each exposition from
//! the health the store keeps; and the poll lag (`pgvigil_poll_lag_*`), which the poll
//! loops count in [`POLL_LAG`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::metric::{Family, MetricType, Sample};
use crate::store::{unix_seconds, Store};

/// The self-metrics as families, built fresh for each scrape.
pub fn self_metrics(store: &Store) -> Vec<Family> {
    let targets = store.targets();
    let series_counts = store.series_counts();
    let mut up = family(
        "pg_up",
        "1 if the target's database answered the last connection attempt, else 0.",
        MetricType::Gauge,
    );
    let mut duration = family(
        "pgvigil_collector_duration_seconds",
        "How long the collector's last run took.",
        MetricType::Gauge,
    );
    let mut errors = family(
        "pgvigil_collector_errors_total",
        "Collector runs that failed, by kind (connect, query, timeout, decode, permission, missing_extension).",
        MetricType::Counter,
    );
    let mut success = family(
        "pgvigil_collector_last_success_timestamp_seconds",
        "When the collector last finished without error (Unix time).",
        MetricType::Gauge,
    );
    let mut skipped = family(
        "pgvigil_collector_skipped",
        "1 while the collector cannot run on this target by plan (reason: missing_extension, missing_privilege, no_variant); not counted as errors.",
        MetricType::Gauge,
    );
    let mut series = family(
        "pgvigil_collector_series",
        "Series the collector exports now (all databases together).",
        MetricType::Gauge,
    );
    let mut behind = family(
        "pgvigil_collector_databases_behind",
        "Database-scope collectors: monitored databases not visited within two of the collector's intervals, because the connection budget (targets[].max_connections) cannot visit them all in time (0 when it keeps up).",
        MetricType::Gauge,
    );
    let mut oldest = family(
        "pgvigil_collector_oldest_visit_timestamp_seconds",
        "Database-scope collectors: when the least recently visited database was last visited (Unix time); absent until every database has been visited once.",
        MetricType::Gauge,
    );
    let now = std::time::SystemTime::now();
    for (target, h) in &targets {
        up.samples.push(Sample {
            labels: h.labels.clone(),
            value: if h.up { 1.0 } else { 0.0 },
        });
        for (name, c) in &h.collectors {
            let mut labels = h.labels.clone();
            labels.push((Arc::from("collector"), name.clone()));
            if let Some(d) = c.last_duration {
                duration.samples.push(Sample {
                    labels: labels.clone(),
                    value: d.as_secs_f64(),
                });
            }
            for (kind, n) in &c.errors {
                let mut l = labels.clone();
                l.push((Arc::from("kind"), kind.as_str().to_string()));
                errors.samples.push(Sample {
                    labels: l,
                    value: *n as f64,
                });
            }
            if let Some(reason) = c.skipped {
                let mut l = labels.clone();
                l.push((Arc::from("reason"), reason.to_string()));
                skipped.samples.push(Sample {
                    labels: l,
                    value: 1.0,
                });
            }
            let n = series_counts
                .get(&(target.clone(), name.clone()))
                .copied()
                .unwrap_or(0);
            series.samples.push(Sample {
                labels: labels.clone(),
                value: n as f64,
            });
            if let Some(v) = &c.visits {
                behind.samples.push(Sample {
                    labels: labels.clone(),
                    value: v.behind(now) as f64,
                });
                if let Some(t) = v.oldest() {
                    oldest.samples.push(Sample {
                        labels: labels.clone(),
                        value: unix_seconds(t),
                    });
                }
            }
            if let Some(t) = c.last_success {
                success.samples.push(Sample {
                    labels,
                    value: unix_seconds(t),
                });
            }
        }
    }
    let mut exported = family(
        "pgvigil_spans_exported_total",
        "Slow-query spans the OTLP receiver accepted.",
        MetricType::Counter,
    );
    let mut dropped = family(
        "pgvigil_spans_dropped_total",
        "Slow-query spans not delivered, by reason (queue_full, export_failed, not_sampled).",
        MetricType::Counter,
    );
    let mut truncated = family(
        "pgvigil_spans_context_truncated_total",
        "Slow executions whose SQL text was cut at track_activity_query_size with no trace context left in it (raise track_activity_query_size).",
        MetricType::Counter,
    );
    for h in targets.values() {
        let Some(spans) = &h.spans else { continue };
        exported.samples.push(Sample {
            labels: h.labels.clone(),
            value: spans.exported as f64,
        });
        truncated.samples.push(Sample {
            labels: h.labels.clone(),
            value: spans.context_truncated as f64,
        });
        for (reason, n) in &spans.dropped {
            let mut l = h.labels.clone();
            l.push((Arc::from("reason"), reason.to_string()));
            dropped.samples.push(Sample {
                labels: l,
                value: *n as f64,
            });
        }
    }
    let mut explained = family(
        "pgvigil_explain_total",
        "EXPLAIN (GENERIC_PLAN) statements run for slow-query spans (tracing.explain), whatever their outcome.",
        MetricType::Counter,
    );
    let mut explain_skipped = family(
        "pgvigil_explain_skipped_total",
        "Slow-query spans that got no plan (tracing.explain), by reason (version, truncated, not_plannable, permission, budget, timeout, error).",
        MetricType::Counter,
    );
    for h in targets.values() {
        let Some(explain) = &h.explain else { continue };
        explained.samples.push(Sample {
            labels: h.labels.clone(),
            value: explain.run as f64,
        });
        for (reason, n) in &explain.skipped {
            let mut l = h.labels.clone();
            l.push((Arc::from("reason"), reason.to_string()));
            explain_skipped.samples.push(Sample {
                labels: l,
                value: *n as f64,
            });
        }
    }
    let mut reload_ok = family(
        "pgvigil_config_last_reload_successful",
        "1 if the last configuration load (at start or on SIGHUP) was applied, 0 if it was rejected.",
        MetricType::Gauge,
    );
    let mut reload_at = family(
        "pgvigil_config_last_reload_success_timestamp_seconds",
        "When a configuration was last applied (Unix time).",
        MetricType::Gauge,
    );
    if let Some(r) = store.reload_health() {
        reload_ok.samples.push(Sample {
            labels: Vec::new(),
            value: if r.successful { 1.0 } else { 0.0 },
        });
        if let Some(t) = r.last_success {
            reload_at.samples.push(Sample {
                labels: Vec::new(),
                value: unix_seconds(t),
            });
        }
    }
    let mut shard = family(
        "pgvigil_shard_targets",
        "Targets this instance polls: those whose name hashes to its shard (`shard: {index, total}` / --shard; 0/1 polls all).",
        MetricType::Gauge,
    );
    if let Some((label, n)) = store.shard() {
        shard.samples.push(Sample {
            labels: vec![(Arc::from("shard"), label)],
            value: n as f64,
        });
    }
    let mut build = family("pgvigil_build_info", "pgvigil's version.", MetricType::Info);
    build.samples.push(Sample {
        labels: vec![(Arc::from("version"), env!("CARGO_PKG_VERSION").to_string())],
        value: 1.0,
    });
    let mut all = vec![
        up,
        duration,
        errors,
        skipped,
        series,
        success,
        behind,
        oldest,
        exported,
        dropped,
        truncated,
        explained,
        explain_skipped,
        reload_ok,
        reload_at,
        shard,
        build,
    ];
    all.extend(POLL_LAG.families());
    all
}

/// The upper bounds (seconds) of the poll-lag buckets: fine below 0.1 s, where an idle
/// instance is, and around 1 s, the lag DESIGN §9 promises to stay under at 1,000 targets.
pub const LAG_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Which kind of poll loop a lag was measured in: a cluster-scope collector's own loop,
/// a target's round of database visits, or its activity sampler (`activity`, DB load).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LagScope {
    Cluster,
    Database,
    Activity,
}

impl LagScope {
    fn as_str(self) -> &'static str {
        match self {
            LagScope::Cluster => "cluster",
            LagScope::Database => "database",
            LagScope::Activity => "activity",
        }
    }
}

/// Every poll's lag, the whole process together: how late a poll started after the tick it
/// was due at. A histogram of counters (no target label, so 1,000 targets cost the same
/// 45 series as one), kept across reloads. Process-wide because the poll loops of every
/// poller (and of their successors after a reload) add to the same counts.
pub static POLL_LAG: PollLag = PollLag {
    scopes: [LagCounts::new(), LagCounts::new(), LagCounts::new()],
};

/// See [`POLL_LAG`].
pub struct PollLag {
    scopes: [LagCounts; 3],
}

/// One scope's counts: per bucket (not cumulative; the last one is above every bound) and
/// the lag summed, in nanoseconds.
struct LagCounts {
    buckets: [AtomicU64; LAG_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl LagCounts {
    const fn new() -> LagCounts {
        LagCounts {
            buckets: [const { AtomicU64::new(0) }; LAG_BUCKETS.len() + 1],
            sum_nanos: AtomicU64::new(0),
        }
    }
}

impl PollLag {
    /// Counts a poll that started `lag` after it was due.
    pub fn observe(&self, scope: LagScope, lag: Duration) {
        let counts = &self.scopes[scope as usize];
        let secs = lag.as_secs_f64();
        let i = LAG_BUCKETS
            .iter()
            .position(|le| secs <= *le)
            .unwrap_or(LAG_BUCKETS.len());
        counts.buckets[i].fetch_add(1, Ordering::Relaxed);
        counts.sum_nanos.fetch_add(
            lag.as_nanos().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    /// The counts as families. The exposition writes no `histogram` type, so the buckets
    /// are a counter with a `within` label (cumulative, like `le`: polls that started at
    /// most that late; `+Inf` counts every poll) and the sum another counter; PromQL's
    /// `histogram_quantile` reads them after `label_replace(…, "le", "$1", "within", "(.*)")`.
    pub fn families(&self) -> Vec<Family> {
        let mut polls = family(
            "pgvigil_poll_lag_polls_total",
            "Polls (a cluster-scope collector's run, a round of database visits, an activity sample) by how late they started after they were due (cumulative, like a histogram's le: within=\"+Inf\" counts every poll).",
            MetricType::Counter,
        );
        let mut sum = family(
            "pgvigil_poll_lag_seconds_total",
            "How late polls started after they were due, summed.",
            MetricType::Counter,
        );
        for scope in [LagScope::Cluster, LagScope::Database, LagScope::Activity] {
            let counts = &self.scopes[scope as usize];
            let scope_label = (Arc::from("scope"), scope.as_str().to_string());
            let mut cumulative = 0;
            for (i, n) in counts.buckets.iter().enumerate() {
                cumulative += n.load(Ordering::Relaxed);
                let within = LAG_BUCKETS
                    .get(i)
                    .map_or_else(|| "+Inf".to_string(), |le| le.to_string());
                polls.samples.push(Sample {
                    labels: vec![scope_label.clone(), (Arc::from("within"), within)],
                    value: cumulative as f64,
                });
            }
            sum.samples.push(Sample {
                labels: vec![scope_label],
                value: Duration::from_nanos(counts.sum_nanos.load(Ordering::Relaxed)).as_secs_f64(),
            });
        }
        vec![polls, sum]
    }
}

fn family(name: &str, help: &str, kind: MetricType) -> Family {
    Family {
        name: Arc::from(name),
        help: Arc::from(help),
        kind,
        samples: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn within(families: &[Family], scope: &str, le: &str) -> f64 {
        families[0]
            .samples
            .iter()
            .find(|s| s.labels[0].1 == scope && s.labels[1].1 == le)
            .map(|s| s.value)
            .unwrap()
    }

    #[test]
    fn poll_lag_counts_are_cumulative_per_scope() {
        let lag = PollLag {
            scopes: [LagCounts::new(), LagCounts::new(), LagCounts::new()],
        };
        lag.observe(LagScope::Cluster, Duration::from_micros(300));
        lag.observe(LagScope::Cluster, Duration::from_millis(1));
        lag.observe(LagScope::Cluster, Duration::from_millis(700));
        lag.observe(LagScope::Cluster, Duration::from_secs(30));
        lag.observe(LagScope::Database, Duration::from_millis(3));
        let f = lag.families();
        // A bound counts polls exactly that late (le), and every one below it.
        assert_eq!(within(&f, "cluster", "0.001"), 2.0);
        assert_eq!(within(&f, "cluster", "0.5"), 2.0);
        assert_eq!(within(&f, "cluster", "1"), 3.0);
        assert_eq!(within(&f, "cluster", "10"), 3.0);
        assert_eq!(within(&f, "cluster", "+Inf"), 4.0);
        assert_eq!(within(&f, "database", "0.0025"), 0.0);
        assert_eq!(within(&f, "database", "0.005"), 1.0);
        assert_eq!(f[0].samples.len(), 3 * (LAG_BUCKETS.len() + 1));
        let sum = &f[1].samples[0];
        assert_eq!(sum.labels[0].1, "cluster");
        assert!((sum.value - 30.7013).abs() < 1e-9, "{}", sum.value);
    }
}
