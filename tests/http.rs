//! The HTTP server over a real socket on 127.0.0.1:0, against a store filled by hand: no
//! PostgreSQL, no pollers. `/readyz` waits for every target, `/metrics` speaks text 0.0.4
//! by default and OpenMetrics when asked, and anything else gets a plain error; thousands of
//! connections that never finish a request neither block scrapes nor stay open.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgvigil::http::{Limits, Server};
use pgvigil::metric::{Family, MetricType, Sample};
use pgvigil::store::{Snapshot, Store};
use reqwest::blocking::{Client, Response};
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use reqwest::{Method, StatusCode};

const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PLAIN: &str = "text/plain; charset=utf-8";

/// `pgvigil::http` serving `server` on its own runtime thread; stopped on drop.
struct TestServer {
    addr: SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    fn start(server: Arc<Server>) -> TestServer {
        TestServer::start_with(server, Limits::default())
    }

    fn start_with(server: Arc<Server>, limits: Limits) -> TestServer {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let addr = SocketAddr::from(([127, 0, 0, 1], 0));
                let listener = pgvigil::http::bind(addr).await.expect("bind 127.0.0.1:0");
                let _ = addr_tx.send(listener.local_addr().expect("local address"));
                pgvigil::http::serve_with(listener, server, limits, stop_rx).await;
            });
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the server is listening");
        TestServer {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    fn request(&self, method: Method, path: &str, accept: Option<&str>) -> Response {
        let mut req = Client::new()
            .request(method.clone(), format!("http://{}{path}", self.addr))
            .timeout(Duration::from_secs(10));
        if let Some(a) = accept {
            req = req.header(ACCEPT, a);
        }
        req.send()
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    fn get(&self, path: &str) -> Response {
        self.request(Method::GET, path, None)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn content_type(resp: &Response) -> String {
    resp.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

fn labels(pairs: &[(&str, &str)]) -> Vec<(Arc<str>, String)> {
    pairs
        .iter()
        .map(|(k, v)| (Arc::from(*k), v.to_string()))
        .collect()
}

/// A gauge with two series and a counter with one, as one collector's poll of `t1`.
fn snapshot(active: f64) -> Snapshot {
    Snapshot {
        families: vec![
            Family {
                name: Arc::from("pg_test_connections"),
                help: Arc::from("Connections by state."),
                kind: MetricType::Gauge,
                samples: vec![
                    Sample {
                        labels: labels(&[("target", "t1"), ("state", "active")]),
                        value: active,
                    },
                    Sample {
                        labels: labels(&[("target", "t1"), ("state", "idle in transaction")]),
                        value: 2.5,
                    },
                ],
            },
            Family {
                name: Arc::from("pg_test_commits_total"),
                help: Arc::from("Transactions committed."),
                kind: MetricType::Counter,
                samples: vec![Sample {
                    labels: labels(&[("target", "t1"), ("datname", "app")]),
                    value: 42.0,
                }],
            },
        ],
    }
}

fn key() -> (String, String, String) {
    ("t1".into(), "test".into(), String::new())
}

/// A store with target `t1` up and polled once.
fn polled_store() -> Arc<Store> {
    let store = Store::new();
    store.add_target("t1", labels(&[("target", "t1")]));
    store.put(key(), snapshot(3.0));
    store.update_target("t1", |h| {
        h.up = true;
        h.ready = true;
    });
    store
}

/// Asserts that `lines` appear in `body` one after the other, exactly.
fn assert_block(body: &str, lines: &[&str]) {
    let block = format!("{}\n", lines.join("\n"));
    assert!(
        body.contains(&block),
        "expected, as consecutive lines:\n{block}\n--- body ---\n{body}"
    );
}

#[test]
fn readyz_waits_for_the_first_poll_of_every_target() {
    let store = Store::new();
    let http = TestServer::start(Server::new(Arc::clone(&store)));
    let not_ready = |http: &TestServer| {
        let resp = http.get("/readyz");
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(content_type(&resp), PLAIN);
        assert_eq!(
            resp.text().unwrap(),
            "not ready: waiting for the first poll of every target\n"
        );
    };

    not_ready(&http); // no target registered yet
    store.add_target("t1", labels(&[("target", "t1")]));
    store.add_target("t2", labels(&[("target", "t2")]));
    not_ready(&http);
    store.update_target("t1", |h| h.ready = true);
    not_ready(&http); // t2 still waits

    store.update_target("t2", |h| h.ready = true);
    let resp = http.get("/readyz");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(content_type(&resp), PLAIN);
    assert_eq!(resp.text().unwrap(), "ready\n");
}

#[test]
fn metrics_are_text_0_0_4_by_default() {
    let http = TestServer::start(Server::new(polled_store()));
    for accept in [None, Some("text/plain"), Some("*/*")] {
        let resp = http.request(Method::GET, "/metrics", accept);
        assert_eq!(resp.status(), StatusCode::OK, "Accept: {accept:?}");
        assert_eq!(content_type(&resp), TEXT, "Accept: {accept:?}");
        let body = resp.text().unwrap();
        assert_block(
            &body,
            &[
                "# HELP pg_test_commits_total Transactions committed.",
                "# TYPE pg_test_commits_total counter",
                "pg_test_commits_total{target=\"t1\",datname=\"app\"} 42",
                "# HELP pg_test_connections Connections by state.",
                "# TYPE pg_test_connections gauge",
                "pg_test_connections{target=\"t1\",state=\"active\"} 3",
                "pg_test_connections{target=\"t1\",state=\"idle in transaction\"} 2.5",
            ],
        );
        assert_block(&body, &["pg_up{target=\"t1\"} 1"]);
        assert!(!body.contains("# EOF"), "{body}");
    }
}

#[test]
fn metrics_are_openmetrics_when_the_client_asks() {
    let http = TestServer::start(Server::new(polled_store()));
    let resp = http.request(
        Method::GET,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
    );
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(content_type(&resp), OPENMETRICS);
    let body = resp.text().unwrap();
    assert_block(
        &body,
        &[
            "# HELP pg_test_commits Transactions committed.",
            "# TYPE pg_test_commits counter",
            "pg_test_commits_total{target=\"t1\",datname=\"app\"} 42.0",
            "# HELP pg_test_connections Connections by state.",
            "# TYPE pg_test_connections gauge",
            "pg_test_connections{target=\"t1\",state=\"active\"} 3.0",
            "pg_test_connections{target=\"t1\",state=\"idle in transaction\"} 2.5",
        ],
    );
    assert!(body.ends_with("\n# EOF\n"), "{body}");
}

#[test]
fn metrics_follow_the_store() {
    let store = polled_store();
    let server = Server::new(Arc::clone(&store));
    let http = TestServer::start(Arc::clone(&server));
    let active = |http: &TestServer| {
        let body = http.get("/metrics").text().unwrap();
        body.lines()
            .find_map(|l| l.strip_prefix("pg_test_connections{target=\"t1\",state=\"active\"} "))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no active series:\n{body}"))
    };
    assert_eq!(active(&http), "3");
    // A cached body must not outlive the poll it was encoded from.
    store.put(key(), snapshot(7.0));
    assert_eq!(active(&http), "7");
}

#[test]
fn healthz_head_and_errors() {
    let http = TestServer::start(Server::new(Store::new()));

    let resp = http.get("/healthz");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(content_type(&resp), PLAIN);
    assert_eq!(resp.text().unwrap(), "ok\n");

    let resp = http.request(Method::HEAD, "/metrics", None);
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(content_type(&resp), TEXT);
    assert_eq!(resp.text().unwrap(), "");

    let resp = http.get("/nope");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(content_type(&resp), PLAIN);
    assert_eq!(resp.text().unwrap(), "not found; try /metrics\n");

    for method in [Method::POST, Method::PUT, Method::DELETE] {
        let resp = http.request(method.clone(), "/metrics", None);
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(content_type(&resp), PLAIN, "{method}");
        // Today's 405 carries no `Allow` header (RFC 9110 asks for one).
        assert!(resp.headers().get("allow").is_none(), "{method}");
        assert_eq!(resp.text().unwrap(), "only GET is supported\n", "{method}");
    }
}

/// Raises this process's soft open-files limit to the hard one (the test holds both ends
/// of every connection), as pgvigil does for itself at start.
fn raise_open_files() -> libc::rlim_t {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max.min(1 << 20);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// 3,000 connections that send half a request (no final CRLF) and then nothing: scrapes
/// during the attack still answer within a second, and the server closes every one of
/// the half connections within the header read timeout (plus a margin).
#[test]
fn half_requests_neither_block_scrapes_nor_stay_open() {
    const HALF: usize = 3_000;
    let limit = raise_open_files();
    assert!(
        limit > 2 * HALF as libc::rlim_t + 200,
        "open files limit {limit} too low for this test"
    );
    let header_timeout = Duration::from_secs(2);
    let limits = Limits {
        header_read_timeout: header_timeout,
        ..Limits::default()
    };
    let http = TestServer::start_with(Server::new(polled_store()), limits);

    let attack = Instant::now();
    let mut half: Vec<TcpStream> = Vec::with_capacity(HALF);
    for i in 0..HALF {
        let mut c = TcpStream::connect(http.addr).unwrap_or_else(|e| panic!("connect {i}: {e}"));
        // The server may already have closed it (displaced by a newer one): fine.
        let _ = c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n");
        half.push(c);
    }
    let opened = attack.elapsed();
    eprintln!("{HALF} half connections opened in {opened:?}");

    for i in 0..5 {
        let started = Instant::now();
        let resp = http.get("/metrics");
        let took = started.elapsed();
        assert_eq!(resp.status(), StatusCode::OK, "scrape {i}");
        assert!(resp.text().unwrap().contains("pg_up{target=\"t1\"} 1"));
        assert!(
            took < Duration::from_secs(1),
            "scrape {i} during the attack took {took:?}"
        );
        eprintln!("scrape {i} during the attack: {took:?}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Every half connection reads EOF or a reset by the deadline.
    let deadline = attack + opened + header_timeout + Duration::from_secs(3);
    let mut buf = [0u8; 256];
    for (i, c) in half.iter_mut().enumerate() {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "half connection {i} still open {:?} after the attack began",
                attack.elapsed()
            );
            c.set_read_timeout(Some(left)).unwrap();
            match c.read(&mut buf) {
                Ok(0) => break,
                // A 408 or similar before the close is fine; keep reading to the close.
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    break
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!(
                        "half connection {i} still open {:?} after the attack began",
                        attack.elapsed()
                    )
                }
                Err(e) => panic!("half connection {i}: {e}"),
            }
        }
    }
    eprintln!(
        "all {HALF} half connections closed {:?} after the attack began",
        attack.elapsed()
    );
    // And the server still answers afterwards.
    assert_eq!(http.get("/metrics").status(), StatusCode::OK);
}
