//! The HTTP server: `/metrics`, `/healthz`, `/readyz`. The `/metrics` handler only serves
//! what the store holds; it never touches PostgreSQL, so scrape load never reaches the
//! database. Snapshots are encoded when they are stored (see [`crate::exposition`]), so a
//! scrape after a poll only stitches ready bytes and encodes the few self-metrics; the body
//! (and its gzip, for clients that accept it) is then reused until the store changes.
//!
//! The listener holds up against clients that connect and never finish a request: a
//! connection must deliver its request headers within a deadline, lives at most a bounded
//! time, and the number of open connections is capped (see [`Limits`]); when the cap is
//! reached, a new connection takes the place of the oldest one that has not sent a request
//! yet, so a scrape still gets through while junk connections pile up.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, ACCEPT, ACCEPT_ENCODING, AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, VARY,
    WWW_AUTHENTICATE,
};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use crate::exposition::{self, Encoded, Format};
use crate::store::Snapshot;
use crate::store::Store;
use crate::web::Web;

/// State shared by all connections.
pub struct Server {
    /// The process's one store (a reload changes what writes into it, not the store).
    store: Arc<Store>,
    /// Targets registered by `/probe?…&auth_module=`; the run loop polls them.
    registry: Arc<crate::probe::Registry>,
    /// Last body per format and encoding, with the store generation it was made from.
    /// Held only to look up or insert an `Arc`'d `Bytes`, never while building or writing.
    cache: Mutex<Vec<Cached>>,
    /// The last `/metrics` layout, reused while the parts keep their shapes.
    layouts: exposition::Layouts,
}

/// One cached `/metrics` body.
struct Cached {
    format: Format,
    gzip: bool,
    generation: u64,
    body: Bytes,
}

impl Server {
    pub fn new(store: Arc<Store>) -> Arc<Server> {
        Arc::new(Server {
            store,
            registry: Arc::default(),
            cache: Mutex::new(Vec::new()),
            layouts: exposition::Layouts::default(),
        })
    }

    fn store(&self) -> &Store {
        &self.store
    }

    /// The targets `/probe` registered, for the run loop.
    pub fn registry(&self) -> Arc<crate::probe::Registry> {
        Arc::clone(&self.registry)
    }

    /// Before `/probe?target=T&auth_module=M` is answered: registers `T` if it is neither
    /// configured nor registered yet, and waits (within Prometheus' scrape timeout, less
    /// half a second; 10 s without the header) until its first poll cycle is done. An
    /// error response for an unknown module or a malformed target.
    async fn register_probed(&self, req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
        let params = query_params(req.uri().query());
        let module_name = params.get("auth_module")?;
        let target = params.get("target").filter(|t| !t.is_empty())?;
        let Some(module) = self.registry.module(module_name) else {
            return Some(text(
                StatusCode::BAD_REQUEST,
                format!(
                    "unknown auth_module {module_name:?}: name one of the config's auth_modules\n"
                ),
            ));
        };
        if self.store().has_target(target) && !self.registry.knows(target) {
            return None; // configured: served like any configured target
        }
        let config = match crate::probe::target_config(target, &module) {
            Ok(c) => c,
            Err(e) => return Some(text(StatusCode::BAD_REQUEST, format!("{e}\n"))),
        };
        self.registry.probed(target, || config);
        let budget = req
            .headers()
            .get("x-prometheus-scrape-timeout-seconds")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0)
            .map_or(Duration::from_secs(10), |s| {
                Duration::from_secs_f64((s - 0.5).clamp(0.1, 120.0))
            });
        let deadline = Instant::now() + budget;
        while Instant::now() < deadline {
            let ready = self
                .store()
                .targets()
                .get(target.as_str())
                .is_some_and(|t| t.ready);
            if ready {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// The `/metrics` body in `format`, from cache when the store has not changed.
    pub fn metrics(&self, format: Format) -> Bytes {
        self.body(format, false)
    }

    /// The `/metrics` body in `format`, gzip-compressed when `gzip`: from cache when the
    /// store has not changed, else stitched from the snapshots' ready encodings (plus
    /// the self-metrics, encoded now) and compressed once.
    pub fn body(&self, format: Format, gzip: bool) -> Bytes {
        let generation = self.store().generation();
        if let Some(body) = self.cached(format, gzip, generation) {
            return body;
        }
        let body = self.stitch(format, gzip);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|c| !(c.format == format && c.gzip == gzip));
        cache.push(Cached {
            format,
            gzip,
            generation,
            body: body.clone(),
        });
        body
    }

    /// `/probe?target=NAME`: only that target's series, with its own `pg_up` and
    /// self-metrics (samples whose `target` label is NAME), for a Prometheus job per
    /// target. Encoded per request: one target's series are few.
    fn probe(&self, query: Option<&str>, format: Format) -> Response<Full<Bytes>> {
        let target = query_params(query).remove("target");
        let Some(target) = target.filter(|t| !t.is_empty()) else {
            return plain(
                StatusCode::BAD_REQUEST,
                "missing ?target=NAME (a target name from the configuration)\n",
            );
        };
        let store = self.store();
        if !store.has_target(&target) {
            return text(
                StatusCode::NOT_FOUND,
                format!("unknown target {target:?}: /probe?target= takes the name of a configured target, or HOST:PORT/DB with &auth_module=NAME\n"),
            );
        }
        let mut own = crate::health::self_metrics(store);
        for f in &mut own {
            f.samples.retain(|s| {
                s.labels
                    .iter()
                    .any(|(k, v)| &**k == "target" && *v == target)
            });
        }
        own.retain(|f| !f.samples.is_empty());
        let parts = store.encoded_of(&target);
        let health = Encoded::transient(&Arc::new(Snapshot { families: own }));
        let mut refs: Vec<&Encoded> = parts.iter().map(Arc::as_ref).collect();
        refs.push(&health);
        let body = exposition::stitch(&refs, format);
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        resp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static(format.content_type()),
        );
        resp
    }

    fn cached(&self, format: Format, gzip: bool, generation: u64) -> Option<Bytes> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .iter()
            .find(|c| c.format == format && c.gzip == gzip && c.generation == generation)
            .map(|c| c.body.clone())
    }

    /// The exposition now: every snapshot's encoding, as stored, and the self-metrics;
    /// gzip-compressed from the parts' ready pieces when `gzip`.
    fn stitch(&self, format: Format, gzip: bool) -> Bytes {
        let store = self.store();
        let parts = store.encoded();
        let health = Encoded::transient(&Arc::new(Snapshot {
            families: crate::health::self_metrics(store),
        }));
        let mut refs: Vec<&Encoded> = parts.iter().map(Arc::as_ref).collect();
        refs.push(&health);
        Bytes::from(if gzip {
            self.layouts.stitch_gzip(&refs, format)
        } else {
            self.layouts.stitch(&refs, format)
        })
    }

    fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported\n");
        }
        match req.uri().path() {
            "/metrics" => {
                let accept = req.headers().get(ACCEPT).and_then(|v| v.to_str().ok());
                let format = Format::from_accept(accept);
                let gzip = accepts_gzip(
                    req.headers()
                        .get_all(ACCEPT_ENCODING)
                        .iter()
                        .filter_map(|v| v.to_str().ok()),
                );
                let mut resp = Response::new(Full::new(self.body(format, gzip)));
                let headers = resp.headers_mut();
                headers.insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(format.content_type()),
                );
                headers.insert(VARY, HeaderValue::from_static("Accept-Encoding"));
                if gzip {
                    headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                }
                resp
            }
            "/probe" => {
                let accept = req.headers().get(ACCEPT).and_then(|v| v.to_str().ok());
                self.probe(req.uri().query(), Format::from_accept(accept))
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

/// The query string's parameters, percent-decoded (the last of a repeated name wins).
fn query_params(query: Option<&str>) -> BTreeMap<String, String> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Whether to answer with gzip, from the request's `Accept-Encoding` values (RFC 9110
/// §12.5.3): gzip when it (or `x-gzip`, or `*`) is acceptable with a q-value above 0 and
/// not below the q-value the client gives identity, if it names it. Prometheus sends
/// `Accept-Encoding: gzip`.
pub fn accepts_gzip<'a>(values: impl Iterator<Item = &'a str>) -> bool {
    let (mut gzip, mut identity, mut any) = (None::<f32>, None::<f32>, None::<f32>);
    for item in values.flat_map(|v| v.split(',')) {
        let mut params = item.split(';');
        let coding = params.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = params
            .filter_map(|p| p.trim().strip_prefix("q=").or(p.trim().strip_prefix("Q=")))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        let slot = match coding.as_str() {
            "gzip" | "x-gzip" => &mut gzip,
            "identity" => &mut identity,
            "*" => &mut any,
            _ => continue,
        };
        *slot = Some(slot.map_or(q, |old: f32| old.max(q)));
    }
    let gzip = gzip.or(any).unwrap_or(0.0);
    let identity = identity.or(any).unwrap_or(0.0);
    gzip > 0.0 && gzip >= identity
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

/// How the listener bounds its connections. The defaults suit a Prometheus scraping every
/// few seconds or more, from a handful of servers.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A connection must deliver a request's headers this soon after it opens or after its
    /// previous response (hyper times the wait for the next request from the end of the
    /// last response), so this is also how long an idle keep-alive connection stays open.
    /// Default 5 s: a scraper sends its headers at once; a client that stalls is closed.
    pub header_read_timeout: Duration,
    /// A connection is closed after this long, gracefully (after the response in
    /// flight) and, if that takes more than [`Limits::close_grace`], at once. Default 5 min.
    pub max_connection_age: Duration,
    /// How long a connection past its age may take to finish its response. Default 10 s.
    pub close_grace: Duration,
    /// Open connections at most. Over it, a new connection replaces the oldest one that
    /// has not sent a complete request yet; if every open connection has, the new one is
    /// closed at once. Default 512 (raise `ulimit -n` above this; pgvigil raises its soft
    /// limit to the hard one at start).
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(5),
            max_connection_age: Duration::from_secs(300),
            close_grace: Duration::from_secs(10),
            max_connections: 512,
        }
    }
}

/// The open connections, oldest first, so a new one can displace a connection that has
/// not sent a request. A std mutex: held only to insert, remove or pick, never across an
/// `.await`.
#[derive(Default)]
struct Connections {
    next_id: u64,
    open: BTreeMap<u64, Open>,
}

/// One open connection, as [`Connections`] sees it.
struct Open {
    /// True until the connection's first request headers are read.
    fresh: Arc<AtomicBool>,
    /// Closes the connection when sent (or dropped).
    evict: oneshot::Sender<()>,
}

impl Connections {
    /// Makes room for a new connection under `max`: evicts the oldest fresh one when full.
    /// `false` when full of connections that all made a request (the new one is refused).
    fn admit(&mut self, max: usize) -> bool {
        if self.open.len() < max {
            return true;
        }
        let oldest_fresh = self
            .open
            .iter()
            .find(|(_, c)| c.fresh.load(Ordering::Relaxed))
            .map(|(id, _)| *id);
        match oldest_fresh.and_then(|id| self.open.remove(&id)) {
            Some(c) => {
                let _ = c.evict.send(());
                true
            }
            None => false,
        }
    }
}

/// Removes a connection from the table when its task ends, however it ends.
struct Registered {
    table: Arc<Mutex<Connections>>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        t.open.remove(&self.id);
    }
}

/// Serves until `shutdown` turns true, with the default [`Limits`].
pub async fn serve(listener: TcpListener, server: Arc<Server>, shutdown: watch::Receiver<bool>) {
    serve_with(listener, server, Limits::default(), shutdown).await
}

/// Serves plain HTTP without auth until `shutdown` turns true.
pub async fn serve_with(
    listener: TcpListener,
    server: Arc<Server>,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
) {
    serve_secured(listener, server, limits, None, shutdown).await
}

/// Paths open without basic auth: liveness and readiness say nothing about the databases,
/// and probes (container HEALTHCHECK, Kubernetes) rarely carry credentials.
fn open_path(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz")
}

fn unauthorized() -> Response<Full<Bytes>> {
    let mut r = plain(StatusCode::UNAUTHORIZED, "unauthorized\n");
    r.headers_mut().insert(
        WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"pgvigil\""),
    );
    r
}

/// Serves one accepted connection (plain or TLS) until it ends, is evicted or ages out.
async fn serve_connection<S>(
    io: S,
    builder: hyper::server::conn::http1::Builder,
    server: Arc<Server>,
    web: Option<Arc<Web>>,
    fresh: Arc<AtomicBool>,
    evicted: oneshot::Receiver<()>,
    limits: Limits,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req: Request<Incoming>| {
        fresh.store(false, Ordering::Relaxed);
        let server = Arc::clone(&server);
        let web = web.clone();
        async move {
            if let Some(web) = web.filter(|_| !open_path(req.uri().path())) {
                let header = req.headers().get(AUTHORIZATION).map(|v| v.as_bytes());
                if !web.authorize(header).await {
                    return Ok::<_, Infallible>(unauthorized());
                }
            }
            if req.uri().path() == "/probe" {
                if let Some(refused) = server.register_probed(&req).await {
                    return Ok(refused);
                }
            }
            Ok(server.handle(&req))
        }
    });
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        // Displaced by a newer connection, or the table is gone: drop the socket.
        _ = evicted => return,
        _ = tokio::time::sleep(limits.max_connection_age) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(limits.close_grace, conn).await;
}

/// [`serve_secured`] on a thread of its own with a single-threaded runtime, so a scrape
/// never waits behind a poll's processing (decoding thousands of rows, encoding and
/// compressing a snapshot) on the pollers' workers: the kernel schedules the HTTP thread
/// as soon as a request arrives. Answering from ready bytes, one thread serves tens of
/// thousands of requests per second. The returned receiver resolves when serving ends
/// (after `shutdown`), or at once if the thread cannot start its runtime.
pub fn serve_apart(
    listener: TcpListener,
    server: Arc<Server>,
    limits: Limits,
    web: Option<Arc<Web>>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
    // The listener is registered with the calling runtime's reactor: hand it over as a
    // plain socket (still non-blocking) and register it again with the new runtime.
    let listener = listener.into_std()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (done, finished) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("pgvigil-http".into())
        .spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => serve_secured(listener, server, limits, web, shutdown).await,
                    Err(e) => tracing::error!("cannot serve HTTP: {e}"),
                }
            });
            // Connections still open are dropped with the runtime.
            drop(runtime);
            let _ = done.send(());
        })?;
    Ok(finished)
}

/// Serves until `shutdown` turns true; with `web`, over HTTPS and/or with basic auth as its
/// `web_config_file` says.
pub async fn serve_secured(
    listener: TcpListener,
    server: Arc<Server>,
    limits: Limits,
    web: Option<Arc<Web>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let table = Arc::new(Mutex::new(Connections::default()));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let mut refused_logged: Option<Instant> = None;
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let (fresh, evicted, registered) = {
            let mut t = table.lock().unwrap_or_else(|e| e.into_inner());
            if !t.admit(limits.max_connections) {
                drop(t);
                drop(stream);
                if refused_logged.is_none_or(|at| at.elapsed() > Duration::from_secs(60)) {
                    tracing::warn!(
                        "{} connections open, all busy with requests; refusing new connections",
                        limits.max_connections
                    );
                    refused_logged = Some(Instant::now());
                }
                continue;
            }
            let id = t.next_id;
            t.next_id += 1;
            let fresh = Arc::new(AtomicBool::new(true));
            let (evict, evicted) = oneshot::channel();
            t.open.insert(
                id,
                Open {
                    fresh: Arc::clone(&fresh),
                    evict,
                },
            );
            let registered = Registered {
                table: Arc::clone(&table),
                id,
            };
            (fresh, evicted, registered)
        };
        let server = Arc::clone(&server);
        let builder = builder.clone();
        let web = web.clone();
        tokio::spawn(async move {
            let _registered = registered;
            let Some(acceptor) = web.as_ref().and_then(|w| w.acceptor()) else {
                serve_connection(stream, builder, server, web, fresh, evicted, limits).await;
                return;
            };
            // The handshake counts against the header deadline, and the connection stays
            // displaceable until its first request.
            let mut evicted = evicted;
            let handshake =
                tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream));
            let tls = tokio::select! {
                r = handshake => r,
                _ = &mut evicted => return,
            };
            match tls {
                Ok(Ok(tls)) => {
                    serve_connection(tls, builder, server, web, fresh, evicted, limits).await
                }
                Ok(Err(e)) => tracing::debug!("TLS handshake failed: {e}"),
                Err(_) => tracing::debug!("TLS handshake timed out"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::accepts_gzip;

    fn gz(v: &[&str]) -> bool {
        accepts_gzip(v.iter().copied())
    }

    #[test]
    fn accept_encoding_negotiation() {
        assert!(gz(&["gzip"]), "Prometheus");
        assert!(gz(&["gzip, deflate, br"]));
        assert!(gz(&["deflate", "GZIP;q=0.5"]), "several headers, any case");
        assert!(gz(&["*"]));
        assert!(gz(&["x-gzip"]));
        assert!(!gz(&[]), "no header: identity");
        assert!(!gz(&["identity"]));
        assert!(!gz(&["gzip;q=0"]));
        assert!(!gz(&["*;q=0"]));
        assert!(!gz(&["br, deflate"]));
        assert!(!gz(&["gzip;q=0.5, identity"]), "identity preferred");
        assert!(gz(&["gzip;q=1.0, identity;q=0.5"]));
        assert!(gz(&["gzip ; q=0.8"]));
    }
}
