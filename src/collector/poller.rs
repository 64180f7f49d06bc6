//! The poll loop of one target. Cluster-scope collectors each run on their interval on the
//! main database (the DSN's). Database-scope collectors — only those that need a
//! database's own catalogs — share one visit loop: in each round it visits every monitored
//! database once, running there every such collector that is due, on one session.
//!
//! Connection budget (`targets[].max_connections`, DESIGN §8): every session of the
//! target ([`Slot`], which connects, reconnects and logs its connection) holds a permit
//! of one semaphore while open. The main database's session stays open; the other
//! databases' sessions stay open only while they all fit in the rest of the budget, and
//! otherwise are closed after each visit, so the budget is never exceeded while every
//! database is still visited (at most `max_connections - 1` at once). A round slower than
//! the collectors' interval shows in `pgvigil_collector_databases_behind` and an hourly
//! warning, instead of falling behind silently.
//!
//! The poller owns which databases are visited, what a session's ups and downs mean for
//! the target's health (`pg_up`, `/readyz`), running each collector's query and turning
//! rows into snapshots. Results go to the snapshot store; failures are counted and logged
//! (rate-limited) and never stop other collectors or targets.
//!
//! Each poll (a cluster-scope collector's run, or a round of visits) is a `tracing` span
//! with a span per collector query in it ([`selfspans`]): exported with `tracing.self`,
//! free otherwise.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_postgres::Row;
use tracing::Instrument;

use crate::collector::names::{NameCache, Relations};
use crate::collector::pack::{CacheKind, Catalog, CollectorDef, RunBy, Scope};
use crate::collector::steps::{CollectorState, Context};
use crate::config::{CollectorDefaults, StatementsConfig, TablesConfig, Target, TargetKind};
use crate::health::{LagScope, POLL_LAG};
use crate::postgres::slot::{Event, Slot, SlotGuard};
use crate::postgres::value::QueryRow;
use crate::postgres::{dsn, ErrorKind, PgError};
use crate::store::{Snapshot, Store, Visits};
use crate::trace::selfspans;

/// How often the database list for `scope: database` collectors is refreshed.
const DISCOVERY_EVERY: Duration = Duration::from_secs(60);
/// The same error is logged again at most this often.
const LOG_REPEAT: Duration = Duration::from_secs(300);
/// Falling behind on database visits is logged again at most this often.
const BEHIND_REPEAT: Duration = Duration::from_secs(3600);

/// Polls one target.
pub struct TargetPoller {
    target: Target,
    store: Arc<Store>,
    defaults: CollectorDefaults,
    collectors: Arc<Vec<CollectorDef>>,
    /// Database name → its session, shared by all collectors (the slot serialises them).
    /// A std mutex: only held to look up the map.
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    /// The connection budget: one permit per open session, of any database.
    budget: Arc<Semaphore>,
    /// The databases `scope: database` collectors visit, and when they were listed.
    databases: Mutex<(Vec<String>, Option<Instant>)>,
    /// How many of those are not the main database (decides which sessions stay open).
    others: AtomicUsize,
    /// Relation names per database, filled by visits, read by cluster-scope collectors.
    names: NameCache,
    /// Collectors that have not finished a first run (for `/readyz`).
    pending: Mutex<HashSet<String>>,
    log: Mutex<LogLimiter>,
    base_labels: Vec<(Arc<str>, String)>,
    statements: StatementsConfig,
    tables: TablesConfig,
    /// State kept between polls per (collector, database): accumulated counters and
    /// processors. Locked only for the synchronous post-processing step.
    states: Mutex<HashMap<(String, String), CollectorState>>,
}

/// A configuration's collectors split by the kind of target they run on, made once per
/// configuration: every poller of a kind shares one list, instead of each PostgreSQL
/// target holding its own copy of the definitions without the PgBouncer packs (a copy is
/// about 100 KB; with 1,000 targets, 100 MB).
#[derive(Debug, Default)]
pub struct ByKind(HashMap<TargetKind, Arc<Vec<CollectorDef>>>);

impl ByKind {
    pub fn new<'a>(collectors: impl IntoIterator<Item = &'a CollectorDef>) -> ByKind {
        let mut by_kind: HashMap<TargetKind, Vec<CollectorDef>> = HashMap::new();
        for c in collectors {
            by_kind.entry(c.kind).or_default().push(c.clone());
        }
        ByKind(by_kind.into_iter().map(|(k, v)| (k, Arc::new(v))).collect())
    }

    /// The catalog's collectors that pollers run: the activity sampler's run on the
    /// sampler (`trace::start`), not here.
    pub fn pollers(catalog: &Catalog) -> ByKind {
        ByKind::new(
            catalog
                .collectors
                .iter()
                .filter(|c| c.run_by == RunBy::Poller),
        )
    }

    /// The collectors that run on targets of `kind` (none may).
    pub fn of(&self, kind: TargetKind) -> Arc<Vec<CollectorDef>> {
        self.0.get(&kind).cloned().unwrap_or_default()
    }
}

impl TargetPoller {
    pub fn new(
        target: Target,
        collectors: Arc<Vec<CollectorDef>>,
        defaults: CollectorDefaults,
        statements: StatementsConfig,
        tables: TablesConfig,
        store: Arc<Store>,
    ) -> Arc<TargetPoller> {
        TargetPoller::sharing(
            target, collectors, defaults, statements, tables, store, None,
        )
    }

    /// [`TargetPoller::new`] with the connection budget of a poller it replaces (see
    /// [`TargetPoller::budget_to_share`]), so the sessions of both, and those that other
    /// parts opened from that budget, never exceed `max_connections` together.
    pub fn sharing(
        target: Target,
        collectors: Arc<Vec<CollectorDef>>,
        defaults: CollectorDefaults,
        statements: StatementsConfig,
        tables: TablesConfig,
        store: Arc<Store>,
        budget: Option<Arc<Semaphore>>,
    ) -> Arc<TargetPoller> {
        let base_labels: Vec<(Arc<str>, String)> = target
            .labels
            .iter()
            .map(|(k, v)| (Arc::from(k.as_str()), v.clone()))
            .collect();
        store.add_target(&target.name, base_labels.clone());
        // A pack runs on targets of its own kind only (PgBouncer's console has no
        // catalogs; PostgreSQL has no `SHOW POOLS`): callers pass [`ByKind::of`].
        debug_assert!(collectors.iter().all(|c| c.kind == target.kind));
        let pending = collectors.iter().map(|c| c.name.0.clone()).collect();
        Arc::new(TargetPoller {
            budget: budget
                .unwrap_or_else(|| Arc::new(Semaphore::new(target.max_connections.max(1)))),
            target,
            store,
            defaults,
            collectors,
            slots: Mutex::new(HashMap::new()),
            databases: Mutex::new((Vec::new(), None)),
            others: AtomicUsize::new(0),
            names: NameCache::default(),
            pending: Mutex::new(pending),
            log: Mutex::new(LogLimiter::default()),
            base_labels,
            statements,
            tables,
            states: Mutex::new(HashMap::new()),
        })
    }

    /// The target's connection budget (`max_connections`): a permit per open session,
    /// shared with the sessions of `tracing.explain`.
    pub fn connection_budget(&self) -> Arc<Semaphore> {
        Arc::clone(&self.budget)
    }

    /// This poller's budget, for a successor whose target has the same `max_connections`.
    pub fn budget_to_share(&self, next: &Target) -> Option<Arc<Semaphore>> {
        (next.max_connections == self.target.max_connections).then(|| Arc::clone(&self.budget))
    }

    fn main_db(&self) -> String {
        dsn::database(&self.target.pg.0).to_string()
    }

    fn interval(&self, def: &CollectorDef) -> Duration {
        def.interval.unwrap_or(self.defaults.interval).0
    }

    /// Starts the background tasks; they stop when `shutdown` turns true (between polls).
    /// The handles let a reload abort a poll in flight, so a replaced poller never writes
    /// into the store after its successor started.
    pub fn spawn(self: &Arc<Self>, shutdown: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
        let mut tasks = Vec::with_capacity(self.collectors.len() + 2);
        for (idx, def) in self.collectors.iter().enumerate() {
            if def.scope == Scope::Cluster {
                let me = Arc::clone(self);
                let stop = shutdown.clone();
                tasks.push(tokio::spawn(
                    async move { me.collector_loop(idx, stop).await },
                ));
            }
        }
        let me = Arc::clone(self);
        let stop = shutdown.clone();
        tasks.push(tokio::spawn(async move { me.visit_loop(stop).await }));
        let me = Arc::clone(self);
        tasks.push(tokio::spawn(async move { me.heartbeat(shutdown).await }));
        tasks
    }

    /// Takes over `old`'s state between polls (accumulated counters, the statements window
    /// and top-N, index-build trackers) for the collectors in `keep`, so a poller that
    /// replaces `old` on a reload continues their series instead of restarting them.
    /// Call before [`TargetPoller::spawn`].
    pub fn inherit_states(&self, old: &TargetPoller, keep: &HashSet<String>) {
        let mut from = old.states.lock().unwrap_or_else(|e| e.into_inner());
        let mut to = self.states.lock().unwrap_or_else(|e| e.into_inner());
        for ((collector, db), state) in from.drain() {
            if keep.contains(&collector) {
                to.insert((collector, db), state);
            }
        }
    }

    /// Keeps `pg_up` current even when every collector has a long interval: makes sure the
    /// main connection exists (reconnecting with backoff). Sends no query.
    async fn heartbeat(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let every = self.defaults.interval.0.min(Duration::from_secs(5));
        let mut tick = tokio::time::interval_at(jittered_start(every), every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let main = self.main_db();
                    if let Ok(guard) = self.acquire(&main).await {
                        self.release(guard, &main);
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn collector_loop(self: Arc<Self>, idx: usize, mut shutdown: watch::Receiver<bool>) {
        let def = &self.collectors[idx];
        let every = self.interval(def);
        let mut tick = tokio::time::interval_at(jittered_start(every), every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                due = tick.tick() => {
                    observe_lag(LagScope::Cluster, due);
                    // Boxed: a task's future is as large as its largest state, and a
                    // target has a task per collector that waits most of the time. The
                    // poll's state (a few kilobytes) lives only while it runs.
                    Box::pin(self.poll_collector(def)).await
                }
                _ = shutdown.changed() => return,
            }
        }
    }

    /// The database-scope collectors: a round of visits every shortest interval among
    /// them, each round running the collectors that are due.
    async fn visit_loop(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let defs: Vec<&CollectorDef> = self
            .collectors
            .iter()
            .filter(|c| c.scope == Scope::Database)
            .collect();
        let Some(every) = defs.iter().map(|d| self.interval(d)).min() else {
            return;
        };
        let mut next_due: Vec<Option<Instant>> = vec![None; defs.len()];
        let mut tick = tokio::time::interval_at(jittered_start(every), every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                due = tick.tick() => observe_lag(LagScope::Database, due),
                _ = shutdown.changed() => return,
            }
            // Due now, or within half a round: a collector whose interval is a multiple of
            // the round's runs every so many rounds, not one round late.
            let now = Instant::now();
            let mut due = Vec::new();
            for (i, def) in defs.iter().enumerate() {
                if next_due[i].is_none_or(|at| at <= now + every / 2) {
                    next_due[i] = Some(now + self.interval(def));
                    due.push(*def);
                }
            }
            tokio::select! {
                _ = Box::pin(self.visit_round(&due)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Runs every collector once, in order (for `pgvigil once`).
    pub async fn poll_all_once(&self) {
        for def in self.collectors.iter() {
            self.poll_collector(def).await;
        }
    }

    /// One run of a collector: on the main database, or a round over the monitored
    /// databases.
    pub async fn poll_collector(&self, def: &CollectorDef) {
        match def.scope {
            Scope::Cluster => {
                let poll = selfspans::poll(&self.target.name);
                let span = selfspans::collector(&self.target.name, &def.name.0, &self.main_db());
                let run = async {
                    let started = Instant::now();
                    let result = self.run_cluster(def).instrument(span.clone()).await;
                    if let Err(e) = &result {
                        if e.kind.skip_reason().is_none() {
                            selfspans::error(&span, &e.message);
                        }
                    }
                    self.record(def, "", result, started.elapsed());
                    self.first_run_done(def);
                };
                run.instrument(poll).await
            }
            Scope::Database => self.visit_round(&[def]).await,
        }
    }

    /// Runs `def` once on the main database and says how it went: its query and the
    /// processing of its rows, as a poll would, but nothing reaches the store (for
    /// `check-config --connect`, which reports per collector).
    pub async fn try_collector(&self, def: &CollectorDef) -> Result<(), PgError> {
        let main = self.main_db();
        let mut slot = self.acquire(&main).await?;
        let rows = self.query(&mut slot, def, &main).await;
        self.release(slot, &main);
        if let Some(rows) = rows? {
            self.process(def, "", &rows)?;
        }
        Ok(())
    }

    /// Runs `sql` on the main database's session with the default timeouts (for
    /// `check-config --connect`: connecting, and reading a setting).
    pub async fn query_main(&self, sql: &str) -> Result<Vec<Row>, PgError> {
        let main = self.main_db();
        let mut slot = self.acquire(&main).await?;
        let rows = slot
            .query(sql, self.defaults.timeout.0, self.defaults.lock_timeout.0)
            .await;
        self.release(slot, &main);
        rows
    }

    fn key(&self, def: &CollectorDef, db: &str) -> (String, String, String) {
        (self.target.name.clone(), def.name.0.clone(), db.to_string())
    }

    /// A cluster-scope collector on the main database.
    async fn run_cluster(&self, def: &CollectorDef) -> Result<Option<Snapshot>, PgError> {
        let main = self.main_db();
        let mut slot = self.acquire(&main).await?;
        let rows = self.query(&mut slot, def, &main).await;
        self.release(slot, &main);
        match rows? {
            Some(rows) => self.process(def, "", &rows).map(Some),
            None => Ok(None),
        }
    }

    /// One round over the monitored databases for `defs` (database-scope collectors):
    /// each database visited once, on one session for all of them, at most as many at
    /// once as the budget leaves beside the main database's session.
    async fn visit_round(&self, defs: &[&CollectorDef]) {
        if defs.is_empty() {
            return;
        }
        self.round(defs)
            .instrument(selfspans::poll(&self.target.name))
            .await
    }

    /// [`TargetPoller::visit_round`] within its poll span.
    async fn round(&self, defs: &[&CollectorDef]) {
        let dbs = self.databases().await;
        for def in defs {
            self.store
                .retain_databases(&self.target.name, &def.name.0, &dbs);
        }
        let started = Instant::now();
        let visitors = self.target.max_connections.saturating_sub(1).max(1);
        let visits: Vec<(String, SystemTime, Vec<Option<PgError>>)> =
            futures_util::stream::iter(dbs.clone())
                .map(|db| self.visit(db, defs))
                .buffer_unordered(visitors)
                .collect()
                .await;
        let took = started.elapsed();
        let mut behind: Vec<(String, usize)> = Vec::new();
        for (i, def) in defs.iter().enumerate() {
            // The run counts as failed if any database failed (each is reported), and as
            // skipped by plan if it ran in no database.
            let errors = || visits.iter().filter_map(|(_, _, e)| e[i].as_ref());
            let failed = errors().find(|e| e.kind.skip_reason().is_none());
            let ran = visits.iter().any(|(_, _, e)| e[i].is_none());
            let skipped = if ran { None } else { errors().next() };
            self.record_health(def, failed.or(skipped), took);
            let interval = self.interval(def);
            let mut lagging = 0;
            self.store.update_target(&self.target.name, |h| {
                let c = h.collectors.entry(def.name.0.clone()).or_default();
                let v = c.visits.get_or_insert_with(|| Visits::new(interval));
                v.interval = interval;
                v.databases.retain(|db, _| dbs.contains(db));
                for db in &dbs {
                    v.databases.entry(db.clone()).or_insert(None);
                }
                for (db, at, _) in &visits {
                    v.databases.insert(db.clone(), Some(*at));
                }
                lagging = v.behind(SystemTime::now());
            });
            if lagging > 0 {
                behind.push((def.name.0.clone(), lagging));
            }
            self.first_run_done(def);
        }
        self.warn_behind(&behind, dbs.len(), took);
    }

    /// Logs, at most hourly, that the budget cannot visit every database within the
    /// collectors' intervals.
    fn warn_behind(&self, behind: &[(String, usize)], total: usize, round: Duration) {
        if behind.is_empty() {
            return;
        }
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if log.behind.is_some_and(|at| at.elapsed() < BEHIND_REPEAT) {
            return;
        }
        log.behind = Some(Instant::now());
        let which: Vec<String> = behind
            .iter()
            .map(|(c, n)| format!("{c}: {n} of {total}"))
            .collect();
        tracing::warn!(
            target = %self.target.name,
            max_connections = self.target.max_connections,
            "database visits are behind: databases not visited within two intervals ({}); the last round over {total} databases took {:.1}s. Raise targets[].max_connections or the collectors' interval (logged at most hourly)",
            which.join(", "),
            round.as_secs_f64()
        );
    }

    /// One visit of `db`: every collector of `defs` on one session, which is then closed
    /// unless every database fits in the budget. The error of each collector, if any.
    /// Returns the database, when the visit ended, and the errors.
    async fn visit(
        &self,
        db: String,
        defs: &[&CollectorDef],
    ) -> (String, SystemTime, Vec<Option<PgError>>) {
        let errors = self.visit_db(&db, defs).await;
        (db, SystemTime::now(), errors)
    }

    async fn visit_db(&self, db: &str, defs: &[&CollectorDef]) -> Vec<Option<PgError>> {
        let mut slot = match self.acquire(db).await {
            Ok(s) => s,
            Err(e) => {
                selfspans::error(&tracing::Span::current(), &e.message);
                for def in defs {
                    self.store.remove(&self.key(def, db));
                    self.report(def, db, &e);
                }
                return vec![Some(e); defs.len()];
            }
        };
        let mut results = Vec::with_capacity(defs.len());
        for def in defs {
            let span = selfspans::collector(&self.target.name, &def.name.0, db);
            results.push(self.query(&mut slot, def, db).instrument(span).await);
        }
        self.release(slot, db);
        defs.iter()
            .zip(results)
            .map(|(def, rows)| {
                let key = self.key(def, db);
                let result = rows.and_then(|rows| match rows {
                    Some(rows) => self
                        .fill_cache(def, db, &rows)
                        .and_then(|()| self.process(def, db, &rows).map(Some)),
                    None => Ok(None),
                });
                match result {
                    Ok(Some(snapshot)) if !snapshot.families.is_empty() => {
                        self.store.put(key, snapshot);
                        None
                    }
                    Ok(_) => {
                        self.store.remove(&key);
                        None
                    }
                    Err(e) => {
                        self.store.remove(&key);
                        self.report(def, db, &e);
                        Some(e)
                    }
                }
            })
            .collect()
    }

    /// A `cache: relation_names` collector's rows become the database's relation names.
    fn fill_cache(&self, def: &CollectorDef, db: &str, rows: &[QueryRow]) -> Result<(), PgError> {
        match def.cache {
            None => Ok(()),
            Some(CacheKind::RelationNames) => {
                let relations =
                    Relations::from_rows(rows).map_err(|e| PgError::new(ErrorKind::Decode, e))?;
                self.names.put(db, relations);
                Ok(())
            }
        }
    }

    /// Runs the collector's query on `slot` (a session on `db`); `Ok(None)` when it does
    /// not apply there.
    async fn query(
        &self,
        slot: &mut SlotGuard,
        def: &CollectorDef,
        db: &str,
    ) -> Result<Option<Vec<QueryRow>>, PgError> {
        let info = slot.info();
        let Some(variant) = def.queries.resolve(info.version_num) else {
            let v = info.version_num;
            return Err(PgError::new(
                ErrorKind::NoVariant,
                format!(
                    "no query variant for server version {v}; collector skipped on this server"
                ),
            ));
        };
        if let Some(ext) = &def.requires.extension {
            if !info.extensions.contains(ext) {
                return Err(PgError::new(
                    ErrorKind::MissingExtension,
                    format!("extension {ext} is not installed in database {db:?}; collector skipped (CREATE EXTENSION {ext} to enable it)"),
                ));
            }
        }
        let timeout = def.timeout.unwrap_or(self.defaults.timeout).0;
        // A query that breaks the connection marks the slot broken (and, on the main
        // database, turns `pg_up` to 0 through `session_events`).
        let lock_timeout = self.defaults.lock_timeout.0;
        // The state is the one `process` uses: "" for cluster scope.
        let at = match def.scope {
            Scope::Cluster => "",
            Scope::Database => db,
        };
        let unchanged = variant
            .skips_unchanged
            .then(|| self.with_state(def, at, |s, _| s.unchanged(def)));
        let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] = match &unchanged {
            Some(fps) => &[fps],
            None => &[],
        };
        let rows = slot
            .fetch(&variant.sql, params, timeout, lock_timeout)
            .await
            .map_err(|e| with_grant(e, def.requires.grant.as_deref()))
            .inspect_err(|e| selfspans::error(&tracing::Span::current(), &e.message))?;
        selfspans::rows(rows.len());
        if let Some(texts) = &variant.texts {
            // Texts only for what the step has not got (statements: queries entering
            // the top N), on the same session, before the rows are processed.
            let needed = self.with_state(def, at, |s, ctx| s.texts_needed(def, &rows, ctx))?;
            if !needed.is_empty() {
                let found = slot
                    .query_params(texts, &[&needed], timeout, lock_timeout)
                    .await?;
                self.with_state(def, at, |s, ctx| s.put_texts(def, &found, ctx))?;
            }
        }
        Ok(Some(rows))
    }

    /// Runs `f` on the step state of `def` in `db`, with this poll's context.
    fn with_state<T>(
        &self,
        def: &CollectorDef,
        db: &str,
        f: impl FnOnce(&mut CollectorState, &Context) -> T,
    ) -> T {
        let monitored = |name: &str| self.target.databases.matches(name);
        let ctx = Context {
            def,
            base_labels: &self.base_labels,
            database: db,
            now: Instant::now(),
            statements: self.statements,
            tables: self.tables,
            names: Some(&self.names),
            monitored: &monitored,
        };
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        let state = states
            .entry((def.name.0.clone(), db.to_string()))
            .or_default();
        f(state, &ctx)
    }

    /// Rows → the collector's snapshot (steps, names, mapping, accumulation). `db` is ""
    /// for cluster scope.
    fn process(
        &self,
        def: &CollectorDef,
        db: &str,
        rows: &[QueryRow],
    ) -> Result<Snapshot, PgError> {
        let interval = self.interval(def);
        let families = self.with_state(def, db, |s, ctx| s.families(def, interval, rows, ctx))?;
        Ok(Snapshot { families })
    }

    /// The session for `db`, connected (waiting for a permit of the budget if needed);
    /// while its slot backs off after a failed attempt this fails fast (see
    /// [`Slot::acquire`]).
    async fn acquire(&self, db: &str) -> Result<SlotGuard, PgError> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(
                slots
                    .entry(db.to_string())
                    .or_insert_with(|| Arc::new(self.new_slot(db))),
            )
        };
        slot.acquire().await
    }

    /// Hands a session back: kept open if [`TargetPoller::keep_open`] says so, else closed
    /// (its permit returns to the budget).
    fn release(&self, guard: SlotGuard, db: &str) {
        if !self.keep_open(db) {
            guard.close();
        }
    }

    /// Whether `db`'s session may stay open between uses without starving another
    /// database of the budget: the main database's always (it is the only one that needs
    /// no visit), unless the budget is a single connection that other databases need too;
    /// the others only while all of them fit beside it.
    fn keep_open(&self, db: &str) -> bool {
        if db == self.main_db() {
            self.target.max_connections >= 2 || self.others.load(Ordering::Relaxed) == 0
        } else {
            self.others_fit()
        }
    }

    /// Every database besides the main one can have its own open session.
    fn others_fit(&self) -> bool {
        self.others.load(Ordering::Relaxed) < self.target.max_connections
    }

    /// A slot for `db`. The main database's session decides `pg_up`; the others' connects
    /// are routine (one per visit when the databases do not all fit in the budget).
    fn new_slot(&self, db: &str) -> Slot {
        let mut dsn = self.target.pg.clone();
        dsn.0.dbname(db);
        let slot = Slot::new(dsn, self.defaults.timeout.0)
            .flavour(self.target.kind.into())
            .log_as(&self.target.name, None)
            .budget(Arc::clone(&self.budget));
        if db != self.main_db() {
            return slot.quiet();
        }
        let store = Arc::clone(&self.store);
        let target = self.target.name.clone();
        slot.on_event(move |event| session_events(&store, &target, event))
    }

    /// The databases to visit, refreshed at most every [`DISCOVERY_EVERY`]. On failure the
    /// previous list is kept. A new list also forgets the sessions and names of databases
    /// no longer monitored, and closes idle sessions that no longer fit in the budget.
    async fn databases(&self) -> Vec<String> {
        {
            let d = self.databases.lock().unwrap_or_else(|e| e.into_inner());
            if d.1.is_some_and(|at| at.elapsed() < DISCOVERY_EVERY) {
                return d.0.clone();
            }
        }
        let main = self.main_db();
        let listed = async {
            let mut slot = self.acquire(&main).await?;
            let rows = slot
                .query(
                    "SELECT datname::text FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1",
                    self.defaults.timeout.0,
                    self.defaults.lock_timeout.0,
                )
                .await;
            self.release(slot, &main);
            Ok::<_, PgError>(rows?.iter().filter_map(|r| r.try_get::<_, String>(0).ok()).collect::<Vec<_>>())
        }
        .await;
        let all = match listed {
            Ok(all) => all,
            Err(e) => {
                tracing::debug!(target = %self.target.name, "cannot list databases: {e}");
                let mut d = self.databases.lock().unwrap_or_else(|e| e.into_inner());
                // Try again at the next round, not at every visit of this one.
                if d.1.is_none() {
                    d.1 = Some(Instant::now() - DISCOVERY_EVERY + Duration::from_secs(5));
                }
                return d.0.clone();
            }
        };
        let dbs: Vec<String> = all
            .into_iter()
            .filter(|n| self.target.databases.matches(n))
            .collect();
        {
            let mut d = self.databases.lock().unwrap_or_else(|e| e.into_inner());
            d.0 = dbs.clone();
            d.1 = Some(Instant::now());
        }
        self.others.store(
            dbs.iter().filter(|d| **d != main).count(),
            Ordering::Relaxed,
        );
        self.names.retain(&dbs);
        let (gone, others): (Vec<Arc<Slot>>, Vec<Arc<Slot>>) = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            let unlisted: Vec<String> = slots
                .keys()
                .filter(|db| **db != main && !dbs.contains(db))
                .cloned()
                .collect();
            let gone = unlisted.iter().filter_map(|db| slots.remove(db)).collect();
            let others = slots
                .iter()
                .filter(|(db, _)| **db != main)
                .map(|(_, s)| Arc::clone(s))
                .collect();
            (gone, others)
        };
        for slot in gone {
            slot.close().await;
        }
        // Sessions kept open while every database fitted hold permits that the others
        // need now. (No visit holds one here: this runs before a round's visits, and
        // rounds do not overlap.)
        if !self.others_fit() {
            for slot in others {
                slot.close().await;
            }
        }
        dbs
    }

    fn first_run_done(&self, def: &CollectorDef) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if p.remove(&def.name.0) && p.is_empty() {
            self.store
                .update_target(&self.target.name, |h| h.ready = true);
        }
    }

    /// Stores a cluster-scope result and its health.
    fn record(
        &self,
        def: &CollectorDef,
        db: &str,
        result: Result<Option<Snapshot>, PgError>,
        took: Duration,
    ) {
        let key = self.key(def, db);
        match &result {
            Ok(Some(_)) => {}
            Ok(None) => self.store.remove(&key),
            Err(e) => {
                self.store.remove(&key);
                self.report(def, db, e);
            }
        }
        self.record_health(def, result.as_ref().err(), took);
        if let Ok(Some(snapshot)) = result {
            self.store.put(key, snapshot);
        }
    }

    fn record_health(&self, def: &CollectorDef, error: Option<&PgError>, took: Duration) {
        let name = def.name.0.clone();
        self.store.update_target(&self.target.name, |h| {
            let c = h.collectors.entry(name).or_default();
            c.last_duration = Some(took);
            // Skipped by plan (see `ErrorKind::skip_reason`) is a state, not an error.
            c.skipped = error.and_then(|e| e.kind.skip_reason());
            match error {
                Some(e) if c.skipped.is_none() => *c.errors.entry(e.kind).or_default() += 1,
                Some(_) => {}
                None => c.last_success = Some(SystemTime::now()),
            }
        });
        if error.is_none() {
            let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
            if log.recovered(&def.name.0) {
                tracing::info!(target = %self.target.name, collector = %def.name, "collector recovered");
            }
        }
    }

    /// Logs a collector error, at most once per [`LOG_REPEAT`] for the same message.
    /// Connect errors are logged where the connection is attempted.
    fn report(&self, def: &CollectorDef, db: &str, e: &PgError) {
        if e.kind == ErrorKind::Connect {
            return;
        }
        if e.kind.skip_reason().is_some() {
            return self.once(def, db, &e.message);
        }
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if log.should_log(&def.name.0, db, &e.message) {
            tracing::warn!(
                target = %self.target.name,
                collector = %def.name,
                database = db,
                kind = e.kind.as_str(),
                "collector failed: {}",
                e.message
            );
        }
    }

    /// Logs a fact about a collector once per target and database.
    fn once(&self, def: &CollectorDef, db: &str, message: &str) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if log
            .once
            .insert((def.name.0.clone(), db.to_string(), message.to_string()))
        {
            tracing::info!(target = %self.target.name, collector = %def.name, database = db, "{message}");
        }
    }
}

/// Counts how late a poll starts after `due`, the instant its tick was scheduled for.
/// The loops' intervals use [`MissedTickBehavior::Delay`]: when a poll overruns (or the
/// runtime is too busy to wake the loop on time), the next `tick()` returns at once with
/// the instant it was due, so the delay is counted here, never silently skipped; the
/// ticks after it are then due an interval after that late start.
///
/// [`MissedTickBehavior::Delay`]: tokio::time::MissedTickBehavior::Delay
pub(crate) fn observe_lag(scope: LagScope, due: tokio::time::Instant) {
    POLL_LAG.observe(scope, lag_since(due, tokio::time::Instant::now()));
}

/// How late `now` is after `due` (zero if it is not).
fn lag_since(due: tokio::time::Instant, now: tokio::time::Instant) -> Duration {
    now.saturating_duration_since(due)
}

/// A random moment within the first `every`: many targets and collectors then spread
/// their connections and queries over the whole interval instead of firing in lockstep
/// (measured with 100 targets: without it, every poll fell into the same 3 s burst).
pub(crate) fn jittered_start(every: Duration) -> tokio::time::Instant {
    let ms = (every.as_millis() as u64).max(1);
    tokio::time::Instant::now() + Duration::from_millis(fastrand::u64(0..ms))
}

/// A permission error of a collector with `requires.grant`: the message says what to
/// grant (it is logged once, as the collector is skipped by plan).
fn with_grant(mut e: PgError, grant: Option<&str>) -> PgError {
    if let (ErrorKind::Permission, Some(grant)) = (e.kind, grant) {
        e.message = format!(
            "{}; collector skipped (run it as a superuser, or: {})",
            e.message,
            grant.trim()
        );
    }
    e
}

/// What the main database's session means for the target: `pg_up` follows it, and a
/// failed attempt also makes the target ready, so `/readyz` does not wait for a server
/// that is down.
fn session_events(store: &Store, target: &str, event: Event) {
    match event {
        Event::Connected => store.update_target(target, |h| h.up = true),
        Event::Lost => store.update_target(target, |h| h.up = false),
        Event::ConnectFailed => store.update_target(target, |h| {
            h.up = false;
            h.ready = true;
        }),
    }
}

/// Remembers what was logged, so repeating failures do not flood the log.
#[derive(Default)]
struct LogLimiter {
    last: HashMap<(String, String), (String, Instant)>,
    once: HashSet<(String, String, String)>,
    /// When falling behind on database visits was last logged.
    behind: Option<Instant>,
}

impl LogLimiter {
    fn should_log(&mut self, collector: &str, db: &str, message: &str) -> bool {
        let key = (collector.to_string(), db.to_string());
        match self.last.get(&key) {
            Some((m, at)) if m == message && at.elapsed() < LOG_REPEAT => false,
            _ => {
                self.last.insert(key, (message.to_string(), Instant::now()));
                true
            }
        }
    }

    /// True when the collector had a logged failure, which is now cleared.
    fn recovered(&mut self, collector: &str) -> bool {
        let before = self.last.len();
        self.last.retain(|(c, _), _| c != collector);
        before != self.last.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_of_a_kind_share_one_list_of_its_collectors() {
        let catalog = crate::collector::pack::Catalog::load(&Default::default()).unwrap();
        let by_kind = ByKind::new(&catalog.collectors);
        for kind in [TargetKind::Postgres, TargetKind::Pgbouncer] {
            let (a, b) = (by_kind.of(kind), by_kind.of(kind));
            assert!(
                Arc::ptr_eq(&a, &b),
                "{kind:?}: one list, not a copy per target"
            );
            assert!(
                !a.is_empty() && a.iter().all(|c| c.kind == kind),
                "{kind:?}"
            );
            let all = catalog.collectors.iter().filter(|c| c.kind == kind).count();
            assert_eq!(a.len(), all, "{kind:?}: every collector of the kind");
        }
    }

    #[test]
    fn a_denied_query_says_what_to_grant() {
        let denied = PgError::new(ErrorKind::Permission, "ERROR: permission denied for view v");
        let e = with_grant(denied.clone(), Some("GRANT SELECT ON v TO <role>\n"));
        assert_eq!(
            e.message,
            "ERROR: permission denied for view v; collector skipped (run it as a superuser, or: GRANT SELECT ON v TO <role>)"
        );
        assert_eq!(with_grant(denied.clone(), None).message, denied.message);
        let failed = PgError::new(ErrorKind::Query, "ERROR: boom");
        assert_eq!(with_grant(failed, Some("GRANT x")).message, "ERROR: boom");
    }

    #[tokio::test]
    async fn a_tick_missed_while_a_poll_overran_counts_as_lag() {
        // The loops' interval setup, scaled down: a 200 ms interval whose poll takes 300 ms.
        let every = Duration::from_millis(200);
        let start = tokio::time::Instant::now();
        let mut tick = tokio::time::interval_at(start, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Due at 200 ms, started at 300 ms or later: the tick is not skipped, and it says
        // when it was due, so the 100 ms show as lag.
        let called = tokio::time::Instant::now();
        let due = tick.tick().await;
        assert_eq!(due, start + every);
        assert!(lag_since(due, tokio::time::Instant::now()) >= Duration::from_millis(100));
        // The next one is due an interval after that late start.
        let due = tick.tick().await;
        assert!(due >= called + every, "{:?}", due - called);
        assert_eq!(lag_since(due, due), Duration::ZERO);
        assert_eq!(lag_since(due + every, due), Duration::ZERO);
    }

    #[test]
    fn log_limiter_repeats_only_on_change() {
        let mut l = LogLimiter::default();
        assert!(l.should_log("c", "", "boom"));
        assert!(!l.should_log("c", "", "boom"));
        assert!(l.should_log("c", "", "other"));
        assert!(l.recovered("c"));
        assert!(!l.recovered("c"));
        assert!(l.should_log("c", "", "other"));
    }
}
