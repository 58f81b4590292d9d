//! Ports for listeners and relay ranges, chosen so tests running in parallel (threads of one
//! test binary, or one process per test under nextest) do not collide.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::client::Proto;

/// Relay ranges live below the kernel's ephemeral range (32768-60999 by default), so no port
/// the OS hands out for a `bind(0)` (listeners, peers, clients, other programs) can sit inside
/// one. That also keeps test peers out of the relay range, which the server's peer policy
/// refuses on its own addresses (a relay must not be pointed at itself).
const RELAY_FIRST: u16 = 20_000;
const RELAY_LAST: u16 = 31_999;
/// Ports per relay range: plenty for a test's allocations, small enough for 300 ranges.
const RELAY_SPAN: u16 = 40;

static NEXT_RANGE: AtomicU32 = AtomicU32::new(0);

/// Ports [`free_port`] has handed out in this process: the kernel may offer a port again once
/// its probe socket is closed, and two listeners of one server given the same port cannot both
/// start (seen in CI: a SIP edge's external and internal listeners on one port).
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
/// Probes before giving up on finding a port not handed out yet.
const PROBES: usize = 64;

/// A port that was free on `ip` for `proto` a moment ago: bind to port 0, read it, release.
/// Never the same port twice in one process. Another process can take it before the server
/// binds it; [`crate::Rampart::start`] retries with fresh ports when that happens.
pub fn free_port(proto: Proto, ip: IpAddr) -> io::Result<u16> {
    let addr = SocketAddr::new(ip, 0);
    for _ in 0..PROBES {
        let port = match proto {
            Proto::Udp => UdpSocket::bind(addr)?.local_addr()?.port(),
            Proto::Tcp | Proto::Tls => TcpListener::bind(addr)?.local_addr()?.port(),
        };
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if handed_out.insert(port) {
            return Ok(port);
        }
    }
    Err(io::Error::other(format!(
        "{PROBES} probes on {ip} found only ports this process already handed out"
    )))
}

/// A free TCP address on `ip`, for a listener the test's server will bind.
pub fn free_tcp_address(ip: IpAddr) -> io::Result<SocketAddr> {
    Ok(SocketAddr::new(ip, free_port(Proto::Tcp, ip)?))
}

/// A relay port range for one server. Ranges differ between the servers of one process
/// (a counter) and most likely between processes (the process id picks the starting range).
/// An overlap is harmless anyway: the server skips ports it cannot bind.
pub fn relay_range() -> (u16, u16) {
    let ranges = u32::from((RELAY_LAST - RELAY_FIRST + 1) / RELAY_SPAN);
    let n = NEXT_RANGE.fetch_add(1, Ordering::Relaxed);
    let index = (std::process::id().wrapping_mul(7919).wrapping_add(n)) % ranges;
    let first = RELAY_FIRST + u16::try_from(index).expect("fewer than 65536 ranges") * RELAY_SPAN;
    (first, first + RELAY_SPAN - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_never_handed_out_twice() {
        let ip = IpAddr::from([127, 0, 0, 1]);
        let mut seen = BTreeSet::new();
        for proto in [Proto::Udp, Proto::Tcp].into_iter().cycle().take(200) {
            assert!(seen.insert(free_port(proto, ip).unwrap()));
        }
    }

    #[test]
    fn relay_ranges_stay_below_the_ephemeral_ports() {
        for _ in 0..1000 {
            let (first, last) = relay_range();
            assert!(first >= RELAY_FIRST && last <= RELAY_LAST && last - first + 1 == RELAY_SPAN);
        }
    }
}
