//! SIGHUP reloads the config; an invalid new config is rejected and the old one keeps
//! running. Runs the real binary against a real PostgreSQL.

mod common;

use std::time::Duration;

use common::binary::Pgvigil;
use common::*;

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn sighup_reloads_and_rejects_an_invalid_config() {
    let pg = cluster(&[]);
    let dir = tempfile::tempdir().unwrap();
    // Port 0 in every version: the listen address is not reloadable, so it must not change.
    let cfg = |env: &str| {
        format!(
            "listen: 127.0.0.1:0\n{}",
            one_target(&pg.dsn(), "").replace("env: test", &format!("env: {env}"))
        )
    };
    let path = write(dir.path(), "pgvigil.yaml", &cfg("before"));
    let child = Pgvigil::start(["--config", path.to_str().unwrap()], &[]);
    let up = |env: &'static str| {
        move |s: &[Sample]| (value(s, "pg_up", &[("env", env)]) == Some(1.0)).then_some(())
    };

    wait_for(&child, WAIT, "pg_up{env=before}", up("before"));

    write(dir.path(), "pgvigil.yaml", &cfg("after"));
    child.signal("HUP");
    wait_for(&child, WAIT, "pg_up{env=after} only", |s| {
        up("after")(s).filter(|()| find(s, "pg_up", &[("env", "before")]).is_empty())
    });

    write(
        dir.path(),
        "pgvigil.yaml",
        "listen: 127.0.0.1:1\nbogus: 1\n",
    );
    child.signal("HUP");
    std::thread::sleep(Duration::from_secs(2));
    wait_for(&child, WAIT, "the old config still running", up("after"));

    let stderr = child.stop();
    assert!(stderr.contains("configuration reloaded"), "{stderr}");
    assert!(stderr.contains("reload rejected"), "{stderr}");
    assert!(
        stderr.contains("pgvigil.yaml:2:1: unknown field `bogus`"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
