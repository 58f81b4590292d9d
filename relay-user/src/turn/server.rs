//! The TURN server as a pure state machine (RFC 8656 over RFC 8489): fed datagrams or stream
//! frames and the current time, it returns what to send. Sockets, TLS and timers live in
//! [`crate::server`]; relay sockets are bound through [`RelayBinder`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::RngCore;
use rand::rngs::StdRng;
use tracing::{debug, info, warn};

use crate::auth::{Credentials, NonceCheck, NonceIssuer};
use crate::stun::integrity::{long_term_key, reason_phrase};
use crate::stun::{
    AddressFamily, Attribute, Class, IntegrityKind, Message, MessageBuilder, Method,
    PasswordAlgorithm, TransactionId,
};

use super::allocation::{Allocation, FastPathEvent, Relay, RelayedBytes};
use super::channel_data::{CHANNEL_MAX, CHANNEL_MIN, ChannelData, encode_channel_data};
use super::peer_policy::PeerPolicy;
use super::ports::{Parity, PortAllocator, RelayBinder};
use super::rate_limit::{RateLimit, SourceRateLimiter};
use super::{FiveTuple, Transport};

/// RFC 8656 §14.9: a reservation made with EVEN-PORT's R bit is held for about 30 s.
const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);
/// IANA protocol number carried in REQUESTED-TRANSPORT for UDP (RFC 8656 §14.7).
const PROTOCOL_UDP: u8 = 17;
const ALGORITHM_MD5: u16 = 0x0001;
const ALGORITHM_SHA256: u16 = 0x0002;
/// What we offer in PASSWORD-ALGORITHMS, strongest first (RFC 8489 §14.11).
const OFFERED_ALGORITHMS: [(u16, &[u8]); 2] = [(ALGORITHM_SHA256, &[]), (ALGORITHM_MD5, &[])];

/// A relay address family the server serves: where relay sockets bind and what clients are
/// told (the public address when behind a 1:1 NAT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayAddress {
    pub bind: IpAddr,
    pub advertised: IpAddr,
}

/// Everything the state machine needs, already validated (see [`crate::config`]).
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub realm: String,
    pub software: Option<String>,
    pub relay_v4: Option<RelayAddress>,
    pub relay_v6: Option<RelayAddress>,
    pub port_range: (u16, u16),
    pub default_lifetime: Duration,
    pub max_lifetime: Duration,
    pub nonce_lifetime: Duration,
    pub allocations_per_user: usize,
    pub allocations_total: usize,
    pub unauthenticated_limit: RateLimit,
    pub credentials: Credentials,
    pub peer_policy: PeerPolicy,
}

/// Something to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transmit {
    /// To a client, on the transport connection or socket the 5-tuple names.
    ToClient {
        five_tuple: FiveTuple,
        payload: Vec<u8>,
    },
    /// To a peer, from the relay socket bound at `relay`.
    ToPeer {
        relay: SocketAddr,
        peer: SocketAddr,
        payload: Vec<u8>,
    },
}

/// Counters an operator reads to see what was refused and why.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    pub malformed_dropped: u64,
    pub rate_limited: u64,
    pub amplification_suppressed: u64,
    pub challenges: u64,
    pub auth_failures: u64,
    pub stale_nonces: u64,
    pub forbidden_peers: u64,
    pub no_permission_dropped: u64,
    pub no_allocation_dropped: u64,
    pub quota_rejections: u64,
    pub capacity_rejections: u64,
    pub allocations_created: u64,
    pub allocations_deleted: u64,
    pub allocations_expired: u64,
    pub to_peer_packets: u64,
    pub to_peer_bytes: u64,
    pub to_client_packets: u64,
    pub to_client_bytes: u64,
}

/// A request that passed the long-term credential check (RFC 8489 §9.2.4).
struct Authenticated {
    username: String,
    quota_key: String,
    key: Vec<u8>,
    integrity: IntegrityKind,
}

/// How a request ended before a response was built from its method's handler.
enum Refusal {
    Drop,
    Reply(Vec<u8>),
}

pub struct Server {
    config: ServerConfig,
    rng: StdRng,
    nonces: NonceIssuer,
    epoch: Instant,
    unix_at_epoch: Duration,
    allocations: HashMap<FiveTuple, Allocation>,
    by_relay: HashMap<SocketAddr, FiveTuple>,
    per_user: HashMap<String, usize>,
    reservations: HashMap<[u8; 8], (SocketAddr, Instant)>,
    ports: PortAllocator,
    limiter: SourceRateLimiter,
    stats: Stats,
    fast_path: Vec<FastPathEvent>,
}

impl Server {
    /// `now` and `unix_now` are the same moment on the monotonic and the wall clock: TURN REST
    /// credentials carry wall-clock expiries, everything else runs on `Instant`s.
    pub fn new(config: ServerConfig, mut rng: StdRng, now: Instant, unix_now: Duration) -> Self {
        let mut nonce_key = [0u8; 32];
        rng.fill_bytes(&mut nonce_key);
        Server {
            nonces: NonceIssuer::new(nonce_key, now, config.nonce_lifetime),
            ports: PortAllocator::new(config.port_range.0, config.port_range.1),
            limiter: SourceRateLimiter::new(config.unauthenticated_limit),
            config,
            rng,
            epoch: now,
            unix_at_epoch: unix_now,
            allocations: HashMap::new(),
            by_relay: HashMap::new(),
            per_user: HashMap::new(),
            reservations: HashMap::new(),
            stats: Stats::default(),
            fast_path: Vec::new(),
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn allocation(&self, five_tuple: &FiveTuple) -> Option<&Allocation> {
        self.allocations.get(five_tuple)
    }

    pub fn allocation_count(&self) -> usize {
        self.allocations.len()
    }

    pub fn allocations(&self) -> impl Iterator<Item = &Allocation> {
        self.allocations.values()
    }

    /// `at` on the wall clock, in whole Unix seconds: kept with sub-second precision until
    /// here so that it never lags the front-ends' clock by a rounding.
    pub fn unix_time(&self, at: Instant) -> u64 {
        (self.unix_at_epoch + at.saturating_duration_since(self.epoch)).as_secs()
    }

    /// Adds what the kernel forwarded on a channel of `five_tuple` that left the fast path,
    /// so the allocation's totals stay whole (nothing if the allocation is gone).
    pub fn credit_fast_path(&mut self, five_tuple: &FiveTuple, bytes: RelayedBytes) {
        if let Some(allocation) = self.allocations.get_mut(five_tuple) {
            allocation.relayed.from_client += bytes.from_client;
            allocation.relayed.to_client += bytes.to_client;
        }
    }

    /// Revoke `user` (a static username or the user part of REST usernames): every allocation
    /// of theirs ends now, and their credentials expiring at or before `until_unix` are refused
    /// from now on. Returns how many allocations ended.
    pub fn revoke_user(
        &mut self,
        user: &str,
        until_unix: u64,
        now: Instant,
        binder: &mut dyn RelayBinder,
    ) -> usize {
        self.config.credentials.revoke(user, until_unix);
        let theirs: Vec<FiveTuple> = self
            .allocations
            .iter()
            .filter(|(_, a)| a.quota_key == user)
            .map(|(five_tuple, _)| *five_tuple)
            .collect();
        for five_tuple in &theirs {
            self.delete_allocation(*five_tuple, binder);
        }
        info!(
            user,
            allocations = theirs.len(),
            until_unix,
            unix_now = self.unix_time(now),
            "user revoked"
        );
        theirs.len()
    }

    /// Replace the peer networks the control plane's access policy allows (in addition to
    /// the configured `allowed_peer_networks`).
    pub fn set_allowed_peer_networks(&mut self, allowed: Vec<ipnet::IpNet>) {
        info!(
            ?allowed,
            "peer networks allowed by the control plane updated"
        );
        self.config.peer_policy.set_allowed_by_control(allowed);
    }

    /// Channel changes for the kernel fast path since the last call, in order.
    pub fn take_fast_path_events(&mut self) -> Vec<FastPathEvent> {
        std::mem::take(&mut self.fast_path)
    }

    /// Relay ports bound right now (allocations and reservations).
    pub fn relay_ports_in_use(&self) -> usize {
        self.ports.in_use()
    }

    /// A datagram (UDP) or a complete frame (TCP/TLS) from a client.
    pub fn handle_client_input(
        &mut self,
        five_tuple: FiveTuple,
        bytes: &[u8],
        now: Instant,
        binder: &mut dyn RelayBinder,
    ) -> Option<Transmit> {
        if ChannelData::looks_like_channel_data(bytes) {
            return self.handle_channel_data(five_tuple, bytes, now);
        }
        let message = match Message::parse(bytes) {
            Ok(message) => message,
            Err(error) => {
                self.stats.malformed_dropped += 1;
                debug!(client = %five_tuple.client, %error, len = bytes.len(), "malformed STUN message");
                let Some((Class::Request, method, transaction_id)) = Message::peek_header(bytes)
                else {
                    return None;
                };
                let mut b = MessageBuilder::new(Class::ErrorResponse, method, transaction_id);
                b.add(&Attribute::ErrorCode {
                    code: 400,
                    reason: reason_phrase(400),
                });
                let response = b.finish();
                return self.unauthenticated_reply(five_tuple, bytes.len(), response, now);
            }
        };
        match message.class {
            Class::Request => self.handle_request(five_tuple, &message, bytes.len(), now, binder),
            Class::Indication if message.method == Method::SEND => {
                self.handle_send(five_tuple, &message, now)
            }
            _ => {
                self.stats.malformed_dropped += 1;
                None
            }
        }
    }

    /// A datagram that arrived at relay socket `relay` from `peer`.
    pub fn handle_peer_input(
        &mut self,
        relay: SocketAddr,
        peer: SocketAddr,
        bytes: &[u8],
        now: Instant,
    ) -> Option<Transmit> {
        let peer = canonical_socket(peer);
        let Some(five_tuple) = self.by_relay.get(&relay).copied() else {
            self.stats.no_allocation_dropped += 1;
            return None;
        };
        let allocation = self.allocations.get_mut(&five_tuple)?;
        if !allocation.has_permission(peer.ip(), now) {
            self.stats.no_permission_dropped += 1;
            return None;
        }
        let payload = match allocation.channel_to(&peer, now) {
            Some(channel) => {
                encode_channel_data(channel, bytes, five_tuple.transport != Transport::Udp)
            }
            None => {
                let mut transaction_id = [0u8; 12];
                self.rng.fill_bytes(&mut transaction_id);
                let mut b = MessageBuilder::new(
                    Class::Indication,
                    Method::DATA,
                    TransactionId(transaction_id),
                );
                b.add(&Attribute::XorPeerAddress(peer))
                    .add(&Attribute::Data(bytes));
                // A datagram too large for a STUN attribute cannot be indicated.
                if b.overflowed() {
                    self.stats.malformed_dropped += 1;
                    return None;
                }
                b.finish()
            }
        };
        allocation.relayed.to_client += bytes.len() as u64;
        self.stats.to_client_packets += 1;
        self.stats.to_client_bytes += bytes.len() as u64;
        Some(Transmit::ToClient {
            five_tuple,
            payload,
        })
    }

    /// Expire allocations, permissions, channels and reservations. The shell calls it at
    /// least once a second; expiry is therefore exact to a second.
    pub fn handle_timeout(&mut self, now: Instant, binder: &mut dyn RelayBinder) {
        let mut dead = Vec::new();
        for (five_tuple, allocation) in &mut self.allocations {
            let expired = allocation.expire(now);
            // The fast path's entries change only when something expired (refreshes sync on
            // their own): most allocations, most ticks, have nothing to recompute.
            if !expired.is_empty() {
                allocation.sync_fast_path(now, &mut self.fast_path);
            }
            for relay in expired.relays {
                self.by_relay.remove(&relay);
                self.ports.release(relay, binder);
            }
            for (channel, peer) in expired.channels {
                debug!(client = %five_tuple.client, channel, %peer, "channel binding expired");
            }
            if allocation.is_dead() {
                dead.push(*five_tuple);
            }
        }
        for five_tuple in dead {
            if let Some(mut allocation) = self.allocations.remove(&five_tuple) {
                allocation.withdraw_fast_path(&mut self.fast_path);
                self.stats.allocations_expired += 1;
                self.count_down_user(&allocation.quota_key);
                info!(client = %five_tuple.client, user = %allocation.username, "allocation expired");
            }
        }
        let ports = &mut self.ports;
        self.reservations.retain(|_, (addr, expires)| {
            let keep = *expires > now;
            if !keep {
                ports.release(*addr, binder);
            }
            keep
        });
        self.limiter.sweep(now);
        let unix_now = self.unix_time(now);
        self.config.credentials.prune_revocations(unix_now);
    }

    /// A TCP or TLS client connection closed: its allocation goes with it (RFC 8656 §3.1).
    pub fn client_closed(&mut self, five_tuple: FiveTuple, binder: &mut dyn RelayBinder) {
        if self.allocations.contains_key(&five_tuple) {
            self.delete_allocation(five_tuple, binder);
        }
    }

    fn handle_request(
        &mut self,
        five_tuple: FiveTuple,
        request: &Message<'_>,
        request_len: usize,
        now: Instant,
        binder: &mut dyn RelayBinder,
    ) -> Option<Transmit> {
        let unknown = request.unknown_comprehension_required();
        if !unknown.is_empty() {
            let response = self.error(request, 420, &[Attribute::UnknownAttributes(unknown)], None);
            return self.unauthenticated_reply(five_tuple, request_len, response, now);
        }
        if request.method == Method::BINDING {
            if !self.limiter.allow(five_tuple.client.ip(), now) {
                self.stats.rate_limited += 1;
                return None;
            }
            let response = self.success(
                request,
                &[Attribute::XorMappedAddress(five_tuple.client)],
                None,
            );
            return Some(reply(five_tuple, response));
        }
        let auth = match self.authenticate(five_tuple, request, request_len, now) {
            Ok(auth) => auth,
            Err(Refusal::Drop) => return None,
            Err(Refusal::Reply(response)) => return Some(reply(five_tuple, response)),
        };
        let response = match request.method {
            Method::ALLOCATE => self.handle_allocate(five_tuple, request, &auth, now, binder),
            method @ (Method::REFRESH | Method::CREATE_PERMISSION | Method::CHANNEL_BIND) => {
                match self.owned_allocation(five_tuple, &auth) {
                    Err(code) => self.error(request, code, &[], Some(&auth)),
                    Ok(()) if method == Method::REFRESH => {
                        self.handle_refresh(five_tuple, request, &auth, now, binder)
                    }
                    Ok(()) if method == Method::CREATE_PERMISSION => {
                        self.handle_create_permission(five_tuple, request, &auth, now)
                    }
                    Ok(()) => self.handle_channel_bind(five_tuple, request, &auth, now),
                }
            }
            _ => self.error(request, 400, &[], Some(&auth)),
        };
        Some(reply(five_tuple, response))
    }

    /// RFC 8489 §9.2.4. Every refusal goes through the per-source limiter: a client without
    /// valid credentials is unauthenticated traffic.
    fn authenticate(
        &mut self,
        five_tuple: FiveTuple,
        request: &Message<'_>,
        request_len: usize,
        now: Instant,
    ) -> Result<Authenticated, Refusal> {
        let source = five_tuple.client.ip();
        if !request.has_message_integrity() {
            self.stats.challenges += 1;
            return Err(self.challenge(request, 401, source, now));
        }
        let (Some(username), Some(realm), Some(nonce)) =
            (request.username(), request.realm(), request.nonce())
        else {
            let response = self.error(request, 400, &[], None);
            return Err(self.refuse_small(five_tuple, request_len, response, now));
        };
        match self.nonces.check(nonce, source, now) {
            NonceCheck::Valid => {}
            NonceCheck::Stale | NonceCheck::Forged => {
                self.stats.stale_nonces += 1;
                return Err(self.challenge(request, 438, source, now));
            }
        }
        if realm != self.config.realm {
            self.stats.auth_failures += 1;
            return Err(self.challenge(request, 401, source, now));
        }
        let algorithm = match password_algorithm(request) {
            Some(algorithm) => algorithm,
            None => {
                let response = self.error(request, 400, &[], None);
                return Err(self.refuse_small(five_tuple, request_len, response, now));
            }
        };
        let unix_now = self.unix_time(now);
        let candidates = match self.config.credentials.candidates(username, unix_now) {
            Ok(candidates) => candidates,
            Err(error) => {
                self.stats.auth_failures += 1;
                debug!(client = %five_tuple.client, user = username, %error, "credentials refused");
                return Err(self.challenge(request, 401, source, now));
            }
        };
        for password in &candidates.passwords {
            let key = long_term_key(username, &self.config.realm, password, algorithm);
            if request.verify_integrity(&key) {
                return Ok(Authenticated {
                    username: username.to_owned(),
                    quota_key: candidates.quota_key,
                    key,
                    integrity: request.integrity_kind().unwrap_or(IntegrityKind::Sha1),
                });
            }
        }
        self.stats.auth_failures += 1;
        debug!(client = %five_tuple.client, user = username, "message integrity check failed");
        Err(self.challenge(request, 401, source, now))
    }

    /// 401 or 438 with a fresh nonce, the realm and the password algorithms on offer. These
    /// are larger than a minimal request by necessity; the per-source limiter bounds them.
    fn challenge(
        &mut self,
        request: &Message<'_>,
        code: u16,
        source: IpAddr,
        now: Instant,
    ) -> Refusal {
        if !self.limiter.allow(source, now) {
            self.stats.rate_limited += 1;
            return Refusal::Drop;
        }
        let nonce = self.nonces.issue(source, now);
        let realm = self.config.realm.clone();
        Refusal::Reply(self.error(
            request,
            code,
            &[
                Attribute::Realm(&realm),
                Attribute::Nonce(&nonce),
                Attribute::PasswordAlgorithms(OFFERED_ALGORITHMS.to_vec()),
            ],
            None,
        ))
    }

    fn refuse_small(
        &mut self,
        five_tuple: FiveTuple,
        request_len: usize,
        response: Vec<u8>,
        now: Instant,
    ) -> Refusal {
        match self.unauthenticated_reply(five_tuple, request_len, response, now) {
            Some(Transmit::ToClient { payload, .. }) => Refusal::Reply(payload),
            _ => Refusal::Drop,
        }
    }

    /// An error answer to unauthenticated input is sent only if it is no larger than what
    /// provoked it and the source is within its rate: the relay must not amplify.
    fn unauthenticated_reply(
        &mut self,
        five_tuple: FiveTuple,
        request_len: usize,
        response: Vec<u8>,
        now: Instant,
    ) -> Option<Transmit> {
        if response.len() > request_len {
            self.stats.amplification_suppressed += 1;
            return None;
        }
        if !self.limiter.allow(five_tuple.client.ip(), now) {
            self.stats.rate_limited += 1;
            return None;
        }
        Some(reply(five_tuple, response))
    }

    fn handle_allocate(
        &mut self,
        five_tuple: FiveTuple,
        request: &Message<'_>,
        auth: &Authenticated,
        now: Instant,
        binder: &mut dyn RelayBinder,
    ) -> Vec<u8> {
        if let Some(existing) = self.allocations.get(&five_tuple) {
            if existing.allocate_transaction == request.transaction_id {
                return existing.allocate_response.clone();
            }
            return self.error(request, 437, &[], Some(auth));
        }
        match request.requested_transport() {
            None => return self.error(request, 400, &[], Some(auth)),
            Some(PROTOCOL_UDP) => {}
            Some(_) => return self.error(request, 442, &[], Some(auth)),
        }
        let even_port = request.even_port();
        let token = request.reservation_token();
        let requested_family = request.requested_address_family();
        let additional_family = request.additional_address_family();
        let dont_fragment = request.dont_fragment();
        // RFC 8656 §7.2: combinations that are errors in themselves.
        let inconsistent = (token.is_some()
            && (even_port.is_some() || requested_family.is_some() || additional_family.is_some()))
            || (requested_family.is_some() && additional_family.is_some())
            || additional_family == Some(AddressFamily::V4)
            || (even_port == Some(true) && additional_family.is_some());
        if inconsistent {
            return self.error(request, 400, &[], Some(auth));
        }
        let user_allocations = self.per_user.get(&auth.quota_key).copied().unwrap_or(0);
        if user_allocations >= self.config.allocations_per_user {
            self.stats.quota_rejections += 1;
            warn!(client = %five_tuple.client, user = %auth.username, "allocation quota reached");
            return self.error(request, 486, &[], Some(auth));
        }
        if self.allocations.len() >= self.config.allocations_total {
            self.stats.capacity_rejections += 1;
            warn!(
                total = self.allocations.len(),
                "total allocation limit reached"
            );
            return self.error(request, 508, &[], Some(auth));
        }
        let lifetime = self.lifetime(request.lifetime());
        let expires = now + lifetime;
        let mut relays = Vec::new();
        let mut family_error = None;
        let mut reservation = None;
        if let Some(token) = token {
            match self.reservations.remove(&token) {
                Some((addr, until)) if until > now => {
                    let advertised = self
                        .relay_address(addr.ip())
                        .map_or(addr.ip(), |r| r.advertised);
                    relays.push(Relay {
                        bound: addr,
                        advertised: SocketAddr::new(advertised, addr.port()),
                        expires,
                    });
                }
                Some((addr, _)) => {
                    self.ports.release(addr, binder);
                    return self.error(request, 508, &[], Some(auth));
                }
                None => return self.error(request, 508, &[], Some(auth)),
            }
        } else {
            let primary = requested_family.unwrap_or(AddressFamily::V4);
            let mut families = vec![primary];
            if additional_family == Some(AddressFamily::V6) {
                families.push(AddressFamily::V6);
            }
            let parity = match even_port {
                None => Parity::Any,
                Some(false) => Parity::Even,
                Some(true) => Parity::EvenPair,
            };
            for (index, family) in families.into_iter().enumerate() {
                let Some(relay_address) = self.family_address(family) else {
                    if index == 0 {
                        self.release_relays(&relays, binder);
                        return self.error(request, 440, &[], Some(auth));
                    }
                    family_error = Some(family);
                    continue;
                };
                match self.ports.allocate(
                    relay_address.bind,
                    parity,
                    dont_fragment,
                    &mut self.rng,
                    binder,
                ) {
                    Some((bound, held)) => {
                        reservation = held;
                        relays.push(Relay {
                            bound,
                            advertised: SocketAddr::new(relay_address.advertised, bound.port()),
                            expires,
                        });
                    }
                    None => {
                        self.release_relays(&relays, binder);
                        self.stats.capacity_rejections += 1;
                        warn!(client = %five_tuple.client, "relay port range exhausted");
                        return self.error(request, 508, &[], Some(auth));
                    }
                }
            }
        }
        let mut attributes: Vec<Attribute<'_>> = relays
            .iter()
            .map(|r| Attribute::XorRelayedAddress(r.advertised))
            .collect();
        if let Some(family) = family_error {
            attributes.push(Attribute::AddressErrorCode {
                family,
                code: 440,
                reason: reason_phrase(440),
            });
        }
        attributes.push(Attribute::Lifetime(duration_secs(lifetime)));
        if let Some(held) = reservation {
            let mut token = [0u8; 8];
            self.rng.fill_bytes(&mut token);
            self.reservations
                .insert(token, (held, now + RESERVATION_LIFETIME));
            attributes.push(Attribute::ReservationToken(token));
        }
        attributes.push(Attribute::XorMappedAddress(five_tuple.client));
        let response = self.success(request, &attributes, Some(auth));
        info!(
            client = %five_tuple.client,
            transport = ?five_tuple.transport,
            user = %auth.username,
            relays = ?relays.iter().map(|r| r.bound).collect::<Vec<_>>(),
            lifetime_s = lifetime.as_secs(),
            "allocation created"
        );
        for relay in &relays {
            self.by_relay.insert(relay.bound, five_tuple);
        }
        let mut allocation = Allocation::new(
            five_tuple,
            auth.username.clone(),
            auth.quota_key.clone(),
            relays,
            request.transaction_id,
        );
        allocation.allocate_response = response.clone();
        self.allocations.insert(five_tuple, allocation);
        *self.per_user.entry(auth.quota_key.clone()).or_default() += 1;
        self.stats.allocations_created += 1;
        response
    }

    fn handle_refresh(
        &mut self,
        five_tuple: FiveTuple,
        request: &Message<'_>,
        auth: &Authenticated,
        now: Instant,
        binder: &mut dyn RelayBinder,
    ) -> Vec<u8> {
        let family = request.requested_address_family();
        let requested = request.lifetime();
        let lifetime = match requested {
            Some(0) => Duration::ZERO,
            other => self.lifetime(other),
        };
        let allocation = self
            .allocations
            .get_mut(&five_tuple)
            .expect("checked above");
        let matches = |relay: &Relay| family.is_none_or(|f| family_of(relay.bound.ip()) == f);
        if !allocation.relays.iter().any(matches) {
            return self.error(request, 443, &[], Some(auth));
        }
        if lifetime.is_zero() {
            let (gone, kept): (Vec<Relay>, Vec<Relay>) =
                allocation.relays.iter().partition(|r| matches(r));
            allocation.relays = kept;
            let dead = allocation.is_dead();
            for relay in &gone {
                self.by_relay.remove(&relay.bound);
                self.ports.release(relay.bound, binder);
            }
            if dead {
                self.delete_allocation(five_tuple, binder);
            }
        } else {
            for relay in allocation.relays.iter_mut().filter(|r| matches(r)) {
                relay.expires = now + lifetime;
            }
        }
        if let Some(allocation) = self.allocations.get_mut(&five_tuple) {
            allocation.sync_fast_path(now, &mut self.fast_path);
        }
        self.success(
            request,
            &[Attribute::Lifetime(duration_secs(lifetime))],
            Some(auth),
        )
    }

    fn handle_create_permission(
        &mut self,
        five_tuple: FiveTuple,
        request: &Message<'_>,
        auth: &Authenticated,
        now: Instant,
    ) -> Vec<u8> {
        let peers: Vec<SocketAddr> = request.xor_peer_addresses().map(canonical_socket).collect();
        if peers.is_empty() {
            return self.error(request, 400, &[], Some(auth));
        }
        let allocation = self.allocations.get(&five_tuple).expect("checked above");
        for peer in &peers {
            if let Err(reason) = self.config.peer_policy.check(peer.ip()) {
                self.stats.forbidden_peers += 1;
                warn!(client = %five_tuple.client, user = %auth.username, peer = %peer.ip(), %reason, "permission refused");
                return self.error(request, 403, &[], Some(auth));
            }
            if allocation.relay_for(peer).is_none() {
                return self.error(request, 443, &[], Some(auth));
            }
        }
        let allocation = self
            .allocations
            .get_mut(&five_tuple)
            .expect("checked above");
        for peer in &peers {
            allocation.install_permission(peer.ip(), now);
        }
        allocation.sync_fast_path(now, &mut self.fast_path);
        self.success(request, &[], Some(auth))
    }

    fn handle_channel_bind(
        &mut self,
        five_tuple: FiveTuple,
        request: &Message<'_>,
        auth: &Authenticated,
        now: Instant,
    ) -> Vec<u8> {
        let channel = request
            .channel_number()
            .filter(|n| (CHANNEL_MIN..=CHANNEL_MAX).contains(n));
        let peer = request.xor_peer_addresses().next().map(canonical_socket);
        let (Some(channel), Some(peer)) = (channel, peer) else {
            debug!(
                client = %five_tuple.client,
                channel = ?request.channel_number(),
                peer = ?peer,
                "ChannelBind without a valid channel number (0x4000-0x7FFF) or peer"
            );
            return self.error(request, 400, &[], Some(auth));
        };
        if let Err(reason) = self.config.peer_policy.check_socket(peer) {
            self.stats.forbidden_peers += 1;
            warn!(client = %five_tuple.client, user = %auth.username, %peer, %reason, "channel bind refused");
            return self.error(request, 403, &[], Some(auth));
        }
        let allocation = self
            .allocations
            .get_mut(&five_tuple)
            .expect("checked above");
        if allocation.relay_for(&peer).is_none() {
            return self.error(request, 443, &[], Some(auth));
        }
        match allocation.bind_channel(channel, peer, now) {
            Ok(new) => {
                if new {
                    debug!(client = %five_tuple.client, channel, %peer, "channel bound");
                }
                allocation.sync_fast_path(now, &mut self.fast_path);
                self.success(request, &[], Some(auth))
            }
            Err(conflict) => {
                debug!(client = %five_tuple.client, channel, %peer, ?conflict, "channel bind conflict");
                self.error(request, 400, &[], Some(auth))
            }
        }
    }

    /// Send indication (RFC 8656 §11.2). Indications get no answer (RFC 8489 §6.3.2), so a
    /// refused one is dropped and counted.
    fn handle_send(
        &mut self,
        five_tuple: FiveTuple,
        indication: &Message<'_>,
        now: Instant,
    ) -> Option<Transmit> {
        let peer = indication.xor_peer_addresses().next().map(canonical_socket);
        let (Some(peer), Some(data)) = (peer, indication.data()) else {
            self.stats.malformed_dropped += 1;
            return None;
        };
        self.relay_to_peer(five_tuple, peer, data, now)
    }

    fn handle_channel_data(
        &mut self,
        five_tuple: FiveTuple,
        bytes: &[u8],
        now: Instant,
    ) -> Option<Transmit> {
        let Ok(frame) = ChannelData::parse(bytes) else {
            self.stats.malformed_dropped += 1;
            return None;
        };
        let Some(peer) = self
            .allocations
            .get(&five_tuple)
            .and_then(|a| a.channel(frame.channel, now))
        else {
            self.stats.no_allocation_dropped += 1;
            return None;
        };
        self.relay_to_peer(five_tuple, peer, frame.data, now)
    }

    /// The one path towards peers: allocation, policy and permission checked every time.
    fn relay_to_peer(
        &mut self,
        five_tuple: FiveTuple,
        peer: SocketAddr,
        data: &[u8],
        now: Instant,
    ) -> Option<Transmit> {
        let Some(allocation) = self.allocations.get_mut(&five_tuple) else {
            self.stats.no_allocation_dropped += 1;
            return None;
        };
        if let Err(reason) = self.config.peer_policy.check_socket(peer) {
            self.stats.forbidden_peers += 1;
            debug!(client = %five_tuple.client, %peer, %reason, "data to forbidden peer dropped");
            return None;
        }
        if !allocation.has_permission(peer.ip(), now) {
            self.stats.no_permission_dropped += 1;
            return None;
        }
        let relay = allocation.relay_for(&peer)?.bound;
        allocation.relayed.from_client += data.len() as u64;
        self.stats.to_peer_packets += 1;
        self.stats.to_peer_bytes += data.len() as u64;
        Some(Transmit::ToPeer {
            relay,
            peer,
            payload: data.to_vec(),
        })
    }

    /// 437 when the 5-tuple has no allocation, 441 when another user asks (RFC 8656 §5).
    fn owned_allocation(&self, five_tuple: FiveTuple, auth: &Authenticated) -> Result<(), u16> {
        match self.allocations.get(&five_tuple) {
            None => Err(437),
            Some(allocation) if allocation.username != auth.username => Err(441),
            Some(_) => Ok(()),
        }
    }

    fn delete_allocation(&mut self, five_tuple: FiveTuple, binder: &mut dyn RelayBinder) {
        let Some(mut allocation) = self.allocations.remove(&five_tuple) else {
            return;
        };
        allocation.withdraw_fast_path(&mut self.fast_path);
        for relay in &allocation.relays {
            self.by_relay.remove(&relay.bound);
            self.ports.release(relay.bound, binder);
        }
        self.count_down_user(&allocation.quota_key);
        self.stats.allocations_deleted += 1;
        info!(client = %five_tuple.client, user = %allocation.username, "allocation deleted");
    }

    fn release_relays(&mut self, relays: &[Relay], binder: &mut dyn RelayBinder) {
        for relay in relays {
            self.ports.release(relay.bound, binder);
        }
    }

    fn count_down_user(&mut self, quota_key: &str) {
        if let Some(count) = self.per_user.get_mut(quota_key) {
            *count -= 1;
            if *count == 0 {
                self.per_user.remove(quota_key);
            }
        }
    }

    fn family_address(&self, family: AddressFamily) -> Option<RelayAddress> {
        match family {
            AddressFamily::V4 => self.config.relay_v4,
            AddressFamily::V6 => self.config.relay_v6,
        }
    }

    fn relay_address(&self, bound: IpAddr) -> Option<RelayAddress> {
        [self.config.relay_v4, self.config.relay_v6]
            .into_iter()
            .flatten()
            .find(|r| r.bind == bound)
    }

    /// RFC 8656 §7.2: the default when none or less is asked, capped at the maximum.
    fn lifetime(&self, requested: Option<u32>) -> Duration {
        let requested = requested.map_or(self.config.default_lifetime, |s| {
            Duration::from_secs(s.into())
        });
        requested
            .max(self.config.default_lifetime)
            .min(self.config.max_lifetime)
    }

    fn success(
        &self,
        request: &Message<'_>,
        attributes: &[Attribute<'_>],
        auth: Option<&Authenticated>,
    ) -> Vec<u8> {
        self.build(request, Class::SuccessResponse, attributes, auth)
    }

    fn error(
        &self,
        request: &Message<'_>,
        code: u16,
        attributes: &[Attribute<'_>],
        auth: Option<&Authenticated>,
    ) -> Vec<u8> {
        let mut all = vec![Attribute::ErrorCode {
            code,
            reason: reason_phrase(code),
        }];
        all.extend_from_slice(attributes);
        self.build(request, Class::ErrorResponse, &all, auth)
    }

    fn build(
        &self,
        request: &Message<'_>,
        class: Class,
        attributes: &[Attribute<'_>],
        auth: Option<&Authenticated>,
    ) -> Vec<u8> {
        let mut b = MessageBuilder::new(class, request.method, request.transaction_id);
        for attribute in attributes {
            b.add(attribute);
        }
        if let Some(software) = &self.config.software {
            b.add(&Attribute::Software(software));
        }
        if let Some(auth) = auth {
            match auth.integrity {
                IntegrityKind::Sha256 => b.add_message_integrity_sha256(&auth.key),
                IntegrityKind::Sha1 => b.add_message_integrity(&auth.key),
            };
        }
        if request
            .attributes()
            .any(|a| matches!(a, Attribute::Fingerprint(_)))
        {
            b.add_fingerprint();
        }
        b.finish()
    }
}

/// RFC 8489 §9.2.4: without PASSWORD-ALGORITHMS and PASSWORD-ALGORITHM the key is MD5; with
/// them, the list must be the one we offered (downgrade protection) and the choice in it.
/// None means 400.
fn password_algorithm(request: &Message<'_>) -> Option<PasswordAlgorithm> {
    let chosen = request.password_algorithm().map(|(algorithm, _)| algorithm);
    match (request.password_algorithms(), chosen) {
        (None, None) => Some(PasswordAlgorithm::Md5),
        (Some(list), Some(algorithm)) if list == OFFERED_ALGORITHMS => match algorithm {
            ALGORITHM_MD5 => Some(PasswordAlgorithm::Md5),
            ALGORITHM_SHA256 => Some(PasswordAlgorithm::Sha256),
            _ => None,
        },
        _ => None,
    }
}

/// A peer given as `::ffff:a.b.c.d` is the IPv4 peer a.b.c.d: same permission, same relay.
fn canonical_socket(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn family_of(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::V4
    } else {
        AddressFamily::V6
    }
}

fn reply(five_tuple: FiveTuple, payload: Vec<u8>) -> Transmit {
    Transmit::ToClient {
        five_tuple,
        payload,
    }
}

fn duration_secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
