//! TLS to PostgreSQL with libpq's `sslmode` semantics, against a real server: a throwaway
//! CA and server/client certificates made with the `openssl` CLI ([`common::pki`]), a cluster with
//! `ssl = on` (and `cert` authentication for one role), and pgvigil's own `connect`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::pki::{make_ca, make_leaf};
use common::*;
use pgvigil::config::{Config, Dsn};
use pgvigil::postgres::slot::Slot;

/// Certificates for the tests. Server certificate: CN=localhost, SAN DNS:localhost and
/// IP:127.0.0.1, signed by `ca`. `other_ca` signed nothing the server uses.
struct Pki {
    dir: PathBuf,
    ca: PathBuf,
    other_ca: PathBuf,
    server_crt: PathBuf,
    server_key: PathBuf,
    /// CN=certuser, for `cert` authentication.
    client_crt: PathBuf,
    client_key: PathBuf,
}

fn make_pki(dir: &Path) -> Pki {
    std::fs::create_dir_all(dir).unwrap();
    make_ca(dir, "ca");
    make_ca(dir, "other-ca");
    make_leaf(
        dir,
        "ca",
        "server",
        "localhost",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
         extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
    );
    make_leaf(
        dir,
        "ca",
        "client",
        "certuser",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
         extendedKeyUsage=clientAuth\n",
    );
    Pki {
        dir: dir.to_path_buf(),
        ca: dir.join("ca.crt"),
        other_ca: dir.join("other-ca.crt"),
        server_crt: dir.join("server.crt"),
        server_key: dir.join("server.key"),
        client_crt: dir.join("client.crt"),
        client_key: dir.join("client.key"),
    }
}

/// One TLS-enabled cluster for every test here (a cluster in a static is cleaned up by
/// its watchdog when the test process exits). Its PKI lives next to the data directory,
/// so it goes with it.
fn fixture() -> &'static (TempCluster, Pki) {
    static FIXTURE: OnceLock<(TempCluster, Pki)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let pg = cluster(&[]);
        let data = pg.data_dir().to_path_buf();
        let pki = make_pki(&data.parent().expect("data dir has a parent").join("pki"));
        // The server's files: in the data directory, owned by the server's OS user, key 0600
        // (PostgreSQL refuses a key others can read).
        let (uid, gid) = {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(&data).unwrap();
            (m.uid(), m.gid())
        };
        for (from, to) in [
            (&pki.server_crt, "server.crt"),
            (&pki.server_key, "server.key"),
            (&pki.ca, "root.crt"),
        ] {
            let dest = data.join(to);
            std::fs::copy(from, &dest).unwrap();
            std::os::unix::fs::chown(&dest, Some(uid), Some(gid)).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        // `certuser` must present a client certificate signed by `ca`, over TLS only.
        let hba = data.join("pg_hba.conf");
        let old = std::fs::read_to_string(&hba).unwrap();
        std::fs::write(
            &hba,
            format!(
                "hostssl all certuser 127.0.0.1/32 cert\nhost all certuser 127.0.0.1/32 reject\n{old}"
            ),
        )
        .unwrap();
        pg.psql(
            "postgres",
            "CREATE ROLE certuser LOGIN;\n\
             ALTER SYSTEM SET ssl = on;\n\
             ALTER SYSTEM SET ssl_ca_file = 'root.crt';\n\
             SELECT pg_reload_conf();",
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while pg.psql("postgres", "SHOW ssl").unwrap() != "on" {
            assert!(
                Instant::now() < deadline,
                "ssl did not turn on:\n{}",
                pg.log_tail(20)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        (pg, pki)
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Connects with pgvigil's session type and reports (session is TLS, current_user).
fn session(dsn: &str) -> Result<(bool, String), String> {
    let dsn: Dsn = dsn.parse()?;
    runtime().block_on(async {
        let slot = Slot::new(dsn, Duration::from_secs(10));
        let mut session = slot.acquire().await.map_err(|e| e.message)?;
        let rows = session
            .query(
                "SELECT ssl, current_user::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                Duration::from_secs(10),
                Duration::from_secs(10),
            )
            .await
            .map_err(|e| e.message)?;
        let row = rows.first().ok_or("no row from pg_stat_ssl")?;
        Ok((row.get(0), row.get(1)))
    })
}

fn dsn(pg: &TempCluster, extra: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres {extra}",
        pg.port()
    )
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn require_encrypts_without_verifying() {
    let (pg, _) = fixture();
    // No root certificate: the server's certificate (from a CA nobody trusts) is accepted.
    let (ssl, _) = session(&dsn(pg, "sslmode=require")).unwrap();
    assert!(ssl, "sslmode=require must give a TLS session");
    // Host names are not checked either.
    let (ssl, _) = session(&format!(
        "host=db.example.com hostaddr=127.0.0.1 port={} user=postgres sslmode=require",
        pg.port()
    ))
    .unwrap();
    assert!(ssl);
}

#[test]
fn prefer_encrypts_when_the_server_offers_it() {
    let (pg, _) = fixture();
    assert!(session(&dsn(pg, "sslmode=prefer")).unwrap().0);
    assert!(session(&dsn(pg, "")).unwrap().0, "prefer is the default");
    assert!(session(&dsn(pg, "sslmode=allow")).unwrap().0);
}

#[test]
fn disable_never_encrypts() {
    let (pg, _) = fixture();
    let (ssl, _) = session(&dsn(pg, "sslmode=disable")).unwrap();
    assert!(!ssl);
    // And `cert` authentication is then impossible: pg_hba rejects certuser without TLS.
    let e = session(&format!(
        "host=127.0.0.1 port={} user=certuser dbname=postgres sslmode=disable",
        pg.port()
    ))
    .unwrap_err();
    assert!(e.contains("pg_hba.conf rejects"), "{e}");
}

#[test]
fn verify_full_checks_chain_and_host_name() {
    let (pg, pki) = fixture();
    let root = format!("sslrootcert={}", path(&pki.ca));
    // The certificate names IP 127.0.0.1 and DNS localhost.
    let (ssl, _) = session(&dsn(pg, &format!("sslmode=verify-full {root}"))).unwrap();
    assert!(ssl);
    let (ssl, _) = session(&format!(
        "postgresql://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
        pg.port(),
        path(&pki.ca)
    ))
    .unwrap();
    assert!(ssl);
    // Same server, reached under a name its certificate does not carry.
    let e = session(&format!(
        "host=db.example.com hostaddr=127.0.0.1 port={} user=postgres sslmode=verify-full {root}",
        pg.port()
    ))
    .unwrap_err();
    assert!(e.contains("db.example.com"), "{e}");
    assert!(e.contains("not valid for name"), "{e}");
    assert!(e.contains("the certificate must name the host"), "{e}");
    // The right name, but a CA that did not sign it.
    let e = session(&dsn(
        pg,
        &format!("sslmode=verify-full sslrootcert={}", path(&pki.other_ca)),
    ))
    .unwrap_err();
    assert!(e.contains("UnknownIssuer"), "{e}");
}

#[test]
fn verify_full_without_root_file_uses_the_system_trust_store() {
    let (pg, _) = fixture();
    // The test CA is not in the OS store, so the server is not trusted.
    for extra in ["sslrootcert=system", "sslmode=verify-full"] {
        let e = session(&format!(
            "host=localhost hostaddr=127.0.0.1 port={} user=postgres {extra}",
            pg.port()
        ))
        .unwrap_err();
        assert!(e.contains("UnknownIssuer"), "{e}");
        assert!(e.contains("checked against the system trust store"), "{e}");
    }
}

#[test]
fn verify_ca_checks_the_chain_only() {
    let (pg, pki) = fixture();
    // Any host name is fine as long as the chain is.
    let (ssl, _) = session(&format!(
        "host=db.example.com hostaddr=127.0.0.1 port={} user=postgres sslmode=verify-ca sslrootcert={}",
        pg.port(),
        path(&pki.ca)
    ))
    .unwrap();
    assert!(ssl);
    let e = session(&dsn(
        pg,
        &format!("sslmode=verify-ca sslrootcert={}", path(&pki.other_ca)),
    ))
    .unwrap_err();
    assert!(e.contains("invalid peer certificate"), "{e}");
    assert!(e.contains("UnknownIssuer"), "{e}");
    // The error says what the certificate was checked against.
    let what = format!(
        "sslmode=verify-ca: the certificate chain is checked against the CA certificates in \"{}\"; the host name is not",
        path(&pki.other_ca)
    );
    assert!(e.contains(&what), "{e}");
}

#[test]
fn require_with_a_root_certificate_verifies_the_chain() {
    let (pg, pki) = fixture();
    // libpq: with a root CA file, sslmode=require behaves as verify-ca.
    let e = session(&dsn(
        pg,
        &format!("sslmode=require sslrootcert={}", path(&pki.other_ca)),
    ))
    .unwrap_err();
    assert!(e.contains("UnknownIssuer"), "{e}");
    assert!(
        e.contains("sslmode=require: the certificate chain is checked"),
        "{e}"
    );
    assert!(
        session(&dsn(
            pg,
            &format!("sslmode=require sslrootcert={}", path(&pki.ca))
        ))
        .unwrap()
        .0
    );
}

#[test]
fn client_certificate_authenticates() {
    let (pg, pki) = fixture();
    let base = format!(
        "postgresql://certuser@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}",
        pg.port(),
        path(&pki.ca)
    );
    let (ssl, user) = session(&format!(
        "{base}&sslcert={}&sslkey={}",
        path(&pki.client_crt),
        path(&pki.client_key)
    ))
    .unwrap();
    assert!(ssl);
    assert_eq!(user, "certuser");
    let e = session(&base).unwrap_err();
    assert!(e.contains("requires a valid client certificate"), "{e}");
    // A key that does not belong to the certificate is caught when the DSN is parsed.
    let e = format!(
        "{base}&sslcert={}&sslkey={}",
        path(&pki.client_crt),
        path(&pki.server_key)
    )
    .parse::<Dsn>()
    .unwrap_err();
    assert!(e.starts_with("sslkey:"), "{e}");
    assert!(e.contains(path(&pki.server_key)), "{e}");
}

#[test]
fn quoted_keyword_paths_and_url_encoded_paths_work() {
    let (pg, pki) = fixture();
    let dir = pki.dir.join("my certs");
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("it's ca.crt");
    std::fs::copy(&pki.ca, &ca).unwrap();
    let quoted = path(&ca).replace('\\', "\\\\").replace('\'', "\\'");
    let (ssl, _) = session(&dsn(
        pg,
        &format!("sslmode=verify-full sslrootcert='{quoted}'"),
    ))
    .unwrap();
    assert!(ssl);
    let encoded = path(&ca).replace(' ', "%20").replace('\'', "%27");
    let (ssl, _) = session(&format!(
        "postgresql://postgres@127.0.0.1:{}/postgres?sslrootcert={encoded}&sslmode=verify-full",
        pg.port()
    ))
    .unwrap();
    assert!(ssl);
}

#[test]
fn poller_collects_over_verified_tls() {
    let (pg, pki) = fixture();
    let dsn = format!(
        "postgresql://postgres@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}",
        pg.port(),
        path(&pki.ca)
    );
    let poller = ManualPoller::new(&config(&one_target(&dsn, "")));
    let samples = poller.poll();
    assert_eq!(
        value(&samples, "pg_up", &[("target", "t1")]),
        Some(1.0),
        "{}",
        poller.text()
    );
}

#[test]
fn prefer_without_server_tls_connects_in_clear() {
    let pg = cluster(&[]); // ssl = off, initdb's default
    let (ssl, _) = session(&dsn(&pg, "sslmode=prefer")).unwrap();
    assert!(!ssl);
    let e = session(&dsn(&pg, "sslmode=require")).unwrap_err();
    assert!(e.contains("TLS"), "{e}");
}

#[test]
fn missing_root_certificate_is_a_config_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-ca.crt");
    let yaml = format!(
        "targets:\n  - name: a\n    dsn: postgresql://monitor:hunter2@db1/postgres?sslmode=verify-full&sslrootcert={}\n",
        path(&missing)
    );
    let file = write(dir.path(), "pgvigil.yaml", &yaml);
    let e = Config::load(&file).unwrap_err().to_string();
    assert!(e.starts_with(&format!("{}:3:", file.display())), "{e}");
    assert!(e.contains("targets[0].dsn"), "{e}");
    assert!(e.contains("sslrootcert"), "{e}");
    assert!(e.contains(path(&missing)), "{e}");
    assert!(!e.contains("hunter2"), "{e}");

    // Same for the client certificate, in the keyword form.
    let yaml = format!(
        "targets:\n  - name: a\n    dsn: \"host=db1 sslmode=require sslcert='{}' sslkey=/x.key\"\n",
        path(&dir.path().join("client.crt"))
    );
    let file = write(dir.path(), "pgvigil.yaml", &yaml);
    let e = Config::load(&file).unwrap_err().to_string();
    assert!(
        e.contains(":3:") && e.contains("targets[0].dsn: sslcert"),
        "{e}"
    );
    assert!(e.contains("client.crt"), "{e}");
}
