//! Per-table statistics with bounded cardinality (`processor: table_top_n`).
//!
//! The query returns one row per table of the visited database, with the label columns
//! `schema` and `table`, an identity column `relid` (the OID: a table dropped and created
//! again under the same name is a reset) and the ranking columns `size_bytes`, `xid_age`
//! and `dead_tuples`. A table keeps its own series if it is among the top N (config
//! `tables.top_n`) by any of the three, so the table nearest wraparound or with the most
//! dead rows shows even when it is small; at most 3 × N tables. The rest make one row,
//! `schema=""`, `table="other"`, whose values follow each metric's `other:` rule in the
//! pack:
//!
//! - `sum` (sizes, tuples): the sum over the tables without their own series, so a sum
//!   over all series of the database is the database's total;
//! - `max` (ages): the maximum over them (no sample when every table has its own series);
//! - `delta` (counters): the delta rule of `queryid="other"` of statements: a table
//!   without its own series at both ends of a poll interval hands its increase in the
//!   interval to `other` (at the first poll, the non-members' cumulative values); a reset
//!   (counter went down, or the OID changed) or a drop contributes nothing, so `other`
//!   never decreases. A table that re-enters continues its series where it stopped: its
//!   series is its cumulative value minus what it handed to `other`.
//!
//! Metrics without `other:` (e.g. the last autovacuum time) have no `other` sample.
//! Membership has no hysteresis: it follows the ranking at every poll (the `other`
//! counters stay monotonic either way).
//!
//! The delta rule is the statements step's, shared in [`crate::collector::steps::other`].

use std::collections::{HashMap, HashSet};

use crate::collector::pack::OtherRule;
use crate::collector::steps::other::{add, Tracked};
use crate::collector::steps::Context;
use crate::collector::table::{Cell, Table};
use crate::postgres::value::Columns;
use crate::postgres::{ErrorKind, PgError};

/// For `check-config`.
pub const DESCRIPTION: &str = "per-table rows for the union of the top N tables by \
size_bytes, xid_age and dead_tuples (tables.top_n each), plus one schema=\"\", \
table=\"other\" row folding the rest by each metric's `other:` rule (sum, max, or delta \
for counters: the increases of tables without their own series)";

/// The columns a table is ranked by; a table in the top N of any of them is a member.
const RANK_COLUMNS: [&str; 3] = ["size_bytes", "xid_age", "dead_tuples"];
/// The label columns that name a table.
const KEY_LABELS: [&str; 2] = ["schema", "table"];

type Key = u64;

fn hash_key(parts: &[String; 2]) -> Key {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

/// What is remembered of a table until the next poll.
struct Seen {
    relid: Option<f64>,
    /// The `delta` columns, membership and what it handed to `other`.
    tracked: Tracked,
}

/// State kept between polls of one (target, database).
#[derive(Default)]
pub struct TablesStep {
    prev: HashMap<Key, Seen>,
    /// Running totals of `other`, by `delta` column (in [`Rules::delta`] order).
    other: Vec<f64>,
    polled: bool,
}

/// The collector's value columns by `other` rule, each once.
#[derive(Default)]
struct Rules<'a> {
    sum: Vec<&'a str>,
    max: Vec<&'a str>,
    delta: Vec<&'a str>,
}

fn rules<'a>(ctx: &'a Context) -> Rules<'a> {
    let mut r = Rules::default();
    for m in &ctx.def.metrics.0 {
        let (Some(rule), Some(v)) = (m.other, m.value.as_deref()) else {
            continue;
        };
        let list = match rule {
            OtherRule::Sum => &mut r.sum,
            OtherRule::Max => &mut r.max,
            OtherRule::Delta => &mut r.delta,
        };
        if !list.contains(&v) {
            list.push(v);
        }
    }
    r
}

fn decode_error(e: impl std::fmt::Display) -> PgError {
    PgError::new(ErrorKind::Decode, format!("table_top_n processor: {e}"))
}

fn column<R: Columns>(row: &R, name: &str) -> Result<usize, PgError> {
    row.index_of(name)
        .ok_or_else(|| decode_error(format!("the query must return a column {name:?}")))
}

/// The members: the union of the top `n` by each ranking column (ties by key, so the
/// choice is deterministic). NULL and 0 do not rank: without dead tuples, no table is
/// picked for its dead tuples.
fn select(keys: &[Key], ranks: &[[f64; 3]], n: usize) -> HashSet<usize> {
    let mut members = HashSet::new();
    for (c, _) in RANK_COLUMNS.iter().enumerate() {
        let mut order: Vec<usize> = (0..keys.len()).filter(|&i| ranks[i][c] > 0.0).collect();
        order.sort_by(|&a, &b| {
            ranks[b][c]
                .total_cmp(&ranks[a][c])
                .then_with(|| keys[a].cmp(&keys[b]))
        });
        members.extend(order.iter().take(n).copied());
    }
    members
}

impl TablesStep {
    pub fn run<'r, R: Columns>(
        &mut self,
        rows: &'r [R],
        ctx: &Context,
    ) -> Result<Table<'r, R>, PgError> {
        let rules = rules(ctx);
        // The counters are computed columns: members' series hide what they handed to
        // `other`, and the `other` row carries the running totals.
        let mut table = Table::new(rows, rules.delta.iter().copied());
        let Some(first) = rows.first() else {
            return Ok(table);
        };
        let idx = |n: &str| column(first, n);
        let key_cols = [idx(KEY_LABELS[0])?, idx(KEY_LABELS[1])?];
        let relid = idx("relid")?;
        let rank_cols = [
            idx(RANK_COLUMNS[0])?,
            idx(RANK_COLUMNS[1])?,
            idx(RANK_COLUMNS[2])?,
        ];
        let cols = |names: &[&str]| names.iter().map(|n| idx(n)).collect::<Result<Vec<_>, _>>();
        let (sum_cols, max_cols, delta_cols) =
            (cols(&rules.sum)?, cols(&rules.max)?, cols(&rules.delta)?);
        let num = |r: &R, i: usize| -> Result<f64, PgError> {
            Ok(r.number(i).map_err(decode_error)?.unwrap_or(f64::NAN))
        };

        let mut keys = Vec::with_capacity(rows.len());
        let mut ranks = Vec::with_capacity(rows.len());
        for r in rows {
            let parts = [
                r.label(key_cols[0]).map_err(decode_error)?,
                r.label(key_cols[1]).map_err(decode_error)?,
            ];
            keys.push(hash_key(&parts));
            ranks.push([
                num(r, rank_cols[0])?,
                num(r, rank_cols[1])?,
                num(r, rank_cols[2])?,
            ]);
        }
        let members = select(&keys, &ranks, ctx.tables.top_n);

        if self.other.len() != delta_cols.len() {
            self.other = vec![0.0; delta_cols.len()];
        }
        let mut sums = vec![0.0; sum_cols.len()];
        let mut maxes = vec![f64::NAN; max_cols.len()];
        let mut seen = HashMap::with_capacity(rows.len());
        let mut member_rows = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            let member = members.contains(&i);
            let counters = delta_cols
                .iter()
                .map(|&c| num(r, c))
                .collect::<Result<Box<[f64]>, _>>()?;
            let id = r.number(relid).map_err(decode_error)?;
            let prev = self.prev.get(&keys[i]);
            let reset = prev.is_some_and(|p| {
                p.relid != id
                    || (p.tracked.counters.iter())
                        .zip(counters.iter())
                        .any(|(p, n)| n < p)
            });
            let (delta, tracked) = Tracked::advance(
                prev.map(|p| &p.tracked),
                self.polled,
                counters,
                member,
                reset,
            );
            if let Some(d) = &delta {
                add(&mut self.other, d);
            }
            if member {
                member_rows.push((i, tracked.series().collect()));
            } else {
                for (s, &c) in sums.iter_mut().zip(&sum_cols) {
                    let v = num(r, c)?;
                    if !v.is_nan() {
                        *s += v;
                    }
                }
                for (m, &c) in maxes.iter_mut().zip(&max_cols) {
                    let v = num(r, c)?;
                    if !v.is_nan() && (m.is_nan() || v > *m) {
                        *m = v;
                    }
                }
            }
            seen.insert(keys[i], Seen { relid: id, tracked });
        }
        for (i, cells) in member_rows {
            table.keep(i, cells);
        }
        let mut cells = vec![
            (KEY_LABELS[0], Cell::Text(String::new())),
            (KEY_LABELS[1], Cell::Text("other".into())),
        ];
        cells.extend(
            rules
                .sum
                .iter()
                .zip(&sums)
                .map(|(n, v)| (*n, Cell::Number(*v))),
        );
        cells.extend(rules.max.iter().zip(&maxes).map(|(n, v)| {
            (
                *n,
                if v.is_nan() {
                    Cell::Null
                } else {
                    Cell::Number(*v)
                },
            )
        }));
        cells.extend(
            rules
                .delta
                .iter()
                .zip(&self.other)
                .map(|(n, v)| (*n, Cell::Number(*v))),
        );
        table.make(cells).map_err(decode_error)?;

        self.prev = seen;
        self.polled = true;
        Ok(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::rows::fixtures::Fake;
    use crate::collector::steps::CollectorState;
    use crate::metric::Family;
    use std::sync::Arc;

    /// A row of the built-in tables query: (name, size, xid age, dead, seq scans).
    fn row(t: &'static str, relid: f64, size: f64, age: f64, dead: f64, seq: f64) -> Fake {
        Fake(vec![
            ("relid", Some(relid), ""),
            ("schema", None, "public"),
            ("table", None, t),
            ("size_bytes", Some(size), ""),
            ("live_tuples", Some(1.0), ""),
            ("dead_tuples", Some(dead), ""),
            ("seq_scans", Some(seq), ""),
            ("index_scans", None, ""),
            ("xid_age", Some(age), ""),
            ("last_autovacuum", Some(5.0), ""),
            ("last_autoanalyze", None, ""),
        ])
    }

    struct Poller {
        def: crate::collector::pack::CollectorDef,
        state: CollectorState,
    }

    impl Poller {
        fn new() -> Poller {
            Poller {
                def: crate::collector::pack::tests_support::builtin("tables"),
                state: CollectorState::default(),
            }
        }
        fn poll(&mut self, rows: &[Fake]) -> Vec<Family> {
            let base = vec![(Arc::from("target"), "t".to_string())];
            let ctx = Context {
                def: &self.def,
                base_labels: &base,
                database: "db",
                now: std::time::Instant::now(),
                statements: Default::default(),
                tables: crate::config::TablesConfig { top_n: 1 },
                names: None,
                monitored: &|_| true,
            };
            self.state
                .families(&self.def, std::time::Duration::from_secs(1), rows, &ctx)
                .unwrap_or_else(|e| panic!("{}", e.message))
        }
    }

    /// (table, value) of a family's samples.
    fn by_table(out: &[Family], name: &str) -> Vec<(String, f64)> {
        let f = out.iter().find(|f| &*f.name == name).unwrap();
        f.samples
            .iter()
            .map(|s| {
                let t = s.labels.iter().find(|(k, _)| &**k == "table").unwrap();
                (t.1.clone(), s.value)
            })
            .collect()
    }

    #[test]
    fn the_union_of_the_three_rankings_keeps_series_and_the_rest_is_folded_into_other() {
        let mut p = Poller::new();
        let out = p.poll(&[
            row("big", 1.0, 1000.0, 10.0, 0.0, 1.0),
            row("old", 2.0, 10.0, 900.0, 0.0, 2.0),
            row("dead", 3.0, 20.0, 10.0, 50.0, 3.0),
            row("a", 4.0, 30.0, 20.0, 1.0, 4.0),
            row("b", 5.0, 40.0, 30.0, 2.0, 5.0),
        ]);
        let names = |v: Vec<(String, f64)>| v.into_iter().map(|(t, _)| t).collect::<Vec<_>>();
        assert_eq!(
            by_table(&out, "pg_table_size_bytes"),
            [
                ("big".into(), 1000.0),
                ("old".into(), 10.0),
                ("dead".into(), 20.0),
                ("other".into(), 70.0)
            ]
        );
        assert_eq!(
            by_table(&out, "pg_table_xid_age").last(),
            Some(&("other".into(), 30.0)),
            "ages: the max"
        );
        assert_eq!(
            by_table(&out, "pg_table_seq_scans_total").last(),
            Some(&("other".into(), 9.0)),
            "first poll: the non-members' cumulative values"
        );
        assert_eq!(
            names(by_table(&out, "pg_table_last_autovacuum_timestamp_seconds")),
            ["big", "old", "dead"],
            "no timestamp for other"
        );
        assert!(
            by_table(&out, "pg_table_index_scans_total")
                .iter()
                .all(|(t, _)| t == "other"),
            "NULL counters give no member sample"
        );
    }

    #[test]
    fn other_counters_only_grow_and_a_table_that_re_enters_continues_its_series() {
        let mut p = Poller::new();
        // Size, age and dead tuples rank alike: one member.
        let grow = |t, relid, size, seq| row(t, relid, size, size, size, seq);
        let seq = |out: &[Family]| by_table(out, "pg_table_seq_scans_total");
        let out = p.poll(&[grow("big", 1.0, 1000.0, 10.0), grow("a", 2.0, 10.0, 5.0)]);
        assert_eq!(seq(&out), [("big".into(), 10.0), ("other".into(), 5.0)]);
        // a becomes the biggest: its 3 new scans go to other (no series at the start of the
        // interval), big's 4 too (no series at the end). a's new series starts at its
        // cumulative value, as a new query's does in statements (rate() starts from it).
        let out = p.poll(&[grow("big", 1.0, 1000.0, 14.0), grow("a", 2.0, 5000.0, 8.0)]);
        assert_eq!(seq(&out), [("a".into(), 8.0), ("other".into(), 12.0)]);
        // a is reset (dropped and created again): nothing is taken back from other.
        let out = p.poll(&[grow("big", 1.0, 1000.0, 15.0), grow("a", 7.0, 5000.0, 1.0)]);
        assert_eq!(seq(&out), [("a".into(), 1.0), ("other".into(), 13.0)]);
        // big comes back: its series continues at 10, where it stopped.
        let out = p.poll(&[grow("big", 1.0, 9000.0, 20.0), grow("a", 7.0, 5000.0, 2.0)]);
        assert_eq!(seq(&out), [("big".into(), 10.0), ("other".into(), 19.0)]);
        // A dropped table contributes nothing; other never decreases.
        let out = p.poll(&[grow("big", 1.0, 9000.0, 21.0)]);
        assert_eq!(seq(&out), [("big".into(), 11.0), ("other".into(), 19.0)]);
    }
}
