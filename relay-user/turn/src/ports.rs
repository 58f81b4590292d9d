//! Relay port selection (RFC 8656 §7.2): random ports from the configured range, even ones on
//! request, and port pairs held for a later allocation (EVEN-PORT with the R bit). Which
//! ports the system lets us bind is learnt from the shell's answers, one candidate at a time.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

use rand::Rng;

/// Failed binds tolerated for one allocation: ports taken by other processes make bind fail;
/// past this many the range is treated as exhausted (508) rather than scanned to the end.
const MAX_BIND_FAILURES: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parity {
    Any,
    Even,
    /// An even port, and the next (odd) one bound too and held for a reservation.
    EvenPair,
}

/// A search for a relay port on one address, one candidate at a time: the server asks the
/// shell to bind each candidate and comes back with the answer (see [`PortAllocator::next`]).
#[derive(Clone, Copy, Debug)]
pub struct PortSearch {
    ip: IpAddr,
    parity: Parity,
    start: u32,
    tried: u32,
    failures: usize,
}

impl PortSearch {
    pub fn parity(&self) -> Parity {
        self.parity
    }

    /// A candidate could not be bound (another process holds the port).
    pub fn failed(&mut self) {
        self.failures += 1;
    }
}

/// A port (or even/odd pair) set aside for one bind attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub addr: SocketAddr,
    /// With [`Parity::EvenPair`]: the odd port to bind after `addr` and hold for a reservation.
    pub pair: Option<SocketAddr>,
}

#[derive(Debug)]
pub struct PortAllocator {
    first: u16,
    last: u16,
    in_use: HashSet<SocketAddr>,
}

impl PortAllocator {
    pub fn new(first: u16, last: u16) -> Self {
        PortAllocator {
            first,
            last,
            in_use: HashSet::new(),
        }
    }

    /// Start looking for a port on `ip` at a random place in the range.
    pub fn search(&self, ip: IpAddr, parity: Parity, rng: &mut impl Rng) -> PortSearch {
        let span = u32::from(self.last - self.first) + 1;
        PortSearch {
            ip,
            parity,
            start: rng.gen_range(0..span),
            tried: 0,
            failures: 0,
        }
    }

    /// The next free candidate of `search`, marked in use until [`PortAllocator::release`];
    /// None when the range is exhausted or too many binds failed (508 Insufficient Capacity).
    pub fn next(&mut self, search: &mut PortSearch) -> Option<Candidate> {
        if search.failures >= MAX_BIND_FAILURES {
            return None;
        }
        let span = u32::from(self.last - self.first) + 1;
        while search.tried < span {
            let offset = (search.start + search.tried) % span;
            search.tried += 1;
            let Ok(port) = u16::try_from(u32::from(self.first) + offset) else {
                continue;
            };
            if search.parity != Parity::Any && port % 2 != 0 {
                continue;
            }
            let addr = SocketAddr::new(search.ip, port);
            if self.in_use.contains(&addr) {
                continue;
            }
            let pair = if search.parity == Parity::EvenPair {
                match port.checked_add(1).filter(|p| *p <= self.last) {
                    Some(odd) if !self.in_use.contains(&SocketAddr::new(search.ip, odd)) => {
                        Some(SocketAddr::new(search.ip, odd))
                    }
                    _ => continue,
                }
            } else {
                None
            };
            self.in_use.insert(addr);
            if let Some(odd) = pair {
                self.in_use.insert(odd);
            }
            return Some(Candidate { addr, pair });
        }
        None
    }

    /// Give `addr` back; true if it was in use.
    pub fn release(&mut self, addr: SocketAddr) -> bool {
        self.in_use.remove(&addr)
    }

    pub fn in_use(&self) -> usize {
        self.in_use.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn range_is_used_up_then_capacity_is_exhausted() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut ports = PortAllocator::new(50000, 50009);
        for _ in 0..10 {
            let mut search = ports.search(IP, Parity::Any, &mut rng);
            let candidate = ports.next(&mut search).unwrap();
            assert!((50000..=50009).contains(&candidate.addr.port()));
        }
        let mut search = ports.search(IP, Parity::Any, &mut rng);
        assert!(ports.next(&mut search).is_none());
        assert!(ports.release(SocketAddr::new(IP, 50003)));
        let mut search = ports.search(IP, Parity::Any, &mut rng);
        assert_eq!(ports.next(&mut search).unwrap().addr.port(), 50003);
    }

    #[test]
    fn even_pairs_skip_what_is_taken_and_failed_binds_give_up_at_the_limit() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut ports = PortAllocator::new(50000, 50003);
        ports.in_use.insert(SocketAddr::new(IP, 50001));
        let mut search = ports.search(IP, Parity::EvenPair, &mut rng);
        let pair = ports.next(&mut search).unwrap();
        assert_eq!(
            (pair.addr.port(), pair.pair.map(|o| o.port())),
            (50002, Some(50003))
        );
        let mut search = ports.search(IP, Parity::EvenPair, &mut rng);
        assert!(ports.next(&mut search).is_none());
        let mut search = ports.search(IP, Parity::Even, &mut rng);
        assert_eq!(ports.next(&mut search).unwrap().addr.port(), 50000);

        let mut ports = PortAllocator::new(1024, 65535);
        let mut search = ports.search(IP, Parity::Any, &mut rng);
        for _ in 0..MAX_BIND_FAILURES {
            assert!(ports.next(&mut search).is_some());
            search.failed();
        }
        assert!(
            ports.next(&mut search).is_none(),
            "gives up after repeated failures"
        );
    }
}
