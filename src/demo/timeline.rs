//! The demo's timeline: the outages `pgvigil demo` reproduces, one after the other, each
//! long enough for its alert in `alerts/pgvigil.rules.yml` to fire, then repeated. The
//! whole schedule is the [`SCHEDULE`] table (what, when, for how long, the steps that
//! start and end it, where it shows); [`Timeline`] runs it on a thread, tells the user on
//! stderr what is happening ("now: archiving fails for 13 min"), switches WAL segments
//! so that the archiver and the slot have something to work on, and runs the query whose
//! latency turns erratic. Dropping the [`Timeline`] ends whatever scenario is running
//! (closes the idle session, drops the slot, resumes replay, repairs archiving).
//!
//! It must not own the servers: it only talks to them through `psql`, as the workload does.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// Minutes, for the table.
const fn min(m: u64) -> Duration {
    Duration::from_secs(m * 60)
}

/// The schedule repeats with this period; every scenario ends within it.
pub(super) const PERIOD: Duration = min(30);

/// How often the timeline runs `pg_switch_wal()` on the primary (scaled like the rest, but
/// never more often than [`WAL_SWITCH_MIN`]): each switch completes a segment, which the
/// archiver must archive (or fail to) and the slot must retain.
const WAL_SWITCH_EVERY: Duration = Duration::from_secs(20);
const WAL_SWITCH_MIN: Duration = Duration::from_secs(1);

/// `application_name` of the session left idle in its transaction.
pub const IDLE_APP: &str = "demo-idle-in-transaction";

/// The query whose latency turns erratic: `{id}` and `{secs}` are filled in. A shape of
/// its own, so pg_stat_statements gives it its own queryid (comments do not count).
const ERRATIC_SQL: &str =
    "SELECT o.id, o.total, pg_sleep({secs}) FROM orders o WHERE o.id = {id} /* checkout lookup */";
/// Calls of it per round, each of [`ERRATIC_FAST_SECS`]...
const ERRATIC_FAST_CALLS: usize = 10;
const ERRATIC_FAST_SECS: f64 = 0.01;
/// ... plus, while erratic, one slow call per round, these durations in turn: the window
/// stddev then exceeds twice the mean (PostgresQueryErratic), and each slow call is above
/// the 500 ms slow-query threshold, so it becomes a span.
const ERRATIC_SLOW_SECS: [f64; 4] = [1.5, 3.0, 0.6, 2.5];

/// One outage the demo reproduces.
pub(super) struct Scenario {
    /// What the timeline says when it starts ("now: archiving fails for 13 min").
    pub what: &'static str,
    /// How the demo does it.
    pub how: &'static str,
    /// What the timeline says when it ends ("now: archiving recovered").
    pub ended: &'static str,
    /// When it starts, from the beginning of the period.
    pub at: Duration,
    /// How long it lasts.
    pub lasts: Duration,
    pub begin: &'static [Step],
    pub end: &'static [Step],
    /// The alert that fires, and after how long: its threshold plus its `for:` plus a poll
    /// (a unit test checks the `for:` against the rules file).
    pub alert: Option<(&'static str, Duration)>,
    /// Where it shows (dashboard panels), and why not as an alert when it does not.
    pub shows: &'static str,
    /// Only with a standby (skipped with `--no-standby`).
    pub needs_standby: bool,
}

/// What the timeline does to start or end a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// SQL on the primary, database `shop`, as the superuser.
    Primary(&'static str),
    /// SQL on the standby, as the superuser.
    Standby(&'static str),
    /// Makes `archive_command` fail (true) or work again (false): a flag file it tests.
    ArchiveFails(bool),
    /// Opens a session in database `shop` that runs this SQL and then stays idle in its
    /// transaction.
    OpenIdleSession(&'static str),
    /// Rolls that session back and closes it.
    CloseIdleSession,
    /// Turns the erratic executions of [`ERRATIC_SQL`] on or off.
    Erratic(bool),
}

/// The outages, in the order they start. Times are at scale 1 (`--timeline-scale`
/// shrinks them for tests). README "Demo" shows the same table.
pub(super) const SCHEDULE: &[Scenario] = &[
    Scenario {
        what: "archiving fails",
        how: "archive_command exits 1 while WAL keeps coming (the backup that wasn't)",
        ended: "archiving recovered: archive_command works again and archives the backlog",
        at: min(1),
        lasts: min(13),
        begin: &[
            Step::ArchiveFails(true),
            Step::Primary("SELECT pg_switch_wal()"),
        ],
        end: &[
            Step::ArchiveFails(false),
            Step::Primary("SELECT pg_switch_wal()"),
        ],
        alert: Some(("PostgresWalArchivingFailing", min(11))),
        shows: "Operations › Archiving: Archiving failing, Segments archived and failed per second",
        needs_standby: false,
    },
    Scenario {
        what: "a session idles in its transaction",
        how: "BEGIN, one statement, then nothing (application_name demo-idle-in-transaction)",
        ended: "the idle-in-transaction session rolled back",
        at: min(2),
        lasts: min(8),
        begin: &[Step::OpenIdleSession(
            "BEGIN; SELECT txid_current(); SELECT count(*) FROM orders;",
        )],
        end: &[Step::CloseIdleSession],
        alert: Some(("PostgresIdleInTransaction", min(7))),
        shows: "Operations › Connections and long transactions: Oldest transaction, query and \
                idle-in-transaction session",
        needs_standby: false,
    },
    Scenario {
        what: "a forgotten replication slot retains WAL",
        how: "physical slot demo_forgotten_standby, reserved now, never consumed",
        ended: "the forgotten slot dropped: its WAL can be recycled",
        at: min(3),
        lasts: min(15),
        begin: &[Step::Primary(
            "SELECT pg_create_physical_replication_slot('demo_forgotten_standby', true)",
        )],
        end: &[Step::Primary(
            "SELECT pg_drop_replication_slot('demo_forgotten_standby')",
        )],
        alert: None,
        shows: "Operations › Replication and slots: WAL retained by slots, Slots \
                (PostgresReplicationSlotInactive waits for 5 GiB, more than the demo writes)",
        needs_standby: false,
    },
    Scenario {
        what: "a query's latency turns erratic",
        how: "the checkout lookup sometimes sleeps 0.6-3 s instead of 10 ms",
        ended: "the checkout lookup is steady again",
        at: min(4),
        lasts: min(25),
        begin: &[Step::Erratic(true)],
        end: &[Step::Erratic(false)],
        alert: Some(("PostgresQueryErratic", min(21))),
        shows: "Queries › Erratic queries: Window stddev: most variable 10, Erratic queries; \
                its slow executions as console spans",
        needs_standby: false,
    },
    Scenario {
        what: "the standby stops replaying",
        how: "pg_wal_replay_pause() on the standby while the primary keeps committing",
        ended: "the standby replays again and catches up",
        at: min(5),
        lasts: min(12),
        begin: &[Step::Standby("SELECT pg_wal_replay_pause()")],
        end: &[Step::Standby("SELECT pg_wal_replay_resume()")],
        alert: Some(("PostgresStandbyReplayDelay", min(11))),
        shows: "Operations › Replication and slots: Replay delay (standby), Standby lag (bytes)",
        needs_standby: true,
    },
];

/// What the timeline needs to know about the servers.
pub(super) struct Servers {
    pub psql: PathBuf,
    /// Superuser DSN of the primary, database `shop`.
    pub primary: String,
    /// Superuser DSN of the standby, if there is one.
    pub standby: Option<String>,
    /// The file whose presence makes `archive_command` fail.
    pub archive_flag: PathBuf,
}

/// The `archive_command` that fails while `flag` exists and otherwise copies the segment
/// into `dir` (created on first use, by the server's OS user).
pub(super) fn archive_command(flag: &Path, dir: &Path) -> String {
    let (flag, dir) = (
        sh_quote(&flag.to_string_lossy()),
        sh_quote(&dir.to_string_lossy()),
    );
    format!("test ! -f {flag} && mkdir -p {dir} && cp %p {dir}/%f")
}

/// A single-quoted shell word.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The running timeline; dropping it ends the running scenarios and stops its threads.
pub(super) struct Timeline {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Timeline {
    /// Prints the schedule and starts it; times are multiplied by `scale`.
    pub(super) fn start(servers: Servers, scale: f64) -> Timeline {
        let stop = Arc::new(AtomicBool::new(false));
        let erratic = Arc::new(AtomicBool::new(false));
        let servers = Arc::new(servers);
        let scenarios: Vec<&'static Scenario> = SCHEDULE
            .iter()
            .filter(|s| servers.standby.is_some() || !s.needs_standby)
            .collect();
        say(&describe(&scenarios, scale));
        let mut threads = Vec::new();
        {
            let (stop, erratic, servers) = (
                Arc::clone(&stop),
                Arc::clone(&erratic),
                Arc::clone(&servers),
            );
            threads.push(thread::spawn(move || {
                let mut runner = Runner {
                    servers: &servers,
                    erratic: &erratic,
                    idle: None,
                    stop: &stop,
                    scale,
                    started: Instant::now(),
                    next_switch: Instant::now(),
                };
                runner.run(&scenarios);
            }));
        }
        {
            let (stop, erratic, servers) = (Arc::clone(&stop), erratic, Arc::clone(&servers));
            threads.push(thread::spawn(move || {
                erratic_query(&servers, &erratic, &stop)
            }));
        }
        Timeline { stop, threads }
    }
}

impl Drop for Timeline {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The demo's own output, on stderr.
fn say(text: &str) {
    for line in text.lines() {
        eprintln!("pgvigil demo: {line}");
    }
}

/// `d` scaled, for sleeping.
fn scaled(d: Duration, scale: f64) -> Duration {
    d.mul_f64(scale)
}

/// "13 min", "1 min 30 s", "39 s", "0.6 s".
fn human(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 10.0 {
        let s = format!("{secs:.1}");
        return format!("{} s", s.trim_end_matches(".0"));
    }
    let secs = secs.round() as u64;
    match (secs / 60, secs % 60) {
        (0, s) => format!("{s} s"),
        (m, 0) => format!("{m} min"),
        (m, s) => format!("{m} min {s} s"),
    }
}

/// `[mm:ss]` of an elapsed time.
fn clock(d: Duration) -> String {
    let s = d.as_secs();
    format!("[{:02}:{:02}]", s / 60, s % 60)
}

/// The schedule as the user sees it at start.
fn describe(scenarios: &[&Scenario], scale: f64) -> String {
    let mut out = format!(
        "timeline (repeats every {}; watch it with `pgvigil demo --print-prometheus-config`):\n",
        human(scaled(PERIOD, scale))
    );
    for s in scenarios {
        let alert = match s.alert {
            Some((name, after)) => {
                format!("alert {name} fires after ~{}", human(scaled(after, scale)))
            }
            None => "no alert".to_string(),
        };
        out.push_str(&format!(
            "  {} {} for {}: {}; {alert}; {}\n",
            clock(scaled(s.at, scale)),
            s.what,
            human(scaled(s.lasts, scale)),
            s.how,
            s.shows
        ));
    }
    out
}

/// Which edge of a scenario an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Edge {
    Begin,
    End,
}

/// The scenarios' begin and end events within one period, in time order.
fn events<'a>(scenarios: &[&'a Scenario]) -> Vec<(Duration, Edge, &'a Scenario)> {
    let mut out: Vec<_> = scenarios
        .iter()
        .flat_map(|s| [(s.at, Edge::Begin, *s), (s.at + s.lasts, Edge::End, *s)])
        .collect();
    out.sort_by_key(|(at, edge, _)| (*at, *edge == Edge::Begin));
    out
}

/// The timeline thread's state.
struct Runner<'a> {
    servers: &'a Servers,
    erratic: &'a AtomicBool,
    /// The session idle in its transaction, while it exists: psql reading its stdin.
    idle: Option<Child>,
    stop: &'a AtomicBool,
    scale: f64,
    started: Instant,
    next_switch: Instant,
}

impl Runner<'_> {
    fn run(&mut self, scenarios: &[&'static Scenario]) {
        let events = events(scenarios);
        let mut active: Vec<&Scenario> = Vec::new();
        'periods: for period in 0u32.. {
            let base = PERIOD * period;
            for &(at, edge, s) in &events {
                if !self.wait_until(self.started + scaled(base + at, self.scale)) {
                    break 'periods;
                }
                let now = clock(self.started.elapsed());
                match edge {
                    Edge::Begin => {
                        let alert = s
                            .alert
                            .map(|(name, after)| {
                                format!(" (alert {name} in ~{})", human(scaled(after, self.scale)))
                            })
                            .unwrap_or_default();
                        say(&format!(
                            "{now} now: {} for {}{alert}",
                            s.what,
                            human(scaled(s.lasts, self.scale))
                        ));
                        self.steps(s.begin);
                        active.push(s);
                    }
                    Edge::End => {
                        say(&format!("{now} now: {}", s.ended));
                        self.steps(s.end);
                        active.retain(|a| !std::ptr::eq(*a, s));
                    }
                }
            }
        }
        // Stopping: leave nothing behind (the server may outlive us in a test).
        for s in active {
            self.steps(s.end);
        }
        self.close_idle();
    }

    /// Sleeps until `deadline`, switching WAL segments on the way; false when stopping.
    fn wait_until(&mut self, deadline: Instant) -> bool {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            let now = Instant::now();
            if now >= self.next_switch {
                self.sql(&self.servers.primary, "SELECT pg_switch_wal()");
                let every = scaled(WAL_SWITCH_EVERY, self.scale).max(WAL_SWITCH_MIN);
                self.next_switch = Instant::now() + every;
            }
            if now >= deadline {
                return true;
            }
            thread::sleep(
                deadline
                    .min(self.next_switch)
                    .saturating_duration_since(now)
                    .min(Duration::from_millis(200)),
            );
        }
    }

    fn steps(&mut self, steps: &[Step]) {
        for step in steps {
            match *step {
                Step::Primary(sql) => self.sql(&self.servers.primary, sql),
                Step::Standby(sql) => {
                    if let Some(dsn) = &self.servers.standby {
                        self.sql(dsn, sql);
                    }
                }
                Step::ArchiveFails(true) => {
                    if let Err(e) = std::fs::write(&self.servers.archive_flag, b"") {
                        say(&format!(
                            "could not create {}: {e}",
                            self.servers.archive_flag.display()
                        ));
                    }
                }
                Step::ArchiveFails(false) => {
                    let _ = std::fs::remove_file(&self.servers.archive_flag);
                }
                Step::OpenIdleSession(sql) => self.open_idle(sql),
                Step::CloseIdleSession => self.close_idle(),
                Step::Erratic(on) => self.erratic.store(on, Ordering::Relaxed),
            }
        }
    }

    /// Runs `sql` to completion; a failure is told, not fatal.
    fn sql(&self, dsn: &str, sql: &str) {
        let out = psql_command(&self.servers.psql, dsn)
            .args(["-c", sql])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => say(&format!(
                "`{sql}` failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => say(&format!("`{sql}`: cannot run psql: {e}")),
        }
    }

    /// psql with its stdin kept open: it runs `sql` and then waits for more, idle in the
    /// transaction `sql` began.
    fn open_idle(&mut self, sql: &str) {
        self.close_idle();
        let dsn = with_application_name(&self.servers.primary, IDLE_APP);
        let child = psql_command(&self.servers.psql, &dsn)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match child {
            Ok(mut c) => {
                if let Some(stdin) = c.stdin.as_mut() {
                    let _ = writeln!(stdin, "{sql}");
                    let _ = stdin.flush();
                }
                self.idle = Some(c);
            }
            Err(e) => say(&format!("cannot start the idle session: {e}")),
        }
    }

    /// Ends the idle session: ROLLBACK and end of input, then waits for psql to exit.
    fn close_idle(&mut self) {
        if let Some(mut c) = self.idle.take() {
            if let Some(mut stdin) = c.stdin.take() {
                let _ = writeln!(stdin, "ROLLBACK;");
            }
            let _ = c.wait();
        }
    }
}

/// `psql` quiet, without ~/.psqlrc, connecting to `dsn` (giving up after 10 s).
fn psql_command(psql: &Path, dsn: &str) -> Command {
    let mut cmd = Command::new(psql);
    cmd.env("PGCONNECT_TIMEOUT", "10")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn]);
    cmd
}

/// `dsn` (a `postgresql://` URL) with `application_name` set.
fn with_application_name(dsn: &str, name: &str) -> String {
    let sep = if dsn.contains('?') { '&' } else { '?' };
    format!("{dsn}{sep}application_name={name}")
}

/// The checkout lookup, in rounds of [`ERRATIC_FAST_CALLS`] fast calls plus, while
/// `erratic` is on, one slow one.
fn erratic_query(servers: &Servers, erratic: &AtomicBool, stop: &AtomicBool) {
    let mut round = 0usize;
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        let mut script = String::new();
        for i in 0..ERRATIC_FAST_CALLS {
            script.push_str(&erratic_sql(ERRATIC_FAST_SECS, round * 7 + i));
        }
        if erratic.load(Ordering::Relaxed) {
            let slow = ERRATIC_SLOW_SECS[round % ERRATIC_SLOW_SECS.len()];
            script.push_str(&erratic_sql(slow, round));
        }
        let child = psql_command(&servers.psql, &servers.primary)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        if let Ok(mut c) = child {
            if let Some(mut stdin) = c.stdin.take() {
                let _ = stdin.write_all(script.as_bytes());
            }
            super::workload::wait_or_kill(&mut c, stop);
        }
        for _ in 0..5 {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// One call of [`ERRATIC_SQL`]. The duration always has decimals: `3` would be an integer
/// constant, a different parse tree, and so a different queryid than `1.5`.
fn erratic_sql(secs: f64, id: usize) -> String {
    ERRATIC_SQL
        .replace("{secs}", &format!("{secs:.3}"))
        .replace("{id}", &(id % 10_000 + 1).to_string())
        + ";\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `for:` of alert `name` in the shipped rules file.
    fn rule_for(name: &str) -> Duration {
        let rules = include_str!("../../alerts/pgvigil.rules.yml");
        let mut lines = rules
            .lines()
            .skip_while(|l| l.trim() != format!("- alert: {name}"));
        assert!(lines.next().is_some(), "alert {name} in the rules file");
        let f = lines
            .map(str::trim)
            .find_map(|l| l.strip_prefix("for:"))
            .unwrap_or_else(|| panic!("a for: for {name}"));
        humantime::parse_duration(f.trim()).unwrap_or_else(|e| panic!("{name}: {f}: {e}"))
    }

    #[test]
    fn every_scenario_fits_its_period_and_outlasts_its_alert() {
        for s in SCHEDULE {
            assert!(s.at + s.lasts < PERIOD, "{} ends within the period", s.what);
            if let Some((name, after)) = s.alert {
                assert!(
                    rule_for(name) < after,
                    "{}: {name}'s for: is shorter than when the table says it fires",
                    s.what
                );
                assert!(after < s.lasts, "{}: lasts until {name} fires", s.what);
            }
        }
    }

    #[test]
    fn events_are_in_time_order_and_ends_come_first() {
        let all: Vec<&Scenario> = SCHEDULE.iter().collect();
        let ev = events(&all);
        assert_eq!(ev.len(), 2 * SCHEDULE.len());
        assert!(ev.windows(2).all(|w| w[0].0 <= w[1].0));
        assert_eq!(ev[0].1, Edge::Begin);
        assert_eq!(ev.last().map(|e| e.1), Some(Edge::End));
    }

    #[test]
    fn human_durations_and_clock() {
        assert_eq!(human(min(13)), "13 min");
        assert_eq!(human(Duration::from_secs(90)), "1 min 30 s");
        assert_eq!(human(Duration::from_secs(39)), "39 s");
        assert_eq!(human(Duration::from_millis(600)), "0.6 s");
        assert_eq!(human(Duration::from_secs(3)), "3 s");
        assert_eq!(clock(Duration::from_secs(61)), "[01:01]");
        assert_eq!(human(scaled(min(13), 0.05)), "39 s");
    }

    #[test]
    fn archive_command_quotes_its_paths() {
        let c = archive_command(Path::new("/tmp/a b/fail"), Path::new("/tmp/it's"));
        assert_eq!(
            c,
            "test ! -f '/tmp/a b/fail' && mkdir -p '/tmp/it'\\''s' && cp %p '/tmp/it'\\''s'/%f"
        );
    }

    #[test]
    fn erratic_sql_is_one_statement_per_line() {
        assert_eq!(
            erratic_sql(0.01, 3),
            "SELECT o.id, o.total, pg_sleep(0.010) FROM orders o WHERE o.id = 4 /* checkout lookup */;\n"
        );
        assert!(erratic_sql(3.0, 1).contains("pg_sleep(3.000)"));
        assert_eq!(
            with_application_name("postgresql://u@h:1/shop?sslmode=disable", "x"),
            "postgresql://u@h:1/shop?sslmode=disable&application_name=x"
        );
    }
}
