//! Running the cluster's programs: as whom (this user, or [`OS_USER`](super::OS_USER) through
//! `runuser` when we are root), with which environment, and with their output
//! captured for error messages.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use super::binaries::system_tool;
use super::{io_err, ClusterError};

/// Runs programs either directly or, when we are root, as [`OS_USER`](super::OS_USER)
/// through `runuser` (which keeps the environment, including
/// `LD_LIBRARY_PATH`, since it is not given `-l`).
#[derive(Debug, Clone)]
pub(super) struct Runner {
    pub(super) as_user: Option<String>,
    /// `LD_LIBRARY_PATH` value when `<bindir>/../lib` exists.
    ld_library_path: Option<OsString>,
    cwd: PathBuf,
}

impl Runner {
    pub(super) fn new(bindir: &Path, as_user: Option<String>, cwd: &Path) -> Runner {
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

    /// A runner for programs that need no server libraries (e.g. PgBouncer).
    pub(super) fn plain(as_user: Option<String>, cwd: &Path) -> Runner {
        Runner {
            as_user,
            ld_library_path: None,
            cwd: cwd.to_path_buf(),
        }
    }

    /// A command for `program`, as [`OS_USER`](super::OS_USER) when we are root.
    pub(super) fn command(&self, program: &Path) -> Command {
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
    pub(super) fn apply_env(&self, cmd: &mut Command) {
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

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Runs `cmd` capturing its output; only spawning errors are errors.
pub(super) fn run(cmd: &mut Command) -> Result<Output, ClusterError> {
    tracing::debug!(command = %describe(cmd), "running");
    cmd.output()
        .map_err(|e| io_err(format!("running `{}`", describe(cmd)), e))
}

/// Runs `cmd`; a non-zero exit is a [`ClusterError::CommandFailed`].
pub(super) fn run_checked(cmd: &mut Command) -> Result<Output, ClusterError> {
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

pub(super) fn output_text(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    [stdout.trim(), stderr.trim()]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join("\n")
}
