//! Secrets, against a real PostgreSQL with scram-sha-256 authentication: a rotated password
//! (`ALTER ROLE … PASSWORD`, the file rewritten, old sessions terminated) is picked up at the
//! next connection without a restart, from a `password_file` and from a libpq password file
//! (`passfile`); and no password ever shows in the log or in `/metrics`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::binary::Pgvigil;
use common::*;

/// Lets `role` in over TCP with a password only (the harness trusts everyone else).
fn require_password(pg: &TempCluster, role: &str) {
    let hba = pg.data_dir().join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("host all {role} 127.0.0.1/32 scram-sha-256\n{old}"),
    )
    .unwrap();
    pg.psql("postgres", "SELECT pg_reload_conf()").unwrap();
}

fn set_password(pg: &TempCluster, role: &str, password: &str) {
    pg.psql(
        "postgres",
        &format!("ALTER ROLE {role} PASSWORD '{password}'"),
    )
    .unwrap();
}

fn terminate(pg: &TempCluster, role: &str) {
    pg.psql(
        "postgres",
        &format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"),
    )
    .unwrap();
}

fn up(run: &Pgvigil, target: &str) -> Option<f64> {
    let (_, body) = get(&run.url("/metrics"));
    value(&parse(&body), "pg_up", &[("target", target)])
}

fn wait_up(run: &Pgvigil, target: &str, want: f64, what: &str) {
    wait_until(Duration::from_secs(40), what, || {
        up(run, target) == Some(want)
    });
}

fn write_secret(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn a_rotated_password_is_used_at_the_next_connection_without_a_restart() {
    let pg = cluster(&[]);
    for role in ["rot_file", "rot_pass"] {
        pg.psql(
            "postgres",
            &format!("CREATE ROLE {role} LOGIN PASSWORD 'Old-pw-Xq7'; GRANT pg_monitor TO {role}"),
        )
        .unwrap();
        require_password(&pg, role);
    }
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    write_secret(&secret, "Old-pw-Xq7\n");
    let pgpass = dir.path().join("pgpass");
    write_secret(
        &pgpass,
        &format!("127.0.0.1:{}:postgres:rot_pass:Old-pw-Xq7\n", pg.port()),
    );
    let config = write(
        dir.path(),
        "pgvigil.yaml",
        &format!(
            "listen: 127.0.0.1:0\n\
             targets:\n\
             \x20 - name: by_file\n\
             \x20   dsn: host=127.0.0.1 port={port} dbname=postgres user=rot_file sslmode=disable connect_timeout=2\n\
             \x20   password_file: {secret}\n\
             \x20 - name: by_passfile\n\
             \x20   dsn: postgresql://rot_pass@127.0.0.1:{port}/postgres?sslmode=disable&connect_timeout=2&passfile={pgpass}\n\
             collectors:\n  defaults: {{interval: 1s}}\n",
            port = pg.port(),
            secret = secret.display(),
            pgpass = pgpass.display(),
        ),
    );
    let mut run = Pgvigil::start([Path::new("--config"), &config], &[]);
    wait_up(&run, "by_file", 1.0, "by_file up with the first password");
    wait_up(
        &run,
        "by_passfile",
        1.0,
        "by_passfile up with the first password",
    );

    // Rotated on the server, and the old sessions killed, before the files change: the
    // reconnects fail (so the test sees that the old password is really refused)...
    for role in ["rot_file", "rot_pass"] {
        set_password(&pg, role, "New-pw-Zr4");
        terminate(&pg, role);
    }
    wait_up(
        &run,
        "by_file",
        0.0,
        "by_file refused with the old password",
    );
    wait_up(
        &run,
        "by_passfile",
        0.0,
        "by_passfile refused with the old password",
    );
    // ...and once the files hold the new password, the next attempt gets in.
    write_secret(&secret, "New-pw-Zr4\n");
    write_secret(
        &pgpass,
        &format!("127.0.0.1:{}:postgres:rot_pass:New-pw-Zr4\n", pg.port()),
    );
    wait_up(
        &run,
        "by_file",
        1.0,
        "by_file back with the rotated password_file",
    );
    wait_up(
        &run,
        "by_passfile",
        1.0,
        "by_passfile back with the rotated passfile",
    );
    assert!(run.is_running(), "no restart");

    let (_, metrics) = get(&run.url("/metrics"));
    let log = run.stop();
    for pw in ["Old-pw-Xq7", "New-pw-Zr4"] {
        assert!(!log.contains(pw), "the log shows a password:\n{log}");
        assert!(!metrics.contains(pw), "/metrics shows a password");
    }
    assert!(
        log.contains("password authentication failed"),
        "the refused attempts are logged:\n{log}"
    );
}
