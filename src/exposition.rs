//! Encoding snapshots as Prometheus exposition text.
//!
//! OpenMetrics goes through prometheus-client's encoder (a `Collector` over the snapshots we
//! already hold). The classic text format 0.0.4, which prometheus-client does not write, is
//! a small writer here: `promtool check metrics` and most scrapers without an OpenMetrics
//! `Accept` header read it. Family names are grouped across snapshots: the formats require
//! all samples of a family to be contiguous.
//!
//! Encoding happens when a snapshot changes, not when it is scraped: [`Encoded::new`] turns
//! one snapshot (a *part*) into both formats at once, split per family into a header
//! (`# HELP`/`# TYPE`) and its sample lines. A scrape then only [`stitch`]es ready bytes:
//! for each family name, in name order, the header of its first part and the sample lines
//! of every part, in part order. That is exactly what encoding all snapshots together
//! writes, byte for byte (the tests below hold the two side by side).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::metric::MetricType;
use crate::metric::Snapshot;
use crate::metric::{Family, Sample};

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

/// Every family of `families`, grouped by name, in name order; help and type come from
/// the first family of a name. Families with no samples are kept: a part's empty family
/// still decides the header when the samples come from a later part.
fn merge<'a>(families: impl Iterator<Item = &'a Family>) -> BTreeMap<&'a str, Merged<'a>> {
    let mut out: BTreeMap<&str, Merged> = BTreeMap::new();
    for f in families {
        let m = out.entry(&f.name).or_insert_with(|| Merged {
            help: &f.help,
            kind: f.kind,
            samples: Vec::new(),
        });
        m.samples.extend(f.samples.iter());
    }
    out
}

/// Encodes `snapshots` plus `extra` families (self-metrics) in `format`: each encoded as a
/// part, then stitched, as a scrape does.
pub fn encode(snapshots: Vec<Arc<Snapshot>>, extra: Vec<Family>, format: Format) -> String {
    let mut parts: Vec<Encoded> = snapshots.iter().map(Encoded::new).collect();
    parts.push(Encoded::new(&Arc::new(Snapshot { families: extra })));
    let refs: Vec<&Encoded> = parts.iter().collect();
    // Both encoders write only UTF-8 (names, escaped strings, numbers).
    String::from_utf8(stitch(&refs, format))
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// A part of the exposition (one snapshot, or the self-metrics) encoded in both formats,
/// ready to be stitched with the other parts.
#[derive(Debug, Default)]
pub struct Encoded {
    text: Bytes,
    openmetrics: Bytes,
    /// The part's families in name order, one per name.
    families: Vec<Chunk>,
}

/// Where one family lies in an [`Encoded`]'s buffers.
#[derive(Debug)]
struct Chunk {
    name: Arc<str>,
    text: Lines,
    openmetrics: Lines,
}

/// A family in one format's buffer: `# HELP`/`# TYPE` in `header`, then its sample lines.
#[derive(Debug, Clone)]
struct Lines {
    header: Range<usize>,
    samples: Range<usize>,
}

impl Encoded {
    /// Encodes a snapshot in both formats.
    pub fn new(snapshot: &Arc<Snapshot>) -> Encoded {
        let merged = merge(snapshot.families.iter());
        let (text, text_lines) = encode_text_part(&merged);
        let (openmetrics, om_lines) = encode_openmetrics_part(snapshot);
        debug_assert_eq!(text_lines.len(), om_lines.len());
        let families = merged
            .keys()
            .zip(text_lines.into_iter().zip(om_lines))
            .map(|(name, (text, openmetrics))| Chunk {
                name: Arc::from(*name),
                text,
                openmetrics,
            })
            .collect();
        Encoded {
            text: Bytes::from(text),
            openmetrics: Bytes::from(openmetrics),
            families,
        }
    }

    fn buffer(&self, format: Format) -> &Bytes {
        match format {
            Format::Text => &self.text,
            Format::OpenMetrics => &self.openmetrics,
        }
    }

    /// Bytes held (both formats).
    pub fn len(&self) -> usize {
        self.text.len() + self.openmetrics.len()
    }

    pub fn is_empty(&self) -> bool {
        self.families.is_empty()
    }
}

impl Chunk {
    fn lines(&self, format: Format) -> &Lines {
        match format {
            Format::Text => &self.text,
            Format::OpenMetrics => &self.openmetrics,
        }
    }
}

/// The exposition of `parts` in `format`: per family name, in name order, the header of
/// the first part that has the family and the sample lines of every part, in part order;
/// a family without any sample is left out. Only copies bytes.
pub fn stitch(parts: &[&Encoded], format: Format) -> Vec<u8> {
    struct Group<'a> {
        header: &'a [u8],
        samples: Vec<&'a [u8]>,
        len: usize,
    }
    let mut groups: BTreeMap<&str, Group> = BTreeMap::new();
    for part in parts {
        let buf = part.buffer(format).as_ref();
        for chunk in &part.families {
            let lines = chunk.lines(format);
            let g = groups.entry(&chunk.name).or_insert_with(|| Group {
                header: &buf[lines.header.clone()],
                samples: Vec::new(),
                len: 0,
            });
            if !lines.samples.is_empty() {
                g.samples.push(&buf[lines.samples.clone()]);
                g.len += lines.samples.len();
            }
        }
    }
    let total: usize = groups
        .values()
        .filter(|g| g.len > 0)
        .map(|g| g.header.len() + g.len)
        .sum();
    let mut out = Vec::with_capacity(total + EOF.len());
    for g in groups.values().filter(|g| g.len > 0) {
        out.extend_from_slice(g.header);
        for s in &g.samples {
            out.extend_from_slice(s);
        }
    }
    if format == Format::OpenMetrics {
        out.extend_from_slice(EOF.as_bytes());
    }
    out
}

const EOF: &str = "# EOF\n";

/// The text 0.0.4 encoding of `merged`, and where each family's header and samples are.
fn encode_text_part(merged: &BTreeMap<&str, Merged>) -> (String, Vec<Lines>) {
    let mut out = String::with_capacity(4 * 1024);
    let mut lines = Vec::with_capacity(merged.len());
    for (name, m) in merged {
        let kind = match m.kind {
            MetricType::Counter => "counter",
            MetricType::Gauge | MetricType::Info => "gauge",
        };
        let start = out.len();
        let _ = writeln!(out, "# HELP {name} {}", escape_help(m.help, false));
        let _ = writeln!(out, "# TYPE {name} {kind}");
        let samples = out.len();
        for s in &m.samples {
            out.push_str(name);
            write_labels(&mut out, &s.labels);
            out.push(' ');
            write_value(&mut out, s.value);
            out.push('\n');
        }
        lines.push(Lines {
            header: start..samples,
            samples: samples..out.len(),
        });
    }
    (out, lines)
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

/// A snapshot seen through prometheus-client's `Collector` interface.
#[derive(Debug)]
struct SnapshotCollector(Arc<Snapshot>);

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, m) in &merge(self.0.families.iter()) {
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

/// The OpenMetrics encoding of a snapshot's families (without `# EOF`), and where each
/// family's header and samples are, in name order. Every family, even one without
/// samples, starts with a `# HELP` line, and no sample line starts with `#`, so the lines
/// split back into families unambiguously.
fn encode_openmetrics_part(snapshot: &Arc<Snapshot>) -> (String, Vec<Lines>) {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(Arc::clone(snapshot))));
    let mut out = String::with_capacity(4 * 1024);
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode_registry(&mut out, &registry);
    let mut lines: Vec<Lines> = Vec::new();
    let mut pos = 0;
    let mut in_header = false;
    while pos < out.len() {
        let end = out[pos..].find('\n').map_or(out.len(), |i| pos + i + 1);
        if out[pos..].starts_with("# HELP ") {
            if let Some(last) = lines.last_mut() {
                last.samples.end = pos;
            }
            lines.push(Lines {
                header: pos..end,
                samples: end..end,
            });
            in_header = true;
        } else if in_header {
            // The `# TYPE` line.
            if let Some(last) = lines.last_mut() {
                last.header.end = end;
                last.samples = end..end;
            }
            in_header = false;
        }
        pos = end;
    }
    if let Some(last) = lines.last_mut() {
        last.samples.end = out.len();
    }
    (out, lines)
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

    /// What encoding everything at once writes (the encoder before parts existed): all
    /// families merged, empty ones dropped, one pass per format.
    fn reference(snapshots: &[Arc<Snapshot>], extra: &[Family], format: Format) -> String {
        let all: Vec<Family> = snapshots
            .iter()
            .flat_map(|s| s.families.iter())
            .chain(extra.iter())
            .cloned()
            .collect();
        let merged = merge(all.iter());
        let keep: Vec<Family> = all
            .iter()
            .filter(|f| !merged[f.name.as_ref()].samples.is_empty())
            .cloned()
            .collect();
        let one = Arc::new(Snapshot { families: keep });
        match format {
            Format::Text => encode_text_part(&merge(one.families.iter())).0,
            Format::OpenMetrics => {
                let mut registry = Registry::default();
                registry.register_collector(Box::new(SnapshotCollector(one)));
                let mut out = String::new();
                prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
                out
            }
        }
    }

    fn arb_family() -> impl proptest::strategy::Strategy<Value = Family> {
        use proptest::prelude::*;
        let sample = (
            proptest::collection::vec(("[a-c]", "[a\\\"\n ]{0,3}"), 0..3),
            prop_oneof![Just(1.0), Just(0.5), Just(-3.0), Just(1e20), Just(f64::NAN)],
        )
            .prop_map(|(labels, value)| Sample {
                labels: labels
                    .into_iter()
                    .map(|(k, v)| (Arc::from(k.as_str()), v))
                    .collect(),
                value,
            });
        (
            // A name has one type wherever it appears (a sample line is written by its
            // family's type, the header by the first family of the name).
            prop_oneof![
                Just(("pg_a", MetricType::Gauge)),
                Just(("pg_b_total", MetricType::Counter)),
                Just(("pg_c_info", MetricType::Info)),
                Just(("pg_d", MetricType::Gauge)),
            ],
            "[h\\\"\n]{0,3}",
            proptest::collection::vec(sample, 0..3),
        )
            .prop_map(|((name, kind), help, samples)| Family {
                name: Arc::from(name),
                help: Arc::from(help.as_str()),
                kind,
                samples,
            })
    }

    proptest::proptest! {
        /// Stitching parts encoded one by one writes what encoding everything at once wrote.
        #[test]
        fn stitched_parts_equal_one_pass(
            parts in proptest::collection::vec(proptest::collection::vec(arb_family(), 0..4), 0..4),
            extra in proptest::collection::vec(arb_family(), 0..3),
        ) {
            let snapshots: Vec<Arc<Snapshot>> = parts
                .into_iter()
                .map(|families| Arc::new(Snapshot { families }))
                .collect();
            for format in [Format::Text, Format::OpenMetrics] {
                proptest::prop_assert_eq!(
                    encode(snapshots.clone(), extra.clone(), format),
                    reference(&snapshots, &extra, format)
                );
            }
        }
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
