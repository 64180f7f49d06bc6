//! pgvigil's own metrics (`pg_up`, `pgvigil_collector_*`, `pgvigil_spans_*`,
//! `pgvigil_build_info`), built for each exposition from the health the store keeps.

use std::sync::Arc;

use crate::metric::{Family, MetricType, Sample};
use crate::store::{unix_seconds, Store};

/// The self-metrics as families, built fresh for each scrape.
pub fn self_metrics(store: &Store) -> Vec<Family> {
    let targets = store.targets();
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
    for h in targets.values() {
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
    let mut build = family("pgvigil_build_info", "pgvigil's version.", MetricType::Info);
    build.samples.push(Sample {
        labels: vec![(Arc::from("version"), env!("CARGO_PKG_VERSION").to_string())],
        value: 1.0,
    });
    vec![
        up, duration, errors, success, exported, dropped, truncated, build,
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
