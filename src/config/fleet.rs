//! Fleet mode: which targets this instance owns (`shard:`), and more targets from files
//! (`targets_files:`) that are read with the config and watched for changes.
//!
//! Ownership is the hash alone (rendezvous hashing over the target's name), so instances
//! need no coordination: each computes the same owner for every name. Nothing here
//! touches the network; the watcher only compares file names, sizes and mtimes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Deserialize;

use super::{ConfigError, TargetConfig};
use crate::yaml;

/// This instance's share of the targets: it polls the targets whose name hashes to
/// `index` among `total` instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shard {
    /// 0-based; less than `total`.
    pub index: usize,
    /// How many instances share the targets; at least 1.
    pub total: usize,
}

impl Default for Shard {
    /// One instance owns everything.
    fn default() -> Self {
        Shard { index: 0, total: 1 }
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.total)
    }
}

impl Shard {
    /// Why these numbers cannot be a shard, if they cannot.
    pub fn problem(&self) -> Option<String> {
        if self.total == 0 {
            Some("total must be at least 1".to_string())
        } else if self.index >= self.total {
            Some(format!(
                "index {} must be less than total {} (shards are numbered 0 to {})",
                self.index,
                self.total,
                self.total - 1
            ))
        } else {
            None
        }
    }

    /// Whether this instance polls the target called `name`.
    pub fn owns(&self, name: &str) -> bool {
        owner(name, self.total) == self.index
    }

    /// Parses `--shard` / `PGVIGIL_SHARD`: `I/N`, or `auto/N`, where the index is the
    /// trailing `-<ordinal>` of the host name (a StatefulSet pod is `<name>-<ordinal>`).
    pub fn parse_arg(s: &str, hostname: impl FnOnce() -> Option<String>) -> Result<Shard, String> {
        let usage = "write I/N (e.g. 0/3) or auto/N";
        let (index, total) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| format!("invalid shard {s:?}: {usage}"))?;
        let total: usize = total
            .trim()
            .parse()
            .map_err(|_| format!("invalid shard {s:?}: N is not a whole number; {usage}"))?;
        let index = match index.trim() {
            "auto" => {
                let host =
                    hostname().ok_or_else(|| format!("shard {s:?}: cannot read the host name"))?;
                ordinal(&host).ok_or_else(|| {
                    format!(
                        "shard {s:?}: the host name {host:?} does not end in -<ordinal> (a StatefulSet pod name)"
                    )
                })?
            }
            i => i
                .parse()
                .map_err(|_| format!("invalid shard {s:?}: I is not a whole number; {usage}"))?,
        };
        let shard = Shard { index, total };
        match shard.problem() {
            Some(p) => Err(format!("invalid shard {s:?}: {p}")),
            None => Ok(shard),
        }
    }
}

/// The trailing `-<ordinal>` of a StatefulSet pod's host name (`pgvigil-2` → 2).
pub fn ordinal(host: &str) -> Option<usize> {
    let host = host.split('.').next().unwrap_or(host);
    let (_, n) = host.rsplit_once('-')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// This machine's host name (for `auto/N`).
pub fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into the buffer passed.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).into_owned();
    (!name.is_empty()).then_some(name)
}

/// The shard (0..total) that owns `name`: the one with the highest score for it
/// (rendezvous hashing). Changing `total` from N to N+1 moves only the names the new shard
/// wins, about 1/(N+1) of them; the others keep their owner.
pub fn owner(name: &str, total: usize) -> usize {
    (0..total.max(1))
        .max_by_key(|&i| (score(name, i), std::cmp::Reverse(i)))
        .unwrap_or(0)
}

/// A stable 64-bit hash of (name, shard): FNV-1a over the name, a separator and the
/// shard number, then MurmurHash3's finalizer so that names differing in one character
/// get unrelated scores. Stable across processes, versions and platforms (std's hasher is
/// randomly keyed per process, which would give every instance a different owner).
fn score(name: &str, shard: usize) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = FNV_OFFSET;
    let bytes = name
        .bytes()
        .chain([0xff])
        .chain((shard as u64).to_le_bytes());
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The files `patterns` name now, sorted, each once. Relative patterns are relative to
/// `base` (the config file's directory); hidden files only when the pattern says so. A
/// pattern that matches nothing is not an error (a directory of target files may be empty
/// for a while).
pub fn expand(patterns: &[String], base: &Path) -> Result<Vec<PathBuf>, (usize, String)> {
    let mut files = std::collections::BTreeSet::new();
    for (i, p) in patterns.iter().enumerate() {
        let full = if Path::new(p).is_absolute() {
            p.clone()
        } else {
            base.join(p).to_string_lossy().into_owned()
        };
        // Like a shell: `*` skips hidden files (editor swap and lock files, `..data` of a
        // mounted ConfigMap).
        let options = glob::MatchOptions {
            require_literal_leading_dot: true,
            ..glob::MatchOptions::new()
        };
        let paths = glob::glob_with(&full, options)
            .map_err(|e| (i, format!("targets_files[{i}]: invalid pattern {p:?}: {e}")))?;
        for path in paths {
            match path {
                Ok(path) if path.is_file() => {
                    files.insert(path);
                }
                Ok(_) => {}
                Err(e) => return Err((i, format!("targets_files[{i}]: {p:?}: {e}"))),
            }
        }
    }
    Ok(files.into_iter().collect())
}

/// The names, sizes and modification times of the files `patterns` name: when it differs
/// from the last one seen, the targets files are read again.
pub type FilesState = BTreeMap<PathBuf, Option<(SystemTime, u64)>>;

/// The [`FilesState`] now (an invalid pattern counts as no files: the reload reports it).
pub fn files_state(patterns: &[String], base: &Path) -> FilesState {
    expand(patterns, base)
        .unwrap_or_default()
        .into_iter()
        .map(|p| {
            let meta = std::fs::metadata(&p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())));
            (p, meta)
        })
        .collect()
}

/// Watches the targets files of the running configuration.
#[derive(Debug, Clone)]
pub struct TargetsWatch {
    patterns: Vec<String>,
    base: PathBuf,
    last: FilesState,
}

impl TargetsWatch {
    /// What the configuration's targets files looked like when it was read; `None` when it
    /// has no `targets_files`.
    pub fn of(config: &super::Config) -> Option<TargetsWatch> {
        let (patterns, base) = config.targets_files_source()?;
        Some(TargetsWatch {
            patterns,
            base,
            last: config.targets_files_state.clone(),
        })
    }

    /// Whether the files changed since the last call (or since the config was read);
    /// a change is reported once, whatever the reload then makes of it.
    pub fn changed(&mut self) -> bool {
        let now = files_state(&self.patterns, &self.base);
        if now == self.last {
            return false;
        }
        self.last = now;
        true
    }
}

/// Reads the targets of one targets file: a YAML list of entries in the format of the
/// config's `targets:`. An empty file has none.
pub fn read_targets_file(path: &Path) -> Result<(Vec<TargetConfig>, String), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if text.trim().is_empty() {
        return Ok((Vec::new(), text));
    }
    let targets: Option<Vec<TargetConfig>> = yaml::parse(path, &text).map_err(|mut e| {
        // serde's path of an item of a top-level list is `.[2].dsn`.
        if let Some(rest) = e.message.strip_prefix(".[") {
            e.message = format!("[{rest}");
        }
        e
    })?;
    Ok((targets.unwrap_or_default(), text))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Owners of `n` names over `total` shards.
    fn owners(names: &[String], total: usize) -> Vec<usize> {
        names.iter().map(|n| owner(n, total)).collect()
    }

    #[test]
    fn growing_from_4_to_5_shards_moves_about_a_fifth_and_stays_balanced() {
        let names: Vec<String> = (0..10_000)
            .map(|i| format!("db-{i}.prod.example.com"))
            .collect();
        let four = owners(&names, 4);
        let five = owners(&names, 5);
        let moved = four.iter().zip(&five).filter(|(a, b)| a != b).count();
        let fraction = moved as f64 / names.len() as f64;
        println!(
            "4 -> 5 shards: {moved} of {} names moved ({fraction:.4}; ideal 0.2000)",
            names.len()
        );
        assert!((0.17..=0.23).contains(&fraction), "moved {fraction}");
        // Every name that moved went to the new shard: no churn among the old ones.
        assert!(four.iter().zip(&five).all(|(a, b)| a == b || *b == 4));
        for (total, owners) in [(4, &four), (5, &five)] {
            let ideal = names.len() as f64 / total as f64;
            for shard in 0..total {
                let n = owners.iter().filter(|&&o| o == shard).count() as f64;
                println!(
                    "{total} shards: shard {shard} owns {n} ({:+.1} %)",
                    (n / ideal - 1.0) * 100.0
                );
                assert!(
                    (n / ideal - 1.0).abs() <= 0.10,
                    "shard {shard}/{total}: {n}"
                );
            }
        }
    }

    #[test]
    fn ownership_is_stable_and_exclusive() {
        // Fixed values (also computed by an independent Python version of the hash): a
        // change of the hash would move the targets of every running fleet.
        assert_eq!(owner("orders-primary", 1), 0);
        let names = ["a", "b", "orders-primary", "db-17", "t0", "t1", "t2", "t3"].map(String::from);
        assert_eq!(owners(&names, 3), [0, 1, 0, 0, 0, 0, 1, 1]);
        for name in ["a", "b", "orders-primary", "db-17"] {
            let owning = (0..3)
                .filter(|&i| Shard { index: i, total: 3 }.owns(name))
                .count();
            assert_eq!(owning, 1, "{name}");
        }
    }

    #[test]
    fn the_argument_is_i_of_n_or_auto_from_the_pod_name() {
        let none = || None;
        assert_eq!(
            Shard::parse_arg("1/3", none),
            Ok(Shard { index: 1, total: 3 })
        );
        let e = Shard::parse_arg("3/3", none).unwrap_err();
        assert!(e.contains("index 3 must be less than total 3"), "{e}");
        let e = Shard::parse_arg("0/0", none).unwrap_err();
        assert!(e.contains("total must be at least 1"), "{e}");
        assert!(Shard::parse_arg("1", none).unwrap_err().contains("I/N"));
        assert!(Shard::parse_arg("x/2", none).is_err());
        assert_eq!(
            Shard::parse_arg("auto/4", || Some("pgvigil-2".into())),
            Ok(Shard { index: 2, total: 4 })
        );
        let e = Shard::parse_arg("auto/2", || Some("pgvigil-2".into())).unwrap_err();
        assert!(e.contains("index 2 must be less than total 2"), "{e}");
        let e = Shard::parse_arg("auto/2", || Some("laptop".into())).unwrap_err();
        assert!(e.contains("does not end in -<ordinal>"), "{e}");
        assert_eq!(ordinal("pgvigil-10.pgvigil.monitoring.svc"), Some(10));
        assert_eq!(ordinal("web-abc"), None);
    }
}
