//! Web security of the listener: HTTPS and basic auth from a `web_config_file` in Prometheus
//! exporter-toolkit's `web.yml` format.
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: /etc/pgvigil/tls.crt
//!   key_file: /etc/pgvigil/tls.key
//!   client_ca_file: /etc/pgvigil/clients-ca.crt   # with client_auth_type
//!   client_auth_type: RequireAndVerifyClientCert   # or VerifyClientCertIfGiven, NoClientCert
//!   min_version: TLS12                             # or TLS13
//! basic_auth_users:
//!   prometheus: $2y$10$...                         # bcrypt hash
//! ```
//!
//! The file and the certificate files are read again when one of them changes (checked per
//! connection, by modification time), so rotated certificates and users need no restart; a
//! change that does not load is logged and the previous state stays. A wrong password and an
//! unknown user cost the same bcrypt work (an unknown user is checked against a hash of the
//! same cost), so response times do not tell which users exist. Successful checks are
//! remembered (a keyed hash of user and password, never the password), so a scrape every
//! few seconds does not pay bcrypt each time.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

use crate::yaml::{self, YamlError};

/// The `web.yml` document.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebFile {
    #[serde(default)]
    tls_server_config: Option<TlsServerConfig>,
    /// User name → bcrypt hash.
    #[serde(default)]
    basic_auth_users: HashMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsServerConfig {
    cert_file: PathBuf,
    key_file: PathBuf,
    #[serde(default)]
    client_ca_file: Option<PathBuf>,
    #[serde(default)]
    client_auth_type: ClientAuth,
    #[serde(default)]
    min_version: Option<TlsVersion>,
    #[serde(default)]
    max_version: Option<TlsVersion>,
}

/// exporter-toolkit's `client_auth_type` values that rustls can honour.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
enum ClientAuth {
    #[default]
    NoClientCert,
    VerifyClientCertIfGiven,
    RequireAndVerifyClientCert,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
enum TlsVersion {
    TLS12,
    TLS13,
}

/// Why a web config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Yaml(#[from] YamlError),
}

/// What a loaded web config does: an acceptor when HTTPS is on, and the users when basic
/// auth is on.
struct Loaded {
    /// Modification times of the web file and every file it names, as loaded.
    stamps: Vec<(PathBuf, Option<SystemTime>)>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    users: Arc<Users>,
}

/// Basic-auth users and the cache of checks that succeeded.
struct Users {
    hashes: HashMap<String, String>,
    /// A hash of the highest cost in use, checked for unknown users.
    decoy: String,
    keys: RandomState,
    verified: Mutex<HashSet<u64>>,
}

/// The highest bcrypt cost accepted in `basic_auth_users`.
const MAX_COST: u32 = 16;

/// Successful checks remembered at most (then the cache starts over).
const VERIFIED_CACHE: usize = 256;

/// The listener's security, reloaded when its files change.
pub struct Web {
    path: PathBuf,
    loaded: Mutex<Arc<Loaded>>,
}

impl Web {
    /// Loads `path`; errors name the file, line and field.
    pub fn load(path: &Path) -> Result<Web, WebError> {
        let loaded = load(path)?;
        Ok(Web {
            path: path.to_path_buf(),
            loaded: Mutex::new(Arc::new(loaded)),
        })
    }

    /// Whether the listener serves HTTPS.
    pub fn tls(&self) -> bool {
        self.current().tls.is_some()
    }

    /// The state to use for a new connection: reloaded first if a file changed since it
    /// was loaded. A reload that fails is logged and the previous state kept.
    fn current(&self) -> Arc<Loaded> {
        let mut guard = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        let changed = guard
            .stamps
            .iter()
            .any(|(p, t)| modified(p).as_ref() != t.as_ref());
        if changed {
            match load(&self.path) {
                Ok(l) => {
                    tracing::info!("{}: reloaded", self.path.display());
                    *guard = Arc::new(l);
                }
                Err(e) => {
                    tracing::error!("{e}; the previous web configuration stays");
                    // Do not retry on every connection until a file changes again.
                    let mut stale = Loaded {
                        stamps: Vec::new(),
                        tls: guard.tls.clone(),
                        users: Arc::clone(&guard.users),
                    };
                    stale.stamps = guard
                        .stamps
                        .iter()
                        .map(|(p, _)| (p.clone(), modified(p)))
                        .collect();
                    *guard = Arc::new(stale);
                }
            }
        }
        Arc::clone(&guard)
    }

    /// The TLS acceptor for a new connection, `None` for plain HTTP.
    pub fn acceptor(&self) -> Option<tokio_rustls::TlsAcceptor> {
        self.current().tls.clone()
    }

    /// Whether a request with this `Authorization` header may pass. Always true without
    /// `basic_auth_users`. The bcrypt check runs on the blocking pool.
    pub async fn authorize(&self, header: Option<&[u8]>) -> bool {
        let users = Arc::clone(&self.current().users);
        if users.hashes.is_empty() {
            return true;
        }
        let Some((user, password)) = header.and_then(basic_credentials) else {
            return false;
        };
        let key = users.keys.hash_one((&user, &password));
        if users
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&key)
        {
            return true;
        }
        let checked = Arc::clone(&users);
        let ok = tokio::task::spawn_blocking(move || {
            // The same work for an unknown user as for a wrong password.
            let (hash, known) = match checked.hashes.get(&user) {
                Some(h) => (h.as_str(), true),
                None => (checked.decoy.as_str(), false),
            };
            bcrypt::verify(password.as_bytes(), hash).unwrap_or(false) && known
        })
        .await
        .unwrap_or(false);
        if ok {
            let mut v = users.verified.lock().unwrap_or_else(|e| e.into_inner());
            if v.len() >= VERIFIED_CACHE {
                v.clear();
            }
            v.insert(key);
        }
        ok
    }
}

/// `pgvigil healthcheck`: GET `/healthz` on pgvigil's own listener at `addr` (an
/// unspecified address such as `0.0.0.0` becomes loopback), over TLS when `tls` (the
/// certificate is not checked: it is our own listener), within `timeout`. `Err` says why.
pub fn healthcheck(
    addr: std::net::SocketAddr,
    tls: bool,
    timeout: std::time::Duration,
) -> Result<(), String> {
    use std::io::{Read, Write};
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let tcp = std::net::TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    tcp.set_read_timeout(Some(timeout)).ok();
    tcp.set_write_timeout(Some(timeout)).ok();
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let mut response = Vec::new();
    let io = |e: std::io::Error| format!("{addr}: {e}");
    if tls {
        let config = Arc::new(crate::postgres::tls::encrypt_only_client_config());
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let conn = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        stream.write_all(request.as_bytes()).map_err(io)?;
        // A peer that closes without close_notify still gave us the status line.
        let _ = stream.read_to_end(&mut response);
    } else {
        let mut tcp = tcp;
        tcp.write_all(request.as_bytes()).map_err(io)?;
        tcp.read_to_end(&mut response).map_err(io)?;
    }
    let text = String::from_utf8_lossy(&response);
    let status = text.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) == Some("200") {
        Ok(())
    } else if status.is_empty() {
        Err(format!("{addr}: no HTTP response"))
    } else {
        Err(format!("{addr}: {status}"))
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// `Basic base64(user:password)` → (user, password).
fn basic_credentials(header: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(header).ok()?;
    let (scheme, encoded) = text.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64_decode(encoded.trim())?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// Standard base64 with padding (RFC 4648), as browsers and Prometheus send it.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes = s.trim_end_matches('=').as_bytes();
    if s.len() % 4 != 0 || bytes.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= value(c)? << (18 - 6 * i);
        }
        let take = chunk.len() - 1;
        out.extend_from_slice(&n.to_be_bytes()[1..1 + take]);
    }
    Some(out)
}

fn read(path: &Path) -> Result<Vec<u8>, WebError> {
    std::fs::read(path).map_err(|source| WebError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn load(path: &Path) -> Result<Loaded, WebError> {
    let bytes = read(path)?;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let file: WebFile = if text.trim().is_empty() {
        WebFile::default()
    } else {
        yaml::parse(path, &text)?
    };
    // Relative paths are relative to the web file, as in exporter-toolkit.
    let base = path.parent().unwrap_or(Path::new("."));
    let file = WebFile {
        tls_server_config: file.tls_server_config.map(|mut t| {
            for p in [&mut t.cert_file, &mut t.key_file] {
                *p = base.join(&*p);
            }
            t.client_ca_file = t.client_ca_file.map(|c| base.join(c));
            t
        }),
        ..file
    };
    let at = |key: &str| yaml::locate_key_after(&text, key, 0);
    let err = |key: &str, message: String| WebError::Yaml(YamlError::at(path, at(key), message));
    let mut stamps = vec![(path.to_path_buf(), modified(path))];

    let mut decoy_cost = 4; // bcrypt's lowest cost
    for (user, hash) in &file.basic_auth_users {
        let parts: bcrypt::HashParts = hash.parse().map_err(|e| {
            WebError::Yaml(YamlError::at(
                path,
                yaml::locate_key_after(&text, user, at("basic_auth_users").0),
                format!("basic_auth_users.{user}: not a bcrypt hash: {e}"),
            ))
        })?;
        // Each check costs 2^cost rounds: 10–12 is usual; 18 already takes seconds per
        // request, and a typo'd 31 would hang every login (and our decoy hash at load).
        if parts.get_cost() > MAX_COST {
            return Err(WebError::Yaml(YamlError::at(
                path,
                yaml::locate_key_after(&text, user, at("basic_auth_users").0),
                format!(
                    "basic_auth_users.{user}: bcrypt cost {} is above {MAX_COST}: every request would take seconds or more",
                    parts.get_cost()
                ),
            )));
        }
        decoy_cost = decoy_cost.max(parts.get_cost());
    }
    let decoy = if file.basic_auth_users.is_empty() {
        String::new()
    } else {
        bcrypt::hash("pgvigil decoy", decoy_cost)
            .map_err(|e| err("basic_auth_users", format!("basic_auth_users: {e}")))?
    };

    let tls = match &file.tls_server_config {
        None => None,
        Some(t) => {
            let located = |key: &str, e: WebError| match e {
                WebError::Read { path: p, source } => err(
                    key,
                    format!(
                        "tls_server_config.{key}: {}: cannot read: {source}",
                        p.display()
                    ),
                ),
                e => e,
            };
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(
                &read(&t.cert_file).map_err(|e| located("cert_file", e))?,
            )
            .collect::<Result<_, _>>()
            .map_err(|e| err("cert_file", format!("tls_server_config.cert_file: {e}")))?;
            if certs.is_empty() {
                return Err(err(
                    "cert_file",
                    format!(
                        "tls_server_config.cert_file: {}: no PEM certificate",
                        t.cert_file.display()
                    ),
                ));
            }
            let key = PrivateKeyDer::from_pem_slice(
                &read(&t.key_file).map_err(|e| located("key_file", e))?,
            )
            .map_err(|e| err("key_file", format!("tls_server_config.key_file: {e}")))?;
            stamps.push((t.cert_file.clone(), modified(&t.cert_file)));
            stamps.push((t.key_file.clone(), modified(&t.key_file)));

            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let min = t.min_version.unwrap_or(TlsVersion::TLS12);
            let max = t.max_version.unwrap_or(TlsVersion::TLS13);
            if min > max {
                return Err(err(
                    "min_version",
                    "tls_server_config.min_version: above max_version".into(),
                ));
            }
            let versions: Vec<&'static rustls::SupportedProtocolVersion> = [
                (TlsVersion::TLS12, &rustls::version::TLS12),
                (TlsVersion::TLS13, &rustls::version::TLS13),
            ]
            .into_iter()
            .filter(|(v, _)| *v >= min && *v <= max)
            .map(|(_, p)| p)
            .collect();
            let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
                .with_protocol_versions(&versions)
                .map_err(|e| err("min_version", format!("tls_server_config: {e}")))?;
            let builder = match (t.client_auth_type, &t.client_ca_file) {
                (ClientAuth::NoClientCert, _) => builder.with_no_client_auth(),
                (_, None) => {
                    return Err(err(
                        "client_auth_type",
                        "tls_server_config.client_auth_type: needs client_ca_file".into(),
                    ))
                }
                (auth, Some(ca)) => {
                    let mut roots = rustls::RootCertStore::empty();
                    let pem = read(ca).map_err(|e| located("client_ca_file", e))?;
                    for cert in CertificateDer::pem_slice_iter(&pem) {
                        let cert = cert.map_err(|e| {
                            err(
                                "client_ca_file",
                                format!("tls_server_config.client_ca_file: {e}"),
                            )
                        })?;
                        roots.add(cert).map_err(|e| {
                            err(
                                "client_ca_file",
                                format!("tls_server_config.client_ca_file: {e}"),
                            )
                        })?;
                    }
                    stamps.push((ca.clone(), modified(ca)));
                    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                        Arc::new(roots),
                        Arc::clone(&provider),
                    );
                    let verifier = if auth == ClientAuth::VerifyClientCertIfGiven {
                        verifier.allow_unauthenticated()
                    } else {
                        verifier
                    };
                    let verifier = verifier.build().map_err(|e| {
                        err(
                            "client_ca_file",
                            format!("tls_server_config.client_ca_file: {e}"),
                        )
                    })?;
                    builder.with_client_cert_verifier(verifier)
                }
            };
            let mut config = builder
                .with_single_cert(certs, key)
                .map_err(|e| err("key_file", format!("tls_server_config: {e}")))?;
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
        }
    };
    Ok(Loaded {
        stamps,
        tls,
        users: Arc::new(Users {
            hashes: file.basic_auth_users,
            decoy,
            keys: RandomState::new(),
            verified: Mutex::new(HashSet::new()),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_decoded() {
        // "prometheus:s3cr:et" — the password may contain ':'.
        assert_eq!(
            basic_credentials(b"Basic cHJvbWV0aGV1czpzM2NyOmV0"),
            Some(("prometheus".into(), "s3cr:et".into()))
        );
        assert_eq!(
            basic_credentials(b"basic YTpi"),
            Some(("a".into(), "b".into()))
        );
        assert_eq!(basic_credentials(b"Bearer abc"), None);
        assert_eq!(basic_credentials(b"Basic !!!!"), None);
        assert_eq!(basic_credentials(b"Basic YQ=="), None, "no colon");
        assert_eq!(basic_credentials(b"Basic YTpiYw="), None, "bad padding");
    }

    #[tokio::test]
    async fn wrong_password_and_unknown_user_are_refused_and_the_right_one_passes() {
        let dir = tempfile::tempdir().unwrap();
        let hash = bcrypt::hash("right", 4).unwrap();
        let path = dir.path().join("web.yml");
        std::fs::write(&path, format!("basic_auth_users:\n  prom: {hash}\n")).unwrap();
        let web = Web::load(&path).unwrap();
        let header = |u: &str, p: &str| {
            let raw = format!("{u}:{p}");
            format!("Basic {}", base64_encode(raw.as_bytes()))
        };
        assert!(
            web.authorize(Some(header("prom", "right").as_bytes()))
                .await
        );
        assert!(
            web.authorize(Some(header("prom", "right").as_bytes()))
                .await,
            "cached"
        );
        assert!(
            !web.authorize(Some(header("prom", "wrong").as_bytes()))
                .await
        );
        assert!(
            !web.authorize(Some(header("nobody", "right").as_bytes()))
                .await
        );
        assert!(!web.authorize(None).await);
        assert!(!web.tls());
    }

    #[test]
    fn a_bad_hash_is_located() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.yml");
        std::fs::write(&path, "basic_auth_users:\n  prom: not-a-hash\n").unwrap();
        let e = Web::load(&path).err().unwrap().to_string();
        assert!(
            e.contains("web.yml:2:3: basic_auth_users.prom: not a bcrypt hash"),
            "{e}"
        );
        // A cost of 31 (2^31 rounds) is refused at once, not computed.
        let slow = "$2b$31$X1ZjmLf50ZPqBx.BlfMt3.0205NuAvb3uLvcP0aR3IXAMjeZspj32";
        std::fs::write(&path, format!("basic_auth_users:\n  prom: {slow}\n")).unwrap();
        let e = Web::load(&path).err().unwrap().to_string();
        assert!(
            e.contains("web.yml:2:3: basic_auth_users.prom: bcrypt cost 31 is above 16"),
            "{e}"
        );
        std::fs::write(
            &path,
            "tls_server_config:\n  cert_file: /nonexistent.crt\n  key_file: /k\n",
        )
        .unwrap();
        let e = Web::load(&path).err().unwrap().to_string();
        assert!(
            e.contains("web.yml:2:3: tls_server_config.cert_file: /nonexistent.crt: cannot read"),
            "{e}"
        );
        std::fs::write(
            &path,
            "tls_server_config:\n  cert_file: a\n  key_file: b\n  cipher_suites: []\n",
        )
        .unwrap();
        let e = Web::load(&path).err().unwrap().to_string();
        assert!(
            e.contains("web.yml:4:3") && e.contains("cipher_suites"),
            "{e}"
        );
    }

    fn base64_encode(bytes: &[u8]) -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, &b)| n | (b as u32) << (16 - 8 * i));
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[test]
    fn base64_round_trips() {
        for s in ["", "a", "ab", "abc", "abcd", "user:pässword"] {
            assert_eq!(
                base64_decode(&base64_encode(s.as_bytes())).unwrap(),
                s.as_bytes()
            );
        }
    }
}
