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
//!   and truncated by [`crate::sql::mask_literals`]. The counters are read without texts
//!   (`pg_stat_statements(false)`); the pack's `texts` follow-up query fetches the text of
//!   queries entering the top N only ([`StatementsStep::texts_needed`], then
//!   [`StatementsStep::put_texts`]), and a member's masked text is kept while it stays a
//!   member. A row that carries its text (a pack without `texts`) is used as it is.
//! - **Unchanged entries left out**: with a `skips_unchanged` query, each poll hands the
//!   server the fingerprints (`fp`: a hash of the entry's identity, calls and
//!   `stats_since`) of the entries without their own series, and the server leaves those
//!   whose fingerprint still matches out of the result ([`StatementsStep::unchanged`]).
//!   Such an entry is idle since the last poll: it is carried over exactly as the rows
//!   would have given it (counters unchanged, nothing handed to `other`, its score
//!   decaying), except that an entry the query left out cannot enter the top N in that
//!   poll (its labels and gauges are not in the rows; it enters when it runs again). An
//!   entry can also be missing because it was evicted or reset: when
//!   `pg_stat_statements_info` says so (its `dealloc` or `stats_reset` moved), the next
//!   poll reads every row, which drops the entries that are gone; so does every
//!   [`FULL_EVERY`]th poll, for what the view does not count (a reset of single entries).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use crate::collector::pack::CollectorDef;
use crate::collector::steps::other::{add, Tracked};
use crate::collector::steps::window::{self, Cumulative};
use crate::collector::steps::Context;
use crate::collector::table::{Cell, Table};
use crate::metric::MetricType;
use crate::postgres::value::Columns;
use crate::postgres::{ErrorKind, PgError};

/// The columns this step computes; the pack's metrics read them like query columns.
const COLUMNS: &[&str] = &[
    "window_calls",
    "window_exec_seconds_mean",
    "window_exec_seconds_stddev",
    // Masked and truncated: hides the query's raw `query` column.
    "query",
    "in_top_n",
    "dealloc_total",
    "stats_reset_timestamp_seconds",
];

/// For `check-config`.
pub const DESCRIPTION: &str = "per-query rows for the top N queries only (statements.top_n), \
with window_calls, window_exec_seconds_mean/stddev, masked query text and in_top_n; one \
queryid=\"other\" row per (datname, user) whose counters accumulate the deltas of every \
query without its own series; one row with dealloc_total and stats_reset_timestamp_seconds";

/// The label columns that identify an entry.
const KEY_LABELS: [&str; 4] = ["datname", "user", "queryid", "toplevel"];

/// An entry's identity: a hash of (datname, user, queryid, toplevel). The state kept
/// between polls for thousands of entries is then a few bytes each; the label text is
/// read back from the rows, and only for the top N.
type Key = u64;

/// Maps and sets by [`Key`]. A key is already a SipHash of the labels, so the tables use it
/// as its own hash ([`KeyHasher`]) instead of hashing it a second time.
type KeyMap<V> = HashMap<Key, V, BuildHasherDefault<KeyHasher>>;
type KeySet = HashSet<Key, BuildHasherDefault<KeyHasher>>;

/// The hasher of [`KeyMap`]: the `u64` key itself.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed here; anything else still gets a fair mix.
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Starts the hash of a key: SipHash with fixed keys, deterministic, and collisions among
/// even millions of entries are vanishingly unlikely.
fn key_hasher() -> std::hash::DefaultHasher {
    std::hash::DefaultHasher::new()
}

/// Adds one label to a key's hash (the text, then a separator, so ("ab", "c") and
/// ("a", "bc") differ).
fn key_part(h: &mut std::hash::DefaultHasher, part: &str) {
    h.write(part.as_bytes());
    h.write_u8(0xff);
}

/// The key of the given label values.
#[cfg(test)]
fn hash_key(parts: &[&str]) -> Key {
    let mut h = key_hasher();
    for p in parts {
        key_part(&mut h, p);
    }
    h.finish()
}

/// The key of the label columns `cols` of a row, hashed from the row's own text.
fn key_of<R: Columns>(r: &R, cols: &[usize]) -> Result<Key, PgError> {
    let mut h = key_hasher();
    for &c in cols {
        r.with_label(c, |l| key_part(&mut h, l))
            .map_err(decode_error)?;
    }
    Ok(h.finish())
}

/// `pg_stat_statements_info` (dealloc, stats_reset); absent before 14.
type Info = (Option<f64>, Option<f64>);

/// Every this many polls, a `skips_unchanged` query is asked for every row, so an entry
/// that vanished without `pg_stat_statements_info` counting it (a reset of single
/// entries) is not carried over for longer than that.
const FULL_EVERY: u32 = 20;

/// One row of the statements query: its key, cumulative timing and row index.
#[derive(Debug, Clone)]
struct Entry {
    key: Key,
    cum: Cumulative,
    stats_since: Option<f64>,
    /// Its fingerprint (`fp` column), when the query gives one.
    fp: Option<i64>,
    /// Index of the row it came from.
    row: usize,
}

/// What is remembered of an entry until the next poll.
struct Seen {
    cum: Cumulative,
    stats_since: Option<f64>,
    fp: Option<i64>,
    /// The counter columns ([`counter_columns`] order), membership and what it handed to
    /// `other`: the shared delta rule.
    tracked: Tracked,
}

/// The `other` series of one (datname, user): running totals by counter column.
struct Other {
    datname: String,
    user: String,
    totals: Vec<(String, f64)>,
}

/// What [`StatementsStep::plan`] decided for one poll's rows; [`StatementsStep::run`]
/// applies it.
struct Plan {
    /// Rows it was made from (a plan is only used for the same rows).
    rows: usize,
    entries: Vec<Entry>,
    key_cols: [usize; 4],
    info: Option<Info>,
    /// Window statistics by entry index.
    windows: Vec<Option<window::Window>>,
    scores: KeyMap<f64>,
    members: KeySet,
    /// Entries the query was allowed to leave out, and did: carried over as they were.
    carried: KeySet,
    /// `pg_stat_statements_info` moved since the previous poll (an eviction or reset).
    info_changed: bool,
}

/// State kept between polls of one target.
#[derive(Default)]
pub struct StatementsStep {
    prev: KeyMap<Seen>,
    /// `pg_stat_statements_info` (dealloc, stats_reset) at the previous poll.
    prev_info: Option<Info>,
    scores: KeyMap<f64>,
    members: KeySet,
    /// In first-seen order, so the exposition order is stable.
    others: Vec<Other>,
    polled: bool,
    /// Masked query text of members, fetched when they entered the top N.
    texts: KeyMap<String>,
    /// This poll's plan, made before its texts were fetched.
    planned: Option<Box<Plan>>,
    /// Entries whose fingerprint this poll's query was given ([`StatementsStep::unchanged`]).
    offered: KeySet,
    /// Polls since one that read every row.
    since_full: u32,
    /// The next poll reads every row: entries may have been evicted or reset.
    full_next: bool,
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
    let fp = first.index_of("fp");
    let (dealloc, reset) = (idx("dealloc")?, idx("info_reset")?);
    let num = |r: &R, i: usize| r.number(i).map_err(decode_error);
    let info = Some((num(first, dealloc)?, num(first, reset)?));
    let mut out = Vec::with_capacity(rows.len());
    for (row, r) in rows.iter().enumerate() {
        let key = key_of(r, &keys)?;
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
            fp: match fp {
                Some(i) => r.integer(i).map_err(decode_error)?,
                None => None,
            },
            row,
        });
    }
    Ok((out, keys, info))
}

/// Picks the members for this poll: see the module docs for the hysteresis rules.
/// `carried` entries (left out of the rows) keep a member's place but take no new one.
fn select(scores: &KeyMap<f64>, members: &KeySet, n: usize, carried: &KeySet) -> KeySet {
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
        .filter(|(k, _)| !taken.contains(k) && !carried.contains(*k))
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

/// The value columns of the collector's counters, which `other` accumulates (computed
/// columns excluded: they are not per-query).
fn counter_columns(def: &CollectorDef) -> Vec<&str> {
    let mut cols: Vec<&str> = Vec::new();
    for m in &def.metrics.0 {
        if let (MetricType::Counter, Some(v)) = (m.kind, m.value.as_deref()) {
            if !COLUMNS.contains(&v) && !cols.contains(&v) {
                cols.push(v);
            }
        }
    }
    cols
}

impl StatementsStep {
    /// Keys, windows, scores and this poll's members, from the rows; changes no state.
    fn plan<R: Columns>(&self, rows: &[R], ctx: &Context) -> Result<Plan, PgError> {
        let (entries, key_cols, info) = parse_rows(rows)?;
        // On 14-16 an eviction or reset shows only in pg_stat_statements_info.
        let info_changed = matches!((&self.prev_info, &info), (Some(a), Some(b)) if a != b);
        let mut windows = Vec::with_capacity(entries.len());
        let mut scores = KeyMap::with_capacity_and_hasher(entries.len(), Default::default());
        for e in &entries {
            let w = match self.prev.get(&e.key) {
                Some(p) if p.stats_since != e.stats_since => None,
                Some(_) if info_changed && e.stats_since.is_none() => None,
                Some(p) => window::window(&p.cum, &e.cum),
                None => None,
            };
            let raw = w.map(|w| w.total).unwrap_or(e.cum.total);
            let score = match self.scores.get(&e.key) {
                Some(s) => 0.5 * s + 0.5 * raw,
                None => raw,
            };
            scores.insert(e.key, score);
            windows.push(w);
        }
        // Left out as unchanged: idle since the last poll, so their window is empty (or,
        // as for every entry without `stats_since` when the info moved, untrusted). Only
        // rows of a query that gives fingerprints can have left anything out (a server
        // that came back as 13 after a failover reads every row).
        let mut carried = KeySet::default();
        let skipping = rows.first().is_none_or(|r| r.index_of("fp").is_some());
        let offered = if skipping {
            &self.offered
        } else {
            &KeySet::default()
        };
        for k in offered {
            let Some(p) = self.prev.get(k).filter(|_| !scores.contains_key(k)) else {
                continue;
            };
            let raw = if info_changed && p.stats_since.is_none() {
                p.cum.total
            } else {
                0.0
            };
            let score = match self.scores.get(k) {
                Some(s) => 0.5 * s + 0.5 * raw,
                None => raw,
            };
            scores.insert(*k, score);
            carried.insert(*k);
        }
        let members = select(&scores, &self.members, ctx.statements.top_n, &carried);
        Ok(Plan {
            rows: rows.len(),
            entries,
            key_cols,
            info,
            windows,
            scores,
            members,
            carried,
            info_changed,
        })
    }

    /// The fingerprints of entries this poll's query may leave out: those without their
    /// own series, whose `fp` it gave. Empty (every row) on the first poll, after an
    /// eviction or reset, and every [`FULL_EVERY`]th poll.
    pub fn unchanged(&mut self) -> Vec<i64> {
        self.offered.clear();
        if !self.polled || self.full_next || self.since_full + 1 >= FULL_EVERY {
            return Vec::new();
        }
        let mut fps = Vec::with_capacity(self.prev.len());
        for (k, p) in &self.prev {
            if let (false, Some(fp)) = (p.tracked.member, p.fp) {
                self.offered.insert(*k);
                fps.push(fp);
            }
        }
        fps
    }

    /// The queryids whose text this poll needs: members (as this poll will pick them)
    /// without a text, neither in their row nor kept from an earlier poll. Plans the
    /// poll, for [`StatementsStep::run`] to apply to the same rows.
    pub fn texts_needed<R: Columns>(
        &mut self,
        rows: &[R],
        ctx: &Context,
    ) -> Result<Vec<String>, PgError> {
        let plan = self.plan(rows, ctx)?;
        let mut needed = Vec::new();
        if let Some(first) = rows.first() {
            let query = column(first, "query")?;
            for e in plan
                .entries
                .iter()
                .filter(|e| plan.members.contains(&e.key))
            {
                let row = &rows[e.row];
                if self.texts.contains_key(&e.key)
                    || !row.label(query).unwrap_or_default().is_empty()
                {
                    continue;
                }
                let queryid = row.label(plan.key_cols[2]).map_err(decode_error)?;
                if !needed.contains(&queryid) {
                    needed.push(queryid);
                }
            }
        }
        self.planned = Some(Box::new(plan));
        Ok(needed)
    }

    /// Keeps the texts the `texts` query returned (key columns and `query`), masked, for
    /// this poll's members.
    pub fn put_texts<R: Columns>(&mut self, rows: &[R], ctx: &Context) -> Result<(), PgError> {
        let Some(first) = rows.first() else {
            return Ok(());
        };
        let keys = KEY_LABELS.map(|n| column(first, n));
        let keys = [
            keys[0].clone()?,
            keys[1].clone()?,
            keys[2].clone()?,
            keys[3].clone()?,
        ];
        let query = column(first, "query")?;
        let members = self.planned.as_ref().map(|p| &p.members);
        for r in rows {
            let key = key_of(r, &keys)?;
            if members.is_some_and(|m| m.contains(&key)) {
                let text = r.label(query).map_err(decode_error)?;
                let masked = crate::sql::mask_literals(&text, ctx.statements.query_max_len);
                self.texts.insert(key, masked);
            }
        }
        Ok(())
    }

    /// Reads every row's key, timing and counters; computes windows and scores, picks the
    /// members, and accumulates `other`. Returns the members' rows with their computed
    /// columns, the `other` rows and the info row.
    pub fn run<'r, R: Columns>(
        &mut self,
        rows: &'r [R],
        ctx: &Context,
    ) -> Result<Table<'r, R>, PgError> {
        let plan = match self.planned.take() {
            Some(p) if p.rows == rows.len() => *p,
            _ => self.plan(rows, ctx)?,
        };
        let Plan {
            entries,
            key_cols,
            info,
            windows,
            scores,
            members,
            carried,
            info_changed,
            ..
        } = plan;
        let offered = std::mem::take(&mut self.offered);
        let counter_names = counter_columns(ctx.def);
        // The counters are computed columns too: members' series hide what they handed
        // to `other`, and the `other` rows carry the running totals.
        let mut table = Table::new(rows, COLUMNS.iter().chain(&counter_names).copied());
        let counter_cols = match rows.first() {
            Some(first) => counter_names
                .iter()
                .map(|c| column(first, c))
                .collect::<Result<Vec<_>, _>>()?,
            None => Vec::new(),
        };
        let mut seen = KeyMap::with_capacity_and_hasher(entries.len(), Default::default());
        // Per (datname, user), found by the hash of the two labels: their text is read
        // once per group, not once per row.
        let mut deltas: Vec<(Key, (String, String), Vec<f64>)> = Vec::new();
        for e in &entries {
            let member = members.contains(&e.key);
            // Not executed since the last poll (same calls, same identity) and no change
            // of membership: its counters and what it handed to `other` are as they were
            // (it hands nothing), so its state carries over without reading its row's
            // counters. Most entries of a large pg_stat_statements are idle in any one
            // interval. (Planning time can grow without an execution, e.g. a statement
            // that failed; that reaches the series at its next execution, never lost.)
            let idle = self.polled
                && self.prev.get(&e.key).is_some_and(|p| {
                    p.cum.calls == e.cum.calls
                        && p.stats_since == e.stats_since
                        && p.tracked.member == member
                });
            if let Some(mut p) = idle.then(|| self.prev.remove(&e.key)).flatten() {
                p.fp = e.fp;
                seen.insert(e.key, p);
                continue;
            }
            let row = &rows[e.row];
            let counters = counter_cols
                .iter()
                .map(|&i| Ok(row.number(i).map_err(decode_error)?.unwrap_or(f64::NAN)))
                .collect::<Result<Box<[f64]>, PgError>>()?;
            let prev = self.prev.get(&e.key);
            let was_reset = prev.is_some_and(|p| reset(p, e));
            let (delta, tracked) = Tracked::advance(
                prev.map(|p| &p.tracked),
                self.polled,
                counters,
                member,
                was_reset,
            );
            if let Some(delta) = delta {
                let group = key_of(row, &key_cols[..2])?;
                match deltas.iter_mut().find(|(g, _, _)| *g == group) {
                    Some((_, _, sum)) => add(sum, &delta),
                    None => {
                        let labels = (
                            row.label(key_cols[0]).map_err(decode_error)?,
                            row.label(key_cols[1]).map_err(decode_error)?,
                        );
                        deltas.push((group, labels, delta));
                    }
                }
            }
            seen.insert(
                e.key,
                Seen {
                    cum: e.cum,
                    stats_since: e.stats_since,
                    fp: e.fp,
                    tracked,
                },
            );
        }
        // Left out as unchanged: they stay outside the top N and hand nothing.
        for k in &carried {
            if let Some(p) = self.prev.remove(k) {
                seen.insert(*k, p);
            }
        }
        for (_, (datname, user), delta) in deltas {
            let at = match self
                .others
                .iter()
                .position(|o| o.datname == datname && o.user == user)
            {
                Some(at) => at,
                None => {
                    self.others.push(Other {
                        datname,
                        user,
                        totals: Vec::new(),
                    });
                    self.others.len() - 1
                }
            };
            let totals = &mut self.others[at].totals;
            for (name, d) in counter_names.iter().zip(delta) {
                if d.is_nan() {
                    continue;
                }
                match totals.iter_mut().find(|(n, _)| n == name) {
                    Some((_, t)) => *t += d,
                    None => totals.push((name.to_string(), d)),
                }
            }
        }

        if let Some(first) = rows.first() {
            let query = column(first, "query")?;
            for (i, e) in entries.iter().enumerate() {
                if !members.contains(&e.key) {
                    continue;
                }
                let w = windows[i].as_ref();
                let row_text = rows[e.row].label(query).map_err(decode_error)?;
                let text = if row_text.is_empty() {
                    self.texts.get(&e.key).cloned()
                } else {
                    Some(crate::sql::mask_literals(
                        &row_text,
                        ctx.statements.query_max_len,
                    ))
                };
                let busy = w.filter(|w| w.calls > 0);
                // A member whose text could not be read (evicted in between) gets no
                // query_info this poll; its text is asked for again on the next.
                let known = text.is_some();
                let mut cells = vec![
                    Cell::from(w.map(|w| w.calls as f64)),
                    Cell::from(busy.map(|w| w.mean)),
                    Cell::from(busy.map(|w| w.stddev)),
                    text.map_or(Cell::Null, Cell::Text),
                    Cell::from(known.then_some(1.0)),
                    Cell::Null,
                    Cell::Null,
                ];
                cells.extend(seen[&e.key].tracked.series());
                table.keep(e.row, cells);
            }
            for o in &self.others {
                let mut cells = vec![
                    (KEY_LABELS[0], Cell::Text(o.datname.clone())),
                    (KEY_LABELS[1], Cell::Text(o.user.clone())),
                    (KEY_LABELS[2], Cell::Text("other".into())),
                    (KEY_LABELS[3], Cell::Text(String::new())),
                ];
                cells.extend(o.totals.iter().map(|(n, t)| (n.as_str(), Cell::Number(*t))));
                table.make(cells).map_err(decode_error)?;
            }
            let (dealloc, reset) = info.unwrap_or_default();
            table
                .make(vec![
                    ("dealloc_total", Cell::from(dealloc)),
                    ("stats_reset_timestamp_seconds", Cell::from(reset)),
                ])
                .map_err(decode_error)?;
        }

        // Entries left out may have been evicted or reset in between (an entry that is
        // gone looks like one that is idle): the next poll reads every row. So does one
        // after a poll without rows, which says nothing about what it left out.
        self.full_next = !offered.is_empty() && (info_changed || rows.is_empty());
        self.since_full = if offered.is_empty() {
            0
        } else {
            self.since_full + 1
        };
        // Texts are kept while their query stays a member.
        self.texts.retain(|k, _| members.contains(k));
        self.prev = seen;
        // A poll without rows has no info: keep the last one to compare with.
        if !rows.is_empty() {
            self.prev_info = info;
        }
        self.scores = scores;
        self.members = members;
        self.polled = true;
        Ok(table)
    }
}

/// The entry was reset, or evicted and re-entered, since the previous poll.
fn reset(prev: &Seen, e: &Entry) -> bool {
    e.cum.calls < prev.cum.calls || prev.stats_since != e.stats_since
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn key(q: &str) -> Key {
        hash_key(&["db", "u", q, "true"])
    }

    fn scores(v: &[(&str, f64)]) -> KeyMap<f64> {
        v.iter().map(|(q, s)| (key(q), *s)).collect()
    }

    #[test]
    fn selection_takes_the_top_n_then_keeps_members() {
        let s = scores(&[("a", 10.0), ("b", 9.0), ("c", 8.0), ("d", 1.0)]);
        let m = select(&s, &KeySet::default(), 2, &KeySet::default());
        assert_eq!(m, [key("a"), key("b")].into_iter().collect());
        // c overtakes b slightly: b stays (hysteresis).
        let s = scores(&[("a", 10.0), ("b", 8.0), ("c", 9.0), ("d", 1.0)]);
        assert_eq!(select(&s, &m, 2, &KeySet::default()), m);
        // c is now more than twice b: it replaces b.
        let s = scores(&[("a", 10.0), ("b", 4.0), ("c", 9.0), ("d", 1.0)]);
        assert_eq!(
            select(&s, &m, 2, &KeySet::default()),
            [key("a"), key("c")].into_iter().collect()
        );
        // A member that vanished is replaced.
        let s = scores(&[("a", 10.0), ("c", 1.0), ("d", 2.0)]);
        assert_eq!(
            select(&s, &m, 2, &KeySet::default()),
            [key("a"), key("d")].into_iter().collect()
        );
    }

    use crate::collector::rows::fixtures::Fake;
    use crate::collector::steps::CollectorState;
    use crate::metric::Family;

    /// A row of the built-in statements query.
    fn row(q: &'static str, calls: f64, total: f64) -> Fake {
        row_since(q, calls, total, 0.0)
    }

    /// [`row`] with pg_stat_statements_info's `dealloc`.
    fn row_since(q: &'static str, calls: f64, total: f64, dealloc: f64) -> Fake {
        // The fingerprint of (identity, calls), as the query computes it server-side.
        let fp = hash_key(&[q, &calls.to_string()]) as i64;
        let fp: &'static str = Box::leak(fp.to_string().into_boxed_str());
        Fake(vec![
            ("datname", None, "db"),
            ("user", None, "u"),
            ("queryid", None, q),
            ("toplevel", None, "true"),
            ("calls", Some(calls), ""),
            ("exec_seconds_total", Some(total), ""),
            ("exec_seconds_mean", Some(total / calls), ""),
            ("exec_seconds_stddev", Some(0.0), ""),
            ("exec_seconds_min", Some(0.0), ""),
            ("exec_seconds_max", Some(1.0), ""),
            ("plan_seconds_total", None, ""),
            ("rows", Some(calls), ""),
            ("shared_blks_hit", Some(0.0), ""),
            ("shared_blks_read", Some(0.0), ""),
            ("temp_blks_written", Some(0.0), ""),
            ("block_read_seconds_total", Some(0.0), ""),
            ("query", None, "SELECT 1 FROM t WHERE x = 'secret'"),
            ("stats_since", None, ""),
            ("dealloc", Some(dealloc), ""),
            ("info_reset", None, ""),
            ("fp", None, fp),
        ])
    }

    /// Polls the built-in statements collector (top N = 1) once per slice of rows.
    struct Poller {
        def: CollectorDef,
        state: CollectorState,
    }

    impl Poller {
        fn new() -> Poller {
            Poller {
                def: crate::collector::pack::tests_support::builtin("statements"),
                state: CollectorState::default(),
            }
        }
        /// What the server returns for the `skips_unchanged` query: the rows whose
        /// fingerprint is not in the list the step hands it.
        fn served<'a>(&mut self, rows: &'a [Fake]) -> Vec<&'a Fake> {
            let skip: HashSet<i64> = self.state.unchanged(&self.def).into_iter().collect();
            let fp = |r: &Fake| r.integer(r.index_of("fp").unwrap()).unwrap().unwrap();
            rows.iter().filter(|r| !skip.contains(&fp(r))).collect()
        }
        fn poll<R: Columns>(&mut self, rows: &[R]) -> Vec<Family> {
            let base = vec![(Arc::from("target"), "t".to_string())];
            let ctx = Context {
                def: &self.def,
                base_labels: &base,
                database: "",
                now: std::time::Instant::now(),
                statements: crate::config::StatementsConfig {
                    top_n: 1,
                    ..Default::default()
                },
                tables: Default::default(),
                names: None,
                monitored: &|_| true,
            };
            let interval = std::time::Duration::from_secs(1);
            self.state
                .families(&self.def, interval, rows, &ctx)
                .unwrap_or_else(|e| panic!("{}", e.message))
        }
    }

    fn family<'a>(out: &'a [Family], name: &str) -> &'a Family {
        out.iter()
            .find(|f| &*f.name == name)
            .unwrap_or_else(|| panic!("{name} is not declared"))
    }

    /// (queryid, value) of a family's samples.
    fn by_query(f: &Family) -> Vec<(String, f64)> {
        f.samples
            .iter()
            .map(|s| (key_of(&s.labels)[2].clone(), s.value))
            .collect()
    }

    #[test]
    fn only_members_get_series_and_the_rest_is_summed_into_other() {
        let mut p = Poller::new();
        let out = p.poll(&[row("a", 10.0, 9.0), row("b", 2.0, 1.0), row("c", 3.0, 2.0)]);
        let calls = family(&out, "pg_stat_statements_calls_total");
        assert_eq!(by_query(calls), [("a".into(), 10.0), ("other".into(), 5.0)]);
        assert_eq!(
            key_of(&calls.samples[1].labels)[3],
            "",
            "other has no toplevel"
        );
        let mean = family(&out, "pg_stat_statements_exec_seconds_mean");
        assert_eq!(
            by_query(mean),
            [("a".into(), 0.9)],
            "gauges of other are dropped"
        );
        let info = family(&out, "pg_stat_statements_query_info");
        assert_eq!(info.samples.len(), 1);
        let query = info.samples[0].labels.iter().find(|(k, _)| &**k == "query");
        assert_eq!(
            query.map(|(_, v)| v.as_str()),
            Some("SELECT ? FROM t WHERE x = ?")
        );
        let dealloc = family(&out, "pg_stat_statements_dealloc_total");
        assert_eq!(dealloc.samples.len(), 1);
        assert_eq!(dealloc.samples[0].labels.len(), 1, "target label only");
        assert!(family(&out, "pg_stat_statements_window_calls")
            .samples
            .is_empty());
        assert!(family(&out, "pg_stat_statements_plan_seconds_total")
            .samples
            .is_empty());
    }

    #[test]
    fn idle_entries_carry_their_series_and_other_over_unchanged() {
        let mut p = Poller::new();
        let calls = |out: &[Family]| by_query(family(out, "pg_stat_statements_calls_total"));
        let rows_of = |out: &[Family]| by_query(family(out, "pg_stat_statements_rows_total"));
        let first = p.poll(&[row("a", 10.0, 9.0), row("b", 2.0, 1.0)]);
        assert_eq!(calls(&first), [("a".into(), 10.0), ("other".into(), 2.0)]);
        // Nobody ran anything: the same series and values, twice over.
        for _ in 0..2 {
            let out = p.poll(&[row("a", 10.0, 9.0), row("b", 2.0, 1.0)]);
            assert_eq!(calls(&out), calls(&first));
            assert_eq!(rows_of(&out), rows_of(&first));
        }
        // Both run again: the member's series and other move by exactly their calls.
        let out = p.poll(&[row("a", 12.0, 9.5), row("b", 5.0, 1.5)]);
        assert_eq!(calls(&out), [("a".into(), 12.0), ("other".into(), 5.0)]);
        // An idle member that loses its place to a busy newcomer hands nothing: other
        // grows by the newcomer's calls only, and the idle one, back later, continues.
        let out = p.poll(&[
            row("a", 12.0, 9.5),
            row("b", 5.0, 1.5),
            row("c", 90.0, 80.0),
        ]);
        assert_eq!(calls(&out), [("c".into(), 90.0), ("other".into(), 95.0)]);
        let out = p.poll(&[
            row("a", 12.0, 9.5),
            row("b", 5.0, 1.5),
            row("c", 90.0, 80.0),
        ]);
        assert_eq!(calls(&out), [("c".into(), 90.0), ("other".into(), 95.0)]);
    }

    #[test]
    fn other_only_grows_when_queries_enter_and_leave_the_top_n() {
        let mut p = Poller::new();
        let other = |out: &[Family]| {
            by_query(family(out, "pg_stat_statements_calls_total"))
                .into_iter()
                .find(|(q, _)| q == "other")
                .map(|(_, v)| v)
        };
        let out = p.poll(&[row("a", 10.0, 9.0), row("b", 2.0, 1.0), row("c", 3.0, 2.0)]);
        assert_eq!(other(&out), Some(5.0));
        // b takes a's place: b's 100 new calls go to other (it had no series at the start
        // of the interval), a hands over no history, c adds its 1.
        let out = p.poll(&[
            row("a", 10.0, 9.0),
            row("b", 102.0, 100.0),
            row("c", 4.0, 2.1),
        ]);
        let calls = by_query(family(&out, "pg_stat_statements_calls_total"));
        assert_eq!(calls, [("b".into(), 102.0), ("other".into(), 106.0)]);
        // a, now outside, hands its later calls to other; b, a member at both ends, not.
        let out = p.poll(&[
            row("a", 15.0, 9.1),
            row("b", 110.0, 108.0),
            row("c", 4.0, 2.1),
        ]);
        assert_eq!(other(&out), Some(111.0));
        // c was reset (calls went down): it adds nothing, and nothing is taken back.
        let out = p.poll(&[
            row("a", 15.0, 9.1),
            row("b", 120.0, 118.0),
            row("c", 1.0, 0.1),
        ]);
        assert_eq!(other(&out), Some(111.0));
        // A new query outside the top N brings all its calls, made in the interval.
        let out = p.poll(&[
            row("a", 15.0, 9.1),
            row("b", 130.0, 128.0),
            row("c", 1.0, 0.1),
            row("d", 7.0, 0.7),
        ]);
        assert_eq!(other(&out), Some(118.0));
        let rows_total = family(&out, "pg_stat_statements_rows_total");
        assert_eq!(
            by_query(rows_total).last(),
            Some(&("other".into(), 118.0)),
            "every counter of the pack follows the same rule"
        );
        // a comes back: its 200 calls since poll 5 go to other (it had no series at the
        // start of the interval), and its series continues at 10, where it stopped at
        // poll 1, instead of jumping by what other already counted. b leaves with 1 call.
        let out = p.poll(&[
            row("a", 215.0, 600.0),
            row("b", 131.0, 129.0),
            row("c", 1.0, 0.1),
            row("d", 7.0, 0.7),
        ]);
        let calls = by_query(family(&out, "pg_stat_statements_calls_total"));
        assert_eq!(calls, [("a".into(), 10.0), ("other".into(), 319.0)]);
    }

    /// Families as comparable text: name, then each sample's labels and value.
    fn dump(out: &[Family]) -> Vec<String> {
        let mut lines = Vec::new();
        for f in out {
            for s in &f.samples {
                lines.push(format!("{} {:?} {}", f.name, s.labels, s.value));
            }
        }
        lines
    }

    #[test]
    fn leaving_unchanged_rows_out_gives_the_series_of_reading_every_row() {
        // Six queries; each poll some of them run (a fixed pseudo-random pattern). One
        // poller reads every row, the other only what the server returns for the
        // fingerprints it hands over: their series must be the same at every poll.
        let names = ["a", "b", "c", "d", "e", "f"];
        let mut calls = [0.0f64; 6];
        let mut total = [0.0f64; 6];
        let (mut full, mut skipping) = (Poller::new(), Poller::new());
        let mut seed = 7u64;
        let mut left_out = 0;
        for poll in 0..60 {
            for i in 0..6 {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                if poll == 0 || (seed >> 33) % 10 < 3 {
                    let n = 1 + (seed >> 40) % 20;
                    calls[i] += n as f64;
                    total[i] += n as f64 * (1.0 + i as f64) * 0.01;
                }
            }
            let rows: Vec<Fake> = (0..6).map(|i| row(names[i], calls[i], total[i])).collect();
            let served = skipping.served(&rows);
            left_out += rows.len() - served.len();
            let (a, b) = (full.poll(&rows), skipping.poll(&served));
            assert_eq!(dump(&a), dump(&b), "poll {poll}");
        }
        assert!(
            left_out > 100,
            "the server left {left_out} rows out in 60 polls"
        );
    }

    #[test]
    fn after_an_eviction_the_next_poll_reads_every_row() {
        let mut p = Poller::new();
        let rows = [row("a", 10.0, 9.0), row("b", 2.0, 1.0), row("c", 3.0, 2.0)];
        p.poll(&rows);
        let served = p.served(&rows);
        assert_eq!(served.len(), 1, "only the member a is read again");
        p.poll(&served);
        // b is evicted (dealloc moves); c has not run, a has. b and c look the same to the
        // filtered query: both are left out.
        let rows = [
            row_since("a", 11.0, 9.5, 1.0),
            row_since("c", 3.0, 2.0, 1.0),
        ];
        let served = p.served(&rows);
        assert_eq!(served.len(), 1);
        let out = p.poll(&served);
        let other = |out: &[Family]| by_query(family(out, "pg_stat_statements_calls_total"));
        assert_eq!(other(&out), [("a".into(), 11.0), ("other".into(), 5.0)]);
        // dealloc moved: this poll asks for every row, and b is forgotten.
        assert!(p.state.unchanged(&p.def).is_empty());
        let out = p.poll(&rows);
        assert_eq!(other(&out), [("a".into(), 11.0), ("other".into(), 5.0)]);
        assert_eq!(p.served(&rows).len(), 1, "back to reading what changed");
    }

    #[test]
    fn every_twentieth_poll_reads_every_row() {
        let mut p = Poller::new();
        let rows = [row("a", 10.0, 9.0), row("b", 2.0, 1.0)];
        p.poll(&rows);
        let mut full = Vec::new();
        for poll in 1..=45 {
            let served = p.served(&rows);
            if served.len() == rows.len() {
                full.push(poll);
            }
            p.poll(&served);
        }
        assert_eq!(full, [20, 40]);
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
