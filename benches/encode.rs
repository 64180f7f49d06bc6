//! Encoder and window-math benchmarks (`cargo bench --bench encode`).
//!
//! - `encode/cold/N`: N series encoded from scratch (every snapshot encoded, then stitched:
//!   what a scrape cost before snapshots were encoded when stored).
//! - `scrape_after_change/N`: one snapshot of N/10 series was replaced (and encoded, in
//!   the poller: `put/N` times that), then `/metrics` builds its body: stitching ready
//!   bytes plus the self-metrics. `…_gzip` adds compressing the body.
//! - `gzip_level/L`: compressing a 5,000-statement exposition (top 100 queries with texts
//!   plus `other`; or the scrape saved in the file `PGVIGIL_BENCH_BODY`) as one gzip piece
//!   (what the store does once per changed snapshot) at level L; the compressed size is
//!   printed once per level.
//! - `window/5000`: the window statistics of 5,000 entries between two polls.
//!
//! The series look like the statements collector's: target, datname, user, a 19-digit
//! queryid and toplevel labels, fractional values.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use pgvigil::collector::steps::window::{window, Cumulative};
use pgvigil::deflate;
use pgvigil::exposition::{self, Format};
use pgvigil::http::Server;
use pgvigil::metric::{Family, MetricType, Sample};
use pgvigil::store::{Snapshot, Store};

const SNAPSHOTS: usize = 10;
const FAMILIES: usize = 10;

fn labels(i: usize, salt: usize) -> Vec<(Arc<str>, String)> {
    vec![
        (Arc::from("target"), "db-prod-1".to_string()),
        (Arc::from("datname"), format!("app{}", i % 4)),
        (Arc::from("user"), "app_user".to_string()),
        (
            Arc::from("queryid"),
            format!(
                "{}",
                1_234_567_890_123_456_789u64.wrapping_add((i * 7919) as u64)
            ),
        ),
        (
            Arc::from("toplevel"),
            if salt % 2 == 0 { "true" } else { "false" }.into(),
        ),
    ]
}

/// Snapshot `s` of `per` series, spread over [`FAMILIES`] families shared by all snapshots.
fn snapshot(s: usize, per: usize, version: f64) -> Snapshot {
    let per_family = per / FAMILIES;
    Snapshot {
        families: (0..FAMILIES)
            .map(|f| Family {
                name: Arc::from(format!("pg_bench_family_{f}_total").as_str()),
                help: Arc::from("A benchmark family."),
                kind: if f % 2 == 0 {
                    MetricType::Counter
                } else {
                    MetricType::Gauge
                },
                samples: (0..per_family)
                    .map(|i| Sample {
                        labels: labels(s * per + i, f),
                        value: version + (i as f64) * 1.37 + 0.001 * f as f64,
                    })
                    .collect(),
            })
            .collect(),
    }
}

fn key(s: usize) -> (String, String, String) {
    ("db-prod-1".into(), format!("collector{s}"), String::new())
}

fn store_with(series: usize) -> Arc<Store> {
    let store = Store::new();
    store.add_target(
        "db-prod-1",
        vec![(Arc::from("target"), "db-prod-1".to_string())],
    );
    for s in 0..SNAPSHOTS {
        store.put(key(s), snapshot(s, series / SNAPSHOTS, 1.0));
    }
    store
}

fn encode(c: &mut Criterion) {
    for series in [1_000, 10_000] {
        let store = store_with(series);
        let snapshots = store.snapshots();
        c.bench_function(&format!("encode/cold/{series}"), |b| {
            b.iter(|| exposition::encode(snapshots.clone(), Vec::new(), Format::Text))
        });
        c.bench_function(&format!("encode/cold_openmetrics/{series}"), |b| {
            b.iter(|| exposition::encode(snapshots.clone(), Vec::new(), Format::OpenMetrics))
        });
        let per = series / SNAPSHOTS;
        c.bench_function(&format!("put/{series}"), |b| {
            let mut v = 0.0;
            b.iter_batched(
                || {
                    v += 1.0;
                    snapshot(3, per, v)
                },
                |snap| store.put(key(3), snap),
                BatchSize::SmallInput,
            )
        });
        let server = Server::new(Arc::clone(&store));
        for (name, gzip) in [
            ("scrape_after_change", false),
            ("scrape_after_change_gzip", true),
        ] {
            let mut v = 0.0;
            c.bench_function(&format!("{name}/{series}"), |b| {
                b.iter_batched(
                    || {
                        v += 1.0;
                        store.put(key(3), snapshot(3, per, v));
                    },
                    |()| server.body(Format::Text, gzip),
                    BatchSize::PerIteration,
                )
            });
        }
        c.bench_function(&format!("scrape_cached/{series}"), |b| {
            b.iter(|| server.body(Format::Text, false))
        });
    }
}

/// A 5,000-statement exposition as pgvigil exports it: the top 100 queries with 16
/// families each and a query_info text, `other`, a few hundred other series.
fn statements_exposition() -> Vec<u8> {
    let mut families = Vec::new();
    for f in 0..16 {
        families.push(Family {
            name: Arc::from(format!("pg_stat_statements_metric_{f}_total").as_str()),
            help: Arc::from("A statements counter."),
            kind: MetricType::Counter,
            samples: (0..101)
                .map(|i| Sample {
                    labels: labels(i, 0),
                    value: 12345.678 * (i + f) as f64 / 7.0,
                })
                .collect(),
        });
    }
    families.push(Family {
        name: Arc::from("pg_stat_statements_query_info"),
        help: Arc::from("Normalized text of the top queries."),
        kind: MetricType::Info,
        samples: (0..100)
            .map(|i| {
                let mut l = labels(i, 0);
                l.push((
                    Arc::from("query"),
                    format!("SELECT c{i}, c{} FROM synth_{} WHERE c{} = $1 AND status IN ($2, $3) ORDER BY created_at DESC LIMIT $4", i + 1, i % 9, i % 7),
                ));
                Sample { labels: l, value: 1.0 }
            })
            .collect(),
    });
    exposition::encode(
        vec![Arc::new(Snapshot { families })],
        Vec::new(),
        Format::Text,
    )
    .into_bytes()
}

fn gzip_levels(c: &mut Criterion) {
    // A real scrape saved to a file (`curl -s …/metrics > body.txt`) when given.
    let body = match std::env::var_os("PGVIGIL_BENCH_BODY") {
        Some(path) => std::fs::read(path).expect("PGVIGIL_BENCH_BODY is readable"),
        None => statements_exposition(),
    };
    for level in [1, 2, 3, 4, 6, 9] {
        eprintln!(
            "deflate piece level {level}: {} → {} bytes",
            body.len(),
            deflate::piece_at(&body, level).len()
        );
        c.bench_function(&format!("gzip_level/{level}"), |b| {
            b.iter(|| deflate::piece_at(black_box(&body), level))
        });
    }
}

fn window_math(c: &mut Criterion) {
    let prev: Vec<Cumulative> = (0..5_000)
        .map(|i| Cumulative {
            calls: 1_000 + i,
            total: 12.5 * (1_000 + i) as f64,
            mean: 12.5,
            stddev: 3.0 + (i % 7) as f64,
        })
        .collect();
    let cur: Vec<Cumulative> = prev
        .iter()
        .map(|p| Cumulative {
            calls: p.calls + 40,
            total: p.total + 40.0 * 14.0,
            mean: (p.total + 40.0 * 14.0) / (p.calls + 40) as f64,
            stddev: p.stddev + 0.1,
        })
        .collect();
    c.bench_function("window/5000", |b| {
        b.iter(|| {
            prev.iter()
                .zip(&cur)
                .filter_map(|(p, c)| window(black_box(p), black_box(c)))
                .count()
        })
    });
}

criterion_group!(benches, encode, gzip_levels, window_math);
criterion_main!(benches);
