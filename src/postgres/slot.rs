//! Monitoring sessions: [`Slot`], the one reconnecting, read-only, time-limited session
//! type, used for each database a poller visits and by the activity sampler alike.
//!
//! A slot owns everything about its connection: opening it with pgvigil's session
//! settings (`default_transaction_read_only`, `application_name` from the DSN, an idle
//! transaction limit) — or without any, for PgBouncer's admin console ([`Flavour`]) —
//! reading the server's facts on connect, running each query with its
//! own `statement_timeout` and `lock_timeout` plus a client-side deadline, noticing a
//! closed or broken connection, and reconnecting with doubling, jittered backoff. It logs
//! connects, reconnects and failures itself — naming the server with
//! [`describe`](super::dsn::describe), so credentials never reach the log — and tells its
//! owner through [`Event`]s, so what a lost session *means* (e.g. `pg_up`) stays with the
//! caller. It knows nothing of collectors, metrics or the store.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, OwnedMutexGuard, OwnedSemaphorePermit, Semaphore};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, SimpleQueryMessage, Statement};

use super::dsn::{self, describe};
use super::value::{QueryRow, TextRow};
use super::{tls, Dsn, ErrorKind, PgError, ServerInfo};
use crate::config::TargetKind;

/// Reconnect backoff: doubles from `BACKOFF_MIN` up to `BACKOFF_MAX`, with ±25 % jitter.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Extra time the client waits beyond `statement_timeout` before giving the server up.
const DEADLINE_SLACK: Duration = Duration::from_secs(2);

/// What kind of server a session talks to. It decides two things independently:
/// whether pgvigil's session settings are applied ([`Flavour::applies_settings`]) and
/// which wire protocol queries use ([`Flavour::protocol`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Flavour {
    /// PostgreSQL itself: settings applied, extended protocol, server facts read.
    #[default]
    Postgres,
    /// PgBouncer's admin console (the `pgbouncer` database): it accepts no `SET` and no
    /// transactions (so no settings and no server-side timeouts: the client-side deadline
    /// is the only one) and speaks only the simple query protocol, whose rows are text
    /// ([`TextRow`]). Its facts are its own version (`SHOW VERSION`), no extensions.
    /// <https://www.pgbouncer.org/usage.html#admin-console>
    PgBouncer,
}

/// How queries travel on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// Parse/bind/execute: typed rows and parameters.
    Extended,
    /// One `Query` message: text rows, no parameters.
    Simple,
}

impl Flavour {
    /// `SET default_transaction_read_only` etc. on connect, and `statement_timeout` /
    /// `lock_timeout` before queries.
    fn applies_settings(self) -> bool {
        match self {
            Flavour::Postgres => true,
            Flavour::PgBouncer => false,
        }
    }

    fn protocol(self) -> Protocol {
        match self {
            Flavour::Postgres => Protocol::Extended,
            Flavour::PgBouncer => Protocol::Simple,
        }
    }
}

impl From<TargetKind> for Flavour {
    fn from(kind: TargetKind) -> Flavour {
        match kind {
            TargetKind::Postgres => Flavour::Postgres,
            TargetKind::Pgbouncer => Flavour::PgBouncer,
        }
    }
}

/// A change in a slot's connection, for its owner (called while the slot is held, so it
/// must be quick and must not acquire the same slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A session was opened: the first one, or a reconnect.
    Connected,
    /// The open session is gone: the server closed it, or a query found it unusable.
    Lost,
    /// A connection attempt failed; the next one waits for the backoff.
    ConnectFailed,
}

type EventHandler = Arc<dyn Fn(Event) + Send + Sync>;

/// One reconnecting monitoring session. [`Slot::acquire`] hands out the session to one
/// caller at a time (a query runs in its own transaction, and those cannot interleave on
/// one connection), connecting first when needed.
///
/// # Connection budget
/// DESIGN §8 caps the sessions per target (`max_connections`, shared by all its
/// databases). Every slot of a target gets the same `Arc<Semaphore>` ([`Slot::budget`]),
/// and each open connection holds one of its permits: taken in [`Slot::acquire`] just
/// before dialing (waiting there while the budget is spent), given to the connection's
/// task and released when that task ends — after the session is dropped (lost, broken,
/// or closed by its owner: [`SlotGuard::close`], [`Slot::close`]) and the connection
/// shut down. Whether a session stays open between uses is the owner's call.
pub struct Slot {
    dsn: Dsn,
    connect_timeout: Duration,
    flavour: Flavour,
    /// The `target` field of this slot's log lines.
    target: String,
    /// The `database` field of this slot's log lines.
    database: String,
    /// Words before each log message, e.g. `"activity sampler "`; empty for collectors.
    who: String,
    on_event: Option<EventHandler>,
    /// The target's connection budget: a permit per open session.
    budget: Option<Arc<Semaphore>>,
    /// Connects and closes are routine (a session opened per visit): logged at debug.
    quiet: bool,
    /// Async mutex: held by the one caller using the session, across its queries.
    state: Arc<Mutex<State>>,
}

/// The part of a slot that changes, behind its mutex.
#[derive(Default)]
struct State {
    session: Option<Session>,
    /// Facts of the last session opened (kept when it is lost).
    info: ServerInfo,
    /// Failed attempts since the last successful connect.
    failures: u32,
    /// No attempt before this moment (backoff).
    next_attempt: Option<Instant>,
    /// Queries in a row the server did not answer within their deadline.
    timeouts: u32,
}

impl Slot {
    /// A slot for the database `dsn` names; nothing is opened until [`Slot::acquire`].
    /// `connect_timeout` bounds each connection attempt.
    pub fn new(dsn: Dsn, connect_timeout: Duration) -> Slot {
        let database = dsn::database(&dsn.0).to_string();
        Slot {
            dsn,
            connect_timeout,
            flavour: Flavour::default(),
            target: String::new(),
            database,
            who: String::new(),
            on_event: None,
            budget: None,
            quiet: false,
            state: Arc::default(),
        }
    }

    /// Talks to `flavour` (default: PostgreSQL).
    pub fn flavour(mut self, flavour: Flavour) -> Slot {
        self.flavour = flavour;
        self
    }

    /// Shares a connection budget: an open session holds one of `permits`.
    pub fn budget(mut self, permits: Arc<Semaphore>) -> Slot {
        self.budget = Some(permits);
        self
    }

    /// Logs successful connects at debug level: for sessions opened per use.
    pub fn quiet(mut self) -> Slot {
        self.quiet = true;
        self
    }

    /// Closes the session if it is open (waiting for its current user to finish), which
    /// returns its permit to the budget. Not a loss: no [`Event`].
    pub async fn close(&self) {
        self.state.lock().await.session = None;
    }

    /// Names the target in log lines, and optionally who uses the session (`"activity
    /// sampler"` logs "activity sampler cannot connect to …").
    pub fn log_as(mut self, target: &str, who: Option<&str>) -> Slot {
        self.target = target.to_string();
        self.who = who.map(|w| format!("{w} ")).unwrap_or_default();
        self
    }

    /// Calls `handler` on every [`Event`] of this slot.
    pub fn on_event(mut self, handler: impl Fn(Event) + Send + Sync + 'static) -> Slot {
        self.on_event = Some(Arc::new(handler));
        self
    }

    /// The session, connected, for this caller alone until the guard is dropped.
    ///
    /// Reconnects when the previous session was closed or marked broken. Honours the
    /// backoff: while waiting for the next attempt it fails fast, touching neither the
    /// network nor the log. A failed attempt is logged once (never with the password).
    pub async fn acquire(&self) -> Result<SlotGuard, PgError> {
        let mut state = Arc::clone(&self.state).lock_owned().await;
        if let Some(session) = &state.session {
            if !session.client.is_closed() {
                return Ok(self.guard(state));
            }
            tracing::warn!(target = %self.target, database = self.database.as_str(), "{}connection lost; reconnecting", self.who);
            state.session = None;
            self.emit(Event::Lost);
        }
        if let Some(at) = state.next_attempt {
            if Instant::now() < at {
                return Err(PgError::new(
                    ErrorKind::Connect,
                    format!(
                        "database {:?} unreachable; next attempt in {:.1}s",
                        self.database,
                        at.saturating_duration_since(Instant::now()).as_secs_f64()
                    ),
                ));
            }
        }
        // The budget (see the type's docs): wait for a permit while it is spent. The
        // semaphore is never closed, so the error arm cannot happen.
        let permit = match &self.budget {
            Some(b) => Arc::clone(b).acquire_owned().await.ok(),
            None => None,
        };
        // The driver's connect_timeout covers only the TCP connect: a server that accepts
        // and then never answers (a stopped postmaster, a frozen backend, a black hole)
        // would hold this slot, and every collector of the target, forever.
        let limit = self.connect_timeout + DEADLINE_SLACK;
        let connect = Session::connect(&self.dsn, self.connect_timeout, self.flavour, permit);
        let connected = match tokio::time::timeout(limit, connect).await {
            Ok(result) => result,
            Err(_) => Err(PgError::new(
                ErrorKind::Connect,
                format!("no answer from the server within {limit:?} of connecting"),
            )),
        };
        match connected {
            Ok((session, info)) => {
                if state.failures > 0 {
                    tracing::info!(target = %self.target, database = self.database.as_str(), "{}reconnected after {} failed attempts", self.who, state.failures);
                } else if self.quiet {
                    tracing::debug!(target = %self.target, database = self.database.as_str(), server_version = info.version_num, "{}connected", self.who);
                } else {
                    tracing::info!(target = %self.target, database = self.database.as_str(), server_version = info.version_num, "{}connected", self.who);
                }
                state.failures = 0;
                state.next_attempt = None;
                state.session = Some(session);
                state.info = info;
                self.emit(Event::Connected);
                Ok(self.guard(state))
            }
            Err(e) => {
                state.failures += 1;
                let wait = backoff(state.failures);
                state.next_attempt = Some(Instant::now() + wait);
                // Logged once per backoff step, never with the password.
                tracing::warn!(
                    target = %self.target,
                    database = self.database.as_str(),
                    "{}cannot connect to {}: {}; retrying in {:.1}s",
                    self.who,
                    describe(&self.dsn.0),
                    e.message,
                    wait.as_secs_f64()
                );
                self.emit(Event::ConnectFailed);
                Err(e)
            }
        }
    }

    fn guard(&self, state: OwnedMutexGuard<State>) -> SlotGuard {
        SlotGuard {
            state,
            on_event: self.on_event.clone(),
        }
    }

    fn emit(&self, event: Event) {
        if let Some(handler) = &self.on_event {
            handler(event);
        }
    }
}

/// A connected session, held by one caller. Dropping it hands the session back to the
/// slot; a query that finds the connection unusable marks it broken, so the next
/// [`Slot::acquire`] reconnects.
pub struct SlotGuard {
    state: OwnedMutexGuard<State>,
    on_event: Option<EventHandler>,
}

impl SlotGuard {
    /// Facts read when the session was opened.
    pub fn info(&self) -> &ServerInfo {
        &self.state.info
    }

    /// Runs `sql` with `statement_timeout = timeout` and `lock_timeout` (at most
    /// `timeout`), read-only, within a client-side deadline of `timeout` + 2 s for a
    /// server that stops answering. An error that leaves the connection unusable
    /// (`fatal`) marks the session broken.
    pub async fn query(
        &mut self,
        sql: &str,
        timeout: Duration,
        lock_timeout: Duration,
    ) -> Result<Vec<Row>, PgError> {
        self.query_params(sql, &[], timeout, lock_timeout).await
    }

    /// [`SlotGuard::query`] with bind parameters (`$1`, …).
    pub async fn query_params(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        timeout: Duration,
        lock_timeout: Duration,
    ) -> Result<Vec<Row>, PgError> {
        let Some(session) = self.state.session.as_mut() else {
            return Err(PgError {
                kind: ErrorKind::Connect,
                message: "connection lost".into(),
                fatal: true,
            });
        };
        let result = session.query(sql, params, timeout, lock_timeout).await;
        let closed = session.client.is_closed();
        self.settle(result, closed)
    }

    /// Runs a collector's `sql` the way the session's [`Flavour`] speaks: on PostgreSQL as
    /// [`SlotGuard::query`] does (typed rows), on PgBouncer's console over the simple
    /// protocol (text rows), within the client-side deadline `timeout` + 2 s.
    pub async fn fetch(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        timeout: Duration,
        lock_timeout: Duration,
    ) -> Result<Vec<QueryRow>, PgError> {
        let Some(session) = self.state.session.as_mut() else {
            return Err(PgError {
                kind: ErrorKind::Connect,
                message: "connection lost".into(),
                fatal: true,
            });
        };
        let result = match session.flavour.protocol() {
            Protocol::Extended => session
                .query(sql, params, timeout, lock_timeout)
                .await
                .map(|rows| rows.into_iter().map(QueryRow::Typed).collect()),
            Protocol::Simple if !params.is_empty() => Err(PgError::new(
                ErrorKind::Query,
                "a query with parameters needs the extended protocol, which this server does not speak",
            )),
            Protocol::Simple => session
                .simple(sql, timeout)
                .await
                .map(|rows| rows.into_iter().map(QueryRow::Text).collect()),
        };
        let closed = session.client.is_closed();
        self.settle(result, closed)
    }

    /// Runs one statement over the simple query protocol, with the same timeouts and
    /// deadline as [`SlotGuard::query`], and returns the first column of each row as
    /// text. For statements the extended protocol cannot carry, such as `EXPLAIN
    /// (GENERIC_PLAN)` of a text with `$1` placeholders and no values for them. The
    /// simple protocol runs every statement of a multi-statement text: the caller must
    /// pass exactly one.
    pub async fn simple_query_one(
        &mut self,
        sql: &str,
        timeout: Duration,
        lock_timeout: Duration,
    ) -> Result<Vec<Option<String>>, PgError> {
        let Some(session) = self.state.session.as_mut() else {
            return Err(PgError {
                kind: ErrorKind::Connect,
                message: "connection lost".into(),
                fatal: true,
            });
        };
        let result = session.simple_query(sql, timeout, lock_timeout).await;
        let closed = session.client.is_closed();
        self.settle(result, closed)
    }

    /// Closes the session after this use, returning its permit to the budget; the next
    /// [`Slot::acquire`] connects again. Not a loss: no [`Event`].
    pub fn close(mut self) {
        self.state.session = None;
    }

    /// A query's outcome on the session: a fatal error (or a connection found closed)
    /// drops the session. A query the server did not answer within its deadline also
    /// delays the reconnect by the backoff, doubled for each such timeout in a row: a
    /// server too busy to answer is not handed a new connection (a new backend, and a
    /// cancel request for the old one) at once, which would load it more. A query that
    /// succeeds ends the series.
    fn settle<T>(&mut self, result: Result<T, PgError>, closed: bool) -> Result<T, PgError> {
        match result {
            Ok(v) => {
                self.state.timeouts = 0;
                Ok(v)
            }
            Err(mut e) if e.fatal || closed => {
                e.fatal = true;
                self.mark_broken();
                if e.kind == ErrorKind::Timeout {
                    self.state.timeouts += 1;
                    let wait = backoff(self.state.timeouts);
                    self.state.next_attempt = Some(Instant::now() + wait);
                }
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Drops the session: the next [`Slot::acquire`] reconnects (without backoff, since
    /// the last connect succeeded).
    pub fn mark_broken(&mut self) {
        if self.state.session.take().is_some() {
            if let Some(handler) = &self.on_event {
                handler(Event::Lost);
            }
        }
    }
}

/// One open connection, the timeouts currently set on it, and its prepared statements.
struct Session {
    client: Client,
    flavour: Flavour,
    /// (statement_timeout, lock_timeout) as last set; `None` when unknown.
    timeouts: Option<(Duration, Duration)>,
    /// Statements prepared on this connection, by SQL text. A collector runs the same SQL
    /// every poll: preparing it once saves a round trip, and the server's parse and
    /// analysis, per poll. Bounded by [`PREPARED_MAX`]; an entry is dropped when running it
    /// fails (e.g. a table a user's pack reads was altered), so the next run prepares again.
    prepared: HashMap<String, Statement>,
}

/// At most this many prepared statements per session (the built-in packs need about 30);
/// past it, the oldest entries are not tracked and the cache starts over.
const PREPARED_MAX: usize = 128;

impl Session {
    /// Opens a session for monitoring: TLS as the DSN's `sslmode` says ([`tls`]),
    /// `application_name` from the DSN (the config defaults it to `pgvigil`), read-only
    /// with a limit on idle transactions, and reads the server's facts.
    async fn connect(
        dsn: &Dsn,
        connect_timeout: Duration,
        flavour: Flavour,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Result<(Session, ServerInfo), PgError> {
        let Dsn(config, tls_settings, password) = dsn;
        let mut config = config.clone();
        // Read now, so a rotated password file is used by the next connection.
        password
            .apply(&mut config)
            .map_err(|e| PgError::new(ErrorKind::Connect, e))?;
        config.connect_timeout(connect_timeout);
        tls::prepare_driver_config(&mut config, tls_settings);
        // Built per session: certificate files are read again, so rotated ones are used.
        let connector = tls::connector(tls_settings)
            .map_err(|e| PgError::new(ErrorKind::Connect, format!("TLS: {e}")))?;
        // The driver's message can quote the connection string parameters but never the
        // password; still, keep only its text.
        let (client, connection) = config.connect(connector).await.map_err(|e| {
            let mut message = connect_message(&e);
            if tls::is_certificate_rejected(&e) {
                message.push_str(&format!(" ({})", tls_settings.describe_verification()));
            }
            PgError::new(ErrorKind::Connect, message)
        })?;
        tokio::spawn(async move {
            // Ends when the server goes away or the client is dropped; the next use of the
            // client sees `is_closed()` and reconnects.
            let _ = connection.await;
            // The budget's permit returns only now, once the goodbye is sent and the socket
            // shut: not when the session is dropped, while the connection still exists.
            drop(permit);
        });
        if flavour.applies_settings() {
            client
                .batch_execute("SET default_transaction_read_only = on; SET idle_in_transaction_session_timeout = '60s'")
                .await
                .map_err(|e| PgError::from_query(&e))?;
        }
        let info = match flavour {
            Flavour::Postgres => read_info(&client).await?,
            Flavour::PgBouncer => read_pgbouncer_info(&client).await?,
        };
        let session = Session {
            client,
            flavour,
            timeouts: None,
            prepared: HashMap::new(),
        };
        Ok((session, info))
    }

    /// Sets `statement_timeout` and `lock_timeout` unless they already are `want`.
    async fn set_timeouts(&mut self, want: (Duration, Duration)) -> Result<(), PgError> {
        if self.flavour.applies_settings() && self.timeouts != Some(want) {
            self.timeouts = None;
            let set = format!(
                "SET statement_timeout = {}; SET lock_timeout = {}",
                want.0.as_millis().max(1),
                want.1.as_millis().max(1)
            );
            self.client
                .batch_execute(&set)
                .await
                .map_err(|e| PgError::from_query(&e))?;
            self.timeouts = Some(want);
        }
        Ok(())
    }

    /// `sql` prepared on this session, kept in [`Session::prepared`].
    async fn prepare(&mut self, sql: &str) -> Result<Statement, PgError> {
        let statement = self
            .client
            .prepare(sql)
            .await
            .map_err(|e| PgError::from_query(&e))?;
        if self.prepared.len() >= PREPARED_MAX {
            // Dropping the statements closes them on the server.
            self.prepared.clear();
        }
        self.prepared.insert(sql.to_string(), statement.clone());
        Ok(statement)
    }

    /// [`Session::query`] over the simple query protocol; the first column of each row.
    async fn simple_query(
        &mut self,
        sql: &str,
        timeout: Duration,
        lock_timeout: Duration,
    ) -> Result<Vec<Option<String>>, PgError> {
        let want = (timeout, lock_timeout.min(timeout));
        let deadline = timeout + DEADLINE_SLACK;
        let run = async {
            self.set_timeouts(want).await?;
            let messages = self
                .client
                .simple_query(sql)
                .await
                .map_err(|e| PgError::from_query(&e))?;
            Ok(messages
                .iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => {
                        Some(r.get(0).map(str::to_string))
                    }
                    _ => None,
                })
                .collect())
        };
        match tokio::time::timeout(deadline, run).await {
            Ok(r) => r,
            Err(_) => Err(PgError {
                kind: ErrorKind::Timeout,
                message: format!("no answer within {deadline:?}"),
                fatal: true,
            }),
        }
    }

    /// Runs one query with `statement_timeout` and `lock_timeout`, so a slow catalog
    /// never runs past its budget or waits in a lock queue. The timeouts are set on the
    /// session only when they differ from the last query's, so a poll usually costs the
    /// database exactly one statement.
    async fn query(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        timeout: Duration,
        lock_timeout: Duration,
    ) -> Result<Vec<Row>, PgError> {
        let want = (timeout, lock_timeout.min(timeout));
        // Sends a cancel request if this query is given up (deadline, or the future
        // dropped: a poll aborted at shutdown or reload).
        let mut cancel = CancelOnDrop(Some(self.client.cancel_token()));
        // The client-side deadline is a backstop for a server that stops answering; the
        // server-side statement_timeout normally fires first.
        let deadline = timeout + DEADLINE_SLACK;
        let run = async {
            if self.flavour.applies_settings() && self.timeouts != Some(want) {
                self.timeouts = None;
                let set = format!(
                    "SET statement_timeout = {}; SET lock_timeout = {}",
                    want.0.as_millis().max(1),
                    want.1.as_millis().max(1)
                );
                self.client
                    .batch_execute(&set)
                    .await
                    .map_err(|e| PgError::from_query(&e))?;
                self.timeouts = Some(want);
            }
            match self.flavour.protocol() {
                Protocol::Extended => {
                    let cached = self.prepared.get(sql).cloned();
                    let was_cached = cached.is_some();
                    let statement = match cached {
                        Some(s) => s,
                        None => self.prepare(sql).await?,
                    };
                    match self.client.query(&statement, params).await {
                        Ok(rows) => Ok(rows),
                        // A statement prepared before a table it reads was altered fails
                        // with "cached plan must not change result type": prepare it again
                        // and run it once more, as an unprepared query would have run.
                        Err(e)
                            if was_cached && e.code() == Some(&SqlState::FEATURE_NOT_SUPPORTED) =>
                        {
                            self.prepared.remove(sql);
                            let statement = self.prepare(sql).await?;
                            self.client.query(&statement, params).await.map_err(|e| {
                                self.prepared.remove(sql);
                                PgError::from_query(&e)
                            })
                        }
                        Err(e) => {
                            self.prepared.remove(sql);
                            Err(PgError::from_query(&e))
                        }
                    }
                }
                Protocol::Simple => Err(PgError::new(
                    ErrorKind::Query,
                    "typed queries need the extended protocol, which this server does not speak",
                )),
            }
        };
        match tokio::time::timeout(deadline, run).await {
            Ok(r) => {
                cancel.0 = None;
                r
            }
            Err(_) => Err(PgError {
                kind: ErrorKind::Timeout,
                message: format!("no answer within {deadline:?}"),
                fatal: true,
            }),
        }
    }

    /// Runs `sql` over the simple query protocol (the only one PgBouncer's console
    /// speaks), within the client-side deadline `timeout` + 2 s. Rows of every statement
    /// in `sql` are returned together.
    async fn simple(&mut self, sql: &str, timeout: Duration) -> Result<Vec<TextRow>, PgError> {
        let deadline = timeout + DEADLINE_SLACK;
        match tokio::time::timeout(deadline, self.client.simple_query(sql)).await {
            Ok(Ok(messages)) => Ok(text_rows(messages)),
            Ok(Err(e)) => Err(PgError::from_query(&e)),
            Err(_) => Err(PgError {
                kind: ErrorKind::Timeout,
                message: format!("no answer within {deadline:?}"),
                fatal: true,
            }),
        }
    }
}

/// The rows of a simple query's messages, each sharing its statement's column names.
fn text_rows(messages: Vec<SimpleQueryMessage>) -> Vec<TextRow> {
    let mut out = Vec::new();
    let mut columns: Option<Arc<[String]>> = None;
    for m in messages {
        match m {
            SimpleQueryMessage::RowDescription(cols) => {
                columns = Some(cols.iter().map(|c| c.name().to_string()).collect());
            }
            SimpleQueryMessage::Row(row) => {
                let names = match &columns {
                    Some(c) => Arc::clone(c),
                    None => {
                        let c: Arc<[String]> =
                            row.columns().iter().map(|c| c.name().to_string()).collect();
                        columns = Some(Arc::clone(&c));
                        c
                    }
                };
                let values = (0..row.len())
                    .map(|i| row.get(i).map(str::to_string))
                    .collect();
                out.push(TextRow::new(names, values));
            }
            SimpleQueryMessage::CommandComplete(_) => columns = None,
            _ => {}
        }
    }
    out
}

/// PgBouncer's facts: its version from `SHOW VERSION` (`PgBouncer 1.18.0`) as
/// major·10000 + minor·100 + patch (11800), and no extensions.
async fn read_pgbouncer_info(client: &Client) -> Result<ServerInfo, PgError> {
    let messages = client
        .simple_query("SHOW VERSION")
        .await
        .map_err(|e| PgError::from_query(&e))?;
    let text = text_rows(messages)
        .first()
        .and_then(|r| r.text(0).map(str::to_string))
        .unwrap_or_default();
    Ok(ServerInfo {
        version_num: parse_pgbouncer_version(&text).unwrap_or(0),
        extensions: Default::default(),
    })
}

/// `PgBouncer 1.18.0` → 11800; `None` when the text holds no version.
fn parse_pgbouncer_version(text: &str) -> Option<u32> {
    let version = text
        .split_whitespace()
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))?;
    let mut parts = version
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    let major = parts.next()??;
    let minor = parts.next().flatten().unwrap_or(0);
    let patch = parts.next().flatten().unwrap_or(0);
    Some(major * 10_000 + minor.min(99) * 100 + patch.min(99))
}

/// How long a cancel request may take to reach the server.
const CANCEL_LIMIT: Duration = Duration::from_secs(1);

/// Cancel requests in flight (see [`CancelOnDrop`]); [`finish_cancels`] waits for them.
static CANCELS: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>> =
    std::sync::Mutex::new(Vec::new());

/// A query given up before its answer — past the client-side deadline, or its future
/// dropped because the poll was aborted (shutdown, reload) — would otherwise keep running
/// on the server until its `statement_timeout`, for nobody: PostgreSQL does not notice a
/// vanished client while a query runs. Armed while the query runs; on drop it sends a
/// cancel request (the driver's, over a new connection; in plain text, so for a server
/// that refuses non-TLS connections it does not get through and the statement_timeout
/// still ends the query).
struct CancelOnDrop(Option<tokio_postgres::CancelToken>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let Some(token) = self.0.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let task = runtime.spawn(async move {
            let _ =
                tokio::time::timeout(CANCEL_LIMIT, token.cancel_query(tokio_postgres::NoTls)).await;
        });
        let mut all = CANCELS.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|t| !t.is_finished());
        all.push(task);
    }
}

/// Waits (at most `limit`) for the cancel requests of abandoned queries to be sent: at
/// shutdown, so a query that was running is not left on the server.
pub async fn finish_cancels(limit: Duration) {
    let tasks = std::mem::take(&mut *CANCELS.lock().unwrap_or_else(|e| e.into_inner()));
    let _ = tokio::time::timeout(limit, futures_util::future::join_all(tasks)).await;
}

fn connect_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => {
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                source = s.source();
            }
            msg
        }
    }
}

async fn read_info(client: &Client) -> Result<ServerInfo, PgError> {
    let rows = client
        .query(
            "SELECT current_setting('server_version_num')::int4, \
             coalesce(array_agg(extname::text), '{}') FROM pg_extension",
            &[],
        )
        .await
        .map_err(|e| PgError::from_query(&e))?;
    let row = rows
        .first()
        .ok_or_else(|| PgError::new(ErrorKind::Decode, "no row from version query"))?;
    let version: i32 = row
        .try_get(0)
        .map_err(|e| PgError::new(ErrorKind::Decode, e.to_string()))?;
    let extensions: Vec<String> = row
        .try_get(1)
        .map_err(|e| PgError::new(ErrorKind::Decode, e.to_string()))?;
    Ok(ServerInfo {
        version_num: version.max(0) as u32,
        extensions: extensions.into_iter().collect(),
    })
}

/// `BACKOFF_MIN · 2^(failures-1)`, capped at `BACKOFF_MAX`, ±25 % jitter: many targets
/// failing together do not retry in lockstep.
fn backoff(failures: u32) -> Duration {
    let exp = BACKOFF_MIN.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let capped = exp.min(BACKOFF_MAX);
    capped.mul_f64(0.75 + fastrand::f64() * 0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        for _ in 0..50 {
            let b1 = backoff(1);
            assert!(b1 >= Duration::from_millis(750) && b1 <= Duration::from_millis(1250));
            let b3 = backoff(3);
            assert!(b3 >= Duration::from_secs(3) && b3 <= Duration::from_secs(5));
            let b20 = backoff(20);
            assert!(b20 >= Duration::from_millis(22_500) && b20 <= Duration::from_millis(37_500));
        }
    }

    #[test]
    fn pgbouncer_version_text() {
        assert_eq!(parse_pgbouncer_version("PgBouncer 1.18.0"), Some(11_800));
        assert_eq!(parse_pgbouncer_version("PgBouncer 1.23.1"), Some(12_301));
        assert_eq!(parse_pgbouncer_version("PgBouncer"), None);
    }

    #[tokio::test]
    async fn failed_connect_backs_off_quietly_and_tells_the_owner() {
        // Nothing listens on port 1: the attempt is refused at once.
        let dsn: Dsn = "postgresql://monitor:s3cretpw@127.0.0.1:1/app"
            .parse()
            .unwrap();
        let events = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::clone(&events);
        let slot = Slot::new(dsn, Duration::from_secs(2))
            .log_as("t1", None)
            .on_event(move |e| seen.lock().unwrap().push(e));
        let Err(first) = slot.acquire().await else {
            panic!("connected to port 1")
        };
        assert_eq!(first.kind, ErrorKind::Connect);
        assert!(!first.message.contains("s3cretpw"), "{}", first.message);
        // Within the backoff: fails fast, no new attempt, no new event.
        let Err(second) = slot.acquire().await else {
            panic!("connected to port 1")
        };
        assert!(
            second
                .message
                .starts_with("database \"app\" unreachable; next attempt in"),
            "{}",
            second.message
        );
        assert_eq!(*events.lock().unwrap(), vec![Event::ConnectFailed]);
        assert_eq!(slot.state.lock().await.failures, 1);
    }
}
