//! The `auth_modules:` and `probe:` sections: credentials and lifetime of the targets that
//! `/probe?target=…&auth_module=NAME` registers (see `crate::probe`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::Interval;

/// One `auth_modules:` entry, in postgres_exporter's format.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthModule {
    /// Only `userpass`.
    #[serde(rename = "type")]
    pub kind: AuthKind,
    pub userpass: UserPass,
    /// libpq keywords added to the connection string (`sslmode`, `sslrootcert`,
    /// `connect_timeout`, `application_name`, …).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthKind {
    Userpass,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserPass {
    pub username: String,
    #[serde(default)]
    pub password: Option<String>,
    /// Read at every connect, like a target's `password_file`.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

/// The `probe:` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeConfig {
    /// A target registered by a probe is dropped after this long without one.
    #[serde(default = "default_forget_after")]
    pub forget_after: Interval,
}

fn default_forget_after() -> Interval {
    Interval(Duration::from_secs(600))
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            forget_after: default_forget_after(),
        }
    }
}
