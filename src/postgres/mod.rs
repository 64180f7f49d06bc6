//! Talking to PostgreSQL: connecting with pgvigil's session settings, the cheap facts
//! learnt on connect (server version, installed extensions), running one collector query
//! inside a read-only transaction with its own timeouts, and classifying errors.

pub mod dsn;
pub mod tls;
pub mod value;

use std::collections::HashSet;
use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Row};

pub use dsn::Dsn;

/// Facts about the connected database, read once per connection.
#[derive(Debug, Clone, Default)]
pub struct ServerInfo {
    /// `server_version_num`, e.g. 150018.
    pub version_num: u32,
    /// Extensions installed in this database.
    pub extensions: HashSet<String>,
}

/// What went wrong, in the categories of `pgvigil_collector_errors_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorKind {
    Connect,
    Query,
    Timeout,
    Decode,
    Permission,
    MissingExtension,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Query => "query",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Decode => "decode",
            ErrorKind::Permission => "permission",
            ErrorKind::MissingExtension => "missing_extension",
        }
    }
}

/// An error with its kind and a message that never contains a password.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct PgError {
    pub kind: ErrorKind,
    pub message: String,
    /// The connection is unusable and must be replaced.
    pub fatal: bool,
}

impl PgError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        PgError {
            kind,
            message: message.into(),
            fatal: false,
        }
    }

    /// Classifies a driver error from a query.
    pub fn from_query(e: &tokio_postgres::Error) -> Self {
        let fatal = e.is_closed() || e.as_db_error().is_none();
        let kind = match e.code() {
            Some(c) if *c == SqlState::QUERY_CANCELED => ErrorKind::Timeout,
            Some(c) if *c == SqlState::LOCK_NOT_AVAILABLE => ErrorKind::Timeout,
            Some(c) if *c == SqlState::INSUFFICIENT_PRIVILEGE => ErrorKind::Permission,
            Some(c)
                if *c == SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE
                    && e.as_db_error()
                        .is_some_and(|d| d.message().contains("shared_preload_libraries")) =>
            {
                ErrorKind::MissingExtension
            }
            _ if e.is_closed() => ErrorKind::Connect,
            _ => ErrorKind::Query,
        };
        let message = match e.as_db_error() {
            Some(db) => format!("{}: {}", db.severity(), db.message()),
            None => e.to_string(),
        };
        PgError {
            kind,
            message,
            fatal,
        }
    }
}

/// Opens a session for monitoring: read-only, `application_name` set by the caller's
/// config, TLS as the DSN's `sslmode` says ([`tls`]), and reads the server's facts.
pub async fn connect(
    dsn: &Dsn,
    connect_timeout: Duration,
) -> Result<(Client, ServerInfo), PgError> {
    let Dsn(config, tls_settings) = dsn;
    let mut config = config.clone();
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
    });
    client
        .batch_execute("SET default_transaction_read_only = on; SET idle_in_transaction_session_timeout = '60s'")
        .await
        .map_err(|e| PgError::from_query(&e))?;
    let info = read_info(&client).await?;
    Ok((client, info))
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

/// A monitoring connection, and the timeouts currently set on its session.
pub struct Session {
    pub client: Client,
    pub info: ServerInfo,
    /// (statement_timeout, lock_timeout) as last set; `None` when unknown.
    timeouts: Option<(Duration, Duration)>,
}

impl Session {
    pub fn new(client: Client, info: ServerInfo) -> Session {
        Session {
            client,
            info,
            timeouts: None,
        }
    }

    /// Runs one collector query with `statement_timeout` and `lock_timeout`, so a slow
    /// catalog never runs past its budget or waits in a lock queue. The session is
    /// read-only (`default_transaction_read_only`); the timeouts are set on the session
    /// only when they differ from the last query's, so a poll usually costs the database
    /// exactly one statement.
    pub async fn query(
        &mut self,
        sql: &str,
        timeout: Duration,
        lock_timeout: Duration,
    ) -> Result<Vec<Row>, PgError> {
        let want = (timeout, lock_timeout.min(timeout));
        // The client-side deadline is a backstop for a server that stops answering; the
        // server-side statement_timeout normally fires first.
        let deadline = timeout + Duration::from_secs(2);
        let run = async {
            if self.timeouts != Some(want) {
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
            self.client
                .query(sql, &[])
                .await
                .map_err(|e| PgError::from_query(&e))
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
}
