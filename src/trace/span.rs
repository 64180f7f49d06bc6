//! An ended slow execution → an OpenTelemetry span (`SpanData`), following the database
//! client semantic conventions: kind CLIENT, name `{operation} {table}` where the SQL is
//! simple enough, `db.*` attributes, one event per distinct wait, and the application's
//! trace as parent when the SQL (or `application_name`) carries a `traceparent`.

use std::borrow::Cow;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{
    Event, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};

use crate::sql;
use crate::trace::activity::Ended;
use crate::trace::context;

/// Where the target lives, for `server.address` / `server.port`.
#[derive(Debug, Clone)]
pub struct Server {
    pub address: String,
    pub port: u16,
}

/// `db.query.text` is masked and cut to this many characters.
const QUERY_TEXT_MAX: usize = 4096;

fn time(unix: f64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs_f64(unix.max(0.0))
}

fn random_span_id() -> SpanId {
    loop {
        let id = fastrand::u64(..);
        if id != 0 {
            return SpanId::from_bytes(id.to_be_bytes());
        }
    }
}

fn random_trace_id() -> TraceId {
    loop {
        let id = fastrand::u128(..);
        if id != 0 {
            return TraceId::from_bytes(id.to_be_bytes());
        }
    }
}

/// Builds the span; `None` when the application's trace is not sampled (its
/// `traceparent` flags say so), which the caller counts.
pub fn build(e: &Ended, server: &Server) -> Option<SpanData> {
    let x = &e.execution;
    let parent = context::parent_of(&x.query, &x.application_name);
    if parent.as_ref().is_some_and(|p| !p.sampled) {
        return None;
    }
    let (trace_id, parent_span_id, trace_state) = match &parent {
        Some(p) => (
            TraceId::from_bytes(p.trace_id),
            SpanId::from_bytes(p.span_id),
            p.tracestate
                .as_deref()
                .and_then(|s| TraceState::from_str(s).ok())
                .unwrap_or_default(),
        ),
        None => (random_trace_id(), SpanId::INVALID, TraceState::default()),
    };
    let span_context = SpanContext::new(
        trace_id,
        random_span_id(),
        TraceFlags::SAMPLED,
        false,
        trace_state,
    );
    let (operation, table) = sql::first_keyword_and_table(&x.query);
    let name = match (&operation, &table) {
        (Some(op), Some(t)) => format!("{op} {t}"),
        (Some(op), None) => op.clone(),
        _ => "postgresql".to_string(),
    };
    let mut attributes = vec![
        KeyValue::new("db.system.name", "postgresql"),
        KeyValue::new("db.namespace", x.datname.clone()),
        KeyValue::new(
            "db.query.text",
            sql::mask_literals(&x.query, QUERY_TEXT_MAX),
        ),
        KeyValue::new("server.address", server.address.clone()),
        KeyValue::new("server.port", server.port as i64),
        KeyValue::new("db.user", x.usename.clone()),
        KeyValue::new("application_name", x.application_name.clone()),
        KeyValue::new("db.postgresql.pid", x.pid as i64),
        KeyValue::new("db.postgresql.end_exact", e.exact),
    ];
    if let Some(op) = operation {
        attributes.push(KeyValue::new("db.operation.name", op));
    }
    if let Some(t) = table {
        attributes.push(KeyValue::new("db.collection.name", t));
    }
    if !x.client_addr.is_empty() {
        attributes.push(KeyValue::new("client.address", x.client_addr.clone()));
    }
    if e.still_running {
        attributes.push(KeyValue::new("db.postgresql.still_running", true));
    }
    let events: Vec<Event> = x
        .waits
        .iter()
        .map(|w| {
            let pids: Vec<i64> = w.blocking_pids.iter().map(|p| *p as i64).collect();
            let mut attrs = vec![
                KeyValue::new("db.postgresql.wait_event_type", w.wait_event_type.clone()),
                KeyValue::new("db.postgresql.wait_event", w.wait_event.clone()),
            ];
            if !pids.is_empty() {
                attrs.push(KeyValue::new(
                    "db.postgresql.blocking_pids",
                    Value::Array(pids.into()),
                ));
            }
            Event::new(
                format!("wait {}: {}", w.wait_event_type, w.wait_event),
                time(w.first_seen),
                attrs,
                0,
            )
        })
        .collect();
    let mut span_events = SpanEvents::default();
    span_events.events = events;
    Some(SpanData {
        span_context,
        parent_span_id,
        parent_span_is_remote: parent.is_some(),
        span_kind: SpanKind::Client,
        name: Cow::Owned(name),
        start_time: time(x.query_start),
        end_time: time(e.end.max(x.query_start)),
        attributes,
        dropped_attributes_count: 0,
        events: span_events,
        links: SpanLinks::default(),
        status: Status::Unset,
        instrumentation_scope: InstrumentationScope::builder("pgvigil")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::activity::{Execution, Wait};

    fn ended(query: &str, app: &str) -> Ended {
        Ended {
            execution: Execution {
                pid: 42,
                datname: "shop".into(),
                usename: "app".into(),
                application_name: app.into(),
                client_addr: "127.0.0.1".into(),
                query: query.into(),
                query_cut: false,
                queryid: None,
                query_start: 1_000.0,
                last_active: 1_001.0,
                waits: vec![Wait {
                    wait_event_type: "Lock".into(),
                    wait_event: "transactionid".into(),
                    blocking_pids: vec![7],
                    first_seen: 1_000.5,
                }],
            },
            end: 1_001.25,
            exact: true,
            still_running: false,
        }
    }

    fn server() -> Server {
        Server {
            address: "db1".into(),
            port: 5432,
        }
    }

    #[test]
    fn console_line_is_trace_id_duration_and_masked_query() {
        let q = "UPDATE orders\n   SET total = 5 WHERE id = 7 /*traceparent='00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'*/";
        let s = build(&ended(q, "web"), &server()).unwrap();
        let line = crate::trace::export::console_line("db1", &s);
        assert_eq!(
            line,
            "span 4bf92f3577b34da6a3ce929d0e0e4736 1.250s db1/shop: UPDATE orders SET total = ? WHERE id = ?"
        );
        let long = format!("SELECT {}1", "a + ".repeat(100));
        let s = build(&ended(&long, ""), &server()).unwrap();
        let line = crate::trace::export::console_line("db1", &s);
        assert!(line.ends_with('…'), "{line}");
        assert!(line.chars().count() < 200, "{line}");
    }

    #[test]
    fn span_with_parent_from_comment() {
        let q = "UPDATE orders SET total = 5 WHERE id = 7 /*traceparent='00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'*/";
        let s = build(&ended(q, "web"), &server()).unwrap();
        assert_eq!(
            s.span_context.trace_id(),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );
        assert_eq!(
            s.parent_span_id,
            SpanId::from_hex("00f067aa0ba902b7").unwrap()
        );
        assert_eq!(s.name, "UPDATE orders");
        assert_eq!(s.span_kind, SpanKind::Client);
        let text = s
            .attributes
            .iter()
            .find(|kv| kv.key.as_str() == "db.query.text")
            .unwrap();
        assert!(!text.value.as_str().contains('5'), "{:?}", text.value);
        assert_eq!(s.events.len(), 1);
        assert_eq!(
            s.end_time.duration_since(s.start_time).unwrap(),
            Duration::from_millis(1250)
        );
    }

    #[test]
    fn root_span_without_context_and_unsampled_parent_is_skipped() {
        let s = build(&ended("SELECT pg_sleep(1)", "psql"), &server()).unwrap();
        assert_eq!(s.parent_span_id, SpanId::INVALID);
        assert_ne!(s.span_context.trace_id(), TraceId::INVALID);
        let q =
            "SELECT 1 /*traceparent='00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00'*/";
        assert!(build(&ended(q, ""), &server()).is_none());
    }
}
