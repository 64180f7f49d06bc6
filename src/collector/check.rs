//! `pgvigil check-config --connect`: connects to every target and runs every collector
//! once, as a poll would (same sessions, timeouts and skip rules), and reports per target
//! and collector what an operator has to fix. Nothing reaches a store or `/metrics`.
//!
//! Verdicts, per collector:
//! - `ok`;
//! - `missing extension <name>` / `missing privilege (<grant>)` / `no variant for this
//!   version`: skipped by plan ([`ErrorKind::skip_reason`]). A skip the pack declares in
//!   `requires` (an optional extension or grant) and a missing variant are acceptable;
//!   a privilege a collector needs without declaring a grant is not: pgvigil is meant to
//!   work with `pg_monitor`, so the fix is `GRANT pg_monitor TO <role>`;
//! - `error: <message>`: the query failed (timeout, decode, ...).
//!
//! A target that cannot be reached gets one `unreachable` line instead.

use std::sync::Arc;

use crate::collector::pack::{Catalog, CollectorDef};
use crate::collector::poller::{ByKind, TargetPoller};
use crate::config::{Config, TargetKind};
use crate::postgres::{dsn, ErrorKind, PgError};
use crate::store::Store;
use crate::trace::activity::query_size_bytes;
use crate::{process_env, StartError};

/// Below this, a `traceparent` comment at the end of a long query is cut off in
/// `pg_stat_activity` (README "Tracing"; `pgvigil_spans_context_truncated_total`).
const QUERY_SIZE_FOR_TRACING: i32 = 4096;

/// What one collector did on one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    MissingExtension(String),
    /// The statement(s) that fix it.
    MissingPrivilege(String),
    NoVariant,
    Error(String),
}

impl Verdict {
    /// Whether this verdict makes the check fail (exit 2).
    pub fn is_problem(&self, def: &CollectorDef) -> bool {
        match self {
            Verdict::Ok | Verdict::NoVariant => false,
            Verdict::MissingExtension(_) => def.requires.extension.is_none(),
            Verdict::MissingPrivilege(_) => def.requires.grant.is_none(),
            Verdict::Error(_) => true,
        }
    }

    fn from_result(def: &CollectorDef, result: Result<(), PgError>) -> Verdict {
        let Err(e) = result else {
            return Verdict::Ok;
        };
        match e.kind {
            ErrorKind::MissingExtension => Verdict::MissingExtension(
                def.requires
                    .extension
                    .clone()
                    .unwrap_or_else(|| e.message.clone()),
            ),
            ErrorKind::Permission => Verdict::MissingPrivilege(
                def.requires
                    .grant
                    .as_deref()
                    .map(str::trim)
                    .unwrap_or("GRANT pg_monitor TO <role>")
                    .to_string(),
            ),
            ErrorKind::NoVariant => Verdict::NoVariant,
            _ => Verdict::Error(e.message),
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Ok => write!(f, "ok"),
            Verdict::MissingExtension(ext) => write!(f, "missing extension {ext}"),
            Verdict::MissingPrivilege(grant) => write!(f, "missing privilege ({grant})"),
            Verdict::NoVariant => write!(f, "no variant for this version"),
            Verdict::Error(m) => write!(f, "error: {m}"),
        }
    }
}

/// One target's result.
#[derive(Debug)]
pub struct TargetCheck {
    pub name: String,
    /// The server without credentials (`host:port/db`).
    pub server: String,
    /// `Err`: the target could not be reached (the connect error, password-free).
    pub reached: Result<Reached, String>,
}

/// What a reachable target said.
#[derive(Debug)]
pub struct Reached {
    pub version: String,
    /// Collector name, its verdict, and whether that verdict is a problem.
    pub collectors: Vec<(String, Verdict, bool)>,
    /// Settings that do not stop a collector but lose something (tracing context).
    pub warnings: Vec<String>,
}

/// The whole check.
#[derive(Debug)]
pub struct Report {
    pub targets: Vec<TargetCheck>,
}

impl Report {
    /// Problems found: unreachable targets plus collectors whose verdict is a problem.
    pub fn problems(&self) -> usize {
        self.targets
            .iter()
            .map(|t| match &t.reached {
                Err(_) => 1,
                Ok(r) => r.collectors.iter().filter(|c| c.2).count(),
            })
            .sum()
    }

    /// The report as printed.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for t in &self.targets {
            match &t.reached {
                Err(e) => out.push_str(&format!(
                    "target {} ({}): unreachable: {e}\n",
                    t.name, t.server
                )),
                Ok(r) => {
                    out.push_str(&format!(
                        "target {} ({}): connected, PostgreSQL {}\n",
                        t.name, t.server, r.version
                    ));
                    let width = r.collectors.iter().map(|c| c.0.len()).max().unwrap_or(0);
                    for (name, verdict, problem) in &r.collectors {
                        let mark = if *problem { "  <- fix" } else { "" };
                        out.push_str(&format!("  {name:<width$}  {verdict}{mark}\n"));
                    }
                    for w in &r.warnings {
                        out.push_str(&format!("  warning: {w}\n"));
                    }
                }
            }
        }
        out
    }
}

/// Connects to every target of `config` (concurrently) and runs every collector of
/// `catalog` once on its main database.
pub async fn run(config: &Config, catalog: &Catalog) -> Result<Report, StartError> {
    let targets = config.resolve_targets(&process_env)?;
    // Only the packs of the target's kind run on it (PostgreSQL or PgBouncer).
    let by_kind = ByKind::new(&catalog.collectors);
    let checks = targets.into_iter().map(|target| {
        let kind = target.kind;
        let collectors = by_kind.of(kind);
        let name = target.name.clone();
        let (host, port) = dsn::server(&target.pg.0);
        let server = format!("{host}:{port}/{}", dsn::database(&target.pg.0));
        let poller = TargetPoller::new(
            target,
            Arc::clone(&collectors),
            config.collectors.defaults,
            config.statements,
            config.tables,
            Store::new(),
        );
        async move {
            let reached = check_target(&poller, &collectors, kind).await;
            TargetCheck {
                name,
                server,
                reached,
            }
        }
    });
    Ok(Report {
        targets: futures_util::future::join_all(checks).await,
    })
}

async fn check_target(
    poller: &TargetPoller,
    collectors: &[CollectorDef],
    kind: TargetKind,
) -> Result<Reached, String> {
    if kind == TargetKind::Pgbouncer {
        // The admin console has no settings to read: its collectors say whether it answers.
        let mut results = Vec::with_capacity(collectors.len());
        for def in collectors {
            let verdict = Verdict::from_result(def, poller.try_collector(def).await);
            let problem = verdict.is_problem(def);
            results.push((def.name.0.clone(), verdict, problem));
        }
        if results.iter().all(|r| r.2) {
            return Err("the PgBouncer admin console answered none of its collectors".into());
        }
        return Ok(Reached {
            version: "PgBouncer".into(),
            collectors: results,
            warnings: Vec::new(),
        });
    }
    let rows = poller
        .query_main(
            "SELECT current_setting('server_version'), current_setting('track_activity_query_size')",
        )
        .await
        .map_err(|e| e.message)?;
    let setting = |i: usize| -> String {
        rows.first()
            .and_then(|r| r.try_get::<_, String>(i).ok())
            .unwrap_or_default()
    };
    let version = setting(0);
    let size = setting(1);
    let mut warnings = Vec::new();
    let bytes = query_size_bytes(&size);
    if bytes > 0 && bytes < QUERY_SIZE_FOR_TRACING {
        warnings.push(format!(
            "track_activity_query_size is {size}: slow queries longer than that lose the \
             traceparent comment at their end, so their spans get no parent \
             (pgvigil_spans_context_truncated_total); set it to {QUERY_SIZE_FOR_TRACING} or \
             more (needs a server restart)"
        ));
    }
    let mut results = Vec::with_capacity(collectors.len());
    for def in collectors {
        let verdict = Verdict::from_result(def, poller.try_collector(def).await);
        let problem = verdict.is_problem(def);
        results.push((def.name.0.clone(), verdict, problem));
    }
    Ok(Reached {
        version,
        collectors: results,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_declared_grant_is_a_skip_an_undeclared_one_a_problem() {
        let mut def = crate::collector::pack::tests_support::builtin("hba_file_rules");
        let denied = || Err(PgError::new(ErrorKind::Permission, "permission denied"));
        let v = Verdict::from_result(&def, denied());
        assert!(v
            .to_string()
            .starts_with("missing privilege (GRANT SELECT ON pg_hba_file_rules"));
        assert!(!v.is_problem(&def));
        def.requires.grant = None;
        let v = Verdict::from_result(&def, denied());
        assert_eq!(
            v.to_string(),
            "missing privilege (GRANT pg_monitor TO <role>)"
        );
        assert!(v.is_problem(&def));
    }
}
