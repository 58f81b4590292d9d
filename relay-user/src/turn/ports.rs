//! Relay port selection (RFC 8656 §7.2): random ports from the configured range, even ones on
//! request, and port pairs held for a later allocation (EVEN-PORT with the R bit).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

use rand::Rng;

/// Failed binds tolerated for one allocation: ports taken by other processes make bind fail;
/// past this many the range is treated as exhausted (508) rather than scanned to the end.
const MAX_BIND_FAILURES: usize = 64;

/// The socket side of relay allocation, implemented by the I/O shell with real sockets and by
/// tests with a set.
pub trait RelayBinder {
    /// Bind a UDP relay socket at `addr`; false when the port is taken.
    fn bind(&mut self, addr: SocketAddr, dont_fragment: bool) -> bool;
    /// Close the relay socket at `addr`.
    fn release(&mut self, addr: SocketAddr);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parity {
    Any,
    Even,
    /// An even port, and the next (odd) one bound too and held for a reservation.
    EvenPair,
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

    /// Bind a relay port on `ip`; with [`Parity::EvenPair`] the second address is the held
    /// odd port. None when no port can be had (508 Insufficient Capacity).
    pub fn allocate(
        &mut self,
        ip: IpAddr,
        parity: Parity,
        dont_fragment: bool,
        rng: &mut impl Rng,
        binder: &mut dyn RelayBinder,
    ) -> Option<(SocketAddr, Option<SocketAddr>)> {
        let span = u32::from(self.last - self.first) + 1;
        let start = rng.gen_range(0..span);
        let mut failures = 0;
        for i in 0..span {
            let port = self.first as u32 + (start + i) % span;
            let Ok(port) = u16::try_from(port) else {
                continue;
            };
            if parity != Parity::Any && port % 2 != 0 {
                continue;
            }
            let addr = SocketAddr::new(ip, port);
            if self.in_use.contains(&addr) {
                continue;
            }
            let pair = if parity == Parity::EvenPair {
                match port.checked_add(1).filter(|p| *p <= self.last) {
                    Some(odd) if !self.in_use.contains(&SocketAddr::new(ip, odd)) => {
                        Some(SocketAddr::new(ip, odd))
                    }
                    _ => continue,
                }
            } else {
                None
            };
            if !binder.bind(addr, dont_fragment) {
                failures += 1;
                if failures >= MAX_BIND_FAILURES {
                    return None;
                }
                continue;
            }
            if let Some(odd) = pair {
                if !binder.bind(odd, false) {
                    binder.release(addr);
                    failures += 1;
                    if failures >= MAX_BIND_FAILURES {
                        return None;
                    }
                    continue;
                }
                self.in_use.insert(odd);
            }
            self.in_use.insert(addr);
            return Some((addr, pair));
        }
        None
    }

    pub fn release(&mut self, addr: SocketAddr, binder: &mut dyn RelayBinder) {
        if self.in_use.remove(&addr) {
            binder.release(addr);
        }
    }

    pub fn in_use(&self) -> usize {
        self.in_use.len()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    /// A binder whose "other processes" hold some ports.
    #[derive(Default)]
    pub struct FakeBinder {
        pub bound: HashSet<SocketAddr>,
        pub taken_elsewhere: HashSet<SocketAddr>,
    }

    impl RelayBinder for FakeBinder {
        fn bind(&mut self, addr: SocketAddr, _dont_fragment: bool) -> bool {
            !self.taken_elsewhere.contains(&addr) && self.bound.insert(addr)
        }
        fn release(&mut self, addr: SocketAddr) {
            assert!(self.bound.remove(&addr), "released {addr} twice");
        }
    }

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn range_is_used_up_then_capacity_is_exhausted() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut binder = FakeBinder::default();
        let mut ports = PortAllocator::new(50000, 50009);
        for _ in 0..10 {
            let (addr, _) = ports
                .allocate(IP, Parity::Any, false, &mut rng, &mut binder)
                .unwrap();
            assert!((50000..=50009).contains(&addr.port()));
        }
        assert!(
            ports
                .allocate(IP, Parity::Any, false, &mut rng, &mut binder)
                .is_none()
        );
        ports.release(SocketAddr::new(IP, 50003), &mut binder);
        let (addr, _) = ports
            .allocate(IP, Parity::Any, false, &mut rng, &mut binder)
            .unwrap();
        assert_eq!(addr.port(), 50003);
    }

    #[test]
    fn even_pairs_and_ports_taken_by_others() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut binder = FakeBinder::default();
        binder.taken_elsewhere.insert(SocketAddr::new(IP, 50001));
        let mut ports = PortAllocator::new(50000, 50003);
        let (even, odd) = ports
            .allocate(IP, Parity::EvenPair, false, &mut rng, &mut binder)
            .unwrap();
        assert_eq!((even.port(), odd.map(|o| o.port())), (50002, Some(50003)));
        assert!(
            ports
                .allocate(IP, Parity::EvenPair, false, &mut rng, &mut binder)
                .is_none()
        );
        let (even, _) = ports
            .allocate(IP, Parity::Even, false, &mut rng, &mut binder)
            .unwrap();
        assert_eq!(even.port(), 50000);
        assert_eq!(binder.bound.len(), 3);
    }
}
