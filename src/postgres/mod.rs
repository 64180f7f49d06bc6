//! Talking to PostgreSQL: where to connect ([`dsn`], [`tls`]), the sessions themselves
//! ([`slot`]: connecting with pgvigil's session settings, running each query read-only
//! with its own timeouts, reconnecting with backoff), the cheap facts learnt on connect
//! ([`ServerInfo`]), row values ([`value`]), and classifying errors ([`PgError`]).
//! Nothing here knows about collectors, metrics or spans.

pub mod dsn;
pub mod password;
pub mod slot;
pub mod tls;
pub mod value;

use std::collections::HashSet;

use tokio_postgres::error::SqlState;

pub use dsn::Dsn;

/// Facts about the connected database, read once per connection.
#[derive(Debug, Clone, Default)]
pub struct ServerInfo {
    /// `server_version_num`, e.g. 150018; for PgBouncer its own version as
    /// major·10000 + minor·100 + patch (1.18.0 → 11800).
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
    /// No SQL variant of the collector matches the server's version.
    NoVariant,
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
            ErrorKind::NoVariant => "no_variant",
        }
    }

    /// Why a collector cannot run by plan on this server, for
    /// `pgvigil_collector_skipped{reason}`; `None` for real failures. A skip is logged once
    /// and not counted in `pgvigil_collector_errors_total`.
    pub fn skip_reason(self) -> Option<&'static str> {
        match self {
            ErrorKind::MissingExtension => Some("missing_extension"),
            ErrorKind::Permission => Some("missing_privilege"),
            ErrorKind::NoVariant => Some("no_variant"),
            _ => None,
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
