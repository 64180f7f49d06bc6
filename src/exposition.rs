//! Encoding snapshots as Prometheus exposition text.
//!
//! OpenMetrics goes through prometheus-client's encoder (a `Collector` over the snapshots we
//! already hold). The classic text format 0.0.4, which prometheus-client does not write, is
//! a small writer here: `promtool check metrics` and most scrapers without an OpenMetrics
//! `Accept` header read it. Both walk the same merged family list, so they cannot disagree
//! on content. Family names are grouped across snapshots: the formats require all samples
//! of a family to be contiguous.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::metric::MetricType;
use crate::metric::{Family, Sample};
use crate::store::Snapshot;

/// Which exposition format to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// `text/plain; version=0.0.4`
    Text,
    /// `application/openmetrics-text; version=1.0.0`
    OpenMetrics,
}

impl Format {
    /// Picks the format from an `Accept` header: OpenMetrics when the client lists it.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Text,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// One family with its samples gathered from every snapshot.
#[derive(Debug)]
struct Merged<'a> {
    help: &'a str,
    kind: MetricType,
    samples: Vec<&'a Sample>,
}

/// Every family of the snapshots and the extra ones, grouped by name.
fn merge<'a>(snapshots: &'a [Arc<Snapshot>], extra: &'a [Family]) -> BTreeMap<&'a str, Merged<'a>> {
    let families = snapshots
        .iter()
        .flat_map(|s| s.families.iter())
        .chain(extra.iter());
    let mut out: BTreeMap<&str, Merged> = BTreeMap::new();
    for f in families {
        let m = out.entry(&f.name).or_insert_with(|| Merged {
            help: &f.help,
            kind: f.kind,
            samples: Vec::new(),
        });
        m.samples.extend(f.samples.iter());
    }
    // A family with no samples would still print HELP/TYPE; leave it out.
    out.retain(|_, m| !m.samples.is_empty());
    out
}

/// Encodes `snapshots` plus `extra` families (self-metrics) in `format`. Takes them by
/// value: the OpenMetrics path hands them to prometheus-client's registry as they are.
pub fn encode(snapshots: Vec<Arc<Snapshot>>, extra: Vec<Family>, format: Format) -> String {
    match format {
        Format::Text => encode_text(&merge(&snapshots, &extra)),
        Format::OpenMetrics => encode_openmetrics(snapshots, extra),
    }
}

fn encode_text(merged: &BTreeMap<&str, Merged>) -> String {
    let mut out = String::with_capacity(64 * 1024);
    for (name, m) in merged {
        let kind = match m.kind {
            MetricType::Counter => "counter",
            MetricType::Gauge | MetricType::Info => "gauge",
        };
        let _ = writeln!(out, "# HELP {name} {}", escape_help(m.help, false));
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for s in &m.samples {
            out.push_str(name);
            write_labels(&mut out, &s.labels);
            out.push(' ');
            write_value(&mut out, s.value);
            out.push('\n');
        }
    }
    out
}

fn write_labels(out: &mut String, labels: &[(Arc<str>, String)]) {
    if labels.is_empty() {
        return;
    }
    out.push('{');
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(k);
        out.push_str("=\"");
        escape_label_into(out, v);
        out.push('"');
    }
    out.push('}');
}

fn write_value(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        let _ = write!(out, "{}", v as i64);
    } else {
        let _ = write!(out, "{v}");
    }
}

fn escape_label_into(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn escape_help(help: &str, quote: bool) -> String {
    let mut out = String::with_capacity(help.len());
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out
}

/// A label value escaped for the OpenMetrics text format (prometheus-client writes label
/// values verbatim).
struct Escaped<'a>(&'a str);

impl EncodeLabelValue for Escaped<'_> {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        let mut s = String::with_capacity(self.0.len());
        escape_label_into(&mut s, self.0);
        encoder.write_str(&s)
    }
}

/// The snapshots seen through prometheus-client's `Collector` interface.
#[derive(Debug)]
struct SnapshotCollector {
    snapshots: Vec<Arc<Snapshot>>,
    extra: Vec<Family>,
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, m) in &merge(&self.snapshots, &self.extra) {
            // The encoder appends `_total` / `_info` itself.
            let (base, kind) = match m.kind {
                MetricType::Counter => (
                    name.strip_suffix("_total").unwrap_or(name),
                    prometheus_client::metrics::MetricType::Counter,
                ),
                MetricType::Info => (
                    name.strip_suffix("_info").unwrap_or(name),
                    prometheus_client::metrics::MetricType::Info,
                ),
                MetricType::Gauge => (*name, prometheus_client::metrics::MetricType::Gauge),
            };
            let help = escape_help(m.help, true);
            let mut family = encoder.encode_descriptor(base, &help, None, kind)?;
            for s in &m.samples {
                let labels: Vec<(&str, Escaped)> = s
                    .labels
                    .iter()
                    .map(|(k, v)| (k.as_ref(), Escaped(v)))
                    .collect();
                match m.kind {
                    MetricType::Info => family.encode_info(&labels)?,
                    MetricType::Counter => {
                        ConstCounter::new(s.value).encode(family.encode_family(&labels)?)?
                    }
                    MetricType::Gauge => {
                        ConstGauge::new(s.value).encode(family.encode_family(&labels)?)?
                    }
                }
            }
        }
        Ok(())
    }
}

fn encode_openmetrics(snapshots: Vec<Arc<Snapshot>>, extra: Vec<Family>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector { snapshots, extra }));
    let mut out = String::with_capacity(64 * 1024);
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fam(name: &str, kind: MetricType, samples: &[(&str, f64)]) -> Family {
        Family {
            name: Arc::from(name),
            help: Arc::from("Help with \\ and \"quotes\"."),
            kind,
            samples: samples
                .iter()
                .map(|(l, v)| Sample {
                    labels: vec![
                        (Arc::from("target"), "t1".to_string()),
                        (Arc::from("x"), l.to_string()),
                    ],
                    value: *v,
                })
                .collect(),
        }
    }

    fn snapshots() -> Vec<Arc<Snapshot>> {
        vec![
            Arc::new(Snapshot {
                families: vec![
                    fam("pg_b_total", MetricType::Counter, &[("a\"b\n", 3.0)]),
                    fam("pg_a", MetricType::Gauge, &[("1", 0.5)]),
                ],
            }),
            Arc::new(Snapshot {
                families: vec![
                    fam("pg_a", MetricType::Gauge, &[("2", 2.0)]),
                    fam("pg_empty", MetricType::Gauge, &[]),
                    fam("pg_v_info", MetricType::Info, &[("15", 1.0)]),
                ],
            }),
        ]
    }

    #[test]
    fn text_format_golden() {
        let got = encode(snapshots(), Vec::new(), Format::Text);
        let want = "\
# HELP pg_a Help with \\\\ and \"quotes\".
# TYPE pg_a gauge
pg_a{target=\"t1\",x=\"1\"} 0.5
pg_a{target=\"t1\",x=\"2\"} 2
# HELP pg_b_total Help with \\\\ and \"quotes\".
# TYPE pg_b_total counter
pg_b_total{target=\"t1\",x=\"a\\\"b\\n\"} 3
# HELP pg_v_info Help with \\\\ and \"quotes\".
# TYPE pg_v_info gauge
pg_v_info{target=\"t1\",x=\"15\"} 1
";
        assert_eq!(got, want);
    }

    #[test]
    fn openmetrics_golden() {
        let got = encode(snapshots(), Vec::new(), Format::OpenMetrics);
        let want = "\
# HELP pg_a Help with \\\\ and \\\"quotes\\\".
# TYPE pg_a gauge
pg_a{target=\"t1\",x=\"1\"} 0.5
pg_a{target=\"t1\",x=\"2\"} 2.0
# HELP pg_b Help with \\\\ and \\\"quotes\\\".
# TYPE pg_b counter
pg_b_total{target=\"t1\",x=\"a\\\"b\\n\"} 3.0
# HELP pg_v Help with \\\\ and \\\"quotes\\\".
# TYPE pg_v info
pg_v_info{target=\"t1\",x=\"15\"} 1
# EOF
";
        assert_eq!(got, want);
    }

    #[test]
    fn accept_negotiation() {
        assert_eq!(Format::from_accept(None), Format::Text);
        assert_eq!(
            Format::from_accept(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
            )),
            Format::OpenMetrics
        );
        assert_eq!(Format::from_accept(Some("text/plain")), Format::Text);
    }

    #[test]
    fn special_values() {
        let mut s = String::new();
        write_value(&mut s, f64::INFINITY);
        s.push(' ');
        write_value(&mut s, 1e20);
        s.push(' ');
        write_value(&mut s, -3.0);
        assert_eq!(s, "+Inf 100000000000000000000 -3");
    }
}
