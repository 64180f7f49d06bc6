//! W3C trace context carried in SQL: sqlcommenter/marginalia comments
//! (`/*traceparent='00-<trace>-<span>-<flags>',tracestate='…'*/`) or, for drivers that put
//! it there, `application_name`. Pure parsing; never panics on any input.
//!
//! Rules (<https://www.w3.org/TR/trace-context/#traceparent-header>): lower-case hex only;
//! version `ff` is invalid; version `00` has exactly four fields; a higher version may
//! carry more fields after the flags; all-zero trace or span ids are invalid.
//! sqlcommenter values are URL-encoded and may escape `'` as `\'`.

use crate::sql::sql_comments;

/// A parent context read from the SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
    /// The raw `tracestate` value, if one came with it.
    pub tracestate: Option<String>,
}

fn hex_bytes<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Parses a `traceparent` value.
pub fn parse_traceparent(value: &str) -> Option<Parent> {
    let v = value.trim();
    let mut parts = v.split('-');
    let version = hex_bytes::<1>(parts.next()?)?[0];
    if version == 0xff {
        return None;
    }
    let trace_id = hex_bytes::<16>(parts.next()?)?;
    let span_id = hex_bytes::<8>(parts.next()?)?;
    let flags = hex_bytes::<1>(parts.next()?)?[0];
    if version == 0 && parts.next().is_some() {
        return None;
    }
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(Parent {
        trace_id,
        span_id,
        sampled: flags & 1 == 1,
        tracestate: None,
    })
}

/// `%XX` decoding (sqlcommenter encodes values); invalid escapes are kept as they are.
fn url_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `key='value'` pairs of one sqlcommenter comment (keys and values URL-decoded).
fn pairs(comment: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = comment.trim();
    while !rest.is_empty() {
        let Some(eq) = rest.find('=') else { break };
        let key = url_decode(rest[..eq].trim().trim_start_matches(','));
        rest = rest[eq + 1..].trim_start();
        let value;
        if let Some(body) = rest.strip_prefix('\'') {
            // Up to the next quote not escaped with a backslash.
            let mut end = None;
            let mut escaped = false;
            for (i, c) in body.char_indices() {
                match c {
                    '\\' if !escaped => escaped = true,
                    '\'' if !escaped => {
                        end = Some(i);
                        break;
                    }
                    _ => escaped = false,
                }
            }
            let Some(end) = end else { break };
            value = body[..end].replace("\\'", "'");
            rest = body[end + 1..].trim_start();
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            value = rest[..end].trim().to_string();
            rest = &rest[end..];
        }
        out.push((key.trim().to_string(), url_decode(&value)));
        rest = rest.trim_start().trim_start_matches(',').trim_start();
    }
    out
}

/// The parent context from the first comment (outside string literals) that carries a
/// valid `traceparent`, with its `tracestate` if present.
pub fn from_sql(sql: &str) -> Option<Parent> {
    for c in sql_comments(sql) {
        let kv = pairs(c);
        let parent = kv
            .iter()
            .filter(|(k, _)| k == "traceparent")
            .find_map(|(_, v)| parse_traceparent(v));
        if let Some(mut p) = parent {
            p.tracestate = kv
                .iter()
                .find(|(k, _)| k == "tracestate")
                .map(|(_, v)| v.clone());
            return Some(p);
        }
    }
    None
}

/// A `traceparent` somewhere in `application_name`: the whole value, a
/// `traceparent=…` pair, or sqlcommenter style.
pub fn from_application_name(app: &str) -> Option<Parent> {
    if let Some(p) = parse_traceparent(app) {
        return Some(p);
    }
    if let Some(p) = pairs(app)
        .iter()
        .filter(|(k, _)| k == "traceparent")
        .find_map(|(_, v)| parse_traceparent(v))
    {
        return Some(p);
    }
    // Last resort: a 55-character version-00 traceparent anywhere in the text.
    let bytes = app.as_bytes();
    (0..bytes.len().saturating_sub(54))
        .filter(|&i| {
            bytes[i] == b'0' && bytes.get(i + 1) == Some(&b'0') && bytes.get(i + 2) == Some(&b'-')
        })
        .find_map(|i| app.get(i..i + 55).and_then(parse_traceparent))
}

/// The comment wins over `application_name` when both carry a context.
pub fn parent_of(query: &str, application_name: &str) -> Option<Parent> {
    from_sql(query).or_else(|| from_application_name(application_name))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const S: &str = "00f067aa0ba902b7";

    fn tp(flags: &str) -> String {
        format!("00-{T}-{S}-{flags}")
    }

    #[test]
    fn valid_traceparent() {
        let p = parse_traceparent(&tp("01")).unwrap();
        assert_eq!(p.trace_id[0], 0x4b);
        assert_eq!(p.span_id[7], 0xb7);
        assert!(p.sampled);
        assert!(!parse_traceparent(&tp("00")).unwrap().sampled);
    }

    #[test]
    fn invalid_traceparents_are_ignored() {
        assert!(
            parse_traceparent(&tp("01").to_uppercase()).is_none(),
            "uppercase hex"
        );
        assert!(
            parse_traceparent(&format!("ff-{T}-{S}-01")).is_none(),
            "version ff"
        );
        assert!(parse_traceparent(&format!("00-{}-{S}-01", "0".repeat(32))).is_none());
        assert!(parse_traceparent(&format!("00-{T}-{}-01", "0".repeat(16))).is_none());
        assert!(
            parse_traceparent(&format!("00-{T}-{S}-01-extra")).is_none(),
            "v00 has 4 fields"
        );
        assert!(
            parse_traceparent(&format!("01-{T}-{S}-01-extra")).is_some(),
            "future versions may extend"
        );
        assert!(parse_traceparent(&format!("00-{T}-{S}")).is_none());
        assert!(parse_traceparent("00-zz").is_none());
        assert!(parse_traceparent("").is_none());
        assert!(parse_traceparent("é-€-ü-ö").is_none());
    }

    #[test]
    fn sqlcommenter_comment() {
        let sql = format!(
            "SELECT * FROM orders /*action='list',traceparent='{}',tracestate='congo%3Dt61rcWkgMzE'*/",
            tp("01")
        );
        let p = from_sql(&sql).unwrap();
        assert_eq!(p.span_id, hex_bytes::<8>(S).unwrap());
        assert_eq!(p.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
    }

    #[test]
    fn url_encoded_value() {
        let sql = format!(
            "SELECT 1 /*traceparent='{}'*/",
            tp("01").replace('-', "%2D")
        );
        assert!(from_sql(&sql).is_some());
    }

    #[test]
    fn multiple_comments_first_valid_wins() {
        let other = "11111111111111111111111111111111";
        let sql = format!(
            "/* app=x */ SELECT 1 /*traceparent='bogus'*/ /*traceparent='{}'*/ -- traceparent='00-{other}-{S}-01'",
            tp("01")
        );
        let p = from_sql(&sql).unwrap();
        assert_eq!(p.trace_id, hex_bytes::<16>(T).unwrap());
    }

    #[test]
    fn comment_inside_a_string_literal_is_not_a_comment() {
        let sql = format!("SELECT '/*traceparent=''{}''*/' AS x", tp("01"));
        assert!(from_sql(&sql).is_none());
        let sql = format!("SELECT $$ /*traceparent='{}'*/ $$", tp("01"));
        assert!(from_sql(&sql).is_none());
    }

    #[test]
    fn application_name_fallback_and_precedence() {
        assert!(from_application_name(&tp("01")).is_some());
        assert!(from_application_name(&format!("myapp traceparent={}", tp("01"))).is_some());
        assert!(from_application_name("psql").is_none());
        let other = format!("00-{}-{S}-01", "1".repeat(32));
        let sql = format!("SELECT 1 /*traceparent='{}'*/", tp("01"));
        let p = parent_of(&sql, &other).unwrap();
        assert_eq!(p.trace_id, hex_bytes::<16>(T).unwrap(), "comment wins");
        let p = parent_of("SELECT 1", &other).unwrap();
        assert_eq!(p.trace_id, [0x11; 16]);
    }

    #[test]
    fn garbage_never_panics() {
        for s in [
            "/*",
            "/*traceparent='",
            "/*traceparent=*/",
            "/*=''*/",
            "/*a='\\'*/",
            "%",
            "%4",
            "/*traceparent='%zz'*/",
        ] {
            let _ = from_sql(s);
            let _ = from_application_name(s);
        }
    }
}
