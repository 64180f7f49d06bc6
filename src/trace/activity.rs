//! Following executions through `pg_stat_activity` samples. Pure: given the rows of one
//! sample and the sample time, returns the executions that ended. No I/O, no clocks.
//!
//! An execution is identified by (pid, `query_start`). It ends when the same pid shows
//! a new `query_start`, goes idle, or disappears:
//! - seen idle (or idle in transaction) with the same `query_start`: the end is its
//!   `state_change`, exact;
//! - otherwise the end is an upper bound, at most one `sample_interval` late: the next
//!   execution's `query_start` on the same backend, or, when the backend disconnected,
//!   the first sample that no longer saw it. (The last sample that saw it active would be
//!   a lower bound instead; a span that is slightly too long is less misleading than one
//!   shorter than the query really ran, and it keeps `duration >= threshold` honest.)
//!
//! An execution that started and finished between two samples is never seen running. It
//! is still found when its backend is next seen idle: a `query_start` not accounted for
//! before, with a `state_change` after the previous sample; its end is that
//! `state_change`, exact. What no sample can show is an execution followed at once by
//! another one on the same backend, both between two samples: hence a sample interval no
//! longer than the slow-query threshold (README, "Slow queries as spans").

use std::collections::{HashMap, HashSet};

/// One row of the activity sample. Times are Unix seconds from the server's clock.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observation {
    pub pid: i32,
    pub datname: String,
    pub usename: String,
    pub application_name: String,
    pub client_addr: String,
    pub query_start: Option<f64>,
    pub state: String,
    pub state_change: Option<f64>,
    pub wait_event_type: String,
    pub wait_event: String,
    pub blocking_pids: Vec<i32>,
    pub query: String,
    /// `query` was cut at `track_activity_query_size` (see [`is_cut`]).
    pub query_cut: bool,
    /// `pg_stat_activity.query_id` (14+, with `compute_query_id`): the backend's most
    /// recent query.
    pub queryid: Option<String>,
}

/// `track_activity_query_size` as `current_setting()` shows it (`1kB`, `100B`, `4MB`) →
/// bytes; 0 when unreadable (nothing is then taken as cut). Parsed here because reading
/// the raw number from `pg_settings` costs the sample ten times more.
pub fn query_size_bytes(setting: &str) -> i32 {
    let s = setting.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: i64 = s[..digits].parse().unwrap_or(0);
    let unit = match s[digits..].trim() {
        "" | "B" => 1,
        "kB" => 1024,
        "MB" => 1024 * 1024,
        _ => 0,
    };
    i32::try_from(n * unit).unwrap_or(0)
}

/// Whether `pg_stat_activity.query` was cut at `track_activity_query_size`: the server
/// keeps at most `size - 1` bytes, cut on a character boundary, so a text within 3 bytes
/// of that is taken as cut (a query of exactly that length is rare enough).
pub fn is_cut(query: &str, size: i32) -> bool {
    size > 0 && query.len() + 4 > size as usize
}

/// A wait seen while the execution ran.
#[derive(Debug, Clone, PartialEq)]
pub struct Wait {
    pub wait_event_type: String,
    pub wait_event: String,
    pub blocking_pids: Vec<i32>,
    /// Sample time it was first seen.
    pub first_seen: f64,
}

/// An execution being followed, or one that ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Execution {
    pub pid: i32,
    pub datname: String,
    pub usename: String,
    pub application_name: String,
    pub client_addr: String,
    pub query: String,
    /// `query` was cut at `track_activity_query_size`.
    pub query_cut: bool,
    /// `pg_stat_activity.query_id`, when the server computes one.
    pub queryid: Option<String>,
    pub query_start: f64,
    /// Last sample time it was seen active.
    pub last_active: f64,
    pub waits: Vec<Wait>,
}

/// An execution that ended (or was flushed at shutdown).
#[derive(Debug, Clone, PartialEq)]
pub struct Ended {
    pub execution: Execution,
    pub end: f64,
    /// The end is the server's `state_change`, not a sample-time bound.
    pub exact: bool,
    /// Still running when pgvigil stopped.
    pub still_running: bool,
}

impl Ended {
    pub fn duration(&self) -> f64 {
        (self.end - self.execution.query_start).max(0.0)
    }
}

/// Executions currently followed, by pid.
#[derive(Debug, Default)]
pub struct Tracker {
    running: HashMap<i32, Execution>,
    /// Per backend, the `query_start` of the last execution already accounted for
    /// (followed while running, or found finished), so a backend that stays idle is not
    /// reported again at every sample.
    known: HashMap<i32, f64>,
    /// Server time of the previous sample; `None` before the first.
    prev_now: Option<f64>,
}

fn is_active(state: &str) -> bool {
    state == "active" || state == "fastpath function call"
}

/// `idle`, `idle in transaction`, `idle in transaction (aborted)`: the last statement
/// ended at `state_change`.
fn is_idle(state: &str) -> bool {
    state.starts_with("idle")
}

impl Tracker {
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Takes one sample (`rows` at server time `now`) and returns executions that ended.
    pub fn observe(&mut self, rows: &[Observation], now: f64) -> Vec<Ended> {
        let mut ended = Vec::new();
        let mut seen = HashSet::with_capacity(rows.len());
        for row in rows {
            seen.insert(row.pid);
            if let Some(tracked) = self.running.get_mut(&row.pid) {
                if Some(tracked.query_start) == row.query_start {
                    if tracked.queryid.is_none() {
                        tracked.queryid = row.queryid.clone();
                    }
                    if is_active(&row.state) {
                        tracked.last_active = now;
                        record_wait(tracked, row, now);
                        continue;
                    }
                    // Same execution, now idle: it ended exactly at state_change.
                    let execution = self.running.remove(&row.pid).expect("present");
                    let end = row.state_change.unwrap_or(now).max(execution.query_start);
                    ended.push(Ended {
                        execution,
                        end,
                        exact: row.state_change.is_some(),
                        still_running: false,
                    });
                    continue;
                }
                // A different execution on the same backend: the old one ended before
                // the new one started.
                let execution = self.running.remove(&row.pid).expect("present");
                let end = row
                    .query_start
                    .unwrap_or(now)
                    .min(now)
                    .max(execution.last_active);
                ended.push(Ended {
                    execution,
                    end,
                    exact: false,
                    still_running: false,
                });
            }
            let Some(start) = row.query_start else {
                continue;
            };
            if is_active(&row.state) {
                let mut e = execution_of(row, start, now);
                record_wait(&mut e, row, now);
                self.running.insert(row.pid, e);
                self.known.insert(row.pid, start);
            } else if is_idle(&row.state) {
                if let Some(e) = self.finished_unseen(row, start) {
                    ended.push(e);
                }
                self.known.insert(row.pid, start);
            }
        }
        let gone: Vec<i32> = self
            .running
            .keys()
            .filter(|pid| !seen.contains(pid))
            .copied()
            .collect();
        for pid in gone {
            if let Some(execution) = self.running.remove(&pid) {
                // Disconnected: it ended between its last sighting and now.
                let end = now;
                ended.push(Ended {
                    execution,
                    end,
                    exact: false,
                    still_running: false,
                });
            }
        }
        self.known.retain(|pid, _| seen.contains(pid));
        self.prev_now = Some(now);
        ended
    }

    /// An execution that started and finished between the previous sample and this one,
    /// found on an idle backend: a `query_start` not accounted for yet, and a
    /// `state_change` after the previous sample. Its end is exact. Nothing is found at
    /// the first sample, whose idle backends may have finished long ago.
    fn finished_unseen(&self, row: &Observation, start: f64) -> Option<Ended> {
        let prev = self.prev_now?;
        let end = row.state_change?;
        if self.known.get(&row.pid) == Some(&start) || end < prev || end < start {
            return None;
        }
        let mut execution = execution_of(row, start, end);
        execution.last_active = end;
        Some(Ended {
            execution,
            end,
            exact: true,
            still_running: false,
        })
    }

    /// Everything still running, ended at its last sighting (for shutdown: it has run at
    /// least that long).
    pub fn flush(&mut self) -> Vec<Ended> {
        self.running
            .drain()
            .map(|(_, execution)| Ended {
                end: execution.last_active,
                execution,
                exact: false,
                still_running: true,
            })
            .collect()
    }
}

fn execution_of(row: &Observation, start: f64, now: f64) -> Execution {
    Execution {
        pid: row.pid,
        datname: row.datname.clone(),
        usename: row.usename.clone(),
        application_name: row.application_name.clone(),
        client_addr: row.client_addr.clone(),
        query: row.query.clone(),
        query_cut: row.query_cut,
        queryid: row.queryid.clone(),
        query_start: start,
        last_active: now,
        waits: Vec::new(),
    }
}

/// Adds a wait event when it differs from the last one recorded; merges blocking pids
/// into the current one otherwise.
fn record_wait(e: &mut Execution, row: &Observation, now: f64) {
    if row.wait_event_type.is_empty() {
        return;
    }
    if let Some(last) = e.waits.last_mut() {
        if last.wait_event_type == row.wait_event_type && last.wait_event == row.wait_event {
            for p in &row.blocking_pids {
                if !last.blocking_pids.contains(p) {
                    last.blocking_pids.push(*p);
                }
            }
            return;
        }
    }
    e.waits.push(Wait {
        wait_event_type: row.wait_event_type.clone(),
        wait_event: row.wait_event.clone(),
        blocking_pids: row.blocking_pids.clone(),
        first_seen: now,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pid: i32, start: f64, state: &str, change: f64) -> Observation {
        Observation {
            pid,
            query_start: Some(start),
            state: state.into(),
            state_change: Some(change),
            query: "SELECT pg_sleep(2)".into(),
            ..Default::default()
        }
    }

    #[test]
    fn idle_after_active_ends_exactly_at_state_change() {
        let mut t = Tracker::default();
        assert!(t
            .observe(&[row(1, 100.0, "active", 100.0)], 100.5)
            .is_empty());
        assert!(t
            .observe(&[row(1, 100.0, "active", 100.0)], 101.5)
            .is_empty());
        let e = t.observe(&[row(1, 100.0, "idle", 102.2)], 102.5);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].end, 102.2);
        assert!(e[0].exact);
        assert!((e[0].duration() - 2.2).abs() < 1e-9);
        assert_eq!(t.running(), 0);
    }

    #[test]
    fn new_query_or_disconnect_ends_at_an_upper_bound() {
        let mut t = Tracker::default();
        t.observe(
            &[
                row(1, 100.0, "active", 100.0),
                row(2, 100.0, "active", 100.0),
            ],
            101.0,
        );
        let e = t.observe(&[row(1, 101.5, "active", 101.5)], 102.0);
        assert_eq!(e.len(), 2, "pid 1 restarted, pid 2 vanished");
        assert!(e.iter().all(|e| !e.exact));
        let by_pid = |p: i32| e.iter().find(|x| x.execution.pid == p).unwrap().end;
        assert_eq!(by_pid(1), 101.5, "ended before the next query started");
        assert_eq!(by_pid(2), 102.0, "ended before the sample that missed it");
        assert_eq!(t.running(), 1);
        let flushed = t.flush();
        assert!(flushed[0].still_running);
    }

    #[test]
    fn waits_are_recorded_once_per_distinct_wait() {
        let mut t = Tracker::default();
        let mut r = row(1, 100.0, "active", 100.0);
        r.wait_event_type = "Lock".into();
        r.wait_event = "transactionid".into();
        r.blocking_pids = vec![7];
        t.observe(&[r.clone()], 100.5);
        r.blocking_pids = vec![7, 8];
        t.observe(&[r.clone()], 101.5);
        r.wait_event_type = String::new();
        t.observe(&[r.clone()], 102.5);
        let e = t.observe(&[row(1, 100.0, "idle", 103.0)], 103.5);
        let w = &e[0].execution.waits;
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].blocking_pids, vec![7, 8]);
        assert_eq!(w[0].first_seen, 100.5);
    }

    #[test]
    fn a_text_at_the_size_limit_is_cut() {
        assert!(is_cut(&"x".repeat(1023), 1024));
        assert!(
            is_cut(&"x".repeat(1021), 1024),
            "a multi-byte character cut off"
        );
        assert!(!is_cut(&"x".repeat(1000), 1024));
        assert!(!is_cut("SELECT 1", 0));
        assert_eq!(query_size_bytes("1kB"), 1024);
        assert_eq!(query_size_bytes("100B"), 100);
        assert_eq!(query_size_bytes("1MB"), 1 << 20);
        assert_eq!(query_size_bytes("lots"), 0);
    }

    #[test]
    fn idle_sessions_are_not_executions() {
        let mut t = Tracker::default();
        assert!(t.observe(&[row(1, 100.0, "idle", 100.1)], 101.0).is_empty());
        assert!(t.observe(&[row(1, 100.0, "idle", 100.1)], 102.0).is_empty());
        assert_eq!(t.running(), 0);
    }

    #[test]
    fn an_execution_that_finished_between_samples_is_found_idle_exactly_once() {
        let mut t = Tracker::default();
        assert!(t.observe(&[row(1, 90.0, "idle", 95.0)], 100.0).is_empty());
        // Ran 100.2 .. 100.9 unseen; found idle at 101.
        let e = t.observe(&[row(1, 100.2, "idle", 100.9)], 101.0);
        assert_eq!(e.len(), 1);
        assert!(e[0].exact);
        assert!((e[0].duration() - 0.7).abs() < 1e-9);
        assert!(t.observe(&[row(1, 100.2, "idle", 100.9)], 102.0).is_empty());
        // A backend that connected since the last sample, ran a query and went idle.
        let e = t.observe(
            &[
                row(1, 100.2, "idle", 100.9),
                row(2, 102.1, "idle in transaction", 102.8),
            ],
            103.0,
        );
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].execution.pid, 2);
    }

    #[test]
    fn followed_then_next_query_finished_unseen_gives_both() {
        let mut t = Tracker::default();
        t.observe(&[row(1, 100.0, "active", 100.0)], 100.5);
        // q1 ended at 100.8, q2 ran 100.8 .. 101.6 unseen, backend idle at 102.
        let e = t.observe(&[row(1, 100.8, "idle", 101.6)], 102.0);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].end, 100.8);
        assert!(!e[0].exact);
        assert_eq!(e[1].execution.query_start, 100.8);
        assert_eq!(e[1].end, 101.6);
        assert!(e[1].exact);
    }
}
