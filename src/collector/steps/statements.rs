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

use crate::collector::pack::{CollectorDef, MetricDef};
use crate::collector::rows::Columns;
use crate::collector::steps::window::{self, Cumulative, Window};
use crate::collector::steps::{Context, Processor};
use crate::metric::MetricType;
use crate::metric::{Family, Sample};
use crate::postgres::{ErrorKind, PgError};

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

/// An entry's identity: a hash of (datname, user, queryid, toplevel). The state kept
/// between polls for thousands of entries is then a few bytes each; the label text is
/// read back from the rows, and only for the top N.
type Key = u64;

fn hash_key(parts: &[String; 4]) -> Key {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: deterministic, and collisions among even millions of
    // entries are vanishingly unlikely.
    let mut h = std::hash::DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

/// `pg_stat_statements_info` (dealloc, stats_reset); absent before 14.
type Info = (Option<f64>, Option<f64>);

/// One row of the statements query: its key, cumulative timing and row index.
#[derive(Debug, Clone)]
struct Entry {
    key: Key,
    cum: Cumulative,
    stats_since: Option<f64>,
    /// Index of the row it came from.
    row: usize,
}

/// What [`StatementsProcessor::select_rows`] decided, for the rest of the same poll.
#[derive(Default)]
struct Poll {
    entries: Vec<Entry>,
    /// Column indices of datname, user, queryid, toplevel.
    key_cols: [usize; 4],
    info: Option<Info>,
    /// Window of each entry that has one, by entry index.
    windows: HashMap<usize, Window>,
    scores: HashMap<Key, f64>,
    members: HashSet<Key>,
}

/// State kept between polls of one target.
#[derive(Default)]
pub struct StatementsProcessor {
    prev: HashMap<Key, (Cumulative, Option<f64>)>,
    /// `pg_stat_statements_info` (dealloc, stats_reset) at the previous poll.
    prev_info: Option<Info>,
    scores: HashMap<Key, f64>,
    members: HashSet<Key>,
    /// Set by `select`, consumed by `process` of the same poll.
    poll: Option<Poll>,
}

impl Processor for StatementsProcessor {
    /// Only the top-N rows go through the YAML mapping: with thousands of statements,
    /// building every per-query series only to sum most of them away would cost far more
    /// memory and CPU than the exposition itself.
    fn select(&mut self, rows: &[Row], ctx: &Context) -> Result<Option<Vec<usize>>, PgError> {
        self.select_rows(rows, ctx.statements.top_n).map(Some)
    }

    fn process(
        &mut self,
        rows: &[Row],
        families: Vec<Family>,
        ctx: &Context,
    ) -> Result<Vec<Family>, PgError> {
        self.finish(
            rows,
            families,
            ctx.def,
            ctx.base_labels,
            ctx.statements.query_max_len,
        )
    }
}

fn decode_error(e: impl std::fmt::Display) -> PgError {
    PgError::new(ErrorKind::Decode, format!("statements processor: {e}"))
}

fn column<R: Columns>(row: &R, name: &str) -> Result<usize, PgError> {
    row.index_of(name)
        .ok_or_else(|| decode_error(format!("the query must return a column {name:?}")))
}

/// The entries, the key columns and pg_stat_statements_info of one poll's rows.
type Parsed = (Vec<Entry>, [usize; 4], Option<Info>);

fn parse_rows<R: Columns>(rows: &[R]) -> Result<Parsed, PgError> {
    let Some(first) = rows.first() else {
        return Ok((Vec::new(), [0; 4], None));
    };
    let idx = |n: &str| column(first, n);
    let keys = KEY_LABELS.map(idx);
    let keys = [
        keys[0].clone()?,
        keys[1].clone()?,
        keys[2].clone()?,
        keys[3].clone()?,
    ];
    let (calls, total, mean, stddev) = (
        idx("calls")?,
        idx("exec_seconds_total")?,
        idx("exec_seconds_mean")?,
        idx("exec_seconds_stddev")?,
    );
    let since = idx("stats_since")?;
    let (dealloc, reset) = (idx("dealloc")?, idx("info_reset")?);
    let num = |r: &R, i: usize| r.number(i).map_err(decode_error);
    let info = Some((num(first, dealloc)?, num(first, reset)?));
    let mut out = Vec::with_capacity(rows.len());
    for (row, r) in rows.iter().enumerate() {
        let key = hash_key(&row_key(r, &keys)?);
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
            row,
        });
    }
    Ok((out, keys, info))
}

/// The key label values of a row.
fn row_key<R: Columns>(r: &R, cols: &[usize; 4]) -> Result<[String; 4], PgError> {
    Ok([
        r.label(cols[0]).map_err(decode_error)?,
        r.label(cols[1]).map_err(decode_error)?,
        r.label(cols[2]).map_err(decode_error)?,
        r.label(cols[3]).map_err(decode_error)?,
    ])
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
    let taken: HashSet<&Key> = chosen.iter().map(|(k, _)| *k).collect();
    let mut outsiders = ranked
        .iter()
        .filter(|(k, _)| !taken.contains(k))
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
    chosen.into_iter().map(|(k, _)| *k).collect()
}

impl StatementsProcessor {
    /// Reads every row's key and timing, computes windows and scores, picks the members;
    /// returns the rows of the members (the only ones mapped to per-query series).
    fn select_rows<R: Columns>(&mut self, rows: &[R], top_n: usize) -> Result<Vec<usize>, PgError> {
        let (entries, key_cols, info) = parse_rows(rows)?;
        // On 14-16 an eviction or reset shows only in pg_stat_statements_info.
        let info_changed = matches!((&self.prev_info, &info), (Some(a), Some(b)) if a != b);
        let mut windows = HashMap::new();
        let mut scores = HashMap::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
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
            scores.insert(e.key, score);
            if let Some(w) = w {
                windows.insert(i, w);
            }
        }
        let members = select(&scores, &self.members, top_n);
        let member_rows = entries
            .iter()
            .filter(|e| members.contains(&e.key))
            .map(|e| e.row)
            .collect();
        self.poll = Some(Poll {
            entries,
            key_cols,
            info,
            windows,
            scores,
            members,
        });
        Ok(member_rows)
    }

    /// Completes the poll: `families` are the members' per-query series; adds `other`,
    /// windows, query text and the info metrics, and remembers this poll for the next.
    fn finish<R: Columns>(
        &mut self,
        rows: &[R],
        mut families: Vec<Family>,
        def: &CollectorDef,
        base: &[(Arc<str>, String)],
        query_max_len: usize,
    ) -> Result<Vec<Family>, PgError> {
        let poll = match self.poll.take() {
            Some(p) => p,
            None => {
                // `select` did not run (cannot happen through the poller); do it now.
                self.select_rows(rows, usize::MAX)?;
                self.poll.take().unwrap_or_default()
            }
        };
        let others: Vec<usize> = poll
            .entries
            .iter()
            .filter(|e| !poll.members.contains(&e.key))
            .map(|e| e.row)
            .collect();
        for (family, metric) in families.iter_mut().zip(&def.metrics.0) {
            if metric.kind == MetricType::Counter {
                family
                    .samples
                    .extend(other_samples(rows, &others, metric, base)?);
            }
        }
        families.extend(window_families(rows, &poll, base)?);
        families.push(query_info(rows, &poll, base, query_max_len)?);
        if let Some((dealloc, reset)) = poll.info {
            families.extend(info_families(dealloc, reset, base));
        }
        self.prev = poll
            .entries
            .iter()
            .map(|e| (e.key, (e.cum, e.stats_since)))
            .collect();
        self.prev_info = poll.info;
        self.scores = poll.scores;
        self.members = poll.members;
        Ok(families)
    }
}

/// The sum of a counter over the non-member rows, one sample per combination of its
/// other labels, with `queryid="other"` and `toplevel=""`.
fn other_samples<R: Columns>(
    rows: &[R],
    others: &[usize],
    metric: &MetricDef,
    base: &[(Arc<str>, String)],
) -> Result<Vec<Sample>, PgError> {
    let (Some(first), Some(value)) = (rows.first(), metric.value.as_deref()) else {
        return Ok(Vec::new());
    };
    let value = column(first, value)?;
    let labels = metric
        .labels
        .iter()
        .map(|l| column(first, &l.0).map(|i| (l.0.as_str(), i)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut sums: Vec<(Vec<String>, f64)> = Vec::new();
    let mut at: HashMap<Vec<String>, usize> = HashMap::new();
    for &r in others {
        let Some(row) = rows.get(r) else { continue };
        let Some(v) = row.number(value).map_err(decode_error)? else {
            continue;
        };
        let mut key = Vec::with_capacity(labels.len());
        for (name, i) in &labels {
            key.push(match *name {
                "queryid" => "other".to_string(),
                "toplevel" => String::new(),
                _ => row.label(*i).map_err(decode_error)?,
            });
        }
        match at.get(&key) {
            Some(&i) => sums[i].1 += v,
            None => {
                at.insert(key.clone(), sums.len());
                sums.push((key, v));
            }
        }
    }
    Ok(sums
        .into_iter()
        .map(|(values, value)| {
            let mut l = base.to_vec();
            for ((name, _), v) in labels.iter().zip(values) {
                l.push((Arc::from(*name), v));
            }
            for (k, v) in &metric.static_labels {
                l.push((Arc::from(k.0.as_str()), v.clone()));
            }
            Sample { labels: l, value }
        })
        .collect())
}

fn key_labels(base: &[(Arc<str>, String)], key: [String; 4]) -> Vec<(Arc<str>, String)> {
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

fn window_families<R: Columns>(
    rows: &[R],
    poll: &Poll,
    base: &[(Arc<str>, String)],
) -> Result<Vec<Family>, PgError> {
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
    for (i, e) in poll.entries.iter().enumerate() {
        if !poll.members.contains(&e.key) {
            continue;
        }
        let Some(w) = poll.windows.get(&i) else {
            continue;
        };
        let labels = key_labels(base, row_key(&rows[e.row], &poll.key_cols)?);
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
    Ok(vec![calls, mean, stddev])
}

fn query_info<R: Columns>(
    rows: &[R],
    poll: &Poll,
    base: &[(Arc<str>, String)],
    max_len: usize,
) -> Result<Family, PgError> {
    let mut f = Family {
        name: Arc::from("pg_stat_statements_query_info"),
        help: Arc::from("Normalized text of the top queries, literals masked and truncated."),
        kind: MetricType::Info,
        samples: Vec::new(),
    };
    let Some(first) = rows.first() else {
        return Ok(f);
    };
    let query = column(first, "query")?;
    for e in poll
        .entries
        .iter()
        .filter(|e| poll.members.contains(&e.key))
    {
        let text = rows[e.row].label(query).map_err(decode_error)?;
        let mut labels = key_labels(base, row_key(&rows[e.row], &poll.key_cols)?);
        labels.push((
            Arc::from("query"),
            crate::sql::mask_literals(&text, max_len),
        ));
        f.samples.push(Sample { labels, value: 1.0 });
    }
    Ok(f)
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
        hash_key(&["db".into(), "u".into(), q.into(), "true".into()])
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
    fn only_members_are_mapped_and_the_rest_is_summed_into_other() {
        use crate::collector::rows::fixtures::Fake;
        let row = |q: &'static str, calls: f64, total: f64| {
            Fake(vec![
                ("datname", None, "db"),
                ("user", None, "u"),
                ("queryid", None, q),
                ("toplevel", None, "true"),
                ("calls", Some(calls), ""),
                ("exec_seconds_total", Some(total), ""),
                ("exec_seconds_mean", Some(total / calls), ""),
                ("exec_seconds_stddev", Some(0.0), ""),
                ("stats_since", None, ""),
                ("dealloc", Some(0.0), ""),
                ("info_reset", None, ""),
                ("query", None, "SELECT 1"),
            ])
        };
        let rows = vec![row("a", 10.0, 9.0), row("b", 2.0, 1.0), row("c", 3.0, 2.0)];
        let def: CollectorDef = serde_yaml_ng::from_str(
            "name: s\nhelp: h\nqueries: [{sql: x}]\nmetrics:\n  - {name: c_total, type: counter, help: h, value: calls, labels: [datname, user, queryid, toplevel]}\n",
        )
        .unwrap();
        let base = vec![(Arc::from("target"), "t".to_string())];
        let mut p = StatementsProcessor::default();
        let picked = p.select_rows(&rows, 1).unwrap();
        assert_eq!(picked, vec![0], "only the heaviest entry is mapped");
        let member_rows: Vec<&Fake> = picked.iter().map(|&i| &rows[i]).collect();
        let families = crate::collector::rows::to_families(&def, &member_rows, &base, "").unwrap();
        let out = p.finish(&rows, families, &def, &base, 200).unwrap();
        let calls = &out[0];
        assert_eq!(calls.samples.len(), 2);
        assert_eq!(key_of(&calls.samples[0].labels)[2], "a");
        let other = &calls.samples[1];
        assert_eq!(other.value, 5.0, "b + c");
        assert_eq!(key_of(&other.labels)[2], "other");
        assert_eq!(key_of(&other.labels)[3], "");
        let info = out
            .iter()
            .find(|f| &*f.name == "pg_stat_statements_query_info")
            .unwrap();
        assert_eq!(info.samples.len(), 1);
        assert_eq!(
            out.iter()
                .filter(|f| &*f.name == "pg_stat_statements_dealloc_total")
                .count(),
            1
        );
    }

    fn key_of(labels: &[(Arc<str>, String)]) -> [String; 4] {
        KEY_LABELS.map(|n| {
            labels
                .iter()
                .find(|(k, _)| k.as_ref() == n)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        })
    }
}
