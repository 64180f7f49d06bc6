//! Encoding snapshots as Prometheus exposition text.
//!
//! OpenMetrics goes through prometheus-client's encoder (a `Collector` over the snapshots we
//! already hold). The classic text format 0.0.4, which prometheus-client does not write, is
//! a small writer here: `promtool check metrics` and most scrapers without an OpenMetrics
//! `Accept` header read it. Family names are grouped across snapshots: the formats require
//! all samples of a family to be contiguous.
//!
//! Encoding happens when a snapshot changes, not when it is scraped: the store makes an
//! [`Encoded`] part of each snapshot it is given ([`Encoded::new_like`]), in the formats
//! scrapes asked for, split per family into a header (`# HELP`/`# TYPE`) and its sample
//! lines. A scrape then only [`stitch`]es ready bytes: for each family name, in name
//! order, the header of its first part and the sample lines of every part, in part order.
//! That is exactly what encoding all snapshots together writes, byte for byte (the tests
//! below hold the two side by side). For gzip, [`stitch_gzip`] joins pieces of the parts
//! compressed ahead of time (see [`crate::deflate`]) into one gzip member.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::deflate;
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

/// A part of the exposition (one snapshot, or the self-metrics), encoded per format when
/// first needed and then kept, ready to be stitched with the other parts.
#[derive(Debug, Default)]
pub struct Encoded {
    snapshot: Arc<Snapshot>,
    /// Its families' names in name order, and whether each has samples: all a layout
    /// depends on. Shared with the previous version of the part when equal, so a scrape
    /// sees an unchanged shape by pointer.
    shape: Arc<Shape>,
    /// The compression level of its pieces ([`deflate::LEVEL`]; lower for a part made
    /// per scrape).
    level: u32,
    text: OnceLock<Form>,
    openmetrics: OnceLock<Form>,
    /// When a scrape last used each format, plain and gzip ([`Encoded::mark_served`]),
    /// carried over from the part's earlier versions.
    served: [AtomicU64; 4],
    /// Runs of this part's bytes compressed for gzip bodies ([`deflate::piece`]), made
    /// when a scrape first needs them or, for the runs the part's previous version
    /// needed, when the part is stored. Locked only to look up or add a run.
    deflated: Mutex<Vec<Deflated>>,
}

/// A stored part is encoded (and compressed) ahead of scrapes in the formats scrapes used
/// this recently; another format is encoded when a scrape first asks for it.
pub const SERVED_RECENTLY: Duration = Duration::from_secs(600);

fn served_slot(format: Format, gzip: bool) -> usize {
    2 * usize::from(format == Format::OpenMetrics) + usize::from(gzip)
}

/// Seconds since the process first asked, from 1 (0 means never).
fn seconds_since_start() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs() + 1
}

/// A part's families, in name order, each with whether it has samples.
type Shape = Vec<(Arc<str>, bool)>;

/// A part in one format: the bytes, and where each family lies in them.
#[derive(Debug)]
struct Form {
    buf: Bytes,
    /// The part's families in name order, one per name.
    families: Vec<Chunk>,
}

/// One compressed run of an [`Encoded`]'s buffer.
#[derive(Debug)]
struct Deflated {
    format: Format,
    range: Range<usize>,
    bytes: Bytes,
}

/// A family in a buffer being encoded: `# HELP`/`# TYPE` in `header`, then its sample lines.
#[derive(Debug, Clone)]
struct Lines {
    header: Range<usize>,
    samples: Range<usize>,
}

/// Where one family lies in a [`Form`]'s buffer: `# HELP`/`# TYPE` in `header`, then its
/// sample lines.
#[derive(Debug)]
struct Chunk {
    name: Arc<str>,
    header: Range<usize>,
    samples: Range<usize>,
}

impl Encoded {
    /// A snapshot to encode: each format is encoded on first use.
    pub fn new(snapshot: &Arc<Snapshot>) -> Encoded {
        let shape = merge(snapshot.families.iter())
            .into_iter()
            .map(|(name, m)| (Arc::from(name), !m.samples.is_empty()))
            .collect();
        Encoded {
            snapshot: Arc::clone(snapshot),
            shape: Arc::new(shape),
            level: deflate::LEVEL,
            ..Encoded::default()
        }
    }

    /// A part made for one scrape (the self-metrics): encoded on use and compressed at
    /// the fastest level, as nothing reuses it.
    pub fn transient(snapshot: &Arc<Snapshot>) -> Encoded {
        Encoded {
            level: 1,
            ..Encoded::new(snapshot)
        }
    }

    /// The next version of a part, encoded now (in the poller) in the formats scrapes
    /// used within [`SERVED_RECENTLY`] (both for a part's first version), and with the
    /// runs of it that gzip scrapes of `previous` asked for compressed now (the same
    /// families, from the same first family to the same last one). So, as long as the
    /// exposition's shape holds (the same parts, holding the same family names), the
    /// scrape after a poll only joins ready bytes, and a format nobody asks for is not
    /// encoded at every poll.
    pub fn new_like(snapshot: &Arc<Snapshot>, previous: Option<&Encoded>) -> Encoded {
        let mut encoded = Encoded::new(snapshot);
        let Some(previous) = previous else {
            encoded.form(Format::Text);
            encoded.form(Format::OpenMetrics);
            return encoded;
        };
        if encoded.shape == previous.shape {
            encoded.shape = Arc::clone(&previous.shape);
        }
        for (mine, theirs) in encoded.served.iter().zip(&previous.served) {
            mine.store(theirs.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        for format in [Format::Text, Format::OpenMetrics] {
            if encoded.served_recently(format, false) || encoded.served_recently(format, true) {
                encoded.form(format);
            }
        }
        let wanted: Vec<(Format, Range<usize>)> = previous
            .deflated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|d| encoded.served_recently(d.format, true))
            .filter_map(|d| {
                let (first, header, last) = previous.run_families(d.format, &d.range)?;
                Some((
                    d.format,
                    encoded.run_range(d.format, &first, header, &last)?,
                ))
            })
            .collect();
        for (format, range) in wanted {
            encoded.deflated(format, range);
        }
        encoded
    }

    /// Records that a scrape used this part in `format`, gzip-compressed or not.
    fn mark_served(&self, format: Format, gzip: bool) {
        self.served[served_slot(format, gzip)].store(seconds_since_start(), Ordering::Relaxed);
    }

    fn served_recently(&self, format: Format, gzip: bool) -> bool {
        let at = self.served[served_slot(format, gzip)].load(Ordering::Relaxed);
        at != 0 && seconds_since_start().saturating_sub(at) <= SERVED_RECENTLY.as_secs()
    }

    fn cell(&self, format: Format) -> &OnceLock<Form> {
        match format {
            Format::Text => &self.text,
            Format::OpenMetrics => &self.openmetrics,
        }
    }

    fn encoded_in(&self, format: Format) -> Option<&Form> {
        self.cell(format).get()
    }

    /// The part in `format`, encoded now if it was not yet.
    fn form(&self, format: Format) -> &Form {
        self.cell(format).get_or_init(|| {
            let merged = merge(self.snapshot.families.iter());
            let (mut buf, lines) = match format {
                Format::Text => encode_text_part(&merged),
                Format::OpenMetrics => encode_openmetrics_part(&self.snapshot),
            };
            // Kept until the snapshot changes, which for many parts is never: what the
            // buffer grew to beyond the text is given back (with many targets, a third
            // of the parts' memory).
            buf.shrink_to_fit();
            debug_assert_eq!(merged.len(), lines.len());
            debug_assert_eq!(merged.len(), self.shape.len());
            let families = merged
                .keys()
                .zip(lines)
                .map(|(name, l)| Chunk {
                    name: Arc::from(*name),
                    header: l.header,
                    samples: l.samples,
                })
                .collect();
            Form {
                buf: Bytes::from(buf),
                families,
            }
        })
    }

    /// Bytes held (the formats encoded so far, and the compressed runs).
    pub fn len(&self) -> usize {
        let deflated: usize = self
            .deflated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|d| d.bytes.len())
            .sum();
        let forms: usize = [Format::Text, Format::OpenMetrics]
            .into_iter()
            .filter_map(|f| self.encoded_in(f))
            .map(|f| f.buf.len())
            .sum();
        forms + deflated
    }

    pub fn is_empty(&self) -> bool {
        self.snapshot.families.is_empty()
    }

    /// `range` of the buffer in `format`, compressed: from the cache, or compressed now
    /// and kept.
    fn deflated(&self, format: Format, range: Range<usize>) -> Bytes {
        let found = |d: &Vec<Deflated>| {
            d.iter()
                .find(|d| d.format == format && d.range == range)
                .map(|d| d.bytes.clone())
        };
        if let Some(b) = found(&self.deflated.lock().unwrap_or_else(|e| e.into_inner())) {
            return b;
        }
        let bytes = Bytes::from(deflate::piece_at(
            &self.form(format).buf[range.clone()],
            self.level,
        ));
        let mut d = self.deflated.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = found(&d) {
            return b; // another scrape compressed it meanwhile
        }
        d.push(Deflated {
            format,
            range,
            bytes: bytes.clone(),
        });
        bytes
    }

    /// The run `range` as family names: the first family, whether the run starts with its
    /// header, and the last family. `None` when the range does not start and end at
    /// family boundaries.
    fn run_families(
        &self,
        format: Format,
        range: &Range<usize>,
    ) -> Option<(Arc<str>, bool, Arc<str>)> {
        let families = &self.encoded_in(format)?.families;
        let first = families
            .iter()
            .find(|c| c.header.start == range.start || c.samples.start == range.start)?;
        let header = first.header.start == range.start;
        let last = families.iter().rev().find(|c| c.samples.end == range.end)?;
        Some((Arc::clone(&first.name), header, Arc::clone(&last.name)))
    }

    /// The byte range of a run given as [`Encoded::run_families`] describes it.
    fn run_range(
        &self,
        format: Format,
        first: &str,
        header: bool,
        last: &str,
    ) -> Option<Range<usize>> {
        let families = &self.form(format).families;
        let find = |name: &str| {
            families
                .binary_search_by(|c| (*c.name).cmp(name))
                .ok()
                .map(|i| &families[i])
        };
        let (first, last) = (find(first)?, find(last)?);
        let start = if header {
            first.header.start
        } else {
            first.samples.start
        };
        (start <= last.samples.end).then_some(start..last.samples.end)
    }
}

/// A run of bytes of one part's buffer that a stitched body copies whole.
#[derive(Debug, PartialEq)]
struct Piece {
    part: usize,
    range: Range<usize>,
}

/// A [`Piece`] by family positions, which hold while the parts' shapes hold: position
/// `2k` is where family `k`'s header starts, `2k + 1` where its samples start, and `2n`
/// the end of the part's `n` families.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Span {
    part: usize,
    start: usize,
    end: usize,
}

impl Form {
    /// The byte offset of position `pos` (see [`Span`]).
    fn offset(&self, pos: usize) -> usize {
        match self.families.get(pos / 2) {
            Some(c) if pos % 2 == 0 => c.header.start,
            Some(c) => c.samples.start,
            None => self.families.last().map_or(0, |c| c.samples.end),
        }
    }
}

/// What the exposition of parts with these shapes is made of: per family name, in name
/// order, the header of the first part that has the family and the sample lines of every
/// part, in part order; a family without any sample is left out. Neighbouring spans that
/// are neighbours in one part are one span (with one target, most of a snapshot's
/// families follow each other, so a snapshot is a few spans).
fn layout_of(shapes: &[&Shape]) -> Vec<Span> {
    struct Group {
        header: Span,
        samples: Vec<Span>,
    }
    let mut groups: BTreeMap<&str, Group> = BTreeMap::new();
    for (part, shape) in shapes.iter().enumerate() {
        for (k, (name, has_samples)) in shape.iter().enumerate() {
            let g = groups.entry(name).or_insert_with(|| Group {
                header: Span {
                    part,
                    start: 2 * k,
                    end: 2 * k + 1,
                },
                samples: Vec::new(),
            });
            if *has_samples {
                g.samples.push(Span {
                    part,
                    start: 2 * k + 1,
                    end: 2 * k + 2,
                });
            }
        }
    }
    let mut out: Vec<Span> = Vec::new();
    for g in groups.into_values().filter(|g| !g.samples.is_empty()) {
        for p in std::iter::once(g.header).chain(g.samples) {
            match out.last_mut() {
                Some(last) if last.part == p.part && last.end == p.start => last.end = p.end,
                _ => out.push(p),
            }
        }
    }
    out
}

/// The layout of `parts` in `format`, as byte ranges.
fn layout(parts: &[&Encoded], format: Format) -> Vec<Piece> {
    let shapes: Vec<&Shape> = parts.iter().map(|p| &*p.shape).collect();
    resolve(parts, format, &layout_of(&shapes))
}

fn resolve(parts: &[&Encoded], format: Format, spans: &[Span]) -> Vec<Piece> {
    spans
        .iter()
        .map(|s| {
            let form = parts[s.part].form(format);
            Piece {
                part: s.part,
                range: form.offset(s.start)..form.offset(s.end),
            }
        })
        .collect()
}

/// Remembers the last layout, so that a scrape whose parts kept their shapes (the same
/// family names, as after most polls) skips working it out again. A stored part that
/// kept its shape shares it with its previous version, so the check is a pointer
/// comparison; the self-metrics, made per scrape, are compared by value.
#[derive(Debug, Default)]
pub struct Layouts {
    last: Mutex<Option<Remembered>>,
}

/// The parts' shapes a layout was worked out for, and the layout.
type Remembered = (Vec<Arc<Shape>>, Arc<Vec<Span>>);

impl Layouts {
    fn pieces(&self, parts: &[&Encoded], format: Format) -> Vec<Piece> {
        let same = |shapes: &Vec<Arc<Shape>>| {
            shapes.len() == parts.len()
                && shapes
                    .iter()
                    .zip(parts)
                    .all(|(s, p)| Arc::ptr_eq(s, &p.shape) || **s == *p.shape)
        };
        let cached = {
            let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            last.as_ref()
                .filter(|(shapes, _)| same(shapes))
                .map(|(_, spans)| Arc::clone(spans))
        };
        let spans = cached.unwrap_or_else(|| {
            let shapes: Vec<&Shape> = parts.iter().map(|p| &*p.shape).collect();
            let spans = Arc::new(layout_of(&shapes));
            let key = parts.iter().map(|p| Arc::clone(&p.shape)).collect();
            *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some((key, Arc::clone(&spans)));
            spans
        });
        resolve(parts, format, &spans)
    }

    /// [`stitch`], with the layout remembered.
    pub fn stitch(&self, parts: &[&Encoded], format: Format) -> Vec<u8> {
        concat(parts, format, &self.pieces(parts, format))
    }

    /// [`stitch_gzip`], with the layout remembered.
    pub fn stitch_gzip(&self, parts: &[&Encoded], format: Format) -> Vec<u8> {
        join_gzip(parts, format, &self.pieces(parts, format))
    }
}

/// The exposition of `parts` in `format` (see [`layout_of`]). Only copies bytes.
pub fn stitch(parts: &[&Encoded], format: Format) -> Vec<u8> {
    concat(parts, format, &layout(parts, format))
}

fn concat(parts: &[&Encoded], format: Format, pieces: &[Piece]) -> Vec<u8> {
    for part in parts {
        part.mark_served(format, false);
    }
    let total: usize = pieces.iter().map(|p| p.range.len()).sum();
    let mut out = Vec::with_capacity(total + EOF.len());
    for p in pieces {
        out.extend_from_slice(&parts[p.part].form(format).buf[p.range.clone()]);
    }
    if format == Format::OpenMetrics {
        out.extend_from_slice(EOF.as_bytes());
    }
    out
}

/// [`stitch`], gzip-compressed: one gzip member made of each piece's compressed bytes,
/// which every part keeps once made (see [`deflate`]). Compresses only the pieces no
/// earlier scrape or store asked for.
pub fn stitch_gzip(parts: &[&Encoded], format: Format) -> Vec<u8> {
    join_gzip(parts, format, &layout(parts, format))
}

fn join_gzip(parts: &[&Encoded], format: Format, pieces: &[Piece]) -> Vec<u8> {
    for part in parts {
        part.mark_served(format, true);
    }
    let compressed: Vec<Bytes> = pieces
        .iter()
        .map(|p| parts[p.part].deflated(format, p.range.clone()))
        .collect();
    let mut body = deflate::Body::with_capacity(compressed.iter().map(Bytes::len).sum());
    for (p, c) in pieces.iter().zip(&compressed) {
        body.push(&parts[p.part].form(format).buf[p.range.clone()], c);
    }
    let tail = if format == Format::OpenMetrics {
        EOF.as_bytes()
    } else {
        b""
    };
    body.finish(tail)
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
    use crate::deflate::gunzip;

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

        /// A gzip body joined from pieces decompresses to exactly the stitched body, also
        /// after a part was replaced by its next version (whose pieces were compressed
        /// when it was made, from the runs the old one served).
        #[test]
        fn gzip_pieces_decompress_to_the_stitched_body(
            parts in proptest::collection::vec(proptest::collection::vec(arb_family(), 0..4), 1..4),
            next in proptest::collection::vec(arb_family(), 0..4),
        ) {
            let mut encoded: Vec<Encoded> = parts
                .into_iter()
                .map(|families| Encoded::new(&Arc::new(Snapshot { families })))
                .collect();
            let layouts = Layouts::default();
            for format in [Format::Text, Format::OpenMetrics] {
                let refs: Vec<&Encoded> = encoded.iter().collect();
                proptest::prop_assert_eq!(gunzip(&stitch_gzip(&refs, format)), stitch(&refs, format));
                proptest::prop_assert_eq!(gunzip(&layouts.stitch_gzip(&refs, format)), stitch(&refs, format));
            }
            let next = Encoded::new_like(&Arc::new(Snapshot { families: next }), Some(&encoded[0]));
            encoded[0] = next;
            for format in [Format::Text, Format::OpenMetrics] {
                let refs: Vec<&Encoded> = encoded.iter().collect();
                proptest::prop_assert_eq!(gunzip(&stitch_gzip(&refs, format)), stitch(&refs, format));
                // The remembered layout is used only while it still fits the parts.
                proptest::prop_assert_eq!(gunzip(&layouts.stitch_gzip(&refs, format)), stitch(&refs, format));
                proptest::prop_assert_eq!(layouts.stitch(&refs, format), stitch(&refs, format));
            }
        }
    }

    fn deflated_runs(e: &Encoded) -> Vec<(Format, Range<usize>)> {
        let d = e.deflated.lock().unwrap();
        d.iter().map(|d| (d.format, d.range.clone())).collect()
    }

    /// A new version of a snapshot with the same families comes with the pieces a gzip
    /// scrape needs already compressed, so the scrape after a poll compresses nothing.
    #[test]
    fn the_next_version_of_a_part_is_compressed_when_stored() {
        let version = |v: f64| {
            Arc::new(Snapshot {
                families: vec![
                    fam("a_total", MetricType::Counter, &[("x", v), ("y", v + 1.0)]),
                    fam("m_shared", MetricType::Gauge, &[("x", v)]),
                    fam("z", MetricType::Gauge, &[("x", v * 2.0)]),
                ],
            })
        };
        let other = Encoded::new(&Arc::new(Snapshot {
            families: vec![fam("m_shared", MetricType::Gauge, &[("y", 9.0)])],
        }));
        let first = Encoded::new(&version(1.0));
        for format in [Format::Text, Format::OpenMetrics] {
            stitch_gzip(&[&first, &other], format);
        }
        // Per format two runs: a_total and m_shared, then (after other's samples of
        // m_shared) z.
        assert_eq!(
            deflated_runs(&first).len(),
            4,
            "{:?}",
            deflated_runs(&first)
        );
        let next = Encoded::new_like(&version(2.0), Some(&first));
        let wanted: Vec<(Format, Range<usize>)> = [Format::Text, Format::OpenMetrics]
            .into_iter()
            .flat_map(|f| {
                layout(&[&next, &other], f)
                    .into_iter()
                    .filter(|p| p.part == 0)
                    .map(move |p| (f, p.range))
            })
            .collect();
        assert_eq!(deflated_runs(&next), wanted);
        for format in [Format::Text, Format::OpenMetrics] {
            let body = stitch_gzip(&[&next, &other], format);
            assert_eq!(gunzip(&body), stitch(&[&next, &other], format));
        }
        assert_eq!(
            deflated_runs(&next).len(),
            4,
            "nothing compressed at scrape time"
        );

        // Scraped only as gzip OpenMetrics (as Prometheus does): the next version is
        // encoded and compressed in that format only.
        let only_om = Encoded::new_like(&version(3.0), None);
        stitch_gzip(&[&only_om, &other], Format::OpenMetrics);
        let after = Encoded::new_like(&version(4.0), Some(&only_om));
        assert!(
            after.encoded_in(Format::Text).is_none(),
            "text is not encoded"
        );
        assert!(after.encoded_in(Format::OpenMetrics).is_some());
        assert!(deflated_runs(&after)
            .iter()
            .all(|(f, _)| *f == Format::OpenMetrics));
        assert_eq!(deflated_runs(&after).len(), 2);
        // A text scrape still works: it encodes then.
        assert_eq!(
            stitch(&[&after, &other], Format::Text),
            encode(
                vec![version(4.0), other.snapshot.clone()],
                Vec::new(),
                Format::Text
            )
            .into_bytes()
        );
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
