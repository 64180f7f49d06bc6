//! The snapshot store: the latest result of every (target, collector, database), plus each
//! target's health. Pollers replace whole snapshots; `/metrics` reads them. Nothing here
//! touches PostgreSQL, and no lock is held across an `.await` or while encoding.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::metric::Family;
use crate::postgres::ErrorKind;

/// Everything one collector produced in one poll of one database.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub families: Vec<Family>,
}

/// `(target, collector, database)`; database is "" for cluster-scope collectors.
pub type Key = (String, String, String);

/// How a collector is doing on a target: the self-metrics.
#[derive(Debug, Clone, Default)]
pub struct CollectorHealth {
    pub last_duration: Option<Duration>,
    pub errors: BTreeMap<ErrorKind, u64>,
    pub last_success: Option<SystemTime>,
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

/// Shared between pollers (writers) and the HTTP server (reader).
#[derive(Debug, Default)]
pub struct Store {
    /// Replaced whole per key, so a reader sees one poll's result or the next, never a mix.
    snapshots: RwLock<BTreeMap<Key, Arc<Snapshot>>>,
    /// Per target; a `Mutex` because updates are tiny and never cross an `.await`.
    targets: Mutex<BTreeMap<String, TargetHealth>>,
    /// Bumped on every change, so the HTTP layer can reuse an encoded body.
    generation: AtomicU64,
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

    /// Registers a target before its first poll (so `/readyz` waits for it).
    pub fn add_target(&self, name: &str, labels: Vec<(Arc<str>, String)>) {
        let mut t = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        t.insert(
            name.to_string(),
            TargetHealth {
                labels,
                ..TargetHealth::default()
            },
        );
        drop(t);
        self.bump();
    }

    pub fn put(&self, key: Key, snapshot: Snapshot) {
        let mut s = self.snapshots.write().unwrap_or_else(|e| e.into_inner());
        s.insert(key, Arc::new(snapshot));
        drop(s);
        self.bump();
    }

    /// Drops every snapshot of a target's collector whose database is not in `keep`
    /// (a database that was dropped or filtered out).
    pub fn retain_databases(&self, target: &str, collector: &str, keep: &[String]) {
        let mut s = self.snapshots.write().unwrap_or_else(|e| e.into_inner());
        s.retain(|(t, c, db), _| t != target || c != collector || keep.contains(db));
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
        s.values().cloned().collect()
    }

    pub fn get(&self, key: &Key) -> Option<Arc<Snapshot>> {
        let s = self.snapshots.read().unwrap_or_else(|e| e.into_inner());
        s.get(key).cloned()
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

    /// Every target is ready (see [`TargetHealth::ready`]).
    pub fn ready(&self) -> bool {
        let t = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        !t.is_empty() && t.values().all(|h| h.ready)
    }
}

pub fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
