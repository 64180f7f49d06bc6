//! OTLP over TLS, as a user runs it: the `pgvigil` binary against a real PostgreSQL and
//! real OTLP receivers over TLS (gRPC: tonic; HTTP/protobuf: hyper + rustls), with a test
//! CA made by the `openssl` CLI. Spans arrive when `OTEL_EXPORTER_OTLP_CERTIFICATE` (or the
//! config's `tracing.certificate`) names the CA; without it the receiver is untrusted and
//! the export fails, counted and logged; mutual TLS and gzip are seen by the receiver; a
//! bad certificate setting stops startup with its name.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::binary::{self, Pgvigil};
use common::otlp::{hex, OtlpReceiver, ServerTls};
use common::pki::{make_ca, make_leaf, CLIENT_EXT, SERVER_EXT};
use common::*;

const T: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const S: &str = "00f067aa0ba902b7";

/// The test CA, a receiver certificate for 127.0.0.1 signed by it, a client certificate
/// signed by it, and an unrelated CA.
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    other_ca: PathBuf,
    server: ServerTls,
    client_crt: PathBuf,
    client_key: PathBuf,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_ca(d, "ca");
    make_ca(d, "other-ca");
    make_leaf(d, "ca", "server", "localhost", SERVER_EXT);
    make_leaf(d, "ca", "client", "pgvigil", CLIENT_EXT);
    Pki {
        ca: d.join("ca.crt"),
        other_ca: d.join("other-ca.crt"),
        server: ServerTls {
            cert: d.join("server.crt"),
            key: d.join("server.key"),
            client_ca: None,
        },
        client_crt: d.join("client.crt"),
        client_key: d.join("client.key"),
        _dir: dir,
    }
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[derive(Clone, Copy, Debug)]
enum Proto {
    Grpc,
    Http,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Grpc => "grpc",
            Proto::Http => "http/protobuf",
        }
    }

    fn receiver(self, addr: SocketAddr, tls: &ServerTls) -> OtlpReceiver {
        match self {
            Proto::Grpc => OtlpReceiver::start_grpc_tls(addr, tls),
            Proto::Http => OtlpReceiver::start_http_tls(addr, tls),
        }
    }
}

/// Starts the binary with a config sending spans to `https://{otlp}` over `proto`, plus
/// `extra` lines in the `tracing:` section and `env`.
fn pgvigil(
    dir: &Path,
    dsn: &str,
    otlp: SocketAddr,
    proto: Proto,
    extra: &str,
    env: &[(&str, &str)],
) -> Pgvigil {
    let cfg = format!(
        "listen: 127.0.0.1:0\n{}activity:\n  sample_interval: 200ms\ntracing:\n  otlp_endpoint: https://{otlp}\n  protocol: {}\n  slow_query_threshold: 300ms\n{extra}",
        one_target(dsn, ""),
        proto.name()
    );
    let path = write(dir, "pgvigil.yaml", &cfg);
    let pgvigil = Pgvigil::start(["--config", p(&path)], env);
    // The sampler takes a first look before the slow query starts.
    std::thread::sleep(Duration::from_millis(800));
    pgvigil
}

/// One slow query with a sqlcommenter `traceparent` carrying trace `trace`.
fn slow_query(pg: &TempCluster, trace: &str) {
    pg.psql(
        "postgres",
        &format!("SELECT pg_sleep(0.7) /*traceparent='00-{trace}-{S}-01'*/"),
    )
    .unwrap();
}

/// Waits until the receiver holds the span of trace `trace`, parented as sent.
fn wait_for_span(recv: &OtlpReceiver, trace: &str) {
    let spans = recv.wait_for("the slow-query span", |s| {
        s.iter().any(|g| hex(&g.span.trace_id) == trace)
    });
    let span = spans
        .iter()
        .find(|g| hex(&g.span.trace_id) == trace)
        .unwrap();
    assert_eq!(hex(&span.span.parent_span_id), S);
}

/// `pgvigil_spans_exported_total` and the sum of `pgvigil_spans_dropped_total{reason=
/// "export_failed"}`, once `ok` accepts them (or after 30 s).
fn span_counts(pgvigil: &Pgvigil, ok: impl Fn(f64, f64) -> bool) -> (f64, f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = parse(&get(&pgvigil.url("/metrics")).1);
        let exported = value(&s, "pgvigil_spans_exported_total", &[]).unwrap_or(0.0);
        let failed: f64 = find(
            &s,
            "pgvigil_spans_dropped_total",
            &[("reason", "export_failed")],
        )
        .iter()
        .map(|x| x.value)
        .sum();
        if ok(exported, failed) || Instant::now() > deadline {
            return (exported, failed);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Spans reach a TLS receiver verified by `OTEL_EXPORTER_OTLP_CERTIFICATE`; without it
/// (the system trust store does not know the test CA) the export fails: counted in
/// `pgvigil_spans_dropped_total{reason="export_failed"}`, logged, and pgvigil runs on.
fn trusted_then_untrusted(proto: Proto) {
    let pki = pki();
    let pg = cluster(&[]);
    let otlp = free_addr();
    let recv = proto.receiver(otlp, &pki.server);
    let dir = tempfile::tempdir().unwrap();

    let trusted = pgvigil(
        dir.path(),
        &pg.dsn(),
        otlp,
        proto,
        "",
        &[
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", p(&pki.ca)),
            // The spec's `none` (which the OTLP crate alone would reject) wins over the
            // general variable's gzip.
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "none"),
        ],
    );
    slow_query(&pg, T);
    wait_for_span(&recv, T);
    let (exported, failed) = span_counts(&trusted, |e, _| e >= 1.0);
    println!("{proto:?} with the test CA: exported {exported}, export_failed {failed}");
    assert_eq!((exported, failed), (1.0, 0.0));
    assert_eq!(recv.encodings(), [""], "no compression");
    trusted.stop();

    let untrusted_trace = "0af7651916cd43dd8448eb211c80319c";
    let mut untrusted = pgvigil(dir.path(), &pg.dsn(), otlp, proto, "", &[]);
    slow_query(&pg, untrusted_trace);
    let (exported, failed) = span_counts(&untrusted, |_, f| f >= 1.0);
    println!("{proto:?} with the system trust store: exported {exported}, export_failed {failed}");
    assert_eq!((exported, failed), (0.0, 1.0));
    let line = untrusted.wait_for_log("span export failed", Duration::from_secs(5));
    println!("{line}");
    assert!(
        untrusted.is_running(),
        "an export failure never stops pgvigil"
    );
    assert!(
        !recv
            .spans()
            .iter()
            .any(|g| hex(&g.span.trace_id) == untrusted_trace),
        "nothing reached the receiver"
    );
    let log = untrusted.stop();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn grpc_over_tls_trusts_the_configured_ca_only() {
    trusted_then_untrusted(Proto::Grpc);
}

#[test]
fn http_protobuf_over_tls_trusts_the_configured_ca_only() {
    trusted_then_untrusted(Proto::Http);
}

/// A receiver that requires a client certificate: pgvigil presents one, and gzips its
/// requests. gRPC takes everything from the `OTEL_EXPORTER_OTLP_TRACES_*` variables (over
/// general ones that point elsewhere: the traces-specific variable wins); HTTP from the
/// config file's fields.
#[test]
fn mutual_tls_and_gzip() {
    let pki = pki();
    let pg = cluster(&[]);
    let server = ServerTls {
        client_ca: Some(pki.ca.clone()),
        ..pki.server.clone()
    };
    let dir = tempfile::tempdir().unwrap();
    let nowhere = dir.path().join("nowhere.pem");

    let otlp = free_addr();
    let recv = Proto::Grpc.receiver(otlp, &server);
    let grpc = pgvigil(
        dir.path(),
        &pg.dsn(),
        otlp,
        Proto::Grpc,
        "",
        &[
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", p(&pki.other_ca)),
            ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", p(&pki.ca)),
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", p(&nowhere)),
            (
                "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
                p(&pki.client_crt),
            ),
            ("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", p(&pki.client_key)),
            ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip"),
        ],
    );
    slow_query(&pg, T);
    wait_for_span(&recv, T);
    println!("gRPC request encodings: {:?}", recv.encodings());
    assert_eq!(recv.encodings(), ["gzip"], "grpc-encoding");
    assert_eq!(span_counts(&grpc, |e, _| e >= 1.0), (1.0, 0.0));
    drop(grpc);

    let otlp = free_addr();
    let recv = Proto::Http.receiver(otlp, &server);
    let fields = format!(
        "  certificate: {}\n  client_certificate: {}\n  client_key: {}\n  compression: gzip\n",
        p(&pki.ca),
        p(&pki.client_crt),
        p(&pki.client_key)
    );
    // The config's fields win over the variables.
    let http = pgvigil(
        dir.path(),
        &pg.dsn(),
        otlp,
        Proto::Http,
        &fields,
        &[
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", p(&pki.other_ca)),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "none"),
        ],
    );
    slow_query(&pg, T);
    wait_for_span(&recv, T);
    println!("HTTP request encodings: {:?}", recv.encodings());
    assert_eq!(recv.encodings(), ["gzip"], "Content-Encoding");
    assert_eq!(span_counts(&http, |e, _| e >= 1.0), (1.0, 0.0));
    drop(http);

    // Without a client certificate the receiver refuses the handshake: counted, not fatal.
    let mut anonymous = pgvigil(
        dir.path(),
        &pg.dsn(),
        otlp,
        Proto::Http,
        &format!("  certificate: {}\n", p(&pki.ca)),
        &[],
    );
    slow_query(&pg, "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(span_counts(&anonymous, |_, f| f >= 1.0), (0.0, 1.0));
    assert!(anonymous.is_running());
    assert_eq!(recv.spans().len(), 1, "only the mutual-TLS span arrived");
}

/// A CA file replaced under the same path (a rotation) is read again on `SIGHUP`: the
/// exporter restarts with it although the config text did not change.
#[test]
fn rotated_ca_file_is_read_again_on_reload() {
    let pki = pki();
    let pg = cluster(&[]);
    let otlp = free_addr();
    let recv = Proto::Grpc.receiver(otlp, &pki.server);
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("otlp-ca.pem");
    std::fs::copy(&pki.other_ca, &ca).unwrap();
    let mut pgvigil = pgvigil(
        dir.path(),
        &pg.dsn(),
        otlp,
        Proto::Grpc,
        &format!("  certificate: {}\n", p(&ca)),
        &[],
    );
    slow_query(&pg, "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(span_counts(&pgvigil, |_, f| f >= 1.0), (0.0, 1.0));

    std::fs::copy(&pki.ca, &ca).unwrap();
    pgvigil.signal("HUP");
    pgvigil.wait_for_log("configuration reloaded", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(800));
    slow_query(&pg, T);
    wait_for_span(&recv, T);
    let (exported, _) = span_counts(&pgvigil, |e, _| e >= 1.0);
    assert_eq!(exported, 1.0);
}

/// A certificate setting that cannot be used stops startup with a message naming it.
#[test]
fn bad_certificate_settings_stop_startup_with_their_name() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let not_pem = write(dir.path(), "ca.pem", "not a certificate\n");
    let cfg = write(
        dir.path(),
        "pgvigil.yaml",
        &format!(
            "listen: 127.0.0.1:0\n{}tracing:\n  otlp_endpoint: https://127.0.0.1:4317\n",
            one_target("host=127.0.0.1 port=1 user=postgres", "")
        ),
    );
    let cfg_with = |extra: &str| {
        let text = std::fs::read_to_string(&cfg).unwrap() + extra;
        write(dir.path(), "with.yaml", &text)
    };
    let not_pem = p(&not_pem);
    // (config file, environment, expected in the error)
    type Case<'a> = (PathBuf, Vec<(&'a str, &'a str)>, &'a str);
    let mut cases: Vec<Case> = vec![
        (
            cfg.clone(),
            vec![(
                "OTEL_EXPORTER_OTLP_CERTIFICATE",
                "/nonexistent/ca.pem",
            )],
            "OTEL_EXPORTER_OTLP_CERTIFICATE: cannot read \"/nonexistent/ca.pem\"",
        ),
        (
            cfg.clone(),
            vec![(
                "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
                not_pem,
            )],
            "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE: ",
        ),
        (
            cfg.clone(),
            vec![(
                "OTEL_EXPORTER_OTLP_CLIENT_KEY",
                not_pem,
            )],
            "OTEL_EXPORTER_OTLP_CLIENT_KEY is set but no client certificate",
        ),
        (
            cfg.clone(),
            vec![("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd")],
            "OTEL_EXPORTER_OTLP_COMPRESSION: invalid value \"zstd\"",
        ),
        (
            cfg_with("  client_certificate: /nonexistent/client.crt\n  client_key: /nonexistent/client.key\n"),
            vec![],
            "tracing.client_certificate: cannot read \"/nonexistent/client.crt\"",
        ),
    ];
    let wrong_key = pki.other_ca.with_extension("key");
    cases.push((
        cfg.clone(),
        vec![
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", p(&pki.client_crt)),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", p(&wrong_key)),
        ],
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY: not a usable certificate and key pair",
    ));
    for (config, env, want) in cases {
        let out = binary::command()
            .args(["--config", p(&config)])
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("{env:?}: {}", stderr.trim());
        assert!(!out.status.success(), "{env:?}: {stderr}");
        assert!(stderr.contains(want), "{env:?}: want {want:?} in {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let out = binary::command()
        .args(["--config", p(&cfg_with("  compression: zstd\n"))])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tracing.compression") && stderr.contains("unknown variant `zstd`"),
        "{stderr}"
    );
}
