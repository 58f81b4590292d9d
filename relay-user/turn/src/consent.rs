//! Internal-party consent: media from an external user's allocation towards an internal
//! network flows only once an internal party agrees. In [`Consent::Party`] mode the internal
//! address must be an internal party's (a client holding an allocation made on an internal
//! listener from it); in [`Consent::Authorized`] mode a front-end must also have authorized
//! the pair (the external user, that party's user) through the control plane.
//!
//! ICE clients make that workable only if a permission is not refused: with trickle ICE the
//! external side's CreatePermission for an internal host candidate can come before the
//! internal side has allocated, and a browser prunes a candidate pair whose permission fails.
//! So the permission is installed but held: its traffic is dropped and counted, nothing of it
//! goes into the kernel's fast path, and it is released, with no new request, once consent is
//! there. Consent given to a permission lasts for the permission's life (its refreshes
//! included), not only while the party's allocation does (browsers release allocations their
//! selected pair does not use), until it is taken back: the consenting user revoked, or, in
//! `authorized` mode, the authorization revoked or expired. Taking it back holds the
//! permission again, withdraws its channels from the kernel and closes its TCP connections.
//!
//! Parties are shared by all relay loops ([`crate::SharedState`]); a loop learns that they
//! changed from a generation it reads with one atomic load, and only when traffic meets a held
//! permission.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::info;

use super::{Consent, ListenerSide, MediaAuthorization, Server};
use crate::allocation::Allocation;
use crate::{FiveTuple, Transport};

/// Who agrees to an allocation's media towards an address.
enum Agreement {
    /// Nobody needs to: not an internal address, consent off, or an internal allocation.
    NotNeeded,
    /// This internal user.
    By(Arc<str>),
}

impl Server {
    /// Whether `five_tuple` came in on an internal listener: the listener of its kind (UDP,
    /// or TCP and TLS, which share a port space) bound to its server address, else the
    /// wildcard one of its family on that port.
    pub(super) fn on_internal_listener(&self, five_tuple: &FiveTuple) -> bool {
        let stream = |transport: Transport| transport != Transport::Udp;
        let server = five_tuple.server;
        let ours = |listener: &&ListenerSide| {
            stream(listener.transport) == stream(five_tuple.transport)
                && listener.address.port() == server.port()
        };
        let sides = &self.config.listener_sides;
        match sides
            .iter()
            .filter(ours)
            .find(|listener| listener.address.ip() == server.ip())
        {
            Some(exact) => exact.internal,
            None => sides.iter().filter(ours).any(|listener| {
                listener.internal
                    && listener.address.ip().is_unspecified()
                    && listener.address.is_ipv4() == server.is_ipv4()
            }),
        }
    }

    /// Whether `five_tuple`'s allocation may open a connection to `ip` now (a connection
    /// cannot be held): if an internal party agrees, that is remembered like a permission's
    /// consent, so that taking it back closes the connection.
    pub(super) fn consent_to_connect(
        &mut self,
        five_tuple: FiveTuple,
        ip: IpAddr,
        now: Instant,
    ) -> bool {
        let Some(allocation) = self.allocations.get(&five_tuple) else {
            return false;
        };
        match self.agreement(allocation, ip, now) {
            None => false,
            Some(Agreement::NotNeeded) => true,
            Some(Agreement::By(party)) => {
                let allocation = self
                    .allocations
                    .get_mut(&five_tuple)
                    .expect("looked up above");
                allocation.consented_by.entry(ip).or_insert(party);
                self.consent_tracked.insert(five_tuple);
                true
            }
        }
    }

    fn agreement(&self, allocation: &Allocation, ip: IpAddr, now: Instant) -> Option<Agreement> {
        if self.config.consent == Consent::Off
            || allocation.internal
            || !self.config.peer_policy.is_internal(ip)
        {
            return Some(Agreement::NotNeeded);
        }
        // A revoked user agrees to nothing, even while another loop has yet to end their
        // allocations.
        let now_unix = self.unix_time(now);
        let parties = self
            .shared
            .parties_at(ip.to_canonical())
            .into_iter()
            .filter(|party| !self.config.credentials.is_revoked(party, now_unix));
        match self.config.consent {
            Consent::Off => Some(Agreement::NotNeeded),
            Consent::Party => parties.into_iter().next().map(Agreement::By),
            // Credentials that name nobody cannot have been authorized.
            Consent::Authorized if allocation.anonymous => None,
            Consent::Authorized => parties
                .into_iter()
                .find(|party| self.authorized(&allocation.quota_key, party, now))
                .map(Agreement::By),
        }
    }

    fn authorized(&self, external: &str, internal: &str, now: Instant) -> bool {
        let now_unix = self.unix_time(now);
        self.authorizations
            .get(external)
            .and_then(|internals| internals.get(internal))
            .is_some_and(|expires| *expires > now_unix)
    }

    /// After a permission for `ip` was installed or refreshed on `five_tuple`'s allocation:
    /// a new one (or one still held) without consent is held, one with consent remembers who
    /// gave it. A permission that already had consent keeps it.
    pub(super) fn hold_unless_consented(
        &mut self,
        five_tuple: FiveTuple,
        ip: IpAddr,
        was_permitted: bool,
        now: Instant,
    ) {
        let Some(allocation) = self.allocations.get(&five_tuple) else {
            return;
        };
        if was_permitted && !allocation.holds(ip) {
            return;
        }
        let agreement = self.agreement(allocation, ip, now);
        let allocation = self
            .allocations
            .get_mut(&five_tuple)
            .expect("looked up above");
        match agreement {
            Some(Agreement::NotNeeded) => {}
            Some(Agreement::By(party)) => {
                if allocation.held.remove(&ip) {
                    self.stats.consent_granted += 1;
                    info!(client = %five_tuple.client, user = %allocation.username, peer = %ip, %party, "consent given, permission released");
                }
                allocation.consented_by.insert(ip, party);
                self.consent_tracked.insert(five_tuple);
            }
            None => {
                if allocation.held.insert(ip) {
                    self.stats.consent_held_permissions += 1;
                    info!(client = %five_tuple.client, user = %allocation.username, peer = %ip, "permission held until an internal party agrees");
                }
                self.consent_tracked.insert(five_tuple);
            }
        }
    }

    /// Traffic met a held permission of `five_tuple` towards `ip`: if the parties changed
    /// since the held permissions were last judged, judge them again. True when this one was
    /// released.
    pub(super) fn consent_came(&mut self, five_tuple: FiveTuple, ip: IpAddr, now: Instant) -> bool {
        let generation = self.shared.parties_generation();
        if generation == self.parties_seen {
            return false;
        }
        self.parties_seen = generation;
        self.judge_consent(now);
        self.allocations
            .get(&five_tuple)
            .is_some_and(|allocation| !allocation.holds(ip))
    }

    /// Judge every held and consented permission again: release the held ones that have
    /// consent now; in `authorized` mode, take back consent whose authorization is gone.
    fn judge_consent(&mut self, now: Instant) {
        let tracked: Vec<FiveTuple> = self.consent_tracked.iter().copied().collect();
        for five_tuple in tracked {
            let Some(allocation) = self.allocations.get(&five_tuple) else {
                self.consent_tracked.remove(&five_tuple);
                continue;
            };
            let released: Vec<(IpAddr, Arc<str>)> = allocation
                .held
                .iter()
                .filter_map(|ip| match self.agreement(allocation, *ip, now) {
                    Some(Agreement::By(party)) => Some((*ip, party)),
                    Some(Agreement::NotNeeded) => Some((*ip, Arc::from(""))),
                    None => None,
                })
                .collect();
            let mut released = released;
            let mut withdrawn = Vec::new();
            if self.config.consent == Consent::Authorized {
                for (ip, party) in &allocation.consented_by {
                    if self.authorized(&allocation.quota_key, party, now) {
                        continue;
                    }
                    // Another party at that address may still be authorized.
                    match self.agreement(allocation, *ip, now) {
                        Some(Agreement::By(other)) => released.push((*ip, other)),
                        Some(Agreement::NotNeeded) | None => withdrawn.push(*ip),
                    }
                }
            }
            self.change_consent(five_tuple, released, &withdrawn, now);
        }
    }

    /// Release `released` (with who agreed) and take back `withdrawn` on one allocation.
    fn change_consent(
        &mut self,
        five_tuple: FiveTuple,
        released: Vec<(IpAddr, Arc<str>)>,
        withdrawn: &[IpAddr],
        now: Instant,
    ) {
        if released.is_empty() && withdrawn.is_empty() {
            return;
        }
        let allocation = self
            .allocations
            .get_mut(&five_tuple)
            .expect("looked up by the caller");
        for (ip, party) in released {
            let was_held = allocation.held.remove(&ip);
            if !party.is_empty() {
                allocation.consented_by.insert(ip, party.clone());
            }
            if was_held {
                self.stats.consent_granted += 1;
                info!(client = %five_tuple.client, user = %allocation.username, peer = %ip, %party, "consent given, permission released");
            }
        }
        for ip in withdrawn {
            allocation.consented_by.remove(ip);
            allocation.held.insert(*ip);
            self.stats.consent_withdrawn += 1;
            info!(client = %five_tuple.client, user = %allocation.username, peer = %ip, "consent taken back, permission held");
        }
        allocation.sync_fast_path(now, &mut self.out);
        if allocation.held.is_empty() && allocation.consented_by.is_empty() {
            self.consent_tracked.remove(&five_tuple);
        }
        // A connection cannot be held: those towards an address that lost consent close.
        let closing: Vec<u32> = allocation
            .peer_connections
            .iter()
            .filter(|(peer, _)| withdrawn.contains(&peer.ip()))
            .map(|(_, id)| *id)
            .collect();
        for id in closing {
            self.close_peer_connection(id);
        }
    }

    /// `user` was revoked: every consent they gave is taken back.
    pub(super) fn withdraw_consent_of(&mut self, user: &str, now: Instant) {
        let tracked: Vec<FiveTuple> = self.consent_tracked.iter().copied().collect();
        for five_tuple in tracked {
            let Some(allocation) = self.allocations.get(&five_tuple) else {
                continue;
            };
            let withdrawn: Vec<IpAddr> = allocation
                .consented_by
                .iter()
                .filter(|(_, party)| &***party == user)
                .map(|(ip, _)| *ip)
                .collect();
            self.change_consent(five_tuple, Vec::new(), &withdrawn, now);
        }
    }

    /// Replace the front-ends' authorizations (`authorized` consent): what they now allow is
    /// released, what they no longer allow is taken back, at once.
    pub fn set_media_authorizations(
        &mut self,
        authorizations: Vec<MediaAuthorization>,
        now: Instant,
    ) {
        let mut by_external: HashMap<String, HashMap<String, u64>> = HashMap::new();
        for authorization in authorizations {
            let expires = by_external
                .entry(authorization.external)
                .or_default()
                .entry(authorization.internal)
                .or_default();
            *expires = (*expires).max(authorization.expires_unix);
        }
        info!(
            external_users = by_external.len(),
            "media authorizations updated"
        );
        self.authorizations = by_external;
        self.judge_consent(now);
        self.schedule_authorization_expiry();
    }

    /// The earliest authorization expired: forget what did, and take back its consent.
    pub(super) fn authorizations_expired(&mut self, now: Instant) {
        let now_unix = self.unix_time(now);
        for internals in self.authorizations.values_mut() {
            internals.retain(|_, expires| *expires > now_unix);
        }
        self.authorizations
            .retain(|_, internals| !internals.is_empty());
        self.judge_consent(now);
        self.schedule_authorization_expiry();
    }

    fn schedule_authorization_expiry(&mut self) {
        let earliest = self
            .authorizations
            .values()
            .flat_map(HashMap::values)
            .min()
            .copied();
        // A whole second after the expiry second began, so it has passed in unix_time; none
        // for an expiry beyond what an Instant can hold.
        self.authorizations_expire = earliest.and_then(|unix| {
            let since_epoch = Duration::from_secs(unix).saturating_sub(self.unix_at_epoch);
            self.epoch
                .checked_add(since_epoch)?
                .checked_add(Duration::from_secs(1))
        });
    }

    /// The internal networks changed: every permission of every external allocation is
    /// judged again (a newly internal address without consent is held, a held one no longer
    /// internal is released).
    pub(super) fn judge_every_permission(&mut self, now: Instant) {
        let external: Vec<FiveTuple> = self
            .allocations
            .iter()
            .filter(|(_, allocation)| !allocation.internal)
            .map(|(five_tuple, _)| *five_tuple)
            .collect();
        for five_tuple in external {
            let Some(allocation) = self.allocations.get(&five_tuple) else {
                continue;
            };
            let mut released = Vec::new();
            let mut withdrawn = Vec::new();
            for ip in allocation.permissions.keys() {
                let consented = allocation.consented_by.contains_key(ip);
                match self.agreement(allocation, *ip, now) {
                    Some(Agreement::NotNeeded) if allocation.held.contains(ip) => {
                        released.push((*ip, Arc::from("")));
                    }
                    Some(Agreement::By(party)) if allocation.held.contains(ip) || !consented => {
                        released.push((*ip, party));
                    }
                    None if !allocation.held.contains(ip) => withdrawn.push(*ip),
                    _ => {}
                }
            }
            if !released.is_empty() || !withdrawn.is_empty() {
                self.consent_tracked.insert(five_tuple);
            }
            self.change_consent(five_tuple, released, &withdrawn, now);
        }
    }

    /// An allocation ended: if it was an internal party's, the party is one allocation less.
    pub(super) fn forget_party(&mut self, allocation: &Allocation) {
        self.consent_tracked.remove(&allocation.five_tuple);
        if allocation.internal {
            self.shared.party_left(
                allocation.five_tuple.client.ip().to_canonical(),
                &allocation.quota_key,
            );
        }
    }
}
