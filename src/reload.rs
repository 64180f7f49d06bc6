//! What runs for a configuration — a poller and, with tracing on, an activity sampler per
//! target, all writing into the one [`Store`] of the process — and what a reload changes.
//!
//! A reload compares each target's new configuration with the running one, in a
//! comparable form ([`TargetSpec`]): an unchanged target keeps its poller running as it
//! is (snapshots, counters, the state of its Rust steps, readiness); a changed one gets a
//! new poller in place, whose first poll of each collector overwrites the old snapshot (so
//! nothing goes missing meanwhile), and which keeps the state of the collectors whose
//! definition did not change; a removed target stops and leaves the store; an added one
//! starts. Nothing here touches PostgreSQL or the HTTP server.

use std::collections::{BTreeMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::collector::pack::{Catalog, CollectorDef};
use crate::collector::poller::{ByKind, TargetPoller};
use crate::config::{Config, Target, TargetKind};
use crate::store::Store;
use crate::{process_env, trace, StartError};

/// How long a stopped sampler may take to export its last spans.
const TRACING_FLUSH: Duration = Duration::from_secs(15);
/// The same at process shutdown, within its bound (see `SHUTDOWN_LIMIT` in `lib.rs`).
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(3);

/// A target's configuration in a form that compares: equal specs poll the same way.
///
/// Built from `Debug` renderings, which cover every field of the types involved
/// (connection settings, TLS, filters, collector definitions) without each needing
/// `PartialEq`; the password, which `Debug` hides, enters as a hash. Never logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSpec {
    /// What the state kept between polls depends on: connection, labels, database
    /// filter, `statements:` settings.
    base: String,
    /// The collector defaults (heartbeat interval, `lock_timeout`, ...).
    defaults: String,
    /// Collector name → its definition with its effective interval and timeout.
    collectors: BTreeMap<String, String>,
}

impl TargetSpec {
    pub fn new(target: &Target, config: &Config, collectors: &[CollectorDef]) -> TargetSpec {
        let mut password = std::collections::hash_map::DefaultHasher::new();
        target.pg.0.get_password().hash(&mut password);
        let defaults = config.collectors.defaults;
        TargetSpec {
            base: format!(
                "{} {:?} {:?} password#{:x} {:?} {:?} {:?} {:?}",
                target.kind,
                target.pg.0,
                target.pg.1,
                password.finish(),
                target.labels,
                target.databases,
                config.statements,
                config.tables
            ),
            defaults: format!("{defaults:?}"),
            // The poller runs only the packs of the target's kind: the others' changes
            // do not concern it.
            collectors: collectors
                .iter()
                .filter(|c| c.kind == target.kind)
                .map(|c| {
                    let every = c.interval.unwrap_or(defaults.interval);
                    let timeout = c.timeout.unwrap_or(defaults.timeout);
                    (
                        c.name.0.clone(),
                        format!("{c:?} every {every:?} timeout {timeout:?}"),
                    )
                })
                .collect(),
        }
    }
}

/// What a reload does with a target that exists in the new configuration.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    /// Unchanged: its poller keeps running untouched.
    Keep,
    /// Changed: a new poller replaces the old one, taking over the state between polls
    /// of these collectors (same definition, same connection, labels and settings).
    Replace { inherit: HashSet<String> },
    /// New: a poller starts.
    Start,
}

/// How a target goes from `old` (None: not running) to `new`.
pub fn change(old: Option<&TargetSpec>, new: &TargetSpec) -> Change {
    let Some(old) = old else {
        return Change::Start;
    };
    if old == new {
        return Change::Keep;
    }
    let inherit = if old.base == new.base {
        new.collectors
            .iter()
            .filter(|(name, def)| old.collectors.get(*name) == Some(def))
            .map(|(name, _)| name.clone())
            .collect()
    } else {
        HashSet::new()
    };
    Change::Replace { inherit }
}

/// What one [`Running::apply`] did, for the log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub kept: usize,
    pub replaced: usize,
    pub added: usize,
    pub removed: usize,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} targets unchanged, {} changed, {} added, {} removed",
            self.kept, self.replaced, self.added, self.removed
        )
    }
}

/// The running pollers and samplers, by target name.
pub struct Running {
    /// The one store of the process (see [`Store`]).
    store: Arc<Store>,
    targets: BTreeMap<String, RunningTarget>,
    /// Whether a configuration was applied before (the first `apply` is the start).
    started: bool,
}

/// One target's background work.
struct RunningTarget {
    spec: TargetSpec,
    poller: Arc<TargetPoller>,
    /// Tells the poller's tasks to stop between polls.
    stop: watch::Sender<bool>,
    /// The poller's tasks, aborted on stop so none writes into the store afterwards.
    tasks: Vec<JoinHandle<()>>,
    sampler: Option<Sampler>,
}

/// A target's activity sampler and span exporter.
struct Sampler {
    /// The target's spec and the tracing settings it was started with.
    key: SamplerKey,
    stop: watch::Sender<bool>,
    tracing: trace::Tracing,
}

/// Everything a target's sampler depends on: its connection and labels, and what every
/// sampler shares (tracing and the contents of its certificate files, the activity
/// section, the collector whose query it runs), made once per configuration: the
/// definitions written out are about 100 KB, too much to hold per target.
#[derive(Debug, PartialEq)]
struct SamplerKey {
    target: String,
    shared: Arc<str>,
}

/// The part of [`SamplerKey`] every target shares.
fn sampler_key_shared(config: &Config, catalog: &Catalog, plan: Option<&trace::Plan>) -> String {
    let sampler_defs: Vec<&CollectorDef> = catalog
        .collectors
        .iter()
        .filter(|c| c.run_by == crate::collector::pack::RunBy::ActivitySampler)
        .collect();
    format!(
        "{:?} {} {:?} {:?} {:?}",
        config.tracing,
        plan.map(|p| p.files_key()).unwrap_or_default(),
        config.activity,
        config.collectors.defaults,
        sampler_defs
    )
}

impl Sampler {
    /// Stops sampling; the last spans are exported in the background.
    fn stop_in_background(self) {
        let _ = self.stop.send(true);
        tokio::spawn(self.tracing.finish(TRACING_FLUSH));
    }
}

impl RunningTarget {
    async fn stop_poller(&mut self) {
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

impl Running {
    /// Nothing running yet; [`Running::apply`] starts a configuration.
    pub fn new(store: Arc<Store>) -> Running {
        Running {
            store,
            targets: BTreeMap::new(),
            started: false,
        }
    }

    /// Makes what runs match `config`: see the module docs. What can fail (passwords,
    /// tracing settings) is checked before anything changes, so such an error leaves the
    /// running configuration as it was; only an OTLP exporter that cannot be built is
    /// found later, and reported after the rest is applied (that target runs untraced).
    pub async fn apply(
        &mut self,
        config: &Config,
        catalog: &Catalog,
    ) -> Result<Summary, StartError> {
        // Only the targets of this instance's shard (all without `shard:`).
        let targets = config.resolve_targets(&process_env)?;
        let owned = targets.len();
        let tracing = trace::plan(config, catalog, &process_env)?;
        let was_ready = self.started && self.store.ready();
        let by_kind = ByKind::pollers(catalog);
        let names: Vec<&str> = catalog
            .collectors
            .iter()
            .map(|c| c.name.0.as_str())
            .collect();
        let mut summary = Summary::default();
        let mut sampler_shared: Option<Arc<str>> = None;
        let mut failed: Option<trace::TraceError> = None;

        let wanted: HashSet<&str> = targets.iter().map(|t| t.name.as_str()).collect();
        let gone: Vec<String> = self
            .targets
            .keys()
            .filter(|n| !wanted.contains(n.as_str()))
            .cloned()
            .collect();
        for name in gone {
            if let Some(mut t) = self.targets.remove(&name) {
                t.stop_poller().await;
                if let Some(s) = t.sampler.take() {
                    s.stop_in_background();
                }
            }
            self.store.remove_target(&name);
            summary.removed += 1;
        }

        for target in targets {
            let spec = TargetSpec::new(&target, config, &by_kind.of(target.kind));
            let mut old = self.targets.remove(&target.name);
            let mut running = match change(old.as_ref().map(|o| &o.spec), &spec) {
                Change::Keep => {
                    summary.kept += 1;
                    old.take().expect("Keep implies a running target")
                }
                Change::Replace { inherit } => {
                    summary.replaced += 1;
                    let mut old = old.take().expect("Replace implies a running target");
                    old.stop_poller().await;
                    let (stop, stop_rx) = watch::channel(false);
                    // The budget carries over: a kept sampler's EXPLAINs take sessions from it.
                    let budget = old.poller.budget_to_share(&target);
                    let poller = self.poller(&target, config, &by_kind, budget);
                    poller.inherit_states(&old.poller, &inherit);
                    self.store.retain_collectors(&target.name, &names);
                    let tasks = poller.spawn(stop_rx);
                    RunningTarget {
                        spec,
                        poller,
                        stop,
                        tasks,
                        sampler: old.sampler.take(),
                    }
                }
                Change::Start => {
                    summary.added += 1;
                    let (stop, stop_rx) = watch::channel(false);
                    let poller = self.poller(&target, config, &by_kind, None);
                    if was_ready {
                        // A target added by a reload does not take a serving pgvigil out
                        // of rotation: `/readyz` is about the process, which is serving.
                        self.store.update_target(&target.name, |h| h.ready = true);
                    }
                    let tasks = poller.spawn(stop_rx);
                    RunningTarget {
                        spec,
                        poller,
                        stop,
                        tasks,
                        sampler: None,
                    }
                }
            };
            // PgBouncer's console has no pg_stat_activity: no sampler there.
            let sampled = tracing
                .as_ref()
                .filter(|_| target.kind == TargetKind::Postgres);
            // `max_connections` too: the EXPLAINs of `tracing.explain` take sessions from
            // the poller's budget of that size.
            let key = sampled.map(|_| SamplerKey {
                target: format!(
                    "{} max_connections {}",
                    running.spec.base, target.max_connections
                ),
                shared: Arc::clone(sampler_shared.get_or_insert_with(|| {
                    Arc::from(sampler_key_shared(config, catalog, tracing.as_ref()))
                })),
            });
            if running.sampler.as_ref().map(|s| &s.key) != key.as_ref() {
                if let Some(s) = running.sampler.take() {
                    s.stop_in_background();
                }
                if let (Some(plan), Some(key)) = (&tracing, key) {
                    let (stop, stop_rx) = watch::channel(false);
                    let budget = Some(running.poller.connection_budget());
                    match plan.start(&target, &self.store, budget, stop_rx) {
                        Ok(tracing) => running.sampler = Some(Sampler { key, stop, tracing }),
                        // The poller runs (and stays tracked); the error is reported below.
                        Err(e) => failed = failed.or(Some(e)),
                    }
                }
            }
            self.targets.insert(target.name.clone(), running);
        }
        self.store.record_shard(config.shard().to_string(), owned);
        if let Some(e) = failed {
            return Err(e.into());
        }
        if let Some(plan) = &tracing {
            if !self.started {
                tracing::info!("{}", plan.describe());
            }
        }
        self.started = true;
        Ok(summary)
    }

    fn poller(
        &self,
        target: &Target,
        config: &Config,
        collectors: &ByKind,
        budget: Option<Arc<tokio::sync::Semaphore>>,
    ) -> Arc<TargetPoller> {
        TargetPoller::sharing(
            target.clone(),
            collectors.of(target.kind),
            config.collectors.defaults,
            config.statements,
            config.tables,
            Arc::clone(&self.store),
            budget,
        )
    }

    /// Stops every poller, then waits (bounded) for the samplers' last spans.
    pub async fn stop(mut self) {
        let mut flushing = Vec::new();
        for t in self.targets.values_mut() {
            t.stop_poller().await;
            if let Some(s) = t.sampler.take() {
                let _ = s.stop.send(true);
                flushing.push(s.tracing.finish(SHUTDOWN_FLUSH));
            }
        }
        futures_util::future::join_all(flushing).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn specs(yaml: &str) -> BTreeMap<String, TargetSpec> {
        let config = Config::parse(Path::new("t.yaml"), yaml).unwrap();
        let catalog = Catalog::load(&config.collectors).unwrap();
        config
            .resolve_targets(&|_| None)
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    TargetSpec::new(t, &config, &catalog.collectors),
                )
            })
            .collect()
    }

    /// Two targets on one server; `t2` with label `env: {env2}`.
    fn two(env2: &str) -> String {
        format!(
            "targets:
  - {{name: t1, dsn: 'postgres://u:pw@localhost/db', labels: {{env: a}}}}
  - {{name: t2, dsn: 'postgres://u:pw@localhost/db', labels: {{env: {env2}}}}}
"
        )
    }

    #[test]
    fn an_unchanged_target_is_kept() {
        let (a, b) = (specs(&two("a")), specs(&two("a")));
        assert_eq!(change(Some(&a["t1"]), &b["t1"]), Change::Keep);
        assert_eq!(change(None, &b["t1"]), Change::Start);
    }

    #[test]
    fn a_label_change_replaces_only_that_target_and_inherits_nothing() {
        let (a, b) = (specs(&two("a")), specs(&two("b")));
        assert_eq!(change(Some(&a["t1"]), &b["t1"]), Change::Keep);
        assert_eq!(
            change(Some(&a["t2"]), &b["t2"]),
            Change::Replace {
                inherit: HashSet::new()
            }
        );
    }

    #[test]
    fn a_kind_change_replaces_the_target_and_other_kinds_packs_do_not_concern_it() {
        let bouncer = two("a").replace("{name: t2,", "{name: t2, kind: pgbouncer,");
        let (a, b) = (specs(&two("a")), specs(&bouncer));
        assert!(matches!(
            change(Some(&a["t2"]), &b["t2"]),
            Change::Replace { .. }
        ));
        assert!(b["t2"]
            .collectors
            .keys()
            .all(|c| c.starts_with("pgbouncer_")));
        assert!(!a["t1"]
            .collectors
            .keys()
            .any(|c| c.starts_with("pgbouncer_")));
        // Disabling a PostgreSQL collector leaves the PgBouncer target as it runs.
        let c = specs(&format!("{bouncer}collectors:\n  disable: [locks]\n"));
        assert_eq!(change(Some(&b["t2"]), &c["t2"]), Change::Keep);
    }

    #[test]
    fn a_password_change_replaces_the_target() {
        let (a, b) = (
            specs(&two("a")),
            specs(&two("a").replace("u:pw@", "u:pw2@")),
        );
        assert!(matches!(
            change(Some(&a["t1"]), &b["t1"]),
            Change::Replace { .. }
        ));
        assert!(!format!("{:?}", b["t1"]).contains("pw2"));
    }

    #[test]
    fn a_collector_change_keeps_the_state_of_the_others() {
        let a = specs(&two("a"));
        let b = specs(&format!("{}collectors:\n  disable: [locks]\n", two("a")));
        let Change::Replace { inherit } = change(Some(&a["t1"]), &b["t1"]) else {
            panic!("expected a replacement");
        };
        assert!(!inherit.contains("locks"));
        assert!(inherit.contains("statements"), "{inherit:?}");
        assert_eq!(inherit.len(), b["t1"].collectors.len());
    }
}
