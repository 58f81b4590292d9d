//! What the relay loops of one agent share. Each loop owns a [`crate::Server`] outright; this
//! is everything they have in common, and nothing here is read or written on the data path
//! (relaying a datagram touches only the loop's own server):
//!
//! - the nonce key, fixed at start: a nonce issued by one loop is good on another (a client's
//!   UDP and TCP 5-tuples, or a client that moved, land on different loops);
//! - the quotas: the total number of allocations (an atomic) and each user's (a map under a
//!   lock), taken when an Allocate starts and given back when it fails or its allocation ends;
//! - the relay port space (under a lock, taken when a relay is bound or released);
//! - reservations (RFC 8656 §7.1, EVEN-PORT with R): the Allocate that redeems a token comes
//!   from another 5-tuple, so usually to another loop. A reserved port is held in the port space
//!   only, with no socket (the loop that redeems it binds it); the loop that made it expires it.
//!
//! - the internal parties (consent, see [`crate::consent`]): the client addresses of
//!   allocations made on internal listeners, and a generation the loops read (one atomic load)
//!   to learn that it changed.
//!
//! Not shared, on purpose: credentials and the peer policy are read on every request and every
//! relayed datagram, so each loop keeps its own copy and the shell fans changes (revocations,
//! the control plane's networks) out to every loop. The unauthenticated-request rate limiter is
//! per loop too: a source spread over several loops (by port) gets at most one budget per loop.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::ports::{Candidate, PortAllocator, PortSearch};

/// Why an allocation may not be made now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuotaRefusal {
    /// The user holds `allocations_per_user` already (486).
    PerUser,
    /// The agent holds `allocations_total` already (508).
    Total,
}

#[derive(Debug)]
pub struct SharedState {
    nonce_key: [u8; 32],
    allocations: AtomicUsize,
    max_allocations: usize,
    per_user: Mutex<HashMap<String, usize>>,
    max_per_user: usize,
    ports: Mutex<PortAllocator>,
    reservations: Mutex<HashMap<[u8; 8], Reservation>>,
    /// Internal allocations by client address, by user (quota key).
    parties: Mutex<HashMap<IpAddr, HashMap<Arc<str>, usize>>>,
    parties_generation: AtomicU64,
    /// The agent's total bandwidth limit, as far as the userspace path is given it.
    total: crate::bandwidth::TotalPool,
}

#[derive(Clone, Copy, Debug)]
struct Reservation {
    port: SocketAddr,
    until: Instant,
}

impl SharedState {
    pub fn new(
        nonce_key: [u8; 32],
        port_range: (u16, u16),
        max_per_user: usize,
        max_allocations: usize,
    ) -> Self {
        SharedState {
            nonce_key,
            allocations: AtomicUsize::new(0),
            max_allocations,
            per_user: Mutex::new(HashMap::new()),
            max_per_user,
            ports: Mutex::new(PortAllocator::new(port_range.0, port_range.1)),
            reservations: Mutex::new(HashMap::new()),
            parties: Mutex::new(HashMap::new()),
            parties_generation: AtomicU64::new(0),
            total: crate::bandwidth::TotalPool::default(),
        }
    }

    /// The total bandwidth limit's userspace share, which every loop leases from.
    pub fn total_bandwidth(&self) -> &crate::bandwidth::TotalPool {
        &self.total
    }

    /// `user` made an allocation on an internal listener from `ip`: an internal party is there.
    pub fn party_joined(&self, ip: IpAddr, user: &Arc<str>) {
        *lock(&self.parties)
            .entry(ip)
            .or_default()
            .entry(user.clone())
            .or_default() += 1;
        self.parties_generation.fetch_add(1, Ordering::Release);
    }

    /// An internal allocation of `user` from `ip` ended.
    pub fn party_left(&self, ip: IpAddr, user: &Arc<str>) {
        let mut parties = lock(&self.parties);
        if let Some(users) = parties.get_mut(&ip) {
            if let Some(count) = users.get_mut(user) {
                *count -= 1;
                if *count == 0 {
                    users.remove(user);
                }
            }
            if users.is_empty() {
                parties.remove(&ip);
            }
        }
        drop(parties);
        self.parties_generation.fetch_add(1, Ordering::Release);
    }

    /// The internal parties (users) holding an allocation from `ip`.
    pub fn parties_at(&self, ip: IpAddr) -> Vec<Arc<str>> {
        lock(&self.parties)
            .get(&ip)
            .map(|users| users.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Changes with every party that joins or leaves: what a loop compares against the value
    /// it last judged its held permissions at, without a lock.
    pub fn parties_generation(&self) -> u64 {
        self.parties_generation.load(Ordering::Acquire)
    }

    /// What the servers made with `config` share; `nonce_key` should be random.
    pub fn for_config(config: &crate::ServerConfig, nonce_key: [u8; 32]) -> Self {
        Self::new(
            nonce_key,
            config.port_range,
            config.allocations_per_user,
            config.allocations_total,
        )
    }

    pub fn nonce_key(&self) -> [u8; 32] {
        self.nonce_key
    }

    /// Count one more allocation for `user`, unless a quota is reached.
    pub fn acquire(&self, user: &str) -> Result<(), QuotaRefusal> {
        let mut per_user = lock(&self.per_user);
        let held = per_user.get(user).copied().unwrap_or(0);
        if held >= self.max_per_user {
            return Err(QuotaRefusal::PerUser);
        }
        self.allocations
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |total| {
                (total < self.max_allocations).then_some(total + 1)
            })
            .map_err(|_| QuotaRefusal::Total)?;
        per_user.insert(user.to_owned(), held + 1);
        Ok(())
    }

    /// Give back what [`SharedState::acquire`] counted.
    pub fn release(&self, user: &str) {
        let mut per_user = lock(&self.per_user);
        if let Some(held) = per_user.get_mut(user) {
            *held -= 1;
            if *held == 0 {
                per_user.remove(user);
            }
            self.allocations.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Allocations held (or being made) by every loop.
    pub fn allocations(&self) -> usize {
        self.allocations.load(Ordering::Acquire)
    }

    pub(crate) fn next_port(&self, search: &mut PortSearch) -> Option<Candidate> {
        lock(&self.ports).next(search)
    }

    pub(crate) fn search_ports(
        &self,
        ip: IpAddr,
        parity: crate::ports::Parity,
        rng: &mut impl rand::Rng,
    ) -> PortSearch {
        lock(&self.ports).search(ip, parity, rng)
    }

    /// Give a port back; true if it was in use.
    pub(crate) fn release_port(&self, addr: SocketAddr) -> bool {
        lock(&self.ports).release(addr)
    }

    /// Relay ports in use right now by every loop (allocations, reservations, binds under way).
    pub fn ports_in_use(&self) -> usize {
        lock(&self.ports).in_use()
    }

    /// Reservations made and neither redeemed nor expired yet.
    pub fn reservations_held(&self) -> usize {
        lock(&self.reservations).len()
    }

    /// Hold `port` (already taken in the port space) for `token` until `until`.
    pub(crate) fn reserve(&self, token: [u8; 8], port: SocketAddr, until: Instant) {
        lock(&self.reservations).insert(token, Reservation { port, until });
    }

    /// Whether `token` names a reservation that is still held at `now`. An expired one is
    /// dropped and its port given back.
    pub(crate) fn reservation_held(&self, token: &[u8; 8], now: Instant) -> bool {
        let mut reservations = lock(&self.reservations);
        match reservations.get(token).copied() {
            Some(reservation) if reservation.until > now => true,
            Some(reservation) => {
                reservations.remove(token);
                self.release_port(reservation.port);
                false
            }
            None => false,
        }
    }

    /// Take the reservation `token` names: its port is the caller's from now on.
    pub(crate) fn redeem(&self, token: &[u8; 8]) -> Option<SocketAddr> {
        lock(&self.reservations)
            .remove(token)
            .map(|reservation| reservation.port)
    }

    /// The reservation's deadline came: give its port back unless it was redeemed.
    pub(crate) fn expire_reservation(&self, token: &[u8; 8], now: Instant) {
        let mut reservations = lock(&self.reservations);
        if let Some(reservation) = reservations.get(token).copied()
            && reservation.until <= now
        {
            reservations.remove(token);
            self.release_port(reservation.port);
        }
    }
}

/// A loop that panicked while holding a lock left counts that are still whole (every update
/// here is one statement): carry on with them rather than take every loop down.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_hold_across_users_and_in_total() {
        let shared = SharedState::new([0; 32], (50000, 50009), 2, 3);
        assert_eq!(shared.acquire("alice"), Ok(()));
        assert_eq!(shared.acquire("alice"), Ok(()));
        assert_eq!(shared.acquire("alice"), Err(QuotaRefusal::PerUser));
        assert_eq!(shared.acquire("bob"), Ok(()));
        assert_eq!(shared.acquire("carol"), Err(QuotaRefusal::Total));
        shared.release("alice");
        assert_eq!(shared.acquire("carol"), Ok(()));
        assert_eq!(shared.allocations(), 3);
        shared.release("nobody");
        assert_eq!(
            shared.allocations(),
            3,
            "releasing what was never held changes nothing"
        );
    }

    #[test]
    fn concurrent_acquires_never_exceed_the_total() {
        let shared = Arc::new(SharedState::new([0; 32], (50000, 50009), 1000, 100));
        let granted: usize = (0..4)
            .map(|t| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .spawn(move || {
                        (0..100)
                            .filter(|i| shared.acquire(&format!("user{t}-{i}")).is_ok())
                            .count()
                    })
                    .unwrap()
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|handle| handle.join().unwrap())
            .sum();
        assert_eq!(granted, 100);
        assert_eq!(shared.allocations(), 100);
    }
}
