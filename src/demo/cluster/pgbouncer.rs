//! A throwaway PgBouncer in front of a [`TempCluster`], for the integration tests.
//!
//! It writes `pgbouncer.ini` and a userlist into its own temporary directory, listens on
//! 127.0.0.1 on a free port (no Unix socket), and serves one database, `postgres`, that
//! logs into the cluster as [`SUPERUSER`](super::SUPERUSER) whoever the client is (so
//! every client shares one pool per database). Clients authenticate with `md5` against
//! the userlist. Like PostgreSQL, PgBouncer refuses to run as root: it then runs as
//! [`OS_USER`](super::OS_USER) through the same [`Runner`].
//!
//! It is started daemonized (`-d`) and stopped by the pid in *its own* pid file, checked
//! to be a `pgbouncer` reading our ini file; never by name. A watchdog (as the cluster's)
//! stops it if this process dies without `Drop`.

use std::fs;
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::binaries::{find_system_tool, is_executable, system_tool};
use super::ports::{log_says_addr_in_use, pick_port};
use super::runner::{output_text, run, run_checked, Runner};
use super::user::{ensure_os_user, is_root};
use super::{io_err, read_tail, tail_lines, temp_base, ClusterError, TempCluster, OS_USER};

/// Environment variable naming the `pgbouncer` binary (default: found in the system dirs).
pub const PGBOUNCER_ENV: &str = "PGVIGIL_PGBOUNCER";

/// How long a start may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// How to configure a [`TempPgBouncer`].
#[derive(Debug, Clone)]
pub struct PgBouncerOptions {
    /// `session`, `transaction` or `statement`.
    pub pool_mode: String,
    pub default_pool_size: u32,
    /// Seconds between updates of `SHOW STATS` totals (PgBouncer's default is 60).
    pub stats_period: u32,
    /// Login roles and their passwords (the userlist).
    pub users: Vec<(String, String)>,
    /// Roles that may run every console command.
    pub admin_users: Vec<String>,
    /// Roles that may run the console's read-only `SHOW` commands.
    pub stats_users: Vec<String>,
}

impl Default for PgBouncerOptions {
    fn default() -> Self {
        PgBouncerOptions {
            pool_mode: "transaction".into(),
            default_pool_size: 2,
            stats_period: 1,
            users: vec![
                ("app".into(), "app-secret".into()),
                ("pgvigil".into(), "pgvigil-secret".into()),
            ],
            admin_users: Vec::new(),
            stats_users: vec!["pgvigil".into()],
        }
    }
}

/// A running PgBouncer in its own temporary directory; dropping it stops it and deletes
/// the directory.
#[derive(Debug)]
pub struct TempPgBouncer {
    temp: Option<TempDir>,
    root: PathBuf,
    ini: PathBuf,
    pid_file: PathBuf,
    log_path: PathBuf,
    program: PathBuf,
    port: u16,
    runner: Runner,
    watchdog: Option<Child>,
}

impl TempPgBouncer {
    /// Writes the configuration for `upstream` and starts PgBouncer on a free port.
    pub fn start(
        upstream: &TempCluster,
        opts: &PgBouncerOptions,
    ) -> Result<TempPgBouncer, ClusterError> {
        let program = find_pgbouncer()?;
        let as_user = if is_root() {
            ensure_os_user()?;
            Some(OS_USER.to_owned())
        } else {
            None
        };
        let base = temp_base(as_user.is_some());
        let temp = tempfile::Builder::new()
            .prefix("pgvigil-bouncer-")
            .tempdir_in(&base)
            .map_err(|e| io_err(format!("creating a temp dir in {}", base.display()), e))?;
        let root = temp.path().to_path_buf();
        let mut bouncer = TempPgBouncer {
            ini: root.join("pgbouncer.ini"),
            pid_file: root.join("pgbouncer.pid"),
            log_path: root.join("pgbouncer.log"),
            runner: Runner::plain(as_user, &root),
            temp: Some(temp),
            root,
            program,
            port: 0,
            watchdog: None,
        };
        bouncer.watchdog = bouncer.spawn_watchdog();
        let userlist: String = opts
            .users
            .iter()
            .map(|(u, p)| {
                format!(
                    "\"{}\" \"{}\"\n",
                    u.replace('"', "\"\""),
                    p.replace('"', "\"\"")
                )
            })
            .collect();
        let userlist_path = bouncer.root.join("userlist.txt");
        fs::write(&userlist_path, userlist)
            .map_err(|e| io_err(format!("writing {}", userlist_path.display()), e))?;
        let mut last = None;
        for _ in 0..5 {
            bouncer.port = pick_port()?;
            bouncer.write_ini(upstream, opts)?;
            if let Some(user) = &bouncer.runner.as_user {
                let mut chown = Command::new(system_tool("chown"));
                chown.arg("-R").arg(format!("{user}:")).arg(&bouncer.root);
                run_checked(&mut chown)?;
            }
            match bouncer.launch() {
                Ok(()) => {
                    tracing::info!(port = bouncer.port, "temporary PgBouncer started");
                    return Ok(bouncer);
                }
                Err((e, addr_in_use)) if addr_in_use => last = Some(e),
                Err((e, _)) => return Err(e),
            }
        }
        Err(last.unwrap_or(ClusterError::NoFreePort))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for `user` (with `password`) to database `db` (`pgbouncer` is the console).
    pub fn dsn_for(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "postgresql://{user}:{password}@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    pub fn log_tail(&self, lines: usize) -> String {
        read_tail(&self.log_path, 0, lines)
    }

    /// Whether our PgBouncer process is running.
    pub fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    /// Stops PgBouncer (SIGTERM: immediate shutdown, clients disconnected) and waits for
    /// it to exit. A no-op if it is not running.
    pub fn stop(&self) -> Result<(), ClusterError> {
        let Some(pid) = self.pid() else {
            return Ok(());
        };
        // SAFETY: kill(2) with a pid checked to be our own pgbouncer (see `pid`).
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{pid}")).exists() {
            if Instant::now() > deadline {
                return Err(ClusterError::CommandFailed {
                    command: format!("kill -TERM {pid} (pgbouncer)"),
                    status: "still running after 10 s".into(),
                    output: self.log_tail(20),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = fs::remove_file(&self.pid_file);
        tracing::debug!(port = self.port, "temporary PgBouncer stopped");
        Ok(())
    }

    /// Starts PgBouncer again on the same port (stopping it first if it runs).
    pub fn restart(&self) -> Result<(), ClusterError> {
        self.stop()?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.launch() {
                Ok(()) => return Ok(()),
                Err((_, true)) if attempt < 5 => {
                    std::thread::sleep(Duration::from_millis(500 * attempt));
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    fn write_ini(
        &self,
        upstream: &TempCluster,
        opts: &PgBouncerOptions,
    ) -> Result<(), ClusterError> {
        let ini = format!(
            "[databases]\n\
             postgres = host=127.0.0.1 port={upstream_port} dbname=postgres user={superuser}\n\
             \n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = md5\n\
             auth_file = {userlist}\n\
             admin_users = {admins}\n\
             stats_users = {stats}\n\
             pool_mode = {pool_mode}\n\
             default_pool_size = {pool_size}\n\
             stats_period = {stats_period}\n\
             logfile = {log}\n\
             pidfile = {pid}\n\
             ignore_startup_parameters = extra_float_digits,options\n\
             server_login_retry = 1\n",
            upstream_port = upstream.port(),
            superuser = super::SUPERUSER,
            port = self.port,
            userlist = self.root.join("userlist.txt").display(),
            admins = opts.admin_users.join(","),
            stats = opts.stats_users.join(","),
            pool_mode = opts.pool_mode,
            pool_size = opts.default_pool_size,
            stats_period = opts.stats_period,
            log = self.log_path.display(),
            pid = self.pid_file.display(),
        );
        fs::write(&self.ini, ini).map_err(|e| io_err(format!("writing {}", self.ini.display()), e))
    }

    /// `pgbouncer -d` once, then waits for the port to accept connections. The error
    /// says whether the port was taken.
    fn launch(&self) -> Result<(), (ClusterError, bool)> {
        let log_offset = fs::metadata(&self.log_path).map(|m| m.len()).unwrap_or(0);
        let mut cmd = self.runner.command(&self.program);
        cmd.arg("-d").arg(&self.ini);
        let out = run(&mut cmd).map_err(|e| (e, false))?;
        let failed = |reason: String| {
            let new_log = read_tail(&self.log_path, log_offset, usize::MAX);
            let in_use = log_says_addr_in_use(&new_log);
            (
                ClusterError::CommandFailed {
                    command: format!("pgbouncer -d {}", self.ini.display()),
                    status: reason,
                    output: format!("{}\n{}", output_text(&out), tail_lines(&new_log, 30)),
                },
                in_use,
            )
        };
        if !out.status.success() {
            return Err(failed(out.status.to_string()));
        }
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.pid().is_some()
                && TcpStream::connect_timeout(
                    &([127, 0, 0, 1], self.port).into(),
                    Duration::from_millis(200),
                )
                .is_ok()
            {
                return Ok(());
            }
            let new_log = read_tail(&self.log_path, log_offset, usize::MAX);
            if log_says_addr_in_use(&new_log) || Instant::now() > deadline {
                return Err(failed("not listening".into()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The pid in our pid file, if that process is a pgbouncer running our ini file
    /// (a pid file can be stale, and its pid reused).
    fn pid(&self) -> Option<u32> {
        let pid: u32 = fs::read_to_string(&self.pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let ours = cmdline
            .split(|b| *b == 0)
            .any(|arg| arg == self.ini.as_os_str().as_encoded_bytes());
        ours.then_some(pid)
    }

    /// A `sh` in its own process group that waits for EOF on a pipe from this process,
    /// then stops our PgBouncer (by our pid file) and deletes our directory.
    fn spawn_watchdog(&self) -> Option<Child> {
        const SCRIPT: &str = r#"trap '' HUP INT TERM
pid=$1; root=$2
read -r _ignored
if [ -f "$pid" ]; then kill -TERM "$(cat "$pid")" 2>/dev/null; sleep 1; fi
rm -rf -- "$root"
"#;
        let sh = find_system_tool("sh").unwrap_or_else(|| PathBuf::from("/bin/sh"));
        Command::new(sh)
            .arg("-c")
            .arg(SCRIPT)
            .arg("pgvigil-pgbouncer-watchdog")
            .arg(&self.pid_file)
            .arg(&self.root)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| tracing::warn!(error = %e, "could not start the PgBouncer watchdog"))
            .ok()
    }
}

impl Drop for TempPgBouncer {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(error = %e, "could not stop the temporary PgBouncer");
        }
        if let Some(temp) = self.temp.take() {
            let _ = temp.close();
        }
        if let Some(mut w) = self.watchdog.take() {
            drop(w.stdin.take());
            for _ in 0..100 {
                if !matches!(w.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// `$PGVIGIL_PGBOUNCER`, else `pgbouncer` in the system directories (Debian's package
/// puts it in /usr/sbin).
fn find_pgbouncer() -> Result<PathBuf, ClusterError> {
    if let Some(p) = std::env::var_os(PGBOUNCER_ENV).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if is_executable(&p) {
            return Ok(p);
        }
    }
    find_system_tool("pgbouncer").ok_or_else(|| ClusterError::CommandFailed {
        command: "pgbouncer".into(),
        status: "not found".into(),
        output: format!(
            "no pgbouncer in /usr/sbin, /sbin, /usr/bin, /bin (or ${PGBOUNCER_ENV}); install it with: apt-get install pgbouncer"
        ),
    })
}
