//! Where a target's password comes from, read again for every new connection so a rotated
//! password needs no restart: the target's `password_file` (its first line), else the
//! password written in the DSN (or `PGPASSWORD`), else a libpq password file (`passfile`
//! in the DSN, `PGPASSFILE`, or `~/.pgpass`), looked up by host, port, database and user.

use std::path::{Path, PathBuf};

use tokio_postgres::config::Host;

/// The password sources of one target besides the DSN's own password.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PasswordSource {
    /// `password_file:` of the target: the first line is the password.
    pub file: Option<PathBuf>,
    /// A libpq password file (`hostname:port:database:username:password` lines).
    pub passfile: Option<PathBuf>,
}

impl PasswordSource {
    /// Sets the password of `config` for the next connection, from the sources in order.
    /// An unreadable `password_file` is an error (it was named on purpose); an unreadable,
    /// missing or too open password file is skipped, as libpq does (too open: warned).
    pub fn apply(&self, config: &mut tokio_postgres::Config) -> Result<(), String> {
        if let Some(file) = &self.file {
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("password_file {}: cannot read: {e}", file.display()))?;
            config.password(text.lines().next().unwrap_or(""));
            return Ok(());
        }
        if config.get_password().is_some() {
            return Ok(());
        }
        let Some(passfile) = &self.passfile else {
            return Ok(());
        };
        if let Some(pw) = read_passfile(passfile).and_then(|text| lookup(&text, config)) {
            config.password(pw);
        }
        Ok(())
    }
}

/// The password file's text, unless it is missing or readable by group or others (libpq
/// ignores such a file, with a warning).
fn read_passfile(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() {
        return None;
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            "password file {} has group or world access; ignored (chmod 0600 it)",
            path.display()
        );
        return None;
    }
    std::fs::read_to_string(path).ok()
}

/// The password of the first line of a libpq password file that matches the connection:
/// `*` matches anything, `\:` and `\\` are escapes, a Unix-socket host matches `localhost`.
pub fn lookup(text: &str, config: &tokio_postgres::Config) -> Option<String> {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(_)) | None => "localhost".to_string(),
    };
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    // libpq's default database is the user name.
    let database = config
        .get_dbname()
        .or_else(|| config.get_user())
        .unwrap_or("postgres")
        .to_string();
    let user = config.get_user().unwrap_or("").to_string();
    let wanted = [host, port, database, user];
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .find_map(|line| {
            let fields = split_fields(line);
            if fields.len() < 5 {
                return None;
            }
            let matches = fields[..4]
                .iter()
                .zip(&wanted)
                .all(|(f, w)| f == "*" || f == w);
            matches.then(|| fields[4..].join(":"))
        })
}

/// Splits a password-file line at unescaped colons, unescaping `\:` and `\\`.
fn split_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    fields.last_mut().expect("never empty").push(next);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => fields.last_mut().expect("never empty").push(c),
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(s: &str) -> tokio_postgres::Config {
        s.parse().unwrap()
    }

    #[test]
    fn passfile_lines_match_by_field_with_wildcards_and_escapes() {
        let text = "# comment\n\
                    db1:5432:app:alice:one\n\
                    *:5433:*:alice:two\n\
                    localhost:5432:*:bob:th\\:ree\\\\\n\
                    *:*:*:*:fallback:with:colons\n";
        let pw = |dsn: &str| lookup(text, &config(dsn));
        assert_eq!(
            pw("host=db1 port=5432 dbname=app user=alice").as_deref(),
            Some("one")
        );
        assert_eq!(
            pw("host=db2 port=5433 dbname=x user=alice").as_deref(),
            Some("two")
        );
        assert_eq!(
            pw("host=/var/run/postgresql dbname=x user=bob").as_deref(),
            Some("th:ree\\"),
            "a socket matches localhost"
        );
        assert_eq!(
            pw("host=db9 user=carol").as_deref(),
            Some("fallback:with:colons"),
            "the password keeps its colons"
        );
        assert_eq!(
            lookup("db1:5432:app:alice\n", &config("host=db1 user=alice")),
            None
        );
    }

    #[test]
    fn password_file_wins_and_is_read_at_each_apply() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "first\nignored\n").unwrap();
        let source = PasswordSource {
            file: Some(file.clone()),
            passfile: None,
        };
        let mut c = config("host=db1 user=alice password=fromdsn");
        source.apply(&mut c).unwrap();
        assert_eq!(c.get_password(), Some(&b"first"[..]));
        std::fs::write(&file, "second\n").unwrap();
        source.apply(&mut c).unwrap();
        assert_eq!(c.get_password(), Some(&b"second"[..]));
        std::fs::remove_file(&file).unwrap();
        assert!(source.apply(&mut c).unwrap_err().contains("cannot read"));
    }

    #[test]
    fn a_passfile_open_to_others_is_ignored() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let pass = dir.path().join("pgpass");
        std::fs::write(&pass, "*:*:*:*:secret\n").unwrap();
        let source = PasswordSource {
            file: None,
            passfile: Some(pass.clone()),
        };
        std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut c = config("host=db1 user=alice");
        source.apply(&mut c).unwrap();
        assert_eq!(c.get_password(), Some(&b"secret"[..]));
        std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut c = config("host=db1 user=alice");
        source.apply(&mut c).unwrap();
        assert_eq!(c.get_password(), None);
        // A password in the DSN wins over the password file.
        std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut c = config("host=db1 user=alice password=dsn");
        source.apply(&mut c).unwrap();
        assert_eq!(c.get_password(), Some(&b"dsn"[..]));
    }
}
