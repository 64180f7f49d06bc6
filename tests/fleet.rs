//! Fleet mode against a real PostgreSQL, with the real binary: two instances with
//! `shard: {total: 2}` split 20 targets between them (each polled by exactly one, all
//! polled); a targets file edited while pgvigil runs is picked up within one collector
//! interval without a SIGHUP, and a broken one is rejected with file:line while the
//! previous targets keep running.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::binary::{command, Pgvigil};
use common::*;

const WAIT: Duration = Duration::from_secs(60);

/// The targets with a `pg_up` series in a scrape, and those with `pg_up 1`.
fn targets_up(s: &[Sample]) -> (BTreeSet<String>, BTreeSet<String>) {
    let all = find(s, "pg_up", &[]);
    let names = |up: bool| {
        all.iter()
            .filter(|x| !up || x.value == 1.0)
            .filter_map(|x| x.labels.get("target").cloned())
            .collect()
    };
    (names(false), names(true))
}

/// `n` targets on one server, each with its own application_name.
fn targets_yaml(dsn: &str, names: &[String]) -> String {
    names
        .iter()
        .map(|n| {
            format!("  - {{name: {n}, dsn: \"{dsn}&application_name=pgvigil-{n}\", max_connections: 1}}\n")
        })
        .collect()
}

#[test]
fn two_shards_split_twenty_targets_each_polled_by_exactly_one() {
    let pg = cluster(&[]);
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..20).map(|i| format!("db-{i:02}")).collect();
    let config = |index: usize| {
        format!(
            "listen: 127.0.0.1:0\nshard: {{index: {index}, total: 2}}\ncollectors:\n  defaults: {{interval: 10s, timeout: 5s}}\ntargets:\n{}",
            targets_yaml(&pg.dsn(), &names)
        )
    };
    let paths = [0, 1].map(|i| write(dir.path(), &format!("shard{i}.yaml"), &config(i)));

    // check-config shows the shard and marks the targets this instance owns.
    let mut owned_by_plan = Vec::new();
    for path in &paths {
        let out = command()
            .args(["check-config", path.to_str().unwrap()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let owned: BTreeSet<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("* "))
            .filter_map(|l| l.split([':', ' ']).next())
            .map(str::to_string)
            .collect();
        assert!(
            text.contains(&format!(
                "this instance polls {} of 20 targets",
                owned.len()
            )),
            "{text}"
        );
        owned_by_plan.push(owned);
    }

    // A shard that cannot be: a clear error, from the command line or the config.
    let out = command()
        .args(["check-config", paths[0].to_str().unwrap(), "--shard", "2/2"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("index 2 must be less than total 2"), "{err}");
    let bad = write(
        dir.path(),
        "bad.yaml",
        &config(0).replace("index: 0, total: 2", "index: 0, total: 0"),
    );
    let out = command()
        .args(["check-config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yaml:2:") && err.contains("shard.total: total must be at least 1"),
        "{err}"
    );

    let children = paths.map(|p| Pgvigil::start(["--config", p.to_str().unwrap()], &[]));
    let mut seen = Vec::new();
    for (i, child) in children.iter().enumerate() {
        let want = owned_by_plan[i].clone();
        let (present, shard_targets) = wait_for(child, WAIT, "every owned target up", |s| {
            let (present, up) = targets_up(s);
            let n = value(s, "pgvigil_shard_targets", &[("shard", &format!("{i}/2"))])?;
            (up == want).then_some((present, n))
        });
        assert_eq!(
            present, want,
            "instance {i}: only its own targets have pg_up"
        );
        assert_eq!(shard_targets, want.len() as f64);
        println!(
            "instance {i}/2 polls {} targets: {present:?}",
            present.len()
        );
        seen.push(present);
    }
    // A few intervals later, still exactly the same split (no target drifts over).
    std::thread::sleep(Duration::from_secs(3));
    for (i, child) in children.iter().enumerate() {
        let (_, body) = get(&child.url("/metrics"));
        assert_eq!(targets_up(&parse(&body)).0, seen[i], "instance {i}");
    }
    assert!(seen[0].is_disjoint(&seen[1]), "{seen:?}");
    let union: BTreeSet<String> = seen[0].union(&seen[1]).cloned().collect();
    assert_eq!(
        union,
        names.iter().cloned().collect(),
        "the union covers all 20"
    );
    // Both shards got a share (rendezvous hashing of these 20 names: not all on one).
    assert!(!seen[0].is_empty() && !seen[1].is_empty(), "{seen:?}");

    // On the server: each target's application_name is connected, from one instance.
    let out = std::process::Command::new(pg.bindir().join("psql"))
        .args([
            &pg.dsn(),
            "-At",
            "-c",
            "SELECT count(DISTINCT application_name) FROM pg_stat_activity WHERE application_name LIKE 'pgvigil-db-%'",
        ])
        .output()
        .unwrap();
    let distinct = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(distinct, "20", "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn an_edited_targets_file_is_picked_up_and_a_broken_one_rejected_with_file_and_line() {
    let pg = cluster(&[]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("targets.d")).unwrap();
    let interval = Duration::from_secs(5);
    let config = write(
        dir.path(),
        "pgvigil.yaml",
        "listen: 127.0.0.1:0\ntargets_files: [\"targets.d/*.yaml\"]\ncollectors:\n  defaults: {interval: 5s, timeout: 5s}\n",
    );
    let file = dir.path().join("targets.d/team-a.yaml");
    let list = |names: &[&str]| {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        targets_yaml(&pg.dsn(), &names)
            .lines()
            .map(|l| format!("{}\n", l.trim_start()))
            .collect::<String>()
    };
    std::fs::write(&file, list(&["t1", "t2"])).unwrap();
    let mut child = Pgvigil::start(["--config", config.to_str().unwrap()], &[]);
    wait_for(&child, WAIT, "t1 and t2 up", |s| {
        (targets_up(s).1 == ["t1", "t2"].map(String::from).into()).then_some(())
    });

    // Edited: t1 removed, t3 added. No SIGHUP: the file's mtime changed.
    std::fs::write(&file, list(&["t2", "t3"])).unwrap();
    let edited = Instant::now();
    wait_for(&child, WAIT, "t3 up, t1 gone", |s| {
        let (present, up) = targets_up(s);
        (present == ["t2", "t3"].map(String::from).into() && up.contains("t3")).then_some(())
    });
    let took = edited.elapsed();
    println!("targets file edit picked up and the new target polled in {took:?}");
    assert!(took <= interval, "took {took:?}, more than one interval");
    let line = child.wait_for_log("(after a change of the targets files)", WAIT);
    assert!(
        line.contains("1 targets unchanged, 0 changed, 1 added, 1 removed"),
        "{line}"
    );
    let (_, body) = get(&child.url("/metrics"));
    let s = parse(&body);
    assert_eq!(
        value(&s, "pgvigil_config_last_reload_successful", &[]),
        Some(1.0)
    );

    // Broken: an unclosed flow sequence on line 4. Rejected with file:line, t2 and t3 keep
    // being polled, the reload metric says 0.
    std::fs::write(
        &file,
        format!("{}- name: t4\n  dsn: [oops\n", list(&["t2", "t3"])),
    )
    .unwrap();
    let s = wait_for(&child, WAIT, "the reload rejected", |s| {
        (value(s, "pgvigil_config_last_reload_successful", &[]) == Some(0.0)).then(|| s.to_vec())
    });
    let line = child.wait_for_log("rejected", WAIT);
    let located = format!("{}:", file.display());
    assert!(line.contains(&located), "no file in: {line}");
    let at = line.split(&located).nth(1).unwrap_or("");
    let line_no: usize = at
        .split(':')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no line number in: {line}"));
    assert!((4..=6).contains(&line_no), "line {line_no} in: {line}");
    println!("broken targets file: {line}");
    // The latest poll of any collector of `t`.
    let last_success = |s: &[Sample], t: &str| {
        find(
            s,
            "pgvigil_collector_last_success_timestamp_seconds",
            &[("target", t)],
        )
        .iter()
        .map(|x| x.value)
        .reduce(f64::max)
    };
    let before = ["t2", "t3"].map(|t| last_success(&s, t).expect("t2/t3 polled"));
    assert_eq!(targets_up(&s).1, ["t2", "t3"].map(String::from).into());
    // The old targets keep running: their polls go on after the rejection.
    wait_for(&child, WAIT, "t2 and t3 polled again", |s| {
        let now = ["t2", "t3"].map(|t| last_success(s, t).unwrap_or(0.0));
        (now[0] > before[0] && now[1] > before[1] && targets_up(s).0.len() == 2).then_some(())
    });

    // Fixed: applied, the metric back to 1, t4 polled.
    std::fs::write(&file, list(&["t2", "t3", "t4"])).unwrap();
    wait_for(&child, WAIT, "the fixed file applied", |s| {
        (value(s, "pgvigil_config_last_reload_successful", &[]) == Some(1.0)
            && targets_up(s).1.contains("t4"))
        .then_some(())
    });
    // A SIGHUP re-reads the targets files too (nothing changed: all kept).
    child.signal("HUP");
    let line = child.wait_for_log("(after SIGHUP)", WAIT);
    assert!(
        line.contains("3 targets unchanged, 0 changed, 0 added, 0 removed"),
        "{line}"
    );
    let log = child.stop();
    assert!(!log.contains("panicked"), "{}", tail(&log, 20));
    assert!(Path::new(&file).exists());
}

/// The reference deployment (`deploy/kubernetes/`): the ConfigMap's config and targets
/// file, laid out as the StatefulSet mounts them, pass `check-config` for every pod
/// ordinal, whose shards split the targets exactly; `PGVIGIL_SHARD`'s N is `replicas`.
#[test]
fn the_kubernetes_manifests_shard_the_config_map_targets_over_the_replicas() {
    use serde_yaml_ng::Value;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let read = |name: &str| -> Value {
        serde_yaml_ng::from_str(&std::fs::read_to_string(dir.join(name)).unwrap()).unwrap()
    };
    let sts = read("statefulset.yaml");
    let replicas = sts["spec"]["replicas"].as_u64().unwrap() as usize;
    let pod = &sts["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], Value::Bool(true));
    assert_eq!(pod["securityContext"]["runAsUser"].as_u64(), Some(10001));
    let container = &pod["containers"][0];
    let shard = container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "PGVIGIL_SHARD")
        .and_then(|e| e["value"].as_str())
        .unwrap();
    assert_eq!(
        shard,
        format!("auto/{replicas}"),
        "N must be the replica count"
    );
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");

    // The ConfigMap's keys where the volume's items put them.
    let data = read("configmap.yaml")["data"].clone();
    let mount = tempfile::tempdir().unwrap();
    let secret = write(mount.path(), "password", "not-a-real-password\n");
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "config")
        .unwrap();
    for item in volume["configMap"]["items"].as_sequence().unwrap() {
        let text = data[item["key"].as_str().unwrap()]
            .as_str()
            .unwrap()
            .replace("/run/secrets/pgvigil/password", secret.to_str().unwrap());
        let path = mount.path().join(item["path"].as_str().unwrap());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    let config = mount.path().join("pgvigil.yaml");
    let mut owned = Vec::new();
    let mut all = BTreeSet::new();
    for ordinal in 0..replicas {
        let out = command()
            .args(["check-config", config.to_str().unwrap()])
            .env("PGVIGIL_SHARD", format!("{ordinal}/{replicas}"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && text.ends_with("config OK\n"),
            "pod {ordinal}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let name = |l: &str| l[2..].split(':').next().unwrap_or("").to_string();
        let lines: Vec<&str> = text
            .lines()
            .skip_while(|l| *l != "targets:")
            .skip(1)
            .take_while(|l| l.starts_with("  ") || l.starts_with("* "))
            .collect();
        all.extend(lines.iter().map(|l| name(l)));
        let mine: BTreeSet<String> = lines
            .iter()
            .filter(|l| l.starts_with("* "))
            .map(|l| name(l))
            .collect();
        println!("pod pgvigil-{ordinal} (shard {ordinal}/{replicas}) polls {mine:?}");
        owned.push(mine);
    }
    assert!(all.len() >= replicas, "{all:?}");
    let union: BTreeSet<String> = owned.iter().flatten().cloned().collect();
    assert_eq!(union, all);
    assert_eq!(
        owned.iter().map(BTreeSet::len).sum::<usize>(),
        all.len(),
        "each target owned by exactly one pod"
    );
}

/// An instance with nothing to poll (its shard owns no target, or the targets files name
/// none yet) is ready: a StatefulSet pod must not stay out of rotation for that.
#[test]
fn an_instance_without_targets_is_ready_and_says_it_owns_none() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("targets.d")).unwrap();
    let config = write(
        dir.path(),
        "pgvigil.yaml",
        "listen: 127.0.0.1:0\ntargets_files: [\"targets.d/*.yaml\"]\n",
    );
    let child = Pgvigil::start(["--config", config.to_str().unwrap()], &[]);
    wait_until(WAIT, "/readyz 200", || get(&child.url("/readyz")).0 == 200);
    let (_, body) = get(&child.url("/metrics"));
    let s = parse(&body);
    assert_eq!(
        value(&s, "pgvigil_shard_targets", &[("shard", "0/1")]),
        Some(0.0)
    );
    assert!(find(&s, "pg_up", &[]).is_empty(), "{body}");
}
