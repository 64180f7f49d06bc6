//! The one harness for integration tests: a throwaway PostgreSQL (the same code as
//! `pgvigil demo`), pgvigil running in-process on a free port, and scraping helpers.
//!
//! - this file: the cluster, pgvigil in-process ([`start`]) or polled by hand
//!   ([`ManualPoller`]), scraping and parsing `/metrics`, client sessions;
//! - [`binary`]: the real `pgvigil` binary as a child process, killed on drop;
//! - [`otlp`]: real OTLP trace receivers (gRPC, HTTP/protobuf; plain or TLS);
//! - [`pki`]: throwaway CA and certificates (the `openssl` CLI);
//! - [`prometheus`]: a real Prometheus server, and `promtool check metrics`.
#![allow(dead_code)]

pub mod binary;
pub mod otlp;
pub mod pki;
pub mod prometheus;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use pgvigil::config::Config;
pub use pgvigil::demo::cluster::{ClusterOptions, TempCluster};

/// Starts a cluster with pg_stat_statements preloaded (and `extra` settings).
pub fn cluster(extra: &[(&str, &str)]) -> TempCluster {
    let mut opts = ClusterOptions::default();
    for (k, v) in extra {
        opts = opts.with_setting(*k, *v);
    }
    TempCluster::start(opts).expect("start a throwaway PostgreSQL")
}

/// Something serving pgvigil's HTTP endpoints: in-process ([`Running`]) or the binary
/// ([`binary::Pgvigil`]).
pub trait Serving {
    fn addr(&self) -> SocketAddr;

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr(), path)
    }
}

/// pgvigil running in the background of a test; stopped on drop.
pub struct Running {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Serving for Running {
    fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Parses a config text (written to a temp file so errors look real).
pub fn config(yaml: &str) -> Config {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgvigil.yaml");
    std::fs::write(&path, yaml).unwrap();
    Config::load(&path).unwrap_or_else(|e| panic!("config: {e}"))
}

/// Runs pgvigil with `config` (listen is forced to 127.0.0.1:0).
pub fn start(mut config: Config) -> Running {
    config.listen = "127.0.0.1:0".parse().unwrap();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let result = pgvigil::run(
                config,
                None,
                async {
                    let _ = stop_rx.await;
                },
                |addr| {
                    let _ = addr_tx.send(addr);
                },
            )
            .await;
            if let Err(e) = result {
                panic!("pgvigil::run failed: {e}");
            }
        });
    });
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("pgvigil started listening");
    Running {
        addr,
        stop: Some(stop_tx),
        thread: Some(thread),
    }
}

/// A config for one target at `dsn`, polling every second, plus `extra` YAML lines.
pub fn one_target(dsn: &str, extra: &str) -> String {
    format!(
        "targets:\n  - name: t1\n    dsn: \"{dsn}\"\n    labels: {{env: test}}\ncollectors:\n  defaults: {{interval: 1s, timeout: 5s}}\n{extra}"
    )
}

pub fn get(url: &str) -> (u16, String) {
    let client = reqwest::blocking::Client::new();
    match client.get(url).timeout(Duration::from_secs(10)).send() {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.text().unwrap_or_default())
        }
        Err(e) => panic!("GET {url}: {e}"),
    }
}

/// One sample of the text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses text format 0.0.4 (enough for tests: labels with escaped quotes).
pub fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("value in {line}")),
        };
        let (name, labels) = match series.find('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some(i) => (
                series[..i].to_string(),
                parse_labels(&series[i + 1..series.len() - 1]),
            ),
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        assert_eq!(chars.next(), Some('"'));
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => break,
                },
                '"' => break,
                c => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').to_string(), value);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    out
}

/// Samples of `name` whose labels include every `(k, v)` in `want`.
pub fn find<'a>(samples: &'a [Sample], name: &str, want: &[(&str, &str)]) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            want.iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect()
}

/// The single value of `name` with labels `want`, if present.
pub fn value(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> Option<f64> {
    let found = find(samples, name, want);
    assert!(found.len() <= 1, "more than one {name} {want:?}: {found:?}");
    found.first().map(|s| s.value)
}

/// Scrapes until `check` returns Some, or panics after `timeout` with the last scrape.
pub fn wait_for<T>(
    run: &impl Serving,
    timeout: Duration,
    what: &str,
    mut check: impl FnMut(&[Sample]) -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let (_, body) = get(&run.url("/metrics"));
        let samples = parse(&body);
        if let Some(t) = check(&samples) {
            return t;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}; last scrape:\n{body}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Writes `text` to `dir/name`.
pub fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// An address on 127.0.0.1 where nothing listened a moment ago (for a server that is
/// started later, or never).
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A child process (a server a test started) killed by its own handle when the test
/// ends, pass or fail; never by name.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The last `n` lines of `text`, for failure messages.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// pgvigil's pollers driven by hand: each `poll()` runs every collector once, so a test
/// controls exactly what happens between two polls.
pub struct ManualPoller {
    rt: tokio::runtime::Runtime,
    pollers: Vec<std::sync::Arc<pgvigil::collector::poller::TargetPoller>>,
    pub store: std::sync::Arc<pgvigil::store::Store>,
}

impl ManualPoller {
    /// The pollers `pgvigil` itself would start for `config` ([`pgvigil::pollers`]),
    /// not started.
    pub fn new(config: &Config) -> ManualPoller {
        let catalog = pgvigil::collector::pack::Catalog::load(&config.collectors)
            .unwrap_or_else(|e| panic!("packs: {e}"));
        let (store, pollers) =
            pgvigil::pollers(config, &catalog).unwrap_or_else(|e| panic!("pollers: {e}"));
        ManualPoller {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            pollers,
            store,
        }
    }

    /// Runs every collector of every target once and returns the exposition samples.
    pub fn poll(&self) -> Vec<Sample> {
        for p in &self.pollers {
            self.rt.block_on(p.poll_all_once());
        }
        parse(&self.text())
    }

    pub fn text(&self) -> String {
        pgvigil::exposition::encode(
            self.store.snapshots(),
            pgvigil::health::self_metrics(&self.store),
            pgvigil::exposition::Format::Text,
        )
    }
}

// ---- Sessions a test holds open while pgvigil watches (locks, snapshots, builds) ----

/// The runtime that drives every [`Session`] of a test binary.
fn session_runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("session runtime")
    })
}

/// One client session to the test cluster, separate from pgvigil's: it holds locks and
/// snapshots open, or runs a statement that blocks, in the background. Dropping it closes
/// the connection, which rolls back whatever it left open.
pub struct Session {
    client: std::sync::Arc<tokio_postgres::Client>,
    /// The server process of this session (`pg_backend_pid()`).
    pub pid: i32,
}

/// A statement started with [`Session::start`], still running or done.
pub struct Pending(tokio::task::JoinHandle<(Result<(), String>, Instant)>);

fn db_error(e: tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => e.to_string(),
    }
}

impl Session {
    pub fn connect(dsn: &str) -> Session {
        let (client, pid) = session_runtime().block_on(async {
            let (client, connection) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("connect {dsn}: {e}"));
            tokio::spawn(async move {
                let _ = connection.await;
            });
            let pid: i32 = client
                .query_one("SELECT pg_backend_pid()", &[])
                .await
                .expect("pg_backend_pid()")
                .get(0);
            (client, pid)
        });
        Session {
            client: std::sync::Arc::new(client),
            pid,
        }
    }

    /// Runs `sql` (one or more statements) to completion; the server's error on failure.
    pub fn try_run(&self, sql: &str) -> Result<(), String> {
        session_runtime()
            .block_on(self.client.batch_execute(sql))
            .map_err(db_error)
    }

    /// Runs `sql` to completion; panics on error.
    pub fn run(&self, sql: &str) {
        if let Err(e) = self.try_run(sql) {
            panic!("{sql}: {e}");
        }
    }

    /// Starts `sql` in the background (e.g. a statement that will wait for a lock).
    pub fn start(&self, sql: &str) -> Pending {
        let client = std::sync::Arc::clone(&self.client);
        let sql = sql.to_string();
        Pending(session_runtime().spawn(async move {
            let result = client.batch_execute(&sql).await.map_err(db_error);
            (result, Instant::now())
        }))
    }
}

impl Pending {
    pub fn is_finished(&self) -> bool {
        self.0.is_finished()
    }

    /// Waits for the statement to end; its result, or an error after `timeout`.
    pub fn wait(self, timeout: Duration) -> Result<(), String> {
        self.wait_ended(timeout).map(|_| ())
    }

    /// Like [`Pending::wait`], and when the statement ended (measured as it ended).
    pub fn wait_ended(self, timeout: Duration) -> Result<Instant, String> {
        session_runtime().block_on(async {
            match tokio::time::timeout(timeout, self.0).await {
                Ok(Ok((result, ended))) => result.map(|()| ended),
                Ok(Err(e)) => Err(format!("statement task failed: {e}")),
                Err(_) => Err(format!("statement still running after {timeout:?}")),
            }
        })
    }
}

/// Polls `check` every 50 ms until it is true, or panics after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether server process `pid` waits for a heavyweight lock (asked as the superuser).
pub fn waits_for_lock(pg: &TempCluster, pid: i32) -> bool {
    pg.psql(
        "postgres",
        &format!("SELECT count(*) FROM pg_locks WHERE pid = {pid} AND NOT granted"),
    )
    .map(|n| n != "0")
    .unwrap_or(false)
}

/// Creates the login role `monitor` with only `pg_monitor` (once per cluster) and returns
/// its DSN for database `db`.
pub fn pg_monitor_dsn(pg: &TempCluster, db: &str) -> String {
    pg.psql(
        "postgres",
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'monitor') THEN
             CREATE ROLE monitor LOGIN;
             GRANT pg_monitor TO monitor;
           END IF;
         END $$",
    )
    .expect("create the pg_monitor role");
    pg.dsn_for("monitor", db)
}
