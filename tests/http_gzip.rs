//! `/metrics` content coding over a real socket on 127.0.0.1:0, against a store filled by
//! hand: gzip for a client that accepts it (as Prometheus asks), decompressing to exactly
//! the identity body; identity without `Accept-Encoding`; and a scrape after a poll changed
//! one target's snapshot shows the change in every format and coding (no stale cache).

use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pgvigil::http::Server;
use pgvigil::metric::{Family, MetricType, Sample};
use pgvigil::store::{Snapshot, Store};
use reqwest::blocking::{Client, Response};
use reqwest::header::{ACCEPT, ACCEPT_ENCODING, CONTENT_ENCODING, VARY};

const OPENMETRICS: &str =
    "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";

/// `pgvigil::http` serving `server` on its own runtime thread; stopped on drop.
struct TestServer {
    addr: SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    fn start(server: Arc<Server>) -> TestServer {
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
                pgvigil::http::serve(listener, server, stop_rx).await;
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

    /// `GET /metrics` with the given headers; reqwest here has no gzip feature, so the
    /// body arrives as sent.
    fn metrics(&self, headers: &[(reqwest::header::HeaderName, &str)]) -> Response {
        let mut req = Client::new()
            .get(format!("http://{}/metrics", self.addr))
            .timeout(Duration::from_secs(10));
        for (k, v) in headers {
            req = req.header(k, *v);
        }
        req.send().expect("GET /metrics")
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

fn header(resp: &Response, name: reqwest::header::HeaderName) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn gunzip(bytes: &[u8]) -> String {
    let mut out = String::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .read_to_string(&mut out)
        .expect("a valid gzip body");
    out
}

/// One gauge family of `target` with `n` series, the first at `value`.
fn snapshot(target: &str, value: f64, n: usize) -> Snapshot {
    Snapshot {
        families: vec![Family {
            name: Arc::from("pg_test_calls"),
            help: Arc::from("Calls by query."),
            kind: MetricType::Gauge,
            samples: (0..n)
                .map(|i| Sample {
                    labels: vec![
                        (Arc::from("target"), target.to_string()),
                        (Arc::from("queryid"), format!("{i}")),
                    ],
                    value: if i == 0 { value } else { i as f64 },
                })
                .collect(),
        }],
    }
}

fn key(target: &str) -> (String, String, String) {
    (target.into(), "test".into(), String::new())
}

fn store_with_two_targets() -> Arc<Store> {
    let store = Store::new();
    for t in ["t1", "t2"] {
        store.add_target(t, vec![(Arc::from("target"), t.to_string())]);
        store.put(key(t), snapshot(t, 1.0, 500));
        store.update_target(t, |h| {
            h.up = true;
            h.ready = true;
        });
    }
    store
}

#[test]
fn gzip_when_accepted_decompresses_to_the_identity_body() {
    let server = Server::new(store_with_two_targets());
    let http = TestServer::start(server);
    for accept in [None, Some(OPENMETRICS)] {
        let base: Vec<_> = accept.map(|a| (ACCEPT, a)).into_iter().collect();
        let identity = http.metrics(&base);
        assert_eq!(
            header(&identity, CONTENT_ENCODING),
            None,
            "no Accept-Encoding"
        );
        assert_eq!(header(&identity, VARY).as_deref(), Some("Accept-Encoding"));
        let identity = identity.bytes().unwrap();

        for ae in ["gzip", "gzip, deflate, br", "br;q=1.0, gzip;q=0.8, *;q=0.1"] {
            let mut headers = base.clone();
            headers.push((ACCEPT_ENCODING, ae));
            let resp = http.metrics(&headers);
            assert_eq!(
                header(&resp, CONTENT_ENCODING).as_deref(),
                Some("gzip"),
                "{ae}"
            );
            assert_eq!(header(&resp, VARY).as_deref(), Some("Accept-Encoding"));
            let gz = resp.bytes().unwrap();
            assert!(
                gz.len() * 4 < identity.len(),
                "compressed {} of {} bytes",
                gz.len(),
                identity.len()
            );
            assert_eq!(gunzip(&gz).as_bytes(), identity.as_ref(), "{ae}");
        }

        for ae in ["identity", "gzip;q=0", "br"] {
            let mut headers = base.clone();
            headers.push((ACCEPT_ENCODING, ae));
            let resp = http.metrics(&headers);
            assert_eq!(header(&resp, CONTENT_ENCODING), None, "{ae}");
            assert_eq!(resp.bytes().unwrap(), identity, "{ae}");
        }
    }
}

#[test]
fn a_poll_of_one_target_shows_in_the_next_scrape_in_every_format_and_coding() {
    let store = store_with_two_targets();
    let http = TestServer::start(Server::new(Arc::clone(&store)));
    let first = |accept: Option<&str>, gzip: bool, target: &str| -> String {
        let mut headers = Vec::new();
        if let Some(a) = accept {
            headers.push((ACCEPT, a));
        }
        if gzip {
            headers.push((ACCEPT_ENCODING, "gzip"));
        }
        let resp = http.metrics(&headers);
        let body = if gzip {
            gunzip(&resp.bytes().unwrap())
        } else {
            resp.text().unwrap()
        };
        let prefix = format!("pg_test_calls{{target=\"{target}\",queryid=\"0\"}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no series of {target}:\n{body}"))
    };
    let cases = [(None, "1", "7"), (Some(OPENMETRICS), "1.0", "7.0")];
    for (accept, before, _) in cases {
        for gzip in [false, true] {
            assert_eq!(first(accept, gzip, "t1"), before);
        }
    }
    // t2's collector polls again: t1's part is reused as encoded, t2's is new.
    store.put(key("t2"), snapshot("t2", 7.0, 500));
    for (accept, before, after) in cases {
        for gzip in [false, true] {
            assert_eq!(first(accept, gzip, "t2"), after, "{accept:?} gzip {gzip}");
            assert_eq!(first(accept, gzip, "t1"), before, "{accept:?} gzip {gzip}");
        }
    }
}
