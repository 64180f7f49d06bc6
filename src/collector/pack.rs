//! The collector pack format (`queries/*.yaml` and user packs): its typed model, loading of
//! the built-in packs (compiled in) plus user packs, and every check that can be done
//! without a database. What a pack says is data; how it runs is `poller.rs`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

use crate::config::{CollectorsConfig, Interval, LabelName, MetricName, TargetKind};
use crate::metric::MetricType;
use crate::yaml::{self, YamlError};

/// The packs shipped inside the binary: (file name, text).
pub const BUILTIN_PACKS: &[(&str, &str)] = &[
    (
        "queries/database.yaml",
        include_str!("../../queries/database.yaml"),
    ),
    (
        "queries/statements.yaml",
        include_str!("../../queries/statements.yaml"),
    ),
    (
        "queries/locks.yaml",
        include_str!("../../queries/locks.yaml"),
    ),
    (
        "queries/indexes.yaml",
        include_str!("../../queries/indexes.yaml"),
    ),
    (
        "queries/archiver.yaml",
        include_str!("../../queries/archiver.yaml"),
    ),
    (
        "queries/activity.yaml",
        include_str!("../../queries/activity.yaml"),
    ),
    (
        "queries/checkpoints.yaml",
        include_str!("../../queries/checkpoints.yaml"),
    ),
    (
        "queries/vacuum.yaml",
        include_str!("../../queries/vacuum.yaml"),
    ),
    (
        "queries/tables.yaml",
        include_str!("../../queries/tables.yaml"),
    ),
    (
        "queries/replication.yaml",
        include_str!("../../queries/replication.yaml"),
    ),
    (
        "queries/dbload.yaml",
        include_str!("../../queries/dbload.yaml"),
    ),
    (
        "queries/security.yaml",
        include_str!("../../queries/security.yaml"),
    ),
    (
        "queries/pgbouncer.yaml",
        include_str!("../../queries/pgbouncer.yaml"),
    ),
];

/// Errors while loading packs.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Yaml(#[from] YamlError),
}

/// One pack file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PackFile {
    /// The kind of target every collector of the pack runs on (default `postgres`).
    #[serde(default)]
    kind: TargetKind,
    collectors: Vec<CollectorDef>,
}

/// Where a collector runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Once per target, on the database named in its DSN.
    Cluster,
    /// Once per database of the target that passes its `databases` filter.
    Database,
}

/// A collector: one query (in version variants) and the metrics read from its rows.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorDef {
    pub name: CollectorName,
    pub help: String,
    #[serde(default = "default_scope")]
    pub scope: Scope,
    #[serde(default)]
    pub interval: Option<Interval>,
    #[serde(default)]
    pub timeout: Option<Interval>,
    /// Facts the database must have for this collector to run.
    #[serde(default)]
    pub requires: Requires,
    pub queries: Variants,
    /// What the rows become. May be empty only for a collector that fills a `cache`.
    #[serde(default)]
    pub metrics: Metrics,
    /// A cache the rows fill instead of (or besides) metrics; `scope: database` only.
    #[serde(default)]
    pub cache: Option<CacheKind>,
    /// The column naming each row's database, for a `scope: cluster` collector over an
    /// instance-wide view: rows of databases outside the target's `databases` filter are
    /// dropped, and `relation_names` resolves OIDs in that row's database.
    #[serde(default)]
    pub per_database: Option<String>,
    /// Label columns that take their value from the relation-name cache: the name of the
    /// OID in another column, looked up in the row's database (`per_database`). Where the
    /// cache does not know the OID (yet), the column keeps the query's own value.
    #[serde(default)]
    pub relation_names: Vec<RelationName>,
    /// Rust post-processing for what SQL and YAML cannot express (window statistics,
    /// top-N, estimates across polls). Built-in names only.
    #[serde(default)]
    pub processor: Option<ProcessorKind>,
    /// Who runs the query: the poller on `interval` (default), or the activity sampler
    /// on `activity.sample_interval` (`run_by: activity_sampler`, see `trace::load`).
    #[serde(default)]
    pub run_by: RunBy,
    /// The kind of target this runs on: the pack's `kind` (set after parsing).
    #[serde(skip)]
    pub kind: TargetKind,
    /// Which file this came from (for messages); set after parsing.
    #[serde(skip)]
    pub source: PathBuf,
    /// Position in that file's `collectors` list (for messages).
    #[serde(skip)]
    pub index: usize,
}

impl CollectorDef {
    /// Checks that span several fields.
    fn check(&self) -> Result<(), String> {
        if self.kind == TargetKind::Pgbouncer {
            self.check_pgbouncer()?;
        }
        if self.metrics.0.is_empty() && self.cache.is_none() {
            return Err("at least one metric is required".into());
        }
        if self.cache.is_some() && self.scope != Scope::Database {
            return Err(
                "`cache` reads a database's own catalogs: it needs `scope: database`".into(),
            );
        }
        if self.per_database.is_some() && self.scope != Scope::Cluster {
            return Err(
                "`per_database` is for `scope: cluster` collectors (`scope: database` adds datname itself)"
                    .into(),
            );
        }
        if !self.relation_names.is_empty() && self.per_database.is_none() {
            return Err(
                "`relation_names` looks OIDs up in each row's database: set `per_database` to the column that names it"
                    .into(),
            );
        }
        if self.processor != Some(ProcessorKind::Statements)
            && self.queries.0.iter().any(|q| q.texts.is_some())
        {
            return Err("`texts` (of a query) is read by `processor: statements` only".into());
        }
        if self.processor != Some(ProcessorKind::Statements)
            && self.queries.0.iter().any(|q| q.skips_unchanged)
        {
            return Err(
                "`skips_unchanged` (of a query) is read by `processor: statements` only".into(),
            );
        }
        if self.processor != Some(ProcessorKind::TableTopN)
            && self.metrics.0.iter().any(|m| m.other.is_some())
        {
            return Err("`other` (of a metric) is read by `processor: table_top_n` only".into());
        }
        for r in &self.relation_names {
            if !self
                .metrics
                .0
                .iter()
                .any(|m| m.labels.iter().any(|l| l.0 == r.column))
            {
                return Err(format!(
                    "relation_names: {:?} is not a label column of any metric",
                    r.column
                ));
            }
        }
        Ok(())
    }
}

impl CollectorDef {
    /// What a collector of a `kind: pgbouncer` pack cannot use: PgBouncer's console is one
    /// database with no catalogs, no extensions and no `pg_stat_activity`.
    fn check_pgbouncer(&self) -> Result<(), String> {
        let unsupported = [
            (self.scope == Scope::Database, "`scope: database`"),
            (self.requires.extension.is_some(), "`requires.extension`"),
            (self.requires.grant.is_some(), "`requires.grant`"),
            (self.cache.is_some(), "`cache`"),
            (self.per_database.is_some(), "`per_database`"),
            (self.processor.is_some(), "`processor`"),
            (self.run_by != RunBy::Poller, "`run_by`"),
        ];
        match unsupported.iter().find(|(used, _)| *used) {
            Some((_, what)) => Err(format!(
                "{what} is not available in a `kind: pgbouncer` pack (PgBouncer's console has one database and no catalogs)"
            )),
            None => Ok(()),
        }
    }
}

/// The named Rust processors a collector can hand its rows to (see `processor.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessorKind {
    /// pg_stat_statements: window stats between polls, top-N with an `other` bucket.
    Statements,
    /// pg_stat_progress_create_index: progress ratio smoothing and ETA.
    CreateIndexProgress,
    /// Per-table rows: the union of the top N by size, xid age and dead tuples
    /// (`tables.top_n`), the rest in one `table="other"` row by each metric's `other` rule.
    TableTopN,
}

/// How a metric's value column is folded into a step's `other` row (`other:` of a metric,
/// read by the `table_top_n` step): summed, the maximum, or, for counters, the deltas of the
/// entries without their own series (the same rule as `queryid="other"` of statements).
/// A metric without `other` has no `other` sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OtherRule {
    Sum,
    Max,
    Delta,
}

/// The caches a collector can fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheKind {
    /// OID → schema and name of the visited database's relations (columns `oid`,
    /// `schema`, `name`), for the `relation_names` of cluster-scope collectors.
    RelationNames,
}

/// One `relation_names` entry: `{oid: relid, as: relation}` sets the label column
/// `relation` to `schema.name` of the OID in column `relid`; `schema: false` gives the
/// bare name.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelationName {
    pub oid: String,
    #[serde(rename = "as")]
    pub column: String,
    #[serde(default = "yes")]
    pub schema: bool,
}

fn yes() -> bool {
    true
}

/// Who runs a collector's query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunBy {
    /// The target's poller, every `interval`.
    #[default]
    Poller,
    /// The target's activity sampler, every `activity.sample_interval`; its rows become
    /// the metrics' rows in Rust (`trace::load`).
    ActivitySampler,
}

fn default_scope() -> Scope {
    Scope::Cluster
}

/// Preconditions checked on the connected database before the query runs.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requires {
    /// An extension that must be installed in the database (e.g. `pg_stat_statements`).
    #[serde(default)]
    pub extension: Option<String>,
    /// The statement(s) that give a role without the privilege the query needs (beyond
    /// `pg_monitor`) what it needs, e.g. `GRANT SELECT ON pg_hba_file_rules TO <role>`.
    /// Where the query is denied (SQLSTATE 42501) the collector is skipped by plan
    /// (`missing_privilege`) and the once-logged line says this, so the operator knows what
    /// to grant, instead of only the server's "permission denied".
    #[serde(default)]
    pub grant: Option<String>,
}

/// A collector name: lower-case identifier, used in self-metric labels and in `disable`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CollectorName(pub String);

impl<'de> Deserialize<'de> for CollectorName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::yaml::from_str_de(d)
    }
}

impl std::str::FromStr for CollectorName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.to_string();
        let ok = s.chars().next().is_some_and(|c| c.is_ascii_lowercase())
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if ok {
            Ok(CollectorName(s))
        } else {
            Err(format!(
                "invalid collector name {s:?}: use lower-case letters, digits and _"
            ))
        }
    }
}

impl std::fmt::Display for CollectorName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A server version as `server_version_num` (e.g. 140005). In YAML: `14` (a major),
/// `9.6`, or a full `server_version_num`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32);

impl Version {
    fn parse(s: &str) -> Result<Version, String> {
        let bad = || format!("invalid version {s:?}: write a major version such as 14, or 9.6");
        let mut parts = s.trim().splitn(2, '.');
        let major: u32 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let minor: u32 = match parts.next() {
            Some(p) => p.parse().map_err(|_| bad())?,
            None => 0,
        };
        match major {
            10_000.. => Ok(Version(major)),
            10..=99 if minor == 0 => Ok(Version(major * 10_000)),
            7..=9 => Ok(Version(major * 10_000 + minor * 100)),
            _ => Err(bad()),
        }
    }

    /// The last version of the same release line: `14` → 14.x, `9.6` → 9.6.x.
    fn end_of_line(self) -> Version {
        if self.0 >= 100_000 {
            Version(self.0 - self.0 % 10_000 + 9_999)
        } else {
            Version(self.0 - self.0 % 100 + 99)
        }
    }

    pub fn major(self) -> u32 {
        if self.0 >= 100_000 {
            self.0 / 10_000
        } else {
            self.0 / 100
        }
    }
}

impl std::str::FromStr for Version {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Version::parse(s)
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 >= 100_000 {
            write!(f, "{}.{}", self.0 / 10_000, self.0 % 10_000)
        } else {
            write!(
                f,
                "{}.{}.{}",
                self.0 / 10_000,
                self.0 / 100 % 100,
                self.0 % 100
            )
        }
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // YAML scalars (`14`, `9.6`) arrive as text here, located at the scalar.
        crate::yaml::from_str_de(d)
    }
}

/// One SQL text and the server versions it is for (inclusive; `max_version: 13` covers
/// all of 13.x).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    #[serde(default)]
    pub min_version: Option<Version>,
    #[serde(default)]
    pub max_version: Option<Version>,
    pub sql: String,
    /// A follow-up query for texts the step keeps out of `sql` (`processor: statements`:
    /// the query text of entries entering the top N), so a poll does not read every text
    /// every time. Run only when the step asks for keys it has no text for, with `$1` the
    /// list of those keys (`text[]`, the `queryid` values); returns the key columns and
    /// `query`.
    #[serde(default)]
    pub texts: Option<String>,
    /// `sql` takes `$1` (`int8[]`): the fingerprints (its `fp` column) of entries the step
    /// carries over while they do not change (`processor: statements`: entries without
    /// their own series), and may leave the rows with those fingerprints out. Most entries
    /// of a large pg_stat_statements are idle in any one interval, so a poll then ships
    /// and decodes only what changed. An empty list asks for every row.
    #[serde(default)]
    pub skips_unchanged: bool,
}

impl Variant {
    fn low(&self) -> u32 {
        self.min_version.map_or(0, |v| v.0)
    }
    fn high(&self) -> u32 {
        self.max_version.map_or(u32::MAX, |v| v.end_of_line().0)
    }
    pub fn matches(&self, server: u32) -> bool {
        self.low() <= server && server <= self.high()
    }
    /// `13–16`, `14+`, `any`: for the plan printout.
    pub fn range_text(&self) -> String {
        match (self.min_version, self.max_version) {
            (None, None) => "any version".into(),
            (Some(a), None) => format!(">= {}", short(a)),
            (None, Some(b)) => format!("<= {}", short(b)),
            (Some(a), Some(b)) => format!("{} to {}", short(a), short(b)),
        }
    }
}

fn short(v: Version) -> String {
    if v.0 >= 100_000 && v.0 % 10_000 == 0 {
        (v.0 / 10_000).to_string()
    } else if v.0 < 100_000 && v.0 % 100 == 0 {
        format!("{}.{}", v.0 / 10_000, v.0 / 100 % 100)
    } else {
        v.to_string()
    }
}

/// The SQL variants of a collector: non-empty, each range sensible, and no two that
/// match the same version with neither being more specific.
#[derive(Debug, Clone)]
pub struct Variants(pub Vec<Variant>);

impl<'de> Deserialize<'de> for Variants {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let v = Vec::<Variant>::deserialize(d)?;
        if v.is_empty() {
            return Err(D::Error::custom("at least one query is required"));
        }
        for (i, a) in v.iter().enumerate() {
            if a.sql.trim().is_empty() {
                return Err(D::Error::custom(format!("queries[{i}].sql is empty")));
            }
            if a.low() > a.high() {
                return Err(D::Error::custom(format!(
                    "queries[{i}]: min_version is above max_version"
                )));
            }
            for (j, b) in v.iter().enumerate().skip(i + 1) {
                let overlap = a.low() <= b.high() && b.low() <= a.high();
                if overlap && a.low() == b.low() && a.high() == b.high() {
                    return Err(D::Error::custom(format!(
                        "queries[{i}] ({}) and queries[{j}] ({}) both match the same versions \
                         with the same range, so neither is more specific; \
                         give them distinct version ranges",
                        a.range_text(),
                        b.range_text()
                    )));
                }
            }
        }
        Ok(Variants(v))
    }
}

impl Variants {
    /// The variant for a server: among those whose range matches, the one with the
    /// highest `min_version`; on a tie, the one with the narrower (lower) `max_version`.
    pub fn resolve(&self, server_version_num: u32) -> Option<&Variant> {
        self.resolve_index(server_version_num).map(|i| &self.0[i])
    }

    /// The index of [`Variants::resolve`]'s choice.
    pub fn resolve_index(&self, server_version_num: u32) -> Option<usize> {
        self.0
            .iter()
            .enumerate()
            .filter(|(_, v)| v.matches(server_version_num))
            .max_by_key(|(_, v)| (v.low(), std::cmp::Reverse(v.high())))
            .map(|(i, _)| i)
    }
}

/// How one metric is read from the rows.
#[derive(Debug, Clone)]
pub struct MetricDef {
    /// The metric's name; for a [`NameRule`], a placeholder such as `pg_settings_<metric>`
    /// (for messages and the plan; never exported).
    pub name: MetricName,
    /// A family per distinct name: each row's name is taken from a column.
    pub name_rule: Option<NameRule>,
    pub kind: MetricType,
    pub help: String,
    /// Column holding the value; `None` only for `info` metrics (value 1).
    pub value: Option<String>,
    /// Columns that become labels, in order.
    pub labels: Vec<LabelName>,
    /// Fixed labels added to every sample.
    pub static_labels: BTreeMap<LabelName, String>,
    /// A counter that pgvigil integrates over time: each poll adds the column's value times
    /// the seconds since the previous poll (e.g. waiting backends → backend-seconds).
    pub accumulate: bool,
    /// How the value goes into the `other` row of a `table_top_n` collector.
    pub other: Option<OtherRule>,
    /// The value column is multiplied by this (e.g. `0.000001`: microseconds → seconds),
    /// for sources that SQL cannot convert (PgBouncer's `SHOW` commands).
    pub scale: f64,
    /// More columns added to the value, each with its own scale (PgBouncer's `maxwait`
    /// in seconds plus `maxwait_us`). A NULL term skips the sample.
    pub add: Vec<Term>,
    /// Only rows whose label columns have these texts give samples (`SHOW CONFIG` rows by
    /// `key`), for sources whose rows SQL cannot filter.
    pub filter: BTreeMap<String, String>,
}

/// A column added to a metric's value: `{column: maxwait_us, scale: 0.000001}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Term {
    pub column: String,
    #[serde(default = "one")]
    pub scale: f64,
}

fn one() -> f64 {
    1.0
}

/// `name_from`: a metric whose name comes from a column, so one declaration gives a family
/// per distinct value (e.g. every `pg_settings` entry as `pg_settings_<name>`). The name is
/// `prefix` + the column's text + `suffix`, with every character Prometheus does not allow
/// in a name replaced by `_`; rows whose column is NULL or empty give no sample, and a name
/// that another metric of the same collector declares is skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameRule {
    /// Column holding the variable part of the name.
    pub column: String,
    pub prefix: String,
    pub suffix: String,
    /// Column holding each family's help text (NULL or empty: the metric's `help`).
    pub help_column: Option<String>,
}

impl NameRule {
    /// The exported name for a row's `text`: prefix + sanitized text + suffix; `None` for "".
    /// A name ending in a suffix Prometheus reserves for another type (`_count`, `_sum`,
    /// `_bucket`, `_created`; `_total` on a non-counter) gets `_value` appended, so
    /// `promtool check metrics` stays clean (`pg_settings_tcp_keepalives_count_value`).
    pub fn name_for(&self, text: &str, kind: MetricType) -> Option<String> {
        if text.is_empty() {
            return None;
        }
        let middle: String = text
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let name = format!("{}{middle}{}", self.prefix, self.suffix);
        let reserved = ["_count", "_sum", "_bucket", "_created"]
            .iter()
            .any(|s| name.ends_with(s))
            || (kind != MetricType::Counter && name.ends_with("_total"));
        Some(if reserved { name + "_value" } else { name })
    }

    /// How the plan shows the rule: `pg_settings_<metric>`.
    pub fn placeholder(&self) -> String {
        format!("{}<{}>{}", self.prefix, self.column, self.suffix)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetric {
    #[serde(default)]
    name: Option<MetricName>,
    /// With `name_prefix` (and optionally `name_suffix`): see [`NameRule`].
    #[serde(default)]
    name_from: Option<String>,
    #[serde(default)]
    name_prefix: Option<MetricName>,
    #[serde(default)]
    name_suffix: Option<String>,
    #[serde(default)]
    help_from: Option<String>,
    #[serde(rename = "type")]
    kind: MetricType,
    help: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    labels: Vec<LabelName>,
    #[serde(default)]
    static_labels: BTreeMap<LabelName, String>,
    #[serde(default)]
    accumulate: bool,
    #[serde(default)]
    other: Option<OtherRule>,
    #[serde(default)]
    scale: Option<f64>,
    #[serde(default)]
    add: Vec<Term>,
    #[serde(default, rename = "where")]
    filter: BTreeMap<String, String>,
}

impl TryFrom<RawMetric> for MetricDef {
    type Error = String;
    fn try_from(r: RawMetric) -> Result<Self, String> {
        let name_rule = name_rule(&r)?;
        let name = match (&r.name, &name_rule) {
            (Some(n), None) => n.0.clone(),
            (None, Some(rule)) => rule.placeholder(),
            (Some(n), Some(_)) => {
                return Err(format!(
                    "metric {n}: give either `name` or `name_from`, not both"
                ))
            }
            (None, None) => return Err("a metric needs `name` (or `name_from`)".into()),
        };
        // A rule's names all end in its suffix, so the suffix carries the conventions.
        let ending = match &name_rule {
            Some(rule) => rule.suffix.clone(),
            None => name.clone(),
        };
        let name = &name;
        match r.kind {
            MetricType::Counter if !ending.ends_with("_total") => {
                return Err(format!(
                    "metric {name}: counter names must end in _total (Prometheus convention)"
                ))
            }
            MetricType::Info if !ending.ends_with("_info") => {
                return Err(format!(
                    "metric {name}: info metric names must end in _info"
                ))
            }
            MetricType::Gauge | MetricType::Counter if r.value.is_none() => {
                return Err(format!(
                    "metric {name}: `value` (the column holding the value) is required"
                ))
            }
            _ => {}
        }
        if name == "pg_up" || name.starts_with("pgvigil_") {
            return Err(format!(
                "metric {name}: the name is reserved for pgvigil's own metrics"
            ));
        }
        if r.accumulate && name_rule.is_some() {
            return Err(format!(
                "metric {name}: `accumulate` is not available with `name_from`"
            ));
        }
        if r.accumulate && r.kind != MetricType::Counter {
            return Err(format!(
                "metric {name}: `accumulate` makes a counter; set `type: counter`"
            ));
        }
        match (r.other, r.kind) {
            (Some(OtherRule::Delta), k) if k != MetricType::Counter => {
                return Err(format!(
                    "metric {name}: `other: delta` is for counters; use sum or max"
                ))
            }
            (Some(OtherRule::Sum | OtherRule::Max), MetricType::Counter) => {
                return Err(format!(
                    "metric {name}: a counter's `other` is `delta` (a sum or max of counters could decrease)"
                ))
            }
            (Some(_), _) if r.value.is_none() || name_rule.is_some() => {
                return Err(format!(
                    "metric {name}: `other` needs a `value` column and a fixed name"
                ))
            }
            _ => {}
        }
        if r.help.trim().is_empty() {
            return Err(format!("metric {name}: help must not be empty"));
        }
        let scales = r.scale.iter().chain(r.add.iter().map(|t| &t.scale));
        if scales.clone().any(|s| !s.is_finite() || *s == 0.0) {
            return Err(format!(
                "metric {name}: a scale must be a finite number other than 0"
            ));
        }
        if (r.scale.is_some() || !r.add.is_empty())
            && (r.value.is_none() || r.kind == MetricType::Info)
        {
            return Err(format!(
                "metric {name}: `scale` and `add` change a `value` column of a gauge or counter"
            ));
        }
        if !r.filter.is_empty() && name_rule.is_some() {
            return Err(format!(
                "metric {name}: `where` is not available with `name_from`"
            ));
        }
        let mut seen = HashSet::new();
        for l in r.labels.iter().chain(r.static_labels.keys()) {
            if l.0 == "target" {
                return Err(format!(
                    "metric {name}: label `target` is reserved (pgvigil sets it)"
                ));
            }
            if !seen.insert(&l.0) {
                return Err(format!("metric {name}: label {} appears twice", l.0));
            }
        }
        Ok(MetricDef {
            name: MetricName(name.clone()),
            name_rule,
            kind: r.kind,
            help: r.help,
            value: r.value,
            labels: r.labels,
            static_labels: r.static_labels,
            accumulate: r.accumulate,
            other: r.other,
            scale: r.scale.unwrap_or(1.0),
            add: r.add,
            filter: r.filter,
        })
    }
}

/// The [`NameRule`] of a raw metric, if it has `name_from`; checks the fields that go with it.
fn name_rule(r: &RawMetric) -> Result<Option<NameRule>, String> {
    let Some(column) = &r.name_from else {
        if r.name_prefix.is_some() || r.name_suffix.is_some() || r.help_from.is_some() {
            return Err("`name_prefix`, `name_suffix` and `help_from` go with `name_from`".into());
        }
        return Ok(None);
    };
    let Some(prefix) = &r.name_prefix else {
        return Err(format!(
            "metric name_from {column:?}: `name_prefix` is required (e.g. pg_settings_), \
             so generated names cannot collide with other metrics"
        ));
    };
    let suffix = r.name_suffix.clone().unwrap_or_default();
    if !suffix
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return Err(format!(
            "metric name_from {column:?}: invalid name_suffix {suffix:?}: use [a-zA-Z0-9_:]"
        ));
    }
    Ok(Some(NameRule {
        column: column.clone(),
        prefix: prefix.0.clone(),
        suffix,
        help_column: r.help_from.clone(),
    }))
}

impl<'de> Deserialize<'de> for MetricDef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        RawMetric::deserialize(d)?
            .try_into()
            .map_err(serde::de::Error::custom)
    }
}

/// The metrics of a collector: names unique (non-empty unless the collector fills a
/// cache, checked with the collector).
#[derive(Debug, Clone, Default)]
pub struct Metrics(pub Vec<MetricDef>);

impl<'de> Deserialize<'de> for Metrics {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let v = Vec::<MetricDef>::deserialize(d)?;
        let mut seen = HashSet::new();
        for m in &v {
            if !seen.insert(&m.name) {
                return Err(D::Error::custom(format!(
                    "duplicate metric name {}",
                    m.name
                )));
            }
        }
        Ok(Metrics(v))
    }
}

/// Every collector that will run, after built-ins, user packs and `disable` are applied.
#[derive(Debug, Clone)]
pub struct Catalog {
    pub collectors: Vec<CollectorDef>,
    /// Human-readable notes from loading (overrides), for the log.
    pub notes: Vec<String>,
}

struct Loaded {
    path: PathBuf,
    text: String,
    builtin: bool,
}

impl Catalog {
    /// Loads the built-in packs and the user packs named in `config.paths` (directories are
    /// scanned for `*.yaml`/`*.yml`, sorted by name).
    pub fn load(config: &CollectorsConfig) -> Result<Catalog, PackError> {
        let mut files: Vec<Loaded> = BUILTIN_PACKS
            .iter()
            .map(|(name, text)| Loaded {
                path: PathBuf::from(name),
                text: text.to_string(),
                builtin: true,
            })
            .collect();
        for p in &config.paths {
            // A path that cannot be read is an error in the config: locate it there.
            let located = |e: PackError| match (e, config.source.as_ref()) {
                (PackError::Read { path, source }, Some((file, text))) => {
                    PackError::Yaml(YamlError::at(
                        file,
                        yaml::locate_word(text, "paths", &p.display().to_string()),
                        format!(
                            "collectors.paths: {}: cannot read: {source}",
                            path.display()
                        ),
                    ))
                }
                (e, _) => e,
            };
            for path in pack_files(p).map_err(located)? {
                let text = std::fs::read_to_string(&path).map_err(|source| {
                    located(PackError::Read {
                        path: path.clone(),
                        source,
                    })
                })?;
                files.push(Loaded {
                    path,
                    text,
                    builtin: false,
                });
            }
        }
        Catalog::from_files(files, &config.disable, config.source.as_ref())
    }

    /// One user pack given as text (`path` names it in errors), without the built-in
    /// packs: the parser on its own, for fuzzing and tools.
    pub fn from_pack_text(path: &std::path::Path, text: &str) -> Result<Catalog, PackError> {
        let file = Loaded {
            path: path.to_path_buf(),
            text: text.to_string(),
            builtin: false,
        };
        Catalog::from_files(vec![file], &[], None)
    }

    fn from_files(
        files: Vec<Loaded>,
        disable: &[String],
        config_source: Option<&(PathBuf, String)>,
    ) -> Result<Catalog, PackError> {
        let mut collectors: Vec<(CollectorDef, bool)> = Vec::new();
        let mut by_name: HashMap<String, usize> = HashMap::new();
        let mut notes = Vec::new();
        let mut texts: HashMap<PathBuf, &str> = HashMap::new();
        for f in &files {
            texts.insert(f.path.clone(), &f.text);
            let pack: PackFile = yaml::parse(&f.path, &f.text)?;
            for (index, mut c) in pack.collectors.into_iter().enumerate() {
                c.source = f.path.clone();
                c.index = index;
                c.kind = pack.kind;
                if let Err(e) = c.check() {
                    return Err(YamlError::at(
                        &f.path,
                        yaml::locate(&f.text, "name", &c.name.0),
                        format!("collectors[{index}] ({}): {e}", c.name),
                    )
                    .into());
                }
                match by_name.get(&c.name.0) {
                    Some(&i) if collectors[i].1 && !f.builtin => {
                        notes.push(format!(
                            "collector {} from {} overrides the built-in one",
                            c.name,
                            f.path.display()
                        ));
                        collectors[i] = (c, false);
                    }
                    Some(&i) => {
                        let at = yaml::locate(&f.text, "name", &c.name.0);
                        return Err(YamlError::at(
                            &f.path,
                            at,
                            format!(
                                "collectors: collector {} is already defined in {}",
                                c.name,
                                collectors[i].0.source.display()
                            ),
                        )
                        .into());
                    }
                    None => {
                        by_name.insert(c.name.0.clone(), collectors.len());
                        collectors.push((c, f.builtin));
                    }
                }
            }
        }
        for name in disable {
            if !by_name.contains_key(name) {
                let mut known: Vec<_> = by_name.keys().cloned().collect();
                known.sort();
                let (path, at) = match config_source {
                    Some((p, text)) => (p.as_path(), yaml::locate_word(text, "disable", name)),
                    None => (Path::new("config"), (0, 0)),
                };
                return Err(YamlError::at(
                    path,
                    at,
                    format!(
                        "collectors.disable: no collector named {name:?} (known: {})",
                        known.join(", ")
                    ),
                )
                .into());
            }
        }
        let collectors: Vec<CollectorDef> = collectors
            .into_iter()
            .map(|(c, _)| c)
            .filter(|c| !disable.contains(&c.name.0))
            .collect();
        // A metric name may come from one collector only: two would fight over the family.
        let mut owner: HashMap<&str, &CollectorDef> = HashMap::new();
        for c in &collectors {
            for (j, m) in c.metrics.0.iter().enumerate() {
                if let Some(first) = owner.insert(&m.name.0, c) {
                    let text = texts.get(&c.source).copied().unwrap_or("");
                    return Err(YamlError::at(
                        &c.source,
                        yaml::locate(text, "name", &m.name.0),
                        format!(
                            "collectors[{}].metrics[{j}].name: duplicate metric name {}: already defined by collector {} in {}",
                            c.index,
                            m.name,
                            first.name,
                            first.source.display()
                        ),
                    )
                    .into());
                }
            }
        }
        // A `name_from` rule owns every name with its prefix: no other collector may declare one.
        for c in &collectors {
            for rule in c.metrics.0.iter().filter_map(|m| m.name_rule.as_ref()) {
                let clash = collectors
                    .iter()
                    .filter(|o| o.name != c.name)
                    .flat_map(|o| o.metrics.0.iter().map(move |m| (o, m)))
                    .find(|(_, m)| m.name.0.starts_with(&rule.prefix));
                if let Some((o, m)) = clash {
                    let text = texts.get(&c.source).copied().unwrap_or("");
                    return Err(YamlError::at(
                        &c.source,
                        yaml::locate(text, "name_prefix", &rule.prefix),
                        format!(
                            "collectors[{}]: name_prefix {} would also make names of metric {} (collector {} in {}); choose a prefix no other collector uses",
                            c.index,
                            rule.prefix,
                            m.name,
                            o.name,
                            o.source.display()
                        ),
                    )
                    .into());
                }
            }
        }
        Ok(Catalog { collectors, notes })
    }
}

/// The pack files under a configured path: the file itself, or a directory's YAML files.
fn pack_files(p: &Path) -> Result<Vec<PathBuf>, PackError> {
    let read_err = |source| PackError::Read {
        path: p.to_path_buf(),
        source,
    };
    if !p.is_dir() {
        std::fs::metadata(p).map_err(read_err)?;
        return Ok(vec![p.to_path_buf()]);
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(p).map_err(read_err)? {
        let path = entry.map_err(read_err)?.path();
        let yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
        if yaml && path.is_file() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// The built-in collectors, for unit tests of the steps that read their rows.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::{Catalog, CollectorDef};

    pub fn builtin(name: &str) -> CollectorDef {
        Catalog::load(&Default::default())
            .unwrap_or_else(|e| panic!("built-in packs: {e}"))
            .collectors
            .into_iter()
            .find(|c| c.name.0 == name)
            .unwrap_or_else(|| panic!("no built-in collector {name}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(user: &str) -> Result<Catalog, String> {
        let mut files: Vec<Loaded> = BUILTIN_PACKS
            .iter()
            .map(|(n, t)| Loaded {
                path: PathBuf::from(n),
                text: t.to_string(),
                builtin: true,
            })
            .collect();
        files.push(Loaded {
            path: PathBuf::from("user.yaml"),
            text: user.to_string(),
            builtin: false,
        });
        Catalog::from_files(files, &[], None).map_err(|e| e.to_string())
    }

    const ONE: &str = "collectors:\n  - name: mine\n    help: Mine.\n    queries:\n      - sql: SELECT 1 AS v\n    metrics:\n      - name: my_value\n        type: gauge\n        help: A value.\n        value: v\n";

    #[test]
    fn builtin_packs_load() {
        let c = load("collectors: []").unwrap();
        assert!(c.collectors.iter().any(|c| c.name.0 == "database"));
    }

    #[test]
    fn user_pack_adds_a_collector() {
        let c = load(ONE).unwrap();
        assert!(c.collectors.iter().any(|c| c.name.0 == "mine"));
    }

    #[test]
    fn bad_packs_are_located() {
        let e = load(&ONE.replace("type: gauge", "type: gauge\n        colour: red")).unwrap_err();
        assert!(e.starts_with("user.yaml:"), "{e}");
        assert!(e.contains("unknown field `colour`"), "{e}");

        let e = load(&ONE.replace("my_value", "my-value")).unwrap_err();
        assert!(e.starts_with("user.yaml:7:"), "{e}");
        assert!(e.contains("invalid metric name"), "{e}");

        let e = load(&ONE.replace("type: gauge", "type: histogram")).unwrap_err();
        assert!(e.starts_with("user.yaml:8:"), "{e}");
        assert!(e.contains("unknown variant `histogram`"), "{e}");

        let e =
            load(&ONE.replace("help: Mine.", "help: Mine.\n    interval: 5 parsecs")).unwrap_err();
        assert!(e.starts_with("user.yaml:4:"), "{e}");
        assert!(e.contains("invalid duration"), "{e}");

        let e = load(&ONE.replace("queries:\n", "queries: 7\n")).unwrap_err();
        assert!(e.starts_with("user.yaml:4:"), "{e}");
        assert!(e.contains("invalid type"), "{e}");

        let e = load(&ONE.replace("my_value", "pg_database_size_bytes")).unwrap_err();
        assert!(e.starts_with("user.yaml:7:"), "{e}");
        assert!(
            e.contains("duplicate metric name pg_database_size_bytes"),
            "{e}"
        );

        let e = load(&ONE.replace("type: gauge", "type: counter")).unwrap_err();
        assert!(e.contains("must end in _total"), "{e}");
    }

    #[test]
    fn a_pack_kind_reaches_its_collectors_and_limits_what_they_use() {
        let c = load(&format!("kind: pgbouncer\n{ONE}")).unwrap();
        let mine = c.collectors.iter().find(|c| c.name.0 == "mine").unwrap();
        assert_eq!(mine.kind, TargetKind::Pgbouncer);
        let pools = c
            .collectors
            .iter()
            .find(|c| c.name.0 == "pgbouncer_pools")
            .unwrap();
        assert_eq!(pools.kind, TargetKind::Pgbouncer);
        let db = c
            .collectors
            .iter()
            .find(|c| c.name.0 == "database")
            .unwrap();
        assert_eq!(db.kind, TargetKind::Postgres, "the default kind");

        let e = load(&format!(
            "kind: pgbouncer\n{}",
            ONE.replace("help: Mine.\n", "help: Mine.\n    scope: database\n")
        ))
        .unwrap_err();
        assert!(
            e.contains("`scope: database` is not available in a `kind: pgbouncer` pack"),
            "{e}"
        );
        let e = load(&format!(
            "kind: pgbouncer\n{}",
            ONE.replace(
                "help: Mine.\n",
                "help: Mine.\n    requires: {extension: x}\n"
            )
        ))
        .unwrap_err();
        assert!(e.contains("`requires.extension` is not available"), "{e}");
        let e = load(&format!("kind: pgbouncr\n{ONE}")).unwrap_err();
        assert!(
            e.starts_with("user.yaml:1:") && e.contains("invalid kind"),
            "{e}"
        );
    }

    #[test]
    fn scale_add_and_where_are_checked_at_load() {
        load(&ONE.replace("value: v\n", "value: v\n        scale: 0.000001\n        add: [{column: w, scale: 0.001}]\n        where: {key: x}\n")).unwrap();
        let e = load(&ONE.replace("value: v\n", "value: v\n        scale: 0\n")).unwrap_err();
        assert!(
            e.contains("a scale must be a finite number other than 0"),
            "{e}"
        );
        let e = load(&ONE.replace(
            "value: v\n",
            "value: v\n        add: [{column: w, colour: red}]\n",
        ))
        .unwrap_err();
        assert!(e.contains("unknown field `colour`"), "{e}");
        let info = ONE
            .replace("my_value", "my_info")
            .replace("type: gauge", "type: info");
        let e = load(&info.replace("value: v\n", "value: v\n        scale: 2\n")).unwrap_err();
        assert!(
            e.contains("`scale` and `add` change a `value` column"),
            "{e}"
        );
    }

    #[test]
    fn other_rules_are_checked_at_load() {
        let e = load(&ONE.replace("value: v\n", "value: v\n        other: sum\n")).unwrap_err();
        assert!(e.contains("processor: table_top_n"), "{e}");
        let e = load(&ONE.replace("value: v\n", "value: v\n        other: delta\n")).unwrap_err();
        assert!(e.contains("`other: delta` is for counters"), "{e}");
        let e = load(&ONE.replace("value: v\n", "value: v\n        other: most\n")).unwrap_err();
        assert!(e.contains("unknown variant `most`"), "{e}");
        let ok = ONE.replace("help: Mine.\n", "help: Mine.\n    processor: table_top_n\n");
        load(&ok.replace("value: v\n", "value: v\n        other: max\n")).unwrap();
    }

    #[test]
    fn name_from_rules_are_checked_at_load() {
        let rule = ONE.replace(
            "name: my_value\n",
            "name_from: n\n        name_prefix: my_setting_\n",
        );
        let c = load(&rule).unwrap();
        let m = &c
            .collectors
            .iter()
            .find(|c| c.name.0 == "mine")
            .unwrap()
            .metrics
            .0[0];
        assert_eq!(m.name.0, "my_setting_<n>");
        let both = rule.replace("name_from: n", "name: my_value\n        name_from: n");
        assert!(load(&both).unwrap_err().contains("not both"));
        let no_prefix = ONE.replace("name: my_value\n", "name_from: n\n");
        assert!(load(&no_prefix)
            .unwrap_err()
            .contains("`name_prefix` is required"));
        let counter = rule.replace("type: gauge", "type: counter");
        assert!(load(&counter).unwrap_err().contains("must end in _total"));
        let counter = counter.replace(
            "name_prefix: my_setting_",
            "name_prefix: my_\n        name_suffix: _total",
        );
        assert!(load(&counter).is_ok());
        // The prefix would make names the built-in database collector declares.
        let clash = rule.replace("name_prefix: my_setting_", "name_prefix: pg_database_");
        let e = load(&clash).unwrap_err();
        assert!(
            e.contains("name_prefix pg_database_ would also make names"),
            "{e}"
        );
    }

    #[test]
    fn relation_names_need_a_database_column_and_caches_a_database_scope() {
        let names = ONE.replace(
            "        value: v\n",
            "        value: v\n        labels: [rel]\n",
        );
        let with = |extra: &str| names.replace("    queries:", &format!("{extra}    queries:"));
        let e = load(&with("    relation_names: [{oid: relid, as: rel}]\n")).unwrap_err();
        assert!(e.starts_with("user.yaml:2:"), "{e}");
        assert!(e.contains("set `per_database`"), "{e}");
        load(&with(
            "    per_database: datname\n    relation_names: [{oid: relid, as: rel}]\n",
        ))
        .unwrap();
        let e = load(&with(
            "    per_database: datname\n    relation_names: [{oid: relid, as: nope}]\n",
        ))
        .unwrap_err();
        assert!(e.contains("\"nope\" is not a label column"), "{e}");
        let e = load(&with("    cache: relation_names\n")).unwrap_err();
        assert!(e.contains("needs `scope: database`"), "{e}");
        let cache_only = "collectors:\n  - name: names\n    help: Names.\n    scope: database\n    cache: relation_names\n    queries:\n      - sql: SELECT 1\n";
        let c = load(cache_only).unwrap();
        assert!(c.collectors.iter().any(|c| c.name.0 == "names"));
        let e = load(&cache_only.replace("    cache: relation_names\n", "")).unwrap_err();
        assert!(e.contains("at least one metric is required"), "{e}");
    }

    #[test]
    fn user_pack_overrides_builtin_by_name() {
        let c = load(&ONE.replace("name: mine", "name: database")).unwrap();
        let db = c
            .collectors
            .iter()
            .find(|c| c.name.0 == "database")
            .unwrap();
        assert_eq!(db.source, PathBuf::from("user.yaml"));
        assert_eq!(c.notes.len(), 1);
    }

    #[test]
    fn versions_resolve_to_the_most_specific_variant() {
        let text = "- sql: a\n- min_version: 14\n  sql: b\n- min_version: 17\n  sql: c\n- max_version: 9.6\n  sql: d\n";
        let v: Variants = serde_yaml_ng::from_str(text).unwrap();
        assert_eq!(v.resolve(130_004).unwrap().sql, "a");
        assert_eq!(v.resolve(140_000).unwrap().sql, "b");
        assert_eq!(v.resolve(169_999).unwrap().sql, "b");
        assert_eq!(v.resolve(180_001).unwrap().sql, "c");
        assert_eq!(v.resolve(90_624).unwrap().sql, "d");
        let only: Variants = serde_yaml_ng::from_str("- min_version: 15\n  sql: x\n").unwrap();
        assert!(only.resolve(140_010).is_none());
    }

    #[test]
    fn ambiguous_version_ranges_are_rejected() {
        let text = "- min_version: 14\n  max_version: 16\n  sql: a\n- min_version: 14\n  max_version: 16\n  sql: b\n";
        let e = serde_yaml_ng::from_str::<Variants>(text)
            .unwrap_err()
            .to_string();
        assert!(e.contains("neither is more specific"), "{e}");
        let ok = "- min_version: 13\n  max_version: 13\n  sql: a\n- min_version: 14\n  sql: b\n";
        assert!(serde_yaml_ng::from_str::<Variants>(ok).is_ok());
    }
}
