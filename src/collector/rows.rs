//! Rows → metric families, following a collector's metric definitions. Pure: no I/O, so
//! it is tested with literal rows-as-columns.

use std::collections::HashMap;
use std::sync::Arc;

use crate::collector::pack::{CollectorDef, Scope};
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
/// already take it from a column. A NULL or non-finite value skips that sample.
pub fn to_families<T: Rows + ?Sized>(
    def: &CollectorDef,
    rows: &T,
    base_labels: &[(Arc<str>, String)],
    database: &str,
) -> Result<Vec<Family>, PgError> {
    let decode = |msg: String| PgError::new(ErrorKind::Decode, msg);
    let mut families = Vec::with_capacity(def.metrics.0.len());
    for m in &def.metrics.0 {
        let mut family = Family {
            name: Arc::from(m.name.0.as_str()),
            help: Arc::from(m.help.as_str()),
            kind: m.kind,
            samples: Vec::with_capacity(rows.len()),
        };
        if rows.is_empty() {
            families.push(family);
            continue;
        }
        let find = |col: &str| {
            rows.index_of(col).ok_or_else(|| {
                decode(format!(
                    "metric {}: column {col:?} is not in the query result (columns: {})",
                    m.name,
                    rows.columns().join(", ")
                ))
            })
        };
        let value_idx = m.value.as_deref().map(find).transpose()?;
        let label_idx = m
            .labels
            .iter()
            .map(|l| find(&l.0).map(|i| (Arc::<str>::from(l.0.as_str()), i)))
            .collect::<Result<Vec<_>, _>>()?;
        let add_datname =
            def.scope == Scope::Database && !m.labels.iter().any(|l| l.0 == "datname");
        // Duplicate label sets, found by hash without copying every label set; samples
        // with equal hashes are then compared for real.
        let mut seen: HashMap<u64, Vec<usize>> = HashMap::with_capacity(rows.len());
        for row in 0..rows.len() {
            let value = match value_idx {
                None => 1.0,
                Some(i) => match rows
                    .number(row, i)
                    .map_err(|e| decode(format!("metric {}: value column: {e}", m.name)))?
                {
                    // An info sample is 1; its value column only says whether it exists.
                    Some(_) if m.kind == MetricType::Info => 1.0,
                    Some(v) if v.is_finite() => v,
                    _ => continue,
                },
            };
            let mut labels = base_labels.to_vec();
            if add_datname {
                labels.push((Arc::from("datname"), database.to_string()));
            }
            for (name, i) in &label_idx {
                let v = rows
                    .label(row, *i)
                    .map_err(|e| decode(format!("metric {}: label {name}: {e}", m.name)))?;
                labels.push((name.clone(), v));
            }
            for (k, v) in &m.static_labels {
                labels.push((Arc::from(k.0.as_str()), v.clone()));
            }
            let same = seen.entry(hash_of(&labels)).or_default();
            if same.iter().any(|&i| family.samples[i].labels == labels) {
                return Err(decode(format!(
                    "metric {}: two rows give the same label set {:?}; add a label column that tells them apart",
                    m.name,
                    labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>()
                )));
            }
            same.push(family.samples.len());
            family.samples.push(Sample { labels, value });
        }
        families.push(family);
    }
    Ok(families)
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
