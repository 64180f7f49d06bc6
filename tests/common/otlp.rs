//! Real OTLP trace receivers that keep every span they are sent: gRPC (tonic, from the
//! opentelemetry-proto definitions), plain or over TLS, and HTTP/protobuf over TLS (hyper +
//! tokio-rustls, bodies decoded with prost); and helpers to read span attributes.

use std::net::SocketAddr;
use std::path::PathBuf;
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

/// Where every received span (and each request's encoding) goes.
#[derive(Clone, Default)]
struct TraceSink {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    /// Per export request: its `grpc-encoding` (gRPC) or `Content-Encoding` (HTTP), or "".
    encodings: Arc<Mutex<Vec<String>>>,
}

impl TraceSink {
    fn keep(&self, req: ExportTraceServiceRequest, encoding: &str) {
        self.encodings.lock().unwrap().push(encoding.to_string());
        let mut spans = self.spans.lock().unwrap();
        for rs in req.resource_spans {
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
    }
}

#[tonic::async_trait]
impl TraceService for TraceSink {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let encoding = req
            .metadata()
            .get("grpc-encoding")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        self.keep(req.into_inner(), &encoding);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A receiver's TLS: its certificate and key (PEM files), and when `client_ca` is set,
/// a client certificate signed by that CA is required (mutual TLS).
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// An OTLP receiver on `addr`, running (on its own runtime thread) until dropped.
pub struct OtlpReceiver {
    sink: TraceSink,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OtlpReceiver {
    /// Starts a plain gRPC receiver and waits until it accepts connections.
    pub fn start(addr: SocketAddr) -> OtlpReceiver {
        Self::grpc(addr, None)
    }

    /// Starts a gRPC receiver over TLS (it accepts gzip requests).
    pub fn start_grpc_tls(addr: SocketAddr, tls: &ServerTls) -> OtlpReceiver {
        Self::grpc(addr, Some(tls.clone()))
    }

    fn grpc(addr: SocketAddr, tls: Option<ServerTls>) -> OtlpReceiver {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        let sink = TraceSink::default();
        let service = TraceServiceServer::new(sink.clone())
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            let read = |p: &PathBuf| std::fs::read(p).unwrap();
            let mut config = ServerTlsConfig::new()
                .identity(Identity::from_pem(read(&tls.cert), read(&tls.key)));
            if let Some(ca) = &tls.client_ca {
                config = config.client_ca_root(Certificate::from_pem(read(ca)));
            }
            server = server.tls_config(config).unwrap();
        }
        Self::run(addr, sink, move |rx| async move {
            server
                .add_service(service)
                .serve_with_shutdown(addr, async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        })
    }

    /// Starts an HTTP/protobuf receiver over TLS on `POST /v1/traces` (gzip bodies too).
    pub fn start_http_tls(addr: SocketAddr, tls: &ServerTls) -> OtlpReceiver {
        let sink = TraceSink::default();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(tls)));
        let served = sink.clone();
        Self::run(addr, sink, move |mut rx| async move {
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
            loop {
                let (tcp, _) = tokio::select! {
                    accepted = listener.accept() => accepted.unwrap(),
                    _ = &mut rx => return,
                };
                let (acceptor, sink) = (acceptor.clone(), served.clone());
                tokio::spawn(async move {
                    // A failed handshake (untrusted client, no client certificate) just
                    // closes the connection, as a real receiver does.
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let sink = sink.clone();
                        async move { Ok::<_, std::convert::Infallible>(http_export(&sink, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        })
    }

    /// Runs `serve` on a runtime thread and waits until `addr` accepts connections.
    fn run<F, Fut>(addr: SocketAddr, sink: TraceSink, serve: F) -> OtlpReceiver
    where
        F: FnOnce(tokio::sync::oneshot::Receiver<()>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(serve(rx));
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "OTLP receiver did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        OtlpReceiver {
            sink,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.sink.spans.lock().unwrap().clone()
    }

    /// The encoding of each export request received so far ("" = none).
    pub fn encodings(&self) -> Vec<String> {
        self.sink.encodings.lock().unwrap().clone()
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

/// rustls (ring) server config for `tls`, requiring a client certificate when
/// `client_ca` is set.
fn server_config(tls: &ServerTls) -> tokio_rustls::rustls::ServerConfig {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<_> = CertificateDer::pem_file_iter(&tls.cert)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(&tls.key).unwrap();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match &tls.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).unwrap() {
                roots.add(c.unwrap()).unwrap();
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    builder.with_single_cert(certs, key).unwrap()
}

/// `POST /v1/traces` with an `ExportTraceServiceRequest` body (gzip or not).
async fn http_export(
    sink: &TraceSink,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    use http_body_util::BodyExt;
    use prost::Message;
    let reply = |status: u16, body: Vec<u8>| {
        hyper::Response::builder()
            .status(status)
            .header("content-type", "application/x-protobuf")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap()
    };
    if req.method() != hyper::Method::POST || req.uri().path() != "/v1/traces" {
        return reply(404, Vec::new());
    }
    let encoding = req
        .headers()
        .get("content-encoding")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let Ok(body) = req.into_body().collect().await else {
        return reply(400, Vec::new());
    };
    let mut bytes = body.to_bytes().to_vec();
    if encoding == "gzip" {
        use std::io::Read;
        let mut plain = Vec::new();
        if flate2::read::GzDecoder::new(&bytes[..])
            .read_to_end(&mut plain)
            .is_err()
        {
            return reply(400, Vec::new());
        }
        bytes = plain;
    }
    match ExportTraceServiceRequest::decode(&bytes[..]) {
        Ok(request) => {
            sink.keep(request, &encoding);
            reply(
                200,
                ExportTraceServiceResponse {
                    partial_success: None,
                }
                .encode_to_vec(),
            )
        }
        Err(_) => reply(400, Vec::new()),
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
