//! What the relay loops of one agent share. Each loop owns a [`crate::Server`] outright; this
//! is everything they have in common, and nothing here is read or written on the data path
//! (relaying a datagram touches only the loop's own server):
//!
//! - the nonce key, fixed at start: a nonce issued by one loop is good on another (a client's
//!   UDP and TCP 5-tuples, or a client that moved, land on different loops);
//! - the quotas: the total number of allocations (an atomic) and each user's (a map under a
//!   lock), taken when an Allocate starts and given back when it fails or its allocation ends;
//! - the relay port space (under a lock, taken when a relay is bound or released).
//!
//! Not shared, on purpose: credentials and the peer policy are read on every request and every
//! relayed datagram, so each loop keeps its own copy and the shell fans changes (revocations,
//! the control plane's networks) out to every loop; reservations stay with the loop that made
//! them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

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
        }
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
        ip: std::net::IpAddr,
        parity: crate::ports::Parity,
        rng: &mut impl rand::Rng,
    ) -> PortSearch {
        lock(&self.ports).search(ip, parity, rng)
    }

    /// Give a port back; true if it was in use.
    pub(crate) fn release_port(&self, addr: SocketAddr) -> bool {
        lock(&self.ports).release(addr)
    }

    /// Relay ports bound right now by every loop (allocations, reservations, binds under way).
    pub fn ports_in_use(&self) -> usize {
        lock(&self.ports).in_use()
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
        let shared = std::sync::Arc::new(SharedState::new([0; 32], (50000, 50009), 1000, 100));
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
