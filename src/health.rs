//! pgvigil's own metrics (`pg_up`, `pgvigil_collector_*` including `…_skipped`,
//! `…_series` and how database visits keep up, `pgvigil_spans_*`, `pgvigil_explain_*`,
//! `pgvigil_config_last_reload_*`, `pgvigil_shard_targets`,
//! `pgvigil_build_info`), built for each exposition from
//! the health the store keeps.

use std::sync::Arc;

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
    vec![
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
    ]
}

fn family(name: &str, help: &str, kind: MetricType) -> Family {
    Family {
        name: Arc::from(name),
        help: Arc::from(help),
        kind,
        samples: Vec::new(),
    }
}
