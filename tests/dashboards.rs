//! The Grafana dashboards in `dashboards/` against what pgvigil exports: every panel has a
//! PromQL expression on the dashboard's data source variable, and every metric an
//! expression names is one that the built-in packs or pgvigil itself produce. This catches
//! a dashboard drifting from a renamed or removed metric. Needs no database.

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;

use serde_json::Value;

/// The dashboards that ship; each must exist.
const EXPECTED: [&str; 5] = [
    "pgvigil-overview.json",
    "pgvigil-queries.json",
    "pgvigil-locks-indexes.json",
    "pgvigil-db-load.json",
    "pgvigil-operations.json",
];

/// Every `dashboards/*.json`, parsed, by file name.
fn dashboards() -> Vec<(String, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| {
            let text =
                std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            let json = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{}: invalid JSON: {e}", p.display()));
            let name = p
                .file_name()
                .expect("file name")
                .to_string_lossy()
                .into_owned();
            (name, json)
        })
        .collect()
}

/// Metric names pgvigil can export: the `metrics[].name` of every built-in pack (`prefix*`
/// for a `name_from` rule), the families the Rust processors add, and the self-metrics.
fn exportable_metrics() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (file, text) in pgvigil::collector::pack::BUILTIN_PACKS {
        let pack: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(text).unwrap_or_else(|e| panic!("{file}: {e}"));
        let collectors = pack["collectors"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{file}: no collectors list"));
        for c in collectors {
            for m in c["metrics"].as_sequence().into_iter().flatten() {
                // A `name_from` rule makes any name with its prefix: kept as `prefix*`.
                let name = match m["name_prefix"].as_str() {
                    Some(prefix) => format!("{prefix}*"),
                    None => m["name"]
                        .as_str()
                        .unwrap_or_else(|| panic!("{file}: a metric without a name"))
                        .to_owned(),
                };
                names.insert(name);
            }
        }
    }
    let store = pgvigil::store::Store::new();
    names.extend(
        pgvigil::health::self_metrics(&store)
            .iter()
            .map(|f| f.name.to_string()),
    );
    names
}

/// The dashboard's panels, including those inside (collapsed) rows.
fn panels(dash: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// `expr` without its string literals (label values, regexes), which may look like names.
fn without_strings(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in expr.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' && q != '`' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                    out.push(c);
                }
            }
            None => {
                if matches!(c, '"' | '\'' | '`') {
                    quote = Some(c);
                }
                out.push(c);
            }
        }
    }
    out
}

/// The metric names an expression refers to: identifiers starting with `pg_` or `pgvigil_`
/// outside string literals (no label of pgvigil starts with either).
fn metric_names(expr: &str) -> Vec<String> {
    let re = regex::Regex::new(r"[A-Za-z_:][A-Za-z0-9_:]*").expect("regex");
    let code = without_strings(expr);
    re.find_iter(&code)
        .filter(|m| {
            // An identifier preceded by `$` is a Grafana variable, not a metric.
            !code[..m.start()].ends_with('$')
                && (m.as_str().starts_with("pg_") || m.as_str().starts_with("pgvigil_"))
        })
        .map(|m| m.as_str().to_owned())
        .collect()
}

#[test]
fn the_expected_dashboards_exist() {
    let found: Vec<String> = dashboards().into_iter().map(|(n, _)| n).collect();
    for name in EXPECTED {
        assert!(
            found.iter().any(|f| f == name),
            "dashboards/{name} is missing"
        );
    }
}

#[test]
fn dashboards_are_importable_with_any_prometheus() {
    for (file, dash) in dashboards() {
        assert!(
            dash["uid"].as_str().is_some_and(|u| !u.is_empty()),
            "{file}: no uid"
        );
        assert!(
            dash["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{file}: no title"
        );
        assert!(
            dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
            "{file}: schemaVersion must be 36 or later"
        );
        let vars = dash["templating"]["list"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let var = |name: &str| vars.iter().find(|v| v["name"] == name).cloned();
        let ds = var("datasource").unwrap_or_else(|| panic!("{file}: no `datasource` variable"));
        assert_eq!(
            ds["type"], "datasource",
            "{file}: `datasource` variable type"
        );
        assert_eq!(
            ds["query"], "prometheus",
            "{file}: `datasource` variable query"
        );
        let target = var("target").unwrap_or_else(|| panic!("{file}: no `target` variable"));
        assert_eq!(
            target["definition"], "label_values(pg_up, target)",
            "{file}"
        );

        let mut ids = HashSet::new();
        for p in panels(&dash) {
            let title = p["title"].as_str().unwrap_or("?");
            let id = p["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("{file}: panel {title}: no id"));
            assert!(ids.insert(id), "{file}: panel id {id} used twice");
            if p["type"] == "row" {
                continue;
            }
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "{file}: panel {title}: data source must be the `datasource` variable"
            );
            let targets = p["targets"].as_array().cloned().unwrap_or_default();
            assert!(!targets.is_empty(), "{file}: panel {title}: no targets");
            let mut refs = HashSet::new();
            for t in &targets {
                let expr = t["expr"].as_str().unwrap_or("");
                assert!(
                    !expr.trim().is_empty(),
                    "{file}: panel {title}: a target without expr"
                );
                let r = t["refId"].as_str().unwrap_or("");
                assert!(
                    refs.insert(r.to_owned()),
                    "{file}: panel {title}: refId {r:?} twice"
                );
            }
        }
    }
}

#[test]
fn ranges_use_grafana_intervals() {
    let range = regex::Regex::new(r"\[([^\]]*)\]").expect("regex");
    let fixed = regex::Regex::new(r"^[0-9]+[smhdwy]$").expect("regex");
    for (file, dash) in dashboards() {
        for p in panels(&dash) {
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().unwrap_or("");
                for c in range.captures_iter(&without_strings(expr)) {
                    let r = c[1].trim();
                    assert!(
                        r == "$__rate_interval" || r == "$__range" || fixed.is_match(r),
                        "{file}: panel {}: range [{r}] should be [$__rate_interval], [$__range] \
                         or a fixed duration: {expr}",
                        p["title"]
                    );
                }
            }
        }
    }
}

#[test]
fn every_metric_in_a_dashboard_is_exported_by_pgvigil() {
    let known = exportable_metrics();
    for sure in [
        "pg_up",
        "pg_stat_statements_calls_total",
        "pg_locks_waiting",
    ] {
        assert!(known.contains(sure), "{sure} missing from {known:?}");
    }
    let mut unknown = Vec::new();
    for (file, dash) in dashboards() {
        let mut used = 0;
        for p in panels(&dash) {
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().unwrap_or("");
                for name in metric_names(expr) {
                    used += 1;
                    let by_rule = known.iter().any(|k| {
                        k.strip_suffix('*')
                            .is_some_and(|prefix| name.starts_with(prefix))
                    });
                    if !known.contains(&name) && !by_rule {
                        unknown.push(format!("{file}: panel {}: {name}", p["title"]));
                    }
                }
            }
        }
        assert!(used > 0, "{file}: refers to no pgvigil metric at all");
    }
    assert!(
        unknown.is_empty(),
        "metrics pgvigil does not export:\n{}",
        unknown.join("\n")
    );
}

#[test]
fn metric_names_skip_strings_and_variables() {
    let names = metric_names(
        r#"sum(rate(pg_a_total{datname=~"pg_not_a_metric", x="\"pg_no\""}[$__rate_interval])) / on (target) pgvigil_b"#,
    );
    assert_eq!(names, ["pg_a_total", "pgvigil_b"]);
}
