//! The delta rule of an `other` bucket, shared by the steps that keep series for the top N
//! entries only (`statements`: `queryid="other"`; `table_top_n`: `table="other"`).
//!
//! Per entry and counter column: an entry without its own series at both ends of a poll
//! interval hands its increase in the interval to `other`; at the first poll the
//! non-members hand their cumulative values (members keep their history in their own
//! series), and an entry new since the previous poll hands all it has. A reset (the caller
//! decides what that is: counters went down, a new identity) or a vanished entry hands
//! nothing, so `other` never decreases. An entry that has had its own series remembers
//! what it handed since: its series is its cumulative value minus that, so it continues
//! where it stopped when it re-enters, instead of jumping by what `other` already counted.
//! Values are per counter column; NaN means NULL ("nothing").

use crate::collector::table::Cell;

/// What is remembered of an entry between polls.
#[derive(Debug, Clone)]
pub struct Tracked {
    /// The counter columns' cumulative values (NaN for NULL).
    pub counters: Box<[f64]>,
    /// It had its own series.
    pub member: bool,
    /// What it handed to `other` since it first had its own series; `None` if never.
    handed: Option<Box<[f64]>>,
}

impl Tracked {
    /// One poll of an entry: `prev` is what was remembered of it (none: new, or first
    /// poll when `!polled`), `reset` whether its counters restarted since. Returns what it
    /// hands to `other` for the interval (none: nothing) and what to remember.
    pub fn advance(
        prev: Option<&Tracked>,
        polled: bool,
        counters: Box<[f64]>,
        member: bool,
        reset: bool,
    ) -> (Option<Vec<f64>>, Tracked) {
        let delta = match prev {
            None if !polled && member => None,
            None => Some(counters.to_vec()),
            Some(p) if p.member && member => None,
            Some(_) if reset => None,
            Some(p) => Some(
                counters
                    .iter()
                    .zip(p.counters.iter())
                    .map(|(n, p)| match (n.is_nan(), p.is_nan()) {
                        (true, _) => f64::NAN,
                        (false, true) => *n,
                        (false, false) => (n - p).max(0.0),
                    })
                    .collect(),
            ),
        };
        let mut handed = prev.and_then(|p| match &p.handed {
            // A reset restarts the entry's counters, and its series with them.
            Some(_) if reset => Some(vec![0.0; counters.len()].into_boxed_slice()),
            h => h.clone(),
        });
        if let (Some(h), Some(d)) = (handed.as_mut(), delta.as_ref()) {
            add(h, d);
        }
        if member && handed.is_none() {
            handed = Some(vec![0.0; counters.len()].into_boxed_slice());
        }
        let tracked = Tracked {
            counters,
            member,
            handed,
        };
        (delta, tracked)
    }

    /// The member's series values: cumulative minus handed (NULL stays NULL).
    pub fn series(&self) -> impl Iterator<Item = Cell> + '_ {
        let handed = self.handed.as_deref().unwrap_or(&[]);
        self.counters.iter().enumerate().map(move |(j, v)| {
            let v = v - handed.get(j).copied().unwrap_or(0.0);
            if v.is_nan() {
                Cell::Null
            } else {
                Cell::Number(v)
            }
        })
    }
}

/// Adds `delta` into `sum`, NaN meaning "nothing".
pub fn add(sum: &mut [f64], delta: &[f64]) {
    for (s, d) in sum.iter_mut().zip(delta) {
        if !d.is_nan() {
            *s = if s.is_nan() { *d } else { *s + d };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll(
        prev: Option<&Tracked>,
        polled: bool,
        v: f64,
        member: bool,
        reset: bool,
    ) -> (Option<Vec<f64>>, Tracked) {
        Tracked::advance(prev, polled, vec![v].into_boxed_slice(), member, reset)
    }

    #[test]
    fn deltas_go_to_other_unless_a_member_at_both_ends_and_series_continue() {
        // First poll: a member keeps its history, a non-member hands it.
        let (d, a) = poll(None, false, 10.0, true, false);
        assert_eq!(d, None);
        let (d, _) = poll(None, false, 5.0, false, false);
        assert_eq!(d, Some(vec![5.0]));
        // a leaves: its 4 new go to other; it comes back: 6 more, then a member at both ends.
        let (d, a) = poll(Some(&a), true, 14.0, false, false);
        assert_eq!(d, Some(vec![4.0]));
        let (d, a) = poll(Some(&a), true, 20.0, true, false);
        assert_eq!(d, Some(vec![6.0]));
        assert_eq!(a.series().collect::<Vec<_>>(), [Cell::Number(10.0)]);
        let (d, a) = poll(Some(&a), true, 25.0, true, false);
        assert_eq!(d, None);
        assert_eq!(a.series().collect::<Vec<_>>(), [Cell::Number(15.0)]);
        // A reset outside hands nothing and restarts the series.
        let (d, a) = poll(Some(&a), true, 30.0, false, false);
        assert_eq!(d, Some(vec![5.0]));
        let (d, a) = poll(Some(&a), true, 2.0, true, true);
        assert_eq!(d, None);
        assert_eq!(a.series().collect::<Vec<_>>(), [Cell::Number(2.0)]);
    }
}
