//! Window statistics for `pg_stat_statements` entries.
//!
//! # What this module owns
//!
//! Pure arithmetic, no I/O. `pg_stat_statements` keeps cumulative counters per
//! entry: `calls`, `total_exec_time`, `mean_exec_time` and `stddev_exec_time`
//! (milliseconds; `stddev` is the *population* standard deviation). Given two
//! consecutive polls of the same entry, [`window`] derives the count, total,
//! mean and population standard deviation of only the executions that
//! happened between the two polls.
//!
//! # How PostgreSQL maintains the counters
//!
//! `pgss_store()` updates, per execution `x` (all `double`):
//!
//! ```text
//! calls += 1;  total += x;
//! if calls == 1 { mean = x }
//! else { old = mean; mean += (x - old) / calls; sum_var += (x - old) * (x - mean); }
//! ```
//!
//! i.e. Welford's algorithm, and reports `stddev = sqrt(sum_var / calls)`
//! (0 when `calls <= 1`). So from a snapshot we recover
//! `M2 = calls * stddev²`, the sum of squared deviations from the mean.
//!
//! # The formula
//!
//! Let the first poll hold `n1` calls (total `T1`, `M2_1 = n1·sd1²`) and the
//! second `n2` (`T2`, `M2_2 = n2·sd2²`); the window has `nw = n2 - n1` calls:
//!
//! ```text
//! total_w = T2 - T1
//! mean_w  = total_w / nw
//! mean_1  = T1 / n1
//! delta   = mean_w - mean_1
//! M2_w    = M2_2 - M2_1 - delta² · n1 · nw / n2      (clamped to >= 0)
//! stddev_w = sqrt(M2_w / nw)                         (clamped, see below)
//! ```
//!
//! This is Chan, Golub & LeVeque's pairwise-merge identity
//! `M2_ab = M2_a + M2_b + delta² · n_a·n_b / (n_a + n_b)` solved for the
//! second half. The textbook alternative — sums of squares
//! `S = n·(sd² + mean²)`, `var_w = (S2 - S1)/nw - mean_w²` — subtracts
//! quantities of size `n·mean²`, so its variance is off by about
//! `ε·(n2/nw)·mean²` (`ε = 2⁻⁵³`): catastrophic when the mean is large
//! compared with the spread, which is the normal case for a stable query.
//! For 2000 calls of 9000 ms ± 10 µs followed by a 20-call window the naive
//! stddev is 5% off; this form is off by 2e-9. The Chan form only subtracts
//! sums of squared *deviations*: its variance error is about
//! `ε·(M2_1 + M2_2)/nw + 2·|delta|·ε·(T1 + T2)`, with no `mean²` term.
//!
//! Choices:
//! * Means come from the totals (`T/n`), not from the reported Welford
//!   `mean`: `T2 - T1` carries only the rounding of the window's own
//!   additions (PostgreSQL's total is a plain running sum), whereas
//!   recovering the window from Welford means needs `n2·mean2 - n1·mean1`,
//!   which scales the means' rounding by `n`. The reported `mean` is only
//!   validated (finite, non-negative).
//! * `M2_w` below zero can only come from rounding and is clamped to 0.
//! * Execution times are non-negative, so the window's samples satisfy
//!   `sum x² <= (sum x)²`, hence `stddev_w <= mean_w·sqrt(nw - 1)`. The result
//!   is clamped to that bound; in particular a window of one call has
//!   `stddev == 0` exactly.
//!
//! # Accuracy
//!
//! The inputs are themselves rounded: PostgreSQL's `sum_var` accumulator
//! rounds every window step by up to `ε·M2_2`, its running total every step
//! by up to `ε·T2`, and the reported `stddev` is rounded again. So the
//! window variance is only determined to about
//! `ε·(M2_2 + (M2_1 + M2_2)/nw) + 2·|delta|·ε·(T1 + T2)` (times small
//! constants, plus a Welford-drift term; the full first-order bound is in the
//! tests' `check_window`). For ordinary windows that is far below 1e-6
//! relative. A window whose variance is tiny next to the history's (0.01 ms
//! calls after 10 s spikes, or a nearly constant window) gets a stddev that
//! is right only in absolute terms, to about the square root of that bound.
//! No formula can do better from these inputs, and the tests check
//! `window()` against exactly this bound.
//!
//! # Rejected inputs
//!
//! [`window`] returns `None` when a snapshot has a non-finite or negative
//! `total`/`mean`/`stddev`, a zero-call snapshot has a non-zero total,
//! `calls` went down (reset, or eviction and re-entry), `total` went down,
//! `calls` is unchanged but any statistic changed, or an intermediate
//! overflows (`stddev` beyond ~1e154). A reset followed by *more* calls than
//! before is not detectable from these four numbers; use
//! `pg_stat_statements_info.stats_reset` / `stats_since` for that.

/// One poll of a `pg_stat_statements` entry's execution-time counters.
///
/// Times may be in any unit (PostgreSQL reports milliseconds); `stddev` is the
/// population standard deviation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cumulative {
    pub calls: u64,
    pub total: f64,
    pub mean: f64,
    pub stddev: f64,
}

/// Statistics of the executions between two polls (same unit as the input).
///
/// `stddev` is the population standard deviation of the window's samples.
/// A window without calls has every field zero.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Window {
    pub calls: u64,
    pub total: f64,
    pub mean: f64,
    pub stddev: f64,
}

const EMPTY: Window = Window {
    calls: 0,
    total: 0.0,
    mean: 0.0,
    stddev: 0.0,
};

/// Finite, non-negative statistics; a state without calls has no time.
fn plausible(c: &Cumulative) -> bool {
    let ok = |x: f64| x.is_finite() && x >= 0.0;
    ok(c.total) && ok(c.mean) && ok(c.stddev) && (c.calls > 0 || c.total == 0.0)
}

/// Sum of squared deviations from the mean, as PostgreSQL's `sum_var_time`.
fn m2(c: &Cumulative) -> f64 {
    c.calls as f64 * c.stddev * c.stddev
}

/// Statistics of the executions between `prev` and `cur` (two polls of the same
/// entry, `prev` first).
///
/// * `cur.calls == prev.calls` with identical statistics: `Some` with every
///   field 0, so the series can still be exported; any changed statistic
///   without new calls is inconsistent and gives `None`.
/// * `None` when no window can be derived: `calls` or `total` went down,
///   non-finite or negative inputs, or an intermediate overflow (see the
///   module docs).
///
/// The result is always finite and non-negative.
pub fn window(prev: &Cumulative, cur: &Cumulative) -> Option<Window> {
    if !plausible(prev) || !plausible(cur) {
        return None;
    }
    let calls = cur.calls.checked_sub(prev.calls)?;
    if cur.total < prev.total {
        return None;
    }
    if calls == 0 {
        let unchanged =
            cur.total == prev.total && cur.mean == prev.mean && cur.stddev == prev.stddev;
        return unchanged.then_some(EMPTY);
    }

    let nw = calls as f64;
    let total = cur.total - prev.total;
    let mean = total / nw;

    let m2_w = if prev.calls == 0 {
        // First poll after creation/reset: the window is the whole entry.
        m2(cur)
    } else {
        let n1 = prev.calls as f64;
        let n2 = cur.calls as f64;
        let delta = mean - prev.total / n1;
        let shift = delta * delta * (n1 / n2) * nw;
        (m2(cur) - m2(prev)) - shift
    };
    // Overflow (inf - inf = NaN) must not be laundered by the clamps below:
    // f64::max/min return the non-NaN operand.
    if !m2_w.is_finite() {
        return None;
    }
    let bound = mean * (nw - 1.0).sqrt();
    let stddev = (m2_w.max(0.0) / nw).sqrt().min(bound);

    (mean.is_finite() && stddev.is_finite()).then_some(Window {
        calls,
        total,
        mean,
        stddev,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::TestCaseError;

    /// Unit roundoff of f64 (half an ulp of 1.0).
    const U: f64 = f64::EPSILON / 2.0;

    /// A pg_stat_statements entry's execution counters, updated exactly like
    /// `pgss_store()` does (f64 running total, Welford mean / sum_var), plus
    /// bookkeeping the error bound in `check_window` needs.
    #[derive(Clone, Debug, Default)]
    struct PgEntry {
        calls: u64,
        total: f64,
        mean: f64,
        sum_var: f64,
        /// Largest sample and largest running mean seen so far.
        max_x: f64,
        max_mean: f64,
        /// Sum over Welford steps of |x - old_mean|.
        abs_dev: f64,
    }

    impl PgEntry {
        fn exec(&mut self, x: f64) {
            self.calls += 1;
            self.total += x;
            if self.calls == 1 {
                self.mean = x;
            } else {
                let old_mean = self.mean;
                self.mean += (x - old_mean) / self.calls as f64;
                self.sum_var += (x - old_mean) * (x - self.mean);
                self.abs_dev += (x - old_mean).abs();
            }
            self.max_x = self.max_x.max(x);
            self.max_mean = self.max_mean.max(self.mean);
        }

        /// What `pg_stat_statements` reports.
        fn snapshot(&self) -> Cumulative {
            let stddev = if self.calls > 1 {
                (self.sum_var / self.calls as f64).sqrt()
            } else {
                0.0
            };
            Cumulative {
                calls: self.calls,
                total: self.total,
                mean: self.mean,
                stddev,
            }
        }
    }

    /// The state PostgreSQL reports after executing `samples` in order.
    fn cumulative_of(samples: &[f64]) -> Cumulative {
        let mut e = PgEntry::default();
        samples.iter().for_each(|&x| e.exec(x));
        e.snapshot()
    }

    /// Neumaier-compensated sum: error ~ 2u·sum, independent of the length.
    fn accurate_sum(xs: impl Iterator<Item = f64>) -> f64 {
        let (mut s, mut c) = (0.0f64, 0.0f64);
        for x in xs {
            let t = s + x;
            c += if s.abs() >= x.abs() {
                (s - t) + x
            } else {
                (x - t) + s
            };
            s = t;
        }
        s + c
    }

    /// Reference (mean, population stddev) by the two-pass method.
    fn direct_stats(xs: &[f64]) -> (f64, f64) {
        let n = xs.len() as f64;
        let mean = accurate_sum(xs.iter().copied()) / n;
        let m2 = accurate_sum(xs.iter().map(|x| (x - mean) * (x - mean)));
        (mean, (m2 / n).sqrt())
    }

    /// Polls an entry after `hist`, again after `hist ++ win`, and checks
    /// `window()` against the window's samples.
    ///
    /// Tolerance = 1e-6 relative + the absolute error that is inherent in the
    /// polled inputs. First-order bounds, u = 2^-53, `n2 = n1 + nw`:
    /// * mean: T2 - T1 carries the rounding of the nw window additions to
    ///   PG's running total, each <= u·T2, so |Δmean| <= u·T2 (+ 2u·mean).
    /// * M2_w: (a) reported stddev = fl(sqrt(fl(sum_var/n))) so n·sd² is off
    ///   by <= 3u, plus our own products: <= 8u·(M2_1 + M2_2);
    ///   (b) PG adds each window term to sum_var with error <= u·M2_2:
    ///   nw·u·M2_2, plus 3u per term product: 3u·M2_2;
    ///   (c) PG's Welford mean drifts by e <= u·(max_mean·(n2+1)/2 + 2·max_x)
    ///   (new error per step <= u·mean + 2u·|x-mean|/k, damped by (1-1/k)),
    ///   which moves each window term by <= 2e·|x - old_mean|: 2e·A;
    ///   (d) delta is off by Ed <= u·(T1 + T2 + 4·max_x) (same argument as
    ///   the mean, for both means), so the shift δ²·n1·nw/n2 is off by
    ///   (2|δ|·Ed + Ed²)·n1·nw/n2, plus 4u·shift rounding;
    ///   (e) the final subtractions: 2u·(M2_2 + shift).
    ///
    ///   The variance bound is twice that sum (for dropped higher-order
    ///   terms) over nw. A variance error V moves the stddev by at most
    ///   min(sqrt(V), V/sd), since |√a - √b| <= min(√|a-b|, |a-b|/√b).
    /// * the reference itself: two-pass with compensated sums is accurate
    ///   to ~nw·u relative plus u·mean absolute (covered by 1e-6 and 4u·max_x).
    ///
    /// When these terms are negligible (most realistic data) this is a plain
    /// 1e-6 relative check; the naive sum-of-squares formula fails it (see
    /// `chan_form_beats_naive_sum_of_squares` and `prop_stationary_query`).
    /// Over 50 000 cases per property the largest error seen was ~0.4 of
    /// this bound: never exceeded, and not so loose that it checks nothing.
    fn check_window(hist: &[f64], win: &[f64]) -> Result<Window, String> {
        let mut e = PgEntry::default();
        hist.iter().for_each(|&x| e.exec(x));
        let (prev, prev_e) = (e.snapshot(), e.clone());
        win.iter().for_each(|&x| e.exec(x));
        let cur = e.snapshot();

        let w = window(&prev, &cur).ok_or("window() returned None")?;
        let ctx = || format!("prev={prev:?} cur={cur:?} got={w:?}");
        if w.calls != win.len() as u64 {
            return Err(format!("calls {} != {} ({})", w.calls, win.len(), ctx()));
        }
        let all_ok = [w.total, w.mean, w.stddev]
            .iter()
            .all(|v| v.is_finite() && *v >= 0.0);
        if !all_ok {
            return Err(format!("negative or non-finite ({})", ctx()));
        }

        let (ref_mean, ref_sd) = direct_stats(win);
        let (n1, nw) = (hist.len() as f64, win.len() as f64);
        let n2 = n1 + nw;
        let (t1, t2) = (prev.total, cur.total);
        let (m2_1, m2_2) = (prev_e.sum_var, e.sum_var);
        let max_x = e.max_x;

        let tol_mean = 1e-6 * ref_mean + 2.0 * U * t2 + 4.0 * U * max_x;
        if (w.mean - ref_mean).abs() > tol_mean {
            return Err(format!(
                "mean {} vs direct {} (tol {tol_mean:e}; {})",
                w.mean,
                ref_mean,
                ctx()
            ));
        }

        let (delta, shift) = if hist.is_empty() {
            (0.0, 0.0)
        } else {
            let d = ref_mean - direct_stats(hist).0;
            (d, d * d * n1 * nw / n2)
        };
        let drift = U * (e.max_mean * (n2 + 1.0) / 2.0 + 2.0 * max_x);
        let a = e.abs_dev - prev_e.abs_dev;
        let ed = U * (t1 + t2 + 4.0 * max_x);
        let err_m2 = 8.0 * U * (m2_1 + m2_2)
            + (nw + 3.0) * U * m2_2
            + 2.0 * drift * a
            + (2.0 * delta.abs() * ed + ed * ed) * n1 * nw / n2
            + 4.0 * U * shift
            + 2.0 * U * (m2_2 + shift);
        let tol_var = 2.0 * err_m2 / nw;
        let from_var = if ref_sd > 0.0 {
            tol_var.sqrt().min(tol_var / ref_sd)
        } else {
            tol_var.sqrt()
        };
        let tol_sd = 1e-6 * ref_sd + from_var + 4.0 * U * max_x;
        if (w.stddev - ref_sd).abs() > tol_sd {
            return Err(format!(
                "stddev {} vs direct {} (tol {tol_sd:e}; {})",
                w.stddev,
                ref_sd,
                ctx()
            ));
        }
        Ok(w)
    }

    fn rel_eq(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * b.abs()
    }

    // ---- hand cases -------------------------------------------------------

    /// 40 executions of 10 ms and 10 of 60 ms between polls:
    /// mean = (40·10 + 10·60)/50 = 1000/50 = 20 ms;
    /// var  = (40·(10-20)² + 10·(60-20)²)/50 = (4000 + 16000)/50 = 400 ms²
    ///      (equivalently E[x²] - mean² = (4000 + 36000)/50 - 400 = 400),
    /// so the population stddev is exactly 20 ms.
    #[test]
    fn forty_fast_ten_slow_after_history() {
        let history = [3.0, 250.0, 17.5, 1200.0, 42.0, 0.5, 8.25];
        let mut win = vec![10.0; 40];
        // interleave the slow ones; order must not matter
        for i in 0..10 {
            win.insert(i * 5, 60.0);
        }
        let prev = cumulative_of(&history);
        let all: Vec<f64> = history.iter().chain(&win).copied().collect();
        let cur = cumulative_of(&all);

        let w = window(&prev, &cur).expect("consistent states");
        assert_eq!(w.calls, 50);
        // all values are small dyadic rationals, so the totals are exact
        assert_eq!(w.total, 1000.0);
        assert_eq!(w.mean, 20.0);
        assert!(rel_eq(w.stddev, 20.0, 1e-12), "stddev {}", w.stddev);
        check_window(&history, &win).unwrap();
    }

    /// States typed in by hand: samples {10, 20} then {30, 40}.
    /// prev: n=2, T=30, mean 15, sd 5 (M2 = 50).
    /// cur: n=4, T=100, mean 25, var = (225+25+25+225)/4 = 125 (M2 = 500).
    /// window: T=70, mean 35, delta = 35-15 = 20, shift = 400·2·2/4 = 400,
    /// M2_w = 500 - 50 - 400 = 50, var = 25, sd = 5.
    #[test]
    fn hand_written_states() {
        let prev = Cumulative {
            calls: 2,
            total: 30.0,
            mean: 15.0,
            stddev: 5.0,
        };
        let cur = Cumulative {
            calls: 4,
            total: 100.0,
            mean: 25.0,
            stddev: 125f64.sqrt(),
        };
        let w = window(&prev, &cur).expect("consistent states");
        assert_eq!((w.calls, w.total, w.mean), (2, 70.0, 35.0));
        assert!(rel_eq(w.stddev, 5.0, 1e-12), "stddev {}", w.stddev);
    }

    #[test]
    fn first_poll_after_creation_is_the_whole_entry() {
        let samples = [1.0, 2.0, 3.0, 4.0];
        let empty = cumulative_of(&[]);
        let cur = cumulative_of(&samples);
        let w = window(&empty, &cur).expect("from empty");
        assert_eq!((w.calls, w.total, w.mean), (4, 10.0, 2.5));
        assert!(rel_eq(w.stddev, 1.25f64.sqrt(), 1e-12));
        check_window(&[], &samples).unwrap();
    }

    #[test]
    fn reset_returns_none() {
        let prev = cumulative_of(&[5.0; 100]);
        let cur = cumulative_of(&[5.0; 10]);
        assert_eq!(window(&prev, &cur), None);
        // reset to an empty entry
        assert_eq!(window(&prev, &cumulative_of(&[])), None);
    }

    #[test]
    fn total_going_down_returns_none() {
        let prev = cumulative_of(&[5.0, 6.0]);
        let mut cur = cumulative_of(&[5.0, 6.0, 7.0]);
        cur.total = prev.total - 1.0;
        assert_eq!(window(&prev, &cur), None);
    }

    #[test]
    fn no_new_calls_gives_an_empty_window() {
        let s = cumulative_of(&[1.0, 2.0, 30.0]);
        let w = window(&s, &s).expect("unchanged state");
        assert_eq!(
            w,
            Window {
                calls: 0,
                total: 0.0,
                mean: 0.0,
                stddev: 0.0
            }
        );
        let empty = cumulative_of(&[]);
        assert_eq!(window(&empty, &empty), Some(w));
    }

    #[test]
    fn no_new_calls_but_changed_stats_is_inconsistent() {
        let s = cumulative_of(&[1.0, 2.0, 30.0]);
        for cur in [
            Cumulative {
                total: s.total + 1.0,
                ..s
            },
            Cumulative {
                mean: s.mean + 1.0,
                ..s
            },
            Cumulative {
                stddev: s.stddev + 1.0,
                ..s
            },
        ] {
            assert_eq!(window(&s, &cur), None, "{cur:?}");
        }
    }

    #[test]
    fn one_new_call_has_zero_stddev() {
        let history = [0.2, 9000.0, 3.5, 77.0, 1.0e-3];
        let mut all = history.to_vec();
        all.push(123.456);
        let w = window(&cumulative_of(&history), &cumulative_of(&all)).expect("one call");
        assert_eq!(w.calls, 1);
        assert!(rel_eq(w.mean, 123.456, 1e-12), "mean {}", w.mean);
        assert_eq!(w.total, w.mean);
        assert_eq!(w.stddev, 0.0);
    }

    #[test]
    fn non_finite_or_negative_inputs_return_none() {
        let prev = cumulative_of(&[1.0, 2.0, 3.0]);
        let cur = cumulative_of(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        assert!(window(&prev, &cur).is_some());
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1.0] {
            let variants = [
                Cumulative { total: bad, ..cur },
                Cumulative { mean: bad, ..cur },
                Cumulative { stddev: bad, ..cur },
            ];
            for v in variants {
                assert_eq!(window(&prev, &v), None, "cur {v:?}");
                assert_eq!(window(&v, &cur), None, "prev {v:?}");
            }
        }
        // an entry without calls cannot have accumulated time
        let ghost = Cumulative {
            calls: 0,
            total: 1.0,
            mean: 0.0,
            stddev: 0.0,
        };
        assert_eq!(window(&ghost, &cur), None);
    }

    #[test]
    fn overflowing_magnitudes_return_none() {
        let prev = Cumulative {
            calls: 2,
            total: 1.0,
            mean: 0.5,
            stddev: 1e200,
        };
        let cur = Cumulative {
            calls: 3,
            total: 2.0,
            mean: 0.6,
            stddev: 1e200,
        };
        assert_eq!(window(&prev, &cur), None);
    }

    /// Inconsistent but plausible-looking states still give sane output.
    #[test]
    fn clamps_keep_results_in_range() {
        // stddev shrank far more than the window allows -> M2_w < 0 -> 0
        let prev = Cumulative {
            calls: 10,
            total: 100.0,
            mean: 10.0,
            stddev: 50.0,
        };
        let cur = Cumulative {
            calls: 12,
            total: 120.0,
            mean: 10.0,
            stddev: 0.0,
        };
        let w = window(&prev, &cur).expect("plausible");
        assert_eq!((w.calls, w.mean, w.stddev), (2, 10.0, 0.0));
        // stddev grew more than two non-negative samples with mean 10 allow
        // (sd <= mean·sqrt(n-1) = 10)
        let cur = Cumulative {
            stddev: 1000.0,
            ..cur
        };
        let w = window(&prev, &cur).expect("plausible");
        assert_eq!(w.stddev, 10.0);
    }

    /// Naive window variance from sums of squares, for comparison only.
    fn naive_window_stddev(prev: &Cumulative, cur: &Cumulative) -> f64 {
        let s = |c: &Cumulative| {
            let n = c.calls as f64;
            let m = c.total / n;
            n * (c.stddev * c.stddev + m * m)
        };
        let nw = (cur.calls - prev.calls) as f64;
        let mean = (cur.total - prev.total) / nw;
        ((s(cur) - s(prev)) / nw - mean * mean).max(0.0).sqrt()
    }

    /// A stable query (9000 ms ± 10 µs): the sums of squares are ~1.6e11 per
    /// call while the window variance is ~3e-5, so the naive formula
    /// cancels away all digits and fails the very tolerance `window()` meets.
    #[test]
    fn chan_form_beats_naive_sum_of_squares() {
        let mut rng = Rng(7);
        let mut gen = |n: usize| -> Vec<f64> {
            (0..n)
                .map(|_| 9000.0 + 0.01 * (2.0 * rng.f() - 1.0))
                .collect()
        };
        let (hist, win) = (gen(2000), gen(20));
        check_window(&hist, &win).unwrap();

        let all: Vec<f64> = hist.iter().chain(&win).copied().collect();
        let naive = naive_window_stddev(&cumulative_of(&hist), &cumulative_of(&all));
        let (_, ref_sd) = direct_stats(&win);
        assert!(
            !rel_eq(naive, ref_sd, 1e-2),
            "naive {naive} unexpectedly close to {ref_sd}"
        );
    }

    /// A nearly constant window after a spiky history: accurate to the
    /// inherent bound, and never worse than the physical bound.
    #[test]
    fn near_constant_window_after_spikes() {
        let mut hist = vec![2.0; 1990];
        for i in 0..10 {
            hist[i * 199] = 9500.0 + i as f64;
        }
        let win: Vec<f64> = (0..1000).map(|i| 2.0 + 1e-6 * (i % 3) as f64).collect();
        let w = check_window(&hist, &win).unwrap();
        assert!(rel_eq(w.mean, 2.000001, 1e-9), "mean {}", w.mean);
    }

    // ---- property tests ---------------------------------------------------

    /// splitmix64: reproducible samples from a proptest-chosen seed.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        /// Uniform in [0, 1).
        fn f(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    const MIN_MS: f64 = 0.001;
    const MAX_MS: f64 = 10_000.0;

    /// Execution-time distributions, all clamped to [0.001 ms, 10 s].
    #[derive(Clone, Debug)]
    enum Shape {
        Uniform {
            lo: f64,
            hi: f64,
        },
        LogUniform {
            lo: f64,
            hi: f64,
        },
        Exponential {
            mean: f64,
        },
        /// `center · (1 ± rel_jitter)`; jitter 0 is a constant.
        NearConstant {
            center: f64,
            rel_jitter: f64,
        },
        /// `base ± 10%`, with probability `p` a spike in [spike/2, spike].
        Spiky {
            base: f64,
            spike: f64,
            p: f64,
        },
    }

    impl Shape {
        fn sample(&self, rng: &mut Rng) -> f64 {
            let x = match *self {
                Shape::Uniform { lo, hi } => lo + rng.f() * (hi - lo),
                Shape::LogUniform { lo, hi } => lo * (hi / lo).powf(rng.f()),
                Shape::Exponential { mean } => -mean * (1.0 - rng.f()).ln(),
                Shape::NearConstant { center, rel_jitter } => {
                    center * (1.0 + rel_jitter * (2.0 * rng.f() - 1.0))
                }
                Shape::Spiky { base, spike, p } => {
                    if rng.f() < p {
                        spike * (0.5 + 0.5 * rng.f())
                    } else {
                        base * (0.9 + 0.2 * rng.f())
                    }
                }
            };
            x.clamp(MIN_MS, MAX_MS)
        }

        fn samples(&self, n: usize, rng: &mut Rng) -> Vec<f64> {
            (0..n).map(|_| self.sample(rng)).collect()
        }
    }

    /// Log-uniform time in [lo_exp, hi_exp] decades of ms.
    fn ms(lo_exp: f64, hi_exp: f64) -> impl Strategy<Value = f64> {
        (lo_exp..=hi_exp).prop_map(|e| 10f64.powf(e))
    }

    fn jitter() -> impl Strategy<Value = f64> {
        prop_oneof![Just(0.0), (-12.0f64..=-1.0).prop_map(|e| 10f64.powf(e))]
    }

    fn spiky() -> impl Strategy<Value = Shape> {
        (ms(-3.0, 1.0), ms(3.0, 4.0), 0.001f64..0.2).prop_map(|(base, spike, p)| Shape::Spiky {
            base,
            spike,
            p,
        })
    }

    fn near_constant() -> impl Strategy<Value = Shape> {
        (ms(-3.0, 4.0), jitter())
            .prop_map(|(center, rel_jitter)| Shape::NearConstant { center, rel_jitter })
    }

    fn shape() -> impl Strategy<Value = Shape> {
        prop_oneof![
            (ms(-3.0, 4.0), ms(-3.0, 4.0)).prop_map(|(a, b)| Shape::Uniform {
                lo: a.min(b),
                hi: a.max(b)
            }),
            (ms(-3.0, 4.0), ms(-3.0, 4.0)).prop_map(|(a, b)| Shape::LogUniform {
                lo: a.min(b),
                hi: a.max(b)
            }),
            ms(-3.0, 4.0).prop_map(|mean| Shape::Exponential { mean }),
            near_constant(),
            spiky(),
        ]
    }

    fn config(cases: u32) -> ProptestConfig {
        ProptestConfig {
            cases,
            // no regression files next to the source tree
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    proptest! {
        #![proptest_config(config(2048))]

        /// Mixed distributions, history 0..=2000 calls, window 1..=2000.
        #[test]
        fn prop_window_matches_direct_stats(
            hist_shape in shape(),
            win_shape in shape(),
            n1 in 0usize..=2000,
            nw in 1usize..=2000,
            seed in any::<u64>(),
        ) {
            let mut rng = Rng(seed);
            let hist = hist_shape.samples(n1, &mut rng);
            let win = win_shape.samples(nw, &mut rng);
            check_window(&hist, &win).map_err(TestCaseError::fail)?;
        }

        /// A stationary query: the window has the same distribution as the
        /// history (window mean ≈ history mean, often mean >> stddev).
        #[test]
        fn prop_stationary_query(
            shape in shape(),
            n1 in 1usize..=2000,
            nw in 1usize..=2000,
            seed in any::<u64>(),
        ) {
            let mut rng = Rng(seed);
            let hist = shape.samples(n1, &mut rng);
            let win = shape.samples(nw, &mut rng);
            check_window(&hist, &win).map_err(TestCaseError::fail)?;
        }

        /// The hard case: a (nearly) constant window after big spikes.
        #[test]
        fn prop_near_constant_window_after_spiky_history(
            hist_shape in spiky(),
            win_shape in near_constant(),
            n1 in 1usize..=2000,
            nw in 1usize..=2000,
            seed in any::<u64>(),
        ) {
            let mut rng = Rng(seed);
            let hist = hist_shape.samples(n1, &mut rng);
            let win = win_shape.samples(nw, &mut rng);
            check_window(&hist, &win).map_err(TestCaseError::fail)?;
        }

        /// Arbitrary bit patterns (NaN, inf, negative, subnormal, huge):
        /// never a negative or non-finite result.
        #[test]
        fn prop_arbitrary_inputs_never_negative_or_nan(
            p in (any::<u64>(), any::<f64>(), any::<f64>(), any::<f64>()),
            c in (any::<u64>(), any::<f64>(), any::<f64>(), any::<f64>()),
            small_calls in (0u64..5, 0u64..5),
            use_small in any::<bool>(),
        ) {
            let (pc, cc) = if use_small { small_calls } else { (p.0, c.0) };
            let prev = Cumulative { calls: pc, total: p.1, mean: p.2, stddev: p.3 };
            let cur = Cumulative { calls: cc, total: c.1, mean: c.2, stddev: c.3 };
            assert_sane(&prev, &cur)?;
        }

        /// Plausible magnitudes but unrelated fields (inconsistent states
        /// exercise the clamps): never a negative or non-finite result.
        #[test]
        fn prop_plausible_inputs_never_negative_or_nan(
            p in (0u64..1_000_000, 0.0f64..1e9, 0.0f64..1e5, 0.0f64..1e5),
            c in (0u64..1_000_000, 0.0f64..1e9, 0.0f64..1e5, 0.0f64..1e5),
        ) {
            let prev = Cumulative { calls: p.0, total: p.1, mean: p.2, stddev: p.3 };
            let cur = Cumulative { calls: c.0, total: c.1, mean: c.2, stddev: c.3 };
            assert_sane(&prev, &cur)?;
        }
    }

    fn assert_sane(prev: &Cumulative, cur: &Cumulative) -> Result<(), TestCaseError> {
        if let Some(w) = window(prev, cur) {
            prop_assert_eq!(Some(w.calls), cur.calls.checked_sub(prev.calls));
            for v in [w.total, w.mean, w.stddev] {
                prop_assert!(v.is_finite() && v >= 0.0, "{:?}", w);
            }
            prop_assert!(w.total <= cur.total);
        }
        Ok(())
    }
}
