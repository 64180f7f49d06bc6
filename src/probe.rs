//! Targets registered by `/probe?target=HOST:PORT/DB&auth_module=NAME`: servers that are not
//! in the configuration, so that Prometheus service discovery can drive the target list
//! (as postgres_exporter's multi-target mode does).
//!
//! The credentials come from a named `auth_modules` entry of the configuration, never from
//! the URL. A registered target is polled in the background like a configured one (the run
//! loop adds it to the configuration it applies) and forgotten once it has not been probed
//! for `probe.forget_after`.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use crate::config::probe::{AuthKind, AuthModule, ProbeConfig, UserPass};
use crate::config::TargetConfig;
use crate::postgres::dsn::Dsn;

/// libpq's quoting of a keyword value: single quotes, `\` and `'` escaped.
fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// A target for `HOST[:PORT][/DB]` (IPv6 in brackets) with the module's credentials, named
/// after the probe's `target` parameter as written.
pub fn target_config(target: &str, module: &AuthModule) -> Result<TargetConfig, String> {
    let (server, db) = target.split_once('/').unwrap_or((target, "postgres"));
    let (host, port) = match server.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') && (!h.contains(':') || h.starts_with('[')) => (
            h.trim_start_matches('[').trim_end_matches(']'),
            p.parse::<u16>()
                .map_err(|_| format!("target {target:?}: bad port {p:?}"))?,
        ),
        _ => (server.trim_start_matches('[').trim_end_matches(']'), 5432),
    };
    if host.is_empty() || db.is_empty() {
        return Err(format!(
            "target {target:?}: expected HOST[:PORT][/DATABASE]"
        ));
    }
    let mut dsn = format!(
        "host={} port={port} dbname={} user={}",
        quote(host),
        quote(db),
        quote(&module.userpass.username)
    );
    if let Some(pw) = &module.userpass.password {
        dsn.push_str(&format!(" password={}", quote(pw)));
    }
    for (k, v) in &module.options {
        dsn.push_str(&format!(" {k}={}", quote(v)));
    }
    let dsn = Dsn::from_str(&dsn).map_err(|e| format!("target {target:?}: {e}"))?;
    Ok(TargetConfig {
        name: target.to_string(),
        // postgres_exporter's multi-target format addresses PostgreSQL servers.
        kind: Default::default(),
        dsn,
        password_file: module.userpass.password_file.clone(),
        labels: BTreeMap::new(),
        databases: Default::default(),
        max_connections: Default::default(),
        file: None,
        // Prometheus chose this instance: it polls the target whatever its shard.
        probed: true,
    })
}

/// The targets registered by probes, with when each was last probed.
#[derive(Default)]
pub struct Registry {
    targets: Mutex<BTreeMap<String, (TargetConfig, Instant)>>,
    /// The configuration's `auth_modules`, replaced on every applied (re)load.
    modules: Mutex<BTreeMap<String, AuthModule>>,
    /// Tells the run loop that the set changed.
    changed: tokio::sync::Notify,
}

impl Registry {
    /// The auth modules of the configuration now in force.
    pub fn set_modules(&self, modules: BTreeMap<String, AuthModule>) {
        *self.modules.lock().unwrap_or_else(|e| e.into_inner()) = modules;
    }

    pub fn module(&self, name: &str) -> Option<AuthModule> {
        let m = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        m.get(name).cloned()
    }

    /// Notes a probe of `name`; registers `config` if it is new. True when it was new.
    pub fn probed(&self, name: &str, config: impl FnOnce() -> TargetConfig) -> bool {
        let mut t = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match t.get_mut(name) {
            Some(entry) => {
                entry.1 = now;
                false
            }
            None => {
                t.insert(name.to_string(), (config(), now));
                drop(t);
                self.changed.notify_one();
                true
            }
        }
    }

    /// Whether `name` was registered by a probe (not configured).
    pub fn knows(&self, name: &str) -> bool {
        let t = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        t.contains_key(name)
    }

    /// Forgets the targets not probed within `after`; true when any was dropped.
    pub fn expire(&self, after: Duration) -> bool {
        let mut t = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        let before = t.len();
        t.retain(|name, (_, at)| {
            let keep = at.elapsed() < after;
            if !keep {
                tracing::info!(
                    "target {name} registered by /probe: not probed for {after:?}, dropped"
                );
            }
            keep
        });
        t.len() != before
    }

    /// The registered targets, for the configuration the run loop applies.
    pub fn targets(&self) -> Vec<TargetConfig> {
        let t = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        t.values().map(|(c, _)| c.clone()).collect()
    }

    /// Resolves when a target was registered since the last call.
    pub async fn changed(&self) {
        self.changed.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module() -> AuthModule {
        AuthModule {
            kind: AuthKind::Userpass,
            userpass: UserPass {
                username: "mon itor".into(),
                password: Some("p'w".into()),
                password_file: None,
            },
            options: [("sslmode".to_string(), "disable".to_string())].into(),
        }
    }

    #[test]
    fn targets_parse_with_defaults_and_quoting() {
        let t = target_config("db1.example:5433/app", &module()).unwrap();
        assert_eq!(t.name, "db1.example:5433/app");
        assert_eq!(format!("{:?}", t.dsn), "db1.example:5433/app user=mon itor");
        assert_eq!(t.dsn.0.get_password(), Some(&b"p'w"[..]));
        let t = target_config("10.0.0.1", &module()).unwrap();
        assert_eq!(
            format!("{:?}", t.dsn),
            "10.0.0.1:5432/postgres user=mon itor"
        );
        let t = target_config("[::1]:6000/x", &module()).unwrap();
        assert_eq!(format!("{:?}", t.dsn), "::1:6000/x user=mon itor");
        assert!(target_config("db:notaport/x", &module())
            .unwrap_err()
            .contains("bad port"));
        assert!(target_config("/x", &module()).is_err());
    }

    #[test]
    fn registry_registers_once_and_expires() {
        let r = Registry::default();
        assert!(r.probed("a", || target_config("a", &module()).unwrap()));
        assert!(!r.probed("a", || unreachable!("already registered")));
        assert_eq!(r.targets().len(), 1);
        assert!(!r.expire(Duration::from_secs(60)));
        std::thread::sleep(Duration::from_millis(20));
        assert!(r.expire(Duration::from_millis(10)));
        assert!(r.targets().is_empty());
    }
}
