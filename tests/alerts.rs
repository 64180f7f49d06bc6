//! The alert rules in `alerts/pgvigil.rules.yml` against what pgvigil exports and against the
//! conventions the README promises: every rule has a severity, a summary, a description that
//! locates the problem, a runbook and a documented threshold, and every alert and severity
//! fires in a `promtool` test (`alerts/tests/`). `promtool test rules` itself runs in
//! `scripts/test.sh`; this test needs neither promtool nor a database.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_yaml_ng::Value;

/// Metrics of DESIGN.md §5 that rules use before a built-in pack exports them (packs being
/// written in parallel). Once a pack declares one, its entry here is redundant, not wrong;
/// a name neither exported nor listed here is a typo or a renamed metric.
const NOT_YET_EXPORTED: [&str; 0] = [];

fn alerts_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("alerts")
}

fn rules_text() -> String {
    let path = alerts_dir().join("pgvigil.rules.yml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every rule of every group.
fn rules() -> Vec<Value> {
    let doc: Value = serde_yaml_ng::from_str(&rules_text()).expect("rule file is YAML");
    let groups = doc["groups"].as_sequence().expect("groups");
    assert!(!groups.is_empty(), "no rule groups");
    groups
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules").clone())
        .collect()
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("")
}

/// Metric names pgvigil exports: the built-in packs' metrics and the self-metrics.
fn exportable_metrics() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (file, text) in pgvigil::collector::pack::BUILTIN_PACKS {
        let pack: Value = serde_yaml_ng::from_str(text).unwrap_or_else(|e| panic!("{file}: {e}"));
        for c in pack["collectors"].as_sequence().into_iter().flatten() {
            for m in c["metrics"].as_sequence().into_iter().flatten() {
                if let Some(name) = m["name"].as_str() {
                    names.insert(name.to_owned());
                }
                // A `name_from` rule makes any name with its prefix: kept as `prefix*`.
                if let Some(prefix) = m["name_prefix"].as_str() {
                    names.insert(format!("{prefix}*"));
                }
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

/// The `pg_*`, `pgbouncer_*` and `pgvigil_*` identifiers of a PromQL expression outside string literals.
fn metric_names(expr: &str) -> Vec<String> {
    let mut code = String::with_capacity(expr.len());
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in expr.chars() {
        match quote {
            Some(_) if escaped => escaped = false,
            Some(q) if c == '\\' && q != '`' => escaped = true,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if matches!(c, '"' | '\'' | '`') => quote = Some(c),
            None => code.push(c),
        }
    }
    let re = regex::Regex::new(r"[A-Za-z_:][A-Za-z0-9_:]*").expect("regex");
    re.find_iter(&code)
        .map(|m| m.as_str())
        .filter(|m| {
            m.starts_with("pg_") || m.starts_with("pgvigil_") || m.starts_with("pgbouncer_")
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_rule_is_an_alert_with_severity_and_annotations() {
    let rules = rules();
    assert!(rules.len() >= 25, "only {} rules", rules.len());
    for r in &rules {
        let name = str_of(r, "alert");
        assert!(!name.is_empty(), "a rule that is not an alert: {r:?}");
        assert!(
            name.starts_with("Pgvigil")
                || name.starts_with("Postgres")
                || name.starts_with("PgBouncer"),
            "{name}: alert names start with Pgvigil (pgvigil itself), Postgres or PgBouncer"
        );
        let severity = str_of(&r["labels"], "severity");
        assert!(
            severity == "warning" || severity == "critical",
            "{name}: severity {severity:?} is neither warning nor critical"
        );
        for key in ["summary", "description", "runbook"] {
            assert!(
                str_of(&r["annotations"], key).trim().len() > 10,
                "{name}: annotation {key} missing or empty"
            );
        }
        // The description names where the problem is: the target (or, for pgvigil's own
        // alerts without a target, the pgvigil instance).
        let description = str_of(&r["annotations"], "description");
        assert!(
            description.contains("$labels.target") || description.contains("$labels.instance"),
            "{name}: description does not name the target: {description}"
        );
        assert!(!str_of(r, "expr").trim().is_empty(), "{name}: empty expr");
    }
}

#[test]
fn every_threshold_is_documented_above_its_rule() {
    let text = rules_text();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = line.trim().strip_prefix("- alert:") else {
            continue;
        };
        let comments: Vec<&str> = lines[..i]
            .iter()
            .rev()
            .take_while(|l| l.trim_start().starts_with('#'))
            .copied()
            .collect();
        assert!(
            comments
                .iter()
                .any(|c| c.contains("# threshold:") || c.contains("# for:")),
            "{}: no `# threshold:` or `# for:` comment above the rule (line {})",
            name.trim(),
            i + 1
        );
    }
}

#[test]
fn every_metric_in_a_rule_is_exported_or_promised_by_the_design() {
    let known = exportable_metrics();
    assert!(known.contains("pg_up"), "pg_up missing from {known:?}");
    let mut unknown = Vec::new();
    for r in rules() {
        for name in metric_names(str_of(&r, "expr")) {
            let by_rule = known
                .iter()
                .filter_map(|k| k.strip_suffix('*'))
                .any(|prefix| name.starts_with(prefix));
            if !known.contains(&name) && !by_rule && !NOT_YET_EXPORTED.contains(&name.as_str()) {
                unknown.push(format!("{}: {name}", str_of(&r, "alert")));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "metrics neither exported by pgvigil nor listed in NOT_YET_EXPORTED:\n{}",
        unknown.join("\n")
    );
}

#[test]
fn every_alert_and_severity_fires_in_a_promtool_test() {
    let dir = alerts_dir().join("tests");
    let mut fired = BTreeSet::new();
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.extension().is_none_or(|x| x != "yml") {
            continue;
        }
        files += 1;
        let text = std::fs::read_to_string(&path).expect("test file");
        let doc: Value =
            serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            doc["rule_files"][0].as_str(),
            Some("../pgvigil.rules.yml"),
            "{}: tests the wrong rule file",
            path.display()
        );
        for group in doc["tests"].as_sequence().into_iter().flatten() {
            for t in group["alert_rule_test"].as_sequence().into_iter().flatten() {
                for a in t["exp_alerts"].as_sequence().into_iter().flatten() {
                    fired.insert((
                        str_of(t, "alertname").to_owned(),
                        str_of(&a["exp_labels"], "severity").to_owned(),
                    ));
                }
            }
        }
    }
    assert!(files > 0, "no tests in {}", dir.display());
    for r in rules() {
        let key = (
            str_of(&r, "alert").to_owned(),
            str_of(&r["labels"], "severity").to_owned(),
        );
        assert!(
            fired.contains(&key),
            "{} ({}) never fires in alerts/tests/*.yml",
            key.0,
            key.1
        );
    }
}

#[test]
fn metric_names_skip_strings() {
    assert_eq!(
        metric_names(r#"pg_a{x=~"pg_b|pg_c"} unless on (target) (pgvigil_d == 1)"#),
        ["pg_a", "pgvigil_d"]
    );
}
