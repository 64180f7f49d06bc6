//! Stateful steps after rows become families, for what SQL and YAML cannot express:
//! counters integrated over time (`accumulate: true`) and the named Rust processors
//! (`processor: statements`, `processor: create_index_progress`). State is kept per
//! (target, collector, database) by the poller and lives as long as the process.

pub mod index_eta;
pub mod statements;
pub mod window;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Row;

use crate::collector::pack::{CollectorDef, ProcessorKind};
use crate::config::StatementsConfig;
use crate::metric::{Family, Sample};
use crate::postgres::PgError;

/// What a processor knows about the poll it is processing.
pub struct Context<'a> {
    /// The collector being processed.
    pub def: &'a CollectorDef,
    /// Target labels, first on every sample.
    pub base_labels: &'a [(Arc<str>, String)],
    pub database: &'a str,
    /// When the rows were read.
    pub now: Instant,
    pub statements: StatementsConfig,
}

/// A named Rust step: takes the rows and the families the YAML mapping made from them,
/// returns the families to store.
pub trait Processor: Send {
    /// Which rows the YAML mapping should turn into series (`None`: all of them). Runs
    /// before [`Processor::process`] in the same poll.
    fn select(&mut self, _rows: &[Row], _ctx: &Context) -> Result<Option<Vec<usize>>, PgError> {
        Ok(None)
    }

    fn process(
        &mut self,
        rows: &[Row],
        families: Vec<Family>,
        ctx: &Context,
    ) -> Result<Vec<Family>, PgError>;
}

/// Builds a fresh processor of `kind`.
pub fn new(kind: ProcessorKind) -> Box<dyn Processor> {
    match kind {
        ProcessorKind::Statements => {
            Box::new(crate::collector::steps::statements::StatementsProcessor::default())
        }
        ProcessorKind::CreateIndexProgress => {
            Box::new(crate::collector::steps::index_eta::ProgressProcessor::default())
        }
    }
}

/// The metric names a processor adds beyond the collector's YAML list, so a pack cannot
/// define them twice.
pub fn extra_metrics(kind: ProcessorKind) -> &'static [&'static str] {
    match kind {
        ProcessorKind::Statements => crate::collector::steps::statements::EXTRA_METRICS,
        ProcessorKind::CreateIndexProgress => crate::collector::steps::index_eta::EXTRA_METRICS,
    }
}

/// Running totals of `accumulate` metrics, by (metric, labels).
type Totals = HashMap<(Arc<str>, Vec<(Arc<str>, String)>), f64>;

/// Per (collector, database) state kept between polls.
#[derive(Default)]
pub struct CollectorState {
    processor: Option<Box<dyn Processor>>,
    totals: Totals,
    last_poll: Option<Instant>,
}

impl CollectorState {
    /// The rows the YAML mapping should use this poll (`None`: all).
    pub fn select(
        &mut self,
        def: &CollectorDef,
        rows: &[Row],
        ctx: &Context,
    ) -> Result<Option<Vec<usize>>, PgError> {
        match def.processor {
            None => Ok(None),
            Some(kind) => self
                .processor
                .get_or_insert_with(|| new(kind))
                .select(rows, ctx),
        }
    }

    /// Applies accumulation and the collector's processor to one poll's families.
    pub fn apply(
        &mut self,
        def: &CollectorDef,
        interval: Duration,
        rows: &[Row],
        mut families: Vec<Family>,
        ctx: &Context,
    ) -> Result<Vec<Family>, PgError> {
        // A long gap (database down, pgvigil paused) is not integrated at today's value:
        // at most two intervals count.
        let dt = self
            .last_poll
            .map(|t| ctx.now.saturating_duration_since(t).min(interval * 2))
            .unwrap_or_default()
            .as_secs_f64();
        self.last_poll = Some(ctx.now);
        for (family, metric) in families.iter_mut().zip(&def.metrics.0) {
            if metric.accumulate {
                accumulate(&mut self.totals, family, dt);
            }
        }
        match def.processor {
            None => Ok(families),
            Some(kind) => self
                .processor
                .get_or_insert_with(|| new(kind))
                .process(rows, families, ctx),
        }
    }
}

/// Replaces each sample's value by its running total (total += value × dt), and keeps
/// exporting totals of label sets that are absent this time, so the counter never drops.
fn accumulate(totals: &mut Totals, family: &mut Family, dt: f64) {
    let mut present = std::collections::HashSet::new();
    for s in &mut family.samples {
        let key = (family.name.clone(), s.labels.clone());
        let total = totals.entry(key).or_insert(0.0);
        *total += s.value.max(0.0) * dt;
        s.value = *total;
        present.insert(s.labels.clone());
    }
    for ((name, labels), total) in totals.iter() {
        if *name == family.name && !present.contains(labels) {
            family.samples.push(Sample {
                labels: labels.clone(),
                value: *total,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metric::MetricType;

    fn fam(values: &[(&str, f64)]) -> Family {
        Family {
            name: Arc::from("x_seconds_total"),
            help: Arc::from("h"),
            kind: MetricType::Counter,
            samples: values
                .iter()
                .map(|(l, v)| Sample {
                    labels: vec![(Arc::from("datname"), l.to_string())],
                    value: *v,
                })
                .collect(),
        }
    }

    #[test]
    fn accumulates_value_times_elapsed_and_keeps_absent_series() {
        let mut totals = HashMap::new();
        let mut f = fam(&[("a", 2.0)]);
        accumulate(&mut totals, &mut f, 0.0);
        assert_eq!(f.samples[0].value, 0.0);
        let mut f = fam(&[("a", 2.0), ("b", 1.0)]);
        accumulate(&mut totals, &mut f, 5.0);
        assert_eq!(f.samples[0].value, 10.0);
        assert_eq!(f.samples[1].value, 5.0);
        let mut f = fam(&[("b", 0.0)]);
        accumulate(&mut totals, &mut f, 5.0);
        let a = f.samples.iter().find(|s| s.labels[0].1 == "a").unwrap();
        assert_eq!(a.value, 10.0, "absent series keeps its total");
        assert_eq!(f.samples.len(), 2);
    }
}
