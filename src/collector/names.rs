//! Relation names for cluster-wide views. `pg_locks` and `pg_stat_progress_create_index`
//! are instance-wide, so one query on the main database sees every database's locks and
//! builds, but a relation OID only resolves to a name inside its own database. The visits of
//! a `cache: relation_names` collector (`scope: database`) fill a per-database cache,
//! OID → schema.name; a cluster-scope collector that names each row's database
//! (`per_database: datname`) lists the label columns to resolve through it
//! (`relation_names: [{oid: relid, as: relation}]`). An OID the cache does not know yet (a
//! new table, a database not visited yet) keeps the query's own value, e.g. the OID as text.
//!
//! Pure and synchronous: no I/O, no lock held beyond one call.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::collector::pack::CollectorDef;
use crate::collector::table::Rows;
use crate::postgres::value::Columns;
use crate::postgres::{ErrorKind, PgError};

/// One relation: `schema.name`, and where the name starts.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Name {
    qualified: Box<str>,
    start: usize,
}

/// The relations of one database.
#[derive(Debug, Default)]
pub struct Relations(HashMap<u32, Name>);

impl Relations {
    /// Reads rows with the columns `oid`, `schema` and `name` (the `relation_names`
    /// collector's query).
    pub fn from_rows<R: Columns>(rows: &[R]) -> Result<Relations, String> {
        let Some(first) = rows.first() else {
            return Ok(Relations::default());
        };
        let col = |c: &str| {
            first.index_of(c).ok_or_else(|| {
                format!(
                    "cache relation_names: column {c:?} is not in the query result (columns: {})",
                    first.columns().join(", ")
                )
            })
        };
        let (oid, schema, name) = (col("oid")?, col("schema")?, col("name")?);
        let mut map = HashMap::with_capacity(rows.len());
        for r in rows {
            let Some(o) = r.number(oid)? else { continue };
            let (schema, name) = (r.label(schema)?, r.label(name)?);
            map.insert(
                o as u32,
                Name {
                    start: schema.len() + 1,
                    qualified: format!("{schema}.{name}").into_boxed_str(),
                },
            );
        }
        Ok(Relations(map))
    }

    /// `schema.name` (or the bare name) of `oid`, if known.
    pub fn get(&self, oid: u32, schema: bool) -> Option<&str> {
        let n = self.0.get(&oid)?;
        Some(if schema {
            &n.qualified
        } else {
            &n.qualified[n.start..]
        })
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A target's cache: database name → its relations, each replaced whole by a visit.
#[derive(Debug, Default)]
pub struct NameCache {
    databases: RwLock<HashMap<String, Arc<Relations>>>,
}

impl NameCache {
    pub fn put(&self, database: &str, relations: Relations) {
        let mut d = self.databases.write().unwrap_or_else(|e| e.into_inner());
        d.insert(database.to_string(), Arc::new(relations));
    }

    /// Forgets databases that are no longer monitored (dropped, or filtered out).
    pub fn retain(&self, keep: &[String]) {
        let mut d = self.databases.write().unwrap_or_else(|e| e.into_inner());
        d.retain(|db, _| keep.contains(db));
    }

    fn get(&self, database: &str) -> Option<Arc<Relations>> {
        let d = self.databases.read().unwrap_or_else(|e| e.into_inner());
        d.get(database).cloned()
    }
}

/// Rows as a `per_database` collector exports them: rows of databases outside the target's
/// filter left out, `relation_names` columns resolved. Other columns read through.
pub struct Resolved<'a, T: ?Sized> {
    inner: &'a T,
    /// The inner rows kept, in order.
    keep: Vec<usize>,
    /// (kept row, column) → resolved name.
    names: HashMap<(usize, usize), String>,
}

/// Applies `def.per_database` and `def.relation_names` to `rows`. `monitored` says whether
/// a database is one the target monitors; `cache` is `None` where no cache exists (every
/// column then keeps the query's value).
pub fn resolve<'a, T: Rows + ?Sized>(
    def: &CollectorDef,
    rows: &'a T,
    cache: Option<&NameCache>,
    monitored: &dyn Fn(&str) -> bool,
) -> Result<Resolved<'a, T>, PgError> {
    let mut out = Resolved {
        inner: rows,
        keep: Vec::with_capacity(rows.len()),
        names: HashMap::new(),
    };
    let Some(datname) = &def.per_database else {
        out.keep.extend(0..rows.len());
        return Ok(out);
    };
    if rows.is_empty() {
        return Ok(out);
    }
    let decode = |m: String| PgError::new(ErrorKind::Decode, m);
    let find = |c: &str| {
        rows.index_of(c).ok_or_else(|| {
            decode(format!(
                "collector {}: column {c:?} is not in the query result (columns: {})",
                def.name,
                rows.columns().join(", ")
            ))
        })
    };
    let db_idx = find(datname)?;
    let lookups = def
        .relation_names
        .iter()
        .map(|r| Ok((find(&r.oid)?, find(&r.column)?, r.schema)))
        .collect::<Result<Vec<_>, PgError>>()?;
    let mut last: Option<(String, Option<Arc<Relations>>)> = None;
    for row in 0..rows.len() {
        let db = rows.label(row, db_idx).map_err(decode)?;
        if !monitored(&db) {
            continue;
        }
        let kept = out.keep.len();
        out.keep.push(row);
        if lookups.is_empty() {
            continue;
        }
        // Rows come grouped by database, mostly: look each database up once per run.
        if last.as_ref().is_none_or(|(d, _)| *d != db) {
            let relations = cache.and_then(|c| c.get(&db));
            last = Some((db, relations));
        }
        let Some((_, Some(relations))) = &last else {
            continue;
        };
        for &(oid_idx, col_idx, schema) in &lookups {
            let oid = rows.number(row, oid_idx).map_err(decode)?;
            let Some(oid) = oid.filter(|o| *o > 0.0 && *o <= f64::from(u32::MAX)) else {
                continue;
            };
            if let Some(name) = relations.get(oid as u32, schema) {
                out.names.insert((kept, col_idx), name.to_string());
            }
        }
    }
    Ok(out)
}

impl<T: Rows + ?Sized> Rows for Resolved<'_, T> {
    fn len(&self) -> usize {
        self.keep.len()
    }
    fn index_of(&self, column: &str) -> Option<usize> {
        self.inner.index_of(column)
    }
    fn columns(&self) -> Vec<String> {
        self.inner.columns()
    }
    fn number(&self, row: usize, idx: usize) -> Result<Option<f64>, String> {
        self.inner.number(self.keep[row], idx)
    }
    fn label(&self, row: usize, idx: usize) -> Result<String, String> {
        match self.names.get(&(row, idx)) {
            Some(name) => Ok(name.clone()),
            None => self.inner.label(self.keep[row], idx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::rows::fixtures::Fake;

    fn def() -> CollectorDef {
        serde_yaml_ng::from_str(
            "name: c\nhelp: h\nper_database: datname\nrelation_names: [{oid: relid, as: relation}, {oid: index_relid, as: index, schema: false}]\nqueries: [{sql: x}]\nmetrics:\n  - {name: m, type: gauge, help: h, value: v, labels: [datname, relation, index]}\n",
        )
        .unwrap()
    }

    fn row(db: &'static str, relid: Option<f64>, rel: &'static str, idx: Option<f64>) -> Fake {
        Fake(vec![
            ("datname", None, db),
            ("relid", relid, ""),
            ("relation", None, rel),
            ("index_relid", idx, ""),
            ("index", None, "from_sql"),
            ("v", Some(1.0), ""),
        ])
    }

    fn names(rows: &[(f64, &'static str, &'static str)]) -> Relations {
        let rows: Vec<Fake> = rows
            .iter()
            .map(|(o, s, n)| {
                Fake(vec![
                    ("oid", Some(*o), ""),
                    ("schema", None, s),
                    ("name", None, n),
                ])
            })
            .collect();
        Relations::from_rows(&rows).unwrap()
    }

    #[test]
    fn resolves_in_the_rows_own_database_and_falls_back_to_the_query_value() {
        let cache = NameCache::default();
        cache.put(
            "db57",
            names(&[(16384.0, "public", "t"), (16390.0, "public", "t_idx")]),
        );
        cache.put("other", names(&[(16384.0, "public", "elsewhere")]));
        let rows = vec![
            row("db57", Some(16384.0), "16384", Some(16390.0)),
            row("db58", Some(16384.0), "16384", None),
            row("db57", Some(99999.0), "99999", Some(0.0)),
            row("template1", Some(16384.0), "16384", None),
            row("db57", None, "", None),
        ];
        let monitored = |d: &str| !d.starts_with("template");
        let r = resolve(&def(), rows.as_slice(), Some(&cache), &monitored).unwrap();
        assert_eq!(r.len(), 4, "template1 is not monitored");
        let (rel, idx) = (
            r.index_of("relation").unwrap(),
            r.index_of("index").unwrap(),
        );
        let got: Vec<(String, String)> = (0..r.len())
            .map(|i| (r.label(i, rel).unwrap(), r.label(i, idx).unwrap()))
            .collect();
        assert_eq!(
            got,
            [
                ("public.t".into(), "t_idx".into()),
                ("16384".into(), "from_sql".into()),
                ("99999".into(), "from_sql".into()),
                (String::new(), "from_sql".into()),
            ]
        );
        cache.retain(&["other".to_string()]);
        let r = resolve(&def(), rows.as_slice(), Some(&cache), &monitored).unwrap();
        assert_eq!(r.label(0, rel).unwrap(), "16384", "db57 forgotten");
    }
}
