//! The poll loop of one target: a background task per collector on its interval, sharing
//! at most one session per database (a [`Slot`], which connects, reconnects and logs its
//! connection). The poller owns which databases are visited, what a session's ups and
//! downs mean for the target's health (`pg_up`, `/readyz`), running each collector's query
//! and turning rows into snapshots. Results go to the snapshot store; failures are
//! counted and logged (rate-limited) and never stop other collectors or targets.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::collector::pack::{CollectorDef, Scope};
use crate::collector::steps::{CollectorState, Context};
use crate::config::{CollectorDefaults, StatementsConfig, Target};
use crate::postgres::slot::{Event, Slot, SlotGuard};
use crate::postgres::{dsn, ErrorKind, PgError};
use crate::store::{Snapshot, Store};

/// How often the database list for `scope: database` collectors is refreshed.
const DISCOVERY_EVERY: Duration = Duration::from_secs(60);
/// The same error is logged again at most this often.
const LOG_REPEAT: Duration = Duration::from_secs(300);

/// Polls one target.
pub struct TargetPoller {
    target: Target,
    store: Arc<Store>,
    defaults: CollectorDefaults,
    collectors: Arc<Vec<CollectorDef>>,
    /// Database name → its session, shared by all collectors (the slot serialises them).
    /// A std mutex: only held to look up the map.
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    /// The databases `scope: database` collectors visit, and when they were listed.
    databases: Mutex<(Vec<String>, Option<Instant>)>,
    /// Collectors that have not finished a first run (for `/readyz`).
    pending: Mutex<HashSet<String>>,
    log: Mutex<LogLimiter>,
    base_labels: Vec<(Arc<str>, String)>,
    statements: StatementsConfig,
    /// State kept between polls per (collector, database): accumulated counters and
    /// processors. Locked only for the synchronous post-processing step.
    states: Mutex<HashMap<(String, String), CollectorState>>,
}

impl TargetPoller {
    pub fn new(
        target: Target,
        collectors: Arc<Vec<CollectorDef>>,
        defaults: CollectorDefaults,
        statements: StatementsConfig,
        store: Arc<Store>,
    ) -> Arc<TargetPoller> {
        let base_labels: Vec<(Arc<str>, String)> = target
            .labels
            .iter()
            .map(|(k, v)| (Arc::from(k.as_str()), v.clone()))
            .collect();
        store.add_target(&target.name, base_labels.clone());
        let pending = collectors.iter().map(|c| c.name.0.clone()).collect();
        Arc::new(TargetPoller {
            target,
            store,
            defaults,
            collectors,
            slots: Mutex::new(HashMap::new()),
            databases: Mutex::new((Vec::new(), None)),
            pending: Mutex::new(pending),
            log: Mutex::new(LogLimiter::default()),
            base_labels,
            statements,
            states: Mutex::new(HashMap::new()),
        })
    }

    fn main_db(&self) -> String {
        dsn::database(&self.target.pg.0).to_string()
    }

    /// Starts the background tasks; they stop when `shutdown` turns true (between polls).
    /// The handles let a reload abort a poll in flight, so a replaced poller never writes
    /// into the store after its successor started.
    pub fn spawn(self: &Arc<Self>, shutdown: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
        let mut tasks = Vec::with_capacity(self.collectors.len() + 1);
        for idx in 0..self.collectors.len() {
            let me = Arc::clone(self);
            let stop = shutdown.clone();
            tasks.push(tokio::spawn(
                async move { me.collector_loop(idx, stop).await },
            ));
        }
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
                _ = tick.tick() => { let _ = self.acquire(&self.main_db()).await; }
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn collector_loop(self: Arc<Self>, idx: usize, mut shutdown: watch::Receiver<bool>) {
        let def = &self.collectors[idx];
        let every = def.interval.unwrap_or(self.defaults.interval).0;
        let mut tick = tokio::time::interval_at(jittered_start(every), every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.poll_collector(def).await,
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

    /// One run of a collector: on the main database, or on each monitored database.
    pub async fn poll_collector(&self, def: &CollectorDef) {
        match def.scope {
            Scope::Cluster => {
                let db = self.main_db();
                let started = Instant::now();
                let result = self.run(def, &db).await;
                self.record(def, "", result, started.elapsed());
            }
            Scope::Database => {
                let dbs = self.databases().await;
                self.store
                    .retain_databases(&self.target.name, &def.name.0, &dbs);
                let started = Instant::now();
                let (mut failed, mut skipped, mut ran) = (None, None, false);
                for db in &dbs {
                    let r = self.run(def, db).await;
                    // Per-database results are stored separately; the run counts as failed
                    // if any database failed, and as skipped if it ran on none.
                    match r {
                        Ok(Some(snapshot)) => {
                            ran = true;
                            self.store.put(self.key(def, db), snapshot)
                        }
                        Ok(None) => self.store.remove(&self.key(def, db)),
                        Err(e) => {
                            self.store.remove(&self.key(def, db));
                            self.report(def, db, &e);
                            match e.kind.skip_reason() {
                                Some(_) => skipped = Some(e),
                                None => failed = Some(e),
                            }
                        }
                    }
                }
                let outcome = failed.or(if ran { None } else { skipped });
                // Only health is recorded here; the snapshots are already stored.
                self.record_health(def, outcome.as_ref(), started.elapsed());
            }
        }
        self.first_run_done(def);
    }

    fn key(&self, def: &CollectorDef, db: &str) -> (String, String, String) {
        (self.target.name.clone(), def.name.0.clone(), db.to_string())
    }

    /// Runs the collector's query on `db`; `Ok(None)` when it does not apply there.
    async fn run(&self, def: &CollectorDef, db: &str) -> Result<Option<Snapshot>, PgError> {
        let mut slot = self.acquire(db).await?;
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
        let rows = slot
            .query(&variant.sql, timeout, self.defaults.lock_timeout.0)
            .await?;
        drop(slot);
        let ctx = Context {
            def,
            base_labels: &self.base_labels,
            database: db,
            now: Instant::now(),
            statements: self.statements,
        };
        let interval = def.interval.unwrap_or(self.defaults.interval).0;
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        let state = states
            .entry((def.name.0.clone(), db.to_string()))
            .or_default();
        let families = state.families(def, interval, &rows, &ctx)?;
        Ok(Some(Snapshot { families }))
    }

    /// The session for `db`, connected; while its slot backs off after a failed attempt
    /// this fails fast (see [`Slot::acquire`]).
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

    /// A slot for `db`. The main database's session decides `pg_up`.
    fn new_slot(&self, db: &str) -> Slot {
        let mut dsn = self.target.pg.clone();
        dsn.0.dbname(db);
        let slot = Slot::new(dsn, self.defaults.timeout.0).log_as(&self.target.name, None);
        if db != self.main_db() {
            return slot;
        }
        let store = Arc::clone(&self.store);
        let target = self.target.name.clone();
        slot.on_event(move |event| session_events(&store, &target, event))
    }

    /// The databases to visit, refreshed at most every [`DISCOVERY_EVERY`]. On failure the
    /// previous list is kept.
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
                .await?;
            Ok::<_, PgError>(rows.iter().filter_map(|r| r.try_get::<_, String>(0).ok()).collect::<Vec<_>>())
        }
        .await;
        let mut d = self.databases.lock().unwrap_or_else(|e| e.into_inner());
        match listed {
            Ok(all) => {
                d.0 = all
                    .into_iter()
                    .filter(|n| self.target.databases.matches(n))
                    .collect();
                d.1 = Some(Instant::now());
            }
            Err(e) => {
                tracing::debug!(target = %self.target.name, "cannot list databases: {e}");
            }
        }
        d.0.clone()
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

/// A random moment within the first `every`: many targets and collectors then spread
/// their connections and queries over the whole interval instead of firing in lockstep
/// (measured with 100 targets: without it, every poll fell into the same 3 s burst).
fn jittered_start(every: Duration) -> tokio::time::Instant {
    let ms = (every.as_millis() as u64).max(1);
    tokio::time::Instant::now() + Duration::from_millis(fastrand::u64(0..ms))
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
