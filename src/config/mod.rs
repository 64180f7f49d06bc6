//! The config file (`pgvigil.yaml`): its typed model, defaults, environment overrides and
//! validation. Every problem is reported with file, line and field; nothing here touches
//! the network.

pub mod fleet;
pub mod probe;
mod types;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use crate::postgres::dsn::{describe, Dsn};
pub use fleet::Shard;
pub use types::{Interval, LabelName, MetricName, Pattern, TargetKind};

use crate::postgres::password::PasswordSource;
use crate::postgres::tls::{TlsParams, TlsSettings};
use crate::yaml::{self, YamlError};

/// Default address of `/metrics` (postgres_exporter's well-known port).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9187";

/// Errors while loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Yaml(#[from] YamlError),
    #[error("{0}")]
    Invalid(String),
}

/// The whole config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP server listens on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The PostgreSQL servers to monitor (after loading, with those of `targets_files`).
    #[serde(default)]
    pub targets: Vec<TargetConfig>,
    /// Glob patterns of files with more targets (each a YAML list in the format of
    /// `targets:`), relative to the config file's directory; re-read when they change.
    #[serde(default)]
    pub targets_files: Vec<String>,
    /// Fleet mode: this instance polls only the targets whose name hashes to its shard.
    #[serde(default)]
    pub shard: Option<Shard>,
    /// The config file's directory (relative `targets_files` patterns start there).
    #[serde(skip)]
    pub targets_files_base: Option<PathBuf>,
    /// The targets files as they were when read, for [`fleet::TargetsWatch`].
    #[serde(skip)]
    pub targets_files_state: fleet::FilesState,
    /// Which collector packs run, and their default interval and timeout.
    #[serde(default)]
    pub collectors: CollectorsConfig,
    /// pg_stat_statements: cardinality bound and query text length.
    #[serde(default)]
    pub statements: StatementsConfig,
    /// Per-table statistics: cardinality bound.
    #[serde(default)]
    pub tables: TablesConfig,
    /// The `pg_stat_activity` sampler: DB load and slow-query spans.
    #[serde(default)]
    pub activity: ActivityConfig,
    /// Slow-query spans over OTLP.
    #[serde(default)]
    pub tracing: TracingConfig,
    /// HTTPS and basic auth for the listener, in exporter-toolkit's `web.yml` format.
    #[serde(default)]
    pub web_config_file: Option<PathBuf>,
    /// Credentials for targets registered by `/probe?target=…&auth_module=NAME`.
    #[serde(default)]
    pub auth_modules: BTreeMap<String, probe::AuthModule>,
    /// How long a target registered by `/probe` lives without being probed.
    #[serde(default)]
    pub probe: probe::ProbeConfig,
}

/// The `activity:` section: the per-target `pg_stat_activity` sampler, which feeds
/// `pg_activity_active_seconds_total` (DB load) and, when tracing is on, slow-query spans.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ActivityConfig {
    /// How often `pg_stat_activity` is sampled, per target; default
    /// [`DEFAULT_SAMPLE_INTERVAL`]. Read it with [`ActivityConfig::interval`].
    #[serde(default)]
    pub sample_interval: Option<Interval>,
}

/// The default `activity.sample_interval` when slow-query spans are produced (an OTLP
/// endpoint or `tracing.console`): no longer than the default `slow_query_threshold`, so
/// every execution of at least 1.5 × that threshold is seen running at least once, even
/// back to back on one connection (measured: README, "Slow queries as spans").
pub const DEFAULT_SAMPLE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

/// The default `activity.sample_interval` when the samples feed DB load only (tracing
/// off): one sample a second, as Performance Insights samples, at half the cost of
/// [`DEFAULT_SAMPLE_INTERVAL`] (on the server and in pgvigil).
pub const DEFAULT_LOAD_SAMPLE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

impl ActivityConfig {
    /// The sampling interval: the configured one, else the default for whether the
    /// samples also make spans (`spans`, see [`TracingConfig::makes_spans`]).
    pub fn interval(&self, spans: bool) -> Interval {
        self.sample_interval.unwrap_or(Interval(if spans {
            DEFAULT_SAMPLE_INTERVAL
        } else {
            DEFAULT_LOAD_SAMPLE_INTERVAL
        }))
    }
}

/// The `tracing:` section: slow-query spans. Off unless an endpoint is configured here
/// or in `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// OTLP receiver, e.g. `http://127.0.0.1:4317` (gRPC) or `http://127.0.0.1:4318` (HTTP).
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// `grpc` or `http/protobuf`; default from `OTEL_EXPORTER_OTLP_PROTOCOL`, else `grpc`.
    #[serde(default)]
    pub protocol: Option<OtlpProtocol>,
    /// An execution that runs at least this long becomes a span.
    #[serde(default = "default_slow")]
    pub slow_query_threshold: Interval,
    /// Deprecated alias of `activity.sample_interval` (moved there when the config is
    /// parsed, with a warning); always `None` afterwards.
    #[serde(default)]
    pub sample_interval: Option<Interval>,
    /// PEM file of the CA certificate(s) that verify an `https://` receiver, in place of
    /// the OS trust store; default `OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE`, else
    /// `OTEL_EXPORTER_OTLP_CERTIFICATE`.
    #[serde(default)]
    pub certificate: Option<PathBuf>,
    /// PEM client certificate (chain) for mutual TLS, with `client_key`; default
    /// `OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE`, else
    /// `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE`.
    #[serde(default)]
    pub client_certificate: Option<PathBuf>,
    /// PEM private key (unencrypted) of `client_certificate`; default
    /// `OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY`, else `OTEL_EXPORTER_OTLP_CLIENT_KEY`.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// `gzip` or `none`; default `OTEL_EXPORTER_OTLP_TRACES_COMPRESSION`, else
    /// `OTEL_EXPORTER_OTLP_COMPRESSION`, else `none`.
    #[serde(default)]
    pub compression: Option<OtlpCompression>,
    /// `service.name` of the spans' resource; default `OTEL_SERVICE_NAME`, else `pgvigil`.
    #[serde(default)]
    pub service_name: Option<String>,
    /// Spans waiting for export, per target; beyond it new spans are dropped (counted).
    #[serde(default = "default_queue")]
    pub queue_size: usize,
    /// With no OTLP endpoint, print each slow-query span on stderr instead of turning
    /// tracing off. Not a config file key: `pgvigil demo` sets it.
    #[serde(skip)]
    pub console: bool,
    /// `generic`: attach the generic plan (`EXPLAIN (GENERIC_PLAN, FORMAT JSON)`,
    /// PostgreSQL 16+) of a slow span's query, read-only, time-limited, at most once per
    /// query per hour; default `off` (README, "Plans on slow spans").
    #[serde(default)]
    pub explain: ExplainMode,
    /// At most this many EXPLAINs per minute, all targets together (`tracing.explain`).
    #[serde(default = "default_explain_per_minute")]
    pub explain_per_minute: u32,
    /// `true`: pgvigil's own work (poll cycles, collector queries) as spans to the same
    /// OTLP endpoint, through `tracing-opentelemetry`; default `false`. Read at start
    /// only: changing it takes a restart.
    #[serde(default, rename = "self")]
    pub self_spans: bool,
}

/// `tracing.explain`: whether slow spans get the query's plan.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub enum ExplainMode {
    #[default]
    #[serde(rename = "off")]
    Off,
    /// `EXPLAIN (GENERIC_PLAN)`: the plan without parameter values, never executed.
    #[serde(rename = "generic")]
    Generic,
}

/// OTLP transport.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum OtlpProtocol {
    #[serde(rename = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

/// Compression of OTLP export requests (the OTel exporter spec's values).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum OtlpCompression {
    #[serde(rename = "gzip")]
    Gzip,
    #[serde(rename = "none")]
    None,
}

impl std::str::FromStr for OtlpCompression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "gzip" => Ok(OtlpCompression::Gzip),
            "none" => Ok(OtlpCompression::None),
            other => Err(format!("invalid value {other:?}: use gzip or none")),
        }
    }
}

fn default_slow() -> Interval {
    Interval(std::time::Duration::from_millis(500))
}
fn default_queue() -> usize {
    2048
}
fn default_explain_per_minute() -> u32 {
    30
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            otlp_endpoint: None,
            protocol: None,
            slow_query_threshold: default_slow(),
            sample_interval: None,
            certificate: None,
            client_certificate: None,
            client_key: None,
            compression: None,
            service_name: None,
            queue_size: default_queue(),
            console: false,
            explain: ExplainMode::Off,
            explain_per_minute: default_explain_per_minute(),
            self_spans: false,
        }
    }
}

impl TracingConfig {
    /// Whether slow-query spans are made: an OTLP endpoint here or in
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT` (read through
    /// `env`), or the console sink of `pgvigil demo`.
    pub fn makes_spans(&self, env: &dyn Fn(&str) -> Option<String>) -> bool {
        self.console || self.otlp_endpoint.is_some() || env_endpoint(env).is_some()
    }
}

/// The OTLP endpoint of the standard environment: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
/// else `OTEL_EXPORTER_OTLP_ENDPOINT`.
pub fn env_endpoint(env: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
}

/// The `statements:` section.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StatementsConfig {
    /// Per target, only this many queries (ranked by execution time in the last window)
    /// get their own series; the rest are summed into `queryid="other"`.
    #[serde(default = "default_top_n")]
    pub top_n: usize,
    /// `pg_stat_statements_query_info{query}` is cut to this many characters.
    #[serde(default = "default_query_max_len")]
    pub query_max_len: usize,
}

fn default_top_n() -> usize {
    100
}
fn default_query_max_len() -> usize {
    200
}

impl Default for StatementsConfig {
    fn default() -> Self {
        StatementsConfig {
            top_n: default_top_n(),
            query_max_len: default_query_max_len(),
        }
    }
}

/// The `tables:` section.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TablesConfig {
    /// Per database, the tables among the top N by size, the top N by xid age and the top
    /// N by dead tuples get their own `pg_table_*` series (at most 3 × N); the rest are
    /// summed into `table="other"`.
    #[serde(default = "default_tables_top_n")]
    pub top_n: usize,
}

fn default_tables_top_n() -> usize {
    50
}

impl Default for TablesConfig {
    fn default() -> Self {
        TablesConfig {
            top_n: default_tables_top_n(),
        }
    }
}

fn default_listen() -> SocketAddr {
    DEFAULT_LISTEN.parse().expect("constant address parses")
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: default_listen(),
            targets: Vec::new(),
            targets_files: Vec::new(),
            shard: None,
            targets_files_base: None,
            targets_files_state: fleet::FilesState::new(),
            collectors: CollectorsConfig::default(),
            statements: StatementsConfig::default(),
            tables: TablesConfig::default(),
            activity: ActivityConfig::default(),
            tracing: TracingConfig::default(),
            web_config_file: None,
            auth_modules: BTreeMap::new(),
            probe: Default::default(),
        }
    }
}

/// One monitored PostgreSQL server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// Becomes the `target` label of every series from this server.
    pub name: String,
    /// `postgres` (default) or `pgbouncer`: a PgBouncer admin console, whose DSN names
    /// the `pgbouncer` database; only packs of the same kind run on it.
    #[serde(default)]
    pub kind: TargetKind,
    /// libpq connection string or URL. The database named here is the one cluster-wide
    /// collectors use.
    pub dsn: Dsn,
    /// File holding the password (first line); overrides a password in the DSN.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Extra labels put on every series of this target.
    #[serde(default)]
    pub labels: BTreeMap<LabelName, String>,
    /// Which databases `scope: database` collectors visit.
    #[serde(default)]
    pub databases: DatabaseFilter,
    /// The most connections the collectors hold open to this server at once, over all its
    /// databases (the activity sampler's own connection is counted apart).
    #[serde(default = "default_max_connections")]
    pub max_connections: MaxConnections,
    /// The targets file this target comes from; `None` for the config file.
    #[serde(skip)]
    pub file: Option<PathBuf>,
    /// Registered by `/probe`: polled by the instance Prometheus probed, whatever shard
    /// its name hashes to.
    #[serde(skip)]
    pub probed: bool,
}

/// A connection budget: at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxConnections(pub usize);

fn default_max_connections() -> MaxConnections {
    MaxConnections::default()
}

impl Default for MaxConnections {
    fn default() -> Self {
        // sql_exporter's default for the same setting.
        MaxConnections(3)
    }
}

impl std::str::FromStr for MaxConnections {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(MaxConnections(n)),
            _ => Err(format!(
                "invalid max_connections {s:?}: a whole number of connections, at least 1"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for MaxConnections {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::yaml::from_str_de(d)
    }
}

/// Include/exclude regexes over database names, for `scope: database` collectors.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseFilter {
    #[serde(default = "default_include")]
    pub include: Vec<Pattern>,
    #[serde(default = "default_exclude")]
    pub exclude: Vec<Pattern>,
}

fn default_include() -> Vec<Pattern> {
    vec![Pattern(regex::Regex::new(".*").expect("constant regex"))]
}

fn default_exclude() -> Vec<Pattern> {
    vec![Pattern(
        regex::Regex::new("^template").expect("constant regex"),
    )]
}

impl Default for DatabaseFilter {
    fn default() -> Self {
        DatabaseFilter {
            include: default_include(),
            exclude: default_exclude(),
        }
    }
}

impl DatabaseFilter {
    pub fn matches(&self, datname: &str) -> bool {
        self.include.iter().any(|p| p.0.is_match(datname))
            && !self.exclude.iter().any(|p| p.0.is_match(datname))
    }
}

/// The `collectors:` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorsConfig {
    /// Directories (or single files) with extra packs, added to the built-in ones.
    #[serde(default)]
    pub paths: Vec<PathBuf>,
    /// Collector names not to run.
    #[serde(default)]
    pub disable: Vec<String>,
    #[serde(default)]
    pub defaults: CollectorDefaults,
    /// The config file and its text, for locating errors found later (e.g. a name in
    /// `disable` that no pack defines).
    #[serde(skip)]
    pub source: Option<(PathBuf, String)>,
}

/// Used by collectors that do not set their own.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorDefaults {
    #[serde(default = "default_interval")]
    pub interval: Interval,
    /// Becomes the session's `statement_timeout` for each query.
    #[serde(default = "default_timeout")]
    pub timeout: Interval,
    /// Becomes `lock_timeout`: a collector never queues behind an exclusive lock for long.
    #[serde(default = "default_lock_timeout")]
    pub lock_timeout: Interval,
}

fn default_interval() -> Interval {
    Interval::from_secs(15)
}
fn default_timeout() -> Interval {
    Interval::from_secs(5)
}
fn default_lock_timeout() -> Interval {
    Interval::from_secs(1)
}

impl Default for CollectorDefaults {
    fn default() -> Self {
        CollectorDefaults {
            interval: default_interval(),
            timeout: default_timeout(),
            lock_timeout: default_lock_timeout(),
        }
    }
}

/// A target ready to connect to: password resolved, labels in order.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    /// PostgreSQL or a PgBouncer admin console: decides the session flavour and the packs.
    pub kind: TargetKind,
    pub pg: Dsn,
    /// `target` first, then the configured labels.
    pub labels: Vec<(String, String)>,
    pub databases: DatabaseFilter,
    /// Connection budget of the collectors (see [`TargetConfig::max_connections`]).
    pub max_connections: usize,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Config::parse(path, &text)?;
        config.targets_files_base = Some(
            path.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf(),
        );
        config.add_targets_files(path, &text)?;
        Ok(config)
    }

    /// Adds the targets of the files `targets_files` names, in file name order. Errors
    /// name the file, line and column; a target name defined twice (in the config or any
    /// file) is an error that says where both are.
    fn add_targets_files(&mut self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let Some((patterns, base)) = self.targets_files_source() else {
            return Ok(());
        };
        // Before reading: a file changed while it is read is seen as changed next time.
        self.targets_files_state = fleet::files_state(&patterns, &base);
        let files = fleet::expand(&patterns, &base).map_err(|(i, message)| {
            let at = yaml::locate_key_after(text, "targets_files", 0);
            let at = if i == 0 || at.0 == 0 {
                at
            } else {
                yaml::locate_word(text, "targets_files", &patterns[i])
            };
            ConfigError::Yaml(YamlError::at(path, at, message))
        })?;
        let mut seen: BTreeMap<String, String> = self
            .targets
            .iter()
            .map(|t| {
                let at = yaml::locate(text, "name", &t.name);
                (t.name.clone(), YamlError::at(path, at, "").to_string())
            })
            .collect();
        for file in files {
            let (targets, file_text) = fleet::read_targets_file(&file)?;
            for (i, mut t) in targets.into_iter().enumerate() {
                let at = yaml::locate(&file_text, "name", &t.name);
                let here = YamlError::at(&file, at, "").to_string();
                if t.name.is_empty() {
                    return Err(
                        YamlError::at(&file, at, format!("[{i}].name: must not be empty")).into(),
                    );
                }
                if let Some(first) = seen.get(&t.name) {
                    return Err(YamlError::at(
                        &file,
                        at,
                        format!(
                            "[{i}].name: duplicate target name {:?}, first defined at {}; names must be unique across the config and its targets files",
                            t.name,
                            first.trim_end_matches(": ")
                        ),
                    )
                    .into());
                }
                if t.labels.keys().any(|k| k.0 == "target") {
                    return Err(YamlError::at(
                        &file,
                        yaml::locate_key_after(&file_text, "target", at.0),
                        format!(
                            "[{i}].labels: `target` is set by pgvigil and cannot be overridden"
                        ),
                    )
                    .into());
                }
                seen.insert(t.name.clone(), here);
                t.file = Some(file.clone());
                self.targets.push(t);
            }
        }
        Ok(())
    }

    /// The `targets_files` patterns and the directory relative ones start from; `None`
    /// without any.
    pub fn targets_files_source(&self) -> Option<(Vec<String>, PathBuf)> {
        if self.targets_files.is_empty() {
            return None;
        }
        let base = self
            .targets_files_base
            .clone()
            .unwrap_or_else(|| PathBuf::from("."));
        Some((self.targets_files.clone(), base))
    }

    /// The shard this instance is (`0/1`, all targets, when none is configured).
    pub fn shard(&self) -> Shard {
        self.shard.unwrap_or_default()
    }

    /// Whether this instance polls the target called `name` (see [`Shard::owns`]).
    pub fn owns(&self, name: &str) -> bool {
        self.shard().owns(name)
    }

    /// Parses config text; `path` is only used in messages.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        // An empty file is a valid, all-defaults config.
        let mut config: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            yaml::parse(path, text)?
        };
        config.check(path, text)?;
        config.move_deprecated(path);
        config.collectors.source = Some((path.to_path_buf(), text.to_string()));
        Ok(config)
    }

    /// Moves deprecated fields to their new place, warning in the log.
    fn move_deprecated(&mut self, path: &Path) {
        if let Some(old) = self.tracing.sample_interval.take() {
            if self.activity.sample_interval.is_none() {
                tracing::warn!(
                    "{}: tracing.sample_interval is deprecated; write activity.sample_interval: {old} instead",
                    path.display()
                );
                self.activity.sample_interval = Some(old);
            } else {
                tracing::warn!(
                    "{}: tracing.sample_interval ({old}) is deprecated and ignored: activity.sample_interval is set",
                    path.display()
                );
            }
        }
    }

    /// Checks that span several fields, located in the source text.
    fn check(&self, path: &Path, text: &str) -> Result<(), YamlError> {
        if let Some(problem) = self.shard.as_ref().and_then(Shard::problem) {
            let at = yaml::locate_key_after(text, "shard", 0);
            let field = if problem.starts_with("total") {
                "total"
            } else {
                "index"
            };
            let inner = yaml::locate_key_after(text, field, at.0);
            let at = if inner.0 == 0 { at } else { inner };
            return Err(YamlError::at(path, at, format!("shard.{field}: {problem}")));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, t) in self.targets.iter().enumerate() {
            let at = yaml::locate(text, "name", &t.name);
            if t.name.is_empty() {
                return Err(YamlError::at(
                    path,
                    at,
                    format!("targets[{i}].name: must not be empty"),
                ));
            }
            if !seen.insert(&t.name) {
                return Err(YamlError::at(
                    path,
                    at,
                    format!(
                        "targets[{i}].name: duplicate target name {:?}; names must be unique",
                        t.name
                    ),
                ));
            }
            if t.labels.keys().any(|k| k.0 == "target") {
                return Err(YamlError::at(
                    path,
                    yaml::locate_key_after(text, "target", at.0),
                    format!(
                        "targets[{i}].labels: `target` is set by pgvigil and cannot be overridden"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Environment overrides for the common settings: `PGVIGIL_LISTEN`, and when the file
    /// names no target, one target from `DATA_SOURCE_NAME` or the libpq `PG*` variables.
    pub fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(listen) = env("PGVIGIL_LISTEN") {
            self.listen = listen
                .parse()
                .map_err(|e| ConfigError::Invalid(format!("PGVIGIL_LISTEN={listen:?}: {e}")))?;
        }
        // With targets files, no target is a valid state (the files may be empty for now).
        if self.targets.is_empty() && self.targets_files.is_empty() {
            self.targets.push(target_from_env(env)?);
        }
        Ok(())
    }

    /// Resolves passwords and labels of every target this instance owns (all of them
    /// without `shard:`; those `/probe` registered here too); the others are neither read
    /// nor polled.
    pub fn resolve_targets(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Vec<Target>, ConfigError> {
        self.targets
            .iter()
            .enumerate()
            .filter(|(_, t)| t.probed || self.owns(&t.name))
            .map(|(i, t)| {
                let mut pg = t.dsn.0.clone();
                if let Some(file) = &t.password_file {
                    let text = std::fs::read_to_string(file).map_err(|source| {
                        let message = format!(
                            "targets[{i}].password_file: {}: cannot read: {source}",
                            file.display()
                        );
                        if let Some(origin) = &t.file {
                            return ConfigError::Invalid(format!(
                                "{}: target {:?}: password_file: {}: cannot read: {source}",
                                origin.display(),
                                t.name,
                                file.display()
                            ));
                        }
                        match &self.collectors.source {
                            Some((path, text)) => {
                                let at = yaml::locate_after(
                                    text,
                                    "password_file",
                                    &file.display().to_string(),
                                    yaml::locate(text, "name", &t.name).0,
                                );
                                ConfigError::Yaml(YamlError::at(path, at, message))
                            }
                            None => ConfigError::Invalid(message),
                        }
                    })?;
                    pg.password(text.lines().next().unwrap_or(""));
                } else if pg.get_password().is_none() {
                    if let Some(pw) = env("PGPASSWORD") {
                        pg.password(pw);
                    }
                }
                // Read again at every connect: a rotated password_file or password file
                // needs no restart. libpq's default password file is PGPASSFILE, else
                // ~/.pgpass.
                let mut password = t.dsn.2.clone();
                password.file = t.password_file.clone();
                if password.passfile.is_none() {
                    password.passfile = env("PGPASSFILE").map(PathBuf::from).or_else(|| {
                        env("HOME")
                            .filter(|h| !h.is_empty())
                            .map(|h| PathBuf::from(h).join(".pgpass"))
                    });
                }
                if pg.get_application_name().is_none() {
                    pg.application_name("pgvigil");
                }
                let mut labels = vec![("target".to_string(), t.name.clone())];
                labels.extend(t.labels.iter().map(|(k, v)| (k.0.clone(), v.clone())));
                Ok(Target {
                    name: t.name.clone(),
                    kind: t.kind,
                    pg: Dsn(pg, t.dsn.1.clone(), password),
                    labels,
                    databases: t.databases.clone(),
                    max_connections: t.max_connections.0,
                })
            })
            .collect()
    }
}

/// One target from `DATA_SOURCE_NAME`, else from `PGHOST`, `PGPORT`, `PGUSER`,
/// `PGDATABASE`, `PGAPPNAME` and the TLS variables `PGSSLMODE`, `PGSSLROOTCERT`,
/// `PGSSLCERT`, `PGSSLKEY` (libpq's defaults for the rest).
fn target_from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<TargetConfig, ConfigError> {
    let dsn = match env("DATA_SOURCE_NAME") {
        Some(s) => {
            let mut dsn = s
                .parse::<Dsn>()
                .map_err(|e| ConfigError::Invalid(format!("DATA_SOURCE_NAME: {e}")))?;
            // As libpq: PGAPPNAME applies when the connection string sets no application_name
            // (pgvigil's own default, `pgvigil`, is filled in later for every target).
            if dsn.0.get_application_name().is_none() {
                if let Some(app) = env("PGAPPNAME") {
                    dsn.0.application_name(app);
                }
            }
            dsn
        }
        None => {
            let mut pg = tokio_postgres::Config::new();
            let port = env("PGPORT").unwrap_or_else(|| "5432".into());
            let port: u16 = port
                .parse()
                .map_err(|e| ConfigError::Invalid(format!("PGPORT={port:?}: {e}")))?;
            let host = env("PGHOST")
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| default_host(DEFAULT_SOCKET_DIRS, port));
            for h in host.split(',') {
                pg.host(h);
            }
            pg.port(port);
            let user = env("PGUSER")
                .or_else(|| env("USER"))
                .unwrap_or_else(|| "postgres".into());
            pg.user(&user);
            pg.dbname(env("PGDATABASE").unwrap_or(user));
            if let Some(app) = env("PGAPPNAME") {
                pg.application_name(app);
            }
            let tls = tls_from_env(env)?;
            pg.ssl_mode(tls.driver_mode());
            Dsn(pg, tls, PasswordSource::default())
        }
    };
    // `host:port`, also for a Unix socket (`/var/run/postgresql:5432`).
    let name = {
        let (host, port) = crate::postgres::dsn::server(&dsn.0);
        format!("{host}:{port}")
    };
    Ok(TargetConfig {
        name,
        kind: TargetKind::default(),
        dsn,
        password_file: None,
        labels: BTreeMap::new(),
        databases: DatabaseFilter::default(),
        max_connections: default_max_connections(),
        file: None,
        probed: false,
    })
}

/// Where libpq builds look for the server's socket by default: Debian/Ubuntu's, then the
/// upstream default.
const DEFAULT_SOCKET_DIRS: &[&str] = &["/var/run/postgresql", "/tmp"];

/// libpq's default host when `PGHOST` is unset: the Unix socket directory, here the first of
/// `dirs` holding a socket for `port`; `localhost` (TCP) when none does.
fn default_host(dirs: &[&str], port: u16) -> String {
    dirs.iter()
        .find(|d| Path::new(d).join(format!(".s.PGSQL.{port}")).exists())
        .map_or_else(|| "localhost".to_string(), |d| d.to_string())
}

/// TLS settings from libpq's `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY`;
/// errors name the variable.
fn tls_from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<TlsSettings, ConfigError> {
    let mut params = TlsParams::default();
    for key in ["sslmode", "sslrootcert", "sslcert", "sslkey"] {
        if let Some(value) = env(&format!("PG{}", key.to_uppercase())) {
            params.set(key, value);
        }
    }
    let home = env("HOME").filter(|h| !h.is_empty()).map(PathBuf::from);
    TlsSettings::resolve(&params, home.as_deref())
        .map_err(|e| ConfigError::Invalid(format!("PG{}: {}", e.param.to_uppercase(), e.message)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(Path::new("pgvigil.yaml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn default_host_is_the_socket_directory_that_has_a_socket_else_localhost() {
        let empty = tempfile::tempdir().unwrap();
        let with = tempfile::tempdir().unwrap();
        let _socket =
            std::os::unix::net::UnixListener::bind(with.path().join(".s.PGSQL.5499")).unwrap();
        let (e, w) = (
            empty.path().to_str().unwrap(),
            with.path().to_str().unwrap(),
        );
        assert_eq!(default_host(&[e, w], 5499), w);
        assert_eq!(default_host(&[e, w], 5432), "localhost");
        assert_eq!(default_host(&[e], 5499), "localhost");
    }

    #[test]
    fn full_config_parses() {
        let c = parse(
            "listen: 127.0.0.1:9999\ntargets:\n  - name: db1\n    dsn: postgresql://u@h:5433/app\n    labels: {region: eu}\n    databases: {include: [\"^app\"]}\ncollectors:\n  disable: [x]\n  defaults: {interval: 30s}\n",
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9999);
        assert_eq!(c.targets[0].name, "db1");
        assert!(c.targets[0].databases.matches("app1"));
        assert!(!c.targets[0].databases.matches("postgres"));
        assert_eq!(c.collectors.defaults.interval, Interval::from_secs(30));
        assert_eq!(c.collectors.defaults.timeout, Interval::from_secs(5));
        assert_eq!(c.targets[0].max_connections, MaxConnections(3));
    }

    #[test]
    fn max_connections_is_at_least_one() {
        let t = |v: &str| {
            parse(&format!(
                "targets:\n  - name: a\n    dsn: host=h\n    max_connections: {v}\n"
            ))
        };
        assert_eq!(
            t("1").unwrap().targets[0].max_connections,
            MaxConnections(1)
        );
        for bad in ["0", "-1", "many"] {
            let e = t(bad).unwrap_err();
            assert!(e.starts_with("pgvigil.yaml:4:"), "{e}");
            assert!(e.contains("targets[0].max_connections"), "{e}");
            assert!(e.contains("at least 1"), "{e}");
        }
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let e = parse("targets:\n  - name: a\n    dsn: \"host=h port=notaport\"\n").unwrap_err();
        assert!(e.starts_with("pgvigil.yaml:3:"), "{e}");
        assert!(e.contains("targets[0].dsn"), "{e}");
        assert!(e.contains("invalid connection string"), "{e}");

        let e = parse("listen: 127.0.0.1:1\nbogus: 1\n").unwrap_err();
        assert!(e.starts_with("pgvigil.yaml:2:"), "{e}");
        assert!(e.contains("unknown field `bogus`"), "{e}");

        let e = parse("collectors:\n  defaults:\n    interval: soon\n").unwrap_err();
        assert!(e.starts_with("pgvigil.yaml:3:"), "{e}");
        assert!(e.contains("collectors.defaults.interval"), "{e}");

        let e = parse("targets:\n  - name: a\n    dsn: host=a\n  - name: a\n    dsn: host=b\n")
            .unwrap_err();
        assert!(e.contains("duplicate target name"), "{e}");
    }

    #[test]
    fn shard_is_validated_with_its_location() {
        let c = parse("shard: {index: 1, total: 2}\n").unwrap();
        assert_eq!(c.shard, Some(Shard { index: 1, total: 2 }));
        let e = parse("listen: 127.0.0.1:1\nshard:\n  index: 2\n  total: 2\n").unwrap_err();
        assert!(e.starts_with("pgvigil.yaml:3:"), "{e}");
        assert!(
            e.contains("shard.index: index 2 must be less than total 2"),
            "{e}"
        );
        let e = parse("shard:\n  index: 0\n  total: 0\n").unwrap_err();
        assert!(e.starts_with("pgvigil.yaml:3:"), "{e}");
        assert!(e.contains("shard.total: total must be at least 1"), "{e}");
        let e = parse("shard: {index: -1, total: 2}\n").unwrap_err();
        assert!(e.starts_with("pgvigil.yaml:1:"), "{e}");
        let e = parse("shard: {index: 0, count: 2}\n").unwrap_err();
        assert!(e.contains("unknown field `count`"), "{e}");
    }

    #[test]
    fn targets_files_add_targets_with_located_errors() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("targets")).unwrap();
        let config = d.join("pgvigil.yaml");
        std::fs::write(
            &config,
            "targets:\n  - name: main\n    dsn: host=h\ntargets_files: [\"targets/*.yaml\"]\n",
        )
        .unwrap();
        std::fs::write(
            d.join("targets/a.yaml"),
            "- name: a1\n  dsn: host=a\n  labels: {env: a}\n- name: a2\n  dsn: host=a\n",
        )
        .unwrap();
        std::fs::write(d.join("targets/b.yaml"), "").unwrap();
        std::fs::write(d.join("targets/ignored.txt"), "not yaml: [").unwrap();
        std::fs::write(d.join("targets/.#a.yaml"), "not yaml: [").unwrap();
        let c = Config::load(&config).unwrap();
        let names: Vec<&str> = c.targets.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["main", "a1", "a2"]);
        assert_eq!(
            c.targets[1].file.as_deref(),
            Some(d.join("targets/a.yaml").as_path())
        );
        assert_eq!(c.targets_files_state.len(), 2);

        // A type error: file, line and column of the value.
        std::fs::write(
            d.join("targets/b.yaml"),
            "- name: b1\n  dsn: host=b\n  max_connections: 0\n",
        )
        .unwrap();
        let e = Config::load(&config).unwrap_err().to_string();
        let b = d.join("targets/b.yaml").display().to_string();
        assert!(e.starts_with(&format!("{b}:3:")), "{e}");
        assert!(e.contains("max_connections"), "{e}");

        // Broken YAML.
        std::fs::write(d.join("targets/b.yaml"), "- name: b1\n  dsn: [host=b\n").unwrap();
        let e = Config::load(&config).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{b}:")), "{e}");

        // A duplicate name across the config and a file: both places named.
        std::fs::write(
            d.join("targets/b.yaml"),
            "- name: x\n  dsn: host=b\n- name: main\n  dsn: host=b\n",
        )
        .unwrap();
        let e = Config::load(&config).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "{b}:3:3: [1].name: duplicate target name \"main\""
            )),
            "{e}"
        );
        assert!(
            e.contains("first defined at ") && e.contains("pgvigil.yaml:2:5"),
            "{e}"
        );

        // Across two files.
        std::fs::write(d.join("targets/b.yaml"), "- name: a2\n  dsn: host=b\n").unwrap();
        let e = Config::load(&config).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{b}:1:3: [0].name: duplicate target name \"a2\"")),
            "{e}"
        );
        assert!(e.contains("a.yaml:4:3"), "{e}");

        // An unknown field.
        std::fs::write(
            d.join("targets/b.yaml"),
            "- name: b1\n  dsn: host=b\n  bogus: 1\n",
        )
        .unwrap();
        let e = Config::load(&config).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{b}:3:")), "{e}");
        assert!(e.contains("unknown field `bogus`"), "{e}");

        // A bad pattern is located in the config.
        std::fs::write(&config, "targets_files: [\"targets/[.yaml\"]\n").unwrap();
        let e = Config::load(&config).unwrap_err().to_string();
        assert!(
            e.contains("pgvigil.yaml:1:1: targets_files[0]: invalid pattern"),
            "{e}"
        );
    }

    #[test]
    fn only_owned_targets_are_resolved() {
        let mut yaml = String::from("shard: {index: 1, total: 3}\ntargets:\n");
        for i in 0..30 {
            yaml.push_str(&format!("  - {{name: t{i}, dsn: host=h}}\n"));
        }
        let c = parse(&yaml).unwrap();
        let mine: Vec<String> = c
            .resolve_targets(&|_| None)
            .unwrap()
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert!(!mine.is_empty() && mine.len() < 30, "{mine:?}");
        for t in &c.targets {
            assert_eq!(mine.contains(&t.name), fleet::owner(&t.name, 3) == 1);
        }
        // A target /probe registered here is polled here, whatever its name hashes to.
        let mut c = c;
        let other = c.targets.iter().position(|t| !c.owns(&t.name)).unwrap();
        c.targets[other].probed = true;
        let resolved = c.resolve_targets(&|_| None).unwrap();
        assert!(resolved.iter().any(|t| t.name == c.targets[other].name));
        assert_eq!(resolved.len(), mine.len() + 1);
        // Without targets: the environment's target only when no targets files are named.
        let mut c = parse("targets_files: [/nonexistent/*.yaml]\n").unwrap();
        c.apply_env(&|_| None).unwrap();
        assert!(c.targets.is_empty());
    }

    #[test]
    fn explain_and_self_spans_are_opt_in() {
        let c = parse("tracing:\n  otlp_endpoint: http://127.0.0.1:4317\n").unwrap();
        assert_eq!(c.tracing.explain, ExplainMode::Off);
        assert!(!c.tracing.self_spans);
        assert_eq!(c.tracing.explain_per_minute, 30);
        let c =
            parse("tracing:\n  explain: generic\n  explain_per_minute: 5\n  self: true\n").unwrap();
        assert_eq!(c.tracing.explain, ExplainMode::Generic);
        assert_eq!(c.tracing.explain_per_minute, 5);
        assert!(c.tracing.self_spans);
        let e = parse("tracing:\n  explain: analyze\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("analyze"), "{e}");
    }

    #[test]
    fn sample_interval_moved_from_tracing_to_activity() {
        let c = parse("").unwrap();
        assert_eq!(c.activity.interval(true), Interval(DEFAULT_SAMPLE_INTERVAL));
        let c = parse("tracing:\n  sample_interval: 200ms\n").unwrap();
        assert_eq!(c.activity.interval(true), "200ms".parse().unwrap());
        assert_eq!(c.activity.interval(false), "200ms".parse().unwrap());
        assert_eq!(c.tracing.sample_interval, None);
        let c = parse("activity:\n  sample_interval: 2s\ntracing:\n  sample_interval: 200ms\n")
            .unwrap();
        assert_eq!(c.activity.interval(true), Interval::from_secs(2));
        let e = parse("activity:\n  interval: 2s\n").unwrap_err();
        assert!(e.contains("unknown field `interval`"), "{e}");
    }

    #[test]
    fn the_default_sample_interval_follows_whether_spans_are_made() {
        let none = |_: &str| None;
        let c = parse("").unwrap();
        assert!(!c.tracing.makes_spans(&none));
        assert_eq!(
            c.activity.interval(c.tracing.makes_spans(&none)),
            Interval(DEFAULT_LOAD_SAMPLE_INTERVAL)
        );
        let c = parse("tracing:\n  otlp_endpoint: http://127.0.0.1:4317\n").unwrap();
        assert!(c.tracing.makes_spans(&none));
        let c = parse("").unwrap();
        for var in [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        ] {
            let env = |k: &str| (k == var).then(|| "http://127.0.0.1:4317".to_string());
            assert!(c.tracing.makes_spans(&env), "{var}");
        }
        let mut c = parse("").unwrap();
        c.tracing.console = true;
        assert!(c.tracing.makes_spans(&none));
        assert_eq!(c.activity.interval(true), Interval(DEFAULT_SAMPLE_INTERVAL));
    }

    #[test]
    fn default_databases_skip_templates() {
        let f = DatabaseFilter::default();
        assert!(f.matches("postgres"));
        assert!(!f.matches("template1"));
    }

    #[test]
    fn env_target_takes_the_libpq_tls_variables() {
        use crate::postgres::tls::{RootCerts, SslMode};
        let env = |k: &str| match k {
            "PGHOST" => Some("db1".to_string()),
            "PGSSLROOTCERT" => Some("system".to_string()),
            _ => None,
        };
        let mut c = Config::default();
        c.apply_env(&env).unwrap();
        let dsn = &c.targets[0].dsn;
        // libpq 16: sslrootcert=system makes verify-full the default.
        assert_eq!(dsn.1.mode, SslMode::VerifyFull);
        assert_eq!(dsn.1.root_cert, Some(RootCerts::System));
        assert_eq!(
            dsn.0.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );

        let env = |k: &str| match k {
            "PGSSLMODE" => Some("verify-ca".to_string()),
            "PGSSLROOTCERT" => Some("/nonexistent/ca.crt".to_string()),
            _ => None,
        };
        let e = Config::default().apply_env(&env).unwrap_err().to_string();
        assert!(
            e.starts_with("PGSSLROOTCERT: cannot read \"/nonexistent/ca.crt\""),
            "{e}"
        );

        let env = |k: &str| (k == "PGSSLMODE").then(|| "on".to_string());
        let e = Config::default().apply_env(&env).unwrap_err().to_string();
        assert!(e.starts_with("PGSSLMODE: invalid value \"on\""), "{e}");

        let env = |k: &str| (k == "PGSSLMODE").then(|| "disable".to_string());
        let mut c = Config::default();
        c.apply_env(&env).unwrap();
        assert_eq!(c.targets[0].dsn.1.mode, SslMode::Disable);
    }

    #[test]
    fn tls_errors_name_file_line_and_field() {
        let e = parse("targets:\n  - name: a\n    dsn: \"host=h sslmode=verify-ca sslrootcert='/nonexistent/ca.crt'\"\n")
            .unwrap_err();
        assert!(e.starts_with("pgvigil.yaml:3:"), "{e}");
        assert!(
            e.contains("targets[0].dsn: sslrootcert: cannot read \"/nonexistent/ca.crt\""),
            "{e}"
        );
        let e = parse("targets:\n  - name: a\n    dsn: postgresql://u:pw@h/db?sslmode=verify\n")
            .unwrap_err();
        assert!(
            e.contains("targets[0].dsn: sslmode: invalid value \"verify\""),
            "{e}"
        );
        assert!(!e.contains("pw@"), "{e}");
    }

    #[test]
    fn env_target_and_password_never_in_description() {
        let env = |k: &str| match k {
            "DATA_SOURCE_NAME" => Some("postgresql://u:secret@db:6432/app".to_string()),
            _ => None,
        };
        let mut c = Config::default();
        c.apply_env(&env).unwrap();
        assert_eq!(c.targets[0].name, "db:6432");
        let shown = format!("{:?}", c.targets[0].dsn);
        assert!(!shown.contains("secret"), "{shown}");
        let t = c.resolve_targets(&env).unwrap();
        assert_eq!(t[0].pg.0.get_password(), Some(&b"secret"[..]));
        assert_eq!(t[0].labels[0], ("target".into(), "db:6432".into()));
    }

    #[test]
    fn env_target_on_a_unix_socket_is_named_after_socket_and_port() {
        for (key, value) in [
            ("PGHOST", "/var/run/postgresql"),
            (
                "DATA_SOURCE_NAME",
                "host=/var/run/postgresql port=5433 user=u",
            ),
        ] {
            let env = |k: &str| (k == key).then(|| value.to_string());
            let mut c = Config::default();
            c.apply_env(&env).unwrap();
            let want = if key == "PGHOST" {
                "/var/run/postgresql:5432"
            } else {
                "/var/run/postgresql:5433"
            };
            assert_eq!(c.targets[0].name, want, "{key}={value}");
        }
    }
}
