//! TLS for sessions to PostgreSQL: libpq's `sslmode` semantics on rustls (`ring` provider).
//!
//! The driver (tokio-postgres) only knows `sslmode` disable/prefer/require and rejects
//! libpq's other TLS parameters, so the DSN parser ([`crate::postgres::Dsn`]) takes
//! `sslmode`, `sslrootcert`, `sslcert` and `sslkey` out of the connection string (or the
//! `PGSSL*` variables) and [`TlsSettings::resolve`] turns them into settings; [`connector`]
//! builds the rustls connector for each new session. This module decides what each mode
//! verifies; it never opens a socket.
//!
//! | `sslmode`               | TLS                      | chain checked   | host name checked |
//! |-------------------------|--------------------------|-----------------|-------------------|
//! | `disable`               | never                    | –               | –                 |
//! | `allow`, `prefer` (default) | if the server offers it | no           | no                |
//! | `require`               | always                   | only with a root certificate file (as libpq) | no |
//! | `verify-ca`             | always                   | yes             | no                |
//! | `verify-full`           | always                   | yes             | yes (DNS or IP SAN) |
//!
//! Roots: the `sslrootcert` PEM file (`system` = the OS trust store, as in libpq 16), else
//! libpq's default `~/.postgresql/root.crt` when it exists, else the OS trust store.
//! Named files are checked when the config is loaded (so errors name the file there) and
//! read again for every new session, so a rotated certificate is picked up without a
//! reload. See <https://www.postgresql.org/docs/current/libpq-ssl.html>.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::Host;
use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    /// libpq tries without TLS first; pgvigil treats it as `prefer`.
    Allow,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl FromStr for SslMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "invalid value {other:?}: expected disable, allow, prefer, require, \
                     verify-ca or verify-full"
                ))
            }
        })
    }
}

/// Where the trusted CA certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCerts {
    /// A PEM file of CA certificates.
    File(PathBuf),
    /// The operating system's trust store (`sslrootcert=system`).
    System,
}

/// A client certificate (PEM chain) and its private key (PEM, PKCS#1, PKCS#8 or SEC1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// libpq's TLS parameters as written (in a DSN or the `PGSSL*` variables), before
/// [`TlsSettings::resolve`] gives them meaning.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsParams {
    pub sslmode: Option<String>,
    pub sslrootcert: Option<String>,
    pub sslcert: Option<String>,
    pub sslkey: Option<String>,
    /// libpq's `passfile`, which the driver does not know either; taken out of the DSN
    /// with the TLS parameters and handed to [`crate::postgres::password`].
    pub passfile: Option<String>,
}

impl TlsParams {
    /// Takes `key = value` if it is one of the TLS parameters handled here (the last value
    /// wins, as in libpq); returns false for any other key.
    pub fn set(&mut self, key: &str, value: String) -> bool {
        let slot = match key {
            "sslmode" => &mut self.sslmode,
            "sslrootcert" => &mut self.sslrootcert,
            "sslcert" => &mut self.sslcert,
            "sslkey" => &mut self.sslkey,
            "passfile" => &mut self.passfile,
            _ => return false,
        };
        *slot = Some(value);
        true
    }
}

/// What to check of the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    /// Encrypt only: any certificate is accepted (handshake signatures are still checked).
    None,
    /// The chain must lead to a trusted root; the host name is not checked.
    Chain,
    /// The chain must lead to a trusted root and the certificate must name the host.
    ChainAndHostName,
}

/// A TLS parameter that cannot be used; `param` is the libpq name (`sslrootcert`, …).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{param}: {message}")]
pub struct TlsConfigError {
    pub param: &'static str,
    pub message: String,
}

fn err(param: &'static str, message: impl Into<String>) -> TlsConfigError {
    TlsConfigError {
        param,
        message: message.into(),
    }
}

/// The resolved TLS settings of one target.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsSettings {
    pub mode: SslMode,
    /// `None`: the OS trust store is used when verification needs roots.
    pub root_cert: Option<RootCerts>,
    pub client_cert: Option<ClientCert>,
}

/// libpq's default root certificate file, relative to the home directory.
const DEFAULT_ROOT_CERT: &str = ".postgresql/root.crt";

impl TlsSettings {
    /// Gives the parameters libpq's meaning and checks every named file (unless
    /// `sslmode=disable`). `home` is where libpq's default `.postgresql/root.crt` is looked
    /// for; it is used only when it exists.
    pub fn resolve(params: &TlsParams, home: Option<&Path>) -> Result<TlsSettings, TlsConfigError> {
        let explicit_root = match params.sslrootcert.as_deref() {
            None | Some("") => None,
            Some("system") => Some(RootCerts::System),
            Some(path) => Some(RootCerts::File(PathBuf::from(path))),
        };
        let mode = match params.sslmode.as_deref() {
            Some(m) => m.parse().map_err(|e: String| err("sslmode", e))?,
            // libpq 16: sslrootcert=system makes verify-full the default.
            None if explicit_root == Some(RootCerts::System) => SslMode::VerifyFull,
            None => SslMode::Prefer,
        };
        if explicit_root == Some(RootCerts::System) && mode != SslMode::VerifyFull {
            // libpq 16 refuses this too: any public CA can issue a certificate for a host
            // name, so trusting the OS store only makes sense together with the name check.
            return Err(err(
                "sslmode",
                format!(
                    "weak sslmode \"{}\" may not be used with sslrootcert=system (use \"verify-full\")",
                    mode.as_str()
                ),
            ));
        }
        let root_cert = explicit_root.or_else(|| {
            home.map(|h| h.join(DEFAULT_ROOT_CERT))
                .filter(|p| p.exists())
                .map(RootCerts::File)
        });
        let client_cert = match (params.sslcert.as_deref(), params.sslkey.as_deref()) {
            (None | Some(""), None | Some("")) => None,
            (Some(cert), Some(key)) if !cert.is_empty() && !key.is_empty() => Some(ClientCert {
                cert: cert.into(),
                key: key.into(),
            }),
            (Some(c), _) if !c.is_empty() => {
                return Err(err(
                    "sslkey",
                    "missing: sslcert is set, and a client certificate needs its key too",
                ))
            }
            _ => {
                return Err(err(
                    "sslcert",
                    "missing: sslkey is set, and a client certificate needs the certificate too",
                ))
            }
        };
        let settings = TlsSettings {
            mode,
            root_cert,
            client_cert,
        };
        if mode != SslMode::Disable {
            settings.check_files()?;
        }
        Ok(settings)
    }

    /// What the server's certificate must pass.
    pub fn verification(&self) -> Verification {
        match self.mode {
            SslMode::Disable | SslMode::Allow | SslMode::Prefer => Verification::None,
            // libpq: "if a root CA file exists, the behavior of sslmode=require will be the
            // same as that of verify-ca".
            SslMode::Require if self.root_cert.is_some() => Verification::Chain,
            SslMode::Require => Verification::None,
            SslMode::VerifyCa => Verification::Chain,
            SslMode::VerifyFull => Verification::ChainAndHostName,
        }
    }

    /// What a server certificate is checked against, for the error when one is rejected.
    pub fn describe_verification(&self) -> String {
        let roots = match &self.root_cert {
            Some(RootCerts::File(path)) => format!("the CA certificates in {}", quoted(path)),
            Some(RootCerts::System) | None => "the system trust store".to_string(),
        };
        let mode = self.mode.as_str();
        match self.verification() {
            Verification::None => format!("sslmode={mode}: the certificate is not verified"),
            Verification::Chain => format!(
                "sslmode={mode}: the certificate chain is checked against {roots}; the host name is not"
            ),
            Verification::ChainAndHostName => format!(
                "sslmode={mode}: the certificate chain is checked against {roots}, and the certificate must name the host"
            ),
        }
    }

    /// The driver's own (coarser) mode: whether it asks for TLS and whether it insists.
    pub fn driver_mode(&self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as D;
        match self.mode {
            SslMode::Disable => D::Disable,
            SslMode::Allow | SslMode::Prefer => D::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => D::Require,
        }
    }

    /// Reads and parses every named file, and checks that the client key fits its
    /// certificate, so a wrong path fails at load time rather than at every connect.
    fn check_files(&self) -> Result<(), TlsConfigError> {
        if let Some(RootCerts::File(path)) = &self.root_cert {
            root_store_from_file(path)?;
        }
        if let Some(client) = &self.client_cert {
            let certs = read_certs("sslcert", &client.cert)?;
            let key = read_key("sslkey", &client.key)?;
            rustls::sign::CertifiedKey::from_der(certs, key, &provider())
                .map_err(|e| err("sslkey", format!("{}: {e}", quoted(&client.key))))?;
        }
        Ok(())
    }
}

/// Prepares the driver's config for `settings`: its TLS mode, no TLS on Unix sockets
/// (libpq ignores `sslmode` there; the server never offers TLS on them), and a TLS
/// server name when only `hostaddr` is given (the driver refuses TLS without one).
pub fn prepare_driver_config(config: &mut tokio_postgres::Config, settings: &TlsSettings) {
    let hosts = config.get_hosts();
    let no_hosts = hosts.is_empty();
    let unix_only = !no_hosts
        && config.get_hostaddrs().is_empty()
        && hosts.iter().all(|h| !matches!(h, Host::Tcp(_)));
    if unix_only {
        config.ssl_mode(tokio_postgres::config::SslMode::Disable);
        return;
    }
    config.ssl_mode(settings.driver_mode());
    if no_hosts && settings.mode != SslMode::Disable {
        let addrs: Vec<String> = config
            .get_hostaddrs()
            .iter()
            .map(|a| a.to_string())
            .collect();
        for a in addrs {
            config.host(&a);
        }
    }
}

/// The rustls connector for one new session: files are read again, so rotated
/// certificates are used without a reload.
pub fn connector(settings: &TlsSettings) -> Result<MakeRustlsConnect, TlsConfigError> {
    let provider = Arc::new(provider());
    let algorithms = provider.signature_verification_algorithms;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err("sslmode", format!("TLS setup: {e}")))?;
    let builder = if settings.mode == SslMode::Disable {
        // Never used: the driver does not ask for TLS.
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(algorithms)))
    } else {
        match settings.verification() {
            Verification::None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(algorithms))),
            Verification::Chain => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly {
                    roots: root_store(settings.root_cert.as_ref())?,
                    algorithms,
                })),
            Verification::ChainAndHostName => {
                builder.with_root_certificates(root_store(settings.root_cert.as_ref())?)
            }
        }
    };
    let config = match &settings.client_cert {
        Some(client) if settings.mode != SslMode::Disable => {
            let certs = read_certs("sslcert", &client.cert)?;
            let key = read_key("sslkey", &client.key)?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| err("sslkey", format!("{}: {e}", quoted(&client.key))))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(MakeRustlsConnect::new(config))
}

/// A client config that encrypts but accepts any server certificate: for `pgvigil
/// healthcheck`, which talks to its own listener on loopback.
pub fn encrypt_only_client_config() -> ClientConfig {
    let provider = Arc::new(provider());
    let algorithms = provider.signature_verification_algorithms;
    ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(algorithms)))
        .with_no_client_auth()
}

/// Whether a connect error is the server's certificate being rejected (not a network or
/// protocol problem), looking through the driver's and tokio's wrappers.
pub fn is_certificate_rejected(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(rustls::Error::InvalidCertificate(_)) = e.downcast_ref::<rustls::Error>() {
            return true;
        }
        // io::Error's `source()` skips the error it wraps; look at that one too.
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if is_certificate_rejected(inner) {
                return true;
            }
        }
        next = e.source();
    }
    false
}

fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

fn quoted(path: &Path) -> String {
    format!("\"{}\"", path.display())
}

fn read_file(param: &'static str, path: &Path) -> Result<Vec<u8>, TlsConfigError> {
    std::fs::read(path).map_err(|e| err(param, format!("cannot read {}: {e}", quoted(path))))
}

/// Every `CERTIFICATE` block of a PEM file; at least one. `param` names the setting in
/// errors (also used for the OTLP exporter's certificates).
pub(crate) fn read_certs(
    param: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let pem = read_file(param, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(param, format!("{}: not valid PEM: {e}", quoted(path))))?;
    if certs.is_empty() {
        return Err(err(
            param,
            format!(
                "{}: no PEM certificate (-----BEGIN CERTIFICATE-----) in the file",
                quoted(path)
            ),
        ));
    }
    Ok(certs)
}

/// The first private key of a PEM file (encrypted keys are not supported).
pub(crate) fn read_key(
    param: &'static str,
    path: &Path,
) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    let pem = read_file(param, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        let why = match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "no unencrypted PEM private key (PKCS#1, PKCS#8 or SEC1) in the file".to_string()
            }
            e => format!("not valid PEM: {e}"),
        };
        err(param, format!("{}: {why}", quoted(path)))
    })
}

fn root_store_from_file(path: &Path) -> Result<RootCertStore, TlsConfigError> {
    let mut store = RootCertStore::empty();
    let (added, _ignored) = store.add_parsable_certificates(read_certs("sslrootcert", path)?);
    if added == 0 {
        return Err(err(
            "sslrootcert",
            format!("{}: no usable CA certificate in the file", quoted(path)),
        ));
    }
    Ok(store)
}

/// The roots to verify against: the configured file, else the OS trust store.
fn root_store(root: Option<&RootCerts>) -> Result<Arc<RootCertStore>, TlsConfigError> {
    match root {
        Some(RootCerts::File(path)) => Ok(Arc::new(root_store_from_file(path)?)),
        Some(RootCerts::System) | None => system_roots(),
    }
}

fn system_roots() -> Result<Arc<RootCertStore>, TlsConfigError> {
    system_store().map_err(|why| {
        err(
            "sslrootcert",
            format!(
                "no sslrootcert given and the system trust store has no certificates{why}; \
                 set sslrootcert to the CA file, or install ca-certificates"
            ),
        )
    })
}

/// The OS trust store, read once per process: it is large and changes with package
/// updates, not with pgvigil's config. The error is why it is empty (` (reason)` or "").
/// Shared with the OTLP exporter.
pub(crate) fn system_store() -> Result<Arc<RootCertStore>, String> {
    static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut store = RootCertStore::empty();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                Err(found
                    .errors
                    .first()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default())
            } else {
                Ok(Arc::new(store))
            }
        })
        .clone()
}

/// `prefer`/`require` without roots: encryption without authentication of the server, as
/// libpq does. The handshake signature is still checked, which proves the server holds
/// the key of the certificate it sent (this is what SCRAM channel binding builds on).
#[derive(Debug)]
struct AnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// `verify-ca` (and `require` with a root file): the chain must lead to a trusted root,
/// but the certificate need not name the host.
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(mode: Option<&str>, root: Option<&str>) -> TlsParams {
        TlsParams {
            sslmode: mode.map(str::to_string),
            sslrootcert: root.map(str::to_string),
            ..TlsParams::default()
        }
    }

    #[test]
    fn modes_verify_as_libpq_does() {
        let v = |mode: &str| {
            TlsSettings::resolve(&params(Some(mode), None), None)
                .unwrap()
                .verification()
        };
        assert_eq!(v("disable"), Verification::None);
        assert_eq!(v("allow"), Verification::None);
        assert_eq!(v("prefer"), Verification::None);
        assert_eq!(v("require"), Verification::None);
        assert_eq!(v("verify-ca"), Verification::Chain);
        assert_eq!(v("verify-full"), Verification::ChainAndHostName);
        let default = TlsSettings::resolve(&TlsParams::default(), None).unwrap();
        assert_eq!(default.mode, SslMode::Prefer);
        let e = TlsSettings::resolve(&params(Some("verify_full"), None), None).unwrap_err();
        assert_eq!(e.param, "sslmode");
        assert!(e.message.contains("verify-full"), "{e}");
    }

    #[test]
    fn system_roots_need_verify_full() {
        let s = TlsSettings::resolve(&params(None, Some("system")), None).unwrap();
        assert_eq!(s.mode, SslMode::VerifyFull);
        assert_eq!(s.root_cert, Some(RootCerts::System));
        let e = TlsSettings::resolve(&params(Some("require"), Some("system")), None).unwrap_err();
        assert!(e.to_string().contains("weak sslmode \"require\""), "{e}");
    }

    #[test]
    fn missing_files_are_named() {
        let e = TlsSettings::resolve(&params(Some("require"), Some("/nonexistent/ca.crt")), None)
            .unwrap_err();
        assert_eq!(e.param, "sslrootcert");
        assert!(e.message.contains("\"/nonexistent/ca.crt\""), "{e}");
        // Not read at all when TLS is off.
        TlsSettings::resolve(&params(Some("disable"), Some("/nonexistent/ca.crt")), None).unwrap();

        let mut p = params(Some("require"), None);
        p.sslcert = Some("/nonexistent/client.crt".into());
        let e = TlsSettings::resolve(&p, None).unwrap_err();
        assert_eq!(e.param, "sslkey", "{e}");
        p.sslkey = Some("/nonexistent/client.key".into());
        let e = TlsSettings::resolve(&p, None).unwrap_err();
        assert_eq!(e.param, "sslcert", "{e}");
        assert!(e.message.contains("/nonexistent/client.crt"), "{e}");
    }

    #[test]
    fn not_a_certificate_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.crt");
        std::fs::write(&path, "hello\n").unwrap();
        let e = TlsSettings::resolve(
            &params(Some("verify-ca"), Some(path.to_str().unwrap())),
            None,
        )
        .unwrap_err();
        assert!(e.message.contains("no PEM certificate"), "{e}");
    }

    #[test]
    fn default_root_file_is_used_when_present() {
        let home = tempfile::tempdir().unwrap();
        let s = TlsSettings::resolve(&params(Some("require"), None), Some(home.path())).unwrap();
        assert_eq!(s.root_cert, None);
        assert_eq!(s.verification(), Verification::None);
        // An existing (but bogus) ~/.postgresql/root.crt is read, and so rejected here.
        std::fs::create_dir(home.path().join(".postgresql")).unwrap();
        std::fs::write(home.path().join(DEFAULT_ROOT_CERT), "x").unwrap();
        let e =
            TlsSettings::resolve(&params(Some("require"), None), Some(home.path())).unwrap_err();
        assert!(e.message.contains("root.crt"), "{e}");
    }

    #[test]
    fn unix_sockets_never_use_tls() {
        let s = TlsSettings::resolve(&params(Some("require"), None), None).unwrap();
        let mut c: tokio_postgres::Config = "host=/run/postgresql".parse().unwrap();
        prepare_driver_config(&mut c, &s);
        assert_eq!(c.get_ssl_mode(), tokio_postgres::config::SslMode::Disable);
        let mut c: tokio_postgres::Config = "host=db1".parse().unwrap();
        prepare_driver_config(&mut c, &s);
        assert_eq!(c.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
        let mut c: tokio_postgres::Config = "hostaddr=127.0.0.1".parse().unwrap();
        prepare_driver_config(&mut c, &s);
        assert_eq!(c.get_hosts(), &[Host::Tcp("127.0.0.1".into())]);
    }
}
