//! Poll lag (`pgvigil_poll_lag_*`, DESIGN §9) against a real PostgreSQL: every poll is
//! counted, in both kinds of poll loop, and on a machine that keeps up they start on time.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(30);

/// `within` bound → polls, for `scope`.
fn lag(samples: &[Sample], scope: &str) -> BTreeMap<String, f64> {
    find(samples, "pgvigil_poll_lag_polls_total", &[("scope", scope)])
        .into_iter()
        .map(|s| (s.labels["within"].clone(), s.value))
        .collect()
}

fn delta(after: &BTreeMap<String, f64>, before: &BTreeMap<String, f64>, within: &str) -> f64 {
    after[within] - before[within]
}

#[test]
fn every_poll_is_counted_and_on_time_when_the_machine_keeps_up() {
    let pg = cluster(&[]);
    let run = start(config(&one_target(&pg.dsn(), "")));
    // Every collector has run once: the first (jittered) ticks are behind us.
    let before = wait_for(&run, WAIT, "a round of database visits", |s| {
        (lag(s, "database").get("+Inf").copied()? >= 2.0).then(|| s.to_vec())
    });
    std::thread::sleep(Duration::from_secs(5));
    let after = parse(&get(&run.url("/metrics")).1);

    // No per-target series: three scopes, a bucket per bound and +Inf.
    let polls = find(&after, "pgvigil_poll_lag_polls_total", &[]);
    assert_eq!(polls.len(), 42, "{polls:?}");
    assert!(polls.iter().all(|s| !s.labels.contains_key("target")));

    for scope in ["cluster", "database", "activity"] {
        let (b, a) = (lag(&before, scope), lag(&after, scope));
        // Cumulative: each bound counts at least what the one below it does.
        let mut bounds: Vec<(f64, f64)> = a
            .iter()
            .map(|(w, n)| (w.parse::<f64>().unwrap_or(f64::INFINITY), *n))
            .collect();
        bounds.sort_by(|x, y| x.0.total_cmp(&y.0));
        assert!(
            bounds.windows(2).all(|w| w[0].1 <= w[1].1),
            "{scope}: {bounds:?}"
        );
        // A 1 s interval for 5 s: about five polls per loop (a round of visits for all
        // database-scope collectors; a run per cluster-scope collector).
        let polls = delta(&a, &b, "+Inf");
        assert!(polls >= 3.0, "{scope}: {polls} polls in 5 s");
        // A test machine is busy, but not a second late for nearly every poll.
        let on_time = delta(&a, &b, "1");
        assert!(
            on_time >= 0.9 * polls,
            "{scope}: {on_time} of {polls} polls started within 1 s"
        );
    }
    let cluster = delta(&lag(&after, "cluster"), &lag(&before, "cluster"), "+Inf");
    let rounds = delta(&lag(&after, "database"), &lag(&before, "database"), "+Inf");
    assert!(
        cluster > rounds,
        "each cluster-scope collector polls on its own: {cluster} vs {rounds} rounds"
    );
    let sum = |s: &[Sample]| value(s, "pgvigil_poll_lag_seconds_total", &[("scope", "cluster")]);
    let lagged = sum(&after).unwrap() - sum(&before).unwrap();
    assert!(
        (0.0..cluster * 0.5).contains(&lagged),
        "{lagged} s of lag over {cluster} polls"
    );
}
