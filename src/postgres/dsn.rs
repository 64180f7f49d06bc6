//! The `dsn:` of a target: a libpq connection string (`key=value …`) or URL
//! (`postgresql://…`), parsed into the driver's config plus the TLS settings the driver
//! does not understand.
//!
//! tokio-postgres rejects libpq's `sslrootcert`, `sslcert`, `sslkey` and
//! `sslmode=verify-ca|verify-full`, so they are taken out of the string here (URL query
//! parameters percent-decoded; keyword values with libpq's single quotes and backslash
//! escapes) and everything else is left, byte for byte, to the driver's parser.

use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

use crate::postgres::password::PasswordSource;
use crate::postgres::tls::{TlsParams, TlsSettings};
use crate::yaml::from_str_de;

/// A parsed connection string. Its `Debug` never shows the password.
#[derive(Clone)]
pub struct Dsn(
    /// Everything the driver understands (host, user, password, …).
    pub tokio_postgres::Config,
    /// `sslmode`, `sslrootcert`, `sslcert`, `sslkey` with libpq's meaning.
    pub TlsSettings,
    /// Where the password comes from when it is not in the string (read per connection).
    pub PasswordSource,
);

impl std::fmt::Debug for Dsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&describe(&self.0))
    }
}

impl FromStr for Dsn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (rest, params) = split_tls_params(s)?;
        let mut pg =
            tokio_postgres::Config::from_str(&rest).map_err(
                |e| match std::error::Error::source(&e) {
                    Some(cause) => format!("invalid connection string: {cause}"),
                    None => format!("{e}"),
                },
            )?;
        let tls =
            TlsSettings::resolve(&params, home_dir().as_deref()).map_err(|e| e.to_string())?;
        pg.ssl_mode(tls.driver_mode());
        let password = PasswordSource {
            file: None,
            passfile: params.passfile.map(PathBuf::from),
        };
        Ok(Dsn(pg, tls, password))
    }
}

impl<'de> Deserialize<'de> for Dsn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        from_str_de(d)
    }
}

/// Where libpq looks for `~/.postgresql/root.crt`.
fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
}

/// Splits `dsn` into the part for the driver and the TLS parameters handled by pgvigil.
/// The driver's part keeps every other parameter exactly as written, so its own errors
/// (and its password handling) are unchanged.
pub fn split_tls_params(dsn: &str) -> Result<(String, TlsParams), String> {
    match ["postgresql://", "postgres://"]
        .iter()
        .find(|p| dsn.starts_with(*p))
    {
        Some(scheme) => Ok(split_url(dsn, scheme.len())),
        None => split_keywords(dsn),
    }
}

/// URL form: the query starts at the first `?` after the user info. As in libpq, user
/// info is present only when an `@` comes before the first `/`, so a `?` inside a
/// password is not mistaken for the query.
fn split_url(dsn: &str, scheme_len: usize) -> (String, TlsParams) {
    let mut params = TlsParams::default();
    let body = &dsn[scheme_len..];
    let after_userinfo = match body.find(['@', '/']) {
        Some(i) if body.as_bytes()[i] == b'@' => i + 1,
        _ => 0,
    };
    let Some(q) = body[after_userinfo..].find('?') else {
        return (dsn.to_string(), params);
    };
    let query_start = scheme_len + after_userinfo + q;
    let mut kept = Vec::new();
    for piece in dsn[query_start + 1..].split('&') {
        let taken = piece.split_once('=').is_some_and(|(k, v)| {
            let key = percent_encoding::percent_decode_str(k).decode_utf8_lossy();
            let value = percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned();
            params.set(&key, value)
        });
        if !taken {
            kept.push(piece);
        }
    }
    let mut rest = dsn[..query_start].to_string();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    (rest, params)
}

/// Keyword form, with libpq's (and the driver's) grammar: `key = value` pairs separated
/// by whitespace; a value is either single-quoted or runs to the next whitespace, and a
/// backslash escapes the next character in both.
fn split_keywords(dsn: &str) -> Result<(String, TlsParams), String> {
    let mut params = TlsParams::default();
    let mut rest = String::with_capacity(dsn.len());
    let mut copied_to = 0;
    let mut it = dsn.char_indices().peekable();
    let invalid = |m: String| format!("invalid connection string: {m}");
    loop {
        while it.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = it.peek() else { break };
        let mut key_end = dsn.len();
        while let Some(&(i, c)) = it.peek() {
            if c.is_whitespace() || c == '=' {
                key_end = i;
                break;
            }
            it.next();
        }
        let key = &dsn[start..key_end];
        while it.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        match it.next() {
            Some((_, '=')) => {}
            Some((i, c)) => {
                return Err(invalid(format!(
                    "unexpected character at byte {i}: expected `=` but got `{c}`"
                )))
            }
            None => return Err(invalid("unexpected EOF".into())),
        }
        while it.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if it.next_if(|(_, c)| *c == '\'').is_some() {
            loop {
                match it.next() {
                    Some((_, '\'')) => break,
                    Some((_, '\\')) => value.extend(it.next().map(|(_, c)| c)),
                    Some((_, c)) => value.push(c),
                    None => {
                        return Err(invalid(
                            "unterminated quoted connection parameter value".into(),
                        ))
                    }
                }
            }
        } else {
            while let Some((_, c)) = it.next_if(|(_, c)| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(it.next().map(|(_, c)| c));
                } else {
                    value.push(c);
                }
            }
            if value.is_empty() {
                return Err(invalid("unexpected EOF".into()));
            }
        }
        let end = it.peek().map_or(dsn.len(), |&(i, _)| i);
        if params.set(key, value) {
            rest.push_str(&dsn[copied_to..start]);
            // Keeps the neighbours apart: `a='x'sslmode=require` is two parameters.
            rest.push(' ');
            copied_to = end;
        }
    }
    rest.push_str(&dsn[copied_to..]);
    Ok((rest, params))
}

/// `host:port/dbname user=…` for logs: never the password.
pub fn describe(config: &tokio_postgres::Config) -> String {
    let (host, port) = server(config);
    let db = database(config);
    match config.get_user() {
        Some(user) => format!("{host}:{port}/{db} user={user}"),
        None => format!("{host}:{port}/{db}"),
    }
}

/// The first host (a name, an address or a Unix socket directory) and port, with libpq's
/// defaults `localhost` and 5432: the server that logs and span attributes name.
pub fn server(config: &tokio_postgres::Config) -> (String, u16) {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    (host, config.get_ports().first().copied().unwrap_or(5432))
}

/// The database a session opens: `dbname`, else the user's name (the driver's and
/// libpq's default), else `postgres`.
pub fn database(config: &tokio_postgres::Config) -> &str {
    config
        .get_dbname()
        .or_else(|| config.get_user())
        .unwrap_or("postgres")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(dsn: &str) -> (String, TlsParams) {
        split_tls_params(dsn).unwrap()
    }

    fn p(
        mode: Option<&str>,
        root: Option<&str>,
        cert: Option<&str>,
        key: Option<&str>,
    ) -> TlsParams {
        TlsParams {
            sslmode: mode.map(str::to_string),
            sslrootcert: root.map(str::to_string),
            sslcert: cert.map(str::to_string),
            sslkey: key.map(str::to_string),
            passfile: None,
        }
    }

    #[test]
    fn passfile_is_taken_out_of_both_forms() {
        for dsn in [
            "postgresql://u@db1/app?passfile=%2Fetc%2Fpgvigil%2Fpgpass&application_name=x",
            "host=db1 user=u dbname=app passfile='/etc/pgvigil/pgpass' application_name=x",
        ] {
            let d: Dsn = dsn.parse().unwrap();
            assert_eq!(
                d.2.passfile.as_deref(),
                Some(std::path::Path::new("/etc/pgvigil/pgpass")),
                "{dsn}"
            );
            assert_eq!(d.0.get_application_name(), Some("x"));
        }
    }

    #[test]
    fn url_parameters_are_taken_out_and_decoded() {
        let (rest, params) = split(
            "postgresql://u:pw@db1:5432/postgres?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca%20certs%2Froot.crt&sslcert=/c.crt&sslkey=/c.key",
        );
        assert_eq!(
            rest,
            "postgresql://u:pw@db1:5432/postgres?application_name=x"
        );
        assert_eq!(
            params,
            p(
                Some("verify-full"),
                Some("/etc/ca certs/root.crt"),
                Some("/c.crt"),
                Some("/c.key")
            )
        );

        let (rest, params) = split("postgres://db1/app?sslmode=require");
        assert_eq!(rest, "postgres://db1/app");
        assert_eq!(params, p(Some("require"), None, None, None));

        // Encoded keys count too; the last value wins, as in libpq.
        let (_, params) = split("postgresql://db1?ssl%6Dode=prefer&sslmode=verify-ca");
        assert_eq!(params.sslmode.as_deref(), Some("verify-ca"));

        let (rest, params) = split("postgresql://db1/app");
        assert_eq!(rest, "postgresql://db1/app");
        assert_eq!(params, TlsParams::default());
    }

    #[test]
    fn url_password_with_question_mark_is_not_a_query() {
        let (rest, params) = split("postgresql://u:p?sslmode=x@db1/app?sslmode=verify-ca");
        assert_eq!(rest, "postgresql://u:p?sslmode=x@db1/app");
        assert_eq!(params.sslmode.as_deref(), Some("verify-ca"));
        // ... and an `@` in a query value is not user info.
        let (rest, params) = split("postgresql://db1/app?sslrootcert=/certs/a@b.crt");
        assert_eq!(rest, "postgresql://db1/app");
        assert_eq!(params.sslrootcert.as_deref(), Some("/certs/a@b.crt"));
    }

    #[test]
    fn keyword_parameters_are_taken_out() {
        let (rest, params) = split(
            "host=db1 sslmode=verify-full  sslrootcert = '/etc/my certs/ca.crt' user=u password='it\\'s' sslcert=/c\\ d.crt sslkey='/k\\'ey'",
        );
        assert_eq!(params.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(params.sslrootcert.as_deref(), Some("/etc/my certs/ca.crt"));
        assert_eq!(params.sslcert.as_deref(), Some("/c d.crt"));
        assert_eq!(params.sslkey.as_deref(), Some("/k'ey"));
        assert!(!rest.contains("ssl"), "{rest}");
        // Everything else is untouched, byte for byte.
        assert!(rest.contains("host=db1 "), "{rest}");
        assert!(rest.contains(" user=u password='it\\'s' "), "{rest}");
    }

    #[test]
    fn keyword_values_with_quotes_and_escapes() {
        let (rest, params) = split("sslmode='require'dbname='a b' sslrootcert=C:\\\\ca.crt");
        assert_eq!(params.sslmode.as_deref(), Some("require"));
        assert_eq!(params.sslrootcert.as_deref(), Some("C:\\ca.crt"));
        assert_eq!(rest.trim(), "dbname='a b'");
        // An escaped quote inside a quoted value does not end it.
        let (_, params) = split(r"sslrootcert='/a\'b c' host=h");
        assert_eq!(params.sslrootcert.as_deref(), Some("/a'b c"));
    }

    #[test]
    fn keyword_syntax_errors_are_reported() {
        let e = split_tls_params("host=h sslrootcert='/x").unwrap_err();
        assert!(e.contains("unterminated quoted"), "{e}");
        let e = split_tls_params("host").unwrap_err();
        assert!(e.contains("invalid connection string"), "{e}");
    }

    #[test]
    fn server_and_database_defaults() {
        let d: Dsn = "postgresql://u:secret@db1:6432/app".parse().unwrap();
        assert_eq!(server(&d.0), ("db1".to_string(), 6432));
        assert_eq!(describe(&d.0), "db1:6432/app user=u");
        let d: Dsn = "user=monitor".parse().unwrap();
        assert_eq!(server(&d.0), ("localhost".to_string(), 5432));
        assert_eq!(database(&d.0), "monitor");
        assert_eq!(describe(&d.0), "localhost:5432/monitor user=monitor");
        let d: Dsn = "host=/run/postgresql".parse().unwrap();
        assert_eq!(describe(&d.0), "/run/postgresql:5432/postgres");
    }

    #[test]
    fn dsn_gets_libpq_modes_the_driver_does_not_know() {
        use crate::postgres::tls::SslMode;
        let d: Dsn = "postgresql://u:secret@db1/app?sslmode=verify-ca"
            .parse()
            .unwrap();
        assert_eq!(d.1.mode, SslMode::VerifyCa);
        assert_eq!(d.0.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
        assert_eq!(d.0.get_password(), Some(&b"secret"[..]));
        let d: Dsn = "host=db1 sslmode=allow".parse().unwrap();
        assert_eq!(d.1.mode, SslMode::Allow);
        assert_eq!(d.0.get_ssl_mode(), tokio_postgres::config::SslMode::Prefer);
        let d: Dsn = "host=db1".parse().unwrap();
        assert_eq!(d.1.mode, SslMode::Prefer);

        let e = "host=db1 sslmode=verify".parse::<Dsn>().unwrap_err();
        assert!(e.starts_with("sslmode: invalid value \"verify\""), "{e}");
        let e = "postgresql://u:secret@db1/app?sslrootcert=/nonexistent/ca.crt&sslmode=verify-ca"
            .parse::<Dsn>()
            .unwrap_err();
        assert!(
            e.contains("sslrootcert: cannot read \"/nonexistent/ca.crt\""),
            "{e}"
        );
        assert!(!e.contains("secret"), "{e}");
        // The driver still reports its own problems.
        let e = "host=h port=notaport sslmode=verify-full"
            .parse::<Dsn>()
            .unwrap_err();
        assert!(
            e.contains("invalid connection string") && e.contains("port"),
            "{e}"
        );
    }
}
