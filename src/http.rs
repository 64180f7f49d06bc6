//! The HTTP server: `/metrics`, `/healthz`, `/readyz`. The `/metrics` handler only encodes
//! what the store holds; it never touches PostgreSQL, so scrape load never reaches the
//! database. An encoded body is reused until the store changes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::exposition::{self, Format};
use crate::store::Store;

/// Which store contents a cached body was encoded from: (store identity, generation).
type Version = (usize, u64);

/// State shared by all connections.
pub struct Server {
    /// Replaced on a config reload; a short-held lock, never across an `.await`.
    store: std::sync::RwLock<Arc<Store>>,
    /// Last encoded body per format, with the store (identity, generation) it was made from.
    cache: Mutex<Vec<(Format, Version, Bytes)>>,
}

impl Server {
    pub fn new(store: Arc<Store>) -> Arc<Server> {
        Arc::new(Server {
            store: std::sync::RwLock::new(store),
            cache: Mutex::new(Vec::new()),
        })
    }

    /// Serves from `store` from now on (after a config reload).
    pub fn set_store(&self, store: Arc<Store>) {
        *self.store.write().unwrap_or_else(|e| e.into_inner()) = store;
    }

    fn store(&self) -> Arc<Store> {
        Arc::clone(&self.store.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The `/metrics` body in `format`, from cache when the store has not changed.
    pub fn metrics(&self, format: Format) -> Bytes {
        let store = self.store();
        let generation = (Arc::as_ptr(&store) as usize, store.generation());
        {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, _, body)) = cache
                .iter()
                .find(|(f, g, _)| *f == format && *g == generation)
            {
                return body.clone();
            }
        }
        let snapshots = store.snapshots();
        let extra = crate::health::self_metrics(&store);
        let body = Bytes::from(exposition::encode(snapshots, extra, format));
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|(f, _, _)| *f != format);
        cache.push((format, generation, body.clone()));
        body
    }

    fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported\n");
        }
        match req.uri().path() {
            "/metrics" => {
                let accept = req.headers().get(ACCEPT).and_then(|v| v.to_str().ok());
                let format = Format::from_accept(accept);
                let mut resp = Response::new(Full::new(self.metrics(format)));
                resp.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(format.content_type()),
                );
                resp
            }
            "/healthz" => plain(StatusCode::OK, "ok\n"),
            "/readyz" => {
                if self.store().ready() {
                    plain(StatusCode::OK, "ready\n")
                } else {
                    plain(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: waiting for the first poll of every target\n",
                    )
                }
            }
            "/" => {
                let mut r = plain(
                    StatusCode::OK,
                    "<html><body><h1>pgvigil</h1><p><a href=\"/metrics\">metrics</a> · <a href=\"/healthz\">healthz</a> · <a href=\"/readyz\">readyz</a></p></body></html>\n",
                );
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/html; charset=utf-8"),
                );
                r
            }
            _ => plain(StatusCode::NOT_FOUND, "not found; try /metrics\n"),
        }
    }
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Binds `addr`; separate from [`serve`] so callers learn the port (`127.0.0.1:0`) and
/// bind errors before anything else starts.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    server: Arc<Server>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let server = Arc::clone(&server);
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let resp = server.handle(&req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
