//! The cluster's watchdog: a small `sh` in its own process group that cleans up
//! after a process that died without running `Drop` (SIGKILL, a test-runner
//! timeout, `panic = "abort"`, a cluster kept in a `static`). It stops the
//! server with `pg_ctl` on our own data directory and deletes our temp
//! directory; it never kills anything by name.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::binaries::{find_system_tool, system_tool};
use super::runner::Runner;

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

/// A running watchdog. Closing its stdin (on drop) tells it that this process
/// cleaned up itself; with nothing left to do it exits at once.
#[derive(Debug)]
pub(super) struct Watchdog(Child);

impl Watchdog {
    /// Starts the watchdog (see [`WATCHDOG_SCRIPT`]) for the cluster in
    /// `data_dir` under the temp directory `root`, in its own process group so
    /// that signals aimed at our group (Ctrl-C, `timeout`, test runners) do not
    /// take it down with us. `None` (with a warning) if it could not start.
    pub(super) fn spawn(
        runner: &Runner,
        pg_ctl: &Path,
        data_dir: &Path,
        root: &Path,
    ) -> Option<Watchdog> {
        let sh = find_system_tool("sh").unwrap_or_else(|| PathBuf::from("/bin/sh"));
        let mut cmd = Command::new(sh);
        runner.apply_env(&mut cmd);
        cmd.arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("pgvigil-cluster-watchdog")
            .arg(data_dir)
            .arg(root);
        if let Some(user) = &runner.as_user {
            cmd.arg(system_tool("runuser")).args(["-u", user, "--"]);
        }
        cmd.arg(pg_ctl)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        match cmd.spawn() {
            Ok(child) => Some(Watchdog(child)),
            Err(e) => {
                tracing::warn!(error = %e, "could not start the cluster watchdog; a crash may leak the server");
                None
            }
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // EOF wakes it; with nothing left to clean up it exits at once.
        drop(self.0.stdin.take());
        for _ in 0..100 {
            if !matches!(self.0.try_wait(), Ok(None)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
