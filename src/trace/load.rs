//! DB load: `pg_activity_active_seconds_total`, session-seconds spent active by wait event
//! and query, integrated from the activity samples (AWS Performance Insights' "DB load":
//! `rate()` of it is the average number of active sessions).
//!
//! # Design
//! The metric is declared in `queries/dbload.yaml` like every other one: a collector
//! `activity` with `run_by: activity_sampler`, whose query is the sampler's own
//! `pg_stat_activity` read. The poller does not run it. The sampler does, every
//! `activity.sample_interval`, and hands the rows to [`Load::sample`], which plays the part
//! a Rust step plays for a polled collector:
//! - every client backend in state `active` and every parallel worker counts once, the
//!   worker under its leader's query id (`leader_pid`);
//! - its key is (datname, user, wait_event_type, wait_event, queryid), with `CPU`/`CPU`
//!   when it waits on nothing, and the query id kept only for the statements collector's
//!   top N ([`top_queryids`], read from that collector's snapshot in the store, so the two
//!   collectors share nothing but the store), else `other`, or empty when the server gives
//!   no id;
//! - each key's running total grows by the real time since the previous sample (measured
//!   on a monotonic clock, not the nominal interval) times its session count. After a
//!   failed or late sample the gap counts at most [`GAP_CAP`] × the interval: the sessions
//!   seen now were probably not all active during a long gap, and a gap is usually a
//!   database that did not answer, so at most one missed sample is assumed away. Time is
//!   neither invented for a long outage nor lost for one slow sample;
//! - a total that has not grown for [`STALE_AFTER`] is dropped, so cardinality follows
//!   the current workload. A series that comes back later restarts from 0, which
//!   Prometheus reads as a counter reset;
//! - the totals become rows of (datname, user, wait_event_type, wait_event, queryid,
//!   active_seconds), which the pack's metric maps with [`crate::collector::rows`], the
//!   same mapping every collector's rows go through. The result is stored under
//!   (target, `activity`, "").
//!
//! Pure: the caller passes the rows, the time and the top-N set. No I/O here.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::collector::pack::CollectorDef;
use crate::collector::rows;
use crate::metric::Family;
use crate::postgres::value::Columns;
use crate::postgres::PgError;
use crate::store::Snapshot;

/// A gap between two samples counts at most this many intervals.
pub const GAP_CAP: u32 = 2;
/// A series that has not grown for this long is dropped.
pub const STALE_AFTER: Duration = Duration::from_secs(600);

/// One backend's part in the load, from one row of the sample.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Active {
    pub pid: i32,
    /// Set for a parallel worker: its leader's pid.
    pub leader_pid: Option<i32>,
    pub datname: String,
    pub usename: String,
    pub state: String,
    pub wait_event_type: String,
    pub wait_event: String,
    /// `pg_stat_activity.query_id` as text, `None` when NULL.
    pub queryid: Option<String>,
}

/// The labels of a series, in the metric's label order.
type Key = [String; 5];

const COLUMNS: [&str; 6] = [
    "datname",
    "user",
    "wait_event_type",
    "wait_event",
    "queryid",
    "active_seconds",
];

struct Total {
    seconds: f64,
    grew: Instant,
}

/// The running totals of one target.
#[derive(Default)]
pub struct Load {
    totals: HashMap<Key, Total>,
    /// In first-seen order, so the exposition order is stable.
    order: Vec<Key>,
    last: Option<Instant>,
}

fn counts(state: &str) -> bool {
    state == "active" || state == "fastpath function call"
}

impl Load {
    /// Adds one sample taken at `now` (monotonic), `interval` apart nominally; `top`
    /// holds the query ids that keep their own series.
    pub fn sample(&mut self, rows: &[Active], now: Instant, interval: Duration, top: &TopN) {
        let dt = self
            .last
            .map(|t| now.saturating_duration_since(t).min(interval * GAP_CAP))
            .unwrap_or_default()
            .as_secs_f64();
        self.last = Some(now);
        // A parallel worker takes its leader's query id: the worker's own may be unset
        // (13) and the load belongs to the leader's statement anyway.
        let leaders: HashMap<i32, &Active> = rows.iter().map(|r| (r.pid, r)).collect();
        let mut sessions: HashMap<Key, u32> = HashMap::new();
        for r in rows {
            if !counts(&r.state) {
                continue;
            }
            let query_of = r
                .leader_pid
                .and_then(|l| leaders.get(&l))
                .map_or(r, |leader| *leader);
            let queryid = match query_of.queryid.as_deref().or(r.queryid.as_deref()) {
                None | Some("") | Some("0") => String::new(),
                Some(id) if top.contains(id) => id.to_string(),
                Some(_) => "other".to_string(),
            };
            let (wtype, wevent) = if r.wait_event_type.is_empty() {
                ("CPU", "CPU")
            } else {
                (r.wait_event_type.as_str(), r.wait_event.as_str())
            };
            let key = [
                r.datname.clone(),
                r.usename.clone(),
                wtype.to_string(),
                wevent.to_string(),
                queryid,
            ];
            *sessions.entry(key).or_default() += 1;
        }
        for (key, n) in sessions {
            match self.totals.get_mut(&key) {
                Some(t) => {
                    t.seconds += f64::from(n) * dt;
                    t.grew = now;
                }
                None => {
                    self.order.push(key.clone());
                    self.totals.insert(
                        key,
                        Total {
                            seconds: f64::from(n) * dt,
                            grew: now,
                        },
                    );
                }
            }
        }
        self.totals
            .retain(|_, t| now.saturating_duration_since(t.grew) < STALE_AFTER);
        let totals = &self.totals;
        self.order.retain(|k| totals.contains_key(k));
    }

    /// The totals as rows for the pack's metric mapping.
    pub fn rows(&self) -> Vec<LoadRow> {
        self.order
            .iter()
            .filter_map(|k| {
                self.totals.get(k).map(|t| LoadRow {
                    labels: k.clone(),
                    seconds: t.seconds,
                })
            })
            .collect()
    }

    /// The collector's families from the current totals.
    pub fn families(
        &self,
        def: &CollectorDef,
        base_labels: &[(Arc<str>, String)],
    ) -> Result<Vec<Family>, PgError> {
        rows::to_families(def, &self.rows(), base_labels, "")
    }
}

/// One series' labels and total, read by the metric mapping like a query row.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadRow {
    pub labels: Key,
    pub seconds: f64,
}

impl Columns for LoadRow {
    fn index_of(&self, column: &str) -> Option<usize> {
        COLUMNS.iter().position(|c| *c == column)
    }
    fn columns(&self) -> Vec<String> {
        COLUMNS.iter().map(|c| c.to_string()).collect()
    }
    fn number(&self, idx: usize) -> Result<Option<f64>, String> {
        match idx {
            5 => Ok(Some(self.seconds)),
            _ => Err(format!("column {} is not a number", COLUMNS[idx])),
        }
    }
    fn label(&self, idx: usize) -> Result<String, String> {
        match self.labels.get(idx) {
            Some(l) => Ok(l.clone()),
            None => Ok(self.seconds.to_string()),
        }
    }
}

/// The query ids with their own series in the statements collector, per target.
#[derive(Debug, Default)]
pub struct TopN {
    ids: HashSet<String>,
    /// The snapshot they were read from, to read again only when it changes.
    from: Option<Arc<Snapshot>>,
}

impl TopN {
    pub fn contains(&self, queryid: &str) -> bool {
        self.ids.contains(queryid)
    }

    /// Follows the statements collector's latest snapshot (`None`: it has none, e.g.
    /// pg_stat_statements is missing, and every query id is `other`).
    pub fn update(&mut self, snapshot: Option<Arc<Snapshot>>) {
        let same = match (&self.from, &snapshot) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        self.ids = snapshot.as_deref().map(top_queryids).unwrap_or_default();
        self.from = snapshot;
    }
}

/// Every `queryid` label in a statements snapshot except `other`: the top N members.
pub fn top_queryids(snapshot: &Snapshot) -> HashSet<String> {
    snapshot
        .families
        .iter()
        .flat_map(|f| &f.samples)
        .flat_map(|s| &s.labels)
        .filter(|(k, v)| &**k == "queryid" && !v.is_empty() && v != "other")
        .map(|(_, v)| v.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metric::{MetricType, Sample};

    fn active(pid: i32, wait: (&str, &str), queryid: Option<&str>) -> Active {
        Active {
            pid,
            datname: "shop".into(),
            usename: "app".into(),
            state: "active".into(),
            wait_event_type: wait.0.into(),
            wait_event: wait.1.into(),
            queryid: queryid.map(Into::into),
            ..Default::default()
        }
    }

    fn top(ids: &[&str]) -> TopN {
        TopN {
            ids: ids.iter().map(|s| s.to_string()).collect(),
            from: None,
        }
    }

    fn total(l: &Load, wait_event: &str, queryid: &str) -> Option<f64> {
        l.rows()
            .into_iter()
            .find(|r| r.labels[3] == wait_event && r.labels[4] == queryid)
            .map(|r| r.seconds)
    }

    #[test]
    fn adds_measured_time_per_session_with_cpu_for_no_wait() {
        let mut l = Load::default();
        let t0 = Instant::now();
        let i = Duration::from_millis(500);
        let rows = vec![
            active(1, ("Timeout", "PgSleep"), Some("11")),
            active(2, ("Timeout", "PgSleep"), Some("11")),
            active(3, ("", ""), Some("22")),
            Active {
                state: "idle".into(),
                ..active(4, ("Client", "ClientRead"), Some("11"))
            },
        ];
        l.sample(&rows, t0, i, &top(&["11"]));
        assert_eq!(
            total(&l, "PgSleep", "11"),
            Some(0.0),
            "first sample: no time yet"
        );
        l.sample(&rows, t0 + Duration::from_millis(600), i, &top(&["11"]));
        assert!((total(&l, "PgSleep", "11").unwrap() - 1.2).abs() < 1e-9);
        assert!((total(&l, "CPU", "other").unwrap() - 0.6).abs() < 1e-9);
        assert_eq!(total(&l, "ClientRead", "11"), None, "idle is not load");
        // A long gap counts 2 intervals at most.
        l.sample(&rows, t0 + Duration::from_secs(60), i, &top(&["11"]));
        assert!((total(&l, "PgSleep", "11").unwrap() - 3.2).abs() < 1e-9);
    }

    #[test]
    fn parallel_workers_count_under_the_leaders_query() {
        let mut l = Load::default();
        let t0 = Instant::now();
        let i = Duration::from_secs(1);
        let worker = |pid| Active {
            leader_pid: Some(1),
            ..active(pid, ("", ""), None)
        };
        let rows = vec![
            active(1, ("IPC", "ExecuteGather"), Some("7")),
            worker(2),
            worker(3),
        ];
        l.sample(&rows, t0, i, &top(&["7"]));
        l.sample(&rows, t0 + i, i, &top(&["7"]));
        assert_eq!(total(&l, "CPU", "7"), Some(2.0));
        assert_eq!(total(&l, "ExecuteGather", "7"), Some(1.0));
    }

    #[test]
    fn missing_query_ids_are_empty_and_quiet_series_are_dropped() {
        let mut l = Load::default();
        let t0 = Instant::now();
        let i = Duration::from_secs(1);
        l.sample(&[active(1, ("", ""), None)], t0, i, &top(&[]));
        l.sample(&[active(1, ("", ""), None)], t0 + i, i, &top(&[]));
        assert_eq!(total(&l, "CPU", ""), Some(1.0));
        l.sample(&[], t0 + i * 2, i, &top(&[]));
        assert_eq!(total(&l, "CPU", ""), Some(1.0), "kept while recent");
        l.sample(&[], t0 + i + STALE_AFTER, i, &top(&[]));
        assert_eq!(total(&l, "CPU", ""), None, "dropped after 10 minutes");
    }

    #[test]
    fn top_queryids_come_from_the_statements_snapshot() {
        let sample = |q: &str| Sample {
            labels: vec![(Arc::from("queryid"), q.to_string())],
            value: 1.0,
        };
        let snap = Arc::new(Snapshot {
            families: vec![Family {
                name: Arc::from("pg_stat_statements_calls_total"),
                help: Arc::from("h"),
                kind: MetricType::Counter,
                samples: vec![sample("11"), sample("other"), sample("22")],
            }],
        });
        let mut t = TopN::default();
        t.update(Some(Arc::clone(&snap)));
        assert!(t.contains("11") && t.contains("22") && !t.contains("other"));
        t.update(None);
        assert!(!t.contains("11"));
    }

    #[test]
    fn the_pack_maps_the_totals() {
        let def = crate::collector::pack::tests_support::builtin("activity");
        let mut l = Load::default();
        let t0 = Instant::now();
        let i = Duration::from_secs(1);
        let rows = vec![active(1, ("Lock", "transactionid"), Some("5"))];
        l.sample(&rows, t0, i, &top(&[]));
        l.sample(&rows, t0 + i, i, &top(&[]));
        let base = vec![(Arc::<str>::from("target"), "t".to_string())];
        let f = l.families(&def, &base).unwrap();
        assert_eq!(&*f[0].name, "pg_activity_active_seconds_total");
        let labels: Vec<String> = f[0].samples[0]
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        assert_eq!(
            labels,
            [
                "target=t",
                "datname=shop",
                "user=app",
                "wait_event_type=Lock",
                "wait_event=transactionid",
                "queryid=other"
            ]
        );
        assert_eq!(f[0].samples[0].value, 1.0);
    }
}
