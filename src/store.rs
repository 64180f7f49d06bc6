//! The snapshot store: the latest result of every (target, collector, database), plus each
//! target's health. Pollers replace whole snapshots; `/metrics` reads them. Nothing here
//! touches PostgreSQL, and no lock is held across an `.await` or while encoding.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::exposition::Encoded;
use crate::postgres::ErrorKind;

pub use crate::metric::Snapshot;

/// `(target, collector, database)`; database is "" for cluster-scope collectors.
pub type Key = (String, String, String);

/// How a collector is doing on a target: the self-metrics.
#[derive(Debug, Clone, Default)]
pub struct CollectorHealth {
    pub last_duration: Option<Duration>,
    pub errors: BTreeMap<ErrorKind, u64>,
    pub last_success: Option<SystemTime>,
    /// Why the collector cannot run here by plan (`pgvigil_collector_skipped{reason}`).
    pub skipped: Option<&'static str>,
    /// Database-scope collectors: when each monitored database was last visited.
    pub visits: Option<Visits>,
}

/// When a database-scope collector last visited each database, to tell whether the
/// connection budget keeps up with its interval.
#[derive(Debug, Clone)]
pub struct Visits {
    /// The collector's interval.
    pub interval: Duration,
    /// Database → end of its last visit (`None`: not visited yet).
    pub databases: BTreeMap<String, Option<SystemTime>>,
    /// When visiting started: the reference for databases not visited yet.
    pub since: SystemTime,
}

impl Visits {
    pub fn new(interval: Duration) -> Visits {
        Visits {
            interval,
            databases: BTreeMap::new(),
            since: SystemTime::now(),
        }
    }

    /// Databases not visited within two intervals (counting from `since` for those never
    /// visited): what the budget could not keep up with.
    pub fn behind(&self, now: SystemTime) -> usize {
        let late = now.checked_sub(self.interval * 2).unwrap_or(UNIX_EPOCH);
        self.databases
            .values()
            .filter(|v| v.unwrap_or(self.since) < late)
            .count()
    }

    /// The least recent visit, once every database has had one.
    pub fn oldest(&self) -> Option<SystemTime> {
        self.databases
            .values()
            .try_fold(None::<SystemTime>, |min, v| {
                v.map(|t| Some(min.map_or(t, |m| m.min(t))))
            })
            .flatten()
    }
}

/// A target's labels and health.
#[derive(Debug, Clone, Default)]
pub struct TargetHealth {
    pub labels: Vec<(Arc<str>, String)>,
    /// `pg_up`: the last connection attempt (or use) on the target's own database worked.
    pub up: bool,
    /// Every collector has finished a first run, or the target was found unreachable.
    pub ready: bool,
    pub collectors: BTreeMap<String, CollectorHealth>,
    /// Slow-query spans, when tracing is on: exported, and dropped by reason.
    pub spans: Option<SpanCounts>,
    /// Plans of slow spans, when `tracing.explain` is on.
    pub explain: Option<ExplainCounts>,
}

/// EXPLAIN counters of a target (`tracing.explain`).
#[derive(Debug, Clone, Default)]
pub struct ExplainCounts {
    /// EXPLAINs run (whatever their outcome).
    pub run: u64,
    /// Spans left without a plan, by reason.
    pub skipped: BTreeMap<&'static str, u64>,
}

/// Span counters of a target.
#[derive(Debug, Clone, Default)]
pub struct SpanCounts {
    pub exported: u64,
    pub dropped: BTreeMap<&'static str, u64>,
    /// Slow executions whose text was cut at `track_activity_query_size`, with no trace
    /// context left in it.
    pub context_truncated: u64,
}

/// The outcome of the last configuration load (at start or on `SIGHUP`).
#[derive(Debug, Clone, Copy, Default)]
pub struct ReloadHealth {
    /// The last attempt was applied (false: rejected, the previous config still runs).
    pub successful: bool,
    /// When a configuration was last applied.
    pub last_success: Option<SystemTime>,
}

/// Shared between pollers (writers) and the HTTP server (reader). One store lives as long
/// as the process: a reload changes which pollers write into it, never the store itself,
/// so what an unchanged target has produced (and its counters) outlives a reload.
#[derive(Debug, Default)]
pub struct Store {
    /// Replaced whole per key, so a reader sees one poll's result or the next, never a mix.
    snapshots: RwLock<BTreeMap<Key, Stored>>,
    /// Per target; a `Mutex` because updates are tiny and never cross an `.await`.
    targets: Mutex<BTreeMap<String, TargetHealth>>,
    /// Bumped on every change, so the HTTP layer can reuse an encoded body.
    generation: AtomicU64,
    /// `None` until a configuration was loaded (e.g. never in `pgvigil once`).
    reload: Mutex<Option<ReloadHealth>>,
    /// This instance's shard (`I/N`) and how many targets it owns; `None` until a
    /// configuration was applied.
    shard: Mutex<Option<(String, usize)>>,
}

/// A snapshot and its exposition, encoded once when it was put, so scrapes only stitch.
#[derive(Debug, Clone)]
struct Stored {
    snapshot: Arc<Snapshot>,
    encoded: Arc<Encoded>,
}

impl Store {
    pub fn new() -> Arc<Store> {
        Arc::new(Store::default())
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Registers a target before its first poll (so `/readyz` waits for it). A target
    /// registered again (its poller replaced on a reload) only gets the new labels: it
    /// keeps its readiness, `pg_up` and counters, as its old snapshots keep being served
    /// until the new poller overwrites them.
    pub fn add_target(&self, name: &str, labels: Vec<(Arc<str>, String)>) {
        let mut t = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        t.entry(name.to_string()).or_default().labels = labels;
        drop(t);
        self.bump();
    }

    /// Forgets a target: its snapshots and its health (a target removed on reload).
    pub fn remove_target(&self, name: &str) {
        let mut s = self.snapshots.write().unwrap_or_else(|e| e.into_inner());
        s.retain(|(t, _, _), _| t != name);
        drop(s);
        let mut t = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        t.remove(name);
        drop(t);
        self.bump();
    }

    /// Forgets the snapshots and health of a target's collectors not in `keep` (collectors
    /// a reload took away from it; the others are overwritten by their next poll).
    pub fn retain_collectors(&self, target: &str, keep: &[&str]) {
        let mut s = self.snapshots.write().unwrap_or_else(|e| e.into_inner());
        s.retain(|(t, c, _), _| t != target || keep.contains(&c.as_str()));
        drop(s);
        self.update_target(target, |h| {
            h.collectors.retain(|c, _| keep.contains(&c.as_str()))
        });
    }

    /// Records a configuration load: `ok` false when a reload was rejected.
    pub fn record_reload(&self, ok: bool, at: SystemTime) {
        let mut r = self.reload.lock().unwrap_or_else(|e| e.into_inner());
        let last = r.and_then(|r| r.last_success);
        *r = Some(ReloadHealth {
            successful: ok,
            last_success: if ok { Some(at) } else { last },
        });
        drop(r);
        self.bump();
    }

    pub fn reload_health(&self) -> Option<ReloadHealth> {
        *self.reload.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the shard of the applied configuration and how many targets it owns.
    pub fn record_shard(&self, shard: String, targets: usize) {
        *self.shard.lock().unwrap_or_else(|e| e.into_inner()) = Some((shard, targets));
        self.bump();
    }

    pub fn shard(&self) -> Option<(String, usize)> {
        self.shard.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stores a collector's new snapshot, encoding it here, in the poller, so that no scrape
    /// pays for it (and before the lock is taken): both formats, and compressed the runs of
    /// it that gzip scrapes of the previous snapshot used ([`Encoded::new_like`]).
    /// A snapshot equal to the stored one changes nothing: it is not encoded again, and
    /// the store's generation stays, so scrapes keep serving the body they have.
    pub fn put(&self, key: Key, snapshot: Snapshot) {
        let previous = {
            let s = self.snapshots.read().unwrap_or_else(|e| e.into_inner());
            s.get(&key).cloned()
        };
        if previous.as_ref().is_some_and(|p| *p.snapshot == snapshot) {
            return;
        }
        let snapshot = Arc::new(snapshot);
        let previous = previous.map(|p| p.encoded);
        let encoded = Arc::new(Encoded::new_like(&snapshot, previous.as_deref()));
        let mut s = self.snapshots.write().unwrap_or_else(|e| e.into_inner());
        s.insert(key, Stored { snapshot, encoded });
        drop(s);
        self.bump();
    }

    /// Drops every snapshot of a target's collector whose database is not in `keep`
    /// (a database that was dropped or filtered out).
    ///
    /// Called after every round of visits, by every target: it looks at that collector's
    /// keys only (a range of the ordered map, not all targets' snapshots), and changes
    /// nothing, not even the generation, when every database is kept.
    pub fn retain_databases(&self, target: &str, collector: &str, keep: &[String]) {
        let of_collector = |s: &BTreeMap<Key, Stored>| -> Vec<Key> {
            let from = (target.to_string(), collector.to_string(), String::new());
            s.range(from..)
                .map(|(k, _)| k)
                .take_while(|(t, c, _)| t == target && c == collector)
                .filter(|(_, _, db)| !keep.contains(db))
                .cloned()
                .collect()
        };
        if of_collector(&self.snapshots.read().unwrap_or_else(|e| e.into_inner())).is_empty() {
            return;
        }
        let mut s = self.snapshots.write().unwrap_or_else(|e| e.into_inner());
        for key in of_collector(&s) {
            s.remove(&key);
        }
        drop(s);
        self.bump();
    }

    pub fn remove(&self, key: &Key) {
        let mut s = self.snapshots.write().unwrap_or_else(|e| e.into_inner());
        s.remove(key);
        drop(s);
        self.bump();
    }

    /// The current snapshots, cheap to take (Arc clones) and read without any lock.
    pub fn snapshots(&self) -> Vec<Arc<Snapshot>> {
        let s = self.snapshots.read().unwrap_or_else(|e| e.into_inner());
        s.values().map(|v| Arc::clone(&v.snapshot)).collect()
    }

    /// The current snapshots' encoded exposition, in the same order as [`Store::snapshots`].
    pub fn encoded(&self) -> Vec<Arc<Encoded>> {
        let s = self.snapshots.read().unwrap_or_else(|e| e.into_inner());
        s.values().map(|v| Arc::clone(&v.encoded)).collect()
    }

    /// The encoded snapshots of one target (for `/probe?target=`).
    pub fn encoded_of(&self, target: &str) -> Vec<Arc<Encoded>> {
        let s = self.snapshots.read().unwrap_or_else(|e| e.into_inner());
        s.iter()
            .filter(|((t, _, _), _)| t == target)
            .map(|(_, v)| Arc::clone(&v.encoded))
            .collect()
    }

    /// Whether `target` is configured (registered), polled yet or not.
    pub fn has_target(&self, target: &str) -> bool {
        let t = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        t.contains_key(target)
    }

    /// Series per (target, collector), all databases together (`pgvigil_collector_series`).
    pub fn series_counts(&self) -> BTreeMap<(String, String), usize> {
        let s = self.snapshots.read().unwrap_or_else(|e| e.into_inner());
        let mut out: BTreeMap<(String, String), usize> = BTreeMap::new();
        for ((target, collector, _), snapshot) in s.iter() {
            let n: usize = snapshot
                .snapshot
                .families
                .iter()
                .map(|f| f.samples.len())
                .sum();
            *out.entry((target.clone(), collector.clone())).or_default() += n;
        }
        out
    }

    pub fn get(&self, key: &Key) -> Option<Arc<Snapshot>> {
        let s = self.snapshots.read().unwrap_or_else(|e| e.into_inner());
        s.get(key).map(|v| Arc::clone(&v.snapshot))
    }

    /// Applies `f` to a target's health record.
    pub fn update_target(&self, target: &str, f: impl FnOnce(&mut TargetHealth)) {
        let mut t = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = t.get_mut(target) {
            f(h);
        }
        drop(t);
        self.bump();
    }

    pub fn targets(&self) -> BTreeMap<String, TargetHealth> {
        self.targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Turns on the span counters of a target, every reason at 0.
    pub fn enable_spans(&self, target: &str, reasons: &[&'static str]) {
        self.update_target(target, |h| {
            let counts = h.spans.get_or_insert_with(SpanCounts::default);
            for r in reasons {
                counts.dropped.entry(r).or_insert(0);
            }
        });
    }

    /// Counts `n` spans exported (`reason` None) or dropped for `reason`.
    pub fn count_spans(&self, target: &str, reason: Option<&'static str>, n: u64) {
        self.update_target(target, |h| {
            let counts = h.spans.get_or_insert_with(SpanCounts::default);
            match reason {
                None => counts.exported += n,
                Some(r) => *counts.dropped.entry(r).or_insert(0) += n,
            }
        });
    }

    /// Turns on the EXPLAIN counters of a target, every skip reason at 0.
    pub fn enable_explain(&self, target: &str, reasons: &[&'static str]) {
        self.update_target(target, |h| {
            let counts = h.explain.get_or_insert_with(ExplainCounts::default);
            for r in reasons {
                counts.skipped.entry(r).or_insert(0);
            }
        });
    }

    /// Counts an EXPLAIN run (`ran`) and, when the span got no plan, the reason.
    pub fn count_explain(&self, target: &str, ran: bool, skipped: Option<&'static str>) {
        self.update_target(target, |h| {
            let counts = h.explain.get_or_insert_with(ExplainCounts::default);
            if ran {
                counts.run += 1;
            }
            if let Some(r) = skipped {
                *counts.skipped.entry(r).or_insert(0) += 1;
            }
        });
    }

    /// Every target is ready (see [`TargetHealth::ready`]). With no target, ready once a
    /// configuration was applied: a fleet shard that owns none, or targets files that name
    /// none yet, have nothing to wait for.
    pub fn ready(&self) -> bool {
        let t = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        let applied = self
            .shard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        (applied || !t.is_empty()) && t.values().all(|h| h.ready)
    }
}

pub fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retain_databases_drops_only_that_collectors_other_databases() {
        let store = Store::new();
        let key = |t: &str, c: &str, db: &str| (t.to_string(), c.to_string(), db.to_string());
        let snap = || Snapshot {
            families: Vec::new(),
        };
        for (t, c, db) in [
            ("a", "tables", "app"),
            ("a", "tables", "gone"),
            ("a", "tables2", "gone"),
            ("a", "settings", ""),
            ("ab", "tables", "gone"),
            ("b", "tables", "gone"),
        ] {
            store.put(key(t, c, db), snap());
        }
        let generation = store.generation();
        store.retain_databases("a", "tables", &["app".into(), "gone".into()]);
        assert_eq!(
            store.generation(),
            generation,
            "nothing dropped, nothing changed"
        );
        store.retain_databases("a", "tables", &["app".into()]);
        assert!(store.generation() > generation);
        let left: Vec<Key> = store.snapshots.read().unwrap().keys().cloned().collect();
        assert_eq!(
            left,
            [
                key("a", "settings", ""),
                key("a", "tables", "app"),
                key("a", "tables2", "gone"),
                key("ab", "tables", "gone"),
                key("b", "tables", "gone"),
            ]
        );
    }

    #[test]
    fn visits_behind_and_oldest() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut v = Visits::new(Duration::from_secs(10));
        v.since = t0;
        v.databases
            .insert("a".into(), Some(t0 + Duration::from_secs(5)));
        v.databases.insert("b".into(), None);
        assert_eq!(v.oldest(), None, "b not visited yet");
        assert_eq!(v.behind(t0 + Duration::from_secs(19)), 0);
        assert_eq!(
            v.behind(t0 + Duration::from_secs(21)),
            1,
            "b: 21 s since start"
        );
        assert_eq!(v.behind(t0 + Duration::from_secs(26)), 2);
        v.databases
            .insert("b".into(), Some(t0 + Duration::from_secs(3)));
        assert_eq!(v.oldest(), Some(t0 + Duration::from_secs(3)));
    }
}
