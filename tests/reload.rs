//! SIGHUP reloads the config; an invalid new config is rejected and the old one keeps
//! running. Runs the real binary against a real PostgreSQL.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_metrics(url: &str, what: &str, ok: impl Fn(&[Sample]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = reqwest::blocking::get(url) {
            let body = r.text().unwrap_or_default();
            if ok(&parse(&body)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}:\n{body}"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn sighup_reloads_and_rejects_an_invalid_config() {
    let pg = cluster(&[]);
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = |env: &str| {
        format!(
            "listen: 127.0.0.1:{port}\n{}",
            one_target(&pg.dsn(), "").replace("env: test", &format!("env: {env}"))
        )
    };
    let path = write(dir.path(), "pgvigil.yaml", &cfg("before"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgvigil"))
        .args(["--config", path.to_str().unwrap()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let url = format!("http://127.0.0.1:{port}/metrics");
    let up =
        |env: &'static str| move |s: &[Sample]| value(s, "pg_up", &[("env", env)]) == Some(1.0);

    wait_metrics(&url, "pg_up{env=before}", up("before"));

    write(dir.path(), "pgvigil.yaml", &cfg("after"));
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    wait_metrics(&url, "pg_up{env=after} only", |s| {
        up("after")(s) && find(s, "pg_up", &[("env", "before")]).is_empty()
    });

    write(
        dir.path(),
        "pgvigil.yaml",
        "listen: 127.0.0.1:1\nbogus: 1\n",
    );
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    std::thread::sleep(Duration::from_secs(2));
    wait_metrics(&url, "the old config still running", up("after"));

    let _ = child.kill();
    let _ = child.wait();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(stderr.contains("configuration reloaded"), "{stderr}");
    assert!(stderr.contains("reload rejected"), "{stderr}");
    assert!(
        stderr.contains("pgvigil.yaml:2:1: unknown field `bogus`"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
