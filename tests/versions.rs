//! Every built-in pack on every PostgreSQL major 13–18, against real servers: no collector
//! fails (as superuser and as a pg_monitor-only role), and the version-dependent columns
//! come out right. Server binaries: Debian's (15) plus the ones `scripts/fetch-pg.sh`
//! unpacks (13, 14, 16, 17, 18), or `PGVIGIL_TEST_PG_BINDIRS` (colon-separated).

mod common;

use std::path::PathBuf;

use common::*;

fn bindirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = match std::env::var("PGVIGIL_TEST_PG_BINDIRS") {
        Ok(v) if !v.is_empty() => v.split(':').map(PathBuf::from).collect(),
        _ => {
            let cache =
                std::env::var("PGVIGIL_PG_CACHE").unwrap_or_else(|_| "/var/tmp/pgvigil-pg".into());
            let mut found: Vec<PathBuf> = std::fs::read_dir(&cache)
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .map(|e| e.path().join("package/native/bin"))
                        .filter(|p| p.join("postgres").exists())
                        .collect()
                })
                .unwrap_or_default();
            found.sort();
            found
        }
    };
    if let Ok(local) = pgvigil::demo::cluster::find_bindir() {
        dirs.push(local);
    }
    assert!(
        dirs.len() >= 6,
        "need servers for PostgreSQL 13-18; run scripts/fetch-pg.sh (scripts/test.sh does); found {dirs:?}"
    );
    dirs
}

fn check_version(bindir: PathBuf) {
    let pg = TempCluster::start(ClusterOptions::default().with_bindir(&bindir))
        .unwrap_or_else(|e| panic!("{}: {e}", bindir.display()));
    let major = pg.major_version();
    pg.psql(
        "postgres",
        "CREATE ROLE monitor LOGIN; GRANT pg_monitor TO monitor; CREATE TABLE t (id int); CREATE INDEX ON t (id);",
    )
    .unwrap();
    for (who, dsn) in [
        ("superuser", pg.dsn()),
        ("pg_monitor", pg.dsn_for("monitor", "postgres")),
    ] {
        let poller = ManualPoller::new(&config(&one_target(&dsn, "")));
        poller.poll();
        pg.psql("postgres", "SELECT pg_sleep(0.01); SELECT count(*) FROM t;")
            .unwrap();
        let s = poller.poll();
        let errors = find(&s, "pgvigil_collector_errors_total", &[]);
        assert!(
            errors.is_empty(),
            "PostgreSQL {major} as {who}: collectors failed: {errors:#?}"
        );
        // pg_hba_file_rules is superuser-only by default on every version: the one
        // documented skip for pg_monitor (queries/security.yaml).
        let skipped: Vec<_> = find(&s, "pgvigil_collector_skipped", &[])
            .into_iter()
            .map(|x| (x.labels["collector"].as_str(), x.labels["reason"].as_str()))
            .collect();
        let expected: &[(&str, &str)] = match who {
            "pg_monitor" => &[("hba_file_rules", "missing_privilege")],
            _ => &[],
        };
        assert_eq!(
            skipped, expected,
            "PostgreSQL {major} as {who}: collectors skipped"
        );
        // The security pack on every version (pg_stat_gssapi, pg_roles, pg_policy, and
        // pg_hba_file_rules' columns that changed in 16).
        for name in [
            "pg_connections_by_encryption",
            "pg_roles_superusers",
            "pg_table_rls_enabled_tables",
            "pg_security_ssl_enabled",
            "pg_security_password_encryption_info",
            "pg_preload_library_info",
        ] {
            assert!(
                !find(&s, name, &[]).is_empty(),
                "PostgreSQL {major} as {who}: no {name}"
            );
        }
        assert_eq!(
            value(&s, "pg_hba_file_rule_errors", &[]),
            (who == "superuser").then_some(0.0),
            "PostgreSQL {major} as {who}: pg_hba_file_rules is for superusers"
        );
        // The same names on every version, although the views moved (17: checkpointer).
        for name in [
            "pg_checkpoints_timed_total",
            "pg_checkpoint_buffers_written_total",
            "pg_bgwriter_buffers_clean_total",
            "pg_wal_bytes_total",
            "pg_stat_archiver_archived_total",
            "pg_wal_segments",
            "pg_settings_shared_buffers_bytes",
        ] {
            assert!(
                value(&s, name, &[]).is_some(),
                "PostgreSQL {major} as {who}: no {name}"
            );
        }
        assert_eq!(
            value(&s, "pg_checkpoints_done_total", &[]).is_some(),
            major >= 18,
            "pg_stat_checkpointer.num_done exists from 18 on"
        );
        assert_eq!(
            value(&s, "pg_wal_records_total", &[]).is_some(),
            major >= 14,
            "pg_stat_wal exists from 14 on"
        );
        assert!(!find(&s, "pg_database_xid_age", &[]).is_empty());
        let info = find(&s, "pg_server_info", &[]);
        assert!(
            info[0].labels["server_version_num"].starts_with(&major.to_string()),
            "{info:?}"
        );
        let calls = find(&s, "pg_stat_statements_calls_total", &[]);
        assert!(!calls.is_empty(), "PostgreSQL {major}: no statements");
        let toplevel_empty = calls.iter().all(|c| c.labels["toplevel"].is_empty());
        assert_eq!(toplevel_empty, major == 13, "toplevel exists from 14 on");
        assert!(!find(&s, "pg_stat_statements_window_calls", &[]).is_empty());
        assert_eq!(
            value(&s, "pg_stat_statements_dealloc_total", &[]).is_some(),
            major >= 14,
            "pg_stat_statements_info exists from 14 on"
        );
        let ok: Vec<_> = find(&s, "pgvigil_collector_last_success_timestamp_seconds", &[])
            .iter()
            .map(|x| x.labels["collector"].clone())
            .collect();
        println!(
            "PostgreSQL {major} as {who}: {} series, collectors ok: {ok:?}",
            s.len()
        );
    }
}

#[test]
fn every_pack_works_on_postgresql_13_to_18() {
    let dirs = bindirs();
    // Two at a time: the machine has two cores.
    for pair in dirs.chunks(2) {
        let handles: Vec<_> = pair
            .iter()
            .cloned()
            .map(|d| std::thread::spawn(move || check_version(d)))
            .collect();
        for h in handles {
            if let Err(e) = h.join() {
                std::panic::resume_unwind(e);
            }
        }
    }
}
