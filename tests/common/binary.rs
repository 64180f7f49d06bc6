//! The real `pgvigil` binary as a child process of a test: a clean environment, stderr
//! collected as it comes, started once it listens, signalled by pid, killed on drop.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{ChildStderr, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{tail, KillOnDrop, Serving};

/// The binary cargo built for this test run.
pub const BIN: &str = env!("CARGO_BIN_EXE_pgvigil");

/// How long [`Pgvigil::start`] waits for the "listening on" line.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// `pgvigil` with an environment that cannot leak into the test (no config, listen address,
/// log filter or connection settings from the caller's shell).
pub fn command() -> Command {
    let mut cmd = Command::new(BIN);
    for var in [
        "PGVIGIL_CONFIG",
        "PGVIGIL_LISTEN",
        "PGVIGIL_LOG",
        "PGVIGIL_SHARD",
        "DATA_SOURCE_NAME",
        "PGHOST",
        "PGPORT",
        "PGUSER",
        "PGPASSWORD",
        "PGDATABASE",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_CLIENT_KEY",
        "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
        "OTEL_EXPORTER_OTLP_COMPRESSION",
        "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// A running `pgvigil` serving HTTP; killed (by its own handle, never by name) on drop.
pub struct Pgvigil {
    child: KillOnDrop,
    /// The bound address, from the "listening on" log line (so a config may say port 0).
    addr: SocketAddr,
    /// Everything written to stderr so far.
    stderr: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
}

impl Pgvigil {
    /// Starts `pgvigil ARGS` with `env` added to [`command`]'s clean environment and waits
    /// until it listens (its info-level "listening on" line; keep `PGVIGIL_LOG` at info or
    /// below). Panics with its stderr if it exits or does not listen in time.
    pub fn start<I, S>(args: I, env: &[(&str, &str)]) -> Pgvigil
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Pgvigil::start_within(args, env, START_TIMEOUT)
    }

    /// [`Pgvigil::start`] for commands that take longer to listen (`pgvigil demo` first
    /// creates its servers): waits up to `timeout`.
    pub fn start_within<I, S>(args: I, env: &[(&str, &str)], timeout: Duration) -> Pgvigil
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = command();
        cmd.args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = KillOnDrop(cmd.spawn().expect("start pgvigil"));
        let stderr = Arc::new(Mutex::new(String::new()));
        let reader = child
            .0
            .stderr
            .take()
            .map(|pipe| collect(pipe, Arc::clone(&stderr)));
        let mut started = Pgvigil {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            stderr,
            reader,
        };
        let line = started.wait_for_log("listening on http", timeout);
        started.addr = listen_addr(&line)
            .unwrap_or_else(|| panic!("no address in the listening line: {line}"));
        started
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// Whether the child is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.0.try_wait(), Ok(None))
    }

    /// What the child wrote to stderr so far.
    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for a stderr line containing `needle` and returns it; panics with the log if
    /// the child exits first or `timeout` passes.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log().lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            if !self.is_running() {
                // Read to the end: the line may have come just before the exit.
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                    continue;
                }
                panic!(
                    "pgvigil exited while waiting for {needle:?} on stderr:\n{}",
                    tail(&self.log(), 40)
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {needle:?} on stderr:\n{}",
                tail(&self.log(), 40)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends signal `name` (`HUP`, `INT`, ...) to the child, by its pid.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {}: {status}", self.pid());
    }

    /// Waits up to `timeout` for the child to exit by itself; its exit status, or `None`
    /// if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.0.try_wait() {
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the child, waits for it and returns everything it wrote to stderr.
    pub fn stop(mut self) -> String {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.log()
    }
}

impl Serving for Pgvigil {
    fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Appends `pipe` to `into`, line by line, until the child closes it.
fn collect(pipe: ChildStderr, into: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut pipe = BufReader::new(pipe);
        let mut line = Vec::new();
        while matches!(pipe.read_until(b'\n', &mut line), Ok(n) if n > 0) {
            into.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&line));
            line.clear();
        }
    })
}

/// The address in pgvigil's "… listening on http://ADDR/metrics …" log line.
fn listen_addr(line: &str) -> Option<SocketAddr> {
    let rest = line.split("://").nth(1)?;
    rest.split('/').next()?.parse().ok()
}
