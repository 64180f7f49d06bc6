//! The demo's workload: a small schema and a few sessions that give each signal pgvigil
//! is for something to show: fast and erratic queries (pg_stat_statements window
//! stddev), a lock pile-up every 30 s (a transaction holds a row while two sessions queue
//! behind it), an index build about every minute, and one invalid index left by a failed
//! `CREATE UNIQUE INDEX CONCURRENTLY`. Each session is a `psql` child of a thread; the
//! threads stop when the [`Workload`] is dropped, killing the `psql` they are waiting for
//! (their own child, by its handle) rather than waiting out a 12 s lock hold.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use super::cluster::{ClusterError, TempCluster};

/// The workload's threads; dropping it stops them and waits for them.
pub(super) struct Workload {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Workload {
    /// Creates database `shop` with its tables and the invalid index, then starts the
    /// workload threads against it as the superuser.
    pub(super) fn start(cluster: &TempCluster) -> Result<Workload, ClusterError> {
        cluster.psql("postgres", "CREATE DATABASE shop;")?;
        cluster.psql(
            "shop",
            "CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
             CREATE TABLE orders (id bigserial PRIMARY KEY, customer int, total numeric);
             INSERT INTO orders (customer, total) SELECT g % 100, g FROM generate_series(1, 10000) g;
             CREATE TABLE events (id bigint, payload text);
             INSERT INTO events SELECT g, md5(g::text) FROM generate_series(1, 1500000) g;",
        )?;
        // A failed concurrent build leaves an invalid index behind (duplicates in customer).
        let _ = cluster.psql(
            "shop",
            "CREATE UNIQUE INDEX CONCURRENTLY orders_customer_key ON orders (customer);",
        );
        let stop = Arc::new(AtomicBool::new(false));
        let psql = cluster.psql_program();
        let dsn = cluster.dsn_for("postgres", "shop");
        let mut threads = Vec::new();
        type Job = fn(&Path, &str, &AtomicBool);
        let jobs: [Job; 3] = [queries, pile_up, index_builds];
        for job in jobs {
            let (stop, psql, dsn) = (Arc::clone(&stop), psql.clone(), dsn.clone());
            threads.push(thread::spawn(move || job(&psql, &dsn, &stop)));
        }
        Ok(Workload { stop, threads })
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Starts `sql` in one psql session (the caller waits for it, or not). Each `-c` is its
/// own transaction unless the text says BEGIN; several in one string run as one.
fn psql(psql: &Path, dsn: &str, sql: &str) -> Option<std::process::Child> {
    let mut cmd = Command::new(psql);
    cmd.args(["-X", "-q", "-d", dsn]);
    for statement in sql.split(";;") {
        cmd.args(["-c", statement]);
    }
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().ok()
}

/// Waits for our own child `c`; kills it (by its handle) when the demo stops, so that
/// Ctrl-C does not wait for a slow execution.
pub(super) fn wait_or_kill(c: &mut Child, stop: &AtomicBool) {
    loop {
        match c.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) if stop.load(Ordering::Relaxed) => {
                let _ = c.kill();
                let _ = c.wait();
                return;
            }
            Ok(None) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Sleeps `secs` in short steps; false when the demo is stopping.
fn pause(stop: &AtomicBool, secs: f64) -> bool {
    let mut left = secs;
    while left > 0.0 {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        thread::sleep(Duration::from_secs_f64(left.min(0.2)));
        left -= 0.2;
    }
    !stop.load(Ordering::Relaxed)
}

/// Quick lookups, an update, and a report whose latency jumps around.
fn queries(bin: &Path, dsn: &str, stop: &AtomicBool) {
    let mut round = 0u64;
    loop {
        round += 1;
        let erratic = if round % 5 == 0 { 0.3 } else { 0.02 };
        let sql = format!(
            "SELECT count(*) FROM orders WHERE customer = {c};
             SELECT pg_sleep({erratic}) /* erratic report */;
             UPDATE orders SET total = total + 1 WHERE id = {id};",
            c = round % 100,
            id = round % 10_000 + 1
        );
        if let Some(mut c) = psql(bin, dsn, &sql) {
            wait_or_kill(&mut c, stop);
        }
        if !pause(stop, 0.5) {
            return;
        }
    }
}

/// Every 30 s: a transaction holds a row for 12 s while two sessions queue behind it.
fn pile_up(bin: &Path, dsn: &str, stop: &AtomicBool) {
    while pause(stop, 20.0) {
        let holder = psql(
            bin,
            dsn,
            "BEGIN; SELECT * FROM orders WHERE id = 1 FOR UPDATE; SELECT pg_sleep(12); COMMIT;",
        );
        thread::sleep(Duration::from_millis(300));
        let waiters: Vec<_> = (0..2)
            .filter_map(|_| psql(bin, dsn, "UPDATE orders SET total = total WHERE id = 1"))
            .collect();
        for mut c in holder.into_iter().chain(waiters) {
            wait_or_kill(&mut c, stop);
        }
    }
}

/// Every minute: build an index on `events` and drop it again.
fn index_builds(bin: &Path, dsn: &str, stop: &AtomicBool) {
    while pause(stop, 45.0) {
        if let Some(mut c) = psql(
            bin,
            dsn,
            // `;;` separates statements that must not share a transaction.
            // A deliberately slow build (small sort memory, ICU comparisons): a few seconds.
            "SET maintenance_work_mem = '1MB';; SET max_parallel_maintenance_workers = 0;; \
             CREATE INDEX CONCURRENTLY events_payload_idx ON events \
             (md5(payload) COLLATE \"en-x-icu\", md5(id::text));; DROP INDEX IF EXISTS events_payload_idx",
        ) {
            wait_or_kill(&mut c, stop);
        }
    }
}
