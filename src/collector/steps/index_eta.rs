//! `processor: create_index_progress`: the estimated time to completion of each running
//! index build, from the progress seen over the last polls. It adds the column
//! `eta_seconds` to each row (NULL when unknown); `queries/indexes.yaml` declares the
//! metric, `pg_create_index_eta_seconds`.
//! Everything else about a build (phase, counters, ratio) is plain SQL in
//! `queries/indexes.yaml`; this module only adds what needs memory across polls. It never
//! touches PostgreSQL: it reads the rows the collector already fetched.
//!
//! # The estimator
//! A build is identified by (pid, relation, index); its samples are (time of the poll,
//! `progress_ratio` of the current phase), and a phase change starts a new series.
//!
//! 1. **Rate of the current phase**: the least-squares slope of ratio over time across the
//!    last [`WINDOW`] samples of the phase. With a fit over a sliding window, rather than
//!    the rate between the last two polls (or an EWMA of such rates, which still feeds on
//!    two-point differences and lags by an arbitrary factor), one late poll or one coarse
//!    progress step is averaged with the other samples instead of setting the rate on its
//!    own: the ETA does not jump between polls, and a real change of speed is followed
//!    within one window, after which the old speed is forgotten entirely.
//! 2. **Remaining time of the phase**: `(1 - ratio) / slope`.
//! 3. **The phases still to come**, which cannot be measured before they start, are
//!    predicted from a model of a B-tree build: each phase's expected duration relative to
//!    the table scan ([`BUILD_PHASES`], [`VALIDATION_PHASES`]), scaled by this build's own
//!    scan duration (measured while it scanned, else derived from the current phase's
//!    speed and weight). The weights come from measured builds on PostgreSQL 15 (5-20 M
//!    rows; integer, C-collated and ICU-collated text keys; `maintenance_work_mem` 1 MB to
//!    64 MB; one 2-core machine): the sort and load after the scan took 0.4-2.7x the scan
//!    (0.8-2.2x for builds over 10 s), about 1.3x in the middle - the value used. So during
//!    the table scan the ETA rests on that model and is off by as much as a build departs
//!    from it (a low `maintenance_work_mem` makes the sort longer: the 1 MB build of
//!    `tests/indexes.rs` spends ~2x its scan afterwards, and its scan-time ETAs are 0.6-0.9x
//!    the truth); in the last measured phase (loading tuples, for `CREATE INDEX` and
//!    `REINDEX`) it is a measurement alone.
//!
//! The ETA is **absent** whenever it would be a guess rather than an estimate: fewer than
//! [`MIN_SAMPLES`] samples in the phase, no progress across the window (a stalled build),
//! a phase that reports no progress (sorting), and the waiting phases of concurrent builds
//! (how long other transactions run is unknowable). It counts no future waits either: for
//! `CONCURRENTLY` builds it is the time to completion of the remaining *work*. It covers the
//! index being built now (REINDEX TABLE rebuilds its indexes one by one; a partitioned index
//! is built partition by partition). Builds that disappear are forgotten.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use crate::collector::steps::Context;
use crate::collector::table::{Cell, Table};
use crate::postgres::value::Columns;
use crate::postgres::{ErrorKind, PgError};

/// For `check-config`.
pub const DESCRIPTION: &str =
    "adds eta_seconds to each build, from its progress over the last polls (NULL when unknown)";

/// Samples of a phase the slope is fitted over.
pub const WINDOW: usize = 10;
/// Samples of a phase needed before an ETA is given (two intervals of progress).
pub const MIN_SAMPLES: usize = 3;

/// Expected duration of the phases of a B-tree build relative to its table scan, in order.
pub const BUILD_PHASES: &[(&str, f64)] = &[
    ("building index: scanning table", 1.0),
    ("building index: sorting live tuples", 0.8),
    ("building index: loading tuples in tree", 0.5),
];

/// The validation pass of `CONCURRENTLY` builds, after the build phases (and a wait).
pub const VALIDATION_PHASES: &[(&str, f64)] = &[
    ("index validation: scanning index", 0.5),
    ("index validation: sorting tuples", 0.4),
    ("index validation: scanning table", 0.2),
];

/// The table-scan phase whose duration scales the prediction of the others.
const SCAN_PHASE: &str = "building index: scanning table";

/// What identifies one build across polls.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BuildKey {
    pub pid: i64,
    pub relation: String,
    pub index: String,
}

/// One build as seen in one poll.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub key: BuildKey,
    pub command: String,
    pub phase: String,
    /// Share of the current phase done, when the phase reports progress.
    pub ratio: Option<f64>,
}

impl Observation {
    /// Reads the columns of `queries/indexes.yaml` (`create_index_progress`).
    pub fn from_row<R: Columns>(row: &R) -> Result<Observation, String> {
        let idx = |c: &str| {
            row.index_of(c)
                .ok_or_else(|| format!("column {c:?} is not in the query result"))
        };
        let label = |c: &str| idx(c).and_then(|i| row.label(i));
        let pid = row
            .number(idx("pid")?)?
            .ok_or_else(|| "column \"pid\" is NULL".to_string())?;
        Ok(Observation {
            key: BuildKey {
                pid: pid as i64,
                relation: label("relation")?,
                index: label("index")?,
            },
            command: label("command")?,
            phase: label("phase")?,
            ratio: row
                .number(idx("progress_ratio")?)?
                .filter(|r| r.is_finite()),
        })
    }
}

/// What is remembered of one build.
#[derive(Debug)]
struct Build {
    phase: String,
    /// (poll time, ratio) of the current phase, oldest first, at most [`WINDOW`].
    samples: VecDeque<(Instant, f64)>,
    /// Duration of this build's table scan: the last estimate made while it scanned.
    scan_seconds: Option<f64>,
}

/// Progress history of the builds of one database; the pure part of the processor.
#[derive(Debug, Default)]
pub struct Tracker {
    builds: HashMap<BuildKey, Build>,
}

impl Tracker {
    /// Records one poll taken at `now` and returns the ETA of each observation, in order.
    /// Builds not observed in this poll are forgotten.
    pub fn update(&mut self, now: Instant, observations: &[Observation]) -> Vec<Option<f64>> {
        self.builds
            .retain(|key, _| observations.iter().any(|o| &o.key == key));
        observations
            .iter()
            .map(|o| {
                let build = self.builds.entry(o.key.clone()).or_insert_with(|| Build {
                    phase: o.phase.clone(),
                    samples: VecDeque::new(),
                    scan_seconds: None,
                });
                build.observe(now, o);
                build.eta(&o.command)
            })
            .collect()
    }

    /// Builds currently remembered.
    pub fn len(&self) -> usize {
        self.builds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.builds.is_empty()
    }
}

impl Build {
    fn observe(&mut self, now: Instant, o: &Observation) {
        let restarted = self
            .samples
            .back()
            .zip(o.ratio)
            .is_some_and(|(&(_, last), r)| r < last);
        if o.phase != self.phase || restarted {
            self.phase = o.phase.clone();
            self.samples.clear();
        }
        if let Some(r) = o.ratio {
            if self.samples.len() == WINDOW {
                self.samples.pop_front();
            }
            self.samples.push_back((now, r.clamp(0.0, 1.0)));
        }
        if self.phase == SCAN_PHASE {
            if let Some(slope) = self.slope() {
                self.scan_seconds = Some(1.0 / slope);
            }
        }
    }

    /// Least-squares slope of ratio over seconds across the window; `None` unless there are
    /// [`MIN_SAMPLES`] samples and progress over the window.
    fn slope(&self) -> Option<f64> {
        if self.samples.len() < MIN_SAMPLES {
            return None;
        }
        let (t0, first) = *self.samples.front()?;
        let (_, last) = *self.samples.back()?;
        if last <= first {
            return None;
        }
        let points: Vec<(f64, f64)> = self
            .samples
            .iter()
            .map(|&(t, r)| (t.saturating_duration_since(t0).as_secs_f64(), r))
            .collect();
        least_squares_slope(&points).filter(|s| s.is_finite() && *s > 0.0)
    }

    /// Seconds until the build's remaining work is done, if the rate is known.
    fn eta(&self, command: &str) -> Option<f64> {
        if self.phase.starts_with("waiting for") {
            return None;
        }
        let slope = self.slope()?;
        let &(_, ratio) = self.samples.back()?;
        let phase_seconds = 1.0 / slope;
        let remaining_here = (1.0 - ratio) / slope;
        let concurrent = command.ends_with("CONCURRENTLY");
        let (weight, later) = phase_model(&self.phase, concurrent);
        // Seconds per unit of weight: this build's own scan if it was measured, else the
        // current phase's duration over its weight.
        let unit = match self.scan_seconds {
            Some(scan) if self.phase != SCAN_PHASE => scan,
            _ => phase_seconds / weight,
        };
        Some(remaining_here + later * unit)
    }
}

/// The weight of `phase` and the total weight of the work phases after it. A phase the
/// model does not know (another access method's build) counts as a scan ending the build
/// pass.
fn phase_model(phase: &str, concurrent: bool) -> (f64, f64) {
    let validation: f64 = VALIDATION_PHASES.iter().map(|(_, w)| w).sum();
    let after = |list: &[(&str, f64)], i: usize| list[i + 1..].iter().map(|(_, w)| w).sum::<f64>();
    if let Some(i) = BUILD_PHASES.iter().position(|(p, _)| *p == phase) {
        let extra = if concurrent { validation } else { 0.0 };
        return (BUILD_PHASES[i].1, after(BUILD_PHASES, i) + extra);
    }
    if let Some(i) = VALIDATION_PHASES.iter().position(|(p, _)| *p == phase) {
        return (VALIDATION_PHASES[i].1, after(VALIDATION_PHASES, i));
    }
    let validation_left = phase.starts_with("building index") && concurrent;
    (1.0, if validation_left { validation } else { 0.0 })
}

/// Ordinary least-squares slope of y over x; `None` when x does not vary.
pub fn least_squares_slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// The step: a [`Tracker`] per (collector, database), fed by each poll.
#[derive(Default)]
pub struct IndexEtaStep {
    tracker: Tracker,
}

impl IndexEtaStep {
    /// Every row, with `eta_seconds`.
    pub fn run<'r, R: Columns>(
        &mut self,
        rows: &'r [R],
        ctx: &Context,
    ) -> Result<Table<'r, R>, PgError> {
        let observations = rows
            .iter()
            .map(Observation::from_row)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                PgError::new(
                    ErrorKind::Decode,
                    format!("processor create_index_progress: {e}"),
                )
            })?;
        let etas = self.tracker.update(ctx.now, &observations);
        let mut table = Table::new(rows, ["eta_seconds"]);
        for (row, eta) in etas.into_iter().enumerate() {
            table.keep(row, vec![Cell::from(eta.map(|e| e.max(0.0)))]);
        }
        Ok(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    const SCAN: &str = "building index: scanning table";
    const SORT: &str = "building index: sorting live tuples";
    const LOAD: &str = "building index: loading tuples in tree";

    fn obs(phase: &str, ratio: Option<f64>) -> Observation {
        Observation {
            key: BuildKey {
                pid: 42,
                relation: "public.t".into(),
                index: "t_x_idx".into(),
            },
            command: "CREATE INDEX".into(),
            phase: phase.into(),
            ratio,
        }
    }

    fn at(t0: Instant, secs: f64) -> Instant {
        t0 + Duration::from_secs_f64(secs)
    }

    /// Feeds one build through `series` of (seconds, phase, ratio); returns the ETAs.
    fn run(command: &str, series: &[(f64, &str, Option<f64>)]) -> Vec<Option<f64>> {
        let t0 = Instant::now();
        let mut tracker = Tracker::default();
        series
            .iter()
            .map(|&(t, phase, ratio)| {
                let mut o = obs(phase, ratio);
                o.command = command.into();
                tracker.update(at(t0, t), &[o])[0]
            })
            .collect()
    }

    fn close(a: f64, b: f64, tolerance: f64) -> bool {
        (a - b).abs() <= tolerance * b.abs().max(1e-9)
    }

    #[test]
    fn least_squares_fits_a_line() {
        let pts: Vec<(f64, f64)> = (0..5).map(|i| (i as f64, 2.0 * i as f64 + 1.0)).collect();
        assert!(close(least_squares_slope(&pts).unwrap(), 2.0, 1e-12));
        assert_eq!(least_squares_slope(&[(1.0, 1.0), (1.0, 2.0)]), None);
        assert_eq!(least_squares_slope(&[(1.0, 1.0)]), None);
    }

    #[test]
    fn steady_scan_gives_an_accurate_eta_including_the_phases_after_it() {
        // A 100 s scan at a steady 1 %/s: after the scan, sort + load are predicted at
        // (0.8 + 0.5) x 100 s.
        let series: Vec<_> = (0..=60)
            .map(|t| (t as f64, SCAN, Some(t as f64 / 100.0)))
            .collect();
        let etas = run("CREATE INDEX", &series);
        assert_eq!(etas[0], None);
        assert_eq!(etas[1], None, "two samples are not enough");
        for (t, eta) in etas.iter().enumerate().skip(MIN_SAMPLES - 1) {
            let want = (100.0 - t as f64) + 130.0;
            let eta = eta.unwrap_or_else(|| panic!("no ETA at {t} s"));
            assert!(close(eta, want, 1e-9), "t={t}: eta {eta}, want {want}");
        }
    }

    #[test]
    fn last_phase_eta_is_the_measured_remaining_time() {
        // Loading is the last phase of a plain CREATE INDEX: nothing is added to it.
        let mut series: Vec<_> = (0..=10)
            .map(|t| (t as f64, SCAN, Some(t as f64 / 10.0)))
            .collect();
        series.push((11.0, SORT, None));
        series.push((12.0, SORT, None));
        series.extend((0..=15).map(|i| (13.0 + i as f64, LOAD, Some(i as f64 / 20.0))));
        let etas = run("REINDEX", &series);
        assert_eq!(etas[11], None, "sorting reports no progress: no ETA");
        assert_eq!(etas[12], None);
        assert_eq!(etas[13], None, "a new phase starts a new window");
        assert_eq!(etas[14], None);
        for i in 2..=15 {
            let eta = etas[13 + i].unwrap();
            let want = 20.0 - i as f64;
            assert!(close(eta, want, 1e-9), "i={i}: eta {eta}, want {want}");
        }
    }

    #[test]
    fn concurrent_builds_add_the_validation_pass_scaled_by_the_measured_scan() {
        // Scan measured at 10 s; then loading at 1/20 per second: 20 s of loading, then
        // validation predicted at 1.1 x 10 s.
        let mut series: Vec<_> = (0..=10)
            .map(|t| (t as f64, SCAN, Some(t as f64 / 10.0)))
            .collect();
        series.extend((0..=4).map(|i| (11.0 + i as f64, LOAD, Some(i as f64 / 20.0))));
        let etas = run("CREATE INDEX CONCURRENTLY", &series);
        let eta = etas.last().unwrap().unwrap();
        assert!(close(eta, 16.0 + 11.0, 1e-9), "{eta}");
        // During the scan: rest of scan + sort + load + validation, all x the scan time.
        let eta = etas[5].unwrap();
        assert!(close(eta, 5.0 + (0.8 + 0.5 + 1.1) * 10.0, 1e-9), "{eta}");
    }

    #[test]
    fn eta_does_not_jump_between_polls_on_noisy_progress() {
        // Polls late by up to 300 ms of a 1 s interval and progress off by up to 0.2 %
        // (deterministic pseudo-random jitter) around a steady 0.5 %/s: the rate between
        // two consecutive polls swings by tens of percent here.
        let mut seed = 7u64;
        let mut noise = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as f64 / (1u64 << 31) as f64 - 0.5
        };
        let series: Vec<_> = (0..150)
            .map(|i| {
                let t = i as f64 + 0.3 * (noise() + 0.5);
                let ratio = (t / 200.0 + 0.004 * noise()).clamp(0.0, 1.0);
                (t, SCAN, Some(ratio))
            })
            .collect();
        let etas = run("CREATE INDEX", &series);
        let mut previous: Option<(f64, f64)> = None;
        for (i, eta) in etas.iter().enumerate().skip(WINDOW) {
            let (t, eta) = (series[i].0, eta.unwrap());
            let truth = (200.0 - t) + 1.3 * 200.0;
            assert!(
                close(eta, truth, 0.15),
                "t={t:.1}: eta {eta:.1} vs {truth:.1}"
            );
            if let Some((pt, pe)) = previous {
                // Between polls the ETA should fall by the time that passed, give or take.
                let expected = pe - (t - pt);
                assert!(
                    (eta - expected).abs() < 0.10 * pe,
                    "t={t:.1}: ETA went from {pe:.1} to {eta:.1}"
                );
            }
            previous = Some((t, eta));
        }
    }

    #[test]
    fn no_eta_when_stalled_waiting_or_unmeasured() {
        let stalled: Vec<_> = (0..6).map(|t| (t as f64, SCAN, Some(0.3))).collect();
        assert!(run("CREATE INDEX", &stalled).iter().all(Option::is_none));
        let waiting: Vec<_> = (0..6)
            .map(|t| (t as f64, "waiting for old snapshots", Some(t as f64 / 10.0)))
            .collect();
        assert!(run("CREATE INDEX CONCURRENTLY", &waiting)
            .iter()
            .all(Option::is_none));
        // Progress, then a stall longer than the window: the ETA goes away.
        let mut series: Vec<_> = (0..5)
            .map(|t| (t as f64, SCAN, Some(t as f64 / 100.0)))
            .collect();
        series.extend((5..20).map(|t| (t as f64, SCAN, Some(0.04))));
        let etas = run("CREATE INDEX", &series);
        assert!(etas[4].is_some());
        assert!(etas[19].is_none());
    }

    #[test]
    fn a_ratio_going_back_restarts_the_window() {
        let series = [
            (0.0, SCAN, Some(0.5)),
            (1.0, SCAN, Some(0.6)),
            (2.0, SCAN, Some(0.7)),
            (3.0, SCAN, Some(0.1)),
            (4.0, SCAN, Some(0.2)),
        ];
        let etas = run("CREATE INDEX", &series);
        assert!(etas[2].is_some());
        assert_eq!(etas[3], None);
        assert_eq!(etas[4], None);
    }

    #[test]
    fn builds_are_tracked_separately_and_forgotten_when_gone() {
        let t0 = Instant::now();
        let mut tracker = Tracker::default();
        let mut other = obs(SCAN, Some(0.0));
        other.key.pid = 43;
        for t in 0..3 {
            let r = t as f64 / 10.0;
            let a = obs(SCAN, Some(r));
            let b = Observation {
                ratio: Some(r / 2.0),
                ..other.clone()
            };
            let etas = tracker.update(at(t0, t as f64), &[a, b]);
            if t == 2 {
                let (a, b) = (etas[0].unwrap(), etas[1].unwrap());
                assert!(close(a, 8.0 + 13.0, 1e-9), "{a}");
                assert!(close(b, 18.0 + 26.0, 1e-9), "{b}");
            }
        }
        assert_eq!(tracker.len(), 2);
        tracker.update(at(t0, 3.0), &[obs(SCAN, Some(0.3))]);
        assert_eq!(tracker.len(), 1);
        tracker.update(at(t0, 4.0), &[]);
        assert!(tracker.is_empty());
    }

    use crate::collector::rows::fixtures::Fake;

    fn row(ratio: Option<f64>) -> Fake {
        Fake(vec![
            ("datname", None, "app"),
            ("pid", Some(42.0), ""),
            ("relid", Some(16384.0), ""),
            ("relation", None, "public.t"),
            ("index_relid", None, ""),
            ("index", None, "t_x_idx"),
            ("command", None, "CREATE INDEX"),
            ("phase", None, SCAN),
            ("progress_ratio", ratio, ""),
            ("blocks_done", Some(1.0), ""),
            ("blocks_total", Some(10.0), ""),
            ("tuples_done", Some(0.0), ""),
            ("tuples_total", Some(0.0), ""),
            ("lockers_waiting", Some(0.0), ""),
            ("elapsed_seconds", Some(1.0), ""),
        ])
    }

    #[test]
    fn the_pack_declares_the_eta_and_the_step_fills_it_with_the_build_labels() {
        use crate::collector::steps::CollectorState;
        let base = vec![(Arc::<str>::from("target"), "t1".to_string())];
        let t0 = Instant::now();
        let def = crate::collector::pack::tests_support::builtin("create_index_progress");
        let mut state = CollectorState::default();
        let mut last = Vec::new();
        for t in 0..3 {
            let ctx = Context {
                def: &def,
                base_labels: &base,
                database: "app",
                now: at(t0, t as f64),
                statements: Default::default(),
                tables: Default::default(),
                names: None,
                monitored: &|_| true,
            };
            let rows = [row(Some(t as f64 / 10.0))];
            let families = state
                .families(&def, std::time::Duration::from_secs(1), &rows[..], &ctx)
                .unwrap_or_else(|e| panic!("{}", e.message));
            last = families
                .into_iter()
                .filter(|f| &*f.name == "pg_create_index_eta_seconds")
                .collect();
            assert_eq!(last.len(), 1, "declared once in queries/indexes.yaml");
            assert_eq!(
                last[0].samples.len(),
                usize::from(t == 2),
                "an ETA from the third poll on"
            );
        }
        let s = &last[0].samples;
        assert_eq!(s.len(), 1);
        let labels: Vec<String> = s[0]
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        assert_eq!(
            labels,
            [
                "target=t1",
                "datname=app",
                "relation=public.t",
                "index=t_x_idx",
                "command=CREATE INDEX"
            ]
        );
        assert!(close(s[0].value, 21.0, 1e-9));

        let bad = Fake(vec![("pid", Some(1.0), "")]);
        let ctx = Context {
            def: &def,
            base_labels: &base,
            database: "app",
            now: t0,
            statements: Default::default(),
            tables: Default::default(),
            names: None,
            monitored: &|_| true,
        };
        let e = IndexEtaStep::default().run(&[bad], &ctx).err().unwrap();
        assert_eq!(e.kind, ErrorKind::Decode);
        assert!(e.message.contains("\"relation\""), "{}", e.message);
    }
}
