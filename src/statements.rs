//! pg_stat_statements post-processing: what SQL cannot express.
//!
//! - **Window statistics**: between two polls of the same entry, the calls, mean and
//!   population stddev of just the executions in between ([`crate::window`]). No window is
//!   emitted for an entry when it cannot be trusted: calls went down (reset or eviction and
//!   re-entry), its `stats_since` moved (17+), or, on 14–16 where entries carry no
//!   `stats_since`, `pg_stat_statements_info.dealloc`/`stats_reset` changed (some entries
//!   were evicted or reset and we cannot tell which, so that poll has no windows at all).
//! - **Bounded cardinality**: only the top N entries (config `statements.top_n`) keep
//!   per-query series. The rest are summed into `queryid="other"` per (datname, user) for
//!   the counters, so `sum()` over all series equals the true total at every poll; the
//!   per-query gauges (mean, stddev, min, max) of the rest are dropped, since they cannot
//!   be summed.
//! - **Stable membership**: entries are ranked by a smoothed score, each poll's window
//!   execution time averaged with the previous score (EWMA, α = 0.5; the cumulative time
//!   on first sight). Membership has hysteresis: a member stays while it ranks within the
//!   top 2N, and an outsider replaces the weakest member only when its score is more than
//!   twice as high. A steady workload therefore keeps the same N queries poll after poll,
//!   and `other` changes membership (which Prometheus sees as a counter reset of `other`)
//!   only when the workload really shifts.
//! - **Query text**: `pg_stat_statements_query_info` for members only, literals masked
//!   and truncated by [`crate::sql::mask_literals`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio_postgres::Row;

use crate::collector::pack::MetricType;
use crate::collector::processor::{Context, Processor};
use crate::collector::rows::Columns;
use crate::postgres::{ErrorKind, PgError};
use crate::store::{Family, Sample};
use crate::window::{self, Cumulative, Window};

/// Metric names this processor adds to the collector's YAML ones.
pub const EXTRA_METRICS: &[&str] = &[
    "pg_stat_statements_window_calls",
    "pg_stat_statements_window_exec_seconds_mean",
    "pg_stat_statements_window_exec_seconds_stddev",
    "pg_stat_statements_query_info",
    "pg_stat_statements_dealloc_total",
    "pg_stat_statements_stats_reset_timestamp_seconds",
];

/// The label columns that identify an entry.
const KEY_LABELS: [&str; 4] = ["datname", "user", "queryid", "toplevel"];

/// (datname, user, queryid, toplevel)
type Key = [String; 4];

/// `pg_stat_statements_info` (dealloc, stats_reset); absent before 14.
type Info = (Option<f64>, Option<f64>);

/// One row of the statements query.
#[derive(Debug, Clone)]
struct Entry {
    key: Key,
    cum: Cumulative,
    stats_since: Option<f64>,
    query: String,
}

/// State kept between polls of one target.
#[derive(Default)]
pub struct StatementsProcessor {
    prev: HashMap<Key, (Cumulative, Option<f64>)>,
    /// `pg_stat_statements_info` (dealloc, stats_reset) at the previous poll.
    prev_info: Option<Info>,
    scores: HashMap<Key, f64>,
    members: HashSet<Key>,
}

impl Processor for StatementsProcessor {
    fn process(
        &mut self,
        rows: &[Row],
        families: Vec<Family>,
        ctx: &Context,
    ) -> Result<Vec<Family>, PgError> {
        self.process_rows(
            rows,
            families,
            ctx.base_labels,
            ctx.statements.top_n,
            ctx.statements.query_max_len,
        )
    }
}

fn column<R: Columns>(row: &R, name: &str) -> Result<usize, PgError> {
    row.index_of(name).ok_or_else(|| {
        PgError::new(
            ErrorKind::Decode,
            format!("statements processor: the query must return a column {name:?}"),
        )
    })
}

fn parse_rows<R: Columns>(rows: &[R]) -> Result<(Vec<Entry>, Option<Info>), PgError> {
    let Some(first) = rows.first() else {
        return Ok((Vec::new(), None));
    };
    let idx = |n: &str| column(first, n);
    let keys = [
        idx("datname")?,
        idx("user")?,
        idx("queryid")?,
        idx("toplevel")?,
    ];
    let (calls, total, mean, stddev) = (
        idx("calls")?,
        idx("exec_seconds_total")?,
        idx("exec_seconds_mean")?,
        idx("exec_seconds_stddev")?,
    );
    let (since, query) = (idx("stats_since")?, idx("query")?);
    let (dealloc, reset) = (idx("dealloc")?, idx("info_reset")?);
    let decode = |e: String| PgError::new(ErrorKind::Decode, format!("statements processor: {e}"));
    let num = |r: &R, i: usize| r.number(i).map_err(decode);
    let info = Some((num(first, dealloc)?, num(first, reset)?));
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let key = [
            r.label(keys[0]).map_err(decode)?,
            r.label(keys[1]).map_err(decode)?,
            r.label(keys[2]).map_err(decode)?,
            r.label(keys[3]).map_err(decode)?,
        ];
        let cum = Cumulative {
            calls: num(r, calls)?.unwrap_or(0.0).max(0.0) as u64,
            total: num(r, total)?.unwrap_or(0.0),
            mean: num(r, mean)?.unwrap_or(0.0),
            stddev: num(r, stddev)?.unwrap_or(0.0),
        };
        out.push(Entry {
            key,
            cum,
            stats_since: num(r, since)?,
            query: r.label(query).map_err(decode)?,
        });
    }
    Ok((out, info))
}

/// The entry key of a sample, read from its labels.
fn key_of(labels: &[(Arc<str>, String)]) -> Key {
    let get = |n: &str| {
        labels
            .iter()
            .find(|(k, _)| k.as_ref() == n)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    KEY_LABELS.map(get)
}

/// Picks the members for this poll: see the module docs for the hysteresis rules.
fn select(scores: &HashMap<Key, f64>, members: &HashSet<Key>, n: usize) -> HashSet<Key> {
    let mut ranked: Vec<(&Key, f64)> = scores.iter().map(|(k, s)| (k, *s)).collect();
    // Highest score first; ties by key so the choice is deterministic.
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    let mut chosen: Vec<(&Key, f64)> = ranked
        .iter()
        .take(n.saturating_mul(2))
        .filter(|(k, _)| members.contains(*k))
        .copied()
        .collect();
    chosen.truncate(n);
    let mut outsiders = ranked
        .iter()
        .filter(|(k, _)| !chosen.iter().any(|(c, _)| c == k))
        .copied()
        .collect::<Vec<_>>()
        .into_iter();
    // Fill free places with the best outsiders.
    while chosen.len() < n {
        match outsiders.next() {
            Some(o) => chosen.push(o),
            None => break,
        }
    }
    // A clearly stronger outsider replaces the weakest member.
    chosen.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    for o in outsiders {
        match chosen.last() {
            Some(weakest) if o.1 > 2.0 * weakest.1 => {
                chosen.pop();
                let at = chosen.partition_point(|c| c.1 >= o.1);
                chosen.insert(at, o);
            }
            _ => break,
        }
    }
    chosen.into_iter().map(|(k, _)| k.clone()).collect()
}

impl StatementsProcessor {
    fn process_rows<R: Columns>(
        &mut self,
        rows: &[R],
        families: Vec<Family>,
        base: &[(Arc<str>, String)],
        top_n: usize,
        query_max_len: usize,
    ) -> Result<Vec<Family>, PgError> {
        let (entries, info) = parse_rows(rows)?;
        // On 14-16 an eviction or reset shows only in pg_stat_statements_info.
        let info_changed = matches!((&self.prev_info, &info), (Some(a), Some(b)) if a != b);

        let mut windows: HashMap<&Key, Window> = HashMap::new();
        let mut scores = HashMap::with_capacity(entries.len());
        for e in &entries {
            let w = match self.prev.get(&e.key) {
                Some((_, since)) if *since != e.stats_since => None,
                Some(_) if info_changed && e.stats_since.is_none() => None,
                Some((prev, _)) => window::window(prev, &e.cum),
                None => None,
            };
            let raw = w.map(|w| w.total).unwrap_or(e.cum.total);
            let score = match self.scores.get(&e.key) {
                Some(s) => 0.5 * s + 0.5 * raw,
                None => raw,
            };
            scores.insert(e.key.clone(), score);
            if let Some(w) = w {
                windows.insert(&e.key, w);
            }
        }
        let members = select(&scores, &self.members, top_n);

        let mut out = Vec::with_capacity(families.len() + EXTRA_METRICS.len());
        for f in families {
            out.push(bound(f, &members));
        }
        out.extend(window_families(&entries, &windows, &members, base));
        out.push(query_info(&entries, &members, base, query_max_len));
        if let Some((dealloc, reset)) = info {
            out.extend(info_families(dealloc, reset, base));
        }

        self.prev = entries
            .iter()
            .map(|e| (e.key.clone(), (e.cum, e.stats_since)))
            .collect();
        self.prev_info = info;
        self.scores = scores;
        self.members = members;
        Ok(out)
    }
}

/// Keeps members' samples; sums non-members' counters into `queryid="other"`.
fn bound(mut f: Family, members: &HashSet<Key>) -> Family {
    let mut kept = Vec::with_capacity(members.len() + 8);
    let mut other: Vec<Sample> = Vec::new();
    let mut other_at: HashMap<Vec<(Arc<str>, String)>, usize> = HashMap::new();
    for s in f.samples.drain(..) {
        if members.contains(&key_of(&s.labels)) {
            kept.push(s);
            continue;
        }
        if f.kind != MetricType::Counter {
            continue;
        }
        let labels: Vec<(Arc<str>, String)> = s
            .labels
            .iter()
            .map(|(k, v)| match k.as_ref() {
                "queryid" => (k.clone(), "other".to_string()),
                "toplevel" => (k.clone(), String::new()),
                _ => (k.clone(), v.clone()),
            })
            .collect();
        match other_at.get(&labels) {
            Some(&i) => other[i].value += s.value,
            None => {
                other_at.insert(labels.clone(), other.len());
                other.push(Sample {
                    labels,
                    value: s.value,
                });
            }
        }
    }
    kept.extend(other);
    f.samples = kept;
    f
}

fn key_labels(base: &[(Arc<str>, String)], key: &Key) -> Vec<(Arc<str>, String)> {
    let mut l = base.to_vec();
    for (name, v) in KEY_LABELS.iter().zip(key) {
        l.push((Arc::from(*name), v.clone()));
    }
    l
}

fn gauge(name: &str, help: &str) -> Family {
    Family {
        name: Arc::from(name),
        help: Arc::from(help),
        kind: MetricType::Gauge,
        samples: Vec::new(),
    }
}

fn window_families(
    entries: &[Entry],
    windows: &HashMap<&Key, Window>,
    members: &HashSet<Key>,
    base: &[(Arc<str>, String)],
) -> Vec<Family> {
    let mut calls = gauge(
        "pg_stat_statements_window_calls",
        "Executions between the last two polls.",
    );
    let mut mean = gauge(
        "pg_stat_statements_window_exec_seconds_mean",
        "Mean execution time of the executions between the last two polls.",
    );
    let mut stddev = gauge(
        "pg_stat_statements_window_exec_seconds_stddev",
        "Population standard deviation of execution time between the last two polls.",
    );
    for e in entries.iter().filter(|e| members.contains(&e.key)) {
        let Some(w) = windows.get(&e.key) else {
            continue;
        };
        let labels = key_labels(base, &e.key);
        calls.samples.push(Sample {
            labels: labels.clone(),
            value: w.calls as f64,
        });
        if w.calls > 0 {
            mean.samples.push(Sample {
                labels: labels.clone(),
                value: w.mean,
            });
            stddev.samples.push(Sample {
                labels,
                value: w.stddev,
            });
        }
    }
    vec![calls, mean, stddev]
}

fn query_info(
    entries: &[Entry],
    members: &HashSet<Key>,
    base: &[(Arc<str>, String)],
    max_len: usize,
) -> Family {
    let mut f = Family {
        name: Arc::from("pg_stat_statements_query_info"),
        help: Arc::from("Normalized text of the top queries, literals masked and truncated."),
        kind: MetricType::Info,
        samples: Vec::new(),
    };
    for e in entries.iter().filter(|e| members.contains(&e.key)) {
        let mut labels = key_labels(base, &e.key);
        labels.push((
            Arc::from("query"),
            crate::sql::mask_literals(&e.query, max_len),
        ));
        f.samples.push(Sample { labels, value: 1.0 });
    }
    f
}

fn info_families(
    dealloc: Option<f64>,
    reset: Option<f64>,
    base: &[(Arc<str>, String)],
) -> Vec<Family> {
    let mut out = Vec::new();
    if let Some(d) = dealloc {
        out.push(Family {
            name: Arc::from("pg_stat_statements_dealloc_total"),
            help: Arc::from("Times pg_stat_statements evicted its least-used entries (pg_stat_statements.max reached)."),
            kind: MetricType::Counter,
            samples: vec![Sample {
                labels: base.to_vec(),
                value: d,
            }],
        });
    }
    if let Some(r) = reset {
        let mut f = gauge(
            "pg_stat_statements_stats_reset_timestamp_seconds",
            "When pg_stat_statements was last reset as a whole (Unix time).",
        );
        f.samples.push(Sample {
            labels: base.to_vec(),
            value: r,
        });
        out.push(f);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(q: &str) -> Key {
        ["db".into(), "u".into(), q.into(), "true".into()]
    }

    fn scores(v: &[(&str, f64)]) -> HashMap<Key, f64> {
        v.iter().map(|(q, s)| (key(q), *s)).collect()
    }

    #[test]
    fn selection_takes_the_top_n_then_keeps_members() {
        let s = scores(&[("a", 10.0), ("b", 9.0), ("c", 8.0), ("d", 1.0)]);
        let m = select(&s, &HashSet::new(), 2);
        assert_eq!(m, [key("a"), key("b")].into_iter().collect());
        // c overtakes b slightly: b stays (hysteresis).
        let s = scores(&[("a", 10.0), ("b", 8.0), ("c", 9.0), ("d", 1.0)]);
        assert_eq!(select(&s, &m, 2), m);
        // c is now more than twice b: it replaces b.
        let s = scores(&[("a", 10.0), ("b", 4.0), ("c", 9.0), ("d", 1.0)]);
        assert_eq!(
            select(&s, &m, 2),
            [key("a"), key("c")].into_iter().collect()
        );
        // A member that vanished is replaced.
        let s = scores(&[("a", 10.0), ("c", 1.0), ("d", 2.0)]);
        assert_eq!(
            select(&s, &m, 2),
            [key("a"), key("d")].into_iter().collect()
        );
    }

    #[test]
    fn bound_sums_other_counters_and_drops_other_gauges() {
        let sample = |q: &str, v: f64| Sample {
            labels: vec![
                (Arc::from("target"), "t".into()),
                (Arc::from("datname"), "db".into()),
                (Arc::from("user"), "u".into()),
                (Arc::from("queryid"), q.into()),
                (Arc::from("toplevel"), "true".into()),
            ],
            value: v,
        };
        let members: HashSet<Key> = [key("a")].into_iter().collect();
        let counter = Family {
            name: Arc::from("c_total"),
            help: Arc::from("h"),
            kind: MetricType::Counter,
            samples: vec![sample("a", 1.0), sample("b", 2.0), sample("c", 3.0)],
        };
        let f = bound(counter, &members);
        assert_eq!(f.samples.len(), 2);
        let other = &f.samples[1];
        assert_eq!(other.value, 5.0);
        assert_eq!(key_of(&other.labels)[2], "other");
        assert_eq!(key_of(&other.labels)[3], "");
        let g = Family {
            kind: MetricType::Gauge,
            ..f.clone()
        };
        let mut g = g;
        g.samples = vec![sample("a", 1.0), sample("b", 2.0)];
        assert_eq!(bound(g, &members).samples.len(), 1);
    }
}
