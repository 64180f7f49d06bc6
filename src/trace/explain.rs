//! Plans on slow spans (`tracing.explain: generic`, off by default): the generic plan of
//! a slow execution's statement, `EXPLAIN (GENERIC_PLAN, FORMAT JSON)` (PostgreSQL 16+),
//! attached to its span as `db.postgresql.plan`.
//!
//! What makes it safe to run on a production server:
//! - never executed: plain `EXPLAIN`, never `ANALYZE`, on pgvigil's own session, which is
//!   read-only (`default_transaction_read_only`), under a 2 s `statement_timeout`;
//! - one statement only: the text from `pg_stat_activity` is lexed ([`crate::sql`]);
//!   comments (the sqlcommenter `traceparent`) are dropped, a text with a second statement
//!   or a utility statement (`CREATE`, `VACUUM`, …: EXPLAIN cannot plan them) is skipped,
//!   and so is a text cut at `track_activity_query_size`;
//! - no values: every literal becomes a parameter (`$n`) before EXPLAIN, so the plan is
//!   the generic one and carries no constant of the application's (a literal that cannot
//!   be a parameter, e.g. `INTERVAL '1 day'`, makes EXPLAIN fail: skipped, reason `error`);
//! - bounded: at most once per query (queryid, else the literal-free text) and database
//!   per hour (the plan, or why there is none, is cached and reused), at most
//!   `tracing.explain_per_minute` EXPLAINs a minute over all targets, a session taken
//!   from the target's connection budget (`max_connections`) and closed after use, and a
//!   span waits at most [`MAX_DELAY`] for its plan before it is sent without one.
//!
//! A span without a plan says why in `db.postgresql.plan.skipped`, counted in
//! `pgvigil_explain_skipped_total{reason}`; EXPLAINs run are counted in
//! `pgvigil_explain_total`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::SpanData;
use tokio::sync::{mpsc, Semaphore};

use crate::config::Target;
use crate::postgres::slot::Slot;
use crate::postgres::{ErrorKind, PgError};
use crate::sql::{self, TokenKind};
use crate::store::Store;
use crate::trace::export;

/// The first server version with `EXPLAIN (GENERIC_PLAN)`.
pub const MIN_VERSION: u32 = 160_000;
/// `db.postgresql.plan` is cut to this many bytes (on a character boundary), with
/// `db.postgresql.plan.truncated = true`.
pub const PLAN_MAX: usize = 8 * 1024;
/// A query's plan (or the reason it has none) is reused this long.
pub const CACHE_FOR: Duration = Duration::from_secs(3600);
/// Queries remembered per target; the oldest entry goes first.
const CACHE_MAX: usize = 1000;
/// `statement_timeout` of an EXPLAIN.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(2);
/// Everything for one EXPLAIN: a permit of the budget, connecting, planning.
const DEADLINE: Duration = Duration::from_secs(5);
/// A span that waited this long for its turn is sent without a plan (reason `budget`).
pub const MAX_DELAY: Duration = Duration::from_secs(10);
/// Spans waiting for a plan, per target; beyond it they go without (reason `budget`).
const QUEUE: usize = 64;

/// Why a span has no plan (`pgvigil_explain_skipped_total{reason}`).
pub const REASONS: &[&str] = &[
    "version",
    "truncated",
    "not_plannable",
    "permission",
    "budget",
    "timeout",
    "error",
];

/// Statements EXPLAIN can plan (after `WITH …` the main statement is one of these too).
const PLANNABLE: &[&str] = &[
    "SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "VALUES", "TABLE", "WITH",
];

/// The EXPLAIN to run for `query`, or why there is none: `truncated` (cut at
/// `track_activity_query_size`, or ending inside a string or comment), `not_plannable`
/// (a utility statement, more than one statement, or no statement). Comments are
/// dropped; literals become parameters numbered after the text's own `$n`; numbers in a
/// type modifier (`numeric(10,2)`) stay.
pub fn statement(query: &str, cut: bool) -> Result<String, &'static str> {
    if cut {
        return Err("truncated");
    }
    let tokens: Vec<sql::Token<'_>> = sql::tokenize(query).collect();
    if tokens.iter().any(|t| !t.terminated) {
        return Err("truncated");
    }
    let mut next_param = tokens
        .iter()
        .filter(|t| t.kind == TokenKind::Param)
        .filter_map(|t| t.text[1..].parse::<u32>().ok())
        .max()
        .unwrap_or(0);
    let mut out = String::with_capacity(query.len() + 40);
    out.push_str("EXPLAIN (GENERIC_PLAN, FORMAT JSON) ");
    let mut first: Option<&str> = None;
    let mut ended = false;
    // The last significant tokens, to spot `:: name (` (a type modifier follows).
    let mut recent: [&str; 2] = ["", ""];
    let mut typmod = false;
    for t in &tokens {
        if t.is_trivia() {
            if !out.ends_with(' ') {
                out.push(' ');
            }
            continue;
        }
        if ended {
            return Err("not_plannable");
        }
        if t.kind == TokenKind::Punct && t.text == ";" {
            ended = true;
            continue;
        }
        if first.is_none() && t.text != "(" {
            first = Some(t.text);
        }
        match t.kind {
            TokenKind::Punct if t.text == "(" => {
                typmod = recent[0] == "::" && !recent[1].is_empty();
                out.push('(');
            }
            TokenKind::Punct if t.text == ")" => {
                typmod = false;
                out.push(')');
            }
            TokenKind::Number if typmod => out.push_str(t.text),
            TokenKind::Number | TokenKind::String => {
                next_param += 1;
                out.push_str(&format!("${next_param}"));
            }
            _ => out.push_str(t.text),
        }
        // recent[0]: the token before the last one; recent[1]: the last one, if a name.
        recent = [
            if t.kind == TokenKind::Ident || t.kind == TokenKind::QuotedIdent {
                recent[0]
            } else {
                t.text
            },
            if t.kind == TokenKind::Ident || t.kind == TokenKind::QuotedIdent {
                t.text
            } else {
                ""
            },
        ];
    }
    match first {
        Some(kw) if PLANNABLE.iter().any(|p| p.eq_ignore_ascii_case(kw)) => {
            Ok(out.trim_end().to_string())
        }
        _ => Err("not_plannable"),
    }
}

/// The plan as attached: cut to [`PLAN_MAX`] bytes on a character boundary; `true` when
/// cut.
pub fn cut_plan(plan: &str) -> (&str, bool) {
    if plan.len() <= PLAN_MAX {
        return (plan, false);
    }
    let mut end = PLAN_MAX;
    while !plan.is_char_boundary(end) {
        end -= 1;
    }
    (&plan[..end], true)
}

/// At most `per_minute` EXPLAINs in any minute-long window, for all targets together
/// (one per configuration, shared by every target's explainer).
pub struct Budget {
    per_minute: u32,
    /// When the current window started, and EXPLAINs taken in it.
    window: Mutex<(Instant, u32)>,
}

impl Budget {
    pub fn new(per_minute: u32) -> Arc<Budget> {
        Arc::new(Budget {
            per_minute,
            window: Mutex::new((Instant::now(), 0)),
        })
    }

    /// Takes one EXPLAIN from the budget; `false` when this minute's is spent.
    pub fn take(&self, now: Instant) -> bool {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if now.duration_since(w.0) >= Duration::from_secs(60) {
            *w = (now, 0);
        }
        if w.1 >= self.per_minute {
            return false;
        }
        w.1 += 1;
        true
    }
}

/// What EXPLAIN gave for a query: the plan, or why there is none.
#[derive(Debug, Clone)]
enum Outcome {
    Plan(Arc<str>),
    Skipped {
        reason: &'static str,
        message: Option<Arc<str>>,
    },
}

/// A slow execution's span, waiting for its plan.
pub struct Job {
    pub span: SpanData,
    pub query: String,
    pub query_cut: bool,
    pub queryid: Option<String>,
    pub datname: String,
    /// `server_version_num` of the target.
    pub version: u32,
}

/// A target's explainer: [`Explainer::submit`] hands it a span, which reaches the export
/// queue with its plan or the reason it has none.
pub struct Explainer {
    tx: mpsc::Sender<(Job, Instant, String)>,
    queue: export::Queue,
    store: Arc<Store>,
    target: String,
}

impl Explainer {
    /// Starts the explainer of `target`: its EXPLAINs take sessions from `connections`
    /// (the target's connection budget) and from `budget` (EXPLAINs per minute); spans go
    /// on to `queue`. The task ends when the explainer is dropped.
    pub fn start(
        target: &Target,
        connections: Option<Arc<Semaphore>>,
        budget: Arc<Budget>,
        queue: export::Queue,
        store: Arc<Store>,
    ) -> (Explainer, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        store.enable_explain(&target.name, REASONS);
        let worker = Worker {
            target: target.clone(),
            connections,
            budget,
            queue: queue.clone(),
            store: Arc::clone(&store),
            slots: HashMap::new(),
            cache: HashMap::new(),
            told_permission: false,
        };
        let handle = tokio::spawn(worker.run(rx));
        let explainer = Explainer {
            tx,
            queue,
            store,
            target: target.name.clone(),
        };
        (explainer, handle)
    }

    /// Sends `job`'s span on, with its plan when one can be had; never waits. What needs
    /// no EXPLAIN (an old server, a cut text, a utility statement) is decided here.
    pub fn submit(&self, mut job: Job) {
        let stmt = if job.version < MIN_VERSION {
            Err("version")
        } else {
            statement(&job.query, job.query_cut)
        };
        match stmt {
            Err(reason) => self.send(job.span, &skipped(reason, None), false),
            Ok(sql) => {
                if let Err(e) = self.tx.try_send((job, Instant::now(), sql)) {
                    let (j, _, _) = e.into_inner();
                    job = j;
                    self.send(job.span, &skipped("budget", None), false);
                }
            }
        }
    }

    fn send(&self, span: SpanData, outcome: &Outcome, ran: bool) {
        deliver(
            &self.queue,
            &self.store,
            &self.target,
            span,
            outcome,
            ran,
            false,
        );
    }
}

fn skipped(reason: &'static str, message: Option<Arc<str>>) -> Outcome {
    Outcome::Skipped { reason, message }
}

/// Attaches `outcome` to `span`, counts it and queues the span for export.
fn deliver(
    queue: &export::Queue,
    store: &Store,
    target: &str,
    mut span: SpanData,
    outcome: &Outcome,
    ran: bool,
    cached: bool,
) {
    match outcome {
        Outcome::Plan(plan) => {
            let (text, cut) = cut_plan(plan);
            span.attributes
                .push(KeyValue::new("db.postgresql.plan", text.to_string()));
            if cut {
                span.attributes
                    .push(KeyValue::new("db.postgresql.plan.truncated", true));
            }
            if cached {
                span.attributes
                    .push(KeyValue::new("db.postgresql.plan.cached", true));
            }
            store.count_explain(target, ran, None);
        }
        Outcome::Skipped { reason, message } => {
            span.attributes
                .push(KeyValue::new("db.postgresql.plan.skipped", *reason));
            if let Some(m) = message {
                span.attributes
                    .push(KeyValue::new("db.postgresql.plan.error", m.to_string()));
            }
            store.count_explain(target, ran, Some(reason));
        }
    }
    queue.push(span);
}

/// The explainer's task: owns the cache and the sessions.
struct Worker {
    target: Target,
    connections: Option<Arc<Semaphore>>,
    budget: Arc<Budget>,
    queue: export::Queue,
    store: Arc<Store>,
    /// A session per database, opened for each EXPLAIN and closed after it.
    slots: HashMap<String, Slot>,
    /// (database, query key) → the outcome, and when it was found.
    cache: HashMap<(String, String), (Outcome, Instant)>,
    /// The missing privilege was logged (once per target: it is a setup matter).
    told_permission: bool,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::Receiver<(Job, Instant, String)>) {
        while let Some((job, queued, sql)) = rx.recv().await {
            let key = (job.datname.clone(), cache_key(&job, &sql));
            let now = Instant::now();
            if let Some((outcome, at)) = self.cache.get(&key) {
                if now.duration_since(*at) < CACHE_FOR {
                    let outcome = outcome.clone();
                    self.deliver(job.span, &outcome, false, true);
                    continue;
                }
            }
            if now.duration_since(queued) > MAX_DELAY || !self.budget.take(now) {
                self.deliver(job.span, &skipped("budget", None), false, false);
                continue;
            }
            let outcome = self.explain(&job.datname, &sql).await;
            let keep = !matches!(
                outcome,
                Outcome::Skipped {
                    reason: "budget",
                    ..
                }
            );
            if keep {
                if self.cache.len() >= CACHE_MAX {
                    self.evict(now);
                }
                self.cache.insert(key, (outcome.clone(), Instant::now()));
            }
            self.deliver(job.span, &outcome, true, false);
        }
    }

    fn deliver(&self, span: SpanData, outcome: &Outcome, ran: bool, cached: bool) {
        deliver(
            &self.queue,
            &self.store,
            &self.target.name,
            span,
            outcome,
            ran,
            cached,
        );
    }

    /// Drops expired entries, and the oldest one if none has expired.
    fn evict(&mut self, now: Instant) {
        self.cache
            .retain(|_, (_, at)| now.duration_since(*at) < CACHE_FOR);
        if self.cache.len() >= CACHE_MAX {
            if let Some(oldest) = self
                .cache
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| k.clone())
            {
                self.cache.remove(&oldest);
            }
        }
    }

    /// Runs `sql` (an EXPLAIN built by [`statement`]) in `datname`, within [`DEADLINE`].
    async fn explain(&mut self, datname: &str, sql: &str) -> Outcome {
        let slot = self.slots.entry(datname.to_string()).or_insert_with(|| {
            let mut dsn = self.target.pg.clone();
            dsn.0.dbname(datname);
            let slot = Slot::new(dsn, DEADLINE)
                .log_as(&self.target.name, Some("explain"))
                .quiet();
            match &self.connections {
                Some(c) => slot.budget(Arc::clone(c)),
                None => slot,
            }
        });
        let run = async {
            let mut session = slot.acquire().await?;
            let rows = session
                .simple_query_one(sql, STATEMENT_TIMEOUT, STATEMENT_TIMEOUT)
                .await;
            // Closed after each use: its permit goes back to the target's budget.
            session.close();
            rows
        };
        let result = tokio::time::timeout(DEADLINE, run)
            .await
            .unwrap_or_else(|_| {
                Err(PgError::new(
                    ErrorKind::Timeout,
                    format!("no plan within {DEADLINE:?}"),
                ))
            });
        match result {
            Ok(rows) => match rows.into_iter().flatten().next() {
                Some(plan) => Outcome::Plan(Arc::from(plan)),
                None => skipped("error", Some(Arc::from("EXPLAIN returned no plan"))),
            },
            Err(e) => {
                tracing::debug!(target = %self.target.name, database = datname, "EXPLAIN failed: {}", e.message);
                let reason = match e.kind {
                    ErrorKind::Permission => {
                        if !std::mem::replace(&mut self.told_permission, true) {
                            tracing::warn!(target = %self.target.name, database = datname, "tracing.explain: pgvigil's role may not plan a slow query ({}); EXPLAIN needs SELECT on the tables it reads, which pg_monitor does not give (e.g. GRANT pg_read_all_data). Such spans go without a plan, counted in pgvigil_explain_skipped_total{{reason=\"permission\"}}; logged once per target", e.message);
                        }
                        "permission"
                    }
                    ErrorKind::Timeout => "timeout",
                    _ => "error",
                };
                skipped(reason, Some(Arc::from(e.message.as_str())))
            }
        }
    }
}

/// The query's identity for the cache: its `query_id` when the server computes one, else
/// the literal-free statement.
fn cache_key(job: &Job, sql: &str) -> String {
    match job.queryid.as_deref() {
        Some(id) if !id.is_empty() && id != "0" => format!("id:{id}"),
        _ => format!("sql:{sql}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_become_parameters_and_comments_go() {
        let q = "SELECT pg_sleep(1.5), x FROM t WHERE id = $1 AND name = 'bob' /*traceparent='00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'*/";
        assert_eq!(
            statement(q, false).unwrap(),
            "EXPLAIN (GENERIC_PLAN, FORMAT JSON) SELECT pg_sleep($2), x FROM t WHERE id = $1 AND name = $3"
        );
        assert_eq!(
            statement("select 1::numeric(10,2) ;", false).unwrap(),
            "EXPLAIN (GENERIC_PLAN, FORMAT JSON) select $1::numeric(10,2)"
        );
        assert_eq!(
            statement("(SELECT 1) UNION (SELECT 2)", false).unwrap(),
            "EXPLAIN (GENERIC_PLAN, FORMAT JSON) (SELECT $1) UNION (SELECT $2)"
        );
        assert!(statement("WITH a AS (SELECT 1) DELETE FROM t", false).is_ok());
        assert!(statement("update t set a = 2 -- why\n", false).is_ok());
    }

    #[test]
    fn utilities_second_statements_and_cut_texts_are_skipped() {
        for q in [
            "VACUUM t",
            "CREATE TABLE x AS SELECT 1",
            "EXPLAIN ANALYZE SELECT 1",
            "SET work_mem = '1GB'",
            "/* only a comment */",
            "",
        ] {
            assert_eq!(statement(q, false), Err("not_plannable"), "{q}");
        }
        assert_eq!(
            statement("SELECT 1; DELETE FROM t", false),
            Err("not_plannable")
        );
        assert_eq!(statement("SELECT 1", true), Err("truncated"));
        assert_eq!(statement("SELECT 'abc", false), Err("truncated"));
        // A `;` inside a string or comment is no second statement.
        assert!(statement("SELECT ';' /* ; */", false).is_ok());
    }

    #[test]
    fn plan_is_cut_on_a_char_boundary() {
        let (p, cut) = cut_plan("short");
        assert_eq!((p, cut), ("short", false));
        let long = "é".repeat(PLAN_MAX);
        let (p, cut) = cut_plan(&long);
        assert!(cut);
        assert!(p.len() <= PLAN_MAX && p.len() >= PLAN_MAX - 1);
    }

    #[test]
    fn budget_refills_each_minute() {
        let b = Budget::new(2);
        let t0 = Instant::now();
        assert!(b.take(t0));
        assert!(b.take(t0));
        assert!(!b.take(t0 + Duration::from_secs(30)));
        assert!(b.take(t0 + Duration::from_secs(61)));
    }
}
