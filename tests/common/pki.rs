//! Throwaway certificates for TLS tests, made with the `openssl` CLI: a CA and leaves
//! signed by it (EC P-256, valid two days).

use std::path::Path;
use std::process::Command;

pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("running openssl ({e}); these tests need it: apt-get install openssl")
        });
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed CA `name`.crt/.key in `dir`.
pub fn make_ca(dir: &Path, name: &str) {
    let args = format!(
        "req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
         -keyout {name}.key -out {name}.crt -subj /CN=pgvigil-test-{name} \
         -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign"
    );
    openssl(dir, &args.split_whitespace().collect::<Vec<_>>());
}

/// A leaf `name`.crt/.key signed by `ca`, with the given subject and extensions.
pub fn make_leaf(dir: &Path, ca: &str, name: &str, cn: &str, ext: &str) {
    let args = format!(
        "req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
         -keyout {name}.key -out {name}.csr -subj /CN={cn}"
    );
    openssl(dir, &args.split_whitespace().collect::<Vec<_>>());
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    let args = format!(
        "x509 -req -in {name}.csr -CA {ca}.crt -CAkey {ca}.key -set_serial 0x1234 -days 2 \
         -out {name}.crt -extfile {name}.ext"
    );
    openssl(dir, &args.split_whitespace().collect::<Vec<_>>());
}

/// A server leaf for 127.0.0.1 and localhost.
pub const SERVER_EXT: &str = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
     extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n";

/// A client leaf (for mutual TLS).
pub const CLIENT_EXT: &str =
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n";
