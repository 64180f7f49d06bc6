//! Small value types shared by the config file and collector packs. Each one validates
//! itself while deserializing, so an invalid value is reported with its file and line and
//! can never reach the rest of the program.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A positive duration written the human way: `15s`, `500ms`, `1m30s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Interval(pub Duration);

impl Interval {
    pub fn from_secs(secs: u64) -> Self {
        Interval(Duration::from_secs(secs))
    }
}

impl FromStr for Interval {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let d = humantime::parse_duration(s.trim())
            .map_err(|e| format!("invalid duration {s:?} ({e}); write e.g. 500ms, 15s, 1m"))?;
        if d.is_zero() {
            return Err(format!("invalid duration {s:?}: must be greater than zero"));
        }
        Ok(Interval(d))
    }
}

impl<'de> Deserialize<'de> for Interval {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::yaml::from_str_de(d)
    }
}

impl fmt::Display for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

/// What a target is: PostgreSQL itself, or a PgBouncer admin console (its `pgbouncer`
/// database, which answers `SHOW …` commands only). Targets and packs both carry one: a
/// pack runs only on targets of its kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub enum TargetKind {
    #[default]
    Postgres,
    Pgbouncer,
}

impl TargetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetKind::Postgres => "postgres",
            TargetKind::Pgbouncer => "pgbouncer",
        }
    }
}

impl FromStr for TargetKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "postgres" => Ok(TargetKind::Postgres),
            "pgbouncer" => Ok(TargetKind::Pgbouncer),
            other => Err(format!(
                "invalid kind {other:?}: postgres (a PostgreSQL server) or pgbouncer (a PgBouncer admin console)"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for TargetKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::yaml::from_str_de(d)
    }
}

impl fmt::Display for TargetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Prometheus metric name: `[a-zA-Z_:][a-zA-Z0-9_:]*`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MetricName(pub String);

/// A Prometheus label name: `[a-zA-Z_][a-zA-Z0-9_]*`, not starting with `__` (reserved).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelName(pub String);

fn valid_name(s: &str, allow_colon: bool) -> bool {
    let mut chars = s.chars();
    let ok_first = |c: char| c.is_ascii_alphabetic() || c == '_' || (allow_colon && c == ':');
    match chars.next() {
        Some(c) if ok_first(c) => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (allow_colon && c == ':'))
}

impl FromStr for MetricName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if valid_name(s, true) {
            Ok(MetricName(s.to_string()))
        } else {
            Err(format!(
                "invalid metric name {s:?}: Prometheus metric names match [a-zA-Z_:][a-zA-Z0-9_:]*"
            ))
        }
    }
}

impl FromStr for LabelName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !valid_name(s, false) {
            Err(format!(
                "invalid label name {s:?}: Prometheus label names match [a-zA-Z_][a-zA-Z0-9_]*"
            ))
        } else if s.starts_with("__") {
            Err(format!(
                "invalid label name {s:?}: names starting with __ are reserved by Prometheus"
            ))
        } else {
            Ok(LabelName(s.to_string()))
        }
    }
}

macro_rules! deserialize_from_str {
    ($t:ty) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                crate::yaml::from_str_de(d)
            }
        }
    };
}
deserialize_from_str!(MetricName);
deserialize_from_str!(LabelName);

impl fmt::Display for MetricName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for LabelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A regular expression, compiled while the config is read.
#[derive(Debug, Clone)]
pub struct Pattern(pub regex::Regex);

impl FromStr for Pattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        regex::Regex::new(s)
            .map(Pattern)
            .map_err(|e| format!("invalid regular expression: {e}"))
    }
}
deserialize_from_str!(Pattern);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals() {
        assert_eq!(
            "15s".parse::<Interval>().unwrap().0,
            Duration::from_secs(15)
        );
        assert_eq!(
            "1m30s".parse::<Interval>().unwrap().0,
            Duration::from_secs(90)
        );
        assert_eq!(
            "500ms".parse::<Interval>().unwrap().0,
            Duration::from_millis(500)
        );
        assert!("0s".parse::<Interval>().is_err());
        assert!("15".parse::<Interval>().is_err());
        assert!("fast".parse::<Interval>().is_err());
    }

    #[test]
    fn names() {
        assert!("pg_up".parse::<MetricName>().is_ok());
        assert!("ns:pg_up".parse::<MetricName>().is_ok());
        assert!("1pg".parse::<MetricName>().is_err());
        assert!("pg-up".parse::<MetricName>().is_err());
        assert!("".parse::<MetricName>().is_err());
        assert!("datname".parse::<LabelName>().is_ok());
        assert!("a:b".parse::<LabelName>().is_err());
        assert!("__name__".parse::<LabelName>().is_err());
    }
}
