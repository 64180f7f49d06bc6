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

use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::ffi::OsString;
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tempfile::TempDir;

/// Environment variable that points [`find_bindir`] at a specific bindir.
pub const BINDIR_ENV: &str = "PGVIGIL_PG_BINDIR";

/// Unprivileged OS user that runs the server when this process is root.
pub const OS_USER: &str = "pgvigil-pg";

/// Database superuser created by `initdb` (trust authentication, no password).
pub const SUPERUSER: &str = "postgres";

/// Root of Debian/Ubuntu's versioned PostgreSQL installations.
const DEBIAN_LIB_ROOT: &str = "/usr/lib/postgresql";

/// Binaries a bindir must contain for us to be able to run a cluster.
const REQUIRED_BINARIES: [&str; 3] = ["postgres", "initdb", "pg_ctl"];

/// Places [`find_bindir`] looks in, in order (used in the error message).
const LOOKED_IN: &str = "$PGVIGIL_PG_BINDIR, PATH, `pg_config --bindir`, /usr/lib/postgresql/*/bin";

/// How many times `start()` tries a fresh port when the chosen one is taken.
const START_ATTEMPTS: u32 = 5;

/// Lines of the server log included in start/stop errors.
const LOG_TAIL_LINES: usize = 30;

/// `pg_ctl -t` for start and stop.
const PG_CTL_TIMEOUT_SECS: &str = "60";

/// Unix socket paths are limited to 107 bytes (plus NUL); the socket file
/// name `.s.PGSQL.NNNNN` takes 15 of them and the `/s/` directory another 3.
const MAX_TEMP_ROOT_LEN: usize = 107 - 15 - 3 - 16;

/// Lowest port handed out; we pick below the kernel's ephemeral range so that
/// client sockets (which get ephemeral ports) can never grab a cluster's port
/// while it is stopped between `stop()` and `restart()`.
const MIN_PORT: u16 = 10_000;

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
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            bindir: None,
            settings: Vec::new(),
            extensions: vec!["pg_stat_statements".to_owned()],
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
    /// [`TempCluster::spawn_watchdog`]); `None` if it could not be started.
    watchdog: Option<Child>,
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
        cluster.watchdog = cluster.spawn_watchdog();

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

    /// Runs `sql` (one or more statements; psql meta-commands allowed) as the
    /// superuser in database `db` and returns psql's unaligned, tuples-only
    /// output, trimmed. Command tags (`CREATE TABLE`, ...) are suppressed.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, ClusterError> {
        self.psql_as(SUPERUSER, db, sql)
    }

    /// Like [`TempCluster::psql`] but connecting as database role `user`.
    pub fn psql_as(&self, user: &str, db: &str, sql: &str) -> Result<String, ClusterError> {
        let local = self.bindir.join("psql");
        let bundled = is_executable(&local);
        let program = if bundled {
            local
        } else {
            PathBuf::from("psql")
        };
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

    /// Starts the watchdog (see [`WATCHDOG_SCRIPT`]) in its own process group
    /// so that signals aimed at our group (Ctrl-C, `timeout`, test runners)
    /// do not take it down with us.
    fn spawn_watchdog(&self) -> Option<Child> {
        let sh = find_system_tool("sh").unwrap_or_else(|| PathBuf::from("/bin/sh"));
        let mut cmd = Command::new(sh);
        self.runner.apply_env(&mut cmd);
        cmd.arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("pgvigil-cluster-watchdog")
            .arg(&self.data_dir)
            .arg(&self.root);
        if let Some(user) = &self.runner.as_user {
            cmd.arg(system_tool("runuser")).args(["-u", user, "--"]);
        }
        cmd.arg(self.bindir.join("pg_ctl"))
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        match cmd.spawn() {
            Ok(child) => Some(child),
            Err(e) => {
                tracing::warn!(error = %e, "could not start the cluster watchdog; a crash may leak the server");
                None
            }
        }
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
        if let Some(mut watchdog) = self.watchdog.take() {
            // EOF wakes it; with nothing left to clean up it exits at once.
            drop(watchdog.stdin.take());
            for _ in 0..100 {
                if !matches!(watchdog.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Script of the watchdog process: blocks until its stdin (a pipe whose only
/// writer is this process) reaches EOF, i.e. until the cluster is dropped or
/// this process dies in any way (panic=abort, SIGKILL, a test-runner
/// timeout, a static cluster never dropped); then stops the server on our data
/// directory with pg_ctl and deletes our temp directory.
/// Arguments: data dir, temp dir, then the pg_ctl command (maybe via runuser).
const WATCHDOG_SCRIPT: &str = r#"trap '' HUP INT TERM
data=$1; root=$2; shift 2
read -r _ignored
if [ -f "$data/postmaster.pid" ]; then
    "$@" -D "$data" -m immediate -w -t 30 stop >/dev/null 2>&1
fi
rm -rf -- "$root"
"#;

/// Why one `pg_ctl start` failed.
struct StartFailure {
    reason: String,
    addr_in_use: bool,
}

/// Runs programs either directly or, when we are root, as [`OS_USER`]
/// through `runuser` (which keeps the environment, including
/// `LD_LIBRARY_PATH`, since it is not given `-l`).
#[derive(Debug, Clone)]
struct Runner {
    as_user: Option<String>,
    /// `LD_LIBRARY_PATH` value when `<bindir>/../lib` exists.
    ld_library_path: Option<OsString>,
    cwd: PathBuf,
}

impl Runner {
    fn new(bindir: &Path, as_user: Option<String>, cwd: &Path) -> Runner {
        let lib = bindir.join("..").join("lib");
        let ld_library_path = lib.is_dir().then(|| {
            let mut value = OsString::from(lib.as_os_str());
            if let Some(old) = std::env::var_os("LD_LIBRARY_PATH").filter(|v| !v.is_empty()) {
                value.push(":");
                value.push(old);
            }
            value
        });
        Runner {
            as_user,
            ld_library_path,
            cwd: cwd.to_path_buf(),
        }
    }

    /// A command for `program`, as [`OS_USER`] when we are root.
    fn command(&self, program: &Path) -> Command {
        let mut cmd = match &self.as_user {
            Some(user) => {
                let mut cmd = Command::new(system_tool("runuser"));
                cmd.arg("-u").arg(user).arg("--").arg(program);
                cmd
            }
            None => Command::new(program),
        };
        self.apply_env(&mut cmd);
        // The caller's cwd (e.g. /root) may not be accessible to OS_USER.
        cmd.current_dir(&self.cwd);
        cmd
    }

    /// Environment for every child: no inherited libpq/server `PG*`
    /// variables, C locale (we parse messages), and `LD_LIBRARY_PATH`.
    fn apply_env(&self, cmd: &mut Command) {
        for (name, _) in std::env::vars_os() {
            if name.as_encoded_bytes().starts_with(b"PG") {
                cmd.env_remove(&name);
            }
        }
        cmd.env("LC_ALL", "C");
        if let Some(value) = &self.ld_library_path {
            cmd.env("LD_LIBRARY_PATH", value);
        }
        cmd.stdin(Stdio::null());
    }
}

/// Finds a directory with the PostgreSQL server binaries.
///
/// Order: `$PGVIGIL_PG_BINDIR` (an error if set but unusable), the first
/// `PATH` entry with `initdb` and `postgres` (symlinks into a real bindir are
/// resolved to it), `pg_config --bindir`, then the highest version among
/// `/usr/lib/postgresql/*/bin`. `pg_ctl` must be present too.
pub fn find_bindir() -> Result<PathBuf, ClusterError> {
    find_bindir_in(
        std::env::var_os(BINDIR_ENV),
        std::env::var_os("PATH"),
        pg_config_bindir,
        Path::new(DEBIAN_LIB_ROOT),
    )
}

fn find_bindir_in(
    env_bindir: Option<OsString>,
    path_var: Option<OsString>,
    pg_config: impl FnOnce() -> Option<PathBuf>,
    lib_root: &Path,
) -> Result<PathBuf, ClusterError> {
    // 1. explicit override
    if let Some(dir) = env_bindir.filter(|v| !v.is_empty()) {
        let dir = PathBuf::from(dir);
        check_bindir(&dir, "$PGVIGIL_PG_BINDIR")?;
        return Ok(std::path::absolute(&dir).unwrap_or(dir));
    }
    // 2. PATH
    if let Some(path_var) = path_var {
        for dir in std::env::split_paths(&path_var) {
            if dir.as_os_str().is_empty() || !missing_binaries(&dir).is_empty() {
                continue;
            }
            // /usr/local/bin/postgres -> /usr/lib/postgresql/15/bin/postgres:
            // prefer the real bindir (it has psql and the right ../lib).
            let real = fs::canonicalize(dir.join("postgres"))
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
                .filter(|real| missing_binaries(real).is_empty());
            return Ok(real.unwrap_or_else(|| std::path::absolute(&dir).unwrap_or(dir)));
        }
    }
    // 3. pg_config --bindir
    if let Some(dir) = pg_config().filter(|d| missing_binaries(d).is_empty()) {
        return Ok(dir);
    }
    // 4. /usr/lib/postgresql/*/bin, highest version
    let candidates = fs::read_dir(lib_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_str()?.to_owned();
            let bin = entry.path().join("bin");
            missing_binaries(&bin).is_empty().then_some((name, bin))
        });
    pick_highest_version(candidates).ok_or_else(|| ClusterError::NoBinaries {
        looked: LOOKED_IN.to_owned(),
    })
}

fn pg_config_bindir() -> Option<PathBuf> {
    let out = Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = String::from_utf8(out.stdout).ok()?;
    let dir = dir.trim();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

/// Picks the directory whose version-like name (`15`, `9.6`, `16.2`) is
/// highest; names that are not versions are ignored.
fn pick_highest_version(
    candidates: impl IntoIterator<Item = (String, PathBuf)>,
) -> Option<PathBuf> {
    candidates
        .into_iter()
        .filter_map(|(name, dir)| parse_dir_version(&name).map(|v| (v, dir)))
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, dir)| dir)
}

fn parse_dir_version(name: &str) -> Option<Vec<u32>> {
    name.split('.')
        .map(|part| part.parse::<u32>().ok())
        .collect()
}

/// Major version from `postgres --version` output
/// (`postgres (PostgreSQL) 15.18 (Debian ...)` => 15, `17devel` => 17) or
/// from a `PG_VERSION` file (`15`). For pre-10 versions (`9.6.24`) this is 9.
pub fn parse_major_version(text: &str) -> Option<u32> {
    let rest = match text.find("(PostgreSQL)") {
        Some(i) => &text[i + "(PostgreSQL)".len()..],
        None => text,
    };
    let token = rest
        .split_whitespace()
        .find(|t| t.starts_with(|c: char| c.is_ascii_digit()))?;
    let digits: String = token.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn check_bindir(dir: &Path, origin: &'static str) -> Result<(), ClusterError> {
    let missing = missing_binaries(dir);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(ClusterError::BadBindir {
            origin,
            dir: dir.to_path_buf(),
            missing: missing.join(", "),
        })
    }
}

fn missing_binaries(dir: &Path) -> Vec<&'static str> {
    REQUIRED_BINARIES
        .iter()
        .copied()
        .filter(|name| !is_executable(&dir.join(name)))
        .collect()
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Absolute path of a system tool (PATH may lack the sbin directories),
/// or just its name for a PATH lookup.
fn system_tool(name: &str) -> PathBuf {
    find_system_tool(name).unwrap_or_else(|| PathBuf::from(name))
}

fn find_system_tool(name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|p| is_executable(p))
}

fn is_root() -> bool {
    let from_proc = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_effective_uid(&s));
    let uid = from_proc.or_else(|| {
        let out = Command::new("id").arg("-u").output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    });
    uid == Some(0)
}

/// Effective uid from `/proc/self/status` (`Uid:\treal\teffective\tsaved\tfs`).
fn parse_effective_uid(status: &str) -> Option<u32> {
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Serialises user creation within this process; `true` once it exists.
static OS_USER_READY: Mutex<bool> = Mutex::new(false);

fn ensure_os_user() -> Result<(), ClusterError> {
    let mut ready = lock(&OS_USER_READY);
    if *ready || os_user_exists() {
        *ready = true;
        return Ok(());
    }
    let useradd = system_tool("useradd");
    let useradd_args = [
        "--system",
        "--no-create-home",
        "--shell",
        "/usr/sbin/nologin",
        OS_USER,
    ];
    let mut last_output = String::new();
    for attempt in 1..=5u64 {
        // Concurrent `useradd`s are not safe: on Debian 12 they all "succeed",
        // rewriting /etc/passwd with different uids, so a process can end up
        // running as a uid that no longer exists ("could not look up effective
        // user ID"). Serialise them across processes with flock(1).
        let mut cmd = match find_system_tool("flock") {
            Some(flock) => {
                let mut cmd = Command::new(flock);
                cmd.args(["-w", "60"])
                    .arg(useradd_lock_path())
                    .arg(&useradd)
                    .args(useradd_args);
                cmd
            }
            None => {
                let mut cmd = Command::new(&useradd);
                cmd.args(useradd_args);
                cmd
            }
        };
        let out = run(&mut cmd)?;
        // 9 = name already in use: another process created it meanwhile.
        if out.status.success() || out.status.code() == Some(9) || os_user_exists() {
            *ready = true;
            return Ok(());
        }
        last_output = format!("({}) {}", out.status, output_text(&out));
        std::thread::sleep(Duration::from_millis(200 * attempt));
    }
    Err(ClusterError::CommandFailed {
        command: format!("useradd {}", useradd_args.join(" ")),
        status: "5 attempts".to_owned(),
        output: format!(
            "{last_output}\nPostgreSQL refuses to run as root, so pgvigil runs it as OS user {OS_USER}"
        ),
    })
}

fn useradd_lock_path() -> PathBuf {
    let dir = Path::new("/run/lock");
    let dir = if dir.is_dir() {
        dir.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    dir.join("pgvigil-useradd.lock")
}

fn os_user_exists() -> bool {
    Command::new(system_tool("id"))
        .args(["-u", OS_USER])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
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

/// Ports handed out by this process (never reused, so that parallel tests
/// in one process cannot race for the same port).
static USED_PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A port free on 127.0.0.1, preferably below the ephemeral port range.
fn pick_port() -> Result<u16, ClusterError> {
    let mut used = lock(&USED_PORTS);
    let used = used.get_or_insert_with(HashSet::new);
    let ephemeral_low = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if ephemeral_low > MIN_PORT + 1_000 {
        let span = u64::from(ephemeral_low - MIN_PORT);
        for _ in 0..100 {
            let offset = u16::try_from(random_u64() % span).unwrap_or(0);
            let port = MIN_PORT + offset;
            if !used.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
                used.insert(port);
                return Ok(port);
            }
        }
    }
    // Fallback: let the kernel choose.
    for _ in 0..100 {
        let port = TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|_| ClusterError::NoFreePort)?;
        if used.insert(port) {
            return Ok(port);
        }
    }
    Err(ClusterError::NoFreePort)
}

fn random_u64() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    hasher.write_u128(nanos);
    hasher.write_u32(std::process::id());
    hasher.finish()
}

fn log_says_addr_in_use(log: &str) -> bool {
    log.contains("Address already in use")
        || log.contains("could not bind IPv4 address")
        || log.contains("could not create any TCP/IP sockets")
}

/// Our fixed `postgresql.conf` block.
fn render_base_settings(port: u16, socket_dir: &Path) -> String {
    let socket_dir = conf_quote(&socket_dir.to_string_lossy());
    format!(
        "# --- added by pgvigil (src/cluster.rs) ---\n\
         listen_addresses = '127.0.0.1'\n\
         port = {port}\n\
         unix_socket_directories = {socket_dir}\n\
         shared_preload_libraries = 'pg_stat_statements'\n\
         pg_stat_statements.track = 'all'\n\
         fsync = off\n\
         synchronous_commit = off\n\
         full_page_writes = off\n\
         max_connections = 100\n\
         logging_collector = off\n"
    )
}

/// `ClusterOptions::settings` as `postgresql.conf` lines.
fn render_settings(settings: &[(String, String)]) -> Result<String, ClusterError> {
    let mut out = String::new();
    if !settings.is_empty() {
        out.push_str("# --- ClusterOptions::settings ---\n");
    }
    for (name, value) in settings {
        let invalid = |reason| ClusterError::InvalidSetting {
            name: name.clone(),
            reason,
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        {
            return Err(invalid(
                "names may only contain letters, digits, '_' and '.'",
            ));
        }
        if value.contains(['\n', '\r', '\0']) {
            return Err(invalid("values must not contain line breaks or NUL"));
        }
        out.push_str(&format!("{name} = {}\n", conf_quote(value)));
    }
    Ok(out)
}

/// Single-quoted postgresql.conf string value.
fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
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

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Runs `cmd` capturing its output; only spawning errors are errors.
fn run(cmd: &mut Command) -> Result<Output, ClusterError> {
    tracing::debug!(command = %describe(cmd), "running");
    cmd.output()
        .map_err(|e| io_err(format!("running `{}`", describe(cmd)), e))
}

/// Runs `cmd`; a non-zero exit is a [`ClusterError::CommandFailed`].
fn run_checked(cmd: &mut Command) -> Result<Output, ClusterError> {
    let out = run(cmd)?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(ClusterError::CommandFailed {
            command: describe(cmd),
            status: out.status.to_string(),
            output: output_text(&out),
        })
    }
}

fn output_text(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    [stdout.trim(), stderr.trim()]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join("\n")
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
    fn major_version_from_postgres_version_output() {
        assert_eq!(
            parse_major_version("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n"),
            Some(15)
        );
        assert_eq!(parse_major_version("postgres (PostgreSQL) 16.4"), Some(16));
        assert_eq!(
            parse_major_version("postgres (PostgreSQL) 17devel"),
            Some(17)
        );
        assert_eq!(
            parse_major_version("postgres (PostgreSQL) 18beta1"),
            Some(18)
        );
        assert_eq!(parse_major_version("postgres (PostgreSQL) 9.6.24"), Some(9));
        assert_eq!(parse_major_version("15\n"), Some(15));
        assert_eq!(parse_major_version("garbage"), None);
        assert_eq!(parse_major_version(""), None);
    }

    #[test]
    fn highest_versioned_bindir_wins() {
        let dirs = ["9.6", "15", "16", "10", "foo", "13.2", ""]
            .iter()
            .map(|v| {
                (
                    v.to_string(),
                    PathBuf::from(format!("/usr/lib/postgresql/{v}/bin")),
                )
            });
        assert_eq!(
            pick_highest_version(dirs),
            Some(PathBuf::from("/usr/lib/postgresql/16/bin"))
        );
        assert_eq!(pick_highest_version(Vec::new()), None);
        assert_eq!(
            pick_highest_version(vec![("x".to_string(), PathBuf::from("/x"))]),
            None
        );
    }

    #[test]
    fn highest_versioned_bindir_from_fake_tree() {
        let root = tempfile::tempdir().expect("tempdir");
        for v in ["9.6", "14", "16", "17"] {
            let bin = root.path().join(v).join("bin");
            fs::create_dir_all(&bin).expect("mkdir");
            // 17 is incomplete (no pg_ctl) and must be skipped.
            let names: &[&str] = if v == "17" {
                &["postgres", "initdb"]
            } else {
                &REQUIRED_BINARIES
            };
            for name in names {
                let p = bin.join(name);
                fs::write(&p, "#!/bin/sh\n").expect("write");
                fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).expect("chmod");
            }
        }
        let found = find_bindir_in(None, Some(OsString::new()), || None, root.path());
        assert_eq!(found.ok(), Some(root.path().join("16").join("bin")));
    }

    #[test]
    fn path_symlinks_resolve_to_the_real_bindir() {
        let root = tempfile::tempdir().expect("tempdir");
        let real = root.path().join("real").join("bin");
        let links = root.path().join("links");
        fs::create_dir_all(&real).expect("mkdir");
        fs::create_dir_all(&links).expect("mkdir");
        for name in REQUIRED_BINARIES {
            let p = real.join(name);
            fs::write(&p, "#!/bin/sh\n").expect("write");
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).expect("chmod");
            std::os::unix::fs::symlink(&p, links.join(name)).expect("symlink");
        }
        let path = std::env::join_paths([root.path().join("empty"), links]).expect("join");
        let found = find_bindir_in(None, Some(path), || None, root.path());
        let real = fs::canonicalize(real).expect("canonicalize");
        assert_eq!(found.ok(), Some(real));
    }

    #[test]
    fn no_binaries_error_says_what_to_install() {
        let empty = tempfile::tempdir().expect("tempdir");
        let err = find_bindir_in(None, Some(OsString::new()), || None, empty.path())
            .expect_err("nothing to find");
        let msg = err.to_string();
        assert!(msg.contains("apt-get install postgresql"), "{msg}");
        assert!(msg.contains("$PGVIGIL_PG_BINDIR"), "{msg}");
        assert!(msg.contains("PATH"), "{msg}");
        assert!(msg.contains("pg_config --bindir"), "{msg}");
        assert!(msg.contains("/usr/lib/postgresql/*/bin"), "{msg}");
    }

    #[test]
    fn bad_env_bindir_is_an_error_not_a_fallback() {
        let empty = tempfile::tempdir().expect("tempdir");
        let err = find_bindir_in(
            Some(empty.path().as_os_str().to_owned()),
            std::env::var_os("PATH"),
            || None,
            Path::new(DEBIAN_LIB_ROOT),
        )
        .expect_err("empty dir");
        let msg = err.to_string();
        assert!(msg.contains("$PGVIGIL_PG_BINDIR"), "{msg}");
        assert!(msg.contains("postgres, initdb, pg_ctl"), "{msg}");
    }

    #[test]
    fn effective_uid_from_proc_status() {
        let status = "Name:\tcat\nUid:\t1000\t0\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\n";
        assert_eq!(parse_effective_uid(status), Some(0));
        assert_eq!(parse_effective_uid("Name:\tx\n"), None);
    }

    #[test]
    fn settings_are_quoted_and_validated() {
        let rendered = render_settings(&[
            ("pg_stat_statements.max".into(), "100".into()),
            ("search_path".into(), "it's \\ here".into()),
        ])
        .expect("valid");
        assert!(rendered.contains("pg_stat_statements.max = '100'\n"));
        assert!(rendered.contains("search_path = 'it''s \\\\ here'\n"));
        assert!(render_settings(&[("a = b".into(), "1".into())]).is_err());
        assert!(render_settings(&[("".into(), "1".into())]).is_err());
        assert!(render_settings(&[("a".into(), "1\nfsync = on".into())]).is_err());
        assert_eq!(render_settings(&[]).ok(), Some(String::new()));
    }

    #[test]
    fn base_settings_contain_port_and_socket_dir() {
        let conf = render_base_settings(12345, Path::new("/tmp/pgvigil-x/s"));
        assert!(conf.contains("port = 12345\n"));
        assert!(conf.contains("unix_socket_directories = '/tmp/pgvigil-x/s'\n"));
        assert!(conf.contains("shared_preload_libraries = 'pg_stat_statements'\n"));
    }

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
    fn address_in_use_detection() {
        let log = "LOG:  could not bind IPv4 address \"127.0.0.1\": Address already in use\n\
                   WARNING:  could not create listen socket for \"127.0.0.1\"\n\
                   FATAL:  could not create any TCP/IP sockets\n";
        assert!(log_says_addr_in_use(log));
        assert!(!log_says_addr_in_use(
            "FATAL:  data directory has wrong ownership"
        ));
    }

    #[test]
    fn default_options() {
        let opts = ClusterOptions::default();
        assert_eq!(opts.bindir, None);
        assert!(opts.settings.is_empty());
        assert_eq!(opts.extensions, vec!["pg_stat_statements".to_string()]);
    }

    #[test]
    fn picked_ports_are_distinct_and_bindable() {
        let a = pick_port().expect("port");
        let b = pick_port().expect("port");
        assert_ne!(a, b);
        assert!(TcpListener::bind(("127.0.0.1", a)).is_ok());
    }
}
