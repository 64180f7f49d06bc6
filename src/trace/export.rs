//! Getting spans out: a bounded queue per target in front of an OTLP exporter. The
//! sampler never waits on the network: when the queue is full the span is dropped and
//! counted; a failed or timed-out export drops its batch, counted too. Memory is bounded
//! by the queue size whatever the receiver does.
//!
//! The console sink ([`start_console`]) takes the same queue and prints one line per span
//! on stderr instead ([`console_line`]): what `pgvigil demo` does when no OTLP endpoint is
//! set, so a newcomer sees the spans without a tracing backend.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};
use opentelemetry_sdk::Resource;
use tokio::sync::mpsc;

use crate::config::OtlpProtocol;
use crate::store::Store;

/// Most spans per export call.
const BATCH_MAX: usize = 512;
/// How long a batch waits to fill up before it is sent.
const BATCH_DELAY: Duration = Duration::from_millis(500);
/// An export that takes longer is abandoned and its spans counted as dropped.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a span did not reach the receiver (`pgvigil_spans_dropped_total{reason}`).
pub const REASONS: &[&str] = &["queue_full", "export_failed", "not_sampled"];

/// Where spans go: an OTLP receiver, or the console (`pgvigil demo` without an endpoint).
#[derive(Debug, Clone)]
pub enum Sink {
    Otlp(Endpoint),
    Console,
}

/// Where to send spans.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `None`: let the OTLP crate read `OTEL_EXPORTER_OTLP_*` itself.
    pub url: Option<String>,
    pub protocol: OtlpProtocol,
}

/// Builds an OTLP span exporter for `endpoint` with `resource`. Headers, timeouts and
/// certificates from `OTEL_EXPORTER_OTLP_*` are honoured by the OTLP crate.
pub fn build_exporter(
    endpoint: &Endpoint,
    resource: &Resource,
) -> Result<opentelemetry_otlp::SpanExporter, String> {
    use opentelemetry_otlp::WithExportConfig;
    let built = match endpoint.protocol {
        OtlpProtocol::Grpc => {
            let mut b = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_timeout(EXPORT_TIMEOUT);
            if let Some(url) = &endpoint.url {
                b = b.with_endpoint(url.clone());
            }
            b.build()
        }
        OtlpProtocol::HttpProtobuf => {
            let mut b = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_timeout(EXPORT_TIMEOUT);
            if let Some(url) = &endpoint.url {
                // A bare base URL gets the standard traces path, as the OTLP spec does
                // for OTEL_EXPORTER_OTLP_ENDPOINT.
                let trimmed = url.trim_end_matches('/');
                let full = if trimmed.ends_with("/v1/traces") {
                    trimmed.to_string()
                } else {
                    format!("{trimmed}/v1/traces")
                };
                b = b.with_endpoint(full);
            }
            b.build()
        }
    };
    let mut exporter = built.map_err(|e| format!("cannot build the OTLP exporter: {e}"))?;
    exporter.set_resource(resource);
    Ok(exporter)
}

/// The sampler's side of the queue.
#[derive(Clone)]
pub struct Queue {
    tx: mpsc::Sender<SpanData>,
    store: Arc<Store>,
    target: String,
}

impl Queue {
    /// Queues a span without waiting; a full queue drops it (counted).
    pub fn push(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            self.drop_spans("queue_full", 1);
        }
    }

    pub fn drop_spans(&self, reason: &'static str, n: u64) {
        self.store.count_spans(&self.target, Some(reason), n);
    }
}

/// Creates the queue and the task that drains it into `exporter`. The task ends, after
/// a last export, when every `Queue` clone is dropped.
pub fn start(
    exporter: opentelemetry_otlp::SpanExporter,
    capacity: usize,
    store: Arc<Store>,
    target: String,
) -> (Queue, tokio::task::JoinHandle<()>) {
    let (queue, rx) = queue(capacity, &store, &target);
    let handle = tokio::spawn(drain(rx, exporter, store, target));
    (queue, handle)
}

/// Like [`start`], but the task prints each span on stderr ([`console_line`]) and counts
/// it as exported. Printing never fails, so nothing is dropped but for a full queue.
pub fn start_console(
    capacity: usize,
    store: Arc<Store>,
    target: String,
) -> (Queue, tokio::task::JoinHandle<()>) {
    let (queue, mut rx) = queue(capacity, &store, &target);
    let handle = tokio::spawn(async move {
        while let Some(span) = rx.recv().await {
            eprintln!("{}", console_line(&target, &span));
            store.count_spans(&target, None, 1);
        }
    });
    (queue, handle)
}

fn queue(capacity: usize, store: &Arc<Store>, target: &str) -> (Queue, mpsc::Receiver<SpanData>) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    store.enable_spans(target, REASONS);
    let queue = Queue {
        tx,
        store: Arc::clone(store),
        target: target.to_string(),
    };
    (queue, rx)
}

/// Longest query text on a console line; the rest is cut with `…`.
const CONSOLE_QUERY_MAX: usize = 120;

/// One span as one console line: `span TRACE_ID DURATION target/database: QUERY`, the
/// query being the span's masked `db.query.text` with its whitespace collapsed.
pub fn console_line(target: &str, span: &SpanData) -> String {
    let attr = |key: &str| {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.as_str().into_owned())
            .unwrap_or_default()
    };
    let secs = span
        .end_time
        .duration_since(span.start_time)
        .unwrap_or_default()
        .as_secs_f64();
    let query = attr("db.query.text");
    let mut words = query.split_whitespace().collect::<Vec<_>>().join(" ");
    if let Some((cut, _)) = words.char_indices().nth(CONSOLE_QUERY_MAX) {
        words.truncate(cut);
        words.push('…');
    }
    format!(
        "span {} {secs:.3}s {target}/{}: {words}",
        span.span_context.trace_id(),
        attr("db.namespace"),
    )
}

async fn drain(
    mut rx: mpsc::Receiver<SpanData>,
    mut exporter: opentelemetry_otlp::SpanExporter,
    store: Arc<Store>,
    target: String,
) {
    let mut failing = false;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + BATCH_DELAY;
        while batch.len() < BATCH_MAX {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        let result = tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(batch)).await;
        match result {
            Ok(Ok(())) => {
                if failing {
                    tracing::info!(target = %target, "span export works again");
                    failing = false;
                }
                store.count_spans(&target, None, n);
            }
            Ok(Err(e)) => {
                if !failing {
                    tracing::warn!(target = %target, "span export failed, dropping {n} spans (logged once until it works again): {e}");
                    failing = true;
                }
                store.count_spans(&target, Some("export_failed"), n);
            }
            Err(_) => {
                if !failing {
                    tracing::warn!(target = %target, "span export timed out after {EXPORT_TIMEOUT:?}, dropping {n} spans");
                    failing = true;
                }
                store.count_spans(&target, Some("export_failed"), n);
            }
        }
    }
    let _ = exporter.shutdown();
}
