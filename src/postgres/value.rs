//! Row values → sample values and label strings.
//!
//! Rows come typed over the extended protocol (`tokio_postgres::Row`, binary values) or
//! as text over the simple protocol ([`TextRow`], PgBouncer's console); [`QueryRow`] is
//! either, and both read the same way through [`Columns`]. Text values are numbers as
//! the pack's metric declares them: a value column must hold a number.
//!
//! A metric value may be any numeric SQL type, boolean (1/0), interval (seconds) or a
//! timestamp (Unix seconds); NULL means "no sample". Labels are text; NULL becomes "".
//! Binary formats: <https://github.com/postgres/postgres/blob/master/src/backend/utils/adt/numeric.c>
//! (`numeric_send`), `interval_send`, `timestamp_send`.

use std::error::Error;

use tokio_postgres::types::{FromSql, Type};

type BoxError = Box<dyn Error + Sync + Send>;

/// A sample value read from a column; `None` for SQL NULL.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SqlNumber(pub Option<f64>);

/// Unix epoch minus PostgreSQL's epoch (2000-01-01), in seconds.
const PG_EPOCH_OFFSET: f64 = 946_684_800.0;

fn be_i16(b: &[u8], at: usize) -> Result<i16, BoxError> {
    b.get(at..at + 2)
        .map(|s| i16::from_be_bytes([s[0], s[1]]))
        .ok_or_else(|| "truncated value".into())
}

fn be_i32(b: &[u8], at: usize) -> Result<i32, BoxError> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(i32::from_be_bytes)
        .ok_or_else(|| "truncated value".into())
}

fn be_i64(b: &[u8], at: usize) -> Result<i64, BoxError> {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(i64::from_be_bytes)
        .ok_or_else(|| "truncated value".into())
}

/// Decodes PostgreSQL's binary `numeric` (base-10000 digits) to f64.
pub fn numeric_to_f64(raw: &[u8]) -> Result<f64, BoxError> {
    let ndigits = be_i16(raw, 0)?;
    let weight = be_i16(raw, 2)?;
    let sign = be_i16(raw, 4)? as u16;
    match sign {
        0xC000 => return Ok(f64::NAN),
        0xD000 => return Ok(f64::INFINITY),
        0xF000 => return Ok(f64::NEG_INFINITY),
        _ => {}
    }
    let mut value = 0.0f64;
    for i in 0..ndigits.max(0) as usize {
        let digit = be_i16(raw, 8 + 2 * i)? as f64;
        value += digit * 10_000f64.powi(weight as i32 - i as i32);
    }
    Ok(if sign == 0x4000 { -value } else { value })
}

impl<'a> FromSql<'a> for SqlNumber {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        let v = match *ty {
            Type::BOOL => match raw.first() {
                Some(0) => 0.0,
                Some(_) => 1.0,
                None => return Err("truncated bool".into()),
            },
            Type::INT2 => be_i16(raw, 0)? as f64,
            Type::INT4 => be_i32(raw, 0)? as f64,
            Type::OID | Type::XID => be_i32(raw, 0)? as u32 as f64,
            Type::INT8 => be_i64(raw, 0)? as f64,
            Type::FLOAT4 => f32::from_sql(ty, raw)? as f64,
            Type::FLOAT8 => f64::from_sql(ty, raw)?,
            Type::NUMERIC => numeric_to_f64(raw)?,
            Type::INTERVAL => {
                let micros = be_i64(raw, 0)? as f64;
                let days = be_i32(raw, 8)? as f64;
                let months = be_i32(raw, 12)? as f64;
                micros / 1e6 + days * 86_400.0 + months * 30.0 * 86_400.0
            }
            Type::TIMESTAMP | Type::TIMESTAMPTZ => be_i64(raw, 0)? as f64 / 1e6 + PG_EPOCH_OFFSET,
            _ => {
                // Text that holds a number (e.g. current_setting()) is accepted too.
                let text = std::str::from_utf8(raw)?;
                text.trim().parse::<f64>().map_err(|_| {
                    format!("type {ty} is not a number; cast the column to a numeric type")
                })?
            }
        };
        Ok(SqlNumber(Some(v)))
    }

    fn from_sql_null(_: &Type) -> Result<Self, BoxError> {
        Ok(SqlNumber(None))
    }

    fn accepts(ty: &Type) -> bool {
        matches!(
            *ty,
            Type::BOOL
                | Type::INT2
                | Type::INT4
                | Type::INT8
                | Type::OID
                | Type::XID
                | Type::FLOAT4
                | Type::FLOAT8
                | Type::NUMERIC
                | Type::INTERVAL
                | Type::TIMESTAMP
                | Type::TIMESTAMPTZ
                | Type::TEXT
                | Type::VARCHAR
                | Type::NAME
                | Type::BPCHAR
                | Type::UNKNOWN
        )
    }
}

/// A label value read from a column; NULL becomes "".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlLabel(pub String);

impl<'a> FromSql<'a> for SqlLabel {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        let s = match *ty {
            Type::BOOL => (raw.first().copied().unwrap_or(0) != 0).to_string(),
            Type::INT2 => be_i16(raw, 0)?.to_string(),
            Type::INT4 => be_i32(raw, 0)?.to_string(),
            Type::OID | Type::XID => (be_i32(raw, 0)? as u32).to_string(),
            Type::INT8 => be_i64(raw, 0)?.to_string(),
            Type::FLOAT4 | Type::FLOAT8 | Type::NUMERIC => {
                let v = SqlNumber::from_sql(ty, raw)?.0.unwrap_or(f64::NAN);
                v.to_string()
            }
            _ => String::from_utf8_lossy(raw).into_owned(),
        };
        Ok(SqlLabel(s))
    }

    fn from_sql_null(_: &Type) -> Result<Self, BoxError> {
        Ok(SqlLabel(String::new()))
    }

    fn accepts(ty: &Type) -> bool {
        matches!(
            *ty,
            Type::BOOL
                | Type::INT2
                | Type::INT4
                | Type::INT8
                | Type::OID
                | Type::XID
                | Type::FLOAT4
                | Type::FLOAT8
                | Type::NUMERIC
                | Type::TEXT
                | Type::VARCHAR
                | Type::NAME
                | Type::BPCHAR
                | Type::CHAR
                | Type::UNKNOWN
        )
    }
}

/// Column access abstracted over `tokio_postgres::Row`, so the mapping can be unit tested.
pub trait Columns {
    fn index_of(&self, column: &str) -> Option<usize>;
    fn columns(&self) -> Vec<String>;
    fn number(&self, idx: usize) -> Result<Option<f64>, String>;
    fn label(&self, idx: usize) -> Result<String, String>;
    /// Calls `f` with the label of column `idx` ([`Columns::label`]'s text), borrowed
    /// where the row holds it as text: no allocation per value for steps that read the
    /// keys of thousands of rows.
    fn with_label<T>(&self, idx: usize, f: impl FnOnce(&str) -> T) -> Result<T, String> {
        self.label(idx).map(|l| f(&l))
    }
    /// Column `idx` as an exact 64-bit integer (`None` for NULL or an empty text): for
    /// identifiers a `f64` would round, such as a fingerprint handed back to the server.
    fn integer(&self, idx: usize) -> Result<Option<i64>, String> {
        self.with_label(idx, integer_of)?
    }
}

fn integer_of(text: &str) -> Result<Option<i64>, String> {
    match text.trim() {
        "" => Ok(None),
        t => t
            .parse::<i64>()
            .map(Some)
            .map_err(|_| format!("{t:?} is not an integer")),
    }
}

impl Columns for tokio_postgres::Row {
    fn index_of(&self, column: &str) -> Option<usize> {
        self.columns().iter().position(|c| c.name() == column)
    }
    fn columns(&self) -> Vec<String> {
        tokio_postgres::Row::columns(self)
            .iter()
            .map(|c| c.name().to_string())
            .collect()
    }
    fn number(&self, idx: usize) -> Result<Option<f64>, String> {
        self.try_get::<_, SqlNumber>(idx)
            .map(|n| n.0)
            .map_err(|e| e.to_string())
    }
    fn label(&self, idx: usize) -> Result<String, String> {
        self.try_get::<_, SqlLabel>(idx)
            .map(|l| l.0)
            .map_err(|e| e.to_string())
    }
    fn integer(&self, idx: usize) -> Result<Option<i64>, String> {
        match self.try_get::<_, Option<i64>>(idx) {
            Ok(n) => Ok(n),
            Err(_) => self.with_label(idx, integer_of)?,
        }
    }
    fn with_label<T>(&self, idx: usize, f: impl FnOnce(&str) -> T) -> Result<T, String> {
        // Text columns as they are (valid UTF-8: the same text `label` gives); any other
        // type, or invalid UTF-8, through `label`.
        match self.try_get::<_, Option<&str>>(idx) {
            Ok(text) => Ok(f(text.unwrap_or_default())),
            Err(_) => self.label(idx).map(|l| f(&l)),
        }
    }
}

/// A row of the simple query protocol: every value is text (or NULL).
#[derive(Debug, Clone, PartialEq)]
pub struct TextRow {
    /// The statement's column names, shared by its rows.
    columns: std::sync::Arc<[String]>,
    values: Vec<Option<String>>,
}

impl TextRow {
    pub fn new(columns: std::sync::Arc<[String]>, values: Vec<Option<String>>) -> TextRow {
        TextRow { columns, values }
    }

    /// The text of column `idx`; `None` for NULL or a column that does not exist.
    pub fn text(&self, idx: usize) -> Option<&str> {
        self.values.get(idx)?.as_deref()
    }
}

impl Columns for TextRow {
    fn index_of(&self, column: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == column)
    }
    fn columns(&self) -> Vec<String> {
        self.columns.to_vec()
    }
    /// NULL or an empty text is no sample; anything else must parse as a number.
    fn number(&self, idx: usize) -> Result<Option<f64>, String> {
        match self.text(idx).map(str::trim) {
            None | Some("") => Ok(None),
            Some(t) => t
                .parse::<f64>()
                .map(Some)
                .map_err(|_| format!("{t:?} is not a number")),
        }
    }
    fn label(&self, idx: usize) -> Result<String, String> {
        Ok(self.text(idx).unwrap_or_default().to_string())
    }
}

/// A row as a query returned it: typed (extended protocol) or text (simple protocol).
#[derive(Debug)]
pub enum QueryRow {
    Typed(tokio_postgres::Row),
    Text(TextRow),
}

impl Columns for QueryRow {
    fn index_of(&self, column: &str) -> Option<usize> {
        match self {
            QueryRow::Typed(r) => r.index_of(column),
            QueryRow::Text(r) => r.index_of(column),
        }
    }
    fn columns(&self) -> Vec<String> {
        match self {
            QueryRow::Typed(r) => Columns::columns(r),
            QueryRow::Text(r) => r.columns(),
        }
    }
    fn number(&self, idx: usize) -> Result<Option<f64>, String> {
        match self {
            QueryRow::Typed(r) => r.number(idx),
            QueryRow::Text(r) => r.number(idx),
        }
    }
    fn label(&self, idx: usize) -> Result<String, String> {
        match self {
            QueryRow::Typed(r) => r.label(idx),
            QueryRow::Text(r) => r.label(idx),
        }
    }
    fn with_label<T>(&self, idx: usize, f: impl FnOnce(&str) -> T) -> Result<T, String> {
        match self {
            QueryRow::Typed(r) => r.with_label(idx, f),
            QueryRow::Text(r) => Ok(f(r.text(idx).unwrap_or_default())),
        }
    }
    fn integer(&self, idx: usize) -> Result<Option<i64>, String> {
        match self {
            QueryRow::Typed(r) => r.integer(idx),
            QueryRow::Text(r) => r.integer(idx),
        }
    }
}

impl<T: Columns> Columns for &T {
    fn index_of(&self, column: &str) -> Option<usize> {
        (**self).index_of(column)
    }
    fn columns(&self) -> Vec<String> {
        (**self).columns()
    }
    fn number(&self, idx: usize) -> Result<Option<f64>, String> {
        (**self).number(idx)
    }
    fn label(&self, idx: usize) -> Result<String, String> {
        (**self).label(idx)
    }
    fn with_label<U>(&self, idx: usize, f: impl FnOnce(&str) -> U) -> Result<U, String> {
        (**self).with_label(idx, f)
    }
    fn integer(&self, idx: usize) -> Result<Option<i64>, String> {
        (**self).integer(idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric(ndigits: i16, weight: i16, sign: u16, digits: &[i16]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&ndigits.to_be_bytes());
        v.extend_from_slice(&weight.to_be_bytes());
        v.extend_from_slice(&sign.to_be_bytes());
        v.extend_from_slice(&0u16.to_be_bytes());
        for d in digits {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v
    }

    #[test]
    fn numeric_binary() {
        // 12345.678 = [1, 2345, 6780] weight 1
        let raw = numeric(3, 1, 0, &[1, 2345, 6780]);
        assert!((numeric_to_f64(&raw).unwrap() - 12345.678).abs() < 1e-9);
        let neg = numeric(1, -1, 0x4000, &[5000]);
        assert_eq!(numeric_to_f64(&neg).unwrap(), -0.5);
        assert_eq!(numeric_to_f64(&numeric(0, 0, 0, &[])).unwrap(), 0.0);
        assert!(numeric_to_f64(&numeric(0, 0, 0xC000, &[]))
            .unwrap()
            .is_nan());
        assert!(numeric_to_f64(&[0, 3]).is_err());
    }

    #[test]
    fn text_rows_read_numbers_and_labels() {
        let cols: std::sync::Arc<[String]> = vec!["database".into(), "cl_waiting".into()].into();
        let row = TextRow::new(cols, vec![Some("app".into()), Some(" 4 ".into())]);
        assert_eq!(row.index_of("cl_waiting"), Some(1));
        assert_eq!(row.number(1), Ok(Some(4.0)));
        assert_eq!(row.label(0).unwrap(), "app");
        assert!(row.number(0).unwrap_err().contains("not a number"));
        let null = TextRow::new(vec!["v".to_string()].into(), vec![None]);
        assert_eq!(null.number(0), Ok(None));
        assert_eq!(null.label(0).unwrap(), "");
    }

    #[test]
    fn interval_and_bool() {
        let mut raw = Vec::new();
        raw.extend_from_slice(&1_500_000i64.to_be_bytes());
        raw.extend_from_slice(&1i32.to_be_bytes());
        raw.extend_from_slice(&0i32.to_be_bytes());
        assert_eq!(
            SqlNumber::from_sql(&Type::INTERVAL, &raw).unwrap().0,
            Some(86_401.5)
        );
        assert_eq!(SqlNumber::from_sql(&Type::BOOL, &[1]).unwrap().0, Some(1.0));
        assert_eq!(SqlNumber::from_sql_null(&Type::INT8).unwrap().0, None);
        assert!(SqlNumber::from_sql(&Type::TEXT, b"abc").is_err());
    }
}
