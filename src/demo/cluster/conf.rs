//! The cluster's `postgresql.conf`: our fixed block (loopback only, our port and
//! socket directory, `pg_stat_statements` preloaded, durability off) and the
//! caller's `ClusterOptions::settings`, validated and quoted.

use std::path::Path;

use super::ClusterError;

/// Our fixed `postgresql.conf` block.
pub(super) fn render_base_settings(port: u16, socket_dir: &Path) -> String {
    let socket_dir = conf_quote(&socket_dir.to_string_lossy());
    format!(
        "# --- added by pgvigil (src/demo/cluster) ---\n\
         listen_addresses = '127.0.0.1'\n\
         port = {port}\n\
         unix_socket_directories = {socket_dir}\n\
         shared_preload_libraries = 'pg_stat_statements'\n\
         pg_stat_statements.track = 'all'\n\
         fsync = off\n\
         synchronous_commit = off\n\
         full_page_writes = off\n\
         max_connections = 100\n\
         logging_collector = off\n"
    )
}

/// `ClusterOptions::settings` as `postgresql.conf` lines.
pub(super) fn render_settings(settings: &[(String, String)]) -> Result<String, ClusterError> {
    let mut out = String::new();
    if !settings.is_empty() {
        out.push_str("# --- ClusterOptions::settings ---\n");
    }
    for (name, value) in settings {
        let invalid = |reason| ClusterError::InvalidSetting {
            name: name.clone(),
            reason,
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        {
            return Err(invalid(
                "names may only contain letters, digits, '_' and '.'",
            ));
        }
        if value.contains(['\n', '\r', '\0']) {
            return Err(invalid("values must not contain line breaks or NUL"));
        }
        out.push_str(&format!("{name} = {}\n", conf_quote(value)));
    }
    Ok(out)
}

/// Single-quoted postgresql.conf string value.
fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_quoted_and_validated() {
        let rendered = render_settings(&[
            ("pg_stat_statements.max".into(), "100".into()),
            ("search_path".into(), "it's \\ here".into()),
        ])
        .expect("valid");
        assert!(rendered.contains("pg_stat_statements.max = '100'\n"));
        assert!(rendered.contains("search_path = 'it''s \\\\ here'\n"));
        assert!(render_settings(&[("a = b".into(), "1".into())]).is_err());
        assert!(render_settings(&[("".into(), "1".into())]).is_err());
        assert!(render_settings(&[("a".into(), "1\nfsync = on".into())]).is_err());
        assert_eq!(render_settings(&[]).ok(), Some(String::new()));
    }

    #[test]
    fn base_settings_contain_port_and_socket_dir() {
        let conf = render_base_settings(12345, Path::new("/tmp/pgvigil-x/s"));
        assert!(conf.contains("port = 12345\n"));
        assert!(conf.contains("unix_socket_directories = '/tmp/pgvigil-x/s'\n"));
        assert!(conf.contains("shared_preload_libraries = 'pg_stat_statements'\n"));
    }
}
