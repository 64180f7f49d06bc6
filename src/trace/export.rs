//! Getting spans out: a bounded queue per target in front of an OTLP exporter. The
//! sampler never waits on the network: when the queue is full the span is dropped and
//! counted; a failed or timed-out export drops its batch, counted too. Memory is bounded
//! by the queue size whatever the receiver does.
//!
//! The console sink ([`start_console`]) takes the same queue and prints one line per span
//! on stderr instead ([`console_line`]): what `pgvigil demo` does when no OTLP endpoint is
//! set, so a newcomer sees the spans without a tracing backend.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};
use opentelemetry_sdk::Resource;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;
use tokio::sync::mpsc;

use crate::config::{OtlpCompression, OtlpProtocol, TracingConfig};
use crate::postgres::tls::{read_certs, read_key, system_store};
use crate::store::Store;

/// Most spans per export call.
const BATCH_MAX: usize = 512;
/// How long a batch waits to fill up before it is sent.
const BATCH_DELAY: Duration = Duration::from_millis(500);
/// An export that takes longer is abandoned and its spans counted as dropped.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a span did not reach the receiver (`pgvigil_spans_dropped_total{reason}`).
pub const REASONS: &[&str] = &["queue_full", "export_failed", "not_sampled"];

/// Where spans go: an OTLP receiver, or the console (`pgvigil demo` without an endpoint).
#[derive(Debug, Clone)]
pub enum Sink {
    Otlp(Endpoint),
    Console,
}

/// Where to send spans, and how.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `None`: let the OTLP crate read `OTEL_EXPORTER_OTLP_*` itself.
    pub url: Option<String>,
    pub protocol: OtlpProtocol,
    /// How to verify an `https://` receiver and prove who we are; `None` for `http://`.
    pub tls: Option<Tls>,
    /// Whether export requests are gzipped.
    pub gzip: bool,
}

/// TLS to the receiver, read and checked when the config is applied, so a missing file or
/// bad PEM stops startup (or a reload) with the setting's name instead of failing exports.
#[derive(Clone)]
pub struct Tls {
    /// The configured CA certificate(s), else the OS trust store.
    roots: Arc<RootCertStore>,
    /// Where `roots` came from, for the log.
    roots_from: String,
    /// The client certificate and key for mutual TLS, as PEM (tonic takes PEM).
    identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The same roots and identity for the HTTP exporter's client (rustls with `ring`).
    http: Arc<rustls::ClientConfig>,
    /// A hash of the files' contents, so a reload restarts the exporter when a
    /// certificate was rotated under the same path.
    fingerprint: u64,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("roots", &self.roots_from)
            .field("client_certificate", &self.identity.is_some())
            .finish()
    }
}

/// One OTLP setting and where its value came from: the config field, else the
/// traces-specific variable, else the general one (the OTel exporter spec's order for
/// the variables; the config file comes first, as for `otlp_endpoint` and `protocol`).
struct Setting {
    /// The config field or variable, for messages.
    from: &'static str,
    value: String,
}

/// `tracing.{field}`, else `OTEL_EXPORTER_OTLP_TRACES_{var}`, else `OTEL_EXPORTER_OTLP_{var}`.
fn setting(
    field_value: Option<String>,
    names: [&'static str; 3],
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<Setting> {
    let [field, traces, general] = names;
    if let Some(value) = field_value {
        return Some(Setting { from: field, value });
    }
    [traces, general]
        .into_iter()
        .find_map(|from| env(from).map(|value| Setting { from, value }))
}

fn path_setting(
    field_value: Option<&PathBuf>,
    names: [&'static str; 3],
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<(&'static str, PathBuf)> {
    let field_value = field_value.map(|p| p.to_string_lossy().into_owned());
    setting(field_value, names, env).map(|s| (s.from, PathBuf::from(s.value)))
}

const CERTIFICATE: [&str; 3] = [
    "tracing.certificate",
    "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_CERTIFICATE",
];
const CLIENT_CERTIFICATE: [&str; 3] = [
    "tracing.client_certificate",
    "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
];
const CLIENT_KEY: [&str; 3] = [
    "tracing.client_key",
    "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
    "OTEL_EXPORTER_OTLP_CLIENT_KEY",
];
const COMPRESSION: [&str; 3] = [
    "tracing.compression",
    "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
    "OTEL_EXPORTER_OTLP_COMPRESSION",
];

/// The compression variables as they were at startup (see [`take_compression_env`]).
static COMPRESSION_ENV: OnceLock<[Option<String>; 2]> = OnceLock::new();

/// Moves `OTEL_EXPORTER_OTLP_TRACES_COMPRESSION` and `OTEL_EXPORTER_OTLP_COMPRESSION` out
/// of the process environment into pgvigil's own keeping. The OTLP crate reads them by
/// itself whenever pgvigil does not ask for gzip, and it rejects the spec's `none` and
/// would override a config file's `compression: none`; pgvigil resolves compression
/// itself. Call once from `main`, before any other thread exists (changing the
/// environment while other threads read it is undefined behaviour in libc).
pub fn take_compression_env() {
    let [_, traces, general] = COMPRESSION;
    let saved = [traces, general].map(|name| {
        let value = std::env::var(name).ok().filter(|v| !v.is_empty());
        std::env::remove_var(name);
        value
    });
    let _ = COMPRESSION_ENV.set(saved);
}

fn compression(cfg: &TracingConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<bool, String> {
    let saved = COMPRESSION_ENV.get();
    let lookup = |name: &str| match saved {
        Some([traces, general]) if name == COMPRESSION[1] => traces.clone(),
        Some([_, general]) if name == COMPRESSION[2] => general.clone(),
        _ => env(name),
    };
    let field = cfg.compression.map(|c| match c {
        OtlpCompression::Gzip => "gzip".to_string(),
        OtlpCompression::None => "none".to_string(),
    });
    match setting(field, COMPRESSION, &lookup) {
        None => Ok(false),
        Some(s) => match s.value.trim().parse::<OtlpCompression>() {
            Ok(c) => Ok(c == OtlpCompression::Gzip),
            Err(e) => Err(format!("{}: {e}", s.from)),
        },
    }
}

impl Endpoint {
    /// Resolves everything but the URL and protocol the caller found: TLS (certificates
    /// read and checked now) and compression, each from the config field, else the
    /// `OTEL_EXPORTER_OTLP_TRACES_*` variable, else `OTEL_EXPORTER_OTLP_*`. TLS is used
    /// when the endpoint (config, else the same variables) is `https://`.
    pub fn resolve(
        cfg: &TracingConfig,
        protocol: OtlpProtocol,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Endpoint, String> {
        let effective = cfg.otlp_endpoint.clone().or_else(|| {
            env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
        });
        let https = effective
            .as_deref()
            .is_some_and(|u| u.trim().to_ascii_lowercase().starts_with("https://"));
        let tls = Tls::resolve(cfg, env, https)?;
        Ok(Endpoint {
            url: cfg.otlp_endpoint.clone(),
            protocol,
            tls,
            gzip: compression(cfg, env)?,
        })
    }

    /// Changes when the certificate files' contents change (0 without TLS).
    pub fn fingerprint(&self) -> u64 {
        self.tls.as_ref().map_or(0, |t| t.fingerprint)
    }

    /// TLS and compression, for the log.
    pub fn describe_transport(&self) -> String {
        let tls = match &self.tls {
            Some(t) => format!(
                "TLS verified by {}{}",
                t.roots_from,
                if t.identity.is_some() {
                    ", with a client certificate"
                } else {
                    ""
                }
            ),
            None => "no TLS".to_string(),
        };
        let gzip = if self.gzip { ", gzip" } else { "" };
        format!("{tls}{gzip}")
    }
}

impl Tls {
    /// Reads the configured files (always, so a wrong path is found even before the
    /// endpoint turns `https://`); `None` unless `https`.
    fn resolve(
        cfg: &TracingConfig,
        env: &dyn Fn(&str) -> Option<String>,
        https: bool,
    ) -> Result<Option<Tls>, String> {
        let ca = path_setting(cfg.certificate.as_ref(), CERTIFICATE, env);
        let cert = path_setting(cfg.client_certificate.as_ref(), CLIENT_CERTIFICATE, env);
        let key = path_setting(cfg.client_key.as_ref(), CLIENT_KEY, env);
        let mut fingerprint = std::collections::hash_map::DefaultHasher::new();
        let custom = match &ca {
            Some((from, path)) => {
                let certs = read_certs(from, path).map_err(|e| e.to_string())?;
                certs.hash(&mut fingerprint);
                Some((
                    ca_store(from, path, certs)?,
                    format!("{from} ({})", path.display()),
                ))
            }
            None => None,
        };
        let identity = match (cert, key) {
            (None, None) => None,
            (Some((cert_from, cert)), Some((key_from, key))) => {
                Some(identity(cert_from, &cert, key_from, &key)?)
            }
            (Some((from, _)), None) => {
                return Err(format!(
                    "{from} is set but no client key: set tracing.client_key or {}",
                    CLIENT_KEY[2]
                ))
            }
            (None, Some((from, _))) => {
                return Err(format!(
                    "{from} is set but no client certificate: set tracing.client_certificate or {}",
                    CLIENT_CERTIFICATE[2]
                ))
            }
        };
        if let Some(id) = &identity {
            (&id.cert_pem, &id.key_pem).hash(&mut fingerprint);
        }
        if !https {
            if custom.is_some() || identity.is_some() {
                tracing::warn!(
                    "tracing: OTLP certificates are set but the endpoint is not https://, so they are not used"
                );
            }
            return Ok(None);
        }
        let (roots, roots_from) = match custom {
            Some(c) => c,
            None => {
                let store = system_store().map_err(|why| {
                    format!(
                        "the OTLP endpoint is https:// but the system trust store has no \
                         certificates{why}: set {} (or tracing.certificate) to the receiver's \
                         CA file, or install ca-certificates",
                        CERTIFICATE[2]
                    )
                })?;
                (store, "the system trust store".to_string())
            }
        };
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(Arc::clone(&roots));
        let http = match &identity {
            Some(id) => builder
                .with_client_auth_cert(id.certs.clone(), id.key.clone_key())
                .map_err(|e| {
                    format!(
                        "{} and {}: not a usable certificate and key pair: {e}",
                        id.cert_from, id.key_from
                    )
                })?,
            None => builder.with_no_client_auth(),
        };
        Ok(Some(Tls {
            roots,
            roots_from,
            identity: identity.map(|id| (id.cert_pem, id.key_pem)),
            http: Arc::new(http),
            fingerprint: fingerprint.finish(),
        }))
    }

    /// tonic's TLS settings: the same roots and identity (tonic's `tls-ring` feature).
    fn tonic(&self) -> tonic::transport::ClientTlsConfig {
        let mut config = tonic::transport::ClientTlsConfig::new()
            .trust_anchors(self.roots.roots.iter().cloned());
        if let Some((cert, key)) = &self.identity {
            config = config.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        config
    }

    /// The HTTP exporter's client, with this TLS config.
    fn reqwest(&self) -> Result<reqwest::Client, String> {
        reqwest::Client::builder()
            .use_preconfigured_tls((*self.http).clone())
            .timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| format!("cannot build the OTLP HTTP client: {e}"))
    }
}

/// The CA file as a root store: at least one usable certificate.
fn ca_store(
    from: &'static str,
    path: &Path,
    certs: Vec<CertificateDer<'static>>,
) -> Result<Arc<RootCertStore>, String> {
    let mut store = RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "{from}: \"{}\": no usable CA certificate in the file",
            path.display()
        ));
    }
    Ok(Arc::new(store))
}

struct Identity {
    cert_from: &'static str,
    key_from: &'static str,
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

/// The client certificate chain and key, checked as PEM now.
fn identity(
    cert_from: &'static str,
    cert: &Path,
    key_from: &'static str,
    key: &Path,
) -> Result<Identity, String> {
    let certs = read_certs(cert_from, cert).map_err(|e| e.to_string())?;
    let parsed_key = read_key(key_from, key).map_err(|e| e.to_string())?;
    let read = |from: &str, path: &Path| {
        std::fs::read(path).map_err(|e| format!("{from}: cannot read \"{}\": {e}", path.display()))
    };
    Ok(Identity {
        cert_from,
        key_from,
        certs,
        key: parsed_key,
        cert_pem: read(cert_from, cert)?,
        key_pem: read(key_from, key)?,
    })
}

/// Builds an OTLP span exporter for `endpoint` with `resource`. Headers and timeouts from
/// `OTEL_EXPORTER_OTLP_*` are honoured by the OTLP crate; TLS and compression are
/// resolved by [`Endpoint::resolve`].
pub fn build_exporter(
    endpoint: &Endpoint,
    resource: &Resource,
) -> Result<opentelemetry_otlp::SpanExporter, String> {
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
    let built = match endpoint.protocol {
        OtlpProtocol::Grpc => {
            let mut b = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_timeout(EXPORT_TIMEOUT);
            if let Some(url) = &endpoint.url {
                b = b.with_endpoint(url.clone());
            }
            if let Some(tls) = &endpoint.tls {
                b = b.with_tls_config(tls.tonic());
            }
            if endpoint.gzip {
                b = b.with_compression(opentelemetry_otlp::Compression::Gzip);
            }
            b.build()
        }
        OtlpProtocol::HttpProtobuf => {
            let mut b = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_timeout(EXPORT_TIMEOUT);
            if let Some(url) = &endpoint.url {
                // A bare base URL gets the standard traces path, as the OTLP spec does
                // for OTEL_EXPORTER_OTLP_ENDPOINT.
                let trimmed = url.trim_end_matches('/');
                let full = if trimmed.ends_with("/v1/traces") {
                    trimmed.to_string()
                } else {
                    format!("{trimmed}/v1/traces")
                };
                b = b.with_endpoint(full);
            }
            if let Some(tls) = &endpoint.tls {
                b = b.with_http_client(tls.reqwest()?);
            }
            if endpoint.gzip {
                b = b.with_compression(opentelemetry_otlp::Compression::Gzip);
            }
            b.build()
        }
    };
    let mut exporter = built.map_err(|e| format!("cannot build the OTLP exporter: {e}"))?;
    exporter.set_resource(resource);
    Ok(exporter)
}

/// The sampler's side of the queue.
#[derive(Clone)]
pub struct Queue {
    tx: mpsc::Sender<SpanData>,
    store: Arc<Store>,
    target: String,
}

impl Queue {
    /// Queues a span without waiting; a full queue drops it (counted).
    pub fn push(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            self.drop_spans("queue_full", 1);
        }
    }

    pub fn drop_spans(&self, reason: &'static str, n: u64) {
        self.store.count_spans(&self.target, Some(reason), n);
    }
}

/// Creates the queue and the task that drains it into `exporter`. The task ends, after
/// a last export, when every `Queue` clone is dropped.
pub fn start(
    exporter: opentelemetry_otlp::SpanExporter,
    capacity: usize,
    store: Arc<Store>,
    target: String,
) -> (Queue, tokio::task::JoinHandle<()>) {
    let (queue, rx) = queue(capacity, &store, &target);
    let handle = tokio::spawn(drain(rx, exporter, store, target));
    (queue, handle)
}

/// Like [`start`], but the task prints each span on stderr ([`console_line`]) and counts
/// it as exported. Printing never fails, so nothing is dropped but for a full queue.
pub fn start_console(
    capacity: usize,
    store: Arc<Store>,
    target: String,
) -> (Queue, tokio::task::JoinHandle<()>) {
    let (queue, mut rx) = queue(capacity, &store, &target);
    let handle = tokio::spawn(async move {
        while let Some(span) = rx.recv().await {
            eprintln!("{}", console_line(&target, &span));
            store.count_spans(&target, None, 1);
        }
    });
    (queue, handle)
}

fn queue(capacity: usize, store: &Arc<Store>, target: &str) -> (Queue, mpsc::Receiver<SpanData>) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    store.enable_spans(target, REASONS);
    let queue = Queue {
        tx,
        store: Arc::clone(store),
        target: target.to_string(),
    };
    (queue, rx)
}

/// Longest query text on a console line; the rest is cut with `…`.
const CONSOLE_QUERY_MAX: usize = 120;

/// One span as one console line: `span TRACE_ID DURATION target/database: QUERY`, the
/// query being the span's masked `db.query.text` with its whitespace collapsed.
pub fn console_line(target: &str, span: &SpanData) -> String {
    let attr = |key: &str| {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.as_str().into_owned())
            .unwrap_or_default()
    };
    let secs = span
        .end_time
        .duration_since(span.start_time)
        .unwrap_or_default()
        .as_secs_f64();
    let query = attr("db.query.text");
    let mut words = query.split_whitespace().collect::<Vec<_>>().join(" ");
    if let Some((cut, _)) = words.char_indices().nth(CONSOLE_QUERY_MAX) {
        words.truncate(cut);
        words.push('…');
    }
    format!(
        "span {} {secs:.3}s {target}/{}: {words}",
        span.span_context.trace_id(),
        attr("db.namespace"),
    )
}

async fn drain(
    mut rx: mpsc::Receiver<SpanData>,
    mut exporter: opentelemetry_otlp::SpanExporter,
    store: Arc<Store>,
    target: String,
) {
    let mut failing = false;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + BATCH_DELAY;
        while batch.len() < BATCH_MAX {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        let result = tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(batch)).await;
        match result {
            Ok(Ok(())) => {
                if failing {
                    tracing::info!(target = %target, "span export works again");
                    failing = false;
                }
                store.count_spans(&target, None, n);
            }
            Ok(Err(e)) => {
                if !failing {
                    tracing::warn!(target = %target, "span export failed, dropping {n} spans (logged once until it works again): {e}");
                    failing = true;
                }
                store.count_spans(&target, Some("export_failed"), n);
            }
            Err(_) => {
                if !failing {
                    tracing::warn!(target = %target, "span export timed out after {EXPORT_TIMEOUT:?}, dropping {n} spans");
                    failing = true;
                }
                store.count_spans(&target, Some("export_failed"), n);
            }
        }
    }
    let _ = exporter.shutdown();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(cfg: &TracingConfig, vars: &[(&str, &str)]) -> Result<Endpoint, String> {
        let env = |k: &str| {
            vars.iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.to_string())
        };
        Endpoint::resolve(cfg, OtlpProtocol::Grpc, &env)
    }

    fn endpoint(url: &str) -> TracingConfig {
        TracingConfig {
            otlp_endpoint: Some(url.to_string()),
            ..TracingConfig::default()
        }
    }

    #[test]
    fn compression_follows_config_then_traces_then_general_variable() {
        let http = endpoint("http://127.0.0.1:4317");
        assert!(!resolve(&http, &[]).unwrap().gzip);
        let general = [("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")];
        assert!(resolve(&http, &general).unwrap().gzip);
        let both = [
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "none"),
        ];
        assert!(
            !resolve(&http, &both).unwrap().gzip,
            "the traces variable wins"
        );
        let mut cfg = http.clone();
        cfg.compression = Some(OtlpCompression::None);
        assert!(!resolve(&cfg, &general).unwrap().gzip, "the config wins");
        let e = resolve(&http, &[("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd")]).unwrap_err();
        assert_eq!(
            e,
            "OTEL_EXPORTER_OTLP_COMPRESSION: invalid value \"zstd\": use gzip or none"
        );
    }

    #[test]
    fn tls_only_for_https_with_the_system_store_by_default() {
        assert!(resolve(&endpoint("http://127.0.0.1:4317"), &[])
            .unwrap()
            .tls
            .is_none());
        let from_env = [("OTEL_EXPORTER_OTLP_ENDPOINT", "HTTPS://otlp.example.com")];
        let e = resolve(&TracingConfig::default(), &from_env).unwrap();
        // Without ca-certificates installed, a clear error is the expected outcome.
        if let Some(tls) = e.tls {
            assert_eq!(tls.roots_from, "the system trust store");
            assert!(!tls.roots.is_empty());
        }
    }

    #[test]
    fn bad_certificate_settings_name_the_setting() {
        let https = endpoint("https://127.0.0.1:4317");
        let e = resolve(
            &https,
            &[("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.pem")],
        )
        .unwrap_err();
        assert!(
            e.starts_with("OTEL_EXPORTER_OTLP_CERTIFICATE: cannot read \"/nonexistent/ca.pem\""),
            "{e}"
        );
        // The traces-specific variable wins over the general one.
        let e = resolve(
            &https,
            &[
                ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/general.pem"),
                (
                    "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
                    "/nonexistent/traces.pem",
                ),
            ],
        )
        .unwrap_err();
        assert!(
            e.starts_with(
                "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE: cannot read \"/nonexistent/traces.pem\""
            ),
            "{e}"
        );
        // The config field wins over both, and is checked even for http://.
        let mut cfg = endpoint("http://127.0.0.1:4317");
        cfg.certificate = Some("/nonexistent/config.pem".into());
        let e = resolve(
            &cfg,
            &[(
                "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
                "/nonexistent/traces.pem",
            )],
        )
        .unwrap_err();
        assert!(e.starts_with("tracing.certificate: cannot read"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let mut cfg = https.clone();
        cfg.certificate = Some(not_pem.clone());
        let e = resolve(&cfg, &[]).unwrap_err();
        assert!(e.starts_with("tracing.certificate: "), "{e}");
        assert!(e.contains("no PEM certificate"), "{e}");

        let e = resolve(
            &https,
            &[(
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
                not_pem.to_str().unwrap(),
            )],
        )
        .unwrap_err();
        assert!(
            e.starts_with("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE is set but no client key"),
            "{e}"
        );
        let e = resolve(
            &https,
            &[
                (
                    "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
                    not_pem.to_str().unwrap(),
                ),
                (
                    "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
                    "/nonexistent/key.pem",
                ),
            ],
        )
        .unwrap_err();
        assert!(
            e.starts_with("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE: "),
            "{e}"
        );
    }
}
