//! The structure of the Grafana dashboards in `dashboards/`, the hygiene that makes them
//! work on first import in any Grafana with any Prometheus: the data source is always the
//! `datasource` variable (no UID of someone's Grafana), every `$variable` is defined, ids are
//! unique, rates use `$__rate_interval`, every panel says what it shows and in which unit, and
//! the dashboards link to each other. `tests/dashboards.rs` checks the metric names against the
//! packs. Pure JSON: no database, no Grafana.

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::LazyLock;

use serde_json::Value;

/// Grafana's own variables that an expression or a field may use without defining them.
const BUILTIN_VARIABLES: [&str; 11] = [
    "__rate_interval",
    "__interval",
    "__interval_ms",
    "__range",
    "__range_s",
    "__range_ms",
    "__from",
    "__to",
    "__all",
    "__dashboard",
    "__timeFilter",
];

/// The data source every panel, target and query variable names.
const DATASOURCE: &str = "${datasource}";

/// Panel types that draw numbers and so need a unit on their default field config.
/// Tables set units per column (overrides); state timelines show text.
const NEEDS_UNIT: [&str; 6] = [
    "timeseries",
    "stat",
    "gauge",
    "bargauge",
    "barchart",
    "histogram",
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
    assert!(!files.is_empty(), "no dashboards in {}", dir.display());
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

/// The dashboard's panels, including those inside (collapsed) rows.
fn panels(dash: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// The template variables, by name.
fn variables(dash: &Value) -> Vec<&Value> {
    dash["templating"]["list"]
        .as_array()
        .map(|l| l.iter().collect())
        .unwrap_or_default()
}

fn title(p: &Value) -> &str {
    p["title"].as_str().unwrap_or("?")
}

/// Every string anywhere in `v`, with a path to where it is.
fn strings<'a>(v: &'a Value, path: String, out: &mut Vec<(String, &'a str)>) {
    match v {
        Value::String(s) => out.push((path, s)),
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                strings(x, format!("{path}[{i}]"), out);
            }
        }
        Value::Object(o) => {
            for (k, x) in o {
                strings(x, format!("{path}.{k}"), out);
            }
        }
        _ => {}
    }
}

/// Every `datasource` value anywhere in `v`, with a path to where it is.
fn datasources<'a>(v: &'a Value, path: String, out: &mut Vec<(String, &'a Value)>) {
    match v {
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                datasources(x, format!("{path}[{i}]"), out);
            }
        }
        Value::Object(o) => {
            for (k, x) in o {
                if k == "datasource" {
                    out.push((format!("{path}.{k}"), x));
                }
                datasources(x, format!("{path}.{k}"), out);
            }
        }
        _ => {}
    }
}

/// The variable names a string refers to: `$name`, `${name}`, `${name:format}`, `[[name]]`.
fn variable_refs(s: &str) -> Vec<String> {
    static RE: LazyLock<regex::Regex> = LazyLock::new(|| {
        regex::Regex::new(
            r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::[^}]*)?\}|\$([A-Za-z_][A-Za-z0-9_]*)|\[\[([A-Za-z_][A-Za-z0-9_]*)(?::[^\]]*)?\]\]",
        )
        .expect("regex")
    });
    RE.captures_iter(s)
        .map(|c| {
            c.get(1)
                .or(c.get(2))
                .or(c.get(3))
                .expect("one group matches")
                .as_str()
                .to_owned()
        })
        .collect()
}

#[test]
fn panel_ids_are_unique_and_panels_fit_the_grid() {
    for (file, dash) in dashboards() {
        let mut ids = HashSet::new();
        for p in panels(&dash) {
            let id = p["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("{file}: panel {}: no numeric id", title(p)));
            assert!(ids.insert(id), "{file}: panel id {id} used twice");
            let pos = &p["gridPos"];
            let (x, w, h) = (pos["x"].as_u64(), pos["w"].as_u64(), pos["h"].as_u64());
            let (Some(x), Some(w), Some(h)) = (x, w, h) else {
                panic!("{file}: panel {}: incomplete gridPos {pos}", title(p));
            };
            assert!(
                w > 0 && h > 0 && x + w <= 24,
                "{file}: panel {}: gridPos {pos} outside the 24-column grid",
                title(p)
            );
        }
    }
}

#[test]
fn every_target_has_an_expression() {
    for (file, dash) in dashboards() {
        for p in panels(&dash) {
            if p["type"] == "row" {
                continue;
            }
            let targets = p["targets"].as_array().cloned().unwrap_or_default();
            assert!(
                !targets.is_empty(),
                "{file}: panel {}: no targets",
                title(p)
            );
            for t in &targets {
                let expr = t["expr"].as_str().unwrap_or("");
                assert!(
                    !expr.trim().is_empty(),
                    "{file}: panel {}: target {} has an empty expr",
                    title(p),
                    t["refId"]
                );
            }
        }
    }
}

#[test]
fn every_variable_used_is_defined_and_every_defined_variable_is_used() {
    for (file, dash) in dashboards() {
        let defined: BTreeSet<String> = variables(&dash)
            .iter()
            .filter_map(|v| v["name"].as_str().map(str::to_owned))
            .collect();
        let mut all = Vec::new();
        strings(&dash, String::new(), &mut all);
        let mut used = BTreeSet::new();
        for (path, s) in &all {
            for name in variable_refs(s) {
                assert!(
                    defined.contains(&name) || BUILTIN_VARIABLES.contains(&name.as_str()),
                    "{file}: {path}: ${name} is neither a template variable ({defined:?}) nor a \
                     Grafana built-in: {s}"
                );
                used.insert(name);
            }
        }
        // A variable nothing refers to is a dead selector on the dashboard. (Variables refer
        // to each other, e.g. `datname`'s query filters on `$target`, and that counts.)
        for name in &defined {
            assert!(
                used.contains(name),
                "{file}: template variable `{name}` is defined but never used"
            );
        }
    }
}

#[test]
fn the_data_source_is_always_the_datasource_variable() {
    for (file, dash) in dashboards() {
        let ds = variables(&dash)
            .into_iter()
            .find(|v| v["name"] == "datasource")
            .unwrap_or_else(|| panic!("{file}: no `datasource` variable"));
        assert_eq!(
            ds["type"], "datasource",
            "{file}: `datasource` variable type"
        );
        assert_eq!(
            ds["query"], "prometheus",
            "{file}: `datasource` variable must list Prometheus data sources"
        );
        // A saved selection would name someone's data source; empty means Grafana's default.
        let current = &ds["current"];
        assert!(
            current.is_null()
                || current.as_object().is_some_and(|o| o.is_empty())
                || current["value"] == "default",
            "{file}: `datasource` variable saved with a selection ({current}); save it empty"
        );
        for v in variables(&dash) {
            if v["type"] == "query" {
                assert_eq!(
                    v["datasource"]["uid"], DATASOURCE,
                    "{file}: variable {}: its query must run on {DATASOURCE}",
                    v["name"]
                );
            }
        }
        for p in panels(&dash) {
            if p["type"] == "row" {
                continue;
            }
            assert_eq!(
                p["datasource"]["uid"],
                DATASOURCE,
                "{file}: panel {}: datasource",
                title(p)
            );
            for t in p["targets"].as_array().into_iter().flatten() {
                assert_eq!(
                    t["datasource"]["uid"],
                    DATASOURCE,
                    "{file}: panel {}: target {}: datasource",
                    title(p),
                    t["refId"]
                );
            }
        }
        // Nowhere a hard-coded UID: only the variable, or Grafana's built-in annotation source.
        let mut all = Vec::new();
        datasources(&dash, String::new(), &mut all);
        for (path, d) in all {
            let ok = match d {
                Value::String(s) => s == DATASOURCE,
                Value::Object(_) => {
                    d["uid"] == DATASOURCE
                        || (d["type"] == "grafana" && d["uid"] == "-- Grafana --")
                }
                _ => false,
            };
            assert!(ok, "{file}: {path}: hard-coded data source {d}");
        }
        assert!(
            dash["__inputs"].as_array().is_none_or(Vec::is_empty),
            "{file}: `__inputs` make Grafana ask for a data source on import and rewrite the \
             panels to its UID; use the `datasource` variable instead"
        );
    }
}

#[test]
fn rates_use_the_rate_interval() {
    // rate/irate/increase over `$__rate_interval` follow the scrape interval Grafana knows; a
    // stat or table over the whole time range uses `$__range`. Other range functions (deriv,
    // *_over_time) may use a fixed window on purpose.
    let re =
        regex::Regex::new(r"\b(rate|irate|increase)\s*\(([^\[\]]*)\[([^\]]*)\]").expect("regex");
    for (file, dash) in dashboards() {
        for p in panels(&dash) {
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().unwrap_or("");
                for c in re.captures_iter(expr) {
                    let range = c[3].trim();
                    assert!(
                        range == "$__rate_interval" || range == "$__range",
                        "{file}: panel {}: {}(…[{range}]) should use [$__rate_interval] (or \
                         [$__range] for the whole time range): {expr}",
                        title(p),
                        &c[1]
                    );
                }
            }
        }
    }
}

#[test]
fn panels_have_a_description_and_a_unit() {
    for (file, dash) in dashboards() {
        for p in panels(&dash) {
            if p["type"] == "row" {
                continue;
            }
            assert!(
                p["description"]
                    .as_str()
                    .is_some_and(|d| !d.trim().is_empty()),
                "{file}: panel {}: no description",
                title(p)
            );
            if NEEDS_UNIT.contains(&p["type"].as_str().unwrap_or("")) {
                assert!(
                    p["fieldConfig"]["defaults"]["unit"]
                        .as_str()
                        .is_some_and(|u| !u.is_empty()),
                    "{file}: panel {}: no unit in fieldConfig.defaults",
                    title(p)
                );
            }
        }
    }
}

#[test]
fn dashboards_link_to_each_other_and_filter_by_target() {
    for (file, dash) in dashboards() {
        let tags: Vec<&str> = dash["tags"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        assert!(tags.contains(&"pgvigil"), "{file}: not tagged `pgvigil`");
        let links = dash["links"].as_array().cloned().unwrap_or_default();
        assert!(
            links.iter().any(|l| l["type"] == "dashboards"
                && l["tags"]
                    .as_array()
                    .is_some_and(|t| t.contains(&"pgvigil".into()))
                && l["includeVars"] == true
                && l["keepTime"] == true),
            "{file}: no link to the other pgvigil dashboards (type dashboards, tag pgvigil, \
             keeping time and variables)"
        );
        let names: Vec<&str> = variables(&dash)
            .iter()
            .filter_map(|v| v["name"].as_str())
            .collect();
        assert!(names.contains(&"target"), "{file}: no `target` variable");
        // Every panel of a per-database metric can be narrowed to databases.
        let uses_datname = panels(&dash).iter().any(|p| {
            p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|t| t["expr"].as_str().unwrap_or("").contains("datname"))
        });
        if uses_datname {
            assert!(
                names.contains(&"datname"),
                "{file}: expressions use datname but there is no `datname` variable"
            );
        }
    }
}

#[test]
fn variable_refs_finds_every_syntax() {
    assert_eq!(
        variable_refs(r#"rate(x{a=~"$target", b="${datname:regex}"}[$__rate_interval]) [[user]]"#),
        ["target", "datname", "__rate_interval", "user"]
    );
}
