//! TCP ports for clusters: a free port on 127.0.0.1, below the ephemeral range
//! and never handed out twice by this process, and recognising "port taken" in
//! a server log so that a start can retry with another one.

use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::net::TcpListener;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use super::{lock, ClusterError};

/// Lowest port handed out; we pick below the kernel's ephemeral range so that
/// client sockets (which get ephemeral ports) can never grab a cluster's port
/// while it is stopped between `stop()` and `restart()`.
const MIN_PORT: u16 = 10_000;

/// Ports handed out by this process (never reused, so that parallel tests
/// in one process cannot race for the same port).
static USED_PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A port free on 127.0.0.1, preferably below the ephemeral port range.
pub(super) fn pick_port() -> Result<u16, ClusterError> {
    let mut used = lock(&USED_PORTS);
    let used = used.get_or_insert_with(HashSet::new);
    let ephemeral_low = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if ephemeral_low > MIN_PORT + 1_000 {
        let span = u64::from(ephemeral_low - MIN_PORT);
        for _ in 0..100 {
            let offset = u16::try_from(random_u64() % span).unwrap_or(0);
            let port = MIN_PORT + offset;
            if !used.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
                used.insert(port);
                return Ok(port);
            }
        }
    }
    // Fallback: let the kernel choose.
    for _ in 0..100 {
        let port = TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|_| ClusterError::NoFreePort)?;
        if used.insert(port) {
            return Ok(port);
        }
    }
    Err(ClusterError::NoFreePort)
}

fn random_u64() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    hasher.write_u128(nanos);
    hasher.write_u32(std::process::id());
    hasher.finish()
}

pub(super) fn log_says_addr_in_use(log: &str) -> bool {
    log.contains("Address already in use")
        || log.contains("could not bind IPv4 address")
        || log.contains("could not create any TCP/IP sockets")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_in_use_detection() {
        let log = "LOG:  could not bind IPv4 address \"127.0.0.1\": Address already in use\n\
                   WARNING:  could not create listen socket for \"127.0.0.1\"\n\
                   FATAL:  could not create any TCP/IP sockets\n";
        assert!(log_says_addr_in_use(log));
        assert!(!log_says_addr_in_use(
            "FATAL:  data directory has wrong ownership"
        ));
    }

    #[test]
    fn picked_ports_are_distinct_and_bindable() {
        let a = pick_port().expect("port");
        let b = pick_port().expect("port");
        assert_ne!(a, b);
        assert!(TcpListener::bind(("127.0.0.1", a)).is_ok());
    }
}
