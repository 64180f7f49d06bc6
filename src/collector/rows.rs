//! Rows → metric families, following a collector's metric definitions. Pure: no I/O, so
//! it is tested with literal rows-as-columns.

use std::collections::HashMap;
use std::sync::Arc;

use crate::collector::pack::{CollectorDef, MetricDef, NameRule, Scope};
use crate::collector::table::Rows;
use crate::metric::MetricType;
use crate::metric::{Family, Sample};

use crate::postgres::{ErrorKind, PgError};

fn hash_of(labels: &[(Arc<str>, String)]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    labels.hash(&mut h);
    h.finish()
}

/// Builds the families of `def` from `rows`. `base_labels` (target and its labels) come
/// first on every sample; database-scope collectors get `datname` when the metric does not
/// already take it from a column. A NULL or non-finite value skips that sample. A metric
/// with a [`NameRule`] gives one family per distinct generated name, in order of first row.
pub fn to_families<T: Rows + ?Sized>(
    def: &CollectorDef,
    rows: &T,
    base_labels: &[(Arc<str>, String)],
    database: &str,
) -> Result<Vec<Family>, PgError> {
    let mut families = Vec::with_capacity(def.metrics.0.len());
    for m in &def.metrics.0 {
        let Some(rule) = &m.name_rule else {
            let mut family = Family {
                name: Arc::from(m.name.0.as_str()),
                help: Arc::from(m.help.as_str()),
                kind: m.kind,
                samples: Vec::with_capacity(rows.len()),
            };
            if !rows.is_empty() {
                family.samples = samples(def, m, rows, 0..rows.len(), base_labels, database)?;
            }
            families.push(family);
            continue;
        };
        for (name, (help, members)) in rule_groups(def, m, rule, rows)? {
            let samples = samples(def, m, rows, members.into_iter(), base_labels, database)?;
            families.push(Family {
                name: Arc::from(name.as_str()),
                help: Arc::from(help.as_str()),
                kind: m.kind,
                samples,
            });
        }
    }
    Ok(families)
}

fn decode(msg: String) -> PgError {
    PgError::new(ErrorKind::Decode, msg)
}

fn column<T: Rows + ?Sized>(m: &MetricDef, rows: &T, col: &str) -> Result<usize, PgError> {
    rows.index_of(col).ok_or_else(|| {
        decode(format!(
            "metric {}: column {col:?} is not in the query result (columns: {})",
            m.name,
            rows.columns().join(", ")
        ))
    })
}

/// A generated name, its help text and the rows that give it.
type RuleGroup = (String, (String, Vec<usize>));

/// The rows of a [`NameRule`] metric grouped by generated name (first row first), each with
/// its help text. Names that are reserved or declared by another metric of the collector
/// are left out.
fn rule_groups<T: Rows + ?Sized>(
    def: &CollectorDef,
    m: &MetricDef,
    rule: &NameRule,
    rows: &T,
) -> Result<Vec<RuleGroup>, PgError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let name_idx = column(m, rows, &rule.column)?;
    let help_idx = rule
        .help_column
        .as_deref()
        .map(|c| column(m, rows, c))
        .transpose()?;
    let declared: Vec<&str> = def.metrics.0.iter().map(|d| d.name.0.as_str()).collect();
    let mut groups: Vec<RuleGroup> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for row in 0..rows.len() {
        let text = rows
            .label(row, name_idx)
            .map_err(|e| decode(format!("metric {}: name column: {e}", m.name)))?;
        let Some(name) = rule.name_for(&text, m.kind) else {
            continue;
        };
        if name == "pg_up" || name.starts_with("pgvigil_") || declared.contains(&name.as_str()) {
            continue;
        }
        if let Some(&g) = index.get(&name) {
            groups[g].1 .1.push(row);
            continue;
        }
        let help = match help_idx {
            Some(i) => rows
                .label(row, i)
                .map_err(|e| decode(format!("metric {}: help column: {e}", m.name)))?,
            None => String::new(),
        };
        let help = if help.trim().is_empty() {
            m.help.clone()
        } else {
            help
        };
        index.insert(name.clone(), groups.len());
        groups.push((name, (help, vec![row])));
    }
    Ok(groups)
}

/// The samples of metric `m` from the rows `which`.
fn samples<T: Rows + ?Sized>(
    def: &CollectorDef,
    m: &MetricDef,
    rows: &T,
    which: impl Iterator<Item = usize>,
    base_labels: &[(Arc<str>, String)],
    database: &str,
) -> Result<Vec<Sample>, PgError> {
    let value_idx = m.value.as_deref().map(|c| column(m, rows, c)).transpose()?;
    let label_idx = m
        .labels
        .iter()
        .map(|l| column(m, rows, &l.0).map(|i| (Arc::<str>::from(l.0.as_str()), i)))
        .collect::<Result<Vec<_>, _>>()?;
    let add_idx = m
        .add
        .iter()
        .map(|t| column(m, rows, &t.column).map(|i| (i, t.scale)))
        .collect::<Result<Vec<_>, _>>()?;
    let filter_idx = m
        .filter
        .iter()
        .map(|(c, want)| column(m, rows, c).map(|i| (i, want.as_str())))
        .collect::<Result<Vec<_>, _>>()?;
    let add_datname = def.scope == Scope::Database && !m.labels.iter().any(|l| l.0 == "datname");
    // Label names are shared by every sample of the metric.
    let datname = add_datname.then(|| Arc::<str>::from("datname"));
    let static_labels: Vec<(Arc<str>, &String)> = m
        .static_labels
        .iter()
        .map(|(k, v)| (Arc::from(k.0.as_str()), v))
        .collect();
    let width =
        base_labels.len() + usize::from(add_datname) + label_idx.len() + static_labels.len();
    let mut out: Vec<Sample> = Vec::new();
    // Duplicate label sets, found by hash without copying every label set; samples
    // with equal hashes are then compared for real.
    let mut seen: HashMap<u64, Vec<usize>> = HashMap::new();
    'rows: for row in which {
        for &(i, want) in &filter_idx {
            let text = rows
                .label(row, i)
                .map_err(|e| decode(format!("metric {}: where column: {e}", m.name)))?;
            if text != want {
                continue 'rows;
            }
        }
        let number = |i: usize, what: &str| {
            rows.number(row, i)
                .map_err(|e| decode(format!("metric {}: {what} column: {e}", m.name)))
        };
        let mut value = match value_idx {
            None => 1.0,
            Some(i) => match number(i, "value")? {
                // An info sample is 1; its value column only says whether it exists.
                Some(_) if m.kind == MetricType::Info => 1.0,
                Some(v) if v.is_finite() => v * m.scale,
                _ => continue,
            },
        };
        for &(i, scale) in &add_idx {
            match number(i, "add")? {
                Some(v) if v.is_finite() => value += v * scale,
                _ => continue 'rows,
            }
        }
        // Exactly as long as needed: a snapshot keeps its samples until the next poll.
        let mut labels = Vec::with_capacity(width);
        labels.extend_from_slice(base_labels);
        if let Some(k) = &datname {
            labels.push((Arc::clone(k), database.to_string()));
        }
        for (name, i) in &label_idx {
            let v = rows
                .label(row, *i)
                .map_err(|e| decode(format!("metric {}: label {name}: {e}", m.name)))?;
            labels.push((name.clone(), v));
        }
        for (k, v) in &static_labels {
            labels.push((Arc::clone(k), (*v).clone()));
        }
        let same = seen.entry(hash_of(&labels)).or_default();
        if same.iter().any(|&i| out[i].labels == labels) {
            return Err(decode(format!(
                "metric {}: two rows give the same label set {:?}; add a label column that tells them apart",
                m.name,
                labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>()
            )));
        }
        same.push(out.len());
        out.push(Sample { labels, value });
    }
    out.shrink_to_fit();
    Ok(out)
}

/// Literal rows for unit tests of anything that reads [`Columns`].
#[cfg(test)]
pub(crate) mod fixtures {
    use crate::postgres::value::Columns;

    /// A row as (column, number, label) triples.
    pub struct Fake(pub Vec<(&'static str, Option<f64>, &'static str)>);

    impl Columns for Fake {
        fn index_of(&self, column: &str) -> Option<usize> {
            self.0.iter().position(|c| c.0 == column)
        }
        fn columns(&self) -> Vec<String> {
            self.0.iter().map(|c| c.0.to_string()).collect()
        }
        fn number(&self, idx: usize) -> Result<Option<f64>, String> {
            Ok(self.0[idx].1)
        }
        fn label(&self, idx: usize) -> Result<String, String> {
            Ok(self.0[idx].2.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::fixtures::Fake;

    fn def(scope: &str) -> CollectorDef {
        serde_yaml_ng::from_str(&format!(
            "name: c\nhelp: h\nscope: {scope}\nqueries: [{{sql: x}}]\nmetrics:\n  - {{name: m, type: gauge, help: h, value: v, labels: [k], static_labels: {{s: z}}}}\n"
        ))
        .unwrap()
    }

    fn base() -> Vec<(Arc<str>, String)> {
        vec![(Arc::from("target"), "t".to_string())]
    }

    #[test]
    fn maps_rows_and_skips_nulls() {
        let rows = vec![
            Fake(vec![("k", None, "a"), ("v", Some(1.5), "")]),
            Fake(vec![("k", None, "b"), ("v", None, "")]),
        ];
        let f = to_families(&def("cluster"), &rows, &base(), "").unwrap();
        assert_eq!(f[0].samples.len(), 1);
        let labels: Vec<String> = f[0].samples[0]
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        assert_eq!(labels, ["target=t", "k=a", "s=z"]);
        assert_eq!(f[0].samples[0].value, 1.5);
    }

    #[test]
    fn a_name_rule_gives_a_family_per_name() {
        let def: CollectorDef = serde_yaml_ng::from_str(
            "name: c\nhelp: h\nqueries: [{sql: x}]\nmetrics:\n  - {name: s_fixed, type: gauge, help: fixed, value: f}\n  - {name_from: n, name_prefix: s_, help_from: d, type: gauge, help: generic, value: v}\n",
        )
        .unwrap();
        let rows = vec![
            Fake(vec![
                ("n", None, "a.b"),
                ("d", None, "About a."),
                ("v", Some(1.0), ""),
                ("f", Some(9.0), ""),
            ]),
            Fake(vec![
                ("n", None, "fixed"),
                ("d", None, ""),
                ("v", Some(2.0), ""),
                ("f", None, ""),
            ]),
            Fake(vec![
                ("n", None, ""),
                ("d", None, ""),
                ("v", Some(3.0), ""),
                ("f", None, ""),
            ]),
            Fake(vec![
                ("n", None, "c"),
                ("d", None, ""),
                ("v", None, ""),
                ("f", None, ""),
            ]),
            Fake(vec![
                ("n", None, "é"),
                ("d", None, ""),
                ("v", Some(4.0), ""),
                ("f", None, ""),
            ]),
            Fake(vec![
                ("n", None, "x_count"),
                ("d", None, ""),
                ("v", Some(5.0), ""),
                ("f", None, ""),
            ]),
        ];
        let f = to_families(&def, &rows, &base(), "").unwrap();
        let got: Vec<(&str, &str, usize)> = f
            .iter()
            .map(|f| (&*f.name, &*f.help, f.samples.len()))
            .collect();
        assert_eq!(
            got,
            [
                ("s_fixed", "fixed", 1),
                // sanitized; help from the column
                ("s_a_b", "About a.", 1),
                // s_fixed is declared: skipped; "" gives no name; NULL value: no sample
                ("s_c", "generic", 0),
                ("s__", "generic", 1),
                // a suffix promtool reserves for summaries and histograms
                ("s_x_count_value", "generic", 1),
            ]
        );
    }

    #[test]
    fn where_scale_and_add_read_show_output() {
        let def: CollectorDef = serde_yaml_ng::from_str(
            "name: c\nhelp: h\nqueries: [{sql: x}]\nmetrics:\n  - {name: wait_seconds, type: gauge, help: h, value: s, add: [{column: us, scale: 0.000001}], labels: [k]}\n  - {name: max_conn, type: gauge, help: h, value: v, where: {k: max}}\n  - {name: ms_seconds_total, type: counter, help: h, value: us, scale: 0.001, labels: [k]}\n",
        )
        .unwrap();
        let rows = vec![
            Fake(vec![
                ("k", None, "max"),
                ("v", Some(100.0), ""),
                ("s", Some(2.0), ""),
                ("us", Some(500_000.0), ""),
            ]),
            Fake(vec![
                ("k", None, "min"),
                ("v", Some(5.0), ""),
                ("s", Some(0.0), ""),
                ("us", None, ""),
            ]),
        ];
        let f = to_families(&def, &rows, &base(), "").unwrap();
        let values = |i: usize| f[i].samples.iter().map(|s| s.value).collect::<Vec<_>>();
        // A NULL term skips the sample, as a NULL value does.
        assert_eq!(values(0), [2.5]);
        assert_eq!(values(1), [100.0], "only the row where k = max");
        assert_eq!(values(2), [500.0]);
    }

    #[test]
    fn database_scope_adds_datname() {
        let rows = vec![Fake(vec![("k", None, "a"), ("v", Some(1.0), "")])];
        let f = to_families(&def("database"), &rows, &base(), "app").unwrap();
        assert!(f[0].samples[0]
            .labels
            .contains(&(Arc::from("datname"), "app".to_string())));
    }

    #[test]
    fn missing_column_and_duplicates_are_decode_errors() {
        let rows = vec![Fake(vec![("k", None, "a")])];
        let e = to_families(&def("cluster"), &rows, &base(), "").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Decode);
        assert!(
            e.message
                .contains("column \"v\" is not in the query result"),
            "{}",
            e.message
        );
        let rows = vec![
            Fake(vec![("k", None, "a"), ("v", Some(1.0), "")]),
            Fake(vec![("k", None, "a"), ("v", Some(2.0), "")]),
        ];
        let e = to_families(&def("cluster"), &rows, &base(), "").unwrap_err();
        assert!(e.message.contains("same label set"), "{}", e.message);
    }
}
