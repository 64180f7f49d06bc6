//! pgvigil's own work as spans (`tracing.self: true`, off by default): each poll of a
//! target (`poll {target}`) and each collector run in it (`collector {name}`), so an
//! operator sees in the trace backend which collector is slow.
//!
//! The poller opens these spans with the `tracing` crate ([`poll`], [`collector`]), at
//! debug level under the target [`TARGET`]; with `tracing.self` off nothing consumes them
//! and the log's filter (info by default) disables them at their call site. With it on,
//! `main` installs [`layer`] next to the log's layer at start: `tracing-opentelemetry`
//! turns these spans (and only these: not log events, not other crates' spans) into
//! OpenTelemetry spans, which a bounded queue hands to [`export`]'s OTLP exporter, on the
//! same endpoint as the slow-query spans. A full queue drops spans (logged once); nothing
//! ever waits for the network. The layer is chosen at start: changing `tracing.self`
//! takes a restart.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    SdkTracerProvider, Span, SpanData, SpanExporter as _, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use tokio::sync::mpsc;
use tracing::Span as TracingSpan;

use crate::trace::export;

/// The `tracing` target of pgvigil's own spans; the OpenTelemetry layer takes these only.
pub const TARGET: &str = "pgvigil::self";
/// Spans waiting for export; beyond it they are dropped.
const QUEUE: usize = 2048;
const BATCH_MAX: usize = 512;
const BATCH_DELAY: Duration = Duration::from_millis(500);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The span of one poll of `target`: one cluster-scope collector's run, or a round of
/// database visits.
pub fn poll(target: &str) -> TracingSpan {
    tracing::debug_span!(
        target: TARGET,
        "poll",
        otel.name = format!("poll {target}").as_str(),
        target = target,
        error = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

/// The span of one collector's query on `database`; [`rows`] and [`error`] fill it in.
pub fn collector(target: &str, name: &str, database: &str) -> TracingSpan {
    tracing::debug_span!(
        target: TARGET,
        "collector",
        otel.name = format!("collector {name}").as_str(),
        target = target,
        collector = name,
        database = database,
        rows = tracing::field::Empty,
        error = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

/// Records the rows a collector's query returned on the current span.
pub fn rows(n: usize) {
    TracingSpan::current().record("rows", n as i64);
}

/// Marks `span` failed with `message`.
pub fn error(span: &TracingSpan, message: &str) {
    span.record("error", message);
    span.record("otel.status_code", "ERROR");
}

/// The receiving end of the layer's queue, until [`export`] takes it.
static PENDING: Mutex<Option<mpsc::Receiver<SpanData>>> = Mutex::new(None);
/// Keeps the tracer provider of the layer alive for the process.
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Hands ended spans to the queue without waiting.
#[derive(Debug)]
struct Forward {
    tx: mpsc::Sender<SpanData>,
    /// A drop was logged already.
    dropped: AtomicBool,
}

impl SpanProcessor for Forward {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() && !self.dropped.swap(true, Ordering::Relaxed) {
            tracing::warn!("tracing.self: the span queue is full (the OTLP endpoint is slow or down); dropping pgvigil's own spans (logged once)");
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// The `tracing-opentelemetry` layer for pgvigil's own spans, filtered to them; its
/// spans wait in a bounded queue until [`export`] sends them. Install it once, at start.
pub fn layer<S>() -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer as _;
    let (tx, rx) = mpsc::channel(QUEUE);
    *PENDING.lock().unwrap_or_else(|e| e.into_inner()) = Some(rx);
    let provider = SdkTracerProvider::builder()
        .with_span_processor(Forward {
            tx,
            dropped: AtomicBool::new(false),
        })
        .build();
    let tracer = provider.tracer("pgvigil");
    let _ = PROVIDER.set(provider);
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        // Its own `target` attribute (the tracing target) would hide ours.
        .with_target(false)
        .with_level(false)
        .with_filter(tracing_subscriber::filter::filter_fn(|m| {
            m.is_span() && m.target() == TARGET
        }))
}

/// Starts sending the layer's spans to `endpoint` as `service`; `false` when no layer
/// was installed (`tracing.self` was off at start, or pgvigil runs as a library).
pub fn export(endpoint: &export::Endpoint, service: &str) -> Result<bool, String> {
    let Some(rx) = PENDING.lock().unwrap_or_else(|e| e.into_inner()).take() else {
        return Ok(false);
    };
    let resource = Resource::builder()
        .with_service_name(service.to_string())
        .with_attributes([KeyValue::new("pgvigil.self", true)])
        .build();
    let exporter = export::build_exporter(endpoint, &resource)?;
    tokio::spawn(drain(rx, exporter));
    Ok(true)
}

async fn drain(mut rx: mpsc::Receiver<SpanData>, exporter: opentelemetry_otlp::SpanExporter) {
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
        let n = batch.len();
        match tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(batch)).await {
            Ok(Ok(())) => failing = false,
            Ok(Err(e)) if !failing => {
                tracing::warn!("tracing.self: span export failed, dropping {n} of pgvigil's own spans (logged once until it works again): {e}");
                failing = true;
            }
            Err(_) if !failing => {
                tracing::warn!(
                    "tracing.self: span export timed out, dropping {n} of pgvigil's own spans"
                );
                failing = true;
            }
            _ => {}
        }
    }
}
