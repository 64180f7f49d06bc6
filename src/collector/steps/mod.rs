//! Rust steps, for what SQL and YAML cannot express. A collector's named step
//! (`processor: statements`, `processor: create_index_progress`) reads the poll's rows and
//! returns a [`Table`] with computed columns (and rows of its own, such as `other` sums);
//! the pack's metrics, declared in YAML like any other, map that table. Counters integrated
//! over time (`accumulate: true`) are the one step applied to families, after the mapping.
//! State is kept per (target, collector, database) by the poller and lives as long as the
//! process.

pub mod index_eta;
pub mod other;
pub mod statements;
pub mod tables;
pub mod window;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::collector::names::{self, NameCache};
use crate::collector::pack::{CollectorDef, ProcessorKind};
use crate::collector::rows;
use crate::collector::table::Rows;
use crate::collector::table::Table;
use crate::config::{StatementsConfig, TablesConfig};
use crate::metric::{Family, Sample};
use crate::postgres::value::Columns;
use crate::postgres::PgError;

/// What a step knows about the poll it is processing.
pub struct Context<'a> {
    /// The collector being processed.
    pub def: &'a CollectorDef,
    /// Target labels, first on every sample.
    pub base_labels: &'a [(Arc<str>, String)],
    pub database: &'a str,
    /// When the rows were read.
    pub now: Instant,
    pub statements: StatementsConfig,
    pub tables: TablesConfig,
    /// The target's relation-name cache, for `relation_names` (none: keep the query's
    /// values).
    pub names: Option<&'a NameCache>,
    /// Whether the target monitors a database, for `per_database` rows.
    pub monitored: &'a dyn Fn(&str) -> bool,
}

/// A collector's Rust step, with the state it keeps between polls.
enum Step {
    Statements(statements::StatementsStep),
    IndexEta(index_eta::IndexEtaStep),
    Tables(tables::TablesStep),
}

impl Step {
    fn new(kind: ProcessorKind) -> Step {
        match kind {
            ProcessorKind::Statements => Step::Statements(Default::default()),
            ProcessorKind::CreateIndexProgress => Step::IndexEta(Default::default()),
            ProcessorKind::TableTopN => Step::Tables(Default::default()),
        }
    }

    fn run<'r, R: Columns>(
        &mut self,
        rows: &'r [R],
        ctx: &Context,
    ) -> Result<Table<'r, R>, PgError> {
        match self {
            Step::Statements(s) => s.run(rows, ctx),
            Step::IndexEta(s) => s.run(rows, ctx),
            Step::Tables(s) => s.run(rows, ctx),
        }
    }
}

/// What a step adds to its collector's rows, for `check-config`.
pub fn describe(kind: ProcessorKind) -> &'static str {
    match kind {
        ProcessorKind::Statements => statements::DESCRIPTION,
        ProcessorKind::CreateIndexProgress => index_eta::DESCRIPTION,
        ProcessorKind::TableTopN => tables::DESCRIPTION,
    }
}

/// Running totals of `accumulate` metrics, by (metric, labels).
type Totals = HashMap<(Arc<str>, Vec<(Arc<str>, String)>), f64>;

/// Per (collector, database) state kept between polls.
#[derive(Default)]
pub struct CollectorState {
    step: Option<Step>,
    totals: Totals,
    last_poll: Option<Instant>,
}

impl CollectorState {
    /// The keys whose text the collector's step wants from the pack's `texts` query
    /// before it processes `rows` (see [`statements::StatementsStep::texts_needed`]).
    pub fn texts_needed<R: Columns>(
        &mut self,
        def: &CollectorDef,
        rows: &[R],
        ctx: &Context,
    ) -> Result<Vec<String>, PgError> {
        match self.statements(def) {
            Some(s) => s.texts_needed(rows, ctx),
            None => Ok(Vec::new()),
        }
    }

    /// The fingerprints the collector's `skips_unchanged` query may leave out (see
    /// [`statements::StatementsStep::unchanged`]); empty asks for every row.
    pub fn unchanged(&mut self, def: &CollectorDef) -> Vec<i64> {
        match self.statements(def) {
            Some(s) => s.unchanged(),
            None => Vec::new(),
        }
    }

    /// Hands the `texts` query's rows to the collector's step.
    pub fn put_texts<R: Columns>(
        &mut self,
        def: &CollectorDef,
        rows: &[R],
        ctx: &Context,
    ) -> Result<(), PgError> {
        match self.statements(def) {
            Some(s) => s.put_texts(rows, ctx),
            None => Ok(()),
        }
    }

    fn statements(&mut self, def: &CollectorDef) -> Option<&mut statements::StatementsStep> {
        let kind = def.processor?;
        match self.step.get_or_insert_with(|| Step::new(kind)) {
            Step::Statements(s) => Some(s),
            _ => None,
        }
    }

    /// One poll's rows → the collector's metric families: through its Rust step (if any),
    /// the rows' databases and relation names (`per_database`, `relation_names`), the
    /// pack's metric mapping, then accumulation.
    pub fn families<R: Columns>(
        &mut self,
        def: &CollectorDef,
        interval: Duration,
        rows: &[R],
        ctx: &Context,
    ) -> Result<Vec<Family>, PgError> {
        let mut families = match def.processor {
            None => map(def, rows, ctx)?,
            Some(kind) => {
                let table = self
                    .step
                    .get_or_insert_with(|| Step::new(kind))
                    .run(rows, ctx)?;
                map(def, &table, ctx)?
            }
        };
        // A long gap (database down, pgvigil paused) is not integrated at today's value:
        // at most two intervals count.
        let dt = self
            .last_poll
            .map(|t| ctx.now.saturating_duration_since(t).min(interval * 2))
            .unwrap_or_default()
            .as_secs_f64();
        self.last_poll = Some(ctx.now);
        // Families follow the metrics, except that a `name_from` metric (never accumulated)
        // may give any number of them: match by name.
        for metric in def.metrics.0.iter().filter(|m| m.accumulate) {
            if let Some(family) = families.iter_mut().find(|f| *f.name == *metric.name.0) {
                accumulate(&mut self.totals, family, dt);
            }
        }
        Ok(families)
    }
}

/// The pack's metric mapping, after `per_database` and `relation_names` (the step, which
/// runs before, keys its state on the query's own values, which do not change when the
/// cache learns a name).
fn map<T: Rows + ?Sized>(
    def: &CollectorDef,
    rows: &T,
    ctx: &Context,
) -> Result<Vec<Family>, PgError> {
    if def.per_database.is_none() {
        return rows::to_families(def, rows, ctx.base_labels, ctx.database);
    }
    let resolved = names::resolve(def, rows, ctx.names, ctx.monitored)?;
    rows::to_families(def, &resolved, ctx.base_labels, ctx.database)
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
