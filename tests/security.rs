//! The security-posture pack (`queries/security.yaml`) against a real PostgreSQL: an
//! expiring password, row-level security that protects nothing then is enabled and forced,
//! login superusers, a broken pg_hba.conf line, and a TLS, a plaintext TCP and a Unix-socket
//! connection counted apart - as a superuser and as a `pg_monitor` role, which may not read
//! pg_hba_file_rules (that collector is skipped by plan until it is granted).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;

/// No collector failed; only the collectors in `skipped` were skipped (for lack of a
/// privilege).
fn assert_ran(s: &[Sample], who: &str, skipped: &[&str]) {
    let errors = find(s, "pgvigil_collector_errors_total", &[]);
    assert!(errors.is_empty(), "{who}: collectors failed: {errors:#?}");
    let mut got: Vec<(String, String)> = find(s, "pgvigil_collector_skipped", &[])
        .iter()
        .map(|x| (x.labels["collector"].clone(), x.labels["reason"].clone()))
        .collect();
    got.sort();
    let want: Vec<(String, String)> = skipped
        .iter()
        .map(|c| (c.to_string(), "missing_privilege".to_string()))
        .collect();
    assert_eq!(got, want, "{who}: skipped collectors");
}

fn now_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn expiring_passwords_rls_superusers_and_hba_errors_as_superuser_and_pg_monitor() {
    let pg = cluster(&[]);
    let monitor = pg_monitor_dsn(&pg, "postgres");
    pg.psql(
        "postgres",
        "CREATE ROLE app LOGIN VALID UNTIL 'infinity';
         CREATE ROLE admin2 LOGIN SUPERUSER;
         CREATE ROLE not_login SUPERUSER;
         CREATE TABLE plain (id int);
         CREATE TABLE guarded (id int, owner text);
         CREATE POLICY own_rows ON guarded USING (owner = current_user);",
    )
    .unwrap();
    // The truth, as the server computes it.
    let expiry: f64 = pg
        .psql(
            "postgres",
            // VALID UNTIL takes a literal: now() + 3 days, formatted by the server.
            "DO $$ BEGIN
               EXECUTE format('CREATE ROLE expiring LOGIN PASSWORD %L VALID UNTIL %L',
                              'x', now() + interval '3 days');
             END $$;
             SELECT extract(epoch FROM rolvaliduntil) FROM pg_roles WHERE rolname = 'expiring'",
        )
        .unwrap()
        .parse()
        .unwrap();
    assert!((expiry - (now_seconds() + 3.0 * 86400.0)).abs() < 60.0);

    let su = ManualPoller::new(&config(&one_target(&pg.dsn(), "")));
    let mon = ManualPoller::new(&config(&one_target(&monitor, "")));
    for (who, poller, skipped) in [
        ("superuser", &su, &[][..]),
        ("pg_monitor", &mon, &["hba_file_rules"][..]),
    ] {
        let s = poller.poll();
        assert_ran(&s, who, skipped);
        let until = value(
            &s,
            "pg_role_valid_until_timestamp_seconds",
            &[("role", "expiring")],
        )
        .unwrap_or_else(|| panic!("{who}: no valid-until for the expiring role"));
        assert!(
            (until - expiry).abs() < 60.0 && (until - now_seconds() - 3.0 * 86400.0).abs() < 60.0,
            "{who}: valid until {until}, the role expires at {expiry}"
        );
        // VALID UNTIL 'infinity' and no VALID UNTIL at all: no expiry, no series.
        for role in ["app", "postgres", "monitor"] {
            assert_eq!(
                value(
                    &s,
                    "pg_role_valid_until_timestamp_seconds",
                    &[("role", role)]
                ),
                None,
                "{who}: {role}"
            );
        }
        // postgres and admin2; not_login cannot log in.
        assert_eq!(value(&s, "pg_roles_superusers", &[]), Some(2.0), "{who}");
        let mut supers: Vec<&str> = find(&s, "pg_role_superuser_info", &[])
            .iter()
            .map(|x| x.labels["role"].as_str())
            .collect();
        supers.sort();
        assert_eq!(supers, ["admin2", "postgres"], "{who}");

        // A policy with row security off protects nothing: flagged; tables with nothing
        // set have no series.
        fn at(t: &str) -> [(&str, &str); 3] {
            [("datname", "postgres"), ("schema", "public"), ("table", t)]
        }
        assert_eq!(
            value(&s, "pg_table_policies_without_rls", &at("guarded")),
            Some(1.0),
            "{who}"
        );
        assert_eq!(value(&s, "pg_table_rls_not_forced", &at("guarded")), None);
        assert!(find(&s, "pg_table_policies_without_rls", &[("table", "plain")]).is_empty());
        assert_eq!(
            value(
                &s,
                "pg_table_rls_enabled_tables",
                &[("datname", "postgres")]
            ),
            Some(0.0)
        );
        assert_eq!(
            value(&s, "pg_security_ssl_enabled", &[]),
            Some(0.0),
            "{who}"
        );
        let method = find(&s, "pg_security_password_encryption_info", &[]);
        assert_eq!(method.len(), 1, "{who}: {method:?}");
        assert!(
            ["md5", "scram-sha-256"].contains(&method[0].labels["method"].as_str()),
            "{method:?}"
        );
        // The test cluster preloads pg_stat_statements.
        assert_eq!(
            value(
                &s,
                "pg_preload_library_info",
                &[("library", "pg_stat_statements")]
            ),
            Some(1.0),
            "{who}"
        );
    }
    // The superuser reads pg_hba_file_rules: a clean file.
    let s = su.poll();
    assert_eq!(value(&s, "pg_hba_file_rule_errors", &[]), Some(0.0));
    assert!(find(&s, "pg_hba_file_rule_error_info", &[]).is_empty());
    let s = mon.poll();
    assert_eq!(value(&s, "pg_hba_file_rule_errors", &[]), None);
    assert_eq!(
        value(
            &s,
            "pgvigil_collector_series",
            &[("collector", "hba_file_rules")]
        ),
        Some(0.0)
    );

    // ENABLE: no longer unprotected, but the owner bypasses it until FORCE.
    pg.psql("postgres", "ALTER TABLE guarded ENABLE ROW LEVEL SECURITY")
        .unwrap();
    for (who, poller) in [("superuser", &su), ("pg_monitor", &mon)] {
        let s = poller.poll();
        let at = [("schema", "public"), ("table", "guarded")];
        assert_eq!(
            value(&s, "pg_table_policies_without_rls", &at),
            Some(0.0),
            "{who}"
        );
        assert_eq!(
            value(&s, "pg_table_rls_not_forced", &at),
            Some(1.0),
            "{who}"
        );
        assert_eq!(
            value(
                &s,
                "pg_table_rls_enabled_tables",
                &[("datname", "postgres")]
            ),
            Some(1.0),
            "{who}"
        );
    }
    pg.psql("postgres", "ALTER TABLE guarded FORCE ROW LEVEL SECURITY")
        .unwrap();
    let s = mon.poll();
    let at = [("schema", "public"), ("table", "guarded")];
    assert_eq!(value(&s, "pg_table_rls_not_forced", &at), Some(0.0));
    assert_eq!(value(&s, "pg_table_policies_without_rls", &at), Some(0.0));

    // A broken line on disk: the view shows it before any reload (the file is read now).
    let hba = pg.data_dir().join("pg_hba.conf");
    let mut text = std::fs::read_to_string(&hba).unwrap();
    text.push_str("host all all 127.0.0.1/32 no_such_method\n");
    let broken_line = text.lines().count().to_string();
    std::fs::write(&hba, &text).unwrap();
    let s = su.poll();
    assert_ran(&s, "superuser, broken hba", &[]);
    assert_eq!(value(&s, "pg_hba_file_rule_errors", &[]), Some(1.0));
    let rows = find(&s, "pg_hba_file_rule_error_info", &[]);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].labels["line_number"], broken_line);
    assert!(
        rows[0].labels["error"].contains("no_such_method"),
        "{rows:?}"
    );
    assert!(
        rows[0].labels["file_name"].ends_with("pg_hba.conf"),
        "{rows:?}"
    );
    // pg_monitor: still skipped, never an error.
    let s = mon.poll();
    assert_ran(&s, "pg_monitor, broken hba", &["hba_file_rules"]);

    // The grant the skip message names lets the pg_monitor role read it.
    pg.psql(
        "postgres",
        "GRANT SELECT ON pg_hba_file_rules TO monitor;
         GRANT EXECUTE ON FUNCTION pg_hba_file_rules() TO monitor;",
    )
    .unwrap();
    let s = mon.poll();
    assert_ran(&s, "pg_monitor with the grant", &[]);
    assert_eq!(value(&s, "pg_hba_file_rule_errors", &[]), Some(1.0));
}

/// A self-signed server certificate in the data directory and `ssl = on` (the server's
/// files owned by its OS user, the key 0600, as PostgreSQL requires).
fn enable_tls(pg: &TempCluster) {
    let data = pg.data_dir().to_path_buf();
    let out = Command::new("openssl")
        .current_dir(&data)
        .args([
            "req",
            "-x509",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            "server.key",
            "-out",
            "server.crt",
            "-subj",
            "/CN=localhost",
        ])
        .output()
        .expect("running openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (uid, gid) = {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&data).unwrap();
        (m.uid(), m.gid())
    };
    for f in ["server.crt", "server.key"] {
        use std::os::unix::fs::PermissionsExt;
        let p = data.join(f);
        std::os::unix::fs::chown(&p, Some(uid), Some(gid)).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    pg.psql(
        "postgres",
        "ALTER SYSTEM SET ssl = on; SELECT pg_reload_conf();",
    )
    .unwrap();
    wait_until(Duration::from_secs(20), "ssl on", || {
        pg.psql("postgres", "SHOW ssl").unwrap() == "on"
    });
}

/// A psql session held open (`SELECT pg_sleep(600)`) with `conninfo`; killed on drop.
fn hold_session(conninfo: &str) -> KillOnDrop {
    let child = Command::new("psql")
        .env_remove("LD_LIBRARY_PATH")
        .env("PGCONNECT_TIMEOUT", "10")
        .args(["-X", "-q", "-d", conninfo, "-c", "SELECT pg_sleep(600)"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("running psql (apt-get install postgresql-client)");
    KillOnDrop(child)
}

#[test]
fn tls_plaintext_tcp_and_unix_socket_connections_are_counted_apart() {
    let pg = cluster(&[]);
    enable_tls(&pg);
    pg.psql(
        "postgres",
        "CREATE ROLE tls_user LOGIN; CREATE ROLE plain_user LOGIN; CREATE ROLE socket_user LOGIN;",
    )
    .unwrap();
    let port = pg.port();
    let socket = pg.socket_dir().display().to_string();
    let _sessions = [
        hold_session(&format!(
            "host=127.0.0.1 port={port} user=tls_user dbname=postgres sslmode=require"
        )),
        hold_session(&format!(
            "host=127.0.0.1 port={port} user=tls_user dbname=postgres sslmode=require"
        )),
        hold_session(&format!(
            "host=127.0.0.1 port={port} user=plain_user dbname=postgres sslmode=disable"
        )),
        hold_session(&format!(
            "host={socket} port={port} user=socket_user dbname=postgres"
        )),
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    while pg
        .psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity WHERE usename IN ('tls_user', 'plain_user', 'socket_user')",
        )
        .unwrap()
        != "4"
    {
        assert!(Instant::now() < deadline, "the 4 sessions did not connect");
        std::thread::sleep(Duration::from_millis(100));
    }
    let monitor = pg_monitor_dsn(&pg, "postgres");
    for (who, dsn) in [("superuser", pg.dsn()), ("pg_monitor", monitor)] {
        let poller = ManualPoller::new(&config(&one_target(&dsn, "")));
        let s = poller.poll();
        let skipped: &[&str] = if who == "superuser" {
            &[]
        } else {
            &["hba_file_rules"]
        };
        assert_ran(&s, who, skipped);
        let count = |user: &str, encryption: &str| {
            value(
                &s,
                "pg_connections_by_encryption",
                &[
                    ("datname", "postgres"),
                    ("user", user),
                    ("encryption", encryption),
                ],
            )
        };
        assert_eq!(count("tls_user", "ssl"), Some(2.0), "{who}");
        assert_eq!(count("plain_user", "none"), Some(1.0), "{who}");
        assert_eq!(count("socket_user", "local"), Some(1.0), "{who}");
        for (user, only) in [
            ("tls_user", "ssl"),
            ("plain_user", "none"),
            ("socket_user", "local"),
        ] {
            let all = find(&s, "pg_connections_by_encryption", &[("user", user)]);
            assert_eq!(
                all.len(),
                1,
                "{who}: {user} counted once, as {only}: {all:?}"
            );
        }
        assert_eq!(
            value(&s, "pg_security_ssl_enabled", &[]),
            Some(1.0),
            "{who}"
        );
    }
}

/// The real binary as a `pg_monitor` role: `pgvigil once` succeeds (a skip is not a
/// problem), the skip is logged with the grant that enables the collector, and
/// `check-config` shows that grant in the plan.
#[test]
fn the_hba_skip_is_logged_once_with_the_grant_that_enables_it() {
    let pg = cluster(&[]);
    let monitor = pg_monitor_dsn(&pg, "postgres");
    let out = common::binary::command()
        .arg("once")
        .env("DATA_SOURCE_NAME", &monitor)
        .env("PGVIGIL_LOG", "info")
        .output()
        .expect("run pgvigil once");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr:\n{stderr}");
    let s = parse(&stdout);
    assert_ran(&s, "pg_monitor (pgvigil once)", &["hba_file_rules"]);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("pg_hba_file_rules"))
        .collect();
    assert_eq!(lines.len(), 1, "logged once:\n{stderr}");
    assert!(
        lines[0].contains("permission denied")
            && lines[0].contains("collector skipped")
            && lines[0].contains(
                "GRANT SELECT ON pg_hba_file_rules TO <role>; GRANT EXECUTE ON FUNCTION pg_hba_file_rules() TO <role>"
            ),
        "{}",
        lines[0]
    );

    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "pgvigil.yaml",
        &format!("targets:\n  - name: a\n    dsn: \"{monitor}\"\n"),
    );
    let out = common::binary::command()
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("run pgvigil check-config");
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{plan}");
    assert!(
        plan.contains("  hba_file_rules [cluster]")
            && plan.contains("needs a superuser, or: GRANT SELECT ON pg_hba_file_rules"),
        "{plan}"
    );
}
