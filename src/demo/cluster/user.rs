//! The unprivileged OS user. PostgreSQL refuses to run as root, so when this
//! process is root the server runs as [`OS_USER`], created here once with
//! `useradd` (serialised across processes with `flock`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use super::binaries::{find_system_tool, system_tool};
use super::runner::{output_text, run};
use super::{lock, ClusterError};

/// Unprivileged OS user that runs the server when this process is root.
pub const OS_USER: &str = "pgvigil-pg";

pub(super) fn is_root() -> bool {
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

pub(super) fn ensure_os_user() -> Result<(), ClusterError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_uid_from_proc_status() {
        let status = "Name:\tcat\nUid:\t1000\t0\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\n";
        assert_eq!(parse_effective_uid(status), Some(0));
        assert_eq!(parse_effective_uid("Name:\tx\n"), None);
    }
}
