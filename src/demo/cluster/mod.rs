//! Throwaway PostgreSQL clusters for `pgvigil demo` and the integration tests.
//!
//! This module owns everything about running a private, disposable
//! PostgreSQL server:
//!
//! * finding the server binaries ([`find_bindir`]),
//! * `initdb` into a fresh temporary directory, writing `postgresql.conf`
//!   (loopback-only, `pg_stat_statements` preloaded, durability off),
//! * picking a free TCP port and starting the server with `pg_ctl`,
//! * running SQL as the superuser through `psql` ([`TempCluster::psql`]),
//! * stopping / restarting it on the same port, and
//! * tearing everything down (server and directory) on [`Drop`].
//!
//! Everything is synchronous (`std::process`), so it can be used from `Drop`,
//! from plain `#[test]` functions and from async code alike (wrap calls in
//! `spawn_blocking` if you care about not blocking a runtime thread).
//!
//! PostgreSQL refuses to run as root. When this process is root, the module
//! creates the unprivileged OS user [`OS_USER`] (once), hands the temporary
//! directory to it and runs `initdb`, `pg_ctl` and `postgres` through
//! `runuser -u pgvigil-pg --`. `psql` always runs as the calling user.
//!
//! Processes are only ever stopped through `pg_ctl` on our own data directory
//! (or, as a last resort in `Drop`, by signalling the pid recorded in our own
//! `postmaster.pid`); nothing is ever killed by name.
//!
//! Each cluster also has a small watchdog (`sh`, in its own process group)
//! that waits for a pipe from this process to close. If this process dies
//! without running `Drop` (SIGKILL, a test-runner timeout, `panic = "abort"`,
//! a cluster kept in a `static`), the watchdog stops the server with `pg_ctl`
//! and deletes the temp directory, so nothing leaks.
//!
//! # Layout
//! - this file: [`TempCluster`] (start, `psql`, stop and restart, teardown),
//!   [`ClusterOptions`] and [`ClusterError`];
//! - `binaries`: finding the server binaries ([`find_bindir`]) and system tools;
//! - `user`: the unprivileged OS user [`OS_USER`], created under `flock`;
//! - `runner`: running a program as that user, with a clean environment;
//! - `conf`: our `postgresql.conf` block and the caller's settings;
//! - `ports`: free ports, and noticing that a port was taken;
//! - `watchdog`: cleaning up after a process that died without `Drop`;
//! - `pgbouncer`: a throwaway PgBouncer in front of a cluster ([`TempPgBouncer`]).

mod binaries;
mod conf;
mod pgbouncer;
mod ports;
mod runner;
mod user;
mod watchdog;

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tempfile::TempDir;

pub use binaries::{find_bindir, parse_major_version, BINDIR_ENV};
pub use pgbouncer::{PgBouncerOptions, TempPgBouncer, PGBOUNCER_ENV};
pub use user::OS_USER;

use binaries::{check_bindir, is_executable, system_tool};
use conf::{render_base_settings, render_settings};
use ports::{log_says_addr_in_use, pick_port};
use runner::{output_text, run, run_checked, Runner};
use user::{ensure_os_user, is_root};
use watchdog::Watchdog;

/// Database superuser created by `initdb` (trust authentication, no password).
pub const SUPERUSER: &str = "postgres";

/// How many times `start()` tries a fresh port when the chosen one is taken.
const START_ATTEMPTS: u32 = 5;

/// Lines of the server log included in start/stop errors.
const LOG_TAIL_LINES: usize = 30;

/// `pg_ctl -t` for start and stop.
const PG_CTL_TIMEOUT_SECS: &str = "60";

/// Unix socket paths are limited to 107 bytes (plus NUL); the socket file
/// name `.s.PGSQL.NNNNN` takes 15 of them and the `/s/` directory another 3.
const MAX_TEMP_ROOT_LEN: usize = 107 - 15 - 3 - 16;

/// Errors from finding binaries and running a [`TempCluster`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// No usable server binaries anywhere.
    #[error(
        "no PostgreSQL server binaries found (looked in {looked}); \
         install them with: apt-get install postgresql"
    )]
    NoBinaries {
        /// The places that were searched, in order.
        looked: String,
    },

    /// An explicitly configured bindir lacks required binaries.
    #[error(
        "{origin} = {} is not a usable PostgreSQL bindir: missing {missing} \
         (needs postgres, initdb and pg_ctl; install them with: apt-get install postgresql)",
        dir.display()
    )]
    BadBindir {
        /// Where the bindir came from (`$PGVIGIL_PG_BINDIR` or `ClusterOptions::bindir`).
        origin: &'static str,
        /// The directory that was given.
        dir: PathBuf,
        /// Comma-separated list of missing binaries.
        missing: String,
    },

    /// An I/O operation (creating directories, spawning a program, ...) failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A helper program ran but exited unsuccessfully.
    #[error("`{command}` failed ({status}):\n{output}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// Its stdout and stderr.
        output: String,
    },

    /// `pg_ctl start` failed.
    #[error(
        "PostgreSQL server failed to start on 127.0.0.1:{port} (attempt {attempts}): {reason}\n\
         --- last lines of {} ---\n{log_tail}",
        log.display()
    )]
    StartFailed {
        /// The port of the last attempt.
        port: u16,
        /// How many attempts were made.
        attempts: u32,
        /// pg_ctl's own output.
        reason: String,
        /// The server log file.
        log: PathBuf,
        /// Its last lines.
        log_tail: String,
    },

    /// `pg_ctl stop` failed.
    #[error(
        "stopping PostgreSQL server failed: {reason}\n--- last lines of {} ---\n{log_tail}",
        log.display()
    )]
    StopFailed {
        /// pg_ctl's own output.
        reason: String,
        /// The server log file.
        log: PathBuf,
        /// Its last lines.
        log_tail: String,
    },

    /// `psql` reported an error (connection failure or SQL error).
    #[error("psql on database {db:?} failed ({status}) running `{sql}`:\n{stderr}")]
    Psql {
        /// Database name.
        db: String,
        /// The SQL (possibly shortened).
        sql: String,
        /// psql's exit status.
        status: String,
        /// psql's stderr.
        stderr: String,
    },

    /// A `ClusterOptions::settings` entry cannot be written to postgresql.conf.
    #[error("invalid postgresql.conf setting {name:?}: {reason}")]
    InvalidSetting {
        /// The setting name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },

    /// Neither `postgres --version` nor `PG_VERSION` gave a version.
    #[error("could not determine the PostgreSQL major version from {0:?}")]
    Version(String),

    /// No free TCP port could be found on 127.0.0.1.
    #[error("could not find a free TCP port on 127.0.0.1")]
    NoFreePort,
}

/// How to build a [`TempCluster`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterOptions {
    /// Directory with `postgres`, `initdb` and `pg_ctl`; `None` => [`find_bindir`].
    pub bindir: Option<PathBuf>,
    /// Extra `postgresql.conf` settings, written after our defaults (so they
    /// win). Values are written single-quoted with `'` and `\` escaped, so pass
    /// them unquoted: `("pg_stat_statements.max", "100")`.
    pub settings: Vec<(String, String)>,
    /// Extensions created (`CREATE EXTENSION IF NOT EXISTS`) in database
    /// `postgres` right after start.
    pub extensions: Vec<String>,
    /// WAL segment size in MiB (`initdb --wal-segsize`, a power of 2 from 1 to 1024);
    /// `None` => initdb's default (16). Small segments keep a demo that switches WAL
    /// often (archiving, slots) from filling the disk.
    pub wal_segment_mb: Option<u32>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            bindir: None,
            settings: Vec::new(),
            extensions: vec!["pg_stat_statements".to_owned()],
            wal_segment_mb: None,
        }
    }
}

impl ClusterOptions {
    /// Builder helper: use this bindir instead of searching.
    pub fn with_bindir(mut self, bindir: impl Into<PathBuf>) -> Self {
        self.bindir = Some(bindir.into());
        self
    }

    /// Builder helper: add one `postgresql.conf` setting.
    pub fn with_setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }

    /// Builder helper: `initdb --wal-segsize=MB`.
    pub fn with_wal_segment_mb(mut self, mb: u32) -> Self {
        self.wal_segment_mb = Some(mb);
        self
    }

    /// Builder helper: replace the list of extensions to create.
    pub fn with_extensions<I, S>(mut self, extensions: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extensions = extensions.into_iter().map(Into::into).collect();
        self
    }
}

/// A running (or stopped) throwaway PostgreSQL server in a temp directory.
///
/// Dropping it stops the server (`pg_ctl stop -m immediate`) and deletes the
/// directory. It is `Send + Sync`; all methods take `&self`.
#[derive(Debug)]
pub struct TempCluster {
    /// `Some` until `Drop` takes it to delete the directory.
    temp: Option<TempDir>,
    root: PathBuf,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log_path: PathBuf,
    bindir: PathBuf,
    port: u16,
    major_version: u32,
    runner: Runner,
    /// Cleans up if this process dies without running `Drop` (see
    /// [`watchdog`]); `None` if it could not be started.
    watchdog: Option<Watchdog>,
}

impl TempCluster {
    /// Creates, configures and starts a new cluster, then creates
    /// `opts.extensions` in database `postgres`.
    ///
    /// On error everything created so far (server, directory) is cleaned up.
    pub fn start(opts: ClusterOptions) -> Result<TempCluster, ClusterError> {
        let bindir = match opts.bindir {
            Some(dir) => {
                check_bindir(&dir, "ClusterOptions::bindir")?;
                // Children run in the temp dir, so a relative path would break.
                std::path::absolute(&dir).unwrap_or(dir)
            }
            None => find_bindir()?,
        };
        // Validate settings before creating anything.
        let extra_conf = render_settings(&opts.settings)?;

        let as_user = if is_root() {
            ensure_os_user()?;
            Some(OS_USER.to_owned())
        } else {
            None
        };

        let base = temp_base(as_user.is_some());
        let temp = tempfile::Builder::new()
            .prefix("pgvigil-")
            .tempdir_in(&base)
            .map_err(|e| io_err(format!("creating a temp dir in {}", base.display()), e))?;
        let root = temp.path().to_path_buf();
        let data_dir = root.join("data");
        let socket_dir = root.join("s");
        let log_path = root.join("server.log");
        fs::create_dir(&socket_dir)
            .map_err(|e| io_err(format!("creating {}", socket_dir.display()), e))?;

        let runner = Runner::new(&bindir, as_user, &root);
        let mut cluster = TempCluster {
            temp: Some(temp),
            root,
            data_dir,
            socket_dir,
            log_path,
            bindir,
            port: 0,
            major_version: 0,
            runner,
            watchdog: None,
        };
        // From here on `cluster`'s Drop cleans up on every early return.
        cluster.watchdog = Watchdog::spawn(
            &cluster.runner,
            &cluster.bindir.join("pg_ctl"),
            &cluster.data_dir,
            &cluster.root,
        );

        if let Some(user) = &cluster.runner.as_user {
            let mut chown = Command::new(system_tool("chown"));
            chown.arg("-R").arg(format!("{user}:")).arg(&cluster.root);
            run_checked(&mut chown)?;
        }

        let mut initdb = cluster.runner.command(&cluster.bindir.join("initdb"));
        initdb
            .arg("-D")
            .arg(&cluster.data_dir)
            .args(["-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--locale=C"])
            .arg("--no-sync");
        if let Some(mb) = opts.wal_segment_mb {
            initdb.arg(format!("--wal-segsize={mb}"));
        }
        run_checked(&mut initdb)?;

        cluster.major_version = cluster.detect_major_version()?;

        let conf_path = cluster.data_dir.join("postgresql.conf");
        let base_conf = fs::read_to_string(&conf_path)
            .map_err(|e| io_err(format!("reading {}", conf_path.display()), e))?;

        let mut attempt = 0;
        loop {
            attempt += 1;
            cluster.port = pick_port()?;
            let conf = format!(
                "{base_conf}\n{}{extra_conf}",
                render_base_settings(cluster.port, &cluster.socket_dir)
            );
            fs::write(&conf_path, conf)
                .map_err(|e| io_err(format!("writing {}", conf_path.display()), e))?;
            match cluster.pg_ctl_start() {
                Ok(()) => break,
                Err(failure) if failure.addr_in_use && attempt < START_ATTEMPTS => {
                    tracing::debug!(
                        port = cluster.port,
                        attempt,
                        "port taken, retrying with another one"
                    );
                }
                Err(failure) => return Err(cluster.start_error(failure, attempt)),
            }
        }
        tracing::info!(
            port = cluster.port,
            data_dir = %cluster.data_dir.display(),
            version = cluster.major_version,
            "temporary PostgreSQL cluster started"
        );

        for ext in &opts.extensions {
            cluster.psql(
                "postgres",
                &format!("CREATE EXTENSION IF NOT EXISTS {}", quote_ident(ext)),
            )?;
        }
        Ok(cluster)
    }

    /// Starts a streaming standby of this (running) server: `pg_basebackup -R -X stream`
    /// into a new temp directory, connecting as [`SUPERUSER`] with `application_name`
    /// (which `-R` writes into `primary_conninfo`), then the server on its own port. Needs
    /// `pg_basebackup` next to the server binaries. Dropping it removes it like any
    /// [`TempCluster`].
    pub fn start_standby(&self, application_name: &str) -> Result<TempCluster, ClusterError> {
        let basebackup = self.bindir.join("pg_basebackup");
        if !is_executable(&basebackup) {
            return Err(ClusterError::BadBindir {
                origin: "TempCluster::start_standby",
                dir: self.bindir.clone(),
                missing: "pg_basebackup".into(),
            });
        }
        let as_user = self.runner.as_user.clone();
        let base = temp_base(as_user.is_some());
        let temp = tempfile::Builder::new()
            .prefix("pgvigil-standby-")
            .tempdir_in(&base)
            .map_err(|e| io_err(format!("creating a temp dir in {}", base.display()), e))?;
        let root = temp.path().to_path_buf();
        let socket_dir = root.join("s");
        fs::create_dir(&socket_dir)
            .map_err(|e| io_err(format!("creating {}", socket_dir.display()), e))?;
        let runner = Runner::new(&self.bindir, as_user, &root);
        let mut standby = TempCluster {
            temp: Some(temp),
            data_dir: root.join("data"),
            log_path: root.join("server.log"),
            root,
            socket_dir,
            bindir: self.bindir.clone(),
            port: 0,
            major_version: self.major_version,
            runner,
            watchdog: None,
        };
        standby.watchdog = Watchdog::spawn(
            &standby.runner,
            &standby.bindir.join("pg_ctl"),
            &standby.data_dir,
            &standby.root,
        );
        if let Some(user) = &standby.runner.as_user {
            let mut chown = Command::new(system_tool("chown"));
            chown.arg("-R").arg(format!("{user}:")).arg(&standby.root);
            run_checked(&mut chown)?;
        }
        let conninfo = format!(
            "host=127.0.0.1 port={} user={SUPERUSER} application_name={}",
            self.port,
            conninfo_quote(application_name)
        );
        let mut backup = standby.runner.command(&basebackup);
        backup
            .arg("-D")
            .arg(&standby.data_dir)
            .args(["-R", "-X", "stream", "-c", "fast", "--no-sync", "-d"])
            .arg(&conninfo);
        run_checked(&mut backup)?;
        // The copied postgresql.conf has the primary's port and socket directory; lines
        // added at the end win.
        let conf_path = standby.data_dir.join("postgresql.conf");
        let base_conf = fs::read_to_string(&conf_path)
            .map_err(|e| io_err(format!("reading {}", conf_path.display()), e))?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            standby.port = pick_port()?;
            let conf = format!(
                "{base_conf}\n# --- standby (TempCluster::start_standby) ---\nport = {}\nunix_socket_directories = {}\n",
                standby.port,
                conninfo_quote(&standby.socket_dir.to_string_lossy())
            );
            fs::write(&conf_path, conf)
                .map_err(|e| io_err(format!("writing {}", conf_path.display()), e))?;
            match standby.pg_ctl_start() {
                Ok(()) => break,
                Err(failure) if failure.addr_in_use && attempt < START_ATTEMPTS => {}
                Err(failure) => return Err(standby.start_error(failure, attempt)),
            }
        }
        Ok(standby)
    }

    /// TCP port on 127.0.0.1 (stays the same across `stop()`/`restart()`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Superuser DSN for database `postgres`.
    pub fn dsn(&self) -> String {
        self.dsn_for(SUPERUSER, "postgres")
    }

    /// DSN for `user` on database `db` (no password; trust authentication).
    pub fn dsn_for(&self, user: &str, db: &str) -> String {
        format!(
            "postgresql://{}@127.0.0.1:{}/{}?sslmode=disable",
            percent_encode(user),
            self.port,
            percent_encode(db)
        )
    }

    /// Directory holding the server binaries used.
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Directory of the server's unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The server log file (`pg_ctl -l`).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `lines` lines of the server log (empty if unreadable).
    pub fn log_tail(&self, lines: usize) -> String {
        read_tail(&self.log_path, 0, lines)
    }

    /// Server major version, e.g. 15.
    pub fn major_version(&self) -> u32 {
        self.major_version
    }

    /// Whether the server is running (`pg_ctl status`).
    pub fn is_running(&self) -> bool {
        if !self.data_dir.join("postmaster.pid").exists() {
            return false;
        }
        let mut cmd = self.runner.command(&self.bindir.join("pg_ctl"));
        cmd.arg("-D").arg(&self.data_dir).arg("status");
        matches!(cmd.output(), Ok(out) if out.status.success())
    }

    /// The `psql` to run: the one next to the server binaries, else `psql` from PATH.
    pub fn psql_program(&self) -> PathBuf {
        let local = self.bindir.join("psql");
        if is_executable(&local) {
            local
        } else {
            PathBuf::from("psql")
        }
    }

    /// Runs `sql` (one or more statements; psql meta-commands allowed) as the
    /// superuser in database `db` and returns psql's unaligned, tuples-only
    /// output, trimmed. Command tags (`CREATE TABLE`, ...) are suppressed.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, ClusterError> {
        self.psql_as(SUPERUSER, db, sql)
    }

    /// Like [`TempCluster::psql`] but connecting as database role `user`.
    pub fn psql_as(&self, user: &str, db: &str, sql: &str) -> Result<String, ClusterError> {
        let program = self.psql_program();
        let bundled = program.starts_with(&self.bindir);
        let conninfo = format!(
            "host=127.0.0.1 port={} user={} dbname={} sslmode=disable connect_timeout=10",
            self.port,
            conninfo_quote(user),
            conninfo_quote(db)
        );
        let mut cmd = Command::new(&program);
        self.runner.apply_env(&mut cmd);
        if !bundled {
            // A psql from elsewhere must load its own libpq, not the server bundle's.
            cmd.env_remove("LD_LIBRARY_PATH");
        }
        cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(&conninfo)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| {
            let context = if e.kind() == io::ErrorKind::NotFound {
                format!(
                    "running psql (not in {} nor on PATH; install it with: \
                     apt-get install postgresql-client)",
                    self.bindir.display()
                )
            } else {
                format!("running {}", program.display())
            };
            io_err(context, e)
        })?;
        let stdin = child.stdin.take();
        let output = std::thread::scope(|scope| {
            // Feed stdin from a separate thread so a large result cannot
            // deadlock against a large script.
            scope.spawn(move || {
                if let Some(mut stdin) = stdin {
                    // psql exiting early (e.g. connection refused) => EPIPE; the
                    // real error is reported through its exit status.
                    let _ = stdin.write_all(sql.as_bytes());
                }
            });
            child.wait_with_output()
        })
        .map_err(|e| io_err(format!("waiting for {}", program.display()), e))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
        } else {
            Err(ClusterError::Psql {
                db: db.to_owned(),
                sql: shorten(sql, 200),
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            })
        }
    }

    /// Stops the server (`pg_ctl stop -m fast`), keeping the data. A no-op if
    /// it is not running.
    pub fn stop(&self) -> Result<(), ClusterError> {
        if !self.data_dir.join("postmaster.pid").exists() {
            return Ok(());
        }
        let mut cmd = self.runner.command(&self.bindir.join("pg_ctl"));
        cmd.arg("-D").arg(&self.data_dir).args([
            "-m",
            "fast",
            "-w",
            "-t",
            PG_CTL_TIMEOUT_SECS,
            "stop",
        ]);
        let out = run(&mut cmd)?;
        if out.status.success() {
            tracing::debug!(port = self.port, "temporary PostgreSQL cluster stopped");
            Ok(())
        } else {
            Err(ClusterError::StopFailed {
                reason: output_text(&out),
                log: self.log_path.clone(),
                log_tail: self.log_tail(LOG_TAIL_LINES),
            })
        }
    }

    /// Starts the server again on the same port. If it is still running it
    /// is stopped first (`-m fast`), so this is also a plain restart.
    pub fn restart(&self) -> Result<(), ClusterError> {
        if self.is_running() {
            self.stop()?;
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.pg_ctl_start() {
                Ok(()) => return Ok(()),
                // Same port is required, so wait for whoever holds it.
                Err(failure) if failure.addr_in_use && attempt < START_ATTEMPTS => {
                    std::thread::sleep(Duration::from_millis(500 * u64::from(attempt)));
                }
                Err(failure) => return Err(self.start_error(failure, attempt)),
            }
        }
    }

    /// `pg_ctl start` once; on failure reports whether the port was taken.
    fn pg_ctl_start(&self) -> Result<(), StartFailure> {
        let log_offset = fs::metadata(&self.log_path).map(|m| m.len()).unwrap_or(0);
        let mut cmd = self.runner.command(&self.bindir.join("pg_ctl"));
        cmd.arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_path)
            .args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "start"]);
        let out = match run(&mut cmd) {
            Ok(out) => out,
            Err(e) => {
                return Err(StartFailure {
                    reason: e.to_string(),
                    addr_in_use: false,
                })
            }
        };
        if out.status.success() {
            return Ok(());
        }
        let new_log = read_tail(&self.log_path, log_offset, usize::MAX);
        Err(StartFailure {
            reason: output_text(&out),
            addr_in_use: log_says_addr_in_use(&new_log),
        })
    }

    fn start_error(&self, failure: StartFailure, attempts: u32) -> ClusterError {
        ClusterError::StartFailed {
            port: self.port,
            attempts,
            reason: failure.reason,
            log: self.log_path.clone(),
            log_tail: self.log_tail(LOG_TAIL_LINES),
        }
    }

    fn detect_major_version(&self) -> Result<u32, ClusterError> {
        let mut cmd = Command::new(self.bindir.join("postgres"));
        self.runner.apply_env(&mut cmd);
        cmd.arg("--version");
        let from_binary = run(&mut cmd)
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned());
        if let Some(major) = from_binary.as_deref().and_then(parse_major_version) {
            return Ok(major);
        }
        let pg_version = fs::read_to_string(self.data_dir.join("PG_VERSION")).unwrap_or_default();
        parse_major_version(&pg_version).ok_or_else(|| {
            ClusterError::Version(from_binary.unwrap_or(pg_version).trim().to_owned())
        })
    }

    /// Best-effort immediate shutdown for `Drop`; never panics.
    fn shutdown_immediately(&self) {
        let pid_file = self.data_dir.join("postmaster.pid");
        if !pid_file.exists() {
            return;
        }
        let mut cmd = self.runner.command(&self.bindir.join("pg_ctl"));
        cmd.arg("-D")
            .arg(&self.data_dir)
            .args(["-m", "immediate", "-w", "-t", "30", "stop"]);
        match run(&mut cmd) {
            Ok(out) if out.status.success() => return,
            Ok(out) => tracing::warn!(
                output = %output_text(&out),
                "pg_ctl stop -m immediate failed; signalling the postmaster"
            ),
            Err(e) => tracing::warn!(error = %e, "could not run pg_ctl stop"),
        }
        // Last resort: SIGQUIT (= immediate shutdown) the pid in *our*
        // postmaster.pid, after checking that the process really is a postgres
        // running on our data directory (pid files can be stale).
        let Some(pid) = fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
        else {
            return;
        };
        if !process_uses_data_dir(pid, &self.data_dir) {
            return;
        }
        let _ = Command::new(system_tool("kill"))
            .args(["-QUIT", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        for _ in 0..50 {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        tracing::warn!(pid, "postmaster did not exit after SIGQUIT");
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        self.shutdown_immediately();
        if let Some(temp) = self.temp.take() {
            if let Err(e) = temp.close() {
                tracing::warn!(dir = %self.root.display(), error = %e, "could not remove temp cluster dir");
            }
        }
        // Only now that the server is stopped and the directory gone: releasing
        // the watchdog earlier would let it race us for the same cleanup.
        drop(self.watchdog.take());
    }
}

/// Why one `pg_ctl start` failed.
struct StartFailure {
    reason: String,
    addr_in_use: bool,
}

/// Where to create the temp dir: `std::env::temp_dir()` unless its path is
/// too long for a unix socket path or (when running the server as another
/// user) not traversable by others; then `/tmp`.
fn temp_base(other_user: bool) -> PathBuf {
    let base = std::env::temp_dir();
    let too_long = base.as_os_str().len() > MAX_TEMP_ROOT_LEN;
    let blocked = other_user && !base.ancestors().all(world_traversable);
    if too_long || blocked {
        PathBuf::from("/tmp")
    } else {
        base
    }
}

fn world_traversable(dir: &Path) -> bool {
    fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o001 != 0)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Single-quoted libpq conninfo value.
fn conninfo_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Double-quoted SQL identifier.
fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn shorten(s: &str, max_chars: usize) -> String {
    let s = s.trim();
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

/// The last `lines` lines of `path` from byte `offset` on ("" if unreadable).
fn read_tail(path: &Path, offset: u64, lines: usize) -> String {
    let Ok(bytes) = fs::read(path) else {
        return String::new();
    };
    let start = usize::try_from(offset).unwrap_or(0).min(bytes.len());
    let text = String::from_utf8_lossy(&bytes[start..]);
    tail_lines(&text, lines)
}

fn tail_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn process_uses_data_dir(pid: u32, data_dir: &Path) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    // pg_ctl starts the postmaster as `postgres -D <data_dir>`.
    let data = data_dir.as_os_str().as_encoded_bytes();
    cmdline.split(|b| *b == 0).any(|arg| arg == data)
}

fn io_err(context: String, source: io::Error) -> ClusterError {
    ClusterError::Io { context, source }
}

/// Compile-time check: clusters can be shared with other threads/tasks.
const _: () = {
    const fn check<T: Send + Sync>() {}
    check::<TempCluster>();
    check::<ClusterError>();
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_helpers() {
        assert_eq!(quote_ident("pg_stat_statements"), "\"pg_stat_statements\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(conninfo_quote("o'k\\"), "'o\\'k\\\\'");
        assert_eq!(percent_encode("my db/ü"), "my%20db%2F%C3%BC");
        assert_eq!(percent_encode("app_user-1.x~"), "app_user-1.x~");
    }

    #[test]
    fn tails_and_shortening() {
        assert_eq!(tail_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail_lines("a\nb", 10), "a\nb");
        assert_eq!(tail_lines("", 3), "");
        assert_eq!(shorten("héllo", 2), "hé...");
        assert_eq!(shorten("  hi ", 10), "hi");
    }

    #[test]
    fn default_options() {
        let opts = ClusterOptions::default();
        assert_eq!(opts.bindir, None);
        assert!(opts.settings.is_empty());
        assert_eq!(opts.extensions, vec!["pg_stat_statements".to_string()]);
    }
}
