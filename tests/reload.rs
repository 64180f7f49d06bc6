//! SIGHUP reloads the config without disturbing what did not change: an unchanged target
//! keeps every series, its counters and `/readyz` across the reload; a changed target is
//! replaced in place; an invalid new config is rejected (file:line in the log,
//! `pgvigil_config_last_reload_successful 0`) and the old one keeps running. Runs the real
//! binary against a real PostgreSQL, scraping once a second around each SIGHUP.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::binary::Pgvigil;
use common::*;

const WAIT: Duration = Duration::from_secs(30);
/// Scrapes before a SIGHUP (the series present in all of them must never go missing).
const BEFORE: usize = 4;
/// Scrapes after a SIGHUP: several collector intervals.
const AFTER: usize = 10;

/// A user pack with a collector that always fails, so `pgvigil_collector_errors_total`
/// keeps counting (a counter a restart would reset).
const FAILING_PACK: &str = "
collectors:
  - name: broken
    help: A collector whose SQL fails.
    queries:
      - sql: SELECT * FROM no_such_table
    metrics:
      - {name: broken_value, type: gauge, help: Never exported., value: v}
";

/// Two targets on the same cluster; `t2` labelled `env: {t2_env}`. Port 0: the listen
/// address is not reloadable, so it must not change. A 3 s interval: a reload that lost
/// the snapshots would leave a gap that 1 s scrapes see.
fn two_targets(dsn: &str, packs: &Path, t2_env: &str) -> String {
    format!(
        "listen: 127.0.0.1:0
targets:
  - name: t1
    dsn: \"{dsn}\"
    labels: {{env: one}}
  - name: t2
    dsn: \"{dsn}\"
    labels: {{env: {t2_env}}}
collectors:
  paths: [\"{}\"]
  defaults: {{interval: 3s, timeout: 5s}}
",
        packs.display()
    )
}

/// A series: name and labels.
type Series = (String, BTreeMap<String, String>);

/// One scrape: `/readyz` status and the samples of `/metrics`.
#[derive(Clone)]
struct Scrape {
    ready: u16,
    samples: Vec<Sample>,
}

fn scrape(child: &Pgvigil) -> Scrape {
    let (ready, _) = get(&child.url("/readyz"));
    let (status, body) = get(&child.url("/metrics"));
    assert_eq!(status, 200, "{body}");
    Scrape {
        ready,
        samples: parse(&body),
    }
}

/// `n` scrapes, one a second.
fn scrapes(child: &Pgvigil, n: usize) -> Vec<Scrape> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        out.push(scrape(child));
        std::thread::sleep(Duration::from_secs(1).saturating_sub(started.elapsed()));
    }
    out
}

/// The series of `target` in a scrape, with `env` left out (it is what a reload changes).
fn series_of(s: &Scrape, target: &str) -> BTreeMap<Series, f64> {
    s.samples
        .iter()
        .filter(|x| x.labels.get("target").map(String::as_str) == Some(target))
        .map(|x| {
            let mut labels = x.labels.clone();
            labels.remove("env");
            ((x.name.clone(), labels), x.value)
        })
        .collect()
}

/// The series of `target` present in every scrape of `before`.
fn stable(before: &[Scrape], target: &str) -> BTreeSet<Series> {
    let mut sets = before.iter().map(|s| {
        series_of(s, target)
            .into_keys()
            .collect::<BTreeSet<Series>>()
    });
    let first = sets.next().unwrap_or_default();
    sets.fold(first, |acc, s| acc.intersection(&s).cloned().collect())
}

/// Every scrape is ready, and every series of `target` that was present in all scrapes
/// before the SIGHUP is present in every scrape after it.
fn assert_no_gap(before: &[Scrape], after: &[Scrape], target: &str, what: &str) {
    let want = stable(before, target);
    assert!(
        want.len() > 20,
        "{what}: too few stable series of {target}: {want:?}"
    );
    for (i, s) in before.iter().chain(after).enumerate() {
        assert_eq!(s.ready, 200, "{what}: /readyz in scrape {i}");
    }
    for (i, s) in after.iter().enumerate() {
        let have = series_of(s, target);
        let missing: Vec<&Series> = want.iter().filter(|k| !have.contains_key(*k)).collect();
        assert!(
            missing.is_empty(),
            "{what}: scrape {i} after SIGHUP lacks {} series of {target}: {missing:?}",
            missing.len()
        );
    }
}

/// No counter (`…_total`) of `target` goes backwards from one scrape to the next.
fn assert_counters_monotonic(scrapes: &[Scrape], target: &str, what: &str) {
    let mut last: BTreeMap<Series, f64> = BTreeMap::new();
    for (i, s) in scrapes.iter().enumerate() {
        for (k, v) in series_of(s, target) {
            if !k.0.ends_with("_total") {
                continue;
            }
            if let Some(prev) = last.get(&k) {
                assert!(
                    v >= *prev,
                    "{what}: counter {k:?} went from {prev} to {v} at scrape {i}"
                );
            }
            last.insert(k, v);
        }
    }
}

fn reload_metric(s: &[Sample]) -> (Option<f64>, Option<f64>) {
    (
        value(s, "pgvigil_config_last_reload_successful", &[]),
        value(
            s,
            "pgvigil_config_last_reload_success_timestamp_seconds",
            &[],
        ),
    )
}

#[test]
fn sighup_keeps_unchanged_targets_and_rejects_an_invalid_config() {
    let pg = cluster(&[]);
    let dir = tempfile::tempdir().unwrap();
    let packs = dir.path().join("packs");
    std::fs::create_dir(&packs).unwrap();
    write(&packs, "broken.yaml", FAILING_PACK);
    let path = write(
        dir.path(),
        "pgvigil.yaml",
        &two_targets(&pg.dsn(), &packs, "two"),
    );
    let child = Pgvigil::start(["--config", path.to_str().unwrap()], &[]);

    // Both targets polled, the failing collector counted, ready.
    let first = wait_for(&child, WAIT, "both targets up and counting errors", |s| {
        for t in ["t1", "t2"] {
            let errors = value(
                s,
                "pgvigil_collector_errors_total",
                &[("target", t), ("collector", "broken"), ("kind", "query")],
            )?;
            (value(s, "pg_up", &[("target", t)]) == Some(1.0) && errors >= 1.0).then_some(())?;
        }
        Some(s.to_vec())
    });
    wait_until(WAIT, "/readyz 200", || get(&child.url("/readyz")).0 == 200);
    // The reload metrics are set at start.
    let (ok, started_at) = reload_metric(&first);
    assert_eq!(ok, Some(1.0));
    let started_at = started_at.expect("a success timestamp at start");

    // (a) An unchanged config: nothing of either target moves.
    let before = scrapes(&child, BEFORE);
    child.signal("HUP");
    let after = scrapes(&child, AFTER);
    for t in ["t1", "t2"] {
        assert_no_gap(&before, &after, t, "unchanged config");
        let all: Vec<Scrape> = before.iter().chain(&after).cloned().collect();
        assert_counters_monotonic(&all, t, "unchanged config");
    }
    let (ok, at) = reload_metric(&after.last().unwrap().samples);
    assert_eq!(ok, Some(1.0));
    assert!(at.unwrap() >= started_at);

    // (b) t2's labels change: t1 is untouched; t2 is replaced in place, its old series
    // served until the new poller overwrites them.
    write(
        dir.path(),
        "pgvigil.yaml",
        &two_targets(&pg.dsn(), &packs, "three"),
    );
    let before = scrapes(&child, BEFORE);
    child.signal("HUP");
    let after = scrapes(&child, AFTER);
    assert_no_gap(&before, &after, "t1", "t2's labels changed");
    let all: Vec<Scrape> = before.iter().chain(&after).cloned().collect();
    assert_counters_monotonic(&all, "t1", "t2's labels changed");
    // Series of t2 compared without `env`: each one is there in every scrape, first
    // with the old label, then with the new — except the statements window, which a
    // fresh poller (new labels, so no state to continue) first reports after two polls.
    let without_window = |s: &Scrape| Scrape {
        ready: s.ready,
        samples: s
            .samples
            .iter()
            .filter(|x| !x.name.starts_with("pg_stat_statements_"))
            .cloned()
            .collect(),
    };
    assert_no_gap(
        &before.iter().map(without_window).collect::<Vec<_>>(),
        &after.iter().map(without_window).collect::<Vec<_>>(),
        "t2",
        "t2 itself",
    );
    let last = &after.last().unwrap().samples;
    assert!(
        find(last, "pg_up", &[("target", "t2"), ("env", "three")]).len() == 1
            && find(last, "pg_up", &[("target", "t2"), ("env", "two")]).is_empty(),
        "t2 relabelled"
    );
    let stale: Vec<&Sample> = last
        .iter()
        .filter(|s| s.labels.get("env").map(String::as_str) == Some("two"))
        .collect();
    assert!(stale.is_empty(), "old-label series left behind: {stale:?}");
    let (ok, reloaded_at) = reload_metric(last);
    assert_eq!(ok, Some(1.0));
    let reloaded_at = reloaded_at.unwrap();

    // (c) A broken config is rejected: file:line in the log, the metric at 0, the old
    // configuration still serving. Fixed again, the metric returns to 1.
    write(
        dir.path(),
        "pgvigil.yaml",
        "listen: 127.0.0.1:0\nbogus: 1\n",
    );
    child.signal("HUP");
    let s = wait_for(&child, WAIT, "reload failure reported", |s| {
        (reload_metric(s).0 == Some(0.0)).then(|| s.to_vec())
    });
    assert_eq!(reload_metric(&s).1, Some(reloaded_at), "no new success");
    assert_eq!(
        value(&s, "pg_up", &[("target", "t1"), ("env", "one")]),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "pg_up", &[("target", "t2"), ("env", "three")]),
        Some(1.0)
    );
    assert_eq!(get(&child.url("/readyz")).0, 200);
    let log = child.log();
    assert!(
        log.contains("pgvigil.yaml:2:1: unknown field `bogus`"),
        "{log}"
    );

    write(
        dir.path(),
        "pgvigil.yaml",
        &two_targets(&pg.dsn(), &packs, "three"),
    );
    child.signal("HUP");
    let s = wait_for(&child, WAIT, "reload success again", |s| {
        (reload_metric(s).0 == Some(1.0)).then(|| s.to_vec())
    });
    assert!(reload_metric(&s).1.unwrap() > reloaded_at);

    let stderr = child.stop();
    assert!(
        stderr.contains("configuration reloaded: 2 targets unchanged"),
        "{stderr}"
    );
    assert!(
        stderr.contains("configuration reloaded: 1 targets unchanged, 1 changed"),
        "{stderr}"
    );
    assert!(stderr.contains("reload rejected"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
