//! `pgvigil demo`: a throwaway local PostgreSQL with a little workload, monitored by
//! pgvigil, for a first look. Everything it starts is stopped and deleted on Ctrl-C.

use std::thread;
use std::time::Duration;

use crate::cluster::{ClusterError, ClusterOptions, TempCluster};

/// The demo's database server plus a background workload.
pub struct Demo {
    pub cluster: TempCluster,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    workload: Option<thread::JoinHandle<()>>,
}

/// The role pgvigil connects as in the demo: only `pg_monitor`, as recommended.
pub const DEMO_ROLE: &str = "pgvigil";

impl Demo {
    /// Starts the cluster, creates a monitoring role and a small schema, and starts a
    /// workload thread (fast, slow and erratic queries).
    pub fn start() -> Result<Demo, ClusterError> {
        let cluster =
            TempCluster::start(ClusterOptions::default().with_setting("track_io_timing", "on"))?;
        cluster.psql(
            "postgres",
            &format!(
                "CREATE ROLE {DEMO_ROLE} LOGIN; GRANT pg_monitor TO {DEMO_ROLE};
                 CREATE DATABASE shop;"
            ),
        )?;
        cluster.psql(
            "shop",
            "CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
             CREATE TABLE orders (id bigserial PRIMARY KEY, customer int, total numeric);
             INSERT INTO orders (customer, total) SELECT g % 100, g FROM generate_series(1, 10000) g;",
        )?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let workload = {
            let stop = stop.clone();
            let dsn = cluster.dsn_for("postgres", "shop");
            let psql = cluster.bindir().join("psql");
            let psql = if psql.exists() { psql } else { "psql".into() };
            thread::spawn(move || workload(&psql, &dsn, &stop))
        };
        Ok(Demo {
            cluster,
            stop,
            workload: Some(workload),
        })
    }

    /// The DSN pgvigil should use.
    pub fn dsn(&self) -> String {
        self.cluster.dsn_for(DEMO_ROLE, "postgres")
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(w) = self.workload.take() {
            let _ = w.join();
        }
    }
}

/// A few psql sessions' worth of load every second: quick lookups, and a query whose
/// latency jumps around (so stddev is interesting).
fn workload(psql: &std::path::Path, dsn: &str, stop: &std::sync::atomic::AtomicBool) {
    let mut round = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        round += 1;
        let erratic_ms = if round % 5 == 0 { 300 } else { 20 };
        let sql = format!(
            "SELECT count(*) FROM orders WHERE customer = {c};
             SELECT pg_sleep({s}) /* erratic report */;
             UPDATE orders SET total = total + 1 WHERE id = {id};",
            c = round % 100,
            s = erratic_ms as f64 / 1000.0,
            id = round % 10_000 + 1
        );
        let _ = std::process::Command::new(psql)
            .args(["-X", "-q", "-d", dsn, "-c", &sql])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        thread::sleep(Duration::from_millis(500));
    }
}
