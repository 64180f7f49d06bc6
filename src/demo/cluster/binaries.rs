//! Finding programs: the PostgreSQL server binaries ([`find_bindir`]) and the
//! system tools (`runuser`, `chown`, `kill`, ...) a cluster needs. Nothing here
//! starts a server; it only looks at the file system and asks `pg_config`.

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::ClusterError;

/// Environment variable that points [`find_bindir`] at a specific bindir.
pub const BINDIR_ENV: &str = "PGVIGIL_PG_BINDIR";

/// Root of Debian/Ubuntu's versioned PostgreSQL installations.
const DEBIAN_LIB_ROOT: &str = "/usr/lib/postgresql";

/// Binaries a bindir must contain for us to be able to run a cluster.
const REQUIRED_BINARIES: [&str; 3] = ["postgres", "initdb", "pg_ctl"];

/// Places [`find_bindir`] looks in, in order (used in the error message).
const LOOKED_IN: &str = "$PGVIGIL_PG_BINDIR, PATH, `pg_config --bindir`, /usr/lib/postgresql/*/bin";

/// Finds a directory with the PostgreSQL server binaries.
///
/// Order: `$PGVIGIL_PG_BINDIR` (an error if set but unusable), the first
/// `PATH` entry with `initdb` and `postgres` (symlinks into a real bindir are
/// resolved to it), `pg_config --bindir`, then the highest version among
/// `/usr/lib/postgresql/*/bin`. `pg_ctl` must be present too.
pub fn find_bindir() -> Result<PathBuf, ClusterError> {
    find_bindir_in(
        std::env::var_os(BINDIR_ENV),
        std::env::var_os("PATH"),
        pg_config_bindir,
        Path::new(DEBIAN_LIB_ROOT),
    )
}

fn find_bindir_in(
    env_bindir: Option<OsString>,
    path_var: Option<OsString>,
    pg_config: impl FnOnce() -> Option<PathBuf>,
    lib_root: &Path,
) -> Result<PathBuf, ClusterError> {
    // 1. explicit override
    if let Some(dir) = env_bindir.filter(|v| !v.is_empty()) {
        let dir = PathBuf::from(dir);
        check_bindir(&dir, "$PGVIGIL_PG_BINDIR")?;
        return Ok(std::path::absolute(&dir).unwrap_or(dir));
    }
    // 2. PATH
    if let Some(path_var) = path_var {
        for dir in std::env::split_paths(&path_var) {
            if dir.as_os_str().is_empty() || !missing_binaries(&dir).is_empty() {
                continue;
            }
            // /usr/local/bin/postgres -> /usr/lib/postgresql/15/bin/postgres:
            // prefer the real bindir (it has psql and the right ../lib).
            let real = fs::canonicalize(dir.join("postgres"))
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
                .filter(|real| missing_binaries(real).is_empty());
            return Ok(real.unwrap_or_else(|| std::path::absolute(&dir).unwrap_or(dir)));
        }
    }
    // 3. pg_config --bindir
    if let Some(dir) = pg_config().filter(|d| missing_binaries(d).is_empty()) {
        return Ok(dir);
    }
    // 4. /usr/lib/postgresql/*/bin, highest version
    let candidates = fs::read_dir(lib_root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_str()?.to_owned();
            let bin = entry.path().join("bin");
            missing_binaries(&bin).is_empty().then_some((name, bin))
        });
    pick_highest_version(candidates).ok_or_else(|| ClusterError::NoBinaries {
        looked: LOOKED_IN.to_owned(),
    })
}

fn pg_config_bindir() -> Option<PathBuf> {
    let out = Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = String::from_utf8(out.stdout).ok()?;
    let dir = dir.trim();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

/// Picks the directory whose version-like name (`15`, `9.6`, `16.2`) is
/// highest; names that are not versions are ignored.
fn pick_highest_version(
    candidates: impl IntoIterator<Item = (String, PathBuf)>,
) -> Option<PathBuf> {
    candidates
        .into_iter()
        .filter_map(|(name, dir)| parse_dir_version(&name).map(|v| (v, dir)))
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, dir)| dir)
}

fn parse_dir_version(name: &str) -> Option<Vec<u32>> {
    name.split('.')
        .map(|part| part.parse::<u32>().ok())
        .collect()
}

/// Major version from `postgres --version` output
/// (`postgres (PostgreSQL) 15.18 (Debian ...)` => 15, `17devel` => 17) or
/// from a `PG_VERSION` file (`15`). For pre-10 versions (`9.6.24`) this is 9.
pub fn parse_major_version(text: &str) -> Option<u32> {
    let rest = match text.find("(PostgreSQL)") {
        Some(i) => &text[i + "(PostgreSQL)".len()..],
        None => text,
    };
    let token = rest
        .split_whitespace()
        .find(|t| t.starts_with(|c: char| c.is_ascii_digit()))?;
    let digits: String = token.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

pub(super) fn check_bindir(dir: &Path, origin: &'static str) -> Result<(), ClusterError> {
    let missing = missing_binaries(dir);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(ClusterError::BadBindir {
            origin,
            dir: dir.to_path_buf(),
            missing: missing.join(", "),
        })
    }
}

fn missing_binaries(dir: &Path) -> Vec<&'static str> {
    REQUIRED_BINARIES
        .iter()
        .copied()
        .filter(|name| !is_executable(&dir.join(name)))
        .collect()
}

pub(super) fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Absolute path of a system tool (PATH may lack the sbin directories),
/// or just its name for a PATH lookup.
pub(super) fn system_tool(name: &str) -> PathBuf {
    find_system_tool(name).unwrap_or_else(|| PathBuf::from(name))
}

pub(super) fn find_system_tool(name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|p| is_executable(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn major_version_from_postgres_version_output() {
        assert_eq!(
            parse_major_version("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n"),
            Some(15)
        );
        assert_eq!(parse_major_version("postgres (PostgreSQL) 16.4"), Some(16));
        assert_eq!(
            parse_major_version("postgres (PostgreSQL) 17devel"),
            Some(17)
        );
        assert_eq!(
            parse_major_version("postgres (PostgreSQL) 18beta1"),
            Some(18)
        );
        assert_eq!(parse_major_version("postgres (PostgreSQL) 9.6.24"), Some(9));
        assert_eq!(parse_major_version("15\n"), Some(15));
        assert_eq!(parse_major_version("garbage"), None);
        assert_eq!(parse_major_version(""), None);
    }

    #[test]
    fn highest_versioned_bindir_wins() {
        let dirs = ["9.6", "15", "16", "10", "foo", "13.2", ""]
            .iter()
            .map(|v| {
                (
                    v.to_string(),
                    PathBuf::from(format!("/usr/lib/postgresql/{v}/bin")),
                )
            });
        assert_eq!(
            pick_highest_version(dirs),
            Some(PathBuf::from("/usr/lib/postgresql/16/bin"))
        );
        assert_eq!(pick_highest_version(Vec::new()), None);
        assert_eq!(
            pick_highest_version(vec![("x".to_string(), PathBuf::from("/x"))]),
            None
        );
    }

    #[test]
    fn highest_versioned_bindir_from_fake_tree() {
        let root = tempfile::tempdir().expect("tempdir");
        for v in ["9.6", "14", "16", "17"] {
            let bin = root.path().join(v).join("bin");
            fs::create_dir_all(&bin).expect("mkdir");
            // 17 is incomplete (no pg_ctl) and must be skipped.
            let names: &[&str] = if v == "17" {
                &["postgres", "initdb"]
            } else {
                &REQUIRED_BINARIES
            };
            for name in names {
                let p = bin.join(name);
                fs::write(&p, "#!/bin/sh\n").expect("write");
                fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).expect("chmod");
            }
        }
        let found = find_bindir_in(None, Some(OsString::new()), || None, root.path());
        assert_eq!(found.ok(), Some(root.path().join("16").join("bin")));
    }

    #[test]
    fn path_symlinks_resolve_to_the_real_bindir() {
        let root = tempfile::tempdir().expect("tempdir");
        let real = root.path().join("real").join("bin");
        let links = root.path().join("links");
        fs::create_dir_all(&real).expect("mkdir");
        fs::create_dir_all(&links).expect("mkdir");
        for name in REQUIRED_BINARIES {
            let p = real.join(name);
            fs::write(&p, "#!/bin/sh\n").expect("write");
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).expect("chmod");
            std::os::unix::fs::symlink(&p, links.join(name)).expect("symlink");
        }
        let path = std::env::join_paths([root.path().join("empty"), links]).expect("join");
        let found = find_bindir_in(None, Some(path), || None, root.path());
        let real = fs::canonicalize(real).expect("canonicalize");
        assert_eq!(found.ok(), Some(real));
    }

    #[test]
    fn no_binaries_error_says_what_to_install() {
        let empty = tempfile::tempdir().expect("tempdir");
        let err = find_bindir_in(None, Some(OsString::new()), || None, empty.path())
            .expect_err("nothing to find");
        let msg = err.to_string();
        assert!(msg.contains("apt-get install postgresql"), "{msg}");
        assert!(msg.contains("$PGVIGIL_PG_BINDIR"), "{msg}");
        assert!(msg.contains("PATH"), "{msg}");
        assert!(msg.contains("pg_config --bindir"), "{msg}");
        assert!(msg.contains("/usr/lib/postgresql/*/bin"), "{msg}");
    }

    #[test]
    fn bad_env_bindir_is_an_error_not_a_fallback() {
        let empty = tempfile::tempdir().expect("tempdir");
        let err = find_bindir_in(
            Some(empty.path().as_os_str().to_owned()),
            std::env::var_os("PATH"),
            || None,
            Path::new(DEBIAN_LIB_ROOT),
        )
        .expect_err("empty dir");
        let msg = err.to_string();
        assert!(msg.contains("$PGVIGIL_PG_BINDIR"), "{msg}");
        assert!(msg.contains("postgres, initdb, pg_ctl"), "{msg}");
    }
}
