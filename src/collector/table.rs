//! What the metric mapping reads: a collector's rows, or the table a Rust step made of them.
//!
//! A step never builds metrics. It returns a [`Table`]: the query's rows it keeps (by
//! index, without copying them), each with the columns it computed, plus rows it made
//! itself (e.g. the `queryid="other"` sums). The pack's metrics then map that table like
//! any query result, so every exported metric is declared, with its help text, in YAML.

use crate::postgres::value::Columns;

/// Rows seen column by column, for [`crate::collector::rows::to_families`].
pub trait Rows {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The index of `column`, the same for every row.
    fn index_of(&self, column: &str) -> Option<usize>;
    /// Every column name, for error messages.
    fn columns(&self) -> Vec<String>;
    /// Row `row`'s number at column `idx`; `None` for NULL.
    fn number(&self, row: usize, idx: usize) -> Result<Option<f64>, String>;
    /// Row `row`'s label at column `idx`; NULL is "".
    fn label(&self, row: usize, idx: usize) -> Result<String, String>;
}

/// A query result as it came: every row has the first row's columns.
impl<R: Columns> Rows for [R] {
    fn len(&self) -> usize {
        <[R]>::len(self)
    }
    fn index_of(&self, column: &str) -> Option<usize> {
        self.first()?.index_of(column)
    }
    fn columns(&self) -> Vec<String> {
        self.first().map(Columns::columns).unwrap_or_default()
    }
    fn number(&self, row: usize, idx: usize) -> Result<Option<f64>, String> {
        self[row].number(idx)
    }
    fn label(&self, row: usize, idx: usize) -> Result<String, String> {
        self[row].label(idx)
    }
}

impl<R: Columns> Rows for Vec<R> {
    fn len(&self) -> usize {
        self.as_slice().len()
    }
    fn index_of(&self, column: &str) -> Option<usize> {
        self.as_slice().index_of(column)
    }
    fn columns(&self) -> Vec<String> {
        self.as_slice().columns()
    }
    fn number(&self, row: usize, idx: usize) -> Result<Option<f64>, String> {
        self[row].number(idx)
    }
    fn label(&self, row: usize, idx: usize) -> Result<String, String> {
        self[row].label(idx)
    }
}

/// One value a step computed.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Cell {
    /// No sample for a value column; "" for a label.
    #[default]
    Null,
    Number(f64),
    Text(String),
}

impl From<Option<f64>> for Cell {
    fn from(v: Option<f64>) -> Cell {
        v.map_or(Cell::Null, Cell::Number)
    }
}

/// A row of a [`Table`].
#[derive(Debug, Clone)]
enum TableRow {
    /// A query row kept as it is, with its computed columns (in [`Table`]'s order).
    Query { row: usize, computed: Vec<Cell> },
    /// A row the step made: cells by column index; every other column is NULL.
    Made(Vec<(usize, Cell)>),
}

/// The query's rows a step keeps, their computed columns, and the rows it made. The
/// columns are the query's, then the computed ones; a computed column hides a query
/// column of the same name (e.g. masked `query` text over the raw one).
pub struct Table<'r, R> {
    base: &'r [R],
    base_width: usize,
    computed: Vec<String>,
    rows: Vec<TableRow>,
}

impl<'r, R: Columns> Table<'r, R> {
    /// An empty table over `base` whose rows will carry the `computed` columns.
    pub fn new<S: Into<String>>(base: &'r [R], computed: impl IntoIterator<Item = S>) -> Self {
        Table {
            base,
            base_width: base.first().map_or(0, |r| r.columns().len()),
            computed: computed.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// Keeps query row `row`, with one cell per computed column (missing ones are NULL).
    pub fn keep(&mut self, row: usize, mut computed: Vec<Cell>) {
        computed.resize(self.computed.len(), Cell::Null);
        self.rows.push(TableRow::Query { row, computed });
    }

    /// Adds a row of the step's own: `(column name, value)`; other columns are NULL.
    /// A name that is not a column of the table is an error (a typo, or a query that
    /// lost a column).
    pub fn make(&mut self, cells: Vec<(&str, Cell)>) -> Result<(), String> {
        let cells = cells
            .into_iter()
            .map(|(name, cell)| {
                self.index_of(name)
                    .map(|i| (i, cell))
                    .ok_or_else(|| format!("column {name:?} is not in the table"))
            })
            .collect::<Result<_, _>>()?;
        self.rows.push(TableRow::Made(cells));
        Ok(())
    }

    fn cell(&self, row: usize, idx: usize) -> Option<&Cell> {
        match &self.rows[row] {
            TableRow::Query { computed, .. } => computed.get(idx.checked_sub(self.base_width)?),
            TableRow::Made(cells) => cells.iter().find(|(i, _)| *i == idx).map(|(_, c)| c),
        }
    }
}

impl<R: Columns> Rows for Table<'_, R> {
    fn len(&self) -> usize {
        self.rows.len()
    }
    fn index_of(&self, column: &str) -> Option<usize> {
        match self.computed.iter().position(|c| *c == column) {
            Some(j) => Some(self.base_width + j),
            None => self.base.first()?.index_of(column),
        }
    }
    fn columns(&self) -> Vec<String> {
        let mut names = self.base.columns();
        names.extend(self.computed.iter().cloned());
        names
    }
    fn number(&self, row: usize, idx: usize) -> Result<Option<f64>, String> {
        match (&self.rows[row], idx < self.base_width) {
            (TableRow::Query { row, .. }, true) => self.base[*row].number(idx),
            _ => match self.cell(row, idx) {
                None | Some(Cell::Null) => Ok(None),
                Some(Cell::Number(v)) => Ok(Some(*v)),
                Some(Cell::Text(t)) => Err(format!("computed value {t:?} is not a number")),
            },
        }
    }
    fn label(&self, row: usize, idx: usize) -> Result<String, String> {
        match (&self.rows[row], idx < self.base_width) {
            (TableRow::Query { row, .. }, true) => self.base[*row].label(idx),
            _ => Ok(match self.cell(row, idx) {
                None | Some(Cell::Null) => String::new(),
                Some(Cell::Number(v)) => v.to_string(),
                Some(Cell::Text(t)) => t.clone(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::rows::fixtures::Fake;

    #[test]
    fn computed_columns_follow_and_hide_query_columns() {
        let base = vec![
            Fake(vec![("q", None, "raw 1"), ("n", Some(1.0), "")]),
            Fake(vec![("q", None, "raw 2"), ("n", Some(2.0), "")]),
        ];
        let mut t = Table::new(&base, ["q", "extra"]);
        t.keep(1, vec![Cell::Text("masked".into()), Cell::Number(7.0)]);
        t.make(vec![
            ("n", Cell::Number(3.0)),
            ("q", Cell::Text("other".into())),
        ])
        .unwrap();
        assert_eq!(t.len(), 2);
        let (q, n, extra) = (
            t.index_of("q").unwrap(),
            t.index_of("n").unwrap(),
            t.index_of("extra").unwrap(),
        );
        assert_eq!(
            t.label(0, q).unwrap(),
            "masked",
            "computed q hides the query's q"
        );
        assert_eq!(t.number(0, n).unwrap(), Some(2.0), "kept row 1");
        assert_eq!(t.number(0, extra).unwrap(), Some(7.0));
        assert_eq!(t.label(1, q).unwrap(), "other");
        assert_eq!(t.number(1, n).unwrap(), Some(3.0));
        assert_eq!(t.number(1, extra).unwrap(), None, "unset cells are NULL");
        assert!(t.make(vec![("nope", Cell::Null)]).is_err());
    }
}
