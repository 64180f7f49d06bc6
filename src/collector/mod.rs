//! Collectors: the pack format (`pack`), rows → families (`rows`) and the per-target poll
//! loop (`poller`), plus the plan printout of `pgvigil check-config` and, with `--connect`,
//! each collector tried once on each target (`check`).

pub mod check;
pub mod names;
pub mod pack;
pub mod poller;
pub mod rows;
pub mod steps;
pub mod table;

use std::fmt::Write as _;

use crate::config::{CollectorDefaults, Config, TargetKind};
use pack::{Catalog, Scope};

/// The PostgreSQL majors pgvigil supports; the plan shows the variant chosen for each.
pub const SUPPORTED_MAJORS: &[u32] = &[13, 14, 15, 16, 17, 18];

/// Which SQL variant each supported major gets, runs of equal choices grouped:
/// `PostgreSQL 13: queries[0] (<= 13); 14-16: queries[1] (14 to 16); 17-18: queries[2] (>= 17)`.
fn variant_plan(queries: &pack::Variants) -> String {
    let mut groups: Vec<(u32, u32, Option<usize>)> = Vec::new();
    for &major in SUPPORTED_MAJORS {
        let chosen = queries.resolve_index(major * 10_000);
        match groups.last_mut() {
            Some((_, last, c)) if *c == chosen => *last = major,
            _ => groups.push((major, major, chosen)),
        }
    }
    let parts: Vec<String> = groups
        .iter()
        .map(|(a, b, chosen)| {
            let span = if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            };
            match chosen {
                Some(i) => format!("{span}: queries[{i}] ({})", queries.0[*i].range_text()),
                None => format!("{span}: skipped (no variant)"),
            }
        })
        .collect();
    format!("PostgreSQL {}", parts.join("; "))
}

/// Whether `text` is a collector pack (a top-level `collectors:` list) rather than a config
/// file (whose `collectors:` is a mapping), so `check-config` can take either.
pub fn is_pack_text(text: &str) -> bool {
    serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text).is_ok_and(|v| {
        v.get("collectors")
            .is_some_and(serde_yaml_ng::Value::is_sequence)
    })
}

/// `check-config PACK`: loads the pack beside the built-in ones (so a clash of names is
/// found) and describes only its collectors, with the default intervals.
pub fn pack_plan_text(path: &std::path::Path) -> Result<String, pack::PackError> {
    let config = Config::default();
    let catalog = Catalog::load(&crate::config::CollectorsConfig {
        paths: vec![path.to_path_buf()],
        ..Default::default()
    })?;
    let mine: Vec<_> = catalog
        .collectors
        .iter()
        .filter(|c| c.source == path)
        .cloned()
        .collect();
    let mut out = String::new();
    let _ = writeln!(out, "pack {}", path.display());
    collectors_text(&mut out, &config, &mine, &catalog.notes);
    Ok(out)
}

/// A human-readable plan: targets, then each collector with its interval, timeout and the
/// SQL variant each supported server version gets.
pub fn plan_text(config: &Config, catalog: &Catalog) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "listen: {}", config.listen);
    if let Some(shard) = config.shard {
        let owned = config
            .targets
            .iter()
            .filter(|t| config.owns(&t.name))
            .count();
        let _ = writeln!(
            out,
            "shard: {shard}: this instance polls {owned} of {} targets (marked *)",
            config.targets.len()
        );
    }
    let _ = writeln!(out, "targets:");
    for t in &config.targets {
        let mark = if config.shard.is_some() && config.owns(&t.name) {
            "* "
        } else {
            "  "
        };
        let from = t
            .file
            .as_ref()
            .map(|f| format!(" (from {})", f.display()))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{mark}{} (kind {}): {:?}, at most {} collector connections{from}",
            t.name, t.kind, t.dsn, t.max_connections.0
        );
    }
    collectors_text(&mut out, config, &catalog.collectors, &catalog.notes);
    out
}

/// The collectors part of the plan.
fn collectors_text(
    out: &mut String,
    config: &Config,
    collectors: &[pack::CollectorDef],
    notes: &[String],
) {
    let d: CollectorDefaults = config.collectors.defaults;
    let _ = writeln!(out, "collectors ({}):", collectors.len());
    for c in collectors {
        let scope = match c.scope {
            Scope::Cluster => "cluster",
            Scope::Database => "database",
        };
        let every = match c.run_by {
            pack::RunBy::Poller => c.interval.unwrap_or(d.interval).to_string(),
            pack::RunBy::ActivitySampler => {
                format!(
                    "{} (activity sampler)",
                    config
                        .activity
                        .interval(config.tracing.makes_spans(&|k| std::env::var(k).ok()))
                )
            }
        };
        let _ = writeln!(
            out,
            "  {} [{}{}] every {}, timeout {}, {} metrics, from {}",
            c.name,
            scope,
            match c.kind {
                TargetKind::Postgres => "",
                TargetKind::Pgbouncer => ", pgbouncer targets",
            },
            every,
            c.timeout.unwrap_or(d.timeout),
            c.metrics.0.len(),
            c.source.display()
        );
        if let Some(ext) = &c.requires.extension {
            let _ = writeln!(out, "      requires extension {ext}");
        }
        if let Some(grant) = &c.requires.grant {
            let _ = writeln!(
                out,
                "      needs a superuser, or: {} (skipped where denied)",
                grant.trim()
            );
        }
        match c.kind {
            TargetKind::Postgres => {
                let _ = writeln!(out, "      {}", variant_plan(&c.queries));
            }
            // PgBouncer versions are not PostgreSQL majors: the plan is its one query.
            TargetKind::Pgbouncer => {
                let _ = writeln!(
                    out,
                    "      PgBouncer: queries[0] ({})",
                    c.queries.0[0].range_text()
                );
            }
        }
        if c.cache.is_some() {
            let _ = writeln!(
                out,
                "      fills the relation-name cache of each database it visits"
            );
        }
        if let Some(datname) = &c.per_database {
            let names: Vec<String> = c
                .relation_names
                .iter()
                .map(|r| format!("{} from the OID in {}", r.column, r.oid))
                .collect();
            let _ = writeln!(
                out,
                "      rows per database (column {datname}){}{}",
                if names.is_empty() {
                    ""
                } else {
                    "; relation names: "
                },
                names.join(", ")
            );
        }
        if let Some(kind) = c.processor {
            let _ = writeln!(out, "      step: {}", steps::describe(kind));
        }
        for m in &c.metrics.0 {
            match &m.name_rule {
                None => {
                    let _ = writeln!(out, "      {} ({}): {}", m.name, m.kind.as_str(), m.help);
                }
                Some(rule) => {
                    let _ = writeln!(
                        out,
                        "      {} ({}, a family per row, name from column {}): {}",
                        m.name,
                        m.kind.as_str(),
                        rule.column,
                        m.help
                    );
                }
            }
        }
    }
    for note in notes {
        let _ = writeln!(out, "note: {note}");
    }
}
