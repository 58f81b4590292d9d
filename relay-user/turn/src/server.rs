//! The TURN server as a pure state machine (RFC 8656 over RFC 8489). It is fed datagrams or
//! stream frames from clients, datagrams from peers, the answers to the relay binds it asked
//! for and timeouts, each with the current time; everything it wants done (send, bind or
//! release a relay socket, put a channel into the kernel's fast path or take it out) comes
//! out of one queue, [`Server::poll_output`], and [`Server::poll_timeout`] says when it next
//! needs [`Server::handle_timeout`].
//!
//! The data path copies nothing: ChannelData and Send indications from clients are relayed as
//! a range of the input, and datagrams from peers are framed in the room the caller leaves
//! around them ([`PEER_HEADROOM`], [`PEER_TAILROOM`]).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
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

use crate::allocation::{Allocation, BandwidthRefusal, FastPathEvent, Relay, RelayedBytes};
use crate::bandwidth::{Direction, TotalLease};
use crate::channel_data::{CHANNEL_MAX, CHANNEL_MIN, ChannelData, frame_in_place};
use crate::peer_policy::PeerPolicy;
use crate::ports::{Candidate, Parity, PortSearch};
use crate::shared::{QuotaRefusal, SharedState};
use crate::{FiveTuple, Transport};
use rampart_rate_limit::{RateLimit, SourceRateLimiter};

/// RFC 8656 §14.9: a reservation made with EVEN-PORT's R bit is held for about 30 s.
const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);
/// How often the per-source rate limiter and the revocation list are pruned while they hold
/// anything: they bound memory under a flood, not any protocol timer.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);
/// IANA protocol numbers carried in REQUESTED-TRANSPORT (RFC 8656 §14.7, RFC 6062 §6.1).
const PROTOCOL_UDP: u8 = 17;
const PROTOCOL_TCP: u8 = 6;
const ALGORITHM_MD5: u16 = 0x0001;
const ALGORITHM_SHA256: u16 = 0x0002;
/// What we offer in PASSWORD-ALGORITHMS, strongest first (RFC 8489 §14.11).
const OFFERED_ALGORITHMS: [(u16, &[u8]); 2] = [(ALGORITHM_SHA256, &[]), (ALGORITHM_MD5, &[])];

/// Bytes a peer datagram needs free before it in the buffer given to
/// [`Server::handle_peer_input`]: the largest header put in front of it, a Data indication
/// to an IPv6 peer (STUN header 20, XOR-PEER-ADDRESS 24, DATA's header 4).
pub const PEER_HEADROOM: usize = 48;
/// Bytes a peer datagram needs free after it: padding to a multiple of 4 (RFC 8489 §14,
/// RFC 8656 §12.5).
pub const PEER_TAILROOM: usize = 3;

/// A relay address family the server serves: where relay sockets bind and what clients are
/// told (the public address when behind a 1:1 NAT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayAddress {
    pub bind: IpAddr,
    pub advertised: IpAddr,
}

/// Everything the state machine needs, already validated (see the agent's configuration).
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
    /// Peer connections (being connected, waiting for their ConnectionBind, or bound) one TCP
    /// allocation may have at once (RFC 6062 sets none; each holds sockets and buffers).
    pub peer_connections_per_allocation: usize,
    /// Who must agree before an external user's media reaches an internal network.
    pub consent: Consent,
    /// Each allocation's limit, each direction (none: unlimited).
    pub bandwidth: crate::bandwidth::BandwidthPolicy,
    /// Every client listener and its side: allocations made on an internal one are internal
    /// parties'.
    pub listener_sides: Vec<ListenerSide>,
}

/// A client listener and the side of the edge it faces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerSide {
    pub transport: Transport,
    pub address: SocketAddr,
    pub internal: bool,
}

/// Consent for media from external users towards internal networks (the peer policy's
/// allowed networks): the role's rule that an external user reaches inside only with an
/// authenticated internal party's agreement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Consent {
    /// No consent needed: every authenticated user may relay to the allowed networks.
    Off,
    /// The internal address is an internal party's: a client holding an allocation made on an
    /// internal listener from it.
    #[default]
    Party,
    /// As `Party`, and a front-end has authorized the pair (external user, that party's user)
    /// through the control plane ([`MediaAuthorization`]); its expiry or revocation ends the
    /// flow.
    Authorized,
}

/// A front-end's authorization (the control plane's AuthorizeMediaSession): `external` may
/// relay to the addresses of `internal`'s allocations on this edge until `expires_unix`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MediaAuthorization {
    pub external: String,
    pub internal: String,
    pub expires_unix: u64,
}

/// What a transmit carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    /// A message the server built: responses, challenges (signalling, not the data path).
    Message(Vec<u8>),
    /// Bytes of the buffer passed with the input that produced the transmit, framed where
    /// they lie: the data path. Valid until the next input.
    InPlace(Range<usize>),
}

/// Something to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transmit {
    /// To a client, on the transport connection or socket the 5-tuple names.
    ToClient {
        five_tuple: FiveTuple,
        payload: Payload,
    },
    /// To a peer, from the relay socket bound at `relay`.
    ToPeer {
        relay: SocketAddr,
        peer: SocketAddr,
        payload: Payload,
    },
}

/// What the server asks of its shell, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    Transmit(Transmit),
    /// Bind a UDP relay socket at `relay`, then answer with [`Server::handle_bind_result`].
    /// `dont_fragment`: RFC 8656 §14.8, datagrams to peers leave with DF set.
    BindRelay {
        relay: SocketAddr,
        dont_fragment: bool,
    },
    /// Listen for TCP peers at `relay` (RFC 6062 §5.1), with `SO_REUSEPORT` so that
    /// connections to peers can leave from the same address, then answer with
    /// [`Server::handle_bind_result`].
    ListenRelay {
        relay: SocketAddr,
    },
    /// Close the relay socket (or listener) at `relay`.
    ReleaseRelay {
        relay: SocketAddr,
    },
    /// Open a TCP connection from `relay` (the allocation's relayed address) to `peer`, then
    /// answer with [`Server::handle_connect_result`] (RFC 6062 §5.2).
    ConnectPeer {
        id: ConnectionId,
        relay: SocketAddr,
        peer: SocketAddr,
    },
    /// Join peer connection `id` to the client data connection `client`, whose frames end
    /// here: from now on bytes pass between the two as they are (RFC 6062 §5.4).
    SpliceConnection {
        id: ConnectionId,
        client: FiveTuple,
    },
    /// Close peer connection `id`, whatever state it is in (connecting, waiting or spliced).
    ClosePeerConnection {
        id: ConnectionId,
    },
    /// A channel for the kernel's fast path to install, update or withdraw.
    FastPath(FastPathEvent),
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
    /// Allocates that asked for a second family with the draft attribute 0x8032.
    pub legacy_additional_address_family: u64,
    /// TCP allocations (RFC 6062): peer connections opened by Connect, accepted from peers,
    /// failed or timed out connecting (447), refused on arrival (no permission, policy, cap),
    /// bound to a client data connection, and closed for want of a ConnectionBind in 30 s.
    pub peer_connections_connected: u64,
    pub peer_connections_accepted: u64,
    pub peer_connections_failed: u64,
    pub peer_connections_refused: u64,
    pub peer_connections_bound: u64,
    pub peer_connections_unbound_expired: u64,
    /// Send indications and ChannelData for a TCP allocation, which relays no datagrams.
    pub wrong_transport_dropped: u64,
    /// Consent: permissions held for want of an internal party, held ones released once one
    /// came, datagrams dropped while held, TCP connections refused for want of one.
    pub consent_held_permissions: u64,
    pub consent_granted: u64,
    pub consent_held_dropped: u64,
    pub consent_refused_connections: u64,
    /// Consent taken back (an authorization revoked or expired, the consenting user revoked):
    /// the permission is held again, its kernel channels withdrawn, its connections closed.
    pub consent_withdrawn: u64,
    /// Datagrams dropped over their allocation's bandwidth limit.
    pub bandwidth_dropped: u64,
    /// Datagrams dropped over the agent's total bandwidth limit (its userspace share).
    pub bandwidth_total_dropped: u64,
}

impl Stats {
    fn count_bandwidth_refusal(&mut self, refusal: BandwidthRefusal) {
        match refusal {
            BandwidthRefusal::Allocation => self.bandwidth_dropped += 1,
            BandwidthRefusal::Total => self.bandwidth_total_dropped += 1,
        }
    }
}

/// Every loop's counters summed: the agent's.
impl std::ops::AddAssign<&Stats> for Stats {
    fn add_assign(&mut self, other: &Stats) {
        let Stats {
            malformed_dropped,
            rate_limited,
            amplification_suppressed,
            challenges,
            auth_failures,
            stale_nonces,
            forbidden_peers,
            no_permission_dropped,
            no_allocation_dropped,
            quota_rejections,
            capacity_rejections,
            allocations_created,
            allocations_deleted,
            allocations_expired,
            to_peer_packets,
            to_peer_bytes,
            to_client_packets,
            to_client_bytes,
            legacy_additional_address_family,
            peer_connections_connected,
            peer_connections_accepted,
            peer_connections_failed,
            peer_connections_refused,
            peer_connections_bound,
            peer_connections_unbound_expired,
            wrong_transport_dropped,
            consent_held_permissions,
            consent_granted,
            consent_held_dropped,
            consent_refused_connections,
            consent_withdrawn,
            bandwidth_dropped,
            bandwidth_total_dropped,
        } = other;
        self.malformed_dropped += malformed_dropped;
        self.rate_limited += rate_limited;
        self.amplification_suppressed += amplification_suppressed;
        self.challenges += challenges;
        self.auth_failures += auth_failures;
        self.stale_nonces += stale_nonces;
        self.forbidden_peers += forbidden_peers;
        self.no_permission_dropped += no_permission_dropped;
        self.no_allocation_dropped += no_allocation_dropped;
        self.quota_rejections += quota_rejections;
        self.capacity_rejections += capacity_rejections;
        self.allocations_created += allocations_created;
        self.allocations_deleted += allocations_deleted;
        self.allocations_expired += allocations_expired;
        self.to_peer_packets += to_peer_packets;
        self.to_peer_bytes += to_peer_bytes;
        self.to_client_packets += to_client_packets;
        self.to_client_bytes += to_client_bytes;
        self.legacy_additional_address_family += legacy_additional_address_family;
        self.peer_connections_connected += peer_connections_connected;
        self.peer_connections_accepted += peer_connections_accepted;
        self.peer_connections_failed += peer_connections_failed;
        self.peer_connections_refused += peer_connections_refused;
        self.peer_connections_bound += peer_connections_bound;
        self.peer_connections_unbound_expired += peer_connections_unbound_expired;
        self.wrong_transport_dropped += wrong_transport_dropped;
        self.consent_held_permissions += consent_held_permissions;
        self.consent_granted += consent_granted;
        self.consent_held_dropped += consent_held_dropped;
        self.consent_refused_connections += consent_refused_connections;
        self.consent_withdrawn += consent_withdrawn;
        self.bandwidth_dropped += bandwidth_dropped;
        self.bandwidth_total_dropped += bandwidth_total_dropped;
    }
}

/// The output queue, which the allocations' fast-path bookkeeping writes into directly.
#[derive(Debug, Default)]
struct Outputs(VecDeque<Output>);

impl Extend<FastPathEvent> for Outputs {
    fn extend<I: IntoIterator<Item = FastPathEvent>>(&mut self, events: I) {
        self.0.extend(events.into_iter().map(Output::FastPath));
    }
}

/// What a deadline in the timer heap is for. Entries are not removed when their deadline
/// moves: a popped entry is checked against the state it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Allocation(FiveTuple),
    Reservation([u8; 8]),
    PeerConnection(ConnectionId),
}

/// What a response needs of the request it answers.
#[derive(Clone, Copy, Debug)]
struct ReplyTo {
    method: Method,
    transaction_id: TransactionId,
    /// RFC 8489 §14.7: answer with FINGERPRINT when the request had one.
    fingerprint: bool,
}

impl From<&Message<'_>> for ReplyTo {
    fn from(request: &Message<'_>) -> Self {
        ReplyTo {
            method: request.method,
            transaction_id: request.transaction_id,
            fingerprint: request
                .attributes()
                .any(|a| matches!(a, Attribute::Fingerprint(_))),
        }
    }
}

/// Where an Allocate's first relay comes from.
enum RelaySource {
    Reservation([u8; 8]),
    Search(RelayAddress, Parity),
}

/// An Allocate waiting for the relay binds it asked the shell for.
struct PendingAllocate {
    reply: ReplyTo,
    auth: Authenticated,
    lifetime: Duration,
    dont_fragment: bool,
    relays: Vec<Relay>,
    /// ADDITIONAL-ADDRESS-FAMILY's second family, searched once the first is bound.
    additional: Option<AddressFamily>,
    /// It was asked for under the draft number 0x8032: a refusal is told under 0x8033 too.
    legacy_family: bool,
    family_error: Option<AddressFamily>,
    /// The odd port of an EVEN-PORT pair, held for a reservation.
    reservation: Option<SocketAddr>,
    /// Where the next relay port is looked for; None when the relays came from a reservation.
    search: Option<PortSearch>,
    advertised: IpAddr,
    candidate: Option<Candidate>,
    /// The candidate's even port is bound and its odd one is being bound.
    binding_pair: bool,
    /// REQUESTED-TRANSPORT TCP: the relay is a listener (RFC 6062).
    tcp: bool,
}

/// A request that passed the long-term credential check (RFC 8489 §9.2.4).
struct Authenticated {
    username: String,
    quota_key: String,
    /// False for credentials that name nobody (see [`crate::auth::Candidates`]).
    named: bool,
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
    /// Each allocation's earliest deadline in `timers`, so that one is pushed only when it
    /// moves earlier.
    scheduled: HashMap<FiveTuple, Instant>,
    pending: HashMap<FiveTuple, PendingAllocate>,
    /// Relay binds asked of the shell and not yet answered, by the Allocate they serve.
    binding: HashMap<SocketAddr, FiveTuple>,
    by_relay: HashMap<SocketAddr, FiveTuple>,
    timers: BinaryHeap<Reverse<(Instant, Timer)>>,
    housekeeping: Option<Instant>,
    shared: Arc<SharedState>,
    /// This loop's lease of the total bandwidth limit's userspace share.
    total_lease: TotalLease,
    limiter: SourceRateLimiter,
    stats: Stats,
    out: Outputs,
    /// Kept across Data indications so that framing one allocates nothing.
    indication: MessageBuilder,
    /// Peer connections of TCP allocations, by CONNECTION-ID.
    peer_connections: HashMap<ConnectionId, PeerConnection>,
    /// Client data connections bound to a peer connection.
    data_connections: HashMap<FiveTuple, ConnectionId>,
    /// The top byte of every CONNECTION-ID this server issues: the shell routes a
    /// ConnectionBind, which arrives on a new connection, to the server that issued its ID.
    connection_shard: u8,
    /// Allocations with held or consented permissions, and the internal parties' generation
    /// the held ones were last judged at.
    consent_tracked: std::collections::HashSet<FiveTuple>,
    parties_seen: u64,
    /// The front-ends' authorizations (`authorized` consent): external user -> internal user
    /// -> expiry (unix seconds), and when the earliest expires.
    authorizations: HashMap<String, HashMap<String, u64>>,
    authorizations_expire: Option<Instant>,
}

impl Server {
    /// `now` and `unix_now` are the same moment on the monotonic and the wall clock: TURN REST
    /// credentials carry wall-clock expiries, everything else runs on `Instant`s.
    /// `shared`: what this server has in common with the other relay loops' (see
    /// [`SharedState`]).
    pub fn new(
        config: ServerConfig,
        shared: Arc<SharedState>,
        rng: StdRng,
        now: Instant,
        unix_now: Duration,
    ) -> Self {
        Server {
            nonces: NonceIssuer::new(shared.nonce_key(), now, config.nonce_lifetime),
            shared,
            limiter: SourceRateLimiter::new(config.unauthenticated_limit),
            config,
            rng,
            epoch: now,
            unix_at_epoch: unix_now,
            allocations: HashMap::new(),
            scheduled: HashMap::new(),
            pending: HashMap::new(),
            binding: HashMap::new(),
            by_relay: HashMap::new(),
            timers: BinaryHeap::new(),
            housekeeping: None,
            total_lease: TotalLease::default(),
            stats: Stats::default(),
            out: Outputs::default(),
            indication: MessageBuilder::new(
                Class::Indication,
                Method::DATA,
                TransactionId([0; 12]),
            ),
            peer_connections: HashMap::new(),
            data_connections: HashMap::new(),
            connection_shard: 0,
            consent_tracked: std::collections::HashSet::new(),
            parties_seen: 0,
            authorizations: HashMap::new(),
            authorizations_expire: None,
        }
    }

    /// The top byte of the CONNECTION-IDs this server issues (see [`connection_shard`]).
    pub fn with_connection_shard(mut self, shard: u8) -> Self {
        self.connection_shard = shard;
        self
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

    /// The next thing the shell must do, in the order the server decided them.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.0.pop_front()
    }

    /// When [`Server::handle_timeout`] is next due; None while nothing will expire.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let timer = self.timers.peek().map(|Reverse((at, _))| *at);
        [timer, self.housekeeping, self.authorizations_expire]
            .into_iter()
            .flatten()
            .min()
    }

    /// `at` on the wall clock, in whole Unix seconds: kept with sub-second precision until
    /// here so that it never lags the front-ends' clock by a rounding.
    pub fn unix_time(&self, at: Instant) -> u64 {
        (self.unix_at_epoch + at.saturating_duration_since(self.epoch)).as_secs()
    }

    /// Adds what the kernel forwarded, and dropped over the limit, on a channel of
    /// `five_tuple` that left the fast path, so the allocation's totals stay whole (nothing if
    /// the allocation is gone).
    pub fn credit_fast_path(
        &mut self,
        five_tuple: &FiveTuple,
        relayed: RelayedBytes,
        over_limit: RelayedBytes,
    ) {
        if let Some(allocation) = self.allocations.get_mut(five_tuple) {
            allocation.relayed.from_client += relayed.from_client;
            allocation.relayed.to_client += relayed.to_client;
            allocation.over_limit.from_client += over_limit.from_client;
            allocation.over_limit.to_client += over_limit.to_client;
        }
    }

    /// Revoke `user` (a static username or the user part of REST usernames): every allocation
    /// of theirs ends now, and their credentials expiring at or before `until_unix` are refused
    /// from now on. Returns how many allocations ended.
    pub fn revoke_user(&mut self, user: &str, until_unix: u64, now: Instant) -> usize {
        self.config.credentials.revoke(user, until_unix);
        self.arm_housekeeping(now);
        let theirs: Vec<FiveTuple> = self
            .allocations
            .iter()
            .filter(|(_, a)| &*a.quota_key == user)
            .map(|(five_tuple, _)| *five_tuple)
            .collect();
        for five_tuple in &theirs {
            self.delete_allocation(*five_tuple);
        }
        let pending: Vec<FiveTuple> = self
            .pending
            .iter()
            .filter(|(_, p)| p.auth.quota_key == user)
            .map(|(five_tuple, _)| *five_tuple)
            .collect();
        for five_tuple in pending {
            self.cancel_allocate(five_tuple);
        }
        self.withdraw_consent_of(user, now);
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
    pub fn set_allowed_peer_networks(&mut self, allowed: Vec<ipnet::IpNet>, now: Instant) {
        info!(
            ?allowed,
            "peer networks allowed by the control plane updated"
        );
        self.config.peer_policy.set_allowed_by_control(allowed);
        // What is internal changed: every external permission is judged again.
        self.judge_every_permission(now);
    }

    /// A new bandwidth policy (the control plane's): every allocation whose limit it changes
    /// takes the new one at once, its channels in the kernel too. Their buckets carry on.
    pub fn set_bandwidth_policy(
        &mut self,
        policy: crate::bandwidth::BandwidthPolicy,
        now: Instant,
    ) {
        if policy == self.config.bandwidth {
            return;
        }
        info!(
            default = ?policy.default,
            users = policy.users.len(),
            "bandwidth policy updated"
        );
        let mut changed = 0usize;
        for allocation in self.allocations.values_mut() {
            let limit = policy.limit_for(&allocation.quota_key);
            if allocation.bandwidth != limit {
                allocation.bandwidth = limit;
                allocation.sync_fast_path(now, &mut self.out);
                changed += 1;
            }
        }
        if changed > 0 {
            info!(allocations = changed, "bandwidth limits changed");
        }
        self.config.bandwidth = policy;
    }

    /// Relay ports in use right now by every loop (allocations and reservations).
    pub fn relay_ports_in_use(&self) -> usize {
        self.shared.ports_in_use()
    }

    /// A datagram (UDP) or a complete frame (TCP/TLS) from a client. What it relays refers to
    /// `bytes` ([`Payload::InPlace`]).
    pub fn handle_client_input(&mut self, five_tuple: FiveTuple, bytes: &[u8], now: Instant) {
        if ChannelData::looks_like_channel_data(bytes) {
            self.handle_channel_data(five_tuple, bytes, now);
            return;
        }
        match Message::parse(bytes) {
            Ok(message) => match message.class {
                Class::Request => self.handle_request(five_tuple, &message, bytes.len(), now),
                Class::Indication if message.method == Method::SEND => {
                    self.handle_send(five_tuple, &message, bytes, now);
                }
                _ => self.stats.malformed_dropped += 1,
            },
            Err(error) => {
                self.stats.malformed_dropped += 1;
                debug!(client = %five_tuple.client, %error, len = bytes.len(), "malformed STUN message");
                if let Some((Class::Request, method, transaction_id)) = Message::peek_header(bytes)
                {
                    let mut b = MessageBuilder::new(Class::ErrorResponse, method, transaction_id);
                    b.add(&Attribute::ErrorCode {
                        code: 400,
                        reason: reason_phrase(400),
                    });
                    let response = b.finish();
                    self.unauthenticated_reply(five_tuple, bytes.len(), response, now);
                }
            }
        }
        self.arm_housekeeping(now);
    }

    /// A datagram that arrived at relay socket `relay` from `peer`, received into
    /// `buf[PEER_HEADROOM..PEER_HEADROOM + len]` with at least [`PEER_TAILROOM`] bytes after
    /// it: what goes to the client is framed in place, in `buf`.
    pub fn handle_peer_input(
        &mut self,
        relay: SocketAddr,
        peer: SocketAddr,
        buf: &mut [u8],
        len: usize,
        now: Instant,
    ) {
        let peer = canonical_socket(peer);
        let Some(five_tuple) = self.by_relay.get(&relay).copied() else {
            self.stats.no_allocation_dropped += 1;
            return;
        };
        let Some(allocation) = self.allocations.get_mut(&five_tuple) else {
            self.stats.no_allocation_dropped += 1;
            return;
        };
        if !allocation.has_permission(peer.ip(), now) {
            self.stats.no_permission_dropped += 1;
            return;
        }
        if allocation.holds(peer.ip()) {
            if self.consent_came(five_tuple, peer.ip(), now) {
                self.handle_peer_input(relay, peer, buf, len, now);
            } else {
                self.stats.consent_held_dropped += 1;
            }
            return;
        }
        let framed = match allocation.channel_to(&peer, now) {
            Some(channel) => frame_in_place(
                buf,
                PEER_HEADROOM,
                len,
                channel,
                five_tuple.transport != Transport::Udp,
            ),
            None => {
                let mut transaction_id = [0u8; 12];
                self.rng.fill_bytes(&mut transaction_id);
                self.indication.reset(
                    Class::Indication,
                    Method::DATA,
                    TransactionId(transaction_id),
                );
                self.indication.add(&Attribute::XorPeerAddress(peer));
                self.indication.frame_around_data(buf, PEER_HEADROOM, len)
            }
        };
        // A datagram too large for a STUN length field (or a buffer without the room asked
        // for) cannot be framed.
        let Some(framed) = framed else {
            self.stats.malformed_dropped += 1;
            return;
        };
        if let Err(refusal) = allocation.within_bandwidth(
            Direction::ToClient,
            len as u64,
            now,
            &mut self.total_lease,
            self.shared.total_bandwidth(),
        ) {
            self.stats.count_bandwidth_refusal(refusal);
            return;
        }
        allocation.relayed.to_client += len as u64;
        self.stats.to_client_packets += 1;
        self.stats.to_client_bytes += len as u64;
        self.out.0.push_back(Output::Transmit(Transmit::ToClient {
            five_tuple,
            payload: Payload::InPlace(framed),
        }));
    }

    /// The shell's answer to [`Output::BindRelay`]: whether the socket at `relay` is bound.
    pub fn handle_bind_result(&mut self, relay: SocketAddr, bound: bool, now: Instant) {
        let Some(five_tuple) = self.binding.remove(&relay) else {
            return;
        };
        let Some(pending) = self.pending.get_mut(&five_tuple) else {
            // The Allocate was abandoned while its bind was under way.
            self.release_port(relay, bound);
            return;
        };
        let Some(candidate) = pending.candidate else {
            return;
        };
        if !bound {
            if pending.binding_pair {
                self.release_port(candidate.addr, true);
            }
            let pending = self.pending.get_mut(&five_tuple).expect("looked up above");
            if let Some(search) = pending.search.as_mut() {
                search.failed();
            }
            pending.candidate = None;
            pending.binding_pair = false;
            self.shared.release_port(candidate.addr);
            if let Some(odd) = candidate.pair {
                self.shared.release_port(odd);
            }
            self.search_next(five_tuple);
            return;
        }
        if let Some(odd) = candidate.pair
            && !pending.binding_pair
        {
            pending.binding_pair = true;
            self.binding.insert(odd, five_tuple);
            self.out.0.push_back(Output::BindRelay {
                relay: odd,
                dont_fragment: false,
            });
            return;
        }
        pending.relays.push(Relay {
            bound: candidate.addr,
            advertised: SocketAddr::new(pending.advertised, candidate.addr.port()),
            expires: now + pending.lifetime,
        });
        pending.reservation = candidate.pair;
        pending.candidate = None;
        pending.binding_pair = false;
        let Some(family) = pending.additional.take() else {
            self.finish_allocate(five_tuple, now);
            return;
        };
        let parity = pending.search.map_or(Parity::Any, |search| search.parity());
        match self.family_address(family) {
            Some(relay_address) => {
                let search = self
                    .shared
                    .search_ports(relay_address.bind, parity, &mut self.rng);
                let pending = self.pending.get_mut(&five_tuple).expect("looked up above");
                pending.search = Some(search);
                pending.advertised = relay_address.advertised;
                self.search_next(five_tuple);
            }
            None => {
                let pending = self.pending.get_mut(&five_tuple).expect("looked up above");
                pending.family_error = Some(family);
                self.finish_allocate(five_tuple, now);
            }
        }
    }

    /// Expire what is due: allocations, permissions, channels and reservations whose deadline
    /// has passed, and nothing else.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(Reverse((at, timer))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            match timer {
                Timer::Allocation(five_tuple) => {
                    if self.scheduled.get(&five_tuple) == Some(&at) {
                        self.scheduled.remove(&five_tuple);
                        self.expire_allocation(five_tuple, now);
                    }
                }
                Timer::Reservation(token) => self.shared.expire_reservation(&token, now),
                Timer::PeerConnection(id) => self.expire_peer_connection(id, at),
            }
        }
        if self.authorizations_expire.is_some_and(|at| at <= now) {
            self.authorizations_expired(now);
        }
        if self.housekeeping.is_some_and(|at| at <= now) {
            self.housekeeping = None;
            self.limiter.sweep(now);
            let unix_now = self.unix_time(now);
            self.config.credentials.prune_revocations(unix_now);
            self.arm_housekeeping(now);
        }
    }

    /// A TCP or TLS client connection closed: its allocation goes with it (RFC 8656 §3.1).
    pub fn client_closed(&mut self, five_tuple: FiveTuple) {
        if let Some(id) = self.data_connections.get(&five_tuple).copied() {
            self.close_peer_connection(id);
        }
        if self.allocations.contains_key(&five_tuple) {
            self.delete_allocation(five_tuple);
        }
        self.cancel_allocate(five_tuple);
    }

    fn expire_allocation(&mut self, five_tuple: FiveTuple, now: Instant) {
        let Some(allocation) = self.allocations.get_mut(&five_tuple) else {
            return;
        };
        let expired = allocation.expire(now);
        // The fast path's entries change only when something expired (refreshes sync on
        // their own).
        if !expired.is_empty() {
            allocation.sync_fast_path(now, &mut self.out);
        }
        for (channel, peer) in &expired.channels {
            debug!(client = %five_tuple.client, channel, %peer, "channel binding expired");
        }
        let dead = allocation.is_dead();
        for relay in expired.relays {
            self.close_peer_connections_on(five_tuple, relay);
            self.by_relay.remove(&relay);
            self.release_port(relay, true);
        }
        if dead {
            if let Some(mut allocation) = self.allocations.remove(&five_tuple) {
                allocation.withdraw_fast_path(&mut self.out);
                self.close_peer_connections(&allocation);
                self.forget_party(&allocation);
                self.stats.allocations_expired += 1;
                self.shared.release(&allocation.quota_key);
                info!(client = %five_tuple.client, user = %allocation.username, "allocation expired");
            }
        } else {
            self.schedule(five_tuple);
        }
    }

    /// Make sure the timer heap holds `five_tuple`'s earliest deadline.
    fn schedule(&mut self, five_tuple: FiveTuple) {
        let Some(deadline) = self
            .allocations
            .get(&five_tuple)
            .and_then(Allocation::next_deadline)
        else {
            return;
        };
        let earlier = self
            .scheduled
            .get(&five_tuple)
            .is_none_or(|scheduled| deadline < *scheduled);
        if earlier {
            self.scheduled.insert(five_tuple, deadline);
            self.timers
                .push(Reverse((deadline, Timer::Allocation(five_tuple))));
        }
    }

    fn arm_housekeeping(&mut self, now: Instant) {
        let anything =
            self.limiter.tracked_sources() > 0 || self.config.credentials.has_revocations();
        if self.housekeeping.is_none() && anything {
            self.housekeeping = Some(now + HOUSEKEEPING_INTERVAL);
        }
    }

    /// Give a relay port back, and its socket if one was bound.
    fn release_port(&mut self, addr: SocketAddr, bound: bool) {
        if self.shared.release_port(addr) && bound {
            self.out.0.push_back(Output::ReleaseRelay { relay: addr });
        }
    }

    fn reply(&mut self, five_tuple: FiveTuple, payload: Vec<u8>) {
        self.out.0.push_back(Output::Transmit(Transmit::ToClient {
            five_tuple,
            payload: Payload::Message(payload),
        }));
    }

    fn handle_request(
        &mut self,
        five_tuple: FiveTuple,
        request: &Message<'_>,
        request_len: usize,
        now: Instant,
    ) {
        let reply = ReplyTo::from(request);
        let unknown = request.unknown_comprehension_required();
        if !unknown.is_empty() {
            let response = self.error(reply, 420, &[Attribute::UnknownAttributes(unknown)], None);
            self.unauthenticated_reply(five_tuple, request_len, response, now);
            return;
        }
        if request.method == Method::BINDING {
            if !self.limiter.allow(five_tuple.client.ip(), now) {
                self.stats.rate_limited += 1;
                return;
            }
            let response = self.success(
                reply,
                &[Attribute::XorMappedAddress(five_tuple.client)],
                None,
            );
            self.reply(five_tuple, response);
            return;
        }
        let auth = match self.authenticate(five_tuple, request, request_len, now) {
            Ok(auth) => auth,
            Err(Refusal::Drop) => return,
            Err(Refusal::Reply(response)) => {
                self.reply(five_tuple, response);
                return;
            }
        };
        let response = match request.method {
            Method::ALLOCATE => match self.handle_allocate(five_tuple, request, auth, now) {
                Some(response) => response,
                None => return,
            },
            Method::CONNECTION_BIND => {
                self.handle_connection_bind(five_tuple, request, &auth);
                return;
            }
            Method::CONNECT => match self.owned_allocation(five_tuple, &auth) {
                Err(code) => self.error(request, code, &[], Some(&auth)),
                Ok(()) => match self.handle_connect(five_tuple, request, auth, now) {
                    Some(response) => response,
                    None => return,
                },
            },
            method @ (Method::REFRESH | Method::CREATE_PERMISSION | Method::CHANNEL_BIND) => {
                match self.owned_allocation(five_tuple, &auth) {
                    Err(code) => self.error(reply, code, &[], Some(&auth)),
                    Ok(()) if method == Method::REFRESH => {
                        self.handle_refresh(five_tuple, request, &auth, now)
                    }
                    Ok(()) if method == Method::CREATE_PERMISSION => {
                        self.handle_create_permission(five_tuple, request, &auth, now)
                    }
                    Ok(()) => self.handle_channel_bind(five_tuple, request, &auth, now),
                }
            }
            _ => self.error(reply, 400, &[], Some(&auth)),
        };
        self.reply(five_tuple, response);
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
                    named: candidates.named,
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
        if self.may_answer_unauthenticated(five_tuple, request_len, response.len(), now) {
            Refusal::Reply(response)
        } else {
            Refusal::Drop
        }
    }

    fn unauthenticated_reply(
        &mut self,
        five_tuple: FiveTuple,
        request_len: usize,
        response: Vec<u8>,
        now: Instant,
    ) {
        if self.may_answer_unauthenticated(five_tuple, request_len, response.len(), now) {
            self.reply(five_tuple, response);
        }
    }

    /// An error answer to unauthenticated input is sent only if it is no larger than what
    /// provoked it and the source is within its rate: the relay must not amplify.
    fn may_answer_unauthenticated(
        &mut self,
        five_tuple: FiveTuple,
        request_len: usize,
        response_len: usize,
        now: Instant,
    ) -> bool {
        if response_len > request_len {
            self.stats.amplification_suppressed += 1;
            return false;
        }
        if !self.limiter.allow(five_tuple.client.ip(), now) {
            self.stats.rate_limited += 1;
            return false;
        }
        true
    }

    /// Answers at once (Some) or once the relay binds it asks for are done (None).
    fn handle_allocate(
        &mut self,
        five_tuple: FiveTuple,
        request: &Message<'_>,
        auth: Authenticated,
        now: Instant,
    ) -> Option<Vec<u8>> {
        if let Some(existing) = self.allocations.get(&five_tuple) {
            if existing.allocate_transaction == request.transaction_id {
                return Some(existing.allocate_response.clone());
            }
            return Some(self.error(request, 437, &[], Some(&auth)));
        }
        if let Some(pending) = self.pending.get(&five_tuple) {
            // A retransmission is answered when the first attempt completes.
            if pending.reply.transaction_id == request.transaction_id {
                return None;
            }
            return Some(self.error(request, 437, &[], Some(&auth)));
        }
        let tcp = match request.requested_transport() {
            None => return Some(self.error(request, 400, &[], Some(&auth))),
            Some(PROTOCOL_UDP) => false,
            Some(PROTOCOL_TCP) => true,
            Some(_) => return Some(self.error(request, 442, &[], Some(&auth))),
        };
        let even_port = request.even_port();
        let token = request.reservation_token();
        let requested_family = request.requested_address_family();
        let additional_family = request.additional_address_family();
        // RFC 6062 §5.1: a TCP allocation is asked for over TCP or TLS, and none of these
        // datagram attributes applies to it.
        if tcp
            && (five_tuple.transport == Transport::Udp
                || even_port.is_some()
                || token.is_some()
                || request.dont_fragment())
        {
            return Some(self.error(request, 400, &[], Some(&auth)));
        }
        if request.has_legacy_additional_address_family() {
            self.stats.legacy_additional_address_family += 1;
        }
        // RFC 8656 §7.2: combinations that are errors in themselves.
        let inconsistent = (token.is_some()
            && (even_port.is_some() || requested_family.is_some() || additional_family.is_some()))
            || (requested_family.is_some() && additional_family.is_some())
            || additional_family == Some(AddressFamily::V4)
            || (even_port == Some(true) && additional_family.is_some());
        if inconsistent {
            return Some(self.error(request, 400, &[], Some(&auth)));
        }
        // Where the relays come from, checked before a quota is taken (and without using up
        // a reservation that a refusal would then lose).
        let source = if let Some(token) = token {
            if !self.shared.reservation_held(&token, now) {
                return Some(self.error(request, 508, &[], Some(&auth)));
            }
            RelaySource::Reservation(token)
        } else {
            let primary = requested_family.unwrap_or(AddressFamily::V4);
            let Some(relay_address) = self.family_address(primary) else {
                return Some(self.error(request, 440, &[], Some(&auth)));
            };
            let parity = match even_port {
                None => Parity::Any,
                Some(false) => Parity::Even,
                Some(true) => Parity::EvenPair,
            };
            RelaySource::Search(relay_address, parity)
        };
        match self.shared.acquire(&auth.quota_key) {
            Ok(()) => {}
            Err(QuotaRefusal::PerUser) => {
                self.stats.quota_rejections += 1;
                warn!(client = %five_tuple.client, user = %auth.username, "allocation quota reached");
                return Some(self.error(request, 486, &[], Some(&auth)));
            }
            Err(QuotaRefusal::Total) => {
                self.stats.capacity_rejections += 1;
                warn!(
                    total = self.shared.allocations(),
                    "total allocation limit reached"
                );
                return Some(self.error(request, 508, &[], Some(&auth)));
            }
        }
        let lifetime = self.lifetime(request.lifetime());
        let dont_fragment = request.dont_fragment();
        let (search, advertised, candidate) = match source {
            RelaySource::Reservation(token) => {
                // Another loop may have redeemed it since it was looked up.
                let Some(addr) = self.shared.redeem(&token) else {
                    self.shared.release(&auth.quota_key);
                    return Some(self.error(request, 508, &[], Some(&auth)));
                };
                let advertised = self
                    .relay_address(addr.ip())
                    .map_or(addr.ip(), |r| r.advertised);
                (None, advertised, Some(Candidate { addr, pair: None }))
            }
            RelaySource::Search(relay_address, parity) => {
                let search = self
                    .shared
                    .search_ports(relay_address.bind, parity, &mut self.rng);
                (Some(search), relay_address.advertised, None)
            }
        };
        self.pending.insert(
            five_tuple,
            PendingAllocate {
                reply: ReplyTo::from(request),
                auth,
                lifetime,
                dont_fragment,
                relays: Vec::new(),
                additional: additional_family.filter(|f| *f == AddressFamily::V6),
                legacy_family: request.has_legacy_additional_address_family(),
                family_error: None,
                reservation: None,
                search,
                advertised,
                candidate,
                binding_pair: false,
                tcp,
            },
        );
        match candidate {
            // The reserved port is held without a socket: this loop binds it.
            Some(candidate) => {
                self.binding.insert(candidate.addr, five_tuple);
                self.out.0.push_back(Output::BindRelay {
                    relay: candidate.addr,
                    dont_fragment,
                });
            }
            None => self.search_next(five_tuple),
        }
        None
    }

    /// Ask the shell to bind the pending Allocate's next candidate port, or fail it with 508
    /// when there is none.
    fn search_next(&mut self, five_tuple: FiveTuple) {
        let Some(pending) = self.pending.get_mut(&five_tuple) else {
            return;
        };
        let next = pending
            .search
            .as_mut()
            .and_then(|search| self.shared.next_port(search));
        match next {
            Some(candidate) => {
                pending.candidate = Some(candidate);
                let dont_fragment = pending.dont_fragment;
                self.binding.insert(candidate.addr, five_tuple);
                self.out.0.push_back(if pending.tcp {
                    Output::ListenRelay {
                        relay: candidate.addr,
                    }
                } else {
                    Output::BindRelay {
                        relay: candidate.addr,
                        dont_fragment,
                    }
                });
            }
            None => {
                self.stats.capacity_rejections += 1;
                warn!(client = %five_tuple.client, "relay port range exhausted");
                if let Some(pending) = self.cancel_allocate(five_tuple) {
                    let response = self.error(pending.reply, 508, &[], Some(&pending.auth));
                    self.reply(five_tuple, response);
                }
            }
        }
    }

    /// Every relay of a pending Allocate is bound: the allocation exists from now on.
    fn finish_allocate(&mut self, five_tuple: FiveTuple, now: Instant) {
        let Some(pending) = self.pending.remove(&five_tuple) else {
            return;
        };
        let auth = &pending.auth;
        let mut attributes: Vec<Attribute<'_>> = pending
            .relays
            .iter()
            .map(|r| Attribute::XorRelayedAddress(r.advertised))
            .collect();
        if let Some(family) = pending.family_error {
            attributes.push(Attribute::AddressErrorCode {
                family,
                code: 440,
                reason: reason_phrase(440),
            });
            if pending.legacy_family {
                attributes.push(Attribute::LegacyAddressErrorCode {
                    family,
                    code: 440,
                    reason: reason_phrase(440),
                });
            }
        }
        attributes.push(Attribute::Lifetime(duration_secs(pending.lifetime)));
        if let Some(held) = pending.reservation {
            let mut token = [0u8; 8];
            self.rng.fill_bytes(&mut token);
            let until = now + RESERVATION_LIFETIME;
            // The port stays taken in the shared port space; its socket closes, so that
            // whichever loop the token holder's 5-tuple belongs to can bind it.
            self.shared.reserve(token, held, until);
            self.out.0.push_back(Output::ReleaseRelay { relay: held });
            self.timers
                .push(Reverse((until, Timer::Reservation(token))));
            attributes.push(Attribute::ReservationToken(token));
        }
        attributes.push(Attribute::XorMappedAddress(five_tuple.client));
        let response = self.success(pending.reply, &attributes, Some(auth));
        info!(
            client = %five_tuple.client,
            transport = ?five_tuple.transport,
            user = %auth.username,
            relays = ?pending.relays.iter().map(|r| r.bound).collect::<Vec<_>>(),
            lifetime_s = pending.lifetime.as_secs(),
            "allocation created"
        );
        for relay in &pending.relays {
            self.by_relay.insert(relay.bound, five_tuple);
        }
        let mut allocation = Allocation::new(
            five_tuple,
            pending.auth.username.into(),
            pending.auth.quota_key.into(),
            pending.relays,
            pending.reply.transaction_id,
        );
        allocation.allocate_response = response.clone();
        allocation.tcp = pending.tcp;
        allocation.internal = self.on_internal_listener(&five_tuple);
        allocation.anonymous = !pending.auth.named;
        allocation.bandwidth = self.config.bandwidth.limit_for(&allocation.quota_key);
        if allocation.internal {
            self.shared
                .party_joined(five_tuple.client.ip().to_canonical(), &allocation.quota_key);
        }
        self.allocations.insert(five_tuple, allocation);
        self.schedule(five_tuple);
        self.stats.allocations_created += 1;
        self.reply(five_tuple, response);
    }

    /// Abandon a pending Allocate: what it bound is released, its quota given back. A bind
    /// still under way is settled when its answer comes.
    fn cancel_allocate(&mut self, five_tuple: FiveTuple) -> Option<PendingAllocate> {
        let pending = self.pending.remove(&five_tuple)?;
        for relay in &pending.relays {
            self.release_port(relay.bound, true);
        }
        if let Some(candidate) = pending.candidate {
            if pending.binding_pair {
                self.release_port(candidate.addr, true);
            } else if let Some(odd) = candidate.pair {
                self.shared.release_port(odd);
            }
        }
        self.shared.release(&pending.auth.quota_key);
        Some(pending)
    }

    fn handle_refresh(
        &mut self,
        five_tuple: FiveTuple,
        request: &Message<'_>,
        auth: &Authenticated,
        now: Instant,
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
                self.close_peer_connections_on(five_tuple, relay.bound);
                self.by_relay.remove(&relay.bound);
                self.release_port(relay.bound, true);
            }
            if dead {
                self.delete_allocation(five_tuple);
            }
        } else {
            for relay in allocation.relays.iter_mut().filter(|r| matches(r)) {
                relay.expires = now + lifetime;
            }
        }
        if let Some(allocation) = self.allocations.get_mut(&five_tuple) {
            allocation.sync_fast_path(now, &mut self.out);
            self.schedule(five_tuple);
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
        let mut judged = Vec::with_capacity(peers.len());
        for peer in &peers {
            judged.push((peer.ip(), allocation.has_permission(peer.ip(), now)));
            allocation.install_permission(peer.ip(), now);
        }
        for (ip, was_permitted) in judged {
            self.hold_unless_consented(five_tuple, ip, was_permitted, now);
        }
        let allocation = self
            .allocations
            .get_mut(&five_tuple)
            .expect("checked above");
        allocation.sync_fast_path(now, &mut self.out);
        self.schedule(five_tuple);
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
        // A TCP allocation relays over peer connections, never in datagrams (as coturn).
        if allocation.tcp {
            return self.error(request, 403, &[], Some(auth));
        }
        if allocation.relay_for(&peer).is_none() {
            return self.error(request, 443, &[], Some(auth));
        }
        let was_permitted = allocation.has_permission(peer.ip(), now);
        match allocation.bind_channel(channel, peer, now) {
            Ok(new) => {
                if new {
                    debug!(client = %five_tuple.client, channel, %peer, "channel bound");
                }
                self.hold_unless_consented(five_tuple, peer.ip(), was_permitted, now);
                let allocation = self
                    .allocations
                    .get_mut(&five_tuple)
                    .expect("checked above");
                allocation.sync_fast_path(now, &mut self.out);
                self.schedule(five_tuple);
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
        bytes: &[u8],
        now: Instant,
    ) {
        let peer = indication.xor_peer_addresses().next().map(canonical_socket);
        let (Some(peer), Some(data)) = (peer, indication.data()) else {
            self.stats.malformed_dropped += 1;
            return;
        };
        self.relay_to_peer(five_tuple, peer, within(bytes, data), now);
    }

    fn handle_channel_data(&mut self, five_tuple: FiveTuple, bytes: &[u8], now: Instant) {
        let Ok(frame) = ChannelData::parse(bytes) else {
            self.stats.malformed_dropped += 1;
            return;
        };
        let Some(peer) = self
            .allocations
            .get(&five_tuple)
            .and_then(|a| a.channel(frame.channel, now))
        else {
            self.stats.no_allocation_dropped += 1;
            return;
        };
        self.relay_to_peer(five_tuple, peer, within(bytes, frame.data), now);
    }

    /// The one path towards peers: allocation, policy and permission checked every time.
    /// `data` is where the payload lies in the input.
    fn relay_to_peer(
        &mut self,
        five_tuple: FiveTuple,
        peer: SocketAddr,
        data: Range<usize>,
        now: Instant,
    ) {
        let Some(allocation) = self.allocations.get_mut(&five_tuple) else {
            self.stats.no_allocation_dropped += 1;
            return;
        };
        if allocation.tcp {
            self.stats.wrong_transport_dropped += 1;
            return;
        }
        if let Err(reason) = self.config.peer_policy.check_socket(peer) {
            self.stats.forbidden_peers += 1;
            debug!(client = %five_tuple.client, %peer, %reason, "data to forbidden peer dropped");
            return;
        }
        if !allocation.has_permission(peer.ip(), now) {
            self.stats.no_permission_dropped += 1;
            return;
        }
        if allocation.holds(peer.ip()) {
            if self.consent_came(five_tuple, peer.ip(), now) {
                self.relay_to_peer(five_tuple, peer, data, now);
            } else {
                self.stats.consent_held_dropped += 1;
            }
            return;
        }
        let Some(relay) = allocation.relay_for(&peer).map(|r| r.bound) else {
            self.stats.no_permission_dropped += 1;
            return;
        };
        let len = data.len() as u64;
        if let Err(refusal) = allocation.within_bandwidth(
            Direction::FromClient,
            len,
            now,
            &mut self.total_lease,
            self.shared.total_bandwidth(),
        ) {
            self.stats.count_bandwidth_refusal(refusal);
            return;
        }
        allocation.relayed.from_client += len;
        self.stats.to_peer_packets += 1;
        self.stats.to_peer_bytes += len;
        self.out.0.push_back(Output::Transmit(Transmit::ToPeer {
            relay,
            peer,
            payload: Payload::InPlace(data),
        }));
    }

    /// 437 when the 5-tuple has no allocation, 441 when another user asks (RFC 8656 §5).
    fn owned_allocation(&self, five_tuple: FiveTuple, auth: &Authenticated) -> Result<(), u16> {
        match self.allocations.get(&five_tuple) {
            None => Err(437),
            Some(allocation) if *allocation.username != *auth.username => Err(441),
            Some(_) => Ok(()),
        }
    }

    fn delete_allocation(&mut self, five_tuple: FiveTuple) {
        let Some(mut allocation) = self.allocations.remove(&five_tuple) else {
            return;
        };
        self.scheduled.remove(&five_tuple);
        allocation.withdraw_fast_path(&mut self.out);
        self.close_peer_connections(&allocation);
        self.forget_party(&allocation);
        for relay in &allocation.relays {
            self.by_relay.remove(&relay.bound);
            self.release_port(relay.bound, true);
        }
        self.shared.release(&allocation.quota_key);
        self.stats.allocations_deleted += 1;
        info!(client = %five_tuple.client, user = %allocation.username, "allocation deleted");
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
        reply: impl Into<ReplyTo>,
        attributes: &[Attribute<'_>],
        auth: Option<&Authenticated>,
    ) -> Vec<u8> {
        self.build(reply.into(), Class::SuccessResponse, attributes, auth)
    }

    fn error(
        &self,
        reply: impl Into<ReplyTo>,
        code: u16,
        attributes: &[Attribute<'_>],
        auth: Option<&Authenticated>,
    ) -> Vec<u8> {
        let mut all = vec![Attribute::ErrorCode {
            code,
            reason: reason_phrase(code),
        }];
        all.extend_from_slice(attributes);
        self.build(reply.into(), Class::ErrorResponse, &all, auth)
    }

    fn build(
        &self,
        reply: ReplyTo,
        class: Class,
        attributes: &[Attribute<'_>],
        auth: Option<&Authenticated>,
    ) -> Vec<u8> {
        let mut b = MessageBuilder::new(class, reply.method, reply.transaction_id);
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
        if reply.fingerprint {
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

/// Where `part`, a slice of `whole`, lies in it.
fn within(whole: &[u8], part: &[u8]) -> Range<usize> {
    let start = (part.as_ptr() as usize).saturating_sub(whole.as_ptr() as usize);
    start..start + part.len()
}

fn duration_secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

#[path = "consent.rs"]
mod consent;
#[path = "tcp_relay.rs"]
mod tcp_relay;

use tcp_relay::PeerConnection;
pub use tcp_relay::{
    CONNECTION_BIND_TIMEOUT, ConnectionId, PEER_CONNECT_TIMEOUT, connection_shard,
};

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
