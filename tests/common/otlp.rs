//! A real OTLP gRPC trace receiver (tonic, from the opentelemetry-proto definitions) that
//! keeps every span it is sent, and helpers to read span attributes.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
pub use opentelemetry_proto::tonic::common::v1::any_value::Value;
pub use opentelemetry_proto::tonic::common::v1::KeyValue;
pub use opentelemetry_proto::tonic::trace::v1::Span;

/// A received span with its resource attributes.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub resource: Vec<KeyValue>,
    pub span: Span,
}

/// The gRPC service: appends every exported span to `spans`.
#[derive(Clone, Default)]
struct TraceSink {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

#[tonic::async_trait]
impl TraceService for TraceSink {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let resource = rs.resource.map(|r| r.attributes).unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push(ReceivedSpan {
                        resource: resource.clone(),
                        span,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// An OTLP gRPC receiver on `addr`, running (on its own runtime thread) until dropped.
pub struct OtlpReceiver {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OtlpReceiver {
    /// Starts the receiver and waits until it accepts connections.
    pub fn start(addr: SocketAddr) -> OtlpReceiver {
        let sink = TraceSink::default();
        let spans = sink.spans.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async move {
                tonic::transport::Server::builder()
                    .add_service(TraceServiceServer::new(sink))
                    .serve_with_shutdown(addr, async {
                        let _ = rx.await;
                    })
                    .await
                    .unwrap();
            });
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "OTLP receiver did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        OtlpReceiver {
            spans,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits (up to 30 s) until `ok` accepts the spans received so far, and returns them.
    pub fn wait_for(
        &self,
        what: &str,
        mut ok: impl FnMut(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let spans = self.spans();
            if ok(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {spans:#?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The value of attribute `key`, if present.
pub fn attr(kv: &[KeyValue], key: &str) -> Option<Value> {
    kv.iter()
        .find(|k| k.key == key)
        .and_then(|k| k.value.clone())
        .and_then(|v| v.value)
}

/// The string value of attribute `key`; panics if it is missing or not a string.
pub fn attr_str(kv: &[KeyValue], key: &str) -> String {
    match attr(kv, key) {
        Some(Value::StringValue(s)) => s,
        other => panic!("attribute {key}: {other:?}"),
    }
}

/// Trace and span ids as lowercase hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
