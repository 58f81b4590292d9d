//! Internal-party consent: media from an external user's allocation towards an internal
//! network flows only once an internal party agrees, which in [`Consent::Party`] mode means
//! the internal address is an internal party's (a client holding an allocation made on an
//! internal listener from it).
//!
//! ICE clients make that workable only if a permission is not refused: with trickle ICE the
//! external side's CreatePermission for an internal host candidate can come before the
//! internal side has allocated, and a browser prunes a candidate pair whose permission fails.
//! So the permission is installed but held: its traffic is dropped and counted, nothing of it
//! goes into the kernel's fast path, and it is released, with no new request, once a party is
//! there. Consent given to a permission lasts for the permission's life (its refreshes
//! included), not only while the party's allocation does: browsers release allocations their
//! selected pair does not use.
//!
//! Parties are shared by all relay loops ([`crate::SharedState`]); a loop learns that they
//! changed from a generation it reads with one atomic load, and only when traffic meets a held
//! permission.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use tracing::info;

use super::{Consent, Server};
use crate::FiveTuple;
use crate::allocation::Allocation;

impl Server {
    /// Whether the listener at `server` (the local address of a client's 5-tuple) is one of
    /// the internal side's.
    pub(super) fn on_internal_listener(&self, server: SocketAddr) -> bool {
        self.config.internal_listeners.iter().any(|listener| {
            listener.port() == server.port()
                && (listener.ip() == server.ip()
                    || (listener.ip().is_unspecified() && listener.is_ipv4() == server.is_ipv4()))
        })
    }

    /// Whether `allocation` may reach `ip` now: no consent needed, or an internal party there.
    pub(super) fn consents(&self, allocation: &Allocation, ip: IpAddr) -> bool {
        !self.needs_consent(allocation, ip) || self.shared.is_party(ip.to_canonical())
    }

    fn needs_consent(&self, allocation: &Allocation, ip: IpAddr) -> bool {
        self.config.consent != Consent::Off
            && !allocation.internal
            && self.config.peer_policy.is_internal(ip)
    }

    /// After a permission for `ip` was installed or refreshed on `five_tuple`'s allocation:
    /// a new one (or one still held) that needs consent no party gives is held. A permission
    /// that already had consent keeps it.
    pub(super) fn hold_unless_consented(
        &mut self,
        five_tuple: FiveTuple,
        ip: IpAddr,
        was_permitted: bool,
    ) {
        let Some(allocation) = self.allocations.get(&five_tuple) else {
            return;
        };
        if was_permitted && !allocation.holds(ip) {
            return;
        }
        let consents = self.consents(allocation, ip);
        let allocation = self
            .allocations
            .get_mut(&five_tuple)
            .expect("looked up above");
        let was_held = allocation.held.contains(&ip);
        if consents {
            if was_held {
                allocation.held.remove(&ip);
                self.stats.consent_granted += 1;
                info!(client = %five_tuple.client, user = %allocation.username, peer = %ip, "consent: an internal party is there, permission released");
            }
        } else if !was_held {
            allocation.held.insert(ip);
            self.holding.insert(five_tuple);
            self.stats.consent_held_permissions += 1;
            info!(client = %five_tuple.client, user = %allocation.username, peer = %ip, "consent: permission held until an internal party is there");
        }
        if allocation.held.is_empty() {
            self.holding.remove(&five_tuple);
        }
    }

    /// Traffic met a held permission of `five_tuple` towards `ip`: if the parties changed
    /// since the held permissions were last judged, judge them all again (releasing what a
    /// party now consents to, fast path included). True when this one was released.
    pub(super) fn consent_came(&mut self, five_tuple: FiveTuple, ip: IpAddr, now: Instant) -> bool {
        let generation = self.shared.parties_generation();
        if generation == self.parties_seen {
            return false;
        }
        self.parties_seen = generation;
        let holding: Vec<FiveTuple> = self.holding.iter().copied().collect();
        for holder in holding {
            let Some(allocation) = self.allocations.get(&holder) else {
                self.holding.remove(&holder);
                continue;
            };
            let released: Vec<IpAddr> = allocation
                .held
                .iter()
                .copied()
                .filter(|held| self.shared.is_party(held.to_canonical()))
                .collect();
            if released.is_empty() {
                continue;
            }
            let allocation = self.allocations.get_mut(&holder).expect("looked up above");
            for released in &released {
                allocation.held.remove(released);
                info!(client = %holder.client, user = %allocation.username, peer = %released, "consent: an internal party is there, permission released");
            }
            self.stats.consent_granted += released.len() as u64;
            if allocation.held.is_empty() {
                self.holding.remove(&holder);
            }
            allocation.sync_fast_path(now, &mut self.out);
        }
        self.allocations
            .get(&five_tuple)
            .is_some_and(|allocation| !allocation.holds(ip))
    }

    /// An allocation ended: if it was an internal party's, the party is one allocation less.
    pub(super) fn forget_party(&mut self, allocation: &Allocation) {
        self.holding.remove(&allocation.five_tuple);
        if allocation.internal {
            self.shared
                .party_left(allocation.five_tuple.client.ip().to_canonical());
        }
    }
}
